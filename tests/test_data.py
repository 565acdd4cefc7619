"""Tests of fl_audit.data on the real data that ships with installed packages."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import io as skio

from fl_audit import data
from fl_audit.data import (
    Samples,
    as_images,
    load_idx,
    load_image_folder,
    load_nifti,
    load_numpy,
    load_samples,
    partition,
    sample_kinds,
)
from fl_audit.errors import InvalidInputError

FASHION_MNIST_MISSING = not (
    data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
).is_file()
needs_fashion_mnist = pytest.mark.skipif(
    FASHION_MNIST_MISSING,
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

# kind -> (shape of one input, number of classes or None)
EXPECTED = {
    "digits": ((1, 8, 8), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "faces": ((1, 25, 25), None),
    "photos": ((3, 32, 32), 7),
    "cells": ((1, 32, 32), None),
    "tissue": ((3, 32, 32), None),
    "ecg": ((1, 256), None),
    "mri": ((1, 32, 32), None),
}
KINDS = [
    pytest.param(k, marks=needs_fashion_mnist) if k == "fashion_mnist" else k
    for k in EXPECTED
]


def write_idx(path: Path, array: np.ndarray, code: int, *, compress: bool) -> None:
    """Write ``array`` as IDX with type ``code``, independently of the reader."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}.get(
        code, ">f8"
    )
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


# ---------------------------------------------------------------------------
# Sample sets
# ---------------------------------------------------------------------------


def test_sample_kinds_lists_every_kind() -> None:
    assert set(sample_kinds()) == set(EXPECTED)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_its_shape_range_and_labels(kind: str) -> None:
    shape, num_classes = EXPECTED[kind]

    samples = load_samples(kind, 12, seed=3)

    assert samples.inputs.shape == (12, *shape)
    assert samples.inputs.dtype == torch.float32
    assert samples.input_range == (0.0, 1.0)
    assert samples.inputs.min() >= 0.0 and samples.inputs.max() <= 1.0
    per_sample = samples.inputs.reshape(12, -1)
    assert bool((per_sample.amax(1) > per_sample.amin(1)).all())  # none constant
    assert samples.kind == kind and samples.description
    assert samples.num_classes == num_classes
    if num_classes is None:
        assert samples.labels is None
    else:
        assert samples.labels is not None and samples.labels.dtype == torch.int64
        assert int(samples.labels.min()) >= 0
        assert int(samples.labels.max()) < num_classes


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_samples_other_seed_others(kind: str) -> None:
    first = load_samples(kind, 6, seed=11)
    again = load_samples(kind, 6, seed=11)
    other = load_samples(kind, 6, seed=12)

    assert torch.equal(first.inputs, again.inputs)
    assert not torch.equal(first.inputs, other.inputs)
    if first.labels is not None:
        assert again.labels is not None and torch.equal(first.labels, again.labels)


def test_digits_are_the_scikit_learn_images_with_their_labels() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    by_pixels = {
        img.tobytes(): int(t) for img, t in zip(bunch.images, bunch.target, strict=True)
    }

    samples = load_samples("digits", 40, seed=5)

    assert samples.labels is not None
    for x, y in zip(samples.inputs, samples.labels, strict=True):
        key = (x[0].double().numpy() * 16.0).round().tobytes()
        assert by_pixels[key] == int(y)


@needs_fashion_mnist
def test_fashion_mnist_test_split_has_1000_of_each_class() -> None:
    samples = load_samples("fashion_mnist", 10_000, seed=0)

    assert samples.labels is not None
    assert np.bincount(samples.labels.numpy()).tolist() == [1000] * 10
    assert samples.class_names[9] == "Ankle boot"
    # Fashion-MNIST pictures sit on a black background.
    assert float(samples.inputs[:, 0, 0, 0].mean()) < 0.02


@needs_fashion_mnist
def test_fashion_mnist_cannot_give_more_than_its_test_split() -> None:
    with pytest.raises(InvalidInputError, match="10000"):
        load_samples("fashion_mnist", 10_001)


def test_missing_fashion_mnist_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)

    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        load_samples("fashion_mnist", 4)


def test_ecg_windows_are_normalised_and_centred_on_r_peaks() -> None:
    samples = load_samples("ecg", 200, seed=0)

    windows = samples.inputs[:, 0]  # (200, 256)
    assert torch.allclose(windows.amin(1), torch.zeros(200))
    assert torch.allclose(windows.amax(1), torch.ones(200))
    # The R peak is put a third of the way in; it is the window's maximum
    # for nearly every beat of this record.
    at_peak = (windows.argmax(1) - 256 // 3).abs() <= 3
    assert float(at_peak.float().mean()) > 0.9


def test_mri_slices_have_the_brain_in_the_middle() -> None:
    samples = load_samples("mri", 40, seed=0)

    images = samples.inputs[:, 0]  # (40, 32, 32)
    centre = images[:, 12:20, 12:20].mean((1, 2))
    border = images[:, :3, :].mean((1, 2))
    assert bool((centre > border).all())
    assert float(centre.mean()) > 0.4 and float(border.max()) < 0.01


def test_faces_hold_only_the_100_faces() -> None:
    assert len(load_samples("faces", 100)) == 100
    with pytest.raises(InvalidInputError, match="100"):
        load_samples("faces", 101)


def test_photos_labels_name_the_source_photo() -> None:
    samples = load_samples("photos", 50, size=(16, 24), seed=2)

    assert samples.inputs.shape == (50, 3, 16, 24)
    assert "astronaut" in samples.class_names and "china" in samples.class_names
    assert samples.labels is not None
    assert len(set(samples.labels.tolist())) >= 5  # crops come from many photos


@pytest.mark.parametrize(
    ("kind", "size", "shape"),
    [
        ("digits", 16, (1, 16, 16)),
        ("faces", (20, 12), (1, 20, 12)),
        ("cells", 16, (1, 16, 16)),
        ("tissue", (8, 16), (3, 8, 16)),
        ("ecg", 100, (1, 100)),
        ("mri", 24, (1, 24, 24)),
    ],
)
def test_size_sets_the_input_shape(
    kind: str, size: int | tuple[int, int], shape: tuple[int, ...]
) -> None:
    samples = load_samples(kind, 3, size=size)

    assert samples.input_shape == shape
    assert float(samples.inputs.min()) >= 0.0
    assert float(samples.inputs.max()) <= 1.0


def test_tiles_are_distinct_and_bounded_by_the_grid() -> None:
    # 512 // 64 = 8 tiles a side: 64 tiles in all.
    tiles = load_samples("tissue", 64, size=64)

    flat = tiles.inputs.reshape(64, -1)
    assert len(torch.unique(flat, dim=0)) == 64
    with pytest.raises(InvalidInputError, match="64"):
        load_samples("tissue", 65, size=64)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "cifar", "n": 4}, "known"),
        ({"kind": "digits", "n": 0}, "n must be"),
        ({"kind": "digits", "n": 4, "seed": -1}, "seed must be"),
        ({"kind": "digits", "n": 4, "size": (0, 8)}, "size"),
        ({"kind": "ecg", "n": 4, "size": (16, 16)}, "window length"),
    ],
)
def test_bad_arguments_raise_typed_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        load_samples(**kwargs)


def test_missing_extra_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)

    with pytest.raises(ImportError, match=r"pip install fl-audit\[data\]"):
        load_samples("digits", 4)


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------


def test_samples_subset_keeps_labels_aligned(digits: Samples) -> None:
    part = digits.subset(np.array([3, 0, 7]))

    assert torch.equal(part.inputs, digits.inputs[[3, 0, 7]])
    assert part.labels is not None and digits.labels is not None
    assert part.labels.tolist() == digits.labels[[3, 0, 7]].tolist()
    with pytest.raises(InvalidInputError, match="indices"):
        digits.subset([0, 64])


def test_samples_rejects_bad_tensors() -> None:
    with pytest.raises(InvalidInputError) as info:
        Samples(
            inputs=torch.full((2, 1, 4, 4), 2.0),
            labels=torch.zeros(3, dtype=torch.int64),
            kind="test",
            description="",
        )
    assert len(info.value.problems) == 2  # out of range, wrong label count


