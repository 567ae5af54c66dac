"""One digest of a simulated BIDS tree, to compare what two machines simulated from one seed.

    fmri2text simulate --out DIR   (or any dataset folder)
    python benchmarks/simulate_digest.py DIR

SHA-256 (first 16 hex digits) over every file's relative path and content digest, in sorted
order, leaving out the simulator's stamp ``.fmri2text-simulate.json`` (it records the seconds
the run took). The demo's default world is ``1050a3eb9979114a`` on an AVX2 EPYC and on an
AVX-512 Xeon, with the default ``FMRI2TEXT_CPU_KERNELS`` (numpy's OpenBLAS on its AVX2
kernels everywhere). With ``FMRI2TEXT_CPU_KERNELS=native`` the Xeon's is ``36994e5b48511f29``:
OpenBLAS's SkylakeX products round differently, so 6 of the demo's 397,612,800 int16 BOLD
values (one in each of 6 of its 18 runs) differ by 1, and the float truth maps and features
under derivatives/ in their last bits (BENCHMARKS, sessions 19 and 23).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from fmri2text.pipeline import SIM_STAMP, file_digest


def tree_digest(root: Path) -> str:
    """SHA-256 (16 hex) over each file's relative path and :func:`file_digest`, sorted."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != SIM_STAMP):
        h.update(f"{path.relative_to(root)}|{file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(tree_digest(Path(sys.argv[1])))
