"""The frozen LLM: prompt assembly, labels, answer loss, batched generation, real SmolLM2 offline."""

import os

import numpy as np
import pytest
import torch

from fmri2text.errors import UserError
from fmri2text.models import generation, llm, zoo


@pytest.fixture(scope="module")
def tiny():
    return zoo.tiny_llm(hidden=32, layers=2)


@pytest.fixture(scope="module")
def sharp():
    """A tiny LLM whose layers outweigh the residual stream, so its answers depend on the
    prompt (a plain random one says the same whatever it is given)."""
    model, tok = zoo.tiny_llm(hidden=32, layers=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.mul_(30.0)
    return model, tok


def test_prompt_embeds_shapes_soft_tokens_and_labels(tiny):
    model, tok = tiny
    soft = torch.randn(2, 3, 32)
    embeds, mask, labels = llm.build_prompt_embeds(
        model, tok, soft, ["describe the video .", "what is happening ?"],
        ["a red ball is bouncing .", "a cube ."], soft_scale=2.0)
    B, T, d = embeds.shape
    assert (B, d) == (2, 32) and mask.shape == labels.shape == (2, T)
    # the shared chat prefix first in every row, then padding, then the rest: every row ends
    # at the last column
    P = llm.prefix_length(tok)
    prefix, _, _ = llm.prompt_parts(tok, "describe the video .")
    assert P == len(tok(prefix, add_special_tokens=False)["input_ids"]) > 0
    assert mask[:, :P].all() and mask[:, -1].all() and (mask[:, P:].diff(dim=1) >= 0).all()
    assert not mask[1].all()  # the shorter row is padded after its prefix
    assert torch.equal(embeds[0, :P], embeds[1, :P])
    # labels: exactly the answer words plus the end-of-turn token, at the end of the row
    ans = [tok.decode(labels[b][labels[b] != -100]) for b in range(2)]
    assert ans[0].split() == "a red ball is bouncing . <|im_end|>".split()
    assert ans[1].split() == "a cube . <|im_end|>".split()
    assert (labels[0] != -100).sum() == 7 and (labels[1] != -100).sum() == 4
    # soft tokens sit in the user turn, scaled, right before the instruction
    for b in range(2):
        start = T - (int(mask[b].sum()) - P)
        assert torch.allclose(embeds[b, start:start + 3], soft[b] * 2.0)
    assert tok.decode(tok(prefix, add_special_tokens=False)["input_ids"]).rstrip().endswith("user")


def test_prompt_without_soft_tokens_is_text_only(tiny):
    model, tok = tiny
    e0, m0, l0 = llm.build_prompt_embeds(model, tok, None, ["describe the video ."])
    e1, m1, _ = llm.build_prompt_embeds(model, tok, torch.zeros(1, 4, 32), ["describe the video ."])
    assert e1.shape[1] == e0.shape[1] + 4 and (l0 == -100).all()


def test_answer_loss_matches_full_lm_loss(tiny):
    model, tok = tiny
    embeds, mask, labels = llm.build_prompt_embeds(
        model, tok, torch.randn(2, 2, 32), ["describe the video .", "what is happening ?"],
        ["a red ball .", "a blue cube is spinning ."])
    ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=llm.position_ids(mask),
                labels=labels).loss
    for prefix in (0, llm.prefix_length(tok)):  # the shared prefix run once changes nothing
        ours = llm.answer_loss(model, embeds, mask, labels, prefix)
        assert torch.allclose(ours, ref, atol=1e-5)


def test_hidden_after_prefix_equals_the_full_forward(tiny):
    model, tok = tiny
    soft = torch.randn(3, 2, 32)
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?"]
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr, ["a red ball ."] * 3)
    P = llm.prefix_length(tok)
    full = model.model(inputs_embeds=embeds, attention_mask=mask,
                       position_ids=llm.position_ids(mask)).last_hidden_state
    ours = llm.hidden_after_prefix(model, embeds, mask, P)
    assert ours.shape == (3, embeds.shape[1] - P, 32)
    keep = mask[:, P:].bool()  # padding columns attend elsewhere and are never read
    assert torch.allclose(ours[keep], full[:, P:][keep], atol=1e-5)


