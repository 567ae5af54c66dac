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
import hashlib
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
             mbr_beta: float = 1.0, semantic: Tensor | None = None, rerank: float = 0.0,
             embed=None) -> list[str]:
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
        (:func:`mbr_choice`). Each prompt's samples are seeded by ``seed`` and the prompt
        itself (:func:`prompt_seeds`), so, like greedy answers, they do not change when a
        prompt is decoded in another batch or order. (``greedy`` False without
        ``samples``: one draw per prompt from a generator shared by the batch.)
    semantic, rerank, embed:
        With ``samples`` > 1: predicted sentence embeddings (B, d_s), the weight of each
        candidate's agreement with its prompt's (:func:`choose_answers`) and the sentence
        encoder (texts → (n, d_s)); ``rerank`` 0: plain MBR.

    Returns
    -------
    B answers, stripped of special tokens and surrounding whitespace.
    """
    if samples > 1:
        return choose_answers(mbr_candidates(
            model, tokenizer, soft_tokens, instructions, max_new_tokens, greedy=greedy, seed=seed,
            temperature=temperature, top_p=top_p, batch_size=batch_size, soft_scale=soft_scale,
            system=system, samples=samples), mbr_beta, semantic, rerank, embed)
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


@torch.no_grad()
def mbr_candidates(model: nn.Module, tokenizer, soft_tokens: Tensor | None,
                   instructions: list[str], max_new_tokens: int, *, greedy: bool, seed: int,
                   temperature: float, top_p: float, batch_size: int, samples: int,
                   soft_scale: float = 1.0, system: str | None = None) -> list[Counter]:
    """The candidate answers of each prompt with how often each was drawn: the greedy
    answer first (count 1) when ``greedy``, then ``samples`` sampled ones (:func:`generate`
    with ``samples`` > 1 keeps :func:`mbr_choice` of them).

    ``batch_size`` counts answer rows, as in greedy decoding (memory: the rows' keys and
    values): ``batch_size // samples`` prompts, at least one, go together. The greedy
    answers ride in the sampling tree (:func:`sample_answers` with ``greedy``): no pass of
    their own.
    """
    eos = tokenizer.eos_token_id
    prompts = max(1, batch_size // samples)
    prefix = prefix_length(tokenizer, system)
    out: list[Counter] = []
    for start in range(0, len(instructions), prompts):
        sl = slice(start, start + prompts)
        soft = None if soft_tokens is None else soft_tokens[sl]
        embeds, mask, _ = build_prompt_embeds(model, tokenizer, soft, instructions[sl],
                                              soft_scale=soft_scale, system=system)
        cands: list[Counter] = [Counter() for _ in range(embeds.shape[0])]
        gens = [torch.Generator().manual_seed(k) for k in prompt_seeds(seed, soft, instructions[sl])]
        drawn = sample_answers(model, embeds, mask, prefix_cache(model, embeds, prefix),
                               max_new_tokens, eos, samples, temperature, top_p, gens,
                               greedy=greedy)
        for i, answers in enumerate(drawn):
            for k, (ids, count) in enumerate(answers):  # with greedy: the greedy answer first,
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()  # counted 0
                cands[i][text] += 1 if greedy and k == 0 else count
        out.extend(cands)
    return out


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    """rouge-score's stemming tokenizer, built once (mbr_choice runs once per prompt)."""
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


class _Overlaps:
    """One prompt's candidates tokenised once, with the unigram overlap of every pair: all
    :func:`mbr_choice` needs, for any ``beta`` and ``rerank`` (the decoding choice scores a
    grid of them on the same candidates)."""

    def __init__(self, candidates: list[str], weights: list[float] | None = None):
        tok = _rouge_tokenizer()
        self.candidates = list(candidates)
        self.weights = [1.0] * len(candidates) if weights is None else list(weights)
        grams = [Counter(tok.tokenize(c)) for c in candidates]
        self.sizes = [sum(g.values()) for g in grams]
        self.both = [[sum((gi & gj).values()) for gj in grams] for gi in grams]  # (n, n)

    def choice(self, beta: float = 1.0, agreement: list[float] | None = None,
               rerank: float = 0.0) -> str:
        """:func:`mbr_choice` of these candidates."""
        sizes, b2 = self.sizes, beta * beta

        def f(i: int, j: int) -> float:  # candidate i as the answer, j as the reference
            if not sizes[i] or not sizes[j]:
                return float(sizes[i] == sizes[j])
            both = self.both[i][j]
            p, r = both / sizes[i], both / sizes[j]
            return (1 + b2) * p * r / (b2 * p + r) if both else 0.0

        total = sum(self.weights)
        totals = [sum(w * f(i, j) for j, w in enumerate(self.weights)) / total
                  for i in range(len(self.candidates))]
        if agreement is not None and rerank:
            totals = [t + rerank * float(a) for t, a in zip(totals, agreement)]
        return self.candidates[max(range(len(self.candidates)), key=totals.__getitem__)]


