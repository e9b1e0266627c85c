"""The semantic match: how close a user's text and an ad's text are in the pretrained encoder's own
embedding space, zero-shot: the cosine of their mean-pooled, normalised embeddings, which is what a
sentence-embedding model such as all-MiniLM-L6-v2 was trained to make meaningful (on a billion sentence
pairs). It is a term of the output layer (tasks/output_layer.py, weights fitted on validation), and for an
ad never shown before it is what the encoder knew before any click.

The encoder is the base model, frozen, saved beside the fine-tuned cross-encoder (MATCH_FOLDER): the
served model reads the match as it was fitted. The served model imports this module (tasks/ctr_pyfunc.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from tasks.model import embed_texts, quiet_transformers
from tasks.output_layer import MATCH_COLUMN

MATCH_FOLDER = "match_encoder"  # inside a saved model: the frozen base encoder


@dataclass
class MatchEncoder:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    batch_size: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length mean-pooled embeddings, shape (texts, hidden); identical texts encoded once."""
        vectors = embed_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def match(self, user_texts: Sequence[str], ad_texts: Sequence[str]) -> np.ndarray:
        """The cosine of each (user text, ad text) pair, shape (pairs,), in [-1, 1]."""
        if len(user_texts) == 0:
            return np.empty(0, dtype=np.float32)
        return np.einsum("ij,ij->i", self.embed(user_texts), self.embed(ad_texts))


def with_match(pairs: pl.DataFrame, encoder: MatchEncoder | None) -> pl.DataFrame:
    """The pairs with MATCH_COLUMN from their user_text and ad_text; as they are without an encoder."""
    if encoder is None:
        return pairs
    match = encoder.match(pairs["user_text"].to_list(), pairs["ad_text"].to_list())
    return pairs.with_columns(pl.Series(MATCH_COLUMN, match, dtype=pl.Float64))


def load_match_encoder(path: str | Path, device: torch.device, max_length: int, batch_size: int) -> MatchEncoder:
    """The encoder at path (a base model folder, or a saved model's MATCH_FOLDER), frozen, in eval mode."""
    with quiet_transformers():
        model = AutoModel.from_pretrained(str(path), use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.requires_grad_(False)
    return MatchEncoder(model, tokenizer, max_length, batch_size)


def saved_match_encoder(
    model_dir: str | Path, device: torch.device, max_length: int, batch_size: int
) -> MatchEncoder | None:
    """The match encoder saved with a model; None for a model without one (no match term)."""
    folder = Path(model_dir) / MATCH_FOLDER
    return load_match_encoder(folder, device, max_length, batch_size) if folder.is_dir() else None


def save_match_encoder(encoder: MatchEncoder, model_dir: str | Path) -> None:
    """Save the (frozen, pretrained) encoder and its tokenizer into model_dir/MATCH_FOLDER, in safetensors."""
    folder = Path(model_dir) / MATCH_FOLDER
    with quiet_transformers():
        encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
