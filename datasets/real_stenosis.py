"""Real images with real canal-stenosis labels as competition studies, and a k-fold report on them.

    python datasets/real_stenosis.py convert --source ../shared/real_stenosis --out real
    python datasets/real_stenosis.py report --data-dir real --runs 'runs/real_fold*'

The source is one mid-sagittal T2 slice per patient (384 x 384 PNG) with YOLO boxes: discs (classes
0, 1, 3, 4) and canal stenosis (class 2) at the posterior margin of a disc. Each patient becomes a
study with a one-slice Sagittal T2/STIR series. Levels: the lowest five discs, top to bottom
L1/L2..L5/S1 (boxes less than 3 % of the frame apart are one disc). Canal point: the middle of the
disc's posterior edge, by the same rule at every level, so the point never tells the grade. Grade:
Moderate where a stenosis box lies nearer that disc than half the mean disc gap, else Normal/Mild;
the other 20 columns stay empty. The source has no pixel spacing; 0.8 mm is assumed (a 307 mm
field, as real sagittal series have).

`report` pools the validation grades of a k-fold run (RUN/validation_fold<k>.csv, written by
train_severity.py) and prints the spinal term against the weighted prior of the training folds, the
AUC of P(not Normal/Mild) overall and per level, a reliability table, and each fold's landmarks.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data.py & co.

import data
import losses
import tables

PIXEL_MM = 0.8  # assumed: the source images carry no spacing
DISC_CLASSES = 0, 1, 3, 4
STENOSIS_CLASS = 2
SAME_DISC = 0.03  # disc boxes closer than this (fraction of the frame) box one disc
STUDY_ID_BASE = 10000  # study 10030 is patient 0030


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert",
                                  help="write the patients as studies in the competition layout")
    convert.add_argument("--source", default="../shared/real_stenosis",
                         help="folder with images/ and labels/")
    convert.add_argument("--out", required=True, help="data folder to write (competition layout)")
    convert.add_argument("--studies", type=int, default=0,
                         help="convert only the first N patients (0: all)")
    report = commands.add_parser("report",
                                 help="pool and score the validation folds of a k-fold run")
    report.add_argument("--data-dir", required=True,
                        help="the converted data folder (its train.csv is the truth)")
    report.add_argument("--runs", required=True, help="glob of the fold run folders, quoted")
    report.add_argument("--bins", type=int, default=5, help="bins of the reliability table")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# boxes -> levels, canal points and grades


def read_boxes(path):
    """(K, 5) [class, x_centre, y_centre, width, height] as fractions of the frame."""
    rows = [line.split() for line in open(path) if line.strip()]
    if not rows or any(len(row) != 5 for row in rows):
        raise ValueError(f"{path}: expected lines of 'class x_centre y_centre width height'")
    return np.array(rows, dtype=np.float64)


def lumbar_discs(boxes, path):
    """(5, 4) [x_centre, y_centre, width, height] of L1/L2..L5/S1: the lowest five discs."""
    discs = boxes[np.isin(boxes[:, 0], DISC_CLASSES)]
    discs = discs[np.argsort(discs[:, 2])]
    merged = []  # boxes of one disc (two classes on the same disc) -> their mean
    for box in discs[:, 1:]:
        if merged and box[1] - merged[-1][-1][1] < SAME_DISC:
            merged[-1].append(box)
        else:
            merged.append([box])
    if len(merged) < data.N_LEVELS:
        raise ValueError(f"{path}: {len(merged)} disc boxes, need {data.N_LEVELS}")
    return np.array([np.mean(group, axis=0) for group in merged[-data.N_LEVELS :]])


def canal_grades(boxes, discs):
    """(5,) severity index per level: Moderate where a stenosis box is nearer that disc
    than half the mean disc gap."""
    grades = np.zeros(data.N_LEVELS, dtype=np.int64)
    half_gap = 0.5 * np.diff(discs[:, 1]).mean()
    for box in boxes[boxes[:, 0] == STENOSIS_CLASS]:
        distance = np.abs(discs[:, 1] - box[2])
        if distance.min() < half_gap:  # farther ones are thoracic
            grades[distance.argmin()] = data.SEVERITIES.index("Moderate")
    return grades


def canal_points_px(discs, size):
    """(5, 2) [x, y] original pixels: the middle of each disc's posterior (right-hand) edge."""
    return np.stack([(discs[:, 0] + discs[:, 2] / 2) * size, discs[:, 1] * size], axis=1)


# -----------------------------------------------------------------------------
# writing a study


