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
import os
import time
import warnings

import numpy as np
import torch

import data
import inputs
import losses
import tables
import training
from models import LandmarkNet, axial_slices_for_levels, points_mm, predict_axial, predict_sagittal
from viz import write_overlay

AXIAL_SIDES = ("left", "right")  # the axial network finds the left and the right recess of one slice


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
    assert set(args.series_types) <= set(data.SERIES_TAGS.values()), f"--series-types must be among {list(data.SERIES_TAGS.values())}"
    assert 0 <= args.fold < args.n_folds
    return args


# -----------------------------------------------------------------------------
# samples: which series (or axial slices) to learn from, with their labelled points


def point_targets(series, series_points, point_names, series_dir=""):
    """(K, 3) [slice, col, row] in volume pixels; NaN (masked) where the point is unlabelled, and, with a
    warning, where its instance is not in the series or it lies outside its frame."""
    targets = np.full((len(point_names), 3), np.nan, dtype=np.float32)
    for k, name in enumerate(point_names):
        if name in series_points:
            point = series_points[name]
            try:
                targets[k] = data.label_to_volume(series, point.instance_number, point.x, point.y)
            except (KeyError, ValueError) as error:
                warnings.warn(f"{series_dir}: label {name[0]} {name[1]} ignored: {error}")
    return targets


def axial_point_names(level):
    return [(f"{side}_subarticular_stenosis", level) for side in AXIAL_SIDES]


class SagittalDataset(torch.utils.data.Dataset):
    """A whole sagittal series: slices (D, 2, S, S) with the offset channel, targets (K, 3) in input pixels."""

    def __init__(self, items, point_names, image_size, cache_dir, augment, train_depth=0):
        self.items, self.point_names, self.size, self.cache_dir, self.augment = items, point_names, image_size, cache_dir, augment
        self.train_depth = train_depth

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        series = data.load_series(item.series_dir, self.cache_dir)
        targets = point_targets(series, item.points, self.point_names, item.series_dir)
        image = inputs.sagittal_slices(series, self.size)  # (D, S, S)
        targets[:, 1:] = data.to_resized(targets[:, 1:], series.volume.shape[1:], (self.size, self.size))
        if self.augment:
            image, targets[:, 1:] = inputs.random_affine(image, targets[:, 1:])
            image = inputs.random_intensity(image)
        x = inputs.sagittal_input(image, series)  # (D, 2, S, S)
        if self.augment and 0 < self.train_depth < len(x):  # a window of slices: half the cost per step
            start = np.random.randint(0, len(x) - self.train_depth + 1)
            x = x[start:start + self.train_depth]
            targets[:, 0] -= start
            targets[(targets[:, 0] < 0) | (targets[:, 0] > self.train_depth - 1)] = np.nan
        return x, torch.from_numpy(targets), index

    def study_of(self, index):
        return self.items[index].study_id


class AxialDataset(torch.utils.data.Dataset):
    """One labelled axial slice: (1, 2, S, S) input, targets (2, 3) [0, col, row] for left and right recess."""

    def __init__(self, items, image_size, cache_dir, augment, slice_jitter=1):
        self.size, self.cache_dir, self.augment, self.jitter = image_size, cache_dir, augment, slice_jitter
        self.samples = []  # (item, level, instance of the labelled slice)
        for item in items:
            for level in data.LEVELS:
                sides = [item.points.get(name) for name in axial_point_names(level)]
                instances = sorted({p.instance_number for p in sides if p is not None})
                self.samples += [(item, level, instance) for instance in instances]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        item, level, instance = self.samples[index]
        series = data.load_series(item.series_dir, self.cache_dir)
        targets = point_targets(series, item.points, axial_point_names(level), item.series_dir)
        matches = np.flatnonzero(series.instance_numbers == instance)
        d = int(matches[0]) if len(matches) else 0  # a lost instance: point_targets warned, its targets are NaN
        targets[np.abs(targets[:, 0] - d) > 0.5] = np.nan  # the other side may be labelled on another slice
        if self.augment and self.jitter:  # stage 1 may pick a neighbouring slice of the stack; learn to look there too
            d = inputs.jitter_slice(series, d, self.jitter)
        image = inputs.axial_image(series, d, self.size)  # (1, S, S)
        targets[:, 0] = np.where(np.isnan(targets[:, 0]), np.nan, 0.0)
        targets[:, 1:] = data.to_resized(targets[:, 1:], series.volume.shape[1:], (self.size, self.size))
        direction = inputs.column_direction(series, d)
        if self.augment:
            if np.random.rand() < 0.5:
                image, targets, direction = inputs.mirror_axial(image, targets, direction)
            image, targets[:, 1:] = inputs.random_affine(image, targets[:, 1:])
            image = inputs.random_intensity(image)
        return inputs.axial_input(image, direction), torch.from_numpy(targets), index

    def study_of(self, index):
        return self.samples[index][0].study_id


