"""Stage 2: grade each condition-level from 2.5D crops around its landmark.

    python train_severity.py --data-dir demo --out-dir runs/demo --epochs 6

Training crops sit on the labelled landmarks, jittered in position and slice so that stage-1 errors
are no surprise. Validation runs twice: on the true landmarks, and through the whole pipeline with the
landmarks stage 1 predicts (the honest number; needs landmark checkpoints trained on the same fold in
--landmark-dir). Writes RUN/severity.csv (one row per epoch), RUN/severity_{last,best}.pt, RUN/confusion_*.png.
"""
import argparse
import os
import time
import warnings
from collections import namedtuple

import numpy as np
import torch

import data
import inputs
import losses
import tables
import training
from models import UNIT_TEMPERATURES, SeverityModel, SeverityNet, grade_study, load_landmark_models, load_severity_models, predict_landmarks
from viz import save_confusion_png, save_crops_png

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
    parser.add_argument("--crop-mm", type=float, nargs=len(data.GROUPS), default=[40.0, 40.0, 40.0], metavar="MM",
                        help=f"crop side in mm per condition group ({', '.join(data.GROUPS)})")
    parser.add_argument("--jitter-mm", type=float, default=7.0, help="max crop-centre jitter in training, mm per axis")
    parser.add_argument("--slice-jitter", type=int, default=1, help="max slice jitter in training")
    parser.add_argument("--rotate-degrees", type=float, default=15.0, help="max in-plane turn of each training crop, degrees")
    parser.add_argument("--members", type=int, default=1, help="train this many networks, each leaving out one fold of the "
                        "training studies; inference averages them, and per-group temperatures are fitted on their "
                        "out-of-fold predictions (1: one network on all training studies, no calibration)")
    parser.add_argument("--bn-studies", type=int, default=16, help="after each epoch, BatchNorm statistics are recomputed "
                        "on the crops of this many training studies before validating and saving (0: keep the running ones)")
    parser.add_argument("--severe-repeat", type=int, default=1, help="studies with a Severe label appear this many times "
                        "per epoch (1: once, as the others)")
    # model
    parser.add_argument("--pretrained", default="", help="optional torchvision ResNet-18 state dict file")
    # optimization
    parser.add_argument("--epochs", type=int, default=24, help="epochs")
    parser.add_argument("--batch-size", type=int, default=4, help="studies per step (25 crops each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps, then cosine to 0")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (calibration)")
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

LabelledStudy = namedtuple("LabelledStudy", "study_id labels series points")


def labelled_studies(data_dir):
    """[LabelledStudy] of train.csv, in its order: labels (25,), every listed series [tables.LabelledSeries] and every
    labelled point {(condition, level): tables.LabelPoint}, each naming its own series."""
    study_ids, labels = tables.read_labels(os.path.join(data_dir, "train.csv"))
    series_of_study = {}
    for item in tables.labelled_series(data_dir, "train"):
        series_of_study.setdefault(item.study_id, []).append(item)
    out = []
    for study_id, study_labels in zip(study_ids.tolist(), labels):
        items = series_of_study.get(study_id, [])
        points = {name: point for item in items for name, point in item.points.items()}
        out.append(LabelledStudy(study_id, study_labels, items, points))
    return out



def load_labelled_study(entry, cache_dir):
    """A LabelledStudy -> ({series_id: StudySeries}, {(condition, level): Landmark} of its labels in volume pixels).

    Loads every listed series, as inference does; each label becomes a landmark on its own series (a study may
    spread one type's labels over several series). A label that does not fit its series is dropped with a warning.
    """
    study = {item.series_id: data.StudySeries(item.series_type, item.series_id, data.load_series(item.series_dir, cache_dir))
             for item in entry.series}
    landmarks = {}
    for name, point in entry.points.items():
        loaded = study[point.series_id]
        try:
            landmarks[name] = data.Landmark(loaded.series_type, point.series_id,
                                            *data.label_to_volume(loaded.series, point.instance_number, point.x, point.y), 1.0)
        except (KeyError, ValueError) as error:  # that row trains nothing: no crop, label masked
            warnings.warn(f"study {entry.study_id} series {point.series_id}: label {name[0]} {name[1]} ignored: {error}")
    return study, landmarks


