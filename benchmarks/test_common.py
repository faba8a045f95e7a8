"""The benchmarks' shared helpers: where a bare GPU machine differs from this one (no matplotlib), how result files
reach the disk (a new name per run, the UTC date, tags that are names, writes never seen half done), and how a CUDA
call's time is split between host and device."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to `import`
    rows = [dict(shape="s", backend="eager", tflops=1.0)]
    picture = common.plot_bars(tmp_path / "x.png", rows, metric="tflops", group="shape", series="backend", title="t")
    assert picture is None and not (tmp_path / "x.png").exists()


def test_a_second_run_of_the_day_gets_a_new_name_and_the_earlier_file_is_kept(tmp_path, capsys):
    first = tmp_path / "cpu-2026-01-02-kernels.json"
    assert common.new_results_path(first) == first and capsys.readouterr().out == ""  # nothing there: the plain name
    first.write_text("the first run's results")
    (tmp_path / "cpu-2026-01-02-kernels-2.json").write_text("the second run's results")
    assert common.new_results_path(first) == tmp_path / "cpu-2026-01-02-kernels-3.json"
    assert "kept" in capsys.readouterr().out and first.read_text() == "the first run's results"


def test_the_date_of_result_names_is_the_one_utc_date(monkeypatch):
    monkeypatch.setattr(common, "utc_date", lambda: "1999-12-31")
    assert common.results_path(torch.device("cpu"), "kernels").name.endswith("-1999-12-31-kernels.json")
    assert common.utc_now().utcoffset() == datetime.timedelta(0)


def test_tags_are_file_name_parts_never_paths():
    assert common.file_tag("h100_run-2.b") == "h100_run-2.b" and common.file_tag("") == ""
    for tag in ("h100/run2", "../../escaped", "a b", "x\\y", "*"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.file_tag(tag)


def test_a_results_file_rewritten_by_a_killed_run_stays_whole(tmp_path, killed_mid_write):
    """A run rewrites its JSON after every block: killed in the middle of a rewrite, the file still holds the whole
    of the previous write, and no temporary file is left to be read as results."""
    path, before = tmp_path / "r.json", json.dumps({"meta": {"run": 1}, "rows": [{"a": 1}]}).encode()
    path.write_bytes(before)  # the previous write (write_bytes: not the write the fixture kills)
    with pytest.raises(killed_mid_write):
        common.write_json(path, {"run": 1}, [{"a": 1}, {"a": 2}])
    assert path.read_bytes() == before and json.loads(before)["rows"] == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_plot_rewritten_by_a_killed_run_stays_whole(tmp_path, monkeypatch):
    Figure = pytest.importorskip("matplotlib.figure", reason="plots need the bench extra (matplotlib)").Figure

    rows = [dict(shape="s", backend="eager", tflops=1.0)]
    path = common.plot_bars(tmp_path / "x.png", rows, metric="tflops", group="shape", series="backend", title="t")
    before = path.read_bytes()

    def half_then_killed(self, target, **kwargs):
        Path(target).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        common.plot_bars(path, rows, metric="tflops", group="shape", series="backend", title="t")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_issue_times_are_cuda_only_and_time_back_to_back_calls(monkeypatch):
    calls = []
    assert common.issue_times_ms(calls.append, torch.device("cpu")) == {}
    assert calls == []

    class Event:  # CUDA events on the host clock: no GPU needed
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(common, "synchronize", lambda device: calls.append("sync"))
    times = common.issue_times_ms(lambda i: (calls.append(i), time.sleep(0.002)), torch.device("cuda"), calls=5)
    assert calls == [0, "sync", 0, 1, 2, 3, 4]  # one warm-up call, then the back-to-back ones with no sync between
    # the device time starts behind the first call (Event stand-ins on the host clock: after its 2 ms)
    assert set(times) == {"host_ms", "queued_ms"}
    assert 2.0 <= times["queued_ms"] < 50.0 and 2.0 <= times["host_ms"] < 50.0
