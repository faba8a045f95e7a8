"""The attention problems the benchmarks time, and how each maps onto the dispatch policy's classes.

A :class:`Shape` is the benchmark's view of one call; :meth:`Shape.problem_class` builds the same
:class:`~perceiver_fast.kernels.problem.AttentionProblem` the op builds at run time and classifies it with
:meth:`ProblemClass.of <perceiver_fast.kernels.dispatch.ProblemClass.of>`, so the benchmark and ``auto`` can never
disagree about which table row a shape belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from perceiver_fast.kernels.dispatch import ProblemClass
from perceiver_fast.kernels.problem import AttentionProblem

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """``q [B, Nq, Hq, Dqk]`` over ``k/v [B, Nk, Hkv, D]``, optionally with per-row key bounds.

    ``kv_start`` left-pads every row by that many keys (a left-padded batch of prompts); ``kv_len`` is the longest
    row of a preallocated cache of ``nk`` keys, the other rows a little shorter (a ragged batch being decoded). Zero
    means the argument is not passed at all, which is a different dispatch class from passing trivial bounds.
    """

    family: str
    batch: int
    nq: int
    nk: int
    hq: int
    hkv: int
    dqk: int
    dv: int
    causal: bool
    kv_start: int = 0
    kv_len: int = 0

    @property
    def label(self) -> str:
        dims = f"D{self.dqk}" if self.dqk == self.dv else f"D{self.dqk}/{self.dv}"
        heads = f"H{self.hq}" if self.hq == self.hkv else f"H{self.hq}/{self.hkv}"
        label = f"{self.family} B{self.batch} N{self.nq} M{self.nk} {heads} {dims}"
        if self.kv_start:
            label += f" kv_start={self.kv_start}"
        if self.kv_len:
            label += f" kv_len<={self.kv_len}"
        return label

    @property
    def has_bounds(self) -> bool:
        return bool(self.kv_start or self.kv_len)

    def bounds(self) -> tuple[list[int] | None, list[int] | None]:
        """``(kv_start, kv_len)`` per row, ``None`` for an argument not passed.

        Cache rows shrink by up to a quarter of ``kv_len`` across the batch, so a kernel cannot get away with one
        length for every row.
        """
        starts = [self.kv_start] * self.batch if self.kv_start else None
        lengths = None
        if self.kv_len:
            lengths = [self.kv_len - (row * self.kv_len) // (4 * self.batch) for row in range(self.batch)]
        return starts, lengths

    def bound_tensors(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`bounds` as the int32 tensors the op takes."""
        return tuple(
            None if values is None else torch.tensor(values, dtype=torch.int32, device=device)
            for values in self.bounds()
        )

    def visible_keys(self) -> list[int]:
        """Keys inside each row's bounds (what a bounds-aware kernel reads)."""
        starts, lengths = self.bounds()
        starts = starts or [0] * self.batch
        lengths = lengths or [self.nk] * self.batch
        return [max(length - start, 0) for start, length in zip(starts, lengths)]

    def flops(self, mode: str) -> float:
        """Unmasked forward FLOPs over all batches and heads (times 3.5 with the backward).

        Per row ``2(Dqk+Dv)[N(M-N) + N(N+1)/2]`` causal (bottom-right, ``N <= M``), ``2(Dqk+Dv)NM`` otherwise, with
        ``M`` the row's keys inside its bounds.
        """
        n = self.nq
        pairs = 0.0
        for m in self.visible_keys():
            pairs += n * (m - n) + n * (n + 1) / 2 if self.causal and n <= m else n * m
        forward = 2 * (self.dqk + self.dv) * pairs * self.hq
        return forward * (3.5 if mode == "fwd+bwd" else 1.0)

    def bytes(self, dtype: torch.dtype, mode: str) -> float:
        """Least memory traffic: read q and the keys/values inside the bounds, write the output (twice that,
        roughly, with the backward)."""
        size = torch.empty((), dtype=dtype).element_size()
        width = self.dqk + self.dv
        elements = self.batch * self.nq * self.hq * width + sum(self.visible_keys()) * self.hkv * width
        return elements * size * (2.0 if mode == "fwd+bwd" else 1.0)

    def problem(self, dtype: torch.dtype, requires_grad: bool, device: str = "cuda") -> AttentionProblem:
        """The problem :func:`perceiver_fast.attention` would describe this call as (no tensors needed)."""
        return AttentionProblem(
            device=torch.device(device),
            dtype=dtype,
            batch=self.batch,
            num_queries=self.nq,
            num_keys=self.nk,
            num_q_heads=self.hq,
            num_kv_heads=self.hkv,
            qk_head_dim=self.dqk,
            v_head_dim=self.dv,
            causal=self.causal,
            has_kv_start=bool(self.kv_start),
            has_kv_len=bool(self.kv_len),
            dropout_p=0.0,
            requires_grad=requires_grad,
            return_lse=False,
        )

    def problem_class(self, dtype: torch.dtype, mode: str) -> ProblemClass:
        """The dispatch-table row this shape is measured for in ``mode`` (``fwd`` = no grad)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return ProblemClass.of(self.problem(dtype, requires_grad=mode == "fwd+bwd"))

    def as_row(self) -> dict:
        """The ``shape_*`` fields of a result row."""
        return {f"shape_{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict) -> Shape:
        """The shape of a result row; fields missing from older rows (key bounds) take their defaults."""
        return cls(**{f.name: row[f"shape_{f.name}"] for f in fields(cls) if f"shape_{f.name}" in row})
