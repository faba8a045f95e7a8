"""Plain (uncached) generation: the documented window schedule, sampling, and parity with perceiver-io's backend."""

import pytest
import torch

from perceiver_fast.generation import SamplingConfig, WindowSchedule, filter_logits
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.generation.test_cache import with_larger_weights
from tests.oracle import max_rel_error
from tests.parity import copy_into, import_perceiver_io

SMALL = dict(num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=12)


def documented_schedule(prompt_len, num_latents, steps, max_seq_len, max_latents):
    """(window start, window end, prefix_len) per step, written from perceiver-io's generate() docstring."""
    prefix_len = prompt_len - min(num_latents, prompt_len)
    out = []
    for step in range(steps):
        total = prompt_len + step
        start = max(0, total - max_seq_len)
        out.append((start, total, prefix_len))
        latents_next = min(total + 1, max_seq_len) - prefix_len
        if latents_next > max_latents and prefix_len < max_seq_len - max_latents:
            prefix_len += 1
    return out


def test_schedule_grows_latents_then_prefix_then_slides():
    schedule = WindowSchedule(max_seq_len=12, max_latents=4)
    window, seen = schedule.initial(5, 2), []
    for _ in range(15):
        seen.append(window)
        window = schedule.advance(window)
    assert [w.num_latents for w in seen][:3] == [2, 3, 4] and {w.num_latents for w in seen[3:]} == {4}
    assert [w.prefix_len for w in seen][:8] == [3, 3, 3, 4, 5, 6, 7, 8]
    assert all(w.length == 12 and w.prefix_len == 8 for w in seen[7:])
    assert [(w.start, w.end, w.prefix_len) for w in seen] == documented_schedule(5, 2, 15, 12, 4)


def test_strided_schedule_hands_over_stride_latents_at_once():
    schedule = WindowSchedule(max_seq_len=12, max_latents=4, stride=2)
    window, seen = schedule.initial(4, 4), []
    for _ in range(14):
        window = schedule.advance(window)
        seen.append((window.length, window.prefix_len, window.num_latents))
        assert window.prefix_len <= schedule.max_prefix_len and window.length <= 12
    assert [n for _, _, n in seen] == [3, 4] * 7
    assert [p for _, p, _ in seen][:8] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert seen[-1] == (12, 8, 4) and seen[-2] == (11, 8, 3)


@pytest.mark.parametrize(
    "prompt_len, num_latents, match",
    [
        (0, 1, "prompt length"),
        (13, 4, "prompt length"),
        (5, 0, "num_latents"),
        (5, 5, "num_latents"),
        (12, 2, "\\[4..4\\]"),
    ],
)
def test_schedule_rejects_out_of_range(prompt_len, num_latents, match):
    with pytest.raises(ValueError, match=match):
        WindowSchedule(max_seq_len=12, max_latents=4).initial(prompt_len, num_latents)


