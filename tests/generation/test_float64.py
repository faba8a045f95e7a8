"""A float64 model (``model.double()``) decodes in every cache mode, in float64 throughout: the decoding step, the
caches and the partial softmax results of exact mode."""

import pytest
import torch

from perceiver_fast.generation import CachedDecoder, FullForwardDecoder, WindowSchedule
from perceiver_fast.kernels.decode import decode_attention
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.generation.test_cache import _drive, _prompt, with_larger_weights
from tests.oracle import attention_oracle, max_rel_error, rotary_oracle
from tests.parity import import_perceiver_io

SMALL = dict(num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=12)
# Far below float32's rounding (about 1e-7 relative): a step that rounds anywhere through float32 fails it.
FP64_TOL = 1e-12


def _double_model(**overrides):
    model = CausalLanguageModel(CausalLanguageModelConfig(**{**SMALL, **overrides}))
    return with_larger_weights(model).double().eval()


def test_the_decoding_step_of_float64_inputs_is_float64():
    """The composite step with a float64 model's float64 rotary angles: out and lse in float64, as the oracle."""
    generator = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = make(2, 1, 4, 16), make(2, 1, 2, 16), make(2, 1, 2, 8)
    k_cache, v_cache = make(2, 2, 20, 16).transpose(1, 2), make(2, 2, 20, 8).transpose(1, 2)
    angles = (torch.rand(2, 4, generator=generator, dtype=torch.float64) * 40).repeat_interleave(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    kv_start, kv_len = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([12, 18], dtype=torch.int32)
    position = kv_len.long() - 1
    keys, values = k_cache.clone(), v_cache.clone()
    keys[torch.arange(2), position] = rotary_oracle(k, cos, sin)[:, 0]
    values[torch.arange(2), position] = v[:, 0]
    expected, expected_lse = attention_oracle(
        rotary_oracle(q, cos, sin), keys, values, kv_start=kv_start, kv_len=kv_len
    )
    with torch.no_grad():
        out, lse = decode_attention(
            q, k, v, k_cache, v_cache, position, kv_start=kv_start, kv_len=kv_len, cos=cos, sin=sin, return_lse=True
        )
    assert out.dtype == lse.dtype == torch.float64
    assert max_rel_error(out, expected) <= FP64_TOL and max_rel_error(lse, expected_lse) <= FP64_TOL
    assert max_rel_error(k_cache, keys) <= FP64_TOL and torch.equal(v_cache, values)


@pytest.mark.parametrize("abs_pos_emb", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_float64_model_decodes_as_its_full_forward_in_float64(abs_pos_emb, stride):
    """Every step's logits equal a full forward's to float64 precision: the exact cache's partial softmax results
    (kept per latent between steps) are float64 too. The window slides past max_seq_len."""
    model = _double_model(abs_pos_emb=abs_pos_emb)
    schedule = WindowSchedule(12, 4, stride=stride)
    prompt, pad_mask = _prompt(pads=(0, 3))
    full, cached = _drive(
        [FullForwardDecoder(model, schedule), CachedDecoder(model, schedule, 2)], prompt, pad_mask, 2, 14
    )
    for step, (expected, got) in enumerate(zip(full, cached)):
        assert got.dtype == torch.float64 and max_rel_error(got, expected) <= FP64_TOL, step


@pytest.mark.parametrize("cache_mode, stride", [("exact", None), ("strided", 2)])
def test_a_float64_model_generates_the_tokens_of_uncached_generation(cache_mode, stride):
    model = _double_model()
    prompt, pad_mask = _prompt(pads=(0, 3))
    kwargs = dict(num_latents=2, pad_mask=pad_mask, cache_mode=cache_mode, stride=stride)
    cached = model.generate(prompt, 16, **kwargs)
    assert torch.equal(cached, model.generate(prompt, 16, use_cache=False, **kwargs))


def test_a_float64_model_generates_in_perceiver_io_mode():
    """perceiver-io's cache is stale once the latents are full (see test_cache.py); until then its tokens are those
    of uncached generation."""
    model = _double_model()
    prompt, pad_mask = _prompt(pads=(0, 3))
    kwargs = dict(num_latents=1, pad_mask=pad_mask)
    tokens = model.generate(prompt, 14, cache_mode="perceiver-io", **kwargs)  # past max_seq_len: its frame moves
    assert tokens.shape == (2, prompt.shape[1] + 14)
    fresh = SMALL["max_latents"] - 1  # steps before the latents are full
    assert torch.equal(tokens[:, : prompt.shape[1] + fresh], model.generate(prompt, fresh, use_cache=False, **kwargs))


@pytest.mark.parity
def test_perceiver_io_mode_of_a_float64_model_reproduces_their_float64_cached_generate():
    import_perceiver_io("model.text.clm")
    hf = import_perceiver_io("model.text.clm.huggingface")
    config = hf.PerceiverCausalLanguageModelConfig(hf.CausalLanguageModelConfig(**SMALL))
    theirs = hf.PerceiverCausalLanguageModel(config)
    theirs.config.is_decoder = True
    with_larger_weights(theirs).double().eval()
    ours = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).double().eval()
    ours.load_state_dict(theirs.backend_model.state_dict(), strict=True)
    prompt, pad_mask = _prompt(pads=(0, 2))
    expected = theirs.generate(
        input_ids=prompt, attention_mask=(~pad_mask).long(), max_new_tokens=16, num_latents=2, do_sample=False,
        use_cache=True, pad_token_id=0,
    )  # fmt: skip
    got = ours.generate(prompt, 16, num_latents=2, pad_mask=pad_mask, cache_mode="perceiver-io")
    assert torch.equal(got, expected)
