"""The dispatch-table writer and the kernel benchmark that feeds it, on CPU (collected by ``make test``).

The committed table must be exactly what the committed results give; the ranking rule is checked on a small
synthetic result set; the benchmark's rows are the registry's names and its classes the runtime's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import decode_step, dispatch_table, kernels
from benchmarks.__main__ import main as bench_main
from benchmarks.shapes import Shape
from perceiver_fast.kernels import available_backends, dispatch, explain

SM90 = dispatch.TABLE_DIR / "sm90.json"
PROBE_TEXT = dispatch_table.RESULTS_DIR / "nvidia-h200-2026-11-27-probe-timings.txt"
PROBE_JSON = dispatch_table.RESULTS_DIR / "nvidia-h200-2026-11-27-kernels-probe.json"


def committed_table_from_results() -> dict:
    """The sm90 table as the committed results give it: the kernel benchmark's rows (``source``), then the decoding
    step's (``decode_step_source``, ranked by graph time)."""
    committed = json.loads(SM90.read_text())
    results = [dispatch_table.read_results(dispatch_table.RESULTS_DIR / name) for name in committed["source"]]
    table = dispatch_table.build_table(results, dispatch_table.capability_of(results))
    step_results = json.loads((dispatch_table.RESULTS_DIR / committed["decode_step_source"]).read_text())["rows"]
    labels = {row["shape"] for row in step_results}
    shapes = [shape for shape in decode_step.PRESETS["gpu"] if shape.label in labels]
    (dtype,) = {row["dtype"] for row in step_results}
    step_rows = decode_step.decode_rows(step_results, shapes, getattr(torch, dtype), torch.device("cpu"))
    return {**table, "rows": table["rows"] + step_rows, "decode_step_source": committed["decode_step_source"]}


def test_committed_table_is_what_the_committed_results_give():
    table = committed_table_from_results()
    assert any(row["regime"] == dispatch.DECODE_STEP_REGIME for row in table["rows"])
    assert json.loads(dispatch_table.dumps(table)) == json.loads(SM90.read_text())
    assert dispatch_table.dumps(table) == SM90.read_text()


def test_committed_table_loads_and_names_only_registry_backends():
    table = dispatch.load_table((9, 0))
    assert table is not None and table["device"] == "NVIDIA H100 80GB HBM3"
    registry = set(available_backends()) | {"composite"}  # "composite": the decoding step's own way
    for row in table["rows"]:
        assert row["order"] and set(row["order"]) <= registry, row


