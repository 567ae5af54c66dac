"""Where two CPUs stop computing alike: digests of the pipeline's own models, at 1 and 2 threads.

    HF_HUB_OFFLINE=1 python benchmarks/cross_cpu_probe.py [--out FILE.json]

``fmri2text machine`` digests six one-thread kernels; two machines can agree on all six and
still fit different teachers (BENCHMARKS, session 19). This script follows the teacher's fit
one layer further: the embedded models' forward passes on fixed random inputs (EfficientNet-Lite0
features, MiniLM, SmolLM2's logits and its input gradient, the teacher's Q-Former through a
backward pass and one AdamW step), each at 1 and 2 threads. Run it on two machines (or with
two ``FMRI2TEXT_CPU_KERNELS`` settings) and diff the JSON: the first row that differs names
the computation whose kernels round differently there. Every input is drawn from one seeded
generator, so a difference is the machine's, not the draw's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import fmri2text  # noqa: F401  (pins the kernels before torch and numpy load)
from fmri2text import machine


def _digest(t) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(t.detach().float().numpy()).tobytes()).hexdigest()[:16]


def probe() -> dict:
    import torch

    from fmri2text.models import llm as llm_mod
    from fmri2text.models import zoo
    from fmri2text.models.teacher import QFormer

    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(16, 3, 64, 64, generator=gen)  # the simulator's frame size
    ids = torch.randint(0, 30000, (4, 40), generator=gen)
    x, w = torch.randn(512, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    q = torch.randn(4, 9, 40, 64, generator=gen)  # SmolLM2's heads x head width
    enc = torch.randn(8, 16, 1280, generator=gen)  # EfficientNet-Lite0 patch tokens
    vision = zoo.load_vision_backbone("efficientnet-lite0", 128)
    bert = zoo.load_bert("minilm")
    model, _ = llm_mod.load_llm("smollm2", "float32")
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            r = {}
            with torch.no_grad():
                r["linear_512x576x1536"] = _digest(torch.nn.functional.linear(x, w))
                r["sdpa_causal"] = _digest(torch.nn.functional.scaled_dot_product_attention(
                    q, q, q, is_causal=True))
                r["efficientnet_features"] = _digest(vision.features(frames))
                r["minilm_hidden"] = _digest(bert(input_ids=ids[:, :20]).last_hidden_state)
                r["smollm2_logits"] = _digest(model(input_ids=ids).logits)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=emb).logits.logsumexp(-1).mean().backward()
            r["smollm2_input_grad"] = _digest(emb.grad)
            torch.manual_seed(0)
            qf = QFormer(8, 64, 2, 4, 256, 1280)
            opt = torch.optim.AdamW(qf.parameters(), lr=1e-3)
            qf(enc).square().mean().backward()
            r["qformer_grad"] = _digest(qf.query_tokens.grad)
            opt.step()
            r["qformer_after_adamw"] = _digest(torch.cat([p.detach().flatten()
                                                          for p in qf.parameters()]))
            out[f"threads_{n}"] = r
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    result = {"machine": machine.describe(), "kernel_digests": machine.kernel_digests(),
              **probe()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
