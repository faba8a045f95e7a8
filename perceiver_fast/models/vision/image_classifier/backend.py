"""Perceiver IO image classifier: ``perceiver.model.vision.image_classifier`` -> here.

Pixels (channels last) are concatenated with Fourier features of their grid position and cross-attended by the
latents; one learned output query decodes the class logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from perceiver_fast.models.convert import transformers_reader
from perceiver_fast.models.core.adapter import InputAdapter
from perceiver_fast.models.core.config import ClassificationDecoderConfig, EncoderConfig, PerceiverIOConfig
from perceiver_fast.models.core.io_config import PerceiverIOPretrainedMixin
from perceiver_fast.models.core.perceiver_io import PerceiverEncoder, PerceiverIO, classification_decoder
from perceiver_fast.models.core.position import FourierPositionEncoding
from perceiver_fast.models.core.registry import register_model_type


@dataclass
class ImageEncoderConfig(EncoderConfig):
    image_shape: tuple[int, int, int] = (224, 224, 3)
    num_frequency_bands: int = 32


ImageClassifierConfig = PerceiverIOConfig[ImageEncoderConfig, ClassificationDecoderConfig]

# perceiver-io's name for the image encoder.
ImageEncoder = PerceiverEncoder


class ImageInputAdapter(InputAdapter):
    """``[b, *spatial, c]`` pixels -> ``[b, prod(spatial), c + position channels]`` (pixels, then Fourier features)."""

    def __init__(self, image_shape: tuple[int, ...], num_frequency_bands: int):
        *spatial_shape, num_image_channels = image_shape
        position_encoding = FourierPositionEncoding(input_shape=spatial_shape, num_frequency_bands=num_frequency_bands)
        super().__init__(num_input_channels=num_image_channels + position_encoding.num_position_encoding_channels())
        self.image_shape = tuple(image_shape)
        self.position_encoding = position_encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape [batch, *{list(self.image_shape)}] (channels last), got "
                             f"{list(getattr(x, 'shape', [type(x).__name__]))}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating point tensor, got {x.dtype}")
        b = x.shape[0]
        # No cast: torch.cat promotes fp16/bf16 images to the position features' fp32, as in perceiver-io (a model
        # with fp32 weights takes them), and a bf16 model's bf16 features leave bf16 images as they are.
        x_pos = self.position_encoding(b)
        return torch.cat([x.reshape(b, -1, self.image_shape[-1]), x_pos], dim=-1)


@register_model_type("perceiver-io-image-classifier", "PerceiverImageClassifier", "LitImageClassifier")
class ImageClassifier(PerceiverIOPretrainedMixin, PerceiverIO):
    """Images ``[b, h, w, c]`` -> class logits ``[b, num_classes]``.

    The cross-attention's qk width defaults to the adapted input width (pixels + position features), as in
    perceiver-io; the decoder always has one output query.
    """

    config_class = ImageClassifierConfig
    encoder_config_class = ImageEncoderConfig
    decoder_config_class = ClassificationDecoderConfig

    def __init__(self, config: PerceiverIOConfig):
        input_adapter = ImageInputAdapter(
            image_shape=config.encoder.image_shape,
            num_frequency_bands=config.encoder.num_frequency_bands,
        )
        encoder_kwargs = config.encoder.base_kwargs()
        if encoder_kwargs["num_cross_attention_qk_channels"] is None:
            encoder_kwargs["num_cross_attention_qk_channels"] = input_adapter.num_input_channels
        encoder = PerceiverEncoder(
            input_adapter=input_adapter,
            num_latents=config.num_latents,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
            **encoder_kwargs,
        )
        decoder = classification_decoder(config, num_output_queries=1)
        super().__init__(encoder, decoder)
        self.config = config

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits for images ``x [b, *image_shape]``; ``pad_mask [b, h*w]`` (True = pad) is rarely needed."""
        return self.decoder(self.encoder(x, pad_mask=pad_mask))

    @classmethod
    def from_transformers(cls, model: nn.Module) -> ImageClassifier:
        """Convert a ``transformers.PerceiverForImageClassificationFourier`` (config and weights); see
        :func:`perceiver_fast.models.convert.transformers.image_classifier_from_transformers`. It takes images
        channels first, this model channels last."""
        return transformers_reader.image_classifier(model, cls)
