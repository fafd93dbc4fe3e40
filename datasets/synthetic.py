"""Write synthetic lumbar-spine MRI studies in the exact RSNA 2024 competition layout.

The 3D phantom of phantom.py (vertebral bodies, discs, canal, foramina, lateral recesses; random
pose, size, contrast, noise) is evaluated on the pixel grid of every slice of three DICOM series per
study, with real DICOM geometry tags. Labels are projected into the slices through the same
geometry. Test truth goes to solution.csv and solution_coordinates.csv only. With --label-errors a
known share of the training coordinates is made wrong and named in label_errors.csv: the benchmark
of audit.py.

    python datasets/synthetic.py --out /tmp/spine --train-studies 40 --test-studies 10 --quirks
    python datasets/synthetic.py --out /tmp/spine_errors --label-errors 0.05 --seed 0
"""

import argparse
import ctypes
import multiprocessing
import os
import sys
import time

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data.py & co.

from data import (CONDITION_NAMES, CONDITIONS, LABEL_COLUMNS, LEVEL_NAMES, SERIES_OF_CONDITION,
                  SERIES_TYPES, SEVERITIES, SUBMISSION_COLUMNS)
from phantom import (landmarks, make_anatomy, read_grades, reader_posterior, render_slice,
                     rotation, sample_severity)

# -----------------------------------------------------------------------------
# what the studies are made of

QUIRKS = ["missing_series", "duplicate_series", "instances_reversed", "instances_offset",
          "instances_interleaved", "mixed_frame_sizes", "monochrome1", "rescale", "rle_lossless",
          "no_spacing_tags"]
# separate random streams: test studies are never train anatomy
SPLIT_CODE = {"train": 0, "test": 1}
# frames this size or larger get real fields of view; smaller (demo) frames a tighter one
REAL_FRAME = 384
SPLIT_AXIAL_RATE = 1 / 6  # real data: 17 % of studies have labels on two or more series of one type


# -----------------------------------------------------------------------------
# series geometry

def make_stack(centre, u, v, count, spacing, fov, frame):
    """count parallel square slices centred on centre (mm), stepping spacing mm along n = u x v."""
    n, pixel_spacing = np.cross(u, v), round(fov / frame, 6)
    half = (frame - 1) / 2 * pixel_spacing  # IPP is the centre of pixel (0, 0)
    return [
        dict(ipp=np.round(centre + (k - (count - 1) / 2) * spacing * n - half * (u + v), 4), u=u,
             v=v, rows=frame, cols=frame, pixel_spacing=pixel_spacing, spacing=spacing)
        for k in range(count)
    ]


def sagittal_slices(rng, points, frame):
    """Columns go posterior, rows inferior; 15-25 slices across x, the midline up to 3 slices
    off-centre."""
    tilt = rotation(rng.uniform(-1, 1, 3))
    u, v = np.round(tilt @ [0, 1, 0], 6), np.round(tilt @ [0, 0, -1], 6)
    n, spacing = np.cross(u, v), rng.uniform(3.3, 4.5)
    centre = (points.mean(axis=0) + rng.uniform(-3, 3) * spacing * n + rng.uniform(-20, 0) * u
              + rng.uniform(-10, 10) * v)
    reach = np.abs((points - centre) @ n).max() + 3  # mm the stack must cover either side
    count = max(int(rng.integers(15, 26)), 2 * int(np.ceil(reach / spacing)) + 1)
    # real sagittal: about 300 mm
    fov = rng.uniform(200, 260) if frame < REAL_FRAME else rng.uniform(270, 330)
    return make_stack(centre, u, v, count, spacing, fov, frame), None


