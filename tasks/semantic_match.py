"""The semantic match: how close a user's text and an ad's text are in the pretrained encoder's own
embedding space, zero-shot: the cosine of their mean-pooled, normalised embeddings, which is what a
sentence-embedding model such as all-MiniLM-L6-v2 was trained to make meaningful (on a billion sentence
pairs). It blends the whole user text's cosine with its best item's (model.match_item_share): one search or
clicked title that names the ad's product says more than the mean of a text that also holds age, city and
other interests. It is a term of the output layer (tasks/output_layer.py, weights fitted on validation), and for an
ad never shown before it is the text's whole say.

Fine-tuning first tunes this encoder on the training clicks (tune_match_encoder: the match as served, each
clicked ad against the other ads of its batch and the ads its user passed over; a bi-encoder encodes each text
once, far cheaper per pair than the cross-encoder), then freezes it; it is saved beside the fine-tuned
cross-encoder (MATCH_FOLDER): the served model reads the match as it was fitted. The served model imports
this module (tasks/ctr_pyfunc.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from tasks.affinity import with_similar
from tasks.model import embed_texts, mean_pooled, quiet_transformers
from tasks.output_layer import MATCH_COLUMN

MATCH_FOLDER = "match_encoder"  # inside a saved model: the match's encoder, as fitted
MATCH_FILE = "match.json"  # in MATCH_FOLDER: how the match reads the encoder (item_share)
# where a user text splits into items: between history items (tasks/pairs.py's " | "), a profile's fields
# (", " before the next "column: ", so that a comma inside a value such as "Shawshank Redemption, The" does not
# split it), a column's list ("; ", as searches) and sentences (". ", the template's "Recently clicked: ")
ITEM_SEPARATORS = re.compile(r"\s*(?:\||;|\.\s|,\s(?=[A-Za-z_]\w*:\s))\s*")
PAIR_BLOCK = 4096  # pairs whose items are compared with their ads at once (bounds the gathered embeddings)
# in the clicks the match tunes on (optional): a list of {ad_id, ad_text}, ads the click's user was shown that day
# and did not click (tasks/train.py match_clicks)
PASSED_OVER = "passed_over"


def text_items(text: str) -> list[str]:
    """A user text's items (ITEM_SEPARATORS), empty pieces dropped; the text itself when it has none."""
    return [item for item in ITEM_SEPARATORS.split(text) if item] or [text]


@dataclass
class UserMatch:
    """The users' side of the match: each user text's unit embedding and its items' (rows of one array)."""

    whole: np.ndarray  # (users, hidden)
    items: np.ndarray  # (items, hidden), each user's items in a run: user i's are items[starts[i]:starts[i + 1]]
    starts: np.ndarray  # (users + 1,)


