"""Data-parallel training under torchrun: 2 CPU processes over gloo follow the single-process run.

Each run is ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on a driver script that records which
ranks write checkpoint files, then calls the command line. Tolerances: both runs see the same global batches and
average the same per-token losses; only the order of floating-point sums differs (the gradient all-reduce adds two
half-batch gradients where one process sums over the whole batch), about 1e-7 relative per step. Over 6 Adam steps
the measured weight difference of the causal model is 6.9e-8 (DDP and FSDP), so weights are compared with
``atol=1e-6`` and losses with ``rtol=1e-5`` (the masked model: see its test). Prefix dropout is off: each process
draws its own dropout noise for its rows, which a single process cannot reproduce.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
clm = pytest.importorskip("perceiver_fast.models.text.clm")
from perceiver_fast.train import (  # noqa: E402
    CLM_ONLY_FIELDS,
    TRAINING_STATE_FILE,
    TrainConfig,
    prepare_data,
    train_clm,
    train_mlm,
)

TEXT = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))
REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import os, shutil, sys
import torch
import perceiver_fast.train as train
from perceiver_fast.cli import main
from perceiver_fast.models.core.pretrained import PretrainedMixin

rank = os.environ["RANK"]
record = open(os.path.join(sys.argv[1], f"writes-rank{rank}.txt"), "a")
real_save_pretrained, real_torch_save = PretrainedMixin.save_pretrained, torch.save
real_checkpoint = train.save_checkpoint

def save_pretrained(self, directory):
    record.write(f"model {directory}\\n")
    return real_save_pretrained(self, directory)

def torch_save(obj, path, *args, **kwargs):
    record.write(f"state {path}\\n")
    return real_torch_save(obj, path, *args, **kwargs)

def save_checkpoint(out_dir, *args, **kwargs):  # copy the checkpoint of step SNAPSHOT_AT to resume from it later
    result = real_checkpoint(out_dir, *args, **kwargs)
    if rank == "0" and str(args[4]) == os.environ.get("SNAPSHOT_AT"):
        shutil.copytree(out_dir, str(out_dir) + "-snapshot")
    return result

PretrainedMixin.save_pretrained, torch.save, train.save_checkpoint = save_pretrained, torch_save, save_checkpoint
sys.exit(main(sys.argv[2:]))
"""

FLAGS = dict(
    max_seq_len=32,
    max_latents=8,
    num_channels=32,
    num_heads=2,
    num_self_attention_layers=1,
    batch_size=8,
    grad_accum_steps=2,
    lr=3e-3,
    warmup_steps=3,
    max_steps=6,
    eval_every=3,
    eval_batches=2,
    valid_fraction=0.1,
    cross_attention_dropout=0.0,
    random_truncation=True,
    min_seq_len=8,
    checkpoint_every=3,
)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def flags(task="clm"):
    """FLAGS without the causal model's settings for the masked task (which refuses them)."""
    return {k: v for k, v in FLAGS.items() if task == "clm" or k not in CLM_ONLY_FIELDS}


