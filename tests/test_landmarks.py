import numpy as np
import pytest
import torch

import data
import inputs
import losses
import models
import predict
import training


def test_peaked_heatmap_decodes_to_known_point_in_original_pixels():
    # a series of 7 frames of 300 x 240 (rows x cols) original pixels; input 112, heatmap 56
    original_hw, input_size, heat_hw = (300, 240), 112, (56, 56)
    truth = np.array([4.0, 171.3, 88.6])  # [slice, col, row] in original pixels
    in_input = np.r_[truth[0], data.to_resized(truth[1:], original_hw, (input_size, input_size))]
    in_heat = losses.to_heat_coords(torch.tensor(in_input, dtype=torch.float32)[None, None],
                                    input_size, heat_hw)
    mask = torch.ones(1, 7, dtype=torch.bool)
    # a peaked distribution
    target = losses.heatmap_targets(in_heat, mask, (7,) + heat_hw, sigma=1.0)
    logits = target.clamp(min=1e-30).log()
    decoded, confidence = predict.decode_heatmaps(logits, mask)
    back = predict.heat_to_volume(decoded[0, 0].numpy(), heat_hw, original_hw)
    assert back[0] == 4
    # well inside one heatmap cell
    np.testing.assert_allclose(back[1:], truth[1:], atol=0.05 * 300 / 56)
    assert confidence[0, 0] > 0.5


def test_axial_flip_moves_points_with_the_image_and_keeps_their_side():
    image = torch.zeros(1, 10, 20)
    # the patient's left recess, at col 2 (columns run toward the patient's left: direction +1)
    image[0, 3, 2] = 1.0
    image[0, 6, 15] = 2.0  # the right recess
    # [slice, col, row]: left, then right
    targets = np.array([[0, 2.0, 3.0], [0, 15.0, 6.0]], dtype=np.float32)
    flipped, moved, direction = inputs.mirror_axial(image, targets, 1.0)
    assert direction == -1.0
    for (d, col, row), value in zip(moved, (1.0, 2.0)):  # each label still sits on its own recess
        assert flipped[int(d), int(row), int(col)] == value
    np.testing.assert_allclose(moved[:, 1], [17.0, 4.0])


def test_random_affine_moves_points_with_the_image():
    np.random.seed(1)
    volume = torch.zeros(2, 64, 64)
    volume[:, 20:23, 40:43] = 1.0  # a blob centred on col 41, row 21
    warped, moved = inputs.random_affine(volume, np.array([[41.0, 21.0]]))
    rows, cols = np.nonzero(warped[0].numpy() > 0.3)
    weights = warped[0].numpy()[rows, cols]
    centre = [np.average(cols, weights=weights), np.average(rows, weights=weights)]
    np.testing.assert_allclose(centre, moved[0], atol=0.6)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [training.get_lr(s, 100, 10, 1e-3) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.0)


def test_pretrained_weights_load_from_a_local_file_and_a_wrong_file_is_named(tmp_path):
    torchvision = pytest.importorskip("torchvision")  # the reference network
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    net = models.LandmarkNet(5, pretrained_path=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(net.layer2.state_dict(), reference.layer2.state_dict())
    # grey filters, 2 channels
    torch.testing.assert_close(net.stem[0].weight[:, 0], reference.conv1.weight.mean(dim=1) / 2)
    # the written-out trunk computes what torchvision's does, to layer3, from the same weights
    trunk = models.ResNet18Trunk(3)
    trunk.load(str(tmp_path / "resnet18.pth"))
    reference.eval(), trunk.eval()
    pieces = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    x = y = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for name in pieces:
            x, y = getattr(trunk, name)(x), getattr(reference, name)(y)
    assert x.shape == (2, 256, 4, 4)
    torch.testing.assert_close(x, y)
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"layer1.0.conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    for name in ("notes.txt", "wrong.pth"):
        with pytest.raises(ValueError, match=f"{name}: not a ResNet-18 state dict"):
            models.LandmarkNet(5, pretrained_path=str(tmp_path / name))


def _sagittal(xs, size=200):
    """A sagittal stack at patient x = xs (mm), columns running posterior and rows inferior, 1 mm
    pixels: pixel (col, row) lies at y = col - 100, z = 100 - row."""
    depth = len(xs)
    return data.Series(volume=np.zeros((depth, size, size), np.float32),
                       instance_numbers=np.arange(1, depth + 1),
                       positions=np.array([[x, -100.0, 100.0] for x in xs]),
                       orientations=np.tile([0.0, 1, 0, 0, 0, -1], (depth, 1)),
                       pixel_spacing=np.ones((depth, 2)),
                       original_sizes=np.tile([size, size], (depth, 1)),
                       stack_ids=np.zeros(depth, np.int64), intensity_range=np.array([0.0, 1.0]))


def test_foramina_are_sought_on_their_own_side_near_their_levels_canal_point():
    xs = np.arange(-20.0, 21.0, 4.0)  # slices at x = -20 .. 20 mm; the canal at x = 0
    series = _sagittal(xs)
    # levels 35 mm apart, as in an adult
    canal = np.array([[0.0, 0.0, z] for z in (70.0, 35.0, 0.0, -35.0, -70.0)])
    cells = predict.foramen_cells(series, canal, (200, 200))  # heat grid = volume grid here
    names = data.POINTS_OF_SERIES["Sagittal T1"]
    left, right = names.index(("left_neural_foraminal_narrowing", "l2_l3")), names.index(
        ("right_neural_foraminal_narrowing", "l2_l3")
    )
    # patient left: +x
    assert set(np.flatnonzero(cells[left].any((1, 2)))) == set(np.flatnonzero(xs >= 5))
    assert set(np.flatnonzero(cells[right].any((1, 2)))) == set(np.flatnonzero(xs <= -5))
    rows, cols = np.nonzero(cells[left, -1])
    # mm from the L2/L3 canal point (y 0, z 35: col 100, row 65)
    distance = np.hypot(cols - 100.0, rows - 65.0)
    assert (distance.max() <= predict.FORAMEN_REACH_MM
            and distance.max() > predict.FORAMEN_REACH_MM - 1.5)
    # where a foramen sits: 10 mm in front of the canal, 2 mm above its disc
    assert cells[left, -1, 63, 90]
    # the same spot a level up or down is not
    assert (not cells[left, -1, 30, 90] and not cells[left, -1, 100, 90])


def test_a_point_outside_its_allowed_cells_is_decoded_inside_them():
    logits = torch.full((1, 1, 2, 10, 10), -10.0)
    logits[0, 0, 1, 2, 2] = 10.0  # the strongest peak, on a forbidden slice
    logits[0, 0, 0, 7, 6] = 5.0  # a weaker one where the point may lie
    allowed = torch.zeros(1, 2, 10, 10, dtype=torch.bool)
    allowed[0, 0] = True
    masked = logits.masked_fill(~allowed[None], -1e4)
    free, _ = predict.decode_heatmaps(logits, torch.ones(1, 2, dtype=torch.bool))
    held, _ = predict.decode_heatmaps(masked, torch.ones(1, 2, dtype=torch.bool))
    assert free[0, 0].tolist() == [1.0, 2.0, 2.0] and held[0, 0].tolist() == pytest.approx(
        [0.0, 6.0, 7.0], abs=1e-3
    )


def _spine_logits(peaks, height=50, width=10, depth=1):
    """(5, D, h, w) logits with the given {level: [(slice, row, value), ...]} peaks at column 5;
    cells 3 mm apart on a vertical spine (rows run toward the feet: patient z falls), slices 4 mm
    apart."""
    logits = torch.full((5, depth, height, width), -10.0)
    for level, spots in peaks.items():
        for d, row, value in spots:
            logits[level, d, row, 5] = value
    d, rows, cols = np.meshgrid(
        np.arange(depth), np.arange(height), np.arange(width), indexing="ij"
    )
    cells_mm = np.stack([4.0 * d, 3.0 * cols, -3.0 * rows], -1).astype(np.float64)
    return logits, cells_mm


def test_a_level_decoded_on_its_neighbours_disc_is_placed_on_its_own():
    discs = [4, 14, 24, 34, 44]  # rows of L1/L2 .. L5/S1, 30 mm apart
    peaks = {k: [(0, row, 12.0)] for k, row in enumerate(discs)}
    peaks[3] = [(0, 44, 10.0), (0, 34, 6.0)]  # L4/L5 is surest of L5/S1's disc, second of its own
    logits, cells_mm = _spine_logits(peaks)
    free, _ = predict.decode_heatmaps(logits[None], torch.ones(1, 1, dtype=torch.bool))
    # the independent decode puts two levels on one disc
    assert free[0, 3, 2] == pytest.approx(44, abs=0.1)
    points, confidence = predict.separate_levels(logits, cells_mm)
    np.testing.assert_allclose(points[:, 2].numpy(), discs, atol=0.1)
    # as sure as the network was of that place (2 %), not of what was left there
    assert (confidence[3] < 0.05)


def test_levels_slipped_at_both_ends_are_put_back_head_to_foot():
    discs = [4, 14, 24, 34, 44]
    peaks = {k: [(0, row, 12.0)] for k, row in enumerate(discs)}
    # L1/L2 on L3/L4's disc, L5/S1 on L2/L3's: the first decode runs upward
    peaks[0] = [(0, 24, 12.0), (0, 4, 8.0)]
    peaks[4] = [(0, 14, 12.0), (0, 44, 8.0)]
    logits, cells_mm = _spine_logits(peaks)
    points, _ = predict.separate_levels(logits, cells_mm)
    np.testing.assert_allclose(points[:, 2].numpy(), discs, atol=0.1)


def test_levels_decoded_apart_and_in_order_are_left_as_decoded():
    peaks = {k: [(0, row, 12.0), (0, row + 5, 9.0)] for k, row in enumerate([3, 13, 22, 33, 43])}
    logits, cells_mm = _spine_logits(peaks)
    free, confidence = predict.decode_heatmaps(logits[None], torch.ones(1, 1, dtype=torch.bool))
    points, separated = predict.separate_levels(logits, cells_mm)
    assert torch.equal(points, free[0]) and torch.equal(separated, confidence[0])


def test_a_sure_level_keeps_its_disc_when_a_surer_neighbour_slipped_onto_it():
    discs = [4, 14, 24, 34, 44]
    peaks = {k: [(0, row, 12.0)] for k, row in enumerate(discs)}
    # L1/L2 sure of its disc, its mass split over two slices
    peaks[0] = [(0, 4, 12.0), (1, 4, 12.0)]
    # L2/L3 slipped 6 mm from L1/L2, with most of its mass there
    peaks[1] = [(0, 6, 13.0), (0, 14, 11.0)]
    logits, cells_mm = _spine_logits(peaks, depth=2)
    free, confidence = predict.decode_heatmaps(logits[None], torch.ones(1, 2, dtype=torch.bool))
    # surer by the decode
    assert (free[0, 1, 2] == pytest.approx(6, abs=0.1) and confidence[0, 1] > confidence[0, 0])
    points, _ = predict.separate_levels(logits, cells_mm)
    np.testing.assert_allclose(points[:, 2].numpy(), discs, atol=0.1)
