"""The kernel suite's host/device split: where it is measured (CUDA only) and how a run reports it."""

from __future__ import annotations

import json

import pytest

from benchmarks import kernels
from benchmarks.__main__ import main as bench_main
from benchmarks.shapes import Shape


def _tiny_run(tmp_path, monkeypatch) -> list[str]:
    shape = Shape("decode", 1, 1, 64, 2, 2, 16, 16, True)
    monkeypatch.setitem(kernels.PRESETS, "quick", lambda: [shape])
    monkeypatch.setattr(kernels.common, "matmul_peak_tflops", lambda device, dtype: 1.0)
    monkeypatch.setattr(kernels.common, "copy_bandwidth_gbs", lambda device: 1.0)
    argv = ["kernels", "--quick", "--backends", "eager", "--modes", "fwd", "--repeats", "1", "--warmup", "0"]
    return argv + ["--budget", "0.01", "--no-plot", "--out", str(tmp_path)]


def test_cpu_rows_have_no_host_device_split(tmp_path, monkeypatch, capsys):
    assert bench_main(_tiny_run(tmp_path, monkeypatch)) == 0
    (path,) = tmp_path.glob("*-kernels.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows and all("ms" in r and "host_ms" not in r for r in rows)
    assert "host_ms" not in capsys.readouterr().out


def test_rows_carry_the_split_and_the_summary_pivots_host_over_device(tmp_path, monkeypatch, capsys):
    issued = []

    def issue_times(call, device):
        issued.append(device.type)
        return {"host_ms": 0.3, "queued_ms": 0.2}

    monkeypatch.setattr(kernels.common, "issue_times_ms", issue_times)
    assert bench_main(_tiny_run(tmp_path, monkeypatch)) == 0
    (path,) = tmp_path.glob("*-kernels.json")
    rows = [r for r in json.loads(path.read_text())["rows"] if "ms" in r]
    assert issued and len(issued) == len(rows)
    assert all(r["host_ms"] == 0.3 and r["queued_ms"] == 0.2 for r in rows)
    out = capsys.readouterr().out
    pivot = out.split("== host time / device time per call")[1]
    assert "1.5" in pivot  # 0.3 / 0.2 under each backend that ran


def test_results_are_on_disk_after_every_case(tmp_path, monkeypatch):
    """A run killed by its timeout, or by a CUDA error that leaves the context unusable, keeps what it measured."""
    real = kernels.bench_case
    calls = []

    def bench_case_then_die(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as a kill in the second case
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "bench_case", bench_case_then_die)
    argv = _tiny_run(tmp_path, monkeypatch)
    argv[argv.index("eager")] = "eager,sdpa-math"
    with pytest.raises(KeyboardInterrupt):
        bench_main(argv)
    (path,) = tmp_path.glob("*-kernels.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["eager"] and "ms" in rows[0]


def test_a_wrong_output_fails_the_error_check_however_small_the_outputs():
    """Over 4096 keys every output is about 0.02: an all-zero output was within the absolute bf16 limit (0.25). Rows
    are judged by their error relative to a float32 reference, which an eager bf16 row (SDPA's own kernel on CUDA)
    is not: it shows its rounding, not 0."""
    import torch

    from benchmarks.dispatch_table import error_beyond_rounding, error_limit
    from perceiver_fast.kernels import attention

    shape = Shape("decode", 2, 1, 4096, 2, 2, 16, 16, True)
    case = kernels.make_case(shape, "fwd", torch.device("cpu"), torch.bfloat16)
    with case.grad_mode():
        zeros = kernels._errors(case, lambda q, k, v: torch.zeros_like(q))
        eager = kernels._errors(case, lambda q, k, v: attention(q, k, v, backend="eager", **case.op_arguments()))
    row = {"dtype": "bfloat16", **zeros}
    assert zeros["max_err"] < error_limit("bfloat16")  # what the absolute check let through
    assert zeros["rel_err"] == 1.0 and error_beyond_rounding(row).startswith("rel_err")
    assert 0 < eager["rel_err"] and error_beyond_rounding({"dtype": "bfloat16", **eager}) is None
    assert case.reference[0].dtype == torch.float32

