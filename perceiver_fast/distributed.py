"""Process-group plumbing for training under ``torchrun``: init, model wrapping (DDP or FSDP2), reductions, shutdown.

    torchrun --nproc_per_node 2 -m perceiver_fast.cli train clm ...        # DDP
    torchrun --nproc_per_node 8 -m perceiver_fast.cli train clm --fsdp ... # FSDP (``fully_shard``)

`init_distributed` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins the process group: NCCL on CUDA, gloo on CPU. Without those variables (or with a world of
one) it does nothing and the same training code runs as a single process. Everything here is a no-op when no process
group is initialised, so the training loop calls these functions unconditionally.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among `world_size` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates for printing and writes checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group described by the environment, if any, and return this process's context.

    :param device: the device asked for (``cpu`` or ``cuda``); under ``torchrun`` on CUDA each process takes
        ``cuda:LOCAL_RANK``. The backend is NCCL for CUDA, gloo for CPU.
    """
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cpu or cuda devices, not {device}")
    if not is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_initialized() -> bool:
    """True when this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (float64 so that counts and loss sums stay exact enough)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_model(model: torch.nn.Module, context: DistributedContext, fsdp: bool = False) -> torch.nn.Module:
    """Wrap `model` for data-parallel training: `DistributedDataParallel`, or FSDP2 ``fully_shard`` with `fsdp`.

    FSDP shards each attention layer (cross- or self-attention with its MLP) and then the root (embeddings, norms,
    output), so parameters, gradients and optimizer state are split over the processes. It works on CUDA (NCCL) and
    on CPU (gloo). Both start every process from rank 0's weights. In a single process the model is returned
    unchanged; FSDP then raises: there is nothing to shard over.
    """
    if not context.distributed:
        if fsdp:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N (N >= 2)")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # fully_shard keeps each rank's own slice of its own tensors; DDP's constructor broadcasts rank 0's instead.
        # Models built apart on each rank (another seed) would otherwise train as a splice of them: start from rank 0's.
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        for module in _shard_units(model):
            fully_shard(module)
        fully_shard(model)
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers FSDP shards one by one: every attention layer (attention + MLP with their residuals), once each."""
    from perceiver_fast.models.core.attention import CrossAttentionLayer, SelfAttentionLayer

    return [m for m in model.modules() if isinstance(m, (CrossAttentionLayer, SelfAttentionLayer))]  # shared: once


def is_fsdp(model: torch.nn.Module) -> bool:
    """True for a model wrapped by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters an FSDP forward without backward leaves behind (FSDP2 keeps the root's
    unsharded after its forward), so that the registered parameters are the optimizer's sharded ones again."""
    if is_fsdp(model):
        for module in model.modules():
            if is_fsdp(module):
                module.reshard()


def original_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass that also derives from ``FSDPModule``)."""
    if not is_fsdp(model):
        return type(unwrap(model))
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a `DistributedDataParallel` wrapper (FSDP2 keeps the model's own class)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last one of an accumulation (``sync=False``)."""
    if sync:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole, unsharded state dict on CPU for rank 0 (None on other ranks of an FSDP model).

    Under FSDP this is a collective: every process must call it.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return state if dist.get_rank() == 0 else None
    return unwrap(model).state_dict()


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state for a checkpoint: gathered by parameter name under FSDP (collective; None off rank 0),
    else the optimizer's own ``state_dict()``."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return state if dist.get_rank() == 0 else None
    return optimizer.state_dict()


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, saved_format: str = "plain"
) -> None:
    """Load what `full_optimizer_state` saved (`saved_format` ``"fsdp"`` or ``"plain"``), sharding it again under
    FSDP. A state saved under FSDP is keyed by parameter name, so it also loads into a model that is not sharded (a
    resume in one process or under DDP); a plain one is keyed by position and loads only into an unsharded model."""
    if is_fsdp(model) or saved_format == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
