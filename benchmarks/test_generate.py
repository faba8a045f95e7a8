"""The generation benchmark's verdicts on the GPU targets of the generation issue, from synthetic rows."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from benchmarks import common, generate
from benchmarks.generate import add_arguments, gpu_targets, ms_per_step


def _row(method: str, context: int, batch: int, ms: float) -> dict:
    return dict(method=method, context=context, batch=batch, ms_per_token=ms)


def test_each_target_is_met_missed_or_not_measured():
    rows = [
        _row("ours exact", 8192, 1, 0.45),
        _row("ours exact", 32768, 1, 0.62),
        _row("ours strided", 8192, 1, 0.30),
        _row("ours uncached", 8192, 1, 0.40),
        _row("ours exact (eager)", 8192, 1, 3.0),
        _row("ours exact", 8192, 16, 0.79),
    ]
    verdicts = dict(gpu_targets(rows, "reference"))
    assert verdicts["reference b1 8k ours exact <= 0.50 ms/step"].endswith(": met")
    assert verdicts["reference b1 32k ours exact <= 0.50 ms/step"].endswith("NOT met")
    assert verdicts["reference b1 8k ours strided <= 0.30 ms/step"].endswith(": met")  # the limit itself passes
    assert verdicts["reference b1 32k ours perceiver-io <= 0.30 ms/step"] == "not measured"
    assert verdicts["reference b16 8k ours exact <= 0.80 ms/step"].endswith(": met")  # 20,000 tok/s at batch 16
    # Cached modes against our uncached path, at the same context and batch; eager steps are not the default path.
    assert verdicts["reference b1 8k ours exact faster than ours uncached"].endswith("NOT met")
    assert verdicts["reference b1 8k ours strided faster than ours uncached"].endswith(": met")
    assert not any("(eager)" in target for target in verdicts)
    assert not any(target.startswith("seed") for target in verdicts)


def test_the_seed_configuration_has_its_own_target():
    verdicts = dict(gpu_targets([_row("ours exact", 8192, 1, 1.2)], "seed"))
    assert verdicts == {"seed b1 8k ours exact <= 1.00 ms/step": "1.200 ms: NOT met"}


def test_a_run_whose_timing_is_not_a_difference_is_invalid_never_met():
    """T(n tokens) below T(1 token) (noise, or an allocation timed in one only) gave about 0 ms/step: "met"."""
    assert math.isnan(ms_per_step(prefill=0.010, whole=0.009, new_tokens=24))
    assert ms_per_step(prefill=0.010, whole=0.033, new_tokens=24) == pytest.approx(1.0)
    rows = [_row("ours exact", 8192, 1, float("nan")), _row("ours uncached", 8192, 1, 5.0)]
    verdicts = dict(gpu_targets(rows, "reference"))
    assert verdicts["reference b1 8k ours exact <= 0.50 ms/step"].startswith("invalid")
    assert verdicts["reference b1 8k ours exact faster than ours uncached"].startswith("invalid")


def test_new_tokens_must_leave_a_difference_to_time():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--new-tokens", "1"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--device", "cpu", "--new-tokens", "2", *argv])


def test_a_tag_that_is_not_a_file_name_part_is_refused_before_anything_runs(capsys):
    """``--tag h100/run2`` went into the file name as a folder: FileNotFoundError after the first block measured."""
    for tag in ("h100/run2", "../../escaped"):
        with pytest.raises(SystemExit):
            _args("--tag", tag)
        assert "a tag may hold only" in capsys.readouterr().err
    assert _args("--tag", "h100_run-2.b").tag == "h100_run-2.b" and _args().tag == ""


def _fake_blocks(monkeypatch, stop_after: int | None = None) -> list[bool]:
    """``bench_context`` without a model: one row per block; the run is killed after ``stop_after`` blocks. Returns
    whether each block was asked to count launches."""
    done, counted = [], []

    def bench_context(context, batch, *args, count_launches=True, compile_steps=False):
        if stop_after is not None and len(done) == stop_after:
            raise KeyboardInterrupt  # a deadline or Ctrl-C, between two blocks
        done.append(context)
        counted.append(count_launches)
        return [dict(method="ours exact", context=context, batch=batch, prefill_ms=1.0, ms_per_token=2.0,
                     tokens_per_s=500.0)]  # fmt: skip

    monkeypatch.setattr(generate, "bench_context", bench_context)
    monkeypatch.setattr(generate, "plot", lambda rows, path: None)
    return counted


def _contexts(path) -> list[int]:
    return [row["context"] for row in json.loads(path.read_text())["rows"]]


def test_a_second_run_cut_short_keeps_the_first_runs_complete_file(tmp_path, monkeypatch, capsys):
    _fake_blocks(monkeypatch)
    generate.run(_args("--contexts", "512", "1024", "--out", str(tmp_path)))
    (first,) = tmp_path.glob("*.json")
    _fake_blocks(monkeypatch, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate.run(_args("--contexts", "512", "8192", "--out", str(tmp_path)))
    second = first.with_name(f"{first.stem}-2.json")
    assert _contexts(first) == [512, 1024] and _contexts(second) == [512]
    assert f"{first} exists (an earlier run's results): kept" in capsys.readouterr().out


def test_only_the_first_block_counts_launches(tmp_path, monkeypatch):
    """A step's launches depend on its kind, not on the context or batch: one profiled block is enough."""
    counted = _fake_blocks(monkeypatch)
    generate.run(_args("--contexts", "512", "1024", "--batch-sizes", "1", "4", "--out", str(tmp_path)))
    assert counted == [True, False, False, False]


