"""The two networks (torchvision ResNet-18 pieces, randomly initialised unless --pretrained is given), and running
them on a study: checkpoints -> landmarks -> graded crops.

    >>> import torch
    >>> LandmarkNet(n_points=5)(torch.zeros(1, 7, 2, 64, 64)).shape   # (B, D, 2, H, W) -> (B, K, D, H/2, W/2)
    torch.Size([1, 5, 7, 32, 32])
    >>> SeverityNet(n_slices=5)(torch.zeros(4, 5, 48, 48), torch.tensor([0, 1, 2, 2])).shape   # crops, groups
    torch.Size([4, 3])
"""
import functools
import json
import os
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import inputs


def resnet18_trunk(in_channels, pretrained_path=None):
    """ResNet-18 with its first conv taking in_channels; weights from a local state-dict file if given."""
    net = torchvision.models.resnet18(weights=None)
    if pretrained_path:
        try:
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
        except Exception as error:  # not a torch file, or tensors of the wrong shapes
            raise ValueError(f"{pretrained_path}: not a ResNet-18 state dict ({type(error).__name__}: {str(error)[:200]})") from error
        if len(missing) > 2 or unexpected:  # only the classifier (fc.weight, fc.bias) may be absent
            raise ValueError(f"{pretrained_path}: not a ResNet-18 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    first = net.conv1.weight.data.mean(dim=1, keepdim=True)  # (64, 1, 7, 7): grey input from RGB filters
    net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.conv1.weight.data.copy_(first.repeat(1, in_channels, 1, 1) / in_channels)
    return net


class LandmarkNet(nn.Module):
    """Per-slice encoder-decoder producing one heatmap per point; slices of a series are mixed in depth.

    Input (B, D, 2, H, W): channel 0 the slice, channel 1 the slice's offset across the stack (mm / 50),
    constant over the slice, so left and right parasagittal slices are told apart. Output logits
    (B, K, D, H/2, W/2); the caller takes a softmax over (D, H/2, W/2) per point (3D soft-argmax).
    """

    def __init__(self, n_points, pretrained_path=None, width=32):
        super().__init__()
        trunk = resnet18_trunk(2, pretrained_path)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu)  # stride 2, 64 ch
        self.layer1 = nn.Sequential(trunk.maxpool, trunk.layer1)  # stride 4, 64 ch
        self.layer2 = trunk.layer2  # stride 8, 128 ch
        self.layer3 = trunk.layer3  # stride 16, 256 ch: a field of view wide enough to count the discs
        self.depth_mix = nn.Conv3d(256, 256, kernel_size=(3, 1, 1), padding=(1, 0, 0))  # neighbouring slices
        self.up3 = nn.Conv2d(256 + 128, width * 2, 3, padding=1)
        self.up2 = nn.Conv2d(width * 2 + 64, width * 2, 3, padding=1)
        self.up1 = nn.Conv2d(width * 2 + 64, width, 3, padding=1)
        self.head = nn.Conv2d(width, n_points, 1)

    def forward(self, slices):
        batch, depth = slices.shape[:2]
        x = slices.flatten(0, 1)  # (B*D, 2, H, W)
        s2 = self.stem(x)
        s4 = self.layer1(s2)
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        mixed = s16.unflatten(0, (batch, depth)).transpose(1, 2)  # (B, 256, D, h, w)
        s16 = s16 + F.relu(self.depth_mix(mixed)).transpose(1, 2).flatten(0, 1)
        y = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up3(torch.cat([y, s8], dim=1)))
        y = F.interpolate(y, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up2(torch.cat([y, s4], dim=1)))
        y = F.interpolate(y, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up1(torch.cat([y, s2], dim=1)))
        heat = self.head(y)  # (B*D, K, H/2, W/2)
        return heat.unflatten(0, (batch, depth)).transpose(1, 2)  # (B, K, D, H/2, W/2)


