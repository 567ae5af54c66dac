"""One tiny run for the whole test session, made by running ``examples/train_on_your_bids.py``
as a user would (a subprocess, ``--tiny``): test_examples checks the examples on it and
test_api decodes with the decoder it exported, so the session trains one tiny model, not two.

Its LLM is a random 2-layer LLaMA whose layer weights are scaled up: a plain random one gives
the same words whatever the fMRI, which would let a broken decoder pass; with this one the
answers depend on the fMRI tokens (test_api checks that they differ across trials).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DONE: dict[str, "ExampleRun"] = {}


@dataclass
class ExampleRun:
    out: Path  # the example's --out: bids/, run/ (run/model is the exported decoder)
    llm: Path  # the LLM folder it trained with (teacher.llm)
    stdout: str


def run_example(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``python examples/SCRIPT ARGS`` offline, as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def example_run(tmp_path_factory) -> ExampleRun:
    """The session's tiny run (trained on first use)."""
    if "run" not in _DONE:
        import torch

        from fmri2text.models.zoo import tiny_llm

        root = tmp_path_factory.mktemp("example")
        llm = root / "llm"
        model, tok = tiny_llm(hidden=64, layers=2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in name and p.ndim == 2:
                    p.mul_(30.0)  # attention and MLP matter next to the residual stream
        model.save_pretrained(llm)
        tok.save_pretrained(llm)
        r = run_example("train_on_your_bids.py", "--tiny", "--out", root / "out",
                        f"teacher.llm={llm}", cwd=root)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _DONE["run"] = ExampleRun(root / "out", llm, r.stdout)
    return _DONE["run"]
