"""Decoding steps are what a CUDA graph can capture: fixed buffers and no host reads.

On CPU (no graphs here) two properties prove it: every step kind reuses the same tensors step after step (nothing is
reallocated, so a captured graph's addresses stay valid), and no step reads a tensor back to the host (which on a GPU
is a device sync, and inside a capture an error). The op's CPU path may read key bounds for free; here it is made to
take the path it takes on a GPU. On a GPU, the graph tests compare captured and eager decoding token for token.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from perceiver_fast.generation import CachedDecoder, FullForwardDecoder, PerceiverIODecoder, WindowSchedule
from perceiver_fast.generation.graphs import StepGraphs
from perceiver_fast.kernels import api, reference
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.generation.test_cache import _drive, _prompt
from tests.oracle import max_rel_error

SMALL = dict(num_channels=32, num_heads=2, num_self_attention_layers=3, max_latents=4, max_seq_len=12)


class HostReadError(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise HostReadError("a decoding step read a tensor back to the host")


class NoHostReads(TorchDispatchMode):
    """Fails on anything that turns tensor data into Python values: ``item``, ``int``, ``bool``, ``if t:`` (all
    ``aten._local_scalar_dense``), and ``tolist``/``numpy``, which do not dispatch and are patched while it is on."""

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        torch.Tensor.tolist = torch.Tensor.numpy = _refuse
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            _refuse()
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_like_op(monkeypatch):
    """The op reads no bounds value on a GPU; make its CPU path do the same."""
    for module in (api, reference):
        monkeypatch.setattr(module, "host_readable", lambda t: False)


def _model(**overrides):
    return CausalLanguageModel(CausalLanguageModelConfig(**{**SMALL, **overrides})).eval()


def _step_kinds(decoder):
    return decoder.cache.graphs._seen if hasattr(decoder.cache, "graphs") else {}


@pytest.mark.parametrize(
    "mode, abs_pos_emb, stride",
    [("exact", True, 1), ("exact", False, 1), ("strided", False, 2), ("strided", True, 3), ("perceiver-io", True, 1)],
)
def test_steps_reuse_their_buffers_and_read_nothing_back(mode, abs_pos_emb, stride, gpu_like_op):
    """Latents grow, the prefix grows, the window slides (in place for rotary-only models): every step that is
    captured on a GPU runs under a mode that fails on a host read, and leaves every state tensor where it was."""
    model = _model(abs_pos_emb=abs_pos_emb)
    schedule = WindowSchedule(12, 4, stride=stride)
    decoder = PerceiverIODecoder(model, schedule, 2) if mode == "perceiver-io" else CachedDecoder(model, schedule, 2)
    cache = decoder.cache.cache if mode == "perceiver-io" else decoder.cache
    prompt, pad_mask = _prompt(pads=(0, 1))  # pads in the prefix only: every step is one a GPU captures
    sequence, pads = prompt, pad_mask
    logits = decoder.start(sequence, pads, 1)
    buffers = [(t.data_ptr(), t.shape) for t in cache.state_tensors()]
    steps_checked = 0
    for _ in range(20):
        token = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        pads = torch.cat([pads, torch.zeros_like(pads[:, :1])], dim=1)
        window_full = sequence.shape[1] > schedule.max_seq_len
        rebuild = mode != "perceiver-io" and window_full and abs_pos_emb  # eager by design: a full prefill
        if rebuild:
            logits = decoder.step(sequence, pads)
            continue
        with NoHostReads():
            logits = decoder.step(sequence, pads)
        steps_checked += 1
        assert [(t.data_ptr(), t.shape) for t in cache.state_tensors()] == buffers
    assert steps_checked >= 5


def test_the_guard_catches_a_host_read(gpu_like_op):
    with pytest.raises(HostReadError), NoHostReads():
        bool(torch.ones(2).sum() > 1)
    with pytest.raises(HostReadError), NoHostReads():
        torch.ones(2).tolist()
    assert torch.ones(2).tolist() == [1.0, 1.0]  # restored


class StaticOutputGraphs(StepGraphs):
    """A CUDA graph's output semantics on the CPU: each kind keeps one logits tensor, which every run of the kind
    overwrites and returns (as a replayed graph does)."""

    def __init__(self):
        super().__init__(False)
        self.enabled = True
        self._outputs: dict = {}

    def run(self, kind, step):
        logits = step()
        return self._outputs.setdefault(kind, torch.empty_like(logits)).copy_(logits)


@pytest.mark.parametrize("mode", ["exact", "perceiver-io"])
def test_logits_of_a_replayed_step_survive_the_next_step(mode):
    """A step's logits handed to a caller stay what they were after later steps of the same kind (the public
    decoders copy a graph's static output; generate, which samples before the next step, skips the copy)."""
    model = _model()
    schedule = WindowSchedule(12, 4)
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    replayed, plain = make(model, schedule, 2), make(model, schedule, 2)
    replayed.cache.graphs = StaticOutputGraphs()
    prompt, pad_mask = _prompt(pads=(0, 1))
    first, second = _drive([replayed, plain], prompt, pad_mask, 1, 6)
    assert len(replayed.cache.graphs._outputs) >= 1
    for step, (got, expected) in enumerate(zip(first, second)):
        assert torch.equal(got, expected), step


