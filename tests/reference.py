"""Independent reference implementations for the tests, written from DESIGN.md only.

Nothing here imports the project: `reference_score` is the host metric written with explicit loops,
`check_layout` checks a data folder against the competition layout, and `pixel_to_patient_mm` /
`slice_plane_distance` are the geometry of DESIGN.md. Tests compare the project's code with these.

Example:
    >>> import pandas as pd
    >>> reference_score(pd.read_csv("train.csv"), pd.read_csv("submission.csv"))

Choices made where DESIGN.md is silent (aligned with the Kaggle host's public metric, which
normalises each submitted row to sum 1 and then calls sklearn.metrics.log_loss (sklearn < 1.5) with
sample_weight):

1. Row normalisation: each submitted row (normal_mild, moderate, severe) is divided by its sum
   first. A negative, non-finite or all-zero row raises ValueError.
2. Clipping, per row, after that normalisation, as sklearn < 1.5 does it: clip all three to
   [eps, 1 - eps] (eps = np.finfo(np.float64).eps), then divide by the clipped row's sum again. For
   a row that already sums to 1 this changes -log p by at most ~1e-15 compared with clipping alone.
3. any_severe_spinal: for each study with at least one non-empty spinal cell, over those scored rows
   only: label = any Severe, weight = max row weight (4 / 2 / 1), prediction = max of the
   *normalised* `severe`. The prediction p is clipped to [eps, 1 - eps] and scored as the pair
   (1 - p, p) (sklearn's binary path). A study whose spinal cells are all empty is left out of this
   term.
4. Rows whose truth is empty (NaN, None, "" or whitespace) are not scored in any term.
5. Submission rows not asked for by the solution (other studies) are ignored; a row the solution
   needs that is missing, or a duplicated row_id, raises ValueError.
6. A term with no scored rows (total weight 0) raises ValueError: the host's sklearn call would
   fail.
   Where every any_severe label is the same class, sklearn would refuse (one label only); here the
   value is computed anyway (it is well defined).
7. Final score = plain mean of the four terms (spinal, foraminal, subarticular, any_severe_spinal).
"""

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

CONDITIONS = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing",
              "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
              "right_subarticular_stenosis"]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
COLUMNS = [f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS]
SEVERITIES = ["Normal/Mild", "Moderate", "Severe"]
CLASS_WEIGHTS = [1.0, 2.0, 4.0]
SUBMISSION_HEADER = ["row_id", "normal_mild", "moderate", "severe"]
EPS = float(np.finfo(np.float64).eps)

TITLE_CONDITIONS = {"Spinal Canal Stenosis": "Sagittal T2/STIR",
                    "Left Neural Foraminal Narrowing": "Sagittal T1",
                    "Right Neural Foraminal Narrowing": "Sagittal T1",
                    "Left Subarticular Stenosis": "Axial T2",
                    "Right Subarticular Stenosis": "Axial T2"}
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
    return np.array(
        [ipp[i] + col * col_spacing * u[i] + row * row_spacing * v[i] for i in range(3)]
    )


def slice_normal(ds):
    ds = _dataset(ds)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    u, v = iop[:3], iop[3:]
    return np.array(
        [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
    )


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

# check_layout collects human-readable problems, each starting with the file it is about. DICOM
# failures (unreadable file, pixel_array that does not decode) are reported like any other problem:
# the caller filters the ones it expects (e.g. the one corrupt file of synthetic --quirks).

_INT = re.compile(r"^[0-9]+$")
_DCM_NAME = re.compile(r"^([0-9]+)\.dcm$")


def _read_rows(data_dir, name, header, problems):
    """Rows of a CSV as lists of exact strings, or None when the file is missing or its header is
    wrong."""
    path = Path(data_dir) / name
    if not path.is_file():
        problems.append(f"{name}: missing")
        return None
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] != header:
        problems.append(f"{name}: header {rows[0] if rows else []} != {header}")
        return None
    good = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            problems.append(f"{name}: line {line} has {len(row)} fields, expected {len(header)}")
        else:
            good.append(row)
    return good