def write_slice(path, pixels, study_id, series_id):
    """One MR file: a mid-sagittal slice, columns toward posterior (+y), rows toward feet (-z)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[str(study_id), str(series_id), "1"]
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(study_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study_id), str(series_id)])
    ds.PatientID = str(study_id)
    ds.Modality = "MR"
    ds.SeriesDescription = "Sagittal T2/STIR"
    ds.InstanceNumber = 1
    half_mm = pixels.shape[0] * PIXEL_MM / 2
    ds.ImagePositionPatient = ["0", f"{-half_mm:.2f}", f"{half_mm:.2f}"]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.PixelSpacing = [f"{PIXEL_MM}", f"{PIXEL_MM}"]
    ds.SliceThickness = "4"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def read_patient(source, name):
    """(pixels (H, W) uint16, lumbar discs (5, 4), boxes) of one patient's image and label file."""
    stem = os.path.splitext(name)[0]
    box_path = os.path.join(source, "labels", stem + ".txt")
    boxes = read_boxes(box_path)
    image = Image.open(os.path.join(source, "images", name)).convert("L")
    pixels = np.asarray(image, dtype=np.uint16) * 16  # 8-bit grey into 12 of the 16 stored bits
    return pixels, lumbar_discs(boxes, box_path), boxes


def convert(source, out_dir, limit=0):
    """Write every patient of source as a study; returns the number written."""
    names = sorted(os.listdir(os.path.join(source, "images")))
    names = names[:limit] if limit else names
    label_rows, point_rows, series_rows = [], [], []
    for name in names:
        study_id = STUDY_ID_BASE + int(name.split("_")[0])
        series_id = study_id * 10 + 1
        pixels, discs, boxes = read_patient(source, name)
        series_dir = os.path.join(out_dir, "train_images", str(study_id), str(series_id))
        os.makedirs(series_dir, exist_ok=True)
        write_slice(os.path.join(series_dir, "1.dcm"), pixels, study_id, series_id)
        row = {column: "" for column in data.LABEL_COLUMNS}
        for level, grade in enumerate(canal_grades(boxes, discs)):
            row[f"spinal_canal_stenosis_{data.LEVELS[level]}"] = data.SEVERITIES[grade]
        label_rows.append(dict(study_id=study_id, **row))
        for level, (x, y) in enumerate(canal_points_px(discs, pixels.shape[0])):
            point = dict(study_id=study_id, series_id=series_id, instance_number=1)
            point.update(condition="Spinal Canal Stenosis", level=data.LEVEL_NAMES[level])
            point_rows.append(dict(point, x=round(float(x), 2), y=round(float(y), 2)))
        series_rows.append(dict(study_id=study_id, series_id=series_id,
                                series_description="Sagittal T2/STIR"))
    os.makedirs(out_dir, exist_ok=True)
    tables_out = {
        "train.csv": pd.DataFrame(label_rows, columns=["study_id"] + data.LABEL_COLUMNS),
        "train_label_coordinates.csv": pd.DataFrame(point_rows),
        "train_series_descriptions.csv": pd.DataFrame(series_rows),
        "test_series_descriptions.csv": pd.DataFrame(columns=["study_id", "series_id",
                                                              "series_description"]),
        "sample_submission.csv": pd.DataFrame(columns=["row_id"] + data.SUBMISSION_COLUMNS),
    }
    for file_name, frame in tables_out.items():
        frame.to_csv(os.path.join(out_dir, file_name), index=False)
    return len(names)


# -----------------------------------------------------------------------------
# the k-fold report


def auc(scores, positive):
    """Area under the ROC curve: the chance that a positive outranks a negative (ties: half)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # tied scores share their mean rank
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_positive, n_negative = positive.sum(), (~positive).sum()
    return float(
        (ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    )


def reliability(predicted, grades, bins):
    """[(low, high, rows, mean predicted, observed rate, metric target)] over equal-width bins of
    predicted P(not Normal/Mild). The metric weighs Moderate 2 and Severe 4, so the prediction that
    minimises it is not the observed rate of not Normal/Mild but
    (2 * Moderate + 4 * Severe) / (Normal + 2 * Moderate + 4 * Severe)
    counted over the bin: the metric target, which a grader fitted to the metric should match."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    table = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (predicted >= low) & ((predicted < high) | (high == 1.0))
        counts = np.bincount(grades[inside], minlength=data.N_SEVERITIES) * np.asarray(
            data.SEVERITY_WEIGHTS
        )
        if inside.any():
            table.append(
                (low, high, int(inside.sum()), float(predicted[inside].mean()),
                 float((grades[inside] > 0).mean()), float(counts[1:].sum() / counts.sum()))
            )
        else:
            table.append((low, high, 0, float("nan"), float("nan"), float("nan")))
    return table


def fold_prior_submission(study_ids, folds, all_ids, all_labels):
    """Each graded study's baseline: the weighted prior of the studies outside its fold (its fold's
    training studies), in submission format."""
    probabilities = np.zeros((len(study_ids), data.N_LABELS, data.N_SEVERITIES))
    for fold in np.unique(folds):
        outside = ~np.isin(all_ids, study_ids[folds == fold])
        probabilities[folds == fold] = losses.weighted_prior(all_labels[outside], smoothing=1.0)
    return losses.probabilities_to_submission(study_ids, probabilities)