class SeverityNet(nn.Module):
    """2.5D grading: a per-slice CNN, attention pooling over the slices, one 3-logit head per condition group.

    Input crops (B, S, C, C) and the condition group of each crop (B,) (an index into data.GROUPS); right-side
    crops arrive mirrored onto the left, so both sides share the head.
    """

    def __init__(self, n_slices, n_groups=len(data.GROUPS), pretrained_path=None, width=256):
        super().__init__()
        trunk = resnet18_trunk(1, pretrained_path)
        self.encoder = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2,
                                     trunk.layer3, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 256)
        self.slice_embedding = nn.Parameter(torch.zeros(n_slices, width))  # where in the 2.5D stack a slice is
        self.group_embedding = nn.Embedding(n_groups, width)
        self.attention = nn.Linear(width, 1)
        self.heads = nn.Linear(width, data.N_SEVERITIES * n_groups)

    def forward(self, crops, groups):
        batch, n_slices = crops.shape[:2]
        features = self.encoder(crops.flatten(0, 1)[:, None]).view(batch, n_slices, -1)  # (B, S, 256)
        features = features + self.slice_embedding + self.group_embedding(groups)[:, None]
        weights = self.attention(torch.tanh(features)).softmax(dim=1)  # (B, S, 1)
        pooled = (weights * features).sum(dim=1)  # (B, 256)
        logits = self.heads(pooled).view(batch, -1, data.N_SEVERITIES)  # (B, groups, 3)
        return logits[torch.arange(batch, device=crops.device), groups]  # (B, 3)


MASKED = -1e4  # the logit of a heatmap cell a point may not take: no probability after the softmax


def decode_heatmaps(logits, depth_mask, window=2):
    """(B, K, D, h, w) logits -> (B, K, 3) [slice, col, row] in heatmap pixels and (B, K) confidence.

    The slice is the argmax of the slice marginal; the in-plane position a soft-argmax in a
    (2*window+1)^2 window around the peak of that slice, so far-away mass cannot bias it.
    """
    batch, n_points, depth, height, width = logits.shape
    masked = logits.float().masked_fill(~depth_mask.to(logits.device).view(batch, 1, depth, 1, 1), MASKED)
    prob = masked.flatten(2).softmax(-1).view_as(masked)
    slice_index = prob.sum((-1, -2)).argmax(-1)  # (B, K)
    plane = torch.gather(prob, 2, slice_index.view(batch, n_points, 1, 1, 1).expand(-1, -1, 1, height, width))[:, :, 0]
    peak = plane.flatten(2).argmax(-1)
    peak_row, peak_col = peak // width, peak % width
    rows = torch.arange(height, device=logits.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=logits.device).view(1, 1, 1, width)
    near = ((rows - peak_row[..., None, None]).abs() <= window) & ((cols - peak_col[..., None, None]).abs() <= window)
    local = plane * near
    mass = local.sum((-1, -2)).clamp(min=1e-12)
    row = (local * rows).sum((-1, -2)) / mass
    col = (local * cols).sum((-1, -2)) / mass
    return torch.stack([slice_index.float(), col, row], dim=-1).cpu(), mass.cpu()


def heat_to_volume(points, heat_hw, volume_hw):
    """[slice, col, row] in heatmap pixels -> in volume pixels, through the one resize pair."""
    out = np.array(points, dtype=np.float64)
    out[..., 1:] = data.to_original(out[..., 1:], volume_hw, heat_hw)
    return out


# -----------------------------------------------------------------------------
# running the landmark networks on a series


@torch.no_grad()
def predict_sagittal(model, series, image_size, device, where=None):
    """All points of a sagittal series -> (K, 3) [slice, col, row] in volume pixels and (K,) confidence.

    where(heat_hw) -> (K, D, h, w) bool, if given, says which heatmap cells each point may take; a point with no
    allowed cell stays free.
    """
    x = inputs.sagittal_input(inputs.sagittal_slices(series, image_size), series)[None].to(device)  # (1, D, 2, S, S)
    logits = model(x).float()
    if where is not None:
        allowed = torch.as_tensor(where(tuple(logits.shape[-2:])), device=logits.device)
        allowed |= ~allowed.flatten(1).any(1)[:, None, None, None]
        logits = logits.masked_fill(~allowed[None], MASKED)
    points, confidence = separate_levels(logits[0], cell_positions_mm(series, tuple(logits.shape[-2:])))
    return heat_to_volume(points.numpy(), logits.shape[-2:], series.volume.shape[1:]), confidence.numpy()


LEVEL_GAP_MM = 15.0  # neighbouring discs lie 25-40 mm apart head to foot: a level less far below the one above sits on its disc
DOWN = np.array([0.0, 0.0, -1.0])  # patient z runs toward the head (DICOM), so L1/L2 -> L5/S1 runs along -z


def cell_centres(volume_hw, heat_hw):
    """(h, w, 2) [col, row] in volume pixels of the centre of every heatmap cell."""
    return data.to_original(np.stack(np.meshgrid(np.arange(heat_hw[1]), np.arange(heat_hw[0])), -1), volume_hw, heat_hw)


def cell_positions_mm(series, heat_hw):
    """(D, h, w, 3) patient mm of the centre of every heatmap cell of a series."""
    centres = cell_centres(series.volume.shape[1:], heat_hw)
    return data.pixel_to_patient(series.positions[:, None, None], series.orientations[:, None, None],
                                 series.pixel_spacing[:, None, None], centres[..., 0], centres[..., 1])


# one place a level may take: heatmap [slice, col, row], confidence, patient mm, log probability within 7.5 mm
Candidate = namedtuple("Candidate", "point confidence mm log_p")


def cell_mm(cells_mm, point):
    """Patient mm (3,) of the heatmap cell holding a decoded [slice, col, row]."""
    return cells_mm[int(point[0]), int(round(float(point[2]))), int(round(float(point[1])))]


def level_candidates(logits, cells_mm, n_candidates=4):
    """Up to n_candidates Candidates for one point from its (D, h, w) logits: the free decode first, each next one
    decoded outside LEVEL_GAP_MM of those before. Confidence is the decode's window mass as a share of the whole
    heatmap (not of the cells left), so a moved point is no surer than the network was of that place."""
    everything, found = torch.ones(1, logits.shape[0], dtype=torch.bool), []
    log_prob = logits.float().flatten().log_softmax(0).view_as(logits).cpu()
    allowed = (logits > MASKED / 2).cpu().numpy()  # the cells `where` left it
    while allowed.any() and len(found) < n_candidates:
        masked = logits.masked_fill(~torch.as_tensor(allowed, device=logits.device), MASKED)
        point, share = (a[0, 0] for a in decode_heatmaps(masked[None, None], everything))
        at = cell_mm(cells_mm, point)
        distance = np.linalg.norm(cells_mm - at, axis=-1)
        left = float(log_prob[torch.as_tensor(allowed)].logsumexp(0).exp())
        log_p = float(log_prob[torch.as_tensor(distance <= LEVEL_GAP_MM / 2)].logsumexp(0))
        found.append(Candidate(point, share * left, at, log_p))
        allowed &= distance >= LEVEL_GAP_MM
    return found


def separate_levels(logits, cells_mm):
    """(K, D, h, w) logits of a sagittal series, K = conditions x 5 levels -> (K, 3) [slice, col, row] heatmap
    pixels and (K,) confidence, with no two levels of a condition on one disc.

    Each point is decoded on its own (decode_heatmaps), and discs look alike, so a level can take its neighbour's
    disc (L4/L5 decoded on L5/S1). Where a condition's levels do not each lie at least LEVEL_GAP_MM below the one
    above (patient z), each level gets a few candidate places and the levels take the most probable combination
    (the largest sum of log_p, by dynamic programming from L1/L2 down) in which they do. Conditions decoded well
    are returned unchanged; so is one where no combination fits.
    """
    n_levels, everything = len(data.LEVELS), torch.ones(1, logits.shape[1], dtype=torch.bool)
    points, confidence = (a[0] for a in decode_heatmaps(logits[None], everything))
    apart = lambda upper, lower: (lower - upper) @ DOWN >= LEVEL_GAP_MM  # noqa: E731
    for first in range(0, len(points), n_levels):
        found = [cell_mm(cells_mm, p) for p in points[first:first + n_levels]]
        if all(apart(upper, lower) for upper, lower in zip(found[:-1], found[1:])):
            continue
        options = [level_candidates(logits[k], cells_mm) for k in range(first, first + n_levels)]
        best = [(c.log_p, [c]) for c in options[0]]  # for each candidate of this level: the best path ending there
        for level in range(1, n_levels):
            best = [max(((total + c.log_p, path + [c]) for total, path in best
                         if total > -np.inf and apart(path[-1].mm, c.mm)), key=lambda b: b[0], default=(-np.inf, []))
                    for c in options[level]]
        total, path = max(best, key=lambda b: b[0], default=(-np.inf, []))
        for k, chosen in enumerate(path if total > -np.inf else []):
            points[first + k], confidence[first + k] = chosen.point, chosen.confidence
    return points, confidence


@torch.no_grad()
def predict_axial(model, series, slice_index, image_size, device):
    """Left and right recess on one axial slice -> (2, 2) [col, row] in volume pixels and (2,) confidence."""
    image = inputs.axial_image(series, slice_index, image_size)
    x = inputs.axial_input(image, inputs.column_direction(series, slice_index))[None].to(device)  # (1, 1, 2, S, S)
    logits = model(x).float()
    points, confidence = decode_heatmaps(logits, torch.ones(1, 1, dtype=torch.bool))
    return heat_to_volume(points[0].numpy(), logits.shape[-2:], series.volume.shape[1:])[:, 1:], confidence[0].numpy()


FORAMEN_REACH_MM = 20.0  # a foramen lies within ~15 mm of its level's canal point in the sagittal plane, the next level's ~35 mm
FORAMEN_LATERAL_MM = 5.0  # and at least this far to its own side of the canal (foramina sit 15-25 mm off the midline)


def foramen_cells(series, canal_mm, heat_hw):
    """(10, D, h, w) bool: the heatmap cells of a Sagittal T1 series where each foramen (POINTS_OF_SERIES order) may
    lie, given the canal points (5, 3) mm of the study's Sagittal T2/STIR: slices on its own side of the canal
    (patient +x is the left) and within FORAMEN_REACH_MM of its level's canal point. One series then keeps another
    from slipping to the next level or to the other side."""
    depth, volume_hw = len(series.positions), series.volume.shape[1:]
    centres = cell_centres(volume_hw, heat_hw)
    allowed = np.zeros((len(data.POINTS_OF_SERIES["Sagittal T1"]), depth) + tuple(heat_hw), dtype=bool)
    for k, (condition, level) in enumerate(data.POINTS_OF_SERIES["Sagittal T1"]):
        point = canal_mm[data.LEVELS.index(level)]
        cols, rows, distances = data.patient_to_pixel(series.positions, series.orientations, series.pixel_spacing, point[None])
        lateral = -distances * data.slice_normals(series.orientations)[:, 0]  # slice x minus canal x, mm
        side = lateral >= FORAMEN_LATERAL_MM if condition.startswith("left") else lateral <= -FORAMEN_LATERAL_MM
        reach = np.hypot((centres[None, ..., 0] - cols[:, None, None]) * series.pixel_spacing[:, 1, None, None],
                         (centres[None, ..., 1] - rows[:, None, None]) * series.pixel_spacing[:, 0, None, None])
        allowed[k] = side[:, None, None] & (reach <= FORAMEN_REACH_MM)
    return allowed


def axial_slices_for_levels(axial, level_points_mm):
    """Axial slice index of each level: the slice nearest to that level's point (5, 3) mm, or -1 where the series
    does not cover it (data.covering_slice) or the point is unknown."""
    covering = [data.covering_slice(axial, point) if np.isfinite(point).all() else None for point in level_points_mm]
    return [choice[0] if choice else -1 for choice in covering]


def choose_axial_slice(axial_series, point):
    """(StudySeries, slice index) of the axial series and slice that cover a patient point best (the nearest slice
    among the series that cover it), or None when none does."""
    covering = [(choice[1], k, loaded, choice[0]) for k, loaded in enumerate(axial_series)
                for choice in [data.covering_slice(loaded.series, point)] if choice]
    return min(covering, key=lambda c: c[:2])[2:] if covering else None


def points_mm(series, points):
    """(K, 3) [slice, col, row] volume pixels -> (K, 3) patient mm (NaN rows stay NaN)."""
    out = np.full((len(points), 3), np.nan)
    for k, (d, col, row) in enumerate(points):
        if np.isfinite([d, col, row]).all():
            out[k] = data.series_pixel_to_patient(series, d, col, row)
    return out


def landmarks_mm(study, landmarks):
    """(len(landmarks), 3) patient mm of Landmark records."""
    return np.array([points_mm(study[lm.series_id].series, [(lm.slice, lm.col, lm.row)])[0] for lm in landmarks])


def level_points_mm(study, found):
    """(5, 3) patient mm of each disc level, or None, from three independent estimates: the canal point (Sagittal
    T2/STIR) and the left and right foramen (Sagittal T1). With all three, their coordinate-wise median: one point
    slipped to the next level (a foramen 35 mm off) is outvoted, and the midline x is kept. With the canal or the
    foramina alone, the canal point or the foramina's midpoint."""
    names = ["spinal_canal_stenosis"] + [f"{side}_neural_foraminal_narrowing" for side in ("left", "right")]
    estimates = [landmarks_mm(study, [found[(c, lv)] for lv in data.LEVELS]) if all((c, lv) in found for lv in data.LEVELS)
                 else None for c in names]
    if all(e is not None for e in estimates):
        return np.median(np.stack(estimates), axis=0)
    if estimates[0] is not None:
        return estimates[0]
    return (estimates[1] + estimates[2]) / 2 if estimates[1] is not None and estimates[2] is not None else None


def predict_landmarks(landmark_models, study, device):
    """({(condition, level): data.Landmark}, [notes on points not found]) for a study {series_id: StudySeries}.

    Every series of a type is read: a sagittal point comes from the series where the model is most confident;
    the foramina are sought near their level's canal point, on their own side (foramen_cells); an axial level
    comes from the series and stack that cover the level's point (choose_axial_slice).
    """
    found, notes = {}, []
    for series_type in ("Sagittal T2/STIR", "Sagittal T1"):  # the canal first: it places the foramina
        model, settings = landmark_models.get(data.SERIES_TAGS[series_type], (None, None))
        canal = [found.get(("spinal_canal_stenosis", lv)) for lv in data.LEVELS]
        canal_mm = landmarks_mm(study, canal) if series_type == "Sagittal T1" and all(canal) else None
        for loaded in data.series_of_type(study, series_type) if model else []:
            where = None if canal_mm is None else functools.partial(foramen_cells, loaded.series, canal_mm)
            points, confidence = predict_sagittal(model, loaded.series, settings["image_size"], device, where)
            for name, point, score in zip(data.POINTS_OF_SERIES[series_type], points, confidence):
                if name not in found or score > found[name].confidence:
                    found[name] = data.Landmark(series_type, loaded.series_id, *point, float(score))
    model, settings = landmark_models.get("axial", (None, None))
    axial_series, level_mm = data.series_of_type(study, "Axial T2"), level_points_mm(study, found)
    for level, level_name, point in zip(data.LEVELS, data.LEVEL_NAMES, level_mm if model and axial_series and level_mm is not None else []):
        choice = choose_axial_slice(axial_series, point)
        if choice is None:
            notes.append(f"level {level_name} lies outside every Axial T2 series")
            continue
        loaded, slice_index = choice
        plane, confidence = predict_axial(model, loaded.series, slice_index, settings["image_size"], device)
        for side, (col, row), score in zip(("left", "right"), plane, confidence):
            found[(f"{side}_subarticular_stenosis", level)] = data.Landmark("Axial T2", loaded.series_id, slice_index, col,
                                                                            row, float(score))
    return found, notes


# -----------------------------------------------------------------------------
# grading crops


@torch.no_grad()
def grade_study(severity_models, study, landmarks, device, shift_mm=0.0):
    """(25, 3) mean probabilities of the severity models (NaN rows without a landmark) and the (25,) availability.

    severity_models: [SeverityModel]. Each grades crops made with its own checkpoint's settings, its logits divided
    by its per-group temperature. shift_mm > 0 also grades crops moved that far along the image's columns and rows
    (test-time augmentation) and averages.
    """
    offsets = [(0.0, 0.0)] + ([(shift_mm, 0.0), (-shift_mm, 0.0), (0.0, shift_mm), (0.0, -shift_mm)] if shift_mm else [])
    total, count = np.zeros((data.N_LABELS, data.N_SEVERITIES)), 0
    available = np.zeros(data.N_LABELS, dtype=bool)
    for along_col, along_row in offsets:
        moved = shifted(study, landmarks, along_col, along_row)
        crops_of = {}  # settings -> crops: models sharing settings share crops
        for model, settings, temperatures in severity_models:
            key = json.dumps(settings, sort_keys=True)
            if key not in crops_of:
                crops_of[key] = inputs.study_crops(study, moved, settings)
            crops, groups, columns = crops_of[key]  # only the rows with a landmark
            if len(columns):
                logits = model(crops.to(device), groups.to(device)).float().cpu()
                scaled = logits / torch.as_tensor(temperatures, dtype=torch.float32)[groups, None]
                total[columns.numpy()] += scaled.softmax(-1).numpy()
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
        spacing = study[lm.series_id].series.pixel_spacing[int(lm.slice)]
        moved[name] = lm._replace(col=lm.col + along_col_mm / spacing[1], row=lm.row + along_row_mm / spacing[0])
    return moved


# -----------------------------------------------------------------------------
# checkpoints


def load_landmark_models(folder, device):
    """{tag: (LandmarkNet, settings)} for every landmarks_<tag>_{best,last}.pt in folder; settings hold the input size."""
    found = {}
    for tag in data.SERIES_TAGS.values():
        path = next((p for p in (os.path.join(folder, f"landmarks_{tag}_{k}.pt") for k in ("best", "last")) if os.path.exists(p)), None)
        if path is None:
            continue
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        model = LandmarkNet(checkpoint["settings"]["n_points"]).to(device)
        model.load_state_dict(checkpoint["model"])
        found[tag] = (model.eval(), dict(checkpoint["settings"], path=path, args=checkpoint["args"]))
    return found


# a trained severity network with the crop settings it reads and its per-group temperature (calibration)
SeverityModel = namedtuple("SeverityModel", "net settings temperatures")
UNIT_TEMPERATURES = [1.0] * len(data.GROUPS)  # logits graded as they are: no calibration


def load_severity_models(paths, device):
    """[SeverityModel] of severity checkpoints (an ensemble checkpoint gives one per member), and the training prior
    (25, 3) of the first one."""
    found, prior = [], None
    for path in paths:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        for state in checkpoint.get("members", [checkpoint.get("model")]):
            model = SeverityNet(checkpoint["settings"]["n_slices"]).to(device)
            model.load_state_dict(state)
            found.append(SeverityModel(model.eval(), checkpoint["settings"], checkpoint.get("temperatures", UNIT_TEMPERATURES)))
        prior = np.asarray(checkpoint["prior"]) if prior is None else prior
    return found, prior
