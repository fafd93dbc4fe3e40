"""Bad input, faults and resume: each behaviour here fails loudly or falls back with a warning."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import data
import infer
import inputs
import losses
import models
import predict
import synthetic
import tables
import train_landmarks
import train_severity
import training
from conftest import write_frame


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_robust")
    synthetic.make_dataset(str(out), 4, 2, seed=9, size=48, quirks=False, workers=1)
    return out


def _args(tiny, run, *extra):
    return ["--data-dir", str(tiny), "--out-dir", str(run), "--cache-dir", str(tiny / "cache"),
            "--num-workers", "0", *extra]


def test_empty_folder_non_dicom_file_and_missing_pixel_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: no readable DICOM slice among 0 files"):
        data.load_series(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_frame(mixed / "1.dcm", np.ones((8, 8)), (0, 0, 0))
    (mixed / "notes.txt").write_text("not a DICOM file")
    header_only = write_frame(mixed / "2.dcm", np.ones((8, 8)), (0, 0, 4), instance=2)
    import pydicom
    ds = pydicom.dcmread(header_only)
    del ds.PixelData
    ds.save_as(header_only)
    with pytest.warns(UserWarning) as caught:
        series = data.load_series(str(mixed))
    messages = " ".join(str(w.message) for w in caught)
    assert (
        "notes.txt: unreadable" in messages
        and "2.dcm: unreadable" in messages
        and "no pixel data" in messages
    )
    assert len(series.volume) == 1


def test_missing_position_tags_fall_back_to_instance_order_with_warning(tmp_path):
    folder = tmp_path / "nogeometry"
    folder.mkdir()
    for instance in (3, 1, 2):
        path = write_frame(folder / f"{instance}.dcm", np.full((6, 6), instance),
                           (0, 0, 10 - instance), instance=instance)
        import pydicom
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with pytest.warns(UserWarning, match="ordering slices by instance number"):
        series = data.load_series(str(folder))
    assert series.instance_numbers.tolist() == [1, 2, 3] and series.volume[:, 0, 0].tolist() == [1,
                                                                                                 2,
                                                                                                 3]


def test_label_outside_its_frame_is_masked_with_a_warning(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_frame(folder / "1.dcm", np.ones((20, 30)), (0, 0, 0))
    series = data.load_series(str(folder))
    points = {("spinal_canal_stenosis", "l1_l2"): tables.LabelPoint(1, 1, 12.0, 5.0),
              ("spinal_canal_stenosis", "l2_l3"): tables.LabelPoint(1, 1, 31.0, 5.0),
              ("spinal_canal_stenosis", "l3_l4"): tables.LabelPoint(1, 7, 1.0, 1.0)}
    with pytest.warns(UserWarning) as caught:
        study = {1: data.StudySeries("Sagittal T2/STIR", 1, series)}
        landmarks = data.labelled_landmarks(study, points, str(folder))
    targets = data.landmark_array(landmarks, data.POINTS_OF_SERIES["Sagittal T2/STIR"])
    messages = " ".join(str(w.message) for w in caught)
    assert "l2_l3 ignored: instance 1: label (x 31.0, y 5.0) outside its 20 x 30 frame" in messages
    assert "l3_l4 ignored" in messages and "instance 7 not in series" in messages
    assert np.isfinite(targets[0]).all() and np.isnan(targets[1:]).all()


def test_one_slice_and_large_frames_go_through_both_stages(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    write_frame(folder / "1.dcm", (np.random.default_rng(0).random((2048, 2048)) * 1000),
                (0, -100, 50), orientation=(0, 1, 0, 0, 0, -1), spacing=(0.1, 0.1))
    series = data.load_series(str(folder))
    model = models.LandmarkNet(5).eval()
    points, confidence = predict.predict_sagittal(model, series, 48, torch.device("cpu"))
    assert points.shape == (5, 3) and (points[:, 0] == 0).all() and np.isfinite(points).all()
    # in the 2048-pixel frame, not the 48-pixel input
    assert ((points[:, 1:] >= -0.5) & (points[:, 1:] <= 2047.5)).all()
    crop = inputs.crop_2p5d(series, (0, *points[0, 1:]), 40.0, 32, 5)
    assert crop.shape == (5, 32, 32)


def test_missing_series_csv_is_a_clear_error(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken, ignore=shutil.ignore_patterns("cache"))
    os.remove(broken / "test_series_descriptions.csv")
    with pytest.raises(FileNotFoundError,
                       match="test_series_descriptions.csv: series description file not found"):
        infer.main(
            ["--data-dir", str(broken), "--out-dir", str(tmp_path / "run"), "--split", "test"]
        )


def test_nan_loss_stops_training_naming_step_and_studies(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "heatmap_loss", lambda logits, *rest: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError,
                       match=r"non-finite loss at step 0 \(epoch 0\), studies \[\d+"):
        train_landmarks.main(
            _args(tiny, tmp_path / "run", "--series-types", "sag_t2", "--epochs", "1",
                  "--image-size", "48")
        )


class Killed(Exception):
    """Stands in for a kill: raised in the middle of a run."""


def test_resume_after_a_kill_keeps_one_log_row_per_epoch(tiny, tmp_path, monkeypatch):
    flags = ["--series-types", "sag_t2", "--image-size", "48", "--overlays", "0", "--fold", "1"]
    train_landmarks.main(_args(tiny, tmp_path / "full", "--epochs", "3", *flags))
    save = training.save_checkpoint

    def save_then_die(path, checkpoint):  # killed just after the first epoch's last checkpoint
        save(path, checkpoint)
        if path.endswith("_last.pt"):
            raise Killed(path)

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_landmarks.main(_args(tiny, tmp_path / "cut", "--epochs", "3", *flags))
    monkeypatch.undo()
    assert len(pd.read_csv(tmp_path / "cut" / "landmarks_sag_t2.csv")) == 1
    # a row written after the last checkpoint
    with open(tmp_path / "cut" / "landmarks_sag_t2.csv", "a") as handle:
        handle.write("1,99,0.0,9.9\n")
    train_landmarks.main(_args(tiny, tmp_path / "cut", "--epochs", "3", *flags, "--resume"))
    full, resumed = (
        pd.read_csv(tmp_path / run / "landmarks_sag_t2.csv") for run in ("full", "cut")
    )
    assert resumed["epoch"].tolist() == full["epoch"].tolist() == [0, 1, 2]
    assert resumed["step"].tolist() == full["step"].tolist() and resumed[
        "lr"
    ].tolist() == pytest.approx(full["lr"].tolist())


def test_same_seed_and_flags_give_identical_logs_and_predictions(tiny, tmp_path):
    flags = ["--epochs", "1", "--dry-run", "--crop-px", "32", "--batch-size", "2"]
    for run in ("a", "b"):
        train_landmarks.main(
            _args(tiny, tmp_path / run, "--epochs", "1", "--dry-run", "--image-size", "48",
                  "--overlays", "0")
        )
        train_severity.main(_args(tiny, tmp_path / run, *flags))
        infer.main(
            [
                "--data-dir",
                str(tiny),
                "--out-dir",
                str(tmp_path / run),
                "--cache-dir",
                str(tiny / "cache"),
                "--severity-checkpoints",
                str(tmp_path / run / "severity_last.pt"),
            ]
        )
    for name in ("landmarks_sag_t2.csv", "severity.csv"):
        a, b = (
            pd.read_csv(tmp_path / run / name).drop(columns=["seconds", "data_wait"])
            for run in ("a", "b")
        )
        pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "submission.csv"),
                                  pd.read_csv(tmp_path / "b" / "submission.csv"))


def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    training.save_checkpoint(path, {"epoch": 1})

    def dies_halfway(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
