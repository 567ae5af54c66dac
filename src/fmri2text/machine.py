"""The machine a result was computed on, recorded beside it (``steps.json``, corpus manifests).

Outputs are deterministic per kind of CPU, not across kinds: torch, MKL and OpenBLAS pick
their kernels from the instruction set (AVX2, AVX-512, ...), and kernels of two kinds round
differently in the last bits. Those bits can change a sampled token, and every later byte.
So a result records where it was computed; two runs that differ can then be told apart
from a bug.

By default (``FMRI2TEXT_CPU_KERNELS`` unset or ``blas-avx2``) numpy's and scipy's OpenBLAS
take their AVX2 (Haswell) kernels on every x86-64 CPU that has AVX2: numpy's products, and
with them the simulated datasets, are then the same bytes on AVX2 and AVX-512 machines (an
AVX2 EPYC and an AVX-512 Xeon simulate the same demo world, ``1050a3eb9979114a``;
with SkylakeX's kernels the Xeon's differs in 6 int16 BOLD values: BENCHMARKS, sessions 19
and 23). Torch keeps its native kernels.
``FMRI2TEXT_CPU_KERNELS=avx2`` pins torch, MKL and oneDNN to AVX2 as well
(:func:`pin_kernels`): on an AVX2 machine it changes no byte; on an AVX-512 Xeon it gives
the AVX2 machines' :func:`kernel_digests`, but its causal attention still rounds otherwise
(``benchmarks/cross_cpu_probe.py``), the demo there fitted another teacher and took 1.29x as
long (BENCHMARKS, sessions 19 and 23), so it is not the default. ``native`` leaves every
library its own choice.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

#: the environment variable that picks the CPU kernels: ``blas-avx2`` (default: OpenBLAS's
#: AVX2 kernels for numpy and scipy, torch's native), ``native`` (each library's best for this
#: CPU) or ``avx2`` (AVX2's kernels in every library, on AVX-512 CPUs too)
KERNELS_ENV = "FMRI2TEXT_CPU_KERNELS"
KERNELS = ("blas-avx2", "native", "avx2")
#: what ``blas-avx2`` sets before numpy loads: OpenBLAS's kernels (numpy, scipy) for Haswell,
#: the AVX2 kind
BLAS_AVX2_KERNELS = {"OPENBLAS_CORETYPE": "Haswell"}
#: what ``avx2`` sets before torch and numpy load: ATen's vectorised kernels, MKL's
#: conditional numerical reproducibility mode, oneDNN's instruction-set cap, and OpenBLAS's.
#: A variable already set is kept.
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                **BLAS_AVX2_KERNELS}
_pin_note: list[str] = []  # why the pin did not (fully) take: libraries already loaded, no AVX2


def pin_kernels() -> None:
    """Apply :data:`KERNELS_ENV` (``import fmri2text`` calls this first thing).

    A pin takes effect only for the libraries not yet loaded: the ``fmri2text`` command
    loads none before this, a script must ``import fmri2text`` before torch and numpy
    (:func:`describe` records which were too late). A CPU that is not x86-64 or lacks AVX2
    keeps its native kernels (AVX2's would not run there). An unknown value pins nothing
    here; :func:`kernels` reports it.
    """
    choice = os.environ.get(KERNELS_ENV) or KERNELS[0]
    pins = {"blas-avx2": BLAS_AVX2_KERNELS, "avx2": AVX2_KERNELS}.get(choice)
    if not pins:
        return
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in _cpu_info()[1]:
        _pin_note[:] = ["no AVX2: native kernels"]
        return
    # a library loaded before this is late unless its variables were already set when this
    # process started (a worker process inherits them from the fmri2text process that made it)
    unset = {k for k in pins if k not in os.environ}
    keys = {"numpy": set(BLAS_AVX2_KERNELS), "torch": set(AVX2_KERNELS) - set(BLAS_AVX2_KERNELS)}
    late = [m for m in ("torch", "numpy") if m in sys.modules and keys[m] & unset]
    _pin_note[:] = [f"too late for {', '.join(late)}"] if late else []
    for key, value in pins.items():
        os.environ.setdefault(key, value)


def kernels() -> str:
    """The kernels asked for by :data:`KERNELS_ENV`, checked: a UserError names the bad value."""
    choice = os.environ.get(KERNELS_ENV) or KERNELS[0]
    if choice not in KERNELS:
        from fmri2text.errors import UserError

        raise UserError(f"{KERNELS_ENV}={choice!r} is not one of {', '.join(KERNELS)}",
                        fix=f"unset {KERNELS_ENV} (default: {KERNELS[0]}) or set it to one of "
                        + ", ".join(KERNELS))
    return choice


#: the instruction-set flags that decide the CPU kernels (and whether bf16 is native)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def describe() -> dict[str, object]:
    """This process's compute kind.

    Returns
    -------
    ``cpu``: the processor's model name; ``isa``: which of :data:`ISA_FLAGS` it has
    (``avx512_bf16``: bf16 in hardware; without it bf16 is emulated, 40-85x slower);
    ``torch_cpu``: the instruction set torch dispatches its CPU kernels for
    (``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX2"``, ``"AVX512"``);
    ``blas``: numpy's BLAS and the kernels it chose (e.g. ``"openblas Haswell"``);
    ``kernels``: :data:`KERNELS_ENV`'s choice, with why it did not fully take where it did
    not (libraries loaded before it, not an x86-64 CPU); ``cuda``: the GPU's name, or None.
    """
    import numpy  # noqa: F401  (both BLAS builds loaded: the record does not depend on
    import scipy.linalg  # noqa: F401  what the caller happened to import before)
    import torch
    from threadpoolctl import threadpool_info

    blas = sorted({f"{i['internal_api']} {i.get('architecture') or ''}".strip()
                   for i in threadpool_info() if i.get("user_api") == "blas"})
    model, flags = _cpu_info()
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "torch_cpu": torch.backends.cpu.get_cpu_capability(),
            "blas": ", ".join(blas) or None,
            "kernels": kernels() + "".join(f" ({n})" for n in _pin_note),
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


def kernel_digests() -> dict[str, str]:
    """SHA-256 prefixes of small computations through the kernels the pipeline uses: a
    linear layer at the LLM's width (MKL), a 3-D convolution (oneDNN), a softmax over the
    LLM's vocabulary (ATen), numpy's matrix product and QR (OpenBLAS), scipy's Gaussian
    smoothing. Two machines, or two settings of :data:`KERNELS_ENV`, that give the same
    digests compute these alike (``fmri2text machine`` prints them). One thread each: the
    digests name the kernels, not how a product was split over threads."""
    import hashlib

    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter
    from threadpoolctl import threadpool_limits

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    x, w = torch.randn(64, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    vol = torch.randn(2, 1, 16, 16, 16, generator=gen)
    kernel = torch.randn(8, 1, 3, 3, 3, generator=gen)
    logits = torch.randn(8, 49152, generator=gen)
    a, b = rng.standard_normal((200, 300), np.float32), rng.standard_normal((300, 100), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1), torch.no_grad():
            outs = {"linear": torch.nn.functional.linear(x, w).numpy(),
                    "conv3d": torch.nn.functional.conv3d(vol, kernel).numpy(),
                    "softmax": torch.softmax(logits, -1).numpy(),
                    "numpy_matmul": a @ b, "numpy_qr": np.linalg.qr(a)[0],
                    "gaussian_filter": gaussian_filter(a, 2.0)}
    finally:
        torch.set_num_threads(threads)
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]
            for k, v in outs.items()}
