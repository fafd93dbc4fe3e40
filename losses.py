"""Training losses, the exact competition metric, and landmark error summaries.

    score = competition_score(solution_frame, submission_frame)   # as the RSNA 2024 host scores it
    loss = weighted_cross_entropy(logits, targets)                 # (N, 3), (N,) with -1 = no label
"""
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import data
import models
from data import (GROUP_CONDITIONS, LABEL_COLUMNS, MISSING, N_LABELS, N_SEVERITIES, SEVERITIES,
                  SEVERITY_WEIGHTS, SUBMISSION_COLUMNS)

EPS = np.finfo(np.float64).eps  # the host clips probabilities to [eps, 1 - eps]
# our submitted probabilities stay inside [floor, 1 - floor]: one confident miss costs <= 9.2
PROBABILITY_FLOOR = 1e-4


def _weighted_log_loss(true_index, probabilities, weights):
    """sum_i w_i * -log p_i[true_i] / sum_i w_i; rows already normalised and clipped by _aligned().
    NaN for no rows."""
    if len(true_index) == 0:
        return float("nan")
    picked = probabilities[np.arange(len(true_index)), true_index]
    return float(np.sum(weights * -np.log(picked)) / np.sum(weights))


def _solution_long(solution):
    """train.csv-shaped frame -> long frame (row_id, study_id, condition, level, target), empty
    cells dropped."""
    codes = {s: i for i, s in enumerate(SEVERITIES)}
    rows = []
    for column in LABEL_COLUMNS:
        condition, level = column[: -len("_l1_l2")], column[-len("l1_l2"):]
        for study_id, value in zip(solution["study_id"], solution[column]):
            if isinstance(value, str) and value.strip():
                if value.strip() not in codes:
                    raise ValueError(f"solution: unknown severity {value!r} in column {column}")
                rows.append(
                    (f"{int(study_id)}_{column}", int(study_id), condition, level,
                     codes[value.strip()])
                )
    return pd.DataFrame(rows, columns=["row_id", "study_id", "condition", "level", "target"])


def _check_submission(submission, needed_row_ids):
    absent = [c for c in ["row_id"] + SUBMISSION_COLUMNS if c not in submission.columns]
    if absent:
        raise ValueError(f"submission: missing columns {absent}")
    if submission["row_id"].duplicated().any():
        raise ValueError(
            "submission: duplicated row_id "
            f"{submission['row_id'][submission['row_id'].duplicated()].iloc[0]}"
        )
    missing = sorted(set(needed_row_ids) - set(submission["row_id"]))
    if missing:
        raise ValueError(f"submission: {len(missing)} rows missing, e.g. {missing[:3]}")
    values = submission[SUBMISSION_COLUMNS].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("submission: non-finite probabilities")
    if (values < 0).any():
        raise ValueError("submission: negative probabilities")
    if (values.sum(axis=1) <= 0).any():
        raise ValueError("submission: a row of zeros")


def _aligned(solution, submission):
    """Scored rows of the solution with their submitted probabilities (clipped, normalised) and
    metric weights."""
    truth = _solution_long(solution)
    _check_submission(submission, truth["row_id"])
    predicted = (
        submission.set_index("row_id").loc[truth["row_id"], SUBMISSION_COLUMNS].to_numpy(np.float64)
    )
    # rows to sum 1 first, as the host does
    predicted = predicted / predicted.sum(axis=1, keepdims=True)
    predicted = np.clip(predicted, EPS, 1 - EPS)
    predicted = predicted / predicted.sum(axis=1, keepdims=True)
    return truth, predicted, np.asarray(SEVERITY_WEIGHTS)[truth["target"].to_numpy()]


def condition_group_losses(solution, submission):
    """{spinal, foraminal, subarticular, any_severe_spinal: loss}: the four terms the competition
    score averages.
    A term without a labelled row (a dataset that grades some conditions only) is NaN."""
    truth, predicted, weights = _aligned(solution, submission)
    targets = truth["target"].to_numpy()
    out = {}
    for name, conditions in GROUP_CONDITIONS.items():
        rows = truth["condition"].isin(conditions).to_numpy()
        out[name] = _weighted_log_loss(targets[rows], predicted[rows], weights[rows])
    spinal = truth.assign(severe=predicted[:, 2], weight=weights)[
        truth["condition"] == "spinal_canal_stenosis"
    ]
    per_study = spinal.groupby("study_id").agg(severe=("severe", "max"), weight=("weight", "max"),
                                               target=("target", "max"))
    binary = np.stack([1 - per_study["severe"], per_study["severe"]], axis=1)
    any_severe = (per_study["target"] == 2).astype(int).to_numpy()
    out["any_severe_spinal"] = _weighted_log_loss(
        any_severe, binary, per_study["weight"].to_numpy()
    )
    return out


