"""CTR peers on the same pairs: logistic regression on one-hot ids and side features, gradient-boosted
trees (LightGBM) and FuxiCTR's DeepFM, given the same information as adrank (content_features): ids,
profile, every genre, year, the user's and the ad's point-in-time click counts and the genres of the user's
history. A text-aware LightGBM also reads the pair's texts, as adrank renders them (text_features: TF-IDF
of the user text and the ad text, their cosine and a low-rank projection of each)."""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd
import polars as pl
import polars.selectors as cs
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

ID_COLUMNS = ("user_id", "ad_id")
AD_SIDE_COLUMNS = ("category",)
LOGREG_C = 0.5  # inverse L2 strength; ids are many and sparse
LIGHTGBM_PARAMS = {
    "n_estimators": 400,
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "verbose": -1,
}
EARLY_STOPPING_ROUNDS = 30
TFIDF_COMPONENTS = 32  # SVD components of each text's TF-IDF vector given to the text-aware LightGBM
TFIDF_PARAMS = {"sublinear_tf": True, "min_df": 2, "ngram_range": (1, 2)}
# FuxiCTR's DeepFM: its model_zoo defaults (embedding_dim 10, three ReLU layers of 64, Adam at 1e-3), with
# batches sized for ~70k pairs on a CPU; at most DEEPFM_EPOCHS epochs, stopped after DEEPFM_PATIENCE epochs
# without a better validation AUC - logloss (each of those also divides the learning rate by 10)
DEEPFM_PARAMS = {"embedding_dim": 10, "hidden_units": [64, 64, 64], "learning_rate": 1e-3, "net_dropout": 0.0}
DEEPFM_BATCH_SIZE = 256
DEEPFM_EPOCHS = 5
DEEPFM_PATIENCE = 2


def side_features(pairs: pl.DataFrame, users: pl.DataFrame, ads: pl.DataFrame) -> pd.DataFrame:
    """ids + every user profile column + ad category, one row per pair, as strings or numbers."""
    side_ads = ads.select("ad_id", *[c for c in AD_SIDE_COLUMNS if c in ads.columns])
    frame = pairs.select(*ID_COLUMNS).join(users, on="user_id", how="left", maintain_order="left")
    frame = frame.join(side_ads, on="ad_id", how="left", maintain_order="left")
    return frame.to_pandas()


def with_prior_counts(features: pd.DataFrame, pairs: pl.DataFrame) -> pd.DataFrame:
    """features + the user's and the ad's impressions, clicks and click rate before each pair (point-in-time,
    as build_pairs counts them for adrank's priors); a rate is missing without impressions."""
    counts = pairs.select(
        *[
            column
            for who in ("user", "ad")
            for column in (
                pl.col(f"{who}_prior_impressions"),
                pl.col(f"{who}_prior_clicks"),
                (pl.col(f"{who}_prior_clicks") / pl.col(f"{who}_prior_impressions").replace(0, None)).alias(
                    f"{who}_prior_ctr"
                ),
            )
        ]
    )
    return pd.concat([features.reset_index(drop=True), counts.to_pandas()], axis=1)


def content_features(
    pairs: pl.DataFrame, users: pl.DataFrame, ads: pl.DataFrame, with_shown: bool = False
) -> pd.DataFrame:
    """side_features + the ad's genres (multi-hot; the ads' `genres` list, else its category) and year, the
    user's and the ad's click counts before the pair (as adrank's priors), the genre counts of the ads in the
    user's history (history_ad_ids, as adrank's user text names them) and, with_shown (adrank reads the user's
    past impressions: data.shown_history_length > 0, its affinity term), how often the user was shown and
    clicked this ad and ads of its genres before (shown_ad_ids, shown_clicked): the information adrank's texts
    and priors carry, as of the same moment."""
    genres = ads["genres"] if "genres" in ads.columns else ads["category"].map_elements(lambda c: [c] if c else [])
    vocabulary = sorted({g for row in genres.to_list() for g in row or []})
    multi_hot = {
        ad: np.isin(vocabulary, row or []).astype(np.int16)
        for ad, row in zip(ads["ad_id"].to_list(), genres.to_list(), strict=True)
    }
    ad_genres = np.stack([multi_hot[a] for a in pairs["ad_id"].to_list()])
    history = np.stack(
        [sum((multi_hot[a] for a in row), np.zeros(len(vocabulary), np.int16)) for row in pairs["history_ad_ids"]]
    )
    columns = {f"genre_{g}": ad_genres[:, i] for i, g in enumerate(vocabulary)}
    columns |= {f"history_genre_{g}": history[:, i] for i, g in enumerate(vocabulary)}
    if with_shown:
        columns |= shown_features(pairs, multi_hot)
    if "year" in ads.columns:
        year = pairs.select("ad_id").join(ads.select("ad_id", "year"), on="ad_id", how="left", maintain_order="left")
        columns["year"] = year["year"].cast(pl.Float64)
    extra = pd.DataFrame({name: np.asarray(values) for name, values in columns.items()})
    return with_prior_counts(pd.concat([side_features(pairs, users, ads), extra], axis=1), pairs)


