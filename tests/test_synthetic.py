import numpy as np
import pandas as pd
import pytest

import data
import synthetic
import tables
from reference import check_layout


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    out = tmp_path_factory.mktemp("quirky")
    n_train = len(synthetic.QUIRKS) + 1  # every quirk comes round once in the train split
    synthetic.make_dataset(str(out), n_train, 3, seed=5, size=48, quirks=True, workers=1)
    return out


def test_quirky_layout_passes_the_independent_checker_but_for_the_one_corrupt_file(quirky):
    problems = check_layout(str(quirky))
    assert len(problems) == 1, problems
    assert problems[0].startswith("test_images/") and ".dcm" in problems[0]


def test_test_truth_stays_out_of_the_competition_files(quirky):
    train = pd.read_csv(quirky / "train.csv")
    solution = pd.read_csv(quirky / "solution.csv")
    test_ids = set(pd.read_csv(quirky / "test_series_descriptions.csv")["study_id"])
    assert set(solution["study_id"]) == test_ids and not test_ids & set(train["study_id"])
    assert list(train.columns) == ["study_id"] + data.LABEL_COLUMNS


def test_quirky_instance_numbers_load_in_spatial_order(quirky):
    quirks = pd.read_csv(quirky / "quirks.csv")
    descriptions = pd.read_csv(quirky / "train_series_descriptions.csv")
    shuffled = quirks[
        quirks["quirk"].isin(["instances_reversed", "instances_offset", "instances_interleaved"])
    ]
    assert set(shuffled["quirk"]) == {"instances_reversed", "instances_offset",
                                      "instances_interleaved"}
    checked = 0
    for row in shuffled.itertuples():
        split = "train" if row.study_id in set(descriptions["study_id"]) else "test"
        series = data.load_series(
            str(quirky / f"{split}_images" / str(row.study_id) / str(row.series_id))
        )
        along = np.einsum("dk,dk->d", series.positions, data.slice_normals(series.orientations))
        for stack in np.unique(series.stack_ids):
            assert np.all(np.diff(along[series.stack_ids == stack]) > 0)
        if row.quirk == "instances_reversed":
            assert np.all(np.diff(series.instance_numbers) < 0)
        checked += 1
    assert checked >= 3


def test_labels_sit_inside_their_frame_on_the_labelled_slice(quirky):
    coordinates = tables.read_coordinates(quirky / "train_label_coordinates.csv")
    descriptions = pd.read_csv(quirky / "train_series_descriptions.csv")
    for series_id, rows in list(coordinates.groupby("series_id"))[:12]:
        study_id = int(descriptions.loc[descriptions["series_id"] == series_id, "study_id"].iloc[0])
        series = data.load_series(str(quirky / "train_images" / str(study_id) / str(series_id)))
        for row in rows.itertuples():
            d, col, row_px = data.label_to_volume(series, row.instance_number, row.x, row.y)
            height, width = series.volume.shape[1:]
            assert 0 <= col < width and 0 <= row_px < height
