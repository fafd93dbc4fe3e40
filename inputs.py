"""Network inputs: the one place that turns a series into what a network reads, for training and
prediction alike.

    # (D, 96, 96) normalised slices at the network's size
    image = sagittal_slices(series, 96)
    # (D, 2, 96, 96): + each slice's offset across the stack
    x = sagittal_input(image, series)
    x = axial_input(axial_image(series, d, 96), column_direction(series, d))   # (1, 2, 96, 96)
    # (A, S, C, C): rows with a landmark
    crops, groups, columns = study_crops(study, landmarks, settings)

Training augments the image between the two calls (random_affine, random_intensity, mirror_axial),
so the extra channel always describes the image the network sees. Augmentations move their points
with the image.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import cache
import data

OFFSET_SCALE_MM = 50.0  # the sagittal offset channel is mm / 50: about -1..1 across a lumbar stack

# -----------------------------------------------------------------------------
# intensities and sizes


def resize_slices(volume, size):
    """(D, H, W) -> (D, size, size) tensor, bilinear; points follow with data.to_resized(). float32,
    or uint8 for uint8 input (a vectorised kernel, a quarter of the bytes to move).

    Shrinking averages over each output pixel's footprint (antialias): a 512 px frame read at 96 px
    would otherwise keep one pixel in five and alias the noise and fine detail into the input.
    """
    tensor = torch.as_tensor(np.ascontiguousarray(volume))
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    shrinking = size < max(tensor.shape[-2:])
    return F.interpolate(tensor[:, None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrinking)[:, 0]


def input_slices(series, index, size):
    """(n, size, size) float32: the slices series.volume[index], normalised, at the network's size.

    A cached volume already holds the normalised intensities as bytes (cache.quantise): those are
    resized as they are, four times faster than normalising and resizing floats, and within one
    cache step (0.006) of it. The whole series is resized once and kept in the cache at this size
    (cache.resized), so a training epoch reads a few small slices instead of shrinking 512 px frames
    again: this is what keeps a loader worker ahead of a GPU at 512 px.
    """
    if isinstance(series.volume, cache.StoredVolume):  # the stored bytes, shrunk once
        small = cache.resized(series.volume, size, resize_slices)[index]
        return torch.from_numpy(np.array(small)).float() * cache.QUANTUM
    return resize_slices(cache.normalise(series.volume[index], series.intensity_range), size)


# -----------------------------------------------------------------------------
# landmark network inputs


def slice_offsets(series):
    """(D,) signed offset in mm of each slice from the stack's mean position.

    Sagittal stacks: along patient x, so + is always the patient's left whatever the slice order.
    Axial stacks: along the main normal (superior-inferior for a contiguous stack).
    """
    normals = data.slice_normals(series.orientations)
    main_normal = normals[np.bincount(series.stack_ids).argmax() == series.stack_ids][0]
    axis = np.array([1.0, 0.0, 0.0]) if abs(main_normal[0]) > 0.7 else main_normal
    along = series.positions @ axis
    return (along - along.mean()).astype(np.float32)


def sagittal_slices(series, size):
    """(D, size, size) every slice of a sagittal series, normalised over the whole series,
    resized."""
    return input_slices(series, slice(None), size)


def sagittal_input(image, series):
    """(D, S, S) slices -> (D, 2, S, S): channel 1 is the slice's offset across the stack (mm / 50),
    constant over the slice, so the network can tell the patient's left parasagittal slices from the
    right ones.
    """
    offsets = torch.from_numpy(slice_offsets(series) / OFFSET_SCALE_MM)[:, None, None]
    offsets = offsets.expand_as(image)
    return torch.stack([image, offsets], dim=1)


def column_direction(series, slice_index):
    """+1 where image columns run toward the patient's left (the DICOM display convention), else
    -1."""
    return 1.0 if series.orientations[slice_index, 0] >= 0 else -1.0


def axial_image(series, slice_index, size):
    """(1, size, size) one axial slice, normalised over the whole series, resized; the other slices
    are not read."""
    return input_slices(series, slice(slice_index, slice_index + 1), size)


def axial_input(image, direction):
    """(1, S, S) slice -> (1, 2, S, S): channel 1 says which way columns run toward the patient's
    left (+1 / -1), so a mirrored image (augmentation, or a series stored the other way round) still
    shows which side is which.
    """
    return torch.stack([image, torch.full_like(image, direction)], dim=1)


def mirror_axial(image, targets, direction):
    """Mirror an axial image (1, S, S) across its columns. Points (K, 3) [slice, col, row] move with
    the image and keep their side: the patient's left recess is still the left one, it now lies on
    the other half of the image, and the direction channel flips to say so."""
    mirrored = targets.copy()
    mirrored[:, 1] = image.shape[-1] - 1 - targets[:, 1]
    return image.flip(-1), mirrored, -direction


# -----------------------------------------------------------------------------
# 2.5D crops for the severity network


def crop_2p5d(series, point_px, size_mm, out_px, n_slices, degrees=0.0):
    """Square crops of size_mm around a point (slice, col, row) in the series' volume pixels, on its
    slice and its neighbours -> (n_slices, out_px, out_px).

    Neighbours are clamped at the ends of the slice's own stack, so a crop never mixes two tilted
    per-disc stacks. Each slice is sampled with its own pixel spacing, so the crop covers the same
    millimetres whatever the resolution. Intensities are normalised over the whole series. degrees
    turns the crop about its centre (augmentation).
    """
    slice_index, col, row = point_px
    depth, height, width = series.volume.shape
    centre = int(np.clip(round(float(slice_index)), 0, depth - 1))
    first, last = data.stack_bounds(series, centre)
    picks = np.clip(np.arange(centre - n_slices // 2, centre + n_slices // 2 + 1), first, last)
    spacing = series.pixel_spacing[picks]  # (S, 2) [row, col] mm
    # (out_px,) fractions of the crop: pixel centres
    steps = (np.arange(out_px) + 0.5) / out_px - 0.5
    across, down = np.meshgrid(steps * size_mm, steps * size_mm)  # mm right of and below the centre
    turn = np.radians(degrees)
    right_mm = np.cos(turn) * across - np.sin(turn) * down
    below_mm = np.sin(turn) * across + np.cos(turn) * down
    cols = col + right_mm[None] / spacing[:, 1, None, None]  # (S, out_px, out_px) volume columns
    rows = row + below_mm[None] / spacing[:, 0, None, None]
    # read and normalise only the window the samples fall in, one pixel wider for the bilinear
    # neighbours: a 40 mm crop of a 512 px frame touches about 2 % of it
    top, bottom = max(math.floor(rows.min()) - 1, 0), min(math.ceil(rows.max()) + 2, height)
    left, right = max(math.floor(cols.min()) - 1, 0), min(math.ceil(cols.max()) + 2, width)
    if top >= bottom or left >= right:  # the whole crop lies off the frame
        return torch.zeros(n_slices, out_px, out_px)
    window = cache.normalised(series.volume, (picks, slice(top, bottom), slice(left, right)),
                              series.intensity_range)
    images = torch.from_numpy(window)[:, None]
    cols, rows = cols - left, rows - top
    grid = np.stack([(2 * cols + 1) / (right - left) - 1, (2 * rows + 1) / (bottom - top) - 1],
                    axis=-1)
    grid = torch.as_tensor(grid, dtype=torch.float32)
    crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops[:, 0]


def mirror_flags(series, slice_index, condition):
    """(reverse slices, flip columns) that put a structure into the canonical view every crop
    shares: axial columns run away from the midline, sagittal slices run toward it. Left structures
    lie at patient +x, right ones at -x; which way the series' columns and slice normal run in
    patient x is read from its orientation.
    """
    if not condition.startswith(("left", "right")):
        return False, False
    lateral = 1.0 if condition.startswith("left") else -1.0  # patient x of 'away from the midline'
    orientation = series.orientations[int(slice_index)]
    normal = data.slice_normals(orientation)
    if abs(normal[0]) > 0.7:  # sagittal: the slices step along patient x
        return bool(normal[0] * lateral > 0), False
    return False, bool(orientation[0] * lateral < 0)  # axial: columns run along u


def study_crops(study, landmarks, settings, degrees=None):
    """Crops (A, S, C, C) of the A rows that have a landmark, their condition groups (A,) and their
    columns (A,): indices into LABEL_COLUMNS, in that order. A row without a landmark gets no crop
    at all.

    No zero image stands in for a missing row: training, the BatchNorm recomputation and grading
    forward the same kind of input, so the batch statistics BatchNorm learns from are those it
    grades with (on a set where most rows have no landmark, zero images were most of every training
    batch and eval mode graded something else).
    study: {series_id: data.StudySeries}; landmarks: {(condition, level): data.Landmark}; settings:
    the severity checkpoint's input settings {n_slices, crop_px, crop_mm (one per condition group)}.
    Right-side crops are mirrored onto the left (mirror_flags), so one head serves both sides.
    degrees (25,): turn each crop (training).
    """
    crops, columns = [], []
    for j, (condition, level) in enumerate(data.COLUMN_POINTS):
        landmark = landmarks.get((condition, level))
        if landmark is None:
            continue
        series = study[landmark.series_id].series
        reverse, flip_columns = mirror_flags(series, landmark.slice, condition)
        size_mm = settings["crop_mm"][data.GROUP_OF_CONDITION[condition]]
        turn = 0.0 if degrees is None else degrees[j]
        point_px = landmark.slice, landmark.col, landmark.row
        crop = crop_2p5d(series, point_px, size_mm, settings["crop_px"], settings["n_slices"], turn)
        if reverse:  # slices toward the midline
            crop = crop.flip(0)
        if flip_columns:  # columns away from the midline
            crop = crop.flip(-1)
        crops.append(crop)
        columns.append(j)
    columns = torch.tensor(columns, dtype=torch.long)
    groups = torch.tensor([data.GROUP_OF_CONDITION[c] for c, _ in data.COLUMN_POINTS])[columns]
    if not crops:
        empty = torch.zeros(0, settings["n_slices"], settings["crop_px"], settings["crop_px"])
        return empty, groups, columns
    return torch.stack(crops), groups, columns


# -----------------------------------------------------------------------------
# augmentation that keeps the coordinates right


def random_affine(volume, points, max_scale=0.12, max_shift=0.08, max_degrees=8.0):
    """The same random scale/shift/rotation for all slices (D, S, S); points (K, 2) [col, row]
    follow."""
    size = volume.shape[-1]
    scale = math.exp(np.random.uniform(-max_scale, max_scale))
    angle = math.radians(np.random.uniform(-max_degrees, max_degrees))
    shift = np.random.uniform(-max_shift, max_shift, size=2) * 2  # in normalised [-1, 1] units
    # theta maps output normalised coords to input normalised coords: in = R/scale @ out + shift
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]]) / scale
    theta = np.concatenate([rotation, shift[:, None]], axis=1)
    theta = torch.tensor(theta, dtype=torch.float32)[None]
    # one grid, the slices as its channels: built and read once, not once per slice
    grid = F.affine_grid(theta, (1, len(volume), size, size), align_corners=False)
    warped = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    # pixel centres -> [-1, 1], align_corners=False convention
    normalised = (2 * points + 1) / size - 1
    moved = (normalised - shift) @ np.linalg.inv(rotation).T
    return warped, ((moved + 1) * size - 1) / 2


def random_intensity(volume):
    """Random gamma and contrast, so the network does not learn one scanner's grey levels."""
    gamma = math.exp(np.random.uniform(-0.3, 0.3))
    return volume.clamp(min=0) ** gamma * np.random.uniform(0.85, 1.15)


def jitter_slice(series, slice_index, max_slices):
    """slice_index moved by up to max_slices, inside its own stack."""
    first, last = data.stack_bounds(series, slice_index)
    return int(
        np.clip(int(slice_index) + np.random.randint(-max_slices, max_slices + 1), first, last)
    )


def jitter_landmarks(study, landmarks, max_mm, max_slices):
    """Every landmark moved by up to max_mm in-plane and max_slices through-plane (stage-1 errors),
    in its stack."""
    moved = {}
    for name, landmark in landmarks.items():
        series = study[landmark.series_id].series
        spacing = series.pixel_spacing[int(landmark.slice)]
        d = jitter_slice(series, landmark.slice, max_slices)
        dx, dy = np.random.uniform(-max_mm, max_mm, size=2)
        moved[name] = landmark._replace(slice=d, col=landmark.col + dx / spacing[1],
                                        row=landmark.row + dy / spacing[0])
    return moved
