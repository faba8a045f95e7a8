"""Train Perceiver AR (causal) and Perceiver IO (masked) language models: one readable loop, nanoGPT's spirit.

    from perceiver_fast.train import TrainConfig, train_clm, train_mlm
    metrics = train_clm(TrainConfig(data="notes/*.txt", max_steps=500, out_dir="runs/notes"))
    metrics = train_mlm(TrainConfig(data="notes/*.txt", max_steps=500, out_dir="runs/notes-mlm"))

Both tasks share `train`: a `Task` object builds the model, the batches and the loss; the loop does the rest. Each
step draws ``batch_size`` chunks (see `perceiver_fast.data.text`), runs ``grad_accum_steps`` forward/backward passes,
clips the gradient norm and takes an AdamW step; the learning rate warms up linearly, then follows a cosine down to
``min_lr``. The causal task predicts, as in perceiver-io, only the latent positions (the last ``max_latents`` tokens
of each sequence); the masked task predicts the 15% of tokens its collator selects (`perceiver_fast.data.mlm`).

Every ``eval_every`` steps the validation loss, perplexity and bits per byte are printed; every step goes to
``metrics.csv`` in ``out_dir`` (and to TensorBoard with ``tensorboard=True``). A loss (or gradient norm) that is no
longer finite stops the run with a ValueError before the step's update, a validation loss that is not finite before
the step's checkpoint: diverged weights never replace a checkpoint. A step whose batch holds no token to predict (a
masked batch where masking selected none) makes no update and logs no loss. At the end (and every
``checkpoint_every`` steps) the model is saved with ``save_pretrained`` next to ``training_state.pt`` (optimizer,
scheduler, data order, step), ``train_config.json`` and ``checkpoint.json`` (the step and a SHA-256 of each file).
A checkpoint is written whole into ``out_dir/.checkpoint-staging`` first and only then moved into ``out_dir``, so a
failed or killed write leaves the previous checkpoint as it was (see `save_checkpoint`). ``resume=True`` continues
exactly where it stopped; Ctrl-C saves the last completed step the same way before it stops the run (one that lands
during a step's update, or during the final checkpoint, is held back until that is complete: see `_ctrl_c_held`).

A run directory belongs to one run: training into one that holds a checkpoint needs ``resume=True`` (continue it) or
``overwrite=True`` (replace it), and resuming refuses a config that differs from the saved ``train_config.json`` in
anything but `RESUMABLE_FIELDS`, or data of another size. While a run goes on it holds a lock on ``out_dir/.lock``
(`LOCK_FILE`): a second run into the same directory stops at once. A resume with another ``max_steps`` keeps the
learning rate continuous: from the saved step on, a cosine from that step's rate down to ``min_lr`` at the new
``max_steps`` (see `lr_at`).

Under ``torchrun --nproc_per_node N`` the same code trains data-parallel (`perceiver_fast.distributed`): DDP, or FSDP
with ``fsdp=True``. ``batch_size`` stays the global batch: every process draws the same global batch and trains on
its own ``batch_size / N`` rows, so the run follows the single-process run's data order and loss. Only rank 0 prints,
writes logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from perceiver_fast import distributed
from perceiver_fast.data.mlm import MLMCollator
from perceiver_fast.data.text import (
    CLMCollator,
    CLMData,
    looks_like_local_path,
    pack_chunks,
    prepare_clm_data,
    refuse_empty_corpus,
    split_train_valid,
    tokenize_documents,
    tokenizer_vocab_size,
)
from perceiver_fast.data.tokenizer import VOCAB_SIZE as BYTES_VOCAB_SIZE
from perceiver_fast.data.tokenizer import BytesTokenizer
from perceiver_fast.distributed import DistributedContext
from perceiver_fast.durable import replace_atomically, sync
from perceiver_fast.models.core.pretrained import CONFIG_FILE, WEIGHTS_FILE
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig

try:
    import fcntl
except ImportError:  # Windows: no flock, and runs go unlocked there
    fcntl = None

TRAINING_STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINT_FILE = "checkpoint.json"  # the manifest: step + size and SHA-256 of every checkpoint file; written last
STAGING_DIR = ".checkpoint-staging"  # a checkpoint being written, inside out_dir (a rename never crosses devices)
# Locked (flock) by the process that writes out_dir for the whole run: a second run into the same directory would
# delete the first one's staged checkpoint and interleave its rows in metrics.csv. The file itself stays behind and
# means nothing: only a lock held on it does (the kernel releases it when its process ends, however it ends).
LOCK_FILE = ".lock"
# TrainConfig fields a resume may change: how long to train, what to evaluate and log, where and how to run. Every
# other field shapes the data, the model or the optimisation, and changing it would silently make another run.
RESUMABLE_FIELDS = frozenset(
    {
        "max_steps",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "out_dir",
        "resume",
        "overwrite",
        "tensorboard",
        "progress",
        "device",
        "precision",
        "fsdp",
        "cache_dir",
    }
)
# TrainConfig fields only the causal task uses: Perceiver AR's prefix (dropout, rotary and absolute positions), its
# residual dropout and output norm, and the random truncation of its batches. The masked task's Perceiver IO model has
# none of them, so `train_mlm` refuses values other than the defaults instead of silently ignoring them.
CLM_ONLY_FIELDS = frozenset(
    {
        "num_self_attention_rotary_layers",
        "cross_attention_dropout",
        "residual_dropout",
        "output_norm",
        "abs_pos_emb",
        "random_truncation",
        "min_seq_len",
    }
)
# And the fields only the masked task uses: its token embedding width and its masking.
MLM_ONLY_FIELDS = frozenset({"num_input_channels", "mask_prob", "whole_word_masking"})
METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ["step", "train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl", "val_bpb"]
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run needs. Model fields have `CausalLanguageModelConfig`'s names.

    For the masked task (`train_mlm`) they map onto a Perceiver IO `MaskedLanguageModelConfig`: ``max_latents`` ->
    ``num_latents``, ``num_channels`` -> ``num_latent_channels``, ``num_heads`` -> every attention's heads,
    ``num_self_attention_layers`` -> ``num_self_attention_layers_per_block``, the widening factors as named,
    ``post_attention_dropout`` -> ``dropout``; ``num_input_channels`` is the token embedding width. The fields in
    `CLM_ONLY_FIELDS` have no masked counterpart and must keep their defaults there.
    """

    # Model (vocab_size comes from the tokenizer: 262 for UTF-8 bytes).
    max_seq_len: int = 512
    max_latents: int = 128
    num_channels: int = 128
    num_heads: int = 4
    num_self_attention_layers: int = 3
    num_self_attention_rotary_layers: int = 1
    self_attention_widening_factor: int = 4
    cross_attention_widening_factor: int = 4
    cross_attention_dropout: float = 0.5
    post_attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    output_norm: bool = False
    abs_pos_emb: bool = True
    init_scale: float = 0.02
    num_input_channels: int | None = None  # masked LM only: token embedding width; None: num_channels
    mask_prob: float = 0.15  # masked LM only: fraction of tokens (or words) selected for prediction
    whole_word_masking: bool = False  # masked LM only: select whole words (runs of non-whitespace bytes)
    # Data: a file, directory, glob or dataset name (None: the Python standard library's sources).
    data: str | None = None
    dataset_config: str | None = None  # a hub dataset's configuration, e.g. wikitext-103-raw-v1 (network needed)
    stdlib_max_bytes: int = 4_000_000
    valid_fraction: float = 0.05
    random_truncation: bool = False
    min_seq_len: int | None = None  # shortest truncated length; None: max_latents
    cache_dir: str | None = None  # None: $PERCEIVER_FAST_CACHE or ~/.cache/perceiver_fast
    # Optimisation (batch_size is the global batch of one micro-step, over all processes).
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 50
    max_steps: int = 1000
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # Evaluation, checkpoints and logs.
    eval_every: int = 100  # 0: evaluate only at the start and the end
    eval_batches: int = 20
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    out_dir: str = "runs/clm"
    resume: bool = False  # continue the run in out_dir (its train_config.json must match but for RESUMABLE_FIELDS)
    overwrite: bool = False  # replace the checkpoint in out_dir with a new run (without it such a run is refused)
    tensorboard: bool = False  # also log to out_dir/tensorboard when torch.utils.tensorboard imports
    # Runtime.
    seed: int = 0
    device: str = "cpu"  # "auto": CUDA when available
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 is a no-op on CPU
    fsdp: bool = False  # under torchrun: shard with FSDP instead of DDP
    progress: bool = True  # show a progress bar (evaluations are printed either way)

    def __post_init__(self) -> None:
        positive = ["max_seq_len", "max_latents", "num_channels", "num_heads", "batch_size", "grad_accum_steps"]
        for name in positive + ["eval_batches"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["max_steps", "warmup_steps", "eval_every", "checkpoint_every"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_latents > self.max_seq_len:
            raise ValueError(f"max_latents ({self.max_latents}) must be <= max_seq_len ({self.max_seq_len})")
        if self.min_seq_len is not None and not self.max_latents <= self.min_seq_len <= self.max_seq_len:
            raise ValueError(
                f"min_seq_len ({self.min_seq_len}) must be in [max_latents, max_seq_len] "
                f"= [{self.max_latents}, {self.max_seq_len}]: every sequence needs room for all latents"
            )
        if self.lr <= 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        # Checked here, before any data is read: out of range, a dropout fails deep in the first step (or, below 0,
        # silently drops nothing), a negative init_scale fails building the model, a negative weight_decay grows the
        # weights.
        for name in ("cross_attention_dropout", "post_attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("init_scale", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_channels % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide num_channels ({self.num_channels})")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.dataset_config is not None and self.data is None:
            raise ValueError("dataset_config needs data: the name of a hub dataset (e.g. wikitext)")
        if self.resume and self.overwrite:
            raise ValueError("give resume=True (continue the run in out_dir) or overwrite=True (replace it), not both")

    def model_config(self, vocab_size: int) -> CausalLanguageModelConfig:
        """The causal model's config: our fields that `CausalLanguageModelConfig` has, plus `vocab_size`."""
        names = {f.name for f in fields(CausalLanguageModelConfig)}
        values = {k: v for k, v in asdict(self).items() if k in names}
        return CausalLanguageModelConfig(**values, vocab_size=vocab_size)

    def mlm_model_config(self, vocab_size: int) -> Any:
        """The masked model's `MaskedLanguageModelConfig` (see the class docstring for the mapping)."""
        from perceiver_fast.models.text.mlm import MaskedLanguageModelConfig, TextDecoderConfig, TextEncoderConfig

        shared = dict(dropout=self.post_attention_dropout, init_scale=self.init_scale)
        encoder = TextEncoderConfig(
            vocab_size=vocab_size,
            max_seq_len=self.max_seq_len,
            num_input_channels=self.num_input_channels or self.num_channels,
            num_cross_attention_heads=self.num_heads,
            num_self_attention_heads=self.num_heads,
            num_self_attention_layers_per_block=self.num_self_attention_layers,
            cross_attention_widening_factor=self.cross_attention_widening_factor,
            self_attention_widening_factor=self.self_attention_widening_factor,
            **shared,
        )
        decoder = TextDecoderConfig(
            vocab_size=vocab_size,
            max_seq_len=self.max_seq_len,
            num_cross_attention_heads=self.num_heads,
            cross_attention_widening_factor=self.cross_attention_widening_factor,
            **shared,
        )
        return MaskedLanguageModelConfig(
            encoder=encoder, decoder=decoder, num_latents=self.max_latents, num_latent_channels=self.num_channels
        )


# ---------------------------------------------------------------------------------------------------- pieces


def lr_at(step: int, config: TrainConfig, decay_from: tuple[int, float] | None = None) -> float:
    """Learning rate at `step`: linear warmup from 0 to `lr`, then a cosine from `lr` down to `min_lr`.

    `decay_from` ``(start, start_lr)`` is the schedule of a run resumed at step ``start`` with another ``max_steps``:
    from ``start`` on, a cosine from ``start_lr`` (the rate the saved schedule gave that step) down to ``min_lr`` at
    the new ``max_steps``. The rate therefore never jumps on resume: a longer run stretches the rest of the decay, a
    run resumed after its end stays at ``min_lr``. (Warmup does not depend on ``max_steps``, so a resume inside the
    warmup needs no `decay_from`: its cosine simply ends at the new ``max_steps``.)
    """
    min_lr = config.min_lr if config.min_lr is not None else config.lr / 10
    if decay_from is not None and step >= decay_from[0]:
        start, start_lr = decay_from
        progress = min(1.0, (step - start) / max(1, config.max_steps - start))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (start_lr - min_lr)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def _resumed_decay(
    start_step: int, config: TrainConfig, saved_max_steps: int, saved_decay_from: tuple[int, float] | None
) -> tuple[int, float] | None:
    """The `decay_from` of `lr_at` for a run resumed at `start_step` whose checkpoint was trained towards
    `saved_max_steps` on `saved_decay_from`: unchanged when ``max_steps`` is, else a new cosine from the saved rate."""
    if config.max_steps == saved_max_steps or start_step < config.warmup_steps:
        return saved_decay_from
    saved_rate = lr_at(start_step, replace(config, max_steps=saved_max_steps), saved_decay_from)
    return (start_step, saved_rate)


class EpochSampler:
    """Batches of chunk indices: a fresh seeded permutation each epoch; its state is two ints, so resuming is exact.

    The last incomplete batch of an epoch is dropped (so every batch has the same size).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError("no training chunks: the corpus is too small for max_seq_len")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_items, generator=generator)
        return self._order

    def next_indices(self) -> torch.Tensor:
        if self.position + self.batch_size > self.num_items:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        indices = self._permutation()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def clm_loss(
    model: torch.nn.Module,
    labels: torch.Tensor,
    x: torch.Tensor,
    pad_mask: torch.Tensor | None,
    max_latents: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the latent positions, as perceiver-io's ``LitCausalLanguageModel`` computes it.

    The last ``min(max_latents, n)`` positions are latents (``prefix_len = n - num_latents``); labels at padding are
    ignored. ``reduction="sum"`` gives the sum over the counted positions (the loop divides by the global count).
    """
    num_latents = min(max_latents, x.shape[1])
    if pad_mask is not None and bool(pad_mask.any()):
        labels = labels.masked_fill(pad_mask, -100)
    else:
        pad_mask = None  # an all-False mask changes nothing; skip the masking work
    logits = model(x, prefix_len=x.shape[1] - num_latents, pad_mask=pad_mask).logits
    labels = labels[:, -logits.shape[1] :]
    logits = logits.float()  # the loss in fp32 under bf16 autocast
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction
    )


def mlm_loss(
    model: torch.nn.Module,
    labels: torch.Tensor,
    x: torch.Tensor,
    pad_mask: torch.Tensor | None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy at the masked positions (labels -100 elsewhere), as perceiver-io's ``LitMaskedLanguageModel``."""
    if pad_mask is not None and not bool(pad_mask.any()):
        pad_mask = None
    logits = model(x, pad_mask=pad_mask).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction
    )


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CLMTask:
    """Causal language modelling with Perceiver AR: chunks of ``max_seq_len + 1`` -> ``(labels, x, pad_mask)``."""

    name = "clm"
    model_class = CausalLanguageModel
    unused_fields = MLM_ONLY_FIELDS  # TrainConfig fields this task ignores (refused unless default)
    vocab_size: int | None = None  # the only vocabulary the task can train on (None: any)

    def chunk_len(self, config: TrainConfig) -> int:
        return config.max_seq_len + 1

    def model_config(self, config: TrainConfig, vocab_size: int) -> Any:
        return config.model_config(vocab_size)

    def check_model(self, model: torch.nn.Module, config: TrainConfig, vocab_size: int) -> None:
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} != the data's {vocab_size}")
        # A chunk of max_seq_len tokens has max_latents latents and the rest as prefix: the model needs room for both.
        prefix_len = config.max_seq_len - config.max_latents
        if model.max_latents < config.max_latents or model.max_prefix_len < prefix_len:
            raise ValueError(
                f"the model (max_seq_len {model.max_seq_len}, max_latents {model.max_latents}: a prefix of at most "
                f"{model.max_prefix_len}) cannot take the config's chunks (max_seq_len {config.max_seq_len}, "
                f"max_latents {config.max_latents}: a prefix of {prefix_len}); the config needs max_latents <= "
                f"{model.max_latents} and max_seq_len - max_latents <= {model.max_prefix_len}"
            )

    def collator(self, config: TrainConfig, generator: torch.Generator, train: bool) -> Callable[[Any], Batch]:
        if not train:
            return CLMCollator()
        min_seq_len = config.min_seq_len if config.min_seq_len is not None else config.max_latents
        return CLMCollator(random_truncation=config.random_truncation, min_seq_len=min_seq_len, generator=generator)

    def count(self, batch: Batch, config: TrainConfig) -> int:
        """How many labels the loss averages over: the latent positions that are not padding."""
        labels, x, pad_mask = batch
        num_latents = min(config.max_latents, x.shape[1])
        return int((~pad_mask[:, -num_latents:]).sum()) if labels.numel() else 0

    def loss_sum(self, model: torch.nn.Module, batch: Batch, config: TrainConfig) -> torch.Tensor:
        labels, x, pad_mask = batch
        return clm_loss(model, labels, x, pad_mask, config.max_latents, reduction="sum")


class MLMTask:
    """Masked language modelling with a Perceiver IO `MaskedLanguageModel` on chunks of ``max_seq_len`` tokens."""

    name = "mlm"
    unused_fields = CLM_ONLY_FIELDS
    vocab_size = BYTES_VOCAB_SIZE  # MLMCollator masks with the bytes tokenizer's [MASK] and special ids

    @property
    def model_class(self) -> type:
        from perceiver_fast.models.text.mlm import MaskedLanguageModel

        return MaskedLanguageModel

    def chunk_len(self, config: TrainConfig) -> int:
        return config.max_seq_len

    def model_config(self, config: TrainConfig, vocab_size: int) -> Any:
        return config.mlm_model_config(vocab_size)

    def check_model(self, model: torch.nn.Module, config: TrainConfig, vocab_size: int) -> None:
        encoder = model.config.encoder
        if encoder.vocab_size != vocab_size:
            raise ValueError(f"model vocab_size {encoder.vocab_size} != the data's {vocab_size}")
        if min(encoder.max_seq_len, model.config.decoder.max_seq_len) < config.max_seq_len:
            raise ValueError(f"the model's max_seq_len is smaller than the config's ({config.max_seq_len})")

    def collator(self, config: TrainConfig, generator: torch.Generator, train: bool) -> Callable[[Any], Batch]:
        return MLMCollator.for_tokenizer(
            BytesTokenizer(), mask_prob=config.mask_prob, generator=generator, whole_word=config.whole_word_masking
        )

    def count(self, batch: Batch, config: TrainConfig) -> int:
        return int((batch[0] != -100).sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch, config: TrainConfig) -> torch.Tensor:
        labels, x, pad_mask = batch
        return mlm_loss(model, labels, x, pad_mask, reduction="sum")