class StudyCrops(torch.utils.data.Dataset):
    """The crops of a study's rows that have a landmark: crops (A, S, C, C), groups (A,), columns (A,) into the 25
    LABEL_COLUMNS, and the study's labels (25,) with MISSING where a row has no crop."""

    def __init__(self, entries, settings, args, augment):
        self.entries, self.settings, self.args, self.augment = entries, settings, args, augment

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        study, landmarks = load_labelled_study(entry, self.args.cache_dir)
        if self.augment:
            landmarks = inputs.jitter_landmarks(study, landmarks, self.args.jitter_mm, self.args.slice_jitter)
        degrees = np.random.uniform(-1, 1, data.N_LABELS) * self.args.rotate_degrees if self.augment and self.args.rotate_degrees else None
        crops, groups, columns = inputs.study_crops(study, landmarks, self.settings, degrees)
        if self.augment and len(crops):
            crops = inputs.random_intensity(crops.flatten(0, 1)).view_as(crops)
        labels = torch.full((data.N_LABELS,), data.MISSING, dtype=torch.long)
        labels[columns] = torch.as_tensor(entry.labels, dtype=torch.long)[columns]
        off_series = sum(landmark.series_id != entry.points[name].series_id for name, landmark in landmarks.items())
        return crops, groups, columns, labels, index, off_series


# a batch of studies: only the rows with a landmark have a crop
StudyBatch = namedtuple("StudyBatch", "crops groups rows labels indices off_series")


def collate_studies(batch):
    """StudyBatch: crops (A, S, C, C) and groups (A,) of the rows with a landmark, rows (A,) their places in the
    batch's B * 25 labels, labels (B * 25,), study indices (B,), crops taken off their label's series."""
    rows = torch.cat([columns + data.N_LABELS * b for b, (_, _, columns, *_) in enumerate(batch)])
    return StudyBatch(torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch]), rows,
                      torch.cat([b[3] for b in batch]), torch.tensor([b[4] for b in batch]), sum(b[5] for b in batch))


def describe_series_spread(entries):
    """Print how many labelled points lie on a study's second (third...) series of their type."""
    spread = [e for e in entries if len({(p.series_id, data.SERIES_OF_CONDITION[c]) for (c, _), p in e.points.items()})
              > len({data.SERIES_OF_CONDITION[c] for c, _ in e.points})]
    points = sum(len(e.points) for e in entries)
    print(f"severity: {points} labelled points; {len(spread)} of {len(entries)} studies spread one type's labels over "
          "several series (each point is cropped from its own)")


# -----------------------------------------------------------------------------
# validation


@torch.no_grad()
def predict_entries(severity_models, prior, entries, cache_dir, device, landmark_models=None):
    """(N, 25, 3) mean probabilities of [SeverityModel]: on true landmarks, or on stage-1 predictions when
    landmark_models is given; the prior where a row has no landmark."""
    for member in severity_models:
        member.net.eval()
    out = np.broadcast_to(prior, (len(entries),) + prior.shape).copy()
    for i, entry in enumerate(entries):
        study, landmarks = load_labelled_study(entry, cache_dir)
        if landmark_models:
            landmarks, _ = predict_landmarks(landmark_models, study, device)
        graded, available = grade_study(severity_models, study, landmarks, device)
        out[i, available] = graded[available]
    for member in severity_models:
        member.net.train()
    return out


def evaluate(severity_models, prior, entries, args, device, landmark_models=None):
    """({score, val_loss_spinal, val_loss_foraminal, val_loss_subarticular, val_loss_any_severe_spinal}, probabilities)."""
    probabilities = predict_entries(severity_models, prior, entries, args.cache_dir, device, landmark_models)
    study_ids = [e.study_id for e in entries]
    solution = losses.labels_to_solution(study_ids, np.stack([e.labels for e in entries]))
    terms = losses.condition_group_losses(solution, losses.probabilities_to_submission(study_ids, losses.finalise(probabilities)))
    return dict(score=losses.mean_of_terms(terms), **{f"val_loss_{k}": v for k, v in terms.items()}), probabilities


