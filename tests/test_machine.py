"""The machine record and FMRI2TEXT_CPU_KERNELS (fmri2text/machine.py), in fresh processes:
the kernels are pinned when fmri2text is imported, before torch and numpy load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fmri2text import machine

PROBE = """
import json, os
import fmri2text
from fmri2text import machine
print(json.dumps({"env": {k: os.environ.get(k) for k in machine.AVX2_KERNELS},
                  "machine": machine.describe(), "digests": machine.kernel_digests()}))
"""

x86_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or "avx2" not in machine.describe()["isa"],
    reason="FMRI2TEXT_CPU_KERNELS=avx2 pins AVX2 kernels on x86-64 CPUs that have AVX2")


def _probe(code: str = PROBE, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in machine.AVX2_KERNELS and k != machine.KERNELS_ENV}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**clean, "OMP_NUM_THREADS": "1", **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@x86_avx2
def test_avx2_kernels_are_pinned_before_torch_and_numpy_load():
    native, pinned = _probe(), _probe(FMRI2TEXT_CPU_KERNELS="avx2")
    assert all(v is None for v in native["env"].values())
    assert native["machine"]["kernels"] == "native"
    assert pinned["env"] == machine.AVX2_KERNELS and pinned["machine"]["kernels"] == "avx2"
    assert pinned["machine"]["torch_cpu"] == "AVX2"  # ATen took the cap, on AVX-512 CPUs too
    assert pinned["machine"]["blas"] == "openblas Haswell"  # numpy's OpenBLAS too
    if "avx512f" not in native["machine"]["isa"]:
        # an AVX2 CPU's own kernels are the pinned ones: not one bit changes
        assert pinned["digests"] == native["digests"]


@x86_avx2
def test_a_script_that_loads_torch_first_is_told_the_pin_came_too_late():
    out = _probe("import torch, numpy\n" + PROBE, FMRI2TEXT_CPU_KERNELS="avx2")
    assert out["machine"]["kernels"] == "avx2 (too late for torch, numpy)"


def test_the_digests_are_the_same_in_every_process():
    assert _probe()["digests"] == _probe()["digests"] == machine.kernel_digests()
