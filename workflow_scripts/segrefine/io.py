"""Image and file I/O at the edges: lazy slide regions, checked TIFF reads, atomic writes.

A slide is never loaded whole: ``Slide.read`` returns one region of level 0,
read through tifffile's zarr view, so tiled, pyramidal, BigTIFF, OME-TIFF,
NDPI and SVS files cost only the tiles the region touches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

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
    remove_leftovers(path)
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
    except OSError as exc:
        if not exc.filename:  # a write error of a file object (full disk) names no file: name the one being written
            exc.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


#: the 8 characters tempfile.mkstemp and mkdtemp put between a prefix and a suffix
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def temporaries(parent: Path, prefix: str, rest: str) -> List[Path]:
    """The entries of ``parent`` named exactly as ``tempfile.mkstemp``/``mkdtemp(prefix=prefix, dir=parent)`` names
    them: ``prefix``, the 8 random characters, then what the regular expression ``rest`` matches."""
    pattern = re.compile(re.escape(prefix) + _TEMP_RANDOM + rest, re.DOTALL)
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    return [parent / name for name in names if pattern.fullmatch(name)]


def remove_leftovers(path) -> None:
    """Remove the temporary files ``atomic_path`` left beside ``path`` in runs that were killed. Called when ``path``
    is about to be written, so they belong to earlier attempts of the same job (one job per output at a time)."""
    path = Path(path)
    for old in temporaries(path.parent, f".{path.name}.", r"\.part.*"):
        with contextlib.suppress(OSError):
            old.unlink()


def new_work_dir(parent, prefix: str) -> Path:
    """A fresh hidden work folder ``{prefix}<random>`` (``tempfile.mkdtemp``) in ``parent``, after removing the
    folders of exactly that name pattern that killed runs left there. ``prefix`` must belong to one job (the name of
    its output, or a folder only that job writes in), so a rerun removes its own leftovers and nothing else."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for old in temporaries(parent, prefix, ""):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


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


#: what a tifffile axis letter other than Y, X and the channels (S, C) means, for error messages
_AXIS_MEANING = {
    "Z": "focal planes (a Z stack)",
    "T": "time points",
    "Q": "separate images (pages without axis metadata)",
    "I": "separate images (pages)",
    "R": "tiles or regions (R)",
    "E": "lambda (E)",
    "H": "lifetime histogram (H)",
    "A": "angles (A)",
    "P": "phases (P)",
    "L": "exposures (L)",
    "V": "views (V)",
    "M": "mosaic positions (M)",
}
#: TIFF ExtraSamples values: 1 associated alpha (premultiplied), 2 unassociated alpha
_ALPHA_SAMPLES = (1, 2)
#: the largest strip or tile the slide reader decodes (a region read decodes whole chunks)
MAX_CHUNK_BYTES = 2**31
#: how many pages of a level ``Slide`` checks against the file size (the headers of the others are not read)
MAX_CHECKED_PAGES = 4096


