"""The training loop (causal and masked LM): the loss falls, checkpoints load back, resuming continues exactly,
and every step is logged to metrics.csv."""

import csv
import math
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

pytest.importorskip("safetensors")
clm = pytest.importorskip("perceiver_fast.models.text.clm")
import perceiver_fast.train as train_module  # noqa: E402
from perceiver_fast.data.text import prepare_clm_data  # noqa: E402
from perceiver_fast.data.tokenizer import BytesTokenizer  # noqa: E402
from perceiver_fast.train import (  # noqa: E402
    METRICS_COLUMNS,
    METRICS_FILE,
    TRAINING_STATE_FILE,
    EpochSampler,
    TrainConfig,
    autocast_dtype,
    clm_loss,
    lr_at,
    train_clm,
    train_mlm,
)

TEXT = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(text_file, tmp_path, **overrides):
    values = dict(
        data=str(text_file),
        max_seq_len=32,
        max_latents=8,
        num_channels=32,
        num_heads=2,
        num_self_attention_layers=1,
        batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        max_steps=40,
        eval_every=20,
        eval_batches=2,
        valid_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_falls_and_checkpoint_loads_back(text_file, tmp_path):
    config = tiny_config(text_file, tmp_path, grad_accum_steps=2)
    model = clm.CausalLanguageModel(config.model_config(vocab_size=262))
    metrics = train_clm(config, model=model)

    assert metrics["step"] == 40 and len(metrics["history"]) == 40
    assert abs(metrics["first_train_loss"] - math.log(262)) < 0.3  # a fresh model is close to uniform
    assert metrics["train_loss"] < metrics["first_train_loss"] - 1.5
    assert metrics["val_loss"] < metrics["initial_val_loss"] - 1.5
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2) / (len(TEXT) / (len(TEXT) + 1)))
    assert metrics["tokens_per_s"] > 0

    out = tmp_path / "run"
    for name in ["config.json", "model.safetensors", TRAINING_STATE_FILE, "train_config.json"]:
        assert (out / name).is_file(), name
    loaded = clm.CausalLanguageModel.from_pretrained(out)
    x = torch.randint(6, 262, (2, 32))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, prefix_len=24).logits, model(x, prefix_len=24).logits)


def test_resume_continues_exactly(text_file, tmp_path, monkeypatch):
    # Straight run of 6 steps; a copy of its step-3 checkpoint is resumed to step 6: the weights must be identical.
    snapshot = tmp_path / "at_step_3"
    real_save = train_module.save_checkpoint

    def save_and_copy(out_dir, *args, **kwargs):
        result = real_save(out_dir, *args, **kwargs)
        if args[4] == 3:  # the step argument
            shutil.copytree(out_dir, snapshot)
        return result

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_copy)
    common = dict(max_steps=6, checkpoint_every=3, eval_every=0, random_truncation=True, min_seq_len=8)
    straight = train_clm(tiny_config(text_file, tmp_path, **common))
    assert snapshot.is_dir()

    resumed = train_clm(tiny_config(text_file, tmp_path, **common, out_dir=str(snapshot), resume=True))
    assert resumed["start_step"] == 3 and resumed["step"] == 6
    assert [s for s, _ in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in resumed["history"]] == pytest.approx([loss for _, loss in straight["history"]])
    assert resumed["first_train_loss"] == straight["first_train_loss"]
    a = clm.CausalLanguageModel.from_pretrained(tmp_path / "run").state_dict()
    b = clm.CausalLanguageModel.from_pretrained(snapshot).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert torch.load(snapshot / TRAINING_STATE_FILE, weights_only=True)["step"] == 6

    # Resuming with a larger max_steps trains on from the saved step.
    more = train_clm(tiny_config(text_file, tmp_path, **{**common, "max_steps": 8}, out_dir=str(snapshot), resume=True))
    assert more["start_step"] == 6 and more["step"] == 8 and len(more["history"]) == 8


def test_resume_errors(text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train_clm(tiny_config(text_file, tmp_path, resume=True, out_dir=str(tmp_path / "nothing")))
    train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0))
    with pytest.raises(ValueError, match="another config .num_channels: 32 saved, 64 given"):
        train_clm(tiny_config(text_file, tmp_path, max_steps=2, num_channels=64, resume=True))
    with pytest.raises(ValueError, match="resume=True .* or overwrite=True"):
        tiny_config(text_file, tmp_path, resume=True, overwrite=True)


def copy_checkpoints(monkeypatch, copies):
    """Copy the run directory right after the checkpoint of each step in `copies` ({step: destination}) is saved."""
    real_save = train_module.save_checkpoint

    def save_and_copy(out_dir, *args, **kwargs):
        result = real_save(out_dir, *args, **kwargs)
        if args[4] in copies and not copies[args[4]].exists():  # args[4]: the step
            shutil.copytree(out_dir, copies[args[4]])
        return result

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_copy)


def final_weights(out_dir):
    return clm.CausalLanguageModel.from_pretrained(out_dir).state_dict()


