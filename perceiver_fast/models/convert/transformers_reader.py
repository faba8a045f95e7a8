"""Reading ``transformers`` Perceiver models into our configs and weights, for a model class the caller names.

The task models' ``from_transformers`` class methods call these with their own class, so this module imports no task
model: the config classes to build come from the class (``encoder_config_class``, ``decoder_config_class``), and the
model is the class built from that config. :mod:`perceiver_fast.models.convert.transformers` offers them for our
classes by name (``masked_lm_from_transformers`` and friends); what is converted and how is documented there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn as nn

from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.core.loading import set_loaded_dtype

__all__ = [
    "image_classifier",
    "image_classifier_config",
    "masked_lm",
    "masked_lm_config",
    "optical_flow",
    "optical_flow_config",
    "text_classifier",
    "text_classifier_config",
]

M = TypeVar("M", bound=nn.Module)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"cannot convert this transformers Perceiver model: {what}")


def _expect_class(model: nn.Module, name: str) -> None:
    _require(type(model).__name__ == name, f"expected a {name}, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# Sizes read from transformers' PerceiverLayer modules
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerSizes:
    num_heads: int
    qk_channels: int
    v_channels: int
    widening_factor: int
    query_residual: bool


def _layer_sizes(layer: nn.Module) -> _LayerSizes:
    """Sizes of one ``transformers`` ``PerceiverLayer`` (attention + MLP)."""
    attn = layer.attention.self
    dense1 = layer.mlp.dense1
    _require(dense1.out_features % dense1.in_features == 0, "MLP hidden width is not a multiple of its input width")
    return _LayerSizes(
        num_heads=attn.num_heads,
        qk_channels=attn.qk_channels,
        v_channels=attn.v_channels,
        widening_factor=dense1.out_features // dense1.in_features,
        query_residual=layer.attention.use_query_residual,
    )


def _encoder_kwargs(perceiver: nn.Module) -> dict[str, Any]:
    """``EncoderConfig`` fields of a ``transformers`` ``PerceiverModel``'s encoder (one cross-attention, one
    self-attention block applied ``num_blocks`` times with shared weights)."""
    config = perceiver.config
    # Our MLPs use exact GELU; transformers' "gelu" is the same function.
    _require(config.hidden_act == "gelu", f"hidden_act must be 'gelu', got {config.hidden_act!r}")
    encoder = perceiver.encoder
    cross = _layer_sizes(encoder.cross_attention)
    _require(cross.query_residual, "the encoder cross-attention has no query residual (use_query_residual=False)")
    _require(len(encoder.self_attends) > 0, "the encoder has no self-attention layers")
    self_sizes = {_layer_sizes(layer) for layer in encoder.self_attends}
    _require(len(self_sizes) == 1, "the encoder's self-attention layers differ in size")
    (sa,) = self_sizes
    _require(sa.v_channels == config.d_latents,
             f"self-attention v_channels ({sa.v_channels}) must equal d_latents ({config.d_latents})")
    return dict(
        num_cross_attention_heads=cross.num_heads,
        num_cross_attention_qk_channels=cross.qk_channels,
        num_cross_attention_v_channels=cross.v_channels,
        num_cross_attention_layers=1,
        cross_attention_widening_factor=cross.widening_factor,
        num_self_attention_heads=sa.num_heads,
        num_self_attention_qk_channels=sa.qk_channels,
        num_self_attention_v_channels=sa.v_channels,
        num_self_attention_layers_per_block=len(encoder.self_attends),
        num_self_attention_blocks=config.num_blocks,
        first_self_attention_block_shared=True,
        self_attention_widening_factor=sa.widening_factor,
        dropout=config.attention_probs_dropout_prob,
        init_scale=config.initializer_range,
    )


def _decoder_kwargs(config: Any, layer: nn.Module) -> dict[str, Any]:
    """``DecoderConfig`` fields of a ``transformers`` decoding cross-attention layer."""
    sizes = _layer_sizes(layer)
    return dict(
        num_cross_attention_heads=sizes.num_heads,
        num_cross_attention_qk_channels=sizes.qk_channels,
        num_cross_attention_v_channels=sizes.v_channels,
        cross_attention_widening_factor=sizes.widening_factor,
        cross_attention_residual=sizes.query_residual,
        dropout=config.attention_probs_dropout_prob,
        init_scale=config.initializer_range,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Weights: transformers module -> our state-dict keys
# ---------------------------------------------------------------------------------------------------------------------


def _linear(src: nn.Module, dst: str) -> dict[str, torch.Tensor]:
    """Weight (and bias) of a Linear or LayerNorm under our key prefix ``dst``."""
    out = {f"{dst}.weight": src.weight}
    if getattr(src, "bias", None) is not None:
        out[f"{dst}.bias"] = src.bias
    return out


def _layer_weights(src: nn.Module, dst: str, *, cross: bool, residual: bool) -> dict[str, torch.Tensor]:
    """A ``transformers`` ``PerceiverLayer`` as our Cross/SelfAttentionLayer ``dst`` (``[attention, MLP]``)."""
    attn = f"{dst}.0.module" if residual else f"{dst}.0"
    src_attn = src.attention.self
    weights: dict[str, torch.Tensor] = {}
    if cross:
        weights |= _linear(src_attn.layernorm1, f"{attn}.q_norm") | _linear(src_attn.layernorm2, f"{attn}.kv_norm")
    else:
        weights |= _linear(src_attn.layernorm1, f"{attn}.norm")
    weights |= _linear(src_attn.query, f"{attn}.attention.q_proj")
    weights |= _linear(src_attn.key, f"{attn}.attention.k_proj")
    weights |= _linear(src_attn.value, f"{attn}.attention.v_proj")
    weights |= _linear(src.attention.output.dense, f"{attn}.attention.o_proj")
    weights |= _linear(src.layernorm, f"{dst}.1.module.0")
    weights |= _linear(src.mlp.dense1, f"{dst}.1.module.1")
    weights |= _linear(src.mlp.dense2, f"{dst}.1.module.3")
    return weights


def _encoder_weights(perceiver: nn.Module) -> dict[str, torch.Tensor]:
    """Latents, cross-attention and self-attention block of a ``PerceiverModel`` as our encoder (``0.``) keys."""
    encoder = perceiver.encoder
    weights = {"0.latent_provider._query": perceiver.embeddings.latents}
    weights |= _layer_weights(encoder.cross_attention, "0.cross_attn_1", cross=True, residual=True)
    for i, layer in enumerate(encoder.self_attends):
        weights |= _layer_weights(layer, f"0.self_attn_1.{i}", cross=False, residual=True)
    return weights


def _decoder_layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    return _layer_weights(layer, "1.cross_attn", cross=True, residual=layer.attention.use_query_residual)


def _load(model: M, weights: dict[str, torch.Tensor]) -> M:
    """Copy ``weights`` into ``model``: every parameter must be covered, shapes must agree; buffers (Fourier
    features) keep the values ``model`` computed itself. The model takes the source's dtypes (a bf16 model
    converts to a bf16 one)."""
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(weights))
    unexpected = sorted(set(weights) - set(state))
    _require(not missing and not unexpected, f"weights missing for {missing}, no place for {unexpected}")
    for key, value in weights.items():
        _require(state[key].shape == value.shape,
                 f"{key}: transformers has shape {list(value.shape)}, ours {list(state[key].shape)}")
        state[key] = value.detach().clone()
    model.load_state_dict(state, strict=True)
    set_loaded_dtype(model, weights, "auto")
    return model.eval()


def _text_kwargs(model: nn.Module) -> dict[str, Any]:
    preprocessor = model.perceiver.input_preprocessor
    _require(type(preprocessor).__name__ == "PerceiverTextPreprocessor", "expected a text preprocessor")
    return dict(
        vocab_size=preprocessor.embeddings.num_embeddings,
        max_seq_len=preprocessor.position_embeddings.num_embeddings,
        num_input_channels=preprocessor.embeddings.embedding_dim,
    )


def _text_encoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    preprocessor = model.perceiver.input_preprocessor
    weights = _encoder_weights(model.perceiver)
    weights["0.input_adapter.txt_embedding.weight"] = preprocessor.embeddings.weight
    weights["0.input_adapter.pos_embedding.weight"] = preprocessor.position_embeddings.weight
    return weights


def _classification_decoder(model: nn.Module) -> nn.Module:
    """The ``PerceiverBasicDecoder`` inside a ``PerceiverClassificationDecoder``, checked."""
    wrapper = model.perceiver.decoder
    _require(type(wrapper).__name__ == "PerceiverClassificationDecoder", "expected a classification decoder")
    decoder = wrapper.decoder
    _require(decoder.position_encoding_type == "trainable" and isinstance(decoder.positions_projection, nn.Identity)
             and not decoder.concat_preprocessed_input, "decoder queries must be plain trainable embeddings")
    _require(isinstance(decoder.final_layer, nn.Linear), "the classification decoder needs its final projection")
    return decoder


def _classification_decoder_config(model: nn.Module, decoder_config_class: type) -> Any:
    decoder = _classification_decoder(model)
    queries = decoder.output_position_encodings.position_embeddings
    return decoder_config_class(
        num_output_queries=queries.shape[0],
        num_output_query_channels=queries.shape[1],
        num_classes=decoder.final_layer.out_features,
        **_decoder_kwargs(model.config, decoder.decoding_cross_attention),
    )


def _classification_decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    decoder = _classification_decoder(model)
    weights = _decoder_layer_weights(decoder.decoding_cross_attention)
    weights["1.output_query_provider._query"] = decoder.output_position_encodings.position_embeddings
    weights |= _linear(decoder.final_layer, "1.output_adapter.linear")
    return weights


def _io_config(encoder: Any, decoder: Any, config: Any) -> PerceiverIOConfig:
    return PerceiverIOConfig(
        encoder=encoder, decoder=decoder, num_latents=config.num_latents, num_latent_channels=config.d_latents
    )


# ---------------------------------------------------------------------------------------------------------------------
# Masked language model
# ---------------------------------------------------------------------------------------------------------------------


def masked_lm_config(model: nn.Module, model_class: type) -> PerceiverIOConfig:
    """``model_class``'s config (a masked language model's) for a ``transformers.PerceiverForMaskedLM``.

    Its decoder (8 heads, 256 qk channels, no query residual, in ``transformers``) is read from the module; the
    output is tied to the token embedding with a bias, as ours with ``num_output_query_channels=None``.
    """
    _expect_class(model, "PerceiverForMaskedLM")
    decoder = model.perceiver.decoder
    _require(isinstance(decoder.final_layer, nn.Identity), "the MLM decoder must not project its output")
    _require(decoder.position_encoding_type == "trainable" and isinstance(decoder.positions_projection, nn.Identity)
             and not decoder.concat_preprocessed_input, "decoder queries must be plain trainable embeddings")
    text = _text_kwargs(model)
    queries = decoder.output_position_encodings.position_embeddings
    _require(queries.shape[1] == text["num_input_channels"], "decoder queries must be as wide as the token embedding")
    encoder_config = model_class.encoder_config_class(**text, **_encoder_kwargs(model.perceiver))
    decoder_config = model_class.decoder_config_class(
        num_output_query_channels=None,
        vocab_size=text["vocab_size"],
        max_seq_len=queries.shape[0],
        **_decoder_kwargs(model.config, decoder.decoding_cross_attention),
    )
    return _io_config(encoder_config, decoder_config, model.config)


def masked_lm(model: nn.Module, model_class: type[M]) -> M:
    """A ``transformers.PerceiverForMaskedLM`` as a ``model_class`` (a masked language model), in eval mode."""
    ours = model_class(masked_lm_config(model, model_class))
    decoder = model.perceiver.decoder
    weights = _text_encoder_weights(model)
    weights |= _decoder_layer_weights(decoder.decoding_cross_attention)
    weights["1.output_query_provider._query"] = decoder.output_position_encodings.position_embeddings
    weights["1.output_adapter.bias"] = model.embedding_decoder.bias
    return _load(ours, weights)


# ---------------------------------------------------------------------------------------------------------------------
# Text classifier
# ---------------------------------------------------------------------------------------------------------------------


def text_classifier_config(model: nn.Module, model_class: type) -> PerceiverIOConfig:
    """``model_class``'s config (a text classifier's) for a ``transformers.PerceiverForSequenceClassification``."""
    _expect_class(model, "PerceiverForSequenceClassification")
    encoder_config = model_class.encoder_config_class(**_text_kwargs(model), **_encoder_kwargs(model.perceiver))
    decoder_config = _classification_decoder_config(model, model_class.decoder_config_class)
    return _io_config(encoder_config, decoder_config, model.config)


def text_classifier(model: nn.Module, model_class: type[M]) -> M:
    """A ``transformers.PerceiverForSequenceClassification`` as a ``model_class`` (a text classifier), in eval
    mode."""
    ours = model_class(text_classifier_config(model, model_class))
    return _load(ours, _text_encoder_weights(model) | _classification_decoder_weights(model))


# ---------------------------------------------------------------------------------------------------------------------
# Image classifier (Fourier position features)
# ---------------------------------------------------------------------------------------------------------------------


def _fourier(position_encoding: nn.Module) -> tuple[tuple[int, ...], int]:
    """``(max_resolution, num_bands)`` of a ``transformers`` Fourier position encoding ours can reproduce."""
    _require(type(position_encoding).__name__ == "PerceiverFourierPositionEncoding", "expected Fourier positions")
    _require(position_encoding.concat_pos and not position_encoding.sine_only,
             "Fourier features must include the positions and both sine and cosine")
    return tuple(position_encoding.max_resolution), position_encoding.num_bands


def image_classifier_config(model: nn.Module, model_class: type) -> PerceiverIOConfig:
    """``model_class``'s config (an image classifier's) for a ``transformers.PerceiverForImageClassificationFourier``.

    ``transformers`` spaces the Fourier frequencies up to ``max_resolution / 2`` (224 / 2 in that model) whatever
    the image size; ours spaces them up to ``image_size / 2``. So the converted model takes images of exactly
    ``max_resolution`` (224 x 224), the size the checkpoints were trained at.
    """
    _expect_class(model, "PerceiverForImageClassificationFourier")
    preprocessor = model.perceiver.input_preprocessor
    _require(preprocessor.prep_type == "pixels" and preprocessor.spatial_downsample == 1,
             "the image preprocessor must take raw pixels without downsampling")
    _require(preprocessor.concat_or_add_pos == "concat" and isinstance(preprocessor.positions_projection, nn.Identity),
             "position features must be concatenated without projection")
    resolution, num_bands = _fourier(preprocessor.position_embeddings)
    _require(len(resolution) == 2, f"expected a 2-D max_resolution, got {resolution}")
    encoder_config = model_class.encoder_config_class(
        image_shape=(*resolution, preprocessor.in_channels),
        num_frequency_bands=num_bands,
        **_encoder_kwargs(model.perceiver),
    )
    decoder_config = _classification_decoder_config(model, model_class.decoder_config_class)
    config = _io_config(encoder_config, decoder_config, model.config)
    _require(config.decoder.num_output_queries == 1, "the image classifier has exactly one output query")
    return config


def image_classifier(model: nn.Module, model_class: type[M]) -> M:
    """A ``transformers.PerceiverForImageClassificationFourier`` as a ``model_class`` (an image classifier), in
    eval mode."""
    ours = model_class(image_classifier_config(model, model_class))
    return _load(ours, _encoder_weights(model.perceiver) | _classification_decoder_weights(model))


# ---------------------------------------------------------------------------------------------------------------------
# Optical flow
# ---------------------------------------------------------------------------------------------------------------------


def optical_flow_config(model: nn.Module, model_class: type, num_frames: int) -> PerceiverIOConfig:
    """``model_class``'s config (an optical flow model's over ``num_frames`` frames) for a
    ``transformers.PerceiverForOpticalFlow``.

    The mapping is one to one: frame pairs of 3x3 patches are stacked frame-major along channels and projected by
    one Linear (``conv_after_patches``), Fourier features span ``train_size``, and the decoder queries are the
    adapted input. Inputs must be ``train_size`` frames, as in ``transformers`` (it reshapes its output to it).
    """
    _expect_class(model, "PerceiverForOpticalFlow")
    preprocessor = model.perceiver.input_preprocessor
    _require(preprocessor.prep_type == "patches" and preprocessor.spatial_downsample == 1
             and preprocessor.temporal_downsample == num_frames and preprocessor.conv_after_patching,
             "the preprocessor must stack two frames of patches and project them with one Linear")
    _require(preprocessor.concat_or_add_pos == "concat" and isinstance(preprocessor.positions_projection, nn.Identity),
             "position features must be concatenated without projection")
    resolution, num_bands = _fourier(preprocessor.position_embeddings)
    projection = preprocessor.conv_after_patches
    _require(projection.in_features % num_frames == 0, "patch projection input must hold two frames")
    image_shape = tuple(model.perceiver.decoder.output_image_shape)
    _require(image_shape == resolution, f"output shape {image_shape} must equal max_resolution {resolution}")
    flow_decoder = model.perceiver.decoder
    _require(type(flow_decoder).__name__ == "PerceiverOpticalFlowDecoder", "expected an optical flow decoder")
    _require(flow_decoder.output_num_channels == 2, "the flow decoder must predict 2 channels")
    layer = flow_decoder.decoder.decoding_cross_attention
    encoder_config = model_class.encoder_config_class(
        image_shape=image_shape,
        num_patch_input_channels=projection.in_features // num_frames,
        num_patch_hidden_channels=projection.out_features,
        num_frequency_bands=num_bands,
        **_encoder_kwargs(model.perceiver),
    )
    decoder_config = model_class.decoder_config_class(
        image_shape=image_shape,
        rescale_factor=float(flow_decoder.rescale_factor),
        **_decoder_kwargs(model.config, layer),
    )
    return _io_config(encoder_config, decoder_config, model.config)


def optical_flow(model: nn.Module, model_class: type[M], num_frames: int) -> M:
    """A ``transformers.PerceiverForOpticalFlow`` as a ``model_class`` (an optical flow model over ``num_frames``
    frames), in eval mode."""
    ours = model_class(optical_flow_config(model, model_class, num_frames))
    decoder = model.perceiver.decoder.decoder
    weights = _encoder_weights(model.perceiver)
    weights |= _linear(model.perceiver.input_preprocessor.conv_after_patches, "0.input_adapter.linear")
    weights |= _decoder_layer_weights(decoder.decoding_cross_attention)
    weights |= _linear(decoder.final_layer, "1.output_adapter.linear")
    return _load(ours, weights)