def spinal_rows(study_ids, labels, submission):
    """(P(not Normal/Mild), true grade, level index, study index) of every labelled spinal row."""
    probabilities = submission.set_index("row_id")
    scores, grades, levels, studies = [], [], [], []
    for index, (study_id, study_labels) in enumerate(zip(study_ids, labels)):
        for level, name in enumerate(data.LEVELS):
            column = f"spinal_canal_stenosis_{name}"
            grade = study_labels[data.LABEL_COLUMNS.index(column)]
            if grade == data.MISSING:
                continue
            row = probabilities.loc[f"{study_id}_{column}"]
            scores.append(row["moderate"] + row["severe"])
            grades.append(grade)
            levels.append(level)
            studies.append(index)
    return np.array(scores), np.array(grades), np.array(levels), np.array(studies)


def read_folds(data_dir, runs_glob):
    """(study ids, labels, fold of each, the folds' validation files [path], their frames, all ids,
    all labels of train.csv) for the studies graded by a k-fold run."""
    all_ids, all_labels = tables.read_labels(os.path.join(data_dir, "train.csv"))
    paths = sorted(glob.glob(os.path.join(runs_glob, "validation_fold*.csv")))
    if not paths:
        raise FileNotFoundError(f"{runs_glob}: no validation_fold*.csv (train_severity.py --fold "
                                "writes one)")
    frames = [pd.read_csv(path) for path in paths]
    fold_of = {}
    for k, frame in enumerate(frames):
        for row_id in frame["row_id"]:
            fold_of[int(row_id.split("_")[0])] = k
    keep = np.isin(all_ids, list(fold_of))
    folds = np.array([fold_of[s] for s in all_ids[keep].tolist()])
    return all_ids[keep], all_labels[keep], folds, paths, frames, all_ids, all_labels


def report(data_dir, runs_glob, bins):
    """Print the pooled k-fold figures, then each fold's; returns the pooled ones as a dict."""
    study_ids, labels, folds, paths, frames, all_ids, all_labels = read_folds(data_dir, runs_glob)
    graded = pd.concat(frames)
    solution = losses.labels_to_solution(study_ids, labels)
    prior = fold_prior_submission(study_ids, folds, all_ids, all_labels)
    scores, grades, levels, row_study = spinal_rows(study_ids, labels, graded)
    positives = grades > 0
    out = dict(studies=len(study_ids), folds=len(paths),
               spinal=losses.condition_group_losses(solution, graded)["spinal"],
               prior_spinal=losses.condition_group_losses(solution, prior)["spinal"],
               auc=auc(scores, positives),
               level_auc=[auc(scores[levels == k], positives[levels == k]) for k in range(5)])
    out["reliability"] = reliability(scores, grades, bins)
    print(f"{len(study_ids)} studies in {len(paths)} folds")
    print(f"spinal term {out['spinal']:.3f}, weighted prior {out['prior_spinal']:.3f}, "
          f"ratio {out['spinal'] / out['prior_spinal']:.3f}")
    per_level = " ".join(f"{name} {value:.3f}" for name, value in zip(data.LEVEL_NAMES,
                                                                        out["level_auc"]))
    print(f"AUC of P(not Normal/Mild) {out['auc']:.3f}; per level {per_level}")
    mean_severe = graded[graded["row_id"].str.contains("spinal")]["severe"].mean()
    print(f"mean P(Severe) on spinal rows {mean_severe:.3f}")
    print("reliability of P(not Normal/Mild): bin, rows, mean predicted, observed rate, "
          "metric target (1/2/4 weights)")
    for low, high, count, predicted, observed, target in out["reliability"]:
        print(f"  {low:.1f}-{high:.1f}  {count:5d}  {predicted:.3f}  {observed:.3f}  {target:.3f}")
    for k, path in enumerate(paths):
        inside, rows = folds == k, folds[row_study] == k
        fold_solution = losses.labels_to_solution(study_ids[inside], labels[inside])
        fold_spinal = losses.condition_group_losses(fold_solution, frames[k])["spinal"]
        fold_prior = losses.condition_group_losses(fold_solution, prior)["spinal"]
        print(f"{path}: {inside.sum()} studies, spinal {fold_spinal:.3f} (prior {fold_prior:.3f}), "
              f"AUC {auc(scores[rows], positives[rows]):.3f}, "
              f"landmarks {landmark_error(os.path.dirname(path))}")
    return out


def landmark_error(run):
    """'median / p90 mm' of the canal landmarks at the best epoch of the run's landmark log."""
    args_path = os.path.join(run, "args.json")
    saved = json.load(open(args_path)) if os.path.exists(args_path) else {}
    folder = saved.get("train_severity", {}).get("landmark_dir") or run
    log_path = os.path.join(folder, "landmarks_sag_t2.csv")
    if not os.path.exists(log_path):
        return "not found"
    log = pd.read_csv(log_path)
    best = log.loc[log["median_mm"].idxmin()]
    return f"median {best['median_mm']:.2f} mm, p90 {best['p90_mm']:.2f} mm"
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.command == "convert":
        count = convert(args.source, args.out, args.studies)
        print(f"wrote {count} studies to {args.out}")
        return count
    return report(args.data_dir, args.runs, args.bins)


if __name__ == "__main__":
    main()
