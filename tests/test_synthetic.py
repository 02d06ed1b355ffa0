"""The built-in synthetic shapes data set (moco/synthetic.py)."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from moco import synthetic


def _digest_tree(root):
    """path relative to root -> sha256 of the bytes, for every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


SMALL = dict(num_classes=4, train_per_class=6, val_per_class=3, image_size=24)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("small")), seed=0, **SMALL)


@pytest.fixture(scope="module", params=synthetic.STYLES)
def medium_metadata(request, tmp_path_factory):
    """A moderately sized generation of each style, for the statistics of the nuisance factors."""
    root = synthetic.generate(str(tmp_path_factory.mktemp("medium")), seed=3, train_per_class=150,
                              val_per_class=1, image_size=16, style=request.param)
    return [dict(r, root=root) for r in synthetic.read_metadata(root) if r["split"] == "train"]


def test_same_seed_same_bytes(small, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), seed=0, **SMALL)
    assert _digest_tree(small) == _digest_tree(again)


def test_patterns_style_is_deterministic_too(tmp_path):
    args = dict(seed=5, num_classes=3, train_per_class=2, val_per_class=1, image_size=16, style="patterns")
    a = synthetic.generate(str(tmp_path / "a"), **args)
    b = synthetic.generate(str(tmp_path / "b"), **args)
    assert _digest_tree(a) == _digest_tree(b)
    assert sorted(os.listdir(os.path.join(a, "train"))) == ["00_stripes", "01_checker", "02_dots"]


def test_different_seed_different_images(small, tmp_path):
    other = synthetic.generate(str(tmp_path / "other"), seed=1, **SMALL)
    a, b = _digest_tree(small), _digest_tree(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".png")]
    differing = sum(a[k] != b[k] for k in images)
    assert differing == len(images)


def test_imagefolder_layout_and_exact_class_balance(small):
    for split, per_class in (("train", SMALL["train_per_class"]), ("val", SMALL["val_per_class"])):
        classes = sorted(os.listdir(os.path.join(small, split)))
        names = synthetic.class_names(synthetic.DEFAULT_STYLE)
        assert classes == [f"{i:02d}_{names[i]}" for i in range(SMALL["num_classes"])]
        for cls in classes:
            files = os.listdir(os.path.join(small, split, cls))
            assert len(files) == per_class
            assert all(f.endswith(".png") for f in files)


def test_images_are_rgb_of_the_requested_size(small):
    rows = synthetic.read_metadata(small)
    assert len(rows) == SMALL["num_classes"] * (SMALL["train_per_class"] + SMALL["val_per_class"])
    for row in rows:
        with Image.open(os.path.join(small, row["path"])) as im:
            assert im.mode == "RGB"
            assert im.size == (SMALL["image_size"], SMALL["image_size"])
            assert np.asarray(im).std() > 0  # something is drawn
        assert row["path"].split("/")[1] == f"{row['label']:02d}_{row['class_name']}"


def test_imagefolder_reads_it_with_labels_in_class_order(small):
    datasets = pytest.importorskip("torchvision.datasets")
    ds = datasets.ImageFolder(os.path.join(small, "train"))
    assert len(ds) == SMALL["num_classes"] * SMALL["train_per_class"]
    assert [ds.class_to_idx[c] for c in sorted(ds.class_to_idx)] == list(range(SMALL["num_classes"]))
    image, label = ds[len(ds) - 1]
    assert label == SMALL["num_classes"] - 1 and image.size == (24, 24)


NUMERIC_FACTORS = ("bg_r", "bg_g", "bg_b", "fg_r", "fg_g", "fg_b", "objects", "scale", "x", "y", "angle")


