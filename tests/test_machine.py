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


TORCH_DIGESTS = ("linear", "conv3d", "softmax")  # machine.kernel_digests: the rest are numpy's


@x86_avx2
def test_avx2_kernels_are_pinned_before_torch_and_numpy_load():
    native, pinned = _probe(FMRI2TEXT_CPU_KERNELS="native"), _probe(FMRI2TEXT_CPU_KERNELS="avx2")
    assert all(v is None for v in native["env"].values())
    assert native["machine"]["kernels"] == "native"
    assert pinned["env"] == machine.AVX2_KERNELS and pinned["machine"]["kernels"] == "avx2"
    assert pinned["machine"]["torch_cpu"] == "AVX2"  # ATen took the cap, on AVX-512 CPUs too
    assert pinned["machine"]["blas"] == "openblas Haswell"  # numpy's OpenBLAS too
    if "avx512f" not in native["machine"]["isa"]:
        # an AVX2 CPU's own kernels are the pinned ones: not one bit changes
        assert pinned["digests"] == native["digests"]


@x86_avx2
def test_by_default_numpy_takes_avx2_kernels_and_torch_its_own():
    default, native = _probe(), _probe(FMRI2TEXT_CPU_KERNELS="native")
    pinned = _probe(FMRI2TEXT_CPU_KERNELS="avx2")
    assert default["env"] == {**dict.fromkeys(machine.AVX2_KERNELS), **machine.BLAS_AVX2_KERNELS}
    assert default["machine"]["kernels"] == "blas-avx2"
    assert default["machine"]["blas"] == "openblas Haswell"
    assert default["machine"]["torch_cpu"] == native["machine"]["torch_cpu"]
    for name, digest in default["digests"].items():  # numpy's as pinned, torch's as native
        assert digest == (native if name in TORCH_DIGESTS else pinned)["digests"][name], name


@x86_avx2
def test_a_script_that_loads_torch_first_is_told_the_pin_came_too_late():
    out = _probe("import torch, numpy\n" + PROBE, FMRI2TEXT_CPU_KERNELS="avx2")
    assert out["machine"]["kernels"] == "avx2 (too late for torch, numpy)"
    out = _probe("import torch, numpy\n" + PROBE)  # the default pins numpy's kernels alone
    assert out["machine"]["kernels"] == "blas-avx2 (too late for numpy)"
    # a process started by a pinned one (a Dask worker, torchrun) inherits the pin: not late
    out = _probe("import torch, numpy\n" + PROBE, **machine.BLAS_AVX2_KERNELS)
    assert out["machine"]["kernels"] == "blas-avx2" and out["machine"]["blas"] == "openblas Haswell"


@pytest.mark.parametrize("choice", ["blas-avx2", "avx2"])
def test_a_cpu_without_avx2_keeps_its_native_kernels(monkeypatch, choice):
    monkeypatch.setattr(machine, "_cpu_info", lambda: ("an old CPU", {"sse4_2"}))
    monkeypatch.setenv(machine.KERNELS_ENV, choice)
    for key in machine.AVX2_KERNELS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(machine, "_pin_note", [])
    machine.pin_kernels()  # AVX2's kernels would stop such a CPU with an illegal instruction
    assert all(key not in os.environ for key in machine.AVX2_KERNELS)
    assert machine._pin_note == ["no AVX2: native kernels"]


def test_the_digests_are_the_same_in_every_process():
    assert _probe()["digests"] == _probe()["digests"] == machine.kernel_digests()