def mbr_choice(candidates: list[str], weights: list[float] | None = None,
               beta: float = 1.0, agreement: list[float] | None = None,
               rerank: float = 0.0) -> str:
    """The candidate with the highest expected unigram F-score against the candidates
    (ties: the first): the minimum-Bayes-risk answer under a unigram-overlap utility.

    ``weights``: how often each candidate was drawn (default 1 each), so an answer the LLM
    gives often weighs more. ``beta``: the F-score's weight of recall against precision
    (1: ROUGE-1 F). Tokens are rouge-score's (lower case, alphanumeric, Porter-stemmed).
    ``agreement`` (one per candidate, e.g. the cosine between its sentence embedding and
    the one the brain predicts) is added ``rerank`` times to the expected F-score (a mean
    over the draws, in [0, 1]).
    """
    return _Overlaps(candidates, weights).choice(beta, agreement, rerank)


def choose_answers(candidates: list[Counter], beta: float, semantic: Tensor | None = None,
                   rerank: float = 0.0, embed=None) -> list[str]:
    """:func:`mbr_choice` of each prompt's candidates (:func:`mbr_candidates`); with
    ``semantic`` (B, d_s) unit-length predicted sentence embeddings, ``rerank`` > 0 and
    ``embed`` (texts → (n, d_s) unit-length embeddings), each candidate's agreement is its
    cosine with its prompt's prediction."""
    return choose_answers_grid(candidates, [beta], [rerank], semantic, embed)[
        (float(beta), float(rerank))]


def choose_answers_grid(candidates: list[Counter], betas: list[float], reranks: list[float],
                        semantic: Tensor | None = None, embed=None
                        ) -> dict[tuple[float, float], list[str]]:
    """:func:`choose_answers` for every (beta, rerank) of ``betas`` x ``reranks``, keyed by
    that pair (floats). Each prompt's candidates are tokenised and compared once, and
    embedded once, for the whole grid. Without ``semantic`` or ``embed`` every rerank is
    plain MBR."""
    agree: list[list[float] | None] = [None] * len(candidates)
    if semantic is not None and embed is not None and any(reranks):
        texts = sorted({t for c in candidates for t in c})
        vectors = dict(zip(texts, torch.as_tensor(embed(texts), dtype=torch.float32)))
        agree = [[float(vectors[t] @ s) for t in c] for c, s in zip(candidates, semantic.float())]
    tables = [_Overlaps(list(c), list(c.values())) for c in candidates]
    return {(float(beta), float(rerank)): [t.choice(beta, a, rerank) for t, a in zip(tables, agree)]
            for beta in betas for rerank in reranks}


@torch.no_grad()
def greedy_tokens(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache,
                  max_new_tokens: int, eos: int, pad: int) -> Tensor:
    """(B, n_new) greedy answer ids; rows that have emitted ``eos`` leave the batch.

    The same tokens as ``model.generate(do_sample=False)``, which keeps computing finished
    rows until the longest answer of the batch ends (the teacher's answers: median 10 tokens,
    up to 19 in a batch of 64). Here each step runs only the unfinished rows, and
    :func:`select_rows` keeps their keys and values: 17 % less time on the
    teacher's annotation workload (BENCHMARKS). After a row's ``eos`` its ids are ``pad``, as
    with ``generate``; ``eos`` None: every row runs ``max_new_tokens``. ``cache``: keys and
    values of the first columns (:func:`~fmri2text.models.llm.prefix_cache`) or None.
    """
    return answer_tokens(model, inputs_embeds, attention_mask, cache, max_new_tokens, eos, pad)