def axial_slices(rng, points, anatomy, frame, levels):
    """Columns go patient left, rows posterior: one contiguous stack over the given levels, or one
    short tilted stack per disc of them (stacks[j] None for a level the series does not cover)."""
    # real axial: about 200 mm
    fov = rng.uniform(160, 220) if frame < REAL_FRAME else rng.uniform(180, 220)
    shift = rng.uniform(-10, 10, 2) - [0, 10]  # FOV centre offset (u, v) mm
    if rng.random() < 0.5:
        tilt = rotation(rng.uniform(-3, 3, 3))
        u, v = np.round(tilt @ [1, 0, 0], 6), np.round(tilt @ [0, 1, 0], 6)
        n, points = np.cross(u, v), points[:, list(levels)].reshape(-1, 3)
        along, spacing = points @ n, rng.uniform(3.5, 5)
        fewest = 30 if len(levels) == 5 else 8  # a stack over some levels only ends 10 mm past them
        count = int(np.clip(np.ceil((np.ptp(along) + 20) / spacing) + 1, fewest, 45))
        centre = points.mean(axis=0) + shift[0] * u + shift[1] * v
        centre += ((along.min() + along.max()) / 2 - centre @ n) * n
        return (
            make_stack(centre, u, v, count, max(spacing, (np.ptp(along) + 20) / (count - 1)), fov,
                       frame),
            None,
        )
    slices, stacks, spacing = [], [None] * 5, rng.uniform(3, 4)
    for j in reversed(list(levels)):  # L5/S1 first, so instance numbers climb the spine
        theta = anatomy["disc_s"][j] / anatomy["curve_radius"]  # each stack tilts with its disc
        n = anatomy["rotation"] @ [0, np.sin(theta), np.cos(theta)]
        u = np.round(anatomy["rotation"] @ [1, 0, 0], 6)
        v = np.round(np.cross(n, u), 6)
        centre = (points[:, j].mean(axis=0) + shift[0] * u + shift[1] * v
                  + rng.uniform(-0.3, 0.3) * spacing * n)
        stack = make_stack(centre, u, v, int(rng.integers(3, 6)), spacing, fov, frame)
        stacks[j] = list(range(len(slices), len(slices) + len(stack)))
        slices += stack
    return slices, stacks


def make_series(rng, anatomy, description, series_id, size, levels=tuple(range(5))):
    """One series: slices in spatial order, per-level stacks (per-disc axial form only), weighting,
    tags, and the levels and sides whose labels it carries (an axial series may cover some levels
    only)."""
    points, frame = landmarks(anatomy), size if rng.random() < 0.5 else round(size * 1.25)
    if description == "Axial T2":
        slices, stacks = axial_slices(rng, points[3:], anatomy, frame, levels)
    else:
        slices, stacks = sagittal_slices(rng, points[:3].reshape(-1, 3), frame)
    weighting = {"Sagittal T1": "T1", "Axial T2": "T2"}.get(description,
                                                            "STIR" if rng.random() < 0.25 else "T2")
    return dict(description=description, series_id=series_id, slices=slices, stacks=stacks,
                weighting=weighting, numbers=np.arange(1, len(slices) + 1),
                thickness=slices[0]["spacing"] * rng.uniform(0.8, 1.0), quirks=set(),
                duplicate=False, levels=tuple(levels), sides=("left", "right"))


def split_axial(rng, anatomy, series_list, series_id, size):
    """Spread the axial labels over two series, as 17 % of real studies do: the levels split between
    an upper and a lower series (each covering only its own), or left labels on one series and right
    labels on another.
    Returns the row for quirks.csv (without study_id), or None when the study has no axial series.
    """
    original = next(
        (s for s in series_list if s["description"] == "Axial T2" and not s["duplicate"]), None
    )
    if original is None:
        return None
    if rng.random() < 0.5:
        # upper series: L1/L2 .. this level (excluded); lower: the rest
        first_lower = int(rng.integers(2, 4))
        lower = make_series(rng, anatomy, "Axial T2", original["series_id"], size,
                            levels=tuple(range(first_lower, 5)))
        upper = make_series(rng, anatomy, "Axial T2", series_id, size,
                            levels=tuple(range(first_lower)))
        series_list[series_list.index(original)] = lower
        series_list.append(upper)
        detail = (
            f"levels {LEVEL_NAMES[0]}..{LEVEL_NAMES[first_lower - 1]} on {series_id}, "
            f"the rest on {original['series_id']}"
        )
        return dict(series_id=series_id, series_description="Axial T2", quirk="split_axial_levels",
                    detail=detail)
    right = make_series(rng, anatomy, "Axial T2", series_id, size)
    original["sides"], right["sides"] = ("left",), ("right",)
    series_list.append(right)
    return dict(series_id=series_id, series_description="Axial T2", quirk="split_axial_sides",
                detail=f"left labels on {original['series_id']}, right on {series_id}")


