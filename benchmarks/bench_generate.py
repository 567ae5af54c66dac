"""Greedy generation on a real workload: rows leave the batch at their end-of-turn token
(``generation.greedy_tokens``) against ``transformers``' ``generate``, which runs every row until
the longest answer ends. Same prompts, same prefix cache, same command; answers checked equal.

    OMP_NUM_THREADS=2 python benchmarks/bench_generate.py --annotations RUN/annotations

The workload is the teacher's own: the video tokens and instructions ``annotate`` stored for
a run's training clips, answered in batches of ``--batch`` (the teacher's
``generate_batch_size``) with up to ``--new-tokens`` new tokens. The stored answers are also
compared, as a check that this replays what ``annotate`` computed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fmri2text.models import generation, llm


def hf_generate(model, tok, soft, instr, new_tokens, system):
    """The previous path of ``generation.generate`` for greedy answers (HF generate)."""
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr, system=system)
    cache = llm.prefix_cache(model, embeds, llm.prefix_length(tok, system))
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, cache=cache)
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotations", type=Path, required=True, help="a run's annotations folder")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--limit", type=int, default=256, help="clips (a multiple of --batch)")
    ap.add_argument("--system", default="You describe short videos.")
    ap.add_argument("--llm", default="smollm2")
    args = ap.parse_args()

    (js,) = sorted(args.annotations.glob("annotations-*.json"))
    rows = json.loads(js.read_text())["rows"][: args.limit]
    tokens = load_file(str(js.with_suffix(".safetensors")))["tokens"][: len(rows)]
    instr = [r["instruction"] for r in rows]
    model, tok = llm.load_llm(args.llm)
    torch.set_grad_enabled(False)
    times = {"hf_generate": 0.0, "greedy_tokens": 0.0}
    answers = {"hf_generate": [], "greedy_tokens": []}
    lengths = []
    for s in range(0, len(rows), args.batch):
        sl = slice(s, s + args.batch)
        for name, fn in (("hf_generate", lambda: hf_generate(model, tok, tokens[sl], instr[sl],
                                                             args.new_tokens, args.system)),
                         ("greedy_tokens", lambda: generation.generate(
                             model, tok, tokens[sl], instr[sl], args.new_tokens,
                             batch_size=args.batch, system=args.system))):
            t = time.perf_counter()
            answers[name] += fn()
            times[name] += time.perf_counter() - t
        lengths += [len(tok(a, add_special_tokens=False).input_ids) + 1
                    for a in answers["greedy_tokens"][sl]]
    same = sum(a == b for a, b in zip(answers["hf_generate"], answers["greedy_tokens"]))
    stored = sum(a == r["answer"] for a, r in zip(answers["greedy_tokens"], rows))
    print(f"{len(rows)} clips, batch {args.batch}, answer tokens (with end-of-turn): median "
          f"{statistics.median(lengths)}, mean {statistics.mean(lengths):.1f}, max {max(lengths)}")
    for name, sec in times.items():
        print(f"{name:14s} {sec:7.2f} s  {sec / len(rows):.4f} s per clip")
    print(f"ratio greedy_tokens / hf_generate: {times['greedy_tokens'] / times['hf_generate']:.2f}")
    print(f"answers equal: {same}/{len(rows)}; equal to the stored annotations: {stored}/{len(rows)}")


if __name__ == "__main__":
    main()
