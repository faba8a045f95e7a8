"""Train a Perceiver AR causal language model: one readable loop in the spirit of nanoGPT's ``train.py``.

    from perceiver_fast.train import TrainConfig, train_clm
    metrics = train_clm(TrainConfig(data="notes/*.txt", max_steps=500, out_dir="runs/notes"))

Each step draws ``batch_size`` chunks of ``max_seq_len + 1`` tokens (see `perceiver_fast.data.text`), runs
``grad_accum_steps`` forward/backward passes, clips the gradient norm and takes an AdamW step; the learning rate warms
up linearly, then follows a cosine down to ``min_lr``. As in perceiver-io, the model predicts only its latent
positions: the last ``max_latents`` tokens of every sequence; the rest is the prefix it attends to.

Every ``eval_every`` steps the validation loss, perplexity and bits per byte are printed; at the end (and every
``checkpoint_every`` steps) the model is saved with ``save_pretrained(out_dir)`` next to ``training_state.pt``
(optimizer, scheduler, data order, RNG state, step), from which ``resume=True`` continues exactly where it stopped.
Ctrl-C saves the last completed step the same way before it stops the run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from perceiver_fast.data.text import CLMCollator, CLMData, prepare_clm_data
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig

TRAINING_STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    """Everything a training run needs. Model fields have `CausalLanguageModelConfig`'s names."""

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
    # Data: a file, directory or glob (None: the Python standard library's sources).
    data: str | None = None
    stdlib_max_bytes: int = 4_000_000
    valid_fraction: float = 0.05
    random_truncation: bool = False
    min_seq_len: int | None = None  # shortest truncated length; None: max_latents
    cache_dir: str | None = None  # None: $PERCEIVER_FAST_CACHE or ~/.cache/perceiver_fast
    # Optimisation.
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
    # Evaluation and checkpoints.
    eval_every: int = 100  # 0: evaluate only at the start and the end
    eval_batches: int = 20
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    out_dir: str = "runs/clm"
    resume: bool = False
    # Runtime.
    seed: int = 0
    device: str = "cpu"  # "auto": CUDA when available
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

    def model_config(self, vocab_size: int) -> CausalLanguageModelConfig:
        """The model config: our fields that `CausalLanguageModelConfig` has, plus `vocab_size`."""
        names = {f.name for f in fields(CausalLanguageModelConfig)}
        values = {k: v for k, v in asdict(self).items() if k in names}
        return CausalLanguageModelConfig(**values, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------------- pieces


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at `step`: linear warmup from 0 to `lr`, then a cosine from `lr` down to `min_lr`."""
    min_lr = config.min_lr if config.min_lr is not None else config.lr / 10
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


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
    model: torch.nn.Module, labels: torch.Tensor, x: torch.Tensor, pad_mask: torch.Tensor | None, max_latents: int
) -> torch.Tensor:
    """Mean cross-entropy over the latent positions, as perceiver-io's ``LitCausalLanguageModel`` computes it.

    The last ``min(max_latents, n)`` positions are latents (``prefix_len = n - num_latents``); labels at padding are
    ignored.
    """
    num_latents = min(max_latents, x.shape[1])
    if pad_mask is not None and bool(pad_mask.any()):
        labels = labels.masked_fill(pad_mask, -100)
    else:
        pad_mask = None  # an all-False mask changes nothing; skip the masking work
    logits = model(x, prefix_len=x.shape[1] - num_latents, pad_mask=pad_mask).logits
    labels = labels[:, -logits.shape[1] :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    batch_size: int,
    max_batches: int,
    max_latents: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean validation loss (nats per predicted token) over the first `max_batches` batches of `chunks`."""
    was_training = model.training
    model.eval()
    collate = CLMCollator()
    total, count = 0.0, 0
    for start in range(0, min(len(chunks), batch_size * max_batches), batch_size):
        labels, x, _ = collate(chunks[start : start + batch_size])
        loss = clm_loss(model, labels.to(device), x.to(device), None, max_latents)
        n = x.shape[0] * min(max_latents, x.shape[1])
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def save_checkpoint(
    out_dir: str | Path,
    model: CausalLanguageModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: EpochSampler,
    step: int,
    config: TrainConfig,
    metrics: dict[str, Any],
) -> Path:
    """Write the model (``save_pretrained``), ``training_state.pt`` and ``train_config.json`` into `out_dir`."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "history": metrics.get("history", []),
    }
    tmp = out_dir / (TRAINING_STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out_dir / TRAINING_STATE_FILE)  # never leave a half-written state next to a new model
    (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out_dir


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's rule: decay matrices and embeddings, not biases and LayerNorm parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ---------------------------------------------------------------------------------------------------- the loop


def train_clm(
    config: TrainConfig,
    data: CLMData | None = None,
    tokenizer: Any = None,
    model: CausalLanguageModel | None = None,
) -> dict[str, Any]:
    """Train (or, with ``config.resume``, continue training) a `CausalLanguageModel`; returns the run's metrics.

    :param config: the run's settings.
    :param data: prepared chunks; by default ``prepare_clm_data(config.data, ...)`` with `tokenizer`.
    :param tokenizer: passed to `prepare_clm_data` (default: UTF-8 bytes).
    :param model: train this model in place (e.g. to fine-tune one) instead of a new one built from `config`; its
        vocabulary must match the data's, and its ``max_seq_len``/``max_latents`` must be at least `config`'s.
    :return: ``step``, ``start_step``, ``num_params``, ``first_train_loss``, ``train_loss`` (mean of the last 10
        steps), ``initial_val_loss`` and ``val_loss``/``val_ppl``/``val_bpb`` (None without validation data),
        ``tokens_per_s``, ``elapsed_s``, ``data_s``, ``out_dir`` and ``history`` (one ``(step, loss)`` per step).
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    log = tqdm.write  # prints without breaking the progress bar

    # ---- data
    if data is None:
        data = prepare_clm_data(
            config.data,
            max_seq_len=config.max_seq_len,
            tokenizer=tokenizer,
            valid_fraction=config.valid_fraction,
            seed=config.seed,
            cache_dir=config.cache_dir,
            stdlib_max_bytes=config.stdlib_max_bytes,
        )
    if data.train.shape[1] != config.max_seq_len + 1:
        raise ValueError(f"data chunks have {data.train.shape[1]} tokens, expected max_seq_len + 1")
    data_s = time.perf_counter() - t_start
    log(
        f"data: {data.num_documents} documents, {data.num_tokens:,} tokens ({data.num_bytes:,} bytes), "
        f"{len(data.train)} train / {len(data.valid)} valid chunks of {config.max_seq_len + 1}"
        + (" (cached)" if data.from_cache else "")
    )

    # ---- model, optimizer, schedule, data order
    torch.manual_seed(config.seed)
    state = None
    if model is not None:
        if config.resume:
            raise ValueError("give either a model or resume=True, not both")
        if model.config.vocab_size != data.vocab_size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} != the data's {data.vocab_size}")
        if model.max_seq_len < config.max_seq_len or model.max_latents < config.max_latents:
            raise ValueError(
                f"the model (max_seq_len {model.max_seq_len}, max_latents {model.max_latents}) is smaller than the "
                f"config (max_seq_len {config.max_seq_len}, max_latents {config.max_latents})"
            )
    elif config.resume:
        state_path = out_dir / TRAINING_STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"cannot resume: {state_path} not found")
        model = CausalLanguageModel.from_pretrained(out_dir)
        expected = asdict(config.model_config(data.vocab_size))
        saved = asdict(model.config)
        changed = {k: (saved[k], v) for k, v in expected.items() if k in saved and saved[k] != v}
        if changed:
            raise ValueError(f"cannot resume with a different model config (saved, given): {changed}")
        state = torch.load(state_path, weights_only=True)
    else:
        model = CausalLanguageModel(config.model_config(data.vocab_size))
    model.to(device).train()
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config) / config.lr)
    sampler = EpochSampler(len(data.train), config.batch_size, config.seed)
    truncation = torch.Generator()
    collate = CLMCollator(
        random_truncation=config.random_truncation,
        min_seq_len=config.min_seq_len if config.min_seq_len is not None else config.max_latents,
        generator=truncation,
    )
    num_params = sum(p.numel() for p in model.parameters())

    metrics: dict[str, Any] = {"history": [], "initial_val_loss": None, "first_train_loss": None}
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng_state"])
        if state["cuda_rng_state"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng_state"])
        start_step = int(state["step"])
        metrics.update(state["metrics"])
        metrics["history"] = list(state["history"])
        log(f"resumed from {out_dir} at step {start_step}")
    log(f"model: {num_params:,} parameters on {device}")

    def run_eval() -> float | None:
        if len(data.valid) == 0:
            return None
        return evaluate(model, data.valid, config.batch_size, config.eval_batches, config.max_latents, device)

    def report(step: int, val_loss: float | None) -> None:
        if val_loss is not None:
            log(
                f"step {step}: val loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f}, "
                f"bits/byte {data.bits_per_byte(val_loss):.3f}"
            )

    if start_step == 0:
        metrics["initial_val_loss"] = run_eval()
        report(0, metrics["initial_val_loss"])

    # ---- the loop
    tokens_seen, t_loop = 0, time.perf_counter()
    val_loss = None
    bar = tqdm(range(start_step, config.max_steps), desc="training", disable=not config.progress, unit="step")
    completed = step = start_step
    before_step = (sampler.state_dict(), torch.get_rng_state())
    try:
        for step in bar:
            # What a resume needs if Ctrl-C lands inside this step: the data position and RNG before it.
            before_step = (sampler.state_dict(), torch.get_rng_state())
            loss_sum = 0.0
            for micro in range(config.grad_accum_steps):
                # A per-micro-step seed makes the truncated lengths a function of the step: resuming reproduces them.
                truncation.manual_seed((config.seed * 1_000_003 + step) * config.grad_accum_steps + micro)
                labels, x, pad_mask = collate(data.train[sampler.next_indices()])
                labels, x, pad_mask = labels.to(device), x.to(device), pad_mask.to(device)
                loss = clm_loss(model, labels, x, pad_mask, config.max_latents)
                (loss / config.grad_accum_steps).backward()
                loss_sum += loss.item()
                tokens_seen += x.numel()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1

            train_loss = loss_sum / config.grad_accum_steps
            metrics["history"].append((completed, train_loss))
            if metrics["first_train_loss"] is None:
                metrics["first_train_loss"] = train_loss
            tok_s = tokens_seen / max(time.perf_counter() - t_loop, 1e-9)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", tok_s=f"{tok_s:,.0f}")

            if config.eval_every and completed % config.eval_every == 0 and completed < config.max_steps:
                val_loss = run_eval()
                report(completed, val_loss)
            if config.checkpoint_every and completed % config.checkpoint_every == 0 and completed < config.max_steps:
                metrics["val_loss"] = val_loss
                save_checkpoint(out_dir, model, optimizer, scheduler, sampler, completed, config, metrics)
    except KeyboardInterrupt:
        # Save the last completed step so that resume=True carries on exactly as if nothing had happened.
        bar.close()
        if completed == step:  # interrupted inside a step: forget its half-done work
            sampler.load_state_dict(before_step[0])
            torch.set_rng_state(before_step[1])
            optimizer.zero_grad(set_to_none=True)
        if completed > start_step:
            metrics["val_loss"] = val_loss
            save_checkpoint(out_dir, model, optimizer, scheduler, sampler, completed, config, metrics)
            log(f"interrupted: saved step {completed} to {out_dir}; resume=True (--resume) continues from there")
        raise
    bar.close()

    # ---- final evaluation and checkpoint
    loop_s = time.perf_counter() - t_loop
    val_loss = run_eval()
    report(config.max_steps, val_loss)
    recent = [loss for _, loss in metrics["history"][-10:]]
    metrics.update(
        step=max(config.max_steps, start_step),
        start_step=start_step,
        num_params=num_params,
        train_loss=sum(recent) / len(recent) if recent else None,
        val_loss=val_loss,
        val_ppl=math.exp(val_loss) if val_loss is not None else None,
        val_bpb=data.bits_per_byte(val_loss) if val_loss is not None else None,
        tokens_per_s=tokens_seen / loop_s if loop_s > 0 and tokens_seen else None,
        data_s=data_s,
        out_dir=str(out_dir),
    )
    save_checkpoint(out_dir, model, optimizer, scheduler, sampler, metrics["step"], config, metrics)
    metrics["elapsed_s"] = time.perf_counter() - t_start
    log(f"saved {out_dir} ({metrics['elapsed_s']:.1f} s)")
    return metrics
