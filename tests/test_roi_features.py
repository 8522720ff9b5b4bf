"""ROI features (issue 4, part 2): atlas-region means of subject images on a phantom atlas the
test builds itself, against hand-computed values; label-file formats; the table feeding
``load_table`` and ``medfed run``; bad inputs."""

import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")

from medfed.cli.app import app
from medfed.data.roi import extract_roi_features, parse_regions, read_atlas, read_labels
from medfed.data.tables import load_table
from medfed.errors import ConfigError, DataError

runner = CliRunner()

# --------------------------------------------------------------------------- the phantom

SHAPE = (12, 14, 10)
VOXEL = 2.0  # mm
ORIGIN = np.array([-11.0, -13.0, -9.0])  # world position (mm) of voxel (0, 0, 0)'s centre
# region id -> (x, y, z) index ranges [lo, hi) of its box; 7 is a sparse id, as in real atlases
BOXES = {
    1: ((1, 5), (1, 6), (1, 5)),
    2: ((6, 11), (1, 6), (1, 5)),
    3: ((1, 11), (7, 13), (5, 9)),
    7: ((2, 4), (8, 10), (1, 3)),
}
NAMES = {1: "Left box", 2: "Right box", 3: "Top slab", 7: "Small"}
CONST = {1: 3.0, 2: 5.0, 3: 7.0, 7: 11.0}
BACKGROUND = 100.0


def atlas_affine():
    aff = np.diag([VOXEL, VOXEL, VOXEL, 1.0])
    aff[:3, 3] = ORIGIN
    return aff


def atlas_labels():
    lab = np.zeros(SHAPE, dtype=np.int16)
    for rid, ((x0, x1), (y0, y1), (z0, z1)) in BOXES.items():
        lab[x0:x1, y0:y1, z0:z1] = rid
    return lab


def save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.fixture
def atlas_file(tmp_path):
    return save(tmp_path / "atlas.nii.gz", atlas_labels(), atlas_affine())


def phantom_values(gradient=0.5):
    """CONST[region] + gradient * x-index inside regions, BACKGROUND elsewhere."""
    lab = atlas_labels()
    data = np.full(SHAPE, BACKGROUND)
    i = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE)
    for rid, c in CONST.items():
        data[lab == rid] = c + gradient * i[lab == rid]
    return data


def expected_phantom_means(gradient=0.5):
    """By hand: a box's mean x-index is the middle of its x range, (lo + hi - 1) / 2."""
    return {rid: CONST[rid] + gradient * (BOXES[rid][0][0] + BOXES[rid][0][1] - 1) / 2 for rid in BOXES}


