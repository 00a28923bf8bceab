"""Image and file I/O at the edges: lazy slide regions, checked TIFF reads, atomic writes.

A slide is never loaded whole: ``Slide.read`` returns one region of level 0,
read through tifffile's zarr view, so tiled, pyramidal, BigTIFF, OME-TIFF,
NDPI and SVS files cost only the tiles the region touches.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from segrefine import SegRefineError


@contextlib.contextmanager
def atomic_path(path, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A killed or failing step therefore never leaves a half-written file under
    the final name (which Snakemake or a user could take as complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tiff(path, array: np.ndarray, tiled: bool = False, **kwargs) -> None:
    """Write a TIFF atomically (zlib-compressed; tiled for large images)."""
    import tifffile

    opts = dict(compression="zlib")
    if tiled or max(array.shape[:2]) > 4096:
        opts.update(tile=(512, 512), bigtiff=array.nbytes > 2**31)
    opts.update(kwargs)
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, array, **opts)


def read_tiff(path) -> np.ndarray:
    """Read a whole (small) TIFF, turning every failure into an error naming the file."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: file not found")
    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise SegRefineError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc


def _yx_axes(axes: str, shape: Tuple[int, ...]) -> Tuple[int, int, Optional[int]]:
    """Positions of Y, X and the channel axis (S or C) in a tifffile series."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} have no Y and X")
    ch = None
    for name in ("S", "C"):
        if name in axes and shape[axes.index(name)] > 1:
            ch = axes.index(name)
            break
    return axes.index("Y"), axes.index("X"), ch


class Slide:
    """Level 0 of a whole-slide image, read region by region.

    ``shape`` is (height, width); ``channels`` is 1 for grayscale, 3 for RGB.
    """

    def __init__(self, path):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.is_file():
            raise SegRefineError(f"{self.path}: slide image not found")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            level = series.levels[0]
            self.axes = level.axes
            self.dtype = np.dtype(level.dtype)
            self._y, self._x, self._c = _yx_axes(self.axes, level.shape)
            self._full_shape = level.shape
            self._array = zarr.open(self._tif.aszarr(series=0, level=0), mode="r")
        except SegRefineError:
            raise
        except Exception as exc:
            raise SegRefineError(f"{self.path}: not a readable TIFF slide ({type(exc).__name__}: {exc})") from exc
        self.shape = (int(level.shape[self._y]), int(level.shape[self._x]))
        self.channels = int(level.shape[self._c]) if self._c is not None else 1

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The region [y, y+h) x [x, x+w) of level 0 as (h, w) or (h, w, channels)."""
        H, W = self.shape
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise SegRefineError(
                f"{self.path}: region x={x} y={y} w={w} h={h} is outside the slide ({W}x{H} px)")
        index = [0] * len(self._full_shape)
        index[self._y] = slice(y, y + h)
        index[self._x] = slice(x, x + w)
        if self._c is not None:
            index[self._c] = slice(None)
        try:
            region = np.asarray(self._array[tuple(index)])
        except Exception as exc:
            raise SegRefineError(f"{self.path}: cannot read region x={x} y={y} w={w} h={h} "
                                 f"(truncated or corrupt file? {type(exc).__name__}: {exc})") from exc
        kept = [a for i, a in enumerate(self.axes) if isinstance(index[i], slice)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self.axes[self._c])] if self._c is not None else [])
        return np.transpose(region, order)

    def read_all(self) -> np.ndarray:
        H, W = self.shape
        return self.read(0, 0, W, H)

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
