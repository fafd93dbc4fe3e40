"""Label audit: the training labels that contradict the images, named before anyone trains on them.

    python tools/audit.py --data-dir demo --out-dir runs/audit
    python tools/audit.py --data-dir demo --out-dir runs/audit --landmark-dir runs/demo
    python tools/audit.py --data-dir ../shared/real_labels --out-dir runs/real_audit --labels-only

(../shared/real_labels holds no train_label_coordinates.csv: add --coordinates
train_label_coordinates.fix01b.csv.) Writes RUN/label_audit.csv, one row per suspect label and
kind of problem: study_id, series_id, condition, level, kind, the evidence (mm, slices, pixels) and
a reason; prints the count per kind. Each label goes through its series' DICOM headers into patient
space (data.py), where a left label must lie on the patient's left, the levels must follow each
other down the spine, and a label must lie at its own level among the study's other labels; with
--landmark-dir, also near what the landmark models predict there. Without images (--labels-only,
or no train_images/) only the checks on the coordinate file alone run. Where the data has
synthetic.py's label_errors.csv, the audit is scored against it (RUN/audit_benchmark.csv).
Train on what survives with `train_landmarks.py/train_severity.py --exclude-labels
RUN/label_audit.csv`. With --landmark-dir it also writes RUN/train_label_coordinates.repaired.csv:
every label, the flagged ones moved to where the models put them, for `train_severity.py
--coordinates` (stage 2 then keeps their grades, read where inference would read them).
"""

import argparse
import os
import sys
import warnings
from collections import namedtuple

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data.py & co.

import data
import tables
import training
from predict import LEVEL_GAP_MM, load_landmark_models, points_mm, predict_landmarks

# -----------------------------------------------------------------------------
# thresholds, each with its reason

# A left foramen or recess lies at larger patient x than the midline, a right one at smaller:
# foramina 15-25 mm off it, recesses 8-11 mm, and the midline is known to ~2 mm (half a sagittal
# slice gap), so a point on the far side of the midline is on the wrong side.
SIDE_MARGIN_MM = 0.0
# Discs lie 25-40 mm apart along the spine and one level's labels within ~5 mm of each other
# along it (a foramen 2 mm above its disc, half a slice gap of quantisation, disc tilt): a label
# farther than this from its level's other labels is not on that disc.
FAR_FROM_LEVEL_MM = 10.0
# How far across a point may sit from where its condition sits at the study's other levels (a
# canal point: from the midline the foramina and recesses give): about two sagittal slice gaps.
LATERAL_MM = 7.0
# A label this far (3D) from the landmark model's prediction of it, where the model is at least
# MIN_CONFIDENCE sure, is not where the model finds that structure. A quick model (64 px inputs,
# 8 epochs, 40 synthetic studies) lay within 4 mm (median) of correct labels, 13 mm at the 95th
# percentile of the foramina and 43 mm at the worst; below its 30 % least confident points (0.3)
# its errors were larger still. A better-trained model allows a smaller distance.
MODEL_FAR_MM = 14.0
MIN_CONFIDENCE = 0.3
SIDES = {"left": 1.0, "right": -1.0}  # the sign of patient x on each side of the midline
STRUCTURES = ["neural_foraminal_narrowing", "subarticular_stenosis"]  # the two-sided ones

# one suspect label: the evidence in mm, slices and pixels (NaN where it does not apply)
Flag = namedtuple("Flag", "study_id series_id condition level kind mm slices pixels reason")
COLUMNS = list(Flag._fields)
# a label in patient space: point (3,) mm, its slice's normal (3,), slice index, slice gap mm
Placed = namedtuple("Placed", "study_id series_id series_type condition level mm normal slice "
                              "gap_mm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True,
                        help="competition layout: train_series_descriptions.csv, train_images/")
    parser.add_argument("--out-dir", required=True, help="run folder: label_audit.csv goes here")
    parser.add_argument("--coordinates", default="train_label_coordinates.csv",
                        help="the label coordinates to audit: a file, or a name in --data-dir")
    parser.add_argument("--studies", default="",
                        help="comma-separated study ids to audit (default: every labelled study)")
    parser.add_argument("--cache-dir", default="", help="series cache folder (default: none)")
    # checks
    parser.add_argument("--labels-only", action="store_true",
                        help="only the checks that need no image (also when --data-dir has no "
                             "train_images/)")
    parser.add_argument("--landmark-dir", default="",
                        help="folder of landmarks_<type>_best.pt: adds the checks against the "
                             "models' predictions (default: none)")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return parser.parse_args(argv)


def flag(label, kind, reason, **evidence):
    """A Flag of a label (any record with study_id, series_id, condition, level)."""
    numbers = {key: float(evidence.get(key, np.nan)) for key in ("mm", "slices", "pixels")}
    return Flag(int(label.study_id), int(label.series_id), label.condition, label.level, kind,
                reason=reason, **numbers)


def level_name(level):
    return data.LEVEL_NAMES[data.LEVELS.index(level)]


# -----------------------------------------------------------------------------
# checks on the coordinate file alone


def duplicate_flags(coordinates):
    """A (study, condition, level) labelled more than once: training keeps only its last row."""
    coordinates = coordinates.reset_index(drop=True)
    counts = coordinates.groupby(["study_id", "condition", "level"])["x"].transform("size")
    return [flag(row, "duplicate", f"labelled {n} times; training keeps the last row")
            for row, n in zip(coordinates.itertuples(index=False), counts) if n > 1]


def side_pairs(coordinates, structure):
    """[(left row, right row)] of one level's two sides of a structure labelled on one series."""
    sides = {}
    for row in coordinates.itertuples(index=False):
        side, _, rest = row.condition.partition("_")
        if rest == structure:
            sides.setdefault((row.study_id, row.series_id, row.level), {})[side] = row
    return [(pair["left"], pair["right"]) for pair in sides.values() if len(pair) == 2]


def same_instance_flags(coordinates):
    """Left and right foramen of a level on one Sagittal T1 instance: they lie 30-50 mm apart,
    eight or more sagittal slices, so one of them is on the wrong slice."""
    flags = []
    for left, right in side_pairs(coordinates, STRUCTURES[0]):
        if left.instance_number == right.instance_number:
            reason = f"left and right foramen both on instance {left.instance_number}"
            flags += [flag(left, "same_instance", reason, slices=0.0),
                      flag(right, "same_instance", reason, slices=0.0)]
    return flags


def crossing_flags(coordinates):
    """Sagittal T1 series whose left foramina lie on higher instance numbers than the right ones at
    some levels and lower at others: the levels against the series' majority are flagged (a tie
    flags them all). Instance order stands in for patient x here; the headers decide."""
    by_series = {}
    for left, right in side_pairs(coordinates, STRUCTURES[0]):
        order = int(np.sign(left.instance_number - right.instance_number))
        if order:
            by_series.setdefault(left.series_id, []).append((order, left, right))
    flags = []
    for pairs in by_series.values():
        orders = [order for order, _, _ in pairs]
        majority = int(np.sign(sum(orders)))
        for order, left, right in pairs:
            if len(set(orders)) > 1 and order != majority:
                difference = left.instance_number - right.instance_number
                reason = (f"left foramen {difference:+d} instances from the right one, against "
                          f"the other levels of the series: the sides cross")
                flags += [flag(left, "sides_cross", reason, slices=difference),
                          flag(right, "sides_cross", reason, slices=-difference)]
    return flags


def recess_x_flags(coordinates):
    """Left recess at a smaller image column than the right one on the same axial series (one
    field of view; on two series the columns do not compare): in the standard axial view the
    patient's left is on the image's right (larger x). Whether this series is standard only its
    headers say."""
    flags = []
    for left, right in side_pairs(coordinates, STRUCTURES[1]):
        if left.x < right.x:
            reason = f"left recess {right.x - left.x:.1f} px left of the right one in the image"
            flags += [flag(left, "recess_swapped_x", reason, pixels=left.x - right.x),
                      flag(right, "recess_swapped_x", reason, pixels=right.x - left.x)]
    return flags


def canal_order_flags(coordinates):
    """Canal points of one series whose levels do not go down the image (row y) from L1/L2 to
    L5/S1, as in the standard sagittal view; both labels of a pair out of order are flagged."""
    flags = []
    canal = coordinates[coordinates["condition"] == "spinal_canal_stenosis"]
    for _, rows in canal.groupby("series_id"):
        rows = rows.drop_duplicates("level", keep="last")  # as training reads them
        rows = sorted(rows.itertuples(index=False), key=lambda r: data.LEVELS.index(r.level))
        for upper, lower in zip(rows[:-1], rows[1:]):
            if lower.y <= upper.y:
                reason = (f"{level_name(lower.level)} {upper.y - lower.y:.1f} px above "
                          f"{level_name(upper.level)} in the image")
                flags += [flag(upper, "canal_order_y", reason, pixels=lower.y - upper.y),
                          flag(lower, "canal_order_y", reason, pixels=lower.y - upper.y)]
    return flags


# -----------------------------------------------------------------------------
# the labels in patient space (DICOM headers)


def load_study(data_dir, study_id, series_types, cache_dir):
    """{series_id: data.StudySeries} of a study's listed series ({series_id: type}) that load."""
    study = {}
    for series_id, series_type in series_types.items():
        folder = os.path.join(data_dir, "train_images", str(study_id), str(series_id))
        try:
            series = data.load_series(folder, cache_dir)
        except (OSError, ValueError) as error:  # its labels are flagged as on a missing series
            warnings.warn(f"{folder}: unreadable ({error})")
            continue
        study[series_id] = data.StudySeries(series_type, series_id, series)
    return study


def place_labels(study, rows):
    """({(condition, level): Placed}, [Flag]) of a study's coordinate rows: each label through its
    series' headers into patient mm, or a flag when its series is not listed or unreadable, its
    instance is not in the series, or its point lies outside the frame."""
    placed, flags = {}, []
    for row in rows.itertuples(index=False):
        loaded = study.get(row.series_id)
        if loaded is None:
            flags.append(flag(row, "missing_series", "series not listed, absent or unreadable"))
            continue
        series = loaded.series
        try:
            d, col, line = data.label_to_volume(series, row.instance_number, row.x, row.y)
        except KeyError:
            numbers = series.instance_numbers
            reason = (f"instance {row.instance_number} not in the series ({len(numbers)} "
                      f"instances, {numbers.min()}..{numbers.max()})")
            flags.append(flag(row, "missing_instance", reason))
            continue
        except ValueError as error:
            flags.append(flag(row, "outside_frame", str(error)))
            continue
        point_mm = points_mm(series, [(d, col, line)])[0]
        normal = data.slice_normals(series.orientations[d])
        placed[(row.condition, row.level)] = Placed(
            row.study_id, row.series_id, loaded.series_type, row.condition, row.level, point_mm,
            normal, d, data.slice_gap_mm(series, d))
    return placed, flags


def midline_x(placed, level, leave_out=""):
    """Patient x (mm) of the midline at a level, or None: the median of the canal point and the
    midpoints of the two foramina and of the two recesses labelled there (a pair's midpoint stays
    put when its sides are swapped). leave_out: a condition whose own estimate is not used."""
    estimates = []
    canal = placed.get(("spinal_canal_stenosis", level))
    if canal and leave_out != canal.condition:
        estimates.append(canal.mm[0])
    for structure in STRUCTURES:
        pair = [placed.get((f"{side}_{structure}", level)) for side in SIDES]
        if all(pair) and not leave_out.endswith(structure):
            estimates.append((pair[0].mm[0] + pair[1].mm[0]) / 2)
    return float(np.median(estimates)) if estimates else None


