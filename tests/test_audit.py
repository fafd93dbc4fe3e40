"""The label audit: each check finds a planted error of its kind and leaves a clean study alone;
synthetic.py's label errors; training without the flagged labels."""
import hashlib

import numpy as np
import pandas as pd
import pytest

import audit
import data
import synthetic
import tables
import train_severity

# -----------------------------------------------------------------------------
# a made-up study in patient space: levels 30 mm apart down patient z, the canal on the midline,
# foramina 20 mm and recesses 9 mm to each side (patient +x is the left)

LEVEL_Z = [100.0, 70.0, 40.0, 10.0, -20.0]
ACROSS = {"spinal_canal_stenosis": 0.0, "left_neural_foraminal_narrowing": 20.0,
          "right_neural_foraminal_narrowing": -20.0, "left_subarticular_stenosis": 9.0,
          "right_subarticular_stenosis": -9.0}


def made_up_study():
    """{(condition, level): audit.Placed} of a study whose labels are all right."""
    placed = {}
    for condition, x in ACROSS.items():
        series_type = data.SERIES_OF_CONDITION[condition]
        axial = series_type == "Axial T2"
        normal = np.array([0.0, 0.0, 1.0]) if axial else np.array([1.0, 0.0, 0.0])
        rise = 2.0 if "foraminal" in condition else 0.0  # a foramen sits above its disc
        for level, z in zip(data.LEVELS, LEVEL_Z):
            point = np.array([x, 20.0, z + rise])
            placed[(condition, level)] = audit.Placed(1, data.SERIES_TYPES.index(series_type),
                                                      series_type, condition, level, point,
                                                      normal, 0, 4.0)
    return placed


def moved(placed, name, **coordinates):
    """A copy of placed with one label's patient x, y or z set."""
    out = dict(placed)
    point = placed[name].mm.copy()
    for axis, value in coordinates.items():
        point["xyz".index(axis)] = value
    out[name] = placed[name]._replace(mm=point)
    return out


def flagged(flags):
    return sorted({(f.condition, f.level, f.kind) for f in flags})


def test_a_made_up_study_whose_labels_are_right_raises_no_flag():
    placed = made_up_study()
    assert audit.geometry_flags(placed) == []
    guesses = {name: audit.Guess(p.mm + 1.5, 0.9) for name, p in placed.items()}
    assert audit.model_flags(placed, guesses) == []


@pytest.mark.parametrize("structure", audit.STRUCTURES)
def test_swapped_sides_are_each_on_the_wrong_side(structure):
    placed = made_up_study()
    left, right = (f"left_{structure}", "l3_l4"), (f"right_{structure}", "l3_l4")
    placed = moved(placed, left, x=-ACROSS[left[0]])
    placed = moved(placed, right, x=-ACROSS[right[0]])
    assert flagged(audit.geometry_flags(placed)) == [(left[0], "l3_l4", "wrong_side"),
                                                     (right[0], "l3_l4", "wrong_side")]


@pytest.mark.parametrize("condition", list(ACROSS))
def test_a_label_on_the_next_disc_is_a_slip_and_its_neighbour_is_left_alone(condition):
    placed = made_up_study()
    placed = moved(placed, (condition, "l3_l4"), z=placed[(condition, "l4_l5")].mm[2])
    assert flagged(audit.geometry_flags(placed)) == [(condition, "l3_l4", "level_slip")]


def test_levels_out_of_order_with_nothing_to_compare_are_both_flagged():
    canal_only = {name: p for name, p in made_up_study().items()
                  if name[0] == "spinal_canal_stenosis"}
    swapped = moved(canal_only, ("spinal_canal_stenosis", "l3_l4"), z=LEVEL_Z[3])
    swapped = moved(swapped, ("spinal_canal_stenosis", "l4_l5"), z=LEVEL_Z[2])
    assert flagged(audit.geometry_flags(swapped)) == [
        ("spinal_canal_stenosis", "l3_l4", "level_order"),
        ("spinal_canal_stenosis", "l4_l5", "level_order")]
    assert audit.geometry_flags(canal_only) == []