def _check_chunks(path: Path, level, index: int, file_size: int) -> None:
    """A clear error when a pyramid level's header describes data that the file cannot hold: fewer strips/tiles
    than its size needs, data beyond the end of the file, an uncompressed image larger than its strips, or one
    strip/tile too large to decode (a corrupt or forged header claiming e.g. 1e6 x 1e6 px in a small file)."""
    pages = list(getattr(level, "pages", None) or [level.keyframe])
    key = level.keyframe
    sizes = f"{level.shape} ({level.axes})"
    for n, page in enumerate(pages[:MAX_CHECKED_PAGES]):
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        chunked = getattr(key, "chunked", None)
        need = int(np.prod(chunked)) if chunked else len(offsets)
        where = f"level {index}" + (f", page {n}" if len(pages) > 1 else "")
        if len(offsets) < need:
            raise SegRefineError(
                f"{path}: corrupt TIFF header: {where} claims {sizes} px, which needs {need} strips/tiles, but the "
                f"file lists {len(offsets)}; refusing to read it"
            )
        end = int((offsets + counts)[counts > 0].max()) if (counts > 0).any() else 0
        if end > file_size:
            raise SegRefineError(
                f"{path}: truncated or corrupt TIFF: {where} ({sizes} px) has data up to byte {end}, but the file "
                f"has {file_size} bytes"
            )
        chunk_bytes = int(np.prod(key.chunks)) * key.dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise SegRefineError(
                f"{path}: {where} ({sizes} px) is stored in strips/tiles of {chunk_bytes / 2**30:.1f} GiB each; a "
                f"region read decodes whole strips/tiles: rewrite the slide tiled (e.g. 512x512 tiles, as QuPath "
                f"or `bfconvert -tilex 512 -tiley 512` write it)"
            )
        if int(key.compression) == 1:
            expected = int(np.prod(key.shape)) * key.dtype.itemsize
            if int(counts.sum()) < expected and (counts > 0).all():
                raise SegRefineError(
                    f"{path}: corrupt TIFF header: {where} claims {sizes} px ({expected} bytes uncompressed), but "
                    f"its strips/tiles hold {int(counts.sum())} bytes"
                )