@pytest.mark.parity
@pytest.mark.parametrize("prompt_len, num_latents", [(3, 1), (7, 2), (11, 4)])
def test_greedy_tokens_and_logits_equal_a_full_forward_loop_of_perceiver_io(prompt_len, num_latents):
    """Over latents growing, prefix growing and the window sliding, step for step."""
    clm = import_perceiver_io("model.text.clm")
    theirs = clm.CausalLanguageModel(clm.CausalLanguageModelConfig(**SMALL))
    ours, theirs = copy_into(CausalLanguageModel(CausalLanguageModelConfig(**SMALL)), theirs)
    steps = 14
    prompt = torch.randint(6, 262, (2, prompt_len))
    got = ours.generate(prompt, max_new_tokens=steps, num_latents=num_latents)

    sequence = prompt
    for start, end, prefix_len in documented_schedule(prompt_len, num_latents, steps, 12, 4):
        with torch.no_grad():
            expected_logits = theirs(sequence[:, start:end], prefix_len=prefix_len).logits[:, -1]
            our_logits = ours(got[:, start:end], prefix_len=prefix_len).logits[:, -1]
        assert max_rel_error(our_logits, expected_logits) <= 1e-5
        sequence = torch.cat([sequence, expected_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, sequence)


def test_left_padded_batch_equals_one_by_one():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    short, long = torch.randint(6, 262, (1, 3)), torch.randint(6, 262, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    pad_mask = torch.zeros(2, 6, dtype=torch.bool)
    pad_mask[0, :3] = True
    together = model.generate(batch, max_new_tokens=4, num_latents=3, pad_mask=pad_mask)
    alone = [model.generate(p, max_new_tokens=4, num_latents=3) for p in (short, long)]
    assert torch.equal(together[0, 3:], alone[0][0])
    assert torch.equal(together[1], alone[1][0])


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    prompt = torch.randint(6, 262, (2, 4))
    runs = [
        model.generate(prompt, 6, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    logits = torch.randn(3, 50)
    filtered = filter_logits(logits, SamplingConfig(do_sample=True, top_k=5))
    assert (torch.isfinite(filtered).sum(-1) == 5).all()


def test_temperatures_too_small_for_float32_division_sample_the_likeliest_tokens():
    """Logits divided by 1e-40 would overflow to inf and the softmax to NaN: such temperatures sample among the
    largest logits only, which is the limit of sampling as the temperature goes to zero."""
    logits = torch.tensor([[2.0, 5.0, 5.0, -3.0], [40.0, 1.0, 0.0, 0.0]])
    for temperature in (1e-5, 1e-38, 1e-40):
        probs = filter_logits(logits, SamplingConfig(do_sample=True, temperature=temperature)).softmax(-1)
        assert torch.allclose(probs, torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])), temperature
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    prompt = torch.randint(6, 262, (2, 4))
    sampled = model.generate(prompt, 4, do_sample=True, temperature=1e-40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(prompt, 4))
    # above the shift, the logits are divided as they are (transformers' arithmetic, bit for bit)
    logits = torch.randn(3, 50) * 30
    assert torch.equal(filter_logits(logits, SamplingConfig(do_sample=True, temperature=0.7)), logits / 0.7)


def test_a_top_p_below_float32s_smallest_number_keeps_the_likeliest_token():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(do_sample=True, top_p=1e-300)))
    assert kept.tolist() == [[False, True, False]]


@pytest.mark.gpu
def test_a_generator_on_another_device_than_the_model_is_refused_at_the_call():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).cuda()
    with pytest.raises(ValueError, match="cpu generator, the model is on cuda"):
        prompt = torch.zeros(1, 3, dtype=torch.long, device="cuda")
        model.generate(prompt, 2, do_sample=True, generator=torch.Generator())


