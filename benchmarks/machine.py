"""Measurements of the machine itself that benchmarks report their rates against."""

from __future__ import annotations

import time

import torch


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` (one untimed warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
