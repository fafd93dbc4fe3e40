"""The whole pipeline on a split: DICOM studies -> landmarks -> 2.5D crops -> severities ->
RUN/submission.csv.

    python infer.py --data-dir demo --out-dir runs/demo --split test

Reads the checkpoints train_landmarks.py and train_severity.py wrote into --out-dir (or
--landmark-dir and --severity-checkpoints), writes RUN/submission.csv (25 rows for every study of
{split}_series_descriptions.csv) and RUN/landmarks_<split>.csv, and prints the competition score
beside the weighted-prior baseline when the truth is known (train split, or solution.csv beside the
test split). Each checkpoint carries the input settings it was trained with, so inference rebuilds
its inputs from the checkpoints alone. A study whose series is missing or unreadable still gets
every row: the rows that series would serve fall back to the training prior, with a warning naming
them.
"""

import argparse
import os
import time
import warnings

import numpy as np
import pandas as pd

import data
import inputs
import losses
import tables
import training
import viz
from predict import grade_study, load_landmark_models, load_severity_models, predict_landmarks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True,
                        help="competition layout: {split}_series_descriptions.csv, {split}_images/")
    parser.add_argument("--out-dir", required=True,
                        help="run folder: severity checkpoint in, submission.csv out")
    parser.add_argument("--split", default="test", choices=["test", "train"],
                        help="which split's studies to grade")
    parser.add_argument("--studies", default="",
                        help="comma-separated study ids to grade (default: all of the split)")
    parser.add_argument("--cache-dir", default="",
                        help="series cache folder (default: none; each series is read once, and a "
                        "cache of a ~700-study hidden test would take ~15 GB)")
    # model
    parser.add_argument("--landmark-dir", default="",
                        help="folder of landmarks_<type>_best.pt (default: --out-dir)")
    parser.add_argument("--severity-checkpoints", default="",
                        help="comma-separated severity checkpoints to average "
                        "(default: OUT/severity_best.pt)")
    parser.add_argument("--true-landmarks", action="store_true",
                        help="grade crops at the labelled points instead of predicted ones (train "
                        "split, or solution_coordinates.csv beside a test split): stage 2 alone")
    parser.add_argument("--tta-shift-mm", type=float, default=4.0,
                        help="also grade crops moved this far up, down, forward and back, and "
                        "average (0: off); softens the cost of a misplaced landmark")
    parser.add_argument("--report", type=int, default=0,
                        help="write OUT/report_<study_id>.png, one page of what each stage did, "
                        "for the first N studies (and OUT/confusion.png where the truth is known)")
    parser.add_argument("--report-studies", default="",
                        help="comma-separated study ids to write a report for (as --report)")
    parser.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the landmarks and score the submission where the split's "
                        "truth is known")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# one study through both stages


def series_dir(data_dir, split, study_id, series_id):
    return os.path.join(data_dir, f"{split}_images", str(study_id), str(series_id))


def load_study(data_dir, split, study_id, series_of_type, cache_dir):
    """({series_id: StudySeries} of every readable listed series, [problems to warn about])."""
    study, problems = {}, []
    for series_type in data.SERIES_TYPES:
        listed = series_of_type.get(series_type, [])
        if not listed:
            problems.append(f"no {series_type} series listed")
        for series_id in listed:
            folder = series_dir(data_dir, split, study_id, series_id)
            try:
                series = data.load_series(folder, cache_dir)
            except data.DecoderMissing:
                raise
            except (OSError, ValueError) as error:  # a listed folder absent, empty or unreadable
                problems.append(f"{series_type} series {folder} unreadable ({error})")
                continue
            study[series_id] = data.StudySeries(series_type, series_id, series)
    return study, problems


