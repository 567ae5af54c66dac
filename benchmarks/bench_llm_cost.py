"""What the frozen LLM costs per clip: batched generation and a teacher-forced training step,
with and without the shared chat-prefix cache, at several batch sizes, in one command.

    OMP_NUM_THREADS=2 python benchmarks/bench_llm_cost.py [--llm smollm2] [--batches 16 64]

Generation is what ``annotate`` (the teacher's answers) and ``decode`` (fMRI2Text and its
controls) spend their time on; the training step is Stage II's and the teacher's captioning
step (answer cross-entropy through the frozen LLM, backward to the soft tokens). Soft tokens
are random at the LLM's embedding scale, so every answer runs to ``--new-tokens`` (the
embedded teacher's answers are ~13 tokens). "uncached" runs every prompt column in every row
(``prefix=0``), as before the cache; the outputs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

INSTRUCTIONS = ["What is the main thing happening in the video?", "Describe the video.",
                "What is happening in this video?", "Briefly describe what you see in the video."]
SYSTEM = "You describe short videos."


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    from fmri2text.models import generation
    from fmri2text.models import llm as llm_mod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    model, tok = llm_mod.load_llm(args.llm, "auto")
    d = model.get_input_embeddings().weight.shape[1]
    scale = llm_mod.embedding_std(model)
    prefix = llm_mod.prefix_length(tok, SYSTEM)
    gen = torch.Generator().manual_seed(0)
    out = {"llm": args.llm, "dtype": str(model.dtype), "threads": torch.get_num_threads(),
           "prefix_tokens": prefix, "generation": [], "training": []}

    for b in args.batches:
        soft = torch.randn(b, 8, d, generator=gen) * scale
        instr = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(b)]
        prompt = int(llm_mod.build_prompt_embeds(model, tok, soft, instr, system=SYSTEM)[1][0].sum())
        run = lambda: generation.generate(model, tok, soft, instr, args.new_tokens, batch_size=b,  # noqa: E731
                                       system=SYSTEM)
        run()  # warm-up
        t_cached, cached = timed(run)
        with mock.patch.object(llm_mod, "prefix_cache", lambda *a, **k: None):
            t_full, full = timed(run)
        out["generation"].append({"batch": b, "prompt_tokens_row0": prompt,
                                  "s_per_clip_cached": t_cached / b, "s_per_clip_uncached": t_full / b,
                                  "same_answers": cached == full})

    b = args.train_batch
    answers = ["A green triangle is sliding to the left on the grass."] * b
    instr = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(b)]
    for p in (0, prefix):
        times = []
        for _ in range(args.steps + 1):
            soft = (torch.randn(b, 8, d, generator=gen) * scale).requires_grad_(True)
            t = time.perf_counter()
            embeds, mask, labels = llm_mod.build_prompt_embeds(model, tok, soft, instr, answers,
                                                               system=SYSTEM)
            llm_mod.answer_loss(model, embeds, mask, labels, p).backward()
            times.append(time.perf_counter() - t)
        out["training"].append({"batch": b, "prefix_run_once": bool(p),
                                "tokens_run": llm_mod.tokens_run(mask, p),
                                "seconds_per_step": sum(times[1:]) / args.steps})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