def test_gradients_reach_soft_tokens_not_the_frozen_llm(tiny):
    model, tok = tiny
    soft = torch.randn(1, 2, 32, requires_grad=True)
    embeds, mask, labels = llm.build_prompt_embeds(model, tok, soft, ["describe the video ."],
                                                   ["a red ball ."])
    llm.answer_loss(model, embeds, mask, labels).backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_batched_padded_generation_equals_one_by_one(sharp):
    model, tok = sharp
    soft = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?"]
    batched = generation.generate(model, tok, soft, instr, max_new_tokens=6)
    assert len(set(batched)) == 3, batched  # the prompts lead to different answers
    single = [generation.generate(model, tok, soft[i:i + 1], instr[i:i + 1], max_new_tokens=6)[0]
              for i in range(3)]
    assert batched == single
    # the shared prefix cache changes nothing: HF generate on the whole prompt gives the same
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr)
    whole = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                           do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    assert [t.strip() for t in tok.batch_decode(whole, skip_special_tokens=True)] == batched
    assert generation.generate(model, tok, soft, instr, max_new_tokens=6) == batched  # greedy: same
    s1 = generation.generate(model, tok, soft, instr, max_new_tokens=6, greedy=False, seed=3)
    s2 = generation.generate(model, tok, soft, instr, max_new_tokens=6, greedy=False, seed=3)
    assert s1 == s2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_step_logits_equal_the_llms_own_last_position_logits(sharp, dtype):
    """The prompt step computes the last position's logits one row at a time: the same bits as
    the LLM's forward with ``logits_to_keep=1``, in fp32 and bf16 (whose batched product there
    copied the output weight once per prompt: 7.6 GB at annotate's 128 prompts)."""
    import copy

    model, tok = sharp
    model = copy.deepcopy(model).to(dtype)
    soft = torch.randn(4, 2, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?", "b"]
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr)
    prefix = llm.prefix_length(tok, None)
    shapes = []  # what the output layer is given: one (1, d) row per prompt, never (B, 1, d)
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        cache, logits, pos = generation._prompt_step(model, embeds, mask,
                                                     llm.prefix_cache(model, embeds, prefix))
    finally:
        hook.remove()
    assert shapes == [(1, 32)] * 4
    ref_cache = llm.prefix_cache(model, embeds, prefix)
    held = ref_cache.get_seq_length()
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[:, held:], attention_mask=mask, position_ids=pos[:, held:],
                    cache=ref_cache, use_cache=True, logits_to_keep=1)
    assert logits.shape == (4, model.config.vocab_size) and logits.dtype == dtype
    assert torch.equal(logits, ref.logits[:, -1])
    assert cache.get_seq_length() == ref.cache.get_seq_length() == embeds.shape[1]


def test_select_rows_gives_the_caches_own_tensors_with_one_copy(sharp):
    """select_rows keeps (and repeats) rows and leaves room for the next column: the next
    step's logits and the cache after it equal, bit for bit, transformers' own
    batch_select_indices followed by its torch.cat growth; the step after that grows as usual."""
    import copy

    model, tok = sharp
    soft = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(2))
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, ["a ?", "describe the video .", "b"])
    cache, logits, pos = generation._prompt_step(model, embeds, mask, None)
    rows = torch.tensor([2, 0, 0, 1, 2])  # one row dropped, others repeated for their children
    ids = logits.argmax(-1)[rows][:, None]
    step_mask = torch.cat([mask[rows], mask.new_ones(len(rows), 1)], 1)
    steps = {}
    for name in ("own", "room"):
        c = copy.deepcopy(cache)
        if name == "own":
            c.batch_select_indices(rows)
        else:
            generation.select_rows(c, rows)
            assert c.get_seq_length() == cache.get_seq_length()  # the room is not a column yet
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=step_mask, position_ids=pos[rows, -1:] + 1,
                        cache=c, use_cache=True)
            again = model(input_ids=ids, attention_mask=torch.cat([step_mask, step_mask[:, :1]], 1),
                          position_ids=pos[rows, -1:] + 2, cache=out.cache, use_cache=True)
        steps[name] = (out.logits, again.logits, [t.clone() for layer in again.cache.layers
                                                  for t in (layer.keys, layer.values)])
    assert torch.equal(steps["own"][0], steps["room"][0])
    assert torch.equal(steps["own"][1], steps["room"][1])
    assert all(torch.equal(a, b) for a, b in zip(steps["own"][2], steps["room"][2]))


