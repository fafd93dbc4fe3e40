import dataclasses

import numpy as np
import torch

import cache
import data
import inputs
import losses


def _series(depth=5, height=60, width=80, spacing=(0.8, 0.5), orientation=(1, 0, 0, 0, 1, 0),
            intensity_range=(0.0, 1.0)):
    """A synthetic Series whose intensities map unchanged to network inputs
    (intensity range 0..1)."""
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[-20.0, -15.0, 0.0] + k * 4.0 * normal for k in range(depth)])
    return data.Series(volume=np.zeros((depth, height, width), np.float32),
                       instance_numbers=np.arange(1, depth + 1), positions=positions,
                       orientations=np.tile(orientation, (depth, 1)).astype(float),
                       pixel_spacing=np.tile(spacing, (depth, 1)).astype(float),
                       original_sizes=np.tile([height, width], (depth, 1)),
                       stack_ids=np.zeros(depth, np.int64),
                       intensity_range=np.asarray(intensity_range))


def test_point_at_known_mm_lands_at_crop_centre():
    series = _series()
    # pixel (col 31, row 22) of slice 2
    target_mm = np.array([-20.0 + 31.0 * 0.5, -15.0 + 22.0 * 0.8, 8.0])
    d, col, row, distance = data.series_patient_to_pixel(series, target_mm)
    assert (d, round(col, 6), round(row, 6), round(distance, 6)) == (2, 31.0, 22.0, 0.0)
    series.volume[2, 22, 31] = 1.0
    crops = inputs.crop_2p5d(series, (d, col, row), size_mm=9.0, out_px=9, n_slices=3)
    assert crops.shape == (3, 9, 9)
    # 9 mm over 9 px = 1 mm crop pixels: the bright voxel (0.5 x 0.8 mm) is centred at
    # crop pixel (4, 4)
    peak = np.unravel_index(crops[1].argmax().item(), (9, 9))
    assert peak == (4, 4) and crops[0].max() == 0 and crops[2].max() == 0


def test_crop_covers_the_same_millimetres_at_any_resolution():
    coarse = _series(spacing=(1.0, 1.0), height=40, width=40, intensity_range=(0.0, 40.0))
    fine = _series(spacing=(0.5, 0.5), height=80, width=80, intensity_range=(0.0, 40.0))
    for series, scale in ((coarse, 1), (fine, 2)):
        rows = np.arange(series.volume.shape[1])[:, None] / scale  # mm down the image
        series.volume[:] = np.broadcast_to(rows, series.volume.shape[1:])
    a = inputs.crop_2p5d(coarse, (2, 19.5, 19.5), 20.0, 10, 1)
    b = inputs.crop_2p5d(fine, (2, 39.5, 39.5), 20.0, 10, 1)
    assert float(a.max() - a.min()) > 0.4  # a gradient of 20 mm over the 40 mm intensity range
    np.testing.assert_allclose(a, b, atol=0.3 / 40)


def test_mirroring_puts_right_side_crops_onto_the_left():
    axial = _series(depth=3, height=64, width=64, spacing=(1.0, 1.0))
    # a mark on the lateral (left-of-image = patient right) side of the right recess
    axial.volume[1, 29:32, 16:21] = 1.0
    sagittal = _series(depth=7, height=64, width=64, spacing=(1.0, 1.0),
                       orientation=(0, 1, 0, 0, 0, -1))
    sagittal.volume[4, 28:33, 28:33] = 1.0  # one slice beyond the right foramen's slice (3)
    study = {1: data.StudySeries("Axial T2", 1, axial),
             2: data.StudySeries("Sagittal T1", 2, sagittal)}
    landmarks = {
        ("right_subarticular_stenosis", "l4_l5"): data.Landmark("Axial T2", 1, 1, 22.0, 31.0, 1.0),
        ("left_subarticular_stenosis", "l4_l5"): data.Landmark("Axial T2", 1, 1, 22.0, 31.0, 1.0),
        ("right_neural_foraminal_narrowing", "l1_l2"): data.Landmark("Sagittal T1", 2, 3, 30.0,
                                                                     30.0, 1.0),
        ("left_neural_foraminal_narrowing", "l1_l2"): data.Landmark("Sagittal T1", 2, 3, 30.0, 30.0,
                                                                    1.0),
    }
    crops, groups, columns = inputs.study_crops(
        study, landmarks, dict(n_slices=3, crop_px=20, crop_mm=[20.0, 20.0, 20.0])
    )
    # no crop for the rest
    assert columns.tolist() == sorted(data.LABEL_COLUMNS.index(f"{c}_{lv}") for c, lv in landmarks)
    crops = dict(zip(columns.tolist(), crops))
    groups = dict(zip(columns.tolist(), groups))
    column = data.LABEL_COLUMNS.index
    left, right = (crops[column("left_subarticular_stenosis_l4_l5")],
                   crops[column("right_subarticular_stenosis_l4_l5")])
    # the mark, seen on the image's left
    assert (left[1].max() > 0 and left[1, :, :10].max() > left[1, :, 10:].max())
    torch.testing.assert_close(right, left.flip(-1))  # the same image, mirrored across the midline
    left_f, right_f = (crops[column("left_neural_foraminal_narrowing_l1_l2")],
                       crops[column("right_neural_foraminal_narrowing_l1_l2")])
    # the next slice's mark comes first once mirrored
    assert (left_f[2].max() > 0 and right_f[0].max() > 0)
    torch.testing.assert_close(right_f, left_f.flip(0))  # slice order reversed
    assert len(crops) == 4 and groups[column("right_subarticular_stenosis_l4_l5")] == 2


