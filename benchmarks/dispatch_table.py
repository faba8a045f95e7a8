"""Dispatch tables from kernel benchmark results: the backend order ``auto`` tries, per problem class.

    python -m benchmarks kernels --write-dispatch-table                 # run the suite, then write the table
    python -m benchmarks kernels --write-dispatch-table --from-json A.json B.json --capability 9.0   # runs nothing
    python -m benchmarks.dispatch_table import SRC --out DST.json --device-name "NVIDIA H200" --capability 9.0

The rule: every result row is classified by building the :class:`~perceiver_fast.kernels.problem.AttentionProblem`
the op would build for its shape (:meth:`benchmarks.shapes.Shape.problem_class`). Within one measurement (one shape
and mode of one result file, so every ratio is of times taken in the same run) each backend's time is divided by
the best registry backend's time. A backend's score for a class is the geometric mean of those ratios over the
class's measurements where it ran; the order is by score, fastest first. Rows that did not run (a note, no time)
are left out, and a backend with a row whose ``max_err``/``grad_err`` lies far beyond the dtype's rounding is left
out of that row's whole class (``left_out`` says why): a fast wrong kernel must not win, not even on the class's
other shapes, since ``auto`` sends every shape of a class to one backend. Only registry backends enter (``auto``,
``flex`` and ``sdpa-math`` are peers, never dispatch targets).

The table is written to ``perceiver_fast/kernels/dispatch_tables/sm<major><minor>.json``, which
:func:`perceiver_fast.kernels.dispatch.load_table` reads; ``--table-dir`` writes it elsewhere for review first.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.shapes import Shape
from perceiver_fast.kernels import dispatch
from perceiver_fast.kernels.dispatch import ProblemClass
from perceiver_fast.kernels.registry import available_backends

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Errors above this many machine epsilons of the dtype are not rounding: the row is wrong, whatever its speed. The
# floor is for float32, whose correct kernels differ by more than 32 epsilons over long reductions.
ERROR_EPSILONS = 32
ERROR_FLOOR = 1e-4
# Relative errors (``rel_err``, of rows that measure it): a few roundings of the dtype. bf16: 0.031, fp16: 0.0039.
RELATIVE_ERROR_EPSILONS = 4
# Backend names of results written before the registry existed.
LEGACY_NAMES = {"flash_attn": "flash-attn"}
RULE = (
    "backends fastest first by the geometric mean, over the class's measurements where they ran, of their time "
    f"divided by the best time of that measurement; rows that did not run or erred by more than {ERROR_EPSILONS} "
    f"epsilons of the dtype (at least {ERROR_FLOOR:g}) are left out"
)


@dataclass(frozen=True)
class Results:
    """One results file: ``name`` (what a table's ``source`` lists), its ``meta`` and its rows."""

    name: str
    meta: dict
    rows: list[dict]


def read_results(path: Path) -> Results:
    """A kernel benchmark JSON (``{"meta": ..., "rows": [...]}``), backend names brought up to date."""
    data = json.loads(Path(path).read_text())
    rows = [{**row, "backend": LEGACY_NAMES.get(row["backend"], row["backend"])} for row in data["rows"]]
    return Results(Path(path).name, data["meta"], rows)


# --- the probe-timings text format (../shared/gpu-results/h200-2026-11-27/probe-timings.txt) -------------------------
# Comment lines start with '#'; a timing line is "<shape>  <backend> <mode>  <ms> ms  <rate> TFLOP/s" where <shape>
# is a family and size tokens ("ar-prefix N1024 M16k H16 D128", "decode N1 M64k H16 D128 B1"; B defaults to 1 and
# M to N) and backends named "ours-<name>" are perceiver_fast.attention(backend=<name>).
_PROBE_LINE = re.compile(
    r"^(?P<shape>\S.*?)\s{2,}(?P<backend>\S+) (?P<mode>fwd\+bwd|fwd)\s+(?P<ms>\d+(?:\.\d+)?) ms"
    r"\s+(?P<tflops>\d+(?:\.\d+)?) TFLOP/s\s*$"
)
_PROBE_FAMILIES = {
    "ar-prefix": ("prefix-causal", True),
    "latent-self": ("latent-self", True),
    "io-cross": ("io-cross", False),
    "decode": ("decode", True),
}


def _probe_shape(text: str) -> Shape:
    family, *tokens = text.split()
    if family not in _PROBE_FAMILIES:
        raise ValueError(f"unknown shape family {family!r} in {text!r}")
    sizes = {}
    for token in tokens:
        match = re.fullmatch(r"([BNMHD])(\d+)(k?)", token)
        if match is None:
            raise ValueError(f"cannot read {token!r} in shape {text!r}")
        sizes[match[1]] = int(match[2]) * (1024 if match[3] else 1)
    name, causal = _PROBE_FAMILIES[family]
    heads, dim = sizes["H"], sizes["D"]
    return Shape(name, sizes.get("B", 1), sizes["N"], sizes.get("M", sizes["N"]), heads, heads, dim, dim, causal)


def read_probe_timings(text: str) -> tuple[list[str], list[dict]]:
    """The comment lines and the rows (in the kernel benchmark's row format) of a probe-timings text.

    TFLOP/s and GB/s are recomputed from the shape and time, as the benchmark does; the text's own TFLOP/s go into
    ``tflops_reported``.
    """
    header, rows = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            header.append(line.lstrip("# ").rstrip())
            continue
        match = _PROBE_LINE.match(line)
        if match is None:
            raise ValueError(f"line {number}: not a timing line: {line!r}")
        shape = _probe_shape(match["shape"])
        backend = match["backend"].removeprefix("ours-")
        mode, ms = match["mode"], float(match["ms"])
        row = {"shape": shape.label, "family": shape.family, "backend": LEGACY_NAMES.get(backend, backend)}
        row.update(mode=mode, dtype="bfloat16", **shape.as_row(), ms=ms)
        row["tflops"] = shape.flops(mode) / (ms * 1e-3) / 1e12
        row["gbs"] = shape.bytes(torch.bfloat16, mode) / (ms * 1e-3) / 1e9
        row["tflops_reported"] = float(match["tflops"])
        rows.append(row)
    if not any("bf16" in line for line in header):
        raise ValueError("the header does not say bf16, the only dtype this reader knows")
    return header, rows


def import_results(
    path: Path,
    *,
    device_name: str | None = None,
    capability: str | None = None,
    date: str | None = None,
    note: str | None = None,
) -> dict:
    """An older results file (a probe-timings text, or a kernel JSON from before the registry) in today's format:
    registry backend names, and ``device_name``/``capability`` in the meta so a table can be written from it."""
    path = Path(path)
    if path.suffix == ".json":
        results = read_results(path)
        meta, rows = dict(results.meta), results.rows
    else:
        header, rows = read_probe_timings(path.read_text())
        found = re.search(r"\bon one (.+?) \(torch (\S+?)[,)]", header[0]) if header else None
        meta = {"suite": "kernels", "dtype": "torch.bfloat16", "header": header}
        if found:
            meta.update(device=re.sub(r"[^a-z0-9]+", "-", found[1].lower()).strip("-"), torch=found[2])
            device_name = device_name or found[1]
        if date is None:
            named = re.search(r"\d{4}-\d{2}-\d{2}", path.name)
            date = named[0] if named else None
        if date is None:
            raise ValueError(f"{path.name}: the text carries no date: pass date=")
    meta["imported_from"] = path.name
    for key, value in (("device_name", device_name), ("capability", capability), ("date", date), ("note", note)):
        if value is not None:
            meta[key] = value
    return {"meta": meta, "rows": rows}


# --- the ranking -----------------------------------------------------------------------------------------------------


def error_limit(dtype: str) -> float:
    """The largest ``max_err`` (and relative ``grad_err``) a row of results without ``rel_err`` may have and still be
    ranked (results written before the suite measured relative errors)."""
    return max(ERROR_EPSILONS * torch.finfo(getattr(torch, dtype)).eps, ERROR_FLOOR)


def relative_error_limit(dtype: str) -> float:
    """The largest ``rel_err`` and ``grad_err`` (relative to the float32 reference's largest value) a row may have
    and still be ranked: a few roundings of the dtype (bf16 output rounding alone is 2**-9 of a value)."""
    return max(RELATIVE_ERROR_EPSILONS * torch.finfo(getattr(torch, dtype)).eps, ERROR_FLOOR)


def _ran(row: dict) -> bool:
    return isinstance(row.get("ms"), (int, float)) and row["ms"] > 0


def why_left_out(row: dict, backends: Iterable[str]) -> str | None:
    """Why a result row does not enter the ranking (``None`` when it does)."""
    if row["backend"] not in backends:
        return "not a registry backend"
    if not _ran(row):
        return f"did not run: {row.get('note', 'no time')}"
    return error_beyond_rounding(row)


def error_beyond_rounding(row: dict) -> str | None:
    """Which error of a result row lies beyond its dtype's rounding, as ``"key value > limit"`` (``None``: none).
    Rows with ``rel_err`` are judged by their relative errors, older ones by ``max_err``."""
    if "rel_err" in row:
        limit, keys = relative_error_limit(row["dtype"]), ("rel_err", "grad_err")
    else:
        limit, keys = error_limit(row["dtype"]), ("max_err", "grad_err")
    for key in keys:
        value = row.get(key)
        if value is not None and not value <= limit:  # NaN is left out too
            return f"{key} {value:.3g} > {limit:.3g}"
    return None


@dataclass
class Ranking:
    """One class's backends fastest first, their scores, and the measurements behind them."""

    order: list[str]
    score: dict[str, float]
    measurements: list[tuple[str, str, str]]  # (source, shape label, mode)
    ms: dict[str, list[float | None]]
    wrong: dict[str, str]  # backends left out of some measurement for their errors: why


def rank(results: Sequence[Results], backends: Iterable[str] | None = None) -> dict[ProblemClass, Ranking]:
    """Rank the backends of every class the results measure (see the module docstring for the rule)."""
    names = set(available_backends() if backends is None else backends) - {"auto"}
    times: dict[ProblemClass, dict[tuple[str, str, str], dict[str, float]]] = defaultdict(dict)
    wrong: dict[ProblemClass, dict[str, str]] = defaultdict(dict)
    for result in results:
        for row in result.rows:
            if row["backend"] not in names or not _ran(row):
                continue
            problem_class = Shape.from_row(row).problem_class(getattr(torch, row["dtype"]), row["mode"])
            reason = why_left_out(row, names)
            if reason is not None:  # it ran, and got a wrong result: the table says so
                wrong[problem_class][row["backend"]] = f"{reason} on {row['shape']} {row['mode']} [{result.name}]"
                continue
            measured = times[problem_class].setdefault((result.name, row["shape"], row["mode"]), {})
            measured[row["backend"]] = min(row["ms"], measured.get(row["backend"], math.inf))
    rankings = {}
    for problem_class, measurements in times.items():
        # A backend wrong on one shape of the class is left out of the whole class, its times too: auto would send
        # that shape to it.
        left_out = wrong.get(problem_class, {})
        logs: dict[str, list[float]] = defaultdict(list)
        for measured in measurements.values():
            kept = {name: ms for name, ms in measured.items() if name not in left_out}
            for name, ms in kept.items():
                logs[name].append(math.log(ms / min(kept.values())))
        score = {name: math.exp(sum(values) / len(values)) for name, values in logs.items()}
        # Ties (a backend alone on its shapes scores 1.0) go to the one measured on more shapes, then by name.
        order = sorted(score, key=lambda name: (score[name], -len(logs[name]), name))
        if not order:  # every backend measured was wrong somewhere in the class: no row, auto's conservative order
            continue
        keys = list(measurements)
        ms = {name: [measurements[key].get(name) for key in keys] for name in order}
        rankings[problem_class] = Ranking(order, score, keys, ms, left_out)
    return rankings


def _same(values: Iterable, what: str):
    found = sorted({value for value in values if value is not None}, key=str)
    if len(found) > 1:
        raise ValueError(f"the results disagree on the {what} ({', '.join(map(str, found))}): one table per device")
    return found[0] if found else None


def parse_capability(text: str | Sequence[int]) -> tuple[int, int]:
    """``"9.0"``, ``"90"``, ``"sm90"`` or ``(9, 0)`` as ``(9, 0)``."""
    if not isinstance(text, str):
        major, minor = text
        return int(major), int(minor)
    match = re.fullmatch(r"(?:sm_?)?(\d+)\.?(\d)", text.strip())
    if match is None:
        raise ValueError(f"a compute capability looks like 9.0, got {text!r}")
    return int(match[1]), int(match[2])


def capability_of(results: Sequence[Results], given: str | None = None) -> tuple[int, int]:
    """The compute capability a table is for: ``given``, else the one all results' meta agree on."""
    if given is not None:
        return parse_capability(given)
    found = _same((".".join(map(str, parse_capability(r.meta["capability"]))) for r in results
                   if r.meta.get("capability") is not None), "compute capability")
    if found is None:
        raise ValueError("the results do not say which compute capability they measured: pass --capability, e.g. 9.0")
    return parse_capability(found)


def build_table(results: Sequence[Results], capability: tuple[int, int]) -> dict:
    """The dispatch table (the JSON :func:`perceiver_fast.kernels.dispatch.load_table` reads) of ``results``."""
    if not results:
        raise ValueError("no results to write a table from")
    device = _same((r.meta.get("device_name") or r.meta.get("device") for r in results), "device")
    rows = []
    rankings = rank(results)
    for problem_class in sorted(rankings, key=lambda c: (c.dtype, c.regime, c.head_dim, c.keys, c.bounds, c.grad)):
        ranking = rankings[problem_class]
        rows.append(
            {
                "dtype": problem_class.dtype,
                "regime": problem_class.regime,
                "head_dim": problem_class.head_dim,
                "keys": problem_class.keys,
                "bounds": problem_class.bounds,
                "grad": problem_class.grad,
                "order": ranking.order,
                "score": {name: round(ranking.score[name], 4) for name in ranking.order},
                "shapes": [f"{shape} {mode} [{source}]" for source, shape, mode in ranking.measurements],
                "ms": {
                    name: [None if ms is None else round(ms, 4) for ms in values]
                    for name, values in ranking.ms.items()
                },
            }
        )
        if ranking.wrong:
            rows[-1]["left_out"] = dict(sorted(ranking.wrong.items()))
    dates = [str(r.meta.get("date", ""))[:10] for r in results]
    return {
        "device": device,
        "capability": f"{capability[0]}.{capability[1]}",
        "date": max(dates),
        "torch": ", ".join(sorted({str(r.meta.get("torch")) for r in results if r.meta.get("torch")})),
        "source": [r.name for r in results],
        "rule": RULE,
        "rows": rows,
    }


# A JSON list of numbers, null or strings without spaces, one item per line as json.dumps(indent=...) writes it.
_SCALAR_LIST = re.compile(r'\[\n(?:\s*(?:-?[0-9][0-9.eE+-]*|null|true|false|"[^" \n]*"),?\n)+\s*\]')


def _one_line(match: re.Match) -> str:
    items = (line.strip().rstrip(",") for line in match[0][1:-1].splitlines())
    return "[" + ", ".join(item for item in items if item) + "]"


def dumps(table: dict) -> str:
    """``table`` as JSON for a reviewer's eyes: indented, but a list of names or times on one line."""
    return _SCALAR_LIST.sub(_one_line, json.dumps(table, indent=1)) + "\n"


def write_table(table: dict, directory: Path | None = None) -> Path:
    """Write ``table`` as ``sm<major><minor>.json`` under ``directory`` (default: the package's tables)."""
    capability = parse_capability(table["capability"])
    path = Path(directory or dispatch.TABLE_DIR) / dispatch.table_name(capability)
    # Atomically: `auto` dispatch reads this file, and a truncated one would break it for every later import.
    return common.write_text(path, dumps(table))


def format_orders(table: dict) -> str:
    """One line per row of a table: its class, order and scores (what the table says, at a glance)."""
    lines = []
    for row in table["rows"]:
        key = ProblemClass(row["dtype"], row["regime"], row["head_dim"], row["keys"], row["bounds"], row["grad"])
        order = ", ".join(f"{name} {row['score'][name]:.2f}" for name in row["order"])
        lines.append(f"  {key}: {order}")
    return "\n".join(lines)


def compare_tables(candidate: dict, shipped: dict) -> list[str]:
    """How a candidate table (from one GPU run) differs from the shipped one, a line per class: classes it lacks (a
    run cut short by its time limit measures fewer; committing it would drop them), classes it adds, and classes
    whose first backend changed. A reviewer reads this before committing the candidate."""

    def classes(table: dict) -> dict:
        return {
            ProblemClass(r["dtype"], r["regime"], r["head_dim"], r["keys"], r["bounds"], r["grad"]): r["order"]
            for r in table["rows"]
        }

    old, new = classes(shipped), classes(candidate)
    lines = [f"  dropped (not measured by this run): {key}" for key in old if key not in new]
    lines += [f"  new: {key}: {', '.join(new[key])}" for key in new if key not in old]
    lines += [
        f"  first backend changed: {key}: {old[key][0]} -> {new[key][0]}"
        for key in new
        if key in old and new[key][:1] != old[key][:1]
    ]
    return lines


def write_from_files(
    paths: Sequence[Path], capability: str | None = None, directory: Path | None = None
) -> tuple[Path, dict]:
    """Read result files, build their table, write it; returns the path and the table."""
    results = [read_results(path) for path in paths]
    table = build_table(results, capability_of(results, capability))
    return write_table(table, directory), table


def main(argv: list[str] | None = None) -> int:
    """``import`` older results into today's format, ``write`` a table from result files, or ``compare`` a candidate
    table with the shipped one."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch_table", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="a probe-timings text or an old kernel JSON -> a results JSON")
    importer.add_argument("source", type=Path)
    importer.add_argument("--out", type=Path, required=True)
    importer.add_argument("--device-name")
    importer.add_argument("--capability")
    importer.add_argument("--date", help="YYYY-MM-DD (default: from the source's file name)")
    importer.add_argument("--note", help="what a reader of the results should know (caveats)")
    writer = commands.add_parser("write", help="write the dispatch table of result files")
    writer.add_argument("results", type=Path, nargs="+")
    writer.add_argument("--capability", help="e.g. 9.0 (default: from the results' meta)")
    writer.add_argument("--table-dir", type=Path, help=f"default {dispatch.TABLE_DIR}")
    comparer = commands.add_parser("compare", help="how a candidate table differs from the shipped one")
    comparer.add_argument("candidate", type=Path)
    comparer.add_argument("--shipped", type=Path, help="default: the package's table of the candidate's capability")
    args = parser.parse_args(argv)
    if args.command == "compare":
        candidate = json.loads(args.candidate.read_text())
        shipped_path = args.shipped or Path(dispatch.TABLE_DIR) / args.candidate.name
        if not shipped_path.is_file():
            print(f"{args.candidate}: no shipped table {shipped_path} (a GPU no table covers yet): every class is new")
            return 0
        lines = compare_tables(candidate, json.loads(shipped_path.read_text()))
        print(f"{args.candidate} against {shipped_path}:")
        print("\n".join(lines) if lines else "  the same classes, the same first backends")
        return 0
    if args.command == "import":
        data = import_results(
            args.source, device_name=args.device_name, capability=args.capability, date=args.date, note=args.note
        )
        common.write_text(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out} ({len(data['rows'])} rows)")
        return 0
    path, table = write_from_files(args.results, args.capability, args.table_dir)
    print(f"wrote {path}\n{format_orders(table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