def test_of_two_levels_on_one_disc_the_one_off_its_level_is_flagged():
    name = ("right_subarticular_stenosis", "l4_l5")
    placed = moved(made_up_study(), name, z=LEVEL_Z[3] + 16.0)  # 14 mm below L3/L4
    assert flagged(audit.geometry_flags(placed)) == [(*name, "far_from_level"),
                                                     (*name, "level_order")]


def test_an_axial_slice_13_mm_from_its_level_is_far_from_it():
    name = ("left_subarticular_stenosis", "l2_l3")
    placed = moved(made_up_study(), name, z=LEVEL_Z[1] + 13.0)
    flags = audit.geometry_flags(placed)
    assert flagged(flags) == [(*name, "far_from_level")]
    assert 11.0 < flags[0].mm < 13.5 and flags[0].slices == pytest.approx(flags[0].mm / 4.0)


def test_a_canal_point_two_slices_off_the_midline_is_flagged():
    name = ("spinal_canal_stenosis", "l2_l3")
    assert flagged(audit.geometry_flags(moved(made_up_study(), name, x=9.0))) == [
        (*name, "lateral_offset")]


def test_the_model_checks_find_a_slip_and_a_point_off_a_confident_prediction():
    placed = made_up_study()
    guesses = {name: audit.Guess(p.mm, 0.9) for name, p in placed.items()}
    slipped = ("spinal_canal_stenosis", "l3_l4")
    placed = moved(placed, slipped, z=LEVEL_Z[3])
    off = ("left_neural_foraminal_narrowing", "l1_l2")
    placed = moved(placed, off, y=40.0)
    assert flagged(audit.model_flags(placed, guesses)) == [
        (*off, "far_from_prediction"), (*slipped, "prediction_slip")]
    unsure = dict(guesses)
    unsure[off] = guesses[off]._replace(confidence=audit.MIN_CONFIDENCE / 2)
    assert flagged(audit.model_flags(placed, unsure)) == [(*slipped, "prediction_slip")]


# -----------------------------------------------------------------------------
# the checks on the coordinate file alone


def made_up_coordinates():
    """Coordinate rows of one study as a standard reader puts them: canal on instance 8 going down
    the image, left foramina on instance 12 and right on 4, recesses on one axial instance per
    level with the left one at the larger x."""
    rows = []
    for j, level in enumerate(data.LEVELS):
        y = 100.0 + 50 * j
        rows += [(10, 8, "spinal_canal_stenosis", level, 200.0, y),
                 (11, 12, "left_neural_foraminal_narrowing", level, 200.0, y),
                 (11, 4, "right_neural_foraminal_narrowing", level, 200.0, y),
                 (12, 3 * j + 1, "left_subarticular_stenosis", level, 300.0, 200.0),
                 (12, 3 * j + 1, "right_subarticular_stenosis", level, 200.0, 200.0)]
    columns = ["series_id", "instance_number", "condition", "level", "x", "y"]
    return pd.DataFrame(rows, columns=columns).assign(study_id=1)


def file_flags(coordinates):
    return (audit.duplicate_flags(coordinates) + audit.same_instance_flags(coordinates)
            + audit.crossing_flags(coordinates) + audit.recess_x_flags(coordinates)
            + audit.canal_order_flags(coordinates))


def set_value(coordinates, condition, level, column, value):
    at = (coordinates["condition"] == condition) & (coordinates["level"] == level)
    coordinates.loc[at, column] = value


def test_the_file_checks_leave_a_clean_study_alone():
    assert file_flags(made_up_coordinates()) == []