def project(point, slices, candidates):
    """Nearest candidate slice to a patient point, and the point's (column, row) in that slice's
    pixels."""
    offsets = [
        np.dot(point - slices[k]["ipp"], np.cross(slices[k]["u"], slices[k]["v"]))
        for k in candidates
    ]
    best = candidates[int(np.argmin(np.abs(offsets)))]
    slice_, delta = slices[best], point - slices[best]["ipp"]
    column, row = (delta @ slice_["u"] / slice_["pixel_spacing"],
                   delta @ slice_["v"] / slice_["pixel_spacing"])
    assert np.min(np.abs(offsets)) <= slice_["spacing"] / 2 + 1e-3, "label off its slice"
    assert (
        0 <= column <= slice_["cols"] - 1 and 0 <= row <= slice_["rows"] - 1
    ), "label outside its image"
    return best, column, row


# -----------------------------------------------------------------------------
# quirks of real data

def instance_numbers(rng, count, kind):
    """Instance numbers (count,) of the slices in spatial order, out of order the way kind says."""
    if kind == "instances_reversed":
        return np.arange(count, 0, -1)
    if kind == "instances_offset":  # starts at 7 or 101, with gaps
        return int(rng.choice([7, 101])) + np.cumsum(rng.integers(1, 3, count)) - 1
    # interleaved acquisition: odd slices first, then even
    numbers = np.empty(count, dtype=np.int64)
    numbers[np.r_[0:count:2, 1:count:2]] = np.arange(1, count + 1)
    return numbers


def resize_frames(rng, series, size):
    """Two neighbouring slices at another frame size: same field of view, IPP still the centre of
    pixel (0, 0)."""
    first, frame = int(rng.integers(0, len(series["slices"]) - 1)), round(size * 0.75)
    for slice_ in series["slices"][first:first + 2]:
        corner = slice_["ipp"] - 0.5 * slice_["pixel_spacing"] * (slice_["u"] + slice_["v"])
        slice_["pixel_spacing"] = round(slice_["cols"] * slice_["pixel_spacing"] / frame, 6)
        slice_["ipp"] = np.round(
            corner + 0.5 * slice_["pixel_spacing"] * (slice_["u"] + slice_["v"]), 4
        )
        slice_["rows"] = slice_["cols"] = frame
    return f"instances {series['numbers'][first]},{series['numbers'][first + 1]} at {frame} px"


def apply_quirk(rng, kind, anatomy, series_list, spare_id, size):
    """Change series_list in place for one study quirk; returns the quirks.csv row
    (without study_id)."""
    target, detail = series_list[int(rng.integers(len(series_list)))], ""
    if kind == "missing_series":
        series_list.remove(target)
        return dict(series_id=target["series_id"], series_description=target["description"],
                    quirk=kind, detail="series absent: no folder, no series_descriptions row")
    if kind == "duplicate_series":  # most often a second axial series; labels stay on the first
        description = "Axial T2" if rng.random() < 0.7 else target["description"]
        original = next(s for s in series_list if s["description"] == description)
        target = make_series(rng, anatomy, description, spare_id, size)
        target["duplicate"], detail = True, f"labels on {original['series_id']}"
        series_list.append(target)
    elif kind.startswith("instances_"):
        target["numbers"] = instance_numbers(rng, len(target["slices"]), kind)
        detail = f"first {target['numbers'][0]}, last {target['numbers'][-1]}"
    elif kind == "mixed_frame_sizes":
        detail = resize_frames(rng, target, size)
    else:  # stored differently: monochrome1, rescale, rle_lossless, no_spacing_tags
        target["quirks"].add(kind)
    return dict(series_id=target["series_id"], series_description=target["description"], quirk=kind,
                detail=detail)


