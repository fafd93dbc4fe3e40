"""Running the trained networks on a study: checkpoints -> landmarks -> graded crops.

infer.py and both training scripts' validations call these, so what is measured is what is
submitted. A study is {series_id: data.StudySeries}; landmarks are {(condition, level):
data.Landmark}.

    landmark_models = load_landmark_models("runs/demo", device)  # {tag: (LandmarkNet, settings)}
    landmarks, notes = predict_landmarks(landmark_models, study, device)  # stage 1
    severity_models, prior = load_severity_models(["runs/demo/severity_best.pt"], device)
    probabilities, available = grade_study(severity_models, study, landmarks, device)  # stage 2

Stage 1 in order: the canal points of Sagittal T2/STIR (predict_sagittal, with separate_levels
keeping two levels off one disc), then the foramina of Sagittal T1 near their level's canal point
(foramen_cells), then each level's axial slice (choose_axial_slice) and its two recesses
(predict_axial).
"""

import functools
import json
import os
from collections import namedtuple

import numpy as np
import torch

import data
import inputs
from models import MASKED, LandmarkNet, SeverityNet

# a trained severity network with the crop settings it reads
SeverityModel = namedtuple("SeverityModel", "net settings")

# -----------------------------------------------------------------------------
# checkpoints


def load_landmark_models(folder, device):
    """{tag: (LandmarkNet, settings)} for every landmarks_<tag>_{best,last}.pt in folder.

    settings hold what inference needs to rebuild the input (image_size), the file's path and the
    training flags (args).
    """
    found = {}
    for tag in data.SERIES_TAGS.values():
        paths = [os.path.join(folder, f"landmarks_{tag}_{kind}.pt") for kind in ("best", "last")]
        existing = [path for path in paths if os.path.exists(path)]
        if not existing:
            continue
        checkpoint = torch.load(existing[0], map_location=device, weights_only=False)
        model = LandmarkNet(checkpoint["settings"]["n_points"]).to(device)
        model.load_state_dict(checkpoint["model"])
        settings = dict(checkpoint["settings"], path=existing[0], args=checkpoint["args"])
        found[tag] = model.eval(), settings
    return found


def load_severity_models(paths, device):
    """[SeverityModel] of severity checkpoints (several: an ensemble, averaged by grade_study), and
    the training prior (25, 3) of the first one."""
    found, prior = [], None
    for path in paths:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        settings = checkpoint["settings"]
        net = SeverityNet(settings["n_slices"]).to(device)
        net.load_state_dict(checkpoint["model"])
        found.append(SeverityModel(net.eval(), settings))
        if prior is None:
            prior = np.asarray(checkpoint["prior"])
    return found, prior


# -----------------------------------------------------------------------------
# heatmaps -> points


def decode_heatmaps(logits, depth_mask, window=2):
    """(B, K, D, h, w) logits -> (B, K, 3) [slice, col, row] in heatmap cells and (B, K) confidence.

    The slice is the argmax of the slice marginal; the in-plane position a soft-argmax in a
    (2*window+1)^2 window around the peak of that slice, so far-away mass cannot bias it. The
    confidence is the probability mass inside that window.
    """
    batch, n_points, depth, height, width = logits.shape
    in_depth = depth_mask.to(logits.device).view(batch, 1, depth, 1, 1)
    masked = logits.float().masked_fill(~in_depth, MASKED)
    prob = masked.flatten(2).softmax(-1).view_as(masked)
    slice_index = prob.sum((-1, -2)).argmax(-1)  # (B, K)
    chosen = slice_index.view(batch, n_points, 1, 1, 1).expand(-1, -1, 1, height, width)
    plane = torch.gather(prob, 2, chosen)[:, :, 0]  # (B, K, h, w): the chosen slice
    peak = plane.flatten(2).argmax(-1)
    peak_row = peak // width
    peak_col = peak % width
    rows = torch.arange(height, device=logits.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=logits.device).view(1, 1, 1, width)
    near_row = (rows - peak_row[..., None, None]).abs() <= window
    near_col = (cols - peak_col[..., None, None]).abs() <= window
    local = plane * (near_row & near_col)
    mass = local.sum((-1, -2)).clamp(min=1e-12)
    row = (local * rows).sum((-1, -2)) / mass
    col = (local * cols).sum((-1, -2)) / mass
    return torch.stack([slice_index.float(), col, row], dim=-1).cpu(), mass.cpu()


def heat_to_volume(points_cell, heat_hw, volume_hw):
    """[slice, col, row] in heatmap cells -> in volume pixels, through the one resize pair."""
    points_px = np.array(points_cell, dtype=np.float64)
    points_px[..., 1:] = data.to_original(points_px[..., 1:], volume_hw, heat_hw)
    return points_px


def cell_centres(volume_hw, heat_hw):
    """(h, w, 2) [col, row] in volume pixels of the centre of every heatmap cell."""
    grid = np.stack(np.meshgrid(np.arange(heat_hw[1]), np.arange(heat_hw[0])), -1)
    return data.to_original(grid, volume_hw, heat_hw)


def cell_positions_mm(series, heat_hw):
    """(D, h, w, 3) patient mm of the centre of every heatmap cell of a series."""
    centres = cell_centres(series.volume.shape[1:], heat_hw)
    positions = series.positions[:, None, None]
    orientations = series.orientations[:, None, None]
    spacing = series.pixel_spacing[:, None, None]
    return data.pixel_to_patient(positions, orientations, spacing, centres[..., 0], centres[..., 1])


def cell_mm(cells_mm, point_cell):
    """Patient mm (3,) of the heatmap cell holding a decoded [slice, col, row]."""
    d = int(point_cell[0])
    row = int(round(float(point_cell[2])))
    col = int(round(float(point_cell[1])))
    return cells_mm[d, row, col]


# -----------------------------------------------------------------------------
# no two levels on one disc

# discs lie 25-40 mm apart: a level nearer than this below the one above is on its disc
LEVEL_GAP_MM = 15.0
DOWN = np.array([0.0, 0.0, -1.0])  # patient z runs toward the head, so L1/L2 -> L5/S1 runs along -z

# one place a level may take: heatmap [slice, col, row], confidence, patient mm, log probability
# near it
Candidate = namedtuple("Candidate", "point confidence mm log_p")


def apart(upper_mm, lower_mm):
    """True when lower_mm lies at least LEVEL_GAP_MM below upper_mm (patient z)."""
    return (lower_mm - upper_mm) @ DOWN >= LEVEL_GAP_MM


def level_candidates(logits, cells_mm, n_candidates=4):
    """Up to n_candidates Candidates for one point from its (D, h, w) logits.

    The free decode comes first; each next one is decoded outside LEVEL_GAP_MM of those before.
    log_p is the log probability within LEVEL_GAP_MM / 2 of the place. Confidence is the decode's
    window mass as a share of the whole heatmap (not of the cells left), so a moved point is no
    surer than the network was of that place.
    """
    every_slice = torch.ones(1, logits.shape[0], dtype=torch.bool)
    log_prob = logits.float().flatten().log_softmax(0).view_as(logits).cpu()
    allowed = (logits > MASKED / 2).cpu().numpy()  # the cells a foramen mask left it
    found = []
    while allowed.any() and len(found) < n_candidates:
        masked = logits.masked_fill(~torch.as_tensor(allowed, device=logits.device), MASKED)
        points, shares = decode_heatmaps(masked[None, None], every_slice)
        point, share = points[0, 0], shares[0, 0]
        at_mm = cell_mm(cells_mm, point)
        distance = np.linalg.norm(cells_mm - at_mm, axis=-1)
        left = float(log_prob[torch.as_tensor(allowed)].logsumexp(0).exp())
        log_p = float(log_prob[torch.as_tensor(distance <= LEVEL_GAP_MM / 2)].logsumexp(0))
        found.append(Candidate(point, share * left, at_mm, log_p))
        allowed &= distance >= LEVEL_GAP_MM
    return found


def most_probable_path(options):
    """The Candidate per level (one list of options per level, top to bottom) with the largest sum
    of log_p in which each level lies LEVEL_GAP_MM below the one above; [] when none fits.

    Dynamic programming from the top level down: for each candidate of a level, the best path that
    ends there.
    """
    best = [(c.log_p, [c]) for c in options[0]]
    for level_options in options[1:]:
        next_best = []
        for candidate in level_options:
            total, path = -np.inf, []
            for previous_total, previous_path in best:
                if previous_total > -np.inf and apart(previous_path[-1].mm, candidate.mm):
                    if previous_total + candidate.log_p > total:
                        total = previous_total + candidate.log_p
                        path = previous_path + [candidate]
            next_best.append((total, path))
        best = next_best
    total, path = -np.inf, []
    for option_total, option_path in best:
        if option_total > total:
            total, path = option_total, option_path
    return path


