"""Decoded series kept on disk between epochs and runs: what the networks read, one byte a pixel,
memory-mapped.

Network inputs see a series' intensities scaled so that its 1st..99.5th percentile maps to 0..1,
clipped to [0, 1.5] (normalise, here: the one home of that window). The cache keeps exactly that,
as uint8 steps of 1.5 / 255
(0.6 % of the range, below the scanner noise), at full resolution: a cached series takes at most
half the bytes of its 16-bit pixels, so less disk than its DICOM files unless they compress better
than 2:1. Values outside the range come back clipped. The volume is a .npy file read through a
memory map, so one slice is read without the rest.

    stored = quantise(volume, intensity_range)        # (D, H, W) uint8
    write(path, stored, fields); stored, fields = read(path)
    # indexing gives float32 in the series' own units
    volume = StoredVolume(stored, intensity_range, path)

A cache that cannot be written (disk full, read-only folder) warns once and the run carries on
without it; a missing, half-written or corrupt cache file is a miss, never an error.
"""

import contextlib
import hashlib
import os
import pickle
import uuid
import warnings

import numpy as np

VERSION = "v4"  # part of every key: a change of format never reads old files
INTENSITY_PERCENTILES = 1.0, 99.5  # a series' intensity_range: these map to 0 and 1
INTENSITY_CLIP = 1.5  # normalised intensities are clipped to [0, 1.5]: fluid and fat stay apart
QUANTUM = INTENSITY_CLIP / 255  # normalised intensity per uint8 step
_warned_folders = set()  # cache folders already warned about in this process


class StoredVolume:
    """A cached (D, H, W) volume: indexing gives float32 in the series' units, read only where
    indexed. path: its cache file stem, under which smaller copies of it are kept (resized)."""

    def __init__(self, stored, intensity_range, path):
        self.stored, self.shape, self.dtype = stored, stored.shape, np.dtype(np.float32)
        self.path = path
        low, high = (float(v) for v in intensity_range)
        self.scale, self.offset = np.float32(QUANTUM * max(high - low, 1e-6)), np.float32(low)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return np.asarray(self.stored[index], np.float32) * self.scale + self.offset

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


def resized(volume, size, shrink):
    """(D, size, size) uint8: a StoredVolume's stored bytes shrunk by shrink(stored, size), made
    once and kept beside the volume, so that a training epoch reads a small file instead of
    shrinking every full-size slice again (at 512 px most of a sagittal sample's loading time)."""
    path = f"{volume.path}_{size}px"
    found = read(path)
    if found is not None:
        return found[0]
    small = np.asarray(shrink(np.asarray(volume.stored), size))
    write(path, small, {})
    return small


def normalise(volume, intensity_range):
    """What the networks read: intensity_range (low, high) mapped to (0, 1), clipped to
    [0, INTENSITY_CLIP], float32."""
    low, high = (float(v) for v in intensity_range)
    scaled = (np.asarray(volume, np.float32) - low) / max(high - low, 1e-6)
    return np.clip(scaled, 0.0, INTENSITY_CLIP).astype(np.float32)


def normalised(volume, index, intensity_range):
    """normalise(volume[index]) for either kind of volume: a StoredVolume already holds exactly
    that as bytes, so they are scaled by QUANTUM instead of being turned into scanner units and
    normalised again."""
    if isinstance(volume, StoredVolume):
        return volume.stored[index] * np.float32(QUANTUM)
    return normalise(volume[index], intensity_range)


def quantise(volume, intensity_range):
    """(D, H, W) volume -> uint8 of its normalised intensities, QUANTUM a step."""
    return np.rint(normalise(volume, intensity_range) / QUANTUM).astype(np.uint8)


def path_of(series_dir, names, cache_dir):
    """Cache file stem of a series: its folder name and a hash of its path and every file's name,
    size and mtime."""
    stats = [(n, os.stat(os.path.join(series_dir, n))) for n in names]
    signature = VERSION + "|" + "|".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in stats)
    key = hashlib.sha1((os.path.abspath(series_dir) + signature).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(series_dir))}_{key}")


def read(path):
    """(stored uint8 memmap (D, H, W), the other fields) of a cached series, or None for any
    miss."""
    try:
        # written last: present means the volume is complete
        with open(path + ".pkl", "rb") as handle:
            fields = pickle.load(handle)
        stored = np.load(path + ".npy", mmap_mode="r")
        shape = fields.pop("shape")
        return (
            (stored, fields) if stored.dtype == np.uint8 and stored.shape == tuple(shape) else None
        )
    except Exception:  # noqa: BLE001 - absent, truncated, or not ours: decode the series again
        return None


def write(path, stored, fields):
    """Write the volume and the series' other fields; on an OSError warn once per folder and carry
    on.

    Every writer uses its own temporary names and renames them into place, volume first and fields
    last, so processes sharing a cold cache (torchrun ranks, loader workers) never read each other's
    half-written files.
    """
    temporary = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(temporary + ".npy", "wb") as handle:
            np.save(handle, stored)
        os.replace(temporary + ".npy", path + ".npy")
        with open(temporary + ".pkl", "wb") as handle:
            pickle.dump(dict(fields, shape=stored.shape), handle, protocol=5)
        os.replace(temporary + ".pkl", path + ".pkl")
    except OSError as error:  # disk full, read-only folder: the series itself is fine
        for leftover in (temporary + ".npy", temporary + ".pkl"):
            with contextlib.suppress(OSError):
                os.remove(leftover)
        folder = os.path.dirname(path)
        if folder not in _warned_folders:
            _warned_folders.add(folder)
            warnings.warn(
                f"{folder}: cannot write the series cache ({type(error).__name__}: {error}); "
                "carrying on without it"
            )
