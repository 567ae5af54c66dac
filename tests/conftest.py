"""Shared test setup: nothing reaches the network, and runs are single-threaded and seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import fmri2text  # noqa: E402,F401  (pins the CPU kernels before any test module loads numpy)

#: ../shared/data beside the checkout (reference metadata); tests using it skip when absent.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    return SHARED_DATA