def separate_levels(logits, cells_mm):
    """(K, D, h, w) logits of a sagittal series, K = conditions x 5 levels -> (K, 3) [slice, col,
    row] in heatmap cells and (K,) confidence, with no two levels of a condition on one disc.

    Each point is decoded on its own (decode_heatmaps), and discs look alike, so a level can take
    its neighbour's disc (L4/L5 decoded on L5/S1). Where a condition's levels do not each lie
    LEVEL_GAP_MM below the one above, each level gets a few candidate places and the levels take
    the most probable combination in which they do. Conditions decoded well are returned unchanged;
    so is one where no combination fits.
    """
    n_levels = len(data.LEVELS)
    points, confidence = decode_heatmaps(logits[None],
                                         torch.ones(1, logits.shape[1], dtype=torch.bool))
    points, confidence = points[0], confidence[0]
    for first in range(0, len(points), n_levels):
        found = [cell_mm(cells_mm, p) for p in points[first:first + n_levels]]
        if all(apart(upper, lower) for upper, lower in zip(found[:-1], found[1:])):
            continue
        options = [level_candidates(logits[k], cells_mm) for k in range(first, first + n_levels)]
        for k, chosen in enumerate(most_probable_path(options)):
            points[first + k] = chosen.point
            confidence[first + k] = chosen.confidence
    return points, confidence


# -----------------------------------------------------------------------------
# stage 1 on one series


@torch.no_grad()
def predict_sagittal(model, series, image_size, device, allowed_cells=None):
    """All points of a sagittal series -> (K, 3) [slice, col, row] in volume pixels, (K,)
    confidence.

    allowed_cells(heat_hw) -> (K, D, h, w) bool, if given, says which heatmap cells each point may
    take (foramen_cells); a point with no allowed cell stays free.
    """
    image = inputs.sagittal_slices(series, image_size)
    x = inputs.sagittal_input(image, series)[None].to(device)  # (1, D, 2, S, S)
    logits = model(x).float()  # (1, K, D, h, w)
    heat_hw = tuple(logits.shape[-2:])
    if allowed_cells is not None:
        allowed = torch.as_tensor(allowed_cells(heat_hw), device=logits.device)
        allowed |= ~allowed.flatten(1).any(1)[:, None, None, None]
        logits = logits.masked_fill(~allowed[None], MASKED)
    points_cell, confidence = separate_levels(logits[0], cell_positions_mm(series, heat_hw))
    points_px = heat_to_volume(points_cell.numpy(), heat_hw, series.volume.shape[1:])
    return points_px, confidence.numpy()


@torch.no_grad()
def predict_axial(model, series, slice_index, image_size, device):
    """Left and right recess on one axial slice -> (2, 2) [col, row] volume pixels, (2,)
    confidence."""
    image = inputs.axial_image(series, slice_index, image_size)
    direction = inputs.column_direction(series, slice_index)
    x = inputs.axial_input(image, direction)[None].to(device)  # (1, 1, 2, S, S)
    logits = model(x).float()
    points_cell, confidence = decode_heatmaps(logits, torch.ones(1, 1, dtype=torch.bool))
    points_px = heat_to_volume(points_cell[0].numpy(), logits.shape[-2:], series.volume.shape[1:])
    return points_px[:, 1:], confidence[0].numpy()


# -----------------------------------------------------------------------------
# where the foramina and the axial slices may be, from the canal

# a foramen lies within ~15 mm of its level's canal point, the next level's ~35
FORAMEN_REACH_MM = 20.0
FORAMEN_LATERAL_MM = 5.0  # and this far to its own side of the canal (foramina sit 15-25 mm off it)


def foramen_cells(series, canal_mm, heat_hw):
    """(10, D, h, w) bool: the heatmap cells of a Sagittal T1 series where each foramen
    (POINTS_OF_SERIES order) may lie, given the study's canal points (5, 3) mm.

    Allowed: slices on the foramen's own side of the canal (patient +x is the left) and cells within
    FORAMEN_REACH_MM of its level's canal point. One series then keeps another from slipping to the
    next level or to the other side.
    """
    names = data.POINTS_OF_SERIES["Sagittal T1"]
    depth = len(series.positions)
    centres_px = cell_centres(series.volume.shape[1:], heat_hw)
    spacing = series.pixel_spacing
    allowed = np.zeros((len(names), depth) + tuple(heat_hw), dtype=bool)
    for k, (condition, level) in enumerate(names):
        point_mm = canal_mm[data.LEVELS.index(level)]
        cols, rows, distances = data.patient_to_pixel(series.positions, series.orientations,
                                                      spacing, point_mm[None])
        lateral_mm = -distances * data.slice_normals(series.orientations)[:, 0]  # slice x - canal x
        if condition.startswith("left"):
            side = lateral_mm >= FORAMEN_LATERAL_MM
        else:
            side = lateral_mm <= -FORAMEN_LATERAL_MM
        across_mm = (centres_px[None, ..., 0] - cols[:, None, None]) * spacing[:, 1, None, None]
        down_mm = (centres_px[None, ..., 1] - rows[:, None, None]) * spacing[:, 0, None, None]
        reach = np.hypot(across_mm, down_mm)
        allowed[k] = side[:, None, None] & (reach <= FORAMEN_REACH_MM)
    return allowed


def choose_axial_slice(axial_series, point_mm):
    """(StudySeries, slice index) of the axial series and slice that cover a patient point best: the
    nearest slice among the series that cover it (data.covering_slice). None when none does, or
    when the point is unknown (NaN).

    Validation (train_landmarks.py, one series at a time) and inference (every axial series of a
    study) both choose here.
    """
    if not np.isfinite(point_mm).all():
        return None
    covering = []
    for k, loaded in enumerate(axial_series):
        choice = data.covering_slice(loaded.series, point_mm)
        if choice is not None:
            slice_index, distance_mm = choice
            covering.append((distance_mm, k, loaded, slice_index))
    if not covering:
        return None
    _, _, loaded, slice_index = min(covering, key=lambda c: c[:2])
    return loaded, slice_index


def points_mm(series, points_px):
    """(K, 3) [slice, col, row] volume pixels -> (K, 3) patient mm (NaN rows stay NaN)."""
    out = np.full((len(points_px), 3), np.nan)
    for k, (d, col, row) in enumerate(points_px):
        if np.isfinite([d, col, row]).all():
            out[k] = data.series_pixel_to_patient(series, d, col, row)
    return out


def landmarks_mm(study, landmarks):
    """(len(landmarks), 3) patient mm of Landmark records."""
    rows = [
        points_mm(study[lm.series_id].series, [(lm.slice, lm.col, lm.row)])[0] for lm in landmarks
    ]
    return np.array(rows)


def level_points_mm(study, found):
    """(5, 3) patient mm of each disc level, or None, from three estimates: the canal point
    (Sagittal T2/STIR) and the left and right foramen (Sagittal T1).

    With all three, their coordinate-wise median: one point slipped to the next level (a foramen
    35 mm off) is outvoted, and the midline x is kept. With the canal or the foramina alone, the
    canal point or the foramina's midpoint.
    """
    conditions = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing",
                  "right_neural_foraminal_narrowing"]
    estimates = []
    for condition in conditions:
        names = [(condition, level) for level in data.LEVELS]
        if all(name in found for name in names):
            estimates.append(landmarks_mm(study, [found[name] for name in names]))
        else:
            estimates.append(None)
    canal, left, right = estimates
    if canal is not None and left is not None and right is not None:
        return np.median(np.stack(estimates), axis=0)
    if canal is not None:
        return canal
    if left is not None and right is not None:
        return (left + right) / 2
    return None


# -----------------------------------------------------------------------------
# stage 1 on a study


def predict_landmarks(landmark_models, study, device):
    """({(condition, level): data.Landmark}, [notes on points not found]) for one study.

    Every series of a type is read: a sagittal point comes from the series where the model is most
    confident; the foramina are sought near their level's canal point, on their own side
    (foramen_cells); an axial level comes from the series and slice that cover the level's point
    (choose_axial_slice).
    """
    found = {}
    # the canal first: it places the foramina
    for series_type in ("Sagittal T2/STIR", "Sagittal T1"):
        tag = data.SERIES_TAGS[series_type]
        if tag not in landmark_models:
            continue
        model, settings = landmark_models[tag]
        canal = [found.get(("spinal_canal_stenosis", level)) for level in data.LEVELS]
        canal_mm = None
        if series_type == "Sagittal T1" and all(canal):
            canal_mm = landmarks_mm(study, canal)
        for loaded in data.series_of_type(study, series_type):
            allowed_cells = None
            if canal_mm is not None:
                allowed_cells = functools.partial(foramen_cells, loaded.series, canal_mm)
            points_px, confidences = predict_sagittal(model, loaded.series, settings["image_size"],
                                                      device, allowed_cells)
            names = data.POINTS_OF_SERIES[series_type]
            for name, (d, col, row), confidence in zip(names, points_px, confidences):
                if name not in found or confidence > found[name].confidence:
                    found[name] = data.Landmark(series_type, loaded.series_id, d, col, row,
                                                float(confidence))
    notes = predict_axial_levels(landmark_models, study, found, device)
    return found, notes


def predict_axial_levels(landmark_models, study, found, device):
    """Add both recesses of every level to found, on the axial slice nearest to the level's point
    (level_points_mm of the sagittal landmarks in found); returns notes on levels not covered."""
    axial_series = data.series_of_type(study, "Axial T2")
    level_mm = level_points_mm(study, found)
    if "axial" not in landmark_models or not axial_series or level_mm is None:
        return []
    model, settings = landmark_models["axial"]
    notes = []
    for level, level_name, point_mm in zip(data.LEVELS, data.LEVEL_NAMES, level_mm):
        choice = choose_axial_slice(axial_series, point_mm)
        if choice is None:
            notes.append(f"level {level_name} lies outside every Axial T2 series")
            continue
        loaded, d = choice
        plane_px, confidences = predict_axial(model, loaded.series, d, settings["image_size"],
                                              device)
        for side, (col, row), confidence in zip(("left", "right"), plane_px, confidences):
            name = f"{side}_subarticular_stenosis", level
            found[name] = data.Landmark(
                "Axial T2", loaded.series_id, d, col, row, float(confidence)
            )
    return notes


# -----------------------------------------------------------------------------
# stage 2 on a study


@torch.no_grad()
def grade_study(severity_models, study, landmarks, device, shift_mm=0.0):
    """(25, 3) mean probabilities of the severity models (NaN rows without a landmark) and (25,)
    availability.

    severity_models: [SeverityModel]. Each grades crops made with its own checkpoint's settings.
    shift_mm > 0 also grades crops moved that far along the image's columns and rows (test-time
    augmentation) and averages.
    """
    offsets = [(0.0, 0.0)]
    if shift_mm:
        offsets += [(shift_mm, 0.0), (-shift_mm, 0.0), (0.0, shift_mm), (0.0, -shift_mm)]
    total = np.zeros((data.N_LABELS, data.N_SEVERITIES))
    count = 0
    available = np.zeros(data.N_LABELS, dtype=bool)
    for along_col_mm, along_row_mm in offsets:
        moved = shifted(study, landmarks, along_col_mm, along_row_mm)
        crops_of = {}  # settings -> crops: models sharing settings share crops
        for net, settings in severity_models:
            key = json.dumps(settings, sort_keys=True)
            if key not in crops_of:
                crops_of[key] = inputs.study_crops(study, moved, settings)
            crops, groups, columns = crops_of[key]  # only the rows with a landmark
            if len(columns):
                logits = net(crops.to(device), groups.to(device)).float().cpu()
                total[columns.numpy()] += logits.softmax(-1).numpy()
                available[columns.numpy()] = True
            count += 1
    total[~available] = np.nan
    return total / count, available


def shifted(study, landmarks, along_col_mm, along_row_mm):
    """Landmarks moved in-plane by the given millimetres (each slice's own pixel spacing)."""
    if not along_col_mm and not along_row_mm:
        return landmarks
    moved = {}
    for name, lm in landmarks.items():
        spacing = study[lm.series_id].series.pixel_spacing[int(lm.slice)]  # [row, col] mm
        col = lm.col + along_col_mm / spacing[1]
        row = lm.row + along_row_mm / spacing[0]
        moved[name] = lm._replace(col=col, row=row)
    return moved
