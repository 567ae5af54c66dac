"""Text metrics (BERTScore, SacreBLEU-1/2, ROUGE-L) and retrieval, scored exactly and fast.

Every text metric is computed from per-pair tables over the distinct hypotheses × distinct
reference groups (:class:`PairTables`), so scoring any pairing of the same texts — the
real one, a subset of trials, or thousands of shuffled ones for a permutation test — is
a gather and a sum. The tables reproduce the reference libraries:

- BERTScore: token embeddings from ``bert_score``'s own model and tokenizer (same layer,
  same word pieces), greedy cosine matching and idf weights as in ``bert_score.score``
  (multi-reference: element-wise max of P, R, F over the references, as there).
- BLEU: SacreBLEU's 13a tokenizer, clipped n-gram matches, closest reference length,
  ``BLEU.compute_bleu`` (exp smoothing) on the summed statistics — corpus BLEU of any
  pairing is a sum over its pairs; sentence BLEU uses effective order.
- ROUGE-L: rouge-score's tokenizer with the Porter stemmer and LCS; with several
  references the one with the highest F is kept (``RougeScorer.score_multi``).

The tests check each against the library on the same pairs.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sacrebleu.metrics import BLEU

from fmri2text.config import EvaluationConfig
from fmri2text.errors import UserError

TEXT_KEYS = ("bertscore_p", "bertscore_r", "bertscore_f1", "bleu1", "bleu2",
             "rougeL_p", "rougeL_r", "rougeL_f")
SENTENCE_BLEU_KEYS = ("bleu1_sentence", "bleu2_sentence")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BLEU_ORDERS = (1, 2)


def as_reference_lists(refs: list, what: str = "references") -> list[list[str]]:
    """Each hypothesis' references as a non-empty list of strings (a plain str is one ref)."""
    out = []
    for i, r in enumerate(refs):
        group = [r] if isinstance(r, str) else list(r or [])
        if not group or not all(isinstance(s, str) for s in group):
            raise UserError(f"{what} #{i} must be a string or a non-empty list of strings, got {r!r}",
                            fix="give every hypothesis at least one reference text")
        out.append(group)
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=2)
def _load_bert(path: str, num_layers: int):
    """bert_score's tokenizer and model truncated to ``num_layers`` (loaded once per process)."""
    from bert_score.utils import get_model, get_tokenizer

    return get_tokenizer(path, False), get_model(path, num_layers, False)


