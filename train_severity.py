"""Stage 2: grade each condition-level from 2.5D crops around its landmark.

    python train_severity.py --data-dir demo --out-dir runs/demo --epochs 6

Training crops sit on the labelled landmarks, jittered in position and slice so that stage-1 errors
are no surprise. Validation runs twice: on the true landmarks, and through the whole pipeline with
the landmarks stage 1 predicts (the honest number; needs landmark checkpoints trained on the same
fold in --landmark-dir). Writes RUN/severity.csv (one row per epoch), RUN/severity_{last,best}.pt,
RUN/confusion_*.png.
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
from models import SeverityNet
from predict import (SeverityModel, grade_study, load_landmark_models, load_severity_models,
                     predict_landmarks)
from viz import save_confusion_png, save_crops_png


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    parser.add_argument("--data-dir", required=True,
                        help="competition layout: train.csv, train_images/, ...")
    parser.add_argument("--out-dir", required=True, help="run folder for logs and checkpoints")
    parser.add_argument("--landmark-dir", default="",
                        help="folder of the landmark checkpoints (default: --out-dir)")
    parser.add_argument("--cache-dir", default="cache", help="decoded series cache")
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
                             "are left out, so their rows get no crop and their grades are masked "
                             "in the loss (kept in train.csv and scored in validation)")
    parser.add_argument("--n-slices", type=int, default=5, help="slices per 2.5D crop (odd)")
    parser.add_argument("--crop-px", type=int, default=48,
                        help="crop side in pixels after resampling")
    parser.add_argument("--crop-mm", type=float, nargs=len(data.GROUPS), default=[40.0, 40.0, 40.0],
                        metavar="MM",
                        help=f"crop side in mm per condition group ({', '.join(data.GROUPS)})")
    parser.add_argument("--jitter-mm", type=float, default=7.0,
                        help="max crop-centre jitter in training, mm per axis")
    parser.add_argument("--slice-jitter", type=int, default=1, help="max slice jitter in training")
    parser.add_argument("--rotate-degrees", type=float, default=15.0,
                        help="max in-plane turn of each training crop, degrees")
    parser.add_argument("--bn-studies", type=int, default=16,
                        help="BatchNorm statistics are recomputed on the crops of this many "
                             "training studies before each validation, and after the last epoch "
                             "(0: keep the running ones)")
    # model
    parser.add_argument("--pretrained", default="",
                        help="optional torchvision ResNet-18 state dict file")
    # optimization
    parser.add_argument("--epochs", type=int, default=24, help="epochs")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="studies per step (25 crops each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="linear warmup steps, then cosine to 0")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (default: on CUDA, bfloat16 or float16; off on a CPU). "
                             "--amp on a CPU: bfloat16 where it is native (AVX512-BF16, AMX), "
                             "1.5-1.9 x faster; --no-amp: off everywhere")
    # debugging
    parser.add_argument("--overfit-batches", type=int, default=0,
                        help="train on this many batches only, no jitter: the loss must go to "
                             "about 0")
    parser.add_argument("--dry-run", action="store_true", help="one short epoch on a few studies")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/severity_last.pt")
    args = parser.parse_args(argv)
    assert args.n_slices % 2 == 1, "--n-slices must be odd (a centre slice and its neighbours)"
    return args


# -----------------------------------------------------------------------------
# studies with their labels and labelled points

# a study of train.csv: labels (25,), its listed series [tables.LabelledSeries] and every labelled
# point {(condition, level): tables.LabelPoint}, each naming its own series
LabelledStudy = namedtuple("LabelledStudy", "study_id labels series_items points")


def labelled_studies(data_dir, exclude_labels="", coordinates=""):
    """[LabelledStudy] of train.csv, in its order, with the points of the coordinate file
    (tables.labelled_series); without the points an audit CSV flags, when exclude_labels names one
    (tables.without_flagged)."""
    study_ids, labels = tables.read_labels(os.path.join(data_dir, "train.csv"))
    series_of_study = {}
    for item in tables.training_series(data_dir, exclude_labels, coordinates):
        series_of_study.setdefault(item.study_id, []).append(item)
    out = []
    for study_id, study_labels in zip(study_ids.tolist(), labels):
        items = series_of_study.get(study_id, [])
        points = {name: point for item in items for name, point in item.points.items()}
        out.append(LabelledStudy(study_id, study_labels, items, points))
    return out


def load_labelled_study(entry, cache_dir):
    """A LabelledStudy -> ({series_id: StudySeries}, {(condition, level): Landmark} of its labels).

    Loads every listed series, as inference does; each label becomes a landmark on its own series (a
    study may spread one type's labels over several series); data.labelled_landmarks warns about and
    leaves out a label that does not fit its series.
    """
    study = {}
    for item in entry.series_items:
        series = data.load_series(item.series_dir, cache_dir)
        study[item.series_id] = data.StudySeries(item.series_type, item.series_id, series)
    return study, data.labelled_landmarks(study, entry.points, f"study {entry.study_id}")


def crop_settings(args):
    """What a severity checkpoint keeps so that inference rebuilds the same crops."""
    return dict(n_slices=args.n_slices, crop_px=args.crop_px, crop_mm=list(args.crop_mm))


class StudyCrops(torch.utils.data.Dataset):
    """The crops of a study's rows that have a landmark: crops (A, S, C, C), groups (A,), columns
    (A,) into the 25 LABEL_COLUMNS, the study's labels (25,) with MISSING where a row has no crop,
    and the study's index."""

    def __init__(self, entries, args, augment):
        self.entries = entries
        self.settings = crop_settings(args)
        self.args = args
        self.augment = augment

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        args = self.args
        study, landmarks = load_labelled_study(entry, args.cache_dir)
        degrees = None
        if self.augment:
            landmarks = inputs.jitter_landmarks(study, landmarks, args.jitter_mm, args.slice_jitter)
            if args.rotate_degrees:
                degrees = np.random.uniform(-1, 1, data.N_LABELS) * args.rotate_degrees
        crops, groups, columns = inputs.study_crops(study, landmarks, self.settings, degrees)
        if self.augment and len(crops):
            crops = inputs.random_intensity(crops.flatten(0, 1)).view_as(crops)
        labels = torch.full((data.N_LABELS,), data.MISSING, dtype=torch.long)
        labels[columns] = torch.as_tensor(entry.labels, dtype=torch.long)[columns]
        return crops, groups, columns, labels, index

    def study_of(self, index):
        return self.entries[index].study_id


# a batch of studies: only the rows with a landmark have a crop
StudyBatch = namedtuple("StudyBatch", "crops groups slots labels indices")


def collate_studies(batch):
    """StudyBatch: crops (A, S, C, C) and groups (A,) of the rows with a landmark, slots (A,) each
    crop's place in the batch's B * 25 labels, labels (B * 25,) and study indices (B,)."""
    crops, groups, columns, labels, indices = zip(*batch)
    slots = [c + data.N_LABELS * b for b, c in enumerate(columns)]
    return StudyBatch(torch.cat(crops), torch.cat(groups), torch.cat(slots), torch.cat(labels),
                      torch.tensor(indices))


def describe_series_spread(entries):
    """Print how many studies put one type's labelled points on more than one series."""
    spread = 0
    for entry in entries:
        types = {data.SERIES_OF_CONDITION[c] for c, _ in entry.points}
        series_and_types = {(p.series_id, data.SERIES_OF_CONDITION[c])
                            for (c, _), p in entry.points.items()}
        spread += len(series_and_types) > len(types)
    points = sum(len(e.points) for e in entries)
    print(
        f"severity: {points} labelled points; {spread} of {len(entries)} studies spread one type's "
        "labels over several series (each point is cropped from its own)"
    )


# -----------------------------------------------------------------------------
# validation


@torch.no_grad()
def predict_entries(severity_models, prior, entries, cache_dir, device, landmark_models=None):
    """(N, 25, 3) mean probabilities of [SeverityModel]: on true landmarks, or on stage-1
    predictions when landmark_models is given; the prior where a row has no landmark."""
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


def validation_metrics(entries, probabilities):
    """{val_loss, val_loss_spinal, ..._foraminal, ..._subarticular, ..._any_severe_spinal}: the
    competition score (a loss: lower is better) and its terms on these studies."""
    study_ids = [e.study_id for e in entries]
    solution = losses.labels_to_solution(study_ids, np.stack([e.labels for e in entries]))
    submission = losses.probabilities_to_submission(study_ids, losses.finalise(probabilities))
    terms = losses.condition_group_losses(solution, submission)
    metrics = dict(val_loss=losses.mean_of_terms(terms))
    for name, value in terms.items():
        metrics[f"val_loss_{name}"] = value
    return metrics


def honest_landmark_models(args, device):
    """The landmark models for the honest validation, or {} with a loud warning when there are none.

    Refuses checkpoints that saw this fold's studies (--all-studies, or another fold or fold count):
    their landmarks on the validation studies would be better than on unseen ones.
    """
    folder = args.landmark_dir or args.out_dir
    landmark_models = load_landmark_models(folder, device)
    if not landmark_models:
        warnings.warn(
            f"NO HONEST VALIDATION: no landmark checkpoints (landmarks_<type>_best.pt) in "
            f"{folder}; only the score on true landmarks will be reported. Train "
            "train_landmarks.py on the same fold first."
        )
    for tag, (_, settings) in landmark_models.items():
        trained = settings["args"]
        fold = trained.get("fold"), trained.get("n_folds")
        if not trained.get("all_studies") and fold == (args.fold, args.n_folds):
            continue
        split = "--all-studies" if trained.get("all_studies") else "fold {} of {}".format(*fold)
        raise ValueError(
            f"{settings['path']}: trained on {split}, so it has seen validation studies "
            f"of fold {args.fold} of {args.n_folds}: the honest validation would be "
            f"optimistic. Train the landmarks with --fold {args.fold} --n-folds "
            f"{args.n_folds}, or pass --all-studies to train_severity.py."
        )
    return landmark_models


def final_validation(prior, entries, landmark_models, args, device):
    """Validation of RUN/severity_best.pt on true and on predicted landmarks (the honest number),
    with confusion PNGs and the predicted-landmark grades in RUN/validation_fold<k>.csv."""
    severity_models, _ = load_severity_models([os.path.join(args.out_dir, "severity_best.pt")],
                                              device)
    on_true = predict_entries(severity_models, prior, entries, args.cache_dir, device)
    true_metrics = validation_metrics(entries, on_true)
    print(f"validation score on true landmarks {true_metrics['val_loss']:.4f}")
    if not landmark_models:
        print(
            f"NO HONEST VALIDATION: no landmark checkpoints in {args.landmark_dir or args.out_dir}"
        )
        return dict(true_landmarks=true_metrics)
    probabilities = predict_entries(severity_models, prior, entries, args.cache_dir, device,
                                    landmark_models)
    honest = validation_metrics(entries, probabilities)
    labels = np.stack([e.labels for e in entries])
    collapsed = describe_collapse(losses.collapsed_groups(labels, probabilities.argmax(-1)))
    if collapsed:
        where = "validation studies (predicted landmarks, best checkpoint)"
        warnings.warn(collapse_message(collapsed, where))
    # in submission format, so that the folds of a k-fold run can be pooled and scored
    study_ids = [e.study_id for e in entries]
    submission = losses.probabilities_to_submission(study_ids, losses.finalise(probabilities))
    submission.to_csv(os.path.join(args.out_dir, f"validation_fold{args.fold}.csv"), index=False)
    matrices = losses.confusion_matrices(labels, probabilities)
    save_confusion_png(os.path.join(args.out_dir, "confusion_predicted_landmarks.png"), matrices)
    for name, matrix in matrices.items():
        print(f"confusion {name} (rows true N/M/S, columns predicted):\n{matrix}")
    print(f"validation score on predicted landmarks {honest['val_loss']:.4f} (the honest number)")
    return dict(true_landmarks=true_metrics, predicted_landmarks=honest)


def describe_collapse(collapsed):
    """'spinal:Moderate;foraminal:Normal/Mild' for the log ('' when healthy)."""
    return ";".join(f"{group}:{grade}" for group, grade in collapsed.items())


def collapse_message(description, where):
    return (
        f"COLLAPSED PREDICTIONS on the {where}: every row of a condition group graded one class "
        f"({description.replace(';', ', ')}): the model is not reading the crops "
        "(README: 'A model that does not learn')"
    )


# -----------------------------------------------------------------------------
# training


def split_entries(entries, args):
    """Train and validation studies by fold (none for validation with --all-studies or
    --overfit-batches)."""
    folds = tables.assign_folds([e.study_id for e in entries], args.n_folds, seed=0)
    train_entries = [e for e in entries if args.all_studies or folds[e.study_id] != args.fold]
    val_entries = [e for e in entries if folds[e.study_id] == args.fold]
    if args.all_studies or args.overfit_batches:
        val_entries = []
    if args.dry_run:
        return train_entries[:4], val_entries[:2]
    return train_entries, val_entries


def make_loader(entries, args, runtime):
    """The training DataLoader of a network's studies."""
    augment = not args.overfit_batches
    dataset = StudyCrops(entries, args, augment)
    return training.distributed_loader(dataset, args.batch_size, augment, collate_studies, args,
                                       runtime)


def batchnorm_batches(entries, args, device):
    """[(crops, groups)] of each study's labelled points, unaugmented: what recompute_batchnorm
    averages over. Built once per network; they do not change between epochs."""
    batches = []
    for entry in entries:
        study, landmarks = load_labelled_study(entry, args.cache_dir)
        crops, groups, _ = inputs.study_crops(study, landmarks, crop_settings(args))
        if len(crops):
            batches.append((crops.to(device), groups.to(device)))
    return batches


def training_collapse(graded):
    """describe_collapse of an epoch's training batches: graded is [(labels (B * 25,), slots (A,),
    argmax (A,))] per step; rows without a crop count as MISSING."""
    if not graded:
        return ""
    seen_labels, seen_guesses = [], []
    for labels, slots, argmax in graded:
        guesses = torch.zeros(len(labels), dtype=torch.long).index_copy(0, slots, argmax)
        seen_labels.append(labels.view(-1, data.N_LABELS))
        seen_guesses.append(guesses.view(-1, data.N_LABELS))
    return describe_collapse(
        losses.collapsed_groups(torch.cat(seen_labels), torch.cat(seen_guesses))
    )


def end_of_epoch_metrics(net, norm_batches, val_entries, prior, args, device):
    """BatchNorm statistics recomputed over norm_batches (training.recompute_batchnorm), then the
    validation metrics with `collapsed` judged on validation; {} without validation studies."""
    if norm_batches:
        training.recompute_batchnorm(net, norm_batches)
    if not val_entries:
        return {}
    graded_by = [SeverityModel(net, crop_settings(args))]
    probabilities = predict_entries(graded_by, prior, val_entries, args.cache_dir, device)
    labels = np.stack([e.labels for e in val_entries])
    collapsed = losses.collapsed_groups(labels, probabilities.argmax(-1))
    return dict(validation_metrics(val_entries, probabilities),
                collapsed=describe_collapse(collapsed))


def train(entries, val_entries, prior, args, runtime):
    """Train the severity network on entries, logging RUN/severity.csv and saving
    RUN/severity_{last,best}.pt (best: lowest validation loss; without validation studies, the last
    epoch). Returns the last epoch's log row."""
    device, name = runtime.device, "severity"  # RUN/severity.csv, RUN/severity_*.pt
    main_process = runtime.rank == 0  # logs, checkpoints, validation and printing happen once
    loader = make_loader(entries, args, runtime)
    steps_per_epoch = min(len(loader), args.overfit_batches or len(loader))
    total_steps = args.epochs * steps_per_epoch
    model = SeverityNet(args.n_slices, pretrained_path=args.pretrained or None).to(device)
    train_model = training.wrap_for_training(model, runtime)  # DistributedDataParallel (torchrun)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    autocast, scaler = training.autocast_context(device, args.amp)
    last_path = os.path.join(args.out_dir, f"{name}_last.pt")
    start_epoch, step, best = 0, 0, float("inf")
    if args.resume:
        start_epoch, step, best = training.resume(last_path, model, optimizer, device, name)
    norm_batches = []
    if main_process:
        log = training.CsvLog(os.path.join(args.out_dir, f"{name}.csv"),
                              keep_epochs_below=start_epoch if args.resume else None)
        print(f"{name}: {len(entries)} train / {len(val_entries)} val studies, "
              f"{steps_per_epoch} steps/epoch")
        norm_batches = batchnorm_batches(entries[:args.bn_studies], args, device)
    log_row = {}
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loader.sampler, "set_epoch"):  # torchrun: a new shuffle of each process's share
            loader.sampler.set_epoch(epoch)
        started, waited, batch_losses = time.time(), 0.0, []
        graded = []
        lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)  # even with no step
        fetch_start = time.time()
        for batch_index, batch in enumerate(loader):
            if batch_index >= steps_per_epoch:
                break
            waited += time.time() - fetch_start  # the GPU was idle, waiting for the loader
            if not len(batch.slots):  # no study of the batch has a landmark: nothing to learn from
                continue
            # the learning rate of this step: linear warmup, then cosine to 0
            lr = training.get_lr(step, total_steps, args.warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            crops = batch.crops.to(device, non_blocking=True)  # (A, S, C, C): rows with a landmark
            groups = batch.groups.to(device, non_blocking=True)
            slots = batch.slots.to(device, non_blocking=True)  # (A,) their places in labels
            labels = batch.labels.to(device, non_blocking=True)  # (B * 25,), MISSING = no label
            with autocast:  # bfloat16/float16 on CUDA; on the CPU with --amp
                logits = train_model(crops, groups)  # (A, 3)
            loss = losses.weighted_cross_entropy(logits, labels[slots])
            if not torch.isfinite(loss):  # stop at once, naming the studies of the batch
                studies = [loader.dataset.study_of(i) for i in batch.indices.tolist()]
                raise FloatingPointError(f"severity: non-finite loss at step {step} "
                                         f"(epoch {epoch}), studies {studies}")
            scaler.scale(loss).backward()  # the scaler only acts for float16 autocast
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            batch_losses.append(loss.item())
            graded.append((batch.labels, batch.slots, logits.argmax(-1).cpu()))  # collapse check
            step += 1
            if main_process:
                where = (f"severity epoch {epoch + 1}/{args.epochs} "
                         f"step {batch_index + 1}/{steps_per_epoch}")
                training.print_progress(where, batch_losses, lr, started, batch_index + 1,
                                        total_steps - step)
            fetch_start = time.time()
        seconds = time.time() - started
        train_loss = float(np.mean(batch_losses)) if batch_losses else float("nan")
        if not main_process:
            continue
        print()
        # end of epoch: validate, look for collapse (on validation when there is one, else on the
        # training batches), log a row, save the last (and best) checkpoint. Without validation
        # studies nothing is chosen (a training loss says nothing of grading): the BatchNorm
        # statistics are recomputed, and the best checkpoint written, after the last epoch only;
        # until then severity_last.pt keeps the running statistics (it is for --resume)
        last_epoch = epoch == args.epochs - 1
        metrics = end_of_epoch_metrics(model, norm_batches if val_entries or last_epoch else [],
                                       val_entries, prior, args, device)
        collapsed = metrics.pop("collapsed", training_collapse(graded))
        if collapsed:
            where = f"{'validation' if val_entries else 'training'} studies"
            print("  " + collapse_message(collapsed, where))
        log_row = dict(epoch=epoch, step=step, lr=lr, train_loss=train_loss, **metrics,
                   collapsed=collapsed,
                   data_wait=waited / max(seconds, 1e-9), seconds=seconds)
        log.write(log_row)
        training.print_row(log_row)
        if val_entries:
            best = min(best, metrics["val_loss"])  # lower is better
        is_best = metrics["val_loss"] <= best if val_entries else last_epoch
        checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                          args=vars(args), settings=crop_settings(args),
                          prior=prior.tolist(), epoch=epoch,
                          step=step, best=best)
        training.save_checkpoint(last_path, checkpoint)
        if is_best:
            training.save_checkpoint(os.path.join(args.out_dir, f"{name}_best.pt"), checkpoint)
    return log_row


def main(argv=None):
    args = parse_args(argv)
    runtime = training.setup_distributed(args.device)
    main_process = runtime.rank == 0  # logs, checkpoints, validation and printing happen once
    os.makedirs(args.out_dir, exist_ok=True)
    if main_process:
        training.save_args(args.out_dir, "train_severity", args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    entries = labelled_studies(args.data_dir, args.exclude_labels, args.coordinates)
    train_entries, val_entries = split_entries(entries, args)
    if not train_entries:
        raise ValueError(f"{args.data_dir}: no training studies "
                         f"(fold {args.fold} of {args.n_folds} holds them all)")
    labels = np.stack([e.labels for e in train_entries])
    prior = losses.weighted_prior(labels, smoothing=1.0)  # (25, 3): rows without a landmark
    landmark_models = {}
    if val_entries and main_process:
        landmark_models = honest_landmark_models(args, runtime.device)
    if main_process:  # look before you train: the first few studies' crops, as training sees them
        describe_series_spread(train_entries)
        dataset = StudyCrops(train_entries, args, augment=True)
        first = collate_studies([dataset[i] for i in range(min(4, len(train_entries)))])
        save_crops_png(os.path.join(args.out_dir, "crops_train.png"), first.crops, first.groups,
                       first.labels[first.slots])
    started = time.time()
    last_row = train(train_entries, val_entries, prior, args, runtime)
    if main_process:
        print(f"severity trained: {args.epochs} epochs in {time.time() - started:.0f} s")
    if last_row.get("collapsed"):
        where = f"{'validation' if val_entries else 'training'} studies at the last epoch"
        warnings.warn(collapse_message(last_row["collapsed"], where))
    training.end_distributed(runtime)
    if not main_process or not val_entries:
        return {}
    return final_validation(prior, val_entries, landmark_models, args, runtime.device)


if __name__ == "__main__":
    main()
