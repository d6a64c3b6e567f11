"""Episodes in LeRobotDataset v3 layout (image or video mode), read and written with pyarrow and PyAV.

Layout of a dataset root (what :func:`write_episodes` writes and :func:`read_episodes` reads)::

    meta/info.json                            codebase_version "v3.0", fps, features, path templates
    meta/stats.json                           per-feature min/max/mean/std/count/q01..q99
    meta/tasks.parquet                        task (the instruction) -> task_index
    meta/episodes/chunk-000/file-000.parquet  one row per episode: length, tasks, data file, offsets,
                                              per-episode stats; video mode: videos/<key>/{chunk_index,
                                              file_index, from_timestamp, to_timestamp}
    data/chunk-000/file-000.parquet           one row per frame: observation.state, action, timestamp,
                                              frame_index, episode_index, index, task_index; image mode:
                                              observation.images.<cam> as struct{bytes: PNG, path}
    videos/<key>/chunk-000/file-000.mp4       video mode: one camera's frames of consecutive episodes

Reading is lazy: :func:`read_episodes` reads the small columns and hands out each camera's frames
as a sequence read on demand (:mod:`vlacompile.data.frames`, :mod:`vlacompile.data.video`).

Every problem with the files on disk is raised as :class:`~vlacompile.errors.EpisodeError` naming
the offending file; no raw pyarrow, PyAV or ``KeyError`` traceback escapes.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vlacompile.data.frames import ParquetImageFrames, VideoFrames
from vlacompile.data.video import DEFAULT_VCODEC, TOLERANCE_S, VideoConcat, VideoPool, VideoWriter
from vlacompile.errors import EpisodeError, OutputError

CODEBASE_VERSION = "v3.0"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_PREFIX = "observation.images."

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_DIR = "data"
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DEFAULT_DATA_PATH = DATA_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DEFAULT_EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE_PATTERN + ".parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

# The bookkeeping columns every LeRobot frame carries (name -> dtype).
_INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One demonstration: T frames of camera images, proprioceptive state and recorded actions."""

    index: int  # episode_index
    task: str  # the language instruction
    # camera name (e.g. "front") -> uint8 [T, H, W, 3]: an array, or frames read on demand (LazyFrames,
    # from read_episodes) that index like one; np.asarray() reads them all.
    images: dict[str, Any]
    state: np.ndarray  # float32 [T, state_dim]
    action: np.ndarray  # float32 [T, action_dim]

    def __len__(self) -> int:
        return int(self.state.shape[0])


