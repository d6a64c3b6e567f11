"""One camera's frames of one episode, read on demand.

An :class:`~vlacompile.data.episodes.Episode` holds, per camera, a uint8 ``[T, H, W, 3]`` array
(episodes made in memory) or one of these lazy sequences (episodes read from disk): PNG bytes in a
parquet column (image mode) or an MP4 stream (video mode). Both index like the array (``frames[t]``,
``frames[a:b]``, ``frames[[t1, t2]]``, ``len``, ``shape``) and :meth:`take` reads several frames in
one pass, so a dataset's size never decides how much memory a stage holds: only what it asks for
is decoded, and only a small cache of recent frames is kept.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlacompile.data.video import VideoPool
from vlacompile.errors import EpisodeError


_MODES = {"L": "gray", "LA": "gray with alpha", "RGBA": "RGB with alpha", "I;16": "16-bit gray", "I": "32-bit gray"}


class LazyFrames:
    """Base of the lazy frame sequences: indexing in terms of :meth:`take`."""

    dtype = np.dtype(np.uint8)

    def __init__(self, length: int, hw: tuple[int, int]):
        self._length = int(length)
        self.hw = (int(hw[0]), int(hw[1]))

    def __len__(self) -> int:
        return self._length

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._length, *self.hw, 3)

    @property
    def ndim(self) -> int:
        return 4

    def take(self, indices) -> np.ndarray:
        """uint8 [N, H, W, 3] frames at these positions (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[(idx < -self._length) | (idx >= self._length)]
        if bad.size:
            raise IndexError(f"frame {int(bad[0])} is outside an episode of {self._length} frames")
        idx = np.where(idx < 0, idx + self._length, idx)
        return self._read(idx)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.take([int(key)])[0]
        if isinstance(key, slice):
            return self.take(np.arange(self._length)[key])
        return self.take(key)

    def __array__(self, dtype=None, copy=None):
        arr = self.take(np.arange(self._length))
        return arr if dtype is None else arr.astype(dtype)

    def __iter__(self):
        for t in range(self._length):
            yield self[t]


class VideoFrames(LazyFrames):
    """An episode's frames in an MP4 shared with other episodes: frame t is at ``times_s[t]``."""

    def __init__(self, pool: VideoPool, path: Path, times_s: np.ndarray, hw: tuple[int, int], context: str):
        super().__init__(len(times_s), hw)
        self.pool, self.path, self.times_s, self.context = pool, Path(path), np.asarray(times_s, np.float64), context

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = self.pool.get(self.path).frames_at(self.times_s[idx], context=self.context)
        if out.shape[1:3] != self.hw:
            raise EpisodeError(f"frames are {out.shape[1]}x{out.shape[2]} (HxW) but info.json says "
                               f"{self.hw[0]}x{self.hw[1]} ({self.context})", source=self.path,
                               hint="fix the feature's shape in meta/info.json or re-encode the video")
        return out


class ParquetImageFrames(LazyFrames):
    """An episode's PNG frames in a parquet column (image mode): frame t is row ``rows[t]`` of the file.

    Reads one row group of the one column at a time and keeps the last one (row groups are what
    parquet can read alone; lerobot writes files of at most ``data_files_size_in_mb``).
    """

    _cache: dict = {}  # (path, column) -> (row group, its binary column); one entry, shared by episodes

    def __init__(self, path: Path, column: str, rows: np.ndarray, hw: tuple[int, int], root: Path,
                 row_group_starts: np.ndarray, context: str):
        super().__init__(len(rows), hw)
        self.path, self.column, self.rows, self.root, self.context = Path(path), column, np.asarray(rows, np.int64), root, context
        self.starts = np.asarray(row_group_starts, dtype=np.int64)  # first row of each row group, then the row count

    def _row_group_column(self, rg: int) -> pa.Array:
        key = (self.path, self.column, rg)
        hit = ParquetImageFrames._cache.get(key)
        if hit is None:
            try:
                table = pq.ParquetFile(self.path).read_row_group(rg, columns=[self.column])
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise EpisodeError(f"cannot read parquet file ({type(exc).__name__}: {exc})", source=self.path,
                                   hint="the file is truncated or corrupt; copy or re-export the dataset") from None
            col = table.column(self.column)
            hit = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            ParquetImageFrames._cache.clear()
            ParquetImageFrames._cache[key] = hit
        return hit

    def _read(self, idx: np.ndarray) -> np.ndarray:
        starts = self.starts
        h, w = self.hw
        out = np.empty((len(idx), h, w, 3), dtype=np.uint8)
        file_rows = self.rows[idx]
        for i in np.argsort(file_rows, kind="stable"):
            r = int(file_rows[i])
            rg = int(np.searchsorted(starts, r, side="right") - 1)
            col = self._row_group_column(rg)
            out[i] = self._decode(col, r - int(starts[rg]), int(idx[i]))
        return out

    def _decode(self, col: pa.Array, row: int, frame: int) -> np.ndarray:
        h, w = self.hw
        if not pa.types.is_struct(col.type) or col.type.get_field_index("bytes") < 0:
            raise EpisodeError(f"column {self.column!r} has type {col.type}, expected struct<bytes: binary, path: string>",
                               source=self.path, hint="info.json says this camera is stored as images (dtype 'image')")
        item = col[row]
        blob = None if not item.is_valid else item["bytes"].as_py()
        if blob is None:
            rel = item["path"].as_py() if item.is_valid and col.type.get_field_index("path") >= 0 else None
            img_path = (self.root / rel) if rel else None
            if img_path is None or not img_path.is_file():
                raise EpisodeError(f"image {self.column!r} of {self.context} frame {frame} has no bytes"
                                   + (f" and {rel!r} does not exist" if rel else ""), source=self.path,
                                   hint="embed the images in the parquet (image mode) or restore the image files")
            blob = img_path.read_bytes()
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.size != (w, h):
                    raise EpisodeError(f"image {self.column!r} of {self.context} frame {frame} is {im.size[1]}x{im.size[0]} "
                                       f"(HxW), info.json says {h}x{w}", source=self.path,
                                       hint="resize the images or fix the feature's shape in meta/info.json")
                if im.mode not in ("RGB", "P"):  # P: a palette PNG holds RGB colours
                    raise EpisodeError(
                        f"image {self.column!r} of {self.context} frame {frame} is a {im.mode} PNG "
                        f"({_MODES.get(im.mode, im.mode)}), but info.json declares 3 channels (RGB)",
                        source=self.path,
                        hint="store the camera's frames as RGB; a gray or RGBA camera needs its feature's shape "
                             "and the policy's input to say so")
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except EpisodeError:
            raise
        except Exception as exc:  # PIL raises many kinds on corrupt data
            raise EpisodeError(f"cannot decode image {self.column!r} of {self.context} frame {frame} ({exc})",
                               source=self.path, hint="the image bytes are corrupt; re-export the dataset") from None


def take_frames(frames, indices) -> np.ndarray:
    """``frames[indices]`` for an array or a lazy sequence, as a uint8 [N, H, W, 3] array."""
    if isinstance(frames, LazyFrames):
        return frames.take(indices)
    return np.asarray(frames)[np.asarray(indices, dtype=np.int64)]