Task = CLMTask | MLMTask


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given to `torch.device`, checked.

    :raises ValueError: an unknown device (``"tpu"``), or one this torch cannot use: CUDA on a CPU-only build or on a
        machine without a visible GPU, an index past the last device, MPS or XPU where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is a CPU-only build"
                if torch.version.cuda is None
                else "no CUDA device is visible"
            )
            raise ValueError(f"device {device!r}: CUDA is not available ({why}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif resolved.type != "cpu":
        backend = getattr(torch, resolved.type, None)  # torch.mps, torch.xpu, ...: each knows whether it can run
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            raise ValueError(f"device {device!r}: {resolved.type} is not available on this machine")
    return resolved


def _check_task_fields(config: TrainConfig, task: Task) -> None:
    """Refuse a config that sets fields `task` ignores (``task.unused_fields``) to anything but their defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    given = {name: getattr(config, name) for name in sorted(task.unused_fields)}
    if changed := {name: value for name, value in given.items() if value != defaults[name]}:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        owner = "mlm only (the masked model's embedding width and masking)" if task.name == "clm" else (
            "clm only (Perceiver AR's prefix, rotary layers, output norm and random truncation)"
        )
        raise ValueError(f"train {task.name} does not use {settings}: {owner}; leave them at their defaults")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 for ``"bf16"`` or ``"auto"`` on CUDA; None (fp32) otherwise, bf16 on CPU included
    (bf16 matrix products are slower than fp32 on CPUs without AMX, such as the development machine)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if device.type == "cuda" and precision in ("auto", "bf16") else None


def _shard(batch: Batch, context: DistributedContext) -> Batch:
    """This process's rows of a global batch: a contiguous block of ``batch_size / world_size`` rows."""
    if not context.distributed:
        return batch
    return tuple(t.tensor_split(context.world_size)[context.rank] for t in batch)  # type: ignore[return-value]


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG (dropout) at a step: resuming reproduces it, and each process draws its own."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2**62)


@contextlib.contextmanager
def _ctrl_c_held(second_interrupts: bool = False) -> Iterator[list[int]]:
    """Hold Ctrl-C (SIGINT) back while the block runs and deliver it once the block is done; SIGTERM too, while
    training takes it as Ctrl-C (`_sigterm_as_ctrl_c`).

    Python raises `KeyboardInterrupt` wherever the main thread happens to be when the signal comes; inside the block
    the signal is only recorded (in the list this yields), and after the block the handler that was there before gets
    it: by default a `KeyboardInterrupt`, raised at the end of the ``with``. With `second_interrupts`, a second Ctrl-C
    while one is held raises at once, so that a long block (a checkpoint written to a slow disk) stays stoppable.
    Only the main thread may set signal handlers: in another thread, or when SIGINT's handler was not installed from
    Python (and so cannot be put back), SIGINT runs unguarded; and where SIGINT is ignored (a process started in
    the background), it stays ignored.
    """
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    guarded = [signal.SIGINT] if previous[signal.SIGINT] not in (None, signal.SIG_IGN) else []
    if previous[signal.SIGTERM] is _sigterm_interrupts:
        guarded.append(signal.SIGTERM)

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)
        if second_interrupts and len(held) > 1:
            raise KeyboardInterrupt

    for signum in guarded:
        signal.signal(signum, hold)
    try:
        yield held
    finally:
        for signum in guarded:
            signal.signal(signum, previous[signum])
    if held:  # the block is done: deliver what it held, as the previous handler would have
        first = held[0]
        if callable(previous[first]):
            previous[first](first, None)
        elif previous[first] == signal.SIG_DFL:
            signal.raise_signal(first)  # the default action ends the process


