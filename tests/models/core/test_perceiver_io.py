"""PerceiverEncoder / PerceiverDecoder / PerceiverIO: perceiver-io's weight sharing and keys, our checks."""

import pytest
import torch

from perceiver_fast.models import core as ours_core
from perceiver_fast.models.core import (
    ClassificationOutputAdapter,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    TokenInputAdapter,
    TrainableQueryProvider,
)
from perceiver_fast.models.core.io_config import sub_config_from_dict
from perceiver_fast.models.vision.image_classifier import ImageEncoderConfig
from tests.models.core.io_parity import perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into, import_perceiver_io

VOCAB, SEQ, CHANNELS, LATENTS, LATENT_CHANNELS = 40, 12, 16, 6, 24

SHARING = {
    "one-block": dict(num_cross_attention_layers=1, num_self_attention_blocks=1),
    "shared-blocks": dict(num_cross_attention_layers=1, num_self_attention_blocks=3),
    "extra-block-and-cross": dict(
        num_cross_attention_layers=2, num_self_attention_blocks=3, first_self_attention_block_shared=False
    ),
    "shared-cross": dict(
        num_cross_attention_layers=3, num_self_attention_blocks=3, first_cross_attention_layer_shared=True
    ),
}


def _build(core, **encoder_kwargs):
    """A small PerceiverIO from ``core`` (theirs or ours): token input, one learned query, class logits."""
    encoder = core.PerceiverEncoder(
        core.TokenInputAdapter(VOCAB, SEQ, CHANNELS),
        num_latents=LATENTS,
        num_latent_channels=LATENT_CHANNELS,
        num_cross_attention_heads=2,
        num_self_attention_heads=4,
        num_self_attention_layers_per_block=2,
        num_cross_attention_qk_channels=8,
        num_cross_attention_v_channels=12,
        **encoder_kwargs,
    )
    decoder = core.PerceiverDecoder(
        core.ClassificationOutputAdapter(num_classes=5, num_output_query_channels=10),
        core.TrainableQueryProvider(num_queries=1, num_query_channels=10),
        num_latent_channels=LATENT_CHANNELS,
        num_cross_attention_heads=2,
    )
    return core.PerceiverIO(encoder, decoder)


@pytest.mark.parity
@pytest.mark.parametrize("name", SHARING)
def test_weight_sharing_keys_and_outputs_match_perceiver_io(name):
    theirs_core = import_perceiver_io("model.core")
    theirs = perturb_parameters(_build(theirs_core, **SHARING[name]))
    ours = _build(ours_core, **SHARING[name])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours, theirs = copy_into(ours, theirs)
    x = torch.randint(0, VOCAB, (3, SEQ))
    pad_mask = torch.arange(SEQ).expand(3, SEQ) >= torch.tensor([[SEQ], [7], [0]])  # last row: all padding
    with torch.no_grad():
        for mask in (None, pad_mask):
            expected = theirs.decoder(theirs.encoder(x, pad_mask=mask))
            got = ours.decoder(ours.encoder(x, pad_mask=mask))
            assert max_rel_error(got, expected) <= 1e-5


def _small_io(**encoder_kwargs) -> PerceiverIO:
    return _build(ours_core, **encoder_kwargs)


def test_sequential_layout_and_shapes():
    model = _small_io(num_self_attention_blocks=2, first_self_attention_block_shared=False).eval()
    assert model.encoder is model[0] and model.decoder is model[1]
    assert hasattr(model.encoder, "self_attn_n") and not hasattr(model.encoder, "cross_attn_n")
    x = torch.randint(0, VOCAB, (2, SEQ))
    latents, adapted = model.encoder(x, return_adapted_input=True)
    assert latents.shape == (2, LATENTS, LATENT_CHANNELS) and adapted.shape == (2, SEQ, CHANNELS)
    assert model.decoder(latents).shape == (2, 5)


def test_padding_changes_only_what_it_masks():
    model = _small_io().eval()
    x = torch.randint(0, VOCAB, (2, SEQ))
    right = torch.arange(SEQ).expand(2, SEQ) >= 8
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
    with torch.no_grad():
        assert torch.allclose(model.encoder(x, pad_mask=right), model.encoder(changed, pad_mask=right))
        assert not torch.allclose(model.encoder(x), model.encoder(changed))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_cross_attention_layers=0), "num_cross_attention_layers"),
        (dict(num_self_attention_blocks=0), "num_self_attention_blocks"),
        (dict(num_cross_attention_layers=2, num_self_attention_blocks=1), "must be <="),
    ],
)
def test_bad_encoder_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerceiverEncoder(TokenInputAdapter(VOCAB, SEQ, CHANNELS), LATENTS, LATENT_CHANNELS, **kwargs)


@pytest.mark.parametrize(
    "pad_mask, error, match",
    [
        (torch.zeros(2, SEQ), TypeError, "bool"),
        (torch.zeros(2, SEQ - 1, dtype=torch.bool), ValueError, "shape"),
        (torch.tensor([[False, True] * (SEQ // 2)] * 2), ValueError, "start and/or end"),
    ],
)
def test_bad_pad_mask_raises(pad_mask, error, match):
    model = _small_io()
    with pytest.raises(error, match=match):
        model.encoder(torch.randint(0, VOCAB, (2, SEQ)), pad_mask=pad_mask)


def test_decoder_rejects_bad_latents():
    model = _small_io()
    with pytest.raises(ValueError, match="x_latent"):
        model.decoder(torch.zeros(LATENTS, LATENT_CHANNELS))


def test_activation_checkpointing_gives_the_same_gradients():
    plain = _small_io(num_self_attention_blocks=2)
    checkpointed = _small_io(num_self_attention_blocks=2, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.encoder.cross_attn_1.activation_checkpointing
    assert all(layer.activation_checkpointing for layer in checkpointed.encoder.self_attn_1)
    x = torch.randint(0, VOCAB, (2, SEQ))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.decoder(model.encoder(x)).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        assert torch.allclose(grads[1][key], grad, atol=1e-6), key


def test_decoder_expands_learned_queries_to_the_batch():
    decoder = PerceiverDecoder(
        ClassificationOutputAdapter(num_classes=3, num_output_query_channels=8),
        TrainableQueryProvider(num_queries=1, num_query_channels=8),
        num_latent_channels=LATENT_CHANNELS,
        num_cross_attention_heads=2,
    )
    assert decoder(torch.randn(4, LATENTS, LATENT_CHANNELS)).shape == (4, 3)


def test_sub_config_from_dict_restores_tuples_and_rejects_unknown_fields():
    config = sub_config_from_dict(ImageEncoderConfig, {"image_shape": [8, 8, 3], "num_frequency_bands": 4})
    assert config.image_shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown ImageEncoderConfig fields"):
        sub_config_from_dict(ImageEncoderConfig, {"image_size": 8})
