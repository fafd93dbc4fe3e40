"""Smoke runs of every script's main([...]) on a few tiny synthetic studies, and overfit checks."""
import os
import warnings

import numpy as np
import pandas as pd
import pytest

import data
import losses
import infer
import synthetic
import tables
import train_landmarks
import train_severity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    synthetic.make_dataset(str(out), 4, 2, seed=3, size=64, quirks=False, workers=1)
    return out


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Both stages trained for one dry-run epoch: a run folder with every checkpoint."""
    run = tmp_path_factory.mktemp("run")
    train_landmarks.main(
        _common(tiny, run) + ["--epochs", "1", "--dry-run", "--image-size", "64", "--overlays", "1"]
    )
    train_severity.main(
        _common(tiny, run) + ["--epochs", "1", "--dry-run", "--crop-px", "32", "--batch-size", "2"]
    )
    return run


def _common(folder, run):
    return ["--data-dir", str(folder), "--out-dir", str(run), "--cache-dir", str(folder / "cache"),
            "--num-workers", "0"]


def _infer(folder, run, split="test"):
    infer.main(
        ["--data-dir", str(folder), "--out-dir", str(run), "--cache-dir", str(folder / "cache"),
         "--split", split, "--severity-checkpoints", str(run / "severity_last.pt")]
    )
    return pd.read_csv(run / "submission.csv")


def _assert_complete(submission, folder, split="test"):
    study_ids = pd.read_csv(folder / f"{split}_series_descriptions.csv")["study_id"].unique()
    expected = {f"{s}_{c}" for s in study_ids for c in data.LABEL_COLUMNS}
    assert set(submission["row_id"]) == expected and len(submission) == len(expected)
    values = submission[data.SUBMISSION_COLUMNS].to_numpy()
    assert (np.isfinite(values).all() and (values > 0).all() and (values < 1).all()
            and np.allclose(values.sum(1), 1))
    return study_ids


def test_scripts_run_end_to_end_and_write_logs_checkpoints_and_a_complete_submission(tiny, trained):
    for tag in ("sag_t2", "sag_t1", "axial"):
        log = pd.read_csv(trained / f"landmarks_{tag}.csv")
        assert len(log) == 1 and np.isfinite(log["train_loss"]).all()
        assert (trained / f"landmarks_{tag}_last.pt").exists()
    assert any(name.startswith("overlay_") for name in os.listdir(trained))
    log = pd.read_csv(trained / "severity.csv")
    assert (len(log) == 1 and (trained / "severity_last.pt").exists()
            and np.isfinite(log["val_loss"]).all())
    # the honest validation ran end to end
    assert (trained / "confusion_predicted_landmarks.png").exists()
    # its grades, ready to pool with other folds
    pooled = pd.read_csv(trained / "validation_fold0.csv")
    assert (len(pooled) % 25 == 0 and len(pooled) > 0
            and np.allclose(pooled[data.SUBMISSION_COLUMNS].sum(axis=1), 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study_ids = _assert_complete(_infer(tiny, trained), tiny)
    landmarks = tables.read_coordinates(trained / "landmarks_test.csv")
    sagittal = landmarks[~landmarks["condition"].str.contains("subarticular")]
    # one epoch of training: the axial levels may miss their series
    assert len(sagittal) == 15 * len(study_ids)
    messages = " ".join(str(w.message) for w in caught)
    for study_id in study_ids:
        found = set(
            landmarks.loc[landmarks["study_id"] == study_id, ["condition", "level"]].itertuples(
                index=False, name=None
            )
        )
        for condition, level in data.COLUMN_POINTS:
            # found, or a fallback named
            assert (condition, level) in found or f"{condition}_{level}" in messages


def test_missing_series_and_corrupt_file_still_give_every_row_and_a_warning_naming_them(trained,
                                                                                        tmp_path):
    synthetic.make_dataset(str(tmp_path), 0, 3, seed=4, size=64, quirks=True, workers=1)
    quirks = pd.read_csv(tmp_path / "quirks.csv")
    missing = quirks[quirks["quirk"] == "missing_series"].iloc[0]
    corrupt = quirks[quirks["quirk"] == "corrupt_file"].iloc[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        submission = _infer(tmp_path, trained)
    _assert_complete(submission, tmp_path)
    messages = [str(w.message) for w in caught]
    # the missing series' rows must be named in a fallback warning
    lacking = data.SERIES_OF_CONDITION
    rows = [c for c in data.LABEL_COLUMNS if lacking[c[:-6]] == missing["series_description"]]
    assert any(
        f"study {missing['study_id']}" in m and all(r in m for r in rows) for m in messages
    ), messages
    assert any(corrupt["detail"] in m and "unreadable" in m for m in messages), messages


def test_landmark_overfit_mode_drives_the_loss_down(tiny, tmp_path):
    run = tmp_path / "overfit"
    train_landmarks.main(
        _common(tiny, run)
        + ["--series-types", "sag_t2", "--overfit-batches", "1", "--batch-size", "2", "--epochs",
           "40", "--warmup-steps", "5", "--image-size", "48", "--overlays", "0"]
    )
    losses = pd.read_csv(run / "landmarks_sag_t2.csv")["train_loss"].to_numpy()
    assert losses[-1] < 0.25 * losses[0], losses


def test_severity_overfit_mode_drives_the_loss_down(tiny, tmp_path):
    run = tmp_path / "overfit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_severity.main(
            _common(tiny, run)
            + ["--overfit-batches", "1", "--batch-size", "2", "--epochs", "25", "--warmup-steps",
               "3", "--crop-px", "32"]
        )
    log = pd.read_csv(run / "severity.csv", keep_default_na=False)
    losses = log["train_loss"].to_numpy()
    assert losses[-1] < 0.2 * losses[0], losses
    assert log["collapsed"].iloc[-1] == "" and not [
        w for w in caught if "COLLAPSED" in str(w.message)
    ]  # a healthy model


def test_a_collapsed_severity_model_is_named_loudly(tiny, tmp_path, monkeypatch):
    import torch
    import models

    def one_class(self, crops, groups):  # grades every crop Moderate, whatever it shows
        return torch.tensor([0.0, 5.0, 0.0]).expand(len(crops), 3) + 0 * sum(
            p.sum() for p in self.parameters()
        )

    monkeypatch.setattr(models.SeverityNet, "forward", one_class)
    with pytest.warns(
        UserWarning,
        match=r"COLLAPSED PREDICTIONS on the training studies at the last epoch: .*spinal:Moderate",
    ):
        train_severity.main(
            _common(tiny, tmp_path / "run") + ["--epochs", "2", "--all-studies", "--crop-px", "32"]
        )
    log = pd.read_csv(tmp_path / "run" / "severity.csv", keep_default_na=False)
    assert all("spinal:Moderate" in c and "foraminal:Moderate" in c for c in log["collapsed"])


def test_listed_series_missing_on_disk_and_unlisted_folders_are_named(tiny, trained, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy, ignore=shutil.ignore_patterns("cache"))
    listed = pd.read_csv(copy / "test_series_descriptions.csv")
    gone = listed[listed["series_description"] == "Axial T2"].iloc[0]
    shutil.rmtree(copy / "test_images" / str(gone["study_id"]) / str(gone["series_id"]))
    stray = copy / "test_images" / str(gone["study_id"]) / "123456789"
    shutil.copytree(copy / "test_images" / str(gone["study_id"]) / str(listed.iloc[0]["series_id"]),
                    stray)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        submission = _infer(copy, trained)
    _assert_complete(submission, copy)
    messages = " ".join(str(w.message) for w in caught)
    assert (f"{gone['study_id']}/123456789" in messages
            and "not in test_series_descriptions.csv" in messages)
    assert (
        "Axial T2 series "
        f"{copy / 'test_images' / str(gone['study_id']) / str(gone['series_id'])} unreadable"
        in messages
    )
    assert f"study {gone['study_id']}: 10 rows fall back to the training prior" in messages
    assert all(
        f"{side}_subarticular_stenosis_{level}" in messages
        for side in ("left", "right")
        for level in data.LEVELS
    )


def _torchrun(script, args, processes):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", os.path.join(root, script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_training_under_torchrun_with_two_gloo_processes_matches_one_process(
    tiny, trained, tmp_path
):
    common = _common(tiny, tmp_path / "x")[:2] + ["--cache-dir", str(tiny / "cache"),
                                                  "--num-workers", "0", "--landmark-dir",
                                                  str(trained), "--epochs", "3", "--dry-run",
                                                  "--crop-px", "32", "--lr", "3e-4"]
    out = lambda name: ["--out-dir", str(tmp_path / name)]  # noqa: E731
    _torchrun("train_severity.py",
              common[2:] + ["--data-dir", str(tiny)] + out("two") + ["--batch-size", "1"], 2)
    _torchrun("train_severity.py",
              common[2:] + ["--data-dir", str(tiny)] + out("one") + ["--batch-size", "2"], 1)
    two, one = (pd.read_csv(tmp_path / name / "severity.csv") for name in ("two", "one"))
    # one log, written by rank 0 only
    assert (len(two) == len(one) == 3 and two["step"].tolist() == one["step"].tolist())
    print("torchrun x2 scores", two["val_loss"].tolist(), "one process", one["val_loss"].tolist())
    assert abs(two["val_loss"].iloc[-1] - one["val_loss"].iloc[-1]) < 0.25, (
        two["val_loss"].tolist(),
        one["val_loss"].tolist(),
    )
    landmark_log = _torchrun(
        "train_landmarks.py",
        ["--data-dir", str(tiny), "--cache-dir", str(tiny / "cache"), "--num-workers", "0",
         "--series-types", "sag_t2", "--epochs", "1", "--image-size", "48", "--overlays", "0"]
        + out("landmarks"),
        2,
    )
    assert (landmark_log.count("sag_t2: ") == 1
            and len(pd.read_csv(tmp_path / "landmarks" / "landmarks_sag_t2.csv")) == 1)


def test_a_series_type_without_labels_is_skipped_with_a_warning_not_a_crash(tiny, tmp_path):
    import shutil
    copy = tmp_path / "no_axial_labels"
    shutil.copytree(tiny, copy, ignore=shutil.ignore_patterns("cache"))
    coordinates = pd.read_csv(copy / "train_label_coordinates.csv")
    coordinates[~coordinates["condition"].str.contains("Subarticular")].to_csv(
        copy / "train_label_coordinates.csv", index=False
    )
    with pytest.warns(UserWarning, match="axial: no labelled Axial T2 series to train on"):
        train_landmarks.main(_common(copy, tmp_path / "run")
                             + ["--series-types", "axial", "--epochs", "1", "--image-size", "48"])
    assert not (tmp_path / "run" / "landmarks_axial_last.pt").exists()


def test_honest_validation_says_loudly_when_it_cannot_run_and_refuses_landmarks_that_saw_the_fold(
    tiny, trained, tmp_path
):
    flags = ["--epochs", "1", "--dry-run", "--crop-px", "32", "--batch-size", "2"]
    with pytest.warns(UserWarning, match="NO HONEST VALIDATION: no landmark checkpoints"):
        result = train_severity.main(_common(tiny, tmp_path / "alone") + flags)
    assert "predicted_landmarks" not in result and "true_landmarks" in result
    seen = tmp_path / "seen"
    train_landmarks.main(
        _common(tiny, seen)
        + ["--series-types", "sag_t2", "--epochs", "1", "--dry-run", "--image-size", "48",
           "--all-studies", "--overlays", "0"]
    )
    with pytest.raises(
        ValueError, match="trained on --all-studies, so it has seen validation studies of fold 0"
    ):
        train_severity.main(_common(tiny, tmp_path / "a") + flags + ["--landmark-dir", str(seen)])
    with pytest.raises(ValueError,
                       match="trained on fold 0 of 5, so it has seen validation studies of fold 1"):
        train_severity.main(
            _common(tiny, tmp_path / "b") + flags + ["--landmark-dir", str(trained), "--fold", "1"]
        )


def test_inference_only_recipe_runs_with_just_the_files_the_readme_lists(tiny, trained, tmp_path):
    import re
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read().replace("\\\n", " ")  # lines joined
    files = re.search(r"^cp ((?:\w+\.py +)+)code/$", readme, flags=re.M).group(1).split()
    assert ("infer.py" in files and "train_landmarks.py" not in files
            and "train_severity.py" not in files)
    code = tmp_path / "code"
    code.mkdir()
    for name in files:
        shutil.copy(os.path.join(root, name), code / name)
    command = [sys.executable, str(code / "infer.py"), "--data-dir", str(tiny), "--out-dir",
               str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--landmark-dir",
               str(trained), "--severity-checkpoints", str(trained / "severity_last.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_complete(pd.read_csv(tmp_path / "out" / "submission.csv"), tiny)


def test_without_validation_the_last_epoch_is_saved_as_best_its_statistics_recomputed_once(
    tiny, tmp_path, monkeypatch
):
    """--all-studies: nothing to choose by, so severity_best.pt is the last epoch's, and the
    BatchNorm statistics are recomputed once, after it, not after every epoch."""
    import torch

    import training
    recomputed, recompute = [], training.recompute_batchnorm

    def counted(net, batches):
        recomputed.append(len(batches))
        recompute(net, batches)

    monkeypatch.setattr(training, "recompute_batchnorm", counted)
    run = tmp_path / "run"
    train_severity.main(_common(tiny, run) + ["--epochs", "3", "--all-studies", "--crop-px", "32"])
    best, last = (torch.load(run / f"severity_{kind}.pt", weights_only=False)
                  for kind in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 2 and len(recomputed) == 1 and recomputed[0] > 0
    assert all(torch.equal(best["model"][key], last["model"][key]) for key in last["model"])


def test_an_epoch_with_no_step_logs_its_learning_rate_instead_of_crashing(tmp_path):
    """No study has a labelled point, so no batch has a crop and no step is taken: each epoch still
    logs the schedule's learning rate at step 0 and a NaN training loss."""
    import training
    synthetic.make_dataset(str(tmp_path), 4, 0, seed=6, size=64, workers=1)
    coordinates = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    coordinates.iloc[:0].to_csv(tmp_path / "train_label_coordinates.csv", index=False)
    run = tmp_path / "run"
    train_severity.main(_common(tmp_path, run) + ["--all-studies", "--epochs", "2",
                                                  "--crop-px", "32", "--n-slices", "1"])
    log = pd.read_csv(run / "severity.csv")
    args = train_severity.parse_args(["--data-dir", "x", "--out-dir", "y"])
    assert log["step"].tolist() == [0, 0] and log["train_loss"].isna().all()
    assert np.allclose(log["lr"], training.get_lr(0, 2, args.warmup_steps, args.lr))


