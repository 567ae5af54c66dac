"""Nonlinear low-rank adaptors: identity at init, frozen base, round-trip, BERT Q-Former."""

import pytest
import torch
from transformers import BertConfig, BertModel

from fmri2text.config import EncoderConfig
from fmri2text.errors import UserError
from fmri2text.models.adapters import (ENCODER_PATTERNS, QFORMER_PATTERNS, AdaptedLinear,
                                       adapter_state_dict, inject_adapters, load_adapters,
                                       save_adapters)
from fmri2text.models.brain_encoder import BrainMAE, spec_from_config


def _encoder():
    torch.manual_seed(0)
    return BrainMAE(spec_from_config(EncoderConfig(preset="tiny")), (2, 8, 8, 8)).encoder.eval()


def test_adapted_encoder_equals_base_at_init_and_keeps_base_keys():
    enc = _encoder()
    tokens = torch.randn(2, enc.num_tokens, 32)
    before = enc(tokens)
    base_keys = set(enc.state_dict())
    names = inject_adapters(enc, ENCODER_PATTERNS, rank=4, scale=2.0)
    assert sorted(names) == sorted(f"blocks.{i}.{m}" for i in range(2)
                                   for m in ("attn.query", "mlp.fc1", "mlp.fc2"))
    assert torch.allclose(enc(tokens), before, atol=1e-6)
    assert base_keys <= set(enc.state_dict())  # base checkpoints still load
    assert all(p.requires_grad == (".adapter." in n) for n, p in enc.named_parameters()
               if n != "pos_embed")


def test_adapter_is_nonlinear_low_rank_and_changes_output_once_trained():
    lin = torch.nn.Linear(6, 5)
    ad = AdaptedLinear(lin, rank=2, scale=0.5)
    assert ad.weight is lin.weight and ad.adapter.down.weight.shape == (2, 6)
    torch.nn.init.normal_(ad.adapter.up.weight)
    x = torch.randn(3, 6)
    n = ad.adapter
    expected = lin(x) + 0.5 * n.up(torch.nn.functional.gelu(n.down(n.norm(x))))
    assert torch.allclose(ad(x), expected)
    assert not torch.allclose(ad(x), lin(x))


def test_adapter_only_checkpoint_round_trip(tmp_path):
    a, b = _encoder(), _encoder()
    inject_adapters(a, ENCODER_PATTERNS, rank=4)
    inject_adapters(b, ENCODER_PATTERNS, rank=4)
    for k, v in adapter_state_dict(a).items():
        a.get_parameter(k).data.copy_(torch.randn_like(v))
    save_adapters(a, tmp_path / "ad.safetensors", metadata={"rank": 4})
    assert load_adapters(b, tmp_path / "ad.safetensors") == {"rank": 4}
    tokens = torch.randn(1, a.num_tokens, 32)
    assert torch.allclose(a(tokens), b(tokens))
    assert all(".adapter." in k for k in adapter_state_dict(a))
    c = _encoder()
    inject_adapters(c, ENCODER_PATTERNS, rank=8)
    with pytest.raises(UserError, match="rank"):
        load_adapters(c, tmp_path / "ad.safetensors")


def test_no_match_is_a_user_error():
    with pytest.raises(UserError, match="no linear layer matches"):
        inject_adapters(_encoder(), ["nothing_here"], rank=2)


def test_bert_style_qformer_is_adapted_on_queries_and_ffn():
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, vocab_size=50, max_position_embeddings=16)
    torch.manual_seed(0)
    bert = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    before = bert(input_ids=ids).last_hidden_state
    names = inject_adapters(bert, QFORMER_PATTERNS, rank=4)
    assert "encoder.layer.0.attention.self.query" in names
    assert "encoder.layer.1.intermediate.dense" in names and "encoder.layer.1.output.dense" in names
    assert not any(n.endswith("attention.output.dense") or n.endswith(".key") for n in names)
    assert torch.allclose(bert(input_ids=ids).last_hidden_state, before, atol=1e-5)
    trainable = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)


def test_teacher_qformer_is_adapted_on_queries_and_ffn():
    from fmri2text.models.teacher import QFormer

    torch.manual_seed(0)
    qformer = QFormer(n_queries=4, hidden=32, layers=2, heads=2, intermediate=64,
                      encoder_width=24).eval()
    enc = torch.randn(3, 5, 24)  # (N, K, c) patch tokens
    before = qformer(enc)
    names = inject_adapters(qformer, QFORMER_PATTERNS, rank=4)
    assert {"layer.0.attention.attention.query", "layer.0.crossattention.attention.query",
            "layer.1.intermediate_query.dense", "layer.1.output_query.dense"} <= set(names)
    assert not any(n.endswith(".key") or n.endswith(".value") for n in names)
    assert torch.allclose(qformer(enc), before, atol=1e-6)  # B zero-initialised: same model
    trainable = [n for n, p in qformer.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