def test_generating_no_token_returns_a_copy_of_the_prompt():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    prompt = torch.randint(6, 262, (2, 4))
    out = model.generate(prompt, 0)
    assert torch.equal(out, prompt) and out.data_ptr() != prompt.data_ptr()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(do_sample=True, top_p=0.75)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(do_sample=True, top_p=0.1)))
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
        (dict(input_ids=torch.zeros(1, 13, dtype=torch.long)), ValueError, "prompt length"),
        (dict(input_ids=torch.zeros(1, 3)), TypeError, "integer"),
        (dict(num_latents=9), ValueError, "num_latents"),
        (dict(temperature=-1.0, do_sample=True), ValueError, "temperature"),
        (dict(top_p=1.5, do_sample=True), ValueError, "top_p"),
        (dict(top_k=-1, do_sample=True), ValueError, "top_k must be an int >= 0"),
        (dict(pad_token_id=[0, 1]), ValueError, "pad_token_id must be one token id"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(pad_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "all padding"),
        (dict(cache_mode="strided", stride=0), ValueError, "stride"),
        (dict(cache_mode="strided", stride=-2), ValueError, "stride"),
        (dict(input_ids=torch.tensor([[5, 262, 7]])), ValueError, "token id 262, outside"),
        (dict(input_ids=torch.tensor([[5, -1, 7]])), ValueError, "token id -1, outside"),
        (dict(eos_token_id=300), ValueError, "eos_token_id 300"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id -1"),
        (dict(compile_steps=True, use_cache=False), ValueError, "compile_steps .* needs use_cache=True"),
        (dict(compile_steps="yes"), TypeError, "compile_steps must be a bool"),
        (dict(do_sample="no"), TypeError, "do_sample must be a bool"),  # a truthy string would sample
        (dict(use_cache="no"), TypeError, "use_cache must be a bool"),
        (dict(top_p=True, do_sample=True), TypeError, "top_p must be a float"),
        (dict(generator=5, do_sample=True), TypeError, "generator must be a torch.Generator"),
        # with nothing to generate the arguments are still checked
        (dict(max_new_tokens=0, num_latents=9), ValueError, "num_latents"),
        (dict(max_new_tokens=0, input_ids=torch.tensor([[5, 999]])), ValueError, "outside"),
    ],
)
def test_bad_generate_arguments_raise(kwargs, error, match):
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    args = dict(input_ids=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        model.generate(**args)


def _layer_caches(model):
    attentions = [model.cross_attention.attention_module.attention]
    attentions += [layer.attention_module.attention for layer in model.self_attention]
    return [attention.kv_cache for attention in attentions]


@pytest.mark.parametrize("cache_mode", ["exact", "strided", "perceiver-io"])
@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
def test_a_refused_call_leaves_no_decoding_buffers_in_the_model(cache_mode, stream):
    """A bad window is found after the decoder set up the layers' caches: they are freed before the error (a large
    batch or context would otherwise hold the memory, on a GPU until the next generation)."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    call = model.stream if stream else model.generate
    with pytest.raises(ValueError, match="num_latents"):
        call(torch.zeros(2, 5, dtype=torch.long), 4, num_latents=9, cache_mode=cache_mode)
    assert _layer_caches(model) == [None] * 3


@pytest.mark.parametrize("cache_mode", ["exact", "perceiver-io"])
def test_a_stream_holds_decoding_buffers_only_once_started(cache_mode):
    """A stream made and dropped unstarted (a generator never run has no cleanup to run) must not leave the layers'
    caches allocated; they are made at the first token and freed when the stream ends."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    tokens = model.stream(torch.zeros(2, 5, dtype=torch.long), 3, cache_mode=cache_mode)
    assert _layer_caches(model) == [None] * 3
    next(tokens)
    assert None not in _layer_caches(model)
    tokens.close()
    assert _layer_caches(model) == [None] * 3


def test_perceiver_io_mode_refuses_a_single_latent():
    """perceiver-io trims its self-attention cache to the last max_latents - 1 keys with [:, -0:], which keeps them
    all: with one latent its cache grows without bound, which this mode does not reproduce."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**{**SMALL, "max_latents": 1}))
    with pytest.raises(ValueError, match="max_latents >= 2"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, num_latents=1, cache_mode="perceiver-io")
    assert _layer_caches(model) == [None] * 3
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2, num_latents=1, cache_mode="exact")


def test_stream_checks_its_arguments_when_called():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    with pytest.raises(ValueError, match="num_latents"):
        model.stream(torch.zeros(1, 3, dtype=torch.long), 4, num_latents=9)  # no next() needed


def test_eos_token_id_as_a_tensor_and_temperature_zero_is_greedy():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    prompt = torch.randint(6, 262, (2, 5))
    greedy = model.generate(prompt, 6)
    assert torch.equal(model.generate(prompt, 6, do_sample=True, temperature=0.0), greedy)
    first = greedy[:, 5]
    for eos in (first[0], first, first.tolist()):  # a 0-d tensor, a 1-d tensor, a list
        stopped = model.generate(prompt, 6, eos_token_id=eos)
        assert stopped[0, 5] == first[0] and stopped.shape[1] <= greedy.shape[1]


def test_generate_restores_the_training_mode():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).train()
    model.generate(torch.randint(6, 262, (1, 4)), 3)
    assert model.training
    model.eval()
    model.generate(torch.randint(6, 262, (1, 4)), 3)
    assert not model.training


@pytest.mark.parametrize("cache_mode, use_cache", [("exact", True), ("exact", False), ("strided", True),
                                                   ("perceiver-io", True)])
def test_a_stream_decodes_in_eval_mode_whatever_the_caller_sets_between_tokens(cache_mode, use_cache):
    """A training loop that streams samples between its steps puts the model back in training mode: the stream's
    next steps must still run without dropout (prefix dropout, residual dropout), and the caller's mode holds between
    tokens."""
    torch.manual_seed(0)
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(**SMALL, residual_dropout=0.1)).eval())
    prompt = torch.randint(6, 262, (2, 6))
    kwargs = dict(num_latents=2, cache_mode=cache_mode, use_cache=use_cache)
    expected = model.generate(prompt, 12, **kwargs)[:, 6:]
    tokens = []
    for token in model.stream(prompt, 12, **kwargs):
        assert not model.training or tokens  # the stream began in eval mode; from then on the caller's mode holds
        tokens.append(token)
        model.train()  # the training loop's step
        assert model.training
    assert model.training
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_generation_restores_each_modules_own_mode():
    """A model training with a frozen part in eval mode (or one dropout layer kept active in an eval model):
    decoding runs every module in eval mode, and each module gets its own mode back, not the root's."""
    torch.manual_seed(0)
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(**SMALL, residual_dropout=0.1)).eval())
    prompt = torch.randint(6, 262, (2, 6))
    expected = model.generate(prompt, 10, num_latents=2)
    frozen, active = model.cross_attention, model.self_attention[0]
    model.train()
    frozen.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    assert torch.equal(model.generate(prompt, 10, num_latents=2), expected)
    assert {name: module.training for name, module in model.named_modules()} == modes
    tokens = []
    for token in model.stream(prompt, 10, num_latents=2):
        tokens.append(token)
        assert {name: module.training for name, module in model.named_modules()} == modes
    assert torch.equal(torch.stack(tokens, dim=1), expected[:, 6:])
    model.eval()
    active.train()  # e.g. Monte Carlo dropout in one layer: decoding still runs it in eval mode
    assert torch.equal(model.generate(prompt, 10, num_latents=2), expected) and active.training


