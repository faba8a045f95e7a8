"""The measured dispatch policy, checked on CPU: the committed tables against the measurements they come from.

``auto`` on a CUDA device consults ``dispatch_tables/sm<cc>.json``. Here every shape of the benchmark results the
committed sm90 table was built from (an H100, 2026-11-28) is fed to the dispatcher as a problem on a capability-9.0
CUDA device (no tensor, no GPU), with the backends made available as they were on that machine, and the choice must
be the backend measured fastest on that shape in that run (or, where the shapes of a class disagree, within 10% of
it). The conservative order, the nearest-length rule and what ``explain`` says are checked too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.dispatch_table import read_results, why_left_out
from benchmarks.shapes import Shape
from perceiver_fast.kernels import api, cuda, dispatch, problem, sdpa
from perceiver_fast.kernels.registry import available_backends
from perceiver_fast.kernels.triton import backend as triton_backend

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SM90 = json.loads((dispatch.TABLE_DIR / "sm90.json").read_text())  # the shipped table
SM90_SOURCES = SM90["source"]
KERNEL_RESULTS = [RESULTS / name for name in SM90_SOURCES if name.endswith("-kernels.json")]


@pytest.fixture
def hopper(monkeypatch):
    """Backends as they were on the measured H100: SDPA with cuDNN 9, compiled Triton, the built CUDA extension,
    no flash-attn; the device reports compute capability 9.0."""
    monkeypatch.setitem(problem._capabilities, 0, (9, 0))
    monkeypatch.setattr(sdpa, "_cudnn_attention_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_backend, "_triton_missing", lambda: None)
    monkeypatch.setattr(cuda, "library_status", lambda: None)
    monkeypatch.setattr(cuda, "_has_kernel_image", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _measurements():
    """(results file, shape, mode, {backend: ms}) for every measurement of the table's results that compared
    backends (a run's time limit may leave a shape with a single backend timed: nothing to choose from)."""
    names = set(available_backends())
    found = {}
    for path in KERNEL_RESULTS:
        for row in read_results(path).rows:
            if why_left_out(row, names) is None:
                key = (path.name, row["shape"], row["mode"])
                found.setdefault(key, (Shape.from_row(row), {}))[1][row["backend"]] = row["ms"]
    measured = sorted(found.items(), key=str)
    return [(source, shape, mode, times) for (source, _, mode), (shape, times) in measured if len(times) > 1]


MEASUREMENTS = _measurements()


def _row_that_decided(decided_by: str) -> dict:
    """The shipped table's row that a dispatch record or report names."""
    return next(row for row in SM90["rows"] if str(dispatch._row_class(row)) in decided_by)


def test_the_committed_results_are_there():
    assert all((RESULTS / name).is_file() for name in SM90_SOURCES)
    assert len(KERNEL_RESULTS) == 1 and len(MEASUREMENTS) >= 20


@pytest.mark.parametrize(
    "source, shape, mode, times", MEASUREMENTS, ids=[f"{s.label} {m} [{src}]" for src, s, m, _ in MEASUREMENTS]
)
def test_auto_chooses_the_backend_measured_fastest_on_every_benchmark_shape(hopper, source, shape, mode, times):
    chosen, decision = api._decide(shape.problem(torch.bfloat16, requires_grad=mode == "fwd+bwd"))
    fastest = min(times, key=times.get)
    assert chosen.decided_by.startswith("sm90.json row")
    why = f"auto chose {chosen.backend} ({times.get(chosen.backend)} ms), {fastest} measured {times[fastest]} ms; "
    if chosen.backend == fastest:
        return
    # A row ranks backends by their geometric mean over the shapes of its class: where those shapes disagree, one of
    # them gets the class's choice, which must still be within 10% of its own fastest.
    row = _row_that_decided(chosen.decided_by)
    assert len(row["shapes"]) > 1, why + f"decided by {chosen.decided_by}"
    assert times.get(chosen.backend, float("inf")) <= 1.1 * times[fastest], why + f"decided by {chosen.decided_by}"


def test_an_unmeasured_length_takes_the_nearest_measured_row(hopper):
    long = Shape("prefix-causal", 1, 1024, 200_000, 16, 16, 128, 128, True)  # 200k keys: the 64k row is the nearest
    chosen, _ = api._decide(long.problem(torch.bfloat16, requires_grad=False))
    assert "keys<=64k" in chosen.decided_by and "nearest measured length" in chosen.decided_by
    row = _row_that_decided(chosen.decided_by)
    assert chosen.backend == row["order"][0]


def test_a_lead_of_our_kernels_measured_at_more_keys_is_not_taken_to_fewer(hopper):
    """Triton leads the 16k row of prefix-causal attention at head dim 128; at 4k (no row) SDPA's kernels go first,
    since our kernels' lead over SDPA shrank with the keys wherever it was measured. Longer calls keep the lead."""
    measured = next(
        r for r in SM90["rows"] if (r["regime"], r["head_dim"], r["keys"], r["bounds"], r["grad"]) ==
        ("prefix-causal", 128, 16384, False, False)
    )  # fmt: skip
    assert measured["order"][0] == "triton"
    short = Shape("prefix-causal", 1, 1024, 4096, 16, 16, 128, 128, True).problem(torch.bfloat16, False)
    chosen, _ = api._decide(short)
    assert chosen.backend == next(name for name in measured["order"] if name.startswith("sdpa-"))
    assert "lead was measured at more keys" in chosen.decided_by
    longer = Shape("prefix-causal", 1, 1024, 32768, 16, 16, 128, 128, True).problem(torch.bfloat16, False)
    assert api._decide(longer)[0].backend == "triton"  # the 16k row is nearer than the 64k one: still triton
    padded = Shape("prefix-causal", 4, 512, 4096, 8, 8, 64, 64, True, kv_start=1024).problem(torch.bfloat16, False)
    chosen, _ = api._decide(padded)  # with key bounds (no SDPA kernel in the row): the row's order stands
    assert chosen.backend == "cuda" and "more keys" not in chosen.decided_by


def test_unmeasured_kinds_and_other_devices_take_the_conservative_order(hopper, monkeypatch):
    padded = Shape("prefix-causal", 4, 512, 16384, 8, 8, 128, 128, True, kv_start=4096)  # not measured at D128
    chosen, backend = api._decide(padded.problem(torch.bfloat16, requires_grad=False))
    assert "conservative order" in chosen.decided_by
    assert chosen.backend == "triton"  # SDPA and flash-attn cannot take per-row bounds
    assert "kv_start/kv_len" in chosen.passed_over["sdpa-flash"]
    monkeypatch.setitem(problem._capabilities, 0, (8, 0))  # an A100: no table
    plain = Shape("prefix-causal", 1, 1024, 16384, 16, 16, 128, 128, True)
    chosen, _ = api._decide(plain.problem(torch.bfloat16, requires_grad=False))
    assert chosen.backend == "sdpa-flash" and "no dispatch table for sm_80" in chosen.decided_by


def test_the_cuda_backend_is_used_only_where_a_row_names_it(hopper):
    named = {row["dtype"] + row["regime"] for row in SM90["rows"] if "cuda" in row["order"]}
    assert "cuda" not in dispatch.DEFAULT_ORDER_CUDA and named
    fp16 = Shape("prefix-causal", 1, 1024, 16384, 16, 16, 128, 128, True).problem(torch.float16, False)
    chosen, _ = api._decide(fp16)  # fp16 is not measured: the conservative order, without cuda
    assert chosen.backend == "sdpa-flash" and "cuda" not in chosen.passed_over


def test_explain_says_which_row_decided(hopper):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 1024, 16, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(1, 16384, 16, 128, dtype=torch.bfloat16, device="cuda")
        report = str(api.explain(q, k, k, causal=True))
    row = _row_that_decided(report)
    assert f"backend: {row['order'][0]}" in report
    assert "decided by: sm90.json row bfloat16 prefix-causal D<=128 keys<=16k no key bounds no grad" in report
    assert f"measured on {SM90['device']}, {SM90['date']}" in report


def test_a_call_for_the_lse_does_not_follow_eager_up_a_row_measured_without_it(hopper):
    """Rows are measured without the log-sum-exp; eager returns it from a dense float32 pass over all scores."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(4, 512, 8, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(4, 16384, 8, 64, dtype=torch.bfloat16, device="cuda")  # Perceiver IO's cross-attention
        plain = api.explain(q, k, k)
        with_lse = api.explain(q, k, k, return_lse=True)
    row = _row_that_decided(plain.decided_by)
    assert row["order"].index("eager") < row["order"].index("triton")  # the case: eager ranks above triton
    assert with_lse.backend == "triton" and "eager last" in with_lse.decided_by
    assert plain.backend == row["order"][0]


@pytest.mark.parametrize(
    "damage",
    [lambda text: text[: len(text) // 2], lambda text: "", lambda text: '{"device": "x"}'],
    ids=["truncated", "empty", "no rows"],
)
def test_an_unreadable_table_raises_naming_it_and_how_to_restore_it(damage, tmp_path, monkeypatch):
    """json's own error names no file: a table cut short by an interrupted write left no clue which one to fix."""
    shipped = (dispatch.TABLE_DIR / "sm90.json").read_text()
    (tmp_path / "sm90.json").write_text(damage(shipped))
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.load_table.cache_clear()  # read once per process: the shipped table may already be cached
    try:
        with pytest.raises(ValueError, match=re.escape(f"the dispatch table {tmp_path / 'sm90.json'} cannot be read")):
            dispatch.load_table((9, 0))
        with pytest.raises(ValueError, match=r"git checkout -- perceiver_fast/kernels/dispatch_tables/sm90\.json"):
            dispatch.load_table((9, 0))
    finally:
        dispatch.load_table.cache_clear()  # the next test reads the shipped table again