@dataclass
class MatchEncoder:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    batch_size: int
    item_share: float = 0.0  # the best item's share of the match (0: the whole text's cosine alone)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length mean-pooled embeddings, shape (texts, hidden); identical texts encoded once."""
        vectors = embed_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def users(self, user_texts: Sequence[str]) -> UserMatch:
        """The user texts' unit embeddings, whole and item by item (identical texts and items encoded once)."""
        flat, starts = self.items(user_texts)
        return UserMatch(self.embed(user_texts), self.embed(flat), starts)

    def items(self, user_texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Every user text's items in one list, each user's in a run, and where each run starts (users + 1,);
        none without an item share."""
        items = [text_items(text) for text in user_texts] if self.item_share else [[] for _ in user_texts]
        starts = np.concatenate([[0], np.cumsum([len(i) for i in items])]).astype(np.int64)
        return [item for user in items for item in user], starts

    def scores(self, users: UserMatch, ads: np.ndarray) -> np.ndarray:
        """The match of every user with every ad (ads: their unit embeddings), shape (users, ads)."""
        device = next(self.model.parameters()).device
        whole, items, ads_ = (torch.from_numpy(a).to(device) for a in (users.whole, users.items, ads))
        with torch.no_grad():
            return self.blend(whole, items, users.starts, ads_).cpu().numpy()

    def blend(
        self, whole: torch.Tensor, items: torch.Tensor | None, starts: np.ndarray, ads: torch.Tensor
    ) -> torch.Tensor:
        """The match of every user with every ad from unit embeddings, (users, ads): (1 - item_share) x the
        whole text's cosine + item_share x its best item's (items: None or empty without a share).
        Differentiable: tune_match_encoder trains what is served."""
        scores = whole @ ads.T
        if not self.item_share:
            return scores
        per_item = items @ ads.T  # (items, ads)
        owner = torch.from_numpy(np.repeat(np.arange(len(starts) - 1), np.diff(starts))).to(per_item.device)
        best = per_item.new_full(scores.shape, -torch.inf).scatter_reduce(
            0, owner[:, None].expand_as(per_item), per_item, reduce="amax"
        )
        return self.mixed(scores, best)

    def pair_scores(self, users: UserMatch, ads: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The match of each pair (user row, ad row), shape (pairs,)."""
        whole = np.einsum("ij,ij->i", users.whole[rows], ads[cols])
        if not self.item_share:
            return whole
        best = np.empty(len(rows), dtype=whole.dtype)
        counts = np.diff(users.starts)
        for start in range(0, len(rows), PAIR_BLOCK):
            pair_rows, pair_cols = rows[start : start + PAIR_BLOCK], cols[start : start + PAIR_BLOCK]
            n = counts[pair_rows]
            pair = np.repeat(np.arange(len(pair_rows)), n)  # each item's pair, pairs' items in a run
            item = users.starts[pair_rows][pair] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            dots = np.einsum("ij,ij->i", users.items[item], ads[pair_cols[pair]])
            best[start : start + PAIR_BLOCK] = np.maximum.reduceat(dots, np.cumsum(n) - n)
        return self.mixed(whole, best)

    def mixed(self, whole, best):
        """The match from the whole text's cosine and the best item's (numpy arrays or torch tensors alike)."""
        return (1 - self.item_share) * whole + self.item_share * best

    def match(self, user_texts: Sequence[str], ad_texts: Sequence[str]) -> np.ndarray:
        """The match of each (user text, ad text) pair, shape (pairs,), in [-1, 1]."""
        if len(user_texts) == 0:
            return np.empty(0, dtype=np.float32)
        user_index, ad_index = (
            np.unique(np.asarray(t, dtype=object).astype(str), return_inverse=True) for t in (user_texts, ad_texts)
        )
        users, ads = self.users(user_index[0].tolist()), self.embed(ad_index[0].tolist())
        return self.pair_scores(users, ads, user_index[1].ravel(), ad_index[1].ravel())


@dataclass(frozen=True)
class MatchTuning:
    """How tune_match_encoder trains (settings.training.match_*)."""

    epochs: int
    batch_size: int  # clicks per step: each one's negatives are the other clicks' ads and the ads passed over
    learning_rate: float
    scale: float  # match x scale are the softmax's logits: a cosine spans [-1, 1], too flat a softmax alone
    warmup_ratio: float
    seed: int


def tune_match_encoder(encoder: MatchEncoder, clicks: pl.DataFrame, tuning: MatchTuning) -> list[float]:
    """Fine-tune the encoder on clicked (user_text, ad_text) pairs, then freeze it again; returns each step's
    loss. Each click's user must pick its ad among the batch's ads (softmax over scale x the match as served,
    MatchEncoder.blend: the whole text's cosine blended with the best item's; the multiple-negatives ranking
    loss of sentence-transformers): the within-user choice rerank makes. The negatives are the other clicks'
    ads and, where clicks carry PASSED_OVER, the ads their users were shown and did not click: the same
    topics, where the other clicks' ads are mostly other topics. An ad the row's user clicked in the batch, or
    another click of that user, is masked, not a negative."""
    if tuning.epochs == 0 or clicks.height < 2:
        return []
    model, tokenizer = encoder.model, encoder.tokenizer
    device = next(model.parameters()).device
    users, ads = clicks["user_text"].to_list(), clicks["ad_text"].to_list()
    # who and what: the ids (the texts where pairs carry none)
    user_ids = clicks["user_id" if "user_id" in clicks.columns else "user_text"].to_numpy().astype(str)
    ad_ids = clicks["ad_id" if "ad_id" in clicks.columns else "ad_text"].to_numpy().astype(str)
    passed_over = clicks[PASSED_OVER].to_list() if PASSED_OVER in clicks.columns else [None] * clicks.height
    steps = math.ceil(clicks.height / tuning.batch_size) * tuning.epochs
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tuning.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(tuning.warmup_ratio * steps), steps)
    generator, losses = torch.Generator().manual_seed(tuning.seed), []

    def embed(texts: list[str]) -> torch.Tensor:  # (texts, hidden), unit length, with gradients; each once
        unique, rows = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
        batch = tokenizer(
            unique.tolist(), padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
        ).to(device)
        vectors = mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])
        return torch.nn.functional.normalize(vectors, dim=-1)[torch.from_numpy(rows.ravel()).to(device)]

    for _ in range(tuning.epochs):
        order = torch.randperm(clicks.height, generator=generator).numpy()
        for start in range(0, len(order), tuning.batch_size):
            index = order[start : start + tuning.batch_size]
            if len(index) < 2:  # a lone click has no negative
                continue
            passed = [ad for i in index for ad in passed_over[i] or []]
            candidates = np.concatenate([ad_ids[index], [ad["ad_id"] for ad in passed]]).astype(str)
            batch_users = [users[i] for i in index]
            item_texts, starts = encoder.items(batch_users)
            match = encoder.blend(
                embed(batch_users),
                embed(item_texts) if item_texts else None,
                starts,
                embed([ads[i] for i in index] + [ad["ad_text"] for ad in passed]),
            )
            same_user = user_ids[index, None] == user_ids[None, index]  # (clicks, clicks)
            # every ad the row's user clicked in the batch (its own, and so its user's other clicks) but its own
            masked = (same_user.astype(np.int64) @ (ad_ids[index, None] == candidates[None, :])) > 0
            np.fill_diagonal(masked, False)
            logits = (tuning.scale * match).masked_fill(torch.from_numpy(masked).to(device), -torch.inf)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(index), device=device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.requires_grad_(False)
    model.eval()
    return losses


