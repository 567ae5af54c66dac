"""Teacher throughput: pretraining tokens/s of the frozen-LLM forward+backward as a fraction of
this machine's matmul rate (measured in the same command), annotation clips/s, peak RSS.

    OMP_NUM_THREADS=2 python benchmarks/bench_teacher.py [--clips 16] [--batch 8] [--steps 3]

The teacher is the default ``TeacherConfig`` (embedded SmolLM2, EfficientNet-Lite0, MiniLM-
initialised Q-Formers). Clips are rendered in memory with the simulator's renderer
(:mod:`fmri2text.simulate.stimuli`), captions from its templates. A pretraining step is the
recipe's own: video tokens from cached backbone features -> chat prompt -> answer CE through
the frozen LLM -> backward -> AdamW. FLOPs/token of the frozen LLM = 4 x non-embedding
parameters (2 forward + 2 for input gradients; frozen weights get no weight gradient); the
ratio is taken against the matmul rate of the dtype the LLM runs in. Annotation = video
tokens from frames (backbone included) + batched greedy generation, as ``annotate`` does.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import numpy as np
import torch

from machine import matmul_rate  # benchmarks/machine.py, beside this script


def render_clips(n: int, n_frames: int, size: int, seed: int = 0):
    """``n`` simulator clips as (n, n_frames, 3, size, size) floats in [0, 1] + captions."""
    from fmri2text.simulate import stimuli as st

    rng = np.random.default_rng(seed)
    classes = st.choose_classes(n, rng)
    scenes = sorted(st.SCENES)
    frames, caps, taken = [], [], set()
    for i, (colour, shape, action) in enumerate(classes):
        spec = st.sample_spec(rng, st.random_id(rng, taken), 0.0, colour, shape, action,
                              scenes[i % len(scenes)], i)
        video, _ = st.render_clip(spec, fps=8, seconds=2.0, size=size)  # (16, H, W, 3) uint8
        pick = np.linspace(0, len(video) - 1, n_frames).round().astype(int)
        frames.append(torch.from_numpy(video[pick]).permute(0, 3, 1, 2).float() / 255)
        caps.append(st.captions(spec, rng))
    return torch.stack(frames), caps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from fmri2text.config import INSTRUCTIONS, TeacherConfig
    from fmri2text.models import llm as llm_mod
    from fmri2text.models.teacher import n_params, teacher_from_config

    out: dict = {"threads": torch.get_num_threads(),
                 "matmul_gflops": {"float32": matmul_rate(torch.float32, 2048, 3),
                                   "bfloat16": matmul_rate(torch.bfloat16, 1024, 2)}}
    tcfg = TeacherConfig()
    t = time.perf_counter()
    teacher = teacher_from_config(tcfg)
    out["load_seconds"] = time.perf_counter() - t
    llm = teacher.llm
    dtype = llm.get_input_embeddings().weight.dtype
    n_emb = sum(p.numel() for n, p in llm.named_parameters() if "embed" in n or "lm_head" in n)
    n_body = sum(p.numel() for p in llm.parameters()) - n_emb
    out["teacher"] = {"llm_dtype": str(dtype), "trainable_params": n_params(teacher, True),
                      "frozen_params": n_params(teacher, False), "image_size": tcfg.image_size,
                      "n_frames": tcfg.n_frames, "video_tokens": teacher.n_tokens}

    t = time.perf_counter()
    frames, caps = render_clips(args.clips, tcfg.n_frames, tcfg.image_size)
    out["render_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = teacher.frame_features(frames)  # (N, F, P, C)
    out["backbone_clips_per_second"] = args.clips / (time.perf_counter() - t)

    # -- pretraining steps (train_steps' body, timed per step; first step is warm-up)
    rng = random.Random(0)
    params = teacher.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    amp = dtype == torch.bfloat16
    teacher.train()
    times, n_tok = [], 0
    for _ in range(args.steps + 1):
        idx = [rng.randrange(args.clips) for _ in range(args.batch)]
        answers = [rng.choice(caps[i]) for i in idx]
        instr = [rng.choice(INSTRUCTIONS) for _ in idx]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = teacher.loss_from_features(feats[idx], instr, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        with torch.no_grad():
            tokens = teacher.video_tokens_from_features(feats[idx])
            mask = llm_mod.build_prompt_embeds(llm, teacher.tokenizer, tokens, instr, answers,
                                               system=teacher.system)[1]
            n_tok = llm_mod.tokens_run(mask, llm_mod.prefix_length(teacher.tokenizer, teacher.system))
    teacher.eval()
    sec = sum(times[1:]) / args.steps
    tps = n_tok / sec
    rate = out["matmul_gflops"]["bfloat16" if dtype == torch.bfloat16 else "float32"]
    out["pretrain"] = {"batch": args.batch, "tokens_per_step": n_tok, "seconds_per_step": sec,
                       "tokens_per_second": tps, "llm_gflops_per_second": 4 * n_body * tps / 1e9,
                       "fraction_of_matmul_rate_of_llm_dtype": 4 * n_body * tps / 1e9 / rate,
                       "fraction_of_bf16_matmul": 4 * n_body * tps / 1e9 / out["matmul_gflops"]["bfloat16"],
                       "non_embedding_params": n_body}

    # -- annotation: frames -> video tokens -> batched greedy generation
    instr = [INSTRUCTIONS[0]] * args.batch
    with torch.no_grad():
        teacher.answer(frames[:2], instr[:2], max_new_tokens=4)  # warm-up
        t = time.perf_counter()
        tokens = teacher.video_tokens(frames[:args.batch])
        t_tok = time.perf_counter() - t
        answers = teacher.answer_from_tokens(tokens, instr, max_new_tokens=tcfg.max_new_tokens,
                                             greedy=True)
        total = time.perf_counter() - t
    out["annotate"] = {"batch": args.batch, "max_new_tokens": tcfg.max_new_tokens,
                       "clips_per_second": args.batch / total, "video_token_seconds": t_tok,
                       "generate_seconds": total - t_tok, "example": answers[0]}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
