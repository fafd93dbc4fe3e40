"""Tests of the independent references in tests/reference.py (metric, layout checker, geometry)."""
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from reference import (COLUMNS, EPS, LEVELS, check_layout, column_prior_submission,
                       patient_mm_to_pixel, pixel_to_patient_mm, reference_score,
                       slice_plane_distance)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_TRAIN = SHARED / "real_labels" / "train.csv"


# ----------------------------------------------------------------------------- metric helpers

def labels(rows):
    """rows: {study_id: {column: value}}, unspecified cells Normal/Mild."""
    table = []
    for study, cells in rows.items():
        table.append([study] + [cells.get(column, "Normal/Mild") for column in COLUMNS])
    return pd.DataFrame(table, columns=["study_id"] + COLUMNS)


def submission(studies, preds=None, default=(1 / 3, 1 / 3, 1 / 3)):
    """preds: {(study, column): (a, b, c)} overriding `default`."""
    preds = preds or {}
    table = []
    for study in studies:
        for column in COLUMNS:
            table.append([f"{study}_{column}", *preds.get((study, column), default)])
    return pd.DataFrame(table, columns=["row_id", "normal_mild", "moderate", "severe"])


def spinal(level):
    return f"spinal_canal_stenosis_{level}"


# ----------------------------------------------------------------------------- metric

def test_perfect_submission_scores_zero():
    truth = labels({7: {spinal("l2_l3"): "Severe", "left_subarticular_stenosis_l4_l5": "Moderate"}})
    one_hot = {"Normal/Mild": (1, 0, 0), "Moderate": (0, 1, 0), "Severe": (0, 0, 1)}
    preds = {(7, column): one_hot[truth.loc[0, column]] for column in COLUMNS}
    # every term is -log((1-eps)/(1+eps)) ~ 2 eps after the clip-and-renormalise
    assert reference_score(truth, submission([7], preds)) == pytest.approx(0.0, abs=1e-12)


def test_uniform_submission_scores_log3():
    truth = labels(
        {
            1: {spinal("l1_l2"): "Severe", spinal("l5_s1"): "",
                "right_subarticular_stenosis_l1_l2": "Moderate"}
        }
    )
    # every scored row has p_true = 1/3 and the any_severe prediction is 1/3 with label 1
    assert reference_score(truth, submission([1])) == pytest.approx(math.log(3), abs=1e-12)


def test_hand_computed_weights_normalisation_and_empty_cells():
    cells = {spinal("l1_l2"): "Normal/Mild", spinal("l2_l3"): "Moderate", spinal("l3_l4"): "Severe",
             spinal("l4_l5"): "", spinal("l5_s1"): "Normal/Mild",
             "left_subarticular_stenosis_l1_l2": ""}
    for level in LEVELS:
        cells[f"left_neural_foraminal_narrowing_{level}"] = "Normal/Mild"
        cells[f"right_neural_foraminal_narrowing_{level}"] = "Severe"
        cells.setdefault(f"left_subarticular_stenosis_{level}", "Moderate")
        cells[f"right_subarticular_stenosis_{level}"] = "Moderate"
    truth = labels({5: cells})
    preds = {  # raw rows, not summing to 1: the metric normalises them
        (5, spinal("l1_l2")): (2, 1, 1),
        (5, spinal("l2_l3")): (1, 1, 2),
        (5, spinal("l3_l4")): (1, 1, 2),
        # empty truth: neither scored nor part of the any_severe max
        (5, spinal("l4_l5")): (0, 0, 9),
        (5, spinal("l5_s1")): (2, 1, 1),
        # empty truth: would cost -log(eps) if scored
        (5, "left_subarticular_stenosis_l1_l2"): (1, 0, 0),
    }
    for level in LEVELS:
        preds[(5, f"left_neural_foraminal_narrowing_{level}")] = (1, 1, 0)
        preds[(5, f"right_neural_foraminal_narrowing_{level}")] = (1, 2, 1)
    # spinal: (1*-log .5 + 2*-log .25 + 4*-log .5 + 1*-log .5) / (1+2+4+1) = 10 log2 / 8
    spinal_loss = (1 * math.log(2) + 2 * math.log(4) + 4 * math.log(2) + 1 * math.log(2)) / 8
    # foraminal: 5 left Normal at p=.5 (w1), 5 right Severe at p=.25 (w4) -> (5 log2 + 20 log4) / 25
    foraminal_loss = (5 * math.log(2) + 20 * math.log(4)) / 25
    subarticular_loss = math.log(3)  # 9 scored Moderate rows at p = 1/3
    any_loss = -math.log(0.5)  # label 1, prediction = max normalised severe over scored rows = .5
    expected = (spinal_loss + foraminal_loss + subarticular_loss + any_loss) / 4
    assert reference_score(truth, submission([5], preds)) == pytest.approx(expected, rel=1e-12)


