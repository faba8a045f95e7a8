import pytest

from perceiver_fast.generation.cache import _DecodingBase


@pytest.fixture(autouse=True)
def _decode_as_on_a_gpu(monkeypatch):
    """Decoders pack the layers' projections on GPUs only: the tests here run that path on the CPU too."""
    monkeypatch.setattr(_DecodingBase, "pack_devices", ("cpu", "cuda"))
