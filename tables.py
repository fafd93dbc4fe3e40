"""The competition's CSV tables: labels, label coordinates and series descriptions as arrays and
records; folds.

study_ids, labels = read_labels("train.csv")          # labels (N, 25) int64, -1 = empty cell
# [LabelledSeries] with the points labelled on each
items = labelled_series("demo", "train")
"""

import os
from collections import namedtuple

import numpy as np
import pandas as pd

from data import (CONDITION_NAMES, CONDITIONS, LABEL_COLUMNS, LEVEL_NAMES, LEVELS, MISSING,
                  SERIES_TYPES, SEVERITIES)

# a labelled point as train_label_coordinates.csv gives it: instance number and x, y in that file's
# own pixels
LabelPoint = namedtuple("LabelPoint", "series_id instance_number x y")
# a series of a split with the points labelled on it: {(condition, level): LabelPoint}
LabelledSeries = namedtuple("LabelledSeries", "study_id series_id series_type series_dir points")


def _fail(path, message):
    raise ValueError(f"{path}: {message}")


def read_labels(path):
    """train.csv -> (study_ids (N,) int64, labels (N, 25) int64), class index or MISSING for an
    empty cell."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [c for c in ["study_id"] + LABEL_COLUMNS if c not in frame.columns]
    if absent:
        _fail(path, f"missing columns {absent}")
    extra = [c for c in frame.columns if c not in ["study_id"] + LABEL_COLUMNS]
    if extra:
        _fail(path, f"unknown columns {extra}")
    codes = {s: i for i, s in enumerate(SEVERITIES)}
    codes[""] = MISSING
    labels = np.full((len(frame), len(LABEL_COLUMNS)), MISSING, dtype=np.int64)
    for j, column in enumerate(LABEL_COLUMNS):
        values = frame[column].str.strip()
        unknown = sorted(set(values) - set(codes))
        if unknown:
            row = int(np.flatnonzero(values.isin(unknown))[0]) + 2  # +2: header line, 1-based
            _fail(
                path,
                f"line {row}, column {column}: unknown severity {unknown[0]!r} "
                f"(expected one of {SEVERITIES} or empty)",
            )
        labels[:, j] = values.map(codes).to_numpy()
    return frame["study_id"].astype(np.int64).to_numpy(), labels


def _normalise_names(values, title_names, snake_names, path, column):
    """Map Title Case ('L1/L2') or snake_case ('l1_l2') strings to snake_case; fail on anything
    else."""
    lookup = {t.lower(): s for t, s in zip(title_names, snake_names)} | {s: s for s in snake_names}
    mapped = values.str.strip().str.lower().map(lookup)
    if mapped.isna().any():
        row = int(np.flatnonzero(mapped.isna().to_numpy())[0])
        _fail(path, f"line {row + 2}: unknown {column} {values.iloc[row]!r}")
    return mapped


def read_coordinates(path):
    """train_label_coordinates.csv -> DataFrame with snake_case condition/level and float x, y."""
    frame = pd.read_csv(path)
    needed = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        _fail(path, f"missing columns {absent}")
    frame["condition"] = _normalise_names(frame["condition"].astype(str), CONDITION_NAMES,
                                          CONDITIONS, path, "condition")
    frame["level"] = _normalise_names(
        frame["level"].astype(str), LEVEL_NAMES, LEVELS, path, "level"
    )
    bad = ~np.isfinite(frame[["x", "y"]].to_numpy(float)).all(axis=1)
    if bad.any():
        _fail(path, f"line {int(np.flatnonzero(bad)[0]) + 2}: x or y is not a finite number")
    return frame[needed].astype(
        {"study_id": np.int64, "series_id": np.int64, "instance_number": np.int64}
    )


def read_series_descriptions(path):
    """*_series_descriptions.csv -> DataFrame(study_id, series_id, series_description), strings
    checked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: series description file not found")
    frame = pd.read_csv(
        path, dtype={"study_id": np.int64, "series_id": np.int64, "series_description": str}
    )
    unknown = ~frame["series_description"].isin(SERIES_TYPES)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        _fail(
            path,
            f"line {row + 2}: unknown series_description "
            f"{frame['series_description'].iloc[row]!r} (expected one of {SERIES_TYPES})",
        )
    return frame


