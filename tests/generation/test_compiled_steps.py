"""Decoding steps compiled by ``torch.compile`` (``compile_steps=True``) equal eager steps.

Each kind of step compiles whole (``fullgraph``: a graph break anywhere fails the compile). Most tests trace with
``aot_eager``, which functionalizes the step as inductor does, in seconds; one per mode generates inductor code,
which takes up to a minute on this CPU (the strided and perceiver-io ones are ``slow``: the same machinery as the
exact one, whose kinds they add are traced by the fast tests).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from perceiver_fast.generation import (
    CachedDecoder,
    FullForwardDecoder,
    PerceiverIODecoder,
    WindowSchedule,
    generate,
    release_decoding,
)
from perceiver_fast.generation.generate import _HELD_DECODER
from perceiver_fast.generation.graphs import StepGraphs
from tests.generation.test_cache import _drive, _prompt
from tests.generation.test_decode_steps import _model
from tests.oracle import max_rel_error


@pytest.fixture
def traced_only(monkeypatch):
    monkeypatch.setattr(StepGraphs, "compile_backend", "aot_eager")


def _decoders(mode: str, model, schedule: WindowSchedule, compile_steps: bool):
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    return make(model, schedule, 2, compile_steps=compile_steps)


def _compare(mode: str, abs_pos_emb: bool, stride: int, pads=(0, 1), steps: int = 18) -> None:
    """Eager and compiled decoders, and (exact and strided modes) the full forward, step by step; every kind that
    ran twice was compiled."""
    torch.manual_seed(0)
    model = _model(abs_pos_emb=abs_pos_emb)
    schedule = WindowSchedule(12, 4, stride=stride)
    eager, compiled = (_decoders(mode, model, schedule, flag) for flag in (False, True))
    decoders = [eager, compiled] if mode == "perceiver-io" else [eager, compiled, FullForwardDecoder(model, schedule)]
    prompt, pad_mask = _prompt(pads=pads)
    logits = _drive(decoders, prompt, pad_mask, 1, steps)
    for step, (ours, theirs, *full) in enumerate(zip(*logits)):
        assert max_rel_error(theirs, ours) < 1e-5, f"step {step}"
        if full:
            assert max_rel_error(theirs, full[0]) < 1e-4, f"step {step}"
    graphs = compiled.cache.graphs
    repeated = {kind for kind, seen in graphs._seen.items() if seen > 1}
    assert repeated and set(graphs._compiled_steps) == repeated
    for decoder in decoders:
        decoder.close()


@pytest.mark.parametrize(
    "mode, abs_pos_emb, stride",
    [("exact", False, 1), ("exact", True, 1), ("strided", False, 2), ("strided", True, 3), ("perceiver-io", True, 1)],
)
def test_every_kind_of_step_compiles_whole_and_equals_eager_steps(mode, abs_pos_emb, stride, traced_only):
    """Latents grow, the prefix grows, the window slides (in place for rotary-only models), pads leave the latents."""
    _compare(mode, abs_pos_emb, stride)


def test_steps_compiled_to_inductor_code_equal_eager_steps():
    """What ``compile_steps=True`` runs: inductor's code (fused kernels; cache writes and attention in place)."""
    _compare("exact", False, 1, pads=(0, 0))


@pytest.mark.slow
@pytest.mark.parametrize("mode, stride", [("strided", 2), ("perceiver-io", 1)])
def test_steps_of_the_other_modes_compiled_to_inductor_code_equal_eager_steps(mode, stride):
    _compare(mode, True, stride, pads=(0, 0))


def test_generate_keeps_the_compiled_steps_for_the_next_call(traced_only, monkeypatch):
    """Compiling costs seconds per kind: a second call of the same shape runs the steps the first one compiled,
    though another generation (here an eager one) set up the layers' caches in between."""
    compiles = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compiles.append(1) or compile_(*args, **kwargs))
    torch.manual_seed(0)
    model = _model()
    prompt = torch.randint(6, 262, (2, 5))
    first = generate(model, prompt, 12, compile_steps=True)
    assert compiles and torch.equal(first, generate(model, prompt, 12))
    count, decoder = len(compiles), model.__dict__[_HELD_DECODER].decoder
    assert torch.equal(generate(model, prompt, 12, compile_steps=True), first)
    assert len(compiles) == count and model.__dict__[_HELD_DECODER].decoder is decoder
    generate(model, prompt[:1], 12, compile_steps=True)  # another batch size: another decoder, compiled anew
    assert len(compiles) > count and model.__dict__[_HELD_DECODER].decoder is not decoder
    release_decoding(model)
    assert _HELD_DECODER not in model.__dict__


