"""Independent reference implementations for the tests, written from DESIGN.md only.

Nothing here imports the project: `reference_score` is the host metric written with explicit loops,
`check_layout` checks a data folder against the competition layout, and `pixel_to_patient_mm` /
`slice_plane_distance` are the geometry of DESIGN.md. Tests compare the project's code with these.

Example:
    >>> import pandas as pd
    >>> reference_score(pd.read_csv("train.csv"), pd.read_csv("submission.csv"))

Choices made where DESIGN.md is silent (aligned with the Kaggle host's public metric, which normalises
each submitted row to sum 1 and then calls sklearn.metrics.log_loss (sklearn < 1.5) with sample_weight):

1. Row normalisation: each submitted row (normal_mild, moderate, severe) is divided by its sum first.
   A negative, non-finite or all-zero row raises ValueError.
2. Clipping, per row, after that normalisation, as sklearn < 1.5 does it: clip all three to
   [eps, 1 - eps] (eps = np.finfo(np.float64).eps), then divide by the clipped row's sum again. For a
   row that already sums to 1 this changes -log p by at most ~1e-15 compared with clipping alone.
3. any_severe_spinal: for each study with at least one non-empty spinal cell, over those scored rows
   only: label = any Severe, weight = max row weight (4 / 2 / 1), prediction = max of the *normalised*
   `severe`. The prediction p is clipped to [eps, 1 - eps] and scored as the pair (1 - p, p) (sklearn's
   binary path). A study whose spinal cells are all empty is left out of this term.
4. Rows whose truth is empty (NaN, None, "" or whitespace) are not scored in any term.
5. Submission rows not asked for by the solution (other studies) are ignored; a row the solution
   needs that is missing, or a duplicated row_id, raises ValueError.
6. A term with no scored rows (total weight 0) raises ValueError: the host's sklearn call would fail.
   Where every any_severe label is the same class, sklearn would refuse (one label only); here the
   value is computed anyway (it is well defined).
7. Final score = plain mean of the four terms (spinal, foraminal, subarticular, any_severe_spinal).
"""
import math
import os
import re

import numpy as np
import pandas as pd
import pydicom

CONDITIONS = [
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
COLUMNS = [f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS]
SEVERITIES = ["Normal/Mild", "Moderate", "Severe"]
CLASS_WEIGHTS = [1.0, 2.0, 4.0]
SUBMISSION_HEADER = ["row_id", "normal_mild", "moderate", "severe"]
EPS = float(np.finfo(np.float64).eps)

TITLE_CONDITIONS = {
    "Spinal Canal Stenosis": "Sagittal T2/STIR",
    "Left Neural Foraminal Narrowing": "Sagittal T1",
    "Right Neural Foraminal Narrowing": "Sagittal T1",
    "Left Subarticular Stenosis": "Axial T2",
    "Right Subarticular Stenosis": "Axial T2",
}
TITLE_LEVELS = ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
DESCRIPTIONS = ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"]
TRAIN_HEADER = ["study_id"] + COLUMNS
COORD_HEADER = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
SERIES_HEADER = ["study_id", "series_id", "series_description"]


# ----------------------------------------------------------------------------- metric

def _is_empty(value):
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _group(column):
    for group in ("spinal", "foraminal", "subarticular"):
        if group in column:
            return group
    raise ValueError(f"no condition group in {column!r}")


def _normalised_rows(submission_df):
    """row_id -> [normal_mild, moderate, severe] divided by the row sum."""
    rows = {}
    for row_id, a, b, c in zip(submission_df["row_id"], submission_df["normal_mild"],
                               submission_df["moderate"], submission_df["severe"]):
        row_id = str(row_id)
        if row_id in rows:
            raise ValueError(f"duplicate row_id {row_id}")
        values = [float(a), float(b), float(c)]
        total = 0.0
        for v in values:
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"row {row_id}: values must be finite and >= 0, got {values}")
            total += v
        if total <= 0:
            raise ValueError(f"row {row_id}: all-zero prediction")
        rows[row_id] = [v / total for v in values]
    return rows


def _clipped_prob(probs, k):
    """sklearn < 1.5 log_loss: clip every class to [eps, 1-eps], renormalise, take class k."""
    clipped = [min(max(p, EPS), 1.0 - EPS) for p in probs]
    total = 0.0
    for p in clipped:
        total += p
    return clipped[k] / total


def _study_key(study_id):
    return str(int(float(study_id))) if not isinstance(study_id, str) else study_id.strip()


