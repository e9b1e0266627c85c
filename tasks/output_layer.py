"""The output layer: the cross-encoder's logit and the pair's click priors -> pCTR, fitted on validation.

    pCTR = sigmoid(slope * logit + intercept + ad_weight * ad_log_odds + user_weight * user_log_odds
                   + match_weight * semantic_match + affinity_weight * lift + exposure_weight * exposure
                   + evidence_weight * lift * exposure)

ad_log_odds and user_log_odds are the ad's and the user's click rates before the request (their prior
counts, as of the start of the day the nightly job ranks), shrunk towards the global rate. A cold ad
(never shown before the request) has no prior, and its text was never trained on: it gets weights of its
own, unseen_*, fitted on the validation pairs of cold ads, or, when those hold too few clicks, on the pairs of
the least-shown ads or on every pair without the ad prior, whichever predicts the training split's cold ads better
(cold_fit_rows).
Optionally, new users (no impression before the request: no user prior, an empty history) get weights of
their own too, new_user_*, fitted on their pairs of warm ads: the text's weight for users with a history is
then set by those users, not by the (often many more) users without one.
semantic_match is the cosine of the user text (blended with its best item's) and the ad text in the
pretrained encoder's embedding space, tuned on the training clicks (tasks/semantic_match.py), in the pairs'
MATCH_COLUMN.
lift and exposure are the affinity terms (affinity_terms): from the user's past impressions of ads like this one
(SIMILAR_COLUMNS, tasks/affinity.py), the log-odds of their click rate on those (shrunk towards the user's own
rate) minus the user's, and log(1 + how many).

The served model imports this module (tasks/ctr_pyfunc.py): numpy, no adrank config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.json"
# the weights of each set (warm ads; unseen_*: cold ads; new_user_*: new users' pairs of warm ads)
WEIGHTS = (
    "slope",
    "intercept",
    "ad_weight",
    "user_weight",
    "match_weight",
    "affinity_weight",
    "exposure_weight",
    "evidence_weight",
)
AFFINITY_WEIGHTS = ("affinity_weight", "exposure_weight", "evidence_weight")  # of affinity_terms' columns
# a weakly informative prior on the fit's standardised weights (a Gaussian of variance C): negligible on a few
# thousand validation pairs, it keeps a fit on a few dozen (a small market's validation) from wild weights
OUTPUT_LAYER_PRIOR_VARIANCE = 6.25
# keeps log-odds finite for ads (or a training split) with all or no clicks
PROBABILITY_BOUNDS = (1e-4, 1 - 1e-4)
USER_PRIOR_COLUMNS = ("user_prior_impressions", "user_prior_clicks")
AD_PRIOR_COLUMNS = ("ad_prior_impressions", "ad_prior_clicks")
PRIOR_COLUMNS = (*USER_PRIOR_COLUMNS, *AD_PRIOR_COLUMNS)
MATCH_COLUMN = "semantic_match"
# the user's past impressions weighted by their ads' likeness to the pair's ad (tasks/affinity.py)
SIMILAR_COLUMNS = ("similar_impressions", "similar_clicks")
# (clicks, impressions) strictly before each request, one entry per pair
Counts = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class PairPriors:
    """What the output layer reads of each pair besides its logit; None where the caller does not know it
    (no user counts: users with no impressions yet; no ad counts: every ad is cold)."""

    n: int
    user_counts: Counts | None = None
    ad_counts: Counts | None = None
    ad_ids: Sequence[str | None] | None = None  # read only by versions with a frozen ad table (legacy)
    match: np.ndarray | None = None  # (n,) the semantic match; None: not computed (a model without one)
    similar: Counts | None = None  # the user's similar clicks and impressions; None: not computed

    @classmethod
    def of(cls, frame) -> PairPriors:
        """The priors of a polars or pandas frame's rows: USER_PRIOR_COLUMNS, AD_PRIOR_COLUMNS, ad_id,
        MATCH_COLUMN and SIMILAR_COLUMNS, each optional; a row with a null count counts as (0, 0): no impressions
        known."""
        match = None
        if MATCH_COLUMN in frame.columns:
            match = np.array(frame[MATCH_COLUMN], dtype=np.float64)
            if not np.isfinite(match).all():
                rows = np.flatnonzero(~np.isfinite(match))[:10].tolist()
                raise ValueError(f"{MATCH_COLUMN} is null or not a number in rows {rows}")
        return cls(
            len(frame),
            _counts(frame, USER_PRIOR_COLUMNS, "user prior"),
            _counts(frame, AD_PRIOR_COLUMNS, "ad prior"),
            [None if a is None or a != a else str(a) for a in frame["ad_id"]] if "ad_id" in frame.columns else None,
            match,
            _counts(frame, SIMILAR_COLUMNS, "affinity"),
        )

    def take(self, rows: np.ndarray) -> PairPriors:
        """The priors of a subset of the pairs (an index or boolean mask)."""
        pick = lambda counts: None if counts is None else (counts[0][rows], counts[1][rows])  # noqa: E731
        ids = None if self.ad_ids is None else np.asarray(self.ad_ids, dtype=object)[rows].tolist()
        match = None if self.match is None else self.match[rows]
        n = len(np.arange(self.n)[rows])
        return PairPriors(n, pick(self.user_counts), pick(self.ad_counts), ids, match, pick(self.similar))


def _counts(frame, columns: tuple[str, str], name: str) -> Counts | None:
    present = [c for c in columns if c in frame.columns]
    if not present:
        return None
    if len(present) < len(columns):
        raise ValueError(f"the {name} needs both {columns}; only {present} given")
    impressions, clicks = (np.array(frame[c], dtype=np.float64) for c in columns)  # copies: nulls are set below
    unknown = ~(np.isfinite(impressions) & np.isfinite(clicks))
    impressions[unknown], clicks[unknown] = 0.0, 0.0
    return clicks, impressions


@dataclass(frozen=True)
class Calibration:
    """The output layer (identity by default); see the module docstring."""

    slope: float = 1.0
    intercept: float = 0.0
    ad_weight: float = 0.0
    ad_prior_strength: float = 1.0  # pseudo-impressions at the global rate added to each ad's counts
    user_weight: float = 0.0
    user_prior_strength: float = 1.0
    global_log_odds: float = 0.0
    match_weight: float = 0.0  # of the semantic match (0: a layer without it)
    # of the affinity terms (AFFINITY_WEIGHTS; 0: a layer without them), and how they are read
    affinity_weight: float = 0.0
    exposure_weight: float = 0.0
    evidence_weight: float = 0.0
    affinity_bandwidth: float = 0.1  # the kernel's (tasks/affinity.py), as the similar counts were fitted with
    affinity_strength: float = 1.0  # impressions' worth of the user's own rate in their similar ads' rate
    # weights for cold ads; None: the ones above, with the global rate as the ad prior
    unseen_slope: float | None = None
    unseen_intercept: float | None = None
    unseen_user_weight: float | None = None
    unseen_match_weight: float | None = None
    unseen_affinity_weight: float | None = None
    unseen_exposure_weight: float | None = None
    unseen_evidence_weight: float | None = None
    cold_fit: str = ""  # which validation pairs the unseen weights were fitted on, for people
    # weights for new users' pairs of warm ads (no user prior: its weight would be the intercept's); None: the
    # ones above
    new_user_slope: float | None = None
    new_user_intercept: float | None = None
    new_user_ad_weight: float | None = None
    new_user_match_weight: float | None = None
    new_user_fit: str = ""  # which validation pairs the new-user weights were fitted on, for people
    # the mean validation logit: explain shows the text term around it (a logit that barely spreads gets a
    # large slope, and slope x logit alone would be a large number that the intercept cancels)
    reference_logit: float = 0.0
    # versions registered before point-in-time ad counts carry a frozen table of the training split's ad
    # log-odds instead: an ad is cold when it is not in the table
    ad_log_odds: dict[str, float] = field(default_factory=dict)
    default_ad_log_odds: float = 0.0

    def is_cold(self, priors: PairPriors) -> np.ndarray:
        """Whether each pair's ad is cold (no impression before the request), shape (n,)."""
        if self.ad_log_odds:
            ids = priors.ad_ids or [None] * priors.n
            return np.array([a is None or a not in self.ad_log_odds for a in ids], dtype=bool)
        if priors.ad_counts is None:
            return np.ones(priors.n, dtype=bool)
        return priors.ad_counts[1] <= 0

    def ad_prior(self, priors: PairPriors) -> np.ndarray:
        """Each pair's ad log-odds, shape (n,): the global rate's for cold ads."""
        if self.ad_log_odds:
            ids = priors.ad_ids or [None] * priors.n
            return np.array([self.ad_log_odds.get(a, self.default_ad_log_odds) for a in ids], dtype=np.float64)
        return self._shrunk(priors.ad_counts, self.ad_prior_strength, priors.n)

    def user_prior(self, priors: PairPriors) -> np.ndarray:
        """Each pair's user log-odds, shape (n,); no counts means users with no impressions yet."""
        return self._shrunk(priors.user_counts, self.user_prior_strength, priors.n)

    def _shrunk(self, counts: Counts | None, strength: float, n: int) -> np.ndarray:
        if counts is None:
            return np.full(n, self.global_log_odds)
        clicks, impressions = counts
        rate = 1.0 / (1.0 + np.exp(-self.global_log_odds))
        return probability_log_odds((clicks + strength * rate) / (impressions + strength))

    def is_new_user(self, priors: PairPriors) -> np.ndarray:
        """Whether each pair's user is new (no impression before the request), shape (n,)."""
        if priors.user_counts is None:
            return np.ones(priors.n, dtype=bool)
        return priors.user_counts[1] <= 0

    def weight_sets(self, priors: PairPriors) -> np.ndarray:
        """Per pair, the prefix of the weight set that applies to it: "unseen_" for cold ads, "new_user_" for
        new users' pairs of warm ads, "" (the warm weights) else; a set the layer lacks never applies."""
        sets = np.full(priors.n, "", dtype=object)
        # unseen_ second: a new user's cold ad is a cold ad
        for prefix, rows in (("new_user_", self.is_new_user), ("unseen_", self.is_cold)):
            if getattr(self, f"{prefix}slope") is not None:
                sets[rows(priors)] = prefix
        return sets

    def weights(self, priors: PairPriors) -> dict[str, np.ndarray]:
        """Per pair, each weight (WEIGHTS) of the set that applies to it (weight_sets); a weight a set lacks is 0."""
        sets = self.weight_sets(priors)
        weights = {name: np.full(priors.n, float(getattr(self, name))) for name in WEIGHTS}
        for prefix in ("new_user_", "unseen_"):
            picked = sets == prefix
            for name, values in weights.items():
                values[picked] = getattr(self, f"{prefix}{name}", None) or 0.0
        return weights

    def terms(self, priors: PairPriors) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per pair: the logit's slope, the offset (intercept + ad prior term), the user prior's weight and
        the semantic match's weight."""
        weights = self.weights(priors)
        offset = weights["intercept"] + weights["ad_weight"] * self.ad_prior(priors)
        return weights["slope"], offset, weights["user_weight"], weights["match_weight"]

    def for_users_with_history(self) -> Calibration:
        """This layer as it applies to users with impressions before the request (the users rerank ranks):
        without the new-user weights, so that per-ad terms computed without user counts are theirs."""
        return replace(
            self, new_user_slope=None, new_user_intercept=None, new_user_ad_weight=None, new_user_match_weight=None
        )

    @property
    def uses_match(self) -> bool:
        return bool(self.match_weight or self.unseen_match_weight or self.new_user_match_weight)

    @property
    def uses_affinity(self) -> bool:
        return any(getattr(self, f"{prefix}{name}") for prefix in ("", "unseen_") for name in AFFINITY_WEIGHTS)

    def affinity_terms(self, priors: PairPriors) -> np.ndarray:
        """Per pair, lift, exposure and their product, shape (n, 3): lift is the log-odds of the user's click rate on
        similar ads, (similar clicks + affinity_strength x the user's rate) / (similar impressions +
        affinity_strength), minus the user's own (the user prior's: 0 for a user never shown a similar ad);
        exposure is log(1 + similar impressions). An error where they were not computed."""
        if priors.similar is None:
            raise ValueError(
                f"this output layer weighs the affinity terms: the pairs need the columns {SIMILAR_COLUMNS} "
                "(tasks/affinity.py, from each pair's past impressions and the model's match encoder)"
            )
        clicks, shown = priors.similar
        user = self.user_prior(priors)
        rate = (clicks + self.affinity_strength / (1.0 + np.exp(-user))) / (shown + self.affinity_strength)
        lift, exposure = probability_log_odds(rate) - user, np.log1p(shown)
        return np.column_stack([lift, exposure, lift * exposure])

    def affinity(self, priors: PairPriors, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Each pair's affinity log-odds, shape (n,): its terms by the weights of its set (0 without any)."""
        if not self.uses_affinity:
            return np.zeros(priors.n)
        weights = weights or self.weights(priors)
        return (self.affinity_terms(priors) * np.column_stack([weights[w] for w in AFFINITY_WEIGHTS])).sum(axis=1)

    @property
    def uses_logit(self) -> bool:
        """False for a layer fitted without the logit (fine-tuning kept step 0): the logit changes nothing."""
        return bool(self.slope or self.unseen_slope or self.new_user_slope)

    def log_odds(self, logits: np.ndarray, priors: PairPriors | None = None) -> np.ndarray:
        priors = priors or PairPriors(len(logits))
        slope, offset, user_weight, match_weight = self.terms(priors)
        z = slope * logits.astype(np.float64) + offset
        if self.user_weight or self.unseen_user_weight:
            z += user_weight * self.user_prior(priors)
        if self.uses_match:
            z += match_weight * self.match(priors)
        return z + self.affinity(priors)

    def match(self, priors: PairPriors) -> np.ndarray:
        """Each pair's semantic match, shape (n,); an error where this layer reads it and it was not computed."""
        if priors.match is None:
            raise ValueError(
                f"this output layer weighs the semantic match: the pairs need the column {MATCH_COLUMN} "
                "(tasks/semantic_match.py, from the encoder saved with the model)"
            )
        return priors.match

    def contributions(self, logit: float, priors: PairPriors) -> dict[str, float]:
        """One pair's log-odds, term by term: text (slope x the logit's distance from reference_logit), semantic
        match, affinity (the user's past response to similar ads), intercept (with slope x reference_logit), ad
        prior, user prior; their sum is log_odds() of the pair."""
        weights = self.weights(priors)
        w = {name: float(values[0]) for name, values in weights.items()}
        return {
            "text": w["slope"] * (float(logit) - self.reference_logit),
            "semantic_match": w["match_weight"] * float(self.match(priors)[0]) if self.uses_match else 0.0,
            "affinity": float(self.affinity(priors, weights)[0]),
            "intercept": w["intercept"] + w["slope"] * self.reference_logit,
            "ad_prior": w["ad_weight"] * float(self.ad_prior(priors)[0]),
            "user_prior": w["user_weight"] * float(self.user_prior(priors)[0]),
        }

    def apply(self, logits: np.ndarray, priors: PairPriors | None = None) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.log_odds(logits, priors)))