def wrong_side_flags(placed):
    """A left foramen or recess at smaller patient x than the midline (on the patient's right),
    or a right one at larger."""
    flags = []
    for (condition, level), label in placed.items():
        side = condition.split("_")[0]
        middle = midline_x(placed, level)
        if side not in SIDES or middle is None:
            continue
        offset = SIDES[side] * (label.mm[0] - middle)  # mm toward its own side
        if offset < SIDE_MARGIN_MM:
            other = "right" if side == "left" else "left"
            slices = offset / label.gap_mm if label.series_type != "Axial T2" else np.nan
            reason = f"{-offset:.1f} mm to the patient's {other} of the midline (x {middle:.1f})"
            flags.append(flag(label, "wrong_side", reason, mm=offset, slices=slices))
    return flags


def lateral_flags(placed):
    """A point whose distance across from the midline differs by more than LATERAL_MM from that of
    its condition at the study's other levels (a canal point: from 0). Distances, not sides: a
    swapped side is wrong_side's to name."""
    across = {}
    for name, label in placed.items():
        middle = midline_x(placed, label.level, leave_out=label.condition)
        if middle is not None:
            across[name] = abs(label.mm[0] - middle)
    flags = []
    for (condition, level), distance in across.items():
        others = [d for (c, lv), d in across.items() if c == condition and lv != level]
        if condition == "spinal_canal_stenosis":
            others = [0.0]
        if others and abs(distance - np.median(others)) > LATERAL_MM:
            label = placed[(condition, level)]
            reason = (f"{distance:.1f} mm across from the midline, where its condition sits "
                      f"{np.median(others):.1f} mm at the study's other levels")
            excess = distance - float(np.median(others))
            slices = excess / label.gap_mm if label.series_type != "Axial T2" else np.nan
            flags.append(flag(label, "lateral_offset", reason, mm=excess, slices=slices))
    return flags


def spine_axis(centres, level):
    """Unit vector along the spine at a level, from the centres ({level: (3,) mm}) of the levels
    around it; patient z when fewer than two are known."""
    j = data.LEVELS.index(level)
    near = [centres[lv] for lv in data.LEVELS[max(j - 1, 0):j + 2] if lv in centres]
    if len(near) < 2:
        return np.array([0.0, 0.0, 1.0])
    axis = near[0] - near[-1]
    return axis / np.linalg.norm(axis)


def level_distances(placed, name):
    """{level: mm from a label to the other labels of that level (median)}: along the slice normal
    for an axial label (how far its slice lies from the level), along the spine for a sagittal one.
    """
    label = placed[name]
    levels = {}
    for other, point in placed.items():
        levels.setdefault(other[1], []).append(point.mm)
    centres = {level: np.median(points, axis=0) for level, points in levels.items()}
    axis = label.normal if label.series_type == "Axial T2" else spine_axis(centres, label.level)
    distances = {}
    for level in data.LEVELS:
        others = [p.mm for other, p in placed.items() if other[1] == level and other != name]
        if others:
            distances[level] = abs(float(np.median((np.array(others) - label.mm) @ axis)))
    return distances


def level_flags(placed):
    """level_slip: a label farther than FAR_FROM_LEVEL_MM from its level's other labels and within
    it of another level's (on that disc); far_from_level: as far, and on no other disc either."""
    flags = []
    for name, label in placed.items():
        distances = level_distances(placed, name)
        own = distances.get(label.level)
        if own is None or own <= FAR_FROM_LEVEL_MM:
            continue
        nearest = min(distances, key=distances.get)
        slices = own / label.gap_mm if label.series_type == "Axial T2" else np.nan
        where = "its slice lies" if label.series_type == "Axial T2" else "it lies"
        reason = f"{where} {own:.1f} mm from the other {level_name(label.level)} labels"
        if nearest != label.level and distances[nearest] <= FAR_FROM_LEVEL_MM:
            reason += f", {distances[nearest]:.1f} mm from {level_name(nearest)}'s"
            flags.append(flag(label, "level_slip", reason, mm=own, slices=slices))
        else:
            flags.append(flag(label, "far_from_level", reason, mm=own, slices=slices))
    return flags