def reference_score(solution_df, submission_df):
    """Host metric. solution_df: train.csv-shaped; submission_df: sample_submission-shaped."""
    probs = _normalised_rows(submission_df)
    sums = {"spinal": [0.0, 0.0], "foraminal": [0.0, 0.0], "subarticular": [0.0, 0.0]}
    severe_sum = [0.0, 0.0]
    for _, truth_row in solution_df.iterrows():
        study = _study_key(truth_row["study_id"])
        any_label, any_weight, any_pred, any_scored = 0, 0.0, -1.0, False
        for column in COLUMNS:
            truth = truth_row[column]
            if _is_empty(truth):
                continue
            if truth not in SEVERITIES:
                raise ValueError(f"study {study} {column}: unknown severity {truth!r}")
            row_id = f"{study}_{column}"
            if row_id not in probs:
                raise ValueError(f"submission lacks row {row_id}")
            k = SEVERITIES.index(truth)
            weight = CLASS_WEIGHTS[k]
            group = _group(column)
            sums[group][0] += weight * -math.log(_clipped_prob(probs[row_id], k))
            sums[group][1] += weight
            if group == "spinal":
                any_scored = True
                any_label = max(any_label, 1 if k == 2 else 0)
                any_weight = max(any_weight, weight)
                any_pred = max(any_pred, probs[row_id][2])
        if any_scored:
            p = min(max(any_pred, EPS), 1.0 - EPS)
            pair = [1.0 - p, p]
            severe_sum[0] += any_weight * -math.log(pair[any_label] / (pair[0] + pair[1]))
            severe_sum[1] += any_weight
    losses = []
    for name, (numerator, denominator) in list(sums.items()) + [("any_severe_spinal", severe_sum)]:
        if denominator <= 0:
            raise ValueError(f"no scored rows for {name}")
        losses.append(numerator / denominator)
    return sum(losses) / len(losses)


def column_prior_submission(train_df, class_weights=(1.0, 1.0, 1.0), studies=None):
    """Per-column class frequencies of train_df (empty cells skipped), times class_weights,
    renormalised, written as a submission for `studies` (default: the studies of train_df)."""
    prior = {}
    for column in COLUMNS:
        counts = [0.0, 0.0, 0.0]
        for value in train_df[column]:
            if not _is_empty(value):
                counts[SEVERITIES.index(value)] += 1.0
        scaled = [counts[k] * class_weights[k] for k in range(3)]
        total = sum(scaled)
        prior[column] = [s / total for s in scaled]
    if studies is None:
        studies = list(train_df["study_id"])
    rows = []
    for study in studies:
        for column in COLUMNS:
            rows.append([f"{_study_key(study)}_{column}"] + prior[column])
    return pd.DataFrame(rows, columns=SUBMISSION_HEADER)


# ----------------------------------------------------------------------------- geometry

def _dataset(ds_or_path):
    if isinstance(ds_or_path, (str, os.PathLike)):
        return pydicom.dcmread(ds_or_path, stop_before_pixels=True)
    return ds_or_path


def pixel_to_patient_mm(ds, col, row):
    """Patient-space point (mm, LPS) of pixel (col, row): IPP + col*PS[1]*u + row*PS[0]*v."""
    ds = _dataset(ds)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    iop = [float(v) for v in ds.ImageOrientationPatient]
    row_spacing, col_spacing = float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
    u, v = iop[:3], iop[3:]
    return np.array([ipp[i] + col * col_spacing * u[i] + row * row_spacing * v[i] for i in range(3)])


def slice_normal(ds):
    ds = _dataset(ds)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    u, v = iop[:3], iop[3:]
    return np.array([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])


def slice_plane_distance(ds, point_mm):
    """Signed distance (mm) of point_mm from the slice plane, along n = u x v."""
    ds = _dataset(ds)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    n = slice_normal(ds)
    return float(sum((float(point_mm[i]) - ipp[i]) * n[i] for i in range(3)))


def patient_mm_to_pixel(ds, point_mm):
    """Inverse of pixel_to_patient_mm for a point projected onto the plane: (col, row, distance)."""
    ds = _dataset(ds)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    iop = [float(v) for v in ds.ImageOrientationPatient]
    d = [float(point_mm[i]) - ipp[i] for i in range(3)]
    along_u = sum(d[i] * iop[i] for i in range(3))
    along_v = sum(d[i] * iop[3 + i] for i in range(3))
    return (along_u / float(ds.PixelSpacing[1]), along_v / float(ds.PixelSpacing[0]),
            slice_plane_distance(ds, point_mm))


# ----------------------------------------------------------------------------- layout

from layout_reference import check_layout  # noqa: E402,F401  (kept in its own file for size)
