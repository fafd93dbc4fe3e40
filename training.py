"""Training plumbing shared by train_landmarks.py and train_severity.py: device and precision, the
learning-rate schedule, atomic checkpoints and resume, the CSV log, and torchrun
(DistributedDataParallel) set-up.

    runtime = setup_distributed("auto")     # Runtime(rank=0, world_size=1, device) without torchrun
    lr = get_lr(step, total_steps, warmup_steps, peak_lr)   # a pure function of the step
"""

import json
import math
import os
import time
import warnings
from collections import namedtuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# this process under torchrun (rank 0 logs, validates and saves), or the only one
Runtime = namedtuple("Runtime", "rank world_size device")


def setup_distributed(device_name):
    """Runtime(rank, world size, device). Under torchrun the process group comes up (NCCL on CUDA,
    gloo on CPU) and each process takes its own GPU; without torchrun this is
    Runtime(0, 1, the plain device)."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return Runtime(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def end_distributed(runtime):
    """Wait for every process, then take the process group down (torchrun only)."""
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def wrap_for_training(model, runtime):
    """DistributedDataParallel under torchrun (gradients averaged across processes), else the model
    itself."""
    if runtime.world_size == 1:
        return model
    device = runtime.device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def cpu_has_bfloat16():
    """True where the processor multiplies bfloat16 natively (AVX512-BF16 or AMX): there CPU
    autocast about halves a training step; elsewhere bfloat16 is emulated, slower than float32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_context(device, amp):
    """Mixed precision. amp None (the default): on CUDA (bfloat16 where supported, else float16 with
    a GradScaler), off on a CPU. amp True: on a CPU too, as bfloat16 where the processor does it
    natively (cpu_has_bfloat16; 1.5-1.9 x an epoch there, but on the demo's fresh test sets its
    models scored worse, so it is asked for, not assumed). amp False: off."""
    off = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    if amp is False or (device.type == "cpu" and not amp):
        return off
    if device.type == "cpu":
        if not cpu_has_bfloat16():
            warnings.warn("--amp: this CPU has no native bfloat16 (AVX512-BF16, AMX); float32")
            return off
        return torch.autocast("cpu", dtype=torch.bfloat16), off[1]
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda",
                                                                     enabled=dtype == torch.float16)


def get_lr(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup to peak_lr, then cosine decay to 0 at total_steps. A pure function of the
    step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def recompute_batchnorm(model, batches):
    """Set every BatchNorm's running statistics to the plain mean over batches (tuples of forward
    arguments); the weights are untouched and no random numbers are drawn.

    Running statistics average the last ten or so steps (momentum 0.1). While the weights still move
    fast they lag behind them, and in eval mode the network then grades every crop of a group alike
    although in training mode it does not: on a demo fold after 4 epochs the validation score was
    1.30 with the running statistics and 0.58 with recomputed ones, same weights.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative mean over the batches that follow
    was_training = model.training
    model.train()
    with torch.no_grad():
        for arguments in batches:
            model(*arguments)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename: a kill while saving never leaves a broken
    checkpoint."""
    temporary = path + ".tmp"
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def resume(path, model, optimizer, device, name):
    """(first epoch, step, best score) to continue from the checkpoint at path; (0, 0, inf) when
    there is none."""
    if not os.path.exists(path):
        return 0, 0, float("inf")
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"{name}: resumed after epoch {checkpoint['epoch']} (step {checkpoint['step']})")
    return checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best"]


def print_progress(where, batch_losses, lr, started, steps_done, steps_left):
    """One self-overwriting console line: where, running loss, lr, speed and time left."""
    rate = steps_done / max(time.time() - started, 1e-9)
    minutes_left = steps_left / max(rate, 1e-9) / 60
    print(f"\r{where} loss {np.mean(batch_losses):.4f} lr {lr:.2e} {rate:.2f} it/s "
          f"eta {minutes_left:.1f} min", end="", flush=True)


def print_row(row):
    """One log row on one line; an empty field (e.g. no collapsed group) is left out."""
    shown = {k: v for k, v in row.items() if v != ""}
    print("  " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in shown.items()))


class CsvLog:
    """One row per epoch, flushed at once; on resume, rows after the checkpoint's epoch are
    dropped."""

    def __init__(self, path, keep_epochs_below=None):
        self.path = path
        if keep_epochs_below is not None and os.path.exists(path):
            kept = pd.read_csv(path)
            kept[kept["epoch"] < keep_epochs_below].to_csv(path, index=False)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, row):
        frame = pd.DataFrame([row])
        frame.to_csv(self.path, mode="a", header=not os.path.exists(self.path), index=False)


def save_args(out_dir, script, args):
    """Print the flags and keep them in RUN/args.json under the script's name (the stages share a
    run folder)."""
    print(json.dumps(vars(args)))
    path = os.path.join(out_dir, "args.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    saved[script] = {
        k: v
        for k, v in vars(args).items()
        if isinstance(v, (str, int, float, bool, list, type(None)))
    }
    with open(path, "w") as handle:
        json.dump(saved, handle, indent=2)


def seed_worker(worker_id):
    np.random.seed(torch.initial_seed() % 2**32)


def distributed_loader(dataset, batch_size, shuffle, collate_fn, args, runtime):
    """A DataLoader; under torchrun each process reads its own share (DistributedSampler, reshuffled
    per epoch)."""
    sampler = None
    if runtime.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, runtime.world_size, runtime.rank,
                                                      shuffle=shuffle, seed=args.seed)
        shuffle = False
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       sampler=sampler, collate_fn=collate_fn,
                                       num_workers=args.num_workers, worker_init_fn=seed_worker,
                                       generator=torch.Generator().manual_seed(args.seed),
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=args.num_workers > 0)
