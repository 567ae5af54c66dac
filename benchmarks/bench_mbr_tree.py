"""MBR candidates with the greedy answer riding in the sampling tree (``mbr_candidates``
today) against a greedy pass of its own before the tree (the previous path). Same tokens,
same seeds, same command; the candidates are compared.

    OMP_NUM_THREADS=2 python benchmarks/bench_mbr_tree.py RUN BIDS [TRIALS]

RUN: a finished run; its student's tokens of the first TRIALS (default all) held-out test
trials are answered with the run's generation settings (``decode_samples`` draws plus the
greedy answer, ``decode_batch_size`` rows per batch). Nothing in RUN is changed.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch

from fmri2text.api import Decoder
from fmri2text.config import load_config
from fmri2text.data.datasets import load_windows, split_rows
from fmri2text.models import generation, llm


def separate_greedy(model, tok, z, instr, kw) -> list[Counter]:
    """The previous ``mbr_candidates``: greedy answers in a pass of their own, then the tree."""
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = max(1, kw["batch_size"] // kw["samples"])
    prefix = llm.prefix_length(tok, kw["system"])
    out: list[Counter] = []
    for start in range(0, len(instr), prompts):
        sl = slice(start, start + prompts)
        embeds, mask, _ = llm.build_prompt_embeds(model, tok, z[sl], instr[sl], system=kw["system"])
        cands = [Counter() for _ in range(embeds.shape[0])]
        new = generation.greedy_tokens(model, embeds, mask, llm.prefix_cache(model, embeds, prefix),
                                       kw["max_new_tokens"], eos, pad)
        for i, t in enumerate(tok.batch_decode(new, skip_special_tokens=True)):
            cands[i][t.strip()] += 1
        gens = [torch.Generator().manual_seed(k)
                for k in generation.prompt_seeds(kw["seed"], z[sl], instr[sl])]
        drawn = generation.sample_answers(model, embeds, mask,
                                          llm.prefix_cache(model, embeds, prefix),
                                          kw["max_new_tokens"], eos, kw["samples"],
                                          kw["temperature"], kw["top_p"], gens)
        for i, answers in enumerate(drawn):
            for ids, count in answers:
                cands[i][tok.decode(ids, skip_special_tokens=True).strip()] += count
        out.extend(cands)
    return out


def main(run: Path, bids: Path, trials: int | None = None) -> None:
    cfg = load_config(run / "config.yaml", [])
    windows = load_windows(bids, cfg)
    test = split_rows(windows.trials, "test")[:trials]
    decoder = Decoder.from_run(run, cfg, feature_mask=windows.feature_mask, grid=windows.grid)
    z = decoder.fmri_tokens(windows.data, test)  # (n, L, d)
    kw = decoder.generation_kwargs()
    kw["samples"] = max(2, cfg.pipeline.decode_samples)
    model, tok = decoder.llm()
    instr = [cfg.evaluation.instruction] * len(z)
    seconds, got = {}, {}
    for name, fn in (("separate_greedy", lambda: separate_greedy(model, tok, z, instr, kw)),
                     ("greedy_in_tree", lambda: generation.mbr_candidates(
                         model, tok, z, instr, kw["max_new_tokens"], greedy=True, seed=kw["seed"],
                         temperature=kw["temperature"], top_p=kw["top_p"],
                         batch_size=kw["batch_size"], samples=kw["samples"],
                         system=kw["system"]))):
        t = time.perf_counter()
        got[name] = fn()
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.1f} s for {len(z)} trials, MBR-{kw['samples']}", flush=True)
    a, b = got["separate_greedy"], got["greedy_in_tree"]
    same = sum(dict(x) == dict(y) and next(iter(x)) == next(iter(y)) for x, y in zip(a, b))
    print(f"same candidates (greedy first, counts): {same} / {len(a)}")
    print(f"ratio greedy_in_tree / separate_greedy: "
          f"{seconds['greedy_in_tree'] / seconds['separate_greedy']:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
