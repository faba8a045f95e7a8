"""Perceiver IO masked language model: ``perceiver.model.text.mlm`` -> ``perceiver_fast.models.text.mlm``.

The text encoder (token + learned position embeddings, then a :class:`PerceiverEncoder`) lives here too; the text
classifier builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from perceiver_fast.models.convert import transformers_reader
from perceiver_fast.models.core.adapter import (
    OutputAdapter,
    TiedTokenOutputAdapter,
    TokenInputAdapter,
    TrainableQueryProvider,
)
from perceiver_fast.models.core.config import DecoderConfig, EncoderConfig, PerceiverIOConfig
from perceiver_fast.models.core.io_config import PerceiverIOPretrainedMixin
from perceiver_fast.models.core.perceiver_io import PerceiverDecoder, PerceiverEncoder, PerceiverIO
from perceiver_fast.models.core.registry import register_model_type
from perceiver_fast.models.core.utils import freeze


@dataclass
class TextEncoderConfig(EncoderConfig):
    """perceiver-io's ``TextEncoderConfig``. ``params`` names pretrained weights in their wrappers; unused here."""

    vocab_size: int = 10003
    max_seq_len: int = 256
    num_input_channels: int = 64
    params: str | None = None


@dataclass
class TextDecoderConfig(DecoderConfig):
    """``num_output_query_channels=None`` ties the output to the token embedding (queries as wide as the input)."""

    num_output_query_channels: int | None = None
    vocab_size: int = 10003
    max_seq_len: int = 512


MaskedLanguageModelConfig = PerceiverIOConfig[TextEncoderConfig, TextDecoderConfig]


def check_token_ids(x: torch.Tensor, max_seq_len: int) -> None:
    """Raise a clear error for token ids a text encoder cannot embed."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [batch, seq] tensor of token ids, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"x must hold integer token ids, got {x.dtype}")
    if not 0 < x.shape[1] <= max_seq_len:
        raise ValueError(f"sequence length {x.shape[1]} must be in [1..max_seq_len={max_seq_len}]")


class TextEncoder(PerceiverEncoder):
    """A :class:`PerceiverEncoder` over token ids ``[b, n]`` (``n <= max_seq_len``)."""

    def __init__(
        self,
        config: TextEncoderConfig,
        num_latents: int,
        num_latent_channels: int,
        activation_checkpointing: bool,
        activation_offloading: bool,
    ):
        input_adapter = TokenInputAdapter(
            vocab_size=config.vocab_size,
            max_seq_len=config.max_seq_len,
            num_input_channels=config.num_input_channels,
        )
        super().__init__(
            input_adapter=input_adapter,
            num_latents=num_latents,
            num_latent_channels=num_latent_channels,
            activation_checkpointing=activation_checkpointing,
            activation_offloading=activation_offloading,
            **config.base_kwargs(),
        )
        if config.freeze:
            freeze(self)

    @classmethod
    def from_io_config(cls, config: PerceiverIOConfig) -> TextEncoder:
        """The encoder of a text model's ``PerceiverIOConfig`` (its ``encoder`` plus the latent settings)."""
        return cls(
            config.encoder,
            num_latents=config.num_latents,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
        )

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, return_adapted_input: bool = False):
        check_token_ids(x, self.input_adapter.max_seq_len)
        return super().forward(x, pad_mask=pad_mask, return_adapted_input=return_adapted_input)


class TokenOutputAdapter(OutputAdapter):
    """Logits from a linear layer of their own (an untied output)."""

    def __init__(self, vocab_size: int, num_output_query_channels: int):
        super().__init__()
        self.linear = nn.Linear(num_output_query_channels, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(dim=1)


# perceiver-io's name for the MLM decoder.
TextDecoder = PerceiverDecoder


@register_model_type("perceiver-io-masked-language-model", "PerceiverMaskedLanguageModel", "LitMaskedLanguageModel")
class MaskedLanguageModel(PerceiverIOPretrainedMixin, PerceiverIO):
    """Perceiver IO masked language model: token ids ``[b, n]`` -> logits ``[b, n, vocab_size]``.

    The decoder has ``decoder.max_seq_len`` learned output queries (one per position); only the first ``n`` are
    decoded. With ``decoder.num_output_query_channels=None`` the logits reuse the token embedding.
    """

    config_class = MaskedLanguageModelConfig
    encoder_config_class = TextEncoderConfig
    decoder_config_class = TextDecoderConfig

    def __init__(self, config: PerceiverIOConfig):
        encoder = TextEncoder.from_io_config(config)
        tied = config.decoder.num_output_query_channels is None
        query_channels = config.encoder.num_input_channels if tied else config.decoder.num_output_query_channels
        output_query_provider = TrainableQueryProvider(
            num_queries=config.decoder.max_seq_len,
            num_query_channels=query_channels,
            init_scale=config.decoder.init_scale,
        )
        if tied:
            output_adapter = TiedTokenOutputAdapter(vocab_size=config.decoder.vocab_size)
        else:
            output_adapter = TokenOutputAdapter(
                vocab_size=config.decoder.vocab_size, num_output_query_channels=query_channels
            )
        decoder = PerceiverDecoder(
            output_adapter=output_adapter,
            output_query_provider=output_query_provider,
            num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
            **config.decoder.base_kwargs(),
        )
        super().__init__(encoder, decoder)
        self.config = config

    def forward(self, x_masked: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, n, vocab_size]`` for token ids ``x_masked [b, n]``; ``pad_mask [b, n]`` True at pads."""
        check_token_ids(x_masked, self.encoder.input_adapter.max_seq_len)
        n = x_masked.shape[1]
        max_out = self.config.decoder.max_seq_len
        if n > max_out:
            raise ValueError(f"sequence length {n} exceeds the decoder's max_seq_len ({max_out})")
        x_latent = self.encoder(x_masked, pad_mask)
        # Only the first n output queries are needed, and each query's logits depend on that query and the latents
        # alone, so the others are not computed (perceiver-io computes all max_seq_len and slices).
        output_query = self.decoder.output_query_provider()[:, :n]
        if isinstance(self.decoder.output_adapter, TiedTokenOutputAdapter):
            logits = self.decoder.decode(x_latent, output_query, txt_embedding=self.encoder.input_adapter.txt_embedding)
        else:
            logits = self.decoder.decode(x_latent, output_query)
            if logits.dim() == 2:  # TokenOutputAdapter squeezes a query axis of length 1; keep [b, n, vocab]
                logits = logits.unsqueeze(1)
        return logits

    @classmethod
    def from_transformers(cls, model: nn.Module) -> MaskedLanguageModel:
        """Convert a ``transformers.PerceiverForMaskedLM`` (config and weights); see
        :func:`perceiver_fast.models.convert.transformers.masked_lm_from_transformers`."""
        return transformers_reader.masked_lm(model, cls)
