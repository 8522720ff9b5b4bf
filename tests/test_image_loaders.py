"""Image loaders against files the tests write themselves: NIfTI (nibabel), DICOM (pydicom),
2-D images (Pillow), MedMNIST-format npz (numpy), each read through a manifest."""

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

from medfed.data.federation import SingleClassSiteWarning
from medfed.data.images import (
    load_image_manifest,
    load_medmnist_npz,
    read_dicom_file,
    read_dicom_series,
    read_nifti,
    read_planar,
)
from medfed.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- writers


def write_manifest(folder, rows, name="manifest.csv", split=False):
    """rows: (relative path, label, site[, split]) — paths stay relative on purpose."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "path,label,site" + (",split" if split else "")
    lines = [header] + [",".join(str(v) for v in r) for r in rows]
    out = folder / name
    out.write_text("\n".join(lines) + "\n")
    return out


def write_nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path)


def write_dicom_slice(path, pixels, *, z, series_uid, instance, slope=1.0, intercept=0.0,
                      spacing=(0.5, 0.75), implicit=False):
    """A minimal valid CT slice: axial orientation, position (0, 0, z) in LPS millimetres."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def write_series(folder, stored, *, series_uid="1.2.826.0.1.3680043.8.498.2", step=2.5, seed=0,
                 slopes=None, intercepts=None):
    """stored: (slices, rows, cols) uint16, slice k at z = 10 + k*step; files written under
    shuffled names with InstanceNumber reversed, so only the positions give the order."""
    n = len(stored)
    names = np.random.default_rng(seed).permutation(n)
    for k in range(n):
        write_dicom_slice(
            folder / f"IM{names[k]:04d}.dcm", stored[k], z=10.0 + k * step, series_uid=series_uid,
            instance=n - k, slope=1.0 if slopes is None else slopes[k],
            intercept=0.0 if intercepts is None else intercepts[k], implicit=bool(k % 2),
        )


