"""``perceiver_fast.durable``: a file is replaced whole or not at all, and on disk before the rename."""

import os

import pytest

from perceiver_fast.durable import replace_atomically, sync


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_interrupted(temporary):
        temporary.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, half_then_interrupted)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert replace_atomically(path, lambda temporary: temporary.write_text("new")) == path
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_the_temporary_is_synced_before_it_is_renamed(tmp_path, renames, monkeypatch):
    replace_atomically(tmp_path / "f.txt", lambda temporary: temporary.write_text("x"), tmp_path / ".f.tmp")
    assert renames == [("f.txt", True)]
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    sync(tmp_path)  # a directory (its renames)
    sync(tmp_path / "missing")  # nothing to sync: no error
    assert synced == [os.stat(tmp_path).st_ino]
