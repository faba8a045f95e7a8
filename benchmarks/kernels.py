"""Attention kernel benchmarks: every backend of ``perceiver_fast.attention``, and ``auto``, against PyTorch's
reference kernel and FlexAttention.

Our rows are ``perceiver_fast.attention(..., backend=name)`` for every name in ``available_backends()`` and for
``"auto"``, so the dispatch itself is measured; a backend that cannot run a shape gets ``explain``'s reason as its
note. The peers that are not backends: ``sdpa-math`` (PyTorch's reference kernel) and ``flex`` (FlexAttention,
compiled once per shape and grad mode). Shapes are the Perceiver family's: Perceiver AR prefix cross-attention
(N latents over M positions, bottom-right causal; also a left-padded batch), latent self-attention (causal, N x N),
Perceiver IO cross-attention (non-causal) and decoding over a cache (also a preallocated one with ``kv_len``).
TFLOP/s count only unmasked work (see :meth:`benchmarks.shapes.Shape.flops`; backward 2.5x forward) and are
compared with a matmul peak measured in the same run; decoding is judged in GB/s of cache read.

``--write-dispatch-table`` ranks the backends per problem class from the rows of the run, or of ``--from-json``
files without running anything (:mod:`benchmarks.dispatch_table`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.shapes import MODES, Shape

__all__ = ["MODES", "PEERS", "PRESETS", "Shape", "add_arguments", "bench_case", "run"]

PEERS = ("sdpa-math", "flex")
# The fused SDPA kernels: what a user calls instead of us, so what auto is held against.
SDPA_BACKENDS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def perceiver_ar_grid() -> list[Shape]:
    """The issue's grid: N = 512/1024 latents, M = 4k/16k/64k positions, H = 8/16, D = 64/128, batch 1."""
    return [
        Shape("prefix-causal", 1, n, m, h, h, d, d, True)
        for n in (512, 1024)
        for m in (4096, 16384, 65536)
        for h in (8, 16)
        for d in (64, 128)
    ]


def _gpu_preset() -> list[Shape]:
    # Most informative first: a run cut short by --time-limit still measures the classes no table has yet.
    return [
        # Decoding over a preallocated cache (kv_len < cache size): SDPA cannot run it, never measured.
        Shape("decode", 8, 1, 16384, 16, 16, 128, 128, True, kv_len=12288),
        Shape("decode", 1, 1, 65536, 16, 16, 128, 128, True, kv_len=49152),
        # A left-padded Perceiver AR batch: a quarter of each row padded through kv_start.
        Shape("prefix-causal", 4, 512, 16384, 8, 8, 64, 64, True, kv_start=4096),
        # What the H200 run of 2026-11-27 did not reach in its time limit.
        Shape("decode", 8, 1, 16384, 16, 16, 128, 128, True),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 128, False),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 64, False),
        Shape("decode", 8, 4, 16384, 32, 8, 128, 128, True),
        # Measured then, with FlexAttention unfused from the fourth shape on.
        Shape("latent-self", 8, 1024, 1024, 16, 16, 64, 64, True),
        Shape("prefix-causal", 1, 1024, 16384, 16, 16, 128, 128, True),
        Shape("prefix-causal", 4, 512, 16384, 8, 8, 64, 64, True),
        Shape("prefix-causal", 1, 1024, 4096, 16, 16, 64, 64, True),
        Shape("prefix-causal", 1, 1024, 65536, 16, 16, 128, 128, True),
        Shape("prefix-causal", 1, 1024, 16384, 16, 16, 64, 64, True),
    ]


