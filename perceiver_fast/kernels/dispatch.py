"""Which backend ``auto`` runs: the measured policy.

Backends only say whether they *can* run a call exactly; this module decides which one *should*. On a CUDA device it
looks the call's class up in the dispatch table measured for that device's compute capability (JSON files in
``dispatch_tables/``, written by ``python -m benchmarks kernels --write-dispatch-table`` from a benchmark run whose raw
results are committed under ``benchmarks/results/``). A class is (dtype, regime, head-dim class, key-length class,
key bounds or not, gradients or not); its row lists the backends fastest first. The first one in that list that can
run the call wins. A class that was not measured at its length takes the row of the nearest measured length of the
same kind. Where no row applies (another device, an unmeasured kind, or none of the row's backends can run the call),
the conservative order does: PyTorch's SDPA kernels for what they run exactly, our kernels for what they cannot (key
bounds, the log-sum-exp), eager last. That keeps the rule the tables enforce: ``auto`` is never slower than the
``F.scaled_dot_product_attention`` a user would otherwise call.

Backends named nowhere in the default order (``cuda``, ``flash-attn-cute``) are used by ``auto`` only where a table
row names them, that is, where they measured fastest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from perceiver_fast.kernels.problem import AttentionProblem, device_capability

TABLE_DIR = Path(__file__).resolve().parent / "dispatch_tables"
DEFAULT_ORDER_CUDA = ("sdpa-flash", "sdpa-cudnn", "flash-attn", "sdpa-efficient", "triton", "eager")
DEFAULT_ORDER_OTHER = ("eager",)


@dataclass(frozen=True)
class ProblemClass:
    """The key of a dispatch-table row."""

    dtype: str
    regime: str
    head_dim: int
    keys: int
    bounds: bool
    grad: bool

    @classmethod
    def of(cls, problem: AttentionProblem) -> ProblemClass:
        return cls(
            dtype=str(problem.dtype).removeprefix("torch."),
            regime=problem.regime,
            head_dim=problem.head_dim_class,
            keys=problem.key_class,
            bounds=problem.has_bounds,
            grad=problem.requires_grad,
        )

    @property
    def kind(self) -> tuple:
        """Everything but the length: rows of one kind stand in for each other at lengths not measured."""
        return (self.dtype, self.regime, self.head_dim, self.bounds, self.grad)

    def __str__(self) -> str:
        bounds = "key bounds" if self.bounds else "no key bounds"
        grad = "with grad" if self.grad else "no grad"
        keys = f"{self.keys // 1024}k" if self.keys < 2**20 else f"{self.keys // 2**20}M"
        return f"{self.dtype} {self.regime} D<={self.head_dim} keys<={keys} {bounds} {grad}"


@dataclass(frozen=True)
class Policy:
    """The backends ``auto`` tries for a class, in order, and where that order comes from (for :func:`explain`)."""

    order: tuple[str, ...]
    source: str


def table_name(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}.json"


@cache
def load_table(capability: tuple[int, int]) -> dict[str, Any] | None:
    """The dispatch table of a compute capability, or ``None`` when none was measured (read once)."""
    path = TABLE_DIR / table_name(capability)
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        rows = {_row_class(row): row for row in table["rows"]}
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(_unreadable_table_message(path, e)) from e
    return {**table, "rows_by_class": rows}


def _row_class(row: dict[str, Any]) -> ProblemClass:
    return ProblemClass(
        row["dtype"], row["regime"], int(row["head_dim"]), int(row["keys"]), bool(row["bounds"]), bool(row["grad"])
    )


def _unreadable_table_message(path: Path, error: Exception) -> str:
    """Which table cannot be used, why, and how to get a good one back (json's own errors name no file)."""
    return (
        f"the dispatch table {path} cannot be read ({type(error).__name__}: {error}): it was cut short or edited by "
        f"hand. Restore the shipped one (`git checkout -- perceiver_fast/kernels/dispatch_tables/{path.name}` in a "
        "clone, or reinstall perceiver_fast), or write it again from benchmark results with `python -m benchmarks "
        "kernels --write-dispatch-table --from-json FILE...`"
    )


def _nearest_row(rows: dict[ProblemClass, dict], wanted: ProblemClass) -> tuple[ProblemClass, dict] | None:
    """The row of ``wanted``'s class, or of the nearest measured length of its kind (ties: the shorter)."""
    if wanted in rows:
        return wanted, rows[wanted]
    same_kind = [key for key in rows if key.kind == wanted.kind]
    if not same_kind:
        return None
    nearest = min(same_kind, key=lambda key: (abs(math.log(key.keys / wanted.keys)), key.keys))
    return nearest, rows[nearest]


def _measured_row(device: torch.device, wanted: ProblemClass) -> tuple[dict | None, str, int]:
    """The table row of ``wanted`` (or of its nearest measured length) for a CUDA ``device``, where it comes from,
    and the number of keys of the class it measured; ``(None, why there is none, 0)`` without a device, a table or a
    row of that kind."""
    capability = device_capability(device)
    if capability is None:
        return None, "no CUDA device to look a dispatch table up for", 0
    table = load_table(capability)
    if table is None:
        return None, f"no dispatch table for sm_{capability[0]}{capability[1]}", 0
    found = _nearest_row(table["rows_by_class"], wanted)
    if found is None:
        return None, f"{table_name(capability)} has no row for {wanted}", 0
    row_class, row = found
    nearest = "" if row_class == wanted else f", the nearest measured length for {wanted}"
    source = f"{table_name(capability)} row {row_class}{nearest} (measured on {table['device']}, {table['date']})"
    return row, source, row_class.keys


# Backends whose lead over SDPA a row measured at more keys does not carry to fewer: on the H100 (2026-11-28) the
# Triton prefix-causal forward went from 0.75x SDPA flash at 16k keys to 0.27x at 4k (head dim 64), and at head dim
# 128 from 1.43x at 64k to 1.06x at 16k. A shorter call than its row's class tries SDPA's kernels before them.
OUR_KERNELS = ("triton", "cuda")


# Policies already decided, by (which policy, capability, class of the call, return_lse): dispatch asks on every
# call, and reading a table row (the nearest-length search, the source text) costs more than many kernels. Each entry
# keeps the table it was read from and is used only while load_table still returns that table, so a table read
# again (or one a test puts in its place) is never answered from a stale entry.
_policies: dict[tuple, tuple[dict[str, Any] | None, Policy]] = {}
_other_devices: dict[str, Policy] = {}


def _cached(problem: AttentionProblem, which: str, decide: Callable[[AttentionProblem], Policy]) -> Policy:
    capability = device_capability(problem.device)
    table = None if capability is None else load_table(capability)
    # Every field ProblemClass.of reads, as a tuple: hashing one is cheaper than building a ProblemClass.
    key = (which, capability, problem.dtype, problem.regime, problem.head_dim_class, problem.key_class,
           problem.has_bounds, problem.requires_grad, problem.return_lse)  # fmt: skip
    cached = _policies.get(key)
    if cached is not None and cached[0] is table:
        return cached[1]
    policy = decide(problem)
    _policies[key] = (table, policy)
    return policy


def policy_for(problem: AttentionProblem) -> Policy:
    """The order ``auto`` tries backends in for ``problem``."""
    device_type = problem.device.type
    if device_type != "cuda":
        policy = _other_devices.get(device_type)
        if policy is None:
            policy = _other_devices[device_type] = Policy(
                DEFAULT_ORDER_OTHER, f"{device_type} tensors: the eager reference"
            )
        return policy
    return _cached(problem, "attention", _cuda_policy)


def _cuda_policy(problem: AttentionProblem) -> Policy:
    wanted = ProblemClass.of(problem)
    row, source, measured_keys = _measured_row(problem.device, wanted)
    if row is None:
        return Policy(DEFAULT_ORDER_CUDA, f"{source}: the conservative order")
    # The conservative order follows the row's backends, for calls none of them can run.
    order = tuple(row["order"]) + tuple(name for name in DEFAULT_ORDER_CUDA if name not in row["order"])
    if measured_keys > wanted.keys and order[0] in OUR_KERNELS:
        sdpa = tuple(name for name in row["order"] if name.startswith(("sdpa-", "flash-attn")))  # measured in the row
        if sdpa:
            order = sdpa + tuple(name for name in order if name not in sdpa)
            source += "; SDPA's kernels first: our kernels' lead was measured at more keys"
    if problem.return_lse and order[-1] != "eager":
        # Rows are measured without the log-sum-exp. Eager returns it from a dense float32 pass over the whole score
        # matrix (1 GiB for 16 heads of 1024 queries over 16k keys), nothing like the SDPA call its row timed.
        order = tuple(name for name in order if name != "eager") + ("eager",)
        source += "; eager last: its log-sum-exp is a dense pass the row did not measure"
    return Policy(order, source)


DECODE_STEP_REGIME = "decode-step"


def decode_step_policy(problem: AttentionProblem) -> Policy:
    """How ``auto`` runs a fused decoding step (:mod:`perceiver_fast.kernels.decode`) whose attention part is
    ``problem``: ``("cuda", ...)`` only where the table's ``decode-step`` row of its class measured the fused kernel
    fastest, else the composite step (the fused kernel is opt-in until measured)."""
    if problem.device.type != "cuda":
        return Policy(("composite",), f"{problem.device.type} tensors: the composite step")
    return _cached(problem, DECODE_STEP_REGIME, _decode_step_cuda_policy)


def _decode_step_cuda_policy(problem: AttentionProblem) -> Policy:
    row, source, _ = _measured_row(problem.device, replace(ProblemClass.of(problem), regime=DECODE_STEP_REGIME))
    if row is None:
        return Policy(("composite",), f"{source}: the composite step (the fused kernel is opt-in)")
    return Policy(tuple(row["order"]), source)