def test_greedy_rows_leave_the_batch_at_their_eos_and_match_hf_generate(sharp):
    """Rows that end early leave the batch; every row's tokens equal HF generate's."""
    model, tok = sharp
    soft = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1))
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?",
             "what ?", "the video .", "is it red ?"]
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr)
    P, pad = llm.prefix_length(tok), tok.pad_token_id

    def hf(eos):
        with torch.no_grad():
            return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8,
                                  do_sample=False, eos_token_id=eos, pad_token_id=pad)

    free = hf(None)  # no row stops: pick as "eos" a token some rows emit early, others never
    rows = {int(t): int((free == t).any(1).sum()) for t in free[:, :4].unique()}
    eos = max((t for t, c in rows.items() if c < len(instr)), key=rows.get)
    want = hf(eos)
    got = generation.greedy_tokens(model, embeds, mask, llm.prefix_cache(model, embeds, P), 8, eos, pad)
    stopped = (want == eos).any(1)
    assert 0 < int(stopped.sum()) < len(instr)  # some rows end early, some do not
    assert torch.equal(got, want)


def test_sampled_answers_are_a_seeded_tree_of_counted_draws(sharp):
    """sample_answers draws `samples` answers per prompt as (ids, count) of each distinct
    answer: counts sum to `samples`; a nucleus of one token gives the greedy answer once with
    every draw; a wide one gives several; the same seed gives the same draws."""
    model, tok = sharp
    soft = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?"]
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, instr)
    P, pad, eos = llm.prefix_length(tok), tok.pad_token_id, tok.eos_token_id

    def draw(n, temperature, top_p, seed):
        return generation.sample_answers(model, embeds, mask, llm.prefix_cache(model, embeds, P),
                                         6, eos, n, temperature, top_p,
                                         [torch.Generator().manual_seed(seed + i) for i in range(3)])

    greedy = generation.greedy_tokens(model, embeds, mask, llm.prefix_cache(model, embeds, P), 6,
                                      eos, pad)
    narrow = draw(5, 1.0, 1e-6, 0)
    for i in range(3):
        want = [t for t in greedy[i].tolist()]
        want = want[:want.index(eos) + 1] if eos in want else want
        want = [t for t in want if t != pad or t == eos]
        assert narrow[i] == [(want, 5)]
    wide = draw(16, 5.0, 1.0, 0)
    assert all(sum(c for _, c in answers) == 16 for answers in wide)
    assert all(len(answers) > 3 for answers in wide)  # samples of one prompt differ
    assert all(len(ids) <= 6 for answers in wide for ids, _ in answers)
    assert wide == draw(16, 5.0, 1.0, 0) and wide != draw(16, 5.0, 1.0, 1)
    # greedy=True: the same draws, after the greedy answer counted 0; the greedy path runs as
    # a row of the tree, also where no draw follows it (a few draws at a high temperature)
    few = draw(3, 5.0, 1.0, 0)
    with_greedy = generation.sample_answers(
        model, embeds, mask, llm.prefix_cache(model, embeds, P), 6, eos, 3, 5.0, 1.0,
        [torch.Generator().manual_seed(i) for i in range(3)], greedy=True)
    left = 0
    for i in range(3):
        want = greedy[i].tolist()
        want = want[:want.index(eos) + 1] if eos in want else want
        assert with_greedy[i][0] == (want, 0) and with_greedy[i][1:] == few[i]
        left += want not in [ids for ids, _ in few[i]]
    assert left > 0  # some prompt's greedy answer was drawn by none of its samples