def collate_padded(batch):
    """Pad series to the deepest one: inputs (B, D, 2, S, S), targets (B, K, 3), depth mask (B, D)."""
    depth = max(x.shape[0] for x, _, _ in batch)
    padded = torch.zeros((len(batch), depth) + tuple(batch[0][0].shape[1:]))
    mask = torch.zeros(len(batch), depth, dtype=torch.bool)
    for i, (x, _, _) in enumerate(batch):
        padded[i, : len(x)], mask[i, : len(x)] = x, True
    return padded, torch.stack([t for _, t, _ in batch]), mask, torch.tensor([i for _, _, i in batch])


def make_loader(tag, items, args, runtime, augment, shuffle):
    if tag == "axial":
        dataset, batch_size = AxialDataset(items, args.image_size, args.cache_dir, augment), args.batch_size * 8
    else:
        dataset = SagittalDataset(items, data.POINTS_OF_SERIES[data.TAG_SERIES[tag]], args.image_size, args.cache_dir,
                                  augment, args.train_depth)
        batch_size = args.batch_size
    return training.distributed_loader(dataset, batch_size, shuffle, collate_padded, args, runtime)


def split_items(items, args):
    """Train/validation series by study fold (never the same study on both sides)."""
    folds = tables.assign_folds([item.study_id for item in items], args.n_folds, seed=0)
    if args.all_studies:
        return items, []
    train = [item for item in items if folds[item.study_id] != args.fold]
    return train, [item for item in items if folds[item.study_id] == args.fold]


# -----------------------------------------------------------------------------
# validation: this stage's own error


def axial_errors(model, series, targets, level_slices, image_size, device):
    """In-plane mm on the labelled slice and slice error of the level's chosen slice, per labelled recess point.

    targets (5, 2, 3) [slice, col, row] per level and side; level_slices (5,) chosen slice per level (-1: none).
    """
    mm, slices = [], []
    for level_targets, chosen in zip(targets, level_slices):
        for side in range(len(AXIAL_SIDES)):
            if not np.isfinite(level_targets[side]).all():
                continue
            d = int(level_targets[side, 0])
            plane, _ = predict_axial(model, series, d, image_size, device)
            error_mm, _ = losses.point_errors(series, np.r_[d, plane[side]][None], level_targets[side][None])
            mm.append(error_mm[0])
            slices.append(abs(chosen - d) if chosen >= 0 else np.inf)
    return mm, slices


