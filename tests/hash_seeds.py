"""Run Python code in fresh processes under several string-hash seeds (``PYTHONHASHSEED``):
what a process computes or writes must not follow the seed (sets and dicts of strings are
ordered by it)."""

from __future__ import annotations

import os
import subprocess
import sys


def outputs_under_hash_seeds(code: str, seeds: tuple[str, ...] = ("1", "2", "3")) -> set[str]:
    """The distinct stdouts of ``python -c code`` under each hash seed (one: seed-free)."""
    outs = set()
    for seed in seeds:
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout)
    return outs