def test_a_level_outside_every_axial_series_falls_back_to_the_prior_with_a_warning(
    trained, tmp_path, monkeypatch
):
    import predict
    synthetic.make_dataset(str(tmp_path), 0, 4, seed=8, size=64, workers=1, split_axial=1.0)
    quirks = pd.read_csv(tmp_path / "quirks.csv")
    # its upper levels are on split.series_id alone
    split = quirks[quirks["quirk"] == "split_axial_levels"].iloc[0]
    listed = pd.read_csv(tmp_path / "test_series_descriptions.csv")
    listed[listed["series_id"] != split["series_id"]].to_csv(
        tmp_path / "test_series_descriptions.csv", index=False
    )
    truth = tables.read_coordinates(tmp_path / "solution_coordinates.csv")
    upper = sorted(set(truth.loc[truth["series_id"] == split["series_id"], "level"]))
    canal = truth[truth["condition"] == "spinal_canal_stenosis"]

    def true_level_points(study, found):  # stage 1 made exact, so only the coverage rule decides
        series_id = next(k for k, s in study.items() if s.series_type == "Sagittal T2/STIR")
        rows = canal[canal["series_id"] == series_id].set_index("level").loc[data.LEVELS]
        series = study[series_id].series
        return np.stack(
            [
                data.series_pixel_to_patient(
                    series, *data.label_to_volume(series, r.instance_number, r.x, r.y)
                )
                for r in rows.itertuples()
            ]
        )

    monkeypatch.setattr(predict, "level_points_mm", true_level_points)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_complete(_infer(tmp_path, trained), tmp_path)
    message = next(
        str(w.message) for w in caught if f"study {split['study_id']}:" in str(w.message)
    )
    assert 0 < len(upper) < len(data.LEVELS)
    # exactly the removed series' levels fall back, named
    for level, level_name in zip(data.LEVELS, data.LEVEL_NAMES):
        assert (f"level {level_name} lies outside every Axial T2 series" in message) == (
            level in upper
        ), message
        assert (f"right_subarticular_stenosis_{level}" in message) == (level in upper), message


