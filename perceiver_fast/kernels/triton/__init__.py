"""Triton attention kernels behind the op contract of :mod:`perceiver_fast.kernels.api`.

- ``forward``: flash-style tiled forward, with a split-KV variant (one reduction pass) for few query blocks and for
  decoding over a long cache.
- ``backward``: dq, dk, dv recomputed from the saved log-sum-exp; deterministic (no atomics).
- ``op``: the ``torch.library`` custom ops and their autograd, so ``torch.compile(fullgraph=True)`` traces through.
- ``backend``: the ``"triton"`` backend (and the opt-in ``"flash_attn"`` one) registered with the dispatcher.
- ``config``: tiles and autotune configs; ``env``: the environment switches (interpreter, autotuning).
- ``compile_check``: compiles every kernel for sm_90 without a GPU and reports registers and spills.

Importing this package does not import Triton; only running a kernel does.
"""