PRESETS: dict[str, Callable[[], list[Shape]]] = {
    # Seconds on two CPU cores: one shape per regime, with and without key bounds.
    "quick": lambda: [
        Shape("prefix-causal", 1, 128, 1024, 4, 4, 64, 64, True),
        Shape("prefix-causal", 2, 128, 1024, 4, 4, 64, 64, True, kv_start=256),
        Shape("latent-self", 1, 256, 256, 8, 8, 64, 64, True),
        Shape("io-cross", 1, 256, 2048, 8, 8, 64, 64, False),
        Shape("decode", 4, 1, 4096, 8, 8, 64, 64, True, kv_len=3072),
    ],
    # About three minutes on an H100/H200 with --time-limit 150 (gpu_check.sh).
    "gpu": _gpu_preset,
    "full": lambda: [
        *_gpu_preset()[:7],
        *perceiver_ar_grid(),
        Shape("latent-self", 8, 1024, 1024, 16, 16, 64, 64, True),
        Shape("latent-self", 8, 1024, 1024, 16, 16, 128, 128, True),
        Shape("prefix-causal", 4, 512, 16384, 8, 8, 64, 64, True),
        Shape("decode", 8, 4, 65536, 32, 8, 128, 128, True),
    ],
}


class Unsupported(Exception):
    """A backend cannot run a shape; the message says why and goes into the results."""


Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Case:
    """What every backend timed on one (shape, mode) shares: inputs, key bounds, and the eager reference."""

    shape: Shape
    mode: str
    device: torch.device
    dtype: torch.dtype
    sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grad_out: torch.Tensor
    kv_start: torch.Tensor | None
    kv_len: torch.Tensor | None
    reference: tuple | None = field(default=None, repr=False)

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    def grad_mode(self) -> contextlib.AbstractContextManager:
        """Forward rows run under ``no_grad``, as inference does (and so compiled peers see one grad mode)."""
        return contextlib.nullcontext() if self.backward else torch.no_grad()

    def op_arguments(self) -> dict:
        return {"causal": self.shape.causal, "kv_start": self.kv_start, "kv_len": self.kv_len}


def _tensor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return size * shape.batch * (shape.nq * shape.hq * shape.dqk + shape.nk * shape.hkv * (shape.dqk + shape.dv))


def _input_sets(shape: Shape, device: torch.device, dtype: torch.dtype) -> int:
    """Enough input copies to cover twice the L2 cache, so timings do not read inputs from cache (GPU only)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(4, math.ceil(2 * l2 / _tensor_bytes(shape, dtype))))


def make_case(shape: Shape, mode: str, device: torch.device, dtype: torch.dtype) -> Case:
    """Inputs for one (shape, mode): the same values for every backend (seeded by the shape's label)."""
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(shape.label.encode()))

    def make(*dims: int) -> torch.Tensor:
        t = torch.randn(*dims, device=device, dtype=dtype, generator=generator)
        return t.requires_grad_(mode == "fwd+bwd")

    sets = [
        (
            make(shape.batch, shape.nq, shape.hq, shape.dqk),
            make(shape.batch, shape.nk, shape.hkv, shape.dqk),
            make(shape.batch, shape.nk, shape.hkv, shape.dv),
        )
        for _ in range(_input_sets(shape, device, dtype))
    ]
    grad_out = torch.randn(shape.batch, shape.nq, shape.hq, shape.dv, device=device, dtype=dtype, generator=generator)
    kv_start, kv_len = shape.bound_tensors(device)
    return Case(shape, mode, device, dtype, sets, grad_out, kv_start, kv_len)


def _op(name: str) -> Callable[[Case], tuple[Run, Callable[[], dict]]]:
    """A row of ours: ``perceiver_fast.attention(..., backend=name)``; ``explain`` says whether it can run."""

    def build(case: Case) -> tuple[Run, Callable[[], dict]]:
        from perceiver_fast.kernels import attention, explain

        if name == "triton" and case.device.type != "cuda":
            raise Unsupported("Triton runs CPU tensors only in its interpreter, which is for tests, not timings")
        arguments = case.op_arguments()
        try:
            decision = explain(*case.sets[0], backend=name, **arguments)
        except RuntimeError as error:
            raise Unsupported(str(error).split("cannot run this call: ", 1)[-1]) from None
        picked = {"auto_backend": decision.backend} if name == "auto" else {}

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, backend=name, **arguments)

        return run, lambda: picked

    return build


