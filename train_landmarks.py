"""Stage 1: find every condition-level on its series (slice and x, y), for all three series types.

    python train_landmarks.py --data-dir demo --out-dir runs/demo --epochs 8

Sagittal T2/STIR (5 canal points) and Sagittal T1 (10 foraminal points): every slice of the series goes
through a 2D network with its offset across the stack as a second channel; one heatmap per point and a
softmax over (slice, row, col) give the slice and the in-plane position (3D soft-argmax).
Axial T2 (10 subarticular points): the level's slice comes from mapping the sagittal canal point of that
level through patient space into the axial series; a 2D network finds the left and right recess on it.
Writes RUN/landmarks_<type>.csv (one row per epoch), RUN/landmarks_<type>_{last,best}.pt, RUN/args.json.
"""
import argparse
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from losses import heatmap_loss
from models import LandmarkNet, decode_heatmaps, heat_to_volume
from training import (CsvLog, autocast_context, distributed_loader, get_lr, save_args, save_checkpoint,
                      setup_distributed, wrap_for_training)
from viz import write_overlay

SERIES_TAGS = {"Sagittal T2/STIR": "sag_t2", "Sagittal T1": "sag_t1", "Axial T2": "axial"}
AXIAL_SIDES = 2  # the axial network finds the left and the right recess of one slice


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True, help="competition layout: train.csv, train_images/, ...")
    parser.add_argument("--out-dir", required=True, help="run folder for logs, checkpoints, overlays")
    parser.add_argument("--cache-dir", default="cache", help="decoded series are kept here between epochs and runs")
    parser.add_argument("--series-types", default="sag_t2,sag_t1,axial", help="which models to train, comma separated")
    parser.add_argument("--n-folds", type=int, default=5, help="folds of the by-study split")
    parser.add_argument("--fold", type=int, default=0, help="validation fold")
    parser.add_argument("--all-studies", action="store_true", help="train on every study, no validation")
    parser.add_argument("--image-size", type=int, default=96, help="slices are resized to this square size (px)")
    parser.add_argument("--train-depth", type=int, default=10, help="sagittal training sees a random window of this many "
                        "consecutive slices (0: all); points outside it are masked. Inference always sees all slices")
    # model
    parser.add_argument("--pretrained", default="", help="optional torchvision ResNet-18 state dict file")
    # optimization
    parser.add_argument("--epochs", type=int, default=24, help="epochs per series type")
    parser.add_argument("--batch-size", type=int, default=2, help="series per step (sagittal); slices x8 (axial)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps, then cosine to 0")
    parser.add_argument("--sigma", type=float, default=1.0, help="target Gaussian width in heatmap cells (slices: x0.6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16/float16 autocast on CUDA")
    # debugging
    parser.add_argument("--overfit-batches", type=int, default=0, help="train on this many batches only, no augmentation")
    parser.add_argument("--dry-run", action="store_true", help="one short epoch on 2 studies, to check the plumbing")
    parser.add_argument("--stop-after-epochs", type=int, default=0, help="end the run after this many epochs, as a "
                        "kill would (the schedule still spans --epochs); for testing --resume")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/landmarks_<type>_last.pt")
    parser.add_argument("--overlays", type=int, default=4, help="PNG overlays of this many validation series per type")
    args = parser.parse_args(argv)
    args.series_types = [t.strip() for t in args.series_types.split(",") if t.strip()]
    assert set(args.series_types) <= set(SERIES_TAGS.values()), f"--series-types must be among {list(SERIES_TAGS.values())}"
    assert 0 <= args.fold < args.n_folds
    return args


# -----------------------------------------------------------------------------
# samples: which series (or axial slices) to learn from, with their labelled points


