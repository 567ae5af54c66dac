"""MBM pretraining: masked-token error falls clearly below predicting the mean."""

import json

import numpy as np
import pytest

from fmri2text.config import load_config
from fmri2text.errors import UserError
from fmri2text.models.brain_encoder import load_mae
from fmri2text.training.mbm import pretrain_mbm, synthetic_fmri_windows


def test_pretraining_beats_the_mean_on_held_out_windows(tmp_path):
    x = synthetic_fmri_windows(160, (16, 16, 12), window=2, n_components=3, smooth=2.0, seed=0)
    cfg = load_config(overrides=["encoder.preset=tiny", "mbm.steps=600", "mbm.batch_size=16",
                                 "mbm.lr=0.003", "mbm.clip_grad=0", "mbm.warmup_steps=10"])
    m = pretrain_mbm(x, cfg, tmp_path)
    assert m["n_val_windows"] == 32
    assert m["final"]["val_mse_mean"] > 0.9  # the baseline scores about 1 by construction
    assert m["final"]["val_mse_model"] < 0.85 * m["final"]["val_mse_mean"]
    assert m["final"]["val_mse_model"] < m["initial"]["val_mse_model"]
    saved = json.loads((tmp_path / "mbm_metrics.json").read_text())
    assert saved["final"] == m["final"]
    assert load_mae(tmp_path / "mbm.safetensors").tokenizer.num_tokens == m["num_tokens"]


def test_bad_inputs_are_user_errors(tmp_path):
    cfg = load_config(overrides=["encoder.preset=tiny", "mbm.steps=1"])
    with pytest.raises(UserError, match="at least 2"):
        pretrain_mbm(np.zeros((1, 2, 8, 8, 8), np.float32), cfg, tmp_path)
    bad = np.zeros((4, 2, 8, 8, 8), np.float32)
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        pretrain_mbm(bad, cfg, tmp_path)
