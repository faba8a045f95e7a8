"""Perceiver IO (https://arxiv.org/abs/2107.14795): a latent encoder and a query decoder on the fused attention op.

Constructor arguments, defaults and submodule names follow perceiver-io 0.11.0's ``PerceiverEncoder``,
``PerceiverDecoder`` and ``PerceiverIO``, so their state dicts load into these modules with ``strict=True``.
Activation checkpointing is our layers' ``activation_checkpointing`` flag (no fairscale wrapper): names are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from perceiver_fast.models.core.adapter import (
    ClassificationOutputAdapter,
    InputAdapter,
    OutputAdapter,
    QueryProvider,
    TrainableQueryProvider,
)
from perceiver_fast.models.core.attention import CrossAttentionLayer, SelfAttentionBlock
from perceiver_fast.models.core.utils import init_parameters


def check_pad_mask(pad_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> None:
    """Raise a clear error for a padding mask that does not fit ``batch`` inputs of ``length`` positions."""
    if pad_mask is None:
        return
    if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
        raise TypeError(f"pad_mask must be a bool tensor (True = pad), got {getattr(pad_mask, 'dtype', pad_mask)}")
    if pad_mask.shape != (batch, length):
        raise ValueError(f"pad_mask must have shape [batch, input length] = {[batch, length]}, "
                         f"got {list(pad_mask.shape)}")
    if pad_mask.device != device:
        raise ValueError(f"pad_mask is on {pad_mask.device} but the input is on {device}")


class PerceiverEncoder(nn.Module):
    """Cross-attends a learned latent array to the adapted input, then refines it with self-attention blocks.

    The encoder runs ``num_self_attention_blocks`` blocks; the first ``num_cross_attention_layers`` of them start
    with a cross-attention to the input. The first cross-attention layer / self-attention block is ``cross_attn_1`` /
    ``self_attn_1``; later ones reuse them (``*_shared=True``) or share one extra layer / block between them
    (``cross_attn_n`` / ``self_attn_n``), as in perceiver-io.

    Args:
        input_adapter: maps task input to ``[b, m, input_adapter.num_input_channels]``.
        num_latents: number of latent vectors (N).
        num_latent_channels: latent width (D).
        num_cross_attention_heads, num_cross_attention_qk_channels, num_cross_attention_v_channels: cross-attention
            heads and widths (qk defaults to D, v to qk).
        num_cross_attention_layers: how many blocks start with a cross-attention (1..num_self_attention_blocks).
        first_cross_attention_layer_shared: later cross-attentions reuse ``cross_attn_1``'s weights.
        cross_attention_widening_factor: MLP widening of the cross-attention layers.
        num_self_attention_heads, num_self_attention_qk_channels, num_self_attention_v_channels: self-attention
            heads and widths.
        num_self_attention_layers_per_block: layers per self-attention block.
        num_self_attention_blocks: how many times a self-attention block runs.
        first_self_attention_block_shared: later blocks reuse ``self_attn_1``'s weights.
        self_attention_widening_factor: MLP widening of the self-attention layers.
        dropout: attention-probability dropout; residual_dropout: dropout before each residual add.
        init_scale: standard deviation of the normal initialisation of Linear and Embedding weights.
        activation_checkpointing: recompute each attention layer in backward; activation_offloading: keep the saved
            inputs on the CPU.
    """

    def __init__(
        self,
        input_adapter: InputAdapter,
        num_latents: int,
        num_latent_channels: int,
        num_cross_attention_heads: int = 4,
        num_cross_attention_qk_channels: int | None = None,
        num_cross_attention_v_channels: int | None = None,
        num_cross_attention_layers: int = 1,
        first_cross_attention_layer_shared: bool = False,
        cross_attention_widening_factor: int = 1,
        num_self_attention_heads: int = 4,
        num_self_attention_qk_channels: int | None = None,
        num_self_attention_v_channels: int | None = None,
        num_self_attention_layers_per_block: int = 6,
        num_self_attention_blocks: int = 1,
        first_self_attention_block_shared: bool = True,
        self_attention_widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ):
        super().__init__()
        if num_cross_attention_layers <= 0:
            raise ValueError(f"num_cross_attention_layers must be > 0, got {num_cross_attention_layers}")
        if num_self_attention_blocks <= 0:
            raise ValueError(f"num_self_attention_blocks must be > 0, got {num_self_attention_blocks}")
        if num_cross_attention_layers > num_self_attention_blocks:
            raise ValueError(f"num_cross_attention_layers ({num_cross_attention_layers}) must be <= "
                             f"num_self_attention_blocks ({num_self_attention_blocks})")

        self.latent_provider = TrainableQueryProvider(num_latents, num_latent_channels, init_scale=init_scale)
        self.input_adapter = input_adapter
        self.num_cross_attention_layers = num_cross_attention_layers
        self.num_self_attention_blocks = num_self_attention_blocks
        self.first_cross_attention_layer_shared = first_cross_attention_layer_shared
        self.first_self_attention_block_shared = first_self_attention_block_shared

        def cross_attn() -> CrossAttentionLayer:
            return CrossAttentionLayer(
                num_heads=num_cross_attention_heads,
                num_q_input_channels=num_latent_channels,
                num_kv_input_channels=input_adapter.num_input_channels,
                num_qk_channels=num_cross_attention_qk_channels,
                num_v_channels=num_cross_attention_v_channels,
                widening_factor=cross_attention_widening_factor,
                dropout=dropout,
                residual_dropout=residual_dropout,
                activation_checkpointing=activation_checkpointing,
                activation_offloading=activation_offloading,
            )

        def self_attn() -> SelfAttentionBlock:
            return SelfAttentionBlock(
                num_layers=num_self_attention_layers_per_block,
                num_heads=num_self_attention_heads,
                num_channels=num_latent_channels,
                num_qk_channels=num_self_attention_qk_channels,
                num_v_channels=num_self_attention_v_channels,
                widening_factor=self_attention_widening_factor,
                dropout=dropout,
                residual_dropout=residual_dropout,
                activation_checkpointing=activation_checkpointing,
                activation_offloading=activation_offloading,
            )

        self.cross_attn_1 = cross_attn()
        self.self_attn_1 = self_attn()
        if self.extra_cross_attention_layer:
            self.cross_attn_n = cross_attn()
        if self.extra_self_attention_block:
            self.self_attn_n = self_attn()
        init_parameters(self, init_scale)

    @property
    def extra_cross_attention_layer(self) -> bool:
        """Whether cross-attentions after the first have weights of their own (``cross_attn_n``)."""
        return self.num_cross_attention_layers > 1 and not self.first_cross_attention_layer_shared

    @property
    def extra_self_attention_block(self) -> bool:
        """Whether self-attention blocks after the first have weights of their own (``self_attn_n``)."""
        return self.num_self_attention_blocks > 1 and not self.first_self_attention_block_shared

    def forward(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, return_adapted_input: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x`` (whatever the input adapter takes) into latents ``[b, num_latents, num_latent_channels]``.

        ``pad_mask [b, m]`` (True = pad) masks adapted input positions in the cross-attentions; pads must sit at the
        start and/or end of each row (the attention op takes per-row key bounds, not a dense mask). With
        ``return_adapted_input`` the adapted input ``[b, m, c]`` is returned as well (optical flow decodes from it).
        """
        x_adapted = self.input_adapter(x)
        b, m, _ = x_adapted.shape
        check_pad_mask(pad_mask, b, m, x_adapted.device)
        # The latent array is shared by the batch; the op needs one batch size for queries and keys.
        x_latent = self.latent_provider().expand(b, -1, -1)

        x_latent = self.cross_attn_1(x_latent, x_adapted, pad_mask=pad_mask)
        x_latent = self.self_attn_1(x_latent)

        cross_attn_n = self.cross_attn_n if self.extra_cross_attention_layer else self.cross_attn_1
        self_attn_n = self.self_attn_n if self.extra_self_attention_block else self.self_attn_1
        for i in range(1, self.num_self_attention_blocks):
            if i < self.num_cross_attention_layers:
                x_latent = cross_attn_n(x_latent, x_adapted, pad_mask=pad_mask)
            x_latent = self_attn_n(x_latent)

        return (x_latent, x_adapted) if return_adapted_input else x_latent


