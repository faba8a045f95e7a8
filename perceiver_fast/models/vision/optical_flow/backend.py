"""Perceiver IO optical flow: ``perceiver.model.vision.optical_flow`` -> here.

Two frames of 3x3 patches (``num_patch_input_channels = 27`` per pixel) are projected per pixel, concatenated with
Fourier features of the pixel grid and encoded; the decoder queries the latents with the adapted input itself (one
query per pixel) and predicts a 2-channel flow field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from perceiver_fast.models.convert import transformers_reader
from perceiver_fast.models.core.adapter import InputAdapter, OutputAdapter, QueryProvider
from perceiver_fast.models.core.config import DecoderConfig, EncoderConfig, PerceiverIOConfig
from perceiver_fast.models.core.io_config import PerceiverIOPretrainedMixin
from perceiver_fast.models.core.perceiver_io import PerceiverDecoder, PerceiverEncoder, PerceiverIO
from perceiver_fast.models.core.position import FourierPositionEncoding
from perceiver_fast.models.core.registry import register_model_type


@dataclass
class OpticalFlowEncoderConfig(EncoderConfig):
    image_shape: tuple[int, int] = (368, 496)
    num_patch_input_channels: int = 27
    num_patch_hidden_channels: int = 64
    num_frequency_bands: int = 64


@dataclass
class OpticalFlowDecoderConfig(DecoderConfig):
    image_shape: tuple[int, int] = (368, 496)
    rescale_factor: float = 100.0


OpticalFlowConfig = PerceiverIOConfig[OpticalFlowEncoderConfig, OpticalFlowDecoderConfig]

NUM_FRAMES = 2  # the model compares a pair of frames


class OpticalFlowInputAdapter(InputAdapter):
    """``[b, 2, c, h, w]`` frame patches -> ``[b, h*w, num_patch_hidden_channels + position channels]``."""

    def __init__(
        self,
        image_shape: tuple[int, int],
        num_patch_input_channels: int,
        num_patch_hidden_channels: int,
        num_frequency_bands: int,
    ):
        position_encoding = FourierPositionEncoding(input_shape=image_shape, num_frequency_bands=num_frequency_bands)
        super().__init__(num_patch_hidden_channels + position_encoding.num_position_encoding_channels())
        self.image_shape = tuple(image_shape)
        self.num_patch_input_channels = num_patch_input_channels
        self.linear = nn.Linear(NUM_FRAMES * num_patch_input_channels, num_patch_hidden_channels)
        self.position_encoding = position_encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (NUM_FRAMES, self.num_patch_input_channels, *self.image_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [batch, *{list(expected)}] (frames, patch channels, height, "
                             f"width), got {list(getattr(x, 'shape', [type(x).__name__]))}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        b = x.shape[0]
        # Frames go into the channel axis frame-major: [b, h, w, (t c)].
        x = x.permute(0, 3, 4, 1, 2).reshape(b, *self.image_shape, -1)
        x = self.linear(x).reshape(b, -1, self.linear.out_features)
        return torch.cat([x, self.position_encoding(b).to(x.dtype)], dim=-1)


class OpticalFlowOutputAdapter(OutputAdapter):
    """``[b, h*w, c]`` -> flow ``[b, h, w, num_output_image_channels]``, divided by ``rescale_factor``."""

    def __init__(
        self,
        image_shape: tuple[int, int],
        num_output_query_channels: int,
        num_output_image_channels: int = 2,
        rescale_factor: float = 100.0,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.rescale_factor = rescale_factor
        self.linear = nn.Linear(num_output_query_channels, num_output_image_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x) / self.rescale_factor
        return x.reshape(x.shape[0], *self.image_shape, x.shape[-1])


class OpticalFlowQueryProvider(nn.Module, QueryProvider):
    """The decoder's queries are the encoder's adapted input (one query per pixel)."""

    def __init__(self, num_query_channels: int):
        super().__init__()
        self._num_query_channels = num_query_channels

    @property
    def num_query_channels(self) -> int:
        return self._num_query_channels

    def forward(self, x: torch.Tensor | None) -> torch.Tensor:
        if x is None or x.shape[-1] != self.num_query_channels:
            raise ValueError(f"optical flow queries are the adapted input with {self.num_query_channels} channels, "
                             f"got {None if x is None else list(x.shape)}")
        return x


@register_model_type("perceiver-io-optical-flow", "OpticalFlowPerceiver", None)
class OpticalFlow(PerceiverIOPretrainedMixin, PerceiverIO):
    """Frame patches ``[b, 2, num_patch_input_channels, h, w]`` -> flow ``[b, h, w, 2]``.

    The encoder's cross-attention qk and v widths default to the adapted input width, as in perceiver-io.
    """

    config_class = OpticalFlowConfig
    encoder_config_class = OpticalFlowEncoderConfig
    decoder_config_class = OpticalFlowDecoderConfig

    def __init__(self, config: PerceiverIOConfig):
        input_adapter = OpticalFlowInputAdapter(
            image_shape=config.encoder.image_shape,
            num_patch_input_channels=config.encoder.num_patch_input_channels,
            num_patch_hidden_channels=config.encoder.num_patch_hidden_channels,
            num_frequency_bands=config.encoder.num_frequency_bands,
        )
        encoder_kwargs = config.encoder.base_kwargs()
        for key in ("num_cross_attention_qk_channels", "num_cross_attention_v_channels"):
            if encoder_kwargs[key] is None:
                encoder_kwargs[key] = input_adapter.num_input_channels
        encoder = PerceiverEncoder(
            input_adapter=input_adapter,
            num_latents=config.num_latents,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
            **encoder_kwargs,
        )
        output_adapter = OpticalFlowOutputAdapter(
            image_shape=config.decoder.image_shape,
            num_output_query_channels=input_adapter.num_input_channels,
            rescale_factor=config.decoder.rescale_factor,
        )
        decoder = PerceiverDecoder(
            output_adapter=output_adapter,
            output_query_provider=OpticalFlowQueryProvider(num_query_channels=input_adapter.num_input_channels),
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
            **config.decoder.base_kwargs(),
        )
        super().__init__(encoder, decoder)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flow ``[b, h, w, 2]`` for a pair of frames given as patches ``[b, 2, c, h, w]``."""
        x_latent, x_adapted = self.encoder(x, return_adapted_input=True)
        return self.decoder(x_latent, x_adapted=x_adapted)

    @classmethod
    def from_transformers(cls, model: nn.Module) -> OpticalFlow:
        """Convert a ``transformers.PerceiverForOpticalFlow`` (config and weights); see
        :func:`perceiver_fast.models.convert.transformers.optical_flow_from_transformers`."""
        return transformers_reader.optical_flow(model, cls, NUM_FRAMES)