def level_order_flags(placed, explained):
    """Consecutive labelled levels of a condition whose lower one is not LEVEL_GAP_MM below the
    upper in patient z (out of order, or both on one disc), unless one of them is among explained
    {(condition, level)} (already named as slipped). The one farther from its level's other
    labels is flagged (level_distances); both when that cannot be told."""
    flags = []
    for condition in data.CONDITIONS:
        labels = [placed[(condition, lv)] for lv in data.LEVELS if (condition, lv) in placed]
        for upper, lower in zip(labels[:-1], labels[1:]):
            drop = float(upper.mm[2] - lower.mm[2])
            pair = {(condition, upper.level), (condition, lower.level)}
            if drop >= LEVEL_GAP_MM or pair & explained:
                continue
            reason = (f"{level_name(upper.level)} lies {drop:.1f} mm above "
                      f"{level_name(lower.level)} in patient z (discs lie 25-40 mm apart)")
            off = [level_distances(placed, (condition, lb.level)).get(lb.level) for lb in
                   (upper, lower)]
            blamed = [upper, lower]  # a correct label lies within ~5 mm of its level
            if None not in off and abs(off[0] - off[1]) > FAR_FROM_LEVEL_MM / 2:
                blamed = [blamed[int(np.argmax(off))]]
            flags += [flag(label, "level_order", reason, mm=drop) for label in blamed]
    return flags


# -----------------------------------------------------------------------------
# checks against the landmark models

# a predicted landmark in patient space, with the model's confidence
Guess = namedtuple("Guess", "mm confidence")


def guesses_of(study, landmarks):
    """{(condition, level): Guess} of predicted data.Landmark records."""
    out = {}
    for name, landmark in landmarks.items():
        series = study[landmark.series_id].series
        point = points_mm(series, [(landmark.slice, landmark.col, landmark.row)])[0]
        out[name] = Guess(point, landmark.confidence)
    return out


def model_flags(placed, guesses):
    """prediction_slip: a label farther than MODEL_FAR_MM from the model's prediction of it and
    within it of the prediction of a neighbouring level; far_from_prediction: as far from a
    prediction the model is at least MIN_CONFIDENCE sure of. slices: the offset along the label's
    slice normal."""
    flags = []
    for (condition, level), label in placed.items():
        guess = guesses.get((condition, level))
        if guess is None:
            continue
        distance = float(np.linalg.norm(label.mm - guess.mm))
        if distance <= MODEL_FAR_MM:
            continue
        slices = float((guess.mm - label.mm) @ label.normal) / label.gap_mm
        j = data.LEVELS.index(level)
        neighbours = {}
        for k in (j - 1, j + 1):
            other = guesses.get((condition, data.LEVELS[k])) if 0 <= k < data.N_LEVELS else None
            if other is not None:
                neighbours[data.LEVELS[k]] = float(np.linalg.norm(label.mm - other.mm))
        nearest = min(neighbours, key=neighbours.get) if neighbours else None
        reason = f"{distance:.1f} mm from the model's {level_name(level)} (confidence "
        reason += f"{guess.confidence:.2f})"
        if nearest and neighbours[nearest] <= MODEL_FAR_MM:
            reason += f", {neighbours[nearest]:.1f} mm from its {level_name(nearest)}"
            flags.append(flag(label, "prediction_slip", reason, mm=distance, slices=slices))
        elif guess.confidence >= MIN_CONFIDENCE:
            flags.append(flag(label, "far_from_prediction", reason, mm=distance, slices=slices))
    return flags


# -----------------------------------------------------------------------------
# one study, and the whole file


def geometry_flags(placed, guesses=None):
    """[Flag] of the checks in patient space on a study's placed labels, and against the models'
    guesses {(condition, level): Guess} when given."""
    flags = level_flags(placed)
    if guesses is not None:
        flags += model_flags(placed, guesses)
    slips = ("level_slip", "prediction_slip")
    explained = {(f.condition, f.level) for f in flags if f.kind in slips}
    flags += level_order_flags(placed, explained)
    return flags + wrong_side_flags(placed) + lateral_flags(placed)