def test_tree_sampling_draws_from_the_models_distribution(sharp):
    """The tree's counts estimate the same answer distribution as independent draws (the
    one-answer sampler on n copies of the prompt): the first and the second token's
    distributions differ from those no more than two independent runs differ from each
    other, and clearly from draws at another temperature."""
    from collections import Counter

    model, tok = sharp
    soft = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(3))
    embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft, ["a ?"])
    P, pad, eos = llm.prefix_length(tok), tok.pad_token_id, tok.eos_token_id
    n = 3000

    def tree(seed):
        out = []
        for ids, c in generation.sample_answers(model, embeds, mask,
                                                llm.prefix_cache(model, embeds, P), 2, eos, n,
                                                1.5, 1.0, [torch.Generator().manual_seed(seed)])[0]:
            out += [tuple(ids)] * c
        return out

    def single(seed, temperature=1.5):
        rep = embeds.repeat(n, 1, 1), mask.repeat(n, 1)
        ids = generation.answer_tokens(model, *rep, llm.prefix_cache(model, rep[0], P), 2, eos,
                                       pad, temperature=temperature, top_p=1.0,
                                       generator=torch.Generator().manual_seed(seed))
        return [tuple(row[:row.index(eos) + 1] if eos in row else row) for row in ids.tolist()]

    def tv(a, b):  # the larger of the first and the second token's total variation
        out = 0.0
        for k in (0, 1):
            ca, cb = Counter(x[k] if len(x) > k else None for x in a), \
                Counter(x[k] if len(x) > k else None for x in b)
            out = max(out, 0.5 * sum(abs(ca[t] - cb[t]) for t in set(ca) | set(cb)) / n)
        return out

    t, s1, s2 = tree(1), single(2), single(3)
    assert len(t) == n and len(set(t)) > 100  # a spread distribution: the test means something
    noise = tv(s1, s2)
    assert tv(t, s1) < noise + 0.03, (tv(t, s1), noise)
    assert tv(t, single(2, temperature=0.2)) > noise + 0.05  # the check can fail


def test_mbr_choice_is_the_consensus_answer():
    cands = ["A red ball is falling.", "A red ball is falling in the sky.",
             "A blue cube spins on a carpet of cream.", "A red ball is rolling."]
    assert generation.mbr_choice(cands) == "A red ball is falling."
    assert generation.mbr_choice(["one answer"]) == "one answer"
    # duplicates weigh: the answer given twice wins over a single outlier
    assert generation.mbr_choice(["a green star", "a white ring", "a green star"]) == "a green star"
    # counts weigh as duplicates do
    assert generation.mbr_choice(["a green star", "a white ring"], [1, 2]) == "a white ring"
    # beta > 1 weighs recall: the answer that covers more of the others' words wins
    cands = ["a red ball", "a red ball in the sky", "a red ball on the grass"]
    assert generation.mbr_choice(cands, [2, 1, 1]) == "a red ball"
    assert generation.mbr_choice(cands, [2, 1, 1], beta=3.0) != "a red ball"
    # agreement with the brain's predicted meaning, weighted by rerank, moves the choice
    agree = [0.1, 0.2, 0.9]
    assert generation.mbr_choice(cands, [2, 1, 1], 1.0, agree, 0.0) == "a red ball"
    assert generation.mbr_choice(cands, [2, 1, 1], 1.0, agree, 2.0) == "a red ball on the grass"