def test_the_file_checks_find_each_planted_error():
    coordinates = made_up_coordinates()
    set_value(coordinates, "left_neural_foraminal_narrowing", "l1_l2", "instance_number", 4)
    set_value(coordinates, "left_neural_foraminal_narrowing", "l2_l3", "instance_number", 3)
    set_value(coordinates, "left_subarticular_stenosis", "l3_l4", "x", 150.0)
    set_value(coordinates, "spinal_canal_stenosis", "l5_s1", "y", 240.0)
    coordinates = pd.concat([coordinates, coordinates.iloc[[0]]])  # canal L1/L2 twice
    assert flagged(file_flags(coordinates)) == [
        ("left_neural_foraminal_narrowing", "l1_l2", "same_instance"),
        ("left_neural_foraminal_narrowing", "l2_l3", "sides_cross"),
        ("left_subarticular_stenosis", "l3_l4", "recess_swapped_x"),
        ("right_neural_foraminal_narrowing", "l1_l2", "same_instance"),
        ("right_neural_foraminal_narrowing", "l2_l3", "sides_cross"),
        ("right_subarticular_stenosis", "l3_l4", "recess_swapped_x"),
        ("spinal_canal_stenosis", "l1_l2", "duplicate"),
        ("spinal_canal_stenosis", "l4_l5", "canal_order_y"),
        ("spinal_canal_stenosis", "l5_s1", "canal_order_y")]


# -----------------------------------------------------------------------------
# on synthetic studies: the DICOM headers, planted label errors, exclusion


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    synthetic.make_dataset(str(out), 4, 1, seed=3, size=64, workers=1)
    return out


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupted")
    synthetic.make_dataset(str(out), 4, 1, seed=3, size=64, workers=1, label_errors=0.15)
    return out


def digest(folder):
    files = sorted((folder / "train_images").rglob("*.dcm"))
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def test_label_errors_change_the_named_rows_only_and_never_the_images(clean, corrupted):
    assert digest(clean) == digest(corrupted)
    keys = ["study_id", "condition", "level"]
    before = tables.read_coordinates(clean / "train_label_coordinates.csv").set_index(keys)
    after = tables.read_coordinates(corrupted / "train_label_coordinates.csv").set_index(keys)
    changed = (before != after.loc[before.index]).any(axis=1)
    errors = tables.read_flagged(corrupted / "label_errors.csv")
    assert set(changed[changed].index) == set(zip(errors["study_id"], errors["condition"],
                                                  errors["level"]))
    assert set(errors["kind"]) == set(synthetic.LABEL_ERRORS)
    assert not (clean / "label_errors.csv").exists()


def test_the_audit_leaves_clean_synthetic_studies_alone(clean, tmp_path):
    frame = audit.main(["--data-dir", str(clean), "--out-dir", str(tmp_path)])
    assert len(frame) == 0, frame.to_string()
    assert list(pd.read_csv(tmp_path / "label_audit.csv").columns) == audit.COLUMNS


def test_the_audit_finds_the_planted_side_swaps_and_slips(corrupted, tmp_path):
    audit.main(["--data-dir", str(corrupted), "--out-dir", str(tmp_path)])
    scores = pd.read_csv(tmp_path / "audit_benchmark.csv").set_index(["what", "name"])
    for kind in audit.CHECK_OF_ERROR:
        found = scores.loc[("error", kind)]
        assert found["recall"] == 1.0 and found["precision"] == 1.0, scores


def test_the_header_checks_find_a_lost_instance_a_point_off_its_frame_and_a_lost_series(
        clean, tmp_path):
    coordinates = pd.read_csv(clean / "train_label_coordinates.csv")
    coordinates.loc[0, "instance_number"] = 999
    coordinates.loc[1, "x"] = 1e4
    coordinates.loc[2, "series_id"] = 123
    coordinates.to_csv(tmp_path / "planted.csv", index=False)
    frame = audit.main(["--data-dir", str(clean), "--out-dir", str(tmp_path),
                        "--coordinates", str(tmp_path / "planted.csv")])
    planted = tables.read_flagged(tmp_path / "planted.csv").iloc[:3]
    kinds = ["missing_instance", "outside_frame", "missing_series"]
    expected = {(row.study_id, row.condition, row.level, kind)
                for row, kind in zip(planted.itertuples(), kinds)}
    found = zip(frame["study_id"], frame["condition"], frame["level"], frame["kind"])
    assert set(found) == expected