def predicted_rows(study_id, study, predicted):
    """Rows in the coordinate file's schema (snake_case names) of predicted data.Landmark
    records."""
    rows = []
    for (condition, level), landmark in predicted.items():
        series = study[landmark.series_id].series
        instance, x, y = data.volume_to_label(series, landmark.slice, landmark.col, landmark.row)
        rows.append(dict(study_id=study_id, series_id=landmark.series_id, instance_number=instance,
                         condition=condition, level=level, x=x, y=y))
    return rows


def audit_study(study, rows, landmark_models, device):
    """([Flag] of one study's coordinate rows, on its loaded series {series_id: StudySeries};
    the models' predictions as coordinate rows, [] without models)."""
    placed, flags = place_labels(study, rows)
    guesses, predictions = None, []
    if landmark_models:
        predicted, _ = predict_landmarks(landmark_models, study, device)
        guesses = guesses_of(study, predicted)
        predictions = predicted_rows(int(rows["study_id"].iloc[0]), study, predicted)
    return flags + geometry_flags(placed, guesses), predictions


def repaired(coordinates, frame, predictions):
    """The coordinate rows with every label the audit flags moved to where the landmark models put
    it, and left out where they put it nowhere: the grade of a misplaced label is kept, read where
    inference would read it (train_severity.py --coordinates). Returns (rows, how many moved)."""
    flagged = keys_of(frame)
    kept = coordinates[[key not in flagged for key in keys_of_rows(coordinates)]]
    moved = pd.DataFrame(predictions, columns=coordinates.columns)
    moved = moved[[key in flagged for key in keys_of_rows(moved)]]
    rows = pd.concat([kept, moved]).sort_values(["study_id", "series_id", "condition", "level"])
    return rows, len(moved)


def audit_images(args, coordinates, descriptions):
    """([Flag] of the checks that read the DICOM headers (and the models, with --landmark-dir),
    the models' predictions as coordinate rows)."""
    device = training.resolve_device(args.device)
    landmark_models = {}
    if args.landmark_dir:
        landmark_models = load_landmark_models(args.landmark_dir, device)
        if not landmark_models:
            warnings.warn(f"{args.landmark_dir}: no landmarks_<type>_best.pt; no model checks")
    listed = {}
    for row in descriptions.itertuples(index=False):
        listed.setdefault(int(row.study_id), {})[int(row.series_id)] = row.series_description
    flags, predictions = [], []
    for study_id, rows in coordinates.groupby("study_id"):
        study = load_study(args.data_dir, study_id, listed.get(study_id, {}), args.cache_dir)
        study_flags, study_predictions = audit_study(study, rows, landmark_models, device)
        flags += study_flags
        predictions += study_predictions
    return flags, predictions


def write_audit(flags, path):
    """label_audit.csv: one row per label and kind, by study, condition and level; the frame."""
    frame = pd.DataFrame(flags, columns=COLUMNS)
    frame = frame.drop_duplicates(["study_id", "condition", "level", "kind"])
    order = frame["condition"].map(data.CONDITIONS.index) * 10 + frame["level"].map(
        data.LEVELS.index)
    frame = frame.assign(order=order).sort_values(["study_id", "order", "kind"])
    frame = frame.drop(columns="order").reset_index(drop=True)
    frame.round(2).to_csv(path, index=False)
    return frame


def print_summary(frame, coordinates):
    print(f"{len(frame)} flags on {frame.groupby(['study_id', 'condition', 'level']).ngroups} of "
          f"{len(coordinates)} labels, in {frame['study_id'].nunique()} of "
          f"{coordinates['study_id'].nunique()} studies")
    print("kind                 labels  studies")
    for kind, rows in frame.groupby("kind"):
        print(f"{kind:20s} {len(rows):6d} {rows['study_id'].nunique():8d}")


# -----------------------------------------------------------------------------
# scored against synthetic.py's label_errors.csv

