"""Shared test helpers: a minimal DICOM writer (independent of synthetic.py) and the shared-data
location."""

import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

ROOT = Path(__file__).resolve().parents[1]
# the pipeline's modules, and the dataset builders and tools beside them (run by path)
sys.path[:0] = [str(ROOT), str(ROOT / "datasets"), str(ROOT / "tools")]
SHARED = ROOT.parent / "shared"


def write_frame(path, pixels, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.5, 0.5),
                instance=1, photometric="MONOCHROME2", slope=None, intercept=None, rle=False):
    """Write one uint16 MR frame with the given geometry; returns the path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.InstanceNumber = "MR", instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless, np.ascontiguousarray(pixels, dtype=np.uint16))
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def shared_labels():
    folder = SHARED / "real_labels"
    if not (folder / "train.csv").exists():
        pytest.skip("../shared/real_labels is not beside this checkout")
    return folder
