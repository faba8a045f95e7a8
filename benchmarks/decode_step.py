"""Decoding step over a static cache: the fused CUDA kernel vs the composite step vs SDPA-flash with its own cache
write and rotary.

    python -m benchmarks decode_step                          # GPU preset: bf16, batch 1 and 8, 16k and 64k keys
    python -m benchmarks decode_step --write-dispatch-table   # also the decode-step rows of the dispatch table

Methods (one layer's step: rotary on the new query and key, the new key/value written, the query attending):
- ``cuda``: ``decode_attention(backend="cuda")``, one launch plus the split reduction (csrc/attention_decode.cuh);
- ``composite``: ``decode_attention(backend="composite")``, PyTorch ops plus the attention op under ``auto``;
- ``sdpa+write+rotary``: what a user would write: rotate, ``index_copy_`` into the cache, and
  ``F.scaled_dot_product_attention`` over the cache's first ``M`` keys (no per-row bounds; SDPA cannot take them).
Each is timed replaying a CUDA graph of one call (GPU time; generation replays such graphs) and called eagerly
(launch overhead included). The roof is the cache read: ``K`` and ``V`` of ``M`` keys, against the measured copy
bandwidth. On CPU a small preset runs the two methods that can (a smoke run, not a measurement of the kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import copy_bandwidth_gbs, format_table, median, results_path, time_ms, write_json
from perceiver_fast.kernels import dispatch
from perceiver_fast.kernels.decode import decode_attention, explain_decode
from perceiver_fast.kernels.problem import AttentionProblem
from perceiver_fast.kernels.rotary import rotate_interleaved

# The composite step last: its first call may JIT-compile a Triton kernel, the slowest thing a short run meets.
METHODS = ("cuda", "sdpa+write+rotary", "composite")


@dataclass(frozen=True)
class StepShape:
    batch: int
    keys: int
    heads: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"B{self.batch} M{self.keys} H{self.heads} D{self.head_dim}"

    def cache_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of K and V a step reads."""
        return 2 * self.batch * self.keys * self.heads * self.head_dim * torch.finfo(dtype).bits // 8


PRESETS = {
    "gpu": [StepShape(b, m, 8, 128) for b in (1, 8) for m in (16384, 65536)],
    "cpu": [StepShape(1, 2048, 2, 64)],
}


def _inputs(shape: StepShape, dtype: torch.dtype, device: torch.device):
    b, m, h, d = shape.batch, shape.keys, shape.heads, shape.head_dim
    capacity = m  # a full cache (generation's capacity is max_seq_len): its length class is the shape's

    def make(*dims):
        return torch.randn(*dims, device=device, dtype=dtype)

    k_cache, v_cache = make(b, h, capacity, d).transpose(1, 2), make(b, h, capacity, d).transpose(1, 2)
    angles = (torch.arange(d // 2, device=device) * 0.01 + m).repeat_interleave(2).expand(b, d).contiguous()
    return dict(
        q=make(b, 1, h, d), k=make(b, 1, h, d), v=make(b, 1, h, d), k_cache=k_cache, v_cache=v_cache,
        position=torch.full((b,), m - 1, device=device, dtype=torch.int32),
        kv_start=torch.zeros(b, device=device, dtype=torch.int32),
        kv_len=torch.full((b,), m, device=device, dtype=torch.int32), cos=angles.cos(), sin=angles.sin(),
    )  # fmt: skip


def _sdpa_step(args: dict, keys: int) -> torch.Tensor:
    cos, sin = (t.unsqueeze(1).unsqueeze(1) for t in (args["cos"], args["sin"]))
    q, k = (rotate_interleaved(args[name], cos, sin) for name in ("q", "k"))
    index = args["position"][:1].to(torch.int64)
    args["k_cache"].index_copy_(1, index, k)
    args["v_cache"].index_copy_(1, index, args["v"])
    kt, vt = (args[name][:, :keys].transpose(1, 2) for name in ("k_cache", "v_cache"))
    return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt).transpose(1, 2)


def _callable(method: str, args: dict, keys: int):
    if method == "sdpa+write+rotary":
        return lambda: _sdpa_step(args, keys)
    return lambda: decode_attention(**args, backend=method)


def _graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream), as a replay function."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _problem(shape: StepShape, dtype: torch.dtype, device: torch.device) -> AttentionProblem:
    return AttentionProblem(
        device=device, dtype=dtype, batch=shape.batch, num_queries=1, num_keys=shape.keys,
        num_q_heads=shape.heads, num_kv_heads=shape.heads, qk_head_dim=shape.head_dim, v_head_dim=shape.head_dim,
        causal=False, has_kv_start=True, has_kv_len=True, dropout_p=0.0, requires_grad=False, return_lse=False,
    )  # fmt: skip