def _dicom_info(path, cache):
    """(rows, columns, list of problems) for one .dcm; decodes pixel_array once per file."""
    if path in cache:
        return cache[path]
    issues, shape = [], None
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # any failure to parse is a finding, not a crash
        cache[path] = (None, [f"unreadable by pydicom.dcmread ({type(error).__name__}: {error})"])
        return cache[path]
    try:
        shape = int(ds.Rows), int(ds.Columns)
        pixels = ds.pixel_array
        if tuple(pixels.shape) != shape:
            issues.append(f"pixel_array shape {pixels.shape} != (Rows, Columns) {shape}")
    except Exception as error:
        issues.append(f"pixel_array does not decode ({type(error).__name__}: {error})")
    match = _DCM_NAME.match(path.name)
    if match and str(ds.get("InstanceNumber", "")).strip() != str(int(match.group(1))):
        issues.append(f"InstanceNumber tag {ds.get('InstanceNumber')} != file name")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            issues.append(f"no {keyword}")
    if ds.get("BitsAllocated") != 16:
        issues.append(f"BitsAllocated {ds.get('BitsAllocated')} != 16")
    if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        issues.append(f"PhotometricInterpretation {ds.get('PhotometricInterpretation')}")
    cache[path] = shape, issues
    return cache[path]


def _check_series(data_dir, name, images, problems, cache):
    """Checks a *_series_descriptions.csv against its image folder; returns
    {(study, series): description}."""
    rows = _read_rows(data_dir, name, SERIES_HEADER, problems)
    listed = {}
    for study, series, description in rows or []:
        if not (_INT.match(study) and _INT.match(series)):
            problems.append(f"{name}: non-integer ids {study},{series}")
            continue
        if description not in DESCRIPTIONS:
            problems.append(
                f"{name}: study {study} series {series}: bad description {description!r}"
            )
        if (study, series) in listed:
            problems.append(f"{name}: duplicate series {study}/{series}")
        listed[(study, series)] = description
        folder = Path(data_dir) / images / study / series
        if not folder.is_dir() or not any(folder.glob("*.dcm")):
            problems.append(
                f"{name}: series {study}/{series} has no folder with .dcm files in {images}/"
            )
    root = Path(data_dir) / images
    if not root.is_dir():
        problems.append(f"{images}/: missing")
        return listed
    for study_dir in sorted(root.iterdir()):
        for series_dir in sorted(study_dir.iterdir()) if study_dir.is_dir() else [study_dir]:
            if (study_dir.name, series_dir.name) not in listed:
                problems.append(
                    f"{images}/{study_dir.name}/{series_dir.name}: not listed in {name}"
                )
            if not series_dir.is_dir():
                continue
            for path in sorted(series_dir.iterdir()):
                relative = f"{images}/{study_dir.name}/{series_dir.name}/{path.name}"
                if not _DCM_NAME.match(path.name):
                    problems.append(f"{relative}: name is not {{instance_number}}.dcm")
                    continue
                for issue in _dicom_info(path, cache)[1]:
                    problems.append(f"{relative}: {issue}")
    return listed


def _check_labels(rows, name, series, problems):
    """Checks a train.csv-shaped file (rows without header); returns its set of study ids."""
    studies = set()
    series_studies = {study for study, _ in series}
    for row in rows or []:
        study = row[0]
        if not _INT.match(study):
            problems.append(f"{name}: non-integer study_id {study!r}")
            continue
        if study in studies:
            problems.append(f"{name}: duplicate study_id {study}")
        studies.add(study)
        for column, value in zip(COLUMNS, row[1:]):
            if value != "" and value not in SEVERITIES:
                problems.append(f"{name}: study {study} {column}: bad value {value!r}")
        if study not in series_studies:
            problems.append(f"{name}: study {study} has no series rows")
    for study in sorted(series_studies - studies):
        problems.append(f"{name}: study {study} has series but no label row")
    return studies


def _check_coordinates(data_dir, name, images, series, label_studies, problems, cache):
    """Checks a train_label_coordinates.csv-shaped file; returns its set of study ids."""
    rows = _read_rows(data_dir, name, COORD_HEADER, problems)
    seen, studies = set(), set()
    for line, (study, series_id, instance, condition, level, x, y) in enumerate(
        rows or [], start=2
    ):
        where = f"{name}: line {line}"
        if not (_INT.match(study) and _INT.match(series_id) and _INT.match(instance)):
            problems.append(f"{where}: non-integer ids {study},{series_id},{instance}")
            continue
        studies.add(study)
        if condition not in TITLE_CONDITIONS or level not in TITLE_LEVELS:
            problems.append(f"{where}: bad condition/level {condition!r} {level!r}")
            continue
        if (study, condition, level) in seen:
            problems.append(f"{where}: duplicate {study} {condition} {level}")
        seen.add((study, condition, level))
        if label_studies is not None and study not in label_studies:
            problems.append(f"{where}: study {study} has no label row")
        if (study, series_id) not in series:
            problems.append(f"{where}: series {study}/{series_id} not listed")
            continue
        if series[(study, series_id)] != TITLE_CONDITIONS[condition]:
            problems.append(f"{where}: {condition} on a {series[(study, series_id)]!r} series, "
                            f"expected {TITLE_CONDITIONS[condition]!r}")
        path = Path(data_dir) / images / study / series_id / f"{instance}.dcm"
        if not path.is_file():
            problems.append(f"{where}: no file {images}/{study}/{series_id}/{instance}.dcm")
            continue
        try:
            col, row = float(x), float(y)
        except ValueError:
            problems.append(f"{where}: x, y not numbers {x!r} {y!r}")
            continue
        shape = _dicom_info(path, cache)[0]
        if shape is not None and not (0 <= col < shape[1] and 0 <= row < shape[0]):
            problems.append(f"{where}: (x, y) = ({x}, {y}) outside the {shape[1]}x{shape[0]} image")
    return studies


