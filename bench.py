"""Speed and size of the data path, training loops and inference, in one run on a synthetic set.

    # demo-sized frames (160 px), about a minute on 2 CPU cores
    python bench.py --quick
    # real frame size: 512-640 px, real fields of view and slice counts
    python bench.py --size 512 --studies 6 --quick
    # on an existing set and trained run
    python bench.py --data-dir demo --out-dir runs/demo

Prints one line per figure and a final summary line:
1. series loading in slices/s: a naive baseline (per slice pydicom.dcmread + pixel_array + PIL
   resize, sorted by instance number), load_series cold (decoding, writing the cache), cached
   (memory map, every stored byte read) and float (cached, every pixel also converted to float32 at
   full resolution);
2. storage per study: DICOM MB, cache MB and their ratio (mean and worst study);
3. training step time and the share of wall time the loop waits for data, for both training scripts;
4. inference seconds per study (whole pipeline, no cache and a cold cache) and peak resident memory.
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
    parser.add_argument("--data-dir", default="",
                        help="an existing synthetic or competition set (default: make one)")
    parser.add_argument("--out-dir", default="",
                        help="a run folder to write into (default: a temporary one)")
    parser.add_argument("--studies", type=int, default=12,
                        help="training studies of the generated set (test: half)")
    parser.add_argument("--size", type=int, default=160,
                        help="frame size of the generated set (real data: 512)")
    parser.add_argument("--steps", type=int, default=0,
                        help="epochs are cut to this many steps (0: whole epochs)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="landmark input size (default: 96, or 160 at real "
        "frame sizes, as the README's real-data recipe)",
    )
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader workers, as the training scripts' default")
    parser.add_argument("--quick", action="store_true", help="a small set and short runs")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (160 if args.size >= synthetic.REAL_FRAME else 96)
    return args


def naive_load(series_dir, size):
    """The baseline a first notebook writes: one dcmread per file, instance-number order, PIL
    resize."""
    datasets = [pydicom.dcmread(os.path.join(series_dir, name)) for name in os.listdir(series_dir)]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    return np.stack(
        [
            np.asarray(Image.fromarray(ds.pixel_array.astype(np.float32)).resize((size, size)))
            for ds in datasets
        ]
    )


def series_dirs(data_dir, split, max_series):
    root = os.path.join(data_dir, f"{split}_images")
    return [
        os.path.join(root, s, t)
        for s in sorted(os.listdir(root))
        for t in sorted(os.listdir(os.path.join(root, s)))
    ][:max_series]


def bench_loading(data_dir, cache_dir, size, max_series=30):
    """{naive, cold, cached, float}: slices per second over the first max_series training series.
    cached reads every stored byte through the memory map; float also turns every pixel into float32
    at full resolution, which the networks' inputs do only for the slices they use (at 512 px that
    conversion, not the disk, bounds it).
    """
    folders = series_dirs(data_dir, "train", max_series)
    n_slices = sum(len(os.listdir(d)) for d in folders)
    shutil.rmtree(cache_dir, ignore_errors=True)
    rates = {}
    for name, load in (("naive", lambda d: naive_load(d, size)),
                       ("cold", lambda d: data.load_series(d, cache_dir)),
                       ("cached", lambda d: np.array(data.load_series(d, cache_dir).volume.stored)),
                       ("float", lambda d: np.asarray(data.load_series(d, cache_dir).volume))):
        started = time.perf_counter()
        for folder in folders:
            load(folder)
        rates[name] = n_slices / (time.perf_counter() - started)
    return rates


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _,
               names in os.walk(folder) for name in names)


def bench_storage(data_dir, split, cache_root):
    """(DICOM MB, cache MB) per study of a split, each study cached into its own folder."""
    root, sizes = os.path.join(data_dir, f"{split}_images"), []
    for study in sorted(os.listdir(root)):
        study_cache = os.path.join(cache_root, study)
        for series in sorted(os.listdir(os.path.join(root, study))):
            data.load_series(os.path.join(root, study, series), study_cache)
        sizes.append(
            (folder_bytes(os.path.join(root, study)) / 1e6, folder_bytes(study_cache) / 1e6)
        )
    return np.array(sizes)


def peak_rss_gib():
    """Peak resident memory of this process and of its finished children, GiB (Linux reports
    KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20


def bench_training(data_dir, run_dir, cache_dir, args):
    """{landmarks, severity}: (seconds per step, data-wait share) from one epoch of each script's
    own log."""
    common = ["--data-dir", data_dir, "--out-dir", run_dir, "--cache-dir", cache_dir,
              "--all-studies", "--epochs", "1", "--num-workers", str(args.num_workers), "--device",
              args.device]
    train_landmarks.main(common + ["--image-size", str(args.image_size), "--overlays", "0"]
                         + (["--overfit-batches", str(args.steps)] if args.steps else []))
    train_severity.main(common + (["--overfit-batches", str(args.steps)] if args.steps else []))
    out = {}
    for name, logs in (("landmarks", [f"landmarks_{t}.csv" for t in ("sag_t2", "sag_t1", "axial")]),
                       ("severity", ["severity.csv"])):
        rows = pd.concat([pd.read_csv(os.path.join(run_dir, log)) for log in logs])
        out[name] = (float(rows["seconds"].sum() / rows["step"].sum()),
                     float(np.average(rows["data_wait"], weights=rows["seconds"])))
    return out


def bench_inference(data_dir, run_dir, cache_dir, args):
    """Seconds per test study through the whole pipeline, with no cache ('') or a cold one."""
    study_ids = sorted(
        pd.read_csv(os.path.join(data_dir, "test_series_descriptions.csv"))["study_id"].unique()
    )
    started = time.perf_counter()
    infer.main(
        ["--data-dir", data_dir, "--out-dir", run_dir, "--cache-dir", cache_dir, "--split", "test",
         "--severity-checkpoints", os.path.join(run_dir, "severity_last.pt"), "--device",
         args.device, "--no-score"]
    )
    return (time.perf_counter() - started) / len(study_ids)


def main(argv=None):
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_")
    data_dir = args.data_dir or os.path.join(scratch, "data")
    if not args.data_dir:
        studies = min(args.studies, 6) if args.quick else args.studies
        synthetic.make_dataset(data_dir, studies, max(studies // 2, 2), seed=11, size=args.size)
    run_dir, cache_dir = args.out_dir or os.path.join(scratch, "run"), os.path.join(
        scratch, "cache"
    )
    if args.quick and not args.steps:
        args.steps = 4
    rates = bench_loading(data_dir, cache_dir, args.image_size, max_series=9 if args.quick else 30)
    for name, rate in rates.items():
        print(f"loading {name:7s} {rate:9.1f} slices/s")
    print(
        f"loading cached/naive {rates['cached'] / rates['naive']:.1f}x "
        f"(float/naive {rates['float'] / rates['naive']:.1f}x)"
    )
    storage = bench_storage(data_dir, "test", os.path.join(scratch, "cache_storage"))
    ratio = storage[:, 1] / storage[:, 0]
    print(
        f"storage per study: DICOM {storage[:, 0].mean():.1f} MB, "
        f"cache {storage[:, 1].mean():.1f} MB, cache/DICOM mean "
        f"{ratio.mean():.2f}, worst {ratio.max():.2f} ({len(storage)} studies)"
    )
    training = bench_training(data_dir, run_dir, cache_dir, args)
    for name, (step, wait) in training.items():
        print(f"training {name:9s} {step:6.3f} s/step, data wait {100 * wait:4.1f} % of wall time")
    train_peak = peak_rss_gib()
    print(f"training peak resident memory {train_peak:.2f} GiB")
    uncached = bench_inference(data_dir, run_dir, "", args)
    cold = bench_inference(data_dir, run_dir, os.path.join(scratch, "cache_infer"), args)
    print(
        f"inference {uncached:.2f} s/study without a cache, "
        f"{cold:.2f} s/study with a cold cache (whole pipeline), "
        f"peak resident memory {peak_rss_gib():.2f} GiB"
    )
    print(
        f"summary: {args.size} px frames; "
        f"cached loading {rates['cached'] / rates['naive']:.1f}x naive; "
        f"cache/DICOM {ratio.mean():.2f} (worst {ratio.max():.2f}); "
        f"step landmarks {training['landmarks'][0]:.2f} s, "
        f"severity {training['severity'][0]:.2f} s; "
        f"data wait landmarks {100 * training['landmarks'][1]:.1f} %, "
        f"severity {100 * training['severity'][1]:.1f} %; "
        f"inference {uncached:.2f} s/study (cold cache {cold:.2f}); "
        f"peak memory {peak_rss_gib():.2f} GiB"
    )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
