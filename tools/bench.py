"""Speed and size of the data path, networks, training loops and inference on a synthetic set.

    # demo-sized frames (160 px), a few minutes on 2 CPU cores
    python tools/bench.py --quick
    # real frame size: 512-640 px, real fields of view and slice counts
    python tools/bench.py --size 512 --studies 6 --quick
    # the networks beside their loaders only, at real frame size
    python tools/bench.py --size 512 --studies 6 --parts networks
    # on an existing set and trained run
    python tools/bench.py --data-dir demo --out-dir runs/demo

Prints one line per figure and a final summary line:
1. series loading in slices/s: a naive baseline (per slice pydicom.dcmread + pixel_array + PIL
   resize, sorted by instance number), load_series cold (decoding, writing the cache), cached
   (memory map, every stored byte read) and float (cached, every pixel also converted to float32 at
   full resolution);
2. storage per study: DICOM MB, cache MB and their ratio (mean and worst study);
3. training step time and the share of wall time the loop waits for data, for both training scripts;
4. inference seconds per study (whole pipeline, no cache and a cold cache) and peak resident memory;
5. networks: per network the GFLOP of one training step (FlopCounterMode), seconds per step and
   GFLOP/s on this device with the scripts' precision, the studies a second it consumes, the same
   estimated for a GPU from the FLOPs (--gpu-tflops), and beside it the studies a second one loader
   worker delivers (CPU seconds, one thread, no network): how many workers keep a GPU fed.
"""

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pydicom
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "datasets")]  # data.py & co., and synthetic.py

