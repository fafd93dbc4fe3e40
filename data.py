"""Competition constants and records, DICOM series loading and geometry (tables.py reads the CSVs).

Everything that knows the RSNA 2024 lumbar spine images lives here, so the training and inference
scripts only speak in arrays and records:

    series = load_series("train_images/4003253/702807833")  # volume (D, H, W), spatial order
    d, col, row = label_to_volume(series, instance_number, x, y)  # a label in volume pixels
    landmarks = labelled_landmarks(study, points, "study 4003253")  # labels -> {name: Landmark}

Five coordinate frames; each row names the functions that convert it:

| frame           | units and axis order                       | converted by                      |
|-----------------|--------------------------------------------|-----------------------------------|
| original pixels | one DICOM file's pixels: (instance_number, | label_to_volume / volume_to_label |
|   (the CSVs)    |   x, y), x = column, y = row               |                                   |
| volume pixels   | Series.volume (D, H, W): points [slice,    | series_pixel_to_patient /         |
|   (`*_px`)      |   col, row], arrays [slice, row, col]      |   series_patient_to_pixel         |
| input pixels    | the S x S network input: [col, row]        | to_resized / to_original          |
|                 |                                            |   (from / to volume pixels)       |
| heatmap cells   | the (S/2, S/2) heatmap: [slice, col, row], | predict.heat_to_volume (to        |
|   (`*_cell`)    |   logits (K, D, h, w)                      |   volume pixels, by to_original)  |
| patient mm      | DICOM patient axes (x, y, z): +x the       | pixel_to_patient /                |
|   (`*_mm`)      |   patient's left, +y back, +z to the head  |   patient_to_pixel (per frame)    |

Sizes are (rows, cols) = (H, W) everywhere and points [col, row]; pixel_spacing is [row, col] mm.
to_resized / to_original map pixel centres between any two sizes of one image, so original ->
volume (frames of another size), volume -> input and heatmap -> volume all use that one pair.
"""

import os
import warnings
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

import cache

# -----------------------------------------------------------------------------
# competition constants (defined once; every other file imports them)

CONDITIONS = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing",
              "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
              "right_subarticular_stenosis"]
CONDITION_NAMES = ["Spinal Canal Stenosis", "Left Neural Foraminal Narrowing",
                   "Right Neural Foraminal Narrowing", "Left Subarticular Stenosis",
                   "Right Subarticular Stenosis"]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
LEVEL_NAMES = ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
SEVERITIES = ["Normal/Mild", "Moderate", "Severe"]
SUBMISSION_COLUMNS = ["normal_mild", "moderate", "severe"]
SEVERITY_WEIGHTS = (1.0, 2.0, 4.0)  # metric sample weight of each true class
# the 25 train.csv columns, in order
LABEL_COLUMNS = [f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS]
MISSING = -1  # label value of an empty train.csv cell; never filled with a class

SERIES_TYPES = ["Sagittal T2/STIR", "Sagittal T1", "Axial T2"]
SERIES_OF_CONDITION = {"spinal_canal_stenosis": "Sagittal T2/STIR",
                       "left_neural_foraminal_narrowing": "Sagittal T1",
                       "right_neural_foraminal_narrowing": "Sagittal T1",
                       "left_subarticular_stenosis": "Axial T2",
                       "right_subarticular_stenosis": "Axial T2"}
# file-name tags
SERIES_TAGS = {"Sagittal T2/STIR": "sag_t2", "Sagittal T1": "sag_t1", "Axial T2": "axial"}
TAG_SERIES = {tag: series_type for series_type, tag in SERIES_TAGS.items()}
# the landmark points each series type carries, as (condition, level) in a fixed order
POINTS_OF_SERIES = {
    s: [(c, lv) for c in CONDITIONS if SERIES_OF_CONDITION[c] == s for lv in LEVELS]
    for s in SERIES_TYPES
}
# the metric's three pooled row groups; the severity network has one head per group
GROUP_CONDITIONS = {
    "spinal": ["spinal_canal_stenosis"],
    "foraminal": ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"],
    "subarticular": ["left_subarticular_stenosis", "right_subarticular_stenosis"],
}
GROUPS = list(GROUP_CONDITIONS)
GROUP_OF_CONDITION = {c: GROUPS.index(g) for g,
                      conditions in GROUP_CONDITIONS.items() for c in conditions}
N_LEVELS, N_SEVERITIES, N_LABELS = len(LEVELS), len(SEVERITIES), len(LABEL_COLUMNS)
SPINAL_COLUMNS = slice(0, N_LEVELS)  # spinal_canal_stenosis is the first condition of LABEL_COLUMNS
# (condition, level) of each of the 25 label columns, in LABEL_COLUMNS order
COLUMN_POINTS = [(c, lv) for c in CONDITIONS for lv in LEVELS]
# each condition group's label columns (indices into LABEL_COLUMNS)
GROUP_COLUMNS = {g: [j for j, (c, _) in enumerate(COLUMN_POINTS) if c in conditions]
                 for g, conditions in GROUP_CONDITIONS.items()}

# -----------------------------------------------------------------------------
# records

# a point on a series, in that series' volume pixels (slice index in spatial order, column, row)
Landmark = namedtuple("Landmark", "series_type series_id slice col row confidence")
# a series loaded for a study
StudySeries = namedtuple("StudySeries", "series_type series_id series")

# -----------------------------------------------------------------------------
# DICOM series


@dataclass
class Series:
    """A series as arrays, slices in spatial order (ascending IPP . n within a stack)."""

    # (D, H, W), rescaled, MONOCHROME1 inverted, every frame at the common size: a float32 array
    # when decoded, a cache.StoredVolume (uint8 on disk, float32 when indexed) when cached
    volume: "np.ndarray | cache.StoredVolume"
    instance_numbers: np.ndarray  # (D,) int64
    positions: np.ndarray  # (D, 3) ImagePositionPatient of each frame as returned, mm
    orientations: np.ndarray  # (D, 6) ImageOrientationPatient [u, v]
    pixel_spacing: np.ndarray  # (D, 2) [row, col] mm of the frames as returned
    # (D, 2) [rows, cols] of each frame on disk; labels live in these pixels
    original_sizes: np.ndarray
    stack_ids: np.ndarray  # (D,) int64, which orientation group (stack) a slice belongs to
    # (2,) the volume's cache.INTENSITY_PERCENTILES: network inputs map it to [0, 1]
    intensity_range: np.ndarray


class DecoderMissing(RuntimeError):
    """A compressed transfer syntax that no installed package decodes: fatal, never skipped."""


def _read_frame(path):
    """One DICOM file -> (dataset, float32 image after MONOCHROME1 inversion and rescale), or
    raise."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    try:
        stored = ds.pixel_array
    except RuntimeError as error:  # pydicom: no installed plugin can decode this transfer syntax
        raise DecoderMissing(
            f"{path}: cannot decode {ds.file_meta.TransferSyntaxUID.name}: {error}"
        ) from error
    if stored.ndim != 2:
        raise ValueError(f"expected one 2D frame, got pixel array of shape {stored.shape}")
    image = stored.astype(np.float32)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # MONOCHROME1 shows the lowest stored value white: flip within the stored bit range
        image = float(2 ** int(ds.get("BitsStored", 16)) - 1) - image
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return ds, image * slope + intercept


def _frame_geometry(ds, path):
    """(IPP (3,), IOP (6,), spacing [row, col]) of one frame; spacing 1 mm with a warning when
    absent."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        warnings.warn(f"{path}: no PixelSpacing, assuming 1 mm")
        spacing = [1.0, 1.0]
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is None or orientation is None:
        return None, None, np.asarray(spacing, np.float64)
    return (np.asarray(position, np.float64), np.asarray(orientation, np.float64),
            np.asarray(spacing, np.float64))


def _group_by_orientation(orientations, tolerance_deg=1.0):
    """Stack id per slice: slices whose normals agree within tolerance_deg belong to one stack."""
    normals = slice_normals(orientations)
    stack_ids = np.full(len(normals), -1, dtype=np.int64)
    references = []
    for i, normal in enumerate(normals):
        for k, reference in enumerate(references):
            if abs(float(normal @ reference)) >= np.cos(np.radians(tolerance_deg)):
                stack_ids[i] = k
                break
        else:
            references.append(normal)
            stack_ids[i] = len(references) - 1
    return stack_ids


def _spatial_order(positions, orientations, instance_numbers):
    """Slice order: stacks by their centre along the main stack's normal, then IPP . n inside each
    stack."""
    stack_ids = _group_by_orientation(orientations)
    normals = slice_normals(orientations)
    main_normal = normals[np.bincount(stack_ids).argmax() == stack_ids][0]
    along_main = positions @ main_normal
    stack_rank = {k: along_main[stack_ids == k].mean() for k in np.unique(stack_ids)}
    keys = [(stack_rank[k], float(p @ n), int(inst)) for k, p, n,
            inst in zip(stack_ids, positions, normals, instance_numbers)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    remap = {k: r for r, k in enumerate(sorted(stack_rank, key=stack_rank.get))}
    return np.asarray(order), np.asarray([remap[k] for k in stack_ids[order]])


def _resize_frame(image, size):
    """Bilinear resize of one (h, w) frame to size (H, W); pixel centres map as in to_resized()."""
    tensor = torch.from_numpy(image)[None, None]
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()



def load_series(series_dir, cache_dir=None):
    """A series folder of {instance_number}.dcm -> Series in spatial order (see Series for the
    fields).

    Unreadable files are skipped with a warning naming them; a series with no readable frame, or a
    compressed file that no installed decoder handles, raises. With cache_dir, the series is kept on
    disk (cache.py: one byte a pixel, memory-mapped, volume clipped to what the networks read) under
    a key of the files' names, sizes and modification times; a cache that cannot be written or read
    costs speed, never the series.
    """
    names = sorted(
        n
        for n in os.listdir(series_dir)
        if os.path.isfile(os.path.join(series_dir, n)) and not n.startswith(".")
    )
    cache_path = cache.path_of(series_dir, names, cache_dir) if cache_dir else None
    cached = cache.read(cache_path) if cache_path else None
    if cached is not None:
        stored, fields = cached
        volume = cache.StoredVolume(stored, fields["intensity_range"], cache_path)
        return Series(volume=volume, **fields)
    frames, problems = [], []
    for name in names:
        path = os.path.join(series_dir, name)
        try:
            ds, image = _read_frame(path)
        except DecoderMissing:
            raise
        except Exception as error:  # a broken or non-DICOM file costs one slice, not the study
            problems.append(f"{path}: {type(error).__name__}: {error}")
            warnings.warn(f"{path}: unreadable DICOM, skipped ({type(error).__name__}: {error})")
            continue
        frames.append((ds, image, path))
    if not frames:
        first = f" (first: {problems[0]})" if problems else ""
        raise ValueError(f"{series_dir}: no readable DICOM slice among {len(names)} files{first}")
    series = _assemble(frames, series_dir)
    # from now on the volume is what the cache keeps, whether or not the write succeeded
    if cache_path:
        stored = cache.quantise(series.volume, series.intensity_range)
        cache.write(cache_path, stored, {k: v for k, v in series.__dict__.items() if k != "volume"})
        series.volume = cache.StoredVolume(stored, series.intensity_range, cache_path)
    return series


def _assemble(frames, series_dir):
    """Decoded frames -> Series: geometry, common frame size, spatial order."""
    instance_numbers = np.array(
        [int(ds.get("InstanceNumber", i)) for i, (ds, _, _) in enumerate(frames)]
    )
    geometry = [_frame_geometry(ds, path) for ds, _, path in frames]
    if any(position is None for position, _, _ in geometry):
        warnings.warn(
            f"{series_dir}: ImagePositionPatient/ImageOrientationPatient missing, "
            "ordering slices by instance number and assuming 1 mm steps along an axial normal"
        )
        geometry = [(np.array([0.0, 0.0, float(k)]), np.array([1.0, 0, 0, 0, 1, 0]), s) for k,
                    (_, _, s) in zip(instance_numbers, geometry)]
    positions = np.stack([g[0] for g in geometry])
    orientations = np.stack([g[1] for g in geometry])
    spacing = np.stack([g[2] for g in geometry])
    original_sizes = np.array([image.shape for _, image, _ in frames], dtype=np.int64)
    sizes, counts = np.unique(original_sizes, axis=0, return_counts=True)
    common = sizes[counts.argmax()]
    images = []
    for d, (_, image, _) in enumerate(frames):
        if tuple(image.shape) != tuple(common):
            image = _resize_frame(image, common)
            # the resized grid's pixel (0, 0) centre and step, expressed through the one
            # pixel-mapping pair
            origin = to_original(np.zeros(2), original_sizes[d], common)
            positions[d] = pixel_to_patient(positions[d], orientations[d], spacing[d], origin[0],
                                            origin[1])
            spacing[d] = spacing[d] * original_sizes[d] / common
        images.append(image)
    order, stack_ids = _spatial_order(positions, orientations, instance_numbers)
    volume = np.stack(images)[order].astype(np.float32)
    return Series(volume=volume, instance_numbers=instance_numbers[order],
                  positions=positions[order], orientations=orientations[order],
                  pixel_spacing=spacing[order], original_sizes=original_sizes[order],
                  stack_ids=stack_ids,
                  intensity_range=np.percentile(volume[:, ::2, ::2], cache.INTENSITY_PERCENTILES))


# -----------------------------------------------------------------------------
# geometry: every conversion between original pixels, resized pixels, and patient mm goes through
# here


def to_resized(xy, original_hw, resized_hw):
    """(..., 2) [col, row] in an image of size original_hw (rows, cols) -> the same points after
    resizing.

    Pixel centres, as F.interpolate(align_corners=False) and PIL place them: x' = (x + 0.5) * W'/W -
    0.5.
    """
    scale = np.asarray(resized_hw, np.float64)[::-1] / np.asarray(original_hw, np.float64)[::-1]
    return (np.asarray(xy, np.float64) + 0.5) * scale - 0.5


def to_original(xy, original_hw, resized_hw):
    """Inverse of to_resized: [col, row] in the resized image -> [col, row] in the original."""
    scale = np.asarray(resized_hw, np.float64)[::-1] / np.asarray(original_hw, np.float64)[::-1]
    return (np.asarray(xy, np.float64) + 0.5) / scale - 0.5


def slice_normals(orientations):
    """(..., 6) IOP -> (..., 3) unit normal n = u x v."""
    orientations = np.asarray(orientations, np.float64)
    normal = np.cross(orientations[..., :3], orientations[..., 3:])
    return normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def pixel_to_patient(position, orientation, spacing, col, row):
    """Pixel (col, row) of a frame -> patient mm (..., 3): IPP + col*spacing[1]*u +
    row*spacing[0]*v."""
    position, orientation, spacing = (
        np.asarray(a, np.float64) for a in (position, orientation, spacing)
    )
    col, row = np.asarray(col, np.float64)[..., None], np.asarray(row, np.float64)[..., None]
    return (position + col * spacing[..., 1:2] * orientation[..., :3]
            + row * spacing[..., 0:1] * orientation[..., 3:])


def patient_to_pixel(position, orientation, spacing, point):
    """Patient mm (..., 3) -> (col, row, signed distance in mm from the frame's plane along n)."""
    position, orientation, spacing = (
        np.asarray(a, np.float64) for a in (position, orientation, spacing)
    )
    offset = np.asarray(point, np.float64) - position
    col = (offset * orientation[..., :3]).sum(-1) / spacing[..., 1]
    row = (offset * orientation[..., 3:]).sum(-1) / spacing[..., 0]
    return col, row, (offset * slice_normals(orientation)).sum(-1)


def series_pixel_to_patient(series, slice_index, col, row):
    """(slice index, col, row) in the volume's pixels -> patient mm (3,)."""
    d = int(slice_index)
    return pixel_to_patient(series.positions[d], series.orientations[d], series.pixel_spacing[d],
                            col, row)


def series_patient_to_pixel(series, point):
    """Patient mm (3,) -> (slice index, col, row, distance mm) on the nearest slice whose frame
    holds the point.

    Falls back to the nearest plane when no frame holds it (a point outside the field of view).
    """
    cols, rows, distances = patient_to_pixel(series.positions, series.orientations,
                                             series.pixel_spacing, np.asarray(point)[None])
    height, width = series.volume.shape[1:]
    inside = (cols >= -0.5) & (cols <= width - 0.5) & (rows >= -0.5) & (rows <= height - 0.5)
    penalty = np.abs(distances) + np.where(inside, 0.0, 1e6)
    d = int(penalty.argmin())
    return d, float(cols[d]), float(rows[d]), float(distances[d])


def slice_gap_mm(series, slice_index):
    """Distance in mm between neighbouring slices of the stack holding slice_index (median; 4 mm for
    one slice)."""
    first, last = stack_bounds(series, slice_index)
    if first == last:
        return 4.0
    along = series.positions[first:last + 1] @ slice_normals(series.orientations[int(slice_index)])
    return float(np.median(np.abs(np.diff(along))))


def covering_slice(series, point, gaps=2.0):
    """(slice index, |distance| mm) of the slice nearest to a patient point among those whose frame
    holds it, or None when the series does not cover the point: outside every frame, or more than
    `gaps` slice gaps from the nearest slice. Two gaps (6-10 mm) let a level estimate a few mm off
    still find its stack, while a level the series does not cover (past a series over some levels
    only, or between per-disc stacks) lies 20-40 mm away.
    """
    d, col, row, distance = series_patient_to_pixel(series, point)
    height, width = series.volume.shape[1:]
    inside = -0.5 <= col <= width - 0.5 and -0.5 <= row <= height - 0.5
    if not inside or abs(distance) > gaps * slice_gap_mm(series, d):
        return None
    return d, abs(distance)


def label_to_volume(series, instance_number, x, y):
    """A label (instance number, x, y in that file's original pixels) -> (slice index, col, row) in
    the volume.

    Raises KeyError for an instance the series lacks and ValueError for a point outside its frame.
    """
    matches = np.flatnonzero(series.instance_numbers == int(instance_number))
    if len(matches) == 0:
        present = sorted(series.instance_numbers.tolist())
        raise KeyError(f"instance {instance_number} not in series (has {present})")
    d = int(matches[0])
    height, width = series.original_sizes[d]
    if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
        raise ValueError(f"instance {instance_number}: label (x {x:.1f}, y {y:.1f}) outside its "
                         f"{height} x {width} frame")
    col, row = to_resized([x, y], series.original_sizes[d], series.volume.shape[1:])
    return d, float(col), float(row)


def volume_to_label(series, slice_index, col, row):
    """Inverse of label_to_volume: (slice index, col, row) in the volume -> (instance number, x, y)
    original pixels."""
    d = int(np.clip(round(float(slice_index)), 0, len(series.instance_numbers) - 1))
    x, y = to_original([col, row], series.original_sizes[d], series.volume.shape[1:])
    return int(series.instance_numbers[d]), float(x), float(y)


def stack_bounds(series, slice_index):
    """(first, last) slice index of the stack holding slice_index: neighbours and jitter never leave
    it."""
    stack = np.flatnonzero(series.stack_ids == series.stack_ids[int(slice_index)])
    return int(stack.min()), int(stack.max())


def series_of_type(study, series_type):
    """The StudySeries of one type in a study {series_id: StudySeries}, in the order they were
    listed."""
    return [loaded for loaded in study.values() if loaded.series_type == series_type]


# -----------------------------------------------------------------------------
# labelled points -> landmarks (landmark training, severity training and --true-landmarks)


def labelled_landmarks(study, points, where):
    """{(condition, level): Landmark} of labelled points {name: tables.LabelPoint} on a study
    {series_id: StudySeries}: each point on its own series, in volume pixels, confidence 1.

    A point whose series is not in the study, whose instance the series lacks or that lies outside
    its frame is left out with a warning naming it (where: the study or series folder).
    """
    landmarks = {}
    for name, point in points.items():
        loaded = study.get(point.series_id)
        try:
            if loaded is None:
                raise KeyError(f"series {point.series_id} not loaded")
            d, col, row = label_to_volume(loaded.series, point.instance_number, point.x, point.y)
        except (KeyError, ValueError) as error:  # that row trains nothing: no target, no crop
            warnings.warn(f"{where}: label {name[0]} {name[1]} ignored: {error}")
            continue
        landmarks[name] = Landmark(loaded.series_type, point.series_id, d, col, row, 1.0)
    return landmarks


def landmark_array(landmarks, names):
    """(K, 3) float32 [slice, col, row] in volume pixels of the named landmarks; NaN rows (masked
    targets) where one is absent."""
    out = np.full((len(names), 3), np.nan, dtype=np.float32)
    for k, name in enumerate(names):
        if name in landmarks:
            out[k] = landmarks[name].slice, landmarks[name].col, landmarks[name].row
    return out