def _sdpa_math(case: Case) -> tuple[Run, Callable[[], dict]]:
    """PyTorch's reference kernel, with a dense mask for bottom-right causality and key bounds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from perceiver_fast.kernels.reference import key_ranges, range_mask

    shape = case.shape
    mask = {}
    if shape.causal or case.kv_start is not None or case.kv_len is not None:
        ranges = key_ranges(
            shape.batch, shape.nq, shape.nk, causal=shape.causal, kv_start=case.kv_start, kv_len=case.kv_len,
            device=case.device,
        )
        mask = {"attn_mask": range_mask(*ranges, shape.nk).unsqueeze(1)}
    gqa = shape.hq != shape.hkv

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=gqa, **mask
            )
        return out.transpose(1, 2)

    return run, dict


def _flex(case: Case) -> tuple[Run, Callable[[], dict]]:
    """FlexAttention compiled for this (shape, mode) alone: Dynamo's caches are reset first, so no earlier shape or
    grad mode counts towards its recompile limit, and a limit hit raises (see :func:`_no_silent_fallback`) instead of
    running the unfused path."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape, device = case.shape, case.device
    if case.backward and device.type != "cuda":
        raise Unsupported("FlexAttention has no backward on CPU")
    batch, int32 = shape.batch, torch.int32
    start = case.kv_start if case.kv_start is not None else torch.zeros(batch, dtype=int32, device=device)
    length = case.kv_len if case.kv_len is not None else torch.full((batch,), shape.nk, dtype=int32, device=device)
    last = length - shape.nq  # bottom-right: query i sits at key position kv_len - Nq + i

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx >= start[b]) & (kv_idx < length[b])
        return visible & (kv_idx <= q_idx + last[b]) if shape.causal else visible

    block_mask = None
    if shape.causal or shape.has_bounds:
        rows = batch if shape.has_bounds else None  # one mask for every row when they all agree
        block_mask = create_block_mask(mask_mod, rows, None, shape.nq, shape.nk, device=str(device))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    gqa = shape.hq != shape.hkv

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)

    def info() -> dict:
        # One graph means every timed call ran the one compiled kernel; fullgraph=True rules out partial graphs.
        return {"flex_compiled": True, "flex_graphs": int(counters["stats"]["unique_graphs"])}

    return run, info


@contextlib.contextmanager
def _no_silent_fallback():
    """Make Dynamo raise when it hits its recompile limit instead of running the function uncompiled: a FlexAttention
    row that is not the compiled kernel must fail, not be timed (the H200 run of 2026-11-27 timed the unfused path)."""
    import torch._dynamo.config as dynamo_config

    for option in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # renamed in torch 2.6
        if hasattr(dynamo_config, option):
            with dynamo_config.patch(**{option: True}):
                yield
            return
    yield


def builders(names: list[str] | None = None) -> dict[str, Callable[[Case], tuple[Run, Callable[[], dict]]]]:
    """Every row's builder by name: registry backends, ``auto``, then the peers; ``names`` picks a subset."""
    from perceiver_fast.kernels import available_backends

    table = {name: _op(name) for name in [*available_backends(), "auto"]}
    table.update({"sdpa-math": _sdpa_math, "flex": _flex})
    if names is not None:
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise ValueError(f"unknown backends {unknown}; known: {sorted(table)}")
        table = {name: build for name, build in table.items() if name in names}
    return table