def warn_unlisted(data_dir, split, descriptions):
    """Series folders on disk that the series CSV does not list are not graded: say so, naming
    them."""
    listed = set()
    for study_id, types in descriptions.items():
        for ids in types.values():
            listed |= {(study_id, series_id) for series_id in ids}
    images = os.path.join(data_dir, f"{split}_images")
    on_disk = set()
    if os.path.isdir(images):
        for study in os.listdir(images):
            if study.isdigit() and os.path.isdir(os.path.join(images, study)):
                for series in os.listdir(os.path.join(images, study)):
                    if series.isdigit():
                        on_disk.add((int(study), int(series)))
    unlisted = sorted(on_disk - listed)
    if unlisted:
        examples = ", ".join(f"{s}/{t}" for s, t in unlisted[:5])
        warnings.warn(f"{images}: {len(unlisted)} series folders not in "
                      f"{split}_series_descriptions.csv are ignored, e.g. {examples}")
    return unlisted


def landmark_rows(study_id, study, landmarks):
    """Rows of landmarks_<split>.csv (the train_label_coordinates.csv schema, original pixels) for
    one study."""
    rows = []
    for (condition, level), landmark in landmarks.items():
        series = study[landmark.series_id].series
        instance, x, y = data.volume_to_label(series, landmark.slice, landmark.col, landmark.row)
        condition_name = data.CONDITION_NAMES[data.CONDITIONS.index(condition)]
        level_name = data.LEVEL_NAMES[data.LEVELS.index(level)]
        rows.append(dict(study_id=study_id, series_id=landmark.series_id, instance_number=instance,
                         condition=condition_name, level=level_name, x=x, y=y))
    return rows


def labelled_points(args):
    """The split's labelled points (train_label_coordinates.csv, or solution_coordinates.csv beside
    a test split), or None where it has none."""
    name = "train_label_coordinates.csv" if args.split == "train" else "solution_coordinates.csv"
    path = os.path.join(args.data_dir, name)
    return tables.read_coordinates(path) if os.path.exists(path) else None


def true_landmarks(study, study_id, coordinates):
    """{(condition, level): Landmark} of a study's labelled points (coordinates: its rows of the
    coordinates table), through the same data.labelled_landmarks that training uses."""
    points = {}
    for row in coordinates.itertuples(index=False):
        point = tables.LabelPoint(row.series_id, row.instance_number, row.x, row.y)
        points[(row.condition, row.level)] = point
    return data.labelled_landmarks(study, points, f"study {study_id}")


def predict_split(args, study_ids, models, prior, points, device):
    """-> (probabilities (N, 25, 3), landmark rows for landmarks_<split>.csv, {study_id: fallback
    columns}). models: (landmark models, severity models); points: the split's labelled points
    (labelled_points) or None."""
    landmark_models, severity_models = models
    path = os.path.join(args.data_dir, f"{args.split}_series_descriptions.csv")
    descriptions = tables.series_by_study(tables.read_series_descriptions(path))
    warn_unlisted(args.data_dir, args.split, descriptions)
    probabilities = np.broadcast_to(prior, (len(study_ids),) + prior.shape).copy()
    rows, fallbacks = [], {}
    reported, seconds = studies_to_report(args, study_ids), []
    for i, study_id in enumerate(study_ids):
        series_of_type = descriptions.get(study_id, {})
        study, problems = load_study(args.data_dir, args.split, study_id, series_of_type,
                                     args.cache_dir)
        if args.true_landmarks:
            landmarks = true_landmarks(study, study_id, points[points["study_id"] == study_id])
            notes = []
        else:
            landmarks, notes = predict_landmarks(landmark_models, study, device)
        graded, available = grade_study(severity_models, study, landmarks, device,
                                        args.tta_shift_mm)
        probabilities[i, available] = graded[available]
        missing = [c for c, ok in zip(data.LABEL_COLUMNS, available.tolist()) if not ok]
        if missing:
            fallbacks[study_id] = missing
            why = "; ".join(problems + notes) or "no landmark found"
            warnings.warn(f"study {study_id}: {len(missing)} rows fall back to the training prior "
                          f"({', '.join(missing)}); {why}")
        rows += landmark_rows(study_id, study, landmarks)
        if study_id in reported:
            started = time.time()
            graded = losses.finalise(probabilities[i]), reported[study_id], available
            write_report(args, (study_id, study, landmarks), graded, problems + notes, points,
                         severity_models[0].settings)
            seconds.append(time.time() - started)
    if seconds:
        print(f"wrote {len(seconds)} reports to {args.out_dir} ({np.mean(seconds):.2f} s each)")
    return probabilities, rows, fallbacks


def why_prior(column, messages):
    """Of a study's warnings, those about label column's series type (and its level, where a
    warning names a level), or "no landmark found"."""
    condition, level = data.COLUMN_POINTS[column]
    series_type = data.SERIES_OF_CONDITION[condition]
    level_name = data.LEVEL_NAMES[data.LEVELS.index(level)]
    about = [m for m in messages if series_type in m
             and (level_name in m or not any(name in m for name in data.LEVEL_NAMES))]
    return "; ".join(about) or "no landmark found"


def studies_to_report(args, study_ids):
    """{study_id: (25,) true grade indices, MISSING where unknown} of the studies --report and
    --report-studies name."""
    chosen = study_ids[:args.report]
    chosen += [int(s) for s in args.report_studies.split(",") if s.strip()]
    labels = {study_id: np.full(data.N_LABELS, data.MISSING) for study_id in chosen}
    path = labels_path(args.data_dir, args.split)
    if chosen and os.path.exists(path):
        for study_id, row in zip(*tables.read_labels(path)):
            if study_id in labels:
                labels[study_id] = row
    return labels


def write_report(args, found, graded, messages, points, settings):
    """OUT/report_<study_id>.png (viz.write_report). found: (study_id, study, landmarks); graded:
    the study's (25, 3) submitted probabilities, (25,) true grades and (25,) availability; messages:
    its warnings (why_prior picks a row's); points: the split's labelled points or None; settings:
    the crops' (the first severity model's)."""
    study_id, study, landmarks = found
    labelled = {}
    if points is not None:
        labelled = true_landmarks(study, study_id, points[points["study_id"] == study_id])
    crops, _, columns = inputs.study_crops(study, landmarks, settings)
    by_column = dict(zip(columns.tolist(), crops))
    rows = [dict(probabilities=p, truth=int(t), labelled=labelled.get(point),
                 note="" if ok else why_prior(j, messages))
            for j, (p, t, ok, point) in enumerate(zip(*graded, data.COLUMN_POINTS))]
    path = os.path.join(args.out_dir, f"report_{study_id}.png")
    return viz.write_report(path, f"study {study_id}", study, landmarks, by_column, rows)


def write_confusion(args, study_ids, probabilities):
    """OUT/confusion.png of the split's graded studies (rows true, columns most likely), where the
    truth is known."""
    path = labels_path(args.data_dir, args.split)
    if not os.path.exists(path):
        return
    position = {study_id: i for i, study_id in enumerate(study_ids)}
    known, labels = tables.read_labels(path)
    keep = [k for k, study_id in enumerate(known) if study_id in position]
    graded = probabilities[[position[known[k]] for k in keep]]
    matrices = losses.confusion_matrices(labels[keep], graded)
    viz.save_confusion_png(os.path.join(args.out_dir, "confusion.png"), matrices)


# -----------------------------------------------------------------------------
# scores, when the truth is known


def labels_path(data_dir, split):
    """Where the split's known grades would be: train.csv, or solution.csv beside a test split."""
    return os.path.join(data_dir, "train.csv" if split == "train" else "solution.csv")


def truth_for(data_dir, split, study_ids):
    """The train.csv-shaped truth of these studies, or None when the split has no known labels."""
    path = labels_path(data_dir, split)
    if not os.path.exists(path):
        return None
    solution = pd.read_csv(path, dtype=str, keep_default_na=False)
    solution = solution[solution["study_id"].astype(np.int64).isin(study_ids)]
    return solution if len(solution) else None


def report_scores(solution, submission, prior, study_ids, oracle=None):
    """Print the score and each metric term beside the weighted-prior baseline, and beside the
    best possible score where the labels' posterior is known (oracle); return score and baseline."""
    prior_rows = np.broadcast_to(prior, (len(study_ids),) + prior.shape)
    baseline = losses.probabilities_to_submission(study_ids, prior_rows)
    ours = losses.condition_group_losses(solution, submission)
    base = losses.condition_group_losses(solution, baseline)
    score = losses.mean_of_terms(ours)
    base_score = losses.mean_of_terms(base)
    print(f"score {score:.4f}  (weighted-prior baseline {base_score:.4f}, "
          f"ratio {score / base_score:.3f})")
    floor = {}
    if oracle is not None:
        floor = losses.condition_group_losses(solution, oracle)
        floor_score = losses.mean_of_terms(floor)
        print(f"best possible score {floor_score:.4f} (ratio {floor_score / base_score:.3f}): "
              f"score / floor {score / floor_score:.3f}")
    for name in ours:
        beside = f"  floor {floor[name]:.4f}" if floor else ""
        print(f"  {name:18s} {ours[name]:.4f}  (prior {base[name]:.4f}{beside})")
    return score, base_score


def read_oracle(data_dir, split):
    """The best possible submission where the split's labels come from a simulated reader:
    synthetic.py's oracle.csv (the posterior q of each label given the anatomy) turned into what
    minimises the metric's expected loss, p proportional to q times the weights 1/2/4. None when
    there is no oracle.csv."""
    path = os.path.join(data_dir, "oracle.csv")
    if split != "test" or not os.path.exists(path):
        return None
    oracle = pd.read_csv(path)
    weighted = oracle[data.SUBMISSION_COLUMNS].to_numpy() * np.asarray(data.SEVERITY_WEIGHTS)
    oracle[data.SUBMISSION_COLUMNS] = losses.finalise(weighted / weighted.sum(1, keepdims=True))
    return oracle


def landmark_error(row, guess, true_series, guess_series):
    """(mm in the true slice's plane, slice error) of a guessed label row against the true one.

    Measured through patient space, so a guess on another series of the type (a study with two
    axial series) is measured too: its slice error is that of the true series' slice nearest to
    the guess.
    """
    true_d, *true_px = data.label_to_volume(true_series, row.instance_number, row.x, row.y)
    guess_d, *guess_px = data.label_to_volume(guess_series, guess.instance_number, guess.x, guess.y)
    guess_mm = data.series_pixel_to_patient(guess_series, guess_d, *guess_px)
    offset_mm = guess_mm - data.series_pixel_to_patient(true_series, true_d, *true_px)
    normal = data.slice_normals(true_series.orientations[true_d])
    in_plane_mm = offset_mm - (offset_mm @ normal) * normal
    if guess_series is true_series:
        nearest = guess_d
    else:
        nearest = data.series_patient_to_pixel(true_series, guess_mm)[0]
    return float(np.linalg.norm(in_plane_mm)), abs(nearest - true_d)


def landmark_errors(predicted, truth, data_dir, split, cache_dir):
    """Per series type: median and 90th-percentile in-plane error (mm) and slice accuracy of
    predicted landmarks.

    predicted, truth: frames in the train_label_coordinates.csv schema (snake_case condition and
    level). A true point with no prediction counts as a miss (infinite error).
    """
    guesses = {(r.study_id, r.condition, r.level): r for r in predicted.itertuples(index=False)}
    errors = {series_type: ([], []) for series_type in data.SERIES_TYPES}
    loaded, study = {}, None  # the current study's series, each loaded once for its 5-10 points
    for row in truth.sort_values("study_id", kind="stable").itertuples(index=False):
        mm, slices = errors[data.SERIES_OF_CONDITION[row.condition]]
        guess = guesses.get((row.study_id, row.condition, row.level))
        if guess is None:
            mm.append(np.inf)
            slices.append(np.inf)
            continue
        if row.study_id != study:
            loaded, study = {}, row.study_id
        for series_id in (row.series_id, guess.series_id):
            if series_id not in loaded:
                folder = series_dir(data_dir, split, study, series_id)
                loaded[series_id] = data.load_series(folder, cache_dir)
        true_series, guess_series = loaded[row.series_id], loaded[guess.series_id]
        error_mm, error_slices = landmark_error(row, guess, true_series, guess_series)
        mm.append(error_mm)
        slices.append(error_slices)
    return {s: losses.summarise_errors(mm, slices) for s, (mm, slices) in errors.items() if mm}


def print_landmark_errors(errors):
    print("landmarks      median_mm  p90_mm  slice_exact  slice_within1")
    for series_type, e in errors.items():
        print(f"{series_type:16s} {e['median_mm']:7.2f} {e['p90_mm']:7.2f} "
              f"{e['slice_exact']:10.3f} {e['slice_within1']:12.3f}")


def report_truth(args, study_ids, submission, prior, truth):
    """Landmark errors (truth: the split's labelled points, or None) and the score against the
    known grades, where the split has them; the score and baseline, or None."""
    if truth is not None:
        predicted_path = os.path.join(args.out_dir, f"landmarks_{args.split}.csv")
        predicted = tables.read_coordinates(predicted_path)
        truth = truth[truth["study_id"].isin(study_ids)]
        errors = landmark_errors(predicted, truth, args.data_dir, args.split, args.cache_dir)
        print_landmark_errors(errors)
    solution = truth_for(args.data_dir, args.split, study_ids)
    if solution is None:
        return None
    scored_ids = solution["study_id"].astype(np.int64).tolist()
    oracle = read_oracle(args.data_dir, args.split)
    return report_scores(solution, submission, prior, scored_ids, oracle)


def main(argv=None):
    args = parse_args(argv)
    device = training.resolve_device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    training.save_args(args.out_dir, "infer", args)
    started = time.time()
    path = os.path.join(args.data_dir, f"{args.split}_series_descriptions.csv")
    descriptions = tables.read_series_descriptions(path)
    if args.studies:
        study_ids = [int(s) for s in args.studies.split(",")]
    else:
        study_ids = sorted(descriptions["study_id"].unique().tolist())
    landmark_dir = args.landmark_dir or args.out_dir
    landmark_models = load_landmark_models(landmark_dir, device)
    if not landmark_models and not args.true_landmarks:  # every row would get the prior
        raise FileNotFoundError(f"{landmark_dir}: no landmark model (landmarks_<type>_best.pt or "
                                f"_last.pt); give the training run's folder with --landmark-dir")
    if args.severity_checkpoints:
        paths = args.severity_checkpoints.split(",")
    else:
        paths = [os.path.join(args.out_dir, "severity_best.pt")]
    severity_models, prior = load_severity_models(paths, device)
    points = labelled_points(args)  # read once: true landmarks, reports and landmark errors
    if args.true_landmarks and points is None:
        raise FileNotFoundError(f"{args.data_dir}: --true-landmarks needs the split's labelled "
                                "points (train_label_coordinates.csv or solution_coordinates.csv)")
    probabilities, rows, fallbacks = predict_split(args, study_ids,
                                                   (landmark_models, severity_models), prior,
                                                   points, device)
    submission = losses.probabilities_to_submission(study_ids, losses.finalise(probabilities))
    if args.report or args.report_studies:
        write_confusion(args, study_ids, probabilities)
    submission_path = os.path.join(args.out_dir, "submission.csv")
    submission.to_csv(submission_path, index=False)
    columns = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    landmarks_path = os.path.join(args.out_dir, f"landmarks_{args.split}.csv")
    pd.DataFrame(rows, columns=columns).to_csv(landmarks_path, index=False)
    seconds_per_study = (time.time() - started) / max(len(study_ids), 1)
    print(f"wrote {len(submission)} rows for {len(study_ids)} studies to {submission_path} "
          f"({seconds_per_study:.2f} s/study); {len(fallbacks)} studies with fallback rows")
    if not args.score:
        return None
    return report_truth(args, study_ids, submission, prior, points)


if __name__ == "__main__":
    main()