def assert_same_weights(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def saved_step(out_dir):
    return torch.load(out_dir / TRAINING_STATE_FILE, weights_only=True)["step"]


# ------------------------------------------------------------------------------------------------ atomic checkpoints

CHECKPOINTED = dict(max_steps=4, checkpoint_every=2, eval_every=0, random_truncation=True, min_seq_len=8)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The weights of an uninterrupted CHECKPOINTED run, the reference every interrupted run must end with."""
    tmp_path = tmp_path_factory.mktemp("straight")
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED))
    return final_weights(tmp_path / "run")


class Killed(BaseException):
    """A process killed mid-write: no handler of the loop sees it (unlike an exception or Ctrl-C)."""


def partial_then_fail(path):
    Path(path).write_bytes(b"half a file")  # what a full disk leaves behind
    raise OSError(28, "No space left on device", str(path))


@pytest.mark.parametrize(
    "failing", ["model.safetensors", "config.json", "training_state.pt", "train_config.json", "checkpoint.json"]
)
def test_a_failed_checkpoint_write_keeps_the_previous_one(text_file, tmp_path, monkeypatch, straight_run, failing):
    # The step-4 checkpoint fails (once) while one of its files is written; the step-2 one must survive whole, so that
    # a resume ends with the weights of a run that never failed.
    trap = {"armed": False, "sprung": False}
    real_save = train_module.save_checkpoint

    def save(out_dir, *args, **kwargs):
        trap["armed"] = args[4] == 4 and not trap["sprung"]  # args[4]: the step
        return real_save(out_dir, *args, **kwargs)

    def hook(real, path_of):
        def write(*args, **kwargs):
            path = Path(path_of(*args))
            if trap["armed"] and path.name.startswith(failing):
                trap.update(armed=False, sprung=True)
                partial_then_fail(path)
            return real(*args, **kwargs)

        return write

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setattr(safetensors_torch, "save_file", hook(safetensors_torch.save_file, lambda state, path: path))
    monkeypatch.setattr(torch, "save", hook(torch.save, lambda obj, path: path))
    monkeypatch.setattr(Path, "write_text", hook(Path.write_text, lambda self, *args: self))

    with pytest.raises(OSError, match="No space left"):
        train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED))
    out = tmp_path / "run"
    assert saved_step(out) == 2 and (out / METRICS_FILE).is_file()
    clm.CausalLanguageModel.from_pretrained(out)  # still a model directory

    resumed = train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED, resume=True))
    assert resumed["start_step"] == 2 and saved_step(out) == 4
    assert_same_weights(straight_run, final_weights(out))
    assert not (out / train_module.STAGING_DIR).exists()


@pytest.mark.parametrize("moved", [0, 2, 4])
def test_a_kill_while_a_checkpoint_is_moved_in_is_finished_on_resume(
    text_file, tmp_path, monkeypatch, straight_run, moved
):
    # A kill after `moved` of the step-4 checkpoint's files were moved into the run directory (the rest are still
    # staged): the directory holds a mix of steps 2 and 4 until a resume completes the move.
    real_finish, real_replace = train_module._finish_staged_checkpoint, train_module.os.replace

    def finish(out_dir):
        if saved_step(out_dir / train_module.STAGING_DIR) != 4:
            return real_finish(out_dir)
        count = []

        def replace(src, dst):
            if len(count) == moved:
                raise Killed
            count.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(train_module.os, "replace", replace)
        try:
            return real_finish(out_dir)
        finally:
            monkeypatch.setattr(train_module.os, "replace", real_replace)

    monkeypatch.setattr(train_module, "_finish_staged_checkpoint", finish)
    with pytest.raises(Killed):
        train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED))
    monkeypatch.setattr(train_module, "_finish_staged_checkpoint", real_finish)
    out, staging = tmp_path / "run", tmp_path / "run" / train_module.STAGING_DIR
    assert (staging / train_module.CHECKPOINT_FILE).is_file()  # the complete step-4 checkpoint, partly moved

    resumed = train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED, resume=True))
    assert resumed["start_step"] == 4 and not staging.exists()
    assert_same_weights(straight_run, final_weights(out))


def test_resume_refuses_a_mixed_checkpoint(text_file, tmp_path, monkeypatch):
    copy_checkpoints(monkeypatch, {2: tmp_path / "at_step_2"})
    train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED))
    out = tmp_path / "run"
    shutil.copy(tmp_path / "at_step_2" / "model.safetensors", out / "model.safetensors")  # step-2 weights, step-4 state
    with pytest.raises(ValueError, match="inconsistent: model.safetensors is not the file saved at step 4"):
        train_clm(tiny_config(text_file, tmp_path, **{**CHECKPOINTED, "max_steps": 6}, resume=True))


# --------------------------------------------------------------------------------------------- one run per directory


def test_a_run_directory_is_not_overwritten_by_accident(text_file, tmp_path):
    train_clm(tiny_config(text_file, tmp_path, max_steps=3, eval_every=0))
    out = tmp_path / "run"
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a checkpoint") as error:
        train_clm(tiny_config(text_file, tmp_path, max_steps=2, batch_size=4, eval_every=0))
    message = str(error.value)
    assert "step 3" in message and "batch_size: 8 saved, 4 given" in message
    assert "max_steps: 3 saved, 2 given" in message and "--resume" in message and "--overwrite" in message
    assert (out / "model.safetensors").read_bytes() == weights and saved_step(out) == 3

    metrics = train_clm(tiny_config(text_file, tmp_path, max_steps=2, batch_size=4, eval_every=0, overwrite=True))
    assert metrics["step"] == 2 and saved_step(out) == 2
    with open(out / METRICS_FILE, newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2]


def test_resume_refuses_another_run_config(text_file, tmp_path):
    train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0))
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(ValueError, match="another config") as error:
        train_clm(tiny_config(text_file, tmp_path, max_steps=3, batch_size=4, lr=1e-3, data=str(other), resume=True))
    message = str(error.value)
    assert "batch_size: 8 saved, 4 given" in message and "lr: 0.003 saved, 0.001 given" in message
    assert f"data: {str(text_file)!r} saved, {str(other)!r} given" in message
    assert "max_steps:" not in message  # a resume may train longer

    # What may change: the length, evaluation, checkpoints, precision; and the corpus's path may be spelled otherwise.
    relative = os.path.relpath(text_file)
    metrics = train_clm(
        tiny_config(text_file, tmp_path, max_steps=3, eval_every=1, eval_batches=1, checkpoint_every=1,
                    precision="fp32", data=relative, resume=True)
    )
    assert metrics["start_step"] == 2 and metrics["step"] == 3


def test_resume_refuses_data_that_changed(text_file, tmp_path):
    train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0))
    text_file.write_text(TEXT * 2, encoding="utf-8")  # the same path, another corpus
    with pytest.raises(ValueError, match="the data differs from the run's .train_chunks: "):
        train_clm(tiny_config(text_file, tmp_path, max_steps=3, resume=True))


def test_resume_refuses_data_edited_to_the_same_size(text_file, tmp_path):
    """Counts alone let an edit of the same size through (or another file of that size, or another tokenizer with
    the same vocabulary size): the resumed run would go on with other text under the same data order."""
    train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0))
    text_file.write_text(TEXT.replace("x", "y"), encoding="utf-8")
    with pytest.raises(ValueError, match="the data differs from the run's .token_sha256: "):
        train_clm(tiny_config(text_file, tmp_path, max_steps=3, resume=True))
    text_file.write_text(TEXT, encoding="utf-8")  # back as it was: the run goes on
    assert train_clm(tiny_config(text_file, tmp_path, max_steps=3, resume=True))["start_step"] == 2


def test_a_second_run_into_a_busy_directory_stops_at_once(text_file, tmp_path, monkeypatch):
    # Two runs into one directory deleted each other's staged checkpoints and interleaved their rows in metrics.csv.
    # A run locks its directory while it goes on: a second one, even one told to overwrite, stops before any work.
    out = tmp_path / "run"
    second = []
    real_write = train_module.MetricsLog.write

    def write_then_start_another(self, step, **values):
        real_write(self, step, **values)
        if step == 2 and not second:
            try:
                train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, lr=1e-2, overwrite=True))
                second.append("it ran")
            except ValueError as e:
                second.append(str(e))

    monkeypatch.setattr(train_module.MetricsLog, "write", write_then_start_another)
    first = train_clm(tiny_config(text_file, tmp_path, max_steps=3, eval_every=0, checkpoint_every=1))
    monkeypatch.undo()
    assert len(second) == 1 and second[0].startswith(f"{out} is in use by another run (pid {os.getpid()}): ")
    assert first["step"] == 3 and saved_step(out) == 3
    with open(out / METRICS_FILE, newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3]

    # The run is over: its lock with it. The lock file is no run (a new run needs no overwrite), survives an
    # overwrite, and lets a resume through.
    assert train_clm(tiny_config(text_file, tmp_path, max_steps=4, eval_every=0, resume=True))["start_step"] == 3
    train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, overwrite=True))
    assert (out / train_module.LOCK_FILE).is_file()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(out / train_module.LOCK_FILE, fresh / train_module.LOCK_FILE)
    assert train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, out_dir=str(fresh)))["step"] == 1


def test_a_run_that_fails_to_start_leaves_no_directory_behind(text_file, tmp_path):
    """The lock needs the directory, which a new run creates first: a start that then fails (bad data here) must
    take it back, parents it created included, and leave a directory that was there as it was."""
    missing = tmp_path / "runs" / "clm"
    with pytest.raises(FileNotFoundError):
        train_clm(tiny_config(text_file, tmp_path, data=str(tmp_path / "nowhere.txt"), out_dir=str(missing)))
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(FileNotFoundError):
        train_clm(tiny_config(text_file, tmp_path, data=str(tmp_path / "nowhere.txt"), out_dir=str(existing)))
    assert existing.is_dir()


def test_without_flock_a_run_goes_unlocked(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "fcntl", None)  # Windows
    assert train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0))["step"] == 1
    assert not (tmp_path / "run" / train_module.LOCK_FILE).exists()


def test_an_unreadable_training_state_is_named(text_file, tmp_path):
    # Without a manifest to check it against (a checkpoint of an older version), a truncated training_state.pt made
    # torch.load fail with a bare "[Errno 22] Invalid argument" that named no file.
    train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0))
    out = tmp_path / "run"
    (out / train_module.CHECKPOINT_FILE).unlink()
    state = out / TRAINING_STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(ValueError, match="is unreadable") as error:
        train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, resume=True))
    message = str(error.value)
    assert f"cannot resume: {state} is unreadable (" in message and "--overwrite" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------- longer resumes


def metrics_lrs(out_dir):
    with open(out_dir / METRICS_FILE, newline="") as fh:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(fh) if r["lr"]}


def test_a_longer_resume_continues_the_decay(text_file, tmp_path, monkeypatch):
    common = dict(max_steps=6, checkpoint_every=2, eval_every=0)
    config = tiny_config(text_file, tmp_path, **common)
    min_lr = config.lr / 10
    copy_checkpoints(monkeypatch, {4: tmp_path / "at_step_4"})
    train_clm(config)
    straight = metrics_lrs(tmp_path / "run")

    # Resumed at step 4 with max_steps 10: from the rate step 4 had, a cosine down to min_lr at step 10.
    longer = tmp_path / "at_step_4"
    copy_checkpoints(monkeypatch, {8: tmp_path / "at_step_8"})
    train_clm(tiny_config(text_file, tmp_path, **{**common, "max_steps": 10}, out_dir=str(longer), resume=True))
    lrs = metrics_lrs(longer)  # row n holds the rate of step n - 1
    start_lr = lr_at(4, config)
    assert lrs[5] == pytest.approx(straight[5], rel=1e-5) == pytest.approx(start_lr, rel=1e-5)
    expected = [min_lr + 0.5 * (1 + math.cos(math.pi * (n - 5) / 6)) * (start_lr - min_lr) for n in range(5, 11)]
    assert [lrs[n] for n in range(5, 11)] == pytest.approx(expected, rel=1e-5)

    # Resuming that run again (same max_steps) follows the same stretched schedule to the same weights.
    again = tmp_path / "at_step_8"
    train_clm(tiny_config(text_file, tmp_path, **{**common, "max_steps": 10}, out_dir=str(again), resume=True))
    assert metrics_lrs(again) == pytest.approx(lrs, rel=1e-5)
    assert_same_weights(final_weights(longer), final_weights(again))

    # A run resumed after its end stays at min_lr instead of climbing back up a new cosine.
    train_clm(tiny_config(text_file, tmp_path, **{**common, "max_steps": 8}, resume=True))
    assert [metrics_lrs(tmp_path / "run")[n] for n in (7, 8)] == pytest.approx([min_lr, min_lr], rel=1e-5)


def test_a_mistyped_data_path_fails_at_once(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was tried as a hub dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for data in [str(tmp_path / "notes.txt"), str(tmp_path / "notes"), "./notes", "~/no-such-notes", "corpus.txt"]:
        with pytest.raises(FileNotFoundError, match="no such file"):
            train_module.prepare_data(TrainConfig(data=data, max_seq_len=32, max_latents=8), chunk_len=33)
    assert not train_module.looks_like_local_path("wikitext") and not train_module.looks_like_local_path("allenai/c4")
    assert not train_module.looks_like_local_path("bigcode/the-stack-v1.2")


def test_config_validation():
    with pytest.raises(ValueError, match="max_latents"):
        TrainConfig(max_seq_len=16, max_latents=32)
    with pytest.raises(ValueError, match="min_seq_len"):
        TrainConfig(max_seq_len=64, max_latents=16, min_seq_len=8)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    config = TrainConfig(num_channels=64, num_heads=2, cross_attention_dropout=0.1)
    model_config = config.model_config(vocab_size=300)
    assert (model_config.num_channels, model_config.num_heads, model_config.vocab_size) == (64, 2, 300)
    assert model_config.cross_attention_dropout == 0.1


def test_lr_schedule():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(step, config) for step in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1e-3) and lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[60] == pytest.approx(5.5e-4)


def test_epoch_sampler_state():
    sampler = EpochSampler(10, 4, seed=1)
    first = [sampler.next_indices().tolist() for _ in range(2)]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # no repeats within an epoch
    state = sampler.state_dict()
    rest = [sampler.next_indices().tolist() for _ in range(3)]
    assert state == {"epoch": 0, "position": 8}
    again = EpochSampler(10, 4, seed=1)
    again.load_state_dict(state)
    assert [again.next_indices().tolist() for _ in range(3)] == rest
    assert EpochSampler(3, 8, seed=0).next_indices().numel() == 3


def test_clm_loss_ignores_padding():
    model = clm.CausalLanguageModel(TrainConfig(max_seq_len=16, max_latents=4, num_channels=32).model_config(262))
    model.eval()
    x = torch.randint(6, 262, (2, 16))
    labels = torch.randint(6, 262, (2, 16))
    pad_mask = torch.zeros(2, 16, dtype=torch.bool)
    pad_mask[1, :14] = True  # row 1 is left padded into the latents: its first two latent labels must not count
    with torch.no_grad():
        logits = model(x, prefix_len=12).logits
        full = clm_loss(model, labels, x, None, max_latents=4)
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 262), labels[:, -4:].reshape(-1))
        assert full.item() == pytest.approx(expected.item(), rel=1e-5)

        logits = model(x, prefix_len=12, pad_mask=pad_mask).logits
        kept = ~pad_mask[:, -4:]
        expected = torch.nn.functional.cross_entropy(logits[kept], labels[:, -4:][kept])
        masked = clm_loss(model, labels, x, pad_mask, max_latents=4)
        assert masked.item() == pytest.approx(expected.item(), rel=1e-5)

        short = clm_loss(model, labels[:, :3], x[:, :3], None, max_latents=4)  # fewer tokens than latents
        assert torch.isfinite(short)


def test_without_validation_data(text_file, tmp_path):
    metrics = train_clm(tiny_config(text_file, tmp_path, valid_fraction=0.0, max_steps=2, eval_every=1))
    assert metrics["val_loss"] is None and metrics["val_bpb"] is None and metrics["initial_val_loss"] is None
    assert metrics["step"] == 2 and metrics["train_loss"] > 0


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(text_file, tmp_path, monkeypatch):
    common = dict(max_steps=5, eval_every=0, grad_accum_steps=2, random_truncation=True, min_seq_len=8)
    straight = train_clm(tiny_config(text_file, tmp_path, **common, out_dir=str(tmp_path / "straight")))

    calls = []
    real_loss = train_module.clm_loss

    def interrupted_loss(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # evaluation runs without grad
        if sum(calls) == 6:  # the second micro-batch of the third training step
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "clm_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train_clm(tiny_config(text_file, tmp_path, **common))
    assert torch.load(tmp_path / "run" / TRAINING_STATE_FILE, weights_only=True)["step"] == 2
    monkeypatch.setattr(train_module, "clm_loss", real_loss)

    resumed = train_clm(tiny_config(text_file, tmp_path, **common, resume=True))
    assert resumed["start_step"] == 2 and resumed["step"] == 5
    assert [loss for _, loss in resumed["history"]] == pytest.approx([loss for _, loss in straight["history"]])
    a = clm.CausalLanguageModel.from_pretrained(tmp_path / "straight").state_dict()
    b = clm.CausalLanguageModel.from_pretrained(tmp_path / "run").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# Ctrl-C as the terminal sends it: a real SIGINT, delivered to Python's handler (as opposed to a KeyboardInterrupt
# raised by hand, which no signal handler can hold back).
def ctrl_c():
    signal.raise_signal(signal.SIGINT)


@pytest.fixture
def terminal_ctrl_c():
    """Python's own SIGINT handler, as in a terminal: a test run in the background (``make test &``, some CI
    runners) starts with SIGINT ignored, and Python then installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_holding_ctrl_c_leaves_an_ignored_sigint_ignored():
    # A run started in the background ignores SIGINT: holding it back must not make two of them stop the run.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with train_module._ctrl_c_held(second_interrupts=True):
            ctrl_c()
            ctrl_c()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_right_after_an_update_saves_that_step(text_file, tmp_path, straight_run, terminal_ctrl_c):
    # Ctrl-C between the optimizer's update and the loop's bookkeeping (here: just after AdamW's second step) must not
    # save step 2's weights and Adam state as step 1: a resume would train on step 2's batch twice.
    updates = []

    def after_update(optimizer, args, kwargs):
        updates.append(len(updates) + 1)
        if len(updates) == 2:
            ctrl_c()

    config = tiny_config(text_file, tmp_path, **{**CHECKPOINTED, "checkpoint_every": 0})
    hook = register_optimizer_step_post_hook(after_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_clm(config)
        out = tmp_path / "run"
        state = torch.load(out / TRAINING_STATE_FILE, weights_only=True)
        adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
        assert state["step"] == 2 and adam_steps == {2} and [s for s, _ in state["history"]] == [1, 2]
        with open(out / METRICS_FILE, newline="") as fh:
            assert [int(row["step"]) for row in csv.DictReader(fh)] == [0, 1, 2]  # step 2's row too

        resumed = train_clm(replace(config, resume=True))
    finally:
        hook.remove()
    assert resumed["start_step"] == 2 and len(updates) == 4  # steps 3 and 4, each trained once
    assert_same_weights(straight_run, final_weights(out))


def test_sigterm_takes_ctrl_c_s_path_and_is_held_through_an_update(text_file, tmp_path, straight_run):
    """SIGTERM (job schedulers, docker stop, kill) saves the last completed step as Ctrl-C does; one that lands right
    after an update is held back like Ctrl-C, so that step is saved whole. Its default action killed the run."""
    updates = []

    def after_update(optimizer, args, kwargs):
        updates.append(len(updates) + 1)
        if len(updates) == 2:
            signal.raise_signal(signal.SIGTERM)

    config = tiny_config(text_file, tmp_path, **{**CHECKPOINTED, "checkpoint_every": 0})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    hook = register_optimizer_step_post_hook(after_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_clm(config)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
        assert saved_step(tmp_path / "run") == 2
        resumed = train_clm(replace(config, resume=True))
    finally:
        hook.remove()
    assert resumed["start_step"] == 2 and len(updates) == 4
    assert_same_weights(straight_run, final_weights(tmp_path / "run"))


def test_a_sigterm_handler_of_the_caller_is_left_alone(text_file, tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0))
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL and not seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_during_the_final_checkpoint_finishes_it_first(
    text_file, tmp_path, monkeypatch, straight_run, terminal_ctrl_c
):
    # With checkpoint_every=0 the final checkpoint is the run's only one: Ctrl-C while it is written must not discard
    # it (and every step with it). The write completes, then the interrupt goes on.
    real_save = clm.CausalLanguageModel.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        ctrl_c()  # pressed while the checkpoint is being written
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(clm.CausalLanguageModel, "save_pretrained", save_pretrained)
    config = tiny_config(text_file, tmp_path, **{**CHECKPOINTED, "checkpoint_every": 0})
    with pytest.raises(KeyboardInterrupt):
        train_clm(config)
    monkeypatch.setattr(clm.CausalLanguageModel, "save_pretrained", real_save)
    out = tmp_path / "run"
    assert saved_step(out) == 4 and not (out / train_module.STAGING_DIR).exists()
    assert train_module.checkpoint_problem(out) is None  # whole: every file as its manifest says
    assert_same_weights(straight_run, final_weights(out))
    assert train_clm(replace(config, resume=True))["start_step"] == 4


def test_a_second_ctrl_c_abandons_the_final_checkpoint(
    text_file, tmp_path, monkeypatch, straight_run, terminal_ctrl_c
):
    # Ctrl-C pressed again while the final checkpoint is held for stops the write at once (a slow or stuck disk must
    # not trap the user): the staged write is discarded, never half moved in, and the previous checkpoint stays whole.
    real_save = clm.CausalLanguageModel.save_pretrained
    saves = []

    def save_pretrained(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the final checkpoint; the first is step 2's
            ctrl_c()
            ctrl_c()
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(clm.CausalLanguageModel, "save_pretrained", save_pretrained)
    with pytest.raises(KeyboardInterrupt):
        train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED))
    monkeypatch.setattr(clm.CausalLanguageModel, "save_pretrained", real_save)
    out = tmp_path / "run"
    assert len(saves) == 2 and saved_step(out) == 2 and not (out / train_module.STAGING_DIR).exists()
    assert train_module.checkpoint_problem(out) is None
    train_clm(tiny_config(text_file, tmp_path, **CHECKPOINTED, resume=True))
    assert_same_weights(straight_run, final_weights(out))


