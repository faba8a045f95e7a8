"""Cached decoding: exact and strided modes equal full forwards of their schedules at every step; perceiver-io mode
equals the real package's cached generate token for token."""

import pytest
import torch

from perceiver_fast.generation import (
    CachedDecoder,
    FullForwardDecoder,
    PerceiverIODecoder,
    WindowSchedule,
)
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.oracle import max_rel_error
from tests.parity import import_perceiver_io

SMALL = dict(num_channels=32, num_heads=2, num_self_attention_layers=3, max_latents=4, max_seq_len=12)


def _model(**overrides):
    return CausalLanguageModel(CausalLanguageModelConfig(**{**SMALL, **overrides})).eval()


def with_larger_weights(model):
    """Matrices redrawn at std 0.2, ten times the init scale: near-uniform logits would hide a wrong key, a stale
    latent or a dropout in the greedy tokens. Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    return model


def _prompt(batch=2, length=6, pads=(0, 4)):
    tokens = torch.randint(6, 262, (batch, length))
    pad_mask = torch.arange(length).expand(batch, length) < torch.tensor(pads).unsqueeze(1)
    return tokens, pad_mask


def _drive(decoders, prompt, pad_mask, num_latents, steps):
    """Feed every decoder the same greedy continuation (chosen by the first) and collect per-step logits."""
    sequence, pads = prompt, pad_mask
    logits = [[d.start(sequence, pads, num_latents)] for d in decoders]
    for _ in range(steps):
        token = logits[0][-1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        pads = torch.cat([pads, torch.zeros_like(pads[:, :1])], dim=1)
        for d, out in zip(decoders, logits):
            out.append(d.step(sequence, pads))
    return logits


@pytest.mark.parametrize("abs_pos_emb", [True, False])
@pytest.mark.parametrize("num_latents, pads", [(1, (0, 4)), (4, (0, 4)), (2, (1, 0))])
def test_exact_mode_equals_a_full_forward_at_every_step(abs_pos_emb, num_latents, pads):
    """Latents grow, the prefix grows, the window slides; (4, (0, 4)) starts with pad latents."""
    model = _model(abs_pos_emb=abs_pos_emb, output_norm=True)
    schedule = WindowSchedule(12, 4)
    prompt, pad_mask = _prompt(pads=pads)
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, num_latents, 16
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-5, step


@pytest.mark.parametrize("abs_pos_emb", [True, False])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("num_latents", [2, 4])
@pytest.mark.parametrize("pads", [(0, 5), (3, 5)])
def test_pad_latents_in_every_mode_equal_a_full_forward(abs_pos_emb, stride, num_latents, pads):
    """Rows whose pads reach into the latents, while the latents grow (num_latents < max_latents), the prefix grows
    and the window slides. A pad latent's output is the mean of all values in its window, which every new token
    changes: caching its self-attention keys/values from an earlier step is wrong."""
    model = _model(abs_pos_emb=abs_pos_emb)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=pads)
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, num_latents, 14
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-5, step


@pytest.mark.parametrize("cache_mode", ["exact", "strided"])
def test_short_row_of_a_padded_batch_generates_as_without_cache(cache_mode):
    """A short prompt batched with a long one has pads among its latents for several steps."""
    model = with_larger_weights(_model(max_seq_len=64, max_latents=16, num_channels=64, num_heads=4))
    rows = [list(b"def fibonacci(n):"), list(b"hi")]
    prompt = torch.zeros(2, len(rows[0]), dtype=torch.long)
    prompt[0] = torch.tensor(rows[0]) + 6
    prompt[1, -2:] = torch.tensor(rows[1]) + 6
    pad_mask = torch.zeros_like(prompt, dtype=torch.bool)
    pad_mask[1, :-2] = True
    stride = 4 if cache_mode == "strided" else None
    kwargs = dict(num_latents=8, pad_mask=pad_mask, cache_mode=cache_mode, stride=stride)
    cached = model.generate(prompt, 30, **kwargs)
    uncached = model.generate(prompt, 30, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_strided_mode_equals_a_full_forward_of_its_schedule(stride):
    model = _model()
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=(0, 2))
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, 3, 18
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-5, step


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_a_bf16_model_decodes_like_its_full_forward(abs_pos_emb, stride):
    """``model.to(torch.bfloat16)`` (buffers included: bf16 rotary angles) decodes in every cached mode, within
    bf16 rounding of a full forward per step."""
    model = _model(abs_pos_emb=abs_pos_emb).to(torch.bfloat16)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=(0, 2))
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, 3, 14
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert got.dtype == torch.bfloat16 and max_rel_error(got, expected) <= 3e-2, step
    tokens = model.generate(prompt, 6, num_latents=3, pad_mask=pad_mask, cache_mode="perceiver-io")
    assert tokens.shape == (2, prompt.shape[1] + 6)


@pytest.mark.parametrize("stride", [1, 3])
def test_rotary_only_window_slides_in_place_with_constant_memory(stride, monkeypatch):
    """Past max_seq_len a rotary-only model drops old positions in place, and rebuilds its window once per window
    length only (when its buffers, room for two windows, are full), reallocating nothing."""
    model = _model(abs_pos_emb=False)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=(0, 3))
    full_decoder, cached_decoder = FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)
    buffers = [(t.data_ptr(), t.shape) for t in cached_decoder.cache.state_tensors()]
    prefills = []
    original = cached_decoder.cache.prefill
    monkeypatch.setattr(cached_decoder.cache, "prefill", lambda *a, **k: prefills.append(1) or original(*a, **k))
    full, cached = _drive([full_decoder, cached_decoder], prompt, pad_mask, 2, 40)
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-5, step
    assert len(prefills) <= 1 + (6 + 40 - 12) // 12  # the prompt, then one per window length past max_seq_len
    assert [(t.data_ptr(), t.shape) for t in cached_decoder.cache.state_tensors()] == buffers


def _drive_at_random(decoders, prompt, num_latents, steps, seed=0):
    """Feed every decoder the same random continuation (a random model's greedy path soon repeats itself, which
    hides errors that depend on the token) and collect per-step logits."""
    generator = torch.Generator().manual_seed(seed)
    sequence = prompt
    with torch.no_grad():
        logits = [[d.start(sequence, None, num_latents)] for d in decoders]
        for _ in range(steps):
            token = torch.randint(6, 262, (prompt.shape[0], 1), generator=generator)
            sequence = torch.cat([sequence, token], dim=1)
            for d, out in zip(decoders, logits):
                out.append(d.step(sequence, None))
    return logits


@pytest.mark.parametrize(
    "dtype, steps, tolerance", [(torch.bfloat16, 320, 3e-2), (torch.float16, 320, 5e-3), (torch.float32, 1100, 1e-5)]
)
@pytest.mark.parametrize("stride", [1, 3])
def test_a_long_generation_past_max_seq_len_stays_exact(dtype, steps, tolerance, stride):
    """A full forward sees positions 0..max_seq_len-1 however long the sequence: a window sliding in place must not
    let its positions grow with the sequence. Rotary angles of large positions round differently (bf16/fp16 angles
    round positions past 256 to several units; float32 ones drift by ulps), which sliding in place turned into
    wrong logits after a few hundred tokens."""
    torch.manual_seed(0)
    model = with_larger_weights(_model(abs_pos_emb=False, num_self_attention_layers=1)).to(dtype)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt = torch.randint(6, 262, (1, 8))
    full, cached = _drive_at_random(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 1)], prompt, 2, steps
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= tolerance, step


def test_generate_modes_agree_where_they_must():
    model = _model()
    prompt, pad_mask = _prompt()
    kwargs = dict(num_latents=2, pad_mask=pad_mask, do_sample=True, top_k=20)
    exact = model.generate(prompt, 15, generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = model.generate(prompt, 15, use_cache=False, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(exact, uncached)
    strided = model.generate(prompt, 15, cache_mode="strided", stride=2, generator=torch.Generator().manual_seed(3),
                             **kwargs)
    assert strided.shape == exact.shape


def test_cached_left_padded_batch_equals_one_by_one():
    model = _model(max_seq_len=24, max_latents=6)
    short, long = torch.randint(6, 262, (1, 4)), torch.randint(6, 262, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    pad_mask = torch.zeros(2, 9, dtype=torch.bool)
    pad_mask[0, :5] = True
    together = model.generate(batch, 10, num_latents=4, pad_mask=pad_mask)
    assert torch.equal(together[0, 5:], model.generate(short, 10, num_latents=4)[0])
    assert torch.equal(together[1], model.generate(long, 10, num_latents=4)[0])


@pytest.mark.parity
@pytest.mark.parametrize("num_latents, pads", [(1, 0), (3, 0), (2, 2), (4, 4)])
def test_perceiver_io_mode_reproduces_their_cached_generate(num_latents, pads):
    import_perceiver_io("model.text.clm")
    hf = import_perceiver_io("model.text.clm.huggingface")
    config = hf.PerceiverCausalLanguageModelConfig(hf.CausalLanguageModelConfig(**SMALL))
    theirs = hf.PerceiverCausalLanguageModel(config)
    theirs.config.is_decoder = True
    theirs.eval()
    ours = _model()
    ours.load_state_dict(theirs.backend_model.state_dict(), strict=True)
    prompt, pad_mask = _prompt(pads=(0, pads))
    expected = theirs.generate(
        input_ids=prompt, attention_mask=(~pad_mask).long(), max_new_tokens=20, num_latents=num_latents,
        do_sample=False, use_cache=True, pad_token_id=0,
    )
    got = ours.generate(prompt, 20, num_latents=num_latents, pad_mask=pad_mask if pads else None,
                        cache_mode="perceiver-io")
    assert torch.equal(got, expected)


@pytest.mark.parity
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_perceiver_io_mode_follows_their_cached_decoding_for_windows_on_end(abs_pos_emb):
    """Teacher-forced with random tokens through several window lengths past max_seq_len (where its frame moves,
    and perceiver-io's truncates its caches), with left pads: per-step logits of perceiver-io's own cached loop (the
    one its generate runs)."""
    import_perceiver_io("model.text.clm")
    hf = import_perceiver_io("model.text.clm.huggingface")
    config = {**SMALL, "abs_pos_emb": abs_pos_emb}
    torch.manual_seed(0)
    their_config = hf.PerceiverCausalLanguageModelConfig(hf.CausalLanguageModelConfig(**config))
    theirs = hf.PerceiverCausalLanguageModel(their_config)
    theirs.config.is_decoder = True
    with_larger_weights(theirs.eval())
    ours = _model(abs_pos_emb=abs_pos_emb)
    ours.load_state_dict(theirs.backend_model.state_dict(), strict=True)
    sequence, pad_mask = _prompt(pads=(0, 3))
    decoder = PerceiverIODecoder(ours, WindowSchedule(12, 4), 2)
    generator, past = torch.Generator().manual_seed(1), None
    with torch.no_grad():
        got = decoder.start(sequence, pad_mask, 2)
        for step in range(60):
            mask = torch.cat([~pad_mask, torch.ones(2, sequence.shape[1] - 6, dtype=torch.bool)], dim=1).long()
            inputs = theirs.prepare_inputs_for_generation(
                sequence, past_key_values=past, attention_mask=mask, use_cache=True, prefix_len=4
            )
            out = theirs(**inputs)
            past = out.past_key_values
            assert max_rel_error(got, out.logits[:, -1]) <= 1e-5, step
            sequence = torch.cat([sequence, torch.randint(6, 262, (2, 1), generator=generator)], dim=1)
            got = decoder.step(sequence, None)


def test_perceiver_io_mode_keeps_rotary_positions_within_two_windows(monkeypatch):
    """Positions of ever larger angles round ever more coarsely: past max_seq_len the frame follows the window."""
    model = _model(abs_pos_emb=False)
    encoding = model.input_adapter.frq_pos_encoding
    largest = []
    real_forward = type(encoding).forward
    monkeypatch.setattr(
        type(encoding), "forward", lambda self, pos: largest.append(int(pos.max())) or real_forward(self, pos)
    )
    tokens = model.generate(torch.randint(6, 262, (2, 6)), 100, num_latents=2, cache_mode="perceiver-io")
    assert tokens.shape == (2, 106) and 12 <= max(largest) < 2 * 12


def test_perceiver_io_mode_with_bf16_angles_stops_at_max_seq_len():
    """bf16 angles round each position differently, and perceiver-io rotates every key anew each step: past
    max_seq_len a cache that rotates keys once cannot give its tokens, and says so before generating."""
    model = _model().to(torch.bfloat16)
    prompt = torch.randint(6, 262, (1, 6))
    assert model.generate(prompt, 7, num_latents=2, cache_mode="perceiver-io").shape == (1, 13)  # 12 fed back
    with pytest.raises(ValueError, match="past max_seq_len .* float32 rotary angles"):
        model.generate(prompt, 8, num_latents=2, cache_mode="perceiver-io")
    assert model.generate(prompt, 8, num_latents=2).shape == (1, 14)  # exact mode rebuilds as it slides


def test_perceiver_io_mode_is_stale_once_latents_are_full():
    """Its logits leave a full forward's after the latents fill up: why exact mode exists."""
    model = _model()
    schedule = WindowSchedule(12, 4)
    prompt, pad_mask = _prompt(pads=(0, 0))
    full, stale = _drive(
        [FullForwardDecoder(model, schedule), PerceiverIODecoder(model, schedule, 2)], prompt, pad_mask, 1, 12
    )
    errors = [max_rel_error(s, f) for s, f in zip(stale, full)]
    assert max(errors[:3]) <= 1e-5  # latents still growing: nothing stale yet
    assert max(errors[4:]) > 1e-3


def test_stop_tokens_streaming_and_threshold():
    model = _model()
    prompt, _ = _prompt(pads=(0, 0))
    first = model.generate(prompt, 1)[:, -1]
    stopped = model.generate(prompt, 10, eos_token_id=first.tolist(), pad_token_id=0)
    assert stopped.shape[1] == prompt.shape[1] + 1  # every row stopped at once
    streamed = torch.stack(list(model.stream(prompt, 5)), dim=1)
    assert torch.equal(streamed, model.generate(prompt, 5)[:, -5:])
    sampled = model.generate(prompt, 5, threshold=0.9, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, prompt.shape[1] + 5)
    with pytest.raises(ValueError, match="threshold"):
        model.generate(prompt, 2, threshold=1.0)
    # threshold replaces the default top_k, and None (the default before it was 50); a chosen top_k is refused.
    assert torch.equal(model.generate(prompt, 5, threshold=0.9, top_k=None, generator=torch.Generator().manual_seed(0)),
                       sampled)  # fmt: skip
    for chosen in (50, 0, 10):
        with pytest.raises(ValueError, match="give top_k or threshold, not both"):
            model.generate(prompt, 2, threshold=0.9, top_k=chosen)
    with pytest.raises(ValueError, match="cache_mode"):
        model.generate(prompt, 2, cache_mode="fast")
    with pytest.raises(ValueError, match="stride"):
        model.generate(prompt, 2, stride=2)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(prompt, 2, pad_mask=torch.tensor([[False] * 5 + [True]] * 2))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_mode", ["exact", "strided"])
def test_cached_generation_equals_full_forwards_on_cuda(cache_mode):
    """The same claim on a GPU, where auto dispatch runs the compiled kernels (split-KV decode included)."""
    model = _model(max_seq_len=64, max_latents=16).cuda()
    stride = 1 if cache_mode == "exact" else 8
    schedule = WindowSchedule(64, 16, stride=stride)
    prompt, pad_mask = _prompt(length=40, pads=(0, 7))
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt.cuda(), pad_mask.cuda(), 4, 40
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got, expected) <= 1e-4, step


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_decoding_under_autocast_equals_a_full_forward_under_autocast(abs_pos_emb, stride):
    """An fp32 model run under bf16 autocast (mixed-precision training's setting) decodes in every cached mode: its
    caches hold what autocast's projections give, and each step is within bf16 rounding of a full forward."""
    model = _model(abs_pos_emb=abs_pos_emb)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=(0, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, cached = _drive(
            [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, 3, 14
        )
        pio = PerceiverIODecoder(model, schedule, 2)
        pio_logits = [pio.start(prompt, pad_mask, 3), pio.step(torch.cat([prompt, prompt[:, -1:]], 1), None)]
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert max_rel_error(got.float(), expected.float()) <= 3e-2, step
    assert all(torch.isfinite(logits).all() for logits in pio_logits)


@pytest.mark.parametrize("cache_mode", ["exact", "strided", "perceiver-io"])
def test_generate_under_autocast_keeps_its_precision_between_streamed_tokens(cache_mode):
    """``generate`` and ``stream`` started under autocast decode every step under it, even when the caller iterates
    the stream outside the autocast block; the tokens equal those of a generation wholly inside it."""
    model = _model(max_seq_len=32, max_latents=8)
    prompt, _ = _prompt(length=10)
    kwargs = dict(num_latents=4, cache_mode=cache_mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.generate(prompt, 12, **kwargs)
        stream = model.stream(prompt, 12, **kwargs)
    streamed = torch.stack(list(stream), dim=1)
    assert torch.equal(streamed, expected[:, prompt.shape[1] :])