def confusion_matrices(entries, probabilities):
    """{group: (3, 3) counts [true, predicted]} over labelled rows."""
    labels = np.stack([e.labels for e in entries])
    predicted = probabilities.argmax(-1)
    out = {}
    for name, conditions in data.GROUP_CONDITIONS.items():
        columns = [j for j, (c, _) in enumerate(data.COLUMN_POINTS) if c in conditions]
        truth, guess = labels[:, columns].ravel(), predicted[:, columns].ravel()
        keep = truth != data.MISSING
        out[name] = np.bincount(truth[keep] * data.N_SEVERITIES + guess[keep], minlength=data.N_SEVERITIES ** 2).reshape(
            data.N_SEVERITIES, data.N_SEVERITIES)
    return out


def honest_landmark_models(args, device):
    """The landmark models for the honest validation, or {} with a loud warning when there are none.

    Refuses checkpoints that saw this fold's studies (--all-studies, or another fold or fold count): their
    landmarks on the validation studies would be better than on unseen ones, and the score optimistic.
    """
    folder = args.landmark_dir or args.out_dir
    landmark_models = load_landmark_models(folder, device)
    if not landmark_models:
        warnings.warn(f"NO HONEST VALIDATION: no landmark checkpoints (landmarks_<type>_best.pt) in {folder}; only the "
                      "score on true landmarks will be reported. Train train_landmarks.py on the same fold first.")
    for tag, (_, settings) in landmark_models.items():
        trained = settings["args"]
        if trained.get("all_studies") or (trained.get("fold"), trained.get("n_folds")) != (args.fold, args.n_folds):
            split = "--all-studies" if trained.get("all_studies") else f"fold {trained.get('fold')} of {trained.get('n_folds')}"
            raise ValueError(f"{settings['path']}: trained on {split}, so it has seen validation studies of fold {args.fold} of "
                             f"{args.n_folds}: the honest validation would be optimistic. Train the landmarks with --fold "
                             f"{args.fold} --n-folds {args.n_folds}, or pass --all-studies to train_severity.py.")
    return landmark_models


def final_validation(prior, entries, landmark_models, args, device):
    """Validation of RUN/severity_best.pt on true and on predicted landmarks (the honest number), with confusion PNGs
    and the predicted-landmark grades in RUN/validation_fold<k>.csv."""
    severity_models, _ = load_severity_models([os.path.join(args.out_dir, "severity_best.pt")], device)
    true_metrics, _ = evaluate(severity_models, prior, entries, args, device)
    print(f"validation score on true landmarks {true_metrics['score']:.4f}")
    if not landmark_models:
        print(f"NO HONEST VALIDATION: no landmark checkpoints in {args.landmark_dir or args.out_dir}")
        return dict(true_landmarks=true_metrics)
    honest, probabilities = evaluate(severity_models, prior, entries, args, device, landmark_models)
    collapsed = describe_collapse(losses.collapsed_groups(np.stack([e.labels for e in entries]), probabilities.argmax(-1)))
    if collapsed:
        warnings.warn(collapse_message(collapsed, "validation studies (predicted landmarks, best checkpoint)"))
    study_ids = [e.study_id for e in entries]  # in submission format, so the folds of a k-fold run can be pooled and scored
    losses.probabilities_to_submission(study_ids, losses.finalise(probabilities)).to_csv(
        os.path.join(args.out_dir, f"validation_fold{args.fold}.csv"), index=False)
    matrices = confusion_matrices(entries, probabilities)
    save_confusion_png(os.path.join(args.out_dir, "confusion_predicted_landmarks.png"), matrices)
    for name, matrix in matrices.items():
        print(f"confusion {name} (rows true N/M/S, columns predicted):\n{matrix}")
    print(f"validation score on predicted landmarks {honest['score']:.4f} (the honest number)")
    return dict(true_landmarks=true_metrics, predicted_landmarks=honest)


# -----------------------------------------------------------------------------
# training


