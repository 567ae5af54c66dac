"""Tokenizers: shapes, token counts, MBM targets and the wrong-grid error."""

import pytest
import torch

from fmri2text.errors import UserError
from fmri2text.models.tokenizer3d import SurfaceTokenizer, TokenStandardizer, VolumeTokenizer, build_tokenizer


def test_volume_tokens_and_target_shapes():
    tok = VolumeTokenizer((2, 20, 18, 9), embed_dim=16, channels=[4, 8], target_bins=2)
    assert tok.grid == (5, 5, 3) and tok.num_tokens == 75
    x = torch.randn(3, 2, 20, 18, 9)
    assert tok(x).shape == (3, 75, 16)
    t = tok.target(x)
    assert t.shape == (3, 75, 2 * 8)
    # per-window normalisation: zero mean, unit variance over tokens and features
    assert torch.allclose(t.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(t.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-3)
    assert tok.token_coords().shape == (75, 3)


def test_volume_target_is_the_pooled_cell():
    tok = VolumeTokenizer((1, 8, 8, 8), embed_dim=8, channels=[4, 4], target_bins=1)
    x = torch.zeros(1, 1, 8, 8, 8)
    x[0, 0, :4, :4, :4] = 1.0  # only the first cell is active
    t = tok.target(x)[0, :, 0]  # (8,)
    assert t.argmax().item() == 0 and torch.all(t[1:] == t[1])


def test_wrong_grid_names_both_shapes():
    tok = VolumeTokenizer((4, 20, 20, 12), embed_dim=8, channels=[4])
    with pytest.raises(UserError) as err:
        tok(torch.randn(1, 4, 20, 20, 10))
    assert "(4, 20, 20, 10)" in str(err.value) and "(4, 20, 20, 12)" in str(err.value)


def test_surface_patches_and_padding():
    tok = build_tokenizer((3, 1000), embed_dim=12, channels=[], surface_patch=64, target_pool=2)
    assert isinstance(tok, SurfaceTokenizer) and tok.num_tokens == 16  # ceil(1000 / 64)
    x = torch.randn(2, 3, 1000)
    assert tok(x).shape == (2, 16, 12)
    assert tok.target(x).shape == (2, 16, 3 * 8)
    with pytest.raises(UserError):
        tok(torch.randn(2, 3, 999))


def test_bad_input_rank_is_a_user_error():
    with pytest.raises(UserError):
        build_tokenizer((4, 10, 10), embed_dim=8, channels=[4])


def test_checkpointed_tokenizer_matches_plain_gradients():
    torch.manual_seed(0)
    a = VolumeTokenizer((2, 12, 12, 8), 8, [4, 8])
    b = VolumeTokenizer((2, 12, 12, 8), 8, [4, 8], grad_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 12, 12, 8)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    ga = a.stages[0][0].weight.grad
    assert torch.allclose(ga, b.stages[0][0].weight.grad, atol=1e-5) and ga.abs().sum() > 0


def test_token_standardizer_removes_the_trial_invariant_part():
    """A large offset common to every trial (bias, mask edge) is removed; the trial part is
    scaled to unit spread; inference uses the running statistics; one sample never updates them."""
    torch.manual_seed(0)
    std = TokenStandardizer(num_tokens=3, dim=4, momentum=1.0)
    offset = torch.randn(1, 3, 4) * 50  # the same in every trial
    trials = offset + 0.1 * torch.randn(64, 3, 4)
    out = std.train()(trials)
    assert out.shape == trials.shape
    assert out.mean(0).abs().max() < 1e-4 and torch.allclose(out.std(0, unbiased=False), torch.ones(3, 4), atol=1e-2)
    running = std.running_mean.clone()
    assert torch.allclose(running.view(3, 4), trials.mean(0), atol=1e-4)
    one = std(trials[:1])  # training mode, one sample: running statistics, no update
    assert torch.equal(std.running_mean, running)
    assert torch.allclose(one, std.eval()(trials[:1]))
    assert torch.allclose(std.eval()(trials), out, rtol=2e-2, atol=1e-3)  # running var is unbiased
    slow = TokenStandardizer(num_tokens=3, dim=4, momentum=0.05).train()
    for chunk in trials.split(16):  # four batches: the running mean is their plain average
        slow(chunk)
    assert torch.allclose(slow.running_mean.view(3, 4), trials.mean(0), atol=1e-3)


def test_tokenizers_standardize_only_when_asked():
    vol = build_tokenizer((2, 8, 8, 8), 16, [4, 8], standardize=True)
    surf = build_tokenizer((2, 600), 16, [4], surface_patch=256, standardize=True)
    assert isinstance(vol.standardize, TokenStandardizer) and isinstance(surf.standardize, TokenStandardizer)
    assert build_tokenizer((2, 8, 8, 8), 16, [4, 8]).standardize is None
    x = torch.randn(5, 2, 8, 8, 8)
    tokens = vol.train()(x)  # (B, N, D), standardised over the batch
    assert tokens.shape == (5, vol.num_tokens, 16) and tokens.mean(0).abs().max() < 1e-4
    assert "standardize.running_mean" in vol.state_dict()