class ReplayFirstStep(StepGraphs):
    """A CUDA graph's replay on the CPU: the first step function of a kind runs for every later step of the kind
    (a replay runs what was captured, not the Python of the step at hand)."""

    def __init__(self):
        super().__init__(False)
        self.enabled = True
        self._steps: dict = {}

    def run(self, kind, step):
        return self._steps.setdefault(kind, step)()


@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_replayed_steps_project_with_weights_changed_in_place_since(mode):
    """The packed query/key/value rows are a copy of the parameters: every step, replayed ones included, copies them
    anew. Weights changed in place between two steps (``.data`` too, which no version counter sees) reach the next
    step as they reach a decoder whose layers project with their own modules."""
    from perceiver_fast.models.core.packed import PackedProjections

    model = _model()
    schedule = WindowSchedule(12, 4, stride=2 if mode == "strided" else 1)
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    packed, own = make(model, schedule, 2), make(model, schedule, 2)
    packed.cache.graphs = ReplayFirstStep()
    assert packed.cache.projections.packed, "this model's projections should be packed"
    own.cache.projections = PackedProjections([])  # nothing packed: the layers' own modules
    for cache in own.cache._own_caches:
        cache.packed = None
    prompt = torch.randint(6, 262, (2, 6), generator=torch.Generator().manual_seed(0))
    sequence = prompt
    logits = [decoder.start(sequence, None, 2) for decoder in (packed, own)]
    with torch.no_grad():
        for step in range(10):
            if step in (3, 6):
                for layer in (model.cross_attention, *model.self_attention):
                    attention = layer.attention_module.attention
                    attention.k_proj.weight.data.mul_(1.5)
                    attention.q_proj.weight.data.add_(0.05)
            sequence = torch.cat([sequence, logits[1].argmax(-1, keepdim=True)], dim=1)
            logits = [decoder.step(sequence, None) for decoder in (packed, own)]
            assert max_rel_error(logits[0], logits[1]) <= 1e-5, step
    assert len(packed.cache.graphs._steps) >= 1


@pytest.mark.parametrize("mode", ["exact", "perceiver-io"])
def test_decoders_pack_projections_on_gpus_only(mode, monkeypatch):
    """On a CPU a launch costs no more than a call, and refreshing a pack copies every projection each step."""
    monkeypatch.undo()  # this directory's conftest packs on the CPU as well
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    decoder = make(_model(), WindowSchedule(12, 4), 2)
    assert decoder.cache.projections.packed == [] and decoder.cache.projections.buffers() == []
    layer_caches = decoder.cache._layer_caches()
    assert layer_caches and all(cache.packed is None for cache in layer_caches)