def test_nuisance_factors_are_independent_of_the_label(medium_metadata):
    rows = medium_metadata
    labels = np.array([r["label"] for r in rows])
    classes = np.unique(labels)
    per_class = len(rows) // len(classes)
    for name in NUMERIC_FACTORS:
        values = np.array([r[name] for r in rows], dtype=float)
        if values.std() == 0:  # constant in this style (e.g. one pattern per image)
            continue
        means = np.array([values[labels == c].mean() for c in classes])
        # every class mean within 4 standard errors of the pooled mean (about 1 in 16,000 by chance)
        stderr = values.std() / np.sqrt(per_class)
        assert np.abs(means - values.mean()).max() < 4 * stderr, name
    # the kind of background: chi-square test of the class x kind table
    kinds = sorted({r["background"] for r in rows})
    if len(kinds) == 1:  # the patterns style has no background of its own
        return
    assert kinds == sorted(synthetic.BACKGROUNDS)
    table = np.array([[sum(1 for r in rows if r["label"] == c and r["background"] == k) for k in kinds]
                      for c in classes], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    dof = (len(classes) - 1) * (len(kinds) - 1)  # 18: the 0.9999 quantile is about 49
    assert chi2 < 49, (chi2, dof)


def test_mean_colour_of_an_image_does_not_give_the_label_away(medium_metadata):
    """Colours are label-free, so the mean brightness of the pixels is the same for every class."""
    rows = medium_metadata
    labels = np.array([r["label"] for r in rows])
    root = rows[0]["root"]
    lum = np.array([np.asarray(Image.open(os.path.join(root, r["path"])).convert("L"), dtype=float).mean()
                    for r in rows])
    stderr = lum.std() / np.sqrt(len(rows) // len(np.unique(labels)))
    for c in np.unique(labels):
        assert abs(lum[labels == c].mean() - lum.mean()) < 4 * stderr, c


def test_ensure_dataset_generates_once(tmp_path):
    args = dict(seed=0, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    path = synthetic.ensure_dataset(cache_dir=str(tmp_path), **args)
    assert os.path.basename(path) == synthetic.dataset_name(**args)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no temporary folder left behind
    first = "00_" + synthetic.class_names(synthetic.DEFAULT_STYLE)[0]
    probe = os.path.join(path, "train", first, first + "_00000.png")
    before = os.stat(probe).st_mtime_ns
    os.utime(probe, ns=(before - 10**9, before - 10**9))  # an mtime that a rewrite would change
    marked = os.stat(probe).st_mtime_ns
    assert synthetic.ensure_dataset(cache_dir=str(tmp_path), **args) == path
    assert os.stat(probe).st_mtime_ns == marked


def test_ensure_dataset_uses_the_environment_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCO_DATA_CACHE", str(tmp_path / "env-cache"))
    path = synthetic.ensure_dataset(seed=0, num_classes=2, train_per_class=1, val_per_class=1,
                                    image_size=16)
    assert os.path.dirname(path) == str(tmp_path / "env-cache")


def test_killed_generation_leaves_no_dataset(tmp_path, monkeypatch):
    args = dict(seed=0, num_classes=2, train_per_class=3, val_per_class=1, image_size=16)
    calls = []
    real_draw = synthetic.draw_pattern

    def dying_draw(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation
        return real_draw(*a, **k)

    monkeypatch.setattr(synthetic, "draw_pattern", dying_draw)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_dataset(cache_dir=str(tmp_path), **args)
    assert os.listdir(tmp_path) == []  # neither the final folder nor a temporary one
    monkeypatch.setattr(synthetic, "draw_pattern", real_draw)
    path = synthetic.ensure_dataset(cache_dir=str(tmp_path), **args)
    assert len(synthetic.read_metadata(path)) == 2 * (3 + 1)


def test_options_change_the_cache_folder(tmp_path):
    args = dict(seed=0, num_classes=2, train_per_class=1, val_per_class=1, image_size=16)
    plain = synthetic.ensure_dataset(cache_dir=str(tmp_path), **args)
    pal = synthetic.ensure_dataset(cache_dir=str(tmp_path), palette=4, **args)
    shp = synthetic.ensure_dataset(cache_dir=str(tmp_path), style="shapes", **args)
    assert len({plain, pal, shp}) == 3
    assert sorted(os.listdir(os.path.join(shp, "train"))) == ["00_disk", "01_square"]


def test_a_stale_half_written_temporary_folder_is_ignored(tmp_path):
    args = dict(seed=0, num_classes=2, train_per_class=1, val_per_class=1, image_size=16)
    stale = tmp_path / (".tmp-" + synthetic.dataset_name(**args) + "-killed")
    (stale / "train").mkdir(parents=True)
    path = synthetic.ensure_dataset(cache_dir=str(tmp_path), **args)
    assert os.path.isdir(os.path.join(path, "val"))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.generate(str(tmp_path), num_classes=len(synthetic.CLASS_NAMES) + 1, style="shapes")
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.generate(str(tmp_path), num_classes=9, style="patterns")
    with pytest.raises(ValueError, match="style"):
        synthetic.generate(str(tmp_path), style="letters")
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(str(tmp_path), image_size=4)
    with pytest.raises(ValueError, match="regions"):
        synthetic.generate(str(tmp_path), regions=0)
    with pytest.raises(ValueError, match="regions"):
        synthetic.generate(str(tmp_path), regions=4, style="shapes")


def test_describe_is_one_line():
    line = synthetic.describe()
    assert "\n" not in line and "classes" in line


def test_default_dataset_tiny_is_quick_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCO_DATA_CACHE", str(tmp_path))
    path = synthetic.default_dataset(seed=0, log=lambda *a: None, **synthetic.TINY)
    assert synthetic.default_dataset(seed=0, log=lambda *a: None, **synthetic.TINY) == path
    assert os.path.dirname(path) == str(tmp_path)
    rows = synthetic.read_metadata(path)
    tiny = synthetic.TINY
    assert len(rows) == tiny["num_classes"] * (tiny["train_per_class"] + tiny["val_per_class"])


def test_patchwork_of_regions_is_deterministic_and_changes_the_images(tmp_path):
    args = dict(seed=2, num_classes=2, train_per_class=3, val_per_class=1, image_size=16, style="patterns")
    a = _digest_tree(synthetic.generate(str(tmp_path / "a"), regions=4, **args))
    b = _digest_tree(synthetic.generate(str(tmp_path / "b"), regions=4, **args))
    one = _digest_tree(synthetic.generate(str(tmp_path / "one"), **args))
    assert a == b
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != one[k] for k in images)


def test_every_region_of_a_patchwork_shows_the_pattern_at_its_own_orientation():
    # stripes: one region has one direction (the doubled-angle mean of its edges' gradients has length
    # near 1); a patchwork of regions with independent orientations has several (a much shorter mean)
    def coherence(regions, seed):
        image, _ = synthetic.draw_pattern(np.random.default_rng(seed), 0, image_size=64, palette=2,
                                          regions=regions)
        gy, gx = np.gradient(np.asarray(image.convert("L"), dtype=np.float64))
        magnitude = np.hypot(gx, gy)
        return abs((magnitude * np.exp(2j * np.arctan2(gy, gx))).sum()) / magnitude.sum()
    assert min(coherence(1, seed) for seed in range(8)) > 0.85
    assert np.mean([coherence(6, seed) for seed in range(8)]) < 0.5