def series_by_study(descriptions):
    """{study_id: {series type: [series_id, ...]}}; a type a study lacks maps to []; several are
    kept in file order."""
    out = {}
    for row in descriptions.itertuples(index=False):
        per_type = out.setdefault(int(row.study_id), {s: [] for s in SERIES_TYPES})
        per_type[row.series_description].append(int(row.series_id))
    return out


def coordinates_path(data_dir, coordinates):
    """The coordinate file a --coordinates flag names: a path, or a file name in data_dir."""
    return coordinates if os.path.exists(coordinates) else os.path.join(data_dir, coordinates)


def labelled_series(data_dir, split="train", coordinates=""):
    """[LabelledSeries] of every series listed in {split}_series_descriptions.csv, with the points
    labelled on it ({} when the split has no coordinate file or the series carries no label).
    coordinates: another coordinate file (coordinates_path), e.g. a corrected copy; it must
    exist."""
    descriptions = read_series_descriptions(
        os.path.join(data_dir, f"{split}_series_descriptions.csv")
    )
    coordinates_file = os.path.join(data_dir, f"{split}_label_coordinates.csv")
    if coordinates:
        coordinates_file = coordinates_path(data_dir, coordinates)
        if not os.path.exists(coordinates_file):
            _fail(coordinates_file, "no such coordinate file (--coordinates)")
    points = {}
    if os.path.exists(coordinates_file):
        for row in read_coordinates(coordinates_file).itertuples(index=False):
            points.setdefault(row.series_id, {})[(row.condition, row.level)] = LabelPoint(
                row.series_id, row.instance_number, row.x, row.y
            )
    return [
        LabelledSeries(
            int(row.study_id),
            int(row.series_id),
            row.series_description,
            os.path.join(data_dir, f"{split}_images", str(row.study_id), str(row.series_id)),
            points.get(row.series_id, {}),
        )
        for row in descriptions.itertuples(index=False)
    ]


def read_flagged(path):
    """A CSV that names labels by study_id, condition and level (audit.py's label_audit.csv,
    synthetic.py's label_errors.csv) -> DataFrame, condition and level in snake_case."""
    frame = pd.read_csv(path)
    absent = [c for c in ("study_id", "condition", "level") if c not in frame.columns]
    if absent:
        _fail(path, f"missing columns {absent}")
    frame["condition"] = _normalise_names(frame["condition"].astype(str), CONDITION_NAMES,
                                          CONDITIONS, path, "condition")
    frame["level"] = _normalise_names(frame["level"].astype(str), LEVEL_NAMES, LEVELS, path,
                                      "level")
    return frame.astype({"study_id": np.int64})


def without_flagged(items, flagged):
    """([LabelledSeries] with the points a read_flagged frame names left out, how many were).

    The point is dropped, so training masks it: no heatmap target, no crop (and a row without a
    crop has its grade masked in the severity loss)."""
    names = set(zip(flagged["study_id"].tolist(), flagged["condition"], flagged["level"]))
    kept, dropped = [], 0
    for item in items:
        points = {name: point for name, point in item.points.items()
                  if (item.study_id, *name) not in names}
        dropped += len(item.points) - len(points)
        kept.append(item._replace(points=points))
    return kept, dropped


def training_series(data_dir, exclude_labels="", coordinates=""):
    """labelled_series of the train split (from the coordinate file --coordinates names, if any),
    less the points an audit CSV flags when exclude_labels names one (both training scripts'
    --exclude-labels; the count left out is printed)."""
    items = labelled_series(data_dir, "train", coordinates)
    if not exclude_labels:
        return items
    items, dropped = without_flagged(items, read_flagged(exclude_labels))
    print(f"--exclude-labels: {dropped} labelled points left out ({exclude_labels})")
    return items


def assign_folds(study_ids, n_folds=5, seed=0):
    """Deterministic k-fold split by study: {study_id: fold}. Same ids and seed -> same folds, any
    input order."""
    unique = np.unique(np.asarray(study_ids, dtype=np.int64))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {int(unique[i]): rank % n_folds for rank, i in enumerate(order)}