@dataclass
class EpisodeSet:
    """Episodes that share cameras (each at its own resolution), state/action sizes and a control rate."""

    root: Path | None
    fps: float
    episodes: list[Episode]
    camera_names: tuple[str, ...]
    image_shapes: dict[str, tuple[int, int]]  # camera name -> (H, W)
    state_dim: int
    action_dim: int
    robot_type: str
    # Optional per-dimension names (LeRobot's feature "names"); None when unknown.
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    # Read from disk: camera name -> "image" (PNG in the parquet) or "video" (MP4), and -> its feature key.
    camera_storage: dict[str, str] | None = None
    camera_keys: dict[str, str] | None = None

    @property
    def image_shape(self) -> tuple[int, int]:
        """The one (H, W) of every camera; an error when the cameras differ (use ``image_shapes``)."""
        shapes = set(self.image_shapes.values())
        if len(shapes) != 1:
            raise EpisodeError(f"the cameras have different resolutions {self.image_shapes}", source=self.root,
                               hint="use image_shapes[camera] for a per-camera resolution")
        return next(iter(shapes))

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    @property
    def tasks(self) -> list[str]:
        """The distinct instructions, in order of first appearance."""
        return list(dict.fromkeys(ep.task for ep in self.episodes))

    def stats(self) -> dict:
        """Mean/std/min/max per dimension of state and action over every frame, as float lists."""
        if not self.episodes:
            raise EpisodeError(
                "cannot compute statistics of an empty episode set",
                source=self.root,
                hint="pass a dataset (or a subset) that holds at least one episode",
            )
        out = {}
        for key, attr in ((STATE_KEY, "state"), (ACTION_KEY, "action")):
            arr = np.concatenate([getattr(ep, attr) for ep in self.episodes], axis=0).astype(np.float64)
            out[key] = {
                "mean": arr.mean(axis=0).tolist(),
                "std": arr.std(axis=0).tolist(),
                "min": arr.min(axis=0).tolist(),
                "max": arr.max(axis=0).tolist(),
            }
        return out

    def subset(self, indices: Iterable[int]) -> "EpisodeSet":
        """The episodes at these positions in ``self.episodes`` (arrays are shared, not copied)."""
        picked = [self.episodes[int(i)] for i in indices]
        return replace(self, episodes=picked)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _parquet(path: Path, read):
    """``read(path)``, with pyarrow's failures on a damaged file turned into an EpisodeError naming it."""
    try:
        return read(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise EpisodeError(
            f"cannot read parquet file ({type(exc).__name__}: {exc})",
            source=path,
            hint="the file is truncated or corrupt; copy or re-export the dataset",
        ) from None


def _read_parquet(path: Path, *, columns: list[str] | None = None, filters=None) -> pa.Table:
    return _parquet(path, lambda p: pq.read_table(p, columns=columns, filters=filters))


def _read_schema(path: Path) -> pa.Schema:
    return _parquet(path, pq.read_schema)


def _load_info(root: Path) -> dict:
    path = root / INFO_PATH
    if not path.is_file():
        raise EpisodeError(
            "not a LeRobot dataset: meta/info.json is missing",
            source=root,
            hint="pass the root of a LeRobotDataset v3.0 (the folder holding meta/ and data/)",
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EpisodeError(
            f"cannot parse info.json ({exc})", source=path, hint="the file is truncated or not JSON; restore it"
        ) from None
    if not isinstance(info, dict):
        raise EpisodeError("info.json does not hold a JSON object", source=path, hint="restore meta/info.json")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise EpisodeError(
            f"codebase_version is {version or 'missing'!r}; only LeRobotDataset v3.x is supported",
            source=path,
            hint="convert the dataset with LeRobot's convert_dataset_v21_to_v30 script",
        )
    for key in ("fps", "features"):
        if key not in info:
            raise EpisodeError(f"info.json has no {key!r}", source=path, hint="restore meta/info.json")
    if not isinstance(info["features"], dict):
        raise EpisodeError("info.json 'features' is not an object", source=path, hint="restore meta/info.json")
    return info


def _check_stats_file(root: Path) -> None:
    """meta/stats.json, when present, must be a JSON object: lerobot loads it for every dataset, and an
    empty or cut-off file means the dataset was not finalised (lerobot's ``finalize()``) or was damaged."""
    path = root / STATS_PATH
    if not path.exists():
        return
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        size = path.stat().st_size if path.is_file() else 0
        raise EpisodeError(
            f"cannot parse stats.json ({'the file is empty' if size == 0 else exc})",
            source=path,
            hint="the dataset was not finalised or the file is damaged: restore it, or recompute it with "
                 "lerobot (LeRobotDataset.finalize() / aggregate_stats)",
        ) from None
    if not isinstance(stats, dict):
        raise EpisodeError("stats.json does not hold a JSON object", source=path, hint="restore meta/stats.json")


def _names(feature: dict) -> tuple[str, ...] | None:
    names = feature.get("names")
    if isinstance(names, dict):  # older datasets: {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _vector_dim(feature: dict, key: str, info_path: Path) -> int:
    shape = feature.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise EpisodeError(
            f"feature {key!r} must have a shape [dim] with dim >= 1, found {shape!r}",
            source=info_path,
            hint="fix the feature's shape in meta/info.json",
        )
    return int(shape[0])


def _image_hw(feature: dict, key: str, info_path: Path) -> tuple[int, int]:
    shape = feature.get("shape")
    names = feature.get("names") or []
    ok = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
    if not ok:
        raise EpisodeError(
            f"image feature {key!r} must have a shape of 3 positive ints, found {shape!r}",
            source=info_path,
            hint="set the shape to [height, width, 3] in meta/info.json",
        )
    names = [str(n).lower() for n in names] if isinstance(names, list) else []
    if len(names) == 3 and "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if shape[0] == 3 and shape[2] != 3:  # channels first
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def _camera_name(key: str) -> str:
    if key.startswith(IMAGE_PREFIX):
        return key[len(IMAGE_PREFIX):]
    if key.startswith("observation."):
        return key[len("observation."):]
    return key


def _read_tasks(root: Path) -> dict[int, str] | None:
    path = root / TASKS_PATH
    if not path.is_file():
        return None
    table = _read_parquet(path)
    names = table.column_names
    # LeRobot writes a pandas frame indexed by the task string: the index lands in a column named
    # "task" (named index) or "__index_level_0__" (unnamed); the pandas metadata says which.
    task_col = None
    meta = table.schema.metadata or {}
    if b"pandas" in meta:
        try:
            idx_cols = json.loads(meta[b"pandas"]).get("index_columns", [])
            task_col = next((c for c in idx_cols if isinstance(c, str) and c in names), None)
        except (ValueError, AttributeError):
            task_col = None
    if task_col is None:
        task_col = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if task_col is None or "task_index" not in names:
        raise EpisodeError(
            f"tasks.parquet needs a task column and a task_index column; it holds {names}",
            source=path,
            hint="rewrite meta/tasks.parquet with columns task (str) and task_index (int64)",
        )
    tasks = table.column(task_col).to_pylist()
    idx = table.column("task_index").to_pylist()
    return {int(i): str(t) for i, t in zip(idx, tasks) if i is not None and t is not None}


def _read_episode_meta(root: Path) -> dict[int, dict] | None:
    """episode_index -> {length, tasks, data/..., videos/<key>/..., _source}; None if absent."""
    ep_dir = root / EPISODES_DIR
    paths = sorted(ep_dir.glob("*/*.parquet")) if ep_dir.is_dir() else []
    if not paths:
        return None
    wanted = ("episode_index", "length", "tasks", "data/chunk_index", "data/file_index")
    video_cols = ("/chunk_index", "/file_index", "/from_timestamp", "/to_timestamp")
    out: dict[int, dict] = {}
    for path in paths:
        schema = _read_schema(path)
        if "episode_index" not in schema.names:
            raise EpisodeError(
                f"episodes metadata has no 'episode_index' column; it holds {schema.names}",
                source=path,
                hint="restore meta/episodes/ from the original dataset",
            )
        names = [c for c in schema.names if c in wanted or (c.startswith("videos/") and c.endswith(video_cols))]
        table = _read_parquet(path, columns=names)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        for row in range(table.num_rows):
            rec = {c: cols[c][row] for c in cols}
            rec["_source"] = path
            out[int(rec["episode_index"])] = rec
    return out


# No robot's state or command is this large in any unit (joint ticks, millimetres, radians); beyond
# it a value is corrupt, and float32 statistics of it overflow (1e30 squared is infinite).
MAX_ABS_VALUE = 1e6


def _check_finite(arr: np.ndarray, column: str, episode_index: int, source: Path | None) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        frame, dim = (int(v) for v in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(arr[frame, dim]) else "infinite"
        raise EpisodeError(
            f"column {column!r} holds a {kind} value in episode {episode_index} at frame {frame} "
            f"(dimension {dim}; {int(bad.any(axis=1).sum())} frame(s) affected)",
            source=source,
            hint="drop or repair that episode before compiling (e.g. read_episodes(..., episodes=[...]))",
        )
    huge = np.abs(arr) > MAX_ABS_VALUE
    if huge.any():
        frame, dim = (int(v) for v in np.argwhere(huge)[0])
        raise EpisodeError(
            f"column {column!r} holds {float(arr[frame, dim]):.3g} in episode {episode_index} at frame {frame} "
            f"(dimension {dim}; {int(huge.any(axis=1).sum())} frame(s) beyond +-{MAX_ABS_VALUE:g}): not a plausible "
            "robot value",
            source=source,
            hint="the values are corrupt or in the wrong unit; repair or drop that episode before compiling",
        )


def _vector_column(table: pa.Table, key: str, dim: int, path: Path) -> np.ndarray:
    col = table.column(key)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise EpisodeError(
            f"column {key!r} is null at row {row}",
            source=path,
            hint="every frame needs a value; repair or drop the episode",
        )
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = arr.type
    try:
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != dim).any():
                row = int(np.flatnonzero(lengths != dim)[0])
                raise EpisodeError(
                    f"column {key!r} has {int(lengths[row])} values at row {row}, info.json says {dim}",
                    source=path,
                    hint="make the feature's shape in meta/info.json match the data",
                )
            values = pc.list_flatten(arr)
            if values.null_count:
                raise EpisodeError(
                    f"column {key!r} holds null entries",
                    source=path,
                    hint="every frame needs a full vector; repair or drop the episode",
                )
            flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            return flat.reshape(len(arr), dim)
        if (pa.types.is_floating(t) or pa.types.is_integer(t)) and dim == 1:
            return arr.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
    except (pa.ArrowException, ValueError) as exc:
        raise EpisodeError(
            f"cannot read column {key!r} as float vectors ({exc})",
            source=path,
            hint="the column should be a list of floats per frame",
        ) from None
    raise EpisodeError(
        f"column {key!r} has type {t}, expected a list of {dim} floats per frame",
        source=path,
        hint="the column should be a list of floats per frame",
    )


def resolve_dataset_dir(root: Path) -> Path:
    """A dataset directory, following the Hugging Face hub cache layout
    (``datasets--org--name/refs/main`` -> ``snapshots/<revision>/``) when ``root`` is such a folder."""
    if (root / INFO_PATH).is_file() or not (root / "snapshots").is_dir():
        return root
    ref = root / "refs" / "main"
    if ref.is_file():
        snap = root / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if (snap / INFO_PATH).is_file():
            return snap
    snaps = sorted((p for p in (root / "snapshots").iterdir() if (p / INFO_PATH).is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not snaps:
        raise EpisodeError("a Hugging Face cache folder with no downloaded dataset snapshot (no snapshots/*/meta/info.json)",
                           source=root, hint="download the dataset (huggingface-cli download --repo-type dataset ...)")
    return snaps[-1]


def read_episodes(
    root: str | Path,
    *,
    episodes: list[int] | None = None,
    camera_map: dict[str, str] | None = None,
    state_names: Sequence[str] | None = None,
    action_names: Sequence[str] | None = None,
) -> EpisodeSet:
    """Open a LeRobotDataset v3.x at ``root`` (image or video mode); frames are read on demand.

    ``episodes`` selects episodes by their ``episode_index`` (default: all), returned in that order.
    ``camera_map`` names cameras as a policy does: ``{"wrist": "observation.images.hand"}`` makes the
    dataset's ``hand`` camera the episodes' ``wrist``. ``state_names`` / ``action_names`` keep those
    dimensions of ``observation.state`` / ``action``, in that order, by the names the dataset's
    info.json gives them (a policy trained on a subset of a robot's joints). ``root`` may also be a dataset in the Hugging
    Face hub cache (``datasets--org--name``, or one of its snapshots).

    State, action and timestamps are read now (a few bytes per frame); camera frames are lazy
    sequences (:mod:`vlacompile.data.frames`). Video files are checked before this returns: each
    opens with a decodable codec at the declared size, each episode's rows fit its segment, and
    each file's last needed frame decodes.
    """
    root = Path(root)
    if not root.exists():
        raise EpisodeError("episodes directory does not exist", source=root, hint="check the path")
    if not root.is_dir():
        raise EpisodeError("episodes path is not a directory", source=root, hint="pass the dataset root folder")
    root = resolve_dataset_dir(root)
    info = _load_info(root)
    info_path = root / INFO_PATH
    features: dict[str, Any] = info["features"]
    try:
        fps = float(info["fps"])
    except (TypeError, ValueError):
        raise EpisodeError(f"fps {info['fps']!r} is not a number", source=info_path, hint="fix fps") from None
    if not fps > 0 or not math.isfinite(fps):
        raise EpisodeError(f"fps must be positive, found {fps}", source=info_path, hint="fix fps in info.json")

    camera_keys = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video")]
    video_keys = [k for k in camera_keys if features[k].get("dtype") == "video"]
    if not camera_keys:
        raise EpisodeError(
            "info.json declares no camera features (dtype 'image' or 'video')",
            source=info_path,
            hint="the policy needs camera frames: add observation.images.<camera> features",
        )
    for key in (STATE_KEY, ACTION_KEY):
        if not isinstance(features.get(key), dict):
            raise EpisodeError(
                f"info.json declares no {key!r} feature; features are {sorted(features)}",
                source=info_path,
                hint=f"the dataset needs '{STATE_KEY}' and '{ACTION_KEY}' features",
            )
    state_dim = _vector_dim(features[STATE_KEY], STATE_KEY, info_path)
    action_dim = _vector_dim(features[ACTION_KEY], ACTION_KEY, info_path)
    state_pick = _pick_by_name(features[STATE_KEY], STATE_KEY, state_dim, state_names, info_path)
    action_pick = _pick_by_name(features[ACTION_KEY], ACTION_KEY, action_dim, action_names, info_path)
    cams = _camera_names(camera_keys, camera_map, info_path)
    hws = {key: _image_hw(features[key], key, info_path) for key in camera_keys}

    _check_stats_file(root)
    tasks_by_index = _read_tasks(root)
    ep_meta = _read_episode_meta(root)
    if video_keys and ep_meta is None:
        raise EpisodeError(
            f"cameras {video_keys} are stored as video, but meta/episodes/ is missing: it says where each "
            "episode's frames are in the MP4 files",
            source=root / EPISODES_DIR,
            hint="restore meta/episodes/ from the original dataset",
        )
    video_template = str(info.get("video_path") or DEFAULT_VIDEO_PATH)

    # Which data files to read.
    data_files: list[Path]
    template = info.get("data_path") or DEFAULT_DATA_PATH
    wanted = None if episodes is None else [int(e) for e in episodes]
    if ep_meta is not None and wanted is not None:
        missing = [e for e in wanted if e not in ep_meta]
        if missing:
            raise EpisodeError(
                f"episodes {missing} are not in the dataset ({len(ep_meta)} episodes: "
                f"{min(ep_meta)}..{max(ep_meta)})",
                source=root / EPISODES_DIR,
                hint="pick episode indices that exist",
            )
    data_files = []
    if ep_meta is not None and all("data/chunk_index" in m and "data/file_index" in m for m in ep_meta.values()):
        refs = sorted(
            {
                (int(m["data/chunk_index"]), int(m["data/file_index"]))
                for e, m in ep_meta.items()
                if wanted is None or e in wanted
            }
        )
        try:
            data_files = [root / template.format(chunk_index=c, file_index=f) for c, f in refs]
        except (KeyError, IndexError, ValueError):
            data_files = []
    if not data_files:
        data_files = sorted((root / DATA_DIR).glob("**/*.parquet")) if (root / DATA_DIR).is_dir() else []
    if not data_files:
        raise EpisodeError(
            "the dataset holds no data parquet files (data/chunk-*/file-*.parquet)",
            source=root / DATA_DIR,
            hint="the dataset is empty or incomplete; re-export it",
        )
    for path in data_files:
        if not path.is_file():
            raise EpisodeError(
                "data file named by meta/episodes is missing",
                source=path,
                hint="restore the data/ folder from the original dataset",
            )

    # Only the small columns are read now; frames are read on demand (vlacompile.data.frames).
    image_keys = [k for k in camera_keys if k not in video_keys]
    needed = ["episode_index", STATE_KEY, ACTION_KEY] + (["timestamp"] if video_keys else [])
    optional = ["frame_index", "task_index"]
    pool = VideoPool()
    by_episode: dict[int, Episode] = {}
    for path in data_files:
        schema = _read_schema(path)
        present = schema.names
        for col in needed + image_keys:
            if col not in present:
                raise EpisodeError(
                    f"column {col!r} is missing from {path.name}; present columns: {present}",
                    source=path,
                    hint=f"info.json declares {col!r}; re-export the dataset or remove the feature from info.json"
                    if col != "timestamp" else "video-mode datasets need each frame's timestamp; re-export the dataset",
                )
        cols = needed + [c for c in optional if c in present]
        table = _read_parquet(path, columns=cols)
        if table.num_rows == 0:
            continue
        ep_col = table.column("episode_index").to_numpy(zero_copy_only=False).astype(np.int64)
        file_rows = np.arange(table.num_rows, dtype=np.int64)
        if wanted is not None:  # rows are selected here, not by a parquet filter, to keep their positions in the file
            keep = np.isin(ep_col, np.asarray(wanted, dtype=np.int64))
            if not keep.any():
                continue
            table, ep_col, file_rows = table.filter(pa.array(keep)), ep_col[keep], file_rows[keep]
        if "frame_index" in table.column_names:
            fr_col = table.column("frame_index").to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            fr_col = np.zeros_like(ep_col)
            for e in np.unique(ep_col):
                sel = ep_col == e
                fr_col[sel] = np.arange(int(sel.sum()))
        order = np.lexsort((fr_col, ep_col))
        table = table.take(pa.array(order))
        ep_col, fr_col, file_rows = ep_col[order], fr_col[order], file_rows[order]
        state_all = _vector_column(table, STATE_KEY, state_dim, path)
        action_all = _vector_column(table, ACTION_KEY, action_dim, path)
        if state_pick is not None:
            state_all = state_all[:, state_pick]
        if action_pick is not None:
            action_all = action_all[:, action_pick]
        ts_all = None
        if video_keys:
            ts_all = table.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1)
        task_col = (
            table.column("task_index").to_numpy(zero_copy_only=False) if "task_index" in table.column_names else None
        )
        row_groups = _row_group_starts(path) if image_keys else None
        uniq, starts = np.unique(ep_col, return_index=True)
        ends = list(starts[1:]) + [len(ep_col)]
        for e, s, t in zip(uniq.tolist(), starts.tolist(), ends):
            e = int(e)
            if e in by_episode:
                raise EpisodeError(
                    f"episode {e} appears in more than one data file",
                    source=path,
                    hint="the dataset is inconsistent; re-export it",
                )
            frames = fr_col[s:t]
            if not np.array_equal(frames, np.arange(t - s)):
                raise EpisodeError(
                    f"episode {e} has frame_index values that are not 0..{t - s - 1} without gaps or repeats",
                    source=path,
                    hint="frames are missing or duplicated; re-export the episode",
                )
            state = np.ascontiguousarray(state_all[s:t])
            action = np.ascontiguousarray(action_all[s:t])
            _check_finite(state, STATE_KEY, e, path)
            _check_finite(action, ACTION_KEY, e, path)
            task = _episode_task(e, task_col[s] if task_col is not None else None, tasks_by_index, ep_meta, root)
            if ep_meta is not None and e in ep_meta and ep_meta[e].get("length") is not None:
                if int(ep_meta[e]["length"]) != t - s:
                    raise EpisodeError(
                        f"episode {e} has {t - s} frames in {path.name} but meta/episodes says {ep_meta[e]['length']}",
                        source=path,
                        hint="the data and metadata disagree; re-export the dataset",
                    )
            images: dict[str, Any] = {}
            for key in camera_keys:
                if key in video_keys:
                    vpath, from_s = _video_location(root, video_template, key, e, ep_meta)
                    # lerobot's query: the episode's offset in the file plus the frame's (float32) timestamp
                    images[cams[key]] = VideoFrames(pool, vpath, from_s + ts_all[s:t], hws[key],
                                                    context=f"episode {e}, camera {key}")
                else:
                    images[cams[key]] = ParquetImageFrames(path, key, file_rows[s:t], hws[key], root, row_groups,
                                                           context=f"episode {e}")
            by_episode[e] = Episode(index=e, task=task, images=images, state=state, action=action)

    if wanted is not None:
        missing = [e for e in wanted if e not in by_episode]
        if missing:
            raise EpisodeError(
                f"episodes {missing} have no frames in the data files",
                source=root / DATA_DIR,
                hint="pick episode indices that exist",
            )
        order_idx = list(dict.fromkeys(wanted))
    else:
        order_idx = sorted(by_episode)
    if not order_idx:
        raise EpisodeError(
            "the dataset holds no episodes (no frames in the data files)",
            source=root,
            hint="record or export at least one episode",
        )
    if ep_meta is not None and wanted is None:
        missing = sorted(set(ep_meta) - set(by_episode))
        if missing:
            raise EpisodeError(
                f"meta/episodes lists episodes {missing[:10]} that have no frames in the data files",
                source=root / DATA_DIR,
                hint="the data and metadata disagree; re-export the dataset",
            )
    chosen = [by_episode[e] for e in order_idx]
    if image_keys:  # cheap: one PNG per camera and data file, so a wrong shape fails here, not mid-stage
        first_in_file: dict[Path, Episode] = {}
        for ep in chosen:
            frames = ep.images[cams[image_keys[0]]]
            if len(frames) and frames.path not in first_in_file:
                first_in_file[frames.path] = ep
        for ep in first_in_file.values():
            for key in image_keys:
                ep.images[cams[key]][0]
    if video_keys:
        _check_videos(chosen, video_keys, cams, hws, ep_meta, pool, float(fps))
    return EpisodeSet(
        root=root,
        fps=fps,
        episodes=chosen,
        camera_names=tuple(cams[k] for k in camera_keys),
        image_shapes={cams[k]: hws[k] for k in camera_keys},
        state_dim=state_dim if state_pick is None else len(state_pick),
        action_dim=action_dim if action_pick is None else len(action_pick),
        robot_type=str(info.get("robot_type") or "unknown"),
        state_names=tuple(state_names) if state_pick is not None else _names(features[STATE_KEY]),
        action_names=tuple(action_names) if action_pick is not None else _names(features[ACTION_KEY]),
        camera_storage={cams[k]: ("video" if k in video_keys else "image") for k in camera_keys},
        camera_keys={cams[k]: k for k in camera_keys},
    )


def _pick_by_name(feature: dict, key: str, dim: int, wanted: Sequence[str] | None, info_path: Path) -> np.ndarray | None:
    """Positions of the ``wanted`` names in the feature's names, or None to keep every dimension."""
    if wanted is None:
        return None
    names = _names(feature)
    if names is None or len(names) != dim:
        raise EpisodeError(
            f"cannot select {key} dimensions by name: info.json gives the feature no names for its {dim} dimensions",
            source=info_path, hint=f"drop the {key} name selection, or add the names to meta/info.json")
    missing = [n for n in wanted if n not in names]
    if missing or not wanted or len(set(wanted)) != len(wanted):
        raise EpisodeError(
            f"{key} has no dimensions named {missing}" if missing else f"the {key} names to keep {list(wanted)} are empty or repeat",
            source=info_path, hint=f"the dataset's {key} names are {list(names)}")
    return np.array([names.index(n) for n in wanted], dtype=np.int64)


def _camera_names(camera_keys: list[str], camera_map: dict[str, str] | None, info_path: Path) -> dict[str, str]:
    """Dataset feature key -> the camera name episodes use: its short name, or the policy's via ``camera_map``.

    ``camera_map`` maps a policy camera name to a dataset camera (its key, or its short name).
    """
    cams = {key: _camera_name(key) for key in camera_keys}
    by_short = {_camera_name(k): k for k in camera_keys}
    for policy_cam, ds_cam in (camera_map or {}).items():
        key = ds_cam if ds_cam in cams else by_short.get(ds_cam)
        if key is None:
            raise EpisodeError(
                f"--camera-map {policy_cam}={ds_cam}: the dataset has no camera {ds_cam!r}; its cameras are "
                f"{camera_keys}",
                source=info_path,
                hint="map each policy camera to one of the dataset's camera features",
            )
        cams[key] = str(policy_cam)
    if len(set(cams.values())) != len(cams):
        raise EpisodeError(f"camera names collide: {cams}", source=info_path,
                           hint="rename the image features, or map the cameras to distinct names")
    return cams


def _row_group_starts(path: Path) -> np.ndarray:
    meta = _parquet(path, lambda p: pq.ParquetFile(p).metadata)
    return np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])


def _video_location(root: Path, template: str, key: str, ep: int, ep_meta: dict[int, dict]) -> tuple[Path, float]:
    m = ep_meta.get(ep, {})
    names = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
    missing = [n for n in names if m.get(n) is None]
    if missing:
        raise EpisodeError(
            f"info.json says camera {key!r} is stored as video (dtype 'video'), but meta/episodes has no "
            f"{missing} for episode {ep}",
            source=m.get("_source", root / EPISODES_DIR),
            hint="restore meta/episodes/ from the original dataset; if the frames are PNG images in the parquet, "
                 "the feature's dtype in meta/info.json should be 'image'",
        )
    try:
        rel = template.format(video_key=key, chunk_index=int(m[names[0]]), file_index=int(m[names[1]]))
    except (KeyError, IndexError, ValueError) as exc:
        raise EpisodeError(f"video_path template {template!r} cannot be filled ({exc})", source=root / INFO_PATH,
                           hint="video_path needs {video_key}, {chunk_index} and {file_index}") from None
    return root / rel, float(m[names[2]])


def _check_videos(episodes: list[Episode], video_keys: list[str], cams: dict[str, str], hws: dict[str, tuple[int, int]],
                  ep_meta: dict[int, dict], pool: VideoPool, fps: float) -> None:
    """What can be checked before any long work: every MP4 opens with a known codec at the declared
    size, each episode's rows fit its segment of the file, and each file's last needed frame decodes."""
    last: dict[Path, tuple[float, str]] = {}
    for ep in episodes:
        for key in video_keys:
            frames: VideoFrames = ep.images[cams[key]]
            context = frames.context
            info = pool.get(frames.path).info(context)
            if (info.height, info.width) != hws[key]:
                raise EpisodeError(
                    f"the video is {info.height}x{info.width} (HxW) but info.json declares {key!r} as "
                    f"{hws[key][0]}x{hws[key][1]} ({context})",
                    source=frames.path, hint="fix the feature's shape in meta/info.json or re-encode the video")
            if len(frames):
                t_max = float(frames.times_s.max())
                t_min = float(frames.times_s.min())
                end = info.start_s + info.duration_s if math.isfinite(info.duration_s) else float("inf")
                if t_min < info.start_s - TOLERANCE_S or t_max > end + TOLERANCE_S:
                    raise EpisodeError(
                        f"episode {ep.index} reads frames at {t_min:.4f}-{t_max:.4f} s but the video spans "
                        f"{info.start_s:.4f}-{end:.4f} s ({context})",
                        source=frames.path,
                        hint="the episode's from_timestamp or timestamps point outside the file; re-export the dataset")
            to_s = ep_meta.get(ep.index, {}).get(f"videos/{key}/to_timestamp")
            seg_start = float(ep_meta[ep.index][f"videos/{key}/from_timestamp"])
            if to_s is not None and len(frames):
                room = int(round((float(to_s) - seg_start) * (info.fps or fps)))
                if room < len(frames):
                    raise EpisodeError(
                        f"episode {ep.index} has {len(frames)} rows but its segment of the video "
                        f"({seg_start:.4f}-{float(to_s):.4f} s) holds {room} frames ({context})",
                        source=frames.path,
                        hint="the video has fewer frames than the parquet; re-export the episode or the dataset")
            if len(frames):
                if frames.path not in last or t_max > last[frames.path][0]:
                    last[frames.path] = (t_max, context)
    for path, (t_max, context) in last.items():  # a truncated file fails here, not in the middle of a stage
        pool.get(path).frames_at([t_max], context=context)


def _episode_task(
    ep: int, task_index, tasks_by_index: dict[int, str] | None, ep_meta: dict[int, dict] | None, root: Path
) -> str:
    if task_index is not None and tasks_by_index is not None:
        ti = int(task_index)
        if ti not in tasks_by_index:
            raise EpisodeError(
                f"episode {ep} uses task_index {ti}, which meta/tasks.parquet does not list",
                source=root / TASKS_PATH,
                hint="the data and tasks disagree; re-export the dataset",
            )
        return tasks_by_index[ti]
    if ep_meta is not None and ep in ep_meta:
        tasks = ep_meta[ep].get("tasks")
        if isinstance(tasks, str):
            return tasks
        if isinstance(tasks, list) and tasks:
            return str(tasks[0])
    raise EpisodeError(
        f"cannot find the instruction of episode {ep}",
        source=root / TASKS_PATH,
        hint="the dataset needs meta/tasks.parquet and a task_index column (or tasks in meta/episodes)",
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _as_episode_set(obj, fps: float | None, robot_type: str | None) -> EpisodeSet:
    if isinstance(obj, EpisodeSet):
        es = obj
        if fps is not None:
            es = replace(es, fps=float(fps))
        if robot_type is not None:
            es = replace(es, robot_type=robot_type)
        return es
    episodes = list(obj)
    if fps is None:
        raise EpisodeError("fps is required when writing a list of episodes", hint="pass fps=...")
    if not episodes:
        raise EpisodeError("no episodes to write", hint="pass at least one episode")
    first = episodes[0]
    cams = tuple(first.images)
    if not cams:
        raise EpisodeError(f"episode {first.index} has no camera images", hint="add images to the episode")
    shapes = {}
    for cam in cams:
        img = first.images[cam]
        if len(img.shape) != 4:
            raise EpisodeError(
                f"images of episode {first.index} camera {cam!r} must be [T, H, W, 3], found shape {img.shape}",
                hint="pass uint8 images shaped [T, H, W, 3]",
            )
        shapes[cam] = (int(img.shape[1]), int(img.shape[2]))
    return EpisodeSet(
        root=None,
        fps=float(fps),
        episodes=episodes,
        camera_names=cams,
        image_shapes=shapes,
        state_dim=int(first.state.shape[1]) if first.state.ndim == 2 else 0,
        action_dim=int(first.action.shape[1]) if first.action.ndim == 2 else 0,
        robot_type=robot_type or "vlacompile-synthetic",
    )


def _validate_for_write(es: EpisodeSet) -> None:
    if not es.episodes:
        raise EpisodeError("no episodes to write", hint="pass at least one episode")
    if not (es.fps > 0 and math.isfinite(es.fps)):
        raise EpisodeError(f"fps must be positive, found {es.fps}", hint="pass fps=...")
    for ep in es.episodes:
        t = len(ep)
        if t < 1:
            raise EpisodeError(f"episode {ep.index} has no frames", hint="drop empty episodes")
        if ep.state.shape != (t, es.state_dim) or ep.action.shape != (t, es.action_dim):
            raise EpisodeError(
                f"episode {ep.index}: state {ep.state.shape} / action {ep.action.shape} do not match "
                f"[{t}, {es.state_dim}] / [{t}, {es.action_dim}]",
                hint="all episodes must share state and action sizes",
            )
        if set(ep.images) != set(es.camera_names):
            raise EpisodeError(
                f"episode {ep.index} has cameras {sorted(ep.images)}, expected {list(es.camera_names)}",
                hint="all episodes must have the same cameras",
            )
        for cam in es.camera_names:
            img = ep.images[cam]
            h, w = es.image_shapes[cam]
            if img.dtype != np.uint8 or tuple(img.shape) != (t, h, w, 3):
                raise EpisodeError(
                    f"episode {ep.index} camera {cam!r}: images are {img.dtype} {tuple(img.shape)}, "
                    f"expected uint8 ({t}, {h}, {w}, 3)",
                    hint="pass uint8 images shaped [T, H, W, 3], one size per camera for all episodes",
                )
        _check_finite(np.asarray(ep.state, dtype=np.float32), STATE_KEY, ep.index, None)
        _check_finite(np.asarray(ep.action, dtype=np.float32), ACTION_KEY, ep.index, None)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _vector_stats(arr: np.ndarray, *, quantiles: bool) -> dict[str, list]:
    a = arr.astype(np.float64).reshape(len(arr), -1)
    out = {
        "min": a.min(axis=0).tolist(),
        "max": a.max(axis=0).tolist(),
        "mean": a.mean(axis=0).tolist(),
        "std": a.std(axis=0).tolist(),
        "count": [int(len(a))],
    }
    if quantiles:
        qs = np.quantile(a, _QUANTILES, axis=0)
        for q, vals in zip(_QUANTILES, qs):
            out[f"q{int(round(q * 100)):02d}"] = vals.tolist()
    return out


def _image_hist(frames: np.ndarray) -> np.ndarray:
    """Per-channel histogram [3, 256] of uint8 [T, H, W, 3] frames."""
    flat = np.ascontiguousarray(frames).reshape(-1, 3)
    return np.stack([np.bincount(flat[:, ch], minlength=256) for ch in range(3)]).astype(np.int64)


def _image_stats(hist: np.ndarray, n_frames: int) -> dict[str, list]:
    """Per-channel stats in [0, 1], shaped [3, 1, 1] as LeRobot stores them, exact from the histogram
    (LeRobot estimates them from sampled, downscaled frames), quantiles included as LeRobot's tools
    expect them in every episode's stats."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist * levels).sum(axis=1) / count
    var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / count
    nz = hist > 0
    vmin = np.array([levels[np.flatnonzero(nz[ch])[0]] for ch in range(3)])
    vmax = np.array([levels[np.flatnonzero(nz[ch])[-1]] for ch in range(3)])

    def cube(v: np.ndarray) -> list:
        return [[[float(x)]] for x in v]

    out = {"min": cube(vmin), "max": cube(vmax), "mean": cube(mean), "std": cube(np.sqrt(var)), "count": [int(n_frames)]}
    cdf = np.cumsum(hist, axis=1) / count[:, None]
    for q in _QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = cube(np.array([levels[int(np.searchsorted(cdf[ch], q))] for ch in range(3)]))
    return out


def _hf_features(es: EpisodeSet, video: bool) -> dict:
    """The `datasets` feature spec stored in the parquet schema metadata (as `datasets` writes it)."""

    def seq(dim: int) -> dict:
        return {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim, "_type": "Sequence"}

    feats: dict[str, Any] = {f"{IMAGE_PREFIX}{c}": {"_type": "Image"} for c in es.camera_names if not video}
    feats[STATE_KEY] = seq(es.state_dim)
    feats[ACTION_KEY] = seq(es.action_dim)
    for name, dtype in _INDEX_FEATURES.items():
        feats[name] = {"dtype": dtype, "_type": "Value"}
    return {"info": {"features": feats}}


def _feature_names(names: tuple[str, ...] | None, prefix: str, dim: int) -> list[str]:
    if names is not None and len(names) == dim:
        return list(names)
    return [f"{prefix}_{i}" for i in range(dim)]


_CODEC_NAMES = {"libsvtav1": "av1", "libaom-av1": "av1", "h264": "h264", "libx264": "h264", "hevc": "hevc"}


class _VideoFiles:
    """One camera's MP4 files while writing, laid out as lerobot lays them out: each episode encoded
    alone, then appended to the current file (packets copied, times shifted), or to a new file (and
    chunk, every DEFAULT_CHUNK_SIZE files) once the current one would reach ``file_mb``."""

    def __init__(self, root: Path, key: str, fps: float, hw: tuple[int, int], vcodec: str, file_mb: float):
        self.root, self.key, self.fps, self.hw, self.vcodec, self.file_mb = root, key, fps, hw, vcodec, file_mb
        self.chunk, self.file = 0, 0
        self.current: VideoConcat | None = None
        self.parts = Path(tempfile.mkdtemp(prefix=".episode-videos-", dir=root))

    def _path(self) -> Path:
        return self.root / DEFAULT_VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk, file_index=self.file)

    def add(self, frames: np.ndarray) -> dict[str, Any]:
        part = self.parts / "episode.mp4"
        writer = VideoWriter(part, self.fps, self.hw[1], self.hw[0], vcodec=self.vcodec)
        writer.add(frames)
        writer.close()
        size = part.stat().st_size
        if self.current is not None and self.current.bytes + size >= self.file_mb * 1024 * 1024:
            self.current.close()
            self.current = None
            self.file += 1
            if self.file >= DEFAULT_CHUNK_SIZE:
                self.chunk, self.file = self.chunk + 1, 0
        if self.current is None:
            self.current = VideoConcat(self._path())
        start = self.current.append(part, writer.duration_s)
        part.unlink()
        return {
            f"videos/{self.key}/chunk_index": self.chunk,
            f"videos/{self.key}/file_index": self.file,
            f"videos/{self.key}/from_timestamp": start,
            f"videos/{self.key}/to_timestamp": self.current.duration_s,
        }

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        shutil.rmtree(self.parts, ignore_errors=True)


def _build(es: EpisodeSet, out: Path, video: bool, vcodec: str, video_file_mb: float) -> None:
    fps_out: float | int = int(es.fps) if float(es.fps).is_integer() else float(es.fps)
    tasks = list(dict.fromkeys(ep.task for ep in es.episodes))
    task_index = {t: i for i, t in enumerate(tasks)}
    n_eps = len(es.episodes)
    total_frames = es.num_frames

    features: dict[str, Any] = {}
    for cam in es.camera_names:
        h, w = es.image_shapes[cam]
        features[f"{IMAGE_PREFIX}{cam}"] = {
            "dtype": "video" if video else "image",
            "shape": [h, w, 3],
            "names": ["height", "width", "channels"],
        }
        if video:  # what lerobot's update_video_info records
            features[f"{IMAGE_PREFIX}{cam}"]["info"] = {
                "video.height": h, "video.width": w, "video.codec": _CODEC_NAMES.get(vcodec, vcodec),
                "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps_out,
                "video.channels": 3, "has_audio": False,
            }
    features[STATE_KEY] = {
        "dtype": "float32",
        "shape": [es.state_dim],
        "names": _feature_names(es.state_names, "state", es.state_dim),
    }
    features[ACTION_KEY] = {
        "dtype": "float32",
        "shape": [es.action_dim],
        "names": _feature_names(es.action_names, "action", es.action_dim),
    }
    for name, dtype in _INDEX_FEATURES.items():
        features[name] = {"dtype": dtype, "shape": [1], "names": None}

    # ---- data/chunk-000/file-000.parquet: one row per frame --------------------------------
    cols: dict[str, list] = {k: [] for k in features}
    ep_rows: list[dict[str, Any]] = []
    offset = 0
    hists = {cam: np.zeros((3, 256), dtype=np.int64) for cam in es.camera_names}
    videos = {cam: _VideoFiles(out, f"{IMAGE_PREFIX}{cam}", es.fps, es.image_shapes[cam], vcodec, video_file_mb)
              for cam in es.camera_names} if video else {}
    for new_idx, ep in enumerate(es.episodes):
        t = len(ep)
        ti = task_index[ep.task]
        ep_image_stats, ep_video = {}, {}
        for cam in es.camera_names:  # one episode's frames of one camera in memory at a time
            key = f"{IMAGE_PREFIX}{cam}"
            frames = np.asarray(ep.images[cam], dtype=np.uint8)
            hist = _image_hist(frames)
            hists[cam] += hist
            ep_image_stats[key] = _image_stats(hist, t)
            if video:
                ep_video.update(videos[cam].add(frames))
            else:
                cols[key].extend({"bytes": _png(frames[f]), "path": f"frame-{f:06d}.png"} for f in range(t))
            del frames
        cols[STATE_KEY].append(np.asarray(ep.state, dtype=np.float32))
        cols[ACTION_KEY].append(np.asarray(ep.action, dtype=np.float32))
        frame_idx = np.arange(t, dtype=np.int64)
        ts = (frame_idx / es.fps).astype(np.float32)
        cols["timestamp"].append(ts)
        cols["frame_index"].append(frame_idx)
        cols["episode_index"].append(np.full(t, new_idx, dtype=np.int64))
        cols["index"].append(np.arange(offset, offset + t, dtype=np.int64))
        cols["task_index"].append(np.full(t, ti, dtype=np.int64))

        row: dict[str, Any] = {
            "episode_index": new_idx,
            "tasks": [ep.task],
            "length": t,
            "data/chunk_index": 0,
            "data/file_index": 0,
            "dataset_from_index": offset,
            "dataset_to_index": offset + t,
            **ep_video,
        }
        # Quantiles in every episode's stats, of every feature: lerobot's aggregate_stats (delete_episodes,
        # merge, split) keeps a quantile only when every episode has it, and quantile normalisation needs them.
        ep_stats = {
            STATE_KEY: _vector_stats(ep.state, quantiles=True),
            ACTION_KEY: _vector_stats(ep.action, quantiles=True),
            **ep_image_stats,
            "timestamp": _vector_stats(ts, quantiles=True),
            "frame_index": _vector_stats(frame_idx, quantiles=True),
            "episode_index": _vector_stats(np.full(t, new_idx), quantiles=True),
            "index": _vector_stats(np.arange(offset, offset + t), quantiles=True),
            "task_index": _vector_stats(np.full(t, ti), quantiles=True),
        }
        for feat, st in ep_stats.items():
            for name, val in st.items():
                row[f"stats/{feat}/{name}"] = val
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        ep_rows.append(row)
        offset += t

    arrays = {}
    for cam_files in videos.values():
        cam_files.close()
    for key in features:
        if key.startswith(IMAGE_PREFIX):
            if not video:
                arrays[key] = pa.array(cols[key], type=_IMAGE_STRUCT)
        elif key in (STATE_KEY, ACTION_KEY):
            flat = np.concatenate(cols[key], axis=0)
            dim = flat.shape[1]
            arrays[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
        else:
            arrays[key] = pa.array(np.concatenate(cols[key]), type=pa.from_numpy_dtype(np.dtype(_INDEX_FEATURES[key])))
    data_table = pa.table(arrays)
    data_table = data_table.replace_schema_metadata({b"huggingface": json.dumps(_hf_features(es, video)).encode()})
    data_path = out / DEFAULT_DATA_PATH.format(chunk_index=0, file_index=0)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data_table, data_path)

    # ---- meta/episodes/chunk-000/file-000.parquet -----------------------------------------
    ep_table = pa.Table.from_pylist(ep_rows)
    ep_path = out / DEFAULT_EPISODES_PATH.format(chunk_index=0, file_index=0)
    ep_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(ep_table, ep_path)

    # ---- meta/tasks.parquet: task (the pandas index, as LeRobot writes it) -> task_index ----
    tasks_table = pa.table(
        {
            "task_index": pa.array(list(range(len(tasks))), type=pa.int64()),
            "task": pa.array(tasks, type=pa.string()),
        }
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    tasks_table = tasks_table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(tasks_table, out / TASKS_PATH)

    # ---- meta/stats.json --------------------------------------------------------------------
    all_state = np.concatenate([ep.state for ep in es.episodes], axis=0)
    all_action = np.concatenate([ep.action for ep in es.episodes], axis=0)
    stats: dict[str, Any] = {
        STATE_KEY: _vector_stats(all_state, quantiles=True),
        ACTION_KEY: _vector_stats(all_action, quantiles=True),
    }
    for cam in es.camera_names:
        stats[f"{IMAGE_PREFIX}{cam}"] = _image_stats(hists[cam], total_frames)
    for name in _INDEX_FEATURES:
        stats[name] = _vector_stats(data_table.column(name).to_numpy(), quantiles=True)
    (out / STATS_PATH).write_text(json.dumps(stats, indent=4), encoding="utf-8")

    # ---- meta/info.json ---------------------------------------------------------------------
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": es.robot_type,
        "total_episodes": n_eps,
        "total_frames": total_frames,
        "total_tasks": len(tasks),
        "chunks_size": DEFAULT_CHUNK_SIZE,
        "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        "fps": fps_out,
        "splits": {"train": f"0:{n_eps}"},
        "data_path": DEFAULT_DATA_PATH,
        "video_path": DEFAULT_VIDEO_PATH if video else None,  # LeRobot writes null when no feature is a video
        "features": features,
    }
    (out / INFO_PATH).write_text(json.dumps(info, indent=4, ensure_ascii=False), encoding="utf-8")


def write_episodes(
    root: str | Path,
    episode_set_or_list: EpisodeSet | Sequence[Episode],
    *,
    fps: float | None = None,
    robot_type: str | None = None,
    overwrite: bool = False,
    video: bool = False,
    vcodec: str = DEFAULT_VCODEC,
    video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
) -> Path:
    """Write episodes as a LeRobotDataset v3.0 at ``root``; returns ``root``.

    Image mode (PNG frames in the parquet) by default; ``video=True`` writes each camera's frames
    into MP4 files as lerobot does (``vcodec`` AV1 by default, episodes appended to a file until it
    reaches ``video_files_size_in_mb``), which is lossy: the frames read back are the decoded ones.

    ``fps`` and ``robot_type`` default to the EpisodeSet's (a plain list needs ``fps``; its
    robot_type defaults to "vlacompile-synthetic"). Episodes are renumbered 0..N-1 in the given
    order, as LeRobot requires. The dataset is built in a temporary folder next to ``root`` and
    renamed into place, so a failure leaves nothing half-written. An existing non-empty ``root``
    is replaced only with ``overwrite=True``.
    """
    root = Path(root)
    es = _as_episode_set(episode_set_or_list, fps, robot_type)
    _validate_for_write(es)
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise OutputError(
            "output path already exists and is not empty",
            source=root,
            hint="choose another path or pass overwrite=True",
        )
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create a folder next to the output ({exc})", source=root,
                          hint="check permissions and free space") from None
    try:
        _build(es, tmp, video, vcodec, video_files_size_in_mb)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=parent))
            os.replace(root, old / "x")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the dataset ({exc})", source=root,
                          hint="check permissions and free space") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _apportion(total: int, weights: dict[str, float], caps: dict[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Split ``total`` over keys in proportion to ``weights`` (largest remainder), within ``caps``."""
    keys = list(weights)
    wsum = sum(weights.values())
    quota = {k: (total * weights[k] / wsum if wsum > 0 else 0.0) for k in keys}
    alloc = {k: min(caps[k], int(math.floor(quota[k]))) for k in keys}
    tie = {k: float(r) for k, r in zip(keys, rng.random(len(keys)))}
    while sum(alloc.values()) < total:
        open_keys = [k for k in keys if alloc[k] < caps[k]]
        if not open_keys:
            break
        best = max(open_keys, key=lambda k: (quota[k] - alloc[k], tie[k]))
        alloc[best] += 1
    return alloc


def split_episodes(
    es: EpisodeSet, *, held_out: float = 0.2, calibration: float = 0.1, seed: int = 0
) -> tuple[EpisodeSet, EpisodeSet, EpisodeSet]:
    """Split by episode into (train, calibration, held_out), stratified by task.

    The held-out and calibration counts are ``round(fraction * N)`` overall, apportioned to the
    tasks in proportion to their episode counts (largest remainder), so every split sees the task
    mix of the whole. Within a task, episodes are assigned in a seeded random order. No episode is
    in two splits; each split keeps the episodes' original order. Deterministic under ``seed``.
    """
    for name, frac in (("held_out", held_out), ("calibration", calibration)):
        if not (0.0 <= frac < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    n = len(es.episodes)
    n_held = _round_half_up(held_out * n)
    n_cal = _round_half_up(calibration * n)
    if n_held == 0:
        raise EpisodeError(
            f"the held-out split would be empty: held_out={held_out} of {n} episode(s) rounds to 0",
            source=es.root,
            hint=f"use more episodes (at least {math.ceil(0.5 / held_out) if held_out > 0 else 'some'}) "
            "or a larger held_out fraction",
        )
    if n_held + n_cal >= n:
        raise EpisodeError(
            f"the training split would be empty: {n} episode(s) give {n_held} held-out and "
            f"{n_cal} calibration episode(s)",
            source=es.root,
            hint="use more episodes or smaller held_out / calibration fractions",
        )
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for pos, ep in enumerate(es.episodes):
        by_task.setdefault(ep.task, []).append(pos)
    tasks = sorted(by_task)
    shuffled = {t: [by_task[t][i] for i in rng.permutation(len(by_task[t]))] for t in tasks}
    sizes = {t: float(len(by_task[t])) for t in tasks}
    held_alloc = _apportion(n_held, sizes, {t: len(by_task[t]) for t in tasks}, rng)
    cal_alloc = _apportion(n_cal, sizes, {t: len(by_task[t]) - held_alloc[t] for t in tasks}, rng)
    held: list[int] = []
    cal: list[int] = []
    train: list[int] = []
    for t in tasks:
        order = shuffled[t]
        h, c = held_alloc[t], cal_alloc[t]
        held += order[:h]
        cal += order[h:h + c]
        train += order[h + c:]
    return es.subset(sorted(train)), es.subset(sorted(cal)), es.subset(sorted(held))