def train_epoch(model, loader, optimizer, scaler, ctx, epoch, step, total_steps, steps_per_epoch, args, runtime):
    """One pass over the loader -> (step after it, {lr, train_loss, ...: this epoch's log columns})."""
    started, batch_losses, waited = time.time(), [], 0.0
    lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)  # defined even when the loader is empty
    fetch_start = time.time()
    off_series, seen_labels, seen_guesses = 0, [], []
    for batch_index, batch in enumerate(loader):
        if batch_index >= steps_per_epoch:
            break
        waited += time.time() - fetch_start
        off_series += batch.off_series
        if not len(batch.rows):  # no study of the batch has a landmark: nothing to learn from
            continue
        lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)
        training.set_lr(optimizer, lr)
        crops = batch.crops.to(runtime.device, non_blocking=True)
        groups = batch.groups.to(runtime.device, non_blocking=True)
        rows = batch.rows.to(runtime.device, non_blocking=True)
        labels = batch.labels.to(runtime.device, non_blocking=True)
        with ctx:
            logits = model(crops, groups)  # (A, 3): the rows with a landmark
        loss = losses.weighted_cross_entropy(logits, labels[rows], 0.0 if args.overfit_batches else args.label_smoothing)
        if args.any_severe_weight:  # the per-study term needs every row in place; rows without a crop stay masked
            placed = logits.new_zeros(len(labels), data.N_SEVERITIES).index_copy(0, rows, logits)
            loss = loss + args.any_severe_weight * losses.any_severe_loss(placed, labels)
        if not torch.isfinite(loss):
            studies = [loader.dataset.entries[i].study_id for i in batch.indices.tolist()]
            raise FloatingPointError(f"severity: non-finite loss at step {step} (epoch {epoch}), studies {studies}")
        training.optimizer_step(loss, optimizer, scaler)
        batch_losses.append(loss.item())
        guesses = torch.zeros(len(labels), dtype=torch.long).index_copy(0, batch.rows, logits.argmax(-1).cpu())
        seen_labels.append(batch.labels.view(-1, data.N_LABELS))
        seen_guesses.append(guesses.view(-1, data.N_LABELS))  # rows without a crop are MISSING in the labels
        step += 1
        if runtime.rank == 0:
            training.print_progress("severity", epoch, args.epochs, batch_index, steps_per_epoch, batch_losses, lr, started,
                                    total_steps - step)
        fetch_start = time.time()
    seconds = time.time() - started
    collapsed = losses.collapsed_groups(torch.cat(seen_labels), torch.cat(seen_guesses)) if seen_labels else {}
    return step, dict(lr=lr, train_loss=float(np.mean(batch_losses)) if batch_losses else float("nan"),
                      crops_off_series=off_series, collapsed=describe_collapse(collapsed), data_wait=waited / max(seconds, 1e-9),
                      seconds=seconds)


def describe_collapse(collapsed):
    """'spinal:Moderate;foraminal:Normal/Mild' for the log ('' when healthy)."""
    return ";".join(f"{group}:{grade}" for group, grade in collapsed.items())


def collapse_message(description, where):
    return (f"COLLAPSED PREDICTIONS on the {where}: every row of a condition group graded one class "
            f"({description.replace(';', ', ')}): the model is not reading the crops (README: 'A model that does not learn')")


def split_entries(entries, args):
    """Train and validation studies by fold (none for validation with --all-studies or --overfit-batches)."""
    folds = tables.assign_folds([e.study_id for e in entries], args.n_folds, seed=0)
    train_entries = [e for e in entries if args.all_studies or folds[e.study_id] != args.fold]
    val_entries = [] if args.all_studies or args.overfit_batches else [e for e in entries if folds[e.study_id] == args.fold]
    if args.dry_run:
        return train_entries[:4], val_entries[:2]
    return train_entries, val_entries


def member_splits(entries, members):
    """[(studies a member trains on, studies it leaves out)]: one member on everything, or one per fold of members."""
    if members == 1:
        return [(entries, [])]
    folds = tables.assign_folds([e.study_id for e in entries], members, seed=1)  # seed 1: not the validation folds
    return [([e for e in entries if folds[e.study_id] != k], [e for e in entries if folds[e.study_id] == k]) for k in range(members)]


