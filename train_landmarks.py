"""Stage 1: find every condition-level on its series (slice and x, y), for all three series types.

    python train_landmarks.py --data-dir demo --out-dir runs/demo --epochs 8

Sagittal T2/STIR (5 canal points) and Sagittal T1 (10 foraminal points): every slice of the series
goes through a 2D network with its offset across the stack as a second channel; one heatmap per
point and a softmax over (slice, row, col) give the slice and the in-plane position (3D
soft-argmax). Axial T2 (10 subarticular points): a 2D network finds the left and right recess on
the level's labelled slice (jittered by a slice in training). At inference the level's slice is
the axial slice nearest to the median of its canal point and its two foramina, in patient space
(predict.choose_axial_slice); validation here measures the in-plane error on the labelled slice,
and the slice error of the slice chosen from the true canal point alone.
Writes RUN/landmarks_<type>.csv (one row per epoch), RUN/landmarks_<type>_{last,best}.pt and
RUN/args.json.
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
from models import LandmarkNet
from predict import choose_axial_slice, points_mm, predict_axial, predict_sagittal
from viz import write_overlay

# the axial network finds the left and the right recess of one slice
AXIAL_SIDES = "left", "right"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True,
                        help="competition layout: train.csv, train_images/, ...")
    parser.add_argument("--out-dir", required=True,
                        help="run folder for logs, checkpoints, overlays")
    parser.add_argument("--cache-dir", default="cache",
                        help="decoded series are kept here between epochs and runs")
    parser.add_argument("--series-types", default="sag_t2,sag_t1,axial",
                        help="which models to train, comma separated")
    parser.add_argument("--n-folds", type=int, default=5, help="folds of the by-study split")
    parser.add_argument("--fold", type=int, default=0, help="validation fold")
    parser.add_argument("--all-studies", action="store_true",
                        help="train on every study, no validation")
    parser.add_argument("--coordinates", default="",
                        help="train on another label coordinate file: a path, or a name in "
                             "--data-dir (e.g. a corrected copy, or tools/audit.py's "
                             "train_label_coordinates.repaired.csv; default: the set's own)")
    parser.add_argument("--exclude-labels", default="",
                        help="the label_audit.csv of tools/audit.py: the labelled points it flags "
                             "are left out (masked), in training and validation alike")
    parser.add_argument("--image-size", type=int, default=96,
                        help="slices are resized to this square size (px)")
    parser.add_argument("--train-depth", type=int, default=10,
                        help="sagittal training sees a random window of this many consecutive "
                             "slices (0: all); points outside it are masked. Inference always sees"
                             " all slices")
    # model
    parser.add_argument("--pretrained", default="",
                        help="optional torchvision ResNet-18 state dict file")
    # optimization
    parser.add_argument("--epochs", type=int, default=24, help="epochs per series type")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="series per step (sagittal); slices x8 (axial)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=30,
                        help="linear warmup steps, then cosine to 0")
    parser.add_argument("--sigma", type=float, default=1.0,
                        help="target Gaussian width in heatmap cells (slices: x0.6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (default: on CUDA, bfloat16 or float16; off on a CPU). "
                             "--amp on a CPU: bfloat16 where it is native (AVX512-BF16, AMX), "
                             "1.5-1.9 x faster; --no-amp: off everywhere")
    # debugging
    parser.add_argument("--overfit-batches", type=int, default=0,
                        help="train on this many batches only, no augmentation")
    parser.add_argument("--dry-run", action="store_true",
                        help="one short epoch on 2 studies, to check the plumbing")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN/landmarks_<type>_last.pt")
    parser.add_argument("--overlays", type=int, default=4,
                        help="PNG overlays of this many validation series per type")
    args = parser.parse_args(argv)
    args.series_types = [t.strip() for t in args.series_types.split(",") if t.strip()]
    assert set(args.series_types) <= set(
        data.SERIES_TAGS.values()
    ), f"--series-types must be among {list(data.SERIES_TAGS.values())}"
    assert 0 <= args.fold < args.n_folds
    return args


# -----------------------------------------------------------------------------
# samples: which series (or axial slices) to learn from, with their labelled points


def series_targets(item, series, names):
    """(K, 3) [slice, col, row] volume pixels of a labelled series' points named; NaN (masked) where
    a point is unlabelled, or, with a warning, lost (data.labelled_landmarks)."""
    study = {item.series_id: data.StudySeries(item.series_type, item.series_id, series)}
    return data.landmark_array(data.labelled_landmarks(study, item.points, item.series_dir), names)


def axial_point_names(level):
    return [(f"{side}_subarticular_stenosis", level) for side in AXIAL_SIDES]


class SagittalDataset(torch.utils.data.Dataset):
    """A whole sagittal series: slices (D, 2, S, S) with the offset channel, targets (K, 3) in input
    pixels, and the sample's index."""

    def __init__(self, items, point_names, args, augment):
        self.items = items
        self.point_names = point_names
        self.size = args.image_size
        self.cache_dir = args.cache_dir
        self.train_depth = args.train_depth
        self.augment = augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        series = data.load_series(item.series_dir, self.cache_dir)
        targets_px = series_targets(item, series, self.point_names)  # [slice, col, row] volume px
        image = inputs.sagittal_slices(series, self.size)  # (D, S, S)
        volume_hw = series.volume.shape[1:]
        targets_in = targets_px.copy()  # the same points in input pixels (the slice unchanged)
        targets_in[:, 1:] = data.to_resized(targets_px[:, 1:], volume_hw, (self.size, self.size))
        if self.augment:
            image, targets_in[:, 1:] = inputs.random_affine(image, targets_in[:, 1:])
            image = inputs.random_intensity(image)
        x = inputs.sagittal_input(image, series)  # (D, 2, S, S)
        if self.augment and 0 < self.train_depth < len(x):  # a window of slices: half the cost
            start = np.random.randint(0, len(x) - self.train_depth + 1)
            x = x[start:start + self.train_depth]
            targets_in[:, 0] -= start  # slices counted from the window's first
            outside = (targets_in[:, 0] < 0) | (targets_in[:, 0] > self.train_depth - 1)
            targets_in[outside] = np.nan
        return x, torch.from_numpy(targets_in), index

    def study_of(self, index):
        return self.items[index].study_id


class AxialDataset(torch.utils.data.Dataset):
    """One labelled axial slice: (1, 2, S, S) input, targets (2, 3) [0, col, row] in input pixels
    for the left and right recess, and the sample's index."""

    def __init__(self, items, args, augment, slice_jitter=1):
        self.size = args.image_size
        self.cache_dir = args.cache_dir
        self.augment = augment
        self.jitter = slice_jitter
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
        targets = series_targets(item, series, axial_point_names(level))
        matches = np.flatnonzero(series.instance_numbers == instance)
        d = int(matches[0]) if len(matches) else 0  # a lost instance: warned, its targets are NaN
        targets[np.abs(targets[:, 0] - d) > 0.5] = np.nan  # the other side may be on another slice
        if self.augment and self.jitter:  # stage 1 may pick a neighbouring slice: look there too
            d = inputs.jitter_slice(series, d, self.jitter)
        image = inputs.axial_image(series, d, self.size)  # (1, S, S)
        targets[:, 0] = np.where(np.isnan(targets[:, 0]), np.nan, 0.0)
        volume_hw = series.volume.shape[1:]
        targets[:, 1:] = data.to_resized(targets[:, 1:], volume_hw, (self.size, self.size))
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
    """Pad series to the deepest one: inputs (B, D, 2, S, S), targets (B, K, 3), depth mask (B, D),
    sample indices (B,)."""
    depth = max(x.shape[0] for x, _, _ in batch)
    padded = torch.zeros((len(batch), depth) + tuple(batch[0][0].shape[1:]))
    mask = torch.zeros(len(batch), depth, dtype=torch.bool)
    for i, (x, _, _) in enumerate(batch):
        padded[i, :len(x)] = x
        mask[i, :len(x)] = True
    targets = torch.stack([t for _, t, _ in batch])
    indices = torch.tensor([i for _, _, i in batch])
    return padded, targets, mask, indices


def make_loader(tag, items, args, runtime):
    """The training DataLoader of one series type (augmented and shuffled unless
    --overfit-batches)."""
    augment = not args.overfit_batches
    if tag == "axial":
        dataset = AxialDataset(items, args, augment)
        batch_size = args.batch_size * 8
    else:
        names = data.POINTS_OF_SERIES[data.TAG_SERIES[tag]]
        dataset = SagittalDataset(items, names, args, augment)
        batch_size = args.batch_size
    return training.distributed_loader(dataset, batch_size, augment, collate_padded, args, runtime)


def split_items(items, args):
    """Train/validation series by study fold (never the same study on both sides)."""
    folds = tables.assign_folds([item.study_id for item in items], args.n_folds, seed=0)
    if args.all_studies:
        return items, []
    train = [item for item in items if folds[item.study_id] != args.fold]
    return train, [item for item in items if folds[item.study_id] == args.fold]


def items_of_type(tag, items, args):
    """The labelled series of one type among items."""
    series_type = data.TAG_SERIES[tag]
    return [item for item in items if item.series_type == series_type and item.points]