def _prompt_step(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache):
    """Run the prompts' columns the cache does not hold: (cache, last logits (B, V), positions).

    The base model (``model.model``, as :func:`~fmri2text.models.llm.prefix_cache` runs it)
    gives the hidden states; the output layer then reads the last position one (1, d) row at
    a time. ``model(..., logits_to_keep=1)`` gives the same values (bit for bit in fp32 and
    bf16: SmolLM2 with 64 prompts, and a test), but its (B, 1, d) slice reaches the output
    layer as a batched product against the weight broadcast over B, which bf16 on the CPU
    copies out in full: 57 MB per prompt for SmolLM2, 7.6 GB at annotate's 128 prompts, and
    9 s of a 64-prompt step (BENCHMARKS, session 19).
    """
    held = 0 if cache is None else cache.get_seq_length()
    pos = position_ids(attention_mask)
    out = model.model(inputs_embeds=inputs_embeds[:, held:], attention_mask=attention_mask,
                      position_ids=pos[:, held:], cache=cache, use_cache=True)
    head, last = model.get_output_embeddings(), out.last_hidden_state[:, -1]  # (B, d)
    return out.cache, torch.cat([head(last[i:i + 1]) for i in range(len(last))]), pos


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
        keep = going.nonzero().squeeze(1)
        if not going.all():
            rows, nxt, last = rows[keep], nxt[keep], last[keep]
            attention_mask = attention_mask[keep]
        select_rows(cache, keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask,
                    position_ids=last[:, None], cache=cache, use_cache=True)
        cache = out.cache
        nxt = _next_token(out.logits[:, -1], temperature, top_p, generator)
    return new


def select_rows(cache, rows: Tensor) -> None:
    """Keep the cache's ``rows`` (a row repeated for each of its children) with room for one
    more column, which each layer's next ``update`` fills in place.

    transformers' ``batch_select_indices`` copies every key and value, and the next
    ``update`` copies them again to append a column (``torch.cat``): two copies a step, ~40 s
    of the AVX2 demo's decode (BENCHMARKS, session 23). Here ``index_select`` writes the rows
    into a tensor one column longer: one copy, and the tensors the layers attend over are the
    ones ``torch.cat`` would have made, value for value, so every output keeps its bytes.
    A cache of another kind than transformers' ``DynamicLayer`` layers is left to its own
    ``batch_select_indices``.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        cache.batch_select_indices(rows)
        return
    for layer in layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        grown = []
        for held in (layer.keys, layer.values):  # (R, heads, T, head_dim)
            n, h, t, d = held.shape
            room = held.new_empty(len(rows), h, t + 1, d)
            torch.index_select(held, 0, rows, out=room[:, :, :t])
            grown.append(room)
        layer.keys, layer.values = grown[0][:, :, :-1], grown[1][:, :, :-1]
        layer.update = functools.partial(_fill_column, layer, *grown)


def _fill_column(layer, keys: Tensor, values: Tensor, key_states: Tensor, value_states: Tensor,
                 *args, **kwargs) -> tuple[Tensor, Tensor]:
    """The ``update`` of a layer :func:`select_rows` made room in: the new column goes into
    the room; the layer's own ``update`` (``torch.cat``) serves the calls after this one."""
    keys[:, :, -1:] = key_states
    values[:, :, -1:] = value_states
    layer.keys, layer.values = keys, values
    del layer.update
    return keys, values