# the check that answers each kind of planted error (synthetic.LABEL_ERRORS), where one does
CHECK_OF_ERROR = {"side_swap": "wrong_side", "level_slip": "level_slip"}


def keys_of_rows(frame):
    return list(zip(frame["study_id"].tolist(), frame["condition"], frame["level"]))


def keys_of(frame):
    return set(keys_of_rows(frame))


def benchmark(frame, errors):
    """Rows of audit_benchmark.csv: per kind of planted error, the share the audit flags (any
    check) and, where a check answers it, that check's precision and recall; per check, its
    precision against every planted error; and all flags against all errors."""
    planted, flagged = keys_of(errors), keys_of(frame)
    rows = []
    for kind, wrong in errors.groupby("kind"):
        wrong_keys = keys_of(wrong)
        row = dict(what="error", name=kind, labels=len(wrong_keys),
                   recall_any=len(wrong_keys & flagged) / len(wrong_keys))
        check = CHECK_OF_ERROR.get(kind)
        if check:
            by_check = keys_of(frame[frame["kind"] == check])
            row.update(check=check, flagged=len(by_check),
                       precision=len(by_check & wrong_keys) / max(len(by_check), 1),
                       recall=len(by_check & wrong_keys) / len(wrong_keys))
        rows.append(row)
    for kind, found in frame.groupby("kind"):
        found_keys = keys_of(found)
        rows.append(dict(what="check", name=kind, flagged=len(found_keys),
                         precision=len(found_keys & planted) / len(found_keys)))
    rows.append(dict(what="all", name="all", labels=len(planted), flagged=len(flagged),
                     precision=len(flagged & planted) / max(len(flagged), 1),
                     recall_any=len(flagged & planted) / max(len(planted), 1)))
    return pd.DataFrame(rows)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    training.save_args(args.out_dir, "audit", args)
    every_label = tables.read_coordinates(tables.coordinates_path(args.data_dir, args.coordinates))
    coordinates = every_label
    descriptions = tables.read_series_descriptions(
        os.path.join(args.data_dir, "train_series_descriptions.csv"))
    if args.studies:
        chosen = [int(s) for s in args.studies.split(",")]
        coordinates = coordinates[coordinates["study_id"].isin(chosen)]
    flags, predictions = duplicate_flags(coordinates) + same_instance_flags(coordinates), []
    if args.labels_only or not os.path.isdir(os.path.join(args.data_dir, "train_images")):
        print("no images: the checks on the coordinate file alone (instance order, image x and y "
              "stand in for patient x and z)")
        flags += crossing_flags(coordinates) + recess_x_flags(coordinates)
        flags += canal_order_flags(coordinates)
    else:
        image_flags, predictions = audit_images(args, coordinates, descriptions)
        flags += image_flags
    frame = write_audit(flags, os.path.join(args.out_dir, "label_audit.csv"))
    print_summary(frame, coordinates)
    if predictions:  # with --landmark-dir: the flagged labels moved to the models' predictions
        path = os.path.join(args.out_dir, "train_label_coordinates.repaired.csv")
        fixed, moved = repaired(every_label, frame, predictions)  # unaudited studies as they are
        fixed.to_csv(path, index=False)
        print(f"wrote {path}: {moved} flagged labels moved to the models' points, "
              f"{len(every_label) - len(fixed)} left out (no prediction)")
    known = os.path.join(args.data_dir, "label_errors.csv")
    if os.path.exists(known):  # a synthetic set with planted errors: how many were found
        errors = tables.read_flagged(known)
        errors = errors[errors["study_id"].isin(coordinates["study_id"])]
        scores = benchmark(frame, errors)
        scores.round(4).to_csv(os.path.join(args.out_dir, "audit_benchmark.csv"), index=False)
        print(f"against {known}:\n{scores.round(3).to_string(index=False)}")
    print(f"wrote {os.path.join(args.out_dir, 'label_audit.csv')}")
    return frame


if __name__ == "__main__":
    main()
