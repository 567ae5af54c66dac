"""A tiny simulated dataset shared by the simulator tests (built once per session)."""

from pathlib import Path

import pytest

from fmri2text.config import SimulateConfig
from fmri2text.simulate.bids_writer import simulate_dataset

TINY = SimulateConfig(subjects=3, runs=1, classes=6, seed=7, resolution=8.0, web_clips=6,
                      fps=8, frame_size=32)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, SimulateConfig]:
    out = tmp_path_factory.mktemp("sim") / "bids"
    simulate_dataset(out, TINY)
    return out, TINY
