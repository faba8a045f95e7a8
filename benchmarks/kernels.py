"""Attention kernel benchmarks: ours (Triton) against eager, SDPA backends, FlexAttention and flash-attn.

Shapes are the Perceiver family's: Perceiver AR prefix cross-attention (N latents over M positions, bottom-right
causal), latent self-attention (causal, N x N), Perceiver IO cross-attention (non-causal) and decoding over a cache.
TFLOP/s count only unmasked work (forward per batch and head ``2(Dqk+Dv)[N(M-N) + N(N+1)/2]`` for prefix-causal,
``2(Dqk+Dv)NM`` otherwise; backward 2.5x forward) and are compared with a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """One attention problem: ``q [B, Nq, Hq, Dqk]`` over ``k/v [B, Nk, Hkv, D]``."""

    family: str
    batch: int
    nq: int
    nk: int
    hq: int
    hkv: int
    dqk: int
    dv: int
    causal: bool

    @property
    def label(self) -> str:
        dims = f"D{self.dqk}" if self.dqk == self.dv else f"D{self.dqk}/{self.dv}"
        heads = f"H{self.hq}" if self.hq == self.hkv else f"H{self.hq}/{self.hkv}"
        return f"{self.family} B{self.batch} N{self.nq} M{self.nk} {heads} {dims}"

    def flops(self, mode: str) -> float:
        """Unmasked forward FLOPs (times 3.5 with the backward), over all batches and heads."""
        n, m = self.nq, self.nk
        pairs = n * (m - n) + n * (n + 1) / 2 if self.causal and n <= m else n * m
        forward = 2 * (self.dqk + self.dv) * pairs * self.batch * self.hq
        return forward * (3.5 if mode == "fwd+bwd" else 1.0)

    def bytes(self, dtype: torch.dtype, mode: str) -> float:
        """Least memory traffic: read q, k, v and write the output (twice that, roughly, with the backward)."""
        size = torch.empty((), dtype=dtype).element_size()
        elements = self.batch * (self.nq * self.hq * (self.dqk + self.dv) + self.nk * self.hkv * (self.dqk + self.dv))
        return elements * size * (2.0 if mode == "fwd+bwd" else 1.0)


def perceiver_ar_grid() -> list[Shape]:
    """The issue's grid: N = 512/1024 latents, M = 4k/16k/64k positions, H = 8/16, D = 64/128, batch 1."""
    return [
        Shape("prefix-causal", 1, n, m, h, h, d, d, True)
        for n in (512, 1024)
        for m in (4096, 16384, 65536)
        for h in (8, 16)
        for d in (64, 128)
    ]


PRESETS: dict[str, Callable[[], list[Shape]]] = {
    # A few minutes on two CPU cores.
    "quick": lambda: [
        Shape("prefix-causal", 1, 128, 1024, 4, 4, 64, 64, True),
        Shape("prefix-causal", 1, 256, 2048, 8, 8, 64, 64, True),
        Shape("latent-self", 1, 256, 256, 8, 8, 64, 64, True),
        Shape("io-cross", 1, 256, 2048, 8, 8, 64, 64, False),
        Shape("decode", 4, 1, 4096, 8, 8, 64, 64, True),
    ],
    # A GPU run that fits gpu_check.sh's ten minutes with tests and autotuning.
    "gpu": lambda: [
        *(Shape("prefix-causal", 1, 1024, m, 16, 16, d, d, True) for m in (4096, 16384, 65536) for d in (64, 128)),
        Shape("prefix-causal", 4, 512, 16384, 8, 8, 64, 64, True),
        Shape("latent-self", 8, 1024, 1024, 16, 16, 64, 64, True),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 64, False),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 128, False),
        Shape("decode", 8, 1, 16384, 16, 16, 128, 128, True),
        Shape("decode", 8, 4, 16384, 32, 8, 128, 128, True),
    ],
    "full": lambda: [
        *perceiver_ar_grid(),
        Shape("latent-self", 8, 1024, 1024, 16, 16, 64, 64, True),
        Shape("latent-self", 8, 1024, 1024, 16, 16, 128, 128, True),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 64, False),
        Shape("io-cross", 4, 512, 16384, 8, 8, 64, 128, False),
        Shape("decode", 8, 1, 16384, 16, 16, 128, 128, True),
        Shape("decode", 8, 4, 65536, 32, 8, 128, 128, True),
    ],
}


