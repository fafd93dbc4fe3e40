"""Stage 2: grade each condition-level from 2.5D crops around its landmark.

    python train_severity.py --data-dir demo --out-dir runs/demo --epochs 6

Training crops sit on the labelled landmarks, jittered in position and slice so that stage-1 errors
are no surprise. Validation runs twice: on the true landmarks, and through the whole pipeline with the
landmarks stage 1 predicts (the honest number; needs the landmark checkpoints in --landmark-dir).
Writes RUN/severity.csv (one row per epoch), RUN/severity_{last,best}.pt, RUN/confusion_*.png.
"""
import argparse
import os
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

import data
import infer
import losses
import train_landmarks as tl
import training
from models import SeverityNet
from viz import save_confusion_png


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True, help="competition layout: train.csv, train_images/, ...")
    parser.add_argument("--out-dir", required=True, help="run folder for logs and checkpoints")
    parser.add_argument("--landmark-dir", default="", help="folder of the landmark checkpoints (default: --out-dir)")
    parser.add_argument("--cache-dir", default="cache", help="decoded series cache")
    parser.add_argument("--n-folds", type=int, default=5, help="folds of the by-study split")
    parser.add_argument("--fold", type=int, default=0, help="validation fold")
    parser.add_argument("--all-studies", action="store_true", help="train on every study, no validation")
    parser.add_argument("--n-slices", type=int, default=5, help="slices per 2.5D crop (odd)")
    parser.add_argument("--crop-px", type=int, default=48, help="crop side in pixels after resampling")
    parser.add_argument("--jitter-mm", type=float, default=7.0, help="max crop-centre jitter in training, mm per axis")
    parser.add_argument("--slice-jitter", type=int, default=1, help="max slice jitter in training")
    # model
    parser.add_argument("--pretrained", default="", help="optional torchvision ResNet-18 state dict file")
    # optimization
    parser.add_argument("--epochs", type=int, default=8, help="epochs")
    parser.add_argument("--batch-size", type=int, default=4, help="studies per step (25 crops each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps, then cosine to 0")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (calibration)")
    parser.add_argument("--any-severe-weight", type=float, default=0.0, help="weight of the any_severe_spinal loss term")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA")
    # debugging
    parser.add_argument("--overfit-batches", type=int, default=0, help="train on this many batches only, no jitter, "
                        "no label smoothing: the loss must go to about 0")
    parser.add_argument("--dry-run", action="store_true", help="one short epoch on a few studies")
    parser.add_argument("--stop-after-epochs", type=int, default=0, help="end the run after this many epochs, as a "
                        "kill would (the schedule still spans --epochs); for testing --resume")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/severity_last.pt")
    args = parser.parse_args(argv)
    assert args.n_slices % 2 == 1, "--n-slices must be odd (a centre slice and its neighbours)"
    return args


# -----------------------------------------------------------------------------
# studies with their labels and true landmarks


def labelled_studies(data_dir):
    """[{study_id, labels (25,), series: {type: series_dir}, points: {(condition, level): (type, instance, x, y)}}]."""
    study_ids, labels = data.read_labels(os.path.join(data_dir, "train.csv"))
    items = {item["series_id"]: item for item in tl.labelled_series(data_dir, "train")}
    by_study = {}
    for item in items.values():
        entry = by_study.setdefault(item["study_id"], dict(series={}, points={}))
        if item["points"] or item["series_type"] not in entry["series"]:
            entry["series"][item["series_type"]] = item["series_dir"]  # prefer the series that carries labels
        for name, (instance, x, y) in item["points"].items():
            entry["points"][name] = (item["series_type"], instance, x, y)
    return [dict(study_id=int(s), labels=lab, **by_study.get(int(s), dict(series={}, points={}))) for s, lab in zip(study_ids, labels)]


def load_labelled_study(entry, cache_dir):
    """{series type: (series_id, Series, normalised volume)} of the labelled series, true landmarks in volume pixels."""
    study = {}
    for series_type, series_dir in entry["series"].items():
        series = data.load_series(series_dir, cache_dir)
        study[series_type] = (int(os.path.basename(series_dir)), series, data.normalise_volume(series.volume))
    landmarks = {}
    for name, (series_type, instance, x, y) in entry["points"].items():
        try:
            landmarks[name] = (series_type, *data.label_to_volume(study[series_type][1], instance, x, y))
        except (KeyError, ValueError) as error:  # that row trains nothing: no crop, label masked
            warnings.warn(f"{entry['series'][series_type]}: label {name[0]} {name[1]} ignored: {error}")
    return study, landmarks