# ---------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("code", "values"),
    [
        (0x08, np.arange(24, dtype=np.uint8) * 10),
        (0x09, np.arange(-12, 12, dtype=np.int8)),
        (0x0B, np.arange(24, dtype=np.int16) * -1000),
        (0x0C, np.arange(24, dtype=np.int32) * 100_000),
        (0x0D, np.linspace(-1, 1, 24, dtype=np.float32)),
        (0x0E, np.linspace(-1e300, 1e300, 24)),
    ],
)
def test_idx_round_trip(
    tmp_path: Path, code: int, values: np.ndarray, compress: bool
) -> None:
    array = values.reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, array, code, compress=compress)

    loaded = load_idx(path)

    assert loaded.dtype == values.dtype and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_array_equal(load_idx(path, limit=1), array[:1])


def test_idx_limit_stops_before_a_corrupt_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(2000, 16, 16), dtype=np.uint8)
    path = tmp_path / "big.gz"
    write_idx(path, array, 0x08, compress=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    head = load_idx(path, limit=10)

    np.testing.assert_array_equal(head, array[:10])
    with pytest.raises(InvalidInputError, match="big.gz"):
        load_idx(path)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 3), "ends inside"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "continues after"),
    ],
)
def test_bad_idx_raises_typed_error(
    tmp_path: Path, payload: bytes, fragment: str
) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)

    with pytest.raises(InvalidInputError, match=fragment):
        load_idx(path)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        load_idx(tmp_path / "nope.idx")