def _sigterm_interrupts(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """While the block runs, SIGTERM (what job schedulers, ``docker stop`` and ``kill`` send) takes Ctrl-C's path: the
    last completed step is saved, and where Ctrl-C is held back (an update, the final checkpoint) so is SIGTERM.
    Without this, SIGTERM's default action ends the process at once and a run with ``checkpoint_every=0`` loses
    everything. A handler someone else installed is left alone, as is every thread but the main one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _sigterm_interrupts)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    task: Task,
    config: TrainConfig,
    context: DistributedContext | None = None,
) -> float | None:
    """Mean validation loss (nats per predicted token) over the first ``eval_batches`` batches of `chunks`; None when
    they hold no token to predict (a masked task whose masking selected none), which has no mean.

    Batches are formed as in a single process; each process scores its rows and the sums are added up, so the result
    does not depend on the number of processes. The masked task masks with a generator seeded by ``config.seed``, so
    every evaluation scores the same masked tokens.
    """
    context = context or DistributedContext(device=resolve_device(config.device))
    eval_model = model if distributed.is_fsdp(model) else distributed.unwrap(model)  # DDP's module needs no peers
    was_training = eval_model.training
    eval_model.eval()
    collate = task.collator(config, torch.Generator().manual_seed(config.seed), train=False)
    dtype = autocast_dtype(config.precision, context.device)
    total, count = 0.0, 0.0
    for start in range(0, min(len(chunks), config.batch_size * config.eval_batches), config.batch_size):
        batch = _shard(collate(chunks[start : start + config.batch_size]), context)
        weight = 1.0
        if batch[0].shape[0] == 0:  # a short last batch left this process no rows
            if not distributed.is_fsdp(model):
                continue
            # FSDP gathers the weights in the forward, which every process must join: score one row, count nothing.
            batch, weight = _shard(collate(chunks[:1].expand(context.world_size, -1)), context), 0.0
        batch = tuple(t.to(context.device) for t in batch)
        with torch.autocast(context.device.type, dtype=dtype, enabled=dtype is not None):
            loss = task.loss_sum(eval_model, batch, config)
        total += weight * loss.item()
        count += weight * task.count(batch, config)
    eval_model.train(was_training)
    distributed.reshard(model)
    total, count = distributed.all_reduce_sum([total, count], context.device)
    return total / count if count else None


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean loss in nats; ``math.inf`` where that passes the largest float (a loss above about
    709.78, which a diverging run reaches), instead of the OverflowError of `math.exp`."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _norm_value(norm: torch.Tensor) -> float:
    """The gradient norm `clip_grad_norm_` returns, as a float. Under FSDP it is a DTensor: `full_tensor` gives the
    norm of the whole gradient (the same on every process), where a torch may leave it as partial norms per shard."""
    full_tensor = getattr(norm, "full_tensor", None)
    return float(full_tensor() if callable(full_tensor) else norm)


def _not_finite(**values: float | None) -> str | None:
    """``"loss nan, gradient norm inf"``: the given values that are not finite (None: not measured), or None."""
    bad = [
        f"{name.replace('_', ' ')} {value}"
        for name, value in values.items()
        if value is not None and not math.isfinite(value)
    ]
    return ", ".join(bad) or None


def _divergence_error(
    step: int, problem: str, last_saved: int | None, out_dir: Path, config: TrainConfig
) -> ValueError:
    """The error that stops a run whose loss (or gradient norm) is no longer finite: its weights (or, before the
    update, its gradient) are NaN or inf from here on, and so would every later step and checkpoint be."""
    if last_saved is None:
        kept, new_run = "the run has no checkpoint, and none was written", "a new run"
    else:
        kept = f"the last checkpoint, of step {last_saved} in {out_dir}, was kept and nothing was written after it"
        new_run = "a new run (overwrite=True, --overwrite; neither can change on resume)"
    clip = f"a smaller grad_clip (now {config.grad_clip:g})" if config.grad_clip > 0 else "grad_clip (now off)"
    return ValueError(
        f"training diverged at step {step} ({problem}); {kept}. Try a lower lr (now {config.lr:g}) or {clip} in "
        f"{new_run}"
    )


def save_checkpoint(
    out_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: EpochSampler,
    step: int,
    config: TrainConfig,
    metrics: dict[str, Any],
    context: DistributedContext | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into `out_dir`, replacing the previous one only once the new one is complete.

    The checkpoint is the model (``save_pretrained``: ``config.json`` + ``model.safetensors``), ``training_state.pt``
    (optimizer, scheduler, data order, step, and `extra_state`), ``train_config.json`` and ``checkpoint.json``, the
    manifest (step, size and SHA-256 of every other file). All are written into ``out_dir/.checkpoint-staging``,
    synced to disk, and the manifest last; only then are they moved into `out_dir`, the manifest last again. A write
    that fails (a full disk, an exception, Ctrl-C) removes the staging folder and leaves the previous checkpoint as it
    was. A process killed while moving the files leaves the complete staging folder behind: a resume finishes the
    move, and the manifest lets it tell a complete checkpoint from a mixed one. Nothing else in `out_dir`
    (``metrics.csv``, ``tensorboard/``) is touched, and `out_dir` stays a directory ``from_pretrained`` loads.

    `model` may be wrapped (DDP or FSDP): the unwrapped model is saved. Under FSDP every process must call this (the
    shards are gathered); only rank 0 writes.
    """
    out_dir = Path(out_dir)
    is_main = context is None or context.is_main
    optimizer_state = distributed.full_optimizer_state(model, optimizer)
    if distributed.is_fsdp(model):
        full_state = distributed.full_model_state(model)
        if is_main:  # a plain copy of the model to save: built on the meta device, then given the gathered weights
            with torch.device("meta"):
                plain = distributed.original_class(model)(model.config)
            plain.load_state_dict(full_state, assign=True)
    else:
        plain = distributed.unwrap(model)
    if not is_main:
        return out_dir
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "optimizer_format": "fsdp" if distributed.is_fsdp(model) else "plain",
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "history": metrics.get("history", []),
        **(extra_state or {}),
    }
    staging = out_dir / STAGING_DIR
    if staging.exists():  # what an earlier failed write left
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        plain.save_pretrained(staging)
        torch.save(state, staging / TRAINING_STATE_FILE)
        (staging / TRAIN_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
        files = {path.name: _describe_file(path, sync=True) for path in sorted(staging.iterdir())}
        manifest = staging / (CHECKPOINT_FILE + ".tmp")
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
        sync(manifest)
        os.replace(manifest, staging / CHECKPOINT_FILE)  # from here on the staged checkpoint is complete
        sync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _finish_staged_checkpoint(out_dir)
    return out_dir


def _describe_file(path: Path, sync: bool = False) -> dict[str, Any]:
    """Size and SHA-256 of a file (and, with `sync`, the file forced to disk on the way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _finish_staged_checkpoint(out_dir: Path) -> bool:
    """Move a complete staged checkpoint into `out_dir` (files first, manifest last); discard an incomplete one.

    Safe to run again after a kill at any point: a file already moved is no longer in the staging folder, and the
    staging folder keeps its manifest until every other file has been moved. Returns whether a checkpoint was moved.
    """
    staging = out_dir / STAGING_DIR
    if not staging.is_dir():
        return False
    manifest = staging / CHECKPOINT_FILE
    if not manifest.is_file():  # a write that never completed (or a move that completed but for the cleanup)
        shutil.rmtree(staging)
        return False
    for name in json.loads(manifest.read_text())["files"]:
        if (staging / name).is_file():
            os.replace(staging / name, out_dir / name)
    os.replace(manifest, out_dir / CHECKPOINT_FILE)
    sync(out_dir)
    shutil.rmtree(staging)
    return True


def checkpoint_problem(out_dir: str | Path, only: Collection[str] | None = None) -> str | None:
    """Why the checkpoint in `out_dir` cannot be trusted (files that differ from its manifest), or None.

    A directory without ``checkpoint.json`` (a checkpoint of an older version, or a ``save_pretrained`` model) has
    nothing to check against and passes. `only` limits the check to these files of the manifest (to load the model
    one needs ``config.json`` and ``model.safetensors``, not the optimizer state).
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / CHECKPOINT_FILE
    if not manifest_path.is_file():
        return None  # written before manifests existed: nothing to check against
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"the checkpoint's manifest {manifest_path} is unreadable ({e})"
    if only is not None:
        expected_files = {name: expected for name, expected in expected_files.items() if name in only}
    problems = []
    for name, expected in expected_files.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _describe_file(path) != expected:
            problems.append(f"{name} is not the file saved at step {manifest.get('step')}")
    if not problems:
        return None
    return (
        f"the checkpoint in {out_dir} is inconsistent: {'; '.join(problems)} (a checkpoint write was interrupted, "
        "or files were replaced by hand)"
    )


def _checkpoint_files(out_dir: Path) -> list[Path]:
    """The files and folders of a checkpoint present in `out_dir` (not metrics.csv or TensorBoard logs)."""
    names = [CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE, TRAIN_CONFIG_FILE, CHECKPOINT_FILE, STAGING_DIR]
    return [out_dir / name for name in names if (out_dir / name).exists()]


def _holds_checkpoint(out_dir: Path) -> bool:
    """Whether `out_dir` holds a checkpoint (or a model), complete or staged; a staged write that never completed is
    debris, not a run to protect."""
    found = [path.name for path in _checkpoint_files(out_dir)]
    return any(name != STAGING_DIR for name in found) or (out_dir / STAGING_DIR / CHECKPOINT_FILE).is_file()


def _load_training_state(path: Path) -> dict[str, Any]:
    """``training_state.pt``, or a ValueError naming it and saying what to do when it cannot be read (torch tells of a
    truncated file only ``[Errno 22] Invalid argument`` or a zip archive it cannot read, and names no file)."""
    try:
        # On the CPU first: a GPU run's optimizer state resumes on another device (load_state_dict moves it).
        return torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # one line: the command line prints one
        raise ValueError(
            f"cannot resume: {path} is unreadable ({reason}): the checkpoint is damaged (cut short by a crash or a "
            "full disk, or copied in part); restore the run directory from a copy, or start anew with overwrite=True "
            "(--overwrite)"
        ) from e


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's rule: decay matrices and embeddings, not biases and LayerNorm parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def _config_diff(saved: Any, expected: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two (nested) config dicts: ``{"encoder.max_seq_len": (saved, given)}``."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        diff: dict[str, tuple[Any, Any]] = {}
        for key in expected:
            if key in saved:
                diff.update(_config_diff(saved[key], expected[key], f"{prefix}{key}."))
        return diff
    return {} if saved == expected else {prefix.rstrip("."): (saved, expected)}


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an `out_dir` that is, or lies under, a file (found before any work, not at the first write)."""
    for path in [out_dir, *out_dir.parents]:
        if path.exists():
            if not path.is_dir():
                where = "" if path == out_dir else f" ({path} is a file)"
                raise ValueError(f"out_dir {str(out_dir)!r} is not a directory{where}")
            return


def _lock_run_dir(out_dir: Path, create: bool) -> tuple[int | None, str | None]:
    """Take the exclusive lock on `out_dir` (its `LOCK_FILE`) without waiting: ``(fd, None)`` while this process holds
    it (closing `fd` releases it), or ``(None, why not)`` when another run holds it.

    ``(None, None)`` where there is nothing to lock: no ``fcntl`` (Windows), a file system without locks, or a missing
    `out_dir` that is not to be created (a resume, which then stops on the missing checkpoint).
    """
    if fcntl is None or not (create or out_dir.is_dir()):
        return None, None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # returned, not raised: the other processes wait for rank 0's verdict in a collective
        return None, f"cannot use {out_dir} as the run directory: {e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()  # its pid, written once it held the lock
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        return None, (
            f"{out_dir} is in use by another run{who}: two runs in one directory would overwrite each other's "
            "checkpoints and metrics.csv; wait for it to end, or choose another out_dir"
        )
    except OSError:  # the file system has no locks (some network mounts): better an unlocked run than none
        os.close(fd)
        return None, None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, None


@contextlib.contextmanager
def _run_dir_locked(out_dir: Path, context: DistributedContext, create: bool) -> Iterator[None]:
    """Hold `out_dir`'s lock while the block runs, or stop at once when another run holds it (see `LOCK_FILE`).

    Only rank 0 writes the run directory, so only rank 0 locks it; every process stops if it could not.
    """
    created = _missing_dirs(out_dir) if context.is_main and create else []
    fd, busy = _lock_run_dir(out_dir, create) if context.is_main else (None, None)
    try:
        (failed,) = distributed.all_reduce_sum([float(busy is not None)], context.device)
        if failed:
            raise ValueError(busy or f"rank 0 cannot lock {out_dir} (its error says why)")
        yield
    finally:
        if fd is not None:
            if created:  # while still holding the lock, so that no other run can hold it when the file goes
                _remove_unused_run_dir(out_dir, created)
            os.close(fd)  # releases the lock; the file stays (removing it would race with a run opening it)


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unused_run_dir(out_dir: Path, created: list[Path]) -> None:
    """Take back the directories a run created for its lock when it wrote nothing else there (it stopped on bad
    data or settings): a failed start must not leave an empty run directory behind. Called with the lock held: a run
    that opened the file meanwhile found it locked and left, and one that creates it anew after the unlink makes the
    directory non-empty, which stops the removal."""
    if {p.name for p in out_dir.iterdir()} != {LOCK_FILE}:
        return
    (out_dir / LOCK_FILE).unlink(missing_ok=True)
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # not empty (something else was written there meanwhile): leave it and its parents
            return


def _read_train_config(out_dir: Path) -> dict[str, Any] | None:
    """The saved ``train_config.json`` of the run in `out_dir`, or None when there is none."""
    path = out_dir / TRAIN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a training config")
    return values


def _same_data(saved: Any, given: Any) -> bool:
    """Whether two ``data`` values name the same corpus: equal, or two spellings of one local path."""
    if saved == given:
        return True
    if not isinstance(saved, str) or not isinstance(given, str):
        return False
    return Path(saved).expanduser().resolve() == Path(given).expanduser().resolve()


def _train_config_diff(saved: dict[str, Any], config: TrainConfig, ignore: Any = ()) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, given)}`` for the fields of `config` that differ from a saved ``train_config.json``.

    Fields missing from `saved` (added by later versions) count as equal, as do fields named in `ignore`."""
    diff = {}
    for f in fields(config):
        if f.name in ignore or f.name not in saved:
            continue
        value = getattr(config, f.name)
        same = _same_data(saved[f.name], value) if f.name == "data" else saved[f.name] == value
        if not same:
            diff[f.name] = (saved[f.name], value)
    return diff


def _format_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name}: {saved!r} saved, {given!r} given" for name, (saved, given) in diff.items())


