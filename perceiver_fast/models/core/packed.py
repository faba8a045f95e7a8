"""Query/key/value weights of several attention layers packed side by side, for decoding steps.

A decoding step is bound by kernel launches, not arithmetic: a layer whose queries, keys and values come from one
input projects it with one GEMM over the rows ``[W_q; W_k; W_v]`` instead of three (keys and values alone, a prefix
position's, with the last two blocks). The packed rows are a *copy* of the parameters, so whoever runs decoding steps
calls :meth:`PackedProjections.refresh` at the start of each step: one ``cat`` of every layer's weights (one more for
their biases). Captured with the step in a CUDA graph, the refresh makes each replay read the parameters as they are
then, including changes made in place since the capture; a refresh costs one or two launches where packing saves two
per layer. Only the decoding methods of the layers use the copy, through their key/value caches (where a decoder
attaches it); ``forward`` always reads the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class PackedQKV:
    """One layer's rows of the packed buffer: ``weight [2 * qk_channels + v_channels, in_channels]``, ``bias``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    qk_channels: int

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows ``[W_k; W_v]`` and their bias (contiguous views)."""
        bias = None if self.bias is None else self.bias[self.qk_channels :]
        return self.weight[self.qk_channels :], bias


class PackedProjections:
    """The ``q_proj``/``k_proj``/``v_proj`` of ``attentions`` (``MultiHeadAttention`` modules) in one buffer.

    Packing needs one input width for queries and keys/values in every layer, one dtype and device, and biases in
    all layers or none; otherwise :attr:`packed` is empty and the layers keep projecting with their own modules.
    """

    def __init__(self, attentions: Sequence[nn.Module], dtype: torch.dtype | None = None) -> None:
        """``dtype``: of the packed rows, where it is not the parameters' (autocast's, for steps run under it: one
        cast of the whole pack per step instead of one per layer and step)."""
        self.attentions = list(attentions)
        weights, biases = self._parameters()
        with_bias = [bias is not None for bias in biases]
        packable = (
            bool(weights)
            and (all(with_bias) or not any(with_bias))
            and len({w.shape[1] for w in weights}) == 1
            and len({(t.dtype, t.device) for t in weights + biases if t is not None}) == 1
        )
        self.packed: list[PackedQKV] = []
        if not packable:
            return
        self._shapes = [w.shape for w in weights]
        with torch.no_grad():
            self._weight = torch.cat(weights)
            self._bias = torch.cat(biases) if all(with_bias) else None
        # The rows the layers read: these buffers, or copies of them in ``dtype`` (weight first, then any bias).
        self._cast: list[torch.Tensor] = []
        if dtype is not None and dtype != self._weight.dtype:
            self._cast = [t.to(dtype) for t in (self._weight, self._bias) if t is not None]
        weight = self._cast[0] if self._cast else self._weight
        bias_rows = None if self._bias is None else (self._cast[1] if self._cast else self._bias)
        start = 0
        for attention in self.attentions:
            qk, v = attention.num_qk_channels, attention.num_v_channels
            rows = slice(start, start + 2 * qk + v)
            self.packed.append(PackedQKV(weight[rows], None if bias_rows is None else bias_rows[rows], qk))
            start = rows.stop

    def _parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        # Looked up anew each time: a parameter replaced on its module (not changed in place) is read as well.
        linears = [linear for a in self.attentions for linear in (a.q_proj, a.k_proj, a.v_proj)]
        return [linear.weight for linear in linears], [linear.bias for linear in linears]

    def refresh(self) -> None:
        """Copy the current parameters into the buffer (one kernel for the weights, one for the biases, and one each
        for the copies in another dtype)."""
        if not self.packed:
            return
        weights, biases = self._parameters()
        if [w.shape for w in weights] != self._shapes or (self._bias is None) != (biases[0] is None):
            raise RuntimeError("a query/key/value projection changed its shape or bias since decoding started")
        with torch.no_grad():
            torch.cat(weights, out=self._weight)
            if self._bias is not None:
                torch.cat(biases, out=self._bias)
            for cast, source in zip(self._cast, (self._weight, self._bias)):
                cast.copy_(source)

    def buffers(self) -> list[torch.Tensor]:
        """The packed buffers (for checks that steps reallocate nothing)."""
        if not self.packed:
            return []
        return [t for t in (self._weight, self._bias) if t is not None] + self._cast

    def attach(self) -> None:
        """Hand each layer's key/value cache its rows (a layer without a cache is left alone)."""
        for index, attention in enumerate(self.attentions):
            cache = attention.kv_cache
            if cache is not None:
                cache.packed = self.packed[index] if self.packed else None