def test_choose_answers_weighs_candidates_by_their_cosine_with_the_prediction():
    """choose_answers: plain MBR without a prediction or with rerank 0; with one, each
    candidate's agreement is the cosine of its embedding with its own prompt's prediction."""
    from collections import Counter

    vec = {"a red ball": [1.0, 0.0], "a blue ball": [0.0, 1.0], "a ball": [0.6, 0.8]}
    embed = lambda texts: np.array([vec[t] for t in texts])  # noqa: E731
    cands = [Counter({"a ball": 3, "a red ball": 1, "a blue ball": 1})] * 2
    semantic = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = generation.choose_answers(cands, 1.0)
    assert plain == ["a ball", "a ball"]
    assert generation.choose_answers(cands, 1.0, semantic, 0.0, embed) == plain
    assert generation.choose_answers(cands, 1.0, semantic, 4.0, embed) == ["a red ball", "a blue ball"]


def test_choose_answers_grid_is_each_settings_own_choice():
    """The grid (candidates tokenised and embedded once) keys every (beta, rerank) to the
    answers mbr_choice picks with that setting alone, in betas-then-reranks order."""
    from collections import Counter

    vec = {"a red ball": [1.0, 0.0], "a red ball in the sky": [0.8, 0.6],
           "a red ball on the grass": [0.0, 1.0], "a ball": [0.6, 0.8]}
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.array([vec[t] for t in texts])

    cands = [Counter({"a red ball": 2, "a red ball in the sky": 1, "a red ball on the grass": 1}),
             Counter({"a ball": 1, "a red ball on the grass": 2})]
    semantic = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    grid = generation.choose_answers_grid(cands, [1.0, 3.0], [0.0, 2.0], semantic, embed)
    assert list(grid) == [(1.0, 0.0), (1.0, 2.0), (3.0, 0.0), (3.0, 2.0)] and len(calls) == 1
    for (beta, rerank), answers in grid.items():
        for c, s, answer in zip(cands, semantic, answers):
            agree = [float(torch.tensor(vec[t]) @ s) for t in c]
            assert answer == generation.mbr_choice(list(c), list(c.values()), beta, agree, rerank)
    assert len({tuple(a) for a in grid.values()}) > 1  # the settings do choose differently


def test_mbr_generate_returns_one_candidate_per_prompt(sharp):
    """samples > 1: one answer per prompt, the mbr_choice among that prompt's greedy answer
    and its counted samples; reproducible with the seed."""
    model, tok = sharp
    soft = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(2))
    instr = ["describe the video .", "what is the main thing happening in the video ?", "a ?"]
    kw = dict(max_new_tokens=6, samples=6, temperature=3.0, top_p=1.0, seed=5, mbr_beta=1.5)
    out = generation.generate(model, tok, soft, instr, batch_size=3, **kw)
    assert len(out) == 3 and out == generation.generate(model, tok, soft, instr, batch_size=3, **kw)
    greedy = generation.generate(model, tok, soft, instr, max_new_tokens=6)
    for i, seed in enumerate(generation.prompt_seeds(5, soft, instr)):
        embeds, mask, _ = llm.build_prompt_embeds(model, tok, soft[i:i + 1], instr[i:i + 1])
        drawn = generation.sample_answers(model, embeds, mask,
                                          llm.prefix_cache(model, embeds, llm.prefix_length(tok)),
                                          6, tok.eos_token_id, 6, 3.0, 1.0,
                                          [torch.Generator().manual_seed(seed)])[0]
        cands = {greedy[i]: 1}
        for ids, c in drawn:
            t = tok.decode(ids, skip_special_tokens=True).strip()
            cands[t] = cands.get(t, 0) + c
        assert generation.generate(model, tok, soft[i:i + 1], instr[i:i + 1], batch_size=1, **kw)[0] \
            == generation.mbr_choice(list(cands), list(cands.values()), 1.5)
        # the candidates themselves: greedy answer first, samples + 1 draws counted
        got = generation.mbr_candidates(model, tok, soft[i:i + 1], instr[i:i + 1], 6, greedy=True,
                                        seed=5, temperature=3.0, top_p=1.0, batch_size=1,
                                        samples=6)[0]
        assert dict(got) == cands and next(iter(got)) == greedy[i] and sum(got.values()) == 7
    # a prompt's answers do not depend on the prompts decoded with it: other batches, order
    order = [2, 0, 1]
    assert [generation.generate(model, tok, soft[order], [instr[j] for j in order],
                                batch_size=b, **kw) for b in (6, 18)] == [[out[j] for j in order]] * 2