def _describe_run(out_dir: Path, config: TrainConfig) -> str:
    """`` (step N; ... differs: ...)`` about the run saved in `out_dir`, for messages; empty when nothing is known."""
    details = []
    try:
        details.append(f"step {json.loads((out_dir / CHECKPOINT_FILE).read_text())['step']}")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a checkpoint of an older version, or none: the step is only a courtesy
    try:
        saved = _read_train_config(out_dir)
    except ValueError:
        saved = None
    if saved is not None:
        # out_dir is the directory itself, however it was spelled (relative or absolute) this time.
        diff = _train_config_diff(saved, config, ignore={"resume", "overwrite", "progress", "out_dir"})
        details.append(f"this run differs in {_format_diff(diff)}" if diff else "the same config as this run")
    return f" ({'; '.join(details)})" if details else ""


def _token_digest(*chunks: torch.Tensor) -> str:
    """The first 16 hex digits of a SHA-256 over the token ids, in order: a resume refuses a corpus edited to the same
    size, another file of the same size under the same name, or another tokenizer with the same vocabulary size,
    none of which the counts tell apart. Hashing is a fraction of a second per hundred million tokens."""
    digest = hashlib.sha256()
    for t in chunks:
        digest.update(str(t.dtype).encode())
        digest.update(t.detach().cpu().contiguous().numpy())
    return digest.hexdigest()[:16]


def prepare_data(config: TrainConfig, chunk_len: int, tokenizer: Any = None) -> CLMData:
    """The run's chunks of `chunk_len` tokens: `prepare_clm_data` on ``config.data``, or a hub dataset with a
    configuration (``data="wikitext", dataset_config="wikitext-103-raw-v1"``): its training split's ``text`` rows.

    Rows that all end with a newline (empty rows aside) are the lines of one text, as WikiText stores them, and are
    joined into one document. Otherwise every row is a document of its own (an article, a sentence), followed by the
    separator as without a configuration: joining them would glue the end of one to the start of the next.

    A ``data`` that looks like a local path (see `looks_like_local_path`) and names nothing raises
    `FileNotFoundError` at once instead of being tried as a hub dataset name (which offline retries for long).
    """
    if isinstance(config.data, str) and not any(c in config.data for c in "*?["):  # globs fail fast already
        if looks_like_local_path(config.data) and not Path(config.data).expanduser().exists():
            raise FileNotFoundError(f"no such file or directory: {config.data!r}")
    if config.dataset_config is None:
        return prepare_clm_data(
            config.data,
            max_seq_len=chunk_len - 1,
            tokenizer=tokenizer,
            valid_fraction=config.valid_fraction,
            seed=config.seed,
            cache_dir=config.cache_dir,
            stdlib_max_bytes=config.stdlib_max_bytes,
            exclude=[config.out_dir],  # `data="."` must not take in this run's checkpoints, logs and configs
        )
    try:
        import datasets

        rows = datasets.load_dataset(config.data, config.dataset_config, split="train")["text"]
    except Exception as e:
        raise ValueError(f"could not load dataset {config.data!r} ({config.dataset_config}): {e}") from e
    rows = list(rows)
    documents = ["".join(rows)] if all(row.endswith("\n") for row in rows if row) else rows
    num_bytes = sum(len(document.encode("utf-8")) for document in documents)
    refuse_empty_corpus(num_bytes, len(documents))
    tokenizer = tokenizer if tokenizer is not None else BytesTokenizer()
    tokens = tokenize_documents(documents, tokenizer)
    train, valid = split_train_valid(pack_chunks(tokens, chunk_len), config.valid_fraction, config.seed)
    return CLMData(train, valid, tokenizer_vocab_size(tokenizer), tokens.numel(), num_bytes, len(documents))