class Slide:
    """A whole-slide image, described once and read region by region (level 0) or level by level (pyramid).

    The one place that says what a slide is and turns it into what the models
    take (a grayscale or RGB image), the same way for every read (regions,
    pyramid levels, thumbnails, and so the intensity reference):

    - ``file_axes``/``file_shape``/``dtype``: the file's own description
      (tifffile's axis letters); ``describe()`` returns all of it as a dict.
    - axes other than Y, X and one channel axis (S or C) with more than one
      element (a Z stack, a time series, pages of unknown meaning) are refused,
      naming the file and its axes.
    - alpha (TIFF ExtraSamples 1 or 2) is dropped: ``alpha`` says it was.
    - grayscale and RGB (photometric RGB/YCbCr, 3 colours) are kept as they are;
      any other number of channels (2-channel or multi-channel fluorescence,
      a 3-channel image that is not RGB) needs ``channel``: the 0-based index
      of the channel to segment, read as a grayscale slide.
    - float pixels that are NaN or infinite are refused where they are read,
      naming the file and the region.
    - a header that describes more data than the file holds (a forged or
      corrupt size, a truncated file) is refused at open time.

    ``shape`` is (height, width) of level 0; ``channels`` is what reads return:
    1 (2-D arrays) or 3 (RGB); ``levels`` lists the (height, width) of every
    pyramid level (``[shape]`` for a plain TIFF).
    """

    def __init__(self, path, channel: Optional[int] = None):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.is_file():
            raise SegRefineError(f"{self.path}: slide image not found")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise SegRefineError(f"{self.path}: not a readable TIFF slide ({type(exc).__name__}: {exc})") from exc
        try:
            self._describe(channel)
            size = self.path.stat().st_size
            for i, lv in enumerate(self._levels):
                _check_chunks(self.path, lv, i, size)
            self._array = zarr.open(self._tif.aszarr(series=0, level=0), mode="r")
        except SegRefineError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise SegRefineError(f"{self.path}: not a readable TIFF slide ({type(exc).__name__}: {exc})") from exc

    def _describe(self, channel: Optional[int]) -> None:
        series = self._tif.series[0]
        level = series.levels[0]
        self.file_axes = self.axes = level.axes
        self.file_shape = self._full_shape = tuple(int(n) for n in level.shape)
        self.dtype = np.dtype(level.dtype)
        self._levels = list(series.levels)
        self._y, self._x, self._c = _yx_axes(self.axes, level.shape)
        key = level.keyframe
        self.photometric = getattr(key.photometric, "name", str(key.photometric))
        extra = [int(e) for e in (key.extrasamples or ())]
        others = [
            (a, n)
            for i, (a, n) in enumerate(zip(self.axes, self.file_shape))
            if i not in (self._y, self._x, self._c) and n > 1
        ]
        if others:
            what = "; ".join(f"{n} {_AXIS_MEANING.get(a, 'elements')} along axis {a}" for a, n in others)
            raise SegRefineError(
                f"{self.path}: the slide holds more than one image: axes {self.axes} of shape {self.file_shape} "
                f"({what}); the models segment one 2-D image: save the plane (or projection) to segment as its "
                f"own TIFF"
            )
        if self._c is not None and any(
            a in ("S", "C") and n > 1 for i, (a, n) in enumerate(zip(self.axes, self.file_shape)) if i != self._c
        ):
            raise SegRefineError(
                f"{self.path}: two channel axes (axes {self.axes}, shape {self.file_shape}); "
                f"save the channel to segment as its own TIFF"
            )
        self.file_channels = self.file_shape[self._c] if self._c is not None else 1
        # alpha: ExtraSamples are the last samples of a pixel
        alpha = [self.file_channels - len(extra) + i for i, e in enumerate(extra) if e in _ALPHA_SAMPLES]
        alpha = [a for a in alpha if 0 < a < self.file_channels] if self._c is not None else []
        self.alpha = alpha
        colour = [c for c in range(self.file_channels) if c not in alpha]
        rgb = self.photometric in ("RGB", "YCBCR", "CIELAB", "ICCLAB", "ITULAB") and len(colour) == 3
        self.channel = None
        if channel is not None:
            if (
                isinstance(channel, bool)
                or not isinstance(channel, (int, np.integer))
                or not 0 <= int(channel) < len(colour)
            ):
                raise SegRefineError(
                    f"{self.path}: channel {channel!r} does not exist: the slide has "
                    f"{len(colour)} channel(s) (0..{len(colour) - 1}; {self._channel_words()})"
                )
            self.channel = int(channel)
            self._keep = [colour[self.channel]]
        elif len(colour) == 1 or rgb:
            self._keep = colour
        else:
            raise SegRefineError(
                f"{self.path}: {len(colour)} channels ({self._channel_words()}), not grayscale or RGB; the models "
                f"segment one grayscale channel or an RGB image: choose the channel to segment (0..{len(colour) - 1}"
                f") with the sample sheet's 'channel' column (`--channel` of segrefine patches, tile-plan, segment)"
            )
        if self._c is None or self._keep == list(range(self.file_channels)):
            self._keep = None  # reads return the file's channels as they are
        self.channels = 1 if self._c is None or self.channel is not None or len(colour) == 1 else len(colour)
        self.shape = (int(level.shape[self._y]), int(level.shape[self._x]))
        self.levels = [(int(lv.shape[self._y]), int(lv.shape[self._x])) for lv in self._levels]

    def _channel_words(self) -> str:
        words = f"axes {self.file_axes}, shape {self.file_shape}, {self.dtype}, photometric {self.photometric}"
        names = self._channel_names()
        if names:
            words += ", names " + ", ".join(names)
        if self.alpha:
            words += f", alpha channel {self.alpha} dropped"
        return words

    def _channel_names(self) -> list:
        """Channel names from OME metadata, where the file has them."""
        import re

        xml = getattr(self._tif, "ome_metadata", None) if getattr(self._tif, "is_ome", False) else None
        if not xml:
            return []
        return re.findall(r'<Channel [^>]*?Name="([^"]*)"', xml)[:64]

    def describe(self) -> dict:
        """What the file is and what reads return, JSON-able (for logs and plan metadata)."""
        return {
            "path": str(self.path),
            "axes": self.file_axes,
            "shape": list(self.file_shape),
            "dtype": str(self.dtype),
            "photometric": self.photometric,
            "file_channels": int(self.file_channels),
            "alpha_dropped": list(self.alpha),
            "channel": self.channel,
            "channels": int(self.channels),
            "height": self.shape[0],
            "width": self.shape[1],
            "levels": [list(lv) for lv in self.levels],
        }

    def _convert(self, arr: np.ndarray, where: str, origin: Tuple[int, int] = (0, 0)) -> np.ndarray:
        """A (h, w[, file channels]) read as the models take it: alpha dropped, the chosen channel, finite."""
        if self._keep is not None and arr.ndim == 3:
            arr = arr[..., self._keep]
            if arr.shape[-1] == 1:
                arr = arr[..., 0]
        if self.dtype.kind == "f":
            bad = ~np.isfinite(arr)
            if bad.any():
                ys, xs = np.nonzero(bad if bad.ndim == 2 else bad.any(axis=-1))
                raise SegRefineError(
                    f"{self.path}: {int(bad.sum())} NaN or infinite pixel value(s) in {where} "
                    f"(the first at x={origin[0] + xs[0]} "
                    f"y={origin[1] + ys[0]}); a float slide must hold finite intensities: replace them (e.g. by "
                    f"0) and save the slide again"
                )
        return arr

    def downsample(self, level: int) -> float:
        """Level 0 pixels per pixel of ``level`` (along x)."""
        return self.shape[1] / self.levels[self._check_level(level)][1]

    def _check_level(self, level: int) -> int:
        if not 0 <= int(level) < len(self.levels):
            raise SegRefineError(
                f"{self.path}: pyramid level {level} is missing: the slide has {len(self.levels)} "
                f"level(s) (0..{len(self.levels) - 1}; sizes {self.levels})"
            )
        return int(level)

    def read_level(self, level: int, max_pixels: int = 64 * 2**20) -> np.ndarray:
        """A whole (low-resolution) pyramid level as (h, w) or (h, w, channels).

        Refuses levels above ``max_pixels`` pixels: a large level is read by regions."""
        level = self._check_level(level)
        h, w = self.levels[level]
        if h * w > max_pixels:
            raise SegRefineError(
                f"{self.path}: level {level} is {w}x{h} px, too large to read whole (limit {max_pixels} px)"
            )
        if level == 0:
            return self.read_all()
        try:
            lv = self._levels[level]
            arr = np.asarray(lv.asarray())
        except Exception as exc:
            raise SegRefineError(
                f"{self.path}: cannot read pyramid level {level} "
                f"(truncated or corrupt file? {type(exc).__name__}: {exc})"
            ) from exc
        axes = lv.axes
        y, x, c = _yx_axes(axes, arr.shape)
        index = [0] * arr.ndim
        index[y] = slice(None)
        index[x] = slice(None)
        if c is not None:
            index[c] = slice(None)
        arr = arr[tuple(index)]
        kept = [a for i, a in enumerate(axes) if isinstance(index[i], slice)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(axes[c])] if c is not None else [])
        return self._convert(np.transpose(arr, order), f"pyramid level {level}")

    def thumbnail(self, downsample: int, level: Optional[int] = None, strip: int = 2048) -> Tuple[np.ndarray, float]:
        """A grayscale (float32) low-resolution view and its downsample factor (level-0 px per thumbnail px).

        ``level`` given: that pyramid level (an error if it is missing). Otherwise
        the coarsest level not coarser than ``downsample``; when that is level 0
        (a plain TIFF) the view is a block mean of level 0 computed block by
        block, so memory stays bounded by one block (``strip`` px square).
        """
        if level is None:
            candidates = [i for i in range(len(self.levels)) if self.downsample(i) <= downsample * 1.01]
            level = max(candidates)
            pixels = [h * w for h, w in self.levels]
            if level > 0 and pixels[level] > 64 * 2**20:  # too large to hold: the finest level that fits, else stream
                fits = [i for i in range(len(self.levels)) if pixels[i] <= 64 * 2**20]
                level = min(fits) if fits else 0
        level = self._check_level(level)
        if level > 0 or downsample <= 1:
            arr = self.read_level(level).astype(np.float32)
            return (arr.mean(axis=-1) if arr.ndim == 3 else arr), self.downsample(level)
        f = int(downsample)
        H, W = self.shape
        h, w = H // f, W // f
        if h == 0 or w == 0:
            raise SegRefineError(f"{self.path}: slide ({W}x{H} px) is smaller than one thumbnail pixel ({f} px)")
        out = np.empty((h, w), np.float32)
        step = max(1, strip // f)  # blocks of strip x strip level-0 pixels: memory independent of the slide size
        exact = self.dtype.kind in "ui" and self.dtype.itemsize <= 2  # integer sums cannot overflow uint64
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            for c0 in range(0, w, step):
                c1 = min(w, c0 + step)
                block = self.read(c0 * f, r0 * f, (c1 - c0) * f, (r1 - r0) * f)
                C = block.shape[2] if block.ndim == 3 else 1
                # the mean of each f x f x C cell: rows first, then (columns x channels) of each cell
                rows = block.reshape(r1 - r0, f, (c1 - c0) * f * C).sum(
                    axis=1, dtype=np.uint64 if exact else np.float64
                )
                cell = rows.reshape(r1 - r0, c1 - c0, f * C).sum(axis=2)
                out[r0:r1, c0:c1] = cell / float(f * f * C)
        return out, float(f)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The region [y, y+h) x [x, x+w) of level 0 as (h, w) or (h, w, channels)."""
        H, W = self.shape
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise SegRefineError(f"{self.path}: region x={x} y={y} w={w} h={h} is outside the slide ({W}x{H} px)")
        index = [0] * len(self._full_shape)
        index[self._y] = slice(y, y + h)
        index[self._x] = slice(x, x + w)
        if self._c is not None:
            index[self._c] = slice(None)
        try:
            region = np.asarray(self._array[tuple(index)])
        except Exception as exc:
            raise SegRefineError(
                f"{self.path}: cannot read region x={x} y={y} w={w} h={h} "
                f"(truncated or corrupt file? {type(exc).__name__}: {exc})"
            ) from exc
        kept = [a for i, a in enumerate(self.axes) if isinstance(index[i], slice)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self.axes[self._c])] if self._c is not None else [])
        return self._convert(np.transpose(region, order), f"the region x={x} y={y} w={w} h={h}", (x, y))

    def read_all(self) -> np.ndarray:
        H, W = self.shape
        return self.read(0, 0, W, H)

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- streaming pyramidal OME-TIFF -------------------------------------------------------------------------------------
def _padded_tiles(array, tile: int):
    """Row-major (tile, tile) blocks of a 2-D array-like (numpy, DiskArray), zero-padded at the right and bottom
    edges; None for a block of a DiskArray that was never written (all zero, not read)."""
    H, W = array.shape
    written = getattr(array, "written", None)
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            if written is not None and not written(y, min(H, y + tile), x, min(W, x + tile)):
                yield None
                continue
            block = np.asarray(array[y : min(H, y + tile), x : min(W, x + tile)])
            if block.shape != (tile, tile):
                full = np.zeros((tile, tile), block.dtype)
                full[: block.shape[0], : block.shape[1]] = block
                block = full
            yield block


class DiskArray:
    """A 2-D array in a raw file of (chunk x chunk) blocks, each stored row-major in one piece; sparse: blocks
    never written take no disk and read as 0.

    The stitch's working store: ``a[y0:y1, x0:x1]`` reads a region (one
    ``pread`` per block it overlaps: the block's rows in that region) and
    ``a[y0:y1, x0:x1] = v`` writes it (a block's rows are read back first
    when the region covers only some of its columns), with no chunk codec in
    between. Regions are read into process memory, so the process holds one
    region, not the file (a memory map would count the pages it touched in its
    RSS). Disk: 4 bytes per pixel of every block ever written (uint32),
    deleted with the stitch's work folder."""

    def __init__(self, path, shape, dtype=np.uint32, chunk: int = 512):
        self.path, self.shape, self.dtype = Path(path), (int(shape[0]), int(shape[1])), np.dtype(dtype)
        self.ndim, self.chunk = 2, int(chunk)
        self._ncx = -(-self.shape[1] // self.chunk)
        self._written = set()  # blocks (by, bx) ever written: the others are zero without reading them
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, -(-self.shape[0] // self.chunk) * self._ncx * self.chunk**2 * self.dtype.itemsize)

    def _box(self, key):
        if not isinstance(key, tuple) or len(key) != 2 or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"DiskArray takes [y0:y1, x0:x1], got {key!r}")
        (y0, y1, ys), (x0, x1, xs) = (k.indices(n) for k, n in zip(key, self.shape))
        if ys != 1 or xs != 1:
            raise TypeError("DiskArray slices take no step")
        return y0, max(y0, y1), x0, max(x0, x1)

    def _pieces(self, y0, y1, x0, x1):
        """(block (by, bx), file offset of the block's first row in the region, block rows, block columns,
        region rows, region columns) of every block the region overlaps."""
        c, size = self.chunk, self.dtype.itemsize
        for by in range(y0 // c, -(-y1 // c)):
            ra, rb = max(y0, by * c), min(y1, (by + 1) * c)
            for bx in range(x0 // c, -(-x1 // c)):
                ca, cb = max(x0, bx * c), min(x1, (bx + 1) * c)
                offset = ((by * self._ncx + bx) * c * c + (ra - by * c) * c) * size
                yield (
                    (by, bx),
                    offset,
                    slice(0, rb - ra),
                    slice(ca - bx * c, cb - bx * c),
                    slice(ra - y0, rb - y0),
                    slice(ca - x0, cb - x0),
                )

    def written(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether any block overlapping the region [y0, y1) x [x0, x1) was ever written."""
        c = self.chunk
        return any(
            (by, bx) in self._written for by in range(y0 // c, -(-y1 // c)) for bx in range(x0 // c, -(-x1 // c))
        )

    def _pread(self, offset: int, rows: int) -> np.ndarray:
        buf = np.empty((rows, self.chunk), self.dtype)
        if os.preadv(self._fd, [buf.reshape(-1)], offset) != buf.nbytes:
            raise OSError(f"{self.path}: short read")
        return buf

    def __getitem__(self, key) -> np.ndarray:
        y0, y1, x0, x1 = self._box(key)
        out = np.zeros((y1 - y0, x1 - x0), self.dtype)
        for block, offset, brows, bcols, orows, ocols in self._pieces(y0, y1, x0, x1):
            if block in self._written:
                out[orows, ocols] = self._pread(offset, brows.stop)[:, bcols]
        return out

    def __setitem__(self, key, value) -> None:
        y0, y1, x0, x1 = self._box(key)
        value = np.broadcast_to(np.asarray(value, self.dtype), (y1 - y0, x1 - x0))
        for block, offset, brows, bcols, orows, ocols in self._pieces(y0, y1, x0, x1):
            if bcols.stop - bcols.start == self.chunk:
                buf = np.ascontiguousarray(value[orows, ocols])
            else:  # some of the block's columns: keep the others
                buf = (
                    self._pread(offset, brows.stop)
                    if block in self._written
                    else np.zeros((brows.stop, self.chunk), self.dtype)
                )
                buf[:, bcols] = value[orows, ocols]
            self._written.add(block)
            data = memoryview(buf.reshape(-1)).cast("B")
            while data:  # pwrite may write less than asked
                n = os.pwrite(self._fd, data, offset)
                data, offset = data[n:], offset + n

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def label_pyramid_levels(level0, work_dir, min_side: int = 1024, block: int = 2048) -> list:
    """Downsampled copies of a 2-D label array (nearest: every second pixel), each a ``DiskArray`` under ``work_dir``.

    Each level is built block by block from the one above it (never the whole
    slide in memory) until its longer side is at most ``min_side``.
    Returns [level0, level1, ...].
    """
    levels = [level0]
    while max(levels[-1].shape) > min_side:
        prev = levels[-1]
        H, W = prev.shape
        h, w = (H + 1) // 2, (W + 1) // 2
        lv = DiskArray(Path(work_dir) / f"level{len(levels)}.raw", (h, w), prev.dtype)
        written = getattr(prev, "written", None)
        for y in range(0, h, block // 2):
            for x in range(0, w, block // 2):
                if written is not None and not written(2 * y, min(H, 2 * y + block), 2 * x, min(W, 2 * x + block)):
                    continue  # never written: zero in this level too, without reading or writing it
                lv[y : min(h, y + block // 2), x : min(w, x + block // 2)] = np.asarray(
                    prev[2 * y : min(H, 2 * y + block), 2 * x : min(W, 2 * x + block)]
                )[::2, ::2]
        levels.append(lv)
    return levels


def _deflated(tiles, tile: int, dtype, level: int, pool, ahead: int = 8):
    """The zlib streams (TIFF compression 8, "adobe deflate") of ``tiles`` (arrays, or None for a zero tile), in
    order, by tifffile's own deflate encoder (imagecodecs, which releases the GIL) on ``pool``'s threads at most
    ``ahead`` tiles in advance; a zero tile (background: most of a chip) is deflated once and its bytes reused."""
    import tifffile

    encode = tifffile.TIFF.COMPRESSORS[8]

    def deflate(block):
        return bytes(encode(np.ascontiguousarray(block).tobytes(), level=level))

    zero = deflate(np.zeros((tile, tile), dtype))
    pending = collections.deque()
    for block in tiles:
        pending.append(zero if block is None or not block.any() else pool.submit(deflate, block))
        if len(pending) > ahead:
            done = pending.popleft()
            yield done if isinstance(done, bytes) else done.result()
    for done in pending:
        yield done if isinstance(done, bytes) else done.result()


def write_pyramid_ome_tiff(
    path,
    levels: list,
    tile: int = 512,
    pixel_size_um: Optional[float] = None,
    name: str = "labels",
    zlib_level: Optional[int] = None,
    workers: int = 2,
) -> None:
    """Write a tiled, zlib-compressed, pyramidal OME-TIFF (sub-resolutions as SubIFDs) atomically.

    ``levels`` are 2-D array-likes (numpy, zarr, DiskArray), full size first; they are
    streamed tile by tile. tifffile, QuPath (Bio-Formats), napari and Fiji read
    level 0 as the image and the SubIFDs as its pyramid. ``zlib_level``: the
    deflate level (None: 6, tifffile's default); the tiles are deflated here on
    ``workers`` threads and handed to tifffile as encoded tiles.
    """
    import tifffile

    level0 = levels[0]
    dtype = np.dtype(level0.dtype)
    meta = {"axes": "YX", "Name": name}
    if pixel_size_um:
        meta.update(
            PhysicalSizeX=float(pixel_size_um),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(pixel_size_um),
            PhysicalSizeYUnit="µm",
        )
    opts = dict(dtype=dtype, tile=(tile, tile), compression="zlib", photometric="minisblack")
    # label tiles: level 3 costs ~40% of the default 6's time for ~1.5x the bytes
    level = 6 if zlib_level is None else int(zlib_level)
    bigtiff = level0.shape[0] * level0.shape[1] * dtype.itemsize > 2**31
    with atomic_path(path, suffix=".tif") as tmp, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        try:
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
                tif.write(
                    _deflated(_padded_tiles(level0, tile), tile, dtype, level, pool),
                    shape=level0.shape,
                    subifds=len(levels) - 1,
                    metadata=meta,
                    **opts,
                )
                for lv in levels[1:]:
                    tif.write(
                        _deflated(_padded_tiles(lv, tile), tile, dtype, level, pool),
                        shape=lv.shape,
                        subfiletype=1,
                        **opts,
                    )
        except OSError as exc:
            raise SegRefineError(f"{path}: cannot write ({exc}; is the disk full?)") from exc
