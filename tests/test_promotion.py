import math

import pytest

from tasks.registry import should_promote


@pytest.mark.parametrize(
    ("auc", "champion_auc", "min_gain", "promoted"),
    [
        (0.60, None, 0.0, True),  # no champion yet
        (0.70, 0.65, 0.0, True),
        (0.65, 0.65, 0.0, False),  # equal is not better
        (0.60, 0.65, 0.0, False),
        (0.66, 0.65, 0.02, False),  # below the required margin
        (0.68, 0.65, 0.02, True),
        (math.nan, None, 0.0, False),  # undefined AUC never promotes
    ],
)
def test_promotion_rule(auc, champion_auc, min_gain, promoted):
    decision, reason = should_promote(auc, champion_auc, min_gain)
    assert decision is promoted
    assert reason
