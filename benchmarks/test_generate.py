"""The generation benchmark's verdicts on the GPU targets of the generation issue, from synthetic rows."""

from __future__ import annotations

import math

import pytest

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