def test_any_severe_weights_and_all_empty_study():
    truth = labels({
        1: {spinal("l3_l4"): "Moderate"},
        2: {spinal("l1_l2"): "Severe", **{spinal(level): "" for level in LEVELS[1:]}},
        3: {spinal(level): "" for level in LEVELS},  # left out of spinal and any_severe
    })
    preds = {(1, spinal(level)): (0.8, 0.1, 0.1) for level in LEVELS}
    preds[(1, spinal("l3_l4"))] = (0.5, 0.3, 0.2)
    preds[(2, spinal("l1_l2"))] = (0.2, 0.2, 0.6)
    for study in (2, 3):
        for level in LEVELS:
            # unscored rows, would cost -log(eps)
            preds.setdefault((study, spinal(level)), (0, 0, 1))
    # spinal: study 1 has 4 Normal at .8 (w1) and 1 Moderate at .3 (w2);
    # study 2 one Severe at .6 (w4)
    spinal_loss = (-4 * math.log(0.8) - 2 * math.log(0.3) - 4 * math.log(0.6)) / (4 + 2 + 4)
    # any_severe: study 1 label 0, weight 2, p = .2; study 2 label 1, weight 4, p = .6
    any_loss = (-2 * math.log(1 - 0.2) - 4 * math.log(0.6)) / (2 + 4)
    expected = (spinal_loss + math.log(3) + math.log(3) + any_loss) / 4
    assert reference_score(truth, submission([1, 2, 3], preds)) == pytest.approx(
        expected, rel=1e-12
    )


def test_clipping_bounds_a_zero_probability():
    truth = labels({1: {spinal("l1_l2"): "Severe"}})
    preds = {(1, spinal(level)): (1, 0, 0) for level in LEVELS}
    # spinal: one Severe row at eps/(1+eps) (w4) + 4 Normal rows ~0 -> 4 * -log eps / 8
    # any_severe: label 1 with p clipped to eps -> -log eps; other two terms log 3
    expected = (-4 * math.log(EPS) / 8 + 2 * math.log(3) - math.log(EPS)) / 4
    assert reference_score(truth, submission([1], preds)) == pytest.approx(expected, rel=1e-9)


def test_row_order_and_scale_do_not_matter_and_missing_rows_raise():
    truth = labels(
        {1: {spinal("l2_l3"): "Moderate"}, 2: {"left_subarticular_stenosis_l5_s1": "Severe"}}
    )
    rng = np.random.default_rng(0)
    sub = submission([1, 2])
    sub[["normal_mild", "moderate", "severe"]] = rng.uniform(0.05, 1, size=(len(sub), 3))
    base = reference_score(truth, sub)
    shuffled = sub.sample(frac=1, random_state=1).reset_index(drop=True)
    scaled = sub.copy()
    scaled[["normal_mild", "moderate", "severe"]] *= 7.0
    extra = pd.concat([sub, submission([99])], ignore_index=True)  # rows of an unscored study
    for other in (shuffled, scaled, extra):
        assert reference_score(truth, other) == pytest.approx(base, rel=1e-12)
    with pytest.raises(ValueError):
        reference_score(truth, sub.iloc[1:])
    with pytest.raises(ValueError):
        reference_score(truth, pd.concat([sub, sub.iloc[:1]], ignore_index=True))


def test_real_label_priors_reproduce_published_scores():
    if not REAL_TRAIN.is_file():
        pytest.skip(f"{REAL_TRAIN} not present")
    train = pd.read_csv(REAL_TRAIN)
    weighted = reference_score(train, column_prior_submission(train, (1, 2, 4)))
    plain = reference_score(train, column_prior_submission(train))
    assert round(weighted, 5) == 0.78971
    assert round(plain, 5) == 0.93070


# ----------------------------------------------------------------------------- geometry

def geometry_dataset():
    ds = Dataset()
    ds.ImagePositionPatient = [10.0, 20.0, 30.0]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal: u = +y, v = -z
    ds.PixelSpacing = [0.5, 0.8]  # [row spacing, column spacing] mm
    return ds


def test_pixel_to_patient_and_back():
    ds = geometry_dataset()
    # col 2 moves 2*0.8 along u=(0,1,0); row 3 moves 3*0.5 along v=(0,0,-1)
    assert np.allclose(pixel_to_patient_mm(ds, 2, 3), [10.0, 21.6, 28.5])
    # n = u x v = (-1, 0, 0): a point 2 mm towards +x is at signed distance -2
    point = [12.0, 21.6, 28.5]
    assert slice_plane_distance(ds, point) == pytest.approx(-2.0)
    col, row, distance = patient_mm_to_pixel(ds, point)
    assert (col, row, distance) == pytest.approx((2.0, 3.0, -2.0))


# ----------------------------------------------------------------------------- layout

