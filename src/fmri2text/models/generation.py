"""Answers from the frozen LLM given soft tokens: greedy decoding and minimum-Bayes-risk
decoding over sampled answers.

Greedy (:func:`greedy_tokens`): each step runs only the rows that have not ended.

Minimum-Bayes-risk (``samples`` > 1): each prompt is answered ``samples`` times by
ancestral sampling (temperature, nucleus) plus once greedily, and the answer kept is the
one with the highest expected unigram F-score against the others (:func:`mbr_choice`).
Samples that share a prefix share its computation (:func:`sample_answers`): a prompt's
``samples`` draws start as one row with a count, and a row splits only where its draws
choose different tokens, so a step runs the distinct prefixes, not ``samples`` rows per
prompt (the first answer tokens are nearly always the same). The draws are the same in
distribution as ``samples`` independent ones.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import Tensor, nn

from fmri2text.models.llm import build_prompt_embeds, position_ids, prefix_cache, prefix_length

#: tokens sorted per row when sampling from the nucleus (the rest only when they miss top_p)
NUCLEUS_TOP = 256


@torch.no_grad()
def generate(model: nn.Module, tokenizer, soft_tokens: Tensor | None, instructions: list[str],
             max_new_tokens: int = 32, *, greedy: bool = True, seed: int = 0,
             temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 32,
             soft_scale: float = 1.0, system: str | None = None, samples: int = 0,
             mbr_beta: float = 1.0) -> list[str]:
    """Answer each instruction given its soft tokens, batched from ``inputs_embeds``.

    Parameters
    ----------
    soft_tokens:
        (B, L, d) or None (the LLM's prompt-only prior, a control).
    greedy:
        Greedy decoding when True; otherwise sampling seeded by ``seed`` (reproducible).
    samples:
        > 1: minimum-Bayes-risk decoding. Each prompt is answered ``samples`` times by
        sampling (``temperature``, ``top_p``, seeded), plus greedily when ``greedy``; the
        answer returned is the candidate with the highest expected unigram F-score
        (recall weighted ``mbr_beta`` times precision) against the others
        (:func:`mbr_choice`). Sampled answers are reproducible for the same prompts, order
        and ``batch_size``; unlike greedy ones they change when a prompt is decoded in
        another batch.

    Returns
    -------
    B answers, stripped of special tokens and surrounding whitespace.
    """
    if samples > 1:
        return _mbr_generate(model, tokenizer, soft_tokens, instructions, max_new_tokens,
                             greedy=greedy, seed=seed, temperature=temperature, top_p=top_p,
                             batch_size=batch_size, soft_scale=soft_scale, system=system,
                             samples=samples, beta=mbr_beta)
    out: list[str] = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(int(seed))
    for start in range(0, len(instructions), batch_size):
        sl = slice(start, start + batch_size)
        soft = None if soft_tokens is None else soft_tokens[sl]
        embeds, mask, _ = build_prompt_embeds(model, tokenizer, soft, instructions[sl],
                                              soft_scale=soft_scale, system=system)
        cache = prefix_cache(model, embeds, prefix_length(tokenizer, system))
        new = answer_tokens(model, embeds, mask, cache, max_new_tokens, eos, pad,
                            temperature=None if greedy else temperature, top_p=top_p,
                            generator=gen)
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def _mbr_generate(model: nn.Module, tokenizer, soft_tokens: Tensor | None,
                  instructions: list[str], max_new_tokens: int, *, greedy: bool, seed: int,
                  temperature: float, top_p: float, batch_size: int, soft_scale: float,
                  system: str | None, samples: int, beta: float) -> list[str]:
    """:func:`generate` with ``samples`` > 1: candidates per prompt, then the MBR choice.

    ``batch_size`` counts answer rows, as in greedy decoding (memory: the rows' keys and
    values): ``batch_size // samples`` prompts, at least one, go together.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(int(seed))
    prompts = max(1, batch_size // samples)
    prefix = prefix_length(tokenizer, system)
    out: list[str] = []
    for start in range(0, len(instructions), prompts):
        sl = slice(start, start + prompts)
        soft = None if soft_tokens is None else soft_tokens[sl]
        embeds, mask, _ = build_prompt_embeds(model, tokenizer, soft, instructions[sl],
                                              soft_scale=soft_scale, system=system)
        cands: list[Counter] = [Counter() for _ in range(embeds.shape[0])]
        if greedy:
            new = greedy_tokens(model, embeds, mask, prefix_cache(model, embeds, prefix),
                                max_new_tokens, eos, pad)
            for i, t in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
                cands[i][t.strip()] += 1
        drawn = sample_answers(model, embeds, mask, prefix_cache(model, embeds, prefix),
                               max_new_tokens, eos, samples, temperature, top_p, gen)
        for i, answers in enumerate(drawn):
            for ids, count in answers:
                cands[i][tokenizer.decode(ids, skip_special_tokens=True).strip()] += count
        out.extend(mbr_choice(list(c), list(c.values()), beta) for c in cands)
    return out


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    """rouge-score's stemming tokenizer, built once (mbr_choice runs once per prompt)."""
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


def mbr_choice(candidates: list[str], weights: list[float] | None = None,
               beta: float = 1.0) -> str:
    """The candidate with the highest expected unigram F-score against the candidates
    (ties: the first): the minimum-Bayes-risk answer under a unigram-overlap utility.

    ``weights``: how often each candidate was drawn (default 1 each), so an answer the LLM
    gives often weighs more. ``beta``: the F-score's weight of recall against precision
    (1: ROUGE-1 F). Tokens are rouge-score's (lower case, alphanumeric, Porter-stemmed).
    """
    tok = _rouge_tokenizer()
    weights = [1.0] * len(candidates) if weights is None else list(weights)
    grams = [Counter(tok.tokenize(c)) for c in candidates]
    sizes = [sum(g.values()) for g in grams]
    b2 = beta * beta

    def f(i: int, j: int) -> float:  # candidate i as the answer, j as the reference
        if not sizes[i] or not sizes[j]:
            return float(sizes[i] == sizes[j])
        both = sum((grams[i] & grams[j]).values())
        p, r = both / sizes[i], both / sizes[j]
        return (1 + b2) * p * r / (b2 * p + r) if both else 0.0

    totals = [sum(w * f(i, j) for j, w in enumerate(weights)) for i in range(len(candidates))]
    return candidates[max(range(len(candidates)), key=totals.__getitem__)]


@torch.no_grad()
def greedy_tokens(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache,
                  max_new_tokens: int, eos: int, pad: int) -> Tensor:
    """(B, n_new) greedy answer ids; rows that have emitted ``eos`` leave the batch.

    The same tokens as ``model.generate(do_sample=False)``, which keeps computing finished
    rows until the longest answer of the batch ends (the teacher's answers: median 10 tokens,
    up to 19 in a batch of 64). Here each step runs only the unfinished rows, and
    ``cache.batch_select_indices`` keeps their keys and values: 17 % less time on the
    teacher's annotation workload (BENCHMARKS). After a row's ``eos`` its ids are ``pad``, as
    with ``generate``; ``eos`` None: every row runs ``max_new_tokens``. ``cache``: keys and
    values of the first columns (:func:`~fmri2text.models.llm.prefix_cache`) or None.
    """
    return answer_tokens(model, inputs_embeds, attention_mask, cache, max_new_tokens, eos, pad)


def _prompt_step(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache):
    """Run the prompts' columns the cache does not hold: (cache, last logits (B, V), positions)."""
    held = 0 if cache is None else cache.get_seq_length()
    pos = position_ids(attention_mask)
    out = model(inputs_embeds=inputs_embeds[:, held:], attention_mask=attention_mask,
                position_ids=pos[:, held:], cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1], pos


@torch.no_grad()
def answer_tokens(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache,
                  max_new_tokens: int, eos: int, pad: int, *, temperature: float | None = None,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """(B, n_new) answer ids, one per prompt; each step runs only the unfinished rows (see
    :func:`greedy_tokens`). ``temperature`` None: greedy; otherwise nucleus sampling
    (``top_p``) drawn from ``generator``."""
    cache, logits, pos = _prompt_step(model, inputs_embeds, attention_mask, cache)
    nxt = _next_token(logits, temperature, top_p, generator)  # (B,)
    new = torch.full((len(nxt), max_new_tokens), pad, dtype=torch.long, device=nxt.device)
    rows = torch.arange(len(nxt), device=nxt.device)  # batch rows still generating
    last = pos[:, -1]
    for step in range(max_new_tokens):
        new[rows, step] = nxt
        going = torch.ones_like(nxt, dtype=torch.bool) if eos is None else nxt != eos
        if step + 1 == max_new_tokens or not going.any():
            return new[:, :step + 1]
        if not going.all():
            keep = going.nonzero().squeeze(1)
            rows, nxt, last = rows[keep], nxt[keep], last[keep]
            attention_mask = attention_mask[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask,
                    position_ids=last[:, None], cache=cache, use_cache=True)
        cache = out.cache
        nxt = _next_token(out.logits[:, -1], temperature, top_p, generator)
    return new


@torch.no_grad()
def sample_answers(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache,
                   max_new_tokens: int, eos: int | None, samples: int, temperature: float,
                   top_p: float, generator: torch.Generator | None = None
                   ) -> list[list[tuple[list[int], int]]]:
    """``samples`` sampled answers per prompt, as (ids, count) of each distinct answer.

    Ancestral sampling on a tree: every row is a distinct prefix with the number of draws
    that follow it. Each step draws that many next tokens per row (with replacement, from
    the row's nucleus) and splits the row by the tokens drawn; rows whose token is ``eos``
    (kept in the ids, as the greedy path keeps it) end. Counts of a prompt always sum to
    ``samples``.
    """
    cache, logits, pos = _prompt_step(model, inputs_embeds, attention_mask, cache)
    B = inputs_embeds.shape[0]
    dev = logits.device
    prompt = torch.arange(B, device=dev)  # (R,) prompt of each row
    count = torch.full((B,), samples, dtype=torch.long, device=dev)  # (R,) draws per row
    hist = torch.empty(B, 0, dtype=torch.long, device=dev)  # (R, step) tokens so far
    last = pos[:, -1]
    V = int(logits.shape[-1])
    done: list[list[tuple[list[int], int]]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        p, idx = _nucleus(logits, temperature, top_p)  # (R, k), zero outside each nucleus
        parent = torch.repeat_interleave(torch.arange(len(count), device=dev), count)  # (N,)
        pick = torch.multinomial(p[parent], 1, generator=generator).squeeze(1)  # (N,)
        token = idx[parent, pick]
        key, n = torch.unique(parent * V + token, return_counts=True)  # sorted: deterministic
        parent, token = key // V, key % V  # (R',) one row per distinct (prefix, token)
        hist = torch.cat([hist[parent], token[:, None]], 1)
        prompt, count, last = prompt[parent], n, last[parent]
        ends = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if step + 1 == max_new_tokens:
            ends[:] = True
        for r in ends.nonzero().squeeze(1).tolist():
            done[int(prompt[r])].append((hist[r].tolist(), int(count[r])))
        going = (~ends).nonzero().squeeze(1)
        if len(going) == 0:
            break
        cache.batch_select_indices(parent[going])  # repeats a prefix's keys for its children
        attention_mask = torch.cat([attention_mask[parent[going]],
                                    attention_mask.new_ones(len(going), 1)], 1)
        hist, prompt, count, last = hist[going], prompt[going], count[going], last[going] + 1
        out = model(input_ids=hist[:, -1:], attention_mask=attention_mask,
                    position_ids=last[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return done


def _nucleus(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """(R, k) probabilities at ``temperature``, zero outside each row's nucleus (the smallest
    set of most likely tokens whose probability reaches ``top_p``), and their token ids.

    Only the ``NUCLEUS_TOP`` most likely tokens are sorted, unless a row's nucleus is wider;
    k is then the widest nucleus (the same nucleus as a full sort either way).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    p, idx = probs.topk(min(NUCLEUS_TOP, probs.shape[-1]), dim=-1)  # (R, k), descending
    if (p.sum(-1) < top_p).any():
        p, idx = probs.sort(dim=-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # tokens after the nucleus is full
    width = int((p > 0).sum(-1).max())
    return p[:, :width], idx[:, :width]


def _next_token(logits: Tensor, temperature: float | None, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """(B,) next ids: argmax, or a draw from each row's nucleus at ``temperature``."""
    if temperature is None:
        return logits.argmax(-1)
    p, idx = _nucleus(logits, temperature, top_p)
    pick = torch.multinomial(p, 1, generator=generator)  # (B, 1), renormalised by multinomial
    return idx.gather(-1, pick).squeeze(-1)