def jitter(study, landmarks, max_mm, max_slices):
    """Move every landmark by up to max_mm in-plane and max_slices through-plane (stage-1 errors)."""
    moved = {}
    for name, (series_type, slice_index, col, row) in landmarks.items():
        series = study[series_type][1]
        spacing = series.pixel_spacing[int(slice_index)]
        d = int(np.clip(slice_index + np.random.randint(-max_slices, max_slices + 1), 0, len(series.volume) - 1))
        dx, dy = np.random.uniform(-max_mm, max_mm, size=2)
        moved[name] = (series_type, d, col + dx / spacing[1], row + dy / spacing[0])
    return moved


class StudyCrops(torch.utils.data.Dataset):
    """All 25 crops of a study: crops (25, S, C, C), groups (25,), labels (25,) with MISSING where unusable."""

    def __init__(self, entries, args, augment):
        self.entries, self.args, self.augment = entries, args, augment

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        study, landmarks = load_labelled_study(entry, self.args.cache_dir)
        if self.augment:
            landmarks = jitter(study, landmarks, self.args.jitter_mm, self.args.slice_jitter)
        crops, groups, available = infer.study_crops(study, landmarks, self.args.n_slices, self.args.crop_px)
        if self.augment:
            crops = tl.random_intensity(crops.flatten(0, 1)).view_as(crops)
        labels = torch.as_tensor(entry["labels"]).masked_fill(~available, data.MISSING)
        return crops, groups, labels, index


def collate_studies(batch):
    return (torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch]), torch.cat([b[2] for b in batch]),
            torch.tensor([b[3] for b in batch]))


# -----------------------------------------------------------------------------
# validation


@torch.no_grad()
def predict_entries(model, entries, args, device, landmark_models=None):
    """(N, 25, 3) probabilities: on true landmarks, or on stage-1 predictions when landmark_models is given."""
    model.eval()
    out = np.zeros((len(entries), len(data.LABEL_COLUMNS), 3))
    for i, entry in enumerate(entries):
        study, landmarks = load_labelled_study(entry, args.cache_dir)
        if landmark_models is not None:
            landmarks = infer.predict_landmarks(landmark_models, study, device)
        crops, groups, available = infer.study_crops(study, landmarks, args.n_slices, args.crop_px)
        out[i] = args.prior
        if available.any():
            out[i, available.numpy()] = infer.grade([model], crops[available], groups[available], device)
    model.train()
    return out


def evaluate(model, entries, args, device, landmark_models=None):
    """{score, val_loss_spinal, val_loss_foraminal, val_loss_subarticular, val_loss_any_severe_spinal}."""
    probabilities = predict_entries(model, entries, args, device, landmark_models)
    study_ids = [e["study_id"] for e in entries]
    solution = losses.labels_to_solution(study_ids, np.stack([e["labels"] for e in entries]))
    submission = losses.probabilities_to_submission(study_ids, infer.finalise(probabilities))
    terms = losses.condition_group_losses(solution, submission)
    return dict(score=float(np.mean(list(terms.values()))), **{f"val_loss_{k}": v for k, v in terms.items()}), probabilities


def confusion_matrices(entries, probabilities):
    """{group: (3, 3) counts [true, predicted]} over labelled rows."""
    labels = np.stack([e["labels"] for e in entries])
    predicted = probabilities.argmax(-1)
    out = {}
    for name, conditions in losses.METRIC_GROUPS.items():
        columns = [j for j, c in enumerate(data.LABEL_COLUMNS) if any(c.startswith(x) for x in conditions)]
        truth, guess = labels[:, columns].ravel(), predicted[:, columns].ravel()
        keep = truth != data.MISSING
        out[name] = np.bincount(truth[keep] * 3 + guess[keep], minlength=9).reshape(3, 3)
    return out