# -----------------------------------------------------------------------------
# validation: this stage's own error


def axial_errors(model, loaded, targets, canal_mm, image_size, device):
    """In-plane mm on the labelled slice, and slice error of the level's chosen slice, per labelled
    recess point of one axial series.

    targets (5, 2, 3) [slice, col, row] per level and side; canal_mm (5, 3) the true canal points
    the slice is chosen from (choose_axial_slice), or None.
    """
    mm, slices = [], []
    planes = {}  # slice -> both recesses predicted on it: the two sides usually share a slice
    for level, level_targets in enumerate(targets):
        choice = None
        if canal_mm is not None:
            choice = choose_axial_slice([loaded], canal_mm[level])
        for side in range(len(AXIAL_SIDES)):
            if not np.isfinite(level_targets[side]).all():
                continue
            d = int(level_targets[side, 0])
            if d not in planes:
                planes[d], _ = predict_axial(model, loaded.series, d, image_size, device)
            predicted = np.r_[d, planes[d][side]][None]
            error_mm, _ = losses.point_errors(loaded.series, predicted, level_targets[side][None])
            mm.append(error_mm[0])
            slices.append(abs(choice[1] - d) if choice is not None else np.inf)
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
            targets = series_targets(item, series, names).reshape(
                data.N_LEVELS, len(AXIAL_SIDES), 3
            )
            loaded = data.StudySeries(item.series_type, item.series_id, series)
            canal_mm = canal_points.get(item.study_id)
            item_mm, item_slices = axial_errors(model, loaded, targets, canal_mm, args.image_size,
                                                device)
        else:
            targets = series_targets(item, series, data.POINTS_OF_SERIES[data.TAG_SERIES[tag]])
            predicted, _ = predict_sagittal(model, series, args.image_size, device)
            item_mm, item_slices = losses.point_errors(series, predicted, targets)
        mm += list(item_mm)
        slices += list(item_slices)
    model.train()
    return losses.summarise_errors(mm, slices)


def true_canal_points(items, cache_dir):
    """{study_id: (5, 3) patient mm of the labelled canal points} from the Sagittal T2/STIR
    labels."""
    out = {}
    for item in items:
        if item.series_type != "Sagittal T2/STIR" or not item.points:
            continue
        series = data.load_series(item.series_dir, cache_dir)
        targets = series_targets(item, series, data.POINTS_OF_SERIES["Sagittal T2/STIR"])
        out.setdefault(item.study_id, points_mm(series, targets))
    return out


# -----------------------------------------------------------------------------
# training


def train(tag, items, val_items, canal_points, args, runtime):
    """Train the landmark network of one series type on items (its labelled series), validating on
    val_items after each epoch. Returns the last validation metrics and training loss."""
    device = runtime.device
    main_process = runtime.rank == 0  # logs, checkpoints, validation and printing happen once
    series_type = data.TAG_SERIES[tag]
    loader = make_loader(tag, items, args, runtime)
    steps_per_epoch = min(len(loader), args.overfit_batches or len(loader))
    total_steps = args.epochs * steps_per_epoch
    n_points = len(AXIAL_SIDES) if tag == "axial" else len(data.POINTS_OF_SERIES[series_type])
    model = LandmarkNet(n_points, pretrained_path=args.pretrained or None).to(device)
    train_model = training.wrap_for_training(model, runtime)  # DistributedDataParallel (torchrun)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    autocast, scaler = training.autocast_context(device, args.amp)
    last_path = os.path.join(args.out_dir, f"landmarks_{tag}_last.pt")
    start_epoch, step, best = 0, 0, float("inf")
    if args.resume:
        start_epoch, step, best = training.resume(last_path, model, optimizer, device, tag)
    if main_process:
        log = training.CsvLog(os.path.join(args.out_dir, f"landmarks_{tag}.csv"),
                              keep_epochs_below=start_epoch if args.resume else None)
        print(f"{tag}: {len(items)} train / {len(val_items)} val series, "
              f"{steps_per_epoch} steps/epoch, {n_points} points")
    metrics, train_loss = {}, float("nan")
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loader.sampler, "set_epoch"):  # torchrun: a new shuffle of each process's share
            loader.sampler.set_epoch(epoch)
        started, waited, batch_losses = time.time(), 0.0, []
        lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)  # even with no step
        fetch_start = time.time()
        for batch_index, (x, targets, depth_mask, indices) in enumerate(loader):
            if batch_index >= steps_per_epoch:
                break
            waited += time.time() - fetch_start  # the GPU was idle, waiting for the loader
            # the learning rate of this step: linear warmup, then cosine to 0
            lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:  # bfloat16/float16 on CUDA; on the CPU with --amp
                logits = train_model(x.to(device, non_blocking=True))  # (B, K, D, S/2, S/2)
            loss = losses.heatmap_loss(logits, targets, depth_mask, args.image_size, args.sigma)
            if not torch.isfinite(loss):  # stop at once, naming the studies of the batch
                studies = sorted({loader.dataset.study_of(i) for i in indices.tolist()})
                raise FloatingPointError(f"{tag}: non-finite loss at step {step} (epoch {epoch}), "
                                         f"studies {studies}")
            scaler.scale(loss).backward()  # the scaler only acts for float16 autocast
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            batch_losses.append(loss.item())
            step += 1
            if main_process and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
                where = (f"{tag} epoch {epoch + 1}/{args.epochs} "
                         f"step {batch_index + 1}/{steps_per_epoch}")
                training.print_progress(where, batch_losses, lr, started, batch_index + 1,
                                        total_steps - step)
            fetch_start = time.time()
        seconds = time.time() - started
        train_loss = float(np.mean(batch_losses)) if batch_losses else float("nan")
        if not main_process:
            continue
        print()
        # end of epoch: validate, log a row, save the last checkpoint (and the best one)
        metrics = evaluate(model, tag, val_items, canal_points, args, device) if val_items else {}
        log_row = dict(epoch=epoch, step=step, lr=lr, train_loss=train_loss, **metrics,
                   data_wait=waited / max(seconds, 1e-9), seconds=seconds)
        log.write(log_row)
        training.print_row(log_row)
        monitored = metrics.get("median_mm", train_loss)  # lower is better
        best = min(best, monitored)
        settings = dict(tag=tag, n_points=n_points, image_size=args.image_size)  # for inference
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                          args=vars(args), settings=settings, epoch=epoch, step=step, best=best)
        training.save_checkpoint(last_path, checkpoint)
        if monitored <= best:
            best_path = os.path.join(args.out_dir, f"landmarks_{tag}_best.pt")
            training.save_checkpoint(best_path, checkpoint)
    if main_process:
        write_overlays(model, tag, val_items, args, device)
    return dict(metrics, train_loss=train_loss)