def test_the_callers_grad_mode_holds_between_streamed_tokens():
    """Gradients are off inside a decoding step, not in the caller's loop between tokens (a training loop that
    streams samples must still record its own graph)."""
    model = CausalLanguageModel(CausalLanguageModelConfig(num_channels=16, num_heads=2, num_self_attention_layers=1,
                                                          max_latents=4, max_seq_len=12))  # fmt: skip
    prompt = torch.randint(6, 262, (1, 6))
    seen = [torch.is_grad_enabled() for _ in model.stream(prompt, 3, num_latents=2)]
    assert seen == [True] * 3 and torch.is_grad_enabled()
    with torch.no_grad():
        assert not any(torch.is_grad_enabled() for _ in model.stream(prompt, 3, num_latents=2))


def test_a_stream_abandoned_until_exit_finalizes_quietly():
    """A stream its caller stops reading is finalized when collected, at the latest at interpreter exit, after
    torch's modules are torn down: nothing may be left to undo then (Python would print the error)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig\n"
        "config = CausalLanguageModelConfig(num_channels=16, num_heads=2, num_self_attention_layers=1,"
        " max_latents=4, max_seq_len=12)\n"
        "model = CausalLanguageModel(config)\n"
        "model.train()\n"
        "tokens = model.stream(torch.randint(6, 262, (1, 6)), 5, num_latents=2)\n"
        "first = next(tokens)\n"
        "assert model.training\n"  # eval mode inside each step only: nothing to undo at exit
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("cache_mode", ["exact", "strided", "perceiver-io"])
def test_interleaved_streams_of_one_model_each_generate_their_own_tokens(cache_mode):
    """Two streams of the same model consumed in turn (two requests served side by side): the layers hold one
    key/value cache each, so each stream's steps must run on its own caches, not on those the other set up last."""
    torch.manual_seed(0)
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(
        num_channels=64, num_heads=4, num_self_attention_layers=2, max_latents=8, max_seq_len=32
    )).eval())  # fmt: skip
    prompts = [torch.randint(6, 262, (2, 12)), torch.randint(6, 262, (2, 14))]
    kwargs = dict(num_latents=4, cache_mode=cache_mode)
    expected = [model.generate(p, 24, **kwargs)[:, p.shape[1] :] for p in prompts]
    streams = [model.stream(p, 24, **kwargs) for p in prompts]
    tokens = [[], []]
    for first, second in zip(*streams):
        tokens[0].append(first)
        tokens[1].append(second)
    for got, want in zip(tokens, expected):
        assert torch.equal(torch.stack(got, dim=1), want)
    assert torch.equal(model.generate(prompts[0], 24, **kwargs)[:, 12:], expected[0])  # and afterwards as before