def manifest(tmp_path, rows, name="manifest.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def one_subject(tmp_path, image, label=1):
    return manifest(tmp_path, [{"path": image.name, "label": label, "site": "A"},
                               {"path": image.name, "label": 1 - label, "site": "A"}])


def region_row(df, ids=tuple(BOXES)):
    return np.array([df.iloc[0][f"region_{i}"] for i in ids])


# --------------------------------------------------------------------------- means, resampling


def test_same_grid_region_means_are_the_hand_computed_ones(tmp_path, atlas_file):
    image = save(tmp_path / "s.nii.gz", phantom_values(), atlas_affine())
    df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    want = expected_phantom_means()
    assert list(df.columns) == ["site", "label", "region_1", "region_2", "region_3", "region_7"]
    np.testing.assert_allclose(region_row(df), [want[i] for i in BOXES], rtol=0, atol=1e-12)
    assert df.index.name == "path" and df.index[0] == str(tmp_path / "s.nii.gz")
    assert df.attrs["skipped"] == [] and df.attrs["partial"] == {}


def test_flipped_axis_order_in_the_same_world_gives_the_same_means(tmp_path, atlas_file):
    """An LAS file of the same voxels (x axis stored right-to-left): the voxel centres coincide,
    so the means are exact, as on the atlas grid."""
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = SHAPE[0] - 1
    image = save(tmp_path / "las.nii.gz", phantom_values()[::-1], atlas_affine() @ flip)
    assert nib.aff2axcodes(nib.load(str(image)).affine) == ("L", "A", "S")
    df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    want = expected_phantom_means()
    np.testing.assert_allclose(region_row(df), [want[i] for i in BOXES], rtol=0, atol=1e-12)


def test_twice_finer_grid_gives_each_atlas_voxel_the_mean_of_its_eight_subvoxels(tmp_path, atlas_file):
    """1 mm voxels nested in the 2 mm atlas voxels: the atlas voxel centre is the corner shared by
    its 8 sub-voxels, each of weight 1/8 under linear interpolation, so a region's value is the
    mean of every fine voxel inside it (exact up to rounding, 1e-12)."""
    rng = np.random.default_rng(0)
    fine = rng.uniform(0, 1, size=tuple(2 * s for s in SHAPE))
    fine_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_aff[:3, 3] = ORIGIN - 0.5  # fine voxel (0,0,0) is the lower corner sub-voxel of atlas voxel (0,0,0)
    image = save(tmp_path / "fine.nii.gz", fine, fine_aff)
    parent = atlas_labels().repeat(2, 0).repeat(2, 1).repeat(2, 2)  # the atlas voxel each fine voxel lies in
    df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    np.testing.assert_allclose(region_row(df), [fine[parent == i].mean() for i in BOXES], rtol=0, atol=1e-12)
    assert df.attrs["partial"] == {}


def test_any_affine_reproduces_a_field_linear_in_world_space(tmp_path, atlas_file):
    """A rotated, shifted 3 mm grid holding v = 5 + 0.1x - 0.2y + 0.05z (x, y, z in mm): linear
    interpolation reproduces affine functions exactly, so each region's mean is v at the mean
    of its voxel centres, the box centre (tolerance 1e-9: floating-point rounding only)."""
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = 3.0 * rot
    n = 21
    aff[:3, 3] = -aff[:3, :3] @ np.full(3, (n - 1) / 2) + [0.7, -0.4, 0.3]  # centred near the origin, shifted
    aff = aff.astype(np.float32).astype(np.float64)  # what NIfTI stores (sform is float32), so the field is linear in it
    ijk = np.indices((n, n, n)).reshape(3, -1).T
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    coef = np.array([0.1, -0.2, 0.05])
    image = save(tmp_path / "rot.nii.gz", (5 + xyz @ coef).reshape(n, n, n), aff)
    df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    centre = {i: ORIGIN + VOXEL * np.array([(lo + hi - 1) / 2 for lo, hi in BOXES[i]]) for i in BOXES}
    np.testing.assert_allclose(region_row(df), [5 + centre[i] @ coef for i in BOXES], rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # nilearn 0.14 announces a change of its defaults
def test_agrees_with_nilearn_labels_masker(tmp_path, atlas_file):
    """nilearn's NiftiLabelsMasker(resampling_target="labels") is the field's reference: identical
    on the atlas grid; on a 2x finer grid of a smooth field within 1e-3 (it interpolates with
    cubic splines, we linearly; both are exact for the field's linear part)."""
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img=str(atlas_file), strategy="mean", resampling_target="labels")
    image = save(tmp_path / "s.nii.gz", phantom_values(), atlas_affine())
    ours = region_row(extract_roi_features(one_subject(tmp_path, image), atlas_file))
    np.testing.assert_allclose(ours, np.ravel(masker.fit_transform(str(image))), rtol=0, atol=1e-9)

    fine_aff = np.eye(4)
    fine_aff[:3, 3] = ORIGIN - 0.5
    xyz = np.indices(tuple(2 * s for s in SHAPE)).reshape(3, -1).T + fine_aff[:3, 3]
    smooth = (1 + 0.02 * xyz[:, 0] + 0.001 * xyz[:, 1] ** 2).reshape(tuple(2 * s for s in SHAPE))
    fine = save(tmp_path / "fine.nii.gz", smooth, fine_aff)
    ours = region_row(extract_roi_features(one_subject(tmp_path, fine), atlas_file))
    theirs = NiftiLabelsMasker(labels_img=str(atlas_file), strategy="mean",
                               resampling_target="labels").fit_transform(str(fine))
    np.testing.assert_allclose(ours, np.ravel(theirs), rtol=0, atol=1e-3)


def test_partly_covered_regions_use_the_covered_voxels_and_are_recorded(tmp_path, atlas_file):
    """A field of view starting at atlas x-index 3: region 1 (x 1..4) is half covered, region 3
    (x 1..10) 8/10, region 7 (x 2..3) half, region 2 fully. Uncovered voxels are left out, not
    counted as 0 as a zero fill would."""
    aff = atlas_affine()
    aff[:3, 3] = ORIGIN + [3 * VOXEL, 0, 0]
    image = save(tmp_path / "crop.nii.gz", phantom_values()[3:], aff)
    with pytest.warns(UserWarning, match="do not cover every region fully"):
        df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    x_mean = {1: (3 + 4) / 2, 2: (6 + 10) / 2, 3: (3 + 10) / 2, 7: 3.0}  # mean x-index of the covered voxels
    np.testing.assert_allclose(region_row(df), [CONST[i] + 0.5 * x_mean[i] for i in BOXES], rtol=0, atol=1e-12)
    assert df.attrs["partial"] == {str(image): {"region_1": 0.5, "region_3": 0.8, "region_7": 0.5}}


def test_nan_voxels_are_left_out_without_spoiling_their_neighbours(tmp_path, atlas_file):
    """One NaN fine voxel inside region 2 removes the one atlas voxel it lies in (its linear
    interpolation touches the NaN); the neighbouring atlas voxels, which see the NaN only with
    weight 0, keep their values."""
    rng = np.random.default_rng(1)
    fine = rng.uniform(0, 1, size=tuple(2 * s for s in SHAPE))
    fine[2 * 7 + 1, 2 * 3, 2 * 2] = np.nan  # inside atlas voxel (7, 3, 2), region 2
    fine_aff = np.eye(4)
    fine_aff[:3, 3] = ORIGIN - 0.5
    image = save(tmp_path / "nan.nii.gz", fine, fine_aff)
    with pytest.warns(UserWarning):
        df = extract_roi_features(one_subject(tmp_path, image), atlas_file)
    parent = atlas_labels().repeat(2, 0).repeat(2, 1).repeat(2, 2)
    hole = np.zeros(SHAPE, dtype=bool)
    hole[7, 3, 2] = True
    keep = (parent == 2) & ~hole.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    assert df.iloc[0]["region_2"] == pytest.approx(fine[keep].mean(), abs=1e-12)
    n2 = int((atlas_labels() == 2).sum())
    assert df.attrs["partial"][str(image)] == {"region_2": round((n2 - 1) / n2, 4)}


def test_volume_and_median_strategies(tmp_path, atlas_file):
    image = save(tmp_path / "s.nii.gz", phantom_values(), atlas_affine())
    m = one_subject(tmp_path, image)
    lab = atlas_labels()
    volume = extract_roi_features(m, atlas_file, strategy="volume")
    want = [phantom_values()[lab == i].sum() * VOXEL**3 for i in BOXES]  # sum × 8 mm³ per voxel
    np.testing.assert_allclose(region_row(volume), want, rtol=1e-12)
    median = extract_roi_features(m, atlas_file, strategy="median")
    # x-index ranges are symmetric about their middle, so the median equals the mean
    want = expected_phantom_means()
    np.testing.assert_allclose(region_row(median), [want[i] for i in BOXES], rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="strategy must be one of mean, median, volume"):
        extract_roi_features(m, atlas_file, strategy="max")


# --------------------------------------------------------------------------- label files


def test_label_file_formats(tmp_path):
    spaced = {1: "Left box", 2: "Right box", 3: "Top slab", 7: "Small"}
    token = {1: "Left_box", 2: "Right_box", 3: "Top_slab", 7: "Small"}
    files = {
        # plain "id name": the name is the rest of the line
        "plain.txt": ("# my atlas\n1 Left box\n2 Right box\n\n3 Top slab\n7 Small\n", spaced),
        # the format of /usr/share/mricron/templates/aal.nii.txt (Debian mricron-data): image value,
        # name, original AAL code; CRLF line ends and a trailing blank line
        "aal.nii.txt": ("1 Left_box 2001\r\n2 Right_box 2002\r\n3 Top_slab 2101\r\n7 Small 9170\r\n\r\n", token),
        "ids.csv": ("id,name\n1,Left box\n2,Right box\n3,Top slab\n7,Small\n", spaced),
        "reordered.csv": ("colour,name,index\nred,Left box,1\nblue,Right box,2\ngreen,Top slab,3\ngrey,Small,7\n",
                          spaced),
        "headerless.csv": ("1,Left box\n2,Right box\n3,Top slab\n7,Small\n", spaced),
        "lut.tsv": ("index\tname\n0\tBackground\n1\tLeft box\n2\tRight box\n3\tTop slab\n7\tSmall\n", spaced),
        # JHU labels in mricron-data: tab-separated, background listed as 0
        "jhu.txt": ("0\tUnclassified\r\n1\tLeft box\r\n2\tRight box\r\n3\tTop slab\r\n7\tSmall\r\n", spaced),
        # FreeSurfer colour table: id name R G B A
        "lut.txt": (("#$Id: FreeSurferColorLUT.txt\n0  Unknown 0 0 0 0\n1 Left_box 70 130 180 0\n"
                     "2 Right_box 245 245 245 0\n3 Top_slab 205 62 78 0\n7 Small 120 18 134 0\n"), token),
        # the SPM AAL toolbox's ROI_MNI_V4.txt: abbreviation, name, image value
        "ROI_MNI_V4.txt": ("LB\tLeft_box\t1\nRB\tRight_box\t2\nTS\tTop_slab\t3\nSM\tSmall\t7\n", token),
    }
    for name, (text, want) in files.items():
        path = tmp_path / name
        path.write_bytes(text.encode())
        assert read_labels(path) == want, name


def test_atlas_names_come_from_the_label_file_and_default_to_region_ids(tmp_path, atlas_file):
    labels = tmp_path / "aal.nii.txt"
    labels.write_text("".join(f"{i} {NAMES[i].replace(' ', '_')} {2000 + i}\r\n" for i in (3, 1, 2, 7)))
    atlas = read_atlas(atlas_file, labels)
    assert atlas.label_ids == (3, 1, 2, 7)  # the label file's order
    assert atlas.names == ("Top_slab", "Left_box", "Right_box", "Small")
    plain = read_atlas(atlas_file)
    assert plain.label_ids == (1, 2, 3, 7) and plain.names == ("region_1", "region_2", "region_3", "region_7")


def test_label_file_and_image_must_agree(tmp_path, atlas_file):
    short = tmp_path / "short.txt"
    short.write_text("1 a\n2 b\n3 c\n")
    with pytest.raises(DataError, match=r"names no region for 1 of the 4 region ids .*\(7\)"):
        read_atlas(atlas_file, short)
    extra = tmp_path / "extra.txt"
    extra.write_text("1 a\n2 b\n3 c\n7 d\n9 e\n")
    with pytest.warns(UserWarning, match="1 region\\(s\\) that do not occur .*9 e"):
        atlas = read_atlas(atlas_file, extra)
    assert atlas.label_ids == (1, 2, 3, 7)
    for text, message in [("1 a\n1 b\n", "region id 1 appears more than once"),
                          ("x1 a\n2 b\n", "'x1' is not a whole number"),
                          ("1\n", "region 1 has no name"),
                          ("# nothing\n", "names no regions"),
                          ("1 a\n2 a\n3 c\n7 d\n", "region name a is used for more than one id")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            read_atlas(atlas_file, bad)
    table = tmp_path / "bad.csv"
    table.write_text("code,title\n1,a\n")
    with pytest.raises(DataError, match="needs an id and a name column"):
        read_labels(table)


# --------------------------------------------------------------------------- bad atlases, regions


def test_bad_atlases(tmp_path):
    with pytest.raises(DataError, match="atlas .*nope.nii.gz: not found"):
        read_atlas(tmp_path / "nope.nii.gz")
    frac = atlas_labels().astype(np.float32)
    frac[3, 3, 3] = 1.5
    with pytest.raises(DataError, match=r"non-integer values \(e.g. 1.5 in 1 voxels\)"):
        read_atlas(save(tmp_path / "prob.nii.gz", frac, atlas_affine()))
    with pytest.raises(DataError, match="4-D image .*2 volumes"):
        read_atlas(save(tmp_path / "4d.nii.gz", np.stack([atlas_labels()] * 2, -1), atlas_affine()))
    with pytest.raises(DataError, match="holds no region"):
        read_atlas(save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.int16), atlas_affine()))
    with pytest.raises(DataError, match="negative"):
        read_atlas(save(tmp_path / "neg.nii.gz", -atlas_labels(), atlas_affine()))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be read"):
        read_atlas(tmp_path / "junk.nii.gz")
    # a single-volume 4-D file is a volume
    assert read_atlas(save(tmp_path / "one.nii.gz", atlas_labels()[..., None], atlas_affine())).label_ids == (1, 2, 3, 7)


