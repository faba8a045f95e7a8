"""What every backend of the attention op is told about a call, what a backend must provide, and when the op may
read tensor values on the host.

No backend lives here, so that the backends, the registry and the dispatch policy can all import this module
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch._subclasses.fake_tensor import FakeTensor

# Up to this many queries a call is a decoding step over a cache (split-KV kernels, bandwidth-bound).
DECODE_MAX_QUERIES = 16


@dataclass(frozen=True)
class AttentionProblem:
    """The shape of a call, without tensor data: what a backend needs to say whether it can run it exactly."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    num_queries: int
    num_keys: int
    num_q_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    causal: bool
    has_kv_start: bool
    has_kv_len: bool
    dropout_p: float
    requires_grad: bool
    return_lse: bool
    # "auto", or the backend asked for by name: a backend may accept some calls only when asked for explicitly
    # (Triton runs CPU tensors in its interpreter for tests, never under auto).
    requested: str = "auto"

    @property
    def has_bounds(self) -> bool:
        return self.has_kv_start or self.has_kv_len

    @property
    def grouped(self) -> bool:
        return self.num_q_heads != self.num_kv_heads

    @property
    def regime(self) -> str:
        """``decode`` (few queries), ``prefix-causal`` (Perceiver AR, ``Nq < Nk``), ``causal`` (``Nq == Nk``, or more
        queries than keys) or ``non-causal``: the classes the dispatch tables are measured for."""
        if self.num_queries <= DECODE_MAX_QUERIES and self.num_queries < self.num_keys:
            return "decode"
        if not self.causal:
            return "non-causal"
        return "prefix-causal" if self.num_queries < self.num_keys else "causal"

    @property
    def key_class(self) -> int:
        """The number of keys rounded up to a power of 4 from 1024 (1k, 4k, 16k, 64k, 256k, 1M, ...): the fastest
        kernel can change with the length, and the tables are measured per length class."""
        bucket = 1024
        while bucket < self.num_keys:
            bucket *= 4
        return bucket

    @property
    def head_dim_class(self) -> int:
        """The widest head dim rounded up to 64, 128 or 256 (the kernels' tile classes); larger dims are 512."""
        widest = max(self.qk_head_dim, self.v_head_dim)
        for tile in (64, 128, 256):  # a loop, not next() over a generator: dispatch asks on every call
            if widest <= tile:
                return tile
        return 512


_capabilities: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """A CUDA device's compute capability, asked once per device (dispatch asks on every call); ``None`` when torch
    has no CUDA device (fake CUDA tensors can still be traced on such a machine)."""
    index = device.index if device.index is not None else 0
    if index not in _capabilities:
        if not torch.cuda.is_available():
            return None
        _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return _capabilities[index]


NO_CUDA = "torch sees no CUDA device (fake or meta CUDA tensors only)"


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs nothing: a real CPU tensor, outside ``torch.compile`` tracing. On a GPU a
    read is a device sync; meta and fake tensors (``FakeTensorMode``, tracing) have no values at all."""
    return t.device.type == "cpu" and not isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


class AttentionBackend(Protocol):
    """A way to compute the op. ``unsupported_reason`` says whether it *can* run a call exactly (``None``) or why
    not; whether it *should* is the dispatch policy's business (:mod:`perceiver_fast.kernels.dispatch`)."""

    name: str

    def unsupported_reason(self, problem: AttentionProblem) -> str | None: ...

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        kv_start: torch.Tensor | None,
        kv_len: torch.Tensor | None,
        scale: float,
        return_lse: bool,
        dropout_p: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