def test_generate_names_its_files_by_the_one_utc_date(tmp_path, monkeypatch):
    _fake_blocks(monkeypatch)
    monkeypatch.setattr(common, "utc_date", lambda: "1999-12-31")
    generate.run(_args("--contexts", "512", "--tag", "t", "--out", str(tmp_path)))
    (path,) = tmp_path.glob("*.json")
    assert path.name == f"{generate._device_name(torch.device('cpu'))}-1999-12-31-generate-t.json"


def test_skip_leaves_out_the_floor_too(monkeypatch):
    """The floor (a pass of the latent stack over all latents) is the slowest row on a CPU: --skip floor drops it."""
    monkeypatch.setitem(generate.MODELS, "tiny", dict(num_channels=16, num_heads=2, num_self_attention_layers=1,
                                                      max_latents=8))  # fmt: skip
    skip = {"pio", "exact", "uncached", "perceiver-io"}
    rows = generate.bench_context(64, 1, 2, torch.device("cpu"), 1, skip, "tiny")
    assert [row["method"] for row in rows] == ["ours strided", "floor (latent stack)"]
    rows = generate.bench_context(64, 1, 2, torch.device("cpu"), 1, skip | {"floor"}, "tiny")
    assert [row["method"] for row in rows] == ["ours strided"]


def test_strided_rows_are_averaged_over_a_stride_period():
    """The prompt fills the latents, so a strided generation's first step is a hand-over: over n - 1 steps the run
    would count one per n - 1 steps, where a long generation pays one per stride."""
    times = generate.strided_ms_per_step(1.0, 1.010, 1.010 + 8 * 0.001, 10, stride=4)  # seconds
    assert times["handover_ms"] == pytest.approx(10.0) and times["extend_ms"] == pytest.approx(1.0)
    assert times["ms_per_token"] == pytest.approx((10.0 + 3 * 1.0) / 4)
    assert math.isnan(generate.strided_ms_per_step(1.0, 0.99, 1.5, 10, stride=4)["ms_per_token"])


def test_a_strided_row_reports_its_hand_over_and_extend_steps(monkeypatch):
    monkeypatch.setitem(generate.MODELS, "tiny", dict(num_channels=16, num_heads=2, num_self_attention_layers=1,
                                                      max_latents=8))  # fmt: skip
    (row,) = generate.bench_context(64, 1, 6, torch.device("cpu"), 1, {"pio", "exact", "uncached", "perceiver-io",
                                                                        "floor"}, "tiny")  # fmt: skip
    assert row["method"] == "ours strided" and row["stride"] == 4
    for key in ("handover_ms", "extend_ms", "ms_per_token_in_run"):
        assert key in row
    if not math.isnan(row["ms_per_token"]):  # timings of a tiny model on a shared CPU may not be differences
        assert row["ms_per_token"] == pytest.approx((row["handover_ms"] + 3 * row["extend_ms"]) / 4)


def test_compiled_rows_time_each_mode_with_compiled_steps(monkeypatch):
    """--compile-steps adds a row per cached mode whose steps torch.compile compiled (traced with aot_eager here,
    which compiles in seconds: the benchmark's part is which rows run with which flag)."""
    from perceiver_fast.generation.graphs import StepGraphs

    monkeypatch.setattr(StepGraphs, "compile_backend", "aot_eager")
    monkeypatch.setitem(generate.MODELS, "tiny", dict(num_channels=16, num_heads=2, num_self_attention_layers=1,
                                                      max_latents=8))  # fmt: skip
    compiled = []
    original = generate.CausalLanguageModel.generate

    def recording(self, *args, **kwargs):
        compiled.append(kwargs.get("compile_steps", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(generate.CausalLanguageModel, "generate", recording)
    skip = {"pio", "uncached", "floor"}
    rows = generate.bench_context(64, 1, 4, torch.device("cpu"), 1, skip, "tiny", compile_steps=True)
    names = [row["method"] for row in rows]
    assert names == [f"ours {mode}{suffix}" for suffix in ("", " (compiled)")
                     for mode in ("exact", "strided", "perceiver-io")]  # fmt: skip
    # four warm-up generations and two timed ones per compiled row; strided times a third (2 tokens: its hand-over)
    assert compiled.count(True) == 3 * (4 + 2) + 1
    args = generate.argparse.ArgumentParser()
    generate.add_arguments(args)
    assert args.parse_args(["--compile-steps"]).compile_steps and not args.parse_args([]).compile_steps


def test_launches_per_step_are_a_difference_of_two_generations():
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=kind) for kind in (cuda, cpu, cuda, cuda, cpu)]
    assert generate.count_device_events(events) == 3
    launched = {1: 50, 24: 50 + 23 * 80}
    assert generate.launches_per_step(lambda n: n, 24, recorded=lambda call: launched[call()]) == (80.0, None)
    same, note = generate.launches_per_step(lambda n: n, 24, recorded=lambda call: 50)
    assert math.isnan(same) and "recorded 50 launches for 1 token and 50 for 24" in note

    def broken(call):
        raise RuntimeError("CUPTI unavailable")

    failed, note = generate.launches_per_step(lambda n: n, 24, recorded=broken)
    assert math.isnan(failed) and note == "profiler failed: RuntimeError: CUPTI unavailable"
    # The profiler's own events on this machine: CPU ones only.
    assert generate.device_events_of(lambda: torch.ones(3) + 1, torch.device("cpu")) == 0