class Unsupported(Exception):
    """A backend cannot run a shape; the message says why and goes into the results."""


def _sdpa_mask(shape: Shape):
    """SDPA's ``is_causal`` aligns top-left; prefix-causal needs the bottom-right bias."""
    if not shape.causal:
        return {}
    if shape.nq == shape.nk:
        return {"is_causal": True}
    from torch.nn.attention.bias import causal_lower_right

    return {"attn_mask": causal_lower_right(shape.nq, shape.nk)}


def _sdpa(shape: Shape, backend):
    from torch.nn.attention import sdpa_kernel

    mask = _sdpa_mask(shape)
    gqa = shape.hq != shape.hkv

    def run(q, k, v):
        with sdpa_kernel([backend]) if backend is not None else _null():
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=gqa, **mask
            )
        return out.transpose(1, 2)

    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _flex(shape: Shape, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = shape.nk - shape.nq

    def bottom_right(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(bottom_right, None, None, shape.nq, shape.nk, device=str(device))
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = shape.hq != shape.hkv

    def run(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)

    return run


def _ours(backend_name: str):
    from perceiver_fast.kernels import attention

    def make(shape: Shape):
        def run(q, k, v):
            return attention(q, k, v, causal=shape.causal, backend=backend_name)

        return run

    return make


def _flash_attn(shape: Shape):
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unsupported(f"flash_attn is not importable ({error})") from None
    if shape.dqk != shape.dv:
        raise Unsupported("flash_attn needs equal head dims")
    return lambda q, k, v: flash_attn_func(q, k, v, causal=shape.causal)


def backends_for(device: torch.device) -> dict[str, Callable[[Shape], Callable]]:
    """Peers available on this device, by name, as ``shape -> run(q, k, v)`` builders."""
    from torch.nn.attention import SDPBackend

    named = {"triton": _ours("triton"), "eager": _ours("eager")}
    if device.type == "cuda":
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):
            named[f"sdpa-{name}"] = lambda shape, b=backend: _sdpa(shape, b)
        named["flash_attn"] = _flash_attn
    else:
        named["sdpa"] = lambda shape: _sdpa(shape, None)
        named["sdpa-math"] = lambda shape: _sdpa(shape, SDPBackend.MATH)
    named["flex"] = lambda shape: _flex(shape, device)
    return named


def _triton_skip_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    from perceiver_fast.kernels import explain

    probe = torch.zeros(1, 1, 1, 16, device=device, dtype=dtype)
    try:
        explain(probe, probe, probe, backend="triton")
    except RuntimeError as error:
        return str(error).split(": ", 1)[-1]
    return None


def _inputs(shape: Shape, device, dtype, requires_grad: bool, sets: int):
    """``sets`` input triples; the same values for every backend of a shape (seeded by its label)."""
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(shape.label.encode()))

    def make(*dims):
        t = torch.randn(*dims, device=device, dtype=dtype, generator=generator)
        return t.requires_grad_(requires_grad)

    return [
        (
            make(shape.batch, shape.nq, shape.hq, shape.dqk),
            make(shape.batch, shape.nk, shape.hkv, shape.dqk),
            make(shape.batch, shape.nk, shape.hkv, shape.dv),
        )
        for _ in range(sets)
    ]


_REFERENCE: dict[str, torch.Tensor] = {}


def _max_error(shape: Shape, out: torch.Tensor, inputs) -> float:
    """Largest |out - eager| on the first input set: a peer that is fast but wrong shows here, not as a win."""
    from perceiver_fast.kernels import attention

    if shape.label not in _REFERENCE:
        _REFERENCE.clear()  # one shape at a time: keep only its reference in memory
        with torch.no_grad():
            _REFERENCE[shape.label] = attention(*inputs, causal=shape.causal, backend="eager").float()
    return float((out.float() - _REFERENCE[shape.label]).abs().max())


