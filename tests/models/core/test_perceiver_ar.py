import pytest
import torch

from perceiver_fast.models.core import PerceiverAROutput
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig

SMALL = dict(num_channels=32, num_heads=2, num_self_attention_layers=2, max_latents=4, max_seq_len=16)


def test_latent_count_may_vary_and_logits_are_causal():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    x = torch.randint(0, 262, (2, 10))
    for prefix_len in (0, 3, 9):
        assert model(x, prefix_len=prefix_len).logits.shape == (2, 10 - prefix_len, 262)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 262
    with torch.no_grad():
        a, b = model(x, prefix_len=4).logits, model(changed, prefix_len=4).logits
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.parametrize(
    "x, prefix_len, pad_mask, error, match",
    [
        (torch.zeros(2, 5, dtype=torch.long), 5, None, ValueError, "prefix_len"),
        (torch.zeros(2, 5, dtype=torch.long), -1, None, ValueError, "prefix_len"),
        (torch.zeros(2, 16, dtype=torch.long), 13, None, ValueError, "max_prefix_len"),
        (torch.zeros(2, 17, dtype=torch.long), 12, None, ValueError, "max_seq_len"),
        (torch.zeros(2, 5), 1, None, TypeError, "integer"),
        (torch.zeros(5, dtype=torch.long), 1, None, ValueError, "batch, seq"),
        (torch.zeros(2, 0, dtype=torch.long), 0, None, ValueError, "prefix_len|empty"),
        (torch.zeros(2, 5, dtype=torch.long), 1, torch.tensor([[False] * 4 + [True]] * 2), ValueError, "left"),
        (torch.zeros(2, 5, dtype=torch.long), 1, torch.zeros(2, 4, dtype=torch.bool), ValueError, "pad_mask"),
    ],
)
def test_bad_input_raises(x, prefix_len, pad_mask, error, match):
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL))
    with pytest.raises(error, match=match):
        model(x, prefix_len=prefix_len, pad_mask=pad_mask)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = CausalLanguageModel(CausalLanguageModelConfig(**SMALL, cross_attention_dropout=0.0))
    config = CausalLanguageModelConfig(**SMALL, cross_attention_dropout=0.0, activation_checkpointing=True)
    ckpt = CausalLanguageModel(config)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 262, (2, 12))
    for model in (plain, ckpt):
        model.train()
        model(x, prefix_len=8).logits.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = CausalLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x = torch.randint(0, 262, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x, prefix_len=5).logits, model(x, prefix_len=5).logits)
    with pytest.raises(FileNotFoundError):
        CausalLanguageModel.from_pretrained(tmp_path / "missing")


def test_model_compiles_without_graph_breaks():
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    x = torch.randint(0, 262, (2, 10))
    pad_mask = torch.zeros(2, 10, dtype=torch.bool)
    pad_mask[1, :3] = True
    compiled = torch.compile(lambda x, m: model(x, prefix_len=6, pad_mask=m).logits, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, pad_mask), model(x, prefix_len=6, pad_mask=pad_mask).logits)


def test_output_reads_by_key_as_perceiver_ios_module_output():
    """perceiver-io's forward returns ``ModuleOutput``, a dict: code written for it reads ``out["logits"]``."""
    model = CausalLanguageModel(CausalLanguageModelConfig(**SMALL)).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 262, (2, 10)), prefix_len=6)
    assert out["logits"] is out.logits and out["last_hidden_state"] is out.last_hidden_state
    assert out.keys() == list(out) == ["last_hidden_state", "logits"] and "logits" in out
    assert dict(out) == {"last_hidden_state": out.last_hidden_state, "logits": out.logits}
    with pytest.raises(KeyError, match="no cache.*setup_caches"):
        out["kv_cache"]  # theirs holds one; ours keeps decoding state in the layers' caches
    assert PerceiverAROutput(last_hidden_state=out.last_hidden_state).keys() == ["last_hidden_state"]  # as theirs
