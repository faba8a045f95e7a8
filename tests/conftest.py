import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any project import; this is how
# the Triton kernels run on CPU tensors in CI. No test may reach a hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slower variant of a path that a faster default test also covers")
    config.addinivalue_line("markers", "parity: compares with the perceiver-io package (skipped when absent)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def renames(monkeypatch):
    """Every ``os.replace`` from here on, as ``(destination name, whether its source was fsynced first)``: a rename
    can reach the disk before the data it names, so a durable write syncs the file before publishing it."""
    synced, seen = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        seen.append((os.path.basename(dst), os.stat(src).st_ino in synced))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen
