"""The whole pipeline on a split: DICOM studies -> landmarks -> 2.5D crops -> severities -> RUN/submission.csv.

    python infer.py --data-dir demo --out-dir runs/demo --split test

Reads the checkpoints train_landmarks.py and train_severity.py wrote into --out-dir (or --landmark-dir),
writes RUN/submission.csv (25 rows for every study of {split}_series_descriptions.csv) and
RUN/landmarks_<split>.csv, and prints the competition score beside the weighted-prior baseline when the
truth is known (train split, or solution.csv beside the test split).
A study whose series is missing or unreadable still gets every row: the rows that series would serve
fall back to the training prior, with a warning that names them.
"""
import argparse
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch

import data
import losses
import train_landmarks as tl
import training
from models import LandmarkNet, SeverityNet

GROUP_OF_CONDITION = {"spinal_canal_stenosis": 0, "left_neural_foraminal_narrowing": 1, "right_neural_foraminal_narrowing": 1,
                      "left_subarticular_stenosis": 2, "right_subarticular_stenosis": 2}
CROP_MM = (40.0, 40.0, 40.0)  # crop side per condition group (canal, foraminal, subarticular), mm
PROBABILITY_FLOOR = 1e-4  # submitted probabilities stay inside [floor, 1 - floor]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True, help="competition layout: {split}_series_descriptions.csv, {split}_images/")
    parser.add_argument("--out-dir", required=True, help="run folder: severity checkpoint in, submission.csv out")
    parser.add_argument("--split", default="test", choices=["test", "train"], help="which split's studies to grade")
    parser.add_argument("--studies", default="", help="comma-separated study ids to grade (default: all of the split)")
    parser.add_argument("--cache-dir", default="cache", help="decoded series cache")
    # model
    parser.add_argument("--landmark-dir", default="", help="folder of landmarks_<type>_best.pt (default: --out-dir)")
    parser.add_argument("--severity-checkpoints", default="", help="comma-separated severity checkpoints to average "
                        "(default: OUT/severity_best.pt)")
    parser.add_argument("--tta-shift-mm", type=float, default=0.0, help="also grade crops moved this far up, down, "
                        "forward and back, and average (0: off); softens the cost of a misplaced landmark")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# one study through both stages


def load_study(data_dir, split, study_id, series_of_type, cache_dir):
    """{series type: (series_id, Series, normalised volume)} with the first readable series of each type,
    and a list of problems (missing or unreadable series) to warn about."""
    study, problems = {}, []
    for series_type in data.SERIES_TYPES:
        for series_id in series_of_type.get(series_type, []):
            series_dir = os.path.join(data_dir, f"{split}_images", str(study_id), str(series_id))
            try:
                series = data.load_series(series_dir, cache_dir)
            except data.DecoderMissing:
                raise
            except (OSError, ValueError) as error:  # a listed folder that is absent, empty or unreadable
                problems.append(f"{series_type} series {series_dir} unreadable ({error})")
                continue
            study[series_type] = (series_id, series, data.normalise_volume(series.volume))
            break
        else:
            if not series_of_type.get(series_type):
                problems.append(f"no {series_type} series listed")
    return study, problems


def load_landmark_models(folder, device):
    """{tag: (model, image_size)} for every landmark checkpoint found in folder."""
    models = {}
    for tag in tl.SERIES_TAGS.values():
        path = next((p for p in (os.path.join(folder, f"landmarks_{tag}_{k}.pt") for k in ("best", "last")) if os.path.exists(p)), None)
        if path is None:
            continue
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        model = LandmarkNet(checkpoint["n_points"]).to(device)
        model.load_state_dict(checkpoint["model"])
        models[tag] = (model.eval(), checkpoint["image_size"])
    return models


def predict_landmarks(landmark_models, study, device):
    """{(condition, level): (series type, slice, col, row)} in volume pixels for every point it can find."""
    found = {}
    for series_type, tag in (("Sagittal T2/STIR", "sag_t2"), ("Sagittal T1", "sag_t1")):
        if series_type in study and tag in landmark_models:
            model, size = landmark_models[tag]
            points, _ = tl.predict_sagittal(model, study[series_type][1], size, device)
            for name, point in zip(data.POINTS_OF_SERIES[series_type], points):
                found[name] = (series_type, *point)
    if "Axial T2" in study and "axial" in landmark_models:
        level_mm = level_points_mm(study, found)
        if level_mm is not None:
            axial = study["Axial T2"][1]
            model, size = landmark_models["axial"]
            for level, slice_index in zip(data.LEVELS, tl.axial_slices_for_levels(axial, level_mm)):
                if slice_index < 0:
                    continue
                plane, _ = tl.predict_axial(model, axial, slice_index, size, device)
                for side, (col, row) in zip(("left", "right"), plane):
                    found[(f"{side}_subarticular_stenosis", level)] = ("Axial T2", slice_index, col, row)
    return found


def level_points_mm(study, found):
    """(5, 3) patient mm of each disc level near the midline, or None: the mean of two independent estimates
    where both exist, the canal points (Sagittal T2/STIR) and the midpoint of the left and right foramina
    (Sagittal T1), so one series' craniocaudal slip moves the chosen axial slice only half as far."""
    estimates = []
    if all(("spinal_canal_stenosis", lv) in found for lv in data.LEVELS):
        series = study["Sagittal T2/STIR"][1]
        estimates.append(tl.canal_points_mm(series, np.array([found[("spinal_canal_stenosis", lv)][1:] for lv in data.LEVELS])))
    sides = [f"{s}_neural_foraminal_narrowing" for s in ("left", "right")]
    if all((c, lv) in found for c in sides for lv in data.LEVELS):
        series = study["Sagittal T1"][1]
        both = [tl.canal_points_mm(series, np.array([found[(c, lv)][1:] for lv in data.LEVELS])) for c in sides]
        estimates.append((both[0] + both[1]) / 2)
    return np.mean(estimates, axis=0) if estimates else None


def study_crops(study, landmarks, n_slices, out_px):
    """Crops (25, S, C, C) in LABEL_COLUMNS order, groups (25,), and which rows have a landmark (25,) bool.

    Right-side crops are mirrored onto the left: axial crops flip their columns, sagittal foraminal crops
    reverse their slice order, so one head serves both sides.
    """
    crops = torch.zeros(len(data.LABEL_COLUMNS), n_slices, out_px, out_px)
    groups = torch.tensor([GROUP_OF_CONDITION[c] for c in data.CONDITIONS for _ in data.LEVELS])
    available = torch.zeros(len(data.LABEL_COLUMNS), dtype=torch.bool)
    for j, (condition, level) in enumerate((c, lv) for c in data.CONDITIONS for lv in data.LEVELS):
        if (condition, level) not in landmarks:
            continue
        series_type, slice_index, col, row = landmarks[(condition, level)][:4]
        _, series, volume = study[series_type]
        right = condition.startswith("right")
        crop = data.crop_2p5d(volume, series, slice_index, col, row, CROP_MM[groups[j]], out_px, n_slices,
                              reverse=right and series_type == "Sagittal T1")
        crops[j] = crop.flip(-1) if right and series_type == "Axial T2" else crop
        available[j] = True
    return crops, groups, available


@torch.no_grad()
def grade(severity_models, crops, groups, device):
    """Mean softmax of the severity models, (N, 3)."""
    probabilities = [model(crops.to(device), groups.to(device)).float().softmax(-1).cpu() for model in severity_models]
    return torch.stack(probabilities).mean(0).numpy()


def load_severity_models(paths, device):
    models, checkpoint = [], None
    for path in paths:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        model = SeverityNet(checkpoint["n_slices"]).to(device)
        model.load_state_dict(checkpoint["model"])
        models.append(model.eval())
    return models, checkpoint  # the last checkpoint carries the crop settings and the training prior


def shifted(study, landmarks, along_col_mm, along_row_mm):
    """Landmarks moved in-plane by the given millimetres (each slice's own pixel spacing)."""
    moved = {}
    for name, (series_type, slice_index, col, row) in landmarks.items():
        spacing = study[series_type][1].pixel_spacing[int(slice_index)]
        moved[name] = (series_type, slice_index, col + along_col_mm / spacing[1], row + along_row_mm / spacing[0])
    return moved


def grade_study(severity_models, study, landmarks, settings, device, shift_mm=0.0):
    """(25, 3) probabilities (NaN rows without a landmark) and the (25,) availability mask, averaged over shifts."""
    offsets = [(0.0, 0.0)] + ([(shift_mm, 0.0), (-shift_mm, 0.0), (0.0, shift_mm), (0.0, -shift_mm)] if shift_mm else [])
    total, available = None, None
    for along_col, along_row in offsets:
        crops, groups, available = study_crops(study, shifted(study, landmarks, along_col, along_row), settings["n_slices"], settings["crop_px"])
        probabilities = np.full((len(crops), 3), np.nan)
        if available.any():
            probabilities[available.numpy()] = grade(severity_models, crops[available], groups[available], device)
        total = probabilities if total is None else total + probabilities
    return total / len(offsets), available.numpy()


def warn_unlisted(data_dir, split, descriptions):
    """Series folders on disk that the series CSV does not list are not graded: say so, naming them."""
    listed = {(s, t) for s, types in descriptions.items() for ids in types.values() for t in ids}
    images = os.path.join(data_dir, f"{split}_images")
    on_disk = {(int(s), int(t)) for s in os.listdir(images) if s.isdigit() and os.path.isdir(os.path.join(images, s))
               for t in os.listdir(os.path.join(images, s)) if t.isdigit()} if os.path.isdir(images) else set()
    unlisted = sorted(on_disk - listed)
    if unlisted:
        warnings.warn(f"{images}: {len(unlisted)} series folders not in {split}_series_descriptions.csv are ignored, "
                      f"e.g. {', '.join(f'{s}/{t}' for s, t in unlisted[:5])}")
    return unlisted


def predict_split(data_dir, split, study_ids, landmark_models, severity_models, settings, prior, cache_dir, device, shift_mm=0.0):
    """-> (probabilities (N, 25, 3), landmark rows for landmarks_<split>.csv, {study_id: fallback columns})."""
    descriptions = data.series_by_study(data.read_series_descriptions(os.path.join(data_dir, f"{split}_series_descriptions.csv")))
    warn_unlisted(data_dir, split, descriptions)
    probabilities = np.broadcast_to(prior, (len(study_ids),) + prior.shape).copy()
    landmark_rows, fallbacks = [], {}
    for i, study_id in enumerate(study_ids):
        study, problems = load_study(data_dir, split, study_id, descriptions.get(study_id, {}), cache_dir)
        landmarks = predict_landmarks(landmark_models, study, device)
        graded, available = grade_study(severity_models, study, landmarks, settings, device, shift_mm)
        probabilities[i, available] = graded[available]
        missing = [c for c, ok in zip(data.LABEL_COLUMNS, available.tolist()) if not ok]
        if missing:
            fallbacks[study_id] = missing
            warnings.warn(f"study {study_id}: {len(missing)} rows fall back to the training prior ({', '.join(missing)}); "
                          f"{'; '.join(problems) or 'no landmark found'}")
        for (condition, level), (series_type, slice_index, col, row) in landmarks.items():
            series_id, series, _ = study[series_type]
            instance, x, y = data.volume_to_label(series, slice_index, col, row)
            landmark_rows.append(dict(study_id=study_id, series_id=series_id, instance_number=instance,
                                      condition=data.CONDITION_NAMES[data.CONDITIONS.index(condition)],
                                      level=data.LEVEL_NAMES[data.LEVELS.index(level)], x=x, y=y))
    return probabilities, landmark_rows, fallbacks


def finalise(probabilities):
    """Clip away from 0 and 1 and renormalise: a submission row must never be 0, 1, or non-finite."""
    clipped = np.clip(np.nan_to_num(probabilities, nan=1 / 3), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    return clipped / clipped.sum(-1, keepdims=True)


def truth_for(data_dir, split, study_ids):
    """The train.csv-shaped truth of these studies, or None when the split has no known labels."""
    path = os.path.join(data_dir, "train.csv" if split == "train" else "solution.csv")
    if not os.path.exists(path):
        return None
    solution = pd.read_csv(path, dtype=str, keep_default_na=False)
    solution = solution[solution["study_id"].astype(np.int64).isin(study_ids)]
    return solution if len(solution) else None


def report_scores(solution, submission, prior, study_ids, tag=""):
    """Print the score and each metric term beside the weighted-prior baseline; return both."""
    baseline = losses.probabilities_to_submission(study_ids, np.broadcast_to(prior, (len(study_ids), 25, 3)))
    ours, base = losses.condition_group_losses(solution, submission), losses.condition_group_losses(solution, baseline)
    score, base_score = float(np.mean(list(ours.values()))), float(np.mean(list(base.values())))
    print(f"{tag}score {score:.4f}  (weighted-prior baseline {base_score:.4f}, ratio {score / base_score:.3f})")
    for name in ours:
        print(f"  {name:18s} {ours[name]:.4f}  (prior {base[name]:.4f})")
    return score, base_score


def landmark_errors(predicted, truth, data_dir, split, cache_dir):
    """Per series type: median and 90th-percentile in-plane error (mm) and slice accuracy of predicted landmarks.

    predicted, truth: frames in the train_label_coordinates.csv schema (snake_case condition/level). A true
    point with no prediction on its series counts as a miss (infinite error).
    """
    truth = data.read_coordinates(truth) if isinstance(truth, str) else truth
    guesses = {(r.study_id, r.condition, r.level): r for r in predicted.itertuples(index=False)}
    errors = {s: ([], []) for s in data.SERIES_TYPES}
    for row in truth.itertuples(index=False):
        series_type = data.SERIES_OF_CONDITION[row.condition]
        guess = guesses.get((row.study_id, row.condition, row.level))
        mm, slices = errors[series_type]
        if guess is None or guess.series_id != row.series_id:
            mm.append(np.inf), slices.append(np.inf)
            continue
        series = data.load_series(os.path.join(data_dir, f"{split}_images", str(row.study_id), str(row.series_id)), cache_dir)
        true_d, *true_px = data.label_to_volume(series, row.instance_number, row.x, row.y)
        guess_d, *guess_px = data.label_to_volume(series, guess.instance_number, guess.x, guess.y)
        offset = data.series_pixel_to_patient(series, guess_d, *guess_px) - data.series_pixel_to_patient(series, true_d, *true_px)
        normal = data.slice_normals(series.orientations[true_d])
        mm.append(float(np.linalg.norm(offset - (offset @ normal) * normal)))  # in the true slice's plane
        slices.append(abs(guess_d - true_d))
    return {s: tl.summarise_errors(np.asarray(mm), np.asarray(slices)) for s, (mm, slices) in errors.items() if mm}


def print_landmark_errors(errors):
    print("landmarks      median_mm  p90_mm  slice_exact  slice_within1")
    for series_type, e in errors.items():
        print(f"{series_type:16s} {e['median_mm']:7.2f} {e['p90_mm']:7.2f} {e['slice_exact']:10.3f} {e['slice_within1']:12.3f}")


def main(argv=None):
    args = parse_args(argv)
    device = training.resolve_device(args.device)
    started = time.time()
    descriptions = data.read_series_descriptions(os.path.join(args.data_dir, f"{args.split}_series_descriptions.csv"))
    study_ids = [int(s) for s in args.studies.split(",")] if args.studies else sorted(descriptions["study_id"].unique().tolist())
    landmark_models = load_landmark_models(args.landmark_dir or args.out_dir, device)
    paths = args.severity_checkpoints.split(",") if args.severity_checkpoints else [os.path.join(args.out_dir, "severity_best.pt")]
    severity_models, checkpoint = load_severity_models(paths, device)
    prior = checkpoint["prior"]
    probabilities, landmark_rows, fallbacks = predict_split(args.data_dir, args.split, study_ids, landmark_models, severity_models,
                                                            checkpoint["settings"], prior, args.cache_dir, device, args.tta_shift_mm)
    submission = losses.probabilities_to_submission(study_ids, finalise(probabilities))
    submission.to_csv(os.path.join(args.out_dir, "submission.csv"), index=False)
    pd.DataFrame(landmark_rows, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]).to_csv(
        os.path.join(args.out_dir, f"landmarks_{args.split}.csv"), index=False)
    elapsed = time.time() - started
    print(f"wrote {len(submission)} rows for {len(study_ids)} studies to {os.path.join(args.out_dir, 'submission.csv')} "
          f"({elapsed / max(len(study_ids), 1):.2f} s/study); {len(fallbacks)} studies with fallback rows")
    truth_points = os.path.join(args.data_dir, "train_label_coordinates.csv" if args.split == "train" else "solution_coordinates.csv")
    if os.path.exists(truth_points):
        predicted = data.read_coordinates(os.path.join(args.out_dir, f"landmarks_{args.split}.csv"))
        truth = data.read_coordinates(truth_points)
        print_landmark_errors(landmark_errors(predicted, truth[truth["study_id"].isin(study_ids)], args.data_dir, args.split, args.cache_dir))
    solution = truth_for(args.data_dir, args.split, study_ids)
    if solution is not None:
        return report_scores(solution, submission, prior, solution["study_id"].astype(np.int64).tolist())
    return None


if __name__ == "__main__":
    main()
