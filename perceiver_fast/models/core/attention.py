"""Attention layers of the Perceiver family, with perceiver-io 0.11.0's module names (so state dicts load as-is).

All attention goes through :func:`perceiver_fast.kernels.attention`; these modules know nothing of backends.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from perceiver_fast.kernels import attention
from perceiver_fast.kernels.decode import decode_attention
from perceiver_fast.models.core.kv_cache import KVCache
from perceiver_fast.models.core.masking import padding_bounds, rows_without_keys
from perceiver_fast.models.core.position import RotaryPositionEmbedding
from perceiver_fast.models.core.utils import Residual, run_checkpointed


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k and v widths, rotary embeddings and (bottom-right) causal masking.

    ``max_heads_parallel`` is kept for config compatibility: perceiver-io computed heads in chunks to bound the
    memory of the dense attention matrix; the fused op never materialises it, so all heads run at once.

    Rows that see no key (e.g. a left pad as a causal query) follow perceiver-io, not the op's zero rule: perceiver-io
    fills masked scores with ``-finfo.max``, so such a row's softmax is uniform over *all* keys and its output is the
    mean of every value. That output reaches real tokens through later layers, so parity needs it.
    """

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_output_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ):
        super().__init__()
        num_qk_channels = num_q_input_channels if num_qk_channels is None else num_qk_channels
        num_v_channels = num_qk_channels if num_v_channels is None else num_v_channels
        num_output_channels = num_q_input_channels if num_output_channels is None else num_output_channels
        if num_qk_channels % num_heads != 0:
            raise ValueError(f"num_qk_channels ({num_qk_channels}) must be divisible by num_heads ({num_heads})")
        if num_v_channels % num_heads != 0:
            raise ValueError(f"num_v_channels ({num_v_channels}) must be divisible by num_heads ({num_heads})")

        self.dp_scale = (num_qk_channels // num_heads) ** -0.5
        self.num_heads = num_heads
        self.num_qk_channels = num_qk_channels
        self.num_v_channels = num_v_channels
        self.causal_attention = causal_attention
        self.max_heads_parallel = num_heads if max_heads_parallel is None else max_heads_parallel

        self.q_proj = nn.Linear(num_q_input_channels, num_qk_channels, bias=qkv_bias)
        self.k_proj = nn.Linear(num_kv_input_channels, num_qk_channels, bias=qkv_bias)
        self.v_proj = nn.Linear(num_kv_input_channels, num_v_channels, bias=qkv_bias)
        self.o_proj = nn.Linear(num_v_channels, num_output_channels, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        self.kv_cache: KVCache | None = None  # set up for decoding (setup_cache), not part of the state dict

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        rot_pos_emb_q: RotaryPositionEmbedding | None = None,
        rot_pos_emb_k: RotaryPositionEmbedding | None = None,
    ) -> torch.Tensor:
        """``x_q [b, n, c_q]`` attends to ``x_kv [b, m, c_kv]``; ``pad_mask [b, m]`` is True at padded keys."""
        b, n, _ = x_q.shape
        m = x_kv.shape[1]
        q = self.project_queries(x_q, rot_pos_emb_q)
        k, v = self.project_keys_values(x_kv, rot_pos_emb_k)

        dropout_p = self.dropout.p if self.training else 0.0
        # nn.Dropout(1.0) drops every probability: perceiver-io's attention gives zeros (the op refuses p = 1).
        drop_all = dropout_p >= 1.0
        kv_start = kv_len = None
        if pad_mask is not None:
            kv_start, kv_len = padding_bounds(pad_mask, left_only=self.causal_attention)
        o = attention(
            q,
            k,
            v,
            causal=self.causal_attention,
            kv_start=kv_start,
            kv_len=kv_len,
            scale=self.dp_scale,
            dropout_p=0.0 if drop_all else dropout_p,
        )
        if pad_mask is not None:
            empty = rows_without_keys(n, m, kv_start, kv_len, causal=self.causal_attention)
            o = torch.where(empty.view(b, n, 1, 1), v.mean(dim=1, keepdim=True), o)
        if drop_all:  # zeros that keep the graph: q, k, v projections get zero gradients, as in perceiver-io
            o = o * 0.0
        return self.project_output(o)

    # The pieces of forward, for callers that cache keys/values (generation) and so assemble attention themselves.

    def project_queries(self, x_q: torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None) -> torch.Tensor:
        """``[b, n, c] -> [b, n, heads, qk_channels_per_head]``, rotated when ``rot_pos_emb`` is given."""
        q = self.q_proj(x_q).unflatten(-1, (self.num_heads, -1))
        return q if rot_pos_emb is None else rot_pos_emb.rotate(q)

    def project_keys_values(
        self, x_kv: torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, m, c]`` -> keys (rotated when ``rot_pos_emb`` is given) and values, ``[b, m, heads, d]`` each."""
        k = self.k_proj(x_kv).unflatten(-1, (self.num_heads, -1))
        v = self.v_proj(x_kv).unflatten(-1, (self.num_heads, -1))
        return (k if rot_pos_emb is None else rot_pos_emb.rotate(k)), v

    def project_output(self, o: torch.Tensor) -> torch.Tensor:
        """``[b, n, heads, v_channels_per_head] -> [b, n, output_channels]``."""
        return self.o_proj(o.flatten(-2))

    # Decoding with a key/value cache owned by this layer (gpt-fast's pattern): keys and values are written in place
    # and queries attend to the cache under per-row key bounds, so every shape stays fixed from step to step.

    def setup_cache(self, batch: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """Allocate (or replace) this layer's cache: ``capacity`` positions for ``batch`` rows."""
        heads = self.num_heads
        self.kv_cache = KVCache(
            batch, capacity, heads, self.num_qk_channels // heads, self.num_v_channels // heads,
            dtype=dtype, device=device,
        )  # fmt: skip
        return self.kv_cache

    def release_cache(self) -> None:
        self.kv_cache = None

    def __getstate__(self) -> dict:
        # Copies and pickles of a model carry no decoding buffers (the decoder that set them up keeps its own).
        return {**self.__dict__, "kv_cache": None}

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise RuntimeError("this attention layer has no key/value cache: call setup_cache() first")
        return self.kv_cache

    def _project_rows(
        self, x: torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated when ``rot_pos_emb`` is given) and values of rows ``x [b, n, c]`` that are
        queries and keys alike: one GEMM where a decoder packed this layer's projections (see packed.py)."""
        heads, packed = self.num_heads, self._cache().packed
        if packed is not None:
            qk = packed.qk_channels
            qkv = F.linear(x, packed.weight, packed.bias)
            q, k, v = qkv[..., :qk], qkv[..., qk : 2 * qk], qkv[..., 2 * qk :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if rot_pos_emb is not None:
            # Queries and keys rotate as one tensor (adjacent in the packed output, else concatenated).
            both = qkv[..., : 2 * qk] if packed is not None else torch.cat((q, k), dim=-1)
            both = rot_pos_emb.rotate(both.unflatten(-1, (2 * heads, -1)))
            return both[:, :, :heads], both[:, :, heads:], v.unflatten(-1, (heads, -1))
        return tuple(t.unflatten(-1, (heads, -1)) for t in (q, k, v))

    def write_cache(
        self, x_kv: torch.Tensor, position: int | torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> None:
        """Project ``x_kv [b, n, c]`` to keys (rotated) and values and store them at ``position`` onwards."""
        cache = self._cache()
        if cache.packed is None:
            cache.write(position, *self.project_keys_values(x_kv, rot_pos_emb))
            return
        weight, bias = cache.packed.keys_values()
        kv = F.linear(x_kv, weight, bias)
        qk = cache.packed.qk_channels
        k, v = kv[..., :qk].unflatten(-1, (self.num_heads, -1)), kv[..., qk:].unflatten(-1, (self.num_heads, -1))
        cache.write(position, k if rot_pos_emb is None else rot_pos_emb.rotate(k), v)

    def write_rows(
        self, x: torch.Tensor, position: int | torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> torch.Tensor:
        """Store the keys/values of rows ``x [b, n, c]`` at ``position`` onwards and return the same rows' projected
        (and rotated) queries ``[b, n, heads, d]``."""
        q, k, v = self._project_rows(x, rot_pos_emb)
        self._cache().write(position, k, v)
        return q

    def attend_new(
        self,
        x: torch.Tensor,
        position: int | torch.Tensor,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
        *,
        kv_start: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
        return_lse: bool = False,
        return_query: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """A decoding step of one row per batch row, as one op (:func:`~perceiver_fast.kernels.decode_attention`):
        the row ``x [b, 1, c]`` is projected, its key/value written at ``position`` and its query attends to the
        cached keys ``[kv_start, kv_len)``; ``rot_pos_emb`` rotates both the query and the new key. Returns the
        attention result (with the lse when asked), and with ``return_query`` as a pair with the rotated query."""
        cache = self._cache()
        # The query and key rotate here, as one tensor with the angles' matrices that every layer of the step shares,
        # rather than inside the op, which would rebuild them per layer (the op's rotary is for callers without).
        q, k, v = self._project_rows(x, rot_pos_emb)
        attended = decode_attention(
            q, k, v, cache.k, cache.v, position, kv_start=kv_start, kv_len=kv_len, scale=self.dp_scale,
            return_lse=return_lse,
        )  # fmt: skip
        return (attended, q) if return_query else attended

    def attend_rows(
        self,
        x: torch.Tensor,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
        *,
        kv_start: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows ``x [b, n, c]`` attend causally to their own keys ``[kv_start, kv_len)``, projected as in a decoding
        step (see :meth:`_project_rows`) and not written to the cache."""
        q, k, v = self._project_rows(x, rot_pos_emb)
        return attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=self.dp_scale)

    def attend_cache(
        self,
        q: torch.Tensor,
        *,
        causal: bool = False,
        kv_start: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
        limit: int | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Projected queries ``[b, n, heads, d]`` attend to the cached keys ``[kv_start, kv_len)`` of each row, among
        the first ``limit`` positions (``None``: all; a fixed limit is a view, where per-row bounds are a mask)."""
        cache = self._cache()
        k, v = (cache.k, cache.v) if limit is None else (cache.k[:, :limit], cache.v[:, :limit])
        return attention(
            q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=self.dp_scale, return_lse=return_lse
        )


class CrossAttention(nn.Module):
    """Pre-layer-norm cross-attention. With ``x_kv_prefix`` the keys/values are ``[kv_norm(prefix), q_norm(x_q)]``:
    the queries also attend to themselves at the end of the key sequence (Perceiver AR)."""

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ):
        super().__init__()
        self.q_norm = nn.LayerNorm(num_q_input_channels)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels)
        self.attention = MultiHeadAttention(
            num_heads=num_heads,
            num_q_input_channels=num_q_input_channels,
            num_kv_input_channels=num_kv_input_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal_attention=causal_attention,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
        )

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        x_kv_prefix: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        rot_pos_emb_q: RotaryPositionEmbedding | None = None,
        rot_pos_emb_k: RotaryPositionEmbedding | None = None,
    ) -> torch.Tensor:
        x_q = self.q_norm(x_q)
        if x_kv is None:
            if x_kv_prefix is None:
                raise ValueError("CrossAttention needs x_kv or x_kv_prefix")
            x_kv = torch.cat([self.kv_norm(x_kv_prefix), x_q], dim=1)
        else:
            x_kv = self.kv_norm(x_kv)
        return self.attention(x_q, x_kv, pad_mask=pad_mask, rot_pos_emb_q=rot_pos_emb_q, rot_pos_emb_k=rot_pos_emb_k)


class SelfAttention(nn.Module):
    """Pre-layer-norm self-attention."""

    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.attention = MultiHeadAttention(
            num_heads=num_heads,
            num_q_input_channels=num_channels,
            num_kv_input_channels=num_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal_attention=causal_attention,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
        )

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
    ) -> torch.Tensor:
        x = self.norm(x)
        return self.attention(x, x, pad_mask=pad_mask, rot_pos_emb_q=rot_pos_emb, rot_pos_emb_k=rot_pos_emb)


class MLP(nn.Sequential):
    """``LayerNorm -> Linear(c, w*c) -> GELU -> Linear(w*c, c)`` (indices 0..3 as in perceiver-io state dicts)."""

    def __init__(self, num_channels: int, widening_factor: int, bias: bool = True):
        super().__init__(
            nn.LayerNorm(num_channels),
            nn.Linear(num_channels, widening_factor * num_channels, bias=bias),
            nn.GELU(),
            nn.Linear(widening_factor * num_channels, num_channels, bias=bias),
        )

    def accumulate_into(self, x: torch.Tensor) -> torch.Tensor:
        """``x += self(x)``, in place, for decoding steps (``x`` must be the caller's own tensor); returns ``x``.

        Without a bias on the last projection its GEMM accumulates into ``x`` (one launch, where ``x + self(x)``
        takes two: a decoding step is bound by launches). The sum is then rounded once where ``forward`` rounds the
        product first: decoding stays within rounding of a full forward, not equal to it bit for bit.
        """
        norm, expand, activation, contract = self
        h = activation(expand(norm(x)))
        # One dtype throughout: under autocast h comes in autocast's dtype, which an in-place product would not
        # promote (the residual stream keeps the parameters' dtype).
        if contract.bias is None and h.dtype == x.dtype == contract.weight.dtype and x.is_contiguous():
            x.view(-1, x.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), contract.weight.t())
            return x
        return x.add_(contract(h))


class _AttentionLayer(nn.Sequential):
    """``[attention (usually residual), residual MLP]``, optionally under activation checkpointing."""

    activation_checkpointing: bool = False
    activation_offloading: bool = False

    @property
    def attention_module(self) -> nn.Module:
        """The ``CrossAttention`` / ``SelfAttention`` inside the (optional) residual wrapper."""
        # Looked up once: decoding asks for it several times per layer and token, and nn.Sequential indexing is
        # slow. Kept in __dict__, not as an attribute nn.Module would register (it is already a submodule).
        found = self.__dict__.get("_attention_module")
        if found is None:
            found = self[0].module if isinstance(self[0], Residual) else self[0]
            self.__dict__["_attention_module"] = found
        return found

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after its attention: output projection, residual, residual MLP (for decoding
        steps: the MLP accumulates into the sum before it, see :meth:`MLP.accumulate_into`)."""
        out = self.attention_module.attention.project_output(attended)
        attention_part = self[0]
        if attention_part is not self.attention_module:  # residual (its dropout is the identity in eval mode)
            if attention_part.training and attention_part.dropout.p > 0.0:
                out = attention_part.dropout(out)
            out = x + out
        mlp_part = self[1]
        if (mlp_part.training and mlp_part.dropout.p > 0.0) or torch.is_grad_enabled():
            return mlp_part(out)  # (in place, the sum would overwrite what autograd saved of out)
        return mlp_part.module.accumulate_into(out)  # out is this call's own tensor

    def _attend_and_mix(self, *args, **kwargs) -> torch.Tensor:
        return self[1](self[0](*args, **kwargs))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return run_checkpointed(self._attend_and_mix, *args, offload=self.activation_offloading, **kwargs)
        return self._attend_and_mix(*args, **kwargs)


class CrossAttentionLayer(_AttentionLayer):
    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        attention_residual: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ):
        cross_attn = CrossAttention(
            num_heads=num_heads,
            num_q_input_channels=num_q_input_channels,
            num_kv_input_channels=num_kv_input_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal_attention=causal_attention,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
        )
        super().__init__(
            Residual(cross_attn, residual_dropout) if attention_residual else cross_attn,
            Residual(MLP(num_q_input_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )
        self.num_qk_channels = cross_attn.attention.num_qk_channels
        self.num_v_channels = cross_attn.attention.num_v_channels
        self.activation_checkpointing = activation_checkpointing
        self.activation_offloading = activation_offloading

    # Cached decoding (Perceiver AR): the queries are latents; a latent's keys/values are made with q_norm, a prefix
    # position's with kv_norm, and both live in this layer's cache (see MultiHeadAttention.setup_cache).

    def write_prefix(
        self, x: torch.Tensor, position: int | torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> None:
        """Store the keys/values (``kv_norm``) of prefix positions ``x [b, n, c]`` at ``position`` onwards."""
        cross = self.attention_module
        cross.attention.write_cache(cross.kv_norm(x), position, rot_pos_emb)

    def write_latents(
        self, x: torch.Tensor, position: int | torch.Tensor, rot_pos_emb: RotaryPositionEmbedding | None = None
    ) -> torch.Tensor:
        """Store the keys/values of latents ``x [b, n, c]`` (``q_norm``) at ``position`` onwards and return their
        projected (and rotated) queries, which the same norm makes."""
        cross = self.attention_module
        return cross.attention.write_rows(cross.q_norm(x), position, rot_pos_emb)

    def attend_cache(self, q: torch.Tensor, **bounds) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q`` attends to the cached keys; ``bounds`` as :meth:`MultiHeadAttention.attend_cache`."""
        return self.attention_module.attention.attend_cache(q, **bounds)

    def attend_new(
        self,
        x: torch.Tensor,
        position: int | torch.Tensor,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
        *,
        kv_start: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
        return_lse: bool = False,
        return_query: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A new latent ``x [b, 1, c]``: its keys/values (``q_norm``) go into the cache at ``position`` and its query
        attends to the cached keys ``[kv_start, kv_len)`` in one op (see :meth:`MultiHeadAttention.attend_new`).
        Returns the attention result (with the lse when asked), and with ``return_query`` as a pair with the
        latent's rotated query, which a decoder keeps for recomputing the latents later."""
        cross = self.attention_module
        return cross.attention.attend_new(
            cross.q_norm(x), position, rot_pos_emb, kv_start=kv_start, kv_len=kv_len, return_lse=return_lse,
            return_query=return_query,
        )  # fmt: skip


class SelfAttentionLayer(_AttentionLayer):
    def __init__(
        self,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ):
        self_attn = SelfAttention(
            num_heads=num_heads,
            num_channels=num_channels,
            num_qk_channels=num_qk_channels,
            num_v_channels=num_v_channels,
            max_heads_parallel=max_heads_parallel,
            causal_attention=causal_attention,
            dropout=dropout,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
        )
        super().__init__(
            Residual(self_attn, residual_dropout),
            Residual(MLP(num_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )
        self.num_qk_channels = self_attn.attention.num_qk_channels
        self.num_v_channels = self_attn.attention.num_v_channels
        self.activation_checkpointing = activation_checkpointing
        self.activation_offloading = activation_offloading

    def forward_cached(
        self,
        x: torch.Tensor,
        position: int | torch.Tensor,
        *,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
        kv_start: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
        limit: int | None = None,
        keep_keys: bool = True,
    ) -> torch.Tensor:
        """The layer for rows ``x [b, n, c]`` that sit at cache positions ``position .. position + n - 1``.

        Their keys/values are written into the layer's cache and the rows attend causally to the cache's keys
        ``[kv_start, kv_len)`` (``[b]`` tensors) among its first ``limit`` positions (an int), which must end with the
        rows themselves. ``keep_keys=False`` where the rows are the whole context (``position`` 0, ``limit`` n) and
        no later step reads their keys: the rows attend to their own keys, and the cache is left as it was.
        """
        attention = self.attention_module.attention
        normed = self.attention_module.norm(x)
        if x.shape[1] == 1 and limit is None:  # one new row: a decoding step, one op (fused where it pays)
            attended = attention.attend_new(normed, position, rot_pos_emb, kv_start=kv_start, kv_len=kv_len)
            return self.finish(x, attended)
        if not keep_keys:
            if not (isinstance(position, int) and position == 0 and limit == x.shape[1]):
                raise ValueError("keep_keys=False needs the rows to be the whole context: position 0, limit n")
            return self.finish(x, attention.attend_rows(normed, rot_pos_emb, kv_start=kv_start, kv_len=kv_len))
        q = attention.write_rows(normed, position, rot_pos_emb)
        attended = attention.attend_cache(q, causal=True, kv_start=kv_start, kv_len=kv_len, limit=limit)
        return self.finish(x, attended)


class SelfAttentionBlock(nn.Sequential):
    """A stack of self-attention layers; only the first ``num_rotary_layers`` use rotary embeddings (-1 = all)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_rotary_layers: int = 1,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
    ):
        super().__init__(
            *(
                SelfAttentionLayer(
                    num_heads=num_heads,
                    num_channels=num_channels,
                    num_qk_channels=num_qk_channels,
                    num_v_channels=num_v_channels,
                    max_heads_parallel=max_heads_parallel,
                    causal_attention=causal_attention,
                    widening_factor=widening_factor,
                    dropout=dropout,
                    residual_dropout=residual_dropout,
                    qkv_bias=qkv_bias,
                    out_bias=out_bias,
                    mlp_bias=mlp_bias,
                    activation_checkpointing=activation_checkpointing,
                    activation_offloading=activation_offloading,
                )
                for _ in range(num_layers)
            )
        )
        self.num_rotary_layers = num_rotary_layers

    def uses_rotary(self, layer_index: int) -> bool:
        return self.num_rotary_layers == -1 or layer_index < self.num_rotary_layers

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        rot_pos_emb: RotaryPositionEmbedding | None = None,
    ) -> torch.Tensor:
        for i, layer in enumerate(self):
            x = layer(x, pad_mask=pad_mask, rot_pos_emb=rot_pos_emb if self.uses_rotary(i) else None)
        return x