def member_loader(entries, settings, args, runtime):
    """(loader, steps per epoch) over a member's studies; those with a Severe label come --severe-repeat times."""
    severe = [e for e in entries if (e.labels == data.SEVERITIES.index("Severe")).any()]
    dataset = StudyCrops(entries + severe * (args.severe_repeat - 1), settings, args, augment=not args.overfit_batches)
    loader = training.distributed_loader(dataset, args.batch_size, not args.overfit_batches, collate_studies, args, runtime)
    return loader, min(len(loader), args.overfit_batches or len(loader))


def batchnorm_batches(entries, settings, cache_dir, device):
    """[(crops, groups)] of each study's labelled points, unaugmented: what recompute_batchnorm averages over. Built
    once per network; they do not change between epochs."""
    batches = []
    for entry in entries:
        study, landmarks = load_labelled_study(entry, cache_dir)
        crops, groups, _ = inputs.study_crops(study, landmarks, settings)
        if len(crops):
            batches.append((crops.to(device), groups.to(device)))
    return batches


def end_epoch(member, epoch, step, stats, norm_batches, val_entries, prior, best, log, args, device):
    """Recompute BatchNorm statistics over norm_batches, validate, check for collapse, log one row and save last (and
    best) checkpoints; returns (row, best score)."""
    if norm_batches:
        training.recompute_batchnorm(member.net, norm_batches)
    graded_by = [SeverityModel(member.net, member.settings, UNIT_TEMPERATURES)]
    metrics, probabilities = evaluate(graded_by, prior, val_entries, args, device) if val_entries else ({}, None)
    if probabilities is not None:  # collapse is judged on validation when there is one, else on the training batches
        stats["collapsed"] = describe_collapse(losses.collapsed_groups(np.stack([e.labels for e in val_entries]), probabilities.argmax(-1)))
    if stats["collapsed"]:
        print("  " + collapse_message(stats["collapsed"], f"{'validation' if val_entries else 'training'} studies"))
    row = dict(epoch=epoch, step=step, lr=stats.pop("lr"), train_loss=stats.pop("train_loss"), **metrics, **stats)
    log.write(row)
    training.print_row(row)
    score = metrics.get("score", row["train_loss"])
    checkpoint = dict(model=member.net.state_dict(), optimizer=member.optimizer.state_dict(), args=vars(args),
                      settings=member.settings, temperatures=UNIT_TEMPERATURES, prior=prior.tolist(), epoch=epoch,
                      step=step, best=min(best, score))
    training.save_checkpoint(os.path.join(args.out_dir, f"{member.name}_last.pt"), checkpoint)
    if score <= best:
        training.save_checkpoint(os.path.join(args.out_dir, f"{member.name}_best.pt"), checkpoint)
    return row, min(best, score)


# one network being trained: what end_epoch needs of it
Member = namedtuple("Member", "name net optimizer settings")