def test_fallback_rows_equal_weighted_prior_and_submission_is_complete():
    labels = np.array([[0] * 25, [1] * 25, [2] * 25, [0] * 25])
    prior = losses.weighted_prior(labels)
    # counts (2, 1, 1) x weights (1, 2, 4)
    np.testing.assert_allclose(prior[0], np.array([2, 2, 4]) / 8)
    probabilities = losses.finalise(np.broadcast_to(prior, (3, 25, 3)))
    submission = losses.probabilities_to_submission([7, 8, 9], probabilities)
    assert len(submission) == 75 and submission["row_id"].iloc[0] == "7_spinal_canal_stenosis_l1_l2"
    np.testing.assert_allclose(submission[data.SUBMISSION_COLUMNS].sum(axis=1), 1.0)
    np.testing.assert_allclose(submission[data.SUBMISSION_COLUMNS].to_numpy()[:25], prior,
                               atol=1e-12)
    extreme = losses.finalise(np.array([[[1.0, 0.0, 0.0], [np.nan, np.nan, np.nan]]]))
    assert (extreme > 0).all() and (extreme < 1).all() and np.isfinite(extreme).all()


def _marked_crops(series, landmarks):
    study = {1: data.StudySeries(landmarks[next(iter(landmarks))].series_type, 1, series)}
    crops, _, columns = inputs.study_crops(study, landmarks,
                                           dict(n_slices=3, crop_px=20, crop_mm=[20.0, 20.0, 20.0]))
    return dict(zip(columns.tolist(), crops)), data.LABEL_COLUMNS.index


def test_axial_mirroring_follows_which_way_the_columns_run():
    # columns run toward the patient's RIGHT here (u = -x): lateral of the left recess is
    # toward column 0
    axial = _series(depth=3, height=64, width=64, spacing=(1.0, 1.0),
                    orientation=(-1, 0, 0, 0, 1, 0))
    axial.volume[1, 29:32, 16:21] = 1.0  # a mark lateral of the left recess at column 22
    axial.volume[1, 29:32, 44:49] = 1.0  # and one lateral of the right recess at column 42
    landmarks = {
        ("left_subarticular_stenosis", "l4_l5"): data.Landmark("Axial T2", 1, 1, 22.0, 31.0, 1.0),
        ("right_subarticular_stenosis", "l4_l5"): data.Landmark("Axial T2", 1, 1, 42.0, 31.0, 1.0),
    }
    crops, column = _marked_crops(axial, landmarks)
    # the canonical view: columns run away from the midline, the mark on the crop's right
    for side in ("left", "right"):
        crop = crops[column(f"{side}_subarticular_stenosis_l4_l5")][1]
        assert crop[:, 10:].max() > 0.5 and crop[:, :10].max() == 0, side


def test_sagittal_mirroring_follows_which_way_the_slices_run():
    # slices step toward the patient's LEFT here (n = +x): the slice after the left foramen's is
    # lateral of it
    sagittal = _series(depth=7, height=64, width=64, spacing=(1.0, 1.0),
                       orientation=(0, 1, 0, 0, 0, 1))
    assert data.slice_normals(sagittal.orientations[0])[0] > 0
    sagittal.volume[4, 28:33, 28:33] = 1.0  # lateral of the left foramen on slice 3
    sagittal.volume[1, 28:33, 28:33] = 1.0  # lateral of the right foramen on slice 2
    landmarks = {
        ("left_neural_foraminal_narrowing", "l1_l2"): data.Landmark("Sagittal T1", 1, 3, 30.0, 30.0,
                                                                    1.0),
        ("right_neural_foraminal_narrowing", "l1_l2"): data.Landmark("Sagittal T1", 1, 2, 30.0,
                                                                     30.0, 1.0),
    }
    crops, column = _marked_crops(sagittal, landmarks)
    # the canonical view: slices run toward the midline, the lateral mark first
    for side in ("left", "right"):
        crop = crops[column(f"{side}_neural_foraminal_narrowing_l1_l2")]
        assert crop[0].max() > 0.5 and crop[1:].max() == 0, side