# ---------------------------------------------------------------------------------------------------- logs, precision


def test_metrics_csv_has_one_row_per_step_and_survives_resume(text_file, tmp_path):
    config = tiny_config(text_file, tmp_path, max_steps=4, eval_every=2, checkpoint_every=2)
    metrics = train_clm(config)
    path = tmp_path / "run" / METRICS_FILE
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == METRICS_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["train_loss"] == ""
    assert float(rows[0]["val_loss"]) == pytest.approx(metrics["initial_val_loss"], 1e-5)
    assert [float(r["train_loss"]) for r in rows[1:]] == pytest.approx([loss for _, loss in metrics["history"]], 1e-5)
    assert [r["val_loss"] != "" for r in rows[1:]] == [False, True, False, True]  # every 2 steps and at the end
    assert float(rows[4]["val_ppl"]) == pytest.approx(math.exp(metrics["val_loss"]), 1e-5)
    assert float(rows[4]["val_bpb"]) == pytest.approx(metrics["val_bpb"], 1e-5)
    assert [float(r["lr"]) for r in rows[1:]] == pytest.approx([lr_at(step, config) for step in range(4)], 1e-5)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows[1:])

    # A resumed run rewrites the file: the rows up to its start step, then its own.
    train_clm(tiny_config(text_file, tmp_path, max_steps=6, eval_every=2, resume=True))
    with open(path, newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3, 4, 5, 6]