class PerceiverDecoder(nn.Module):
    """Cross-attends output queries to the latents, then maps the result to task output with ``output_adapter``.

    Args:
        output_adapter: maps ``[b, o, query channels]`` to task output (extra forward kwargs go to it).
        output_query_provider: gives the output queries ``[1 or b, o, num_query_channels]``; it receives the
            encoder's adapted input (``x_adapted``), which some providers use as the queries.
        num_latent_channels: latent width of the encoder output.
        num_cross_attention_heads, num_cross_attention_qk_channels, num_cross_attention_v_channels: attention sizes.
        cross_attention_widening_factor: MLP widening.
        cross_attention_residual: add the queries back to the attention output (False when queries and outputs
            mean different things, e.g. positions vs tokens).
        dropout: attention-probability dropout; init_scale: normal initialisation scale.
        activation_checkpointing, activation_offloading: as in :class:`PerceiverEncoder`.
    """

    def __init__(
        self,
        output_adapter: OutputAdapter,
        output_query_provider: QueryProvider,
        num_latent_channels: int,
        num_cross_attention_heads: int = 4,
        num_cross_attention_qk_channels: int | None = None,
        num_cross_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        cross_attention_residual: bool = True,
        dropout: float = 0.0,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ):
        super().__init__()
        self.output_query_provider = output_query_provider
        self.output_adapter = output_adapter
        self.cross_attn = CrossAttentionLayer(
            num_heads=num_cross_attention_heads,
            num_q_input_channels=output_query_provider.num_query_channels,
            num_kv_input_channels=num_latent_channels,
            num_qk_channels=num_cross_attention_qk_channels,
            num_v_channels=num_cross_attention_v_channels,
            widening_factor=cross_attention_widening_factor,
            attention_residual=cross_attention_residual,
            dropout=dropout,
            activation_checkpointing=activation_checkpointing,
            activation_offloading=activation_offloading,
        )
        init_parameters(self, init_scale)

    def forward(self, x_latent: torch.Tensor, x_adapted: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Decode latents ``[b, n, num_latent_channels]``; ``kwargs`` are passed to the output adapter."""
        return self.decode(x_latent, self.output_query_provider(x_adapted), **kwargs)

    def decode(self, x_latent: torch.Tensor, output_query: torch.Tensor, **kwargs) -> torch.Tensor:
        """Decode latents with the given queries ``[1 or b, o, num_query_channels]`` (e.g. a subset of the learned
        ones: each query's output depends on that query and the latents only)."""
        if not isinstance(x_latent, torch.Tensor) or x_latent.dim() != 3:
            raise ValueError(f"x_latent must be a [batch, latents, channels] tensor, got "
                             f"{getattr(x_latent, 'shape', type(x_latent))}")
        if output_query.shape[0] != x_latent.shape[0]:
            output_query = output_query.expand(x_latent.shape[0], -1, -1)  # learned queries are shared by the batch
        output = self.cross_attn(output_query, x_latent)
        return self.output_adapter(output, **kwargs)


def classification_decoder(config, num_output_queries: int) -> PerceiverDecoder:
    """The decoder of perceiver-io's classifiers: learned output queries, cross-attention to the latents, a linear
    layer to class logits. ``config`` is a ``PerceiverIOConfig`` whose decoder is a ``ClassificationDecoderConfig``.

    The queries are drawn before the output layer, as perceiver-io draws them: a seeded model then starts from
    perceiver-io's weights."""
    output_query_provider = TrainableQueryProvider(
        num_queries=num_output_queries,
        num_query_channels=config.decoder.num_output_query_channels,
        init_scale=config.decoder.init_scale,
    )
    return PerceiverDecoder(
        output_adapter=ClassificationOutputAdapter(
            num_classes=config.decoder.num_classes,
            num_output_query_channels=config.decoder.num_output_query_channels,
        ),
        output_query_provider=output_query_provider,
        num_latent_channels=config.num_latent_channels,
        activation_checkpointing=config.activation_checkpointing,
        activation_offloading=config.activation_offloading,
        **config.decoder.base_kwargs(),
    )


class PerceiverIO(nn.Sequential):
    """``Sequential(encoder, decoder)``: state-dict keys start with ``0.`` (encoder) and ``1.`` (decoder)."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder):
        super().__init__(encoder, decoder)

    @property
    def encoder(self) -> PerceiverEncoder:
        return self[0]

    @property
    def decoder(self) -> PerceiverDecoder:
        return self[1]
