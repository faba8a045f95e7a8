"""Small building blocks shared by all models: residual wrapper, parameter init, activation checkpointing."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class Residual(nn.Module):
    """``x + dropout(module(x, ...))``; the residual is the first positional argument."""

    def __init__(self, module: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.module = module
        self.dropout = nn.Dropout(dropout)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.module(*args, **kwargs)
        if self.training and self.dropout.p > 0.0:  # else the identity: not dispatched (a decoding step has 14)
            out = self.dropout(out)
        return out + args[0]


def init_parameters(module: nn.Module, init_scale: float) -> None:
    """perceiver-io's initialisation: Linear and Embedding weights ~ N(0, init_scale), Linear biases zero."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(mean=0.0, std=init_scale)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(mean=0.0, std=init_scale)


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad = False


def run_checkpointed(fn: Callable[..., torch.Tensor], *args, offload: bool = False, **kwargs) -> torch.Tensor:
    """Run ``fn`` under activation checkpointing (recomputed in backward); ``offload`` keeps saved inputs on CPU.

    Replaces fairscale's ``checkpoint_wrapper`` that perceiver-io uses; module names and state-dict keys are
    unaffected because nothing is wrapped.
    """
    if offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)
