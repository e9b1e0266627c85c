import math
from datetime import datetime

import numpy as np
import pytest

from tasks.config import PromotionConfig
from tasks.registry import Champion, champion_gives_way, promotion_gates

GOOD = {"auc": 0.70, "logloss": 0.50, "ece": 0.02, "mean_pctr": 0.21, "std_pctr": 0.05, "pairs": 1000, "clicks": 200}
POPULARITY = {"auc": 0.60, "logloss": 0.52}


def failed(candidate=None, champion=None, smoke=None, **config) -> set[str]:
    gates = promotion_gates(GOOD | (candidate or {}), POPULARITY, champion, smoke, PromotionConfig(**config))
    assert len(gates) == 6 and all(g.detail for g in gates)
    return {g.name for g in gates if not g.passed}


@pytest.mark.parametrize(
    ("candidate", "champion", "smoke", "config", "expected"),
    [
        ({}, None, None, {}, set()),  # no champion yet, everything sane
        ({}, {"auc": 0.65}, None, {}, set()),
        ({}, {"auc": 0.70}, None, {}, {"auc"}),  # equal is not better
        ({}, {"auc": 0.69}, None, {"min_auc_gain": 0.02}, {"auc"}),  # below the required margin
        ({"auc": math.nan}, None, None, {}, {"auc"}),  # undefined AUC never promotes
        ({"logloss": 0.56}, None, None, {}, {"logloss"}),  # clearly worse than popularity
        ({"ece": 0.08}, None, None, {}, {"calibration"}),
        ({"std_pctr": 0.0}, None, None, {}, {"pctr_spread"}),  # constant output
        ({"mean_pctr": 0.40}, None, None, {}, {"mean_pctr"}),  # twice the observed CTR
        ({}, None, "scores outside (0, 1)", {}, {"smoke"}),
    ],
)
def test_every_gate_must_pass(candidate, champion, smoke, config, expected):
    assert failed(candidate, champion, smoke, **config) == expected


NOW = datetime(2026, 11, 30)


@pytest.mark.parametrize(
    ("champion", "max_age", "expected"),
    [
        (None, 14, None),  # no champion: nothing to yield
        (Champion("3", np.ones(2), None, datetime(2026, 11, 20)), 14, None),  # 10 days old: still compared
        (Champion("3", np.ones(2), None, datetime(2026, 11, 1)), 14, "champion version 3 is stale"),
        (Champion("3", np.ones(2), None, datetime(2026, 11, 1)), None, None),  # staleness off
        (Champion("3", np.ones(2), None, None), 14, None),  # registered before data.until was kept
        (Champion("3", None, "version 3 cannot be loaded or scored: OSError", NOW), 14, "cannot be loaded"),
    ],
)
def test_a_stale_or_unloadable_champion_gives_way(champion, max_age, expected):
    reason = champion_gives_way(champion, NOW, PromotionConfig(max_champion_age_days=max_age))
    assert reason is None if expected is None else expected in reason


def test_a_champion_that_gives_way_waives_only_the_auc_comparison():
    stale = "champion version 3 is stale"
    gates = promotion_gates(GOOD, POPULARITY, {"auc": 0.80}, None, PromotionConfig(), champion_yields=stale)
    assert all(g.passed for g in gates) and stale in gates[0].detail  # not above 0.80, promoted anyway
    worse = promotion_gates(GOOD | {"ece": 0.3}, POPULARITY, None, None, PromotionConfig(), champion_yields=stale)
    assert {g.name for g in worse if not g.passed} == {"calibration"}  # the absolute gates still hold
    undefined = promotion_gates(GOOD | {"auc": math.nan}, POPULARITY, None, None, PromotionConfig(), stale)
    assert {g.name for g in undefined if not g.passed} == {"auc"}
