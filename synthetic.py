"""Write synthetic lumbar-spine MRI studies in the exact RSNA 2024 competition layout.

A 3D phantom (vertebral bodies, discs, canal, foramina, lateral recesses; random pose, size, contrast, noise)
is evaluated on the pixel grid of every slice of three DICOM series per study. Labels are projected into the
slices through the same geometry, and every graded condition is drawn as a narrowing of its structure at
that disc. Test truth goes to solution.csv and solution_coordinates.csv only.

    python synthetic.py --out /tmp/spine --train-studies 40 --test-studies 10 --seed 0 --quirks
"""
import argparse
import multiprocessing
import os
import time

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from data import (CONDITION_NAMES, CONDITIONS, LABEL_COLUMNS, LEVEL_NAMES, SERIES_OF_CONDITION, SERIES_TYPES,
                  SEVERITIES, SUBMISSION_COLUMNS)

# -----------------------------------------------------------------------------
# what the phantom is made of

# real class counts (N/M/S over 5 levels) of each condition, in CONDITIONS order
PRIOR_COUNTS = np.array([[8664, 736, 470], [7672, 1794, 399], [7685, 1770, 380], [6864, 1835, 913], [6869, 1825, 927]])
LEVEL_RISK = np.array([0.5, 0.7, 1.0, 1.6, 1.2])  # lower discs degenerate more often (mean 1)
# what is left open at the labelled point, (mean, sd) per class: canal AP diameter fraction,
# foramen fat area fraction, lateral recess openness
OPENNESS = {"canal": [(0.95, 0.07), (0.55, 0.06), (0.25, 0.05)], "foramen": [(1.0, 0.08), (0.55, 0.07), (0.2, 0.05)],
            "recess": [(1.0, 0.08), (0.5, 0.07), (0.1, 0.05)]}
GROUP_OF_CONDITION = ["canal", "foramen", "foramen", "recess", "recess"]
SEGMENTS = ["S2", "S1/S2", "S1", "L5/S1", "L5", "L4/L5", "L4", "L3/L4", "L3", "L2/L3", "L2", "L1/L2", "L1",
            "T12/L1", "T12", "T11/T12", "T11"]  # bottom to top along the spine
DISC_HEIGHT = {"S1/S2": 2.0, "L5/S1": 10.0, "L4/L5": 11.0, "L3/L4": 10.0, "L2/L3": 9.0, "L1/L2": 8.0,
               "T12/L1": 7.0, "T11/T12": 6.0}  # mm; vertebral bodies are about 25 mm
FORAMEN_RISE = 2.0  # mm, foramen centre above its disc centre
TISSUES = ["fat", "viscera", "muscle", "marrow", "cortex", "nucleus", "annulus", "ligament", "csf", "cord", "bone",
           "nerve"]
CONTRAST = {"T1": [0.95, 0.30, 0.22, 0.70, 0.06, 0.38, 0.28, 0.10, 0.12, 0.35, 0.45, 0.25],
            "T2": [0.80, 0.22, 0.18, 0.45, 0.05, 0.85, 0.25, 0.08, 1.00, 0.30, 0.35, 0.22],
            "STIR": [0.10, 0.30, 0.15, 0.12, 0.04, 0.90, 0.15, 0.06, 1.00, 0.30, 0.12, 0.25]}
QUIRKS = ["missing_series", "duplicate_series", "instances_reversed", "instances_offset", "instances_interleaved",
          "mixed_frame_sizes", "monochrome1", "rescale", "rle_lossless", "no_spacing_tags"]
SPLIT_CODE = {"train": 0, "test": 1}  # separate random streams: test studies are never train anatomy
MAX_VALUE = 4095  # pixel values before any storage quirk


def rotation(degrees):
    """Rotation matrix (3, 3) about x, then y, then z, by angles in degrees."""
    cx, cy, cz = np.cos(np.radians(degrees))
    sx, sy, sz = np.sin(np.radians(degrees))
    return (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))


def sample_severity(rng, balanced):
    """Class index (5 conditions, 5 levels): real priors, worse at lower discs, or 1/3 each when balanced."""
    prior = PRIOR_COUNTS / PRIOR_COUNTS.sum(axis=1, keepdims=True)
    abnormal = prior[:, None, 1:] * LEVEL_RISK[None, :, None]  # (5 conditions, 5 levels, 2)
    probabilities = np.concatenate([1 - abnormal.sum(axis=2, keepdims=True), abnormal], axis=2)
    if balanced:
        probabilities = np.full((5, 5, 3), 1 / 3)
    return np.minimum((rng.random((5, 5, 1)) > probabilities.cumsum(axis=2)).sum(axis=2), 2)


def make_column(rng, scale, openness):
    """Vertebral bodies and discs stacked along the arc length s (mm, 0 near the L3 body, up is +)."""
    is_disc = np.array(["/" in name for name in SEGMENTS])
    height = np.array([DISC_HEIGHT.get(name, 25.0) for name in SEGMENTS]) * scale * rng.uniform(0.88, 1.12, 17)
    l1, l3 = SEGMENTS.index("L1"), SEGMENTS.index("L3")
    top = np.cumsum(height) - (height[:l3].sum() + height[l3] / 2) + rng.uniform(-20, 20)
    half_width, half_depth = scale * rng.uniform(22, 25, 17), scale * rng.uniform(14, 16.5, 17)
    water = np.zeros(17)  # nucleus brightness factor: degenerate discs dry out
    for k in np.flatnonzero(is_disc):  # discs bulge 1.5 mm past their bodies
        half_width[k], half_depth[k] = max(half_width[k - 1:k + 2:2]) + 1.5, max(half_depth[k - 1:k + 2:2]) + 1.5
        water[k] = rng.uniform(0.9, 1.1)
    disc_index = [SEGMENTS.index(name) for name in LEVEL_NAMES]
    water[disc_index] = np.clip(1 - 0.4 * (1 - openness.min(axis=0)) + rng.uniform(-0.1, 0.1, 5), 0.3, 1.1)
    water[SEGMENTS.index("S1/S2")] = 0.1  # fused
    return dict(segment_top=top, segment_height=height, is_disc=is_disc, half_width=half_width,
                half_depth=half_depth, water=water, disc_s=top[disc_index] - height[disc_index] / 2,
                conus_s=top[l1] - height[l1] * rng.uniform(0.2, 0.8))


def make_anatomy(rng, severity):
    """Everything random about one patient: pose, lordosis, sizes, lesions, contrast, noise (mm, degrees)."""
    openness = np.array([[rng.normal(*OPENNESS[GROUP_OF_CONDITION[c]][severity[c, j]]) for j in range(5)]
                         for c in range(5)]).clip(0.02, 1.2)
    scale = rng.uniform(0.9, 1.1)
    anatomy = make_column(rng, scale, openness)
    depth = anatomy["half_depth"].mean()
    canal_ap, canal_lr, fat = scale * rng.uniform(5.5, 7.5), scale * rng.uniform(10, 12.5), rng.uniform(10, 30)
    canal_p = depth + rng.uniform(2, 4) + canal_ap  # canal centre, mm posterior of the body centreline
    directions = rng.normal(size=(16, 3))  # plane waves of a smooth random texture
    directions *= 2 * np.pi / rng.uniform(4, 25, (16, 1)) / np.linalg.norm(directions, axis=1, keepdims=True)
    anatomy.update(
        openness=openness, rotation=rotation(rng.uniform([-5, -1.5, -1.5], [5, 1.5, 1.5])),  # little coronal tilt
        translation=rng.uniform([-15, -30, -40], [15, 30, 40]), curve_radius=rng.uniform(180, 320),
        canal_p=canal_p, canal_ap=canal_ap, canal_lr=canal_lr, foramen_p=depth + rng.uniform(1, 4),
        foramen_x=anatomy["half_width"].mean() * rng.uniform(0.75, 0.88),
        recess_x=canal_lr * rng.uniform(0.75, 0.9), recess_p=canal_p - 0.55 * canal_ap,
        skin_front=-rng.uniform(110, 170), skin_back=canal_p + rng.uniform(45, 60) + fat, fat=fat,
        skin_half_width=rng.uniform(140, 180), coil_depth=rng.uniform(110, 160), waves=directions.T.copy(),
        phases=rng.uniform(0, 2 * np.pi, 16), brightness=rng.uniform(1500, 3000), noise=rng.uniform(0.015, 0.04),
        contrast={weighting: dict(zip(TISSUES, (np.array(values) * rng.uniform(0.85, 1.15, 12)).tolist()))
                  for weighting, values in CONTRAST.items()})
    for key, value in anatomy.items():  # render in float32 (its cos is ~6x faster): no float64 numpy values
        if isinstance(value, np.floating) or (isinstance(value, np.ndarray) and value.dtype == np.float64):
            anatomy[key] = float(value) if np.ndim(value) == 0 else value.astype(np.float32)
    return anatomy


def to_patient(anatomy, x, p, s):
    """Spine coordinates (lateral x, posterior offset p, arc length s; mm) -> patient points (..., 3) mm."""
    radius = anatomy["curve_radius"]  # lordosis: a circular arc whose centre lies posterior
    theta, rho = np.asarray(s) / radius, radius - np.asarray(p)
    local = np.stack(np.broadcast_arrays(x, radius - rho * np.cos(theta), rho * np.sin(theta)), axis=-1)
    return local @ anatomy["rotation"].T.astype(np.float64) + anatomy["translation"]


def landmarks(anatomy):
    """Patient points (5 conditions, 5 levels, 3) mm of every labelled structure."""
    s, fx, sx, fp, sp = (anatomy[k] for k in ("disc_s", "foramen_x", "recess_x", "foramen_p", "recess_p"))
    spine = [(0, anatomy["canal_p"], s), (fx, fp, s + FORAMEN_RISE), (-fx, fp, s + FORAMEN_RISE), (sx, sp, s),
             (-sx, sp, s)]  # left is patient +x
    return np.stack([to_patient(anatomy, x, p, s) for x, p, s in spine])


# -----------------------------------------------------------------------------
# rendering: intensity of the phantom at any patient points

def inside(distance, edge):
    """Soft membership from a signed distance (mm, negative inside), ramped over edge mm like partial volume."""
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


def ellipse_distance(offsets, radii):
    """Approximate signed distance (mm) to an axis-aligned ellipse or ellipsoid with the given radii."""
    radii = [np.float32(radius) if np.isscalar(radius) else radius for radius in radii]  # stay in float32
    ratio = np.sqrt(sum((offset / radius) ** 2 for offset, radius in zip(offsets, radii)))
    return (ratio - 1) * np.minimum.reduce(np.broadcast_arrays(*radii))


def paint(image, weight, value):
    image += weight * (value - image)


def soft_tissues(x, y, s, texture, anatomy, tissue):
    """Skin, fat, viscera, back muscles and psoas; y (mm, posterior) follows only part of the lordosis."""
    front, back, fat = anatomy["skin_front"], anatomy["skin_back"], anatomy["fat"]
    centre, half_depth, half_width = (front + back) / 2, (back - front) / 2, anatomy["skin_half_width"]
    image = tissue["fat"] * inside(ellipse_distance((x, y - centre), (half_width, half_depth)), 1.5)
    body = inside(ellipse_distance((x, y - centre), (half_width - fat, half_depth - fat)), 1.5)
    paint(image, body * inside(y + 25, 15), tissue["viscera"] * (1 + 0.5 * texture))  # abdomen, in front
    muscle_front, muscle_back, lobe_x = anatomy["canal_p"] - 12, back - fat, 0.2 * half_width
    lobes = ellipse_distance((np.abs(x) - lobe_x, y - (muscle_front + muscle_back) / 2),
                             (lobe_x + 8, (muscle_back - muscle_front) / 2))  # erector spinae, multifidus
    psoas_radius = np.clip(4 + 0.09 * (anatomy["disc_s"][0] + 10 - s), 3, 18)  # psoas thickens going down
    psoas_x = np.abs(x) - anatomy["half_width"].mean() - 0.8 * psoas_radius
    muscle = np.minimum(lobes, ellipse_distance((psoas_x, y - 2), (1.2 * psoas_radius, psoas_radius)))
    paint(image, body * inside(muscle - 2.5, 1.5), tissue["fat"])  # fat planes around the muscles
    streaks = np.clip(texture - 1.2, 0, 1) * 0.6 * (tissue["fat"] - tissue["muscle"])  # fat inside muscle
    paint(image, body * inside(muscle, 1.5), tissue["muscle"] * (1 + 0.15 * texture) + streaks)
    return image


def column(x, p, s, texture, image, anatomy, tissue):
    """Vertebral bodies (marrow, dark cortex and endplates) and discs (bright nucleus, dark annulus)."""
    top = anatomy["segment_top"]
    k = np.minimum(np.searchsorted(top, s), len(top) - 1)  # segment holding each point
    height, a, b = anatomy["segment_height"][k], anatomy["half_width"][k], anatomy["half_depth"][k]
    along = s - (top[k] - height / 2)  # mm from the segment centre, up
    cross = (((np.abs(x) / a) ** 3 + (np.abs(p) / b) ** 3) ** (1 / 3) - 1) * b  # rounded-box outline
    surface = np.maximum(cross, np.abs(along) - height / 2)  # signed distance to the segment
    nucleus = inside(ellipse_distance((x, p, along), (0.6 * a, 0.55 * b, 0.3 * height)), 2.0)
    disc = tissue["annulus"] + nucleus * (tissue["nucleus"] * anatomy["water"][k] - tissue["annulus"])
    marrow = tissue["marrow"] * (1 + 0.12 * texture)
    body = marrow + inside(-surface - 1.0, 1.0) * (tissue["cortex"] - marrow)
    paint(image, inside(surface, 1.0), np.where(anatomy["is_disc"][k], disc, body))


def arch(x, p, ds, texture, image, anatomy, tissue):
    """Pedicles and facets (a bony bar either side), laminae around the canal, spinous processes."""
    cp, ap, lr = anatomy["canal_p"], anatomy["canal_ap"], anatomy["canal_lr"]
    front, back = 0.5 * anatomy["half_depth"].mean(), cp + ap + 4
    bar = ellipse_distance((np.abs(x) - anatomy["foramen_x"], p - (front + back) / 2), (8, (back - front) / 2))
    ring = ellipse_distance((x, p - cp), (lr + 6, ap + 6))
    spinous = np.maximum(np.abs(x) - 3.5, np.abs(p - (cp + ap + 22)) - 18)
    gap = inside(np.abs(ds + 2) - 5, 2)  # interlaminar and interspinous space at each disc
    bone = np.maximum(inside(bar, 1.5), np.maximum(inside(ring, 1.5), inside(spinous, 1.5)) * (1 - gap))
    paint(image, bone, tissue["bone"] * (1 + 0.12 * texture))


def canal(x, p, s, j, ds, image, anatomy, tissue):
    """CSF sac narrowed at each disc (canal stenosis), conus, lateral recesses closed by a dark blob."""
    cp, ap, lr = anatomy["canal_p"], anatomy["canal_ap"], anatomy["canal_lr"]
    near = np.exp(-(ds / 5.0) ** 2)  # lesions sit on the disc and fade within ~5 mm
    paint(image, inside(ellipse_distance((x, p - cp), (lr, ap)), 1), tissue["ligament"])
    lost = (1 - anatomy["openness"][0, j]) * near  # AP fraction lost: disc bulge in front, ligament behind
    front, back = cp - ap + 1.2 * ap * lost, cp + ap - 0.8 * ap * lost
    sac = ellipse_distance((x, p - (front + back) / 2), (lr * (1 - 0.3 * lost), np.maximum((back - front) / 2, 0.3)))
    paint(image, inside(sac, 1), tissue["csf"] * (1 - 0.6 * lost))  # crowded nerve roots replace the CSF
    cord = inside(ellipse_distance((x, p - cp), (4.5, 4.0)), 1) * inside(anatomy["conus_s"] - s, 4)
    paint(image, cord, tissue["cord"])
    shut = 1 - anatomy["openness"][np.where(x > 0, 3, 4), j]  # left is patient +x
    u, w = np.abs(x) - anatomy["recess_x"], p - anatomy["recess_p"]
    paint(image, inside(ellipse_distance((u, w), (3.5, 3.0)), 1) * near, tissue["csf"])
    blob = inside(np.hypot(u - 2.5, w - 1.5) - (7 * shut - 0.5), 1) * near  # facet and disc encroaching
    paint(image, blob, tissue["ligament"])


def foramina(x, p, j, ds, image, anatomy, tissue):
    """Fat oval with a dark nerve root either side of each disc; narrowing shrinks the fat, dark tissue fills in."""
    keep = np.sqrt(anatomy["openness"][np.where(x > 0, 1, 2), j])  # radius factor from the area fraction
    u, w, h = np.abs(x) - anatomy["foramen_x"], p - anatomy["foramen_p"], ds - FORAMEN_RISE
    paint(image, inside(ellipse_distance((u, w, h), (8.0, 4.5, 7.0)), 1), tissue["ligament"])
    paint(image, inside(ellipse_distance((u, w, h), (8.0, 4.5 * keep, 7.0 * keep)), 1), tissue["fat"])
    paint(image, inside(np.hypot(w + 0.5, h - 2.5) - 1.7, 1) * inside(np.abs(u) - 8, 1), tissue["nerve"])


def times_matrix(points, matrix):
    """points (N, 3) @ matrix (3, M) in float32 without BLAS, whose threads halve the speed of worker processes."""
    matrix = matrix.astype(np.float32)
    return points[:, :1] * matrix[0] + points[:, 1:2] * matrix[1] + points[:, 2:] * matrix[2]


def phantom(points, anatomy, weighting):
    """Intensity (N,) float32 of the phantom at patient points (N, 3) mm; about 0..1.3."""
    local = times_matrix((points - anatomy["translation"]).astype(np.float32), anatomy["rotation"])  # R^T (P - t)
    radius = anatomy["curve_radius"]
    x, p = local[:, 0], radius - np.hypot(radius - local[:, 1], local[:, 2])  # spine coordinates, see to_patient
    s = radius * np.arctan2(local[:, 2], radius - local[:, 1])
    tissue = anatomy["contrast"][weighting]
    texture = np.cos(times_matrix(local, anatomy["waves"]) + anatomy["phases"]).sum(axis=1) / np.sqrt(8)  # sd 1
    image = soft_tissues(x, local[:, 1] - 0.3 * local[:, 2] ** 2 / radius, s, texture, anatomy, tissue)
    box = (np.abs(x) < 50) & (p > -35) & (p < anatomy["canal_p"] + 50)  # the only place with spine to draw
    bx, bp, bs, btexture, spine = x[box], p[box], s[box], texture[box], image[box]
    j = np.searchsorted(-(anatomy["disc_s"][1:] + anatomy["disc_s"][:-1]) / 2, -bs)  # nearest labelled disc
    ds = bs - anatomy["disc_s"][j]
    column(bx, bp, bs, btexture, spine, anatomy, tissue)
    arch(bx, bp, ds, btexture, spine, anatomy, tissue)
    canal(bx, bp, bs, j, ds, spine, anatomy, tissue)
    foramina(bx, bp, j, ds, spine, anatomy, tissue)
    image[box] = spine
    depth = np.clip(anatomy["skin_back"] - p, 0, None) / anatomy["coil_depth"]  # posterior coil: front is dark
    return image * (0.2 + 0.8 * np.exp(-depth ** 2))


def render_slice(rng, slice_, anatomy, weighting):
    """uint16 (rows, cols) image of one slice, with Rician noise."""
    rows, cols, spacing = slice_["rows"], slice_["cols"], slice_["pixel_spacing"]
    r, c = np.mgrid[0:rows, 0:cols].reshape(2, -1, 1) * spacing  # mm from pixel (0, 0)
    signal = phantom(slice_["ipp"] + c * slice_["u"] + r * slice_["v"], anatomy, weighting) * anatomy["brightness"]
    sigma = anatomy["noise"] * anatomy["brightness"]
    real, imaginary = sigma * rng.standard_normal((2, len(signal)), np.float32)
    return np.clip(np.rint(np.hypot(signal + real, imaginary)), 0, MAX_VALUE).astype(np.uint16).reshape(rows, cols)


# -----------------------------------------------------------------------------
# series geometry

def make_stack(centre, u, v, count, spacing, fov, frame):
    """count parallel square slices centred on centre (mm), stepping spacing mm along n = u x v."""
    n, pixel_spacing = np.cross(u, v), round(fov / frame, 6)
    half = (frame - 1) / 2 * pixel_spacing  # IPP is the centre of pixel (0, 0)
    return [dict(ipp=np.round(centre + (k - (count - 1) / 2) * spacing * n - half * (u + v), 4), u=u, v=v,
                 rows=frame, cols=frame, pixel_spacing=pixel_spacing, spacing=spacing) for k in range(count)]


def sagittal_slices(rng, points, frame):
    """Columns go posterior, rows inferior; 15-25 slices across x, the midline up to 3 slices off-centre."""
    tilt = rotation(rng.uniform(-1, 1, 3))
    u, v = np.round(tilt @ [0, 1, 0], 6), np.round(tilt @ [0, 0, -1], 6)
    n, spacing = np.cross(u, v), rng.uniform(3.3, 4.5)
    centre = points.mean(axis=0) + rng.uniform(-3, 3) * spacing * n + rng.uniform(-20, 0) * u + rng.uniform(-10, 10) * v
    reach = np.abs((points - centre) @ n).max() + 3  # mm the stack must cover either side
    count = max(int(rng.integers(15, 26)), 2 * int(np.ceil(reach / spacing)) + 1)
    return make_stack(centre, u, v, count, spacing, rng.uniform(200, 260), frame), None


def axial_slices(rng, points, anatomy, frame):
    """Columns go patient left, rows posterior: one contiguous stack, or one short tilted stack per disc."""
    fov, shift = rng.uniform(160, 220), rng.uniform(-10, 10, 2) - [0, 10]  # FOV centre offset (u, v) mm
    if rng.random() < 0.5:
        tilt = rotation(rng.uniform(-3, 3, 3))
        u, v = np.round(tilt @ [1, 0, 0], 6), np.round(tilt @ [0, 1, 0], 6)
        n, points = np.cross(u, v), points.reshape(-1, 3)
        along, spacing = points @ n, rng.uniform(3.5, 5)
        count = int(np.clip(np.ceil((np.ptp(along) + 20) / spacing) + 1, 30, 45))
        centre = points.mean(axis=0) + shift[0] * u + shift[1] * v
        centre += ((along.min() + along.max()) / 2 - centre @ n) * n
        return make_stack(centre, u, v, count, max(spacing, (np.ptp(along) + 20) / (count - 1)), fov, frame), None
    slices, stacks, spacing = [], [None] * 5, rng.uniform(3, 4)
    for j in reversed(range(5)):  # L5/S1 first, so instance numbers climb the spine
        theta = anatomy["disc_s"][j] / anatomy["curve_radius"]  # each stack tilts with its disc
        n = anatomy["rotation"] @ [0, np.sin(theta), np.cos(theta)]
        u = np.round(anatomy["rotation"] @ [1, 0, 0], 6)
        v = np.round(np.cross(n, u), 6)
        centre = points[:, j].mean(axis=0) + shift[0] * u + shift[1] * v + rng.uniform(-0.3, 0.3) * spacing * n
        stack = make_stack(centre, u, v, int(rng.integers(3, 6)), spacing, fov, frame)
        stacks[j] = list(range(len(slices), len(slices) + len(stack)))
        slices += stack
    return slices, stacks


def make_series(rng, anatomy, description, series_id, size):
    """One series: slices in spatial order, per-level stacks (per-disc axial form only), weighting, tags."""
    points, frame = landmarks(anatomy), size if rng.random() < 0.5 else round(size * 1.25)
    if description == "Axial T2":
        slices, stacks = axial_slices(rng, points[3:], anatomy, frame)
    else:
        slices, stacks = sagittal_slices(rng, points[:3].reshape(-1, 3), frame)
    weighting = {"Sagittal T1": "T1", "Axial T2": "T2"}.get(description, "STIR" if rng.random() < 0.25 else "T2")
    return dict(description=description, series_id=series_id, slices=slices, stacks=stacks, weighting=weighting,
                numbers=np.arange(1, len(slices) + 1), thickness=slices[0]["spacing"] * rng.uniform(0.8, 1.0),
                quirks=set(), duplicate=False)


def project(point, slices, candidates):
    """Nearest candidate slice to a patient point, and the point's (column, row) in that slice's pixels."""
    offsets = [np.dot(point - slices[k]["ipp"], np.cross(slices[k]["u"], slices[k]["v"])) for k in candidates]
    best = candidates[int(np.argmin(np.abs(offsets)))]
    slice_, delta = slices[best], point - slices[best]["ipp"]
    column, row = delta @ slice_["u"] / slice_["pixel_spacing"], delta @ slice_["v"] / slice_["pixel_spacing"]
    assert np.min(np.abs(offsets)) <= slice_["spacing"] / 2 + 1e-3, "label off its slice"
    assert 0 <= column <= slice_["cols"] - 1 and 0 <= row <= slice_["rows"] - 1, "label outside its image"
    return best, column, row


# -----------------------------------------------------------------------------
# quirks of real data

def instance_numbers(rng, count, kind):
    """Instance numbers (count,) of the slices in spatial order, out of order the way kind says."""
    if kind == "instances_reversed":
        return np.arange(count, 0, -1)
    if kind == "instances_offset":  # starts at 7 or 101, with gaps
        return int(rng.choice([7, 101])) + np.cumsum(rng.integers(1, 3, count)) - 1
    numbers = np.empty(count, dtype=np.int64)  # interleaved acquisition: odd slices first, then even
    numbers[np.r_[0:count:2, 1:count:2]] = np.arange(1, count + 1)
    return numbers


def resize_frames(rng, series, size):
    """Two neighbouring slices at another frame size: same field of view, IPP still the centre of pixel (0, 0)."""
    first, frame = int(rng.integers(0, len(series["slices"]) - 1)), round(size * 0.75)
    for slice_ in series["slices"][first:first + 2]:
        corner = slice_["ipp"] - 0.5 * slice_["pixel_spacing"] * (slice_["u"] + slice_["v"])
        slice_["pixel_spacing"] = round(slice_["cols"] * slice_["pixel_spacing"] / frame, 6)
        slice_["ipp"] = np.round(corner + 0.5 * slice_["pixel_spacing"] * (slice_["u"] + slice_["v"]), 4)
        slice_["rows"] = slice_["cols"] = frame
    return f"instances {series['numbers'][first]},{series['numbers'][first + 1]} at {frame} px"


def apply_quirk(rng, kind, anatomy, series_list, spare_id, size):
    """Change series_list in place for one study quirk; returns the quirks.csv row (without study_id)."""
    target, detail = series_list[int(rng.integers(len(series_list)))], ""
    if kind == "missing_series":
        series_list.remove(target)
        return dict(series_id=target["series_id"], series_description=target["description"], quirk=kind,
                    detail="series absent: no folder, no series_descriptions row")
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
    return dict(series_id=target["series_id"], series_description=target["description"], quirk=kind, detail=detail)


# -----------------------------------------------------------------------------
# writing one study

def write_instance(path, pixels, slice_, series, study_id, number):
    """One MR Image Storage file; the series' storage quirks change how the same image is stored."""
    ds, text = Dataset(), lambda values, decimals: [f"{value:.{decimals}f}" for value in values]
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
        ds.SliceThickness, ds.SpacingBetweenSlices = text([series["thickness"], slice_["spacing"]], 3)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if "monochrome1" in series["quirks"]:  # lowest value shows white; readers flip within the 16 stored bits
        ds.PhotometricInterpretation, pixels = "MONOCHROME1", (65535 - pixels).astype(np.uint16)
    if "rescale" in series["quirks"]:  # value = stored * slope + intercept, off by at most 1
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
        pixels = np.rint((pixels + 1024.0) / 2).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    if "rle_lossless" in series["quirks"]:
        ds.compress(RLELossless, pixels)
    ds.save_as(path, enforce_file_format=True)


def label_rows(study_id, severity, empty, anatomy, series_list):
    """The study's 25 label strings, and its coordinate rows projected into the first series of each type."""
    labels = ["" if empty[c, j] else SEVERITIES[severity[c, j]] for c in range(5) for j in range(5)]
    points, coordinates = landmarks(anatomy), []
    for c, condition in enumerate(CONDITIONS):
        wanted = SERIES_OF_CONDITION[condition]
        series = next((s for s in series_list if s["description"] == wanted and not s["duplicate"]), None)
        for j in range(5 if series else 0):
            if not empty[c, j]:
                candidates = series["stacks"][j] if series["stacks"] else list(range(len(series["slices"])))
                k, column, row = project(points[c, j], series["slices"], candidates)
                coordinates.append(dict(study_id=study_id, series_id=series["series_id"],
                                        instance_number=int(series["numbers"][k]), condition=CONDITION_NAMES[c],
                                        level=LEVEL_NAMES[j], x=round(column, 4), y=round(row, 4)))
    return labels, coordinates


def make_study(job):
    """Render one study to disk and return its CSV rows; runs in a worker process."""
    rng = np.random.default_rng([job["seed"], SPLIT_CODE[job["split"]], job["index"]])
    severity = sample_severity(rng, job["balanced"])
    anatomy = make_anatomy(rng, severity)
    series_list = [make_series(rng, anatomy, kind, series_id, job["size"])
                   for kind, series_id in zip(SERIES_TYPES, job["series_ids"])]
    empty, quirks = rng.random((5, 5)) < 0.01, []  # about 1% of label cells are blank, as in the real train.csv
    if job["quirk"]:  # own random stream: the study looks the same with or without --quirks
        quirk_rng = np.random.default_rng([job["seed"], SPLIT_CODE[job["split"]], job["index"], 1])
        quirks.append(apply_quirk(quirk_rng, job["quirk"], anatomy, series_list, job["series_ids"][3], job["size"]))
    hidden_test_like = job["quirks"] and job["split"] == "test"  # the hidden test had no spacing tags at all
    for series in (s for s in series_list if hidden_test_like and "no_spacing_tags" not in s["quirks"]):
        series["quirks"].add("no_spacing_tags")
        quirks.append(dict(series_id=series["series_id"], series_description=series["description"],
                           quirk="no_spacing_tags", detail="every test series"))
    labels, coordinates = label_rows(job["study_id"], severity, empty, anatomy, series_list)
    study_dir = os.path.join(job["out_dir"], f"{job['split']}_images", str(job["study_id"]))
    for series in series_list:
        folder = os.path.join(study_dir, str(series["series_id"]))
        os.makedirs(folder, exist_ok=True)
        for slice_, number in zip(series["slices"], series["numbers"]):
            pixels = render_slice(rng, slice_, anatomy, series["weighting"])
            write_instance(os.path.join(folder, f"{number}.dcm"), pixels, slice_, series, job["study_id"], number)
    if job["corrupt"]:  # truncate the edge slice of one series: never a labelled slice
        series = next((s for s in series_list if s["description"] == "Sagittal T1"), series_list[0])
        path = os.path.join(study_dir, str(series["series_id"]), f"{series['numbers'][0]}.dcm")
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 3)
        quirks.append(dict(series_id=series["series_id"], series_description=series["description"],
                           quirk="corrupt_file", detail=os.path.relpath(path, job["out_dir"])))
    return dict(split=job["split"], study_id=job["study_id"], labels=labels, coordinates=coordinates,
                series=[dict(study_id=job["study_id"], series_id=s["series_id"], series_description=s["description"])
                        for s in series_list], quirks=[dict(study_id=job["study_id"], **row) for row in quirks])


# -----------------------------------------------------------------------------
# the dataset

def draw_ids(seed, count):
    """count (study id of 7-10 digits, [4 series ids of 8-10 digits]), all unique."""
    rng, ids = np.random.default_rng([seed, 2]), {}  # a dict is an ordered set
    while len(ids) < 5 * count:
        digits = int(rng.integers(7 if len(ids) % 5 == 0 else 8, 11))
        ids.setdefault(int(rng.integers(10 ** (digits - 1), min(10 ** digits, 2 ** 31))), None)
    ids = list(ids)
    return [(ids[5 * i], ids[5 * i + 1:5 * i + 5]) for i in range(count)]


def write_csv(rows, columns, path):
    pd.DataFrame(rows, columns=columns).sort_values("study_id", kind="stable").to_csv(path, index=False)


def make_dataset(out_dir, train_studies, test_studies, seed, size, quirks=False, balanced=False, workers=0):
    """Write the competition layout under out_dir; returns {"seconds": ..., "bytes": ...}."""
    start, ids = time.time(), draw_ids(seed, train_studies + test_studies)
    cycle = QUIRKS + [None]  # with --quirks each study gets the next quirk in turn (or none)
    jobs = [dict(split=split, index=i, study_id=ids[offset + i][0], series_ids=ids[offset + i][1], seed=seed,
                 size=size, balanced=balanced, quirks=quirks, quirk=cycle[i % len(cycle)] if quirks else None,
                 out_dir=out_dir, corrupt=quirks and split == "test" and i == min(1, test_studies - 1))
            for split, count, offset in (("train", train_studies, 0), ("test", test_studies, train_studies))
            for i in range(count)]
    os.makedirs(out_dir, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1 or len(jobs) < 4:
        results = [make_study(job) for job in jobs]
    else:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(make_study, jobs, chunksize=1)
    for split, labels_name, coordinates_name in (("train", "train.csv", "train_label_coordinates.csv"),
                                                  ("test", "solution.csv", "solution_coordinates.csv")):
        studies = [r for r in results if r["split"] == split]
        write_csv([[r["study_id"], *r["labels"]] for r in studies], ["study_id", *LABEL_COLUMNS],
                  os.path.join(out_dir, labels_name))
        write_csv([row for r in studies for row in r["coordinates"]], ["study_id", "series_id", "instance_number",
                  "condition", "level", "x", "y"], os.path.join(out_dir, coordinates_name))
        write_csv([row for r in studies for row in r["series"]], ["study_id", "series_id", "series_description"],
                  os.path.join(out_dir, f"{split}_series_descriptions.csv"))
    test_ids = sorted(r["study_id"] for r in results if r["split"] == "test")
    submission = [[f"{study_id}_{column}", 1 / 3, 1 / 3, 1 / 3] for study_id in test_ids for column in LABEL_COLUMNS]
    pd.DataFrame(submission, columns=["row_id", *SUBMISSION_COLUMNS]).to_csv(
        os.path.join(out_dir, "sample_submission.csv"), index=False)
    quirk_rows = [row for r in results for row in r["quirks"]]
    write_csv(quirk_rows, ["study_id", "series_id", "series_description", "quirk", "detail"],
              os.path.join(out_dir, "quirks.csv"))
    for row in (row for row in quirk_rows if row["quirk"] == "corrupt_file"):
        print(f"warning: corrupt file written on purpose: {os.path.join(out_dir, row['detail'])}")
    total = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(out_dir) for name in names)
    seconds = time.time() - start
    print(f"wrote {train_studies} train + {test_studies} test studies to {out_dir}: {seconds:.1f} s, "
          f"{total / 1e6:.1f} MB")
    return {"seconds": seconds, "bytes": total}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # data
    parser.add_argument("--out", default="synthetic_data", help="output folder, written in the competition layout")
    parser.add_argument("--train-studies", type=int, default=40, help="number of training studies")
    parser.add_argument("--test-studies", type=int, default=10, help="number of test studies (truth in solution*.csv)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    parser.add_argument("--size", type=int, default=160, help="typical frame size in pixels (some series 1.25x)")
    # realism
    parser.add_argument("--quirks", action="store_true", help="add the quirks of real data (listed in quirks.csv)")
    parser.add_argument("--balanced", action="store_true", help="severities 1/3 each instead of the real priors")
    # system
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: one per CPU core)")
    args = parser.parse_args(argv)
    assert args.train_studies >= 0 and args.test_studies >= 0 and args.size >= 32, "counts >= 0, size >= 32"
    return args


def main(argv=None):
    args = parse_args(argv)
    print(vars(args))
    make_dataset(args.out, args.train_studies, args.test_studies, args.seed, args.size, args.quirks, args.balanced,
                 args.workers)


if __name__ == "__main__":
    main()
