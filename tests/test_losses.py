import math

import numpy as np
import pandas as pd
import pytest
import torch

import data
import losses
import tables
import training
from reference import column_prior_submission, reference_score


def _random_case(rng, n_studies, empty_share):
    labels = rng.choice(3, size=(n_studies, 25), p=[0.7, 0.2, 0.1])
    labels[rng.random(labels.shape) < empty_share] = data.MISSING
    study_ids = rng.choice(10**8, size=n_studies, replace=False)
    probabilities = rng.dirichlet([1, 1, 1], size=(n_studies, 25)) * rng.uniform(
        0.5, 2, size=(n_studies, 25, 1)
    )
    return losses.labels_to_solution(study_ids, labels), losses.probabilities_to_submission(
        study_ids, probabilities
    )


@pytest.mark.parametrize("seed", range(5))
def test_score_matches_independent_reference_on_random_submissions(seed):
    rng = np.random.default_rng(seed)
    solution, submission = _random_case(rng, n_studies=30, empty_share=0.05)
    assert (solution[data.LABEL_COLUMNS] == "").to_numpy().sum() > 0  # empty cells are in play
    submission = submission.sample(frac=1.0, random_state=seed)  # row order must not matter
    assert losses.competition_score(solution, submission) == pytest.approx(
        reference_score(solution, submission), abs=1e-9
    )


def test_hand_computed_single_study():
    labels = np.zeros((1, 25), dtype=np.int64)
    labels[0, 2] = 2  # spinal l3_l4 Severe
    labels[0, 7] = data.MISSING  # an empty foraminal cell is not scored
    solution = losses.labels_to_solution([1], labels)
    probabilities = np.tile([0.5, 0.25, 0.25], (1, 25, 1))
    submission = losses.probabilities_to_submission([1], probabilities)
    # four normal rows (w 1), one severe (w 4)
    spinal = (4 * 1 * -math.log(0.5) + 4 * -math.log(0.25)) / (4 + 4)
    foraminal = subarticular = -math.log(0.5)
    any_severe = -math.log(0.25)  # label 1, prediction max severe 0.25, weight 4 (one study)
    expected = (spinal + foraminal + subarticular + any_severe) / 4
    assert losses.competition_score(solution, submission) == pytest.approx(expected, abs=1e-12)


def test_weighted_prior_reproduces_the_published_real_label_score(shared_labels):
    study_ids, labels = tables.read_labels(shared_labels / "train.csv")
    solution = pd.read_csv(shared_labels / "train.csv", dtype=str, keep_default_na=False)
    ours = losses.probabilities_to_submission(
        study_ids, np.broadcast_to(losses.weighted_prior(labels), (len(study_ids), 25, 3))
    )
    assert losses.competition_score(solution, ours) == pytest.approx(0.78971, abs=5e-6)
    theirs = column_prior_submission(pd.read_csv(shared_labels / "train.csv"),
                                     class_weights=(1, 2, 4))
    assert losses.competition_score(solution, theirs) == pytest.approx(0.78971, abs=5e-6)


def test_bad_submissions_raise_clear_errors():
    solution, submission = _random_case(np.random.default_rng(0), n_studies=2, empty_share=0.0)
    with pytest.raises(ValueError, match="rows missing"):
        losses.competition_score(solution, submission.iloc[1:])
    broken = submission.copy()
    broken.loc[3, "moderate"] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        losses.competition_score(solution, broken)
    broken = submission.copy()
    broken.loc[3, "severe"] = -0.1
    with pytest.raises(ValueError, match="negative"):
        losses.competition_score(solution, broken)


def test_weighted_cross_entropy_masks_empty_labels_and_weights_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2, data.MISSING])
    log_p = logits.log_softmax(-1)
    expected = -(1 * log_p[0, 0] + 2 * log_p[1, 1] + 4 * log_p[2, 2]) / 7
    assert losses.weighted_cross_entropy(logits, targets).item() == pytest.approx(expected.item(),
                                                                                  rel=1e-6)


def test_collapse_is_named_for_a_group_graded_one_class_and_not_for_a_healthy_one():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=(20, 25), p=[0.7, 0.2, 0.1])
    labels[0, 0] = data.MISSING
    # mostly right, not constant
    healthy = np.where(rng.random((20, 25)) < 0.8, labels, rng.choice(3, size=(20, 25)))
    assert losses.collapsed_groups(labels, np.clip(healthy, 0, 2)) == {}
    collapsed = healthy.copy()
    collapsed[:, 0:5] = 1  # every spinal row graded Moderate
    collapsed[:, 15:25] = 2  # every subarticular row graded Severe
    assert losses.collapsed_groups(labels, collapsed) == {"spinal": "Moderate",
                                                          "subarticular": "Severe"}
    # a group whose truth is all one class cannot be said to collapse
    one_class = np.zeros((20, 25), dtype=np.int64)
    assert losses.collapsed_groups(one_class, one_class) == {}


def test_the_printed_log_row_names_a_collapse_and_leaves_out_an_empty_one(capsys):
    training.print_row(dict(epoch=3, train_loss=0.16354, collapsed="", data_wait=0.0062))
    quiet = capsys.readouterr().out
    assert "collapsed" not in quiet and "train_loss 0.1635" in quiet and "data_wait 0.0062" in quiet
    training.print_row(dict(epoch=3, collapsed="spinal:Moderate"))
    assert "collapsed spinal:Moderate" in capsys.readouterr().out