def evaluate(model, tag, items, canal_points, args, device):
    """{median_mm, p90_mm, slice_exact, slice_within1} for one series type.

    Axial slices come from the TRUE sagittal canal points here (this stage's own error); infer.py
    uses the predicted ones.
    """
    model.eval()
    mm, slices = [], []
    for item in items:
        series = data.load_series(item.series_dir, args.cache_dir)
        if tag == "axial":
            names = [name for level in data.LEVELS for name in axial_point_names(level)]
            targets = point_targets(series, item.points, names).reshape(data.N_LEVELS, len(AXIAL_SIDES), 3)
            canal = canal_points.get(item.study_id)
            level_slices = axial_slices_for_levels(series, canal) if canal is not None else [-1] * data.N_LEVELS
            item_mm, item_slices = axial_errors(model, series, targets, level_slices, args.image_size, device)
        else:
            targets = point_targets(series, item.points, data.POINTS_OF_SERIES[data.TAG_SERIES[tag]])
            predicted, _ = predict_sagittal(model, series, args.image_size, device)
            item_mm, item_slices = losses.point_errors(series, predicted, targets)
        mm += list(item_mm)
        slices += list(item_slices)
    model.train()
    return losses.summarise_errors(mm, slices)


def true_canal_points(items, cache_dir):
    """{study_id: (5, 3) patient mm of the labelled canal points} from the Sagittal T2/STIR labels."""
    out = {}
    for item in items:
        if item.series_type != "Sagittal T2/STIR" or not item.points:
            continue
        series = data.load_series(item.series_dir, cache_dir)
        targets = point_targets(series, item.points, data.POINTS_OF_SERIES["Sagittal T2/STIR"])
        out.setdefault(item.study_id, points_mm(series, targets))
    return out


# -----------------------------------------------------------------------------
# training


def train_epoch(model, loader, optimizer, scaler, ctx, tag, epoch, step, total_steps, steps_per_epoch, args, runtime):
    """One pass over the loader -> (step after it, {lr, train_loss, ...: this epoch's log columns})."""
    started, batch_losses, waited = time.time(), [], 0.0
    lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)  # defined even when the loader is empty
    fetch_start = time.time()
    for batch_index, (x, targets, depth_mask, indices) in enumerate(loader):
        if batch_index >= steps_per_epoch:
            break
        waited += time.time() - fetch_start
        lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)
        training.set_lr(optimizer, lr)
        with ctx:
            logits = model(x.to(runtime.device, non_blocking=True))  # (B, K, D, S/2, S/2)
        loss = losses.heatmap_loss(logits, targets, depth_mask, args.image_size, args.sigma)
        if not torch.isfinite(loss):
            studies = sorted({loader.dataset.study_of(i) for i in indices.tolist()})
            raise FloatingPointError(f"{tag}: non-finite loss at step {step} (epoch {epoch}), studies {studies}")
        training.optimizer_step(loss, optimizer, scaler)
        batch_losses.append(loss.item())
        step += 1
        if runtime.rank == 0 and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
            training.print_progress(tag, epoch, args.epochs, batch_index, steps_per_epoch, batch_losses, lr, started,
                                    total_steps - step)
        fetch_start = time.time()
    seconds = time.time() - started
    return step, dict(lr=lr, train_loss=float(np.mean(batch_losses)) if batch_losses else float("nan"),
                      data_wait=waited / max(seconds, 1e-9), seconds=seconds)