def with_match(pairs: pl.DataFrame, encoder: MatchEncoder | None) -> pl.DataFrame:
    """The pairs with MATCH_COLUMN from their user_text and ad_text; as they are without an encoder."""
    if encoder is None:
        return pairs
    match = encoder.match(pairs["user_text"].to_list(), pairs["ad_text"].to_list())
    return pairs.with_columns(pl.Series(MATCH_COLUMN, match, dtype=pl.Float64))


def with_served_match(
    pairs: pl.DataFrame, encoder: MatchEncoder | None, bandwidth: float | None = None, ads: pl.DataFrame | None = None
) -> pl.DataFrame:
    """The pairs with what the output layer reads of the encoder: MATCH_COLUMN and, given the affinity term's
    bandwidth, its similar counts (tasks/affinity.py; ads: the shown ads' texts where the pairs name them by id);
    as they are without an encoder."""
    matched = with_match(pairs, encoder)
    return matched if encoder is None or bandwidth is None else with_similar(matched, encoder, bandwidth, ads)


def load_match_encoder(
    path: str | Path, device: torch.device, max_length: int, batch_size: int, item_share: float = 0.0
) -> MatchEncoder:
    """The encoder at path (a base model folder, or a saved model's MATCH_FOLDER), frozen, in eval mode;
    item_share: model.match_item_share, or a saved model's own (MATCH_FILE)."""
    with quiet_transformers():
        model = AutoModel.from_pretrained(str(path), use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.requires_grad_(False)
    return MatchEncoder(model, tokenizer, max_length, batch_size, item_share)


def saved_match_encoder(
    model_dir: str | Path, device: torch.device, max_length: int, batch_size: int
) -> MatchEncoder | None:
    """The match encoder saved with a model, reading the match as it was fitted; None for a model without one
    (no match term). Versions saved before the item share read the whole text alone."""
    folder = Path(model_dir) / MATCH_FOLDER
    if not folder.is_dir():
        return None
    saved = json.loads((folder / MATCH_FILE).read_text()) if (folder / MATCH_FILE).is_file() else {}
    return load_match_encoder(folder, device, max_length, batch_size, saved.get("item_share", 0.0))


def save_match_encoder(encoder: MatchEncoder, model_dir: str | Path) -> None:
    """Save the (frozen) encoder and its tokenizer into model_dir/MATCH_FOLDER, in safetensors."""
    folder = Path(model_dir) / MATCH_FOLDER
    with quiet_transformers():
        encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
    (folder / MATCH_FILE).write_text(json.dumps({"item_share": encoder.item_share}))