def _metrics_step(row: dict[Any, Any]) -> int | None:
    """The step of a ``metrics.csv`` row, or None when the row is cut short or garbled (a crash or a full disk
    mid-row): every column present, the step an int and the other values numbers or empty."""
    if None in row or any(row.get(column) is None for column in METRICS_COLUMNS):  # too many or too few fields
        return None
    try:
        for column in METRICS_COLUMNS[1:]:
            if row[column]:
                float(row[column])
        return int(row["step"])
    except ValueError:
        return None


def _keep_metrics_rows(path: Path, start_step: int, log: Callable) -> bool:
    """Cut ``metrics.csv`` back to the rows of the steps up to `start_step`, for a run resumed there. Returns False,
    touching nothing, when `path` is not a metrics file of this version (another header).

    Only rows that parse and whose steps increase are kept; the others (a row cut short, the rows of another run
    interleaved) are dropped with a warning. The kept rows are written to a temporary file that replaces `path` only
    once it is on disk: a kill during the rewrite leaves the whole file as it was.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:  # garbled bytes: a row that won't parse
        reader = csv.DictReader(fh)
        if reader.fieldnames != METRICS_COLUMNS:
            return False
        kept: list[dict[str, str]] = []
        dropped = 0
        for row in reader:
            step = _metrics_step(row)
            if step is not None and step > start_step:
                continue  # logged after the checkpoint: the resumed run logs these steps again
            if step is None or (kept and step <= int(kept[-1]["step"])):
                dropped += 1
            else:
                kept.append(row)
    if dropped:
        log(f"warning: {path}: dropped {dropped} of its rows (cut short, garbled or out of step order)")

    def write_kept(temporary: Path) -> None:
        with open(temporary, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    replace_atomically(path, write_kept, path.with_name(f".{path.name}.tmp"))
    sync(path.parent)
    return True


def _holds_metrics_rows(path: Path) -> bool:
    """Whether `path` is a file with more than our header line in it."""
    if not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        lines = list(itertools.islice(fh, 2))
    return len(lines) > 1 or (bool(lines) and lines[0].strip() != ",".join(METRICS_COLUMNS))


# What `_move_aside` names the rows of an earlier run: metrics.<UTC time>[-N].csv.
METRICS_ASIDE = re.compile(r"metrics\.\d{8}T\d{6}Z(-\d+)?\.csv")


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _move_aside(path: Path) -> Path:
    """Rename `path` (``metrics.csv``) to a free ``metrics.<UTC time>[-N].csv`` beside it; returns the new path.
    (The run directory is locked, so the name found free stays free.)"""
    stamp, n = _utc_stamp(), 0
    aside = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
    os.replace(path, aside)
    return aside


class MetricsLog:
    """``metrics.csv`` (one row per step, evaluations in the same row) and, optionally, TensorBoard; rank 0 only.

    A resumed run keeps the rows up to its start step (`_keep_metrics_rows`). A new run moves the rows it finds (a run
    stopped before its first checkpoint leaves nothing else) aside to ``metrics.<UTC time>.csv``, and says so, unless
    it replaces that run (`replace`: ``overwrite=True``).
    """

    def __init__(
        self,
        out_dir: Path,
        start_step: int,
        tensorboard: bool,
        enabled: bool,
        log: Callable,
        replace: bool = False,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS_FILE
        # A run resumed at step 0 (one saved with max_steps=0) logs its step 0 again: it keeps no row of it.
        keep_through = start_step if start_step > 0 else -1
        resumed = resume and path.is_file() and _keep_metrics_rows(path, keep_through, log)
        if not resumed and not replace and _holds_metrics_rows(path):
            aside = _move_aside(path)
            log(f"{path} held the rows of an earlier run (stopped before its first checkpoint?): moved to {aside}")
        self.file = open(path, "a" if resumed else "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=METRICS_COLUMNS)
        if not resumed:
            self.csv.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except Exception as e:  # the tensorboard package is optional
                log(f"tensorboard logging is off: {e}")

    def write(self, step: int, **values: float | None) -> None:
        if not self.enabled:
            return
        self.csv.writerow({"step": step, **{k: "" if v is None else f"{v:.6g}" for k, v in values.items()}})
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


# ---------------------------------------------------------------------------------------------------- the loop


def train_clm(
    config: TrainConfig,
    data: CLMData | None = None,
    tokenizer: Any = None,
    model: CausalLanguageModel | None = None,
) -> dict[str, Any]:
    """Train (or, with ``config.resume``, continue training) a Perceiver AR `CausalLanguageModel`; see `train`."""
    return train(config, CLMTask(), data=data, tokenizer=tokenizer, model=model)


def train_mlm(
    config: TrainConfig, data: CLMData | None = None, tokenizer: Any = None, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Train (or continue training) a Perceiver IO `MaskedLanguageModel` on chunks of ``max_seq_len`` tokens masked
    by `MLMCollator` (15% of tokens, 80/10/10 replacement); see `train`. The tokenizer must be the bytes tokenizer
    (the collator needs its ``[MASK]`` and special ids)."""
    if tokenizer is not None and not isinstance(tokenizer, BytesTokenizer):
        raise ValueError("train_mlm masks with the bytes tokenizer's special ids: pass tokenizer=None")
    return train(config, MLMTask(), data=data, tokenizer=tokenizer, model=model)