def test_eval_mode_grades_what_training_fitted_when_most_rows_have_no_landmark(tmp_path):
    """Only the 5 canal rows of each study are labelled (as on the real stenosis set): training must
    not forward stand-in images for the other 20, or BatchNorm learns batch statistics that eval
    mode never sees. Overfit one unaugmented batch, then grade the same studies in eval mode: the
    loss must be what training reached.
    """
    synthetic.make_dataset(str(tmp_path), 4, 0, seed=5, size=64, workers=1)
    labels = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    for column in data.LABEL_COLUMNS[data.N_LEVELS:]:
        labels[column] = ""
    labels.to_csv(tmp_path / "train.csv", index=False)
    coordinates = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    coordinates[coordinates["condition"] == "Spinal Canal Stenosis"].to_csv(
        tmp_path / "train_label_coordinates.csv", index=False
    )
    run = tmp_path / "run"
    train_severity.main(
        _common(tmp_path, run)
        + ["--all-studies", "--overfit-batches", "1", "--epochs", "8", "--crop-px", "32",
           "--n-slices", "3", "--lr", "3e-3"]
    )
    fitted = pd.read_csv(run / "severity.csv")["train_loss"].min()
    infer.main(
        ["--data-dir", str(tmp_path), "--out-dir", str(run), "--cache-dir", str(tmp_path / "cache"),
         "--split", "train", "--true-landmarks", "--no-score", "--tta-shift-mm", "0"]
    )  # the crops training saw: no shifted copies
    solution = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    graded = losses.condition_group_losses(solution, pd.read_csv(run / "submission.csv"))["spinal"]
    first = pd.read_csv(run / "severity.csv")["train_loss"].iloc[0]
    assert fitted < 0.5 * first  # training did fit the batch
    # eval mode grades as training fitted (was 0.30 vs 0.00)
    assert graded < 1.5 * fitted + 0.05, (graded, fitted)