def metrics_steps(out_dir):
    with open(out_dir / METRICS_FILE, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def test_a_kill_while_a_resume_rewrites_metrics_csv_keeps_its_rows(text_file, tmp_path, monkeypatch):
    # A resume cuts metrics.csv back to the rows up to its start step. It used to reopen the file with "w" and write
    # the kept rows back: killed in between, the whole history was gone.
    train_clm(tiny_config(text_file, tmp_path, max_steps=4, eval_every=0, checkpoint_every=2))
    out = tmp_path / "run"
    before = (out / METRICS_FILE).read_text()

    def killed(self, rows):
        raise Killed  # the kill lands while the kept rows are written

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(Killed):
        train_clm(tiny_config(text_file, tmp_path, max_steps=6, eval_every=0, resume=True))
    monkeypatch.undo()
    assert (out / METRICS_FILE).read_text() == before
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]
    train_clm(tiny_config(text_file, tmp_path, max_steps=6, eval_every=0, resume=True))
    assert metrics_steps(out) == [0, 1, 2, 3, 4, 5, 6]


def test_a_resume_drops_metrics_rows_cut_short_or_out_of_order(text_file, tmp_path, capsys):
    # A crash or a full disk mid-row leaves a cut-short last row: kept as a row of "step 1", or a ValueError of int()
    # naming no file that stopped the resume. Only rows that parse and whose steps increase are kept, with a warning.
    train_clm(tiny_config(text_file, tmp_path, max_steps=6, eval_every=0))
    path = tmp_path / "run" / METRICS_FILE
    rows = path.read_text().splitlines(keepends=True)[:7]  # the header and steps 0 to 5; the checkpoint is at step 6
    cut_short = ["1", ",5.5", "6,5.5", "6,5.5,0.001,,,,,,", "3,5.5,0.001,100,,,"]  # ... and a step repeated
    for tail in cut_short:
        path.write_text("".join(rows) + tail)
        capsys.readouterr()
        train_clm(tiny_config(text_file, tmp_path, max_steps=6, eval_every=0, resume=True))
        assert metrics_steps(tmp_path / "run") == [0, 1, 2, 3, 4, 5], tail
        assert f"warning: {path}: dropped 1 of its rows" in capsys.readouterr().out, tail