def _input_sets(shape: Shape, device: torch.device, dtype: torch.dtype) -> int:
    """Enough input copies to cover twice the L2 cache, so timings do not read inputs from cache (GPU only)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(4, math.ceil(2 * l2 / shape.bytes(dtype, "fwd"))))


def bench_case(shape, name, builder, mode, device, dtype, args) -> dict:
    """Time one (shape, backend, mode); the row carries the median time, rates, or the reason it did not run."""
    row = {"shape": shape.label, "family": shape.family, "backend": name, "mode": mode, "dtype": str(dtype)[6:]}
    row.update({f"shape_{k}": v for k, v in asdict(shape).items()})
    try:
        if name == "flex" and mode == "fwd+bwd" and device.type != "cuda":
            raise Unsupported("FlexAttention has no backward on CPU")
        run = builder(shape)
        sets = _inputs(shape, device, dtype, mode == "fwd+bwd", _input_sets(shape, device, dtype))
        grad = torch.randn(shape.batch, shape.nq, shape.hq, shape.dv, device=device, dtype=dtype)

        if mode == "fwd":
            with torch.no_grad():
                row["max_err"] = _max_error(shape, run(*sets[0]), sets[0])

        def call(i: int):
            q, k, v = sets[i % len(sets)]
            out = run(q, k, v)
            if mode == "fwd+bwd":
                torch.autograd.grad(out, (q, k, v), grad)

        times = common.time_ms(call, device, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget)
    except Unsupported as reason:
        row["note"] = str(reason)
        return row
    except Exception as error:  # a peer that fails on a shape is a result, not a crash of the suite
        row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    ms = common.median(times)
    row.update(ms=ms, runs=len(times))
    row["tflops"] = shape.flops(mode) / (ms * 1e-3) / 1e12
    row["gbs"] = shape.bytes(dtype, mode) / (ms * 1e-3) / 1e9
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shape set (default: gpu on CUDA, quick on CPU)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--backends", help="comma-separated subset of backends")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd or both")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3 GPU, 1 CPU)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per case at most")
    parser.add_argument("--time-limit", type=float, help="seconds; cases not started by then are listed as skipped")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print a table, write JSON and a plot; returns the exit status."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = "quick" if args.quick else (args.preset or ("gpu" if cuda else "quick"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.repeats = args.repeats or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    modes = [m for m in args.modes.split(",") if m]
    builders = backends_for(device)
    if args.backends:
        builders = {k: v for k, v in builders.items() if k in args.backends.split(",")}
    skip = _triton_skip_reason(device, dtype)
    if skip is not None and "triton" in builders:
        print(f"triton: skipped on {device.type}: {skip}. The interpreter is for tests; timings need a CUDA GPU.")
        del builders["triton"]

    peak = common.matmul_peak_tflops(device, dtype)
    bandwidth = common.copy_bandwidth_gbs(device)
    print(f"device {common.device_slug(device)}  dtype {dtype}  preset {preset}")
    print(f"measured peaks: matmul {peak:.1f} TFLOP/s, copy {bandwidth:.0f} GB/s", flush=True)
    rows = []
    started = time.monotonic()
    for shape in PRESETS[preset]():
        for mode in modes:
            if shape.family == "decode" and mode == "fwd+bwd":
                continue  # decoding never runs a backward
            for name, builder in builders.items():
                if args.time_limit is not None and time.monotonic() - started > args.time_limit:
                    rows.append({"shape": shape.label, "family": shape.family, "backend": name, "mode": mode})
                    rows[-1]["note"] = f"skipped: --time-limit {args.time_limit:.0f} s reached"
                    continue
                row = bench_case(shape, name, builder, mode, device, dtype, args)
                if "tflops" in row:
                    row["pct_peak"] = 100 * row["tflops"] / peak
                    row["pct_bw"] = 100 * row["gbs"] / bandwidth
                rows.append(row)
                status = f"{row['ms']:.3f} ms" if "ms" in row else row["note"]
                print(f"  {shape.label:<40} {mode:<8} {name:<14} {status}", flush=True)

    columns = ["shape", "mode", "backend", "ms", "tflops", "pct_peak", "gbs", "max_err", "note"]
    print()
    print(common.format_table(rows, columns))
    meta = {
        "suite": "kernels",
        "device": common.device_slug(device),
        "dtype": str(dtype),
        "preset": preset,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "copy_gbs": bandwidth,
        "triton_skipped": skip,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    for row in rows:  # decoding is bandwidth-bound: judge it by cache read rate
        row["rate"] = row.get("gbs") if row["family"] == "decode" else row.get("tflops")
    print("\n== summary: TFLOP/s of unmasked work (decode: GB/s); '-' = did not run, see the table's note ==")
    print(f"peaks measured in this run: matmul {peak:.1f} TFLOP/s, copy {bandwidth:.0f} GB/s")
    print(common.format_pivot(rows, index=("shape", "mode"), column="backend", value="rate"))
    path = common.write_json(common.results_path(device, "kernels", args.out), meta, rows)
    print(f"\nwrote {path}")
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