def test_slice_jitter_stays_inside_the_landmarks_own_stack():
    series = _series(depth=6)
    series.stack_ids[:] = [0, 0, 0, 1, 1, 1]  # two per-disc stacks of 3 slices
    np.random.seed(0)
    assert {inputs.jitter_slice(series, 2, 1) for _ in range(200)} == {1, 2}
    assert {inputs.jitter_slice(series, 3, 2) for _ in range(200)} == {3, 4, 5}
    study = {1: data.StudySeries("Axial T2", 1, series)}
    landmark = data.Landmark("Axial T2", 1, 2, 40.0, 30.0, 1.0)
    moved = [inputs.jitter_landmarks(study, {"p": landmark}, 5.0, 1)["p"] for _ in range(200)]
    assert {m.slice for m in moved} == {1, 2} and max(abs(m.col - 40.0) * 0.5 for m in moved) <= 5.0


def test_recomputed_batchnorm_statistics_are_the_mean_over_the_batches_and_nothing_else_changes():
    import training
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    net[1].running_mean.fill_(5.0)  # stale statistics, as after steps that moved the weights
    net[1].running_var.fill_(9.0)
    batches = [(torch.randn(4, 1, 3, 3) * (k + 1) + k,) for k in range(3)]
    weights = [p.detach().clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    net.eval()
    training.recompute_batchnorm(net, batches)
    # independent reference: per batch, the mean and unbiased variance of each conv channel,
    # averaged over batches
    with torch.no_grad():
        outputs = [net[0](x).transpose(0, 1).reshape(2, -1).numpy() for (x,) in batches]
    assert np.allclose(net[1].running_mean.numpy(),
                       np.mean([o.mean(axis=1) for o in outputs], axis=0), atol=1e-5)
    assert np.allclose(net[1].running_var.numpy(),
                       np.mean([o.var(axis=1, ddof=1) for o in outputs], axis=0), atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters())) and torch.equal(
        rng, torch.get_rng_state()
    )
    assert net[1].momentum == 0.1 and not net.training  # restored


def _full_frame_crop(series, point_px, size_mm, out_px, n_slices, degrees):
    """Reference: the crop sampled from whole normalised frames (crop_2p5d reads only a window)."""
    slice_index, col, row = point_px
    depth, height, width = series.volume.shape
    picks = np.clip(np.arange(slice_index - n_slices // 2, slice_index + n_slices // 2 + 1), 0,
                    depth - 1)
    steps = (np.arange(out_px) + 0.5) / out_px - 0.5
    across, down = np.meshgrid(steps * size_mm, steps * size_mm)
    turn = np.radians(degrees)
    spacing = series.pixel_spacing[picks]
    cols = col + (np.cos(turn) * across - np.sin(turn) * down)[None] / spacing[:, 1, None, None]
    rows = row + (np.sin(turn) * across + np.cos(turn) * down)[None] / spacing[:, 0, None, None]
    grid = np.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], axis=-1)
    images = torch.as_tensor(cache.normalise(series.volume[picks], series.intensity_range))
    return torch.nn.functional.grid_sample(images[:, None], torch.as_tensor(grid).float(),
                                           align_corners=False)[:, 0]


def test_a_crop_read_from_its_window_equals_one_read_from_the_whole_frame():
    series = _series(depth=5, height=120, width=90, spacing=(0.8, 0.6),
                     intensity_range=(100.0, 900.0))
    series.volume[:] = np.random.default_rng(0).uniform(0, 1000, series.volume.shape)
    # inside, at each edge and corner, half off the frame, entirely off it; turned and not
    cases = [(2, 45.0, 60.0, 0.0), (0, 0.3, 0.2, 15.0), (4, 89.6, 119.4, -12.0),
             (1, -10.0, 60.0, 7.0), (3, 45.0, 130.0, 0.0), (2, 400.0, -300.0, 5.0)]
    for d, col, row, degrees in cases:
        window = inputs.crop_2p5d(series, (d, col, row), 30.0, 24, 3, degrees)
        whole = _full_frame_crop(series, (d, col, row), 30.0, 24, 3, degrees)
        np.testing.assert_allclose(window.numpy(), whole.numpy(), atol=1e-5)
    assert whole.abs().max() == 0 and window.shape == (3, 24, 24)  # off the frame: zeros