def test_a_stream_keeps_the_inference_mode_it_was_opened_in():
    """Buffers made under ``torch.inference_mode()`` cannot be updated in place outside it: a stream opened there
    and consumed outside runs its steps in inference mode, one opened outside runs them outside, wherever consumed."""
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(
        num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=16
    )).eval()  # fmt: skip
    prompt = torch.randint(6, 262, (2, 6))
    expected = model.generate(prompt, 12, num_latents=2)[:, 6:]
    for cache_mode in ("exact", "perceiver-io"):
        with torch.inference_mode():
            opened_inside = model.stream(prompt, 12, num_latents=2, cache_mode=cache_mode)
        opened_outside = model.stream(prompt, 12, num_latents=2, cache_mode=cache_mode)
        with torch.inference_mode():
            tokens_inside = list(opened_outside)
        tokens_outside = list(opened_inside)
        assert not any(t.is_inference() for t in tokens_inside) and all(t.is_inference() for t in tokens_outside)
        if cache_mode == "exact":
            assert torch.equal(torch.stack(tokens_inside, dim=1), expected)
            assert torch.equal(torch.stack(tokens_outside, dim=1), expected)


def test_copies_and_pickles_of_a_model_carry_no_decoding_state():
    """``copy.deepcopy(model)`` (an EMA copy, say) and ``torch.save(model)`` while a stream is open or after a
    generation on CUDA left its decoder with the model: the copy gets neither the layers' key/value caches nor the
    held decoder (whose CUDA graphs cannot be copied, and would read the original's buffers)."""
    import copy
    import io
    import pickle

    from perceiver_fast.generation.generate import _HELD_DECODER, _HeldDecoder

    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    stream = model.stream(torch.randint(6, 262, (2, 6)), 4, num_latents=2)
    next(stream)  # the layers now hold this stream's caches
    attentions = [layer.attention_module.attention for layer in (model.cross_attention, *model.self_attention)]
    assert all(attention.kv_cache is not None for attention in attentions)
    model.__dict__[_HELD_DECODER] = _HeldDecoder(("key",), object())  # what generate() keeps on CUDA
    copied = copy.deepcopy(model)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    for other in (copied, loaded, pickle.loads(pickle.dumps(model))):
        assert other.__dict__.get(_HELD_DECODER) is None
        assert all(layer.attention_module.attention.kv_cache is None
                   for layer in (other.cross_attention, *other.self_attention))  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert all(attention.kv_cache is not None for attention in attentions)  # the original keeps its own
    del model.__dict__[_HELD_DECODER]
    assert len(list(stream)) == 3


def _stream_with_an_update_at(model, prompt, update_at, new_tokens, assign=False, **kwargs):
    """Stream ``new_tokens`` tokens, updating every weight after token ``update_at``: in place (an optimizer step,
    say) or by new tensors (``load_state_dict(..., assign=True)``). Returns the tokens ``[b, new_tokens]``."""
    tokens = []
    for i, token in enumerate(model.stream(prompt, new_tokens, **kwargs)):
        tokens.append(token)
        if i == update_at:
            updated = {name: -p if p.dim() > 1 else p + 0.1 for name, p in model.named_parameters()}
            if assign:
                model.load_state_dict(updated, strict=False, assign=True)
            else:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(updated[name])
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("cache_mode", ["exact", "strided"])
@pytest.mark.parametrize("update_at", [1, 5])  # the latents still growing; the window past max_seq_len
@pytest.mark.parametrize("assign", [False, True], ids=["in-place", "assigned"])
def test_a_stream_decodes_with_the_weights_as_they_are_after_an_update(cache_mode, update_at, assign):
    """A training loop that streams samples between its steps updates the weights while the stream is open: the
    next tokens must be those of the updated model (a full forward of the schedule's window), not of keys/values
    cached under the old weights."""
    torch.manual_seed(0)
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    prompt = torch.randint(6, 262, (2, 6))
    kwargs = dict(num_latents=2, cache_mode=cache_mode, assign=assign)
    expected = _stream_with_an_update_at(model, prompt, update_at, 10, use_cache=False, **kwargs)
    model.load_state_dict(state)
    assert torch.equal(_stream_with_an_update_at(model, prompt, update_at, 10, **kwargs), expected)
    model.load_state_dict(state)
    assert not torch.equal(model.generate(prompt, 10, num_latents=2, cache_mode=cache_mode)[:, 6:], expected)