def competition_score(solution, submission):
    """The RSNA 2024 metric: mean of three weighted log losses (spinal, foraminal, subarticular) and
    any_severe_spinal.

    solution: DataFrame like train.csv (study_id + 25 columns of severity strings, empty = not
    scored).
    submission: DataFrame like sample_submission.csv. Rows are normalised to sum 1, clipped to
    [eps, 1 - eps] and normalised again before use, as the host's log loss does; any_severe uses the
    max over levels of the normalised `severe`.
    Raises ValueError on missing or duplicated rows, non-finite or negative values.
    """
    return mean_of_terms(condition_group_losses(solution, submission))


def mean_of_terms(terms):
    """The score from condition_group_losses' terms: their mean, leaving out terms with no labelled
    row (NaN)."""
    values = np.array(list(terms.values()), dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def confusion_matrices(labels, probabilities):
    """{group: (3, 3) counts [true, predicted]} over the labelled rows of labels (N, 25) and
    probabilities (N, 25, 3)."""
    predicted = probabilities.argmax(-1)
    n = N_SEVERITIES
    out = {}
    for name, columns in data.GROUP_COLUMNS.items():
        truth = labels[:, columns].ravel()
        guess = predicted[:, columns].ravel()
        keep = truth != MISSING
        out[name] = np.bincount(truth[keep] * n + guess[keep], minlength=n * n).reshape(n, n)
    return out


def labels_to_solution(study_ids, labels):
    """(N,) study ids and (N, 25) class indices (MISSING = empty) -> a train.csv-shaped
    DataFrame."""
    names = np.array(SEVERITIES + [""], dtype=object)
    frame = pd.DataFrame(names[np.where(labels == MISSING, len(SEVERITIES), labels)],
                         columns=LABEL_COLUMNS)
    frame.insert(0, "study_id", np.asarray(study_ids, np.int64))
    return frame


def probabilities_to_submission(study_ids, probabilities):
    """(N,) study ids and (N, 25, 3) probabilities -> a sample_submission.csv-shaped DataFrame, 25
    rows a study."""
    row_ids = [f"{int(s)}_{column}" for s in study_ids for column in LABEL_COLUMNS]
    frame = pd.DataFrame(np.asarray(probabilities, np.float64).reshape(-1, N_SEVERITIES),
                         columns=SUBMISSION_COLUMNS)
    frame.insert(0, "row_id", row_ids)
    return frame


def finalise(probabilities, floor=PROBABILITY_FLOOR):
    """Clip away from 0 and 1 and renormalise: a submitted row is never 0, 1, or non-finite
    (NaN rows -> 1/3 each)."""
    clipped = np.clip(np.nan_to_num(probabilities, nan=1 / 3), floor, 1 - floor)
    return clipped / clipped.sum(-1, keepdims=True)


def weighted_prior(labels, smoothing=0.0):
    """(25, 3) per-column class frequencies times the metric weights (1, 2, 4), renormalised: the
    usual baseline."""
    counts = (np.stack([(labels == k).sum(axis=0) for k in range(len(SEVERITIES))], axis=1).astype(
              np.float64 ) + smoothing)
    weighted = counts * np.asarray(SEVERITY_WEIGHTS)
    return weighted / weighted.sum(axis=1, keepdims=True)


# -----------------------------------------------------------------------------
# training losses


def weighted_cross_entropy(logits, targets):
    """Cross entropy weighted (1, 2, 4) by the true class, as the metric is; targets == MISSING are
    masked out.

    logits (N, 3), targets (N,) int64. Returns the weighted mean over labelled rows (0 with a graph
    if none).
    """
    weights = torch.as_tensor(SEVERITY_WEIGHTS, dtype=logits.dtype, device=logits.device)
    labelled = targets != MISSING
    safe_targets = targets.clamp(min=0)
    per_row = F.cross_entropy(logits.float(), safe_targets, reduction="none")
    row_weights = weights[safe_targets] * labelled
    return (per_row * row_weights).sum() / row_weights.sum().clamp(min=1e-8)


# -----------------------------------------------------------------------------
# landmark heatmaps


def heatmap_targets(targets, depth_mask, heat_shape, sigma):
    """Gaussian target distributions (B, K, D, h, w) summing to 1 per point; targets (B, K, 3) in
    heatmap cells."""
    batch, n_points = targets.shape[:2]
    depth, height, width = heat_shape
    d = torch.arange(depth, dtype=torch.float32).view(1, 1, depth, 1, 1)
    y = torch.arange(height, dtype=torch.float32).view(1, 1, 1, height, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, 1, 1, 1, width)
    cd, cx, cy = (targets[..., i].nan_to_num(0).view(batch, n_points, 1, 1, 1) for i in range(3))
    in_plane = -((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)
    through_plane = (d - cd) ** 2 / (2 * (0.6 * sigma) ** 2)  # slices: 0.6 sigma
    logits = in_plane - through_plane
    logits = logits.masked_fill(~depth_mask.view(batch, 1, depth, 1, 1), models.MASKED)
    return logits.flatten(2).softmax(-1).view(batch, n_points, depth, height, width)


def to_heat_coords(targets, input_size, heat_hw):
    """[slice, col, row] in input pixels -> heatmap cells (slice unchanged)."""
    out = targets.clone()
    out[..., 1:] = torch.as_tensor(
        data.to_resized(targets[..., 1:].numpy(), (input_size, input_size), heat_hw),
        dtype=torch.float32,
    )
    return out


def heatmap_loss(logits, targets, depth_mask, input_size, sigma):
    """KL(target || softmax over (D, h, w)) per labelled point, mean over points; 0 for a perfect
    fit."""
    batch, n_points, depth, height, width = logits.shape
    heat_targets = to_heat_coords(targets, input_size, (height, width))
    target = heatmap_targets(heat_targets, depth_mask, (depth, height, width), sigma)
    target = target.to(logits.device)
    in_depth = depth_mask.to(logits.device).view(batch, 1, depth, 1, 1)
    masked = logits.float().masked_fill(~in_depth, models.MASKED)
    log_prob = masked.flatten(2).log_softmax(-1)
    flat_target = target.flatten(2)
    kl = (flat_target * (flat_target.clamp(min=1e-12).log() - log_prob)).sum(-1)  # (B, K)
    labelled = ~torch.isnan(targets[..., 0]).to(logits.device)
    return (kl * labelled).sum() / labelled.sum().clamp(min=1)


def collapsed_groups(labels, predicted):
    """{group: the one class predicted for all its rows} for every condition group whose labelled
    rows hold two or more true classes yet get a single predicted class: the model has stopped
    looking at the crops.

    labels, predicted: (N, 25) class indices (labels MISSING where empty), LABEL_COLUMNS order.
    """
    out = {}
    for name, columns in data.GROUP_COLUMNS.items():
        truth, guess = (np.asarray(labels)[:, columns].ravel(),
                        np.asarray(predicted)[:, columns].ravel())
        keep = truth != MISSING
        if len(np.unique(truth[keep])) > 1 and len(np.unique(guess[keep])) == 1:
            out[name] = SEVERITIES[int(guess[keep][0])]
    return out


# -----------------------------------------------------------------------------
# landmark errors


def point_errors(series, predicted, targets):
    """In-plane error in mm (on the true slice's spacing) and absolute slice error, for labelled
    points.

    predicted, targets: (K, 3) [slice, col, row] in the series' volume pixels; NaN rows of targets
    are skipped.
    """
    labelled = np.isfinite(targets).all(axis=1)
    spacing = series.pixel_spacing[targets[labelled, 0].astype(int)]  # (n, 2) [row, col]
    delta = (predicted[labelled, 1:] - targets[labelled, 1:]) * spacing[:, ::-1]
    return np.hypot(delta[:, 0], delta[:, 1]), np.abs(predicted[labelled, 0] - targets[labelled, 0])


def summarise_errors(mm, slices):
    """{median_mm, p90_mm, slice_exact, slice_within1} of per-point errors (NaN when there are
    none)."""
    mm, slices = np.asarray(mm, np.float64), np.asarray(slices, np.float64)
    if len(mm) == 0:
        return dict(median_mm=float("nan"), p90_mm=float("nan"), slice_exact=float("nan"),
                    slice_within1=float("nan"))
    # misses are inf; interpolating between two of them gives NaN
    with np.errstate(invalid="ignore"):
        median, p90 = (float(np.nan_to_num(np.percentile(mm, q), nan=np.inf)) for q in (50, 90))
    return dict(median_mm=median, p90_mm=p90, slice_exact=float(np.mean(slices < 0.5)),
                slice_within1=float(np.mean(slices < 1.5)))