def labelled_series(data_dir, split="train"):
    """[{study_id, series_id, series_type, series_dir, points: {(condition, level): (instance, x, y)}}] of a split."""
    descriptions = data.read_series_descriptions(os.path.join(data_dir, f"{split}_series_descriptions.csv"))
    coordinates_file = os.path.join(data_dir, f"{split}_label_coordinates.csv")
    coordinates = data.read_coordinates(coordinates_file) if os.path.exists(coordinates_file) else None
    points = {}
    if coordinates is not None:
        for row in coordinates.itertuples(index=False):
            points.setdefault(row.series_id, {})[(row.condition, row.level)] = (row.instance_number, row.x, row.y)
    out = []
    for row in descriptions.itertuples(index=False):
        series_dir = os.path.join(data_dir, f"{split}_images", str(row.study_id), str(row.series_id))
        out.append(dict(study_id=int(row.study_id), series_id=int(row.series_id), series_type=row.series_description,
                        series_dir=series_dir, points=points.get(row.series_id, {})))
    return out


def point_targets(series, series_points, point_names, series_dir=""):
    """(K, 3) [slice, col, row] in volume pixels; NaN (masked) where the point is unlabelled, and, with a
    warning, where its instance is not in the series or it lies outside its frame."""
    targets = np.full((len(point_names), 3), np.nan, dtype=np.float32)
    for k, name in enumerate(point_names):
        if name in series_points:
            instance, x, y = series_points[name]
            try:
                targets[k] = data.label_to_volume(series, instance, x, y)
            except (KeyError, ValueError) as error:
                warnings.warn(f"{series_dir}: label {name[0]} {name[1]} ignored: {error}")
    return targets


class SagittalDataset(torch.utils.data.Dataset):
    """A whole sagittal series: slices (D, 2, S, S) with the offset channel, targets (K, 3) in input pixels."""

    def __init__(self, items, point_names, image_size, cache_dir, augment, train_depth=0):
        self.items, self.point_names, self.size, self.cache_dir, self.augment = items, point_names, image_size, cache_dir, augment
        self.train_depth = train_depth

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        series = data.load_series(item["series_dir"], self.cache_dir)
        targets = point_targets(series, item["points"], self.point_names, item["series_dir"])
        volume = data.resize_volume(data.normalise_volume(series.volume), self.size)  # (D, S, S)
        targets[:, 1:] = data.to_resized(targets[:, 1:], series.volume.shape[1:], (self.size, self.size))
        if self.augment:
            volume, targets[:, 1:] = random_affine(volume, targets[:, 1:])
            volume = random_intensity(volume)
        offsets = torch.from_numpy(data.slice_offsets(series) / 50.0)[:, None, None].expand_as(volume)
        inputs = torch.stack([volume, offsets], dim=1)  # (D, 2, S, S)
        if self.augment and 0 < self.train_depth < len(inputs):  # a window of slices: half the cost per step
            start = np.random.randint(0, len(inputs) - self.train_depth + 1)
            inputs = inputs[start:start + self.train_depth]
            targets[:, 0] -= start
            targets[(targets[:, 0] < 0) | (targets[:, 0] > self.train_depth - 1)] = np.nan
        return inputs, torch.from_numpy(targets), index


def column_direction(series, slice_index):
    """+1 where image columns run toward the patient's left (the DICOM display convention), else -1.

    Fed to the axial network as its second channel, so a mirrored image (augmentation, or a series stored
    the other way round) still says which side is the patient's left.
    """
    return 1.0 if series.orientations[slice_index, 0] >= 0 else -1.0


def mirror_axial(image, targets, direction):
    """Mirror an axial input (1, S, S) across its columns. Points (K, 3) [slice, col, row] move with the image
    and keep their side: the patient's left recess is still the left one, it now lies on the other half of
    the image, and the direction channel flips to say so. (Without that channel, left and right labels would
    have to swap instead, and a series stored the other way round would fool the network.)"""
    mirrored = targets.copy()
    mirrored[:, 1] = image.shape[-1] - 1 - targets[:, 1]
    return image.flip(-1), mirrored, -direction


