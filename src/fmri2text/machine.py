"""The machine a result was computed on, recorded beside it (``steps.json``, corpus manifests).

Outputs are deterministic per kind of CPU, not across kinds: torch, MKL and OpenBLAS pick
their kernels from the instruction set (AVX2, AVX-512, ...), and kernels of two kinds round
differently in the last bits. Those bits can change a sampled token, and every later byte.
So a result records where it was computed; two runs that differ can then be told apart
from a bug.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def describe() -> dict[str, object]:
    """This process's compute kind.

    Returns
    -------
    ``cpu``: the processor's model name; ``torch_cpu``: the instruction set torch
    dispatches its CPU kernels for (``torch.backends.cpu.get_cpu_capability()``, e.g.
    ``"AVX2"``, ``"AVX512"``); ``blas``: numpy's BLAS and the kernels it chose (e.g.
    ``"openblas Haswell"``); ``cuda``: the GPU's name, or None.
    """
    import torch
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i.get('architecture') or ''}".strip()
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"cpu": _cpu_model(), "torch_cpu": torch.backends.cpu.get_cpu_capability(),
            "blas": ", ".join(blas) or None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
