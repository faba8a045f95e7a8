"""Key/value caching for Perceiver AR decoding.

What a full forward of a window computes, and what of it can be kept from one token to the next:

- Cross-attention keys/values of a **prefix** position depend only on that token and its position (made with
  ``kv_norm``): they are written once. Those of a **latent** position are made with ``q_norm`` and are remade when the
  position crosses into the prefix.
- Each latent's cross-attention is kept as two partial softmax results, one over the prefix and one over the latents.
  The prefix part is updated with only the keys that cross (``O(latents)`` per crossing position instead of
  ``O(latents x prefix)``); the latent part and the latent self-attention stack are recomputed whenever a crossing
  changes them, which is the floor of exact decoding once the latents are full.
- While nothing crosses, a new token is one more latent at the end: causal masking leaves the other latents
  unchanged, so only the new row is computed, against cached self-attention keys/values per layer.
- When the window slides (past ``max_seq_len``), every position changes, so the cache is rebuilt from the window.

Buffers are preallocated once per batch (static shapes). All rows share one window geometry; rows of different
prompt lengths are left-padded and the pads are masked through ``kv_start``.
"""

from __future__ import annotations

import torch

from perceiver_fast.kernels import attention
from perceiver_fast.models.core.position import RotaryPositionEmbedding, positions


def merge_partial_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets from each set's output and log-sum-exp.

    ``out [b, n, h, d]``, ``lse [b, h, n]`` (``-inf`` where a set is empty). Returns float32 ``(out, lse)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    seen = torch.isfinite(lse)
    weight_a = torch.where(seen, torch.exp(lse_a - lse), 0.0).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.where(seen, torch.exp(lse_b - lse), 0.0).transpose(1, 2).unsqueeze(-1)
    return out_a.float() * weight_a + out_b.float() * weight_b, lse


def _attend_with_lse(q, k, v, *, causal: bool = False, kv_start: torch.Tensor | None = None, scale: float):
    """The op with lse, defined for an empty key set too (zeros and ``-inf``)."""
    if k.shape[1] == 0:
        b, n, h, _ = q.shape
        return q.new_zeros(b, n, h, v.shape[-1]), q.new_full((b, h, n), float("-inf"), dtype=torch.float32)
    return attention(q, k, v, causal=causal, kv_start=kv_start, scale=scale, return_lse=True)