def png_federation(tmp_path, sizes=(11, 10), shape=(6, 5), split=False):
    """Sites of 8-bit PNGs; image i is filled with i so rows can be traced to files."""
    rows = []
    i = 0
    for s, n in enumerate(sizes):
        for j in range(n):
            rel = f"img/s{s}_{j}.png"
            write_png(tmp_path / rel, np.full(shape, i, np.uint8))
            row = (rel, j % 2, f"site{s}")
            rows.append(row + ("train" if j < n - 3 else "test",) if split else row)
            i += 1
    return rows


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_is_reoriented_to_ras_with_voxel_sizes_in_ras_order(tmp_path):
    # stored axes: i runs Superior (4 mm), j Anterior (3 mm), k toward the Left (2 mm): "SAL"
    affine = np.array([[0, 0, -2.0, 10], [0, 3.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    stored = np.fromfunction(lambda i, j, k: 100 * i + 10 * j + k, (4, 5, 6)).astype(np.int16)
    write_nifti(tmp_path / "v.nii.gz", stored, affine)

    data, meta = read_nifti(tmp_path / "v.nii.gz")

    # RAS: axis 0 = R (stored k reversed), axis 1 = A (stored j), axis 2 = S (stored i)
    expected = np.fromfunction(lambda r, a, s: 100 * s + 10 * a + (5 - r), (6, 5, 4))
    assert data.dtype == np.float32 and data.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(data[0], expected)
    assert meta["voxel_size"] == (2.0, 3.0, 4.0)
    assert meta["original_orientation"] == "SAL" and meta["orientation"] == "RAS"
    assert meta["dtype"] == "int16"
    # and the world coordinate of a voxel is unchanged by the reorientation
    world = affine @ np.array([1, 2, 3, 1])
    canon = nib.as_closest_canonical(nib.load(str(tmp_path / "v.nii.gz"))).affine
    assert data[0][tuple(np.linalg.solve(canon, world)[:3].round().astype(int))] == stored[1, 2, 3]


def test_nifti_4d_with_one_volume_is_squeezed_and_noted(tmp_path):
    write_nifti(tmp_path / "v.nii", np.ones((3, 4, 5, 1), np.float32))
    data, meta = read_nifti(tmp_path / "v.nii")
    assert data.shape == (1, 3, 4, 5)
    assert meta["notes"] == ["4-D file with one volume read as 3-D"]


@pytest.mark.parametrize(
    "shape, phrase",
    [((3, 4, 5, 2), "4-D image"), ((6, 7), "single slice"), ((6, 7, 1), "single slice")],
)
def test_nifti_of_wrong_dimensionality_is_refused_naming_the_file(tmp_path, shape, phrase):
    write_nifti(tmp_path / "bad.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(DataError, match=phrase) as err:
        read_nifti(tmp_path / "bad.nii.gz")
    assert "bad.nii.gz" in str(err.value) and "allowed: a 3-D volume" in str(err.value)


def test_manifest_of_nifti_volumes_gives_ras_sites_in_manifest_order(tmp_path):
    rows = []
    for s, site in enumerate(["zeta", "alpha"]):  # not alphabetical: order must follow the manifest
        for j in range(10):
            rel = f"vols/{site}/{j}.nii.gz"
            write_nifti(tmp_path / rel, np.full((3, 4, 5), 10 * s + j, np.int16), np.diag([-1.5, 1.5, 2, 1]))
            rows.append((rel, j % 2, site, "train" if j < 7 else "test"))
    manifest = write_manifest(tmp_path, rows, split=True)

    fed = load_image_manifest(manifest, split_column="split")

    assert fed.site_names == ["zeta", "alpha"] and fed.is_image
    assert fed.sample_shape == (1, 3, 4, 5) and fed.feature_names == ("intensity",)
    for s, site in enumerate(fed.sites):
        assert site.X.dtype == np.float32
        np.testing.assert_array_equal(site.X[:, 0, 0, 0, 0], 10 * s + np.arange(10))
        np.testing.assert_array_equal(site.y, np.arange(10) % 2)
        np.testing.assert_array_equal(site.split, np.arange(10) < 7)
    info = fed.info
    assert info["orientation"] == "RAS" and info["n_skipped"] == 0 and info["skipped"] == []
    assert info["sites"]["zeta"]["voxel_sizes"] == [{"value": [1.5, 1.5, 2.0], "count": 10}]
    assert info["sites"]["alpha"]["original_orientations"] == [{"value": "LAS", "count": 10}]


# ----------------------------------------------------------------------------- DICOM


def test_dicom_series_is_sorted_by_position_rescaled_and_turned_to_ras(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 3000, size=(5, 3, 4)).astype(np.uint16)  # (slice, row, col)
    slopes = [2.0, 2.0, 1.0, 2.0, 0.5]
    intercepts = [-1024.0, -1000.0, -1024.0, 0.0, -1024.0]
    write_series(tmp_path / "s", stored, slopes=slopes, intercepts=intercepts)

    data, meta = read_dicom_series(tmp_path / "s")

    physical = stored * np.array(slopes)[:, None, None] + np.array(intercepts)[:, None, None]
    # LPS axial slices: columns run toward patient Left, rows toward Posterior, slices Superior.
    # RAS axes: R = columns reversed, A = rows reversed, S = slice order by z.
    expected = physical[:, ::-1, ::-1].transpose(2, 1, 0)
    assert data.shape == (1, 4, 3, 5) and data.dtype == np.float32
    np.testing.assert_allclose(data[0], expected)
    assert meta["voxel_size"] == (0.75, 0.5, 2.5)  # column spacing, row spacing, slice step
    assert meta["n_slices"] == 5 and meta["orientation"] == "RAS" and meta["original_orientation"] == "LPS"
    assert meta["dtype"] == "uint16" and meta["bit_depth"] == 16


def test_single_dicom_file_is_a_2d_image_with_rescale(tmp_path):
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    write_dicom_slice(tmp_path / "x.dcm", pixels, z=0.0, series_uid="1.2.3", instance=1, slope=3.0, intercept=-5.0)
    data, meta = read_dicom_file(tmp_path / "x.dcm")
    np.testing.assert_array_equal(data, (pixels * 3.0 - 5.0)[None])
    assert meta["voxel_size"] == (0.5, 0.75) and meta["photometric"] == "MONOCHROME2"


def _mixed_series(folder):
    write_series(folder, np.zeros((3, 3, 4), np.uint16), series_uid="1.2.3.4")
    write_dicom_slice(folder / "other.dcm", np.zeros((3, 4), np.uint16), z=50.0, series_uid="1.2.3.5", instance=9)


def _mixed_size(folder):
    write_series(folder, np.zeros((3, 3, 4), np.uint16))
    write_dicom_slice(folder / "big.dcm", np.zeros((5, 4), np.uint16), z=50.0,
                      series_uid="1.2.826.0.1.3680043.8.498.2", instance=9)


def _not_dicom(folder):
    write_series(folder, np.zeros((3, 3, 4), np.uint16))
    (folder / "notes.txt").write_text("scanned on Tuesday")


def _gap(folder):
    write_series(folder, np.zeros((3, 3, 4), np.uint16))  # z = 10, 12.5, 15; 17.5 missing
    write_dicom_slice(folder / "far.dcm", np.zeros((3, 4), np.uint16), z=20.0,
                      series_uid="1.2.826.0.1.3680043.8.498.2", instance=9)


def _same_position(folder):
    write_series(folder, np.zeros((3, 3, 4), np.uint16))
    write_dicom_slice(folder / "again.dcm", np.zeros((3, 4), np.uint16), z=10.0,
                      series_uid="1.2.826.0.1.3680043.8.498.2", instance=9)


@pytest.mark.parametrize(
    "make, phrase",
    [
        (_mixed_series, r"mixes 2 DICOM series: 1\.2\.3\.4 \(3 files.*1\.2\.3\.5 \(1 files, e\.g\. other\.dcm\)"),
        (_mixed_size, r"slice big\.dcm has 5×4 pixels"),
        (_not_dicom, r"slice notes\.txt: not a DICOM file"),
        (_gap, r"slice spacing is uneven"),
        (_same_position, r"lie at the same position"),
    ],
    ids=["mixed-series", "rows-cols", "non-dicom-file", "gap", "duplicate-position"],
)
def test_bad_dicom_series_folder_is_one_error_naming_it(tmp_path, make, phrase):
    make(tmp_path / "subject7")
    with pytest.raises(DataError, match=phrase) as err:
        read_dicom_series(tmp_path / "subject7")
    assert "subject7" in str(err.value)


def test_manifest_of_dicom_folders_reads_each_series(tmp_path):
    rows = []
    for j in range(20):
        write_series(tmp_path / f"dcm/p{j}", np.full((3, 2, 2), j, np.uint16), seed=j,
                     series_uid=f"1.2.826.0.1.3680043.8.498.{100 + j}")
        rows.append((f"dcm/p{j}", j % 2, "A" if j < 10 else "B"))
    fed = load_image_manifest(write_manifest(tmp_path, rows))
    assert fed.info["kind"] == "dicom-series" and fed.sample_shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(fed.site("B").X[:, 0, 1, 1, 2], np.arange(10, 20))
    assert fed.info["sites"]["A"]["voxel_sizes"] == [{"value": [0.75, 0.5, 2.5], "count": 10}]


# ----------------------------------------------------------------------------- 2-D images


def test_planar_images_keep_raw_values_and_record_bit_depth(tmp_path):
    gray8 = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    gray16 = np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3)).astype(np.uint8)
    raw = np.linspace(-3.5, 1e4, 20, dtype=np.float32).reshape(4, 5)
    write_png(tmp_path / "g8.png", gray8)
    write_png(tmp_path / "g16.png", gray16)
    write_png(tmp_path / "rgb.png", rgb)
    write_png(tmp_path / "f.tif", raw)

    d8, m8 = read_planar(tmp_path / "g8.png")
    d16, m16 = read_planar(tmp_path / "g16.png")
    drgb, mrgb = read_planar(tmp_path / "rgb.png")
    df, mf = read_planar(tmp_path / "f.tif")

    np.testing.assert_array_equal(d8, gray8[None])
    np.testing.assert_array_equal(d16, gray16[None])  # 0..57000: no rescaling to 0..255 or 0..1
    np.testing.assert_array_equal(drgb, rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(df, raw[None])
    assert (m8["bit_depth"], m16["bit_depth"], mrgb["bit_depth"], mf["bit_depth"]) == (8, 16, 8, 32)
    assert m8["channels"] == ("gray",) and mrgb["channels"] == ("R", "G", "B")
    assert all(m["notes"] == [] for m in (m8, m16, mrgb, mf))


def test_rgba_and_palette_images_become_rgb_with_a_note(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3)).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=2)
    write_png(tmp_path / "a.png", rgba)
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal.save(tmp_path / "p.png")

    da, ma = read_planar(tmp_path / "a.png")
    dp, mp = read_planar(tmp_path / "p.png")

    np.testing.assert_array_equal(da, rgb.transpose(2, 0, 1))  # alpha dropped, colours untouched
    np.testing.assert_array_equal(dp, np.asarray(pal.convert("RGB")).transpose(2, 0, 1))
    assert ma["notes"] == ["RGBA converted to RGB"] and mp["notes"] == ["P converted to RGB"]


def test_manifest_relative_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    rows = png_federation(data, split=True)
    write_manifest(data, rows, split=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    fed = load_image_manifest("../data/manifest.csv", split_column="split", name="pngs")

    assert fed.name == "pngs" and fed.site_names == ["site0", "site1"]
    assert fed.sample_shape == (1, 6, 5) and fed.feature_names == ("gray",)
    np.testing.assert_array_equal(fed.sites[1].X[:, 0, 0, 0], np.arange(11, 21))
    assert fed.info["orientation"].startswith("as stored")
    assert fed.info["sites"]["site0"]["bit_depths"] == [{"value": 8, "count": 11}]


# ----------------------------------------------------------------------------- bad files


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 if path.suffix == ".png" else b"\x1f\x8b" + b"x" * 50)


def _missing(path):
    path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _wrong_shape_png(path):
    write_png(path, np.zeros((7, 5), np.uint8))


def _rgb_among_gray(path):
    write_png(path, np.zeros((6, 5, 3), np.uint8))


def _four_d(path):
    write_nifti(path, np.zeros((3, 4, 5, 2), np.int16))


def _two_d(path):
    write_nifti(path, np.zeros((3, 4), np.int16))


def _wrong_shape_nifti(path):
    write_nifti(path, np.zeros((3, 4, 6), np.int16))


def _nan_voxels(path):
    write_nifti(path, np.full((3, 4, 5), np.nan, np.float32))


PNG_BREAKERS = [
    (_missing, "not found"),
    (_corrupt, "cannot be read as an image"),
    (_truncate, "cannot be read as an image"),
    (_wrong_shape_png, r"has shape 1×7×5 \(C, H, W\), while 20 of the 21 readable images have 1×6×5"),
    (_rgb_among_gray, r"has shape 3×6×5 .* have 1×6×5"),
]
NIFTI_BREAKERS = [
    (_missing, "not found"),
    (_corrupt, "cannot be read as NIfTI"),
    (_truncate, "cannot be read|voxel data cannot be read"),
    (_four_d, r"4-D image .* \(2 volumes\); allowed: a 3-D volume"),
    (_two_d, r"2-D image of shape \(3, 4\) \(a single slice\); allowed: a 3-D volume"),
    (_wrong_shape_nifti, r"has shape 1×3×4×6 \(C, X, Y, Z\), while 20 of the 21"),
    (_nan_voxels, "NaN or infinite voxels"),
]


def nifti_rows(folder, sizes=(11, 10)):
    rows = []
    for s, n in enumerate(sizes):
        for j in range(n):
            rel = f"v/s{s}_{j}.nii.gz"
            write_nifti(folder / rel, np.full((3, 4, 5), j, np.int16))
            rows.append((rel, j % 2, f"site{s}"))
    return rows


@pytest.mark.parametrize(
    "fmt, breaker, phrase",
    [("png", b, p) for b, p in PNG_BREAKERS] + [("nifti", b, p) for b, p in NIFTI_BREAKERS],
    ids=[f"png-{b.__name__[1:]}" for b, _ in PNG_BREAKERS] + [f"nifti-{b.__name__[1:]}" for b, _ in NIFTI_BREAKERS],
)
def test_each_bad_file_is_one_error_naming_row_and_file_and_skip_bad_counts_it(tmp_path, fmt, breaker, phrase):
    rows = png_federation(tmp_path) if fmt == "png" else nifti_rows(tmp_path)
    manifest = write_manifest(tmp_path, rows)
    victim = tmp_path / rows[3][0]
    breaker(victim)

    with pytest.raises(DataError, match=phrase) as err:
        load_image_manifest(manifest)
    message = str(err.value)
    assert "data row 4 (site 'site0')" in message and victim.name in message

    fed = load_image_manifest(manifest, skip_bad=True)
    assert fed.info["n_skipped"] == 1
    (skipped,) = fed.info["skipped"]
    assert skipped["path"] == str(victim) and skipped["row"] == 4
    assert skipped["site"] == "site0" and re.search(phrase, skipped["reason"])
    assert [s.n for s in fed.sites] == [10, 10]


def test_non_image_file_in_manifest_is_a_bad_file(tmp_path):
    rows = png_federation(tmp_path)
    (tmp_path / "readme.txt").write_text("hello")
    rows[0] = ("readme.txt",) + rows[0][1:]
    manifest = write_manifest(tmp_path, rows)
    with pytest.raises(DataError, match=r"data row 1 .*readme\.txt: is not an image file type; allowed: \.nii"):
        load_image_manifest(manifest)
    assert load_image_manifest(manifest, skip_bad=True).info["n_skipped"] == 1


def test_majority_shape_wins_under_skip_bad_even_when_the_first_file_is_the_odd_one(tmp_path):
    rows = png_federation(tmp_path, sizes=(12, 10))
    write_png(tmp_path / rows[0][0], np.zeros((9, 9), np.uint8))
    write_png(tmp_path / rows[1][0], np.zeros((9, 9), np.uint8))
    fed = load_image_manifest(write_manifest(tmp_path, rows), skip_bad=True)
    assert fed.sample_shape == (1, 6, 5)
    assert [s["row"] for s in fed.info["skipped"]] == [1, 2]
    assert all("9×9" in s["reason"] for s in fed.info["skipped"])


def test_mixed_kinds_are_refused_naming_two_rows_even_with_skip_bad(tmp_path):
    rows = png_federation(tmp_path)
    write_nifti(tmp_path / "v.nii.gz", np.zeros((3, 4, 5), np.int16))
    rows[5] = ("v.nii.gz",) + rows[5][1:]
    manifest = write_manifest(tmp_path, rows)
    pattern = r"mixes image kinds: data row 1 \(s0_0\.png\) is a 2-D image, data row 6 \(v\.nii\.gz\) is a NIfTI volume"
    for skip in (False, True):
        with pytest.raises(DataError, match=pattern):
            load_image_manifest(manifest, skip_bad=skip)


def test_skipping_that_leaves_too_few_images_says_so(tmp_path):
    rows = png_federation(tmp_path)
    _corrupt(tmp_path / rows[12][0])  # site1 had exactly 10
    with pytest.raises(DataError, match=r"site 'site1' has 9 usable images after skipping 1 of its 10 files as bad"):
        load_image_manifest(write_manifest(tmp_path, rows), skip_bad=True)


def test_skipping_that_empties_a_split_or_a_class_says_so(tmp_path):
    rows = png_federation(tmp_path, sizes=(14, 10), split=True)  # site0 test rows: 11, 12, 13
    for r in (11, 12, 13):
        _corrupt(tmp_path / rows[r][0])
    with pytest.raises(DataError, match=r"site 'site0' has no test rows left after skipping 3 of its 14"):
        load_image_manifest(write_manifest(tmp_path, rows, split=True), split_column="split", skip_bad=True)

    rows = png_federation(tmp_path / "b", sizes=(14, 10))
    rows = [(p, 1 if i in (1, 3) else 0, s) if i < 14 else (p, y, s) for i, (p, y, s) in enumerate(rows)]
    for r in (1, 3):
        _corrupt(tmp_path / "b" / rows[r][0])
    with pytest.warns(SingleClassSiteWarning, match=r"site 'site0' holds one class only after skipping 2"):
        load_image_manifest(write_manifest(tmp_path / "b", rows), skip_bad=True)


def test_bad_arguments_are_config_errors(tmp_path):
    manifest = write_manifest(tmp_path, png_federation(tmp_path))
    with pytest.raises(ConfigError, match="kind must be one of 'auto', 'nifti', 'dicom', 'image'"):
        load_image_manifest(manifest, kind="png")
    with pytest.raises(DataError, match=r"s0_0\.png: cannot be read as NIfTI"):
        load_image_manifest(manifest, kind="nifti")


def test_importing_the_loaders_loads_no_imaging_library():
    code = ("import sys, medfed.data.images; "
            "print(sorted(m for m in ('nibabel', 'pydicom', 'PIL', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- MedMNIST npz


def write_medmnist(path, n=(12, 4, 6), shape=(5, 5), classes=(0, 1, 2, 3), seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, m in zip(("train", "val", "test"), n):
        arrays[f"{part}_images"] = rng.integers(0, 256, size=(m, *shape)).astype(np.uint8)
        arrays[f"{part}_labels"] = rng.choice(classes, size=(m, 1)).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


@pytest.mark.parametrize("use_val", ["train", "test", "drop"])
def test_medmnist_npz_sites_with_predefined_split_and_binary_labels(tmp_path, use_val):
    a = write_medmnist(tmp_path / "a.npz", seed=1)
    write_medmnist(tmp_path / "b.npz", n=(10, 3, 5), seed=2)
    fed = load_medmnist_npz({"A": tmp_path / "a.npz", "B": tmp_path / "b.npz"},
                            positive_classes=[2, 3], use_val=use_val)
    assert fed.site_names == ["A", "B"] and fed.sample_shape == (1, 5, 5) and fed.feature_names == ("gray",)
    site = fed.site("A")
    n_val = {"train": 4, "test": 4, "drop": 0}[use_val]
    assert site.n == 12 + n_val + 6
    assert int(site.split.sum()) == 12 + (n_val if use_val == "train" else 0)
    np.testing.assert_array_equal(site.X[:12, 0], a["train_images"])
    np.testing.assert_array_equal(site.y[:12], np.isin(a["train_labels"][:, 0], [2, 3]))
    np.testing.assert_array_equal(site.X[-6:, 0], a["test_images"])
    assert not site.split[-6:].any()
    assert fed.info["counts"]["B"] == ({"train": 10, "test": 5} if use_val == "drop" else {"train": 10, "val": 3, "test": 5})


def test_medmnist_rgb_images_become_three_channels(tmp_path):
    a = write_medmnist(tmp_path / "a.npz", shape=(4, 4, 3))
    fed = load_medmnist_npz({"A": tmp_path / "a.npz"}, positive_classes=[0])
    assert fed.feature_names == ("R", "G", "B") and fed.sample_shape == (3, 4, 4)
    np.testing.assert_array_equal(fed.sites[0].X[0], a["train_images"][0].transpose(2, 0, 1))


def test_medmnist_errors_name_the_file_and_what_is_allowed(tmp_path):
    write_medmnist(tmp_path / "a.npz")
    sites = {"A": tmp_path / "a.npz"}
    with pytest.raises(ConfigError, match=r"positive_classes must list .* classes \[0, 1, 2, 3\]"):
        load_medmnist_npz(sites, positive_classes=[])
    with pytest.raises(ConfigError, match=r"positive_classes \[7\] do not occur; the files hold classes \[0, 1, 2, 3\]"):
        load_medmnist_npz(sites, positive_classes=[1, 7])
    with pytest.raises(ConfigError, match="use_val must be one of"):
        load_medmnist_npz(sites, positive_classes=[1], use_val="both")

    write_medmnist(tmp_path / "nokey.npz", test_labels=None)
    with pytest.raises(DataError, match=r"nokey\.npz: no test_labels; it holds"):
        load_medmnist_npz({"A": tmp_path / "nokey.npz"}, positive_classes=[1])
    write_medmnist(tmp_path / "multi.npz", train_labels=np.zeros((12, 14), np.uint8))
    with pytest.raises(DataError, match=r"multi\.npz: train_labels has 14 columns"):
        load_medmnist_npz({"A": tmp_path / "multi.npz"}, positive_classes=[1])
    write_medmnist(tmp_path / "big.npz", shape=(7, 7))
    with pytest.raises(DataError, match=r"big\.npz: train_images are 7×7 grayscale, while .*a\.npz \('A'\) holds 5×5"):
        load_medmnist_npz({"A": tmp_path / "a.npz", "B": tmp_path / "big.npz"}, positive_classes=[1])
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk\.npz: cannot be read as a \.npz archive"):
        load_medmnist_npz({"A": tmp_path / "junk.npz"}, positive_classes=[1])
    with pytest.raises(DataError, match=r"gone\.npz: not found"):
        load_medmnist_npz({"A": tmp_path / "gone.npz"}, positive_classes=[1])


def test_no_warnings_for_clean_files(tmp_path):
    manifest = write_manifest(tmp_path, png_federation(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_manifest(manifest)


def test_medmnist_npz_without_positive_classes_keeps_every_class(tmp_path):
    a = write_medmnist(tmp_path / "a.npz", classes=(0, 2, 5), seed=1)
    write_medmnist(tmp_path / "b.npz", classes=(0, 2), seed=2)  # a site may lack a class
    fed = load_medmnist_npz({"A": tmp_path / "a.npz", "B": tmp_path / "b.npz"})
    assert fed.task == "multiclass" and fed.classes == ("0", "2", "5")  # the integers, in order
    labels = np.concatenate([a[f"{p}_labels"][:, 0] for p in ("train", "val", "test")])
    np.testing.assert_array_equal(np.asarray(fed.classes)[fed.site("A").y], labels.astype(str))
    assert fed.site("A").y.dtype == np.int64 and fed.info["positive_classes"] is None
    assert fed.missing_classes() == {"B": ["5"]}
    # positive_classes still binarizes
    binary = load_medmnist_npz({"A": tmp_path / "a.npz"}, positive_classes=[5])
    assert binary.task == "binary" and set(np.unique(binary.sites[0].y)) == {0, 1}


def test_medmnist_npz_class_names_come_from_the_files(tmp_path):
    names = np.array(["adenosis", "fibroadenoma", "carcinoma"])
    a = write_medmnist(tmp_path / "a.npz", classes=(0, 2))
    np.savez(tmp_path / "a.npz", **a, classes=names)
    fed = load_medmnist_npz({"A": tmp_path / "a.npz"})
    assert fed.classes == ("adenosis", "carcinoma")  # the names of the classes that occur
    assert "2 classes: adenosis, carcinoma" in fed.description

    b = write_medmnist(tmp_path / "b.npz", classes=(0, 2))
    np.savez(tmp_path / "b.npz", **b, classes=np.array(["x", "y", "z"]))
    with pytest.raises(DataError, match=r"b\.npz: classes \['x', 'y', 'z'\] differ from .*a\.npz \('A'\)"):
        load_medmnist_npz({"A": tmp_path / "a.npz", "B": tmp_path / "b.npz"})
    np.savez(tmp_path / "b.npz", **b, classes=np.array(["x", "y"]))
    with pytest.raises(DataError, match=r"b\.npz: classes names 2 classes but the files hold class 2"):
        load_medmnist_npz({"B": tmp_path / "b.npz"})
    write_medmnist(tmp_path / "one.npz", classes=(3,))
    with pytest.raises(ConfigError, match=r"the files hold class \[3\] only"):
        load_medmnist_npz({"A": tmp_path / "one.npz"})


def test_medmnist_npz_runs_multiclass_from_a_config(tmp_path):
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import load_federation

    for name, seed in (("a", 1), ("b", 2)):
        write_medmnist(tmp_path / f"{name}.npz", n=(20, 4, 10), classes=(0, 1, 2), seed=seed)
    config = build_config({"data": {"npz": {"A": str(tmp_path / "a.npz"), "B": str(tmp_path / "b.npz")}},
                           "model": "torch_logistic"})
    assert load_federation(config.data).task == "multiclass"