def test_a_cached_series_is_cropped_from_its_bytes_as_its_decoded_volume_would_be():
    """crop_2p5d reads a cached volume's bytes directly (normalised intensities, QUANTUM a step);
    the reference crops the same stored volume read as floats in the series' own units."""
    series = _series(depth=5, height=120, width=90, spacing=(0.8, 0.6),
                     intensity_range=(100.0, 900.0))
    series.volume[:] = np.random.default_rng(1).uniform(0, 1000, series.volume.shape)
    stored = cache.StoredVolume(cache.quantise(series.volume, series.intensity_range),
                                series.intensity_range, "unused")
    decoded = dataclasses.replace(series, volume=stored[:])  # floats, as an uncached series
    cached = dataclasses.replace(series, volume=stored)
    cases = [(2, 45.0, 60.0, 0.0), (0, 0.3, 0.2, 15.0), (4, 89.6, 119.4, -12.0)]
    for d, col, row, degrees in cases:
        from_bytes = inputs.crop_2p5d(cached, (d, col, row), 30.0, 24, 3, degrees)
        np.testing.assert_allclose(from_bytes.numpy(),
                                   _full_frame_crop(decoded, (d, col, row), 30.0, 24, 3,
                                                    degrees).numpy(), atol=1e-5)
        assert from_bytes.max() > 1.0  # the clip at 1.5 x the range is kept, not lost


def test_shift_tta_averages_the_grades_of_the_crop_and_four_copies_moved_by_mm():
    """predict.grade_study with shift_mm: the mean of five gradings, at the landmark and moved
    shift_mm along the columns and the rows (each axis in its own pixel spacing), against crops cut
    here at those five places."""
    import predict

    series = _series(depth=3, height=64, width=64, spacing=(0.5, 1.0))  # rows 0.5 mm, cols 1 mm
    series.volume[1, 29:32, 33:36] = 1.0  # a mark 4 mm right of the landmark (col 30, row 30)
    series.volume[1, 21:24, 29:32] = 0.5  # and a fainter one 4 mm above it (8 rows)

    def net(crops, groups):  # grades the centre pixel: bright means Moderate
        centre = crops[:, crops.shape[1] // 2, 4, 4]
        return torch.stack([torch.zeros_like(centre), 20 * (centre - 0.25),
                            torch.full_like(centre, -30.0)], dim=1)

    settings = dict(n_slices=1, crop_px=9, crop_mm=[9.0, 9.0, 9.0])
    models = [predict.SeverityModel(net, settings)]
    study = {7: data.StudySeries("Sagittal T2/STIR", 7, series)}
    landmark = data.Landmark("Sagittal T2/STIR", 7, 1, 30.0, 30.0, 1.0)
    landmarks = {("spinal_canal_stenosis", "l1_l2"): landmark}
    expected = []
    for right_mm, down_mm in ((0, 0), (4, 0), (-4, 0), (0, 4), (0, -4)):
        crop = inputs.crop_2p5d(series, (1, 30.0 + right_mm / 1.0, 30.0 + down_mm / 0.5), 9.0, 9, 1)
        expected.append(net(crop[None], None).softmax(-1)[0].numpy())
    graded, available = predict.grade_study(models, study, landmarks, "cpu", shift_mm=4.0)
    assert available[0] and not available[1:].any()
    np.testing.assert_allclose(graded[0], np.mean(expected, axis=0), atol=1e-5)
    unshifted, _ = predict.grade_study(models, study, landmarks, "cpu", shift_mm=0.0)
    assert graded[0, 1] > unshifted[0, 1] + 0.2  # the marks were found only by the moved copies


def test_several_severity_models_are_averaged_in_probability():
    """An ensemble (infer.py --severity-checkpoints A,B): the mean of the members' softmaxes."""
    import predict

    series = _series(depth=3, height=64, width=64)
    study = {7: data.StudySeries("Sagittal T2/STIR", 7, series)}
    landmarks = {("spinal_canal_stenosis", "l2_l3"): data.Landmark("Sagittal T2/STIR", 7, 1, 30.0,
                                                                   30.0, 1.0)}
    settings = dict(n_slices=1, crop_px=9, crop_mm=[9.0, 9.0, 9.0])
    members = []
    for logits in ([2.0, 0.0, -1.0], [-1.0, 1.0, 0.5]):
        def net(crops, groups, logits=torch.tensor(logits)):
            return logits.expand(len(crops), 3)
        members.append(predict.SeverityModel(net, settings))
    graded, available = predict.grade_study(members, study, landmarks, "cpu", shift_mm=0.0)
    expected = [torch.tensor(v).softmax(0).numpy() for v in ([2.0, 0.0, -1.0], [-1.0, 1.0, 0.5])]
    np.testing.assert_allclose(graded[1], np.mean(expected, axis=0), atol=1e-6)
    assert available.tolist() == [False, True] + [False] * 23
