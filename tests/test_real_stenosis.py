"""The real stenosis set: converter geometry and grades on hand-made boxes, the report's AUC and
reliability against brute-force references, and a reduced k-fold run of both stages on real patients
(skipped without ../shared/real_stenosis)."""

import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data
import losses
import real_stenosis
import tables
import train_landmarks
import train_severity
from conftest import SHARED

# six disc boxes (the top one thoracic), a second box on the L4/L5 disc, stenosis at L4/L5 and one
# in the thorax
BOXES = """1 0.50 0.10 0.12 0.05
1 0.50 0.25 0.12 0.05
1 0.48 0.38 0.12 0.05
0 0.46 0.51 0.14 0.06
1 0.44 0.64 0.14 0.06
4 0.45 0.65 0.18 0.10
1 0.42 0.78 0.14 0.06
2 0.53 0.66 0.03 0.05
2 0.56 0.12 0.03 0.05
"""


def _source(folder, boxes=BOXES):
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (384, 384), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "images" / "0007_t2_sag.png")
    (folder / "labels" / "0007_t2_sag.txt").write_text(boxes)
    return pixels


def test_converter_names_levels_grades_and_canal_points_from_the_boxes(tmp_path):
    pixels = _source(tmp_path / "source")
    assert real_stenosis.convert(str(tmp_path / "source"), str(tmp_path / "out")) == 1
    study_ids, labels = tables.read_labels(str(tmp_path / "out" / "train.csv"))
    assert study_ids.tolist() == [real_stenosis.STUDY_ID_BASE + 7]
    # lowest five discs (the 0.64/0.65 pair is one disc), stenosis at the fourth; the thoracic box
    # grades nothing
    assert labels[0, :5].tolist() == [0, 0, 0, 1, 0]
    assert (labels[0, 5:] == data.MISSING).all()
    points = pd.read_csv(tmp_path / "out" / "train_label_coordinates.csv")
    assert points["level"].tolist() == data.LEVEL_NAMES
    expected_x = [(0.50 + 0.06) * 384, (0.48 + 0.06) * 384, (0.46 + 0.07) * 384,
                  ((0.44 + 0.07) + (0.45 + 0.09)) / 2 * 384, (0.42 + 0.07) * 384]
    expected_y = [0.25 * 384, 0.38 * 384, 0.51 * 384, 0.645 * 384, 0.78 * 384]
    assert np.allclose(points["x"], expected_x, atol=0.01) and np.allclose(points["y"], expected_y,
                                                                           atol=0.01)
    # the written slice: same pixels, 0.8 mm, columns toward posterior (+y), rows toward feet (-z)
    study_id = real_stenosis.STUDY_ID_BASE + 7
    series = data.load_series(
        str(tmp_path / "out" / "train_images" / str(study_id) / str(study_id * 10 + 1))
    )
    assert np.array_equal(series.volume[0], pixels.astype(np.float32) * 16)
    corner = data.series_pixel_to_patient(series, 0, 0, 0)
    moved = data.series_pixel_to_patient(series, 0, 10, 20)
    assert np.allclose(moved - corner, [0, 10 * 0.8, -20 * 0.8])


def test_converter_names_the_file_with_too_few_discs(tmp_path):
    _source(tmp_path / "source", boxes="1 0.5 0.5 0.1 0.05\n1 0.5 0.6 0.1 0.05\n")
    with pytest.raises(ValueError, match="0007_t2_sag.txt: 2 disc boxes"):
        real_stenosis.convert(str(tmp_path / "source"), str(tmp_path / "out"))


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    positive = rng.random(60) < 0.3
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p,
             n in itertools.product(scores[positive], scores[~positive])]
    assert real_stenosis.auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert np.isnan(real_stenosis.auc(scores, np.ones(60, bool)))


def test_reliability_table_by_hand():
    predicted = np.array([0.05, 0.15, 0.45, 0.55, 0.95, 1.0])
    grades = np.array([0, 1, 0, 1, 2, 1])
    table = real_stenosis.reliability(predicted, grades, 2)
    assert [row[2] for row in table] == [3, 3]
    assert table[0][3] == pytest.approx(0.65 / 3) and table[0][4] == pytest.approx(1 / 3)
    # two Normal (weight 1 each), one Moderate (2)
    assert table[0][5] == pytest.approx(2 / (1 + 1 + 2))
    assert table[1][3] == pytest.approx(2.5 / 3) and table[1][4] == pytest.approx(1.0)
    assert table[1][5] == pytest.approx(1.0)


def test_a_dataset_with_spinal_labels_only_scores_without_the_empty_terms():
    labels = np.full((2, data.N_LABELS), data.MISSING)
    labels[:, :5] = [[0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    study_ids = np.array([1, 2])
    solution = losses.labels_to_solution(study_ids, labels)
    probabilities = np.full((2, data.N_LABELS, 3), [0.7, 0.2, 0.1])
    terms = losses.condition_group_losses(
        solution, losses.probabilities_to_submission(study_ids, probabilities)
    )
    assert np.isnan(terms["foraminal"]) and np.isnan(terms["subarticular"])
    # 7 Normal rows weight 1, 3 Moderate weight 2
    spinal = (7 * -np.log(0.7) + 3 * 2 * -np.log(0.2)) / (7 + 3 * 2)
    assert terms["spinal"] == pytest.approx(spinal)
    # any_severe: max P(Severe) 0.1
    assert losses.mean_of_terms(terms) == pytest.approx((spinal + -np.log(0.9)) / 2)


def test_both_stages_and_the_report_run_on_real_patients(tmp_path):
    """The documented k-fold run, reduced: 10 real patients, two folds, one epoch each."""
    source = SHARED / "real_stenosis"
    if not (source / "labels").exists():
        pytest.skip("../shared/real_stenosis is not beside this checkout")
    folder = tmp_path / "real"
    real_stenosis.main(
        ["convert", "--source", str(source), "--out", str(folder), "--studies", "10"]
    )
    for fold in (0, 1):
        run = tmp_path / f"fold{fold}"
        common = ["--data-dir", str(folder), "--out-dir", str(run), "--cache-dir",
                  str(tmp_path / "cache"), "--num-workers", "0", "--fold", str(fold), "--n-folds",
                  "2", "--epochs", "1"]
        train_landmarks.main(
            common + ["--series-types", "sag_t2", "--image-size", "64", "--overlays", "0"]
        )
        train_severity.main(common + ["--n-slices", "1", "--crop-px", "32", "--batch-size", "2"])
        # a score of NaN terms never saved a best checkpoint
        assert (run / "severity_best.pt").exists()
    result = real_stenosis.main(
        ["report", "--data-dir", str(folder), "--runs", str(tmp_path / "fold*")]
    )
    assert result["studies"] == 10 and result["folds"] == 2
    assert np.isfinite(result["spinal"]) and np.isfinite(result["prior_spinal"])
    assert sum(row[2] for row in result["reliability"]) == 10 * data.N_LEVELS
