"""CUDA graphs of decoding steps: each kind of step is captured once and replayed, so a token costs one graph launch
instead of hundreds of kernel launches from Python (gpt-fast's approach, without ``torch.compile``).

A step is a function without arguments that reads its inputs from tensors allocated before the capture (the token,
the caches, the window geometry on the device), updates them in place and returns its logits. Capture records the
kernels without running them, so the first capture of a kind is followed by one replay; the first ``warmup`` runs
of a kind are plain calls (they initialise cuBLAS handles, compile and tune the Triton kernels, which capture
cannot). A step must never read a tensor back to the host: capture fails loudly if it does.

With ``compiled``, a kind that repeats is compiled by ``torch.compile`` (inductor fuses the step's small ops into a
few kernels) at its second run, and that compiled step is what the graph captures (after one more plain call that
warms it). Dynamo keeps what it compiled for the whole process: a decoder of the same model configuration, batch
size and dtype runs the code compiled for an earlier one (guards check the tensors it reads, not whose they are).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """Runs decoding steps by kind: plain calls at first, then (``compiled``) each kind that repeats compiled, then
    (``enabled``) one captured CUDA graph per kind, replayed."""

    compile_backend = "inductor"  # torch.compile's backend (tests trace with lighter ones)

    def __init__(self, enabled: bool, *, compiled: bool = False, warmup: int = 2, max_graphs: int = 8) -> None:
        if enabled and not torch.cuda.is_available():
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.enabled = enabled
        self.compiled = compiled
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._compiled_steps: dict[Hashable, Callable[[], torch.Tensor]] = {}
        self._seen: dict[Hashable, int] = {}
        self._pool = None

    def run(self, kind: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The logits of one step of ``kind`` (a static tensor when replayed: read it before the next step).
        ``step`` must do the same thing for every call of a kind (its arguments are part of the kind)."""
        if not (self.enabled or self.compiled):
            return step()
        captured = self._graphs.get(kind)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits
        seen = self._seen[kind] = self._seen.get(kind, 0) + 1
        if self.compiled and seen > 1:
            step = self._compiled_step(kind, step)
        if not self.enabled or seen <= self.warmup + self.compiled or len(self._graphs) >= self.max_graphs:
            return step()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph of this generation
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        graph.replay()  # capture recorded the step without running it
        self._graphs[kind] = (graph, logits)
        return logits

    def _compiled_step(self, kind: Hashable, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        compiled = self._compiled_steps.get(kind)
        if compiled is None:
            if len(self._compiled_steps) >= self.max_graphs:
                return step  # kinds past the budget run as they are, as for graphs
            # fullgraph: a graph break would split the step and leave part of it in Python; fail instead.
            compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=self.compile_backend)
            self._compiled_steps[kind] = compiled
        return functools.partial(_under_raised_recompile_limit, compiled)

    @property
    def captured(self) -> list[Hashable]:
        """The kinds that run as graphs (for tests and benchmarks)."""
        return list(self._graphs)

    def drop_graphs(self) -> None:
        """Drop the graphs and their memory pool (the compiled steps stay: they read their inputs afresh)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def release(self) -> None:
        """Drop the graphs, their memory pool and the compiled steps."""
        self.drop_graphs()
        self._compiled_steps.clear()


def _under_raised_recompile_limit(compiled: Callable[[], torch.Tensor]) -> torch.Tensor:
    # Every kind of step, of every configuration and batch size decoded in this process, is one more compiled entry
    # of the same function (the step runner), and dynamo refuses more than `recompile_limit` entries per function
    # (8 by default), with fullgraph as a hard error. Entries stay for the process: the limit is lifted.
    limit = max(torch._dynamo.config.recompile_limit, 1 << 20)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return compiled()
