"""Shared helpers for the benchmark suites: timing, measured peaks, tables, JSON results and plots, and how they
reach the disk (names that never replace an earlier run's file, writes that are never seen half done)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from perceiver_fast.durable import replace_atomically

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``nvidia-h100-80gb-hbm3`` on GPU, the processor name on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        name = f"cpu-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def utc_now() -> _dt.datetime:
    """The one clock of result names and metadata: UTC, so that the date a file is named by does not depend on the
    time zone of the machine that ran it (a GPU machine's and this one's may differ)."""
    return _dt.datetime.now(_dt.timezone.utc)


def utc_date() -> str:
    """Today in UTC, ``YYYY-MM-DD``: the date in every result file's name and every table's ``date``."""
    return utc_now().date().isoformat()


# A tag goes into a file name (never a path of its own): no separator, nothing a shell or a glob reads specially.
_TAG = re.compile(r"[A-Za-z0-9._-]*")


def file_tag(text: str) -> str:
    """An argparse ``type`` for a tag of result file names: letters, digits, ``.``, ``_`` and ``-`` only, refused at
    parsing rather than by a crash when the first file is written, after the first measurement."""
    if not _TAG.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a tag may hold only letters, digits, '.', '_' and '-'")
    return text


def results_path(device: torch.device, suite: str, out_dir: Path | None = None) -> Path:
    """``<out_dir or benchmarks/results>/<device>-<date>-<suite>.json``."""
    return (out_dir or RESULTS_DIR) / f"{device_slug(device)}-{utc_date()}-{suite}.json"


def unused_path(path: Path) -> Path:
    """``path`` when nothing is there, else the first free one of ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ..."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def new_results_path(path: Path) -> Path:
    """Where a run that is starting writes its results: ``path``, or a free name beside it when an earlier run (of
    the same day, device and suite) left a file there, which is kept and named, never replaced."""
    chosen = unused_path(path)
    if chosen != path:
        print(f"{path} exists (an earlier run's results): kept; this run writes {chosen.name}")
    return chosen


def replacing(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` with ``write`` through a temporary file renamed onto it (``durable.replace_atomically``): a run
    killed mid-write, or a reader, sees the old file or the new one, never a truncated one. The temporary name is
    hidden and ends in ``.tmp``, so no ``*.json`` glob picks it up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    return replace_atomically(path, write, temporary)


def write_text(path: Path, text: str) -> Path:
    """``path.write_text(text)``, atomically (see :func:`replacing`); returns the path."""
    return replacing(path, lambda temporary: temporary.write_text(text))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[int], object], device: torch.device, *, warmup: int = 2, repeats: int = 5, budget_s: float = 5.0
) -> list[float]:
    """Times of ``fn(i)`` in milliseconds (``i`` counts calls, for rotating inputs).

    CUDA events on GPU, wall clock after a synchronize on CPU. Stops early once ``budget_s`` is spent, keeping at
    least one timed call, so one slow case cannot eat a run's time.
    """
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times = []
    started = time.perf_counter()
    for i in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(warmup + i)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > budget_s:
            break
    return times


def issue_times_ms(fn: Callable[[int], object], device: torch.device, *, calls: int = 21) -> dict[str, float]:
    """Where a call's time goes when calls are issued back to back, as a training loop issues them.

    ``host_ms``: how long ``fn`` takes to return, per call (the Python, dispatch and launches); ``queued_ms``: the
    device's time per call from the end of the first call to the end of the last, with nothing waiting between
    calls. When ``host_ms`` is close to ``queued_ms`` the device waits for the host: the call is host-bound, and
    :func:`time_ms` (one synchronized call at a time) counts that host time too. Empty on CPU, where both are the
    wall clock.
    """
    if device.type != "cuda":
        return {}
    fn(0)
    synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started = time.perf_counter()
    fn(0)
    # Recorded behind the first call: the device would otherwise wait for that call's host work, a bias of one
    # host latency in the device time of calls that keep it busy.
    begin.record()
    for i in range(1, calls):
        fn(i)
    end.record()
    host = time.perf_counter() - started
    end.synchronize()
    return {"host_ms": host * 1e3 / calls, "queued_ms": begin.elapsed_time(end) / (calls - 1)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Measured dense matmul rate (TFLOP/s) of a square ``size`` matmul: the roof the kernels are judged against."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_ms(lambda _: a @ b, device, warmup=3, repeats=10, budget_s=3.0)
    return 2 * size**3 / (median(times) * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, megabytes: int | None = None) -> float:
    """Measured device copy bandwidth (GB/s, read + write): the roof for bandwidth-bound decoding."""
    megabytes = megabytes or (1024 if device.type == "cuda" else 128)
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda _: dst.copy_(src), device, warmup=3, repeats=10, budget_s=3.0)
    return 2 * src.numel() / (median(times) * 1e-3) / 1e9


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table with one line per row; floats get 3 significant digits, missing values a dash."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def format_pivot(rows: Sequence[dict], *, index: Sequence[str], column: str, value: str) -> str:
    """One line per distinct ``index`` tuple, one column per distinct ``column`` value, cells ``value``."""
    keys = list(dict.fromkeys(tuple(r[i] for i in index) for r in rows))
    names = list(dict.fromkeys(r[column] for r in rows))
    cells = {(tuple(r[i] for i in index), r[column]): r.get(value) for r in rows}
    table = [{**dict(zip(index, key)), **{n: cells.get((key, n)) for n in names}} for key in keys]
    return format_table(table, [*index, *names])


def write_json(path: Path, meta: dict, rows: Sequence[dict]) -> Path:
    """Write ``{"meta": ..., "rows": [...]}`` atomically (a run rewrites it after each step); returns the path."""
    return write_text(path, json.dumps({"meta": meta, "rows": list(rows)}, indent=1, default=str) + "\n")


def save_figure(figure, path: Path) -> Path:
    """``figure.savefig(path)`` atomically; the format is named by ``path``'s suffix, not the temporary's ``.tmp``."""
    image_format = path.suffix.removeprefix(".") or "png"
    return replacing(path, lambda temporary: figure.savefig(temporary, dpi=120, format=image_format))


def plot_bars(path: Path, rows: Sequence[dict], *, metric: str, group: str, series: str, title: str) -> Path | None:
    """Grouped bar chart of ``metric`` per ``group`` (x axis) and ``series`` (bars); None when nothing to plot or
    matplotlib is not installed (a bare GPU machine: the tables and JSON are the results, the plots a convenience)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
    if not rows:
        return None
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    for n, name in enumerate(names):
        values = {r[group]: r[metric] for r in rows if r[series] == name}
        xs = [g + n * width for g in range(len(groups)) if groups[g] in values]
        ax.bar(xs, [values[groups[g]] for g in range(len(groups)) if groups[g] in values], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