@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_generate_accepts_cuda_graph_only_on_cuda(mode):
    model = _model()
    prompt = torch.randint(6, 262, (1, 4))
    kwargs = dict(cache_mode=mode, stride=2 if mode == "strided" else None)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        model.generate(prompt, 3, cuda_graph=True, **kwargs)
    assert torch.equal(model.generate(prompt, 3, cuda_graph=False, **kwargs), model.generate(prompt, 3, **kwargs))


def test_held_graphs_are_keyed_by_where_the_weights_live():
    """A held decoder's graphs read the weights at their addresses at capture: weights updated in place keep the
    key (the graphs read the new values), weights that moved or were replaced change it, and so does autocast."""
    from perceiver_fast.generation.generate import _held_decoder_key

    model = _model()
    key = _held_decoder_key(model, 2, "exact", 1)
    with torch.no_grad():
        model.load_state_dict({name: t + 1 for name, t in model.state_dict().items()})  # copied in place
        next(model.parameters()).mul_(2)
    assert _held_decoder_key(model, 2, "exact", 1) == key
    model.load_state_dict({name: t.clone() for name, t in model.state_dict().items()}, assign=True)
    moved = _held_decoder_key(model, 2, "exact", 1)
    assert moved != key
    model.to(torch.float64).to(torch.float32)  # new storage, same dtype and device
    plain = _held_decoder_key(model, 2, "exact", 1)
    assert plain != moved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _held_decoder_key(model, 2, "exact", 1) != plain
    with torch.inference_mode():
        assert _held_decoder_key(model, 2, "exact", 1) != plain


# --- on a GPU: captured graphs against eager steps


def _cuda_model(**overrides):
    return CausalLanguageModel(CausalLanguageModelConfig(**{**SMALL, "max_seq_len": 64, "max_latents": 16,
                                                           **overrides})).cuda().eval()  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
@pytest.mark.parametrize("abs_pos_emb", [True, False])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_graph_and_eager_decoding_give_the_same_tokens(mode, abs_pos_emb, sampling):
    model = _cuda_model(abs_pos_emb=abs_pos_emb)
    prompt = torch.randint(6, 262, (3, 40), device="cuda")
    pad_mask = torch.zeros_like(prompt, dtype=torch.bool)
    pad_mask[1, :9] = True
    kwargs = dict(num_latents=4, pad_mask=pad_mask, cache_mode=mode, stride=8 if mode == "strided" else None)
    if sampling == "seeded":
        kwargs.update(do_sample=True, top_k=20)
    runs = []
    for cuda_graph in (True, False):
        generator = torch.Generator(device="cuda").manual_seed(7) if sampling == "seeded" else None
        runs.append(model.generate(prompt, 60, generator=generator, cuda_graph=cuda_graph, **kwargs))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_graphs_captured_under_autocast_decode_like_eager_steps(mode):
    """An fp32 model generating under bf16 autocast: graphs hold bf16 caches and replay what eager steps do; a
    later generation without autocast captures its own graphs rather than replaying the bf16 ones."""
    model = _cuda_model()
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    kwargs = dict(num_latents=4, cache_mode=mode, stride=8 if mode == "strided" else None)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        runs = [model.generate(prompt, 40, cuda_graph=cuda_graph, **kwargs) for cuda_graph in (True, False)]
    assert torch.equal(runs[0], runs[1])
    fp32 = [model.generate(prompt, 40, cuda_graph=cuda_graph, **kwargs) for cuda_graph in (True, False)]
    assert torch.equal(fp32[0], fp32[1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_captured_steps_run_without_a_device_sync(mode):
    """``torch.cuda.set_sync_debug_mode("error")`` around the decoding steps: any host read raises."""
    model = _cuda_model(abs_pos_emb=False)
    schedule = WindowSchedule(64, 16, stride=8 if mode == "strided" else 1)
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    decoder = make(model, schedule, 2, cuda_graph=True)
    reference_decoder = FullForwardDecoder(model, schedule)
    prompt, pad_mask = _prompt(length=40, pads=(0, 3))
    prompt, pad_mask = prompt.cuda(), pad_mask.cuda()
    sequence, pads = prompt, pad_mask
    logits = decoder.start(sequence, pads, 4)
    reference_decoder.start(sequence, pads, 4)
    for step in range(40):
        token = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        pads = torch.cat([pads, torch.zeros_like(pads[:, :1])], dim=1)
        expected = reference_decoder.step(sequence, pads)
        torch.cuda.synchronize()
        if step >= 4:  # past the warm-up runs, which compile and tune kernels
            torch.cuda.set_sync_debug_mode("error")
        try:
            logits = decoder.step(sequence, pads)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if mode != "perceiver-io":
            assert max_rel_error(logits, expected) <= 1e-4, step
    assert decoder.cache.graphs.captured, "no step kind was captured"


@pytest.mark.gpu
def test_cached_decoding_equals_full_forwards_with_graphs():
    model = _cuda_model()
    schedule = WindowSchedule(64, 16)
    prompt, pad_mask = _prompt(length=40, pads=(0, 7))
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2, cuda_graph=True)],
        prompt.cuda(), pad_mask.cuda(), 4, 40,
    )  # fmt: skip
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-4, step