@torch.no_grad()
def sample_answers(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, cache,
                   max_new_tokens: int, eos: int | None, samples: int, temperature: float,
                   top_p: float, generators: list[torch.Generator], greedy: bool = False
                   ) -> list[list[tuple[list[int], int]]]:
    """``samples`` sampled answers per prompt, as (ids, count) of each distinct answer.

    Ancestral sampling on a tree: every row is a distinct prefix with the number of draws
    that follow it. Each step draws that many next tokens per row (with replacement, from
    the row's nucleus) and splits the row by the tokens drawn; rows whose token is ``eos``
    (kept in the ids, as the greedy path keeps it) end. Counts of a prompt always sum to
    ``samples``. ``generators``: one per prompt, which alone draws that prompt's tokens, so
    a prompt's answers do not depend on the prompts batched with it (:func:`prompt_seeds`).

    ``greedy``: each prompt's list begins with its greedy answer, counted 0 (draws of the
    same answer are counted in their own entry). The greedy path is one more row of the tree
    only where no draw has followed it (a row of count 0 that draws nothing): it shares the
    prompt's columns and the rows of the draws that took its tokens, instead of a greedy
    pass of its own (a third of MBR-32's time on the demo's tokens, BENCHMARKS).
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
    follows = torch.full((B,), greedy, dtype=torch.bool, device=dev)  # (R,) on the greedy path
    found: list[list[int] | None] = [None] * B  # greedy answers
    for step in range(max_new_tokens):
        p, idx = _nucleus(logits, temperature, top_p)  # (R, k), zero outside each nucleus
        parent = torch.repeat_interleave(torch.arange(len(count), device=dev), count)  # (N,)
        token = _draw(p, idx, parent, prompt[parent], generators)  # (N,)
        weight = torch.ones_like(token)
        if greedy:  # the greedy rows' argmax, a key with no draw of its own
            rows = follows.nonzero().squeeze(1)
            parent = torch.cat([parent, rows])
            token = torch.cat([token, logits[rows].argmax(-1)])
            weight = torch.cat([weight, torch.zeros_like(rows)])
        key, inverse = torch.unique(parent * V + token, return_inverse=True)  # sorted
        n = torch.zeros(len(key), dtype=torch.long, device=dev).index_add_(0, inverse, weight)
        on_path = torch.zeros(len(key), dtype=torch.bool, device=dev)
        if greedy:
            on_path[inverse[len(inverse) - len(rows):]] = True
        parent, token = key // V, key % V  # (R',) one row per distinct (prefix, token)
        hist = torch.cat([hist[parent], token[:, None]], 1)
        prompt, count, last, follows = prompt[parent], n, last[parent], on_path
        ends = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if step + 1 == max_new_tokens:
            ends[:] = True
        for r in ends.nonzero().squeeze(1).tolist():
            if count[r]:
                done[int(prompt[r])].append((hist[r].tolist(), int(count[r])))
            if follows[r]:
                found[int(prompt[r])] = hist[r].tolist()
        going = (~ends).nonzero().squeeze(1)
        if len(going) == 0:
            break
        select_rows(cache, parent[going])  # repeats a prefix's keys for its children
        attention_mask = torch.cat([attention_mask[parent[going]],
                                    attention_mask.new_ones(len(going), 1)], 1)
        hist, prompt, count = hist[going], prompt[going], count[going]
        last, follows = last[going] + 1, follows[going]
        out = model(input_ids=hist[:, -1:], attention_mask=attention_mask,
                    position_ids=last[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    if greedy:
        return [[(ids, 0)] + answers for ids, answers in zip(found, done)]
    return done


def _draw(p: Tensor, idx: Tensor, parent: Tensor, owner: Tensor,
          generators: list[torch.Generator]) -> Tensor:
    """(N,) token ids, draw n from row ``parent[n]``'s nucleus ``p``/``idx`` (R, k), with
    the generator of its prompt ``owner[n]``. Draws are grouped by prompt (rows stay in
    prompt order); each prompt's draws see only its rows' own nucleus width, so what it
    draws does not depend on the other prompts of the batch."""
    token = torch.empty(len(parent), dtype=torch.long, device=p.device)
    bounds = torch.searchsorted(owner, torch.arange(len(generators) + 1, device=owner.device))
    for b, gen in enumerate(generators):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        if lo == hi:  # this prompt's answers have all ended
            continue
        rows = parent[lo:hi]
        width = int((p[rows] > 0).sum(-1).max())
        pick = torch.multinomial(p[rows, :width], 1, replacement=True, generator=gen)
        token[lo:hi] = idx[rows, pick.squeeze(1)]
    return token


def prompt_seeds(seed: int, soft_tokens: Tensor | None, instructions: list[str]) -> list[int]:
    """One sampling seed per prompt, from ``seed``, its instruction and its soft tokens:
    a trial's sampled answers are the same whichever trials it is decoded with.

    The tokens enter through their absolute and squared sums rounded to 0.01, not their
    bytes: a trial's tokens computed in another batch may differ in the last bits, which
    should not change its seed (a plain sum would not do: normalised tokens sum to ~0, whose
    sign is noise).
    """
    out = []
    for i, text in enumerate(instructions):
        if soft_tokens is None:
            mark = "none"
        else:
            z = soft_tokens[i].double()
            mark = f"{float(z.abs().sum()):.2f}|{float(z.pow(2).sum()):.2f}"
        digest = hashlib.sha256(f"{int(seed)}|{text}|{mark}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return out


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
