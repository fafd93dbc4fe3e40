"""Smoke runs of every script's main([...]) on a few tiny synthetic studies, and an overfit check."""
import os

import numpy as np
import pandas as pd
import pytest

import data
import infer
import synthetic
import train_landmarks
import train_severity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    synthetic.make_dataset(str(out), 4, 2, seed=3, size=64, quirks=False, workers=1)
    return out


def _common(tiny, run):
    return ["--data-dir", str(tiny), "--out-dir", str(run), "--cache-dir", str(tiny / "cache"), "--num-workers", "0"]


def test_scripts_run_end_to_end_and_write_logs_checkpoints_and_a_complete_submission(tiny, tmp_path):
    run = tmp_path / "run"
    train_landmarks.main(_common(tiny, run) + ["--epochs", "1", "--dry-run", "--image-size", "64", "--overlays", "1"])
    for tag in ("sag_t2", "sag_t1", "axial"):
        log = pd.read_csv(run / f"landmarks_{tag}.csv")
        assert len(log) == 1 and np.isfinite(log["train_loss"]).all()
        assert (run / f"landmarks_{tag}_last.pt").exists()
    assert any(name.startswith("overlay_") for name in os.listdir(run))
    train_severity.main(_common(tiny, run) + ["--epochs", "1", "--dry-run", "--crop-px", "32", "--batch-size", "2"])
    assert len(pd.read_csv(run / "severity.csv")) == 1 and (run / "severity_last.pt").exists()
    infer.main(_common(tiny, run)[:-2] + ["--split", "test", "--severity-checkpoints", str(run / "severity_last.pt")])
    submission = pd.read_csv(run / "submission.csv")
    study_ids = pd.read_csv(tiny / "test_series_descriptions.csv")["study_id"].unique()
    expected = {f"{s}_{c}" for s in study_ids for c in data.LABEL_COLUMNS}
    assert set(submission["row_id"]) == expected and len(submission) == len(expected)
    values = submission[data.SUBMISSION_COLUMNS].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all() and np.allclose(values.sum(1), 1)
    landmarks = data.read_coordinates(run / "landmarks_test.csv")
    assert len(landmarks) == 25 * len(study_ids)


def test_landmark_overfit_mode_drives_the_loss_down(tiny, tmp_path):
    run = tmp_path / "overfit"
    train_landmarks.main(_common(tiny, run) + ["--series-types", "sag_t2", "--overfit-batches", "1", "--batch-size", "2",
                                               "--epochs", "40", "--warmup-steps", "5", "--image-size", "48", "--overlays", "0"])
    losses = pd.read_csv(run / "landmarks_sag_t2.csv")["train_loss"].to_numpy()
    assert losses[-1] < 0.25 * losses[0], losses


def test_severity_overfit_mode_drives_the_loss_down(tiny, tmp_path):
    run = tmp_path / "overfit"
    train_severity.main(_common(tiny, run) + ["--overfit-batches", "1", "--batch-size", "2", "--epochs", "25",
                                              "--warmup-steps", "3", "--crop-px", "32"])
    losses = pd.read_csv(run / "severity.csv")["train_loss"].to_numpy()
    assert losses[-1] < 0.2 * losses[0], losses