def _check_submission(data_dir, test_studies, problems):
    name = "sample_submission.csv"
    rows = _read_rows(data_dir, name, SUBMISSION_HEADER, problems)
    if rows is None:
        return
    found, values = {}, set()
    for row_id, *probs in rows:
        match = re.match(r"^([0-9]+)_(.+)$", row_id)
        if not match or match.group(2) not in COLUMNS:
            problems.append(f"{name}: bad row_id {row_id!r}")
            continue
        if row_id in found:
            problems.append(f"{name}: duplicate row_id {row_id}")
        found[row_id] = match.group(1)
        try:
            numbers = [float(p) for p in probs]
        except ValueError:
            problems.append(f"{name}: {row_id}: non-numeric values {probs}")
            continue
        if not all(math.isfinite(p) and p >= 0 for p in numbers) or abs(sum(numbers) - 1) > 1e-6:
            problems.append(f"{name}: {row_id}: values {probs} are not probabilities summing to 1")
        values.add(tuple(probs))
    if len(values) > 1:
        problems.append(
            f"{name}: rows are not one constant placeholder "
            f"({len(values)} distinct; may leak truth)"
        )
    for study in sorted(set(found.values()) - test_studies):
        problems.append(f"{name}: study {study} is not a test study")
    for study in sorted(test_studies):
        missing = [c for c in COLUMNS if f"{study}_{c}" not in found]
        if missing:
            problems.append(f"{name}: test study {study} lacks {len(missing)} of 25 rows")


def check_layout(data_dir):
    """Problems (strings naming their file) of a folder in the competition layout; [] means OK."""
    data_dir = Path(data_dir)
    problems, cache = [], {}
    train_series = _check_series(data_dir, "train_series_descriptions.csv", "train_images",
                                 problems, cache)
    test_series = _check_series(data_dir, "test_series_descriptions.csv", "test_images", problems,
                                cache)
    train_rows = _read_rows(data_dir, "train.csv", TRAIN_HEADER, problems)
    train_studies = _check_labels(train_rows, "train.csv", train_series, problems)
    coord_studies = _check_coordinates(data_dir, "train_label_coordinates.csv", "train_images",
                                       train_series,
                                       train_studies if train_rows is not None else None, problems,
                                       cache)
    test_studies = {study for study, _ in test_series}
    _check_submission(data_dir, test_studies, problems)
    solution_studies = None
    if (data_dir / "solution.csv").exists():
        solution_rows = _read_rows(data_dir, "solution.csv", TRAIN_HEADER, problems)
        if solution_rows is not None:
            solution_studies = _check_labels(solution_rows, "solution.csv", test_series, problems)
    if (data_dir / "solution_coordinates.csv").exists():
        _check_coordinates(data_dir, "solution_coordinates.csv", "test_images", test_series,
                           solution_studies, problems, cache)
    train_series_ids = {series for _, series in train_series}
    for study in sorted(test_studies & train_studies):
        problems.append(f"train.csv: test study {study} has training labels (test truth leaks)")
    for study in sorted(test_studies & coord_studies):
        problems.append(
            f"train_label_coordinates.csv: test study {study} has coordinates (test truth leaks)"
        )
    for study in sorted(test_studies & {study for study, _ in train_series}):
        problems.append(
            f"train_series_descriptions.csv: test study {study} is also a training study"
        )
    for study, series in sorted(test_series):
        if series in train_series_ids:
            problems.append(
                f"test_series_descriptions.csv: series {series} of {study} "
                "is also a training series"
            )
    return problems