def test_a_perceiver_io_mode_stream_refuses_to_go_on_over_weights_updated_in_place():
    """perceiver-io's cache keeps entries made under older windows, so it has no exact rebuild: a stream in that
    mode says so rather than mixing keys/values of the old weights with new ones."""
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    prompt = torch.randint(6, 262, (1, 6))
    with pytest.raises(RuntimeError, match="weights changed while"):
        _stream_with_an_update_at(model, prompt, 1, 6, num_latents=2, cache_mode="perceiver-io")


def test_a_stream_refuses_to_go_on_after_its_model_changed_dtype():
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    tokens = model.stream(torch.randint(6, 262, (1, 6)), 6, num_latents=2)
    next(tokens)
    model.double()
    with pytest.raises(RuntimeError, match="dtype or device"):
        next(tokens)


@pytest.mark.parametrize("cache_mode", ["exact", "strided", "perceiver-io"])
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_a_stream_whose_weights_stay_as_they_are_never_rebuilds(monkeypatch, cache_mode, abs_pos_emb):
    """Decoding itself must leave the model's parameters and buffers untouched, or every streamed token would pay
    for a rebuild (past max_seq_len, with left pads, sliding in place or not)."""
    from perceiver_fast.generation.generate import CachedDecoder, PerceiverIODecoder

    for decoder in (CachedDecoder, PerceiverIODecoder):
        monkeypatch.setattr(decoder, "rebuild", lambda *_: pytest.fail("rebuilt although no weight changed"))
    torch.manual_seed(0)
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)).eval()
    prompt = torch.randint(6, 262, (2, 6))
    pad_mask = torch.arange(6).expand(2, 6) < torch.tensor([[0], [3]])
    assert len(list(model.stream(prompt, 12, num_latents=2, cache_mode=cache_mode, pad_mask=pad_mask))) == 12


# ---------------------------------------------------------------- transformers' defaults, as perceiver-io's generate


def _first_token_ranks(model, prompt, how, **sampling):
    """Ranks (0 = likeliest) of the first token sampled for 2000 copies of the one-row ``prompt``."""
    batch, generator = prompt.expand(2000, -1).contiguous(), torch.Generator().manual_seed(0)
    if how == "generate":
        tokens = model.generate(batch, 1, do_sample=True, generator=generator, **sampling)[:, -1]
    else:
        tokens = next(model.stream(batch, 1, do_sample=True, generator=generator, **sampling))
    with torch.no_grad():
        logits = model(prompt, prefix_len=prompt.shape[1] - 1).logits[0, -1]
    return logits.argsort(descending=True).argsort()[tokens]


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_sampling_keeps_the_50_likeliest_tokens_by_default_and_top_k_0_or_none_keeps_all(how):
    """transformers' GenerationConfig has top_k=50: perceiver-io's do_sample=True never draws past the 50th token."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()  # near-uniform logits: every rank drawn
    prompt = torch.randint(6, 262, (1, 5))
    assert set(_first_token_ranks(model, prompt, how).tolist()) == set(range(50))
    for no_filter in (0, None):
        assert int(_first_token_ranks(model, prompt, how, top_k=no_filter).max()) >= 50
    assert SamplingConfig().top_k == 50
    assert torch.isfinite(filter_logits(torch.randn(2, 80), SamplingConfig(do_sample=True, top_k=0))).all()


def test_finished_rows_continue_with_the_first_eos_id_unless_pad_token_id_is_given():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    prompt = torch.randint(6, 262, (2, 5))
    eos = int(model.generate(prompt, 1)[0, -1])  # row 0 stops at once; row 1 goes on
    stops = [eos, 3]  # the first, not the smallest, fills (as transformers' eos_token_id[0])
    stopped = model.generate(prompt, 8, eos_token_id=stops)
    assert stopped.shape[1] > 6 and (stopped[0, 5:] == eos).all()
    assert (model.generate(prompt, 8, eos_token_id=stops, pad_token_id=1)[0, 6:] == 1).all()


def test_pad_token_id_marks_the_prompts_pads_when_no_pad_mask_is_given():
    """transformers' rule: pads where input_ids == pad_token_id, unless that id is a stop token or is absent."""
    model = with_larger_weights(CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval())
    x = torch.randint(6, 262, (2, 8))
    x[1, :3] = 0
    no_pads = torch.zeros_like(x, dtype=torch.bool)
    masked = model.generate(x, 6, pad_mask=x == 0, pad_token_id=0)
    assert not torch.equal(masked, model.generate(x, 6, pad_mask=no_pads, pad_token_id=0))  # the mask matters
    assert torch.equal(model.generate(x, 6, pad_token_id=0), masked)
    assert torch.equal(torch.stack(list(model.stream(x, 6, pad_token_id=0)), dim=1), masked[:, 8:])
    assert torch.equal(model.generate(x, 6), model.generate(x, 6, pad_mask=no_pads))  # no pad id: no pads
    stop_too = dict(pad_token_id=0, eos_token_id=[9, 0])  # a pad id that is a stop token may be a real token
    assert torch.equal(model.generate(x, 6, **stop_too), model.generate(x, 6, pad_mask=no_pads, **stop_too))
    x[0, 4] = 0  # not left padding: the error says where the mask came from and how to override it
    with pytest.raises(ValueError, match=r"inferred from pad_token_id=0 .* left padding.*pass pad_mask"):
        model.generate(x, 2, pad_token_id=0)
    x[0] = 0
    with pytest.raises(ValueError, match="all padding in the pad_mask inferred from pad_token_id=0"):
        model.stream(x, 2, pad_token_id=0)