@needs_fashion_mnist
def test_idx_reads_the_real_fashion_mnist_files() -> None:
    labels = load_idx(data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    images = load_idx(data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz", limit=5)

    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert images.max() > 200  # real pictures, not zeros


# ---------------------------------------------------------------------------
# NumPy files and as_images
# ---------------------------------------------------------------------------


def test_load_numpy_npy_and_npz(tmp_path: Path, digits: Samples) -> None:
    images = (digits.inputs[:, 0].numpy() * 255).astype(np.uint8)
    assert digits.labels is not None
    labels = digits.labels.numpy()
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "both.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "one.npz", images=images)

    np.testing.assert_array_equal(load_numpy(tmp_path / "x.npy"), images)
    np.testing.assert_array_equal(load_numpy(tmp_path / "both.npz", "labels"), labels)
    np.testing.assert_array_equal(load_numpy(tmp_path / "one.npz"), images)


@pytest.mark.parametrize(
    ("name", "key", "fragment"),
    [
        ("both.npz", None, "pass key="),
        ("both.npz", "pixels", "has no array 'pixels'"),
        ("x.npy", "images", "applies to .npz only"),
        ("objects.npy", None, "pickle"),
        ("text.npy", None, "could not be read"),
    ],
)
def test_load_numpy_errors(
    tmp_path: Path, name: str, key: str | None, fragment: str
) -> None:
    np.save(tmp_path / "x.npy", np.zeros(3))
    np.savez(tmp_path / "both.npz", images=np.zeros(3), labels=np.ones(3))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "text.npy").write_text("not numpy")

    with pytest.raises(InvalidInputError, match=fragment):
        load_numpy(tmp_path / name, key)


def test_as_images_layouts_and_scaling() -> None:
    grey = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    rgb_last = np.random.default_rng(0).random((2, 6, 5, 3))

    grey_t = as_images(grey)
    rgb_t = as_images(rgb_last)

    assert grey_t.shape == (2, 1, 3, 5)
    assert float(grey_t[1, 0, 2, 4]) == pytest.approx(29 / 255)
    assert rgb_t.shape == (2, 3, 6, 5)
    np.testing.assert_allclose(rgb_t.numpy(), rgb_last.transpose(0, 3, 1, 2), atol=1e-7)
    signed = as_images(
        np.array([[[-100, 0], [50, 100]]], np.int16), value_range=(-100, 100)
    )
    np.testing.assert_allclose(signed[0, 0].numpy(), [[0, 0.5], [0.75, 1]])


@pytest.mark.parametrize(
    ("array", "kwargs", "fragment"),
    [
        (np.zeros((2, 3, 8, 3)), {}, "channels_last"),
        (np.full((2, 4, 4), 255.0), {}, "value_range"),
        (np.zeros((2, 4, 4), np.int16), {}, "signed"),
        (np.zeros((4, 4)), {}, r"\(N, H, W\)"),
        (np.zeros((2, 4, 4)), {"value_range": (1, 1)}, "high > low"),
    ],
)
def test_as_images_errors(array: np.ndarray, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        as_images(array, **kwargs)


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        skio.imsave(folder / f"{i:03d}.png", image, check_contrast=False)


def test_image_folder_labels_from_subfolders(
    tmp_path: Path, fashion_or_digits: Samples
) -> None:
    pixels = (fashion_or_digits.inputs[:10, 0].numpy() * 255).round().astype(np.uint8)
    _write_pngs(tmp_path / "b_second", pixels[5:])
    _write_pngs(tmp_path / "a_first", pixels[:5])

    grey = load_image_folder(tmp_path, grayscale=True)
    rgb = load_image_folder(tmp_path)

    assert grey.class_names == ("a_first", "b_second")
    assert grey.labels is not None and grey.labels.tolist() == [0] * 5 + [1] * 5
    assert grey.inputs.shape == (10, 1, *pixels.shape[1:])
    np.testing.assert_allclose(grey.inputs[:, 0].numpy(), pixels / 255.0, atol=1e-6)
    assert rgb.inputs.shape == (10, 3, *pixels.shape[1:])
    assert torch.equal(rgb.inputs[:, 0], rgb.inputs[:, 2])  # grey repeated


def test_image_folder_flat_rgb_resized(tmp_path: Path) -> None:
    photos = (load_samples("photos", 4, size=40).inputs.numpy() * 255).astype(np.uint8)
    _write_pngs(tmp_path, photos.transpose(0, 2, 3, 1))
    skio.imsave(tmp_path / "extra.jpg", photos[0].transpose(1, 2, 0))

    samples = load_image_folder(tmp_path, size=(20, 30))

    assert samples.labels is None and samples.inputs.shape == (5, 3, 20, 30)
    # The JPEG (sorted last) is a lossy copy of the first PNG.
    gap = (samples.inputs[0] - samples.inputs[4]).abs().mean()
    assert float(gap) < 0.03


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        ("empty", "holds no"),
        ("mixed", "at the top and class subfolders"),
        ("sizes", "different sizes"),
        ("broken", "could not be read"),
    ],
)
def test_image_folder_errors(tmp_path: Path, layout: str, fragment: str) -> None:
    image = np.zeros((8, 8), np.uint8)
    if layout == "mixed":
        _write_pngs(tmp_path, image[None])
        _write_pngs(tmp_path / "cls", image[None])
    elif layout == "sizes":
        _write_pngs(tmp_path, image[None])
        skio.imsave(
            tmp_path / "z.png", np.zeros((9, 8), np.uint8), check_contrast=False
        )
    elif layout == "broken":
        (tmp_path / "bad.png").write_bytes(b"not a png")

    with pytest.raises(InvalidInputError, match=fragment):
        load_image_folder(tmp_path)


@pytest.fixture
def fashion_or_digits(digits: Samples) -> Samples:
    """Fashion-MNIST when installed (28 x 28), else the digits (8 x 8)."""
    return digits if FASHION_MNIST_MISSING else load_samples("fashion_mnist", 10)


# ---------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------


def _example_nifti() -> Path:
    spec = importlib.util.find_spec("nibabel")
    assert spec is not None and spec.submodule_search_locations
    return (
        Path(spec.submodule_search_locations[0]) / "tests" / "data" / "example4d.nii.gz"
    )


