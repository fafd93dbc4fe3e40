"""Speed of the data path, the training loops and inference, measured in one run on a synthetic set.

    python bench.py --quick            # under 3 minutes on 2 CPU cores
    python bench.py --data-dir demo --out-dir runs/demo   # on an existing set and trained run

Prints one line per figure and a final summary line:
1. series loading in slices/s: load_series cold, load_series from the cache, and a naive baseline
   (per slice pydicom.dcmread + pixel_array + PIL resize, sorted by instance number);
2. training step time and the share of wall time the loop waits for data, for both training scripts;
3. inference seconds per study and peak resident memory.
"""
import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import pydicom
from PIL import Image

import data
import infer
import synthetic
import train_landmarks
import train_severity


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="", help="an existing synthetic or competition set (default: make one)")
    parser.add_argument("--out-dir", default="", help="a run folder to write into (default: a temporary one)")
    parser.add_argument("--studies", type=int, default=12, help="training studies of the generated set")
    parser.add_argument("--steps", type=int, default=0, help="epochs are cut to this many steps (0: whole epochs)")
    parser.add_argument("--image-size", type=int, default=96, help="landmark input size, as train_landmarks.py")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers, as the training scripts' default")
    parser.add_argument("--quick", action="store_true", help="a small set and short runs: under 3 minutes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return parser.parse_args(argv)


def naive_load(series_dir, size):
    """The baseline a first notebook writes: one dcmread per file, instance-number order, PIL resize."""
    datasets = [pydicom.dcmread(os.path.join(series_dir, name)) for name in os.listdir(series_dir)]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    return np.stack([np.asarray(Image.fromarray(ds.pixel_array.astype(np.float32)).resize((size, size))) for ds in datasets])


def bench_loading(data_dir, cache_dir, size, max_series=30):
    """{naive, cold, cached}: slices per second over the first max_series training series."""
    root = os.path.join(data_dir, "train_images")
    series_dirs = [os.path.join(root, s, t) for s in sorted(os.listdir(root)) for t in sorted(os.listdir(os.path.join(root, s)))][:max_series]
    n_slices = sum(len(os.listdir(d)) for d in series_dirs)
    shutil.rmtree(cache_dir, ignore_errors=True)
    rates = {}
    for name, load in (("naive", lambda d: naive_load(d, size)), ("cold", lambda d: data.load_series(d, cache_dir)),
                       ("cached", lambda d: data.load_series(d, cache_dir))):
        started = time.perf_counter()
        for series_dir in series_dirs:
            load(series_dir)
        rates[name] = n_slices / (time.perf_counter() - started)
    return rates


def peak_rss_gib():
    """Peak resident memory of this process and of its finished children, GiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20


def bench_training(data_dir, run_dir, cache_dir, args):
    """{landmarks, severity}: (seconds per step, data-wait share) from one epoch of each script's own log."""
    common = ["--data-dir", data_dir, "--out-dir", run_dir, "--cache-dir", cache_dir, "--all-studies", "--epochs", "1",
              "--num-workers", str(args.num_workers), "--device", args.device]
    train_landmarks.main(common + ["--image-size", str(args.image_size), "--overlays", "0"]
                         + (["--overfit-batches", str(args.steps)] if args.steps else []))
    train_severity.main(common + (["--overfit-batches", str(args.steps)] if args.steps else []))
    out = {}
    for name, logs in (("landmarks", [f"landmarks_{t}.csv" for t in ("sag_t2", "sag_t1", "axial")]), ("severity", ["severity.csv"])):
        rows = pd.concat([pd.read_csv(os.path.join(run_dir, log)) for log in logs])
        out[name] = (float(rows["seconds"].sum() / rows["step"].sum()), float(np.average(rows["data_wait"], weights=rows["seconds"])))
    return out


def main(argv=None):
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_")
    data_dir = args.data_dir or os.path.join(scratch, "data")
    if not args.data_dir:
        studies = 6 if args.quick else args.studies
        synthetic.make_dataset(data_dir, studies, 3 if args.quick else 6, seed=11, size=160)
    run_dir, cache_dir = args.out_dir or os.path.join(scratch, "run"), os.path.join(scratch, "cache")
    if args.quick and not args.steps:
        args.steps = 4
    rates = bench_loading(data_dir, cache_dir, args.image_size, max_series=9 if args.quick else 30)
    for name, rate in rates.items():
        print(f"loading {name:7s} {rate:9.1f} slices/s")
    print(f"loading cached/naive {rates['cached'] / rates['naive']:.1f}x")
    training = bench_training(data_dir, run_dir, cache_dir, args)
    for name, (step, wait) in training.items():
        print(f"training {name:9s} {step:6.3f} s/step, data wait {100 * wait:4.1f} % of wall time")
    train_peak = peak_rss_gib()
    print(f"training peak resident memory {train_peak:.2f} GiB")
    study_ids = sorted(pd.read_csv(os.path.join(data_dir, "test_series_descriptions.csv"))["study_id"].unique())
    started = time.perf_counter()
    infer.main(["--data-dir", data_dir, "--out-dir", run_dir, "--cache-dir", os.path.join(scratch, "cache_infer"), "--split", "test",
                "--severity-checkpoints", os.path.join(run_dir, "severity_last.pt"), "--device", args.device])
    per_study = (time.perf_counter() - started) / len(study_ids)
    print(f"inference {per_study:.2f} s/study (cold cache, whole pipeline), peak resident memory {peak_rss_gib():.2f} GiB")
    print(f"summary: cached loading {rates['cached'] / rates['naive']:.1f}x naive; data wait landmarks "
          f"{100 * training['landmarks'][1]:.1f} %, severity {100 * training['severity'][1]:.1f} %; inference {per_study:.2f} s/study; "
          f"training peak memory {train_peak:.2f} GiB")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