def test_probe_text_converts_to_the_committed_results():
    committed = json.loads(PROBE_JSON.read_text())
    meta = committed["meta"]
    converted = dispatch_table.import_results(PROBE_TEXT, capability=meta["capability"], note=meta["note"])
    assert converted == committed
    rows = converted["rows"]
    assert {row["backend"] for row in rows} == {"cuda", "triton", "eager", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"}
    decode = [row for row in rows if row["family"] == "decode" and row["shape_batch"] == 8]
    assert decode and all(row["shape_nq"] == 1 and row["shape_nk"] == 16384 for row in decode)
    # The text's own TFLOP/s (one decimal) agree with the shape this reader made of it.
    for row in rows:
        assert row["tflops"] == pytest.approx(row["tflops_reported"], rel=0.01, abs=0.051), row


@pytest.mark.parametrize(
    "line",
    [
        "ar-prefix N1024 M16k H16 D128      ours-cuda fwd   3.338 ms",  # no rate
        "warp-drive N1 H1 D8  eager fwd  1.0 ms  1.0 TFLOP/s",  # no such family
    ],
)
def test_probe_reader_refuses_lines_it_cannot_read(line):
    with pytest.raises(ValueError):
        dispatch_table.read_probe_timings(f"# one NVIDIA H200, bf16\n{line}\n")


def _row(shape: Shape, backend: str, ms: float | None, mode: str = "fwd", **extra) -> dict:
    row = {"shape": shape.label, "family": shape.family, "backend": backend, "mode": mode, "dtype": "bfloat16"}
    row.update(shape.as_row(), **extra)
    if ms is not None:
        row["ms"] = ms
    return row


def test_ranking_rule_on_a_synthetic_result_set():
    # Three lengths of one key-length class (at most 4k keys): one row of the table.
    s1, s2, s3 = (Shape("prefix-causal", 1, 512, m, 8, 8, 64, 64, True) for m in (2048, 3072, 4096))
    padded = Shape("prefix-causal", 2, 512, 4096, 8, 8, 64, 64, True, kv_start=1024)
    first = dispatch_table.Results(
        "a.json",
        {"device_name": "GPU", "capability": "9.0", "date": "2026-01-02T03:04:05+00:00", "torch": "2.11"},
        [
            _row(s1, "sdpa-flash", 1.0), _row(s1, "triton", 2.0), _row(s1, "eager", 1.5),
            _row(s1, "sdpa-cudnn", 0.5, max_err=1.0),  # fast but wrong: left out
            _row(s1, "auto", 0.1), _row(s1, "flex", 0.1), _row(s1, "sdpa-math", 0.1),  # peers: never ranked
            _row(s2, "sdpa-flash", 2.0), _row(s2, "triton", 3.0), _row(s2, "cuda", 1.0),
            _row(s2, "sdpa-cudnn", 0.25),  # right here, but wrong on s1 of its class: left out of it all the same
            _row(s2, "eager", None, note="RuntimeError: boom"),  # erred on this shape
            _row(s3, "sdpa-flash", 4.0), _row(s3, "triton", 2.0), _row(s3, "eager", 3.0),
            _row(s1, "sdpa-flash", 3.0, mode="fwd+bwd"), _row(s1, "triton", 6.0, mode="fwd+bwd", grad_err=math.nan),
            _row(padded, "triton", 1.0), _row(padded, "eager", 1.25),
        ],
    )  # fmt: skip
    # The same shape measured again in another run: its ratios are taken within that run, whatever its clock.
    second = dispatch_table.Results(
        "b.json", {"device_name": "GPU", "date": "2026-01-01"}, [_row(s1, "sdpa-flash", 30.0), _row(s1, "triton", 10.0)]
    )
    # A class (fp16) whose one backend was right on one shape and wrong on another: no row, not an empty one.
    wrong_once, right_once = (Shape("prefix-causal", 1, 64, m, 8, 8, 64, 64, True) for m in (128, 256))
    first.rows.extend([_row(wrong_once, "triton", 1.0, dtype="float16", max_err=1.0),
                       _row(right_once, "triton", 1.0, dtype="float16")])  # fmt: skip
    table = dispatch_table.build_table([first, second], (9, 0))
    assert {row["dtype"] for row in table["rows"]} == {"bfloat16"}
    rows = {(r["regime"], r["bounds"], r["grad"]): r for r in table["rows"]}
    assert set(rows) == {("prefix-causal", *flags) for flags in [(False, False), (False, True), (True, False)]}
    plain = rows["prefix-causal", False, False]
    # Best per measurement: a.json s1 1.0, s2 1.0, s3 2.0; b.json s1 10.0.
    expected = {
        "cuda": 1.0,  # ran on one shape only, where it was the best
        "eager": 1.5,  # 1.5 and 1.5; its error on s2 neither counts for nor against it
        "triton": (2.0 * 3.0 * 1.0 * 1.0) ** (1 / 4),
        "sdpa-flash": (1.0 * 2.0 * 2.0 * 3.0) ** (1 / 4),
    }
    assert plain["order"] == ["cuda", "eager", "triton", "sdpa-flash"]
    assert plain["score"] == {name: round(value, 4) for name, value in expected.items()}
    assert plain["ms"]["cuda"] == [None, 1.0, None, None] and len(plain["shapes"]) == 4
    assert plain["left_out"] == {"sdpa-cudnn": f"max_err 1 > 0.25 on {s1.label} fwd [a.json]"}
    assert rows["prefix-causal", False, True]["order"] == ["sdpa-flash"]  # a NaN gradient error is left out
    assert rows["prefix-causal", False, True]["left_out"]["triton"].startswith("grad_err nan > 0.25")
    assert "left_out" not in rows["prefix-causal", True, False]
    assert rows["prefix-causal", True, False]["order"] == ["triton", "eager"]
    assert table["date"] == "2026-01-02" and table["capability"] == "9.0" and table["source"] == ["a.json", "b.json"]
    assert table["device"] == "GPU"


def test_results_of_different_devices_make_no_table():
    shape = Shape("io-cross", 1, 16, 64, 1, 1, 16, 16, False)
    results = [
        dispatch_table.Results(name, {"device_name": name}, [_row(shape, "eager", 1.0)]) for name in ("A100", "H100")
    ]
    with pytest.raises(ValueError, match="disagree on the device"):
        dispatch_table.build_table(results, (9, 0))
    with pytest.raises(ValueError, match="--capability"):
        dispatch_table.capability_of(results)
    assert dispatch_table.capability_of(results, "8.6") == (8, 6)


@pytest.mark.parametrize(("text", "expected"), [("9.0", (9, 0)), ("sm90", (9, 0)), ("10.3", (10, 3)), ("86", (8, 6))])
def test_capability_spellings(text, expected):
    assert dispatch_table.parse_capability(text) == expected


def _all_preset_shapes() -> list[Shape]:
    return list(dict.fromkeys(shape for preset in kernels.PRESETS.values() for shape in preset()))


@pytest.mark.parametrize("mode", kernels.MODES)
def test_benchmark_classes_are_the_runtime_classes(monkeypatch, mode):
    """Every benchmarked shape is classified as the op classifies the same call (meta tensors: nothing runs)."""
    seen = []

    def policy_for(problem):
        seen.append(problem)
        return dispatch.Policy(("eager",), "test")

    monkeypatch.setattr(dispatch, "policy_for", policy_for)
    for shape in _all_preset_shapes():
        grad = mode == "fwd+bwd"
        q = torch.empty(shape.batch, shape.nq, shape.hq, shape.dqk, device="meta", dtype=torch.bfloat16)
        k = torch.empty(shape.batch, shape.nk, shape.hkv, shape.dqk, device="meta", dtype=torch.bfloat16)
        v = torch.empty(shape.batch, shape.nk, shape.hkv, shape.dv, device="meta", dtype=torch.bfloat16)
        kv_start, kv_len = shape.bound_tensors(torch.device("meta"))
        explain(q.requires_grad_(grad), k, v, causal=shape.causal, kv_start=kv_start, kv_len=kv_len)
        assert dispatch.ProblemClass.of(seen[-1]) == shape.problem_class(torch.bfloat16, mode), shape.label


def test_presets_measure_key_bounds_and_put_the_unmeasured_first():
    gpu = kernels.PRESETS["gpu"]()
    assert [s.label for s in gpu[:2]] == ["decode B8 N1 M16384 H16 D128 kv_len<=12288", "decode B1 N1 M65536 H16 D128 kv_len<=49152"]  # noqa: E501
    assert gpu[2].kv_start == gpu[2].nk // 4 and gpu[2].family == "prefix-causal"
    for shape in gpu[:2]:
        starts, lengths = shape.bounds()
        assert starts is None and max(lengths) == shape.kv_len < shape.nk and min(lengths) >= shape.kv_len * 3 // 4
    assert any(s.has_bounds for s in kernels.PRESETS["quick"]())


def test_unmasked_work_counts_only_keys_inside_the_bounds():
    padded = Shape("prefix-causal", 2, 4, 16, 1, 1, 8, 8, True, kv_start=4)
    # 12 visible keys per row: 4 queries see 9, 10, 11, 12 of them.
    assert padded.flops("fwd") == 2 * 16 * (9 + 10 + 11 + 12) * 2
    cache = Shape("decode", 2, 1, 64, 2, 2, 8, 8, True, kv_len=32)
    assert cache.visible_keys() == [32, 28]
    assert cache.bytes(torch.float32, "fwd") == 4 * (2 * 1 * 2 * 16 + (32 + 28) * 2 * 16)


def test_a_recompile_limit_hit_raises_instead_of_running_uncompiled():
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    try:
        with torch._dynamo.config.patch(recompile_limit=1), kernels._no_silent_fallback():
            double(torch.ones(2))
            with pytest.raises(Exception, match="recompile_limit"):
                double(torch.ones(3))
    finally:
        torch._dynamo.reset()


def test_quick_run_has_a_row_per_registry_backend_and_writes_a_table(tmp_path, capsys):
    """The CPU quick preset end to end (FlexAttention left out: its compiles take most of a CPU run)."""
    names = [*available_backends(), "auto", "sdpa-math"]
    argv = ["kernels", "--quick", "--backends", ",".join(names), "--repeats", "1", "--warmup", "0", "--budget", "0.2"]
    argv += ["--no-plot", "--out", str(tmp_path), "--write-dispatch-table", "--capability", "9.0"]
    assert bench_main([*argv, "--table-dir", str(tmp_path / "run")]) == 0
    assert "== auto against the best fused SDPA kernel" in capsys.readouterr().out
    (path,) = tmp_path.glob("*-kernels.json")
    rows = json.loads(path.read_text())["rows"]
    cases = {(row["shape"], row["mode"]) for row in rows}
    assert len(cases) == 9 and any("kv_start" in shape for shape, _ in cases)
    for case in cases:
        assert sorted(row["backend"] for row in rows if (row["shape"], row["mode"]) == case) == sorted(names)
    for row in rows:
        if row["backend"] in ("eager", "auto", "sdpa-math"):
            assert row["ms"] > 0 and row["max_err"] <= dispatch_table.error_limit("float32"), row
            assert row["mode"] == "fwd" or row["grad_err"] <= dispatch_table.error_limit("float32"), row
        else:
            assert "ms" not in row and row["note"], row
        if row["backend"] == "auto":
            assert row["auto_backend"] == "eager"
        if row["backend"] == "sdpa-flash":
            assert row["note"].startswith("cpu tensors: SDPA's fused kernels run on CUDA")
    table = json.loads((tmp_path / "run" / "sm90.json").read_text())
    assert {row["bounds"] for row in table["rows"]} == {False, True}
    assert all(row["order"] == ["eager"] for row in table["rows"])  # the only backend that runs CPU tensors here
    # The same table from the results file, without running anything.
    argv = ["kernels", "--write-dispatch-table", "--from-json", str(path), "--capability", "9.0"]
    assert bench_main([*argv, "--table-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "sm90.json").read_text()) == table


@pytest.mark.slow
def test_flex_is_compiled_once_per_shape_and_checked():
    shape = Shape("decode", 2, 1, 256, 2, 2, 16, 16, True, kv_len=192)
    case = kernels.make_case(shape, "fwd", torch.device("cpu"), torch.float32)
    args = type("Args", (), {"warmup": 1, "repeats": 2, "budget": 1.0})()
    row = kernels.bench_case(case, "flex", kernels._flex, args)
    assert row.get("note") is None and row["flex_compiled"] and row["flex_graphs"] == 1, row
    assert row["max_err"] < 1e-5


def test_the_kernel_summary_names_no_wrong_backend_best():
    """The kernel benchmark's auto-versus-SDPA summary leaves out rows the dispatch table would leave out."""
    from benchmarks.kernels import _auto_versus_sdpa

    rows = [
        dict(shape="s", mode="causal", backend="auto", ms=2.0, dtype="bfloat16", max_err=1e-3, auto_backend="triton"),
        dict(shape="s", mode="causal", backend="triton", ms=2.0, dtype="bfloat16", max_err=1e-3),
        dict(shape="s", mode="causal", backend="cuda", ms=0.5, dtype="bfloat16", max_err=0.5),  # fast and wrong
    ]
    (summary,) = _auto_versus_sdpa(rows)
    assert summary["best backend"].startswith("triton") and summary["auto/best"] == 1.0


def test_a_table_or_import_killed_mid_write_leaves_the_earlier_file_whole(tmp_path, killed_mid_write):
    """``auto`` dispatch reads the table: a truncated one would break every later import of the package."""
    before = SM90.read_bytes()
    (tmp_path / "sm90.json").write_bytes(before)
    table = {**json.loads(before), "rows": []}
    with pytest.raises(killed_mid_write):
        dispatch_table.write_table(table, tmp_path)
    assert (tmp_path / "sm90.json").read_bytes() == before
    out = tmp_path / "imported.json"
    out.write_bytes(b"{}")
    with pytest.raises(killed_mid_write):
        dispatch_table.main(["import", str(PROBE_JSON), "--out", str(out)])
    assert out.read_bytes() == b"{}" and sorted(p.name for p in tmp_path.iterdir()) == ["imported.json", "sm90.json"]


def test_a_second_kernel_run_of_the_day_writes_beside_the_first(tmp_path, monkeypatch, capsys):
    """One tiny shape and no peak measurements: only the names of the two runs' files are under test."""
    shape = Shape("decode", 1, 1, 64, 2, 2, 16, 16, True)
    monkeypatch.setitem(kernels.PRESETS, "quick", lambda: [shape])
    monkeypatch.setattr(kernels.common, "matmul_peak_tflops", lambda device, dtype: 1.0)
    monkeypatch.setattr(kernels.common, "copy_bandwidth_gbs", lambda device: 1.0)
    argv = ["kernels", "--quick", "--backends", "eager", "--modes", "fwd", "--repeats", "1", "--warmup", "0"]
    argv += ["--budget", "0.01", "--no-plot", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    (first,) = tmp_path.glob("*-kernels.json")
    before = first.read_bytes()
    assert bench_main(argv) == 0
    assert first.read_bytes() == before and first.with_name(f"{first.stem}-2.json").is_file()
    assert f"{first} exists (an earlier run's results): kept" in capsys.readouterr().out


def test_a_candidate_table_is_compared_with_the_shipped_one(tmp_path, capsys):
    """A GPU run cut short measures fewer classes: committing its table would drop the others, which the comparison
    the GPU check prints names, with the classes whose first backend changed."""
    shipped = json.loads((dispatch.TABLE_DIR / "sm90.json").read_text())
    candidate = json.loads(json.dumps(shipped))
    dropped = candidate["rows"].pop(0)
    changed = candidate["rows"][0]
    changed["order"] = changed["order"][1:] + changed["order"][:1]
    lines = dispatch_table.compare_tables(candidate, shipped)
    assert len(lines) == 2
    assert lines[0].startswith("  dropped") and f"D<={dropped['head_dim']}" in lines[0]
    assert f"{shipped['rows'][1]['order'][0]} -> {changed['order'][0]}" in lines[1]
    assert dispatch_table.compare_tables(shipped, shipped) == []
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(candidate))
    assert dispatch_table.main(["compare", str(path)]) == 0
    assert "dropped (not measured by this run)" in capsys.readouterr().out
    other = tmp_path / "sm100.json"
    other.write_text(json.dumps(candidate))
    assert dispatch_table.main(["compare", str(other)]) == 0
    assert "no shipped table" in capsys.readouterr().out