def test_reports_name_why_rows_got_the_prior_and_show_every_axial_series(trained, tmp_path,
                                                                         monkeypatch):
    import viz
    # every study's axial levels on two series; with quirks, one study lacks a series
    synthetic.make_dataset(str(tmp_path), 0, 3, seed=4, size=64, quirks=True, workers=1,
                           split_axial=1.0)
    quirks = pd.read_csv(tmp_path / "quirks.csv")
    missing = quirks[quirks["quirk"] == "missing_series"].iloc[0]
    drawn, write_report = {}, viz.write_report

    def keep(path, title, study, landmarks, crops, rows):
        drawn[int(title.split()[-1])] = (rows, crops, write_report(path, title, study, landmarks,
                                                                  crops, rows))
        return drawn[int(title.split()[-1])][2]

    monkeypatch.setattr(viz, "write_report", keep)
    infer.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                "--landmark-dir", str(trained), "--severity-checkpoints",
                str(trained / "severity_last.pt"), "--report", "3"])
    study_ids = sorted(pd.read_csv(tmp_path / "test_series_descriptions.csv")["study_id"].unique())
    assert sorted(drawn) == study_ids
    assert (tmp_path / "run" / "confusion.png").exists()
    submission = pd.read_csv(tmp_path / "run" / "submission.csv").set_index("row_id")
    solution = pd.read_csv(tmp_path / "solution.csv").set_index("study_id")
    for study_id, (rows, crops, (captions, wrong)) in drawn.items():
        assert (tmp_path / "run" / f"report_{study_id}.png").exists()
        # a row says why it got the prior exactly when it has no crop
        assert all(bool(row["note"]) == (j not in crops) for j, row in enumerate(rows))
        # the marks are the rows whose submitted argmax is not the true grade
        submitted = submission.loc[[f"{study_id}_{c}" for c in data.LABEL_COLUMNS]]
        truth = solution.loc[study_id, data.LABEL_COLUMNS]
        expected = [j for j, (c, t) in enumerate(zip(data.LABEL_COLUMNS, truth))
                    if isinstance(t, str) and t
                    and data.SEVERITIES[submitted.loc[f"{study_id}_{c}"].to_numpy().argmax()] != t]
        assert wrong == expected
        listed = pd.read_csv(tmp_path / "test_series_descriptions.csv")
        axial = listed[(listed["study_id"] == study_id)
                       & (listed["series_description"] == "Axial T2")]["series_id"]
        if study_id != missing["study_id"]:
            assert all(any(str(s) in c for c in captions) for s in axial), captions
    rows, crops, (captions, _) = drawn[int(missing["study_id"])]
    lost = [j for j, c in enumerate(data.LABEL_COLUMNS)
            if data.SERIES_OF_CONDITION[c[:-6]] == missing["series_description"]]
    assert all(missing["series_description"] in rows[j]["note"] for j in lost), rows
    assert any(missing["series_description"] in c for c in captions), captions


