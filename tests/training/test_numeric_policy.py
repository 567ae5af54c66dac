"""One numeric policy on every CPU: fp32 by default, bf16 only when forced (or on CUDA), and
both paths run in the suite whatever the host's bf16 support."""

import json

import numpy as np
import pytest
import torch

from fmri2text.config import load_config
from fmri2text.data.datasets import synthetic_experiment
from fmri2text.models import generation
from fmri2text.models import llm as llm_mod
from fmri2text.models import zoo
from fmri2text.training import loop
from fmri2text.training.stage1 import train_stage1
from fmri2text.training.stage2 import train_stage2

TINY = ["encoder.preset=tiny", "encoder.projector_dim=32", "encoder.projector_heads=2",
        "stage1.steps=4", "stage1.batch_size=8", "stage2.steps=3", "stage2.batch_size=4",
        "stage2.target_batch_size=4", "stage1.val_every=2", "stage2.val_every=2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU policy")
def test_auto_is_fp32_on_every_cpu():
    # whatever torch.backends.cpu.get_cpu_capability() says (AVX2 or AVX-512 with bf16)
    assert llm_mod.preferred_dtype() == torch.float32
    assert llm_mod.resolve_dtype("auto") == torch.float32
    assert loop.resolve_mixed_precision("auto", "stage1") == "no"
    assert loop.resolve_mixed_precision("auto", "stage2", torch.bfloat16) == "bf16"  # follows the LLM
    assert loop.resolve_mixed_precision("bf16", "stage1") == "bf16"


@pytest.mark.parametrize("precision, llm_dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_both_precisions_train_both_stages(tmp_path, precision, llm_dtype):
    windows, targets = synthetic_experiment(grid=(10, 10, 8), d_llm=32)
    cfg = load_config(None, TINY + [f"stage1.mixed_precision={precision}",
                                    f"stage2.mixed_precision={precision}"])
    m1 = train_stage1(None, tmp_path, cfg, windows=windows, targets=targets, progress=False,
                      log=lambda s: None)
    assert m1["mixed_precision"] == precision and np.isfinite(m1["loss"]["total"])
    llm, tok = zoo.tiny_llm(hidden=32, layers=2)
    llm = llm.to(llm_dtype)
    m2 = train_stage2(None, tmp_path, cfg, windows=windows, targets=targets, llm=llm, tokenizer=tok,
                      progress=False, log=lambda s: None)
    w = m2["with_da"]
    assert w["mixed_precision"] == precision and np.isfinite(w["heldout_ce_after"])
    assert json.loads((tmp_path / "stage2" / "metrics.json").read_text())["main"] == "with_da"
    out = generation.generate(llm, tok, torch.zeros(2, 4, 32), ["describe", "describe"],
                              max_new_tokens=3)
    assert len(out) == 2