def test_region_selection(tmp_path, atlas_file):
    atlas = read_atlas(atlas_file)
    assert atlas.select("1-2").label_ids == (1, 2)
    assert atlas.select("2-5,7").names == ("region_2", "region_3", "region_7")
    assert atlas.select([7, 1]).label_ids == (1, 7)
    with pytest.raises(DataError, match="regions '50-60' match no region .*1, 2, 3, 7"):
        atlas.select("50-60")
    with pytest.raises(DataError, match="id 99 is not a region"):
        atlas.select([1, 99])
    for spec in ("a-b", "5-1", "", [1.5]):
        with pytest.raises(ConfigError, match="regions"):
            parse_regions(spec)
    image = save(tmp_path / "s.nii.gz", phantom_values(), atlas_affine())
    df = extract_roi_features(one_subject(tmp_path, image), atlas_file, regions="1-2")
    assert list(df.columns) == ["site", "label", "region_1", "region_2"]


# --------------------------------------------------------------------------- the table end to end


def federation_files(tmp_path, labels=(0, 1), split=False):
    """Two sites of 12 subjects; positives have larger values in region 3 (the signal), site B has
    another scanner (scaling) and a 1 mm grid."""
    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    rows = []
    fine_aff = np.eye(4)
    fine_aff[:3, 3] = ORIGIN - 0.5
    lab = atlas_labels()
    for site, scale in (("A", 1.0), ("B", 1.3)):
        for k in range(12):
            y = k % 2
            data = phantom_values() * scale + rng.normal(0, 0.2, SHAPE)
            data[lab == 3] += 2.0 * y
            name = f"img/{site}{k}.nii.gz"
            if site == "B":
                save(tmp_path / name, data.repeat(2, 0).repeat(2, 1).repeat(2, 2), fine_aff)
            else:
                save(tmp_path / name, data, atlas_affine())
            row = {"path": name, "dx": labels[y], "hospital": site}
            if split:
                row["part"] = "test" if k in (0, 1, 2, 3) else "train"
            rows.append(row)
    return manifest(tmp_path, rows)


