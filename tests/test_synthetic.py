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


def test_the_reader_posterior_is_the_normal_probability_of_each_grade_boundary():
    """Hand-computed: canal bounds 0.75 / 0.40, reader error N(0, 0.1) on the canal and N(0, 0.15)
    on a foramen (bounds 0.775 / 0.375); Phi(1.5) = 0.9331928, Phi(-2) = 0.0227501 from a table."""
    import phantom
    openness = np.full((5, 5), 0.6)
    openness[1, 0] = 0.775  # a foramen exactly at its Normal/Moderate bound
    posterior = phantom.reader_posterior(openness, 0.1)
    canal = posterior[0, 0]
    assert canal == pytest.approx([1 - 0.9331928, 0.9331928 - 0.0227501, 0.0227501], abs=1e-6)
    assert posterior[1, 0, 0] == pytest.approx(0.5, abs=1e-9)
    assert np.allclose(posterior.sum(-1), 1)
    # the reader draws its grades with exactly these probabilities
    rng = np.random.default_rng(0)
    grades = np.stack([phantom.read_grades(rng, openness, 0.1) for _ in range(20000)])
    observed = [(grades[:, 0, 0] == k).mean() for k in range(3)]
    assert observed == pytest.approx(canal.tolist(), abs=0.01)


def test_the_same_seed_with_and_without_a_reader_writes_the_same_images(tmp_path):
    """The reader has its own random stream: only the labels change, and the test split gets
    oracle.csv, the posterior of every test label, in submission format."""
    import infer
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    synthetic.make_dataset(str(clean), 3, 2, seed=5, size=48, workers=1)
    synthetic.make_dataset(str(noisy), 3, 2, seed=5, size=48, workers=1, reader_noise=0.12)
    images = sorted(p.relative_to(clean) for p in clean.rglob("*.dcm"))
    assert images == sorted(p.relative_to(noisy) for p in noisy.rglob("*.dcm")) and images
    assert all((clean / p).read_bytes() == (noisy / p).read_bytes() for p in images)
    assert (clean / "train_label_coordinates.csv").read_text() == (
        noisy / "train_label_coordinates.csv").read_text()
    labels = [pd.read_csv(folder / name, dtype=str, keep_default_na=False)
              for folder in (clean, noisy) for name in ("train.csv", "solution.csv")]
    assert not labels[0].equals(labels[2]) or not labels[1].equals(labels[3])
    assert not (clean / "oracle.csv").exists()
    oracle = pd.read_csv(noisy / "oracle.csv")
    test_ids = pd.read_csv(noisy / "solution.csv")["study_id"]
    expected = [f"{s}_{c}" for s in test_ids for c in data.LABEL_COLUMNS]
    assert sorted(oracle["row_id"]) == sorted(expected)
    assert np.allclose(oracle[data.SUBMISSION_COLUMNS].sum(1), 1)
    best = infer.read_oracle(str(noisy), "test")[data.SUBMISSION_COLUMNS].to_numpy()
    weighted = oracle[data.SUBMISSION_COLUMNS].to_numpy() * [1, 2, 4]
    assert np.allclose(best, weighted / weighted.sum(1, keepdims=True), atol=2e-4)
