"""Training throughput: Stage I samples/s, Stage II frozen-LLM forward+backward tokens/s as a
fraction of this machine's matmul rate (measured in the same command), peak RSS.

    OMP_NUM_THREADS=2 python benchmarks/bench_training.py [--grid 41 49 41] [--llm smollm2]

Stage I runs the recipe's own step (student forward, AlignmentLoss, backward, AdamW) on a
demo-sized window (default: the 4 mm MNI brain's bounding box, T=2, ``small`` preset).
Stage II times ``BridgeModel.answer_logits`` + CE + backward to the soft tokens through the
frozen LLM; FLOPs/token = 4 x (non-embedding parameters): 2 forward + 2 for the input
gradients (frozen weights get no weight gradient). Tokens are those the LLM runs: the shared
chat prefix counts once per step (``llm.tokens_run``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from machine import matmul_rate  # benchmarks/machine.py, beside this script


def bench_stage1(grid: tuple[int, int, int], batch: int, steps: int) -> dict:
    from fmri2text.config import load_config
    from fmri2text.data.datasets import TrialWindows, synthetic_experiment
    from fmri2text.losses import alignment_loss_from_config
    from fmri2text.training import loop
    from fmri2text.training.stage1 import AlignModel, build_student

    windows, targets = synthetic_experiment(n_subjects=2, n_heldout=1, n_classes=4, clips_per_class=8,
                                            grid=grid, d_llm=576, n_tokens=8)
    cfg = load_config(None, ["encoder.preset=small"])
    data = TrialWindows(windows, range(32))
    student, _ = build_student(cfg, data.input_shape, 576, 8, None)
    model = AlignModel(student, alignment_loss_from_config(cfg.loss))
    opt = loop.adamw(model, loop.LoopSettings.from_config(cfg.stage1, "stage1"))
    x = targets.tokens_of(data.clips[:batch])
    fmri = data.fmri(range(batch))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(fmri, x)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    sec = sum(times[1:]) / steps
    return {"input_shape": list(data.input_shape), "batch": batch, "seconds_per_step": sec,
            "samples_per_second": batch / sec}


def bench_stage2(llm_name: str, batch: int, steps: int) -> dict:
    from fmri2text.models import llm as llm_mod
    from fmri2text.models import zoo

    if llm_name == "tiny":
        llm, tok = zoo.tiny_llm(hidden=64, layers=2)
    else:
        llm, tok = llm_mod.load_llm(llm_name, "auto")
    from fmri2text.losses import StageTwoLoss
    from fmri2text.training.stage2 import BridgeModel

    d = llm.get_input_embeddings().weight.shape[1]
    bridge = BridgeModel(torch.nn.Identity(), StageTwoLoss(1.0), llm, tok, "You describe short videos.")
    instr = ["What is the main thing happening in the video?"] * batch
    answers = ["A green triangle is sliding to the left on the grass."] * batch
    n_emb = sum(p.numel() for n, p in llm.named_parameters() if "embed" in n or "lm_head" in n)
    n_body = sum(p.numel() for p in llm.parameters()) - n_emb
    times, n_tok = [], 0
    for _ in range(steps + 1):
        z = (0.02 * torch.randn(batch, 8, d)).requires_grad_(True)
        t = time.perf_counter()
        logits, labels = bridge.answer_logits(z, instr, answers)
        loss = StageTwoLoss(1.0)(logits, labels)["total"]
        loss.backward()
        times.append(time.perf_counter() - t)
        mask = llm_mod.build_prompt_embeds(llm, tok, z.detach(), instr, answers,
                                           system=bridge.system)[1]
        n_tok = llm_mod.tokens_run(mask, llm_mod.prefix_length(tok, bridge.system))
    sec = sum(times[1:]) / steps
    tps = n_tok / sec
    return {"llm": llm_name, "dtype": str(llm.get_input_embeddings().weight.dtype), "batch": batch,
            "tokens_per_step": n_tok, "seconds_per_step": sec, "tokens_per_second": tps,
            "gflops_per_second": 4 * n_body * tps / 1e9, "non_embedding_params": n_body}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[41, 49, 41])
    ap.add_argument("--batch1", type=int, default=16)
    ap.add_argument("--batch2", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--llm", default="smollm2")
    args = ap.parse_args()
    out = {"threads": torch.get_num_threads(),
           "matmul_gflops": {"bfloat16": matmul_rate(torch.bfloat16, 1024, 2),
                             "float32": matmul_rate(torch.float32)}}
    out["stage1"] = bench_stage1(tuple(args.grid), args.batch1, args.steps)
    s2 = bench_stage2(args.llm, args.batch2, args.steps)
    s2["fraction_of_bf16_matmul"] = s2["gflops_per_second"] / out["matmul_gflops"]["bfloat16"]
    s2["fraction_of_fp32_matmul"] = s2["gflops_per_second"] / out["matmul_gflops"]["float32"]
    out["stage2"] = s2
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
