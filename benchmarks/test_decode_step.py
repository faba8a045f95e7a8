"""The decode-step benchmark without a GPU: a smoke run of its CPU preset, and the dispatch-table rows it writes
from GPU timings (ranked by graph time, merged into a table without touching its other rows)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import common, decode_step
from perceiver_fast.kernels import dispatch


def test_cpu_preset_runs_the_composite_step_and_says_why_the_others_do_not(tmp_path, capsys):
    args = argparse.Namespace(preset="cpu", dtype=None, device="cpu", repeats=2, out=str(tmp_path),
                              write_dispatch_table=False, table_dir=str(tmp_path))  # fmt: skip
    assert decode_step.run(args) == 0
    rows = json.loads(next(tmp_path.glob("*-decode-step.json")).read_text())["rows"]
    by_method = {r["method"]: r for r in rows}
    assert by_method["composite"]["eager_ms"] > 0 and by_method["composite"]["cache_gbs"] > 0
    assert "CPU tensors" in by_method["cuda"]["skipped"]
    assert "skipped" in by_method["sdpa+write+rotary"]


def test_a_method_with_wrong_output_is_neither_timed_nor_ranked(monkeypatch):
    """A fast wrong step must never enter the dispatch table: outputs are checked against composite first."""
    real = decode_step._callable

    def off_by_a_little(method, args, keys):
        fn = real(method, args, keys)
        return (lambda: fn() + 0.1) if method == "composite" and off_by_a_little.armed else fn

    off_by_a_little.armed = False
    shape = decode_step.PRESETS["cpu"][0]
    good = decode_step.bench(shape, torch.float32, torch.device("cpu"), copy_gbs=10.0, repeats=2)
    assert {r["method"]: r.get("max_err") for r in good}["composite"] <= 1e-6
    monkeypatch.setattr(decode_step, "_callable", off_by_a_little)
    off_by_a_little.armed = True
    rows = {r["method"]: r for r in decode_step.bench(shape, torch.float32, torch.device("cpu"), 10.0, 2)}
    assert "wrong output" in rows["composite"]["skipped"] and "eager_ms" not in rows["composite"]


def test_table_rows_rank_by_graph_time_and_replace_only_decode_step_rows(tmp_path, monkeypatch):
    shapes = decode_step.PRESETS["gpu"]  # B1 and B8 at 16k and at 64k keys: two classes of two shapes each
    assert [(s.batch, s.keys) for s in shapes] == [(1, 16384), (1, 65536), (8, 16384), (8, 65536)]
    graph_ms = {(0, "cuda"): 0.02, (0, "composite"): 0.05, (2, "cuda"): 0.09, (2, "composite"): 0.08,  # 16k
                (1, "cuda"): 0.09, (1, "composite"): 0.07, (3, "cuda"): 0.30, (3, "composite"): 0.20}  # fmt: skip
    timings = [dict(shape=shapes[i].label, method=m, graph_ms=ms) for (i, m), ms in graph_ms.items()]
    timings.append(dict(shape=shapes[0].label, method="sdpa+write+rotary", graph_ms=0.01))  # not a dispatch choice
    rows = decode_step.decode_rows(timings, shapes, torch.bfloat16, torch.device("cpu"))
    assert [(r["keys"], r["order"]) for r in rows] == [(16384, ["cuda", "composite"]), (65536, ["composite", "cuda"])]
    # 16k: cuda is 1.0 and 1.125 of the best, composite 2.5 and 1.0: geometric means 1.06 and 1.58.
    assert rows[0]["score"] == {"cuda": round((1.0 * 0.09 / 0.08) ** 0.5, 4), "composite": round(2.5**0.5, 4)}
    assert rows[0]["shapes"] == [shapes[0].label, shapes[2].label]
    assert {r["regime"] for r in rows} == {dispatch.DECODE_STEP_REGIME} and all(r["bounds"] for r in rows)
    other = dict(dtype="bfloat16", regime="decode", head_dim=128, keys=16384, bounds=True, grad=False,
                 order=["triton"])  # fmt: skip
    stale = {**rows[0], "order": ["composite"]}
    (tmp_path / "sm90.json").write_text(json.dumps({"device": "x", "date": "d", "rows": [other, stale]}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    path = decode_step.merge_into_table(rows, tmp_path, torch.device("cuda"), "gpu-decode-step.json")
    written = json.loads(path.read_text())
    assert written["rows"][0] == other and written["rows"][1:] == rows
    assert written["decode_step_source"] == "gpu-decode-step.json"


def test_a_second_run_of_the_day_writes_beside_the_first_dated_utc(tmp_path, monkeypatch, capsys):
    """Each run's file is named on its start: the second one's ``-2``, the first one's rows untouched."""
    runs = iter([1.0, 2.0])
    monkeypatch.setattr(decode_step, "copy_bandwidth_gbs", lambda device: next(runs))
    monkeypatch.setattr(decode_step, "bench", lambda shape, *args: [dict(shape=shape.label, method="composite")])
    monkeypatch.setattr(common, "utc_date", lambda: "1999-12-31")
    args = argparse.Namespace(preset="cpu", dtype=None, device="cpu", repeats=1, out=str(tmp_path),
                              write_dispatch_table=False, table_dir=str(tmp_path))  # fmt: skip
    assert decode_step.run(args) == 0 and decode_step.run(args) == 0
    first, second = sorted(tmp_path.glob("*.json"), key=lambda p: len(p.name))
    assert first.name.endswith("-1999-12-31-decode-step.json") and second.name == f"{first.stem}-2.json"
    assert [json.loads(p.read_text())["meta"]["copy_gbs"] for p in (first, second)] == [1.0, 2.0]
    assert json.loads(first.read_text())["meta"]["date"] == "1999-12-31"
    assert "exists (an earlier run's results): kept" in capsys.readouterr().out


def test_a_table_merge_killed_mid_write_leaves_the_table_whole(tmp_path, monkeypatch, killed_mid_write):
    """``auto`` dispatch reads this table: a truncated one would break every later import of the package."""
    before = json.dumps({"device": "x", "date": "d", "rows": []}).encode()
    (tmp_path / "sm90.json").write_bytes(before)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    row = dict(dtype="bfloat16", regime=dispatch.DECODE_STEP_REGIME, head_dim=128, keys=16384, bounds=True,
               grad=False, order=["cuda"])  # fmt: skip
    with pytest.raises(killed_mid_write):
        decode_step.merge_into_table([row], tmp_path, torch.device("cuda"), "gpu-decode-step.json")
    assert (tmp_path / "sm90.json").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sm90.json"]