def test_excluded_labels_are_left_out_of_training(clean, tmp_path):
    coordinates = tables.read_coordinates(clean / "train_label_coordinates.csv")
    chosen = coordinates.iloc[[0, 7]]
    chosen.assign(kind="wrong_side").to_csv(tmp_path / "label_audit.csv", index=False)
    entries = train_severity.labelled_studies(str(clean), str(tmp_path / "label_audit.csv"))
    kept = {(e.study_id, *name) for e in entries for name in e.points}
    dropped = set(zip(chosen["study_id"], chosen["condition"], chosen["level"]))
    assert not kept & dropped and len(kept) == len(coordinates) - 2


def test_the_repaired_file_moves_flagged_labels_to_the_models_points_and_keeps_the_rest():
    def row(study, condition, x):
        return dict(study_id=study, series_id=10 * study, instance_number=3, condition=condition,
                    level="l1_l2", x=x, y=5.0)

    coordinates = pd.DataFrame([row(1, "a", 1.0), row(1, "b", 2.0), row(2, "a", 3.0)])
    frame = pd.DataFrame(dict(study_id=[1, 2], condition=["b", "a"], level=["l1_l2"] * 2,
                              kind=["wrong_side", "level_slip"]))
    predictions = [row(1, "a", 40.0), row(1, "b", 50.0)]  # study 2: the models found nothing
    fixed, moved = audit.repaired(coordinates, frame, predictions)
    by_key = {(r.study_id, r.condition): r.x for r in fixed.itertuples()}
    assert moved == 1
    # (1, a) was not flagged: kept where it was labelled; (1, b) moved; (2, a) left out
    assert by_key == {(1, "a"): 1.0, (1, "b"): 50.0}


def test_training_reads_the_coordinate_file_it_is_given(clean, tmp_path):
    coordinates = pd.read_csv(clean / "train_label_coordinates.csv")
    coordinates.loc[0, "x"] += 7.0
    coordinates.to_csv(tmp_path / "fixed.csv", index=False)
    first = tables.read_coordinates(tmp_path / "fixed.csv").iloc[0]
    entries = train_severity.labelled_studies(str(clean), coordinates=str(tmp_path / "fixed.csv"))
    points = {e.study_id: e.points for e in entries}
    point = points[first.study_id][(first.condition, first.level)]
    assert point.x == first.x
    with pytest.raises(ValueError, match="missing.csv"):
        train_severity.labelled_studies(str(clean), coordinates=str(tmp_path / "missing.csv"))


def test_the_benchmark_counts_precision_and_recall():
    errors = pd.DataFrame(dict(study_id=[1, 1, 2], condition=["a", "b", "a"],
                               level=["l1_l2"] * 3, kind=["side_swap", "side_swap", "level_slip"]))
    frame = pd.DataFrame(dict(study_id=[1, 3], condition=["a", "a"], level=["l1_l2"] * 2,
                              kind=["wrong_side", "wrong_side"]))
    scores = audit.benchmark(frame, errors).set_index(["what", "name"])
    assert scores.loc[("error", "side_swap"), "recall"] == 0.5
    assert scores.loc[("error", "side_swap"), "precision"] == 0.5
    assert scores.loc[("error", "level_slip"), "recall"] == 0.0
    assert scores.loc[("check", "wrong_side"), "precision"] == 0.5
    assert scores.loc[("all", "all"), "precision"] == 0.5
    assert scores.loc[("all", "all"), "recall_any"] == 1 / 3


def test_the_real_label_file_without_images(shared_labels, tmp_path):
    frame = audit.main(["--data-dir", str(shared_labels), "--out-dir", str(tmp_path),
                        "--coordinates", "train_label_coordinates.fix01b.csv"])
    counts = frame["kind"].value_counts().to_dict()
    # what the issue counted on the real file: 39 levels, 1 Sagittal T1 series, 1 axial level, 1
    # canal series (two labels each); fix01b corrected one of the two canal points
    assert counts == {"same_instance": 78, "sides_cross": 2, "recess_swapped_x": 2,
                      "canal_order_y": 2}, counts