def test_cli_writes_a_table_that_medfed_run_learns_from(tmp_path, atlas_file):
    m = federation_files(tmp_path)
    labels = tmp_path / "aal.nii.txt"
    labels.write_text("".join(f"{i} {NAMES[i].replace(' ', '_')} {2000 + i}\n" for i in BOXES))
    out = tmp_path / "rois.parquet"
    result = runner.invoke(app, ["features", "roi", "--manifest", str(m), "--atlas", str(atlas_file), "--labels",
                                 str(labels), "--label-column", "dx", "--site-column", "hospital", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 regions (mean)" in result.output and "wrote 24 rows × 4 regions" in result.output
    assert "medfed run --data" in result.output
    df = pd.read_parquet(out)
    assert list(df.columns) == ["site", "label", "Left_box", "Right_box", "Top_slab", "Small"]
    assert df.index.name == "path" and df["label"].tolist() == [0, 1] * 12
    # the signal survives: positives' region-3 mean is 2 higher at site A, 2 at B too (added after scaling)
    a = df[df["site"] == "A"]
    assert a.loc[a["label"] == 1, "Top_slab"].mean() - a.loc[a["label"] == 0, "Top_slab"].mean() == pytest.approx(2.0, abs=0.3)
    fed = load_table(out, site_column="site", label_column="label")
    assert fed.feature_names == ("Left_box", "Right_box", "Top_slab", "Small")
    assert [s.name for s in fed.sites] == ["A", "B"] and [len(s.y) for s in fed.sites] == [12, 12]
    res = tmp_path / "res"
    result = runner.invoke(app, ["run", "--data", str(out), "--site-column", "site", "--label-column", "label",
                                 "--methods", "single,fedavg", "--rounds", "3", "--local-steps", "2",
                                 "--repeats", "1", "--out", str(res)])
    assert result.exit_code == 0, result.output
    assert (res / "results.json").exists() and "FedAvg" in result.output


def test_original_labels_split_column_and_csv_output(tmp_path, atlas_file):
    m = federation_files(tmp_path, labels=("NC", "AD"), split=True)
    out = tmp_path / "rois.csv"
    result = runner.invoke(app, ["features", "roi", "--manifest", str(m), "--atlas", str(atlas_file),
                                 "--label-column", "dx", "--site-column", "hospital", "--split-column", "part",
                                 "--positive-label", "AD", "--regions", "1-3", "--strategy", "volume",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "--split-column split --positive-label AD" in result.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["site", "label", "split", "region_1", "region_2", "region_3"]
    assert df["label"].tolist() == ["NC", "AD"] * 12
    assert df["split"].tolist() == (["test"] * 4 + ["train"] * 8) * 2
    fed = load_table(out, site_column="site", label_column="label", split_column="split", positive_label="AD")
    assert fed.positive_label == "AD" and int(fed.sites[0].y.sum()) == 6


def test_missing_subject_file_is_one_error_or_skipped_and_counted(tmp_path, atlas_file):
    m = federation_files(tmp_path)
    (tmp_path / "img" / "A3.nii.gz").unlink()
    (tmp_path / "img" / "B5.nii.gz").write_bytes(b"garbage")
    kw = {"label_column": "dx", "site_column": "hospital"}
    with pytest.raises(DataError, match=r"1 subject image\(s\) not found: .*A3.nii.gz .*data row 4.*--skip-bad"):
        extract_roi_features(m, atlas_file, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = extract_roi_features(m, atlas_file, skip_bad=True, **kw)
    assert len(df) == 22
    skipped = df.attrs["skipped"]
    assert [(s["row"], s["site"]) for s in skipped] == [(4, "A"), (18, "B")]
    assert "not found" in skipped[0]["reason"] and "cannot be read" in skipped[1]["reason"]
    assert str(tmp_path / "img" / "A3.nii.gz") not in df.index

    (tmp_path / "img" / "A3.nii.gz").symlink_to(tmp_path / "img" / "A4.nii.gz")
    with pytest.raises(DataError, match=r"B5.nii.gz: cannot be read .*data row 18"):
        extract_roi_features(m, atlas_file, **kw)

    out = tmp_path / "rois.parquet"
    args = ["features", "roi", "--manifest", str(m), "--atlas", str(atlas_file), "--label-column", "dx",
            "--site-column", "hospital", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "B5.nii.gz" in result.output and not out.exists()
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped row 18" in result.output
    assert len(pd.read_parquet(out)) == 23


def test_a_subject_outside_the_atlas_space_is_a_bad_file(tmp_path, atlas_file):
    """An image whose field of view misses whole regions (e.g. native space, not registered)."""
    aff = atlas_affine()
    aff[:3, 3] = ORIGIN + [6 * VOXEL, 0, 0]  # starts at atlas x-index 6: regions 1 and 7 are not covered
    image = save(tmp_path / "native.nii.gz", phantom_values()[6:], aff)
    with pytest.raises(DataError, match="native.nii.gz: covers none of region region_1, region_7 .*registered"):
        extract_roi_features(one_subject(tmp_path, image), atlas_file)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, atlas_file):
    image = save(tmp_path / "s.nii.gz", phantom_values(), atlas_affine())
    m = one_subject(tmp_path, image)
    out = tmp_path / "rois.parquet"
    cases = [
        (["--atlas", str(tmp_path / "missing.nii.gz")], "missing.nii.gz: not found"),
        (["--atlas", str(atlas_file), "--regions", "40-50"], "match no region"),
        (["--atlas", str(atlas_file), "--regions", "x"], "regions takes ids and ranges"),
        (["--atlas", str(atlas_file), "--label-column", "dx"], "no label column 'dx'"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["features", "roi", "--manifest", str(m), "--out", str(out), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()
    result = runner.invoke(app, ["features", "roi", "--manifest", str(m), "--atlas", str(atlas_file),
                                 "--out", str(tmp_path / "rois.xlsx")])
    assert result.exit_code == 2 and "--out must end in .parquet" in result.output