class PairTables:
    """Per-pair metric statistics over distinct hypotheses (rows) × reference groups (cols).

    ``hyp_of[i]`` and ``ref_of[i]`` give trial i's row and column. A pairing of trials is a
    pair of index arrays ``(hyp_trials, ref_trials)``; the real one is ``(i, i)``.
    """

    def __init__(self, hyp_of: np.ndarray, ref_of: np.ndarray, tables: dict[str, np.ndarray],
                 hyp_len: np.ndarray, hyp_totals: np.ndarray):
        self.hyp_of = hyp_of  # (n,) row of each trial's hypothesis
        self.ref_of = ref_of  # (n,) column of each trial's reference group
        self.t = tables  # name -> (U_h, G) float64 (BERTScore/ROUGE ×100, BLEU counts)
        self.hyp_len = hyp_len  # (U_h,) hypothesis length in 13a tokens
        self.hyp_totals = hyp_totals  # (U_h, 2) hypothesis 1-gram and 2-gram counts

    @property
    def n(self) -> int:
        return len(self.hyp_of)

    def _gather(self, name: str, hyp_trials: np.ndarray, ref_trials: np.ndarray) -> np.ndarray:
        return self.t[name][self.hyp_of[hyp_trials], self.ref_of[ref_trials]]

    def pair_stats(self, key: str, hyp_trials: np.ndarray, ref_trials: np.ndarray) -> np.ndarray:
        """Additive statistics of each pair, (..., m, s): a pairing's corpus metric is
        :func:`corpus_value` of their sum over its m pairs.

        BLEU-n: (system length, reference length, matches of order 1..n, n-grams of order
        1..n); every other metric: (value, 1), so the sum gives the mean.
        """
        h = np.asarray(hyp_trials)
        r = np.asarray(ref_trials)
        if key.startswith("bleu"):
            order = int(key[4])
            rows = self.hyp_of[h]
            cols = [self.hyp_len[rows], self._gather("ref_len", h, r)]
            cols += [self._gather(f"correct{n}", h, r) for n in range(1, order + 1)]
            cols += [self.hyp_totals[rows, n - 1] for n in range(1, order + 1)]
            return np.stack(np.broadcast_arrays(*cols), -1).astype(np.float64)
        value = self._gather(key, h, r)
        return np.stack([value, np.ones_like(value)], -1)

    def statistic(self, key: str, hyp_trials: np.ndarray, ref_trials: np.ndarray) -> np.ndarray:
        """A corpus metric of one or many pairings.

        Parameters
        ----------
        key:
            A key of :data:`TEXT_KEYS`.
        hyp_trials, ref_trials:
            (m,) or (k, m) trial indices: trial ``hyp_trials[..., i]``'s hypothesis is
            scored against trial ``ref_trials[..., i]``'s references.

        Returns
        -------
        np.ndarray
            () or (k,) metric values (×100).
        """
        if not key.startswith("bleu"):  # the mean itself (numpy's pairwise sum, as always)
            return self._gather(key, np.asarray(hyp_trials), np.asarray(ref_trials)).mean(-1)
        return corpus_value(key, self.pair_stats(key, hyp_trials, ref_trials).sum(-2))

    def metrics(self, trials: np.ndarray | None = None) -> dict[str, float]:
        """All text metrics (×100) of the real pairing over ``trials`` (default: all)."""
        idx = np.arange(self.n) if trials is None else np.asarray(trials)
        out = {k: float(self.statistic(k, idx, idx)) for k in TEXT_KEYS}
        for order in BLEU_ORDERS:  # mean sentence-level BLEU, effective order
            scores = [BLEU.compute_bleu(
                [int(self._gather(f"correct{n}", i, i)) for n in range(1, order + 1)],
                [int(self.hyp_totals[self.hyp_of[i], n - 1]) for n in range(1, order + 1)],
                int(self.hyp_len[self.hyp_of[i]]), int(self._gather("ref_len", i, i)),
                smooth_method="exp", effective_order=True, max_ngram_order=order).score
                for i in idx]
            out[f"bleu{order}_sentence"] = float(np.mean(scores)) if len(scores) else 0.0
        return out


def corpus_value(key: str, sums: np.ndarray) -> np.ndarray:
    """A corpus metric (×100) from summed :meth:`PairTables.pair_stats`, (..., s) -> (...).

    BLEU: SacreBLEU's ``compute_bleu`` (exp smoothing) on the summed counts; every other
    metric: the sum of values over the number of pairs.
    """
    sums = np.asarray(sums, dtype=np.float64)
    if not key.startswith("bleu"):
        return sums[..., 0] / np.maximum(sums[..., 1], 1.0)
    order = int(key[4])
    counts = np.rint(sums).astype(np.int64).reshape(-1, sums.shape[-1]).tolist()  # exact
    return np.array([BLEU.compute_bleu(c[2:2 + order], c[2 + order:2 + 2 * order], c[0], c[1],
                                       smooth_method="exp", max_ngram_order=order).score
                     for c in counts]).reshape(sums.shape[:-1])


