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


#: the instruction-set flags that decide the CPU kernels (and whether bf16 is native)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def describe() -> dict[str, object]:
    """This process's compute kind.

    Returns
    -------
    ``cpu``: the processor's model name; ``isa``: which of :data:`ISA_FLAGS` it has
    (``avx512_bf16``: bf16 in hardware; without it bf16 is emulated, 40-85x slower); ``torch_cpu``: the instruction set torch
    dispatches its CPU kernels for (``torch.backends.cpu.get_cpu_capability()``, e.g.
    ``"AVX2"``, ``"AVX512"``); ``blas``: numpy's BLAS and the kernels it chose (e.g.
    ``"openblas Haswell"``); ``cuda``: the GPU's name, or None.
    """
    import torch
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i.get('architecture') or ''}".strip()
            for i in threadpool_info() if i.get("user_api") == "blas"]
    model, flags = _cpu_info()
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "torch_cpu": torch.backends.cpu.get_cpu_capability(),
            "blas": ", ".join(blas) or None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_info() -> tuple[str, set[str]]:
    """The processor's model name and flags (``/proc/cpuinfo`` on Linux; elsewhere what
    platform knows, and no flags)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags
