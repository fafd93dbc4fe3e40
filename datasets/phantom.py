"""The synthetic patient: a 3D lumbar phantom in patient space and its rendering into any slice.

Vertebral bodies, discs, canal, foramina and lateral recesses with random pose, lordosis, size,
contrast and noise; every graded condition is drawn as a narrowing of its structure at that disc.
synthetic.py places series geometry around it and writes DICOM files.

    >>> rng = np.random.default_rng(0)
    >>> anatomy = make_anatomy(rng, sample_severity(rng, balanced=False))
    >>> landmarks(anatomy).shape          # (condition, level, xyz mm) of every labelled structure
    (5, 5, 3)
"""

import math

import numpy as np

from data import LEVEL_NAMES

# -----------------------------------------------------------------------------
# what the phantom is made of

# real class counts (N/M/S over 5 levels) of each condition, in CONDITIONS order
PRIOR_COUNTS = np.array(
    [[8664, 736, 470], [7672, 1794, 399], [7685, 1770, 380], [6864, 1835, 913], [6869, 1825, 927]]
)
LEVEL_RISK = np.array([0.5, 0.7, 1.0, 1.6, 1.2])  # lower discs degenerate more often (mean 1)
# what is left open at the labelled point, (mean, sd) per class: canal AP diameter fraction,
# foramen fat area fraction, lateral recess openness
OPENNESS = {"canal": [(0.95, 0.07), (0.55, 0.06), (0.25, 0.05)],
            "foramen": [(1.0, 0.08), (0.55, 0.07), (0.2, 0.05)],
            "recess": [(1.0, 0.08), (0.5, 0.07), (0.1, 0.05)]}
GROUP_OF_CONDITION = ["canal", "foramen", "foramen", "recess", "recess"]
SEGMENTS = ["S2", "S1/S2", "S1", "L5/S1", "L5", "L4/L5", "L4", "L3/L4", "L3", "L2/L3", "L2",
            "L1/L2", "L1", "T12/L1", "T12", "T11/T12", "T11"]  # bottom to top along the spine
DISC_HEIGHT = {"S1/S2": 2.0, "L5/S1": 10.0, "L4/L5": 11.0, "L3/L4": 10.0, "L2/L3": 9.0,
               "L1/L2": 8.0, "T12/L1": 7.0, "T11/T12": 6.0}  # mm; vertebral bodies are about 25 mm
FORAMEN_RISE = 2.0  # mm, foramen centre above its disc centre
TISSUES = ["fat", "viscera", "muscle", "marrow", "cortex", "nucleus", "annulus", "ligament", "csf",
           "cord", "bone", "nerve"]
CONTRAST = {"T1": [0.95, 0.30, 0.22, 0.70, 0.06, 0.38, 0.28, 0.10, 0.12, 0.35, 0.45, 0.25],
            "T2": [0.80, 0.22, 0.18, 0.45, 0.05, 0.85, 0.25, 0.08, 1.00, 0.30, 0.35, 0.22],
            "STIR": [0.10, 0.30, 0.15, 0.12, 0.04, 0.90, 0.15, 0.06, 1.00, 0.30, 0.12, 0.25]}
MAX_VALUE = 4095  # pixel values before any storage quirk


def rotation(degrees):
    """Rotation matrix (3, 3) about x, then y, then z, by angles in degrees."""
    cx, cy, cz = np.cos(np.radians(degrees))
    sx, sy, sz = np.sin(np.radians(degrees))
    return (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )


def sample_severity(rng, balanced):
    """Class index (5 conditions, 5 levels): real priors, worse at lower discs, or 1/3 each when
    balanced."""
    prior = PRIOR_COUNTS / PRIOR_COUNTS.sum(axis=1, keepdims=True)
    abnormal = prior[:, None, 1:] * LEVEL_RISK[None, :, None]  # (5 conditions, 5 levels, 2)
    probabilities = np.concatenate([1 - abnormal.sum(axis=2, keepdims=True), abnormal], axis=2)
    if balanced:
        probabilities = np.full((5, 5, 3), 1 / 3)
    return np.minimum((rng.random((5, 5, 1)) > probabilities.cumsum(axis=2)).sum(axis=2), 2)


# A simulated reader: sees what is left open with Gaussian error (--reader-noise times this scale
# per group: foramina and recesses are harder to read than the canal) and grades at the midpoints
# between the grades' mean openness. Real labels are one reader's call like this.
READER_SCALE = {"canal": 1.0, "foramen": 1.5, "recess": 1.5}
GRADE_BOUNDS = {group: ((means[0][0] + means[1][0]) / 2, (means[1][0] + means[2][0]) / 2)
                for group, means in OPENNESS.items()}  # (Normal/Moderate, Moderate/Severe)


def read_grades(rng, openness, sigma):
    """(5, 5) grades a reader gives: each openness (5 conditions, 5 levels) seen with an error of
    N(0, sigma x READER_SCALE), then graded at GRADE_BOUNDS."""
    grades = np.zeros((5, 5), dtype=np.int64)
    for c, group in enumerate(GROUP_OF_CONDITION):
        seen = openness[c] + rng.normal(0.0, sigma * READER_SCALE[group], 5)
        upper, lower = GRADE_BOUNDS[group]
        grades[c] = np.where(seen >= upper, 0, np.where(seen >= lower, 1, 2))
    return grades


def normal_cdf(x):
    return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(x)]).reshape(
        np.shape(x))


def reader_posterior(openness, sigma):
    """(5, 5, 3): the probability of each grade read_grades gives, knowing the openness: the Bayes
    posterior of a reader's label given the anatomy, which no model of the images can beat."""
    out = np.zeros((5, 5, 3))
    for c, group in enumerate(GROUP_OF_CONDITION):
        sd = sigma * READER_SCALE[group]
        upper, lower = GRADE_BOUNDS[group]
        below_upper = normal_cdf((upper - np.asarray(openness[c], np.float64)) / sd)
        below_lower = normal_cdf((lower - np.asarray(openness[c], np.float64)) / sd)
        out[c, :, 0] = 1.0 - below_upper
        out[c, :, 1] = below_upper - below_lower
        out[c, :, 2] = below_lower
    return out


def make_column(rng, scale, openness):
    """Vertebral bodies and discs stacked along the arc length s (mm, 0 near the L3 body,
    up is +)."""
    is_disc = np.array(["/" in name for name in SEGMENTS])
    height = (np.array([DISC_HEIGHT.get(name, 25.0) for name in SEGMENTS]) * scale
              * rng.uniform(0.88, 1.12, 17))
    l1, l3 = SEGMENTS.index("L1"), SEGMENTS.index("L3")
    top = np.cumsum(height) - (height[:l3].sum() + height[l3] / 2) + rng.uniform(-20, 20)
    half_width, half_depth = scale * rng.uniform(22, 25, 17), scale * rng.uniform(14, 16.5, 17)
    water = np.zeros(17)  # nucleus brightness factor: degenerate discs dry out
    for k in np.flatnonzero(is_disc):  # discs bulge 1.5 mm past their bodies
        half_width[k], half_depth[k] = (max(half_width[k - 1 : k + 2 : 2]) + 1.5,
                                        max(half_depth[k - 1 : k + 2 : 2]) + 1.5)
        water[k] = rng.uniform(0.9, 1.1)
    disc_index = [SEGMENTS.index(name) for name in LEVEL_NAMES]
    water[disc_index] = np.clip(1 - 0.4 * (1 - openness.min(axis=0)) + rng.uniform(-0.1, 0.1, 5),
                                0.3, 1.1)
    water[SEGMENTS.index("S1/S2")] = 0.1  # fused
    return dict(segment_top=top, segment_height=height, is_disc=is_disc, half_width=half_width,
                half_depth=half_depth, water=water, disc_s=top[disc_index] - height[disc_index] / 2,
                conus_s=top[l1] - height[l1] * rng.uniform(0.2, 0.8))


def make_anatomy(rng, severity):
    """Everything random about one patient: pose, lordosis, sizes, lesions, contrast, noise
    (mm, degrees)."""
    openness = np.array(
        [
            [rng.normal(*OPENNESS[GROUP_OF_CONDITION[c]][severity[c, j]]) for j in range(5)]
            for c in range(5)
        ]
    ).clip(0.02, 1.2)
    scale = rng.uniform(0.9, 1.1)
    anatomy = make_column(rng, scale, openness)
    depth = anatomy["half_depth"].mean()
    canal_ap, canal_lr, fat = (scale * rng.uniform(5.5, 7.5), scale * rng.uniform(10, 12.5),
                               rng.uniform(10, 30))
    # canal centre, mm posterior of the body centreline
    canal_p = depth + rng.uniform(2, 4) + canal_ap
    directions = rng.normal(size=(16, 3))  # plane waves of a smooth random texture
    directions *= (
        2 * np.pi / rng.uniform(4, 25, (16, 1)) / np.linalg.norm(directions, axis=1, keepdims=True)
    )
    anatomy.update(
        openness=openness,
        rotation=rotation(rng.uniform([-5, -1.5, -1.5], [5, 1.5, 1.5])),  # little coronal tilt
        translation=rng.uniform([-15, -30, -40], [15, 30, 40]),
        curve_radius=rng.uniform(180, 320),
        canal_p=canal_p,
        canal_ap=canal_ap,
        canal_lr=canal_lr,
        foramen_p=depth + rng.uniform(1, 4),
        foramen_x=anatomy["half_width"].mean() * rng.uniform(0.75, 0.88),
        recess_x=canal_lr * rng.uniform(0.75, 0.9),
        recess_p=canal_p - 0.55 * canal_ap,
        skin_front=-rng.uniform(110, 170),
        skin_back=canal_p + rng.uniform(45, 60) + fat,
        fat=fat,
        skin_half_width=rng.uniform(140, 180),
        coil_depth=rng.uniform(110, 160),
        waves=directions.T.copy(),
        phases=rng.uniform(0, 2 * np.pi, 16),
        brightness=rng.uniform(1500, 3000),
        noise=rng.uniform(0.015, 0.04),
        contrast={
            weighting: dict(zip(TISSUES, (np.array(values) * rng.uniform(0.85, 1.15, 12)).tolist()))
            for weighting, values in CONTRAST.items()
        },
    )
    # render in float32 (its cos is ~6x faster): no float64 numpy values
    for key, value in anatomy.items():
        float64_array = isinstance(value, np.ndarray) and value.dtype == np.float64
        if isinstance(value, np.floating) or float64_array:
            anatomy[key] = float(value) if np.ndim(value) == 0 else value.astype(np.float32)
    return anatomy


def to_patient(anatomy, x, p, s):
    """Spine coordinates (lateral x, posterior offset p, arc length s; mm) -> patient points
    (..., 3) mm."""
    radius = anatomy["curve_radius"]  # lordosis: a circular arc whose centre lies posterior
    theta, rho = np.asarray(s) / radius, radius - np.asarray(p)
    local = np.stack(np.broadcast_arrays(x, radius - rho * np.cos(theta), rho * np.sin(theta)),
                     axis=-1)
    return local @ anatomy["rotation"].T.astype(np.float64) + anatomy["translation"]


def landmarks(anatomy):
    """Patient points (5 conditions, 5 levels, 3) mm of every labelled structure."""
    s, fx, sx, fp, sp = (
        anatomy[k] for k in ("disc_s", "foramen_x", "recess_x", "foramen_p", "recess_p")
    )
    spine = [(0, anatomy["canal_p"], s), (fx, fp, s + FORAMEN_RISE), (-fx, fp, s + FORAMEN_RISE),
             (sx, sp, s), (-sx, sp, s)]  # left is patient +x
    return np.stack([to_patient(anatomy, x, p, s) for x, p, s in spine])


# -----------------------------------------------------------------------------
# rendering: intensity of the phantom at any patient points

def inside(distance, edge):
    """Soft membership from a signed distance (mm, negative inside), ramped over edge mm like
    partial volume."""
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


def ellipse_distance(offsets, radii):
    """Approximate signed distance (mm) to an axis-aligned ellipse or ellipsoid with the given
    radii."""
    # stay in float32
    radii = [np.float32(radius) if np.isscalar(radius) else radius for radius in radii]
    ratio = np.sqrt(sum((offset / radius) ** 2 for offset, radius in zip(offsets, radii)))
    return (ratio - 1) * np.minimum.reduce(np.broadcast_arrays(*radii))


def paint(image, weight, value):
    image += weight * (value - image)


def soft_tissues(x, y, s, texture, anatomy, tissue):
    """Skin, fat, viscera, back muscles and psoas; y (mm, posterior) follows only part of the
    lordosis."""
    front, back, fat = anatomy["skin_front"], anatomy["skin_back"], anatomy["fat"]
    centre, half_depth, half_width = ((front + back) / 2, (back - front) / 2,
                                      anatomy["skin_half_width"])
    image = tissue["fat"] * inside(ellipse_distance((x, y - centre), (half_width, half_depth)), 1.5)
    body = inside(ellipse_distance((x, y - centre), (half_width - fat, half_depth - fat)), 1.5)
    # abdomen, in front
    paint(image, body * inside(y + 25, 15), tissue["viscera"] * (1 + 0.5 * texture))
    muscle_front, muscle_back, lobe_x = anatomy["canal_p"] - 12, back - fat, 0.2 * half_width
    lobes = ellipse_distance(
        (np.abs(x) - lobe_x, y - (muscle_front + muscle_back) / 2),
        (lobe_x + 8, (muscle_back - muscle_front) / 2),
    )  # erector spinae, multifidus
    # psoas thickens going down
    psoas_radius = np.clip(4 + 0.09 * (anatomy["disc_s"][0] + 10 - s), 3, 18)
    psoas_x = np.abs(x) - anatomy["half_width"].mean() - 0.8 * psoas_radius
    muscle = np.minimum(lobes,
                        ellipse_distance((psoas_x, y - 2), (1.2 * psoas_radius, psoas_radius)))
    paint(image, body * inside(muscle - 2.5, 1.5), tissue["fat"])  # fat planes around the muscles
    # fat inside muscle
    streaks = np.clip(texture - 1.2, 0, 1) * 0.6 * (tissue["fat"] - tissue["muscle"])
    paint(image, body * inside(muscle, 1.5), tissue["muscle"] * (1 + 0.15 * texture) + streaks)
    return image


def column(x, p, s, texture, image, anatomy, tissue):
    """Vertebral bodies (marrow, dark cortex and endplates) and discs (bright nucleus, dark
    annulus)."""
    top = anatomy["segment_top"]
    k = np.minimum(np.searchsorted(top, s), len(top) - 1)  # segment holding each point
    height, a, b = anatomy["segment_height"][k], anatomy["half_width"][k], anatomy["half_depth"][k]
    along = s - (top[k] - height / 2)  # mm from the segment centre, up
    # rounded-box outline
    cross = (((np.abs(x) / a) ** 3 + (np.abs(p) / b) ** 3) ** (1 / 3) - 1) * b
    surface = np.maximum(cross, np.abs(along) - height / 2)  # signed distance to the segment
    nucleus = inside(ellipse_distance((x, p, along), (0.6 * a, 0.55 * b, 0.3 * height)), 2.0)
    disc = tissue["annulus"] + nucleus * (
        tissue["nucleus"] * anatomy["water"][k] - tissue["annulus"]
    )
    marrow = tissue["marrow"] * (1 + 0.12 * texture)
    body = marrow + inside(-surface - 1.0, 1.0) * (tissue["cortex"] - marrow)
    paint(image, inside(surface, 1.0), np.where(anatomy["is_disc"][k], disc, body))


def arch(x, p, ds, texture, image, anatomy, tissue):
    """Pedicles and facets (a bony bar either side), laminae around the canal, spinous processes."""
    cp, ap, lr = anatomy["canal_p"], anatomy["canal_ap"], anatomy["canal_lr"]
    front, back = 0.5 * anatomy["half_depth"].mean(), cp + ap + 4
    bar = ellipse_distance((np.abs(x) - anatomy["foramen_x"], p - (front + back) / 2),
                           (8, (back - front) / 2))
    ring = ellipse_distance((x, p - cp), (lr + 6, ap + 6))
    spinous = np.maximum(np.abs(x) - 3.5, np.abs(p - (cp + ap + 22)) - 18)
    gap = inside(np.abs(ds + 2) - 5, 2)  # interlaminar and interspinous space at each disc
    bone = np.maximum(inside(bar, 1.5),
                      np.maximum(inside(ring, 1.5), inside(spinous, 1.5)) * (1 - gap))
    paint(image, bone, tissue["bone"] * (1 + 0.12 * texture))


def canal(x, p, s, j, ds, image, anatomy, tissue):
    """CSF sac narrowed at each disc (canal stenosis), conus, lateral recesses closed by a dark
    blob."""
    cp, ap, lr = anatomy["canal_p"], anatomy["canal_ap"], anatomy["canal_lr"]
    near = np.exp(-(ds / 5.0) ** 2)  # lesions sit on the disc and fade within ~5 mm
    paint(image, inside(ellipse_distance((x, p - cp), (lr, ap)), 1), tissue["ligament"])
    # AP fraction lost: disc bulge in front, ligament behind
    lost = (1 - anatomy["openness"][0, j]) * near
    front, back = cp - ap + 1.2 * ap * lost, cp + ap - 0.8 * ap * lost
    sac = ellipse_distance((x, p - (front + back) / 2),
                           (lr * (1 - 0.3 * lost), np.maximum((back - front) / 2, 0.3)))
    # crowded nerve roots replace the CSF
    paint(image, inside(sac, 1), tissue["csf"] * (1 - 0.6 * lost))
    cord = inside(ellipse_distance((x, p - cp), (4.5, 4.0)), 1) * inside(anatomy["conus_s"] - s, 4)
    paint(image, cord, tissue["cord"])
    shut = 1 - anatomy["openness"][np.where(x > 0, 3, 4), j]  # left is patient +x
    u, w = np.abs(x) - anatomy["recess_x"], p - anatomy["recess_p"]
    paint(image, inside(ellipse_distance((u, w), (3.5, 3.0)), 1) * near, tissue["csf"])
    # facet and disc encroaching
    blob = (inside(np.hypot(u - 2.5, w - 1.5) - (7 * shut - 0.5), 1) * near)
    paint(image, blob, tissue["ligament"])


def foramina(x, p, j, ds, image, anatomy, tissue):
    """Fat oval with a dark nerve root either side of each disc; narrowing shrinks the fat, dark
    tissue fills in."""
    # radius factor from the area fraction
    keep = np.sqrt(anatomy["openness"][np.where(x > 0, 1, 2), j])
    u, w, h = np.abs(x) - anatomy["foramen_x"], p - anatomy["foramen_p"], ds - FORAMEN_RISE
    paint(image, inside(ellipse_distance((u, w, h), (8.0, 4.5, 7.0)), 1), tissue["ligament"])
    paint(image, inside(ellipse_distance((u, w, h), (8.0, 4.5 * keep, 7.0 * keep)), 1),
          tissue["fat"])
    paint(image, inside(np.hypot(w + 0.5, h - 2.5) - 1.7, 1) * inside(np.abs(u) - 8, 1),
          tissue["nerve"])


def times_matrix(points, matrix):
    """points (N, 3) @ matrix (3, M) in float32 without BLAS, whose threads halve the speed of
    worker processes."""
    matrix = matrix.astype(np.float32)
    return points[:, :1] * matrix[0] + points[:, 1:2] * matrix[1] + points[:, 2:] * matrix[2]


def phantom(points, anatomy, weighting):
    """Intensity (N,) float32 of the phantom at patient points (N, 3) mm; about 0..1.3."""
    # R^T (P - t)
    local = times_matrix((points - anatomy["translation"]).astype(np.float32), anatomy["rotation"])
    radius = anatomy["curve_radius"]
    # spine coordinates, see to_patient
    x, p = local[:, 0], radius - np.hypot(radius - local[:, 1], local[:, 2])
    s = radius * np.arctan2(local[:, 2], radius - local[:, 1])
    tissue = anatomy["contrast"][weighting]
    texture = np.cos(times_matrix(local, anatomy["waves"]) + anatomy["phases"]).sum(
        axis=1
    # sd 1
    ) / np.sqrt(8)
    image = soft_tissues(x, local[:, 1] - 0.3 * local[:, 2] ** 2 / radius, s, texture, anatomy,
                         tissue)
    # the only place with spine to draw
    box = ((np.abs(x) < 50) & (p > -35) & (p < anatomy["canal_p"] + 50))
    bx, bp, bs, btexture, spine = x[box], p[box], s[box], texture[box], image[box]
    # nearest labelled disc
    j = np.searchsorted(-(anatomy["disc_s"][1:] + anatomy["disc_s"][:-1]) / 2, -bs)
    ds = bs - anatomy["disc_s"][j]
    column(bx, bp, bs, btexture, spine, anatomy, tissue)
    arch(bx, bp, ds, btexture, spine, anatomy, tissue)
    canal(bx, bp, bs, j, ds, spine, anatomy, tissue)
    foramina(bx, bp, j, ds, spine, anatomy, tissue)
    image[box] = spine
    # posterior coil: front is dark
    depth = np.clip(anatomy["skin_back"] - p, 0, None) / anatomy["coil_depth"]
    return image * (0.2 + 0.8 * np.exp(-depth ** 2))


def render_slice(rng, slice_, anatomy, weighting):
    """uint16 (rows, cols) image of one slice, with Rician noise."""
    rows, cols, spacing = slice_["rows"], slice_["cols"], slice_["pixel_spacing"]
    r, c = np.mgrid[0:rows, 0:cols].reshape(2, -1, 1) * spacing  # mm from pixel (0, 0)
    signal = (phantom(slice_["ipp"] + c * slice_["u"] + r * slice_["v"], anatomy, weighting)
              * anatomy["brightness"])
    sigma = anatomy["noise"] * anatomy["brightness"]
    real, imaginary = sigma * rng.standard_normal((2, len(signal)), np.float32)
    return (
        np.clip(np.rint(np.hypot(signal + real, imaginary)), 0, MAX_VALUE)
        .astype(np.uint16)
        .reshape(rows, cols)
    )