def write_overlays(model, tag, items, args, device):
    """PNGs of the first --overlays validation series: true points beside predicted ones."""
    if tag == "axial" or not args.overlays:
        return
    model.eval()
    names = data.POINTS_OF_SERIES[data.TAG_SERIES[tag]]
    for item in items[:args.overlays]:
        series = data.load_series(item.series_dir, args.cache_dir)
        predicted, _ = predict_sagittal(model, series, args.image_size, device)
        path = os.path.join(args.out_dir, f"overlay_{tag}_{item.study_id}.png")
        write_overlay(path, series, series_targets(item, series, names), predicted, names)


def print_summary(results):
    print("\nseries type   median_mm  p90_mm  slice_exact  slice_within1")
    for tag, metrics in results.items():
        columns = "median_mm", "p90_mm", "slice_exact", "slice_within1"
        print(f"{tag:12s}  " + "  ".join(f"{metrics.get(k, float('nan')):9.3f}" for k in columns))


def main(argv=None):
    args = parse_args(argv)
    runtime = training.setup_distributed(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    if runtime.rank == 0:
        training.save_args(args.out_dir, "train_landmarks", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    # the audit's suspects, with --exclude-labels: no target rather than a wrong one
    items = tables.training_series(args.data_dir, args.exclude_labels, args.coordinates)
    train_items, val_items = split_items(items, args)
    canal_points = {}
    if "axial" in args.series_types:
        canal_points = true_canal_points(val_items, args.cache_dir)
    results = {}
    for tag in args.series_types:
        items = items_of_type(tag, train_items, args)
        tag_val_items = items_of_type(tag, val_items, args)
        if args.dry_run:
            items, tag_val_items = items[:2], tag_val_items[:2]
        if args.overfit_batches:
            tag_val_items = []
        if not items:  # say so, rather than save an untrained model that inference would use
            warnings.warn(f"{tag}: no labelled {data.TAG_SERIES[tag]} series to train on in "
                          f"{args.data_dir}; no {tag} model written")
            results[tag] = {}
            continue
        started = time.time()
        results[tag] = train(tag, items, tag_val_items, canal_points, args, runtime)
        if runtime.rank == 0:
            print(f"{tag} trained: {args.epochs} epochs in {time.time() - started:.0f} s")
    training.end_distributed(runtime)
    if runtime.rank != 0:
        return results
    if not val_items:
        print("no validation studies (--all-studies or --overfit-batches): "
              "infer.py measures the landmarks on held-out data")
        return results
    print_summary(results)
    return results


if __name__ == "__main__":
    main()
