"""Peak memory and time of tokenizer + SC-MBM encoder, forward and backward, on CPU.

Each grid runs in its own subprocess so ``ru_maxrss`` (peak RSS) is per configuration.
Default: HAD-native 2 mm (100×100×72), 3 mm (67×67×48) and 4 mm (50×50×36) windows,
T = 4, batch 2, the Mind-Vis-size encoder (embed 1024, depth 24, heads 16, mlp 1.0).

    OMP_NUM_THREADS=2 python benchmarks/bench_encoder_memory.py [--preset mindvis]
        [--steps 2] [--grad-checkpoint] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GRIDS = {"2mm": (100, 100, 72), "3mm": (67, 67, 48), "4mm": (50, 50, 36)}


def run_one(grid: str, preset: str, steps: int, batch: int, window: int, ckpt: bool) -> dict:
    """Measure one configuration in this process (call in a fresh subprocess)."""
    import torch

    from fmri2text.config import EncoderConfig
    from fmri2text.models.brain_encoder import BrainMAE, spec_from_config

    torch.manual_seed(0)
    shape = (window, *GRIDS[grid])
    mae = BrainMAE(spec_from_config(EncoderConfig(preset=preset, grad_checkpoint=ckpt)), shape)
    tok, enc = mae.tokenizer, mae.encoder
    n_params = sum(p.numel() for p in tok.parameters()) + sum(p.numel() for p in enc.parameters())
    x = torch.randn(batch, *shape)
    times = []
    for step in range(steps + 1):  # step 0 is warm-up
        t0 = time.perf_counter()
        out = enc(tok(x))  # (B, 1+N, D)
        out.square().mean().backward()
        tok.zero_grad(set_to_none=True)
        enc.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    return {"grid": grid, "shape": list(shape), "batch": batch, "preset": preset,
            "grad_checkpoint": ckpt, "tokens": tok.num_tokens, "params_m": round(n_params / 1e6, 1),
            "sec_per_step": round(sum(times) / len(times), 2), "peak_rss_gb": round(peak_kb / 2**20, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", nargs="+", default=["2mm", "3mm", "4mm"], choices=list(GRIDS))
    ap.add_argument("--preset", default="mindvis")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.preset, args.steps, args.batch, args.window,
                                 args.grad_checkpoint)))
        return
    results = []
    for grid in args.grids:
        cmd = [sys.executable, __file__, "--child", grid, "--preset", args.preset,
               "--steps", str(args.steps), "--batch", str(args.batch), "--window", str(args.window)]
        if args.grad_checkpoint:
            cmd.append("--grad-checkpoint")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"benchmark for {grid} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        from fmri2text.io import write_json

        write_json(args.out, results)


if __name__ == "__main__":
    main()