def test_a_new_run_keeps_the_rows_of_one_stopped_before_its_first_checkpoint(text_file, tmp_path, monkeypatch, capsys):
    # A run killed before its first checkpoint leaves only metrics.csv, which the next run into the directory used to
    # truncate. Its rows are moved aside under a name not taken yet, and the new run says where.
    real_write = train_module.MetricsLog.write

    def killed_at_step_2(self, step, **values):
        real_write(self, step, **values)
        if step == 2:
            raise Killed

    monkeypatch.setattr(train_module.MetricsLog, "write", killed_at_step_2)
    with pytest.raises(Killed):
        train_clm(tiny_config(text_file, tmp_path, max_steps=5, eval_every=0))
    monkeypatch.undo()
    out = tmp_path / "run"
    old_rows = (out / METRICS_FILE).read_text()
    assert metrics_steps(out) == [0, 1, 2] and not (out / TRAINING_STATE_FILE).exists()

    monkeypatch.setattr(train_module, "_utc_stamp", lambda: "20260101T000000Z")
    (out / "metrics.20260101T000000Z.csv").write_text("taken")
    capsys.readouterr()
    train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, lr=1e-2))
    aside = out / "metrics.20260101T000000Z-1.csv"
    assert aside.read_text() == old_rows and (out / "metrics.20260101T000000Z.csv").read_text() == "taken"
    assert f"moved to {aside}" in capsys.readouterr().out
    assert metrics_steps(out) == [0, 1]
    # The names given to moved rows are the ones the demo knows as a stopped run's (it writes over them).
    assert train_module.METRICS_ASIDE.fullmatch(aside.name)

    # overwrite=True replaces the run, its rows included (nothing is moved aside).
    train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, overwrite=True))
    assert metrics_steps(out) == [0, 1, 2] and len(list(out.glob("metrics.*.csv"))) == 2


def test_precision():
    assert autocast_dtype("auto", torch.device("cpu")) is None  # fp32 on CPU
    assert autocast_dtype("bf16", torch.device("cpu")) is None  # a no-op on CPU
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def _perceiver_ar_runs_under_autocast(device_type: str) -> bool:
    """Whether Perceiver AR's forward works under bf16 autocast: rotary embeddings must keep q/k in the dtype of v
    (the attention op requires one dtype; `RotaryPositionEmbedding.rotate` multiplies by fp32 angles)."""
    model = clm.CausalLanguageModel(TrainConfig(max_seq_len=8, max_latents=4, num_channels=16).model_config(262))
    x = torch.randint(6, 262, (1, 8), device=device_type)
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
            model.to(device_type)(x, prefix_len=4)
    except TypeError as e:
        assert "share a dtype" in str(e)
        return False
    return True


@pytest.mark.parametrize("train", [train_clm, train_mlm], ids=["clm", "mlm"])
def test_the_autocast_path(text_file, tmp_path, monkeypatch, train):
    # CPU autocast is off in training (bf16 is slower there); forcing it on runs the code path CUDA takes. The bf16 run
    # must learn and stay close to the same run in fp32. (At lr 1e-2 this tiny masked model diverges after ~13 steps
    # in fp32 just as in bf16, so a stable rate is used: the test is about autocast, not about the rate's margin.)
    if train is train_clm and not _perceiver_ar_runs_under_autocast("cpu"):
        pytest.skip("Perceiver AR's rotary embedding leaves q/k in fp32 under autocast (models/core/position.py)")
    common = dict(max_steps=15, eval_every=0)
    fp32 = train(tiny_config(text_file, tmp_path, **common, out_dir=str(tmp_path / "fp32")))
    monkeypatch.setattr(train_module, "autocast_dtype", lambda precision, device: torch.bfloat16)
    bf16 = train(tiny_config(text_file, tmp_path, **common, out_dir=str(tmp_path / "bf16")))
    assert bf16["val_loss"] < bf16["initial_val_loss"] - 0.5
    assert bf16["val_loss"] != fp32["val_loss"]  # bf16 arithmetic did run...
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.1)  # ...and trained as well as fp32


@pytest.mark.gpu
@pytest.mark.parametrize("train", [train_clm, train_mlm], ids=["clm", "mlm"])
def test_bf16_autocast_on_cuda(text_file, tmp_path, train):
    if train is train_clm and not _perceiver_ar_runs_under_autocast("cuda"):
        pytest.skip("Perceiver AR's rotary embedding leaves q/k in fp32 under autocast (models/core/position.py)")
    metrics = train(tiny_config(text_file, tmp_path, device="cuda", precision="bf16", max_steps=20))
    assert metrics["val_loss"] < metrics["initial_val_loss"] - 0.5


# ---------------------------------------------------------------------------------------------------- masked LM


def test_mlm_loss_falls_and_the_checkpoint_loads(text_file, tmp_path):
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    metrics = train_mlm(tiny_config(text_file, tmp_path, max_steps=30, eval_every=0))
    assert abs(metrics["first_train_loss"] - math.log(262)) < 0.3
    assert metrics["val_loss"] < metrics["initial_val_loss"] - 2.0
    assert metrics["train_loss"] < metrics["first_train_loss"] - 2.0
    model = MaskedLanguageModel.from_pretrained(tmp_path / "run")
    assert (model.config.num_latents, model.config.num_latent_channels, model.config.encoder.max_seq_len) == (8, 32, 32)
    x = torch.randint(6, 262, (2, 32))
    assert model(x).shape == (2, 32, 262)


