"""One digest of a simulated BIDS tree, to compare what two machines simulated from one seed.

    fmri2text simulate --out DIR   (or any dataset folder)
    python benchmarks/simulate_digest.py DIR

SHA-256 (first 16 hex digits) over every file's relative path and bytes, in sorted order,
leaving out ``.fmri2text-simulate.json`` (it records the seconds the run took). The demo's
default world: ``885c02dc29ba24db`` on an AVX-512 Xeon with OpenBLAS's SkylakeX kernels,
``967f4f98852ff4ac`` there with ``OPENBLAS_CORETYPE=Haswell`` (AVX2's kernels; BENCHMARKS,
session 19): OpenBLAS's products round differently there, so 6 of the demo's 397,612,800
int16 BOLD values (one in each of 6 of its 18 runs) differ by 1, and the float truth maps and
features under derivatives/ in their last bits.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")
                       if p.is_file() and p.name != ".fmri2text-simulate.json"):
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(tree_digest(Path(sys.argv[1])))
