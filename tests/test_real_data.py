"""What real data brings and small synthetic studies hide: labels spread over several series of a
type, and a series cache that must fit the disk, survive a full or read-only folder, and be shared
by several processes.
"""

import errno
import multiprocessing
import os
import warnings

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

import cache
import data
import inputs
import predict
import synthetic
import train_severity
from conftest import write_frame


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Four small training studies whose axial labels are all spread over two series: with this seed
    two have their levels apart and two their sides (checked below)."""
    out = tmp_path_factory.mktemp("split")
    synthetic.make_dataset(str(out), 4, 0, seed=3, size=48, workers=1, split_axial=1.0)
    assert (
        sorted(pd.read_csv(out / "quirks.csv")["quirk"])
        == ["split_axial_levels"] * 2 + ["split_axial_sides"] * 2
    )
    return out


def _series_dir(tmp_path, frames=6, size=32, seed=0):
    folder = tmp_path / "series"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for k in range(frames):
        write_frame(folder / f"{k + 1}.dcm", rng.integers(0, 3000, (size, size)), (0, 0, 4.0 * k),
                    instance=k + 1)
    return folder


# -----------------------------------------------------------------------------
# several series of one type


def test_every_label_is_cropped_from_its_own_series(split):
    entries = train_severity.labelled_studies(str(split))
    spread = 0
    for entry in entries:
        study, landmarks = train_severity.load_labelled_study(entry, str(split / "cache"))
        axial_series = {p.series_id for (c, _), p in entry.points.items() if "subarticular" in c}
        spread += len(axial_series) > 1
        assert len(landmarks) == len(entry.points)
        for name, landmark in landmarks.items():
            point = entry.points[name]
            assert landmark.series_id == point.series_id
            assert (
                study[landmark.series_id].series.instance_numbers[landmark.slice]
                == point.instance_number
            )
    assert spread == len(entries)  # the fixture really spreads every study's axial labels
    # training's jitter never moves a crop off its label's series, nor out of its stack
    for entry in entries:
        study, landmarks = train_severity.load_labelled_study(entry, str(split / "cache"))
        for name, moved in inputs.jitter_landmarks(study, landmarks, 7.0, 3).items():
            series = study[moved.series_id].series
            assert moved.series_id == entry.points[name].series_id
            assert series.stack_ids[moved.slice] == series.stack_ids[landmarks[name].slice]


def test_same_seed_with_and_without_split_writes_the_same_patients(split, tmp_path):
    """Split-vs-single comparisons are paired: --split-axial 0 with the same seed writes the same
    patients, grades and sagittal series, and a sides-split study keeps its left labels on the same
    axial series as its single version.
    """
    synthetic.make_dataset(str(tmp_path), 4, 0, seed=3, size=48, workers=1, split_axial=0.0)
    assert (tmp_path / "train.csv").read_text() == (split / "train.csv").read_text()
    single = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    spread = pd.read_csv(split / "train_label_coordinates.csv")
    sagittal = ~single["condition"].str.contains("Subarticular")
    pd.testing.assert_frame_equal(single[sagittal].reset_index(drop=True),
                                  spread[sagittal].reset_index(drop=True))
    sides = pd.read_csv(split / "quirks.csv").query("quirk == 'split_axial_sides'")["study_id"]
    left = single["study_id"].isin(sides) & single["condition"].str.startswith("Left Subarticular")
    pd.testing.assert_frame_equal(single[left].reset_index(drop=True),
                                  spread[left].reset_index(drop=True))
    series = single.loc[sagittal].iloc[0]
    folder = f"train_images/{series.study_id}/{series.series_id}/{series.instance_number}.dcm"
    assert np.array_equal(pydicom.dcmread(tmp_path / folder).pixel_array,
                          pydicom.dcmread(split / folder).pixel_array)


def _axial_series(z_positions, size=100):
    """An axial stack (columns toward the patient's left, rows posterior), 1 mm pixels, centred
    on x = y = 0."""
    depth = len(z_positions)
    return data.Series(volume=np.zeros((depth, size, size), np.float32),
                       instance_numbers=np.arange(1, depth + 1),
                       positions=np.array([[-49.5, -49.5, z] for z in z_positions]),
                       orientations=np.tile([1.0, 0, 0, 0, 1, 0], (depth, 1)),
                       pixel_spacing=np.ones((depth, 2)),
                       original_sizes=np.tile([size, size], (depth, 1)),
                       stack_ids=np.zeros(depth, np.int64), intensity_range=np.array([0.0, 1.0]))


def test_covering_slice_is_the_nearest_within_two_slice_gaps():
    series = _axial_series([10.0, 14.0, 18.0])
    assert data.covering_slice(series, [0, 0, 13.0]) == (1, 1.0)
    # within two gaps (8 mm) past the last slice
    assert (data.covering_slice(series, [0, 0, 25.9])[0] == 2)
    assert (data.covering_slice(series, [0, 0, 26.5]) is None
            and data.covering_slice(series, [0, 0, 1.0]) is None)
    assert data.covering_slice(series, [80.0, 0, 14.0]) is None  # outside the field of view


def test_each_level_comes_from_the_axial_series_that_covers_it_and_an_uncovered_one_is_named(
    monkeypatch,
):
    upper, lower = _axial_series([16.0 + 4 * k for k in range(9)]), _axial_series(
        [-28.0 + 4 * k for k in range(7)]
    )
    # one sagittal slice at x = 0: columns run posterior, rows inferior from z = 60
    sagittal = _axial_series([0.0])
    sagittal.positions[:], sagittal.orientations[:] = [0.0, -49.5, 60.0], [0, 1, 0, 0, 0, -1]
    study = {1: data.StudySeries("Sagittal T2/STIR", 1, sagittal),
             2: data.StudySeries("Axial T2", 2, upper), 3: data.StudySeries("Axial T2", 3, lower)}
    # L1/L2 .. L5/S1; the upper series covers 16..48 mm, the lower -28..-4
    level_z = np.array([40.0, 20.0, 0.0, -20.0, -40.0])
    # (slice, col, row) of x = y = 0 at each level
    canal = np.stack([np.zeros(5), np.full(5, 49.5), 60.0 - level_z], axis=1)
    monkeypatch.setattr(predict, "predict_sagittal", lambda model, series, size, device,
                        allowed_cells=None: (canal, np.ones(5)))
    monkeypatch.setattr(predict, "predict_axial", lambda model, series, d, size,
                        device: (np.array([[60.0, 50], [40, 50]]), np.ones(2)))
    landmark_models = {"sag_t2": (object(), dict(image_size=32)),
                       "axial": (object(), dict(image_size=32))}
    found, notes = predict.predict_landmarks(landmark_models, study, torch.device("cpu"))
    chosen = {
        level: found[("left_subarticular_stenosis", level)]
        for level in data.LEVELS
        if ("left_subarticular_stenosis", level) in found
    }
    assert {level: lm.series_id for level, lm in chosen.items()} == {"l1_l2": 2, "l2_l3": 2,
                                                                     "l3_l4": 3, "l4_l5": 3}
    assert (upper.positions[chosen["l1_l2"].slice, 2] == 40.0
            and lower.positions[chosen["l4_l5"].slice, 2] == -20.0)
    assert notes == ["level L5/S1 lies outside every Axial T2 series"]


# -----------------------------------------------------------------------------
# the series cache


def test_cached_series_is_what_the_networks_read_and_smaller_than_its_dicom(tmp_path):
    folder = _series_dir(tmp_path, size=64)
    plain = data.load_series(str(folder))
    cold = data.load_series(str(folder), str(tmp_path / "cache"))
    warm = data.load_series(str(folder), str(tmp_path / "cache"))
    assert isinstance(warm.volume.stored, np.memmap)  # one slice is read without the rest
    exact = cache.normalise(plain.volume, plain.intensity_range)
    for series in (cold, warm):
        np.testing.assert_allclose(cache.normalise(series.volume, series.intensity_range), exact,
                                   atol=cache.QUANTUM / 2 + 1e-6)
        np.testing.assert_allclose(cache.normalise(series.volume[2:3], series.intensity_range),
                                   exact[2:3], atol=cache.QUANTUM / 2 + 1e-6)
    # cold and warm runs see the same
    np.testing.assert_array_equal(np.asarray(cold.volume), np.asarray(warm.volume))
    cached_bytes = sum(
        os.path.getsize(tmp_path / "cache" / name) for name in os.listdir(tmp_path / "cache")
    )
    assert cached_bytes <= sum(os.path.getsize(folder / name) for name in os.listdir(folder))


def test_corrupt_cache_files_are_a_miss(tmp_path):
    folder = _series_dir(tmp_path)
    reference = np.asarray(data.load_series(str(folder), str(tmp_path / "cache")).volume)
    for suffix in (".npy", ".pkl"):
        for name in os.listdir(tmp_path / "cache"):
            if name.endswith(suffix):
                with open(tmp_path / "cache" / name, "r+b") as handle:
                    handle.truncate(40)
        np.testing.assert_array_equal(
            np.asarray(data.load_series(str(folder), str(tmp_path / "cache")).volume), reference
        )


def test_a_cache_folder_that_cannot_be_written_loses_no_series(tmp_path, monkeypatch):
    folder = _series_dir(tmp_path)
    reference = np.asarray(data.load_series(str(folder), str(tmp_path / "good")).volume)
    # like a read-only folder: makedirs fails
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            np.testing.assert_array_equal(
                np.asarray(data.load_series(str(folder), str(tmp_path / "file" / "cache")).volume),
                reference,
            )
    # warned once, not per series
    assert (len([w for w in caught if "cannot write the series cache" in str(w.message)]) == 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        np.testing.assert_array_equal(
            np.asarray(data.load_series(str(folder), str(tmp_path / "full")).volume), reference
        )
    # no temporary left behind
    assert not [name for name in os.listdir(tmp_path / "full") if name.endswith(".tmp.npy")]


def _load_in_process(folder, cache_dir, barrier, results, index):
    barrier.wait()  # both start decoding the cold series at once
    results[index] = np.asarray(data.load_series(folder, cache_dir).volume).tobytes()


def test_two_processes_sharing_a_cold_cache_both_get_the_right_volume(tmp_path):
    folder = _series_dir(tmp_path, frames=12, size=96)
    reference = np.asarray(data.load_series(str(folder), str(tmp_path / "reference")).volume)
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        cache_dir, barrier, manager = (str(tmp_path / f"shared{attempt}"), context.Barrier(2),
                                       context.Manager())
        results = manager.dict()
        workers = [
            context.Process(target=_load_in_process,
                            args=(str(folder), cache_dir, barrier, results, i))
            for i in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [w.exitcode for w in workers] == [0, 0]
        for index in range(2):
            assert results[index] == reference.tobytes()
        np.testing.assert_array_equal(np.asarray(data.load_series(str(folder), cache_dir).volume),
                                      reference)
        manager.shutdown()
