"""Student: exactly L tokens of the LLM width; gradients reach only tokenizer, adaptors, projector."""

import pytest
import torch

from fmri2text.config import EncoderConfig
from fmri2text.models.student import Projector, Student, deep_path_share

SHAPE = (2, 16, 16, 8)


def _student() -> Student:
    torch.manual_seed(0)
    return Student.from_config(EncoderConfig(preset="tiny", projector_dim=32, projector_heads=2),
                               SHAPE, d_llm=24, n_tokens=5)


def test_projector_outputs_exactly_L_tokens():
    proj = Projector(in_dim=16, out_dim=24, n_queries=7, dim=32, num_heads=4)
    assert proj(torch.randn(3, 40, 16)).shape == (3, 7, 24)
    assert proj(torch.randn(3, 2, 16)).shape == (3, 7, 24)


def test_student_shape_and_embedding():
    s = _student()
    x = torch.randn(2, *SHAPE)
    assert s(x).shape == (2, 5, 24)
    e = s.embedding(x)
    assert e.shape == (2, 24) and torch.allclose(e.norm(dim=-1), torch.ones(2))


def test_only_tokenizer_adaptors_projector_receive_gradients():
    s = _student()
    base_before = {k: v.clone() for k, v in s.encoder.state_dict().items()}
    s.add_adapters(rank=4)
    s(torch.randn(2, *SHAPE)).square().mean().backward()
    with_grad = {n for n, p in s.named_parameters() if p.grad is not None}
    for n in with_grad:
        assert n.startswith(("tokenizer.", "projector.")) or ".adapter." in n, n
    assert any(n.startswith("tokenizer.") for n in with_grad)
    assert any(n.startswith("projector.") for n in with_grad)
    assert any(".adapter.up" in n for n in with_grad)
    frozen = [n for n, p in s.encoder.named_parameters() if ".adapter." not in n]
    assert frozen and all(not s.encoder.get_parameter(n).requires_grad for n in frozen)
    # an optimiser step over trainable parameters leaves the encoder base unchanged
    opt = torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    after = s.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert set(s.trainable_state_dict()) == {n for n, p in s.named_parameters() if p.requires_grad}


def test_without_adaptors_the_encoder_stays_frozen():
    """adapter_rank 0 (the ablation): nothing injected, the whole encoder frozen, the
    tokenizer and projector still learn."""
    s = _student()
    assert s.add_adapters(rank=0) == []
    s(torch.randn(2, *SHAPE)).square().mean().backward()
    with_grad = {n for n, p in s.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith(("tokenizer.", "projector.")) for n in with_grad)
    assert not any(p.requires_grad for p in s.encoder.parameters())
    assert not any(".adapter." in n for n in s.state_dict())


def test_frozen_tokenizer_keeps_its_standardiser_statistics():
    """Stage II freezes the tokenizer: train() must not let its batch statistics move."""
    from fmri2text.training.stage2 import freeze_for_stage2

    s = _student()
    s.add_adapters(rank=4)
    assert s.tokenizer.standardize is not None  # EncoderConfig default
    s.train()
    assert s.tokenizer.training  # trainable tokenizer (Stage I): batch statistics
    s(torch.randn(4, *SHAPE))
    stats = s.tokenizer.standardize.running_mean.clone()
    freeze_for_stage2(s)
    assert s.training and s.projector.training and not s.tokenizer.training
    s(torch.randn(4, *SHAPE) + 3.0)
    assert torch.equal(s.tokenizer.standardize.running_mean, stats)
    s.eval().train()
    assert not s.tokenizer.training


def test_deep_gain_weighs_the_deep_path_over_the_linear_one():
    """deep_gain 0 gives the linear path alone (the decode choice's other candidate), 1 the
    whole student, and values between scale only the deep path's residual."""
    torch.manual_seed(0)
    n = SHAPE[1] * SHAPE[2] * SHAPE[3]
    s = Student.from_config(EncoderConfig(preset="tiny", projector_dim=32, projector_heads=2),
                            SHAPE, d_llm=24, n_tokens=5, linear=(torch.arange(n), 3))
    with torch.no_grad():  # a fitted linear path and a trained deep path: both non-zero
        for t in (s.linear.basis, s.linear.weight, s.linear.bias, s.projector.out.weight):
            t.copy_(torch.randn_like(t))
    s.eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        whole, linear = s(x), s.linear(x)
        assert torch.equal(s(x, deep_gain=0.0), linear) and torch.equal(s(x, deep_gain=1.0), whole)
        assert linear.abs().max() > 0 and (whole - linear).abs().max() > 0
        assert torch.allclose(s(x, deep_gain=0.5), linear + 0.5 * (whole - linear), atol=1e-5)


def test_deep_path_share_separates_the_shared_shift_from_the_trial_part():
    """A deep path that adds one shift to every trial has no trial part; one that adds half
    the linear path's own deviations has a trial part half the linear path's; the two parts
    make up the whole (their squares add up)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.randn(20, 3, 4, generator=g)  # (n, L, d)
    shift = torch.randn(1, 3, 4, generator=g)
    share = deep_path_share(lin + shift, lin)
    assert share["trials"] == 20 and share["trial_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert share["deep_shared_rms"] == pytest.approx(float(shift.pow(2).mean().sqrt()), rel=1e-6)
    share = deep_path_share(1.5 * lin - 0.5 * lin.mean(dim=0) + shift, lin)
    assert share["trial_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert share["deep_rms"] ** 2 == pytest.approx(share["deep_shared_rms"] ** 2
                                                   + share["deep_trial_rms"] ** 2, rel=1e-6)
    one = deep_path_share(lin[:1] + shift, lin[:1])  # one trial: nothing varies
    assert one["trial_ratio"] is None and one["deep_trial_rms"] == 0.0