def test_mlm_resume_continues_exactly(text_file, tmp_path, monkeypatch):
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    snapshot = tmp_path / "at_step_3"
    real_save = train_module.save_checkpoint

    def save_and_copy(out_dir, *args, **kwargs):
        result = real_save(out_dir, *args, **kwargs)
        if args[4] == 3:
            shutil.copytree(out_dir, snapshot)
        return result

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_copy)
    common = dict(max_steps=6, checkpoint_every=3, eval_every=0, post_attention_dropout=0.1, grad_accum_steps=2)
    straight = train_mlm(tiny_config(text_file, tmp_path, **common))
    resumed = train_mlm(tiny_config(text_file, tmp_path, **common, out_dir=str(snapshot), resume=True))
    assert resumed["start_step"] == 3
    assert [loss for _, loss in resumed["history"]] == pytest.approx([loss for _, loss in straight["history"]])
    a = MaskedLanguageModel.from_pretrained(tmp_path / "run").state_dict()
    b = MaskedLanguageModel.from_pretrained(snapshot).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="max_latents: 8 saved, 4 given"):
        train_mlm(tiny_config(text_file, tmp_path, **{**common, "max_latents": 4}, out_dir=str(snapshot), resume=True))


@pytest.mark.parametrize(
    "setting",
    [
        {"random_truncation": True},
        {"min_seq_len": 16},
        {"residual_dropout": 0.1},
        {"output_norm": True},
        {"abs_pos_emb": False},
        {"num_self_attention_rotary_layers": 0},
        {"cross_attention_dropout": 0.0},
    ],
)
def test_mlm_refuses_the_causal_models_settings(text_file, tmp_path, setting):
    # The Perceiver IO masked model has no prefix, rotary layers or output norm, and its batches are never truncated:
    # these settings would change nothing, so a run that gives them is refused instead of silently ignoring them.
    ((name, value),) = setting.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r}.*clm only"):
        train_mlm(tiny_config(text_file, tmp_path, **setting))
    assert not (tmp_path / "run").exists()  # refused before any work
    assert name in train_module.CLM_ONLY_FIELDS


@pytest.mark.parametrize("setting", [{"num_input_channels": 16}, {"mask_prob": 0.3}, {"whole_word_masking": True}])
def test_clm_refuses_the_masked_models_settings(text_file, tmp_path, setting):
    # The other way round: Perceiver AR embeds tokens at num_channels and masks nothing.
    ((name, value),) = setting.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r}.*mlm only"):
        train_clm(tiny_config(text_file, tmp_path, **setting))
    assert not (tmp_path / "run").exists()
    assert name in train_module.MLM_ONLY_FIELDS


def test_an_mlm_run_saved_with_ignored_clm_settings_still_resumes(text_file, tmp_path, monkeypatch):
    # Older versions accepted the clm only settings for the masked task, ignored them and saved them in
    # train_config.json: they never shaped that run, so resuming it with the defaults changes nothing and is allowed.
    monkeypatch.setattr(train_module.MLMTask, "unused_fields", frozenset())  # such an older version
    train_mlm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, random_truncation=True, min_seq_len=16))
    monkeypatch.undo()
    metrics = train_mlm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, resume=True))
    assert metrics["start_step"] == 1 and metrics["step"] == 2


def test_gradient_accumulation_follows_the_logged_token_weighted_loss(text_file, tmp_path):
    # The masked task's micro-batches hold different numbers of masked tokens. The step's gradient must be that of the
    # loss the loop logs, the sum over all masked tokens of the step divided by their number, not the mean of the
    # micro-batches' means (which weighs a token of a sparsely masked micro-batch more).
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    config = tiny_config(text_file, tmp_path, batch_size=2, grad_accum_steps=2, max_steps=1, eval_every=0,
                         grad_clip=0.0, warmup_steps=0)
    torch.manual_seed(0)
    model = MaskedLanguageModel(config.mlm_model_config(262))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    micro_batches, loop_grads = [], {}

    class Recording(train_module.MLMTask):
        def loss_sum(self, model, batch, config):
            if model.training:
                micro_batches.append(batch)
            return super().loss_sum(model, batch, config)

    def before_update(optimizer, args, kwargs):
        loop_grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    hook = register_optimizer_step_pre_hook(before_update)
    try:
        metrics = train_module.train(config, Recording(), model=model)
    finally:
        hook.remove()

    counts = [int((labels != -100).sum()) for labels, _, _ in micro_batches]
    assert len(counts) == 2 and counts[0] != counts[1]  # else both weightings agree and the test proves nothing
    model.load_state_dict(start, strict=False)
    model.zero_grad()
    task = train_module.MLMTask()
    total = sum(task.loss_sum(model, batch, config) for batch in micro_batches)
    (total / sum(counts)).backward()
    assert metrics["history"][0][1] == pytest.approx(total.item() / sum(counts), rel=1e-5)
    assert loop_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(loop_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_mlm_model_config_mapping():
    config = TrainConfig(max_seq_len=64, max_latents=16, num_channels=48, num_heads=3, num_self_attention_layers=2,
                         num_input_channels=24, post_attention_dropout=0.1)
    model_config = config.mlm_model_config(vocab_size=262)
    assert (model_config.num_latents, model_config.num_latent_channels) == (16, 48)
    encoder, decoder = model_config.encoder, model_config.decoder
    assert (encoder.num_input_channels, encoder.max_seq_len, encoder.vocab_size) == (24, 64, 262)
    assert (encoder.num_cross_attention_heads, encoder.num_self_attention_heads) == (3, 3)
    assert encoder.num_self_attention_layers_per_block == 2 and encoder.dropout == decoder.dropout == 0.1
    assert (decoder.max_seq_len, decoder.num_cross_attention_heads, decoder.num_output_query_channels) == (64, 3, None)


def test_a_batch_larger_than_the_data_or_no_validation_chunks_are_said(tmp_path, capsys):
    # A batch of more chunks than the corpus holds trains on all of them each step (an epoch per step), and a context
    # longer than the corpus leaves no validation chunk: both quietly changed the run.
    corpus = tmp_path / "small.txt"
    corpus.write_text("tiny corpus. " * 3, encoding="utf-8")  # one chunk of 33 tokens
    train_clm(tiny_config(corpus, tmp_path, batch_size=64, max_steps=1, eval_every=0))
    printed = capsys.readouterr().out
    assert "warning: batch_size 64 is more than the 1 training chunks" in printed
    assert "warning: no validation chunks" in printed
    corpus.write_text("tiny corpus. " * 40, encoding="utf-8")
    train_clm(tiny_config(corpus, tmp_path, batch_size=8, max_steps=1, eval_every=0, overwrite=True))
    assert "warning" not in capsys.readouterr().out


def test_a_run_directory_named_another_way_is_the_same_run(text_file, tmp_path, monkeypatch):
    # The refusal to train into a run's directory describes that run; the directory spelled relative to the working
    # directory this time is not a difference of config.
    train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(step 1; the same config as this run\)"):
        train_clm(tiny_config(text_file, tmp_path, max_steps=1, eval_every=0, out_dir="run"))


def test_tensorboard_is_optional(text_file, tmp_path, capsys):
    metrics = train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, tensorboard=True))
    assert metrics["step"] == 2 and (tmp_path / "run" / METRICS_FILE).is_file()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard logging is off" in capsys.readouterr().out
    else:
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_hub_dataset_with_a_configuration(monkeypatch):
    # --data wikitext --dataset-config wikitext-103-raw-v1, offline: datasets.load_dataset is replaced by its rows.
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return {"text": [" = Title = \n", "\n", " Some text about a tower .\n"] * 50}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = TrainConfig(data="wikitext", dataset_config="wikitext-103-raw-v1", max_seq_len=32, max_latents=8)
    data = train_module.prepare_data(config, chunk_len=33)
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train")]
    text = "".join([" = Title = \n", "\n", " Some text about a tower .\n"] * 50)
    assert data.num_bytes == len(text) and data.num_tokens == len(text) + 1 and data.vocab_size == 262
    assert data.train.shape[1] == 33 and len(data.train) + len(data.valid) == (len(text) + 1) // 33
    with pytest.raises(ValueError, match="dataset_config needs data"):
        TrainConfig(dataset_config="wikitext-103-raw-v1")