class PerceiverARCache:
    """Decoding state of a Perceiver AR sequence model (e.g. ``CausalLanguageModel``) for one batch.

    ``prefill`` builds it from a window; ``append`` adds one token, optionally hands the oldest latents to the prefix
    and drops the oldest positions (a sliding window). Both return the logits of the last position, equal to a full
    forward of the same window.

    Sliding without a rebuild (``can_slide``) needs a positional scheme where dropping the oldest token changes no
    remaining key or query: rotary-only models (``abs_pos_emb=False``; rotary attention depends on position
    differences only) whose latents hold no padding. Their buffers then have room for two windows and are compacted
    once per window length (constant memory, amortised O(1) per token). With absolute position embeddings every
    position's embedding changes when the window slides, and the decoder rebuilds the cache instead.
    """

    def __init__(
        self, model: torch.nn.Module, batch_size: int, capacity_factor: int = 1, incremental_prefix: bool = True
    ):
        self.model = model
        # Keep each latent's attention to the prefix as a partial softmax, updated as positions cross (best when
        # positions cross every token); without it, a crossing recomputes the latents' attention over the window
        # (best when many cross at once, the strided schedule), and a new token's row is one attention call.
        self.incremental_prefix = incremental_prefix
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.batch_size = batch_size
        self.cross = model.cross_attention[0].module  # CrossAttention (q_norm, kv_norm, attention)
        self.cross_mlp = model.cross_attention[1]  # residual MLP
        self.self_layers = list(model.self_attention)
        heads = self.cross.attention.num_heads
        qk_dim = self.cross.attention.num_qk_channels // heads
        v_dim = self.cross.attention.num_v_channels // heads
        def alloc(n: int, d: int) -> torch.Tensor:
            # [b, n, heads, d] views of head-major memory: each head's keys are contiguous, which the attention
            # kernels read fastest (the op takes any strides).
            return torch.empty(batch_size, heads, n, d, dtype=self.dtype, device=self.device).transpose(1, 2)

        seq_capacity, latent_capacity = capacity_factor * model.max_seq_len, capacity_factor * model.max_latents
        self.cross_k, self.cross_v = alloc(seq_capacity, qk_dim), alloc(seq_capacity, v_dim)
        self.self_k = [alloc(latent_capacity, layer[0].module.attention.num_qk_channels // heads)
                       for layer in self.self_layers]
        self.self_v = [alloc(latent_capacity, layer[0].module.attention.num_v_channels // heads)
                       for layer in self.self_layers]
        self.offset = 0  # buffer index of the window's first position
        self.length = 0  # window length
        self.prefix_len = 0
        self.pads = torch.zeros(batch_size, dtype=torch.int32, device=self.device)  # pads inside the window
        self.has_pads = False
        self.pos_shift = self.pads.clone()  # window index i has position (i - pos_shift).clamp(min=0)
        self.any_pad_latent = False
        # Per latent: residual input, rotary angles, cross-attention query, and the prefix part of its attention.
        self.latent_h = self.latent_angles = self.latent_q = self.prefix_out = self.prefix_lse = None

    @property
    def num_latents(self) -> int:
        return self.length - self.prefix_len

    @property
    def can_slide(self) -> bool:
        """Whether ``append(..., drop=n)`` is exact here (see the class docstring)."""
        return not self.model.config.abs_pos_emb and not self.any_pad_latent

    def _cross_kv(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of window positions ``[lo, hi)`` (views into the buffers)."""
        window = slice(self.offset + lo, self.offset + hi)
        return self.cross_k[:, window], self.cross_v[:, window]

    def _write_cross_kv(self, lo: int, k: torch.Tensor, v: torch.Tensor) -> None:
        hi = self.offset + lo + k.shape[1]
        self.cross_k[:, self.offset + lo : hi], self.cross_v[:, self.offset + lo : hi] = k, v

    def _kv_start(self, lo: int, hi: int) -> torch.Tensor | None:
        """Left-padding bound for window keys ``[lo, hi)``; ``None`` when no row has pads (no mask to apply)."""
        return (self.pads - lo).clamp(0, hi - lo) if self.has_pads else None

    def _prefix_part(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._cross_kv(0, self.prefix_len)
        kv_start = self._kv_start(0, self.prefix_len)
        return _attend_with_lse(q, k, v, kv_start=kv_start, scale=self.cross.attention.dp_scale)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rebuild the cache from a window ``tokens [b, n]`` (left-padded per ``pad_mask``); ``[b, vocab]`` logits."""
        b, n = tokens.shape
        if b != self.batch_size or not 0 <= prefix_len < n <= self.model.max_seq_len:
            raise ValueError(f"window {tuple(tokens.shape)} with prefix_len {prefix_len} does not fit this cache")
        self.pads = (torch.zeros(b, dtype=torch.int32, device=self.device) if pad_mask is None
                     else pad_mask.sum(dim=1).to(torch.int32))
        self.pos_shift = self.pads.clone()
        self.has_pads = bool((self.pads > 0).any())
        self.any_pad_latent = bool((self.pads > prefix_len).any())
        self.offset, self.length, self.prefix_len = 0, n, prefix_len
        h, angles = self.model.input_adapter(tokens, abs_pos=positions(b, n, shift=self.pads.unsqueeze(1),
                                                                       device=tokens.device))
        attn = self.cross.attention
        p = prefix_len
        prefix_k, prefix_v = attn.project_keys_values(
            self.cross.kv_norm(h[:, :p]), RotaryPositionEmbedding(angles[:, :p])
        )
        latent_x = self.cross.q_norm(h[:, p:])
        latent_rot = RotaryPositionEmbedding(angles[:, p:])
        self._write_cross_kv(0, prefix_k, prefix_v)
        self._write_cross_kv(p, *attn.project_keys_values(latent_x, latent_rot))
        self.latent_h, self.latent_angles = h[:, p:], angles[:, p:]
        self.latent_q = attn.project_queries(latent_x, latent_rot)
        self.prefix_out = self.prefix_lse = None
        if self.incremental_prefix:
            self.prefix_out, self.prefix_lse = self._prefix_part(self.latent_q)
        return self._recompute_latents()

    def _make_room(self) -> None:
        if self.offset + self.length == self.cross_k.shape[1]:  # move the window to the front
            for buffer in (self.cross_k, self.cross_v):
                buffer[:, : self.length] = buffer[:, self.offset : self.offset + self.length].clone()
            self.offset = 0

    @torch.no_grad()
    def append(self, token: torch.Tensor, cross: int = 0, drop: int = 0) -> torch.Tensor:
        """Add ``token [b]`` (or ``[b, 1]``) as the newest latent, move the ``cross`` oldest latents into the
        prefix, then drop the ``drop`` oldest positions; ``[b, vocab]`` logits of the new token."""
        if drop and not self.can_slide:
            raise ValueError("this model's window cannot slide without a rebuild: call prefill() (see can_slide)")
        if not 0 <= cross <= self.num_latents:
            raise ValueError(f"cannot move {cross} of {self.num_latents + 1} latents into the prefix")
        if not 0 <= drop <= self.prefix_len + cross:
            raise ValueError(f"cannot drop {drop} positions from a prefix of {self.prefix_len + cross}")
        if self.length >= self.model.max_seq_len and not drop:
            raise ValueError("the window is full: drop positions or rebuild it with prefill()")
        self._make_room()
        token = token.reshape(self.batch_size, 1)
        h, angle = self.model.input_adapter(token, abs_pos=(self.length - self.pos_shift).clamp(min=0).unsqueeze(1))
        attn = self.cross.attention
        x = self.cross.q_norm(h)
        rot = RotaryPositionEmbedding(angle)
        q = attn.project_queries(x, rot)
        self._write_cross_kv(self.length, *attn.project_keys_values(x, rot))
        self.length += 1
        self.latent_h = torch.cat([self.latent_h, h], dim=1)
        self.latent_angles = torch.cat([self.latent_angles, angle], dim=1)
        self.latent_q = torch.cat([self.latent_q, q], dim=1)
        incremental = self.incremental_prefix and not drop
        if incremental:
            prefix_out, prefix_lse = self._prefix_part(q)
            self.prefix_out = torch.cat([self.prefix_out, prefix_out.float()], dim=1)
            self.prefix_lse = torch.cat([self.prefix_lse, prefix_lse], dim=2)
        if not (cross or drop):
            if self.any_pad_latent:
                # A pad latent's cross-attention output is the mean of every value in the window (perceiver-io's
                # rule for a row that sees no key), so the new token changes it, and through the latent
                # self-attention, which has no padding mask, every latent after it: nothing cached is reusable.
                return self._recompute_latents()
            return self._extend_latents()
        self._move_into_prefix(cross, update_prefix_part=incremental)
        if drop:
            self._drop_oldest(drop)
            if self.incremental_prefix:
                # A softmax cannot forget a key stably: the prefix part is recomputed over the remaining prefix.
                self.prefix_out, self.prefix_lse = self._prefix_part(self.latent_q)
        return self._recompute_latents()

    def _move_into_prefix(self, count: int, update_prefix_part: bool) -> None:
        """The ``count`` oldest latents become prefix: remake their keys/values with ``kv_norm`` and (optionally) fold
        them into the prefix part of every remaining latent's attention."""
        if not count:
            return
        attn = self.cross.attention
        p = self.prefix_len
        k, v = attn.project_keys_values(
            self.cross.kv_norm(self.latent_h[:, :count]), RotaryPositionEmbedding(self.latent_angles[:, :count])
        )
        self._write_cross_kv(p, k, v)
        rest = slice(count, None)
        if update_prefix_part:
            out, lse = _attend_with_lse(
                self.latent_q[:, rest], k, v, kv_start=self._kv_start(p, p + count), scale=attn.dp_scale
            )
            self.prefix_out, self.prefix_lse = merge_partial_attention(
                self.prefix_out[:, rest], self.prefix_lse[:, :, rest], out, lse
            )
        self.latent_h, self.latent_angles, self.latent_q = (
            t[:, rest] for t in (self.latent_h, self.latent_angles, self.latent_q)
        )
        self.prefix_len += count
        self.any_pad_latent = bool((self.pads > self.prefix_len).any())

    def _drop_oldest(self, count: int) -> None:
        self.offset += count
        self.length -= count
        self.prefix_len -= count
        self.pads = (self.pads - count).clamp(min=0)
        self.has_pads = self.has_pads and bool((self.pads > 0).any())
        self.pos_shift = self.pos_shift - count  # remaining positions keep their angles: the frame moves instead

    def _cross_attend(self, rows: slice) -> torch.Tensor:
        """Cross-attention layer output (attention + MLP, residuals included) for latents ``rows``."""
        attn = self.cross.attention
        p = self.prefix_len
        first = rows.start or 0
        q = self.latent_q[:, rows]
        if self.prefix_out is None:  # one causal attention over the whole window (rows end at the last latent)
            k, v = self._cross_kv(0, self.length)
            out = attention(q, k, v, causal=True, kv_start=self._kv_start(0, self.length), scale=attn.dp_scale)
        else:
            latent_k, latent_v = self._cross_kv(p, self.length)
            latent_out, latent_lse = _attend_with_lse(  # every latent key before the rows is visible to them too
                q, latent_k, latent_v, causal=True, kv_start=self._kv_start(p, self.length), scale=attn.dp_scale
            )
            out, _ = merge_partial_attention(
                self.prefix_out[:, rows], self.prefix_lse[:, :, rows], latent_out, latent_lse
            )
            out = out.to(self.dtype)
        if self.any_pad_latent:
            # perceiver-io gives a row that sees no key (a pad as query) the mean of all values (see attention.py)
            pad_row = (p + first + torch.arange(q.shape[1], device=self.device)).unsqueeze(0) < self.pads.unsqueeze(1)
            mean_v = self._cross_kv(0, self.length)[1].mean(dim=1, keepdim=True)
            out = torch.where(pad_row.view(*pad_row.shape, 1, 1), mean_v, out)
        h = self.latent_h[:, rows] + attn.project_output(out)
        return self.cross_mlp(h)

    def _self_attention_layer(self, index: int, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """One latent self-attention layer for latents ``rows``, writing their keys/values into the layer cache."""
        layer = self.self_layers[index]
        block = self.model.self_attention
        attn = layer[0].module.attention
        normed = layer[0].module.norm(x)
        rot = RotaryPositionEmbedding(self.latent_angles[:, rows]) if block.uses_rotary(index) else None
        q = attn.project_queries(normed, rot)
        k, v = attn.project_keys_values(normed, rot)
        self.self_k[index][:, rows], self.self_v[index][:, rows] = k, v
        end = rows.stop if rows.stop is not None else self.num_latents
        out = attention(q, self.self_k[index][:, :end], self.self_v[index][:, :end], causal=True, scale=attn.dp_scale)
        return layer[1](x + attn.project_output(out))

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        model = self.model
        if model.config.output_norm:
            h_last = model.out_norm(h_last)
        return model.output_adapter(h_last, txt_embedding=model.input_adapter.txt_embedding)[:, -1]

    def _run_latents(self, rows: slice) -> torch.Tensor:
        x = self._cross_attend(rows)
        for index in range(len(self.self_layers)):
            x = self._self_attention_layer(index, x, rows)
        return self._logits(x[:, -1:])

    def _recompute_latents(self) -> torch.Tensor:
        return self._run_latents(slice(0, self.num_latents))

    def _extend_latents(self) -> torch.Tensor:
        return self._run_latents(slice(self.num_latents - 1, self.num_latents))


class PerceiverIOCompatibleCache:
    """perceiver-io 0.11.0's cached decoding, reproduced token for token on static buffers.

    It is *approximate*: perceiver-io keeps every key/value as first computed and only truncates its caches (the
    self-attention caches to the last ``max_latents - 1`` entries once the latents would exceed ``max_latents``, the
    cross-attention cache to ``max_seq_len - 1`` past ``max_seq_len``). Positions that leave the latents keep
    ``q_norm``-made keys/values, old absolute positions and stale self-attention context, so its logits leave those of
    a full forward once the latents are full. Offered for compatibility; ``PerceiverARCache`` is exact.

    Rotary angles are applied once, when a key is written, in a fixed frame (position of the token in the whole
    sequence minus its row's pads): perceiver-io re-rotates every key each step in a frame that moves with the
    truncation, but rotary attention depends only on position differences, so the scores are the same.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.cache = PerceiverARCache(model, batch_size, capacity_factor=2)
        self.model = model
        self.prefix_len = 0
        self.total_len = 0
        self.cross_span = [0, 0]
        self.self_span = [0, 0]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prefix_len: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """perceiver-io's first forward over the whole prompt (``prefix_len`` fixed for the whole generation)."""
        logits = self.cache.prefill(tokens, prefix_len, pad_mask)
        self.prefix_len, self.total_len = prefix_len, tokens.shape[1]
        self.cross_span = [0, tokens.shape[1]]
        self.self_span = [0, tokens.shape[1] - prefix_len]
        return logits

    @staticmethod
    def _make_room(span: list[int], buffers: list[torch.Tensor]) -> None:
        """Move the live entries to the front when the next write would overflow (once per window length)."""
        if span[1] == buffers[0].shape[1]:
            live = span[1] - span[0]
            for buffer in buffers:
                buffer[:, :live] = buffer[:, span[0] : span[1]].clone()
            span[:] = [0, live]

    @torch.no_grad()
    def append(self, token: torch.Tensor) -> torch.Tensor:
        """Add ``token [b]`` with perceiver-io's truncation rules; ``[b, vocab]`` logits of the new token."""
        cache, model = self.cache, self.model
        input_len = self.cross_span[1] - self.cross_span[0] + 1
        if input_len - self.prefix_len > model.max_latents:
            self.self_span[0] = max(self.self_span[0], self.self_span[1] - (model.max_latents - 1))
        if input_len > model.max_seq_len:
            self.cross_span[0] = max(self.cross_span[0], self.cross_span[1] - (model.max_seq_len - 1))
        self._make_room(self.self_span, cache.self_k + cache.self_v)
        self._make_room(self.cross_span, [cache.cross_k, cache.cross_v])
        self.total_len += 1
        total, pads = self.total_len, cache.pads
        index = self.cross_span[1] - self.cross_span[0]  # of the new token in perceiver-io's truncated window
        pads_in_window = (pads - (total - min(total, model.max_seq_len))).clamp(min=0)
        abs_pos = (index - pads_in_window).clamp(min=0).unsqueeze(1)
        token = token.reshape(cache.batch_size, 1)
        h, _ = model.input_adapter(token, abs_pos=abs_pos)
        angle = model.input_adapter.frq_pos_encoding((total - 1 - pads).clamp(min=0).unsqueeze(1))
        rot = RotaryPositionEmbedding(angle)

        attn = cache.cross.attention
        x = cache.cross.q_norm(h)
        q = attn.project_queries(x, rot)
        k, v = attn.project_keys_values(x, rot)
        start, end = self.cross_span
        cache.cross_k[:, end : end + 1], cache.cross_v[:, end : end + 1] = k, v
        self.cross_span[1] = end + 1
        kv_start = (pads - (total - (end + 1 - start))).clamp(0, end + 1 - start)
        out = attention(q, cache.cross_k[:, start : end + 1], cache.cross_v[:, start : end + 1], kv_start=kv_start,
                        scale=attn.dp_scale)
        h = cache.cross_mlp(h + attn.project_output(out))

        start, end = self.self_span
        for index, layer in enumerate(cache.self_layers):
            attn = layer[0].module.attention
            normed = layer[0].module.norm(h)
            layer_rot = rot if model.self_attention.uses_rotary(index) else None
            q = attn.project_queries(normed, layer_rot)
            k, v = attn.project_keys_values(normed, layer_rot)
            cache.self_k[index][:, end : end + 1], cache.self_v[index][:, end : end + 1] = k, v
            out = attention(q, cache.self_k[index][:, start : end + 1], cache.self_v[index][:, start : end + 1],
                            scale=attn.dp_scale)
            h = layer[1](h + attn.project_output(out))
        self.self_span[1] = end + 1
        return cache._logits(h)