import data
import infer
import synthetic
import tables
import train_landmarks
import train_severity
import training
from models import LandmarkNet, SeverityNet


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
    parser.add_argument("--parts", default="loading,storage,training,inference,networks",
                        help="what to measure, comma separated (networks: FLOPs and step rates "
                             "of each network beside its loader's studies a second)")
    parser.add_argument("--gpu-tflops", type=float, default=30.0,
                        help="achieved TFLOP/s for the GPU estimate (about what ResNet-18 "
                             "training reaches in mixed precision on an A100-class card)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (160 if args.size >= synthetic.REAL_FRAME else 96)
    args.parts = set(args.parts.split(","))
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


def network_cases(args):
    """(name, network, inputs, studies per step) at the training scripts' default batch shapes."""
    landmark = train_landmarks.parse_args(["--data-dir", "", "--out-dir", ""])
    severity = train_severity.parse_args(["--data-dir", "", "--out-dir", ""])
    size, batch = args.image_size, landmark.batch_size
    sagittal = torch.randn(batch, landmark.train_depth, 2, size, size)  # Sagittal T1: 10 points
    yield "landmarks sagittal", LandmarkNet(10), (sagittal,), batch
    axial = torch.randn(batch * 8, 1, 2, size, size)  # one slice per level and series
    yield "landmarks axial", LandmarkNet(2), (axial,), batch * 8 / data.N_LEVELS
    n_crops = severity.batch_size * data.N_LABELS
    crops = torch.randn(n_crops, severity.n_slices, severity.crop_px, severity.crop_px)
    groups = torch.randint(0, len(data.GROUPS), (n_crops,))
    yield "severity", SeverityNet(severity.n_slices), (crops, groups), severity.batch_size


def training_step(net, inputs, optimizer, autocast):
    with autocast:
        out = net(*inputs)
    loss = out.float().square().mean()  # a stand-in loss: the network is what is measured
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def seconds_per_step(net, inputs, autocast, device, steps=5):
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    training_step(net, inputs, optimizer, autocast)  # warm-up: allocations, kernel choice
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(net, inputs, optimizer, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def bench_networks(args, device):
    """{name: (GFLOP per training step, seconds per step, studies per step)}: forward, backward and
    AdamW at the scripts' batch shapes, with their precision on this device (training.
    autocast_context: bfloat16 on CUDA and on a CPU that does it natively)."""
    autocast, _ = training.autocast_context(device, amp=True)
    out = {}
    for name, net, inputs, studies in network_cases(args):
        optimizer = torch.optim.AdamW(net.parameters())
        with FlopCounterMode(display=False) as counter:  # the count is the same in any precision
            training_step(net, inputs, optimizer, contextlib.nullcontext())
        net = net.to(device)
        inputs = tuple(t.to(device) for t in inputs)
        out[name] = (counter.get_total_flops() / 1e9,
                     seconds_per_step(net, inputs, autocast, device), studies)
    return out


def loader_datasets(data_dir, cache_dir, args):
    """{name: the training Dataset, augmented}, as the training scripts build them."""
    where = ["--data-dir", data_dir, "--out-dir", "", "--cache-dir", cache_dir]
    landmark = train_landmarks.parse_args(where + ["--image-size", str(args.image_size)])
    labelled = tables.labelled_series(data_dir, "train")
    sagittal = train_landmarks.items_of_type("sag_t1", labelled, landmark)
    names = data.POINTS_OF_SERIES[data.TAG_SERIES["sag_t1"]]
    axial = train_landmarks.items_of_type("axial", labelled, landmark)
    severity = train_severity.parse_args(where)
    studies = train_severity.labelled_studies(data_dir)
    return {"landmarks sagittal": train_landmarks.SagittalDataset(sagittal, names, landmark, True),
            "landmarks axial": train_landmarks.AxialDataset(axial, landmark, True),
            "severity": train_severity.StudyCrops(studies, severity, True)}


def bench_loader(data_dir, cache_dir, args, max_items=24):
    """{name: studies a second}: one loader process reading the training samples of max_items
    studies, augmented, no network, on a warm cache. Timed in CPU seconds with one thread, as a
    DataLoader worker runs, so another job on the machine does not change the figure."""
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    for name, dataset in loader_datasets(data_dir, cache_dir, args).items():
        studies = {dataset.study_of(i) for i in range(len(dataset))}
        samples_per_study = len(dataset) / len(studies)
        count = min(len(dataset), int(max_items * samples_per_study))
        for i in range(count):  # warm: the cache files exist
            dataset[i]
        started = time.process_time()
        for i in range(count):
            dataset[i]
        out[name] = count / samples_per_study / (time.process_time() - started)
    torch.set_num_threads(threads)
    return out


def print_rates(networks, loader, device, gpu_tflops):
    """The loader's studies a second per worker beside what each network consumes: measured on
    this device, and estimated from its FLOPs at gpu_tflops achieved."""
    print(f"network step on {device} (forward + backward + AdamW), loader with no network:")
    print("  name                GFLOP/step  s/step  GFLOP/s  net studies/s  "
          f"GPU@{gpu_tflops:g}TF studies/s  loader studies/s/worker  workers for GPU")
    for name, (gflop, seconds, studies) in networks.items():
        gpu_rate = studies / (gflop / (gpu_tflops * 1e3))
        workers = gpu_rate / loader[name]
        print(f"  {name:18s}  {gflop:10.1f}  {seconds:6.3f}  {gflop / seconds:7.0f}  "
              f"{studies / seconds:13.1f}  {gpu_rate:20.0f}  {loader[name]:23.1f}  "
              f"{workers:15.1f}")


def report_loading(data_dir, cache_dir, args):
    rates = bench_loading(data_dir, cache_dir, args.image_size, max_series=9 if args.quick else 30)
    for name, rate in rates.items():
        print(f"loading {name:7s} {rate:9.1f} slices/s")
    ratio = rates["cached"] / rates["naive"]
    print(f"loading cached/naive {ratio:.1f}x (float/naive {rates['float'] / rates['naive']:.1f}x)")
    return [f"cached loading {ratio:.1f}x naive"]


def report_storage(data_dir, scratch):
    storage = bench_storage(data_dir, "test", os.path.join(scratch, "cache_storage"))
    ratio = storage[:, 1] / storage[:, 0]
    print(
        f"storage per study: DICOM {storage[:, 0].mean():.1f} MB, "
        f"cache {storage[:, 1].mean():.1f} MB, cache/DICOM mean "
        f"{ratio.mean():.2f}, worst {ratio.max():.2f} ({len(storage)} studies)"
    )
    return [f"cache/DICOM {ratio.mean():.2f} (worst {ratio.max():.2f})"]


def report_training(data_dir, run_dir, cache_dir, args):
    steps = bench_training(data_dir, run_dir, cache_dir, args)
    for name, (step, wait) in steps.items():
        print(f"training {name:9s} {step:6.3f} s/step, data wait {100 * wait:4.1f} % of wall time")
    print(f"training peak resident memory {peak_rss_gib():.2f} GiB")
    return [f"step {name} {step:.2f} s (data wait {100 * wait:.1f} %)"
            for name, (step, wait) in steps.items()]


def report_inference(data_dir, run_dir, scratch, args):
    uncached = bench_inference(data_dir, run_dir, "", args)
    cold = bench_inference(data_dir, run_dir, os.path.join(scratch, "cache_infer"), args)
    print(
        f"inference {uncached:.2f} s/study without a cache, "
        f"{cold:.2f} s/study with a cold cache (whole pipeline), "
        f"peak resident memory {peak_rss_gib():.2f} GiB"
    )
    return [f"inference {uncached:.2f} s/study (cold cache {cold:.2f})"]


def report_networks(data_dir, cache_dir, args):
    device = training.resolve_device(args.device)
    networks = bench_networks(args, device)
    loader = bench_loader(data_dir, cache_dir, args)
    print_rates(networks, loader, device, args.gpu_tflops)
    return [f"{name} loader {loader[name]:.1f} studies/s/worker" for name in networks]


def main(argv=None):
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_")
    data_dir = args.data_dir or os.path.join(scratch, "data")
    if not args.data_dir:
        studies = min(args.studies, 6) if args.quick else args.studies
        synthetic.make_dataset(data_dir, studies, max(studies // 2, 2), seed=11, size=args.size)
    run_dir = args.out_dir or os.path.join(scratch, "run")
    cache_dir = os.path.join(scratch, "cache")
    if args.quick and not args.steps:
        args.steps = 4
    summary = [f"{args.size} px frames" if not args.data_dir else data_dir]
    if "loading" in args.parts:
        summary += report_loading(data_dir, cache_dir, args)
    if "storage" in args.parts:
        summary += report_storage(data_dir, scratch)
    if "training" in args.parts or "inference" in args.parts:  # inference needs the checkpoints
        summary += report_training(data_dir, run_dir, cache_dir, args)
    if "inference" in args.parts:
        summary += report_inference(data_dir, run_dir, scratch, args)
    if "networks" in args.parts:
        summary += report_networks(data_dir, cache_dir, args)
    print(f"summary: {'; '.join(summary)}; peak memory {peak_rss_gib():.2f} GiB")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