def test_hub_dataset_rows_that_are_documents_stay_apart(monkeypatch):
    # Most datasets store a document (an article, a sentence) per row, without a final newline: joining the rows as
    # WikiText's lines are joined would glue "here.Second" together. Such rows are documents of their own, each
    # followed by [EOS], as when the same dataset is loaded without a configuration.
    datasets = pytest.importorskip("datasets")
    rows = ["First article ends here.", "Second article starts here.\n", "", "Third one."]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config_name, split: {"text": rows})
    num_tokens = sum(len(row) + 1 for row in rows)
    config = TrainConfig(data="articles", dataset_config="en", max_seq_len=num_tokens - 1, max_latents=4,
                         valid_fraction=0.0)
    data = train_module.prepare_data(config, chunk_len=num_tokens)
    assert (data.num_documents, data.num_tokens, data.num_bytes) == (4, num_tokens, sum(map(len, rows)))
    stream = BytesTokenizer().decode(data.train.flatten(), skip_special_tokens=False)
    assert stream == "First article ends here.[EOS]Second article starts here.\n[EOS][EOS]Third one.[EOS]"


def test_a_hub_dataset_sizes_the_model_for_the_tokenizers_added_tokens(monkeypatch, tmp_path):
    # A transformers tokenizer's vocab_size leaves out its added tokens (Llama-3's and Qwen2's EOS are added ones):
    # a model sized by it has no embedding row for the separator.
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    vocab["[UNK]"] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    assert tokenizer.eos_token_id == tokenizer.vocab_size == len(vocab)  # the separator is past vocab_size
    rows = [f"row {'abc' * (i % 5)} of text" for i in range(200)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config_name, split: {"text": rows})
    config = tiny_config(None, tmp_path, data="rows", dataset_config="en", max_steps=2, eval_every=0, cache_dir=None)
    data = train_module.prepare_data(config, chunk_len=33, tokenizer=tokenizer)
    assert data.vocab_size == len(tokenizer) and int(data.train.max()) == tokenizer.eos_token_id
    metrics = train_clm(config, tokenizer=tokenizer)
    assert math.isfinite(metrics["train_loss"])


def test_mlm_refuses_data_of_another_tokenizer(text_file, tmp_path):
    # MLM masks with the bytes tokenizer's [MASK] and special ids: in another vocabulary they are ordinary tokens.
    class Letters:
        vocab_size, eos_token_id = 1000, 0

        def encode(self, text):
            return [1 + ord(c) % 999 for c in text]

    data = prepare_clm_data(str(text_file), max_seq_len=31, tokenizer=Letters(), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="mlm trains on the bytes tokenizer's ids .*a vocabulary of 1000"):
        train_mlm(tiny_config(text_file, tmp_path, max_steps=1), data=data)
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_a_model_with_more_latents_than_the_config_needs_room_for_its_prefix(text_file, tmp_path):
    config = tiny_config(text_file, tmp_path, max_steps=1)  # max_seq_len 32, max_latents 8: a prefix of 24
    model = clm.CausalLanguageModel(
        clm.CausalLanguageModelConfig(
            vocab_size=262, max_seq_len=32, max_latents=16, num_channels=32, num_heads=2, num_self_attention_layers=1
        )
    )
    with pytest.raises(ValueError, match="a prefix of at most 16.*max_latents 8: a prefix of 24"):
        train_clm(config, model=model)
    roomy = clm.CausalLanguageModel(replace(model.config, max_seq_len=48))  # prefix up to 32, 16 latents
    assert math.isfinite(train_clm(config, model=roomy)["train_loss"])


# ------------------------------------------------------------------------- diverged runs, steps with nothing to predict


def poison_training_loss(monkeypatch, at_call, poison):
    """Pass the loss of the `at_call`-th training micro-batch (1-based; evaluation does not count) through `poison`."""
    real = train_module.CLMTask.loss_sum
    calls = []

    def loss_sum(self, model, batch, config):
        loss = real(self, model, batch, config)
        if model.training:
            calls.append(len(calls) + 1)
            if calls[-1] == at_call:
                loss = poison(loss)
        return loss

    monkeypatch.setattr(train_module.CLMTask, "loss_sum", loss_sum)


def record_checkpoints(monkeypatch):
    """The steps of the checkpoints the run writes, in order."""
    steps, real_save = [], train_module.save_checkpoint

    def save(out_dir, *args, **kwargs):
        steps.append(args[4])  # the step
        return real_save(out_dir, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    return steps


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipping", "no clipping"])
def test_a_nan_loss_stops_the_run_before_its_update_and_keeps_the_checkpoint(
    text_file, tmp_path, monkeypatch, grad_clip
):
    problem = "loss nan, gradient norm nan"  # the norm is measured without clipping too
    poison_training_loss(monkeypatch, at_call=5, poison=lambda loss: loss * float("nan"))  # step 5's loss
    saved = record_checkpoints(monkeypatch)
    updates = []
    hook = register_optimizer_step_pre_hook(lambda *args: updates.append(1))
    config = tiny_config(text_file, tmp_path, max_steps=8, checkpoint_every=2, eval_every=2, grad_clip=grad_clip)
    try:
        with pytest.raises(ValueError) as raised:
            train_clm(config)
    finally:
        hook.remove()
    out = tmp_path / "run"
    assert str(raised.value).startswith(
        f"training diverged at step 5 ({problem}); the last checkpoint, of step 4 in {out}, was kept and nothing was "
        "written after it. Try a lower lr (now 0.003)"
    )
    assert len(updates) == 4 and saved == [2, 4]  # no update at step 5, no checkpoint after it (nor on the way out)
    assert saved_step(out) == 4 and all(torch.isfinite(w).all() for w in final_weights(out).values())
    assert metrics_steps(out) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipping", "no clipping"])
def test_a_non_finite_gradient_norm_stops_the_run(text_file, tmp_path, monkeypatch, grad_clip):
    """Without clipping too: a NaN gradient under a finite loss would make the weights NaN before any loss shows it,
    and a checkpoint of that step would save them."""
    def infinite_gradient(loss):  # the loss stays finite; its gradient, and so every weight's, does not
        loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    poison_training_loss(monkeypatch, at_call=2, poison=infinite_gradient)
    saved = record_checkpoints(monkeypatch)
    with pytest.raises(ValueError, match=r"at step 2 \(gradient norm (inf|nan)\); the run has no checkpoint, and none"):
        train_clm(tiny_config(text_file, tmp_path, max_steps=4, eval_every=0, grad_clip=grad_clip))
    assert saved == [] and not (tmp_path / "run" / "model.safetensors").exists()


def test_a_non_finite_validation_loss_stops_the_run_before_its_checkpoint(text_file, tmp_path, monkeypatch):
    real_evaluate, calls = train_module.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        return float("inf") if len(calls) == 3 else real_evaluate(*args, **kwargs)  # steps 0, 2, 4: at step 4

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    saved = record_checkpoints(monkeypatch)
    config = tiny_config(text_file, tmp_path, max_steps=6, checkpoint_every=2, eval_every=2)
    with pytest.raises(ValueError, match=r"diverged at step 4 \(validation loss inf\); the last checkpoint, of step 2"):
        train_clm(config)
    assert saved == [2] and saved_step(tmp_path / "run") == 2
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    assert train_clm(replace(config, resume=True))["step"] == 6  # the checkpoint kept is one to resume from


def test_a_gpu_runs_training_state_loads_on_the_cpu_first(tmp_path, monkeypatch):
    """A GPU run's optimizer state holds CUDA tensors: read onto the CPU (load_state_dict moves them), a resume on a
    CPU-only machine works instead of calling the checkpoint damaged."""
    seen = {}
    real_load = torch.load

    def load(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    torch.save({"step": 3}, tmp_path / "training_state.pt")
    monkeypatch.setattr(torch, "load", load)
    assert train_module._load_training_state(tmp_path / "training_state.pt") == {"step": 3}
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


def test_a_resume_at_step_0_keeps_its_metrics_file(text_file, tmp_path):
    """A run saved at step 0 (max_steps=0) and resumed logs into its own metrics.csv, not moved aside as another's."""
    train_clm(tiny_config(text_file, tmp_path, max_steps=0, eval_every=0))
    train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, resume=True))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("metrics*.csv")) == [METRICS_FILE]
    with open(out / METRICS_FILE, newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2]


