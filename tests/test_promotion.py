import math

import pytest

from tasks.config import PromotionConfig
from tasks.registry import promotion_gates

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