# The most relative error (max |out - composite| / max |composite|) a method may show and still be timed and ranked.
MAX_ERROR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def bench(shape: StepShape, dtype: torch.dtype, device: torch.device, copy_gbs: float, repeats: int) -> list[dict]:
    rows = []
    args = _inputs(shape, dtype, device)
    with torch.no_grad():  # every method writes the same row at the same position: the reference stays valid
        reference = decode_attention(**args, backend="composite").float()
    for method in METHODS:
        row = dict(shape=shape.label, dtype=str(dtype).removeprefix("torch."), method=method)
        rows.append(row)
        if method != "sdpa+write+rotary":
            try:
                explain_decode(**args, backend=method)
            except RuntimeError as error:
                row["skipped"] = str(error)
                continue
        elif device.type != "cuda":
            row["skipped"] = "the SDPA baseline is a GPU comparison"
            continue
        fn = _callable(method, args, shape.keys)
        with torch.no_grad():
            # Checked before timing: a fast wrong method must never rank first in the dispatch table.
            error = ((fn().float() - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()
            row["max_err"] = error
            if not error <= MAX_ERROR[dtype]:
                row["skipped"] = f"wrong output: relative error {error:.2e} against composite"
                continue
            eager = median(time_ms(lambda _, fn=fn: fn(), device, warmup=3, repeats=repeats, budget_s=3.0))
            row["eager_ms"] = eager
            if device.type == "cuda":
                replay = _graphed(fn, device)
                timed = time_ms(lambda _, replay=replay: replay(), device, warmup=3, repeats=repeats, budget_s=3.0)
                row["graph_ms"] = median(timed)
        best = row.get("graph_ms", eager)
        row["cache_gbs"] = shape.cache_bytes(dtype) / (best * 1e-3) / 1e9
        row["of_copy_bw"] = row["cache_gbs"] / copy_gbs
    return rows


def decode_rows(rows: list[dict], shapes: list[StepShape], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Dispatch-table rows: per class of the step's attention (shapes that differ only in batch share one), ``cuda``
    and ``composite`` fastest first by graph time (the one generation sees). The kernel table's rule: a method's
    score is the geometric mean over the class's shapes of its time over the best time of that shape; a method
    missing from any of the class's shapes is left out."""
    by_class: dict[dispatch.ProblemClass, list[tuple[StepShape, dict]]] = {}
    for shape in shapes:
        timed = {r["method"]: r["graph_ms"] for r in rows if r["shape"] == shape.label and r.get("graph_ms")}
        timed = {name: ms for name, ms in timed.items() if name in ("cuda", "composite")}
        if timed:
            key = dispatch.ProblemClass.of(_problem(shape, dtype, device))
            by_class.setdefault(key, []).append((shape, timed))
    table_rows = []
    for key, measured in by_class.items():
        names = [n for n in ("cuda", "composite") if all(n in timed for _, timed in measured)]
        if not names:
            continue
        score = {
            n: math.exp(statistics.fmean(math.log(timed[n] / min(timed[m] for m in names)) for _, timed in measured))
            for n in names
        }
        order = sorted(names, key=lambda n: score[n])
        table_rows.append(dict(
            dtype=key.dtype, regime=dispatch.DECODE_STEP_REGIME, head_dim=key.head_dim, keys=key.keys, bounds=True,
            grad=False, order=order, score={n: round(score[n], 4) for n in order},
            ms={n: [round(timed[n], 4) for _, timed in measured] for n in order},
            shapes=[shape.label for shape, _ in measured],
        ))  # fmt: skip
    return table_rows


def merge_into_table(table_rows: list[dict], directory: Path, device: torch.device, source: str) -> Path:
    """Replace the ``decode-step`` rows of ``directory``'s table for this GPU (created if absent), and name their
    results file, ``source``, as the table's ``decode_step_source``."""
    capability = torch.cuda.get_device_capability(device)
    path = directory / dispatch.table_name(capability)
    table = json.loads(path.read_text()) if path.is_file() else {
        "device": torch.cuda.get_device_name(device), "capability": f"{capability[0]}.{capability[1]}",
        "date": common.utc_date(), "torch": torch.__version__, "source": [], "rows": [],
    }  # fmt: skip
    table["rows"] = [r for r in table["rows"] if r["regime"] != dispatch.DECODE_STEP_REGIME] + table_rows
    table["decode_step_source"] = source
    # Atomically: `auto` dispatch reads this file, and a truncated one would break it for every later import.
    return common.write_text(path, json.dumps(table, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or (
        "bf16" if device.type == "cuda" else "fp32")]  # fmt: skip
    shapes = PRESETS[preset]
    copy_gbs = copy_bandwidth_gbs(device)
    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, date=common.utc_date(), copy_gbs=copy_gbs)  # fmt: skip
    path = common.new_results_path(results_path(device, "decode-step", Path(args.out) if args.out else None))
    rows = []
    for shape in shapes:
        rows += bench(shape, dtype, device, copy_gbs, args.repeats)
        write_json(path, meta, rows)  # after every shape: a run cut short by a timeout keeps what it measured
    columns = ["shape", "dtype", "method", "graph_ms", "eager_ms", "cache_gbs", "of_copy_bw", "skipped"]
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    print(format_table(rows, columns))
    print(f"wrote {path}")
    if args.write_dispatch_table:
        if device.type != "cuda":
            print("--write-dispatch-table needs a GPU: the rows rank GPU timings")
            return 1
        table = merge_into_table(decode_rows(rows, shapes, dtype, device), Path(args.table_dir), device, path.name)
        print(f"wrote the decode-step rows of {table}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--write-dispatch-table", action="store_true")
    parser.add_argument("--table-dir", default=str(dispatch.TABLE_DIR))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
