"""Sentence embeddings with the embedded all-MiniLM-L6-v2 (the sentence-transformers recipe).

The recipe of ``sentence-transformers/all-MiniLM-L6-v2``, written with plain transformers:
token embeddings of the last layer, mean-pooled over real tokens (attention mask), then
L2-normalised, so the dot product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fmri2text.errors import UserError

#: all-MiniLM-L6-v2 was trained with sequences of at most 256 word pieces
MAX_SEQ_LENGTH = 256


@lru_cache(maxsize=2)
def _load(path: str):
    """Tokenizer and model of a local sentence-encoder folder (loaded once per process)."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError("not a transformers model folder (no config.json)", path=folder,
                        fix="pass a local folder holding config.json, tokenizer and weights")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    model.eval()
    return tokenizer, model


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings of a local BERT-like model.

    Parameters
    ----------
    path:
        Local model folder; ``None`` means the embedded all-MiniLM-L6-v2
        (:func:`fmri2text.models.zoo.minilm_path`).
    batch_size:
        Sentences per forward pass.
    max_length:
        Word pieces kept per sentence (longer ones are truncated).
    """

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 64,
                 max_length: int = MAX_SEQ_LENGTH):
        if path is None:
            from fmri2text.models.zoo import minilm_path

            path = minilm_path()
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)

    @property
    def dim(self) -> int:
        """Width of the embeddings (384 for MiniLM-L6)."""
        _, model = _load(str(self.path))
        return int(model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts``.

        Returns
        -------
        np.ndarray
            (n, d) float32, unit-norm rows, in the order of ``texts``. Each distinct text
            is run through the model once.
        """
        texts = [str(t) for t in texts]
        tokenizer, model = _load(str(self.path))
        d = int(model.config.hidden_size)
        # similar lengths per batch (less padding); ties by text, so the batches do not
        # follow the set's order, which changes with each process's string hashing
        unique = sorted(set(texts), key=lambda t: (len(t), t))
        out = np.zeros((len(unique), d), dtype=np.float32)
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start:start + self.batch_size]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            tokens = model(**enc).last_hidden_state  # (b, L, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (b, L, 1)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, d)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[start:start + len(batch)] = pooled.float().numpy()
        row = {t: i for i, t in enumerate(unique)}
        return out[[row[t] for t in texts]] if texts else np.zeros((0, d), dtype=np.float32)


def embed_sentences(texts: list[str], path: str | Path | None = None) -> np.ndarray:
    """(n, d) unit-norm sentence embeddings of ``texts`` with the model at ``path``."""
    return SentenceEmbedder(path).encode(texts)