def test_a_report_frames_exactly_the_rows_whose_most_likely_grade_is_not_the_truth(tmp_path):
    import viz
    rng = np.random.default_rng(0)
    study = {}  # no series: every row is the prior's, the grid still drawn
    probabilities = rng.dirichlet(np.ones(3), size=data.N_LABELS)
    truth = rng.integers(0, 3, size=data.N_LABELS)
    truth[::7] = data.MISSING

    def magenta_pixels(truth_of_rows):
        rows = [dict(probabilities=p, truth=int(t), note="no series", labelled=None)
                for p, t in zip(probabilities, truth_of_rows)]
        _, wrong = viz.write_report(tmp_path / "r.png", "study 1", study, {}, {}, rows)
        page = np.asarray(viz.Image.open(tmp_path / "r.png").convert("RGB"))
        return wrong, int((page == viz.WRONG).all(-1).sum())

    expected = [j for j in range(data.N_LABELS)
                if truth[j] != data.MISSING and probabilities[j].argmax() != truth[j]]
    wrong, pixels = magenta_pixels(truth)
    assert wrong == expected and len(expected) > 3
    one = np.full(data.N_LABELS, data.MISSING)
    one[expected[0]] = truth[expected[0]]
    _, pixels_of_one = magenta_pixels(one)
    assert pixels_of_one > 0 and pixels == len(expected) * pixels_of_one