def test_prompt_seeds_follow_the_prompt_not_its_bits():
    """A prompt's seed depends on the seed, its instruction and its tokens, not on the last
    bits of the tokens (another batch may compute them a little differently)."""
    z = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    a = generation.prompt_seeds(0, z, ["x", "x"])
    assert a[0] != a[1]  # other tokens
    assert generation.prompt_seeds(0, z * (1 + 1e-7), ["x", "x"]) == a
    assert generation.prompt_seeds(1, z, ["x", "x"]) != a
    assert generation.prompt_seeds(0, z, ["y", "x"])[0] != a[0]
    assert generation.prompt_seeds(0, None, ["x"]) == generation.prompt_seeds(0, None, ["x"])


def test_unknown_llm_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown LLM"):
        llm.load_llm(str(tmp_path / "nope"))


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FMRI2TEXT_CACHE", str(tmp_path))
    assert llm.cache_dir() == tmp_path


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="must run offline")
def test_real_smollm2_loads_offline_and_generates_from_embeds():
    """Cold (first ever) load dequantises the GGUF (~40 s); afterwards the cache loads in ~1 s."""
    model, tok = llm.load_llm("smollm2")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.dtype == llm.preferred_dtype() and not any(p.requires_grad for p in model.parameters())
    model.train()
    again, tok_again = llm.load_llm("smollm2")  # one copy per process, handed back frozen
    assert again is model and tok_again is tok and not again.training
    out = generation.generate(model, tok, None, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in out[0]
    soft = torch.randn(1, 4, 576) * llm.embedding_std(model)
    out = generation.generate(model, tok, soft, ["Describe the video."], max_new_tokens=8)
    assert isinstance(out[0], str) and len(out[0]) > 0


def test_gguf_conversion_parses_each_file_once(tmp_path):
    """While converting, a GGUF file is parsed once and shared; afterwards gguf is untouched."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", 7)
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real = gguf.GGUFReader
    with llm._one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same parse, by path
        assert first.fields["test.value"].contents() == 7
        assert first.tensors[0].data.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert gguf.GGUFReader is real and gguf.GGUFReader(path) is not first


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_nucleus_draws_stay_in_the_full_sort_nucleus(top_p):
    """_next_token sorts only the NUCLEUS_TOP most likely tokens unless a row's nucleus is
    wider: a peaked row (nucleus of a few tokens) and a flat one (nucleus of thousands) in
    one batch both draw only from the nucleus a full sort gives, and every nucleus token
    can be drawn."""
    V = 4000
    g = torch.Generator().manual_seed(0)
    peaked = torch.full((V,), -20.0)
    peaked[[7, 70, 700]] = torch.tensor([3.0, 2.0, 1.0])
    logits = torch.stack([peaked, torch.randn(V, generator=g) * 0.1])  # (2, V)

    def nucleus(row):
        p, idx = torch.softmax(row, -1).sort(descending=True)
        return set(idx[(p.cumsum(-1) - p) < top_p].tolist())

    want = [nucleus(r) for r in logits]
    assert len(want[0]) <= 3 < generation.NUCLEUS_TOP < len(want[1])  # one row short of top_p in the top
    seen = [set(), set()]
    for _ in range(300):
        tok = generation._next_token(logits, 1.0, top_p, g)
        for r in range(2):
            assert int(tok[r]) in want[r]
            seen[r].add(int(tok[r]))
    assert seen[0] == want[0]