# -----------------------------------------------------------------------------
# training


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world_size, device = training.setup_distributed(args.device)
    main_process = args.rank == 0  # logs, checkpoints, validation and printing happen once
    os.makedirs(args.out_dir, exist_ok=True)
    if main_process:
        training.save_args(args.out_dir, "train_severity", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    entries = labelled_studies(args.data_dir)
    folds = data.assign_folds([e["study_id"] for e in entries], args.n_folds, seed=0)
    train_entries = [e for e in entries if args.all_studies or folds[e["study_id"]] != args.fold]
    val_entries = [] if args.all_studies or args.overfit_batches else [e for e in entries if folds[e["study_id"]] == args.fold]
    if args.dry_run:
        train_entries, val_entries = train_entries[:4], val_entries[:2]
    args.prior = losses.weighted_prior(np.stack([e["labels"] for e in train_entries]), smoothing=1.0)  # (25, 3) fallback rows
    landmark_models = infer.load_landmark_models(args.landmark_dir or args.out_dir, device) if val_entries else {}

    dataset = StudyCrops(train_entries, args, augment=not args.overfit_batches)
    loader = training.distributed_loader(dataset, args.batch_size, not args.overfit_batches, collate_studies, args)
    steps_per_epoch = min(len(loader), args.overfit_batches or len(loader))
    total_steps = args.epochs * steps_per_epoch
    model = SeverityNet(args.n_slices, pretrained_path=args.pretrained or None).to(device)
    train_model = training.wrap_for_training(model, args.world_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ctx, scaler = training.autocast_context(device, args.amp)
    last_path, best_path = (os.path.join(args.out_dir, f"severity_{k}.pt") for k in ("last", "best"))
    start_epoch, step, best = 0, 0, float("inf")
    if args.resume and os.path.exists(last_path):
        checkpoint = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step, best = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best"]
        print(f"severity: resumed after epoch {checkpoint['epoch']} (step {step})")
    log = training.CsvLog(os.path.join(args.out_dir, "severity.csv"), keep_epochs_below=start_epoch if args.resume else None) if main_process else None
    if main_process:
        print(f"severity: {len(train_entries)} train / {len(val_entries)} val studies, {steps_per_epoch} steps/epoch")
    settings = dict(n_slices=args.n_slices, crop_px=args.crop_px)
    row = {}
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after_epochs and epoch >= args.stop_after_epochs:
            break
        started, batch_losses, waited, fetch_start = time.time(), [], 0.0, time.time()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch_index, (crops, groups, labels, indices) in enumerate(loader):
            if batch_index >= steps_per_epoch:
                break
            waited += time.time() - fetch_start
            lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            crops, groups, labels = (t.to(device, non_blocking=True) for t in (crops, groups, labels))
            with ctx:
                logits = train_model(crops, groups)  # (B*25, 3)
            loss = losses.weighted_cross_entropy(logits, labels, 0.0 if args.overfit_batches else args.label_smoothing)
            if args.any_severe_weight:
                spinal = logits.view(-1, 25, 3)[:, :5]
                loss = loss + args.any_severe_weight * losses.any_severe_loss(spinal, labels.view(-1, 25)[:, :5])
            if not torch.isfinite(loss):
                studies = [train_entries[i]["study_id"] for i in indices.tolist()]
                raise FloatingPointError(f"severity: non-finite loss at step {step} (epoch {epoch}), studies {studies}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            batch_losses.append(loss.item())
            step += 1
            rate = (batch_index + 1) / (time.time() - started)
            if main_process:
                print(f"\rseverity epoch {epoch + 1}/{args.epochs} step {batch_index + 1}/{steps_per_epoch} loss {np.mean(batch_losses):.4f} "
                      f"lr {lr:.2e} {rate:.2f} it/s eta {(total_steps - step) / max(rate, 1e-9) / 60:.1f} min", end="", flush=True)
            fetch_start = time.time()
        if not main_process:
            continue
        print()
        metrics = evaluate(model, val_entries, args, device)[0] if val_entries else {}
        row = dict(epoch=epoch, step=step, lr=lr, train_loss=float(np.mean(batch_losses)), **metrics,
                   data_wait=waited / max(time.time() - started, 1e-9), seconds=time.time() - started)
        log.write(row)
        print("  " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        score = metrics.get("score", row["train_loss"])
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), n_slices=args.n_slices,
                          settings=settings, prior=args.prior, epoch=epoch, step=step, best=min(best, score))
        training.save_checkpoint(last_path, checkpoint)
        if score <= best:
            best = score
            training.save_checkpoint(best_path, checkpoint)
    if args.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if main_process and val_entries and landmark_models:
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
        true_metrics, _ = evaluate(model, val_entries, args, device)
        honest, probabilities = evaluate(model, val_entries, args, device, landmark_models)
        matrices = confusion_matrices(val_entries, probabilities)
        save_confusion_png(os.path.join(args.out_dir, "confusion_predicted_landmarks.png"), matrices)
        for name, matrix in matrices.items():
            print(f"confusion {name} (rows true N/M/S, columns predicted):\n{matrix}")
        print(f"validation score on true landmarks {true_metrics['score']:.4f}, on predicted landmarks {honest['score']:.4f} "
              f"(the honest number)")
        return dict(true_landmarks=true_metrics, predicted_landmarks=honest)
    return row


if __name__ == "__main__":
    main()
