"""Perceiver AR (https://arxiv.org/abs/2202.07765) and the causal sequence model built on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from perceiver_fast.models.core.adapter import RotarySupport, TiedTokenOutputAdapter, TokenInputAdapterWithRotarySupport
from perceiver_fast.models.core.attention import CrossAttentionLayer, SelfAttentionBlock
from perceiver_fast.models.core.config import CausalSequenceModelConfig
from perceiver_fast.models.core.masking import require
from perceiver_fast.models.core.position import RotaryPositionEmbedding, positions
from perceiver_fast.models.core.pretrained import PretrainedMixin
from perceiver_fast.models.core.utils import init_parameters


@dataclass
class PerceiverAROutput:
    """``last_hidden_state [b, num_latents, c]``; ``logits [b, num_latents, vocab]`` for sequence models.

    Read by attribute or by key (``out["logits"]``, ``out.keys()``), as perceiver-io's ``ModuleOutput``, a dict that
    holds the fields its module set. Unlike theirs it has no ``kv_cache``: decoding state lives in the layers' caches
    (``setup_caches``) that ``generate``/``stream`` drive, not in forward's inputs and outputs.
    """

    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None

    def keys(self) -> list[str]:
        """The names of the fields that are set (``logits`` only for sequence models), in order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            hint = ": forward keeps no cache here (see setup_caches, generate, stream)" if key == "kv_cache" else ""
            raise KeyError(f"{key!r}{hint}; this output holds {self.keys()}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        # As a dict's: over the keys (without it, ``in`` and ``for`` would fall back to ``out[0]``, ``out[1]``, ...).
        return iter(self.keys())


def check_token_input(x: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
    """Raise a clear error for token ids or a padding mask that Perceiver AR cannot take."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [batch, seq] tensor of token ids, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"x must hold integer token ids, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x is empty: Perceiver AR needs at least one token")
    if pad_mask is None:
        return
    if pad_mask.dtype != torch.bool or pad_mask.shape != x.shape:
        raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(x.shape)}, got {pad_mask.dtype} "
                         f"{tuple(pad_mask.shape)}")
    if pad_mask.device != x.device:
        raise ValueError(f"pad_mask is on {pad_mask.device} but x is on {x.device}")
    require(
        ~(pad_mask[:, 1:] & ~pad_mask[:, :-1]).any(),
        "pad_mask must describe left padding (pads before the first real token of each row)",
    )


class PerceiverAR(nn.Module):
    """Perceiver AR: the last ``n - prefix_len`` positions are latents; they cross-attend (causally) to the prefix
    and to themselves, then run a causal self-attention stack.

    Prefix dropout (training, ``prefix_len > 0``) keeps ``prefix_len - int(prefix_len * cross_attention_dropout)``
    prefix positions per row, chosen as the top-k of uniform noise and kept in order, drawing the random numbers
    exactly as perceiver-io does (so a seeded run drops the same positions).
    """

    def __init__(
        self,
        input_adapter: RotarySupport,
        num_heads: int = 8,
        max_heads_parallel: int | None = None,
        num_self_attention_layers: int = 6,
        num_self_attention_rotary_layers: int = 1,
        self_attention_widening_factor: int = 4,
        cross_attention_widening_factor: int = 4,
        cross_attention_dropout: float = 0.5,
        post_attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ):
        super().__init__()
        channels = input_adapter.num_input_channels
        self.input_adapter = input_adapter
        self.cross_attention_dropout = cross_attention_dropout
        self.cross_attention = CrossAttentionLayer(
            num_heads=num_heads,
            num_q_input_channels=channels,
            num_kv_input_channels=channels,
            max_heads_parallel=max_heads_parallel,
            causal_attention=True,
            widening_factor=cross_attention_widening_factor,
            dropout=post_attention_dropout,
            residual_dropout=residual_dropout,
            qkv_bias=False,
            out_bias=True,
            mlp_bias=False,
            activation_checkpointing=activation_checkpointing,
            activation_offloading=activation_offloading,
        )
        self.self_attention = SelfAttentionBlock(
            num_layers=num_self_attention_layers,
            num_heads=num_heads,
            num_channels=channels,
            causal_attention=True,
            widening_factor=self_attention_widening_factor,
            dropout=post_attention_dropout,
            residual_dropout=residual_dropout,
            num_rotary_layers=num_self_attention_rotary_layers,
            activation_checkpointing=activation_checkpointing,
            activation_offloading=activation_offloading,
            qkv_bias=False,
            out_bias=False,
            mlp_bias=False,
        )

    def forward(self, x: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None) -> PerceiverAROutput:
        """``x [b, n]`` token ids, left-padded when ``pad_mask [b, n]`` (True = pad) is given."""
        check_token_input(x, pad_mask)
        b, n = x.shape
        if not 0 <= prefix_len < n:
            raise ValueError(f"prefix_len ({prefix_len}) out of valid range [0..{n})")
        shift = None if pad_mask is None else pad_mask.sum(dim=1, keepdim=True)
        h, angles = self.input_adapter(x, abs_pos=positions(b, n, shift=shift, device=x.device))

        h_prefix, h_latent = h[:, :prefix_len], h[:, prefix_len:]
        angles_prefix, angles_latent = angles[:, :prefix_len], angles[:, prefix_len:]
        pad_prefix = pad_latent = None
        if pad_mask is not None:
            pad_prefix, pad_latent = pad_mask[:, :prefix_len], pad_mask[:, prefix_len:]

        if self.training and prefix_len > 0 and self.cross_attention_dropout > 0.0:
            keep = prefix_len - int(prefix_len * self.cross_attention_dropout)
            # Same draw as perceiver-io (uniform noise, top-k), gathered in original order.
            kept = torch.rand(b, prefix_len, device=x.device).topk(keep, dim=-1).indices.sort(dim=-1).values
            h_prefix = h_prefix.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            angles_prefix = angles_prefix.gather(1, kept.unsqueeze(-1).expand(-1, -1, angles.shape[-1]))
            if pad_prefix is not None:
                pad_prefix = pad_prefix.gather(1, kept)

        kv_pad_mask = None if pad_mask is None else torch.cat([pad_prefix, pad_latent], dim=1)
        h = self.cross_attention(
            h_latent,
            x_kv_prefix=h_prefix,
            pad_mask=kv_pad_mask,
            rot_pos_emb_q=RotaryPositionEmbedding(angles_latent, right_align=True),
            rot_pos_emb_k=RotaryPositionEmbedding(torch.cat([angles_prefix, angles_latent], dim=1), right_align=True),
        )
        h = self.self_attention(h, rot_pos_emb=RotaryPositionEmbedding(angles_latent, right_align=True))
        return PerceiverAROutput(last_hidden_state=h)

    def setup_caches(
        self,
        batch: int,
        *,
        seq_capacity: int,
        latent_capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Give every attention layer its own key/value cache for decoding: the cross-attention one for
        ``seq_capacity`` positions, each latent self-attention layer one for ``latent_capacity``. Dtype and device
        default to the parameters'."""
        param = next(self.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        self.cross_attention.attention_module.attention.setup_cache(batch, seq_capacity, dtype=dtype, device=device)
        for layer in self.self_attention:
            layer.attention_module.attention.setup_cache(batch, latent_capacity, dtype=dtype, device=device)

    def release_caches(self) -> None:
        """Free the decoding caches (:meth:`setup_caches`)."""
        self.cross_attention.attention_module.attention.release_cache()
        for layer in self.self_attention:
            layer.attention_module.attention.release_cache()


class CausalSequenceModel(PretrainedMixin, PerceiverAR):
    """A Perceiver AR over token ids with tied output embedding: perceiver-io's ``CausalSequenceModel``."""

    config_class = CausalSequenceModelConfig

    def __init__(self, config: CausalSequenceModelConfig):
        rotated_channels = config.num_channels // config.num_heads
        if config.abs_pos_emb:
            rotated_channels //= 2  # with absolute embeddings only half of each head rotates
        input_adapter = TokenInputAdapterWithRotarySupport(
            rotated_channels_per_head=rotated_channels,
            vocab_size=config.vocab_size,
            max_seq_len=config.max_seq_len,
            num_input_channels=config.num_channels,
            abs_pos_emb=config.abs_pos_emb,
        )
        if not 0 < config.max_latents <= config.max_seq_len:
            raise ValueError(f"max_latents ({config.max_latents}) must be in [1..max_seq_len={config.max_seq_len}]")
        super().__init__(input_adapter=input_adapter, **config.base_kwargs())
        self.config = config
        if config.output_norm:
            self.out_norm = nn.LayerNorm(config.num_channels)
        self.output_adapter = TiedTokenOutputAdapter(vocab_size=config.vocab_size, emb_bias=config.output_bias)
        init_parameters(self, config.init_scale)

    @property
    def max_seq_len(self) -> int:
        return self.input_adapter.max_seq_len

    @property
    def max_latents(self) -> int:
        return self.config.max_latents

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    def forward(self, x: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None) -> PerceiverAROutput:
        """Logits of the latent positions ``x[:, prefix_len:]``: ``[b, n - prefix_len, vocab_size]``."""
        if prefix_len > self.max_prefix_len:
            raise ValueError(f"prefix_len ({prefix_len}) exceeds max_prefix_len ({self.max_prefix_len})")
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len ({self.max_seq_len})")
        output = super().forward(x, prefix_len=prefix_len, pad_mask=pad_mask)
        output.last_hidden_state, output.logits = self.head(output.last_hidden_state)
        return output

    def head(self, h: torch.Tensor, *, decoding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The output norm (if any) and the tied-embedding logits of latent states ``h``: ``(normed h, logits)``;
        ``decoding``: in fewer launches, within rounding of the same (for decoding steps)."""
        if self.config.output_norm:
            h = self.out_norm(h)
        adapter, embedding = self.output_adapter, self.input_adapter.txt_embedding
        return h, adapter.decoding_logits(h, embedding) if decoding else adapter(h, txt_embedding=embedding)