def probability_log_odds(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with p kept inside PROBABILITY_BOUNDS so that all-or-no clicks stay finite."""
    p = np.clip(p, *PROBABILITY_BOUNDS)
    return np.log(p / (1 - p))


def fit_calibration(
    logits: np.ndarray | None,
    labels: np.ndarray,
    priors: PairPriors | None = None,
    template: Calibration | None = None,
    with_ad_prior: bool = False,
    with_user_prior: bool = False,
    min_cold_clicks: int = 100,
    with_match: bool = False,
    with_new_user_weights: bool = False,
    cold_reference: tuple[PairPriors, np.ndarray] | None = None,
    with_affinity: bool = False,
) -> Calibration:
    """Fit the output layer on held-out pairs (validation), never on training data.

    Platt scaling (slope, intercept) alone (no template), or with the weights of the priors named, using the
    template's prior strengths and global rate, of the semantic match (with_match: priors.match) and of the
    affinity terms (with_affinity: priors.similar, read with the template's affinity_strength); the
    mean logit is kept as reference_logit (explain centres the text term on it). logits None: no logit term
    (slope 0).
    With the ad prior, the weights apply to warm ads, and cold ads get their own weights fitted without it
    on cold_fit_rows (cold pairs with at least min_cold_clicks clicks; else the least-shown ads' pairs or every
    pair, chosen on cold_reference: the training split's pairs of cold ads, their priors and labels).
    with_new_user_weights: new users' pairs of warm ads get weights of their own (fitted without the user
    prior, a constant for them) when they hold min_cold_clicks clicks; the warm weights are then fitted on the
    other users' pairs alone.
    """
    if labels.min() == labels.max():  # nothing to fit: the logit as it is, or without text the rate itself
        return _one_class(labels, logits, template)
    text = None if logits is None else np.asarray(logits, dtype=np.float64)
    reference = {} if text is None else {"reference_logit": float(text.mean())}
    if template is None:
        return Calibration(**logistic_fit(labels, text=text), **reference)
    template = replace(template, **reference)
    priors = priors or PairPriors(len(labels))
    user = template.user_prior(priors) if with_user_prior else None
    match = template.match(priors) if with_match else None
    affinity = template.affinity_terms(priors) if with_affinity else None
    ad = template.ad_prior(priors) if with_ad_prior else None

    def fit(rows: np.ndarray, with_ad: bool = True, with_user: bool = True) -> dict[str, float]:
        return logistic_fit(
            labels[rows],
            text=_rows(text, rows),
            ad=_rows(ad, rows) if with_ad else None,
            user=_rows(user, rows) if with_user else None,
            match=_rows(match, rows),
            affinity=_rows(affinity, rows) if with_user else None,  # a new user's are 0: never shown an ad
        )

    everything = logistic_fit(labels, text=text, user=user, match=match, affinity=affinity)
    warm = ~template.is_cold(priors) if with_ad_prior else np.ones(len(labels), dtype=bool)
    new_user, described_new = {}, ""
    if with_new_user_weights:
        new_users = warm & template.is_new_user(priors)
        clicks, known = int(labels[new_users].sum()), warm & ~new_users
        if clicks >= min_cold_clicks and _both_classes(labels[new_users]) and _both_classes(labels[known]):
            new_user = {f"new_user_{k}": v for k, v in fit(new_users, with_user=False).items()}
            warm, described_new = known, f"{int(new_users.sum())} validation pairs of new users ({clicks} clicks)"
        else:
            described_new = f"none: new users' pairs hold {clicks} clicks (at least {min_cold_clicks} wanted)"
    no_ad_weight = {"ad_weight": 0.0} if with_ad_prior else {}
    seen = fit(warm) if _both_classes(labels[warm]) else everything | no_ad_weight
    fitted = replace(template, **seen, **new_user, new_user_fit=described_new)
    if not with_ad_prior:
        return fitted
    reference = None
    if cold_reference is not None:
        reference_priors, reference_labels = cold_reference
        reference = (template.user_prior(reference_priors) if with_user_prior else None, reference_labels)
    rows, described = cold_fit_rows(priors, labels, min_cold_clicks, user, reference)
    unseen = everything if rows.all() else fit(rows, with_ad=False)  # every pair without the ad prior: fitted above
    return replace(fitted, **{f"unseen_{k}": v for k, v in unseen.items()}, cold_fit=described)


def _one_class(labels: np.ndarray, logits: np.ndarray | None, template: Calibration | None) -> Calibration:
    """The layer when validation holds one class only: the identity on a logit (nothing to fit it with), or,
    without text, a constant at that click rate (clipped), never the untrained logit."""
    if logits is not None:
        return Calibration()
    return replace(template or Calibration(), slope=0.0, intercept=float(probability_log_odds(labels.mean())))


def cold_fit_rows(
    priors: PairPriors,
    labels: np.ndarray,
    min_clicks: int,
    user: np.ndarray | None = None,
    reference: tuple[np.ndarray | None, np.ndarray] | None = None,
) -> tuple[np.ndarray, str]:
    """The pairs to fit cold ads' weights on, and a sentence saying which: the pairs of ads never shown
    before the request if they hold min_clicks clicks (and a pair without one). Else one of two stand-ins,
    whichever predicts reference (the training split's pairs of cold ads: their user log-odds, None without a user
    prior, and labels) better: every pair, each ad's prior dropped (as ID dropout trains a model for ads it has no
    ID for), or the pairs of the least-shown ads (least_shown_rows). The stand-ins are compared by the priors
    alone (intercept and user prior, fitted on each, scored by logloss on reference): no text or match, whose
    training-split scores were trained on. Neither wins on every market (benchmarks/match_levers.py: on the sample
    market every pair calibrates cold ads better, on MovieLens-100K the least-shown ads). Without reference, or
    when it holds fewer than min_clicks clicks: every pair."""
    impressions = np.zeros(len(labels)) if priors.ad_counts is None else priors.ad_counts[1]
    cold = impressions <= 0
    clicks = int(labels[cold].sum())
    if clicks >= min_clicks and _both_classes(labels[cold]):
        return cold, f"{int(cold.sum())} validation pairs of cold ads ({clicks} clicks)"
    why = f"at least {min_clicks} wanted" if clicks < min_clicks else "every one clicked: one class only"
    every = np.ones(len(labels), dtype=bool)
    scarce = f"{int(cold.sum())} of cold ads hold {clicks} clicks, {why}"
    said = f"all {len(labels)} validation pairs without the ad prior ({scarce})"
    least = least_shown_rows(impressions, labels, min_clicks)
    if reference is None or least is None or least.all() or not _both_classes(labels[least]):
        return every, said
    reference_user, reference_labels = reference
    if reference_labels.sum() < min_clicks or not _both_classes(reference_labels):
        return every, said

    def reference_logloss(rows: np.ndarray) -> float:
        weights = logistic_fit(labels[rows], user=_rows(user, rows))
        z = weights["intercept"] + (0.0 if user is None else weights["user_weight"] * reference_user)
        return float(np.mean(np.logaddexp(0.0, z) - reference_labels * z))

    least_loss, every_loss = reference_logloss(least), reference_logloss(every)
    compared = (
        f"the priors fitted on them scored the training split's {len(reference_labels)} pairs of cold ads at logloss "
        f"{least_loss:.4f}, fitted on every pair {every_loss:.4f}"
    )
    if least_loss < every_loss:
        shown = int(impressions[least].max())
        return least, (
            f"{int(least.sum())} validation pairs of the least-shown ads (shown at most {shown} times before; "
            f"{int(labels[least].sum())} clicks; {scarce}): {compared}"
        )
    return every, f"{said}; the least-shown ads' {int(least.sum())} pairs instead: {compared}"


def least_shown_rows(impressions: np.ndarray, labels: np.ndarray, min_clicks: int) -> np.ndarray | None:
    """The pairs of ads shown at most t times before the request, the smallest t whose pairs hold min_clicks
    clicks; None when all pairs together hold fewer."""
    order = np.argsort(impressions, kind="stable")
    reached = np.flatnonzero(np.cumsum(labels[order]) >= min_clicks)
    if reached.size == 0:
        return None
    return impressions <= impressions[order[reached[0]]]


def _rows(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[rows]


def _both_classes(labels: np.ndarray) -> bool:
    return len(labels) > 0 and labels.min() != labels.max()


def logistic_fit(
    labels: np.ndarray,
    text: np.ndarray | None = None,
    ad: np.ndarray | None = None,
    user: np.ndarray | None = None,
    match: np.ndarray | None = None,
    affinity: np.ndarray | None = None,
) -> dict[str, float]:
    """slope (0 without text), intercept and the weights of the given terms (affinity: the (n, 3) affinity terms),
    by a logistic fit with a weak prior on the standardised weights (OUTPUT_LAYER_PRIOR_VARIANCE; the intercept is
    not penalised)."""
    from sklearn.linear_model import LogisticRegression

    features = {"slope": text, "ad_weight": ad, "user_weight": user, "match_weight": match}
    if affinity is not None:
        features |= dict(zip(AFFINITY_WEIGHTS, np.asarray(affinity).T, strict=True))
    features = {name: np.asarray(f, dtype=np.float64) for name, f in features.items() if f is not None}
    if not features:  # the intercept alone: the log-odds of the click rate
        return {"slope": 0.0, "intercept": float(probability_log_odds(labels.mean()))}
    x = np.column_stack(list(features.values()))
    # standardised, so that the solver's tolerance means the same at any logit scale (a fresh head's logits
    # can spread by 1e-4), then mapped back to the features' own units
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    fit = LogisticRegression(C=OUTPUT_LAYER_PRIOR_VARIANCE).fit((x - center) / scale, labels)
    coef = fit.coef_[0] / scale
    intercept = float(fit.intercept_[0] - coef @ center)
    return {"slope": 0.0} | dict(zip(features, coef.tolist(), strict=True)) | {"intercept": intercept}


def save_calibration(calibration: Calibration, model_dir: Path) -> None:
    (Path(model_dir) / CALIBRATION_FILE).write_text(json.dumps(asdict(calibration)))


def load_calibration(model_dir: str | Path) -> Calibration:
    """The calibration saved beside a fine-tuned model; identity for a model without one."""
    path = Path(model_dir) / CALIBRATION_FILE
    return Calibration(**json.loads(path.read_text())) if path.exists() else Calibration()