def _reference(case: Case) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The eager backend's output (and gradients) on float32 copies of the first input set, computed once per case.

    In float32, so that it is no copy of a row under test: eager in bf16 on CUDA is SDPA choosing its own kernel, the
    very kernel of the sdpa rows, which would then be compared with themselves."""
    if case.reference is None:
        from perceiver_fast.kernels import attention

        q, k, v = (t.detach().float().requires_grad_(case.backward) for t in case.sets[0])
        with case.grad_mode():
            out = attention(q, k, v, backend="eager", **case.op_arguments())
            grads = torch.autograd.grad(out, (q, k, v), case.grad_out.float()) if case.backward else None
        case.reference = (out.detach(), grads)
    return case.reference


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.abs().max() / reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def _errors(case: Case, run: Run) -> dict:
    """Errors against the float32 reference on the first input set: the largest |out - reference| (``max_err``), the
    same relative to the reference's largest value (``rel_err``, what the dispatch table judges: an absolute limit
    lets an all-zero output through where every output is small, as over long key ranges), and with the backward the
    largest gradient error relative to the gradient's size (``grad_err``). A peer that is fast but wrong shows here,
    and the dispatch table leaves it out."""
    q, k, v = case.sets[0]
    out = run(q, k, v)
    expected, expected_grads = _reference(case)
    difference = out.detach().float() - expected
    errors = {"max_err": float(difference.abs().max()), "rel_err": _relative(difference, expected)}
    if case.backward:
        grads = torch.autograd.grad(out, (q, k, v), case.grad_out)
        errors["grad_err"] = max(_relative(g.float() - e, e) for g, e in zip(grads, expected_grads))
    return errors


def _base_row(shape: Shape, mode: str, dtype: torch.dtype, name: str) -> dict:
    row = {"shape": shape.label, "family": shape.family, "backend": name, "mode": mode}
    row.update(dtype=str(dtype).removeprefix("torch."), **shape.as_row())
    row["class"] = str(shape.problem_class(dtype, mode))
    return row


def bench_case(case: Case, name: str, build: Callable, args: argparse.Namespace) -> dict:
    """Time one backend on one (shape, mode): the row carries the median time, rates and errors, or why it did not
    run."""
    row = _base_row(case.shape, case.mode, case.dtype, name)
    try:
        with case.grad_mode():
            run, info = build(case)
            row.update(_errors(case, run))  # also the first call: compiles and autotunes before the warm-up

            def call(i: int) -> None:
                q, k, v = case.sets[i % len(case.sets)]
                out = run(q, k, v)
                if case.backward:
                    torch.autograd.grad(out, (q, k, v), case.grad_out)

            times = common.time_ms(call, case.device, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget)
            issue = common.issue_times_ms(call, case.device)
        row.update(info())
    except Unsupported as reason:
        row["note"] = str(reason)
        return row
    except Exception as error:  # a peer that fails on a shape is a result, not a crash of the suite
        message = str(error).strip().splitlines()
        row["note"] = f"{type(error).__name__}: {message[0][:160] if message else ''}"
        if case.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:  # the error left the CUDA context unusable: the row says why; what follows fails too
                pass
        return row
    ms = common.median(times)
    row.update(ms=ms, runs=len(times), **issue)
    row["tflops"] = case.shape.flops(case.mode) / (ms * 1e-3) / 1e12
    row["gbs"] = case.shape.bytes(case.dtype, case.mode) / (ms * 1e-3) / 1e9
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kernels`` suite's options."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shape set (default: gpu on CUDA, quick on CPU)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--backends", help="comma-separated subset of the rows (registry names, auto, sdpa-math, flex)")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd or both")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3 GPU, 2 CPU)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per case at most")
    parser.add_argument("--time-limit", type=float, help="seconds; cases not started by then are listed as skipped")
    parser.add_argument(
        "--flex-budget", type=float, default=60.0,
        help="seconds FlexAttention rows may take in all (each compiles); later ones are listed as skipped",
    )
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")
    table = parser.add_argument_group("dispatch table (benchmarks/dispatch_table.py)")
    table.add_argument("--write-dispatch-table", action="store_true", help="rank the backends per class and write "
                       "sm<major><minor>.json from this run's rows, or from --from-json files")
    table.add_argument("--from-json", type=Path, nargs="+", metavar="FILE", help="earlier results; runs nothing")
    table.add_argument("--capability", help="compute capability of --from-json results, e.g. 9.0 (default: their meta)")
    table.add_argument("--table-dir", type=Path, help="where the table goes (default: perceiver_fast's own tables)")


def _within_error_limit(row: dict) -> bool:
    """Whether a row's errors are rounding (the dispatch table's limit), where it has a dtype to judge them by."""
    from benchmarks.dispatch_table import error_beyond_rounding

    return "dtype" not in row or error_beyond_rounding(row) is None


def _auto_versus_sdpa(rows: list[dict]) -> list[dict]:
    """Per (shape, mode): what auto ran and how it compares with the best fused SDPA kernel and the best backend."""
    timed: dict[tuple[str, str], dict[str, float]] = {}
    picked: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["shape"], row["mode"])
        timed.setdefault(key, {})
        if "ms" in row and _within_error_limit(row):  # a fast wrong backend is no one's "best"
            timed[key][row["backend"]] = row["ms"]
        if row["backend"] == "auto":
            picked[key] = row.get("auto_backend", "-")
    table = []
    for (shape, mode), times in timed.items():
        auto = times.get("auto")
        sdpa = min(((times[n], n) for n in SDPA_BACKENDS if n in times), default=None)
        ours = min(((ms, n) for n, ms in times.items() if n not in (*PEERS, "auto")), default=None)
        table.append(
            {
                "shape": shape,
                "mode": mode,
                "auto ran": picked.get((shape, mode), "-"),
                "auto ms": auto,
                "best SDPA": None if sdpa is None else f"{sdpa[1]} {sdpa[0]:.3g}",
                "auto/SDPA": None if auto is None or sdpa is None else auto / sdpa[0],
                "best backend": None if ours is None else f"{ours[1]} {ours[0]:.3g}",
                "auto/best": None if auto is None or ours is None else auto / ours[0],
            }
        )
    return table


def _write_table_from_json(args: argparse.Namespace) -> int:
    from benchmarks import dispatch_table

    if not args.write_dispatch_table:
        print("--from-json is the input of --write-dispatch-table: add it")
        return 2
    path, table = dispatch_table.write_from_files(args.from_json, args.capability, args.table_dir)
    print(f"wrote {path}\n{dispatch_table.format_orders(table)}")
    return 0


def _add_rates(rows: list[dict]) -> None:
    for row in rows:  # decoding is bandwidth-bound: judge it by cache read rate
        row["rate"] = row.get("gbs") if row["family"] == "decode" else row.get("tflops")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print a table, write JSON and a plot (and the dispatch table if asked); the exit status."""
    if args.from_json:
        return _write_table_from_json(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = "quick" if args.quick else (args.preset or ("gpu" if cuda else "quick"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.repeats = args.repeats or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    modes = [m for m in args.modes.split(",") if m]
    named = builders(args.backends.split(",") if args.backends else None)

    peak = common.matmul_peak_tflops(device, dtype)
    bandwidth = common.copy_bandwidth_gbs(device)
    print(f"device {common.device_slug(device)}  dtype {dtype}  preset {preset}")
    print(f"measured peaks: matmul {peak:.1f} TFLOP/s, copy {bandwidth:.0f} GB/s", flush=True)
    rows: list[dict] = []
    meta = {
        "suite": "kernels",
        "device": common.device_slug(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)) if cuda else None,
        "dtype": str(dtype),
        "preset": preset,
        "date": common.utc_now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "copy_gbs": bandwidth,
        "backends": list(named),
        "time_limit": args.time_limit,
        "flex_budget": args.flex_budget,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    # Named when the run starts and rewritten after every case: a run killed by its timeout, or by a CUDA error that
    # leaves the context unusable, keeps what it measured (a run that finished meanwhile under the name is kept too).
    path = common.new_results_path(common.results_path(device, "kernels", args.out))
    started = time.monotonic()
    flex_spent = 0.0
    with _no_silent_fallback():
        for shape in PRESETS[preset]():
            for mode in modes:
                if shape.family == "decode" and mode == "fwd+bwd":
                    continue  # decoding never runs a backward
                case = None
                for name, build in named.items():
                    skip = None
                    if args.time_limit is not None and time.monotonic() - started > args.time_limit:
                        skip = f"skipped: --time-limit {args.time_limit:.0f} s reached"
                    elif name == "flex" and flex_spent > args.flex_budget:
                        skip = f"skipped: --flex-budget {args.flex_budget:.0f} s spent"
                    if skip is not None:
                        rows.append({**_base_row(shape, mode, dtype, name), "note": skip})
                        continue
                    case = case or make_case(shape, mode, device, dtype)
                    began = time.monotonic()
                    row = bench_case(case, name, build, args)
                    if name == "flex":
                        flex_spent += time.monotonic() - began
                    if "tflops" in row:
                        row["pct_peak"] = 100 * row["tflops"] / peak
                        row["pct_bw"] = 100 * row["gbs"] / bandwidth
                    rows.append(row)
                    _add_rates(rows)
                    common.write_json(path, meta, rows)
                    status = f"{row['ms']:.3f} ms" if "ms" in row else row["note"]
                    print(f"  {shape.label:<48} {mode:<8} {name:<15} {status}", flush=True)
                del case
                if cuda:
                    torch.cuda.empty_cache()

    columns = ["shape", "mode", "backend", "ms", "host_ms", "queued_ms", "tflops", "pct_peak", "gbs", "rel_err"]
    columns += ["grad_err", "note"]
    if not cuda:  # issued back to back or one at a time, a CPU call takes its wall-clock time
        columns = [c for c in columns if c not in ("host_ms", "queued_ms")]
    print()
    print(common.format_table(rows, columns))
    _add_rates(rows)
    print("\n== summary: TFLOP/s of unmasked work (decode: GB/s); '-' = did not run, see the table's note ==")
    print(f"peaks measured in this run: matmul {peak:.1f} TFLOP/s, copy {bandwidth:.0f} GB/s")
    ran = {row["backend"] for row in rows if "ms" in row}  # backends that ran nowhere would be columns of dashes
    print(common.format_pivot([r for r in rows if r["backend"] in ran], index=("shape", "mode"), column="backend",
                              value="rate"))
    common.write_json(path, meta, rows)
    print(f"\nwrote {path}")
    if args.write_dispatch_table:
        from benchmarks import dispatch_table

        if meta["capability"] is None and args.capability is None:
            print("no dispatch table: a CPU run has no compute capability (pass --capability to write one anyway)")
        else:
            results = [dispatch_table.Results(path.name, meta, rows)]
            table = dispatch_table.build_table(results, dispatch_table.capability_of(results, args.capability))
            written = dispatch_table.write_table(table, args.table_dir)
            print(f"\n== dispatch table {written}: backends per class, fastest first (score 1.00 = fastest) ==")
            print(dispatch_table.format_orders(table))
    print("\n== auto against the best fused SDPA kernel (auto/SDPA > 1: auto is slower; '-': SDPA cannot run it) ==")
    versus = _auto_versus_sdpa(rows)
    print(common.format_table(versus, list(versus[0]) if versus else ["shape"]))
    issued = [
        {**r, "host/queued": r["host_ms"] / r["queued_ms"] if r["queued_ms"] > 0 else None}
        for r in rows
        if "host_ms" in r
    ]
    if issued:
        print("\n== host time / device time per call, 21 calls issued back to back (near 1 or more: host-bound) ==")
        print(common.format_pivot(issued, index=("shape", "mode"), column="backend", value="host/queued"))
    if not args.no_plot:
        for mode in modes:
            picture = common.plot_bars(
                path.with_name(f"{path.stem}-{mode.replace('+', '-')}.png"),
                [r for r in rows if r["mode"] == mode],
                metric="tflops",
                group="shape",
                series="backend",
                title=f"{meta['device']} {dtype} {mode}: TFLOP/s (unmasked work)",
            )
            if picture is not None:
                print(f"wrote {picture}")
    return 0