def argv(corpus, tmp_path, out_dir, *extra, task="clm", **overrides):
    args = ["train", task, "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    for name, value in {**flags(task), **overrides}.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return [*args, "--out-dir", str(out_dir), *extra]


def torchrun(tmp_path, args, snapshot_at=None):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SNAPSHOT_AT": str(snapshot_at)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(driver), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def single_process(corpus, tmp_path, out_dir, train=train_clm, **overrides):
    task = "mlm" if train is train_mlm else "clm"
    values = {**flags(task), "data": str(corpus), "cache_dir": str(tmp_path / "cache"), "out_dir": str(out_dir)}
    return train(TrainConfig(**{**values, **overrides}, progress=False))


def losses(out_dir):
    with open(Path(out_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    return train_losses, [float(r["val_loss"]) for r in rows if r["val_loss"]]


def assert_same_weights(a_dir, b_dir, model_class=None, atol=1e-6):
    model_class = model_class or clm.CausalLanguageModel
    a = model_class.from_pretrained(a_dir).state_dict()
    b = model_class.from_pretrained(b_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_ddp_matches_single_process_and_only_rank_0_writes(corpus, tmp_path):
    single = single_process(corpus, tmp_path, tmp_path / "single")
    printed = torchrun(tmp_path, argv(corpus, tmp_path, tmp_path / "ddp"))
    assert "2 processes (DDP)" in printed and printed.count("world_size=2") == 1  # the summary: rank 0 only

    train_ddp, val_ddp = losses(tmp_path / "ddp")
    train_single, val_single = losses(tmp_path / "single")
    assert len(train_ddp) == 6 and len(val_ddp) == 3  # steps 0, 3, 6
    assert train_ddp == pytest.approx(train_single, rel=1e-5) and val_ddp == pytest.approx(val_single, rel=1e-5)
    assert [loss for _, loss in single["history"]] == pytest.approx(train_ddp, rel=1e-5)
    assert_same_weights(tmp_path / "single", tmp_path / "ddp")

    writes = (tmp_path / "writes-rank0.txt").read_text().splitlines()
    assert len(writes) == 4 and sum(w.startswith("model") for w in writes) == 2  # checkpoints at steps 3 and 6
    assert not (tmp_path / "writes-rank1.txt").read_text()


def test_fsdp_matches_single_process_and_resumes(corpus, tmp_path):
    single_process(corpus, tmp_path, tmp_path / "single")
    printed = torchrun(tmp_path, argv(corpus, tmp_path, tmp_path / "fsdp", "--fsdp"), snapshot_at=3)
    assert "2 processes (FSDP)" in printed
    assert losses(tmp_path / "fsdp")[0] == pytest.approx(losses(tmp_path / "single")[0], rel=1e-5)
    assert_same_weights(tmp_path / "single", tmp_path / "fsdp")
    assert not (tmp_path / "writes-rank1.txt").read_text()  # rank 1 takes part in the gather, writes nothing

    # Resume the step-3 checkpoint under FSDP: the run ends where the straight run ended.
    snapshot = tmp_path / "fsdp-snapshot"
    assert torch.load(snapshot / TRAINING_STATE_FILE, weights_only=True)["step"] == 3
    # ... and in one process, without --fsdp: the optimizer state saved by parameter name loads unsharded too.
    alone = shutil.copytree(snapshot, tmp_path / "fsdp-snapshot-alone")
    single_process(corpus, tmp_path, alone, resume=True)
    assert_same_weights(tmp_path / "single", alone)
    printed = torchrun(tmp_path, argv(corpus, tmp_path, snapshot, "--fsdp", "--resume"))
    assert "resumed from" in printed and "start_step=3" in printed
    assert_same_weights(tmp_path / "single", snapshot)
    assert losses(snapshot)[0] == pytest.approx(losses(tmp_path / "single")[0], rel=1e-5)


def test_ddp_masked_lm_matches_single_process(corpus, tmp_path):
    # Every process masks the whole global batch with the step's seed and keeps its rows; the loss is divided by the
    # global number of masked tokens, so the ranks' different counts still give the single-process mean.
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    short = dict(max_steps=4, eval_every=2, checkpoint_every=0)
    single_process(corpus, tmp_path, tmp_path / "single", train=train_mlm, **short)
    torchrun(tmp_path, argv(corpus, tmp_path, tmp_path / "ddp", task="mlm", **short))
    assert losses(tmp_path / "ddp")[0] == pytest.approx(losses(tmp_path / "single")[0], rel=1e-5)
    assert losses(tmp_path / "ddp")[1] == pytest.approx(losses(tmp_path / "single")[1], rel=1e-5)
    # The decoder's key bias has no true gradient (softmax ignores a shift shared by all keys), so Adam moves it by
    # rounding noise, which differs between the runs: measured 4.4e-7 after 4 steps (the other weights: < 1.5e-7).
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", MaskedLanguageModel, atol=1e-5)


def test_fsdp_needs_several_processes(corpus, tmp_path):
    values = {**FLAGS, "data": str(corpus), "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "x")}
    with pytest.raises(ValueError, match="--fsdp needs several processes"):
        train_clm(TrainConfig(**values, fsdp=True, progress=False))


def test_each_process_gets_a_contiguous_block_of_the_global_batch():
    from perceiver_fast.distributed import DistributedContext
    from perceiver_fast.train import _shard

    batch = (torch.arange(8).view(8, 1), torch.arange(8), torch.zeros(8, 3, dtype=torch.bool))
    blocks = [_shard(batch, DistributedContext(rank=r, world_size=4)) for r in range(4)]
    assert [b[0].flatten().tolist() for b in blocks] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(b[2].shape == (2, 3) for b in blocks)
    assert _shard(batch, DistributedContext()) is batch


def test_a_batch_that_does_not_split_evenly_is_refused(corpus, tmp_path, monkeypatch):
    import perceiver_fast.train as train_module
    from perceiver_fast.distributed import DistributedContext

    # Pretend to be rank 0 of 3 (no process group is needed: the check comes before any communication).
    monkeypatch.setattr(train_module.distributed, "init_distributed", lambda device: DistributedContext(0, 3))
    values = {**FLAGS, "data": str(corpus), "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "x")}
    with pytest.raises(ValueError, match="batch of 8 chunks does not split evenly over 3 processes"):
        train_clm(TrainConfig(**values, progress=False))
    # A batch larger than the training set is capped at it: the message says where the number comes from.
    chunks = len(prepare_data(TrainConfig(**values), FLAGS["max_seq_len"] + 1).train)
    world = next(n for n in range(3, chunks) if chunks % n)
    monkeypatch.setattr(train_module.distributed, "init_distributed", lambda device: DistributedContext(0, world))
    expected = rf"batch of {chunks} chunks \(batch_size 4000, capped at the {chunks} training chunks\) does not split"
    with pytest.raises(ValueError, match=expected):
        train_clm(TrainConfig(**{**values, "batch_size": 4000}, progress=False))


MODEL_PER_RANK_DRIVER = """
import os, sys
import torch
from perceiver_fast.models.text.clm import CausalLanguageModel
from perceiver_fast.train import TrainConfig, train_clm

corpus, out_dir, fsdp = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp"
rank = int(os.environ["RANK"])
config = TrainConfig(data=corpus, cache_dir=out_dir + "-cache", out_dir=out_dir, max_seq_len=32, max_latents=8,
                     num_channels=32, num_heads=2, num_self_attention_layers=1, batch_size=8, max_steps=0,
                     valid_fraction=0.1, eval_batches=1, progress=False, fsdp=fsdp)
torch.manual_seed(100 + rank)  # each process builds its own model
model = CausalLanguageModel(config.model_config(262))
torch.save(model.state_dict(), f"{out_dir}-init-rank{rank}.pt")
train_clm(config, model=model)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_models_built_apart_on_each_rank_train_as_rank_0s(corpus, tmp_path, mode):
    """A caller's model differing between processes starts as rank 0's under FSDP too (fully_shard keeps each
    rank's slice of its own tensors: the run trained a splice of the ranks' models)."""
    driver = tmp_path / "driver.py"
    driver.write_text(MODEL_PER_RANK_DRIVER)
    out_dir = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    result = subprocess.run(
        [*command, str(corpus), str(out_dir), mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = clm.CausalLanguageModel.from_pretrained(out_dir).state_dict()
    rank0, rank1 = (torch.load(f"{out_dir}-init-rank{r}.pt") for r in (0, 1))
    assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, rank0[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_a_run_without_fsdp_does_not_resume_under_fsdp(corpus, tmp_path):
    """Its optimizer state is keyed by position, which FSDP's loader cannot map: refused, saying what to do."""
    single_process(corpus, tmp_path, tmp_path / "single", max_steps=3)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    args = argv(corpus, tmp_path, tmp_path / "single", "--fsdp", "--resume", max_steps=6)
    result = subprocess.run([*command, str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "optimizer state of a run without --fsdp (DDP or one process): resume it without --fsdp" in result.stderr


NAN_ON_RANK_1_DRIVER = """
import os, sys
import perceiver_fast.train as train
from perceiver_fast.cli import main

real_loss_sum, calls = train.CLMTask.loss_sum, []

def loss_sum(self, model, batch, config):  # rank 1's rows of step 2 (micro-batches 3 and 4) give a NaN loss
    loss = real_loss_sum(self, model, batch, config)
    calls.append(model.training)
    return loss * float("nan") if os.environ["RANK"] == "1" and sum(calls) in (3, 4) and calls[-1] else loss

train.CLMTask.loss_sum = loss_sum
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_nan_loss_on_one_process_stops_them_all(corpus, tmp_path, mode):
    """The loss is all-reduced and the gradient norm is the whole gradient's: a NaN in one process's rows stops every
    process at the same step (none waits forever for the others), before the update and without a checkpoint."""
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_ON_RANK_1_DRIVER)
    out_dir = tmp_path / mode
    args = argv(corpus, tmp_path, out_dir, *(["--fsdp"] if mode == "fsdp" else []), checkpoint_every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = "training diverged at step 2 (loss nan, gradient norm nan); the last checkpoint, of step 1"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # each process's command line says it
    assert json.loads((out_dir / "checkpoint.json").read_text())["step"] == 1