def test_code_compiled_for_one_model_runs_another_with_its_own_weights(traced_only):
    """Dynamo reuses a step compiled for one decoder in every decoder of the same configuration and batch: what it
    reads (weights, caches) must be each decoder's own."""
    torch.manual_seed(0)
    models = [_model(), _model()]
    schedule = WindowSchedule(12, 4)
    prompt, pad_mask = _prompt(pads=(0, 0))
    for model in [*models, models[0]]:
        eager, compiled = (CachedDecoder(model, schedule, 2, compile_steps=flag) for flag in (False, True))
        for step, (theirs, ours) in enumerate(zip(*_drive([eager, compiled], prompt, pad_mask, 1, 10))):
            assert max_rel_error(ours, theirs) < 1e-5, f"step {step}"
        eager.close(), compiled.close()


@pytest.mark.parametrize("assign", [False, True], ids=["in-place", "assigned"])
def test_a_compiled_stream_decodes_with_the_weights_as_they_are_after_an_update(assign, traced_only):
    """Compiled steps read the weights as graph inputs, each call: after an update mid-stream (which rebuilds the
    cache and keeps the compiled steps) the tokens are the updated model's."""
    from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
    from tests.generation.test_cache import with_larger_weights
    from tests.generation.test_generate import SMALL, _stream_with_an_update_at

    torch.manual_seed(0)
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    prompt = torch.randint(6, 262, (2, 6))
    kwargs = dict(num_latents=2, assign=assign)
    expected = _stream_with_an_update_at(model, prompt, 5, 10, use_cache=False, **kwargs)
    model.load_state_dict(state)
    assert torch.equal(_stream_with_an_update_at(model, prompt, 5, 10, compile_steps=True, **kwargs), expected)


class _Stepper:
    """A decoder's shape: steps of every kind run through one method (the same code object for dynamo)."""

    def __init__(self) -> None:
        self.state = torch.zeros(3)

    def run(self, step):
        return step()

    def add(self, n: int) -> torch.Tensor:
        self.state.add_(n)
        return self.state * 2


def test_more_compiled_steps_than_dynamo_allows_per_function(monkeypatch):
    """Every kind of every decoder is an entry of the same step function in dynamo's cache (8 allowed by default,
    and a hard error with fullgraph): a process may decode with many decoders in turn, of several kinds each."""
    monkeypatch.setattr(StepGraphs, "compile_backend", "eager")
    for decoder in range(4):
        stepper, graphs = _Stepper(), StepGraphs(False, compiled=True)
        for kind in range(3 * decoder, 3 * decoder + 3):  # steps of other shapes: new entries
            step = partial(stepper.run, partial(stepper.add, kind))
            for _ in range(2):  # compiled at the second run
                expected = (stepper.state + kind) * 2
                assert torch.equal(graphs.run(kind, step), expected)
        assert len(graphs._compiled_steps) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact"])
def test_compiled_steps_replayed_as_graphs_give_the_tokens_of_eager_steps(mode):
    """On CUDA the graphs capture the compiled steps (inductor's Triton kernels and the op's own). One mode: its
    compile takes a minute of the GPU check's few (the other modes' steps are the same machinery, traced on CPU)."""
    from tests.generation.test_decode_steps import _cuda_model

    torch.manual_seed(0)
    model = _cuda_model(abs_pos_emb=False)
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    kwargs = dict(num_latents=4, cache_mode=mode, stride=8 if mode == "strided" else None)
    compiled = model.generate(prompt, 60, compile_steps=True, **kwargs)
    assert model.__dict__[_HELD_DECODER].decoder.cache.graphs.captured, "no compiled step was captured"
    assert torch.equal(compiled, model.generate(prompt, 60, cuda_graph=False, **kwargs))
    release_decoding(model)