class TextScorer:
    """BERTScore P/R/F1, SacreBLEU-1/2 and ROUGE-L P/R/F (all ×100) of decoded text.

    Parameters
    ----------
    cfg:
        ``bertscore_model`` ('minilm' = the embedded all-MiniLM-L6-v2, or a local model
        folder), ``bertscore_layers``, ``bertscore_idf``, ``bertscore_rescale`` (needs a
        baseline TSV: ``bertscore_baseline`` or bert_score's bundled one for the model).
    """

    def __init__(self, cfg: EvaluationConfig):
        self.cfg = cfg
        if cfg.bertscore_model == "minilm":
            from fmri2text.models.zoo import minilm_path

            self.model_path, self.model_name = minilm_path(), MINILM_NAME
        else:
            self.model_path = Path(cfg.bertscore_model).expanduser()
            self.model_name = self.model_path.name
            if not (self.model_path / "config.json").is_file():
                raise UserError(f"evaluation.bertscore_model={cfg.bertscore_model!r} is not a "
                                "local model folder (no config.json)", path=self.model_path,
                                fix="use 'minilm' (embedded) or a local transformers folder")
        self.baseline = self._baseline() if cfg.bertscore_rescale else None
        self._model = None
        self._tokenizer = None
        self._emb: dict[str, tuple[list[int], torch.Tensor]] = {}  # text -> (ids, (L, d) unit)
        self._rouge_tokens: dict[str, list[str]] = {}  # text -> stemmed ROUGE tokens
        self._bleu_tok = BLEU(max_ngram_order=2).tokenizer
        from rouge_score.tokenizers import DefaultTokenizer

        self._rouge_tok = DefaultTokenizer(use_stemmer=True)

    # ------------------------------------------------------------------ identity / loading

    def _baseline(self) -> np.ndarray:
        """(3,) P, R, F rescale baseline of the configured layer."""
        import bert_score
        import pandas as pd

        path = (Path(self.cfg.bertscore_baseline) if self.cfg.bertscore_baseline else
                Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{self.model_name}.tsv")
        if not path.is_file():
            raise UserError(f"no BERTScore rescale baseline for model {self.model_name!r}", path=path,
                            fix="set evaluation.bertscore_rescale=false or point "
                                "evaluation.bertscore_baseline to a LAYER,P,R,F TSV")
        table = pd.read_csv(path)
        return table.iloc[self.cfg.bertscore_layers].to_numpy()[1:].astype(np.float64)

    def identity(self) -> dict:
        """What produced the scores: BERTScore backbone/layer/idf/rescale and library versions."""
        return {
            "bertscore": {"model": self.model_name, "model_path": str(self.model_path),
                          "num_layers": self.cfg.bertscore_layers, "idf": self.cfg.bertscore_idf,
                          "rescale_with_baseline": self.cfg.bertscore_rescale,
                          "baseline": self.baseline.tolist() if self.baseline is not None else None,
                          "multi_reference": "element-wise max of P, R, F (bert_score)"},
            "bleu": {"max_ngram_order": list(BLEU_ORDERS), "tokenize": "13a", "smooth": "exp",
                     "case": "mixed", "corpus_level": True,
                     "sentence_level": "mean, effective order"},
            "rouge": {"type": "rougeL", "use_stemmer": True,
                      "multi_reference": "reference with the highest F (score_multi)"},
            "scale": 100,
            "versions": {d: _version(d) for d in
                         ("bert-score", "sacrebleu", "rouge-score", "transformers", "torch")},
        }

    def _load(self):
        if self._model is None:
            config = json.loads((self.model_path / "config.json").read_text(encoding="utf-8"))
            n_layers = int(config.get("num_hidden_layers", 0))
            if not 0 <= self.cfg.bertscore_layers <= n_layers:
                raise UserError(f"evaluation.bertscore_layers={self.cfg.bertscore_layers} is out of "
                                f"range for {self.model_name}", path=self.model_path,
                                fix=f"choose a layer between 0 and {n_layers}")
            self._tokenizer, self._model = _load_bert(str(self.model_path), self.cfg.bertscore_layers)
        return self._tokenizer, self._model

    # ------------------------------------------------------------------ BERTScore

    def _embed(self, texts: list[str]) -> None:
        """Cache unit-norm token embeddings (L, d) of every text not seen yet."""
        from bert_score.utils import get_bert_embedding, sent_encode

        tokenizer, model = self._load()
        # longest first, ties by text: the set's order follows the process's string hashing,
        # and a text's padded batch (so its embedding's last bits) would follow it
        todo = sorted({t for t in texts if t not in self._emb},
                      key=lambda s: (-len(s.split(" ")), s))
        # idf weights are applied later (_idf_weights); this dict only satisfies the API
        idf = defaultdict(lambda: 1.0)
        for s in [t for t in todo if not t.strip()]:
            # bert_score's sent_encode calls build_inputs_with_special_tokens for an empty
            # text, which transformers 5 tokenizers lack: encode it as [CLS] [SEP] here
            ids = tokenizer.encode("", add_special_tokens=True)
            with torch.no_grad():
                e = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)))[0][0].float()
            self._emb[s] = (ids, e / e.norm(dim=-1, keepdim=True))
        todo = [t for t in todo if t.strip()]
        bs = self.cfg.bertscore_batch_size
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            emb, mask, _ = get_bert_embedding(batch, model, tokenizer, idf, device="cpu")
            for i, s in enumerate(batch):  # emb: (b, L, d), mask: (b, L)
                e = emb[i, : int(mask[i].sum())].float()
                self._emb[s] = (sent_encode(tokenizer, s), e / e.norm(dim=-1, keepdim=True))

    def _idf_weights(self, texts: list[str], ref_corpus: list[str]) -> list[torch.Tensor]:
        """Per-token weights of each text: idf over ``ref_corpus`` or 1 (0 for [CLS]/[SEP])."""
        tokenizer, _ = self._load()
        if self.cfg.bertscore_idf:  # bert_score.utils.get_idf_dict, without the process pool
            df = Counter(i for r in ref_corpus for i in set(self._emb[r][0]))
            n = len(ref_corpus)
            w = lambda i: np.log((n + 1) / (df.get(i, 0) + 1))  # noqa: E731
        else:
            special = {tokenizer.sep_token_id, tokenizer.cls_token_id}
            w = lambda i: 0.0 if i in special else 1.0  # noqa: E731
        return [torch.tensor([w(i) for i in self._emb[t][0]], dtype=torch.float64) for t in texts]

    def _bertscore_pairs(self, hyps: list[str], refs: list[str], ref_corpus: list[str]) -> np.ndarray:
        """(3, U_h, U_r) P, R, F of every distinct hypothesis × distinct reference sentence."""
        self._embed(hyps + refs)

        def pad(texts):
            embs = [self._emb[t][1] for t in texts]
            w = self._idf_weights(texts, ref_corpus)
            x = torch.nn.utils.rnn.pad_sequence(embs, batch_first=True)  # (U, L, d)
            mask = torch.nn.utils.rnn.pad_sequence(
                [torch.ones(len(e), dtype=torch.bool) for e in embs], batch_first=True)  # (U, L)
            wp = torch.nn.utils.rnn.pad_sequence(w, batch_first=True)  # (U, L)
            empty = torch.tensor([len(e) == 2 for e in embs])  # only [CLS] [SEP]: score 0
            return x, mask, wp / wp.sum(1, keepdim=True), empty

        H, hmask, hw, hempty = pad(hyps)
        R, rmask, rw, rempty = pad(refs)
        out = torch.zeros(3, len(hyps), len(refs), dtype=torch.float64)
        chunk = max(1, int(5e6 // max(1, len(refs) * H.shape[1] * R.shape[1])))
        for s in range(0, len(hyps), chunk):
            sim = torch.einsum("ald,bmd->ablm", H[s:s + chunk], R)  # (c, U_r, L_h, L_r)
            p_tok = sim.masked_fill(~rmask[None, :, None, :], -torch.inf).amax(3)  # (c, U_r, L_h)
            r_tok = sim.masked_fill(~hmask[s:s + chunk, None, :, None], -torch.inf).amax(2)
            p_tok = p_tok.double().nan_to_num(0.0, neginf=0.0)
            r_tok = r_tok.double().nan_to_num(0.0, neginf=0.0)
            P = (p_tok * hw[s:s + chunk, None, :]).sum(2)  # (c, U_r)
            Rc = (r_tok * rw[None, :, :]).sum(2)
            F = (2 * P * Rc / (P + Rc)).nan_to_num(0.0)
            out[:, s:s + chunk] = torch.stack([P, Rc, F])
        out = out.nan_to_num(0.0)
        out[:2, hempty] = 0.0
        out[:2, :, rempty] = 0.0
        return out.numpy()

    # ------------------------------------------------------------------ BLEU and ROUGE

    def _bleu_pairs(self, hyps: list[str], groups: list[list[str]]) -> tuple[dict, np.ndarray]:
        """Clipped 1/2-gram matches and closest reference length, (U_h, G) each; (U_h,) lengths."""
        def grams(text: str) -> tuple[Counter, int]:
            toks = self._bleu_tok(text.rstrip()).split()
            grams = Counter(tuple(toks[i:i + n]) for n in BLEU_ORDERS for i in range(len(toks) - n + 1))
            return grams, len(toks)

        h_counts, h_len = zip(*[grams(h) for h in hyps])
        g_counts, g_lens = [], []
        for group in groups:  # per n-gram, the max count over the group's references
            merged: Counter = Counter()
            lens = []
            for ref in group:
                c, n_tok = grams(ref)
                lens.append(n_tok)
                for k, v in c.items():
                    merged[k] = max(merged[k], v)
            g_counts.append(merged)
            g_lens.append(lens)
        vocab = {k: i for i, k in enumerate({k for c in g_counts for k in c})}
        out = {}
        for n in BLEU_ORDERS:
            def matrix(counts):  # sparse (rows, V) counts of n-grams of order n in the vocabulary
                rows, cols, vals = [], [], []
                for r, c in enumerate(counts):
                    for k, v in c.items():
                        if len(k) == n and k in vocab:
                            rows.append(r)
                            cols.append(vocab[k])
                            vals.append(v)
                return sp.csr_matrix((vals, (rows, cols)), shape=(len(counts), len(vocab)))

            A, B = matrix(h_counts), matrix(g_counts)
            top = int(max(A.max() if A.nnz else 0, B.max() if B.nnz else 0))
            corr = np.zeros((len(hyps), len(groups)))
            for k in range(1, top + 1):  # min(a, b) = sum_k [a >= k][b >= k]
                corr += ((A >= k).astype(np.float64) @ (B >= k).astype(np.float64).T).toarray()
            out[f"correct{n}"] = corr
        hl = np.asarray(h_len)[:, None, None]  # (U_h, 1, 1)
        width = max(len(x) for x in g_lens)
        gl = np.array([x + [10**6] * (width - len(x)) for x in g_lens])[None]  # (1, G, width)
        key = np.abs(hl - gl) * 10**7 + gl  # closest length, ties to the shorter one
        out["ref_len"] = np.take_along_axis(gl.repeat(len(hyps), 0), key.argmin(2)[..., None], 2)[..., 0]
        return out, np.asarray(h_len)

    def _rouge_pairs(self, hyps: list[str], refs: list[str]) -> np.ndarray:
        """(3, U_h, U_r) ROUGE-L P, R, F (×100) from LCS of stemmed tokens."""
        vocab: dict[str, int] = {}
        for t in hyps + refs:
            if t not in self._rouge_tokens:
                self._rouge_tokens[t] = self._rouge_tok.tokenize(t)
        toks = [[vocab.setdefault(w, len(vocab)) for w in self._rouge_tokens[t]] for t in hyps + refs]
        ht, rt = toks[:len(hyps)], toks[len(hyps):]
        lh = max([len(t) for t in ht] + [1])
        lr = max([len(t) for t in rt] + [1])
        A = np.array([t + [-1] * (lh - len(t)) for t in ht])  # (U_h, L_h), pad never matches
        B = np.array([t + [-2] * (lr - len(t)) for t in rt])  # (U_r, L_r)
        lcs = np.zeros((len(hyps), len(refs)), dtype=np.int32)
        chunk = max(1, int(4e6 // max(1, len(refs) * lr)))
        for s in range(0, len(hyps), chunk):
            a = A[s:s + chunk]
            prev = np.zeros((len(a), len(refs), lr + 1), dtype=np.int32)  # DP row over ref
            for i in range(lh):
                cur = np.zeros_like(prev)
                eq = a[:, i, None, None] == B[None, :, :]  # (c, U_r, L_r)
                for j in range(lr):
                    cur[..., j + 1] = np.where(eq[..., j], prev[..., j] + 1,
                                               np.maximum(prev[..., j + 1], cur[..., j]))
                prev = cur
            lcs[s:s + chunk] = prev[..., lr]
        nh = np.array([len(t) for t in ht], dtype=np.float64)[:, None]
        nr = np.array([len(t) for t in rt], dtype=np.float64)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            P = np.where(nh > 0, lcs / nh, 0.0) * (nr > 0)
            R = np.where(nr > 0, lcs / nr, 0.0) * (nh > 0)
            F = np.where(P + R > 0, 2 * P * R / (P + R), 0.0)
        return np.stack([P, R, F]) * 100

    # ------------------------------------------------------------------ public

    def pairwise(self, hyps: list[str], refs: list) -> PairTables:
        """Per-pair statistics of every distinct hypothesis × every trial's reference group.

        Parameters
        ----------
        hyps:
            (n,) decoded texts.
        refs:
            (n,) reference text or list of reference texts per hypothesis.
        """
        groups = as_reference_lists(refs)
        if len(hyps) != len(groups):
            raise ValueError(f"{len(hyps)} hypotheses but {len(groups)} reference groups")
        hyps = [str(h) for h in hyps]
        u_h = list(dict.fromkeys(hyps))
        u_g = list(dict.fromkeys(tuple(g) for g in groups))
        u_r = list(dict.fromkeys(r for g in u_g for r in g))
        hyp_of = np.array([{h: i for i, h in enumerate(u_h)}[h] for h in hyps], dtype=np.int64)
        g_index = {g: i for i, g in enumerate(u_g)}
        ref_of = np.array([g_index[tuple(g)] for g in groups], dtype=np.int64)
        r_index = {r: i for i, r in enumerate(u_r)}
        width = max(len(g) for g in u_g)
        members = np.array([[r_index[r] for r in g] + [-1] * (width - len(g)) for g in u_g])  # (G, w)
        valid = members >= 0

        corpus = [r for g in groups for r in g]  # idf: every reference of every trial
        bs = self._bertscore_pairs(u_h, u_r, corpus)  # (3, U_h, U_r)
        if self.baseline is not None:
            bs = (bs - self.baseline[:, None, None]) / (1 - self.baseline[:, None, None])
        bs_g = np.where(valid[None, None], bs[:, :, np.maximum(members, 0)], -np.inf).max(3) * 100

        rl = self._rouge_pairs(u_h, u_r)  # (3, U_h, U_r)
        rf = np.where(valid[None], rl[2][:, np.maximum(members, 0)], -np.inf)  # (U_h, G, w)
        best = np.take_along_axis(np.maximum(members, 0)[None].repeat(len(u_h), 0),
                                  rf.argmax(2)[..., None], 2)[..., 0]  # (U_h, G) first max F
        rows = np.arange(len(u_h))[:, None]
        tables = {"bertscore_p": bs_g[0], "bertscore_r": bs_g[1], "bertscore_f1": bs_g[2],
                  "rougeL_p": rl[0][rows, best], "rougeL_r": rl[1][rows, best],
                  "rougeL_f": rl[2][rows, best]}
        bleu, hl = self._bleu_pairs(u_h, [list(g) for g in u_g])
        tables.update(bleu)
        totals = np.stack([np.maximum(hl - n + 1, 0) for n in BLEU_ORDERS], 1)  # (U_h, 2)
        return PairTables(hyp_of, ref_of, tables, hl, totals)

    def score(self, hyps: list[str], refs: list) -> dict[str, float]:
        """Corpus metrics (×100) of ``hyps`` against ``refs`` (a str or list of str each)."""
        if not hyps:
            raise ValueError("nothing to score: no hypotheses")
        return self.pairwise(hyps, refs).metrics()


#: cosines closer than this to the truth's count as ties with it
TIE_TOLERANCE = 1e-9


def retrieval_metrics(pred: np.ndarray, candidates: np.ndarray,
                      true_index: np.ndarray | None = None) -> dict[str, float]:
    """Top-1, top-5 and 2-way identification (×100) by cosine, with chance levels.

    Parameters
    ----------
    pred:
        (n, d) predicted embeddings (e.g. from fMRI).
    candidates:
        (m, d) candidate embeddings, one per candidate (e.g. per test clip).
    true_index:
        (n,) row of ``candidates`` that is each prediction's truth (default ``arange(n)``).

    Ties cannot inflate a score: a candidate whose cosine equals the truth's (within
    :data:`TIE_TOLERANCE`; identical candidates always do) counts as ranked before or after
    the truth with equal chance, i.e. each score is its expectation under random
    tie-breaking. With m identical candidates top-1 is 100/m, top-5 100·min(5, m)/m and
    2-way 50: the chance levels, which are computed from the same m.
    """
    pred = np.asarray(pred, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.float64)
    true_index = np.arange(len(pred)) if true_index is None else np.asarray(true_index).reshape(-1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    S = unit(pred) @ unit(cand).T  # (n, m) cosine
    t = S[np.arange(len(S)), true_index][:, None]  # (n, 1)
    tied = np.abs(S - t) <= TIE_TOLERANCE
    better = ((S > t) & ~tied).sum(1)  # candidates surely ranked above the truth
    ties = tied.sum(1) - 1  # other candidates tied with it
    worse = len(cand) - 1 - better - ties
    m = cand.shape[0]

    def top(k: int) -> float:  # the truth's rank is uniform over better .. better + ties
        return float(np.mean(np.clip((k - better) / (ties + 1), 0.0, 1.0)) * 100)

    out = {"top1": top(1), "top5": top(5),
           "twoway": float(np.mean((worse + 0.5 * ties) / (m - 1)) * 100) if m > 1 else 50.0}
    out.update(top1_chance=100.0 / m, top5_chance=100.0 * min(5, m) / m, twoway_chance=50.0,
               n_candidates=int(m), n_distinct_candidates=int(len(np.unique(cand, axis=0))))
    return out
