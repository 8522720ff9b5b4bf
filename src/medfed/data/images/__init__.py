"""Image data: a manifest names the files; loaders turn NIfTI, DICOM, 2-D images and
MedMNIST ``.npz`` files into federations of image sites.

nibabel, pydicom and Pillow (the ``imaging`` extra) are imported when a reader runs, so
importing this package costs nothing beyond numpy.
"""

from medfed.data.images.dicom import read_dicom_file, read_dicom_series
from medfed.data.images.load import BadImageFile, load_image_manifest
from medfed.data.images.manifest import Manifest, read_manifest
from medfed.data.images.nifti import read_nifti
from medfed.data.images.npz import load_medmnist_npz
from medfed.data.images.planar import read_planar

__all__ = [
    "BadImageFile",
    "Manifest",
    "load_image_manifest",
    "load_medmnist_npz",
    "read_dicom_file",
    "read_dicom_series",
    "read_manifest",
    "read_nifti",
    "read_planar",
]
