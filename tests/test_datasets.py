"""Task sources, split rules, validation errors and TFDS storage."""

import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from mu2net import archives as A
from mu2net import datasets as D
from mu2net import ingest as I


def _png(value, size=(6, 6)):
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n=12):
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_png(10 * i + (100 if label == "dog" else 0)))


@pytest.mark.parametrize("name,classes,n_test", [("digits", 10, 359), ("mnist5k", 10, 1000)])
def test_builtin_datasets_have_fixed_splits(name, classes, n_test):
    splits, names = I.load_source(f"builtin:{name}")
    assert len(names) == classes and len(splits["test"][1]) == n_test
    again, _ = I.load_source(f"builtin:{name}")
    np.testing.assert_array_equal(splits["test"][1], again["test"][1])


def test_fashion_mnist_builtin_or_clear_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("MU2NET_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(D.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        I.load_source("builtin:fashion_mnist")


def test_image_folder_directory_and_archives(tmp_path):
    _folder(tmp_path / "tree")
    splits, names = A.load_image_folder(tmp_path / "tree")
    assert names == ["cat", "dog"] and splits["train"][0].shape == (24, 6, 6, 1)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for p in (tmp_path / "tree").rglob("*.png"):
            zf.write(p, p.relative_to(tmp_path / "tree"))
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "tree", arcname="data")
    for archive in ("d.zip", "d.tar.gz"):
        s, n = I.load_source(str(tmp_path / archive))
        assert n == ["cat", "dog"] and len(s["train"][1]) == 24


@pytest.mark.parametrize("problem,match", [
    ("traversal", "parent path"), ("symlink", "link"), ("single_class", "at least 2"),
    ("non_image", "not an image"), ("too_few", "at least 10"),
])
def test_bad_datasets_are_rejected_with_a_clear_error(tmp_path, problem, match):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if problem == "traversal":
            add("../evil/a.png", _png(1))
        elif problem == "symlink":
            info = tarfile.TarInfo("cat/link.png")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        elif problem == "single_class":
            for i in range(30):
                add(f"cat/{i}.png", _png(i))
        elif problem == "non_image":
            add("cat/a.txt", b"hello")
            add("dog/b.png", _png(3))
        elif problem == "too_few":
            for i in range(5):
                add(f"cat/{i}.png", _png(i))
                add(f"dog/{i}.png", _png(100 + i))
    dest = tmp_path / "extract" / "out"  # "../evil" of a member would land in tmp_path / "extract"
    dest.mkdir(parents=True)
    with pytest.raises(D.DatasetError, match=match):
        A.safe_extract(archive, dest)
        splits, names = A.load_image_folder(dest)
        D.finalize_splits(splits, names)
    assert not (tmp_path / "extract" / "evil").exists() and sorted(tmp_path.glob("extract/*")) == [dest]


def test_npz_source_split_rules_and_tfds_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (200, 5, 7), dtype=np.uint8)
    y = rng.integers(0, 3, 200)
    np.savez(tmp_path / "d.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:],
             label_names=np.array(["a", "b", "c"]))
    splits, names = I.load_source(str(tmp_path / "d.npz"))
    stored, exprs = D.finalize_splits(splits, names)
    # a small train split gives 20% to validation (the paper's Table 9, cmaterdb)
    assert exprs == {"train": "train[20%:]", "validation": "train[:20%]", "test": "test"}
    ds_dir = D.write_tfds(stored, names, tmp_path / "tfds")
    xt, yt = D.read_split(ds_dir, exprs["train"])
    xv, yv = D.read_split(ds_dir, exprs["validation"])
    assert xt.shape == (120, 5, 7, 1) and xv.shape == (30, 5, 7, 1)
    # TFDS orders examples by a deterministic hash of their keys: same examples, fixed order
    xs = np.concatenate([xt, xv])
    assert sorted(map(bytes, xs)) == sorted(map(bytes, stored["train"][0]))
    again = D.write_tfds(stored, names, tmp_path / "tfds2")
    np.testing.assert_array_equal(D.read_split(again, exprs["validation"])[1], yv)


