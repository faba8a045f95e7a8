"""perceiver-io 0.11.0's SymbolicAudioModel vs ours on the same weights (loaded strict): equal logits."""

import pytest
import torch

from perceiver_fast.models.audio.symbolic import SymbolicAudioModel, SymbolicAudioModelConfig
from tests.models.core.io_parity import import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into

SMALL = dict(vocab_size=90, num_channels=32, num_heads=4, num_self_attention_layers=2, max_latents=8, max_seq_len=32)


def _pair():
    symbolic = import_perceiver_io_backend("model.audio.symbolic")
    theirs = perturb_parameters(symbolic.SymbolicAudioModel(symbolic.SymbolicAudioModelConfig(**SMALL)))
    return copy_into(SymbolicAudioModel(SymbolicAudioModelConfig(**SMALL)), theirs)


@pytest.mark.parity
@pytest.mark.parametrize("prefix_len", [0, 14])
def test_logits_equal_with_left_padding(prefix_len):
    ours, theirs = _pair()
    x = torch.randint(0, 90, (3, 22))
    pad_mask = torch.arange(22).expand(3, 22) < torch.tensor([[0], [4], [17]])  # pads reach the latents in row 3
    with torch.no_grad():
        for mask in (None, pad_mask):
            expected = theirs(x, prefix_len=prefix_len, pad_mask=mask).logits
            got = ours(x, prefix_len=prefix_len, pad_mask=mask).logits
            assert got.shape == (3, 22 - prefix_len, 90)
            assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_config_defaults_match():
    symbolic = import_perceiver_io_backend("model.audio.symbolic")
    assert vars(symbolic.SymbolicAudioModelConfig()) == vars(SymbolicAudioModelConfig())


def test_save_and_load_round_trip(tmp_path):
    model = SymbolicAudioModel(SymbolicAudioModelConfig(**SMALL)).eval()
    x = torch.randint(0, 90, (2, 20))
    model.save_pretrained(tmp_path / "audio")
    loaded = SymbolicAudioModel.from_pretrained(tmp_path / "audio")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x, prefix_len=10).logits, model(x, prefix_len=10).logits)
