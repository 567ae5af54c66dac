"""Mind-Vis importer: synthetic checkpoints with Mind-Vis key names, and refused pickles."""

import os
from collections import OrderedDict

import pytest
import torch

from fmri2text.config import EncoderConfig
from fmri2text.errors import UserError
from fmri2text.models.brain_encoder import BrainMAE, spec_from_config
from fmri2text.models.import_mindvis import import_mindvis, read_checkpoint

D, DEPTH, HEADS = 32, 2, 2


class Config_MBM_fMRI:  # the name Mind-Vis uses; pickled by reference, never imported back
    def __init__(self):
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = D, DEPTH, HEADS, 1.0
        self.patch_size, self.mask_ratio = 16, 0.75


def mindvis_state(n_patches: int, dim: int = D, depth: int = DEPTH) -> OrderedDict:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    s = OrderedDict(cls_token=r(1, 1, dim), pos_embed=r(1, n_patches + 1, dim),
                    mask_token=r(1, 1, 16))
    s["patch_embed.proj.weight"], s["patch_embed.proj.bias"] = r(dim, 1, 16), r(dim)
    for i in range(depth):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            s[p + norm + ".weight"], s[p + norm + ".bias"] = r(dim), r(dim)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = r(3 * dim, dim), r(3 * dim)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = r(dim, dim), r(dim)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = r(dim, dim), r(dim)  # mlp_ratio 1.0
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = r(dim, dim), r(dim)
    s["norm.weight"], s["norm.bias"] = r(dim), r(dim)
    s["decoder_embed.weight"], s["decoder_pred.weight"] = r(16, dim), r(16, 16)
    return s


def _encoder():
    torch.manual_seed(0)
    return BrainMAE(spec_from_config(EncoderConfig(preset="tiny")), (2, 16, 16, 8)).encoder


def test_loads_synthetic_mindvis_checkpoint(tmp_path):
    enc = _encoder()
    n = enc.num_tokens
    state = mindvis_state(n)
    path = tmp_path / "fmri_encoder.pth"
    torch.save({"model": state, "config": Config_MBM_fMRI(), "epoch": 3}, path)
    report = import_mindvis(path, enc)
    assert report.config["embed_dim"] == D and report.config_class.endswith("Config_MBM_fMRI")
    assert report.replaced == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert "decoder_embed.weight" in report.skipped and report.pos_embed_interpolated is None
    q, k, v = state["blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(enc.blocks[1].attn.query.weight, q)
    assert torch.equal(enc.blocks[1].attn.value.weight, v)
    assert torch.equal(enc.blocks[0].attn.key.bias, state["blocks.0.attn.qkv.bias"][D:2 * D])
    assert torch.equal(enc.pos_embed, state["pos_embed"])
    assert torch.equal(enc.norm.weight, state["norm.weight"])


def test_pos_embed_is_interpolated_when_token_count_differs(tmp_path):
    enc = _encoder()
    state = mindvis_state(291)  # Mind-Vis: 4656 voxels / patch 16
    torch.save({"model": state, "config": Config_MBM_fMRI()}, tmp_path / "c.pth")
    report = import_mindvis(tmp_path / "c.pth", enc)
    assert report.pos_embed_interpolated == (291, enc.num_tokens)
    assert enc.pos_embed.shape == (1, enc.num_tokens + 1, D)
    assert torch.equal(enc.pos_embed[0, 0], state["pos_embed"][0, 0])  # cls kept
    assert torch.allclose(enc.pos_embed[0, -1], state["pos_embed"][0, -1])  # ends aligned


def test_wrong_width_names_file_key_and_shapes(tmp_path):
    torch.save({"model": mindvis_state(10, dim=48), "config": Config_MBM_fMRI()}, tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        import_mindvis(tmp_path / "w.pth", _encoder())
    text = str(err.value)
    assert "w.pth" in text and "cls_token" in text and "(1, 1, 48)" in text and "(1, 1, 32)" in text


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = mindvis_state(10, depth=3)
    state.pop("norm.bias")
    torch.save({"model": state, "config": Config_MBM_fMRI()}, tmp_path / "d.pth")
    with pytest.raises(UserError) as err:
        import_mindvis(tmp_path / "d.pth", _encoder())
    text = str(err.value)
    assert "missing ['norm.bias']" in text and "blocks.2.norm1.weight" in text
    assert "patch_embed.proj.weight" in text  # the allowed gap is reported


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": mindvis_state(10), "config": _Exploit(marker)}, path)
    with pytest.raises(UserError, match="system"):
        read_checkpoint(path)
    with pytest.raises(UserError):
        import_mindvis(path, _encoder())
    assert not marker.exists()


class Config_Evil:
    def __setstate__(self, state):
        open(state["marker"], "w").close()


def test_config_named_global_cannot_smuggle_a_callable(tmp_path):
    # even a class named like a config only becomes an inert record of attributes
    path = tmp_path / "c.pth"
    obj = Config_Evil.__new__(Config_Evil)
    obj.__dict__["marker"] = str(tmp_path / "pwned")
    torch.save({"model": mindvis_state(10), "config": obj}, path)
    _, cfg, _ = read_checkpoint(path)
    assert cfg == {"marker": str(tmp_path / "pwned")} and not (tmp_path / "pwned").exists()