def train_member(name, entries, val_entries, settings, prior, args, runtime):
    """The training loop of one severity network on entries, logging RUN/<name>.csv and saving RUN/<name>_{last,best}.pt.
    Returns the network with its best epoch's weights (lowest validation score, else training loss)."""
    loader, steps_per_epoch = member_loader(entries, settings, args, runtime)
    total_steps = args.epochs * steps_per_epoch
    model = SeverityNet(args.n_slices, pretrained_path=args.pretrained or None).to(runtime.device)
    train_model = training.wrap_for_training(model, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    member = Member(name, model, optimizer, settings)
    ctx, scaler = training.autocast_context(runtime.device, args.amp)
    last_path = os.path.join(args.out_dir, f"{name}_last.pt")
    start_epoch, step, best = training.resume(last_path, model, optimizer, runtime.device, name) if args.resume else (0, 0, float("inf"))
    log = training.CsvLog(os.path.join(args.out_dir, f"{name}.csv"), keep_epochs_below=start_epoch if args.resume else None) if runtime.rank == 0 else None
    if runtime.rank == 0:
        print(f"{name}: {len(entries)} train / {len(val_entries)} val studies, {steps_per_epoch} steps/epoch")
    norm_batches = batchnorm_batches(entries[:args.bn_studies], settings, args.cache_dir, runtime.device) if runtime.rank == 0 else []
    row = {}
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after_epochs and epoch >= args.stop_after_epochs:
            break
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        step, stats = train_epoch(train_model, loader, optimizer, scaler, ctx, epoch, step, total_steps, steps_per_epoch, args, runtime)
        if runtime.rank == 0:
            print()
            row, best = end_epoch(member, epoch, step, stats, norm_batches, val_entries, prior, best, log, args, runtime.device)
    if row.get("collapsed"):
        warnings.warn(collapse_message(row["collapsed"], f"{'validation' if val_entries else 'training'} studies at the last epoch"))
    best_path = os.path.join(args.out_dir, f"{name}_best.pt")
    if runtime.rank == 0 and os.path.exists(best_path):
        model.load_state_dict(torch.load(best_path, map_location=runtime.device, weights_only=False)["model"])
    return model


def calibrate(nets, splits, settings, prior, args, device):
    """Per-group temperatures fitted on the members' out-of-fold predictions (each member grading the studies it left
    out, on predicted landmarks when landmark checkpoints are at hand, else on the labelled points)."""
    landmark_models = load_landmark_models(args.landmark_dir or args.out_dir, device)
    held_out = [predict_entries([SeverityModel(net, settings, UNIT_TEMPERATURES)], prior, left_out, args.cache_dir, device, landmark_models)
                for net, (_, left_out) in zip(nets, splits)]
    labels = np.concatenate([np.stack([e.labels for e in left_out]) for _, left_out in splits])
    temperatures = losses.fit_temperatures(np.log(np.clip(np.concatenate(held_out), 1e-12, 1.0)), labels)
    print(f"temperatures fitted on {len(labels)} out-of-fold studies ({'predicted' if landmark_models else 'labelled'} "
          f"landmarks): " + ", ".join(f"{g} {t:.2f}" for g, t in zip(data.GROUPS, temperatures)))
    return temperatures


def main(argv=None):
    args = parse_args(argv)
    runtime = training.setup_distributed(args.device)
    main_process = runtime.rank == 0  # logs, checkpoints, validation and printing happen once
    os.makedirs(args.out_dir, exist_ok=True)
    if main_process:
        training.save_args(args.out_dir, "train_severity", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train_entries, val_entries = split_entries(labelled_studies(args.data_dir), args)
    if not train_entries:
        raise ValueError(f"{args.data_dir}: no training studies (fold {args.fold} of {args.n_folds} holds them all)")
    prior = losses.weighted_prior(np.stack([e.labels for e in train_entries]), smoothing=1.0)  # (25, 3) fallback rows
    landmark_models = honest_landmark_models(args, runtime.device) if val_entries and main_process else {}
    settings = dict(n_slices=args.n_slices, crop_px=args.crop_px, crop_mm=list(args.crop_mm))  # inference rebuilds crops from these
    if main_process:
        describe_series_spread(train_entries)
        first = collate_studies([StudyCrops(train_entries, settings, args, True)[i] for i in range(min(4, len(train_entries)))])
        save_crops_png(os.path.join(args.out_dir, "crops_train.png"), first.crops, first.groups,
                       first.labels[first.rows])  # look before you train

    splits = member_splits(train_entries, args.members)
    names = ["severity"] if args.members == 1 else [f"severity_member{k}" for k in range(args.members)]
    nets = [train_member(name, fit, val_entries, settings, prior, args, runtime) for name, (fit, _) in zip(names, splits)]
    training.end_distributed(runtime)
    if not main_process:
        return {}
    if args.members > 1:  # one checkpoint holds the ensemble and its calibration
        temperatures = calibrate(nets, splits, settings, prior, args, runtime.device)
        training.save_checkpoint(os.path.join(args.out_dir, "severity_best.pt"), dict(
            members=[net.state_dict() for net in nets], settings=settings, temperatures=temperatures, prior=prior.tolist(), args=vars(args)))
    return final_validation(prior, val_entries, landmark_models, args, runtime.device) if val_entries else {}


if __name__ == "__main__":
    main()
