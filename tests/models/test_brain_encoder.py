"""SC-MBM encoder + MAE: presets, masking, masked-only loss, save/load."""

import pytest
import torch

from fmri2text.config import EncoderConfig
from fmri2text.errors import UserError
from fmri2text.models.brain_encoder import (BrainMAE, load_mae, random_masking, save_mae,
                                            spec_from_config)

SHAPE = (2, 16, 16, 8)


def _mae(**kw) -> BrainMAE:
    torch.manual_seed(0)
    return BrainMAE(spec_from_config(EncoderConfig(preset="tiny", **kw)), SHAPE)


def test_presets_resolve_with_overrides():
    ref = spec_from_config(EncoderConfig(preset="mindvis"))
    assert (ref.embed_dim, ref.depth, ref.num_heads, ref.mlp_ratio) == (1024, 24, 16, 1.0)
    assert (ref.decoder_embed_dim, ref.decoder_depth) == (512, 8)
    spec = spec_from_config(EncoderConfig(preset="tiny", depth=3, tokenizer_channels=[2, 4, 8]))
    assert spec.depth == 3 and spec.tokenizer_channels == (2, 4, 8)
    with pytest.raises(UserError, match="mindvis"):
        spec_from_config(EncoderConfig(preset="huge"))
    with pytest.raises(UserError, match="multiple of its head count"):
        spec_from_config(EncoderConfig(preset="tiny", embed_dim=33))


def test_masking_is_per_sample_and_75_percent():
    keep, restore, mask = random_masking(4, 40, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (4, 10) and mask.sum(1).tolist() == [30.0] * 4
    assert not torch.equal(mask[0], mask[1])
    for b in range(4):  # kept tokens are exactly the unmasked ones
        assert set(keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())


def test_forward_shapes_and_loss_only_on_masked_tokens():
    mae = _mae()
    x = torch.randn(2, *SHAPE)
    out = mae(x, generator=torch.Generator().manual_seed(1))
    n = mae.tokenizer.num_tokens
    assert out["pred"].shape == out["target"].shape == (2, n, mae.tokenizer.target_dim)
    m = out["mask"]
    expected = (((out["pred"] - out["target"]) ** 2).mean(-1) * m).sum() / m.sum()
    assert torch.allclose(out["loss"], expected)
    # the visible tokens' predictions do not enter the loss
    g = torch.autograd.grad(out["loss"], out["pred"])[0]
    assert torch.all(g[m == 0] == 0) and torch.any(g[m == 1] != 0)
    assert mae.encode(x).shape == (2, 1 + n, 32)


def test_fixed_positional_embedding_is_frozen_and_learned_one_trains():
    assert not _mae().encoder.pos_embed.requires_grad
    assert _mae(pos_embed="learned").encoder.pos_embed.requires_grad


def test_save_load_round_trip(tmp_path):
    mae = _mae().eval()
    save_mae(mae, tmp_path / "m.safetensors")
    back = load_mae(tmp_path / "m.safetensors").eval()
    x = torch.randn(1, *SHAPE)
    assert torch.allclose(mae.encode(x), back.encode(x))


def test_wrong_size_checkpoint_names_key_and_shapes(tmp_path):
    save_mae(_mae(), tmp_path / "m.safetensors")
    from fmri2text.models.brain_encoder import load_state_checked
    from safetensors.torch import load_file
    other = _mae(embed_dim=64)
    with pytest.raises(UserError) as err:
        load_state_checked(other, load_file(tmp_path / "m.safetensors"), tmp_path / "m.safetensors")
    text = str(err.value)
    assert "m.safetensors" in text and "shape" in text and "64" in text