class AxialDataset(torch.utils.data.Dataset):
    """One labelled axial slice: (1, 2, S, S) input, targets (2, 3) [0, col, row] for left and right recess."""

    def __init__(self, items, image_size, cache_dir, augment, slice_jitter=1):
        self.size, self.cache_dir, self.augment, self.jitter = image_size, cache_dir, augment, slice_jitter
        self.samples = []  # (item, level, instance of the labelled slice)
        for item in items:
            for level in data.LEVELS:
                sides = [item["points"].get((f"{side}_subarticular_stenosis", level)) for side in ("left", "right")]
                instances = sorted({p[0] for p in sides if p is not None})
                self.samples += [(item, level, instance) for instance in instances]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        item, level, instance = self.samples[index]
        series = data.load_series(item["series_dir"], self.cache_dir)
        names = [(f"{side}_subarticular_stenosis", level) for side in ("left", "right")]
        targets = point_targets(series, item["points"], names, item["series_dir"])
        matches = np.flatnonzero(series.instance_numbers == instance)
        d = int(matches[0]) if len(matches) else 0  # a lost instance: point_targets warned, its targets are NaN
        targets[np.abs(targets[:, 0] - d) > 0.5] = np.nan  # the other side may be labelled on another slice
        if self.augment and self.jitter:  # stage 1 may pick a neighbouring slice; learn to look there too
            d = int(np.clip(d + np.random.randint(-self.jitter, self.jitter + 1), 0, len(series.volume) - 1))
        image = data.resize_volume(data.normalise_volume(series.volume[d:d + 1]), self.size)  # (1, S, S)
        targets[:, 0] = np.where(np.isnan(targets[:, 0]), np.nan, 0.0)
        targets[:, 1:] = data.to_resized(targets[:, 1:], series.volume.shape[1:], (self.size, self.size))
        direction = column_direction(series, d)
        if self.augment:
            if np.random.rand() < 0.5:
                image, targets, direction = mirror_axial(image, targets, direction)
            image, targets[:, 1:] = random_affine(image, targets[:, 1:])
            image = random_intensity(image)
        return torch.stack([image, torch.full_like(image, direction)], dim=1), torch.from_numpy(targets), index


def collate_padded(batch):
    """Pad series to the deepest one: inputs (B, D, 2, S, S), targets (B, K, 3), depth mask (B, D)."""
    depth = max(x.shape[0] for x, _, _ in batch)
    inputs = torch.zeros((len(batch), depth) + tuple(batch[0][0].shape[1:]))
    mask = torch.zeros(len(batch), depth, dtype=torch.bool)
    for i, (x, _, _) in enumerate(batch):
        inputs[i, : len(x)], mask[i, : len(x)] = x, True
    return inputs, torch.stack([t for _, t, _ in batch]), mask, torch.tensor([i for _, _, i in batch])


# -----------------------------------------------------------------------------
# augmentation that keeps the coordinates right