# -----------------------------------------------------------------------------
# label errors: a known share of the training coordinates made wrong, for audit.py to find

LABEL_ERRORS = ["side_swap", "level_slip", "wrong_instance", "off_structure"]
OFF_STRUCTURE_MM = 10.0, 20.0  # a point moved off its structure goes this far in its plane
SHIFTED_SLICES = -3, -2, 2, 3  # a wrong instance lies this many slices off: 7-15 mm


def corrupt_labels(rng, job, coordinates, anatomy, series_list):
    """Make about job["label_errors"] of a training study's coordinate rows wrong, in place, each
    by a kind of LABEL_ERRORS; returns the label_errors.csv rows. A side swap exchanges a left
    point with its right partner (both rows count); a kind that does not fit a row (a canal point
    has no side, a slip needs a neighbouring level on the series) leaves the row as it was."""
    if not job["label_errors"] or job["split"] != "train":
        return []
    errors, done = [], set()
    for i, row in enumerate(coordinates):
        kind = LABEL_ERRORS[int(rng.integers(len(LABEL_ERRORS)))]
        if rng.random() >= job["label_errors"] or i in done:
            continue
        series = next(s for s in series_list if s["series_id"] == row["series_id"])
        if kind == "side_swap":
            changed = swap_sides(coordinates, i, done)
        else:
            move = {"level_slip": slip_level, "wrong_instance": shift_instance,
                    "off_structure": move_off}[kind]
            detail = move(rng, row, series, anatomy)
            changed = [(i, detail)] if detail else []
        for k, detail in changed:
            done.add(k)
            keys = ("study_id", "series_id", "condition", "level")
            errors.append(dict({key: coordinates[k][key] for key in keys}, kind=kind,
                               detail=detail))
    return errors


def swap_sides(coordinates, i, done):
    """Exchange row i's point (series, instance, x, y) with its other side's at the same level:
    [(row, detail)] of both, or [] for a canal point or one whose partner is absent or changed."""
    row = coordinates[i]
    side = row["condition"].split()[0]
    if side not in ("Left", "Right"):
        return []
    other = row["condition"].replace(side, "Right" if side == "Left" else "Left")
    partners = [k for k, r in enumerate(coordinates)
                if r["condition"] == other and r["level"] == row["level"] and k not in done]
    if not partners:
        return []
    partner, point = coordinates[partners[0]], ("series_id", "instance_number", "x", "y")
    swapped = {key: partner[key] for key in point}
    partner.update({key: row[key] for key in point})
    row.update(swapped)
    return [(i, f"swapped with {other}"), (partners[0], f"swapped with {row['condition']}")]


def slip_level(rng, row, series, anatomy):
    """Move a row onto its structure one level up or down, on its own series; None when the series
    covers neither neighbour."""
    c, j = CONDITION_NAMES.index(row["condition"]), LEVEL_NAMES.index(row["level"])
    for step in rng.permutation([-1, 1]):
        k = j + int(step)
        if not 0 <= k < 5 or k not in series["levels"]:
            continue
        candidates = series["stacks"][k] if series["stacks"] else range(len(series["slices"]))
        slice_index, column, line = project(landmarks(anatomy)[c, k], series["slices"],
                                            list(candidates))
        row.update(instance_number=int(series["numbers"][slice_index]), x=round(column, 4),
                   y=round(line, 4))
        return f"on {LEVEL_NAMES[k]}"
    return None


def shift_instance(rng, row, series, anatomy):
    """Move a row SHIFTED_SLICES along its stack, same (x, y); None when its stack is too short.
    (anatomy: unused, as every mover takes the same arguments.)"""
    numbers = [int(n) for n in series["numbers"]]
    d = numbers.index(row["instance_number"])
    stack = next((s for s in series["stacks"] or [] if s and d in s), range(len(numbers)))
    size = series["slices"][d]["rows"]  # a frame of another size would put (x, y) elsewhere
    steps = [s for s in SHIFTED_SLICES
             if d + s in stack and series["slices"][d + s]["rows"] == size]
    if not steps:
        return None
    new = d + int(rng.choice(steps))
    row["instance_number"] = numbers[new]
    return f"instance {numbers[d]} -> {numbers[new]} ({new - d:+d} slices)"