def test_cpu_autocast_is_off_by_default_and_bfloat16_on_request_where_it_is_native():
    import torch

    import training
    from models import SeverityNet

    net = SeverityNet(n_slices=3)
    crops, groups = torch.zeros(2, 3, 32, 32), torch.tensor([0, 1])
    native = torch.bfloat16 if training.cpu_has_bfloat16() else torch.float32
    for amp, expected in ((None, torch.float32), (True, native), (False, torch.float32)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            autocast, scaler = training.autocast_context(torch.device("cpu"), amp)
        with autocast:
            assert net(crops, groups).dtype == expected, f"--amp {amp}"
        assert not scaler.is_enabled()  # bfloat16 needs no loss scaling
        # asked for and not native: said so
        assert bool(caught) == (amp is True and expected == torch.float32)
    for flags, amp in (([], None), (["--amp"], True), (["--no-amp"], False)):
        assert train_severity.parse_args(["--data-dir", "d", "--out-dir", "o"] + flags).amp == amp


def test_the_audit_with_models_writes_a_repaired_file_that_training_reads(tiny, trained, tmp_path):
    import audit

    frame = audit.main(["--data-dir", str(tiny), "--out-dir", str(tmp_path), "--cache-dir",
                        str(tiny / "cache"), "--landmark-dir", str(trained)])
    original = tables.read_coordinates(tiny / "train_label_coordinates.csv")
    fixed = tables.read_coordinates(tmp_path / "train_label_coordinates.repaired.csv")
    flagged = set(zip(frame["study_id"], frame["condition"], frame["level"]))
    assert flagged  # a one-epoch model disagrees with some labels

    def by_key(rows):
        return {(r.study_id, r.condition, r.level): (r.series_id, r.instance_number, r.x, r.y)
                for r in rows.itertuples()}

    before, after = by_key(original), by_key(fixed)
    assert set(after) <= set(before)
    for key, point in before.items():
        if key not in flagged:
            assert after[key] == point  # what the audit trusts is not touched
        elif key in after:
            assert after[key] != point  # moved to the models' point
    train_severity.main(_common(tiny, tmp_path / "run") + [
        "--epochs", "1", "--dry-run", "--crop-px", "32", "--batch-size", "2", "--coordinates",
        str(tmp_path / "train_label_coordinates.repaired.csv")])
    assert (tmp_path / "run" / "severity_last.pt").exists()
    # an audit of one study repairs that study and leaves every other study's labels as they are
    one = int(original["study_id"].iloc[0])
    audit.main(["--data-dir", str(tiny), "--out-dir", str(tmp_path / "one"), "--cache-dir",
                str(tiny / "cache"), "--landmark-dir", str(trained), "--studies", str(one)])
    partial = tables.read_coordinates(tmp_path / "one" / "train_label_coordinates.repaired.csv")
    partial = by_key(partial)
    others = {key: point for key, point in before.items() if key[0] != one}
    assert {key: partial[key] for key in others} == others


def test_landmark_errors_of_the_labelled_points_themselves_are_zero_and_each_series_loads_once(
        tiny, monkeypatch):
    truth = tables.read_coordinates(tiny / "train_label_coordinates.csv")
    predicted = truth.sample(frac=1.0, random_state=0)  # the truth, rows shuffled
    loads = []
    load_series = data.load_series
    monkeypatch.setattr(data, "load_series", lambda folder, *a: loads.append(folder)
                        or load_series(folder, *a))
    errors = infer.landmark_errors(predicted, truth, str(tiny), "train", "")
    assert set(errors) == set(data.SERIES_TYPES)
    for e in errors.values():
        assert e["median_mm"] == e["p90_mm"] == 0.0 and e["slice_exact"] == 1.0
    assert sorted(loads) == sorted(set(loads))  # each series once
    assert len(loads) == truth[["study_id", "series_id"]].drop_duplicates().shape[0]


def test_inference_without_any_landmark_model_names_the_folder_instead_of_a_prior_submission(
        tiny, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no landmark model"):
        infer.main(["--data-dir", str(tiny), "--out-dir", str(tmp_path), "--split", "test",
                    "--severity-checkpoints", str(trained / "severity_last.pt")])
    assert not (tmp_path / "submission.csv").exists()
