"""The op's per-call host work: what it looks up once (installed packages, dispatch-table policies) and what it must
still see change between calls (a table put in place of another, the device's capability, the environment
switches). Timings are not asserted here; they are measured by hand (per-call host time is what these caches save)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from perceiver_fast.kernels import api, dispatch, flash_attn
from perceiver_fast.kernels import problem as problem_module
from perceiver_fast.kernels.problem import AttentionProblem
from perceiver_fast.kernels.registry import get_backend


def _cuda_problem(num_queries=1024, num_keys=4096, head_dim=64, *, dtype=torch.bfloat16, causal=True, bounds=False,
                  grad=False, lse=False) -> AttentionProblem:  # fmt: skip
    return AttentionProblem(
        device=torch.device("cuda", 0), dtype=dtype, batch=1, num_queries=num_queries, num_keys=num_keys,
        num_q_heads=8, num_kv_heads=8, qk_head_dim=head_dim, v_head_dim=head_dim, causal=causal,
        has_kv_start=False, has_kv_len=bounds, dropout_p=0.0, requires_grad=grad, return_lse=lse,
    )  # fmt: skip


@pytest.fixture
def hopper(monkeypatch):
    """A capability-9.0 device (the shipped sm90 table applies), with empty policy caches."""
    monkeypatch.setitem(problem_module._capabilities, 0, (9, 0))
    monkeypatch.setattr(dispatch, "_policies", {})


def test_installed_packages_are_looked_up_once_however_many_calls_ask(monkeypatch):
    """importlib.metadata reads the file system on every call (0.2 ms each on an H200 host, twice per op call that
    reached the flash-attn backend before the one it ran)."""
    monkeypatch.setattr(flash_attn, "_versions", {})
    monkeypatch.setattr(flash_attn, "_found", {})
    asked: list[str] = []
    version, find_spec = importlib.metadata.version, importlib.util.find_spec

    def counted_version(name):
        asked.append(name)
        return version(name)

    def counted_find_spec(name, *args):
        asked.append(name)
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.metadata, "version", counted_version)
    monkeypatch.setattr(importlib.util, "find_spec", counted_find_spec)
    # report=True asks every backend, flash-attn's two included. With gradients the CUDA C++ backend turns the call
    # down before it loads its library (which test_cuda_build loads from its own build, in the same process).
    call = _cuda_problem(grad=True)
    first, _ = api._decide(call, report=True)
    for _ in range(20):
        assert api._decide(call, report=True)[0] == first
    flash_names = [name for name in asked if name.replace("-", "_").startswith("flash_attn")]
    assert flash_names and len(flash_names) == len(set(flash_names)), flash_names


def test_a_flash_attn_version_is_parsed_as_before(monkeypatch):
    monkeypatch.setattr(flash_attn, "_versions", {})
    monkeypatch.setattr(flash_attn, "_found", {"flash_attn": True})
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.0.9+cu12")
    reason = get_backend("flash-attn").unsupported_reason(_cuda_problem())
    assert reason == "flash-attn 2.0 aligns causal masks top-left; 2.1 or later needed"


def test_a_policy_is_read_from_the_table_once_per_class(hopper, monkeypatch):
    reads = []
    measured_row = dispatch._measured_row

    def counted(device, wanted):
        reads.append(wanted)
        return measured_row(device, wanted)

    monkeypatch.setattr(dispatch, "_measured_row", counted)
    policies = {dispatch.policy_for(_cuda_problem(num_queries=n, num_keys=n * 4)) for n in (600, 700, 800, 1024)}
    assert len(policies) == 1 and len(reads) == 1  # one class: 2400 to 4096 keys are all the 4k class
    dispatch.policy_for(_cuda_problem(lse=True))  # another policy (eager last), and another read
    assert len(reads) == 2


CLASSES = [
    dict(num_queries=nq, num_keys=nk, head_dim=d, dtype=dtype, causal=causal, bounds=bounds, grad=grad, lse=lse)
    for nq, nk in ((1, 8192), (1, 70_000), (16, 200_000), (128, 1024), (1024, 4096), (4096, 4096), (512, 16384))
    for d in (32, 64, 100, 128, 256)
    for dtype in (torch.bfloat16, torch.float16)
    for causal in (True, False)
    for bounds in (False, True)
    for grad in (False, True)
    for lse in (False, True)
]


def test_the_cached_policy_is_the_one_the_table_gives(hopper):
    """Calls of one cache key share a policy: the key must tell apart every class the table does."""
    for fields in CLASSES:
        call = _cuda_problem(**fields)
        assert dispatch.policy_for(call) == dispatch._cuda_policy(call), fields
        assert dispatch.decode_step_policy(call) == dispatch._decode_step_cuda_policy(call), fields


def test_a_table_put_in_place_of_the_cached_one_is_used_by_the_next_call(hopper, monkeypatch):
    call = _cuda_problem()
    shipped = dispatch.policy_for(call)
    assert shipped.source.startswith("sm90.json row")
    row = dict(dtype="bfloat16", regime="prefix-causal", head_dim=64, keys=4096, bounds=False, grad=False)
    for order in (["sdpa-efficient", "eager"], ["triton", "eager"]):
        table = {"device": "a test", "date": "today", "rows_by_class": {dispatch.ProblemClass(**row): {"order": order}}}
        monkeypatch.setattr(dispatch, "load_table", lambda capability, table=table: table)
        assert dispatch.policy_for(call).order[0] == order[0]
    monkeypatch.setattr(dispatch, "load_table", lambda capability: None)
    assert "no dispatch table for sm_90" in dispatch.policy_for(call).source


def test_a_table_read_again_is_used_by_the_next_call(hopper, monkeypatch, tmp_path):
    call = _cuda_problem()
    assert dispatch.policy_for(call).order[0] != "sdpa-efficient"
    row = dict(dtype="bfloat16", regime="prefix-causal", head_dim=64, keys=4096, bounds=False, grad=False)
    (tmp_path / "sm90.json").write_text(
        json.dumps({"device": "a test", "date": "today", "rows": [{**row, "order": ["sdpa-efficient"]}]})
    )
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.load_table.cache_clear()
    try:
        assert dispatch.policy_for(call).order[0] == "sdpa-efficient"
        assert "measured on a test, today" in dispatch.policy_for(call).source
    finally:
        dispatch.load_table.cache_clear()  # the next test reads the shipped table again


def test_a_capability_change_is_seen_by_the_next_call(hopper, monkeypatch):
    call = _cuda_problem()
    assert dispatch.policy_for(call).source.startswith("sm90.json row")
    for capability in ((8, 0), (7, 5)):  # neither has a table: the same table (None) for both
        monkeypatch.setitem(problem_module._capabilities, 0, capability)
        assert f"no dispatch table for sm_{capability[0]}{capability[1]}" in dispatch.policy_for(call).source
    monkeypatch.setitem(problem_module._capabilities, 0, (9, 0))
    assert dispatch.policy_for(call).source.startswith("sm90.json row")


def test_the_backend_env_var_is_read_on_every_call(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    for value, requested in (("eager", "eager"), (None, "auto"), ("bogus", None), ("eager", "eager")):
        if value is None:
            monkeypatch.delenv(api.BACKEND_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(api.BACKEND_ENV_VAR, value)
        if requested is None:
            with pytest.raises(ValueError, match="PERCEIVER_FAST_BACKEND='bogus'"):
                api.attention(q, q, q)
        else:
            assert api.explain(q, q, q).requested == requested
            api.attention(q, q, q)


@pytest.mark.parametrize("given", ["kv_start", "kv_len", "both"])
def test_bound_values_are_read_where_free_or_under_the_debug_switch_only(given, monkeypatch):
    """CPU bounds are always checked; GPU bounds (fake CUDA tensors here) only while the debug switch is on, which is
    read on every call whichever bounds are given."""
    checked = []
    monkeypatch.setattr(api, "_check_bound_values", lambda kv_start, kv_len, num_keys: checked.append(num_keys))

    def bounds(device):
        kv_start = torch.zeros(2, dtype=torch.int32, device=device) if given != "kv_len" else None
        kv_len = torch.full((2,), 5, dtype=torch.int32, device=device) if given != "kv_start" else None
        return {"kv_start": kv_start, "kv_len": kv_len}

    q = torch.randn(2, 3, 2, 8)
    api.explain(q, q, q, **bounds("cpu"))
    assert len(checked) == 1
    for switch, expected in (("1", 2), ("0", 2), ("1", 3)):
        monkeypatch.setenv(api.CHECK_BOUNDS_ENV_VAR, switch)
        with FakeTensorMode():
            fake = torch.empty(2, 3, 2, 8, device="cuda")
            api.explain(fake, fake, fake, **bounds("cuda"))
        assert len(checked) == expected, switch