def random_affine(volume, points, max_scale=0.12, max_shift=0.08, max_degrees=8.0):
    """The same random scale/shift/rotation for all slices (D, S, S); points (K, 2) [col, row] follow."""
    size = volume.shape[-1]
    scale = math.exp(np.random.uniform(-max_scale, max_scale))
    angle = math.radians(np.random.uniform(-max_degrees, max_degrees))
    shift = np.random.uniform(-max_shift, max_shift, size=2) * 2  # in normalised [-1, 1] units
    # theta maps output normalised coords to input normalised coords: in = R/scale @ out + shift
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) / scale
    theta = torch.tensor(np.concatenate([rotation, shift[:, None]], axis=1), dtype=torch.float32)[None]
    grid = F.affine_grid(theta.expand(len(volume), 2, 3), (len(volume), 1, size, size), align_corners=False)
    warped = F.grid_sample(volume[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    normalised = (2 * points + 1) / size - 1  # pixel centres -> [-1, 1], align_corners=False convention
    moved = (normalised - shift) @ np.linalg.inv(rotation).T
    return warped, ((moved + 1) * size - 1) / 2


def random_intensity(volume):
    """Random gamma and contrast, so the network does not learn one scanner's grey levels."""
    gamma = math.exp(np.random.uniform(-0.3, 0.3))
    return volume.clamp(min=0) ** gamma * np.random.uniform(0.85, 1.15)


# -----------------------------------------------------------------------------
# running a trained model on one series (validation and infer.py)


@torch.no_grad()
def predict_sagittal(model, series, image_size, device):
    """All points of a sagittal series -> (K, 3) [slice, col, row] in volume pixels and (K,) confidence."""
    volume = data.resize_volume(data.normalise_volume(series.volume), image_size)
    offsets = torch.from_numpy(data.slice_offsets(series) / 50.0)[:, None, None].expand_as(volume)
    inputs = torch.stack([volume, offsets], dim=1)[None].to(device)  # (1, D, 2, S, S)
    logits = model(inputs).float()
    points, confidence = decode_heatmaps(logits, torch.ones(1, len(volume), dtype=torch.bool))
    return heat_to_volume(points[0].numpy(), logits.shape[-2:], series.volume.shape[1:]), confidence[0].numpy()


@torch.no_grad()
def predict_axial(model, series, slice_index, image_size, device):
    """Left and right recess on one axial slice -> (2, 2) [col, row] in volume pixels and (2,) confidence."""
    image = data.resize_volume(data.normalise_volume(series.volume[slice_index:slice_index + 1]), image_size)
    inputs = torch.stack([image, torch.full_like(image, column_direction(series, slice_index))], dim=1)[None].to(device)
    logits = model(inputs).float()
    points, confidence = decode_heatmaps(logits, torch.ones(1, 1, dtype=torch.bool))
    return heat_to_volume(points[0].numpy(), logits.shape[-2:], series.volume.shape[1:])[:, 1:], confidence[0].numpy()


def axial_slices_for_levels(axial, level_points_mm):
    """Axial slice index of each level: the slice nearest to that level's canal point (5, 3) in patient mm."""
    return [data.series_patient_to_pixel(axial, point)[0] if np.isfinite(point).all() else -1 for point in level_points_mm]


def canal_points_mm(series, points):
    """(5, 3) patient mm of [slice, col, row] canal points (NaN rows stay NaN)."""
    out = np.full((len(points), 3), np.nan)
    for k, (d, col, row) in enumerate(points):
        if np.isfinite([d, col, row]).all():
            out[k] = data.series_pixel_to_patient(series, d, col, row)
    return out


def point_errors(series, predicted, targets):
    """In-plane error in mm (on the true slice's spacing) and absolute slice error, for labelled points."""
    labelled = np.isfinite(targets).all(axis=1)
    spacing = series.pixel_spacing[targets[labelled, 0].astype(int)]  # (n, 2) [row, col]
    delta = (predicted[labelled, 1:] - targets[labelled, 1:]) * spacing[:, ::-1]
    return np.hypot(delta[:, 0], delta[:, 1]), np.abs(predicted[labelled, 0] - targets[labelled, 0])


def summarise_errors(mm, slices):
    if len(mm) == 0:
        return dict(median_mm=float("nan"), p90_mm=float("nan"), slice_exact=float("nan"), slice_within1=float("nan"))
    return dict(median_mm=float(np.median(mm)), p90_mm=float(np.percentile(mm, 90)),
                slice_exact=float(np.mean(slices < 0.5)), slice_within1=float(np.mean(slices < 1.5)))


def evaluate(model, tag, items, canal_items, args, device):
    """Validation: {median_mm, p90_mm, slice_exact, slice_within1} for one series type.

    Axial slices come from the TRUE sagittal canal points here (this stage's own error); infer.py
    uses the predicted ones.
    """
    model.eval()
    mm, slices = [], []
    for item in items:
        series = data.load_series(item["series_dir"], args.cache_dir)
        if tag == "axial":
            names = [(f"{side}_subarticular_stenosis", level) for level in data.LEVELS for side in ("left", "right")]
            targets = point_targets(series, item["points"], names).reshape(5, 2, 3)
            canal = canal_items.get(item["study_id"])
            level_slices = axial_slices_for_levels(series, canal) if canal is not None else [-1] * 5
            for level, level_targets in enumerate(targets):
                for side in range(2):
                    if not np.isfinite(level_targets[side]).all():
                        continue
                    d = int(level_targets[side, 0])
                    plane, _ = predict_axial(model, series, d, args.image_size, device)
                    chosen = level_slices[level] if level_slices[level] >= 0 else np.nan
                    e_mm, _ = point_errors(series, np.r_[d, plane[side]][None], level_targets[side][None])
                    mm.append(e_mm[0])
                    slices.append(abs(chosen - d) if np.isfinite(chosen) else np.inf)
        else:
            targets = point_targets(series, item["points"], data.POINTS_OF_SERIES[data_type(tag)])
            predicted, _ = predict_sagittal(model, series, args.image_size, device)
            e_mm, e_slice = point_errors(series, predicted, targets)
            mm += e_mm.tolist()
            slices += e_slice.tolist()
    model.train()
    return summarise_errors(np.asarray(mm), np.asarray(slices))


def true_canal_points(items, cache_dir):
    """{study_id: (5, 3) patient mm of the labelled canal points} from the Sagittal T2/STIR labels."""
    out = {}
    for item in items:
        if item["series_type"] != "Sagittal T2/STIR" or not item["points"]:
            continue
        series = data.load_series(item["series_dir"], cache_dir)
        targets = point_targets(series, item["points"], data.POINTS_OF_SERIES["Sagittal T2/STIR"])
        out.setdefault(item["study_id"], canal_points_mm(series, targets))
    return out


def data_type(tag):
    return {v: k for k, v in SERIES_TAGS.items()}[tag]


def split_items(items, args):
    """Train/validation series by study fold (never the same study on both sides)."""
    folds = data.assign_folds([item["study_id"] for item in items], args.n_folds, seed=0)
    if args.all_studies:
        return items, []
    train = [item for item in items if folds[item["study_id"]] != args.fold]
    return train, [item for item in items if folds[item["study_id"]] == args.fold]


def make_loader(tag, items, args, augment, shuffle):
    if tag == "axial":
        dataset = AxialDataset(items, args.image_size, args.cache_dir, augment)
        batch_size = args.batch_size * 8
    else:
        dataset = SagittalDataset(items, data.POINTS_OF_SERIES[data_type(tag)], args.image_size, args.cache_dir, augment,
                                  args.train_depth)
        batch_size = args.batch_size
    return distributed_loader(dataset, batch_size, shuffle, collate_padded, args)


def train_series_type(args, tag, train_items, val_items, canal_points, device):
    """Train the landmark model of one series type; returns the last validation metrics."""
    series_type = data_type(tag)
    train_items = [i for i in train_items if i["series_type"] == series_type and i["points"]]
    val_items = [i for i in val_items if i["series_type"] == series_type and i["points"]]
    if args.dry_run:
        train_items, val_items = train_items[:2], val_items[:2]
    if args.overfit_batches:
        val_items = []
    n_points = AXIAL_SIDES if tag == "axial" else len(data.POINTS_OF_SERIES[series_type])
    augment = not args.overfit_batches
    loader = make_loader(tag, train_items, args, augment=augment, shuffle=not args.overfit_batches)
    steps_per_epoch = min(len(loader), args.overfit_batches or len(loader))
    total_steps = args.epochs * steps_per_epoch
    model = LandmarkNet(n_points, pretrained_path=args.pretrained or None).to(device)
    train_model = wrap_for_training(model, args.world_size, device)
    main_process = args.rank == 0  # logs, checkpoints, validation and printing happen once
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ctx, scaler = autocast_context(device, args.amp)
    last_path, best_path = (os.path.join(args.out_dir, f"landmarks_{tag}_{k}.pt") for k in ("last", "best"))
    start_epoch, step, best = 0, 0, float("inf")
    if args.resume and os.path.exists(last_path):
        checkpoint = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step, best = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best"]
        print(f"{tag}: resumed after epoch {checkpoint['epoch']} (step {step})")
    log = CsvLog(os.path.join(args.out_dir, f"landmarks_{tag}.csv"), keep_epochs_below=start_epoch if args.resume else None) if main_process else None
    if main_process:
        print(f"{tag}: {len(train_items)} train / {len(val_items)} val series, {steps_per_epoch} steps/epoch, {n_points} points")
    metrics, losses = {}, []
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after_epochs and epoch >= args.stop_after_epochs:
            break
        started, losses, waited = time.time(), [], 0.0
        if loader.sampler is not None and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        fetch_start = time.time()
        for batch_index, (inputs, targets, depth_mask, indices) in enumerate(loader):
            if batch_index >= steps_per_epoch:
                break
            waited += time.time() - fetch_start
            lr = get_lr(step, total_steps, args.warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with ctx:
                logits = train_model(inputs.to(device, non_blocking=True))
            loss = heatmap_loss(logits, targets, depth_mask, args.image_size, args.sigma)
            if not torch.isfinite(loss):
                studies = sorted({loader.dataset.items[i]["study_id"] if tag != "axial" else loader.dataset.samples[i][0]["study_id"] for i in indices.tolist()})
                raise FloatingPointError(f"{tag}: non-finite loss at step {step} (epoch {epoch}), studies {studies}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            step += 1
            elapsed = time.time() - started
            if main_process and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
                rate = (batch_index + 1) / elapsed
                eta = (total_steps - step) / max(rate, 1e-9)
                print(f"\r{tag} epoch {epoch + 1}/{args.epochs} step {batch_index + 1}/{steps_per_epoch} loss {np.mean(losses):.4f} "
                      f"lr {lr:.2e} {rate:.2f} it/s eta {eta / 60:.1f} min", end="", flush=True)
            fetch_start = time.time()
        if not main_process:
            continue
        print()
        metrics = evaluate(model, tag, val_items, canal_points, args, device) if val_items else {}
        row = dict(epoch=epoch, step=step, lr=lr, train_loss=float(np.mean(losses)), **metrics,
                   data_wait=waited / max(time.time() - started, 1e-9), seconds=time.time() - started)
        log.write(row)
        print("  " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        score = metrics.get("median_mm", row["train_loss"])
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), tag=tag,
                          n_points=n_points, image_size=args.image_size, epoch=epoch, step=step, best=min(best, score))
        save_checkpoint(last_path, checkpoint)
        if score <= best:
            best = score
            save_checkpoint(best_path, checkpoint)
    if main_process:
        write_overlays(model, tag, val_items, args, device)
    return dict(metrics, train_loss=float(np.mean(losses)) if losses else float("nan"))


def write_overlays(model, tag, items, args, device):
    if tag == "axial" or not args.overlays:
        return
    model.eval()
    for item in items[: args.overlays]:
        series = data.load_series(item["series_dir"], args.cache_dir)
        names = data.POINTS_OF_SERIES[data_type(tag)]
        predicted, _ = predict_sagittal(model, series, args.image_size, device)
        path = os.path.join(args.out_dir, f"overlay_{tag}_{item['study_id']}.png")
        write_overlay(path, series, point_targets(series, item["points"], names), predicted, names)


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world_size, device = setup_distributed(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.rank == 0:
        save_args(args.out_dir, "train_landmarks", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    items = labelled_series(args.data_dir, "train")
    train_items, val_items = split_items(items, args)
    canal_points = true_canal_points(val_items, args.cache_dir) if "axial" in args.series_types else {}
    results = {}
    for tag in args.series_types:
        results[tag] = train_series_type(args, tag, train_items, val_items, canal_points, device)
    if args.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if args.rank != 0:
        return results
    if not val_items:
        print("no validation studies (--all-studies or --overfit-batches): infer.py measures the landmarks on held-out data")
        return results
    print("\nseries type   median_mm  p90_mm  slice_exact  slice_within1")
    for tag, metrics in results.items():
        print(f"{tag:12s}  " + "  ".join(f"{metrics.get(k, float('nan')):9.3f}" for k in ("median_mm", "p90_mm", "slice_exact", "slice_within1")))
    return results


if __name__ == "__main__":
    main()