def write_dicom(path, instance, size=8, x_mm=0.0):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [x_mm, 0.0, 0.0]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.PixelData = np.arange(size * size, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_csv(path, header, rows):
    path.write_text(
        "\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n"
    )


def make_layout(root):
    """Train study 1 (series 10 Sag T2/STIR, 11 Sag T1, 12 Axial T2), test study 2
    (series 20 Sag T1)."""
    for series, description in ((10, "Sagittal T2/STIR"), (11, "Sagittal T1"), (12, "Axial T2")):
        for instance in (1, 2):
            write_dicom(root / "train_images" / "1" / str(series) / f"{instance}.dcm", instance,
                        x_mm=instance)
    write_dicom(root / "test_images" / "2" / "20" / "1.dcm", 1)
    write_csv(root / "train_series_descriptions.csv",
              ["study_id", "series_id", "series_description"],
              [[1, 10, "Sagittal T2/STIR"], [1, 11, "Sagittal T1"], [1, 12, "Axial T2"]])
    write_csv(root / "test_series_descriptions.csv",
              ["study_id", "series_id", "series_description"], [[2, 20, "Sagittal T1"]])
    cells = ["Normal/Mild"] * 25
    cells[3] = "Severe"
    cells[7] = ""
    write_csv(root / "train.csv", ["study_id"] + COLUMNS, [[1] + cells])
    write_csv(root / "train_label_coordinates.csv",
              ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
              [[1, 10, 1, "Spinal Canal Stenosis", "L1/L2", 3.5, 4.25],
               [1, 11, 2, "Left Neural Foraminal Narrowing", "L5/S1", 0, 7.9],
               [1, 12, 1, "Right Subarticular Stenosis", "L3/L4", 5, 5]])
    write_csv(root / "sample_submission.csv", ["row_id", "normal_mild", "moderate", "severe"],
              [[f"2_{column}", 1 / 3, 1 / 3, 1 / 3] for column in COLUMNS])


def edit_line(path, line, new_text):
    lines = path.read_text().splitlines()
    lines[line] = new_text
    path.write_text("\n".join(lines) + "\n")


def test_check_layout_accepts_valid_and_flags_broken(tmp_path):
    good = tmp_path / "good"
    make_layout(good)
    assert check_layout(good) == []

    def broken(name, edit):
        root = tmp_path / name
        shutil.copytree(good, root)
        edit(root)
        return "\n".join(check_layout(root))

    problems = broken("header", lambda r: edit_line(r / "train_series_descriptions.csv", 0,
                                                    "study_id,series_id,description"))
    assert "train_series_descriptions.csv: header" in problems
    problems = broken("outside", lambda r: edit_line(r / "train_label_coordinates.csv", 1,
                                                     "1,10,1,Spinal Canal Stenosis,L1/L2,8.0,4"))
    assert "train_label_coordinates.csv: line 2: (x, y)" in problems and "outside" in problems
    problems = broken(
        "snake",
        lambda r: edit_line(r / "train_label_coordinates.csv", 2,
                            "1,11,2,left_neural_foraminal_narrowing,l5_s1,0,1"),
    )
    assert "bad condition/level" in problems
    problems = broken(
        "wrong_series",
        lambda r: edit_line(r / "train_label_coordinates.csv", 3,
                            "1,11,1,Right Subarticular Stenosis,L3/L4,5,5"),
    )
    assert "expected 'Axial T2'" in problems
    problems = broken("no_file", lambda r: edit_line(r / "train_label_coordinates.csv", 1,
                                                     "1,10,9,Spinal Canal Stenosis,L1/L2,3,4"))
    assert "no file train_images/1/10/9.dcm" in problems
    problems = broken("corrupt",
                      lambda r: (r / "train_images/1/11/2.dcm").write_bytes(b"not a dicom"))
    assert "train_images/1/11/2.dcm: unreadable" in problems
    problems = broken("orphan", lambda r: write_dicom(r / "train_images/1/13/1.dcm", 1))
    assert "train_images/1/13: not listed in train_series_descriptions.csv" in problems
    problems = broken("severity",
                      lambda r: edit_line(r / "train.csv", 1, "1," + ",".join(["normal"] * 25)))
    assert "train.csv: study 1 spinal_canal_stenosis_l1_l2: bad value 'normal'" in problems
    problems = broken("short_sub",
                      lambda r: edit_line(r / "sample_submission.csv", 5, "2_bad_column,1,0,0"))
    assert ("sample_submission.csv: bad row_id '2_bad_column'" in problems
            and "lacks 1 of 25 rows" in problems)

    def leak(root):
        write_csv(root / "solution.csv", ["study_id"] + COLUMNS, [[2] + ["Moderate"] * 25])
        with open(root / "train.csv", "a") as handle:
            handle.write(",".join(["2"] + ["Moderate"] * 25) + "\n")
    problems = broken("leak", leak)
    assert "train.csv: test study 2 has training labels" in problems

    def solution_outside(root):
        write_csv(root / "solution.csv", ["study_id"] + COLUMNS, [[2] + ["Moderate"] * 25])
        write_csv(root / "solution_coordinates.csv",
                  ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
                  [[2, 20, 1, "Left Neural Foraminal Narrowing", "L4/L5", -1, 3]])
    problems = broken("solution", solution_outside)
    assert "solution_coordinates.csv: line 2: (x, y)" in problems and "train.csv" not in problems