def _with_their_hf_wrapper(larger_weights=False):
    """Ours and perceiver-io's Hugging Face wrapper (whose generate is transformers') on the same weights."""
    import_perceiver_io("model.text.clm")
    hf = import_perceiver_io("model.text.clm.huggingface")
    config = hf.PerceiverCausalLanguageModelConfig(hf.CausalLanguageModelConfig(**SMALL))
    theirs = hf.PerceiverCausalLanguageModel(config)
    theirs.config.is_decoder = True
    if larger_weights:
        with_larger_weights(theirs)
    ours = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    ours.load_state_dict(theirs.backend_model.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parity
def test_generate_without_top_k_or_pad_token_id_gives_perceiver_ios_tokens():
    """Sampling with and without transformers' default top_k, seeded alike, and stop tokens without a pad id."""
    ours, theirs = _with_their_hf_wrapper()
    prompt = torch.randint(6, 262, (3, 5))
    for sampling in (dict(do_sample=True), dict(do_sample=True, top_k=0), dict()):
        torch.manual_seed(7)
        expected = theirs.generate(prompt, max_new_tokens=6, num_latents=2, **sampling)
        torch.manual_seed(7)
        assert torch.equal(ours.generate(prompt, 6, num_latents=2, cache_mode="perceiver-io", **sampling), expected)
    eos = int(ours.generate(prompt, 2)[0, -1])
    expected = theirs.generate(prompt, max_new_tokens=8, num_latents=2, eos_token_id=[eos, 3])
    assert torch.equal(ours.generate(prompt, 8, num_latents=2, cache_mode="perceiver-io", eos_token_id=[eos, 3]),
                       expected)


@pytest.mark.parity
@pytest.mark.parametrize("special", [dict(pad_token_id=0), dict(pad_token_id=0, eos_token_id=[9, 0]), dict()],
                         ids=["pad-id", "pad-id-is-a-stop-token", "no-pad-id"])
def test_a_prompt_with_pad_ids_and_no_mask_generates_as_perceiver_io(special):
    """transformers infers attention_mask from pad_token_id exactly when ours infers pad_mask."""
    ours, theirs = _with_their_hf_wrapper(larger_weights=True)  # pads attended to visibly change the tokens
    x = torch.randint(6, 262, (2, 10))
    x[1, :4] = 0
    expected = theirs.generate(x, max_new_tokens=8, num_latents=2, **special)
    assert torch.equal(ours.generate(x, 8, num_latents=2, cache_mode="perceiver-io", **special), expected)