@pytest.mark.gpu
def test_graphs_are_kept_with_the_model_between_calls_and_released_on_request():
    from perceiver_fast.generation import release_decoding
    from perceiver_fast.generation.generate import _HELD_DECODER

    model = _cuda_model(abs_pos_emb=False)
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    first = model.generate(prompt, 40, num_latents=4)
    decoder = model.__dict__[_HELD_DECODER].decoder
    graphs = dict(decoder.cache.graphs._graphs)
    assert graphs, "no step was captured"
    other = torch.randint(6, 262, (2, 40), device="cuda")
    second = model.generate(other, 40, num_latents=4)
    assert model.__dict__[_HELD_DECODER].decoder is decoder
    # Replayed, not captured again:
    assert all(decoder.cache.graphs._graphs[kind] is graph for kind, graph in graphs.items())
    assert torch.equal(second, model.generate(other, 40, num_latents=4, cuda_graph=False))
    assert torch.equal(first, model.generate(prompt, 40, num_latents=4, cuda_graph=False))
    release_decoding(model)
    assert _HELD_DECODER not in model.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
def test_interleaved_streams_with_graphs_each_generate_their_own_tokens(mode):
    """The first stream replays graphs (held with the model), the second, opened while it runs, steps eagerly: both
    give the tokens of a generation on its own."""
    model = _cuda_model()
    prompts = [torch.randint(6, 262, (2, 40), device="cuda") for _ in range(2)]
    kwargs = dict(num_latents=4, cache_mode=mode, stride=8 if mode == "strided" else None)
    expected = [model.generate(p, 30, cuda_graph=False, **kwargs)[:, 40:] for p in prompts]
    streams = [model.stream(p, 30, **kwargs) for p in prompts]
    tokens = [torch.stack(list(pair), dim=0) for pair in zip(*streams)]  # [steps, 2 streams, batch]
    for index, want in enumerate(expected):
        assert torch.equal(torch.stack([t[index] for t in tokens], dim=1), want)


@pytest.mark.gpu
def test_graphs_held_from_inference_mode_are_not_used_outside_it():
    """A generation under ``torch.inference_mode()`` holds buffers that cannot be updated in place outside it: the
    next generation outside sets up its own instead of failing on them."""
    model = _cuda_model()
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    with torch.inference_mode():
        inside = model.generate(prompt, 30, num_latents=4)
    assert torch.equal(model.generate(prompt, 30, num_latents=4), inside)