def move_off(rng, row, series, anatomy):
    """Move a row OFF_STRUCTURE_MM in its plane, in a random direction that stays in the frame.
    (anatomy: unused, as every mover takes the same arguments.)"""
    slice_ = series["slices"][[int(n) for n in series["numbers"]].index(row["instance_number"])]
    distance_px = rng.uniform(*OFF_STRUCTURE_MM) / slice_["pixel_spacing"]
    for angle in rng.uniform(0, 2 * np.pi) + np.arange(8) * np.pi / 4:
        x, y = row["x"] + distance_px * np.cos(angle), row["y"] + distance_px * np.sin(angle)
        if 0 <= x <= slice_["cols"] - 1 and 0 <= y <= slice_["rows"] - 1:
            row.update(x=round(float(x), 4), y=round(float(y), 4))
            return f"moved {distance_px * slice_['pixel_spacing']:.1f} mm"
    return None


# -----------------------------------------------------------------------------
# writing one study

def text(values, decimals):
    """DICOM decimal strings of values, with this many decimals."""
    return [f"{value:.{decimals}f}" for value in values]


def write_instance(path, pixels, slice_, series, study_id, number):
    """One MR Image Storage file; the series' storage quirks change how the same image is stored."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(
        entropy_srcs=[str(study_id), str(series["series_id"]), str(number)])  # deterministic UIDs
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(study_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study_id), str(series["series_id"])])
    ds.PatientID, ds.Modality, ds.SeriesDescription = str(study_id), "MR", series["description"]
    ds.InstanceNumber, ds.ImagePositionPatient = int(number), text(slice_["ipp"], 4)
    ds.ImageOrientationPatient = text([*slice_["u"], *slice_["v"]], 6)
    ds.PixelSpacing = text([slice_["pixel_spacing"]] * 2, 6)
    if "no_spacing_tags" not in series["quirks"]:
        thickness, gap = text([series["thickness"], slice_["spacing"]], 3)
        ds.SliceThickness, ds.SpacingBetweenSlices = thickness, gap
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    # lowest value shows white; readers flip within the 16 stored bits
    if "monochrome1" in series["quirks"]:
        ds.PhotometricInterpretation, pixels = "MONOCHROME1", (65535 - pixels).astype(np.uint16)
    if "rescale" in series["quirks"]:  # value = stored * slope + intercept, off by at most 1
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
        pixels = np.rint((pixels + 1024.0) / 2).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    if "rle_lossless" in series["quirks"]:
        ds.compress(RLELossless, pixels)
    ds.save_as(path, enforce_file_format=True)


def label_rows(study_id, severity, empty, anatomy, series_list):
    """The study's 25 label strings, and its coordinate rows projected into the first series of the
    condition's type that carries that level and side (a series added by the duplicate quirk carries
    none)."""
    labels = ["" if empty[c, j] else SEVERITIES[severity[c, j]] for c in range(5) for j in range(5)]
    points, coordinates = landmarks(anatomy), []
    for c, condition in enumerate(CONDITIONS):
        side = condition.split("_")[0]
        for j in range(5):
            carriers = [s for s in series_list
                        if s["description"] == SERIES_OF_CONDITION[condition] and not s["duplicate"]
                        and j in s["levels"] and side in s["sides"] + ("spinal",)]
            series = carriers[0] if carriers else None
            if series and not empty[c, j]:
                candidates = (
                    series["stacks"][j] if series["stacks"] else list(range(len(series["slices"])))
                )
                k, column, row = project(points[c, j], series["slices"], candidates)
                coordinates.append(
                    dict(study_id=study_id, series_id=series["series_id"],
                         instance_number=int(series["numbers"][k]), condition=CONDITION_NAMES[c],
                         level=LEVEL_NAMES[j], x=round(column, 4), y=round(row, 4))
                )
    return labels, coordinates


def make_study(job):
    """Render one study to disk and return its CSV rows; runs in a worker process."""
    rng = np.random.default_rng([job["seed"], SPLIT_CODE[job["split"]], job["index"]])
    severity = sample_severity(rng, job["balanced"])
    anatomy = make_anatomy(rng, severity)
    series_list = [make_series(rng, anatomy, kind, series_id, job["size"])
                   for kind, series_id in zip(SERIES_TYPES, job["series_ids"])]
    empty = rng.random((5, 5)) < 0.01  # about 1% of label cells are blank, as in the real train.csv
    quirks = []
    stream = [job["seed"], SPLIT_CODE[job["split"]], job["index"]]
    grades, oracle = severity, None  # the grade drawn is the label, unless a reader reads it
    if job["reader_noise"]:  # own random stream: the images do not depend on the reader
        reader_rng = np.random.default_rng(stream + [3])
        grades = read_grades(reader_rng, anatomy["openness"], job["reader_noise"])
        oracle = reader_posterior(anatomy["openness"], job["reader_noise"]).reshape(25, 3)
    split_rng = np.random.default_rng(stream + [2])  # own stream, as quirks
    if split_rng.random() < job["split_axial"]:
        row = split_axial(split_rng, anatomy, series_list, job["series_ids"][4], job["size"])
        quirks += [row] if row else []
    if job["quirk"]:  # own random stream: the study looks the same with or without --quirks
        quirk_rng = np.random.default_rng(stream + [1])
        quirks.append(apply_quirk(quirk_rng, job["quirk"], anatomy, series_list,
                                  job["series_ids"][3], job["size"]))
    hidden_test_like = job["quirks"] and job["split"] == "test"  # no spacing tags at all
    for series in series_list:
        if not hidden_test_like or "no_spacing_tags" in series["quirks"]:
            continue
        series["quirks"].add("no_spacing_tags")
        quirks.append(dict(series_id=series["series_id"], series_description=series["description"],
                           quirk="no_spacing_tags", detail="every test series"))
    labels, coordinates = label_rows(job["study_id"], grades, empty, anatomy, series_list)
    label_errors = corrupt_labels(np.random.default_rng(stream + [4]), job, coordinates, anatomy,
                                  series_list)  # own stream: the images do not depend on it
    study_dir = os.path.join(job["out_dir"], f"{job['split']}_images", str(job["study_id"]))
    for series in series_list:
        folder = os.path.join(study_dir, str(series["series_id"]))
        os.makedirs(folder, exist_ok=True)
        for slice_, number in zip(series["slices"], series["numbers"]):
            pixels = render_slice(rng, slice_, anatomy, series["weighting"])
            write_instance(os.path.join(folder, f"{number}.dcm"), pixels, slice_, series,
                           job["study_id"], number)
    if job["corrupt"]:  # truncate the edge slice of one series: never a labelled slice
        series = next((s for s in series_list if s["description"] == "Sagittal T1"), series_list[0])
        path = os.path.join(study_dir, str(series["series_id"]), f"{series['numbers'][0]}.dcm")
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 3)
        quirks.append(dict(series_id=series["series_id"], series_description=series["description"],
                           quirk="corrupt_file", detail=os.path.relpath(path, job["out_dir"])))
    listed = [dict(study_id=job["study_id"], series_id=s["series_id"],
                   series_description=s["description"]) for s in series_list]
    quirk_rows = [dict(study_id=job["study_id"], **row) for row in quirks]
    return dict(split=job["split"], study_id=job["study_id"], labels=labels,
                coordinates=coordinates, series=listed, quirks=quirk_rows, oracle=oracle,
                label_errors=label_errors)


# -----------------------------------------------------------------------------
# the dataset

def draw_ids(seed, count):
    """count (study id of 7-10 digits, [5 series ids of 8-10 digits]), all unique. The fifth series
    id of every study is drawn after all the others, so that it changed none of them."""
    rng, ids = np.random.default_rng([seed, 2]), {}  # a dict is an ordered set
    while len(ids) < 6 * count:
        digits = int(rng.integers(7 if len(ids) < 5 * count and len(ids) % 5 == 0 else 8, 11))
        ids.setdefault(int(rng.integers(10 ** (digits - 1), min(10 ** digits, 2 ** 31))), None)
    ids = list(ids)
    return [(ids[5 * i], ids[5 * i + 1:5 * i + 5] + [ids[5 * count + i]]) for i in range(count)]


def write_csv(rows, columns, path):
    pd.DataFrame(rows, columns=columns).sort_values("study_id", kind="stable").to_csv(path,
                                                                                      index=False)


def write_tables(out_dir, results):
    """The competition CSVs of the studies made, the test truth beside them, and oracle.csv where
    a reader labelled them."""
    for split, labels_name, coordinates_name in (
        ("train", "train.csv", "train_label_coordinates.csv"),
        ("test", "solution.csv", "solution_coordinates.csv"),
    ):
        studies = [r for r in results if r["split"] == split]
        write_csv([[r["study_id"], *r["labels"]] for r in studies], ["study_id", *LABEL_COLUMNS],
                  os.path.join(out_dir, labels_name))
        write_csv([row for r in studies for row in r["coordinates"]],
                  ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
                  os.path.join(out_dir, coordinates_name))
        write_csv([row for r in studies for row in r["series"]],
                  ["study_id", "series_id", "series_description"],
                  os.path.join(out_dir, f"{split}_series_descriptions.csv"))
    test_ids = sorted(r["study_id"] for r in results if r["split"] == "test")
    submission = [[f"{study_id}_{column}", 1 / 3, 1 / 3, 1 / 3]
                  for study_id in test_ids for column in LABEL_COLUMNS]
    pd.DataFrame(submission, columns=["row_id", *SUBMISSION_COLUMNS]).to_csv(
        os.path.join(out_dir, "sample_submission.csv"), index=False)
    tested = [r for r in results if r["split"] == "test" and r["oracle"] is not None]
    if tested:  # the best possible grades of the test labels, in submission format
        oracle = [[f"{r['study_id']}_{column}", *r["oracle"][j]] for r in tested
                  for j, column in enumerate(LABEL_COLUMNS)]
        pd.DataFrame(oracle, columns=["row_id", *SUBMISSION_COLUMNS]).to_csv(
            os.path.join(out_dir, "oracle.csv"), index=False)


def keep_freed_memory():
    """Pool worker set-up. Each slice allocates and frees numpy arrays of about a megabyte; glibc
    hands that memory back to the OS and faults it in again for the next slice, a third of the
    generator's time on 2 cores. Asking it to keep 64 MB spare above the heap (mallopt M_TOP_PAD)
    leaves the files byte for byte the same. Elsewhere than glibc: nothing to do."""
    try:
        ctypes.CDLL(None).mallopt(-2, 64 << 20)  # -2: M_TOP_PAD in glibc's malloc.h
    except (AttributeError, OSError, TypeError):  # no mallopt (macOS, musl), or no CDLL(None)
        pass


def make_dataset(out_dir, train_studies, test_studies, seed, size, quirks=False, balanced=False,
                 workers=0, split_axial=SPLIT_AXIAL_RATE, reader_noise=0.0, label_errors=0.0):
    """Write the competition layout under out_dir; returns {"seconds": ..., "bytes": ...}.

    reader_noise > 0: labels come from a simulated reader (phantom.read_grades), and oracle.csv
    beside solution.csv holds the Bayes posterior of each test label given the anatomy.
    label_errors > 0: about that share of the training coordinate rows is made wrong
    (corrupt_labels), and label_errors.csv beside them names each row and how.
    """
    start, ids = time.time(), draw_ids(seed, train_studies + test_studies)
    cycle = QUIRKS + [None]  # with --quirks each study gets the next quirk in turn (or none)
    jobs = [
        dict(split=split, index=i, study_id=ids[offset + i][0], series_ids=ids[offset + i][1],
             seed=seed, size=size, balanced=balanced, quirks=quirks,
             quirk=cycle[i % len(cycle)] if quirks else None, split_axial=split_axial,
             reader_noise=reader_noise, label_errors=label_errors,
             out_dir=out_dir, corrupt=quirks and split == "test" and i == min(1, test_studies - 1))
        for split, count, offset in (("train", train_studies, 0),
                                     ("test", test_studies, train_studies))
        for i in range(count)
    ]
    os.makedirs(out_dir, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1 or len(jobs) < 4:
        results = [make_study(job) for job in jobs]
    else:
        with multiprocessing.Pool(workers, keep_freed_memory) as pool:
            results = pool.map(make_study, jobs, chunksize=1)
    write_tables(out_dir, results)
    if label_errors:
        write_csv([row for r in results for row in r["label_errors"]],
                  ["study_id", "series_id", "condition", "level", "kind", "detail"],
                  os.path.join(out_dir, "label_errors.csv"))
    quirk_rows = [row for r in results for row in r["quirks"]]
    write_csv(quirk_rows, ["study_id", "series_id", "series_description", "quirk", "detail"],
              os.path.join(out_dir, "quirks.csv"))
    for row in (row for row in quirk_rows if row["quirk"] == "corrupt_file"):
        print(f"warning: corrupt file written on purpose: {os.path.join(out_dir, row['detail'])}")
    total = sum(os.path.getsize(os.path.join(folder, name)) for folder, _,
                names in os.walk(out_dir) for name in names)
    seconds = time.time() - start
    print(
        f"wrote {train_studies} train + {test_studies} test studies to {out_dir}: {seconds:.1f} s, "
        f"{total / 1e6:.1f} MB"
    )
    return {"seconds": seconds, "bytes": total}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # data
    parser.add_argument("--out", default="synthetic_data",
                        help="output folder, written in the competition layout")
    parser.add_argument("--train-studies", type=int, default=40, help="number of training studies")
    parser.add_argument("--test-studies", type=int, default=10,
                        help="number of test studies (truth in solution*.csv)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    parser.add_argument("--size", type=int, default=160,
                        help="typical frame size in pixels (some series 1.25x)")
    # realism
    parser.add_argument("--quirks", action="store_true",
                        help="add the quirks of real data (listed in quirks.csv)")
    parser.add_argument("--balanced", action="store_true",
                        help="severities 1/3 each instead of the real priors")
    parser.add_argument(
        "--split-axial",
        type=float,
        default=SPLIT_AXIAL_RATE,
        help="share of studies whose axial labels "
        "are spread over two series (levels split, or left and right apart), as in real data",
    )
    parser.add_argument("--reader-noise", type=float, default=0.0,
                        help="labels from a simulated reader who sees what is left open with this "
                             "error (canal; x1.5 foramina and recesses), and oracle.csv with the "
                             "best possible grades of the test labels (0: the drawn grades are the "
                             "labels). 0.12 puts the best possible score at 0.3-0.55 x the prior "
                             "per term, below where the real leaderboard's best sit")
    parser.add_argument("--label-errors", type=float, default=0.0,
                        help="make about this share of the training coordinate rows wrong (side "
                             "swaps, one-level slips, wrong instances, points off their "
                             "structure), named in label_errors.csv: a benchmark for audit.py")
    # system
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes (0: one per CPU core)")
    args = parser.parse_args(argv)
    assert (
        args.train_studies >= 0 and args.test_studies >= 0 and args.size >= 32
    ), "counts >= 0, size >= 32"
    return args


def main(argv=None):
    args = parse_args(argv)
    print(vars(args))
    make_dataset(args.out, args.train_studies, args.test_studies, args.seed, args.size, args.quirks,
                 args.balanced, args.workers, args.split_axial, args.reader_noise,
                 args.label_errors)


if __name__ == "__main__":
    main()