def train_series_type(args, tag, train_items, val_items, canal_points, runtime):
    """Train the landmark model of one series type; returns the last validation metrics and training loss."""
    series_type = data.TAG_SERIES[tag]
    train_items = [i for i in train_items if i.series_type == series_type and i.points]
    val_items = [i for i in val_items if i.series_type == series_type and i.points]
    if args.dry_run:
        train_items, val_items = train_items[:2], val_items[:2]
    if args.overfit_batches:
        val_items = []
    if not train_items:  # nothing to learn from: say so rather than save an untrained model that inference would use
        warnings.warn(f"{tag}: no labelled {series_type} series to train on in {args.data_dir}; no {tag} model written")
        return {}
    n_points = len(AXIAL_SIDES) if tag == "axial" else len(data.POINTS_OF_SERIES[series_type])
    loader = make_loader(tag, train_items, args, runtime, augment=not args.overfit_batches, shuffle=not args.overfit_batches)
    steps_per_epoch = min(len(loader), args.overfit_batches or len(loader))
    total_steps = args.epochs * steps_per_epoch
    model = LandmarkNet(n_points, pretrained_path=args.pretrained or None).to(runtime.device)
    train_model = training.wrap_for_training(model, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ctx, scaler = training.autocast_context(runtime.device, args.amp)
    last_path, best_path = (os.path.join(args.out_dir, f"landmarks_{tag}_{k}.pt") for k in ("last", "best"))
    start_epoch, step, best = training.resume(last_path, model, optimizer, runtime.device, tag) if args.resume else (0, 0, float("inf"))
    main_process = runtime.rank == 0  # logs, checkpoints, validation and printing happen once
    log = training.CsvLog(os.path.join(args.out_dir, f"landmarks_{tag}.csv"), keep_epochs_below=start_epoch if args.resume else None) if main_process else None
    if main_process:
        print(f"{tag}: {len(train_items)} train / {len(val_items)} val series, {steps_per_epoch} steps/epoch, {n_points} points")
    settings = dict(tag=tag, n_points=n_points, image_size=args.image_size)  # what inference needs to rebuild the input
    metrics, train_loss = {}, float("nan")
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after_epochs and epoch >= args.stop_after_epochs:
            break
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        step, stats = train_epoch(train_model, loader, optimizer, scaler, ctx, tag, epoch, step, total_steps, steps_per_epoch,
                                  args, runtime)
        train_loss = stats["train_loss"]
        if not main_process:
            continue
        print()
        metrics = evaluate(model, tag, val_items, canal_points, args, runtime.device) if val_items else {}
        row = dict(epoch=epoch, step=step, lr=stats.pop("lr"), train_loss=stats.pop("train_loss"), **metrics, **stats)
        log.write(row)
        training.print_row(row)
        score = metrics.get("median_mm", train_loss)
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), settings=settings,
                          epoch=epoch, step=step, best=min(best, score))
        training.save_checkpoint(last_path, checkpoint)
        if score <= best:
            best = score
            training.save_checkpoint(best_path, checkpoint)
    if main_process:
        write_overlays(model, tag, val_items, args, runtime.device)
    return dict(metrics, train_loss=train_loss)


def write_overlays(model, tag, items, args, device):
    if tag == "axial" or not args.overlays:
        return
    model.eval()
    for item in items[: args.overlays]:
        series = data.load_series(item.series_dir, args.cache_dir)
        names = data.POINTS_OF_SERIES[data.TAG_SERIES[tag]]
        predicted, _ = predict_sagittal(model, series, args.image_size, device)
        path = os.path.join(args.out_dir, f"overlay_{tag}_{item.study_id}.png")
        write_overlay(path, series, point_targets(series, item.points, names), predicted, names)


def print_summary(results):
    print("\nseries type   median_mm  p90_mm  slice_exact  slice_within1")
    for tag, metrics in results.items():
        print(f"{tag:12s}  " + "  ".join(f"{metrics.get(k, float('nan')):9.3f}" for k in ("median_mm", "p90_mm", "slice_exact", "slice_within1")))


def main(argv=None):
    args = parse_args(argv)
    runtime = training.setup_distributed(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    if runtime.rank == 0:
        training.save_args(args.out_dir, "train_landmarks", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    items = tables.labelled_series(args.data_dir, "train")
    train_items, val_items = split_items(items, args)
    canal_points = true_canal_points(val_items, args.cache_dir) if "axial" in args.series_types else {}
    results = {tag: train_series_type(args, tag, train_items, val_items, canal_points, runtime) for tag in args.series_types}
    training.end_distributed(runtime)
    if runtime.rank != 0:
        return results
    if not val_items:
        print("no validation studies (--all-studies or --overfit-batches): infer.py measures the landmarks on held-out data")
        return results
    print_summary(results)
    return results


if __name__ == "__main__":
    main()