def test_undecodable_bytes_in_metrics_csv_are_dropped_as_a_garbled_row(text_file, tmp_path, capsys):
    config = tiny_config(text_file, tmp_path, max_steps=2, eval_every=0, checkpoint_every=1)
    train_clm(config)
    with open(tmp_path / "run" / METRICS_FILE, "ab") as fh:
        fh.write(b"\xff\xfe3,4.1\n")  # a crash mid-write on a disk that returned junk
    assert train_clm(replace(config, max_steps=3, resume=True))["step"] == 3
    assert "dropped 1 of its rows" in capsys.readouterr().out
    with open(tmp_path / "run" / METRICS_FILE, newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 1, 2, 3]


def test_a_lock_file_that_cannot_be_opened_is_a_clear_error(text_file, tmp_path, monkeypatch):
    """Refused through the collective that tells every process, not raised on rank 0 alone (the others would wait
    for it in that collective until their timeout)."""
    real_open = os.open

    def open_refusing_the_lock(path, *args, **kwargs):
        if str(path).endswith(train_module.LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_refusing_the_lock)
    with pytest.raises(ValueError, match=r"cannot use .*run as the run directory: \[Errno 13\] Permission denied"):
        train_clm(tiny_config(text_file, tmp_path))


def test_a_loss_past_exps_range_has_an_infinite_perplexity(text_file, tmp_path, monkeypatch):
    assert train_module.perplexity(1.0) == pytest.approx(math.e) and train_module.perplexity(710.0) == math.inf
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: 800.0)  # finite, but exp() overflows
    metrics = train_clm(tiny_config(text_file, tmp_path, max_steps=2, eval_every=1))
    assert metrics["val_loss"] == 800.0 and metrics["val_ppl"] == math.inf
    with open(tmp_path / "run" / METRICS_FILE, newline="") as fh:
        assert [row["val_ppl"] for row in csv.DictReader(fh)] == ["inf"] * 3


def test_mlm_validation_without_a_masked_token_has_no_loss(text_file, tmp_path, capsys):
    # mask_prob 1e-4 selects none of the 64 tokens scored (the masks are seeded): no mean, so no loss, not 0.
    config = tiny_config(text_file, tmp_path, mask_prob=1e-4, batch_size=2, max_steps=2, eval_every=1, eval_batches=1)
    metrics = train_mlm(config)
    assert metrics["initial_val_loss"] is None and metrics["val_loss"] is None and metrics["val_ppl"] is None
    assert capsys.readouterr().out.count("validation batches hold no token to predict") == 1  # said once


def blank_steps(monkeypatch, blank):
    """Drop every masked label of the training steps in `blank` (0-based), as if masking had selected none."""
    real = train_module.MLMTask.collator

    def collator(self, config, generator, train):
        collate = real(self, config, generator, train)

        def blanked(chunks):
            labels, x, pad_mask = collate(chunks)
            if train and generator.initial_seed() in blank:  # the step's seed: the step itself with seed 0, 1 micro
                labels = torch.full_like(labels, -100)
            return labels, x, pad_mask

        return blanked

    monkeypatch.setattr(train_module.MLMTask, "collator", collator)


def test_an_mlm_step_without_a_masked_token_skips_its_update_and_resumes_exactly(
    text_file, tmp_path, monkeypatch, capsys
):
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    blank_steps(monkeypatch, {1, 2})  # steps 2 and 3
    snapshot = tmp_path / "at_step_2"
    copy_checkpoints(monkeypatch, {2: snapshot})
    updates = []
    hook = register_optimizer_step_pre_hook(lambda *args: updates.append(1))
    common = dict(max_steps=4, checkpoint_every=2, eval_every=0, warmup_steps=1)
    try:
        straight = train_mlm(tiny_config(text_file, tmp_path, **common))
    finally:
        hook.remove()
    assert len(updates) == 2  # AdamW steps only where there is a loss: no weight decay or momentum on nothing
    assert [loss is None for _, loss in straight["history"]] == [False, True, True, False]
    assert "warning: step 2: its batch holds no token to predict" in capsys.readouterr().out
    assert straight["train_loss"] == pytest.approx((straight["history"][0][1] + straight["history"][3][1]) / 2)
    with open(tmp_path / "run" / METRICS_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))[1:]
    assert [row["train_loss"] == "" for row in rows] == [False, True, True, False]
    config = tiny_config(text_file, tmp_path, **common)
    assert [float(row["lr"]) for row in rows] == pytest.approx([lr_at(step, config) for step in range(4)])

    resumed = train_mlm(tiny_config(text_file, tmp_path, **common, out_dir=str(snapshot), resume=True))
    assert resumed["start_step"] == 2 and resumed["history"][:3] == straight["history"][:3]  # (2, None) saved, loaded
    assert resumed["history"][3] == pytest.approx(straight["history"][3])
    a = MaskedLanguageModel.from_pretrained(tmp_path / "run").state_dict()
    b = MaskedLanguageModel.from_pretrained(snapshot).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_hub_dataset_rows_of_no_text_are_refused(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config_name, split: {"text": ["", "", ""]})
    config = TrainConfig(data="empty", dataset_config="en", max_seq_len=1, max_latents=1)
    with pytest.raises(ValueError, match="the corpus has no text: its only document is empty"):
        train_module.prepare_data(config, chunk_len=2)
