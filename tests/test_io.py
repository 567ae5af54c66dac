"""Files the pipeline writes are the same bytes in every process (issue 19)."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open

from fmri2text.io import write_safetensors

META = {k: f"value of {k}" for k in ("format", "spec", "encoder", "extra", "d_llm", "n_tokens",
                                      "linear", "adapted", "input_shape")}


def test_safetensors_files_are_the_same_bytes_in_every_process(tmp_path):
    """The library orders a header's metadata by a hash map seeded per process (two runs'
    student files differed in that order alone); written through ``write_safetensors`` the
    files of three processes are identical and read back to the same tensors and metadata."""
    code = ("import sys, torch; from fmri2text.io import write_safetensors; "
            f"meta = {META!r}; "
            "t = {'b.weight': torch.arange(6.).view(2, 3), 'a': torch.ones(5, dtype=torch.int64), "
            "'c': torch.zeros(3, dtype=torch.bfloat16)}; "
            "write_safetensors(sys.argv[1], t, meta)")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == META
        assert torch.equal(f.get_tensor("b.weight"), torch.arange(6.).view(2, 3))
        assert torch.equal(f.get_tensor("a"), torch.ones(5, dtype=torch.int64))
        assert f.get_tensor("c").dtype == torch.bfloat16
    assert (8 + int.from_bytes(paths[0].read_bytes()[:8], "little")) % 8 == 0  # aligned data


def test_safetensors_without_metadata(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"x": torch.ones(2)})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x"), torch.ones(2)) and not f.metadata()
