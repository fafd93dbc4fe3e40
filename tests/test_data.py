import shutil

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

import cache
import data
import tables
from conftest import write_frame


def _series_dir(tmp_path, names):
    folder = tmp_path / "series"
    folder.mkdir()
    for i, name in enumerate(names):
        shutil.copy(get_testdata_file(name), folder / f"{i + 1}.dcm")
    return folder


@pytest.mark.parametrize("variant",
                         ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_bundled_real_mr_variants_decode_to_identical_pixels(tmp_path, variant):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    reference = data.load_series(_series_dir(tmp_path / "a", ["MR_small.dcm"]))
    other = data.load_series(_series_dir(tmp_path / "b", [variant]))
    assert reference.volume.shape == (1, 64, 64)
    assert reference.volume.std() > 0
    np.testing.assert_array_equal(reference.volume, other.volume)
    np.testing.assert_allclose(other.positions[0], [-83.9063, -91.2, 6.6406])


def test_truncated_file_alone_gives_clear_error_naming_it(tmp_path):
    folder = _series_dir(tmp_path, ["MR_truncated.dcm"])
    with pytest.warns(UserWarning, match="1.dcm"), pytest.raises(
        ValueError, match="no readable DICOM slice.*1.dcm"
    ):
        data.load_series(folder)


def test_truncated_file_among_good_ones_is_skipped_with_warning(tmp_path):
    folder = _series_dir(tmp_path, ["MR_small.dcm", "MR_truncated.dcm"])
    with pytest.warns(UserWarning, match=r"2\.dcm: unreadable"):
        series = data.load_series(folder)
    assert len(series.volume) == 1


def test_undecodable_compression_names_file_and_packages(tmp_path):
    folder = _series_dir(tmp_path, ["MR_small_jpeg_ls_lossless.dcm"])
    try:
        import pyjpegls  # noqa: F401
        pytest.skip("a JPEG-LS decoder is installed here")
    except ImportError:
        pass
    with pytest.raises(data.DecoderMissing, match=r"(?s)1\.dcm: cannot decode JPEG-LS.*pylibjpeg"):
        data.load_series(folder)


def _axial_stack(tmp_path, instance_numbers, z_values, **kwargs):
    folder = tmp_path / "stack"
    folder.mkdir()
    for k, (instance, z) in enumerate(zip(instance_numbers, z_values)):
        pixels = np.full((8, 10), 100 + int(z), dtype=np.uint16)  # each slice's value encodes its z
        write_frame(
            folder / f"{instance}.dcm", pixels, (-2.0, -3.0, z), instance=instance, **kwargs
        )
    return folder


@pytest.mark.parametrize("instances", [[5, 4, 3, 2, 1], [107, 108, 109, 111, 115], [1, 3, 5, 2, 4]])
def test_spatial_order_ignores_instance_numbers(tmp_path, instances):
    z_values = [40.0, 10.0, 30.0, 0.0, 20.0]
    series = data.load_series(_axial_stack(tmp_path, instances, z_values))
    assert series.positions[:, 2].tolist() == sorted(z_values)
    assert series.volume[:, 0, 0].tolist() == [100 + z for z in sorted(z_values)]
    expected_instances = [instances[z_values.index(z)] for z in sorted(z_values)]
    assert series.instance_numbers.tolist() == expected_instances


def test_monochrome1_rescale_and_rle_give_true_values(tmp_path):
    truth = np.arange(6 * 7, dtype=np.float32).reshape(6, 7) * 10 + 500  # the intended intensities
    cases = {"plain": dict(pixels=truth),
             "monochrome1": dict(pixels=65535 - truth, photometric="MONOCHROME1"),
             "rescaled": dict(pixels=(truth + 1024) / 2, slope=2.0, intercept=-1024.0),
             "rle": dict(pixels=truth, rle=True)}
    for name, kwargs in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        write_frame(folder / "1.dcm", position=(0, 0, 0), **kwargs)
        np.testing.assert_array_equal(data.load_series(folder).volume[0], truth, err_msg=name)


def test_mixed_frame_sizes_resized_with_consistent_geometry(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in range(3):
        write_frame(folder / f"{k + 1}.dcm", np.zeros((20, 20)), (0, 0, k * 4.0),
                    spacing=(1.0, 1.0), instance=k + 1)
    # frame 4 covers the same field of view at twice the resolution, bright at one known patient
    # point
    fine = np.zeros((40, 40))
    # centre at fine pixel (col 10.5, row 22.5) -> patient x = -0.25 + 10.5*0.5
    fine[22:24, 10:12] = 1000
    write_frame(folder / "4.dcm", fine, (-0.25, -0.25, 12.0), spacing=(0.5, 0.5), instance=4)
    series = data.load_series(folder)
    assert series.volume.shape == (4, 20, 20)
    assert series.original_sizes[3].tolist() == [40, 40]
    d, col, row = data.label_to_volume(series, 4, 10.5, 22.5)
    point = data.series_pixel_to_patient(series, d, col, row)
    np.testing.assert_allclose(point, [-0.25 + 10.5 * 0.5, -0.25 + 22.5 * 0.5, 12.0], atol=1e-9)
    # the bright spot is where geometry says
    assert (series.volume[3, int(round(row)), int(round(col))] > 100)
    np.testing.assert_allclose(series.pixel_spacing[3], [1.0, 1.0])


def test_cache_returns_same_series_and_notices_changed_files(tmp_path):
    folder = _axial_stack(tmp_path, [1, 2, 3], [0.0, 5.0, 10.0])
    first = data.load_series(folder, cache_dir=tmp_path / "cache")
    cached = data.load_series(folder, cache_dir=tmp_path / "cache")
    for field in first.__dict__:
        np.testing.assert_array_equal(getattr(first, field), getattr(cached, field))
    write_frame(folder / "2.dcm", np.full((8, 10), 7, dtype=np.uint16), (-2.0, -3.0, 5.0),
                instance=2)
    changed = data.load_series(folder, cache_dir=tmp_path / "cache")
    assert changed.volume[1, 0, 0] == 7


def test_geometry_round_trips_and_known_point():
    # known: axial frame, IPP (-100, -100, 30), 0.5 mm pixels; pixel
    # (col 10, row 20) -> (-95, -90, 30)
    np.testing.assert_allclose(
        data.pixel_to_patient([-100, -100, 30], [1, 0, 0, 0, 1, 0], [0.5, 0.5], 10, 20),
        [-95, -90, 30],
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.normal(size=3); u /= np.linalg.norm(u)
        v = np.cross(u, rng.normal(size=3)); v /= np.linalg.norm(v)
        position, spacing = rng.normal(size=3) * 50, rng.uniform(0.3, 2, size=2)
        col, row = rng.uniform(0, 300, size=2)
        point = data.pixel_to_patient(position, np.r_[u, v], spacing, col, row)
        back_col, back_row, distance = data.patient_to_pixel(position, np.r_[u, v], spacing, point)
        np.testing.assert_allclose([back_col, back_row, distance], [col, row, 0], atol=1e-9)
    xy = rng.uniform(0, 100, size=(10, 2))
    np.testing.assert_allclose(
        data.to_original(data.to_resized(xy, (120, 90), (64, 48)), (120, 90), (64, 48)), xy
    )
    # pixel-centre convention: image edges map to image edges, and halving puts the border between
    # original pixels 0 and 1 (x = 0.5) on the centre of resized pixel 0
    corners = [[-0.5, -0.5], [89.5, 119.5], [0.5, 0.5]]
    np.testing.assert_allclose(data.to_resized(corners, (120, 90), (60, 45)),
                               [[-0.5, -0.5], [44.5, 59.5], [0, 0]])


def test_read_labels_on_real_train_csv_keeps_empty_cells(shared_labels):
    study_ids, labels = tables.read_labels(shared_labels / "train.csv")
    assert labels.shape == (1975, 25) and len(set(study_ids)) == 1975
    assert (labels == data.MISSING).sum() == 572
    spinal = labels[:, :5]
    assert [(spinal == k).sum() for k in range(3)] == [8664, 736, 470]  # DESIGN.md's class counts


def test_read_labels_names_file_line_and_bad_string(tmp_path):
    frame = pd.DataFrame(
        {"study_id": [1, 2], **{c: ["Normal/Mild", "Normal/Mild"] for c in data.LABEL_COLUMNS}}
    )
    frame.loc[1, "left_subarticular_stenosis_l4_l5"] = "Severe "  # trailing space is tolerated
    frame.loc[1, "spinal_canal_stenosis_l2_l3"] = "Mild"
    frame.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(
        ValueError,
        match=r"train.csv: line 3, column spinal_canal_stenosis_l2_l3: unknown severity 'Mild'",
    ):
        tables.read_labels(tmp_path / "train.csv")


def test_read_coordinates_accepts_both_spellings(shared_labels, tmp_path):
    snake = tables.read_coordinates(shared_labels / "train_label_coordinates.fix01b.csv")
    assert (len(snake) == 48809 and set(snake["condition"]) == set(data.CONDITIONS)
            and set(snake["level"]) == set(data.LEVELS))
    title = snake.head(50).copy()
    title["condition"] = title["condition"].map(dict(zip(data.CONDITIONS, data.CONDITION_NAMES)))
    title["level"] = title["level"].map(dict(zip(data.LEVELS, data.LEVEL_NAMES)))
    title.to_csv(tmp_path / "c.csv", index=False)
    pd.testing.assert_frame_equal(tables.read_coordinates(tmp_path / "c.csv"), snake.head(50))
    title.loc[3, "level"] = "L6/S1"
    title.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match=r"c.csv: line 5: unknown level 'L6/S1'"):
        tables.read_coordinates(tmp_path / "c.csv")


def test_series_descriptions_by_study_and_unknown_description(shared_labels, tmp_path):
    descriptions = tables.read_series_descriptions(shared_labels / "train_series_descriptions.csv")
    by_study = tables.series_by_study(descriptions)
    assert len(by_study) == 1975
    counts = [len(types[s]) for types in by_study.values() for s in data.SERIES_TYPES]
    assert 0 in counts and max(counts) >= 2  # some studies lack a type, some have two of one
    descriptions.loc[0, "series_description"] = "Sagittal T3"
    descriptions.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(
        ValueError, match=r"s.csv: line 2: unknown series_description 'Sagittal T3'"
    ):
        tables.read_series_descriptions(tmp_path / "s.csv")


def test_folds_are_deterministic_balanced_and_order_free():
    ids = np.arange(1000, 1103)
    folds = tables.assign_folds(ids, n_folds=5, seed=3)
    assert folds == tables.assign_folds(ids[::-1], n_folds=5, seed=3)
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1 and len(folds) == len(ids)
    assert folds != tables.assign_folds(ids, n_folds=5, seed=4)


def test_a_cached_series_is_shrunk_once_and_its_small_copy_follows_changed_files(tmp_path,
                                                                                monkeypatch):
    import cache
    import inputs

    folder = _axial_stack(tmp_path, [1, 2, 3], [0.0, 5.0, 10.0])
    series = data.load_series(folder, cache_dir=tmp_path / "cache")
    shrunk = inputs.sagittal_slices(series, 6)
    # the same bytes as shrinking the stored volume on every call
    one_by_one = inputs.resize_slices(np.array(series.volume.stored), 6).float() * cache.QUANTUM
    np.testing.assert_array_equal(shrunk, one_by_one)
    np.testing.assert_array_equal(inputs.axial_image(series, 1, 6), one_by_one[1:2])
    assert len(list((tmp_path / "cache").glob("*_6px.npy"))) == 1

    def no_shrinking(*args):
        raise AssertionError("shrunk again")

    monkeypatch.setattr(inputs, "resize_slices", no_shrinking)
    again = data.load_series(folder, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(inputs.sagittal_slices(again, 6), shrunk)  # read, not made
    monkeypatch.undo()
    write_frame(folder / "2.dcm", np.full((8, 10), 7, dtype=np.uint16), (-2.0, -3.0, 5.0),
                instance=2)
    changed = data.load_series(folder, cache_dir=tmp_path / "cache")
    assert float(inputs.axial_image(changed, 1, 6).max()) < float(shrunk[1].max())
    assert not np.array_equal(inputs.sagittal_slices(changed, 6), shrunk)


def test_network_inputs_from_the_cache_match_those_from_the_dicom_within_the_cache_steps(tmp_path):
    import cache
    import inputs

    rng = np.random.default_rng(1)
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(4):  # 4 axial slices of 120 x 100 px, smooth plus noise
        rows, cols = np.mgrid[:120, :100]
        pixels = 400 + 300 * np.sin(rows / 9.0 + k) * np.cos(cols / 13.0) + rng.normal(0, 20,
                                                                                      (120, 100))
        write_frame(folder / f"{k + 1}.dcm", pixels.clip(0).astype(np.uint16),
                    (-25.0, -30.0, 4.0 * k), instance=k + 1)
    plain = data.load_series(str(folder))  # float volume: normalise, then resize
    cached = data.load_series(str(folder), cache_dir=tmp_path / "cache")  # the stored bytes
    assert isinstance(cached.volume, cache.StoredVolume)
    assert not isinstance(plain.volume, cache.StoredVolume)
    for size in (48, 160):  # shrinking (antialiased) and enlarging
        a = inputs.sagittal_slices(plain, size)
        b = inputs.sagittal_slices(cached, size)
        assert a.shape == b.shape == (4, size, size) and b.dtype == a.dtype == torch_float32()
        # the bytes resized as floats: what the stored-bytes path saves work on
        floats = inputs.resize_slices(cache.normalise(cached.volume[:], cached.intensity_range),
                                      size)
        # the uint8 kernel rounds its weights and its result: within one step of the floats
        assert float((floats - b).abs().max()) <= 1.001 * cache.QUANTUM
        assert float((floats - b).abs().mean()) <= 0.4 * cache.QUANTUM
        assert float((a - b).abs().max()) <= 2 * cache.QUANTUM  # and the cache's own rounding
        assert float(a.std()) > 20 * cache.QUANTUM  # the images are not flat
    np.testing.assert_allclose(inputs.axial_image(cached, 2, 64),
                               inputs.sagittal_slices(cached, 64)[2:3], atol=1e-6)


def torch_float32():
    import torch

    return torch.float32