def test_validation_fraction_follows_the_train_split_size():
    def exprs_for(n_train, with_test=True, with_val=False):
        x = np.zeros((n_train, 2, 2, 1), np.uint8)
        y = np.arange(n_train) % 2
        splits = {"train": (x, y)}
        if with_test:
            splits["test"] = (x[:20], y[:20])
        if with_val:
            splits["validation"] = (x[:20], y[:20])
        return D.finalize_splits(splits, ["a", "b"])[1]

    # the paper's Table 9: mnist-sized train splits give 5% to validation, small ones 20%
    assert exprs_for(D.LARGE_TRAIN_SPLIT) == {"train": "train[5%:]", "validation": "train[:5%]", "test": "test"}
    assert exprs_for(D.LARGE_TRAIN_SPLIT - 1)["validation"] == "train[:20%]"
    # train only: the last 10% is test, the size rule applies to the other 90%
    assert exprs_for(12_000, with_test=False) == {
        "train": "train[5%:90%]", "validation": "train[:5%]", "test": "train[90%:]"}
    assert exprs_for(11_000, with_test=False) == {
        "train": "train[20%:90%]", "validation": "train[:20%]", "test": "train[90%:]"}
    assert exprs_for(100, with_test=False, with_val=True) == {
        "train": "train[:90%]", "validation": "validation", "test": "train[90%:]"}
    with pytest.raises(D.DatasetError, match=r"no 'train' split"):
        D.finalize_splits({"test": (np.zeros((20, 2, 2, 1), np.uint8), np.arange(20) % 2)}, ["a", "b"])


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x_train=np.array([object()], dtype=object), y_train=np.array([0]))
    with pytest.raises(D.DatasetError, match="pickled"):
        A.load_npz(tmp_path / "p.npz")


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def test_hostile_npz_uploads_are_refused_before_they_are_decoded(tmp_path):
    # 200 MB of zeros compresses to a few hundred KB: refused from the .npy headers
    bomb = _npz_bytes(x_train=np.zeros((800, 512, 512), np.uint8), y_train=np.zeros(800, np.int64))
    assert len(bomb) < 2 << 20
    with pytest.raises(D.DatasetError, match="decode to more than"):
        A.load_npz(bomb, max_bytes=64 << 20)
    # a huge class id is refused before any label name is made (it once exhausted memory)
    splits, names = A.load_npz(_npz_bytes(x_train=np.zeros((40, 8, 8), np.uint8),
                                          y_train=np.array([0] * 39 + [10 ** 15], np.int64)))
    with pytest.raises(D.DatasetError, match=r"label ids span \[0, 1000000000000000\]; allowed: 0..999"):
        A.label_names_for(splits, names)
    with pytest.raises(D.DatasetError, match="label ids span"):
        A.label_names_for({"train": (np.zeros((2, 8, 8, 1), np.uint8), np.array([-1, 0]))}, None)
    empty, names = A.load_npz(_npz_bytes(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)))
    with pytest.raises(D.DatasetError, match="no labelled examples"):
        A.label_names_for(empty, names)
    with pytest.raises(D.DatasetError, match="pixels"):
        A.load_npz(_npz_bytes(x_train=np.zeros((1, 5000, 5000), np.uint8), y_train=np.zeros(1, np.int64)))
    with pytest.raises(D.DatasetError, match="not a valid .npz"):
        A.load_npz(_npz_bytes(x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64))[:-30])


def test_hostile_archives_are_refused_with_a_dataset_error(tmp_path):
    from PIL import Image

    # an image whose header says 8000 x 8000 is refused before it is decoded
    big = io.BytesIO()
    Image.new("L", (8000, 8000)).save(big, format="PNG")
    with zipfile.ZipFile(tmp_path / "big.zip", "w") as zf:
        zf.writestr("cat/big.png", big.getvalue())
        for i in range(12):
            zf.writestr(f"cat/{i}.png", _png(i))
            zf.writestr(f"dog/{i}.png", _png(100 + i))
    with pytest.raises(D.DatasetError, match="8000x8000; at most"):
        I.load_source(str(tmp_path / "big.zip"))
    # a decoded-size budget over all images
    _folder(tmp_path / "ok", n=12)
    with pytest.raises(D.DatasetError, match="decode to more than"):
        A.load_image_folder(tmp_path / "ok", max_bytes=6 * 6 * 3 * 10)
    # every image is resized to the most common size: one big image among small ones of all
    # different sizes would make that size the big one (counts tie; the first wins)
    mixed = tmp_path / "mixed"
    for label in ("a", "b"):
        (mixed / label).mkdir(parents=True)
    Image.new("L", (1000, 1000)).save(mixed / "a" / "0000.png")
    for i in range(1, 21):
        Image.new("L", (6 + i, 6)).save(mixed / ("a" if i % 2 else "b") / f"{i:04d}.png")
    with pytest.raises(D.DatasetError, match="at their common size 1000x1000 need more than"):
        A.load_image_folder(mixed, max_bytes=10 << 20)
    # a truncated .tar.gz and a zip member with a bad CRC
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "ok", arcname=".")
    data = (tmp_path / "t.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DatasetError, match="truncated or corrupt|neither"):
        A.safe_extract(tmp_path / "cut.tar.gz", tmp_path / "out1")
    with zipfile.ZipFile(tmp_path / "crc.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("cat/0.png", _png(1))
    raw = bytearray((tmp_path / "crc.zip").read_bytes())
    at = raw.index(b"IHDR") + 8
    raw[at] ^= 0xFF  # flip a byte inside the stored member: its CRC no longer matches
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    with pytest.raises(D.DatasetError, match="corrupt"):
        A.safe_extract(tmp_path / "crc.zip", tmp_path / "out2")


def test_macos_archives_and_small_datasets_are_accepted(tmp_path):
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        for label in ("cat", "dog"):
            for i in range(30):  # 2 classes x 30 images: the smallest upload a user should be able to make
                zf.writestr(f"pets/{label}/{i}.png", _png(i + (100 if label == "dog" else 0)))
                zf.writestr(f"__MACOSX/pets/{label}/._{i}.png", b"\x00\x05\x16\x07 resource fork")
            zf.writestr(f"pets/{label}/.DS_Store", b"\x00\x00\x00\x01Bud1")
            zf.writestr(f"pets/{label}/Thumbs.db", b"\xd0\xcf\x11\xe0")
        zf.writestr("__MACOSX/._pets", b"\x00\x05\x16\x07")
    splits, names = I.load_source(str(tmp_path / "mac.zip"))
    assert names == ["cat", "dog"] and len(splits["train"][1]) == 60
    stored, exprs = D.finalize_splits(splits, names)
    sizes = {role: D._split_size(expr, {k: len(v[1]) for k, v in stored.items()}) for role, expr in exprs.items()}
    assert sizes == {"train": 42, "validation": 12, "test": 6}