def test_load_nifti_reads_nibabels_example_series() -> None:
    import nibabel

    volume = load_nifti(_example_nifti())

    assert volume.shape == (128, 96, 24, 2) and volume.dtype == np.float32
    expected = nibabel.load(_example_nifti()).get_fdata()  # type: ignore[attr-defined]
    np.testing.assert_allclose(volume, expected, rtol=1e-6)
    assert float(volume.std()) > 0


def test_load_nifti_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.nii").write_bytes(b"\x00" * 400)
    example = _example_nifti()

    with pytest.raises(InvalidInputError, match="bad.nii"):
        load_nifti(tmp_path / "bad.nii")
    with pytest.raises(FileNotFoundError):
        load_nifti(tmp_path / "none.nii")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r"pip install fl-audit\[data\]"):
        load_nifti(example)


# ---------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------


def _label_skew(shares: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance of each share's labels from the whole."""
    classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    gaps = [
        0.5 * np.abs(np.bincount(labels[s], minlength=classes) / len(s) - overall).sum()
        for s in shares
    ]
    return float(np.mean(gaps))


@pytest.fixture(scope="module")
def all_digit_labels() -> np.ndarray:
    samples = load_samples("digits", 1797, seed=0)
    assert samples.labels is not None
    return samples.labels.numpy()


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_partition_covers_every_index_once(
    scheme: str, all_digit_labels: np.ndarray
) -> None:
    shares = partition(all_digit_labels, 7, scheme=scheme, seed=1)  # type: ignore[arg-type]

    assert len(shares) == 7 and all(len(s) >= 1 for s in shares)
    joined = np.concatenate(shares)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(all_digit_labels)))


def test_dirichlet_skew_follows_alpha(all_digit_labels: np.ndarray) -> None:
    skewed = partition(all_digit_labels, 5, alpha=0.1, seed=0)
    near_iid = partition(all_digit_labels, 5, alpha=1000.0, seed=0)

    assert _label_skew(skewed, all_digit_labels) > 0.4
    assert _label_skew(near_iid, all_digit_labels) < 0.05


def test_shards_give_each_client_few_classes(all_digit_labels: np.ndarray) -> None:
    shares = partition(all_digit_labels, 10, scheme="shards", shards_per_partition=2)

    classes_per_share = [len(np.unique(all_digit_labels[s])) for s in shares]
    assert max(classes_per_share) <= 4  # two shards, each across <= 1 boundary
    assert _label_skew(shares, all_digit_labels) > 0.5


def test_partition_is_deterministic_by_seed(all_digit_labels: np.ndarray) -> None:
    a = partition(torch.from_numpy(all_digit_labels), 4, seed=3)
    b = partition(all_digit_labels, 4, seed=3)
    c = partition(all_digit_labels, 4, seed=4)

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_collects_every_bad_argument() -> None:
    with pytest.raises(InvalidInputError) as info:
        partition([0, 1, 1], 0, alpha=-1.0, seed=-2)

    assert len(info.value.problems) == 3


@pytest.mark.parametrize(
    ("labels", "kwargs", "fragment"),
    [
        (None, {}, "no classes"),
        ([0.5, 1.5], {}, "integer"),
        ([0, 1, 2], {"scheme": "shards", "shards_per_partition": 2}, "cannot fill"),
        ([0] * 6, {"alpha": 0.001, "min_size": 3}, "no Dirichlet"),
    ],
)
def test_partition_errors(labels: list | None, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        partition(labels, 2, **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=12, max_size=200),
    k=st.integers(1, 6),
    scheme=st.sampled_from(["dirichlet", "shards"]),
    seed=st.integers(0, 2**31),
)
def test_partition_always_covers_every_index_once(
    labels: list[int], k: int, scheme: str, seed: int
) -> None:
    shares = partition(labels, k, scheme=scheme, alpha=1.0, min_size=0, seed=seed)  # type: ignore[arg-type]

    joined = np.concatenate(shares)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


def test_at_most_gives_what_a_small_kind_holds():
    with pytest.raises(InvalidInputError, match="holds"):
        load_samples("mri", 500)
    samples = load_samples("mri", 500, at_most=True)
    assert len(samples) == len(load_samples("mri", 69)) == 69
