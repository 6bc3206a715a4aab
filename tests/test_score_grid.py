"""The score grid of the sites' summaries: every probability lands in its cell, and a score that is not a
probability is an error naming the model and how many, never a quiet change of the AUC."""

from __future__ import annotations

import numpy as np
import pytest

from tace.common.errors import TaceError
from tace.common.summaries import bin_index, groupings, joint_score_table


def test_probabilities_land_in_their_cells():
    assert bin_index([0.0, 0.05, 0.5, 0.99999, 1.0], 10).tolist() == [0, 0, 5, 9, 9]
    assert bin_index(np.array([], dtype=float), 10).tolist() == []


@pytest.mark.parametrize("bad", [1.25, -0.125, float("nan"), float("inf")])
def test_a_score_that_is_not_a_probability_is_refused(bad):
    with pytest.raises(TaceError, match=r"^1 of 3 dltr scores are not probabilities in \[0, 1\]") as error:
        bin_index([0.25, bad, 0.75], 100, "dltr scores")
    assert str(bad) not in str(error.value)  # never the value itself
    assert error.value.hint


def test_the_summary_names_the_model_whose_scores_are_wrong():
    labels = np.array([0, 1, 0, 1, 1, 0])
    good, bad = np.linspace(0.1, 0.9, 6), np.array([0.2, np.nan, 0.4, 1.5, 0.6, 0.7])
    with pytest.raises(TaceError, match=r"^2 of 6 clinical scores in the score table"):
        joint_score_table(labels, {"dltr": good, "clinical": bad}, 1000)
    # With a minimum cell count, averaging a run of scores must not hide one outside [0, 1] (1.5 and 0.4 average 0.95).
    with pytest.raises(TaceError, match=r"^2 of 6 clinical scores in the score table"):
        joint_score_table(labels, {"dltr": good, "clinical": np.nan_to_num(bad, nan=-1.0)}, 1000, min_cell_count=2)
    cutoffs = {"dltrmlp": {"youden_bin": 500, "risk_bins": [300, 700], "risk_groups": ["high risk", "intermediate risk", "low risk"]}}
    with pytest.raises(TaceError, match=r"^2 of 6 dltrmlp scores grouped at the cut-offs"):
        groupings({"dltrmlp": bad}, cutoffs, 1000)