def train(
    config: TrainConfig,
    task: Task,
    data: CLMData | None = None,
    tokenizer: Any = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train a model for `task` (`CLMTask` or `MLMTask`); returns the run's metrics.

    Under ``torchrun`` the process group is joined here and left at the end. ``out_dir`` is locked for the whole run
    (see `LOCK_FILE`): a run into a directory another run is using stops at once with a ValueError.

    :param config: the run's settings.
    :param task: what to train: the model, the batches, the loss.
    :param data: prepared chunks of ``task.chunk_len(config)`` tokens; by default `prepare_data`.
    :param tokenizer: passed to `prepare_clm_data` (default: UTF-8 bytes).
    :param model: train this model in place (e.g. to fine-tune one) instead of a new one built from `config`.
    :return: ``step``, ``start_step``, ``num_params``, ``world_size``, ``first_train_loss``, ``train_loss`` (mean of
        the last 10 steps), ``initial_val_loss`` and ``val_loss``/``val_ppl``/``val_bpb`` (None without validation
        data), ``tokens_per_s``, ``elapsed_s``, ``data_s``, ``out_dir`` and ``history`` (one ``(step, loss)`` per step;
        the loss None for a step whose batch held no token to predict, which makes no update).
    :raises ValueError: among others, when training diverges: a loss, or the gradient norm with ``grad_clip``, that
        is not finite stops the run before that step's update (a validation loss, before that step's checkpoint), and
        the checkpoint already in ``out_dir`` stays as it was.
    """
    _check_task_fields(config, task)
    joined = not distributed.is_initialized()
    context = distributed.init_distributed(resolve_device(config.device))
    try:
        if config.fsdp and not context.distributed:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N (N >= 2)")
        if model is not None and config.resume:
            raise ValueError("give either a model or resume=True, not both")
        out_dir = Path(config.out_dir)
        _check_out_dir(out_dir)
        with _run_dir_locked(out_dir, context, create=not config.resume):
            result = _train(config, task, data, tokenizer, model, context)
        if joined:
            # Leave together: a process tearing down its gloo connections while another still writes its last files
            # and talks to it can abort at exit. Not after an error, where the others may never arrive.
            distributed.barrier()
        return result
    finally:
        if joined:
            distributed.shutdown()


def _train(
    config: TrainConfig,
    task: Task,
    data: CLMData | None,
    tokenizer: Any,
    model: torch.nn.Module | None,
    context: DistributedContext,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    device, world = context.device, context.world_size
    out_dir = Path(config.out_dir)

    def log(message: str) -> None:
        if context.is_main:
            tqdm.write(message)  # prints without breaking the progress bar

    # ---- the run directory (locked by `train`): continue the run in it (resume), replace it (overwrite), or refuse
    # (before the data)
    saved_config = None
    if config.resume:
        problem = None
        if context.is_main:  # only rank 0 writes checkpoints, so only rank 0 may finish an interrupted one
            _finish_staged_checkpoint(out_dir)
            problem = checkpoint_problem(out_dir)
        (failed,) = distributed.all_reduce_sum([float(problem is not None)], device)  # every process stops, or none
        if failed:
            raise ValueError(f"cannot resume: {problem or f'rank 0 found the checkpoint in {out_dir} inconsistent'}")
        state_path = out_dir / TRAINING_STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"cannot resume: {state_path} not found")
        if not (out_dir / CHECKPOINT_FILE).is_file():
            log(f"warning: {out_dir} has no {CHECKPOINT_FILE} (an older checkpoint): its files cannot be checked")
        saved_config = _read_train_config(out_dir)
        if saved_config is None:
            log(f"warning: {out_dir / TRAIN_CONFIG_FILE} is missing: cannot check that this config matches the run's")
        elif changed := _train_config_diff(saved_config, config, ignore=RESUMABLE_FIELDS | task.unused_fields):
            raise ValueError(
                f"cannot resume the run in {out_dir} with another config ({_format_diff(changed)}); "
                f"a resume may change only {', '.join(sorted(RESUMABLE_FIELDS))}"
            )
    elif _holds_checkpoint(out_dir) and not config.overwrite:
        raise ValueError(
            f"{out_dir} already holds a checkpoint{_describe_run(out_dir, config)}: resume=True (--resume) continues "
            "it, overwrite=True (--overwrite) replaces it, or choose another out_dir"
        )

    # ---- data (rank 0 first, so that the others read its token cache)
    if data is None:
        if not context.is_main:
            distributed.barrier()
        data = prepare_data(config, task.chunk_len(config), tokenizer)
        if context.is_main:
            distributed.barrier()
    if data.train.shape[1] != task.chunk_len(config):
        raise ValueError(f"data chunks have {data.train.shape[1]} tokens, expected {task.chunk_len(config)}")
    if task.vocab_size is not None and data.vocab_size != task.vocab_size:
        raise ValueError(
            f"{task.name} trains on the bytes tokenizer's ids (vocab_size {task.vocab_size}): the data has a "
            f"vocabulary of {data.vocab_size}; prepare it with tokenizer=None"
        )
    global_batch_size = min(config.batch_size, len(data.train))  # as EpochSampler draws them
    if global_batch_size % world:
        capped = "" if global_batch_size == config.batch_size else f" (batch_size {config.batch_size}, capped at the "
        capped += f"{len(data.train)} training chunks)" if capped else ""
        raise ValueError(
            f"the batch of {global_batch_size} chunks{capped} does not split evenly over {world} processes"
        )
    data_s = time.perf_counter() - t_start
    log(
        f"data: {data.num_documents} documents, {data.num_tokens:,} tokens ({data.num_bytes:,} bytes), "
        f"{len(data.train)} train / {len(data.valid)} valid chunks of {task.chunk_len(config)}"
        + (" (cached)" if data.from_cache else "")
    )
    if config.batch_size > len(data.train):
        log(
            f"warning: batch_size {config.batch_size} is more than the {len(data.train)} training chunks: each step "
            "trains on all of them (an epoch per step)"
        )
    if not len(data.valid) and config.valid_fraction > 0:
        log(
            f"warning: no validation chunks (valid_fraction {config.valid_fraction} of {len(data.train)} chunks of "
            f"{task.chunk_len(config)} tokens): no validation loss"
        )

    # ---- model, optimizer, schedule, data order
    torch.manual_seed(config.seed)
    state = None
    data_fingerprint = {
        "train_chunks": len(data.train),
        "valid_chunks": len(data.valid),
        "tokens": data.num_tokens,
        "vocab_size": data.vocab_size,
        "token_sha256": _token_digest(data.train, data.valid),
    }
    decay_from: tuple[int, float] | None = None  # see lr_at: set once a resume changed max_steps
    if model is not None:
        task.check_model(model, config, data.vocab_size)
    elif config.resume:
        state_path = out_dir / TRAINING_STATE_FILE
        model = task.model_class.from_pretrained(out_dir)
        changed = _config_diff(asdict(model.config), asdict(task.model_config(config, data.vocab_size)))
        if changed:
            raise ValueError(f"cannot resume with a different model config (saved, given): {changed}")
        state = _load_training_state(state_path)
        # An FSDP checkpoint's optimizer state is keyed by parameter name and loads into any run; the plain one
        # (keyed by position) only into a run without FSDP.
        if state.get("optimizer_format", "plain") == "plain" and config.fsdp:
            raise ValueError(
                f"{state_path} holds the optimizer state of a run without --fsdp (DDP or one process): resume it "
                "without --fsdp"
            )
        saved_data = state.get("data", data_fingerprint)  # checkpoints of older versions did not record it
        if data_changed := {k: (saved_data[k], v) for k, v in data_fingerprint.items() if saved_data.get(k, v) != v}:
            raise ValueError(
                f"cannot resume the run in {out_dir}: the data differs from the run's ({_format_diff(data_changed)});"
                " a resume needs the same corpus (the chunks' order depends on their number)"
            )
        # Checkpoints of older versions recorded neither: their max_steps is in train_config.json, and no decay_from.
        saved_max_steps = int(state.get("max_steps", (saved_config or {}).get("max_steps", config.max_steps)))
        saved = state.get("lr_decay_from")
        saved_decay = (int(saved[0]), float(saved[1])) if saved else None
        decay_from = _resumed_decay(int(state["step"]), config, saved_max_steps, saved_decay)
        if decay_from is not None and decay_from != saved_decay:
            log(
                f"max_steps {saved_max_steps} -> {config.max_steps}: the learning rate decays on from "
                f"{decay_from[1]:.3g} at step {decay_from[0]} to its minimum at step {config.max_steps}"
            )
    else:
        model = task.model_class(task.model_config(config, data.vocab_size))
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device).train()
    model = distributed.wrap_model(model, context, fsdp=config.fsdp)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config, decay_from) / config.lr)
    sampler = EpochSampler(len(data.train), config.batch_size, config.seed)
    batch_generator = torch.Generator()  # truncation lengths (CLM) or masks (MLM), seeded per micro-step
    collate = task.collator(config, batch_generator, train=True)
    dtype = autocast_dtype(config.precision, device)
    if config.precision == "bf16" and dtype is None:
        log("precision bf16: no autocast on CPU (bf16 is slower than fp32 there); training in fp32")

    metrics: dict[str, Any] = {"history": [], "initial_val_loss": None, "first_train_loss": None}
    start_step = 0
    if state is not None:
        distributed.load_optimizer_state(model, optimizer, state["optimizer"], state.get("optimizer_format", "plain"))
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start_step = int(state["step"])
        metrics.update(state["metrics"])
        metrics["history"] = [tuple(entry) for entry in state["history"]]
        log(f"resumed from {out_dir} at step {start_step}")
    mode = f", {world} processes ({'FSDP' if config.fsdp else 'DDP'})" if context.distributed else ""
    log(f"model: {num_params:,} parameters on {device}{mode}, {'bf16 autocast' if dtype else 'fp32'}")
    if config.overwrite and context.is_main and (old := _checkpoint_files(out_dir)):
        # Removed only now that the new run has its data and model: a typo in the flags costs nothing.
        log(f"overwrite: replacing the run in {out_dir}{_describe_run(out_dir, config)}")
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    logs = MetricsLog(
        out_dir, start_step, config.tensorboard, context.is_main, log, replace=config.overwrite, resume=config.resume
    )

    last_saved = start_step if config.resume else None  # the step of the checkpoint in out_dir, for messages
    nothing_to_score_said = False

    def run_eval(step: int) -> float | None:
        nonlocal nothing_to_score_said
        if len(data.valid) == 0:
            return None
        val_loss = evaluate(model, data.valid, task, config, context)
        if val_loss is None:
            if not nothing_to_score_said:
                log(
                    f"warning: the validation batches hold no token to predict (mask_prob {config.mask_prob} selected "
                    "none): no validation loss"
                )
                nothing_to_score_said = True
            return None
        if problem := _not_finite(validation_loss=val_loss):  # all-reduced: every process stops here, together
            raise _divergence_error(step, problem, last_saved, out_dir, config)
        bpb = data.bits_per_byte(val_loss)
        log(
            f"step {step}: val loss {val_loss:.4f}, ppl {perplexity(val_loss):.2f}, "
            f"bits/byte {'n/a' if bpb is None else f'{bpb:.3f}'}"
        )
        return val_loss

    def eval_columns(val_loss: float | None) -> dict[str, float | None]:
        if val_loss is None:
            return {}
        return dict(val_loss=val_loss, val_ppl=perplexity(val_loss), val_bpb=data.bits_per_byte(val_loss))

    def checkpoint(step: int) -> None:
        nonlocal last_saved
        extra = {
            "max_steps": config.max_steps,
            "lr_decay_from": list(decay_from) if decay_from else None,
            "data": data_fingerprint,
        }
        save_checkpoint(
            out_dir, model, optimizer, scheduler, sampler, step, config, metrics, context=context, extra_state=extra
        )
        last_saved = step

    if start_step == 0:
        metrics["initial_val_loss"] = run_eval(0)
        logs.write(0, **eval_columns(metrics["initial_val_loss"]))

    # ---- the loop
    tokens_seen, t_loop, eval_s = 0, time.perf_counter(), 0.0
    val_loss, evaluated_at = None, -1
    show_bar = config.progress and context.is_main
    bar = tqdm(range(start_step, config.max_steps), desc="training", disable=not show_bar, unit="step")
    completed = step = start_step
    before_step = sampler.state_dict()
    logged = start_step  # the last step with its row in metrics.csv
    final_step = max(config.max_steps, start_step)
    final_save = "not started"  # then "writing" and "done": how far the final checkpoint got when Ctrl-C came
    final_held: list[int] = []  # the Ctrl-Cs held back during the final checkpoint
    stop_signals = contextlib.ExitStack()
    stop_signals.enter_context(_sigterm_as_ctrl_c())  # until the end of the loop's finally, below
    try:
        for step in bar:
            before_step = sampler.state_dict()  # what a resume needs if Ctrl-C lands inside this step
            torch.manual_seed(_step_seed(config.seed, step, context.rank))  # dropout: reproducible on resume
            # The step's micro-batches are drawn first, to count the labels of the whole step: each micro-batch's loss
            # sum is divided by that total, so the gradient is the gradient of the tokens-weighted mean the step logs
            # (dividing each by its own count would weigh a token of a sparsely masked micro-batch more).
            micro_batches = []
            for micro in range(config.grad_accum_steps):
                # A per-micro-step seed makes truncation lengths / masks a function of the step (and the same on
                # every process, which masks the whole global batch and keeps its own rows).
                batch_generator.manual_seed((config.seed * 1_000_003 + step) * config.grad_accum_steps + micro)
                micro_batches.append(collate(data.train[sampler.next_indices()]))
            count_sum = float(sum(task.count(global_batch, config) for global_batch in micro_batches))
            train_loss: float | None = None  # stays None when there is nothing to predict: no loss, no update
            if count_sum:
                loss_sum = 0.0
                for micro, global_batch in enumerate(micro_batches):
                    tokens_seen += global_batch[1].numel()
                    batch = tuple(t.to(device) for t in _shard(global_batch, context))
                    last = micro == config.grad_accum_steps - 1
                    with distributed.gradient_sync(model, sync=last):
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            loss = task.loss_sum(model, batch, config)
                        # The mean over the step's global micro-batches; DDP/FSDP average gradients over processes,
                        # hence * world.
                        (loss * world / count_sum).backward()
                    loss_sum += loss.item()
                (loss_sum,) = distributed.all_reduce_sum([loss_sum], device)
                train_loss = loss_sum / count_sum  # tokens-weighted mean over the step's micro-batches
                # Measured without clipping too (max_norm inf scales by 1): a finite loss can come with a NaN
                # gradient, whose update would make the weights NaN before any loss shows it.
                max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
                grad_norm = _norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                if problem := _not_finite(loss=train_loss, gradient_norm=grad_norm):
                    # Before the update: the weights are still those of the last step (and of any checkpoint). The
                    # loss is all-reduced and the norm is the whole gradient's, so every process stops here.
                    raise _divergence_error(step + 1, problem, last_saved, out_dir, config)
            else:
                log(
                    f"warning: step {step + 1}: its batch holds no token to predict (mask_prob {config.mask_prob} "
                    "selected none): no update this step"
                )
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            # The update and the step's bookkeeping are one unit for Ctrl-C: landing in between, it would save the
            # updated weights and optimizer state under the previous step's number (and sampler state), and a resume
            # would train on this step's batches twice. Held back, it interrupts once the step is recorded.
            with _ctrl_c_held():
                if train_loss is not None:
                    optimizer.step()
                    scheduler.step()
                else:
                    # A skipped step still counts: the schedule and the data order stay those of its number, as a
                    # resume draws them. torch warns of a schedule stepped without the optimizer: here that is meant.
                    # (Only here: catch_warnings resets which warnings were shown once, so around every step it
                    # would repeat any once-only warning of the model at every step.)
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                completed = step + 1
                metrics["history"].append((completed, train_loss))
                if metrics["first_train_loss"] is None:
                    metrics["first_train_loss"] = train_loss
            tok_s = tokens_seen / max(time.perf_counter() - t_loop - eval_s, 1e-9)
            shown = "n/a" if train_loss is None else f"{train_loss:.3f}"
            bar.set_postfix(loss=shown, lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")

            columns: dict[str, float | None] = {}
            if completed == config.max_steps or (config.eval_every and completed % config.eval_every == 0):
                t_eval = time.perf_counter()
                val_loss = run_eval(completed)
                columns, evaluated_at = eval_columns(val_loss), completed
                eval_s += time.perf_counter() - t_eval
            logs.write(completed, train_loss=train_loss, lr=lr, tokens_per_s=tok_s, **columns)
            logged = completed
            if config.checkpoint_every and completed % config.checkpoint_every == 0 and completed < config.max_steps:
                metrics["val_loss"] = val_loss
                checkpoint(completed)
        bar.close()

        # ---- final evaluation and checkpoint (inside the `try`: Ctrl-C after the last step still saves it)
        loop_s = time.perf_counter() - t_loop - eval_s
        if evaluated_at != final_step:  # the loop did not run (resumed at or past max_steps)
            val_loss = run_eval(final_step)
        recent = [loss for _, loss in metrics["history"][-10:] if loss is not None]  # None: a step with no update
        metrics.update(
            step=final_step,
            start_step=start_step,
            num_params=num_params,
            world_size=world,
            train_loss=sum(recent) / len(recent) if recent else None,
            val_loss=val_loss,
            val_ppl=perplexity(val_loss) if val_loss is not None else None,
            val_bpb=data.bits_per_byte(val_loss) if val_loss is not None else None,
            tokens_per_s=tokens_seen / loop_s if loop_s > 0 and tokens_seen else None,
            data_s=data_s,
            out_dir=str(out_dir),
        )
        # With checkpoint_every=0 this checkpoint is the whole run: Ctrl-C during the write is held back until the
        # checkpoint is complete, then interrupts. A second Ctrl-C abandons the write (a slow or stuck disk must not
        # trap the user); the staged files are removed and the previous checkpoint, if any, stays as it was.
        final_save = "writing"
        with _ctrl_c_held(second_interrupts=True) as final_held:
            checkpoint(final_step)
            final_save = "done"
    except KeyboardInterrupt:
        bar.close()
        if final_save == "done":
            log(f"interrupted: saved step {final_step} to {out_dir} first")
            raise
        if final_save == "writing" and len(final_held) > 1:
            log(f"interrupted twice: the checkpoint of step {final_step} was abandoned; {out_dir} is unchanged")
            raise
        # Save the last completed step so that resume=True carries on exactly as if nothing had happened (this also
        # retries a final checkpoint stopped by an interrupt that could not be held back, e.g. outside the main
        # thread). Under FSDP saving needs every process to take part, which an interrupt cannot promise: resume from
        # the last checkpoint.
        if completed == step:  # interrupted inside a step: forget its half-done work
            sampler.load_state_dict(before_step)
            optimizer.zero_grad(set_to_none=True)
        if completed > logged:  # a held Ctrl-C stopped the step just after its update: its row is still due
            logs.write(completed, train_loss=train_loss, lr=lr)
        if completed > start_step and not distributed.is_fsdp(model):
            metrics["val_loss"] = val_loss
            checkpoint(completed)
            log(f"interrupted: saved step {completed} to {out_dir}; resume=True (--resume) continues from there")
        raise
    finally:
        logs.close()
        stop_signals.close()
    metrics["elapsed_s"] = time.perf_counter() - t_start
    log(f"saved {out_dir} ({metrics['elapsed_s']:.1f} s)")
    return metrics