def shown_features(pairs: pl.DataFrame, multi_hot: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per pair, the user's past impressions (shown_ad_ids, shown_clicked) of this very ad and of ads sharing a
    genre with it, and their clicks: the ID and content side of what adrank's affinity term reads."""
    out = {
        name: np.zeros(pairs.height) for name in ("same_ad_shown", "same_ad_clicked", "genre_shown", "genre_clicked")
    }
    rows = zip(pairs["ad_id"].to_list(), pairs["shown_ad_ids"].to_list(), pairs["shown_clicked"].to_list(), strict=True)
    for i, (ad, shown, clicked) in enumerate(rows):
        for past, click in zip(shown or [], clicked or [], strict=True):
            same_genre = float(multi_hot[past] @ multi_hot[ad] > 0)
            out["same_ad_shown"][i] += past == ad
            out["same_ad_clicked"][i] += click and past == ad
            out["genre_shown"][i] += same_genre
            out["genre_clicked"][i] += click * same_genre
    return out


def text_features(splits: dict[str, pl.DataFrame], seed: int) -> dict[str, pd.DataFrame]:
    """Per split: the TF-IDF cosine of each pair's user text and ad text, both texts' TF-IDF projected on
    TFIDF_COMPONENTS SVD components, and the components' products (the user x ad interactions trees find
    hard). Vocabulary and projection are fitted on the training split's texts only."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    train = splits["train"]
    texts = pl.concat([train["user_text"], train["ad_text"]]).unique().sort().to_list()
    vectorizer = TfidfVectorizer(**TFIDF_PARAMS).fit(texts)
    components = min(TFIDF_COMPONENTS, len(vectorizer.vocabulary_) - 1, len(texts) - 1)  # SVD's rank bound
    svd = TruncatedSVD(components, random_state=seed).fit(vectorizer.transform(texts))
    out = {}
    for name, frame in splits.items():
        users, ads = (vectorizer.transform(frame[column].to_list()) for column in ("user_text", "ad_text"))
        user_svd, ad_svd = svd.transform(users), svd.transform(ads)
        columns = {"tfidf_cosine": np.asarray(users.multiply(ads).sum(axis=1)).ravel()}  # rows are unit length
        for i in range(components):
            columns |= {f"user_svd_{i}": user_svd[:, i], f"ad_svd_{i}": ad_svd[:, i]}
            columns[f"product_svd_{i}"] = user_svd[:, i] * ad_svd[:, i]
        out[name] = pd.DataFrame(columns)
    return out


def logistic_regression(train: pd.DataFrame, labels: np.ndarray, test: pd.DataFrame, seed: int) -> np.ndarray:
    """One-hot every column (numbers too: age becomes one indicator per value); unseen values are all-zero."""
    model = make_pipeline(
        OneHotEncoder(handle_unknown="ignore"),
        LogisticRegression(C=LOGREG_C, max_iter=2000, random_state=seed),
    )
    model.fit(train.astype(str), labels)
    return model.predict_proba(test.astype(str))[:, 1]


def lightgbm(
    train: pd.DataFrame,
    labels: np.ndarray,
    valid: pd.DataFrame,
    valid_labels: np.ndarray,
    test: pd.DataFrame,
    seed: int,
) -> np.ndarray:
    """Trees over ids and side features as categoricals, early-stopped on validation logloss."""
    import lightgbm as lgb

    frames = [train.copy(), valid.copy(), test.copy()]
    for column in train.columns:
        if not pd.api.types.is_numeric_dtype(train[column]) or column in ID_COLUMNS:
            categories = pd.Index(pd.concat([f[column] for f in frames]).astype(str).unique())
            for frame in frames:
                frame[column] = pd.Categorical(frame[column].astype(str), categories=categories)
    model = lgb.LGBMClassifier(random_state=seed, **LIGHTGBM_PARAMS)
    model.fit(
        frames[0],
        labels,
        eval_X=frames[1],
        eval_y=valid_labels,
        eval_metric="binary_logloss",
        callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
    )
    return model.predict_proba(frames[2])[:, 1]


def _as_text(frame: pd.DataFrame) -> pl.DataFrame:
    """Every column as text, missing values null; numbers via float so that 24 and 24.0 (an int column that
    pandas turned into floats because one row is missing) are the same category."""
    return pl.from_pandas(frame).with_columns(cs.numeric().cast(pl.Float64)).cast(pl.String)


def _bucketed(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """DeepFM embeds every column as a categorical: counts become half-steps of log2(1 + n), rates (*_ctr)
    steps of 0.05; missing stays missing."""
    out = frame.copy()
    for column in columns:
        values = out[column].astype(float)
        rate = column.endswith("_ctr")
        out[column] = (values * 20).round() / 20 if rate else (np.log2(1 + values.clip(lower=0)) * 2).round() / 2
    return out


def deepfm(
    train: pd.DataFrame,
    labels: np.ndarray,
    valid: pd.DataFrame,
    valid_labels: np.ndarray,
    test: pd.DataFrame,
    seed: int,
) -> np.ndarray:
    """FuxiCTR's DeepFM (a linear term, an FM and an MLP over the same embeddings) with every column as a
    categorical. Vocabularies come from train: a value unseen there, or missing, gets the out-of-vocabulary
    embedding. Early-stopped on validation AUC - logloss; the best epoch's weights predict test."""
    try:
        from fuxictr.preprocess import FeatureProcessor
        from fuxictr.pytorch.dataloaders.npz_dataloader import BatchCollator
        from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
        from fuxictr.pytorch.models import BaseModel
        from fuxictr.pytorch.torch_utils import seed_everything
    except ImportError as error:
        raise ImportError("the DeepFM baseline needs FuxiCTR: pip install fuxictr") from error
    from torch.utils.data import DataLoader

    class DeepFM(BaseModel):
        """FuxiCTR's model_zoo/DeepFM (not in the pip package) on the package's layers and training loop."""

        def __init__(self, feature_map, embedding_dim, hidden_units, learning_rate, net_dropout, **kwargs):
            super().__init__(feature_map, model_id="DeepFM", **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=hidden_units,
                dropout_rates=net_dropout,
            )
            self.compile("adam", "binary_crossentropy", learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(X)
            y_pred = self.fm(X, feature_emb) + self.mlp(feature_emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y_pred)}

    seed_everything(seed)
    counts = [c for c in train.columns if c.startswith(("user_prior_", "ad_prior_"))]  # with_prior_counts' columns
    train, valid, test = (_bucketed(frame, counts) for frame in (train, valid, test))
    columns = list(train.columns)
    with tempfile.TemporaryDirectory() as root:  # FeatureProcessor saves its vocabularies, BaseModel its best epoch
        processor = FeatureProcessor(
            feature_cols=[
                {
                    "name": columns,
                    "active": True,
                    "dtype": "str",
                    "type": "categorical",
                    "embedding_dim": DEEPFM_PARAMS["embedding_dim"],
                }
            ],
            label_col={"name": "label", "dtype": "float"},
            dataset_id="deepfm",
            data_root=root,
        )
        processor.fit(_as_text(train).lazy())
        feature_map = processor.feature_map

        def batches(frame: pd.DataFrame, y: np.ndarray, shuffle: bool) -> DataLoader:
            text = _as_text(frame)
            ids = processor.transform({column: text[column] for column in columns})
            rows = np.column_stack([ids[column] for column in columns] + [y])
            return DataLoader(rows, DEEPFM_BATCH_SIZE, shuffle=shuffle, collate_fn=BatchCollator(feature_map))

        model = DeepFM(
            feature_map,
            monitor={"AUC": 1, "logloss": -1},
            early_stop_patience=DEEPFM_PATIENCE,
            model_root=root,
            metrics=["logloss", "AUC"],
            verbose=0,
            **DEEPFM_PARAMS,
        )
        model.fit(batches(train, labels, True), DEEPFM_EPOCHS, batches(valid, valid_labels, False))
        return model.predict(batches(test, np.zeros(len(test)), False))