@pytest.mark.gpu
def test_held_graphs_are_not_replayed_over_weights_that_moved():
    """Weights replaced (``load_state_dict(..., assign=True)``) or moved off the GPU and back after graphs were
    captured: the next generation captures new graphs instead of replaying kernels that read the old addresses."""
    model = _cuda_model(abs_pos_emb=False)
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    model.generate(prompt, 40, num_latents=4)  # captured, and held with the model
    fresh = {name: (torch.randn_like(t) * 0.2 if t.dim() > 1 else t.clone()) for name, t in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    assert torch.equal(model.generate(prompt, 40, num_latents=4), model.generate(prompt, 40, num_latents=4,
                                                                                cuda_graph=False))  # fmt: skip
    model.cpu()
    torch.randn(1 << 22, device="cuda")  # something else may now sit where the weights were
    model.cuda()
    assert torch.equal(model.generate(prompt, 40, num_latents=4), model.generate(prompt, 40, num_latents=4,
                                                                                cuda_graph=False))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided"])
def test_a_stream_on_graphs_decodes_with_weights_reassigned_under_it(mode):
    """Weights replaced while a stream replays graphs (``load_state_dict(..., assign=True)`` between two tokens):
    the stream rebuilds its cache and captures new graphs, and gives the tokens of the same stream run eagerly."""
    from tests.generation.test_generate import _stream_with_an_update_at

    model = _cuda_model()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    prompt = torch.randint(6, 262, (2, 40), device="cuda")
    kwargs = dict(num_latents=4, cache_mode=mode, assign=True)
    expected = _stream_with_an_update_at(model, prompt, 12, 30, cuda_graph=False, **kwargs)
    model.load_state_dict(state, assign=True)
    assert torch.equal(_stream_with_an_update_at(model, prompt, 12, 30, **kwargs), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "strided", "perceiver-io"])
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_fused_decode_kernel_steps_equal_composite_steps(mode, cuda_graph, monkeypatch):
    """bf16 decoding with the fused CUDA decode kernel forced (PERCEIVER_FAST_DECODE_BACKEND=cuda) against the
    composite steps, on the same tokens; head dim 64 and rotary, as the models use them."""
    import copy

    from perceiver_fast.kernels import cuda
    from perceiver_fast.kernels.decode import DECODE_BACKEND_ENV_VAR

    missing = cuda.library_status()
    if missing is None and not hasattr(torch.ops.perceiver_fast_cuda, "decode_attention_fwd"):
        missing = "the CUDA extension has no decode_attention_fwd"
    if missing is not None:
        pytest.skip(missing)
    model = _cuda_model(num_channels=128, num_heads=2, abs_pos_emb=False).to(torch.bfloat16)
    if mode == "perceiver-io":
        # Its 80 tokens pass max_seq_len (64), which this mode decodes only with float32 rotary angles
        # (check_perceiver_io_length): the window then slides and the cross cache is compacted under the fused kernel.
        frequencies = model.input_adapter.frq_pos_encoding
        frequencies.inv_freq = frequencies.inv_freq.float()
    schedule = WindowSchedule(64, 16, stride=8 if mode == "strided" else 1)
    make = PerceiverIODecoder if mode == "perceiver-io" else CachedDecoder
    backends = ("composite", "cuda")
    decoders = {name: make(copy.deepcopy(model), schedule, 2, cuda_graph=cuda_graph) for name in backends}
    prompt, pad_mask = _prompt(length=40, pads=(0, 3))
    sequence, pads = prompt.cuda(), pad_mask.cuda()
    logits = {}
    for name in backends:
        monkeypatch.setenv(DECODE_BACKEND_ENV_VAR, name)
        logits[name] = decoders[name].start(sequence, pads, 4)
    for step in range(40):
        token = logits["composite"].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        pads = torch.cat([pads, torch.zeros_like(pads[:, :1])], dim=1)
        for name in backends:
            monkeypatch.setenv(DECODE_BACKEND_ENV_VAR, name)
            logits[name] = decoders[name].step(sequence, pads)
        assert max_rel_error(logits["cuda"], logits["composite"]) <= 3e-2, step
