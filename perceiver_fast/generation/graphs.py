"""CUDA graphs of decoding steps: each kind of step is captured once and replayed, so a token costs one graph launch
instead of hundreds of kernel launches from Python (gpt-fast's approach, without ``torch.compile``).

A step is a function without arguments that reads its inputs from tensors allocated before the capture (the token,
the caches, the window geometry on the device), updates them in place and returns its logits. Capture records the
kernels without running them, so the first capture of a kind is followed by one replay; the first ``warmup`` runs
of a kind are plain calls (they initialise cuBLAS handles, compile and tune the Triton kernels, which capture
cannot). A step must never read a tensor back to the host: capture fails loudly if it does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """Runs decoding steps by kind: plain calls at first, then one captured CUDA graph per kind, replayed."""

    def __init__(self, enabled: bool, *, warmup: int = 2, max_graphs: int = 8) -> None:
        if enabled and not torch.cuda.is_available():
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.enabled = enabled
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._seen: dict[Hashable, int] = {}
        self._pool = None

    def run(self, kind: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The logits of one step of ``kind`` (a static tensor when replayed: read it before the next step)."""
        if not self.enabled:
            return step()
        captured = self._graphs.get(kind)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits
        self._seen[kind] = self._seen.get(kind, 0) + 1
        if self._seen[kind] <= self.warmup or len(self._graphs) >= self.max_graphs:
            return step()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph of this generation
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        graph.replay()  # capture recorded the step without running it
        self._graphs[kind] = (graph, logits)
        return logits

    @property
    def captured(self) -> list[Hashable]:
        """The kinds that run as graphs (for tests and benchmarks)."""
        return list(self._graphs)

    def release(self) -> None:
        """Drop the graphs and their memory pool."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
