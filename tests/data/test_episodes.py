"""Episode I/O in LeRobotDataset v3.0 layout, the synthetic task, and episode splits."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlacompile.data import (
    EpisodeSet,
    make_synthetic_episode,
    make_synthetic_episodes,
    read_episodes,
    split_episodes,
    write_episodes,
)
from vlacompile.data import episodes as episodes_mod
from vlacompile.data.synthetic import TASKS, make_scene
from vlacompile.errors import EpisodeError, OutputError

DATA_FILE = Path("data/chunk-000/file-000.parquet")
EPISODES_FILE = Path("meta/episodes/chunk-000/file-000.parquet")


@pytest.fixture(scope="module")
def synth() -> EpisodeSet:
    return make_synthetic_episodes(6, image_size=32, cameras=("front", "wrist"), episode_length=12, seed=3)


@pytest.fixture()
def written(tmp_path, synth) -> Path:
    return write_episodes(tmp_path / "ds", synth, fps=synth.fps)


def _rewrite_data(root: Path, fn) -> Path:
    path = root / DATA_FILE
    table = pq.read_table(path)
    pq.write_table(fn(table), path)
    return path


def _set_vector(table: pa.Table, key: str, arr: np.ndarray) -> pa.Table:
    col = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1).astype(np.float32)), arr.shape[1])
    return table.set_column(table.schema.get_field_index(key), key, col)


def _vectors(table: pa.Table, key: str) -> np.ndarray:
    return np.stack(table.column(key).to_numpy(zero_copy_only=False)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Round trip and layout
# ---------------------------------------------------------------------------------------------


def test_round_trip_preserves_everything(written, synth):
    back = read_episodes(written)
    assert back.fps == synth.fps == 10.0
    assert back.camera_names == ("front", "wrist")
    assert back.image_shape == (32, 32)
    assert (back.state_dim, back.action_dim) == (6, 4)
    assert back.robot_type == synth.robot_type
    assert back.state_names == synth.state_names and back.action_names == synth.action_names
    assert len(back.episodes) == len(synth.episodes)
    for a, b in zip(synth.episodes, back.episodes):
        assert (a.index, a.task, len(a)) == (b.index, b.task, len(b))
        assert b.state.dtype == np.float32 and b.action.dtype == np.float32
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.action, b.action)
        for cam in synth.camera_names:
            assert b.images[cam].dtype == np.uint8
            assert b.images[cam].shape == (12, 32, 32, 3)
            assert np.array_equal(a.images[cam], b.images[cam])  # byte exact
    assert back.stats() == synth.stats()


def test_read_selected_episodes_in_requested_order(written, synth):
    back = read_episodes(written, episodes=[4, 1])
    assert [ep.index for ep in back.episodes] == [4, 1]
    np.testing.assert_array_equal(back.episodes[0].action, synth.episodes[4].action)
    with pytest.raises(EpisodeError, match="99"):
        read_episodes(written, episodes=[99])


def test_written_layout_has_v3_keys(written, synth):
    info = json.loads((written / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == 10
    assert info["total_episodes"] == 6 and info["total_frames"] == 72
    assert info["total_tasks"] == len(synth.tasks)
    assert info["splits"] == {"train": "0:6"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert "video_path" in info and info["robot_type"] == synth.robot_type
    feats = info["features"]
    assert feats["observation.images.front"] == {
        "dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channels"]
    }
    assert feats["observation.state"]["dtype"] == "float32" and feats["observation.state"]["shape"] == [6]
    assert feats["action"]["shape"] == [4] and len(feats["action"]["names"]) == 4
    for key, dtype in [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                       ("index", "int64"), ("task_index", "int64")]:
        assert feats[key]["dtype"] == dtype and feats[key]["shape"] == [1]

    stats = json.loads((written / "meta/stats.json").read_text())
    for key in ("observation.state", "action"):
        assert {"mean", "std", "min", "max", "count"} <= set(stats[key])
        for name in ("mean", "std", "min", "max"):
            assert stats[key][name] == pytest.approx(synth.stats()[key][name], abs=1e-6)
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)

    tasks = pq.read_table(written / "meta/tasks.parquet")
    assert {"task", "task_index"} <= set(tasks.column_names)
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]
    assert sorted(tasks.column("task").to_pylist()) == sorted(synth.tasks)

    eps = pq.read_table(written / EPISODES_FILE)
    for col in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
                "meta/episodes/file_index", "stats/action/mean"):
        assert col in eps.column_names, col
    assert eps.column("length").to_pylist() == [12] * 6
    assert eps.column("dataset_from_index").to_pylist() == [0, 12, 24, 36, 48, 60]
    assert eps.column("dataset_to_index").to_pylist() == [12, 24, 36, 48, 60, 72]
    assert eps.column("tasks").to_pylist() == [[ep.task] for ep in synth.episodes]

    data = pq.read_table(written / DATA_FILE)
    img_type = data.schema.field("observation.images.front").type
    assert pa.types.is_struct(img_type)
    assert {img_type.field(i).name for i in range(img_type.num_fields)} == {"bytes", "path"}
    first = data.column("observation.images.wrist")[0].as_py()
    assert first["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert data.column("index").to_pylist() == list(range(72))
    assert data.column("frame_index").to_pylist()[:13] == list(range(12)) + [0]
    np.testing.assert_allclose(data.column("timestamp").to_numpy()[:3], [0.0, 0.1, 0.2], rtol=1e-6)


def test_reads_variable_length_list_columns(written, synth):
    """Datasets written by `datasets` may store vectors as list<float> rather than fixed-size lists."""
    def to_list(table):
        for key in ("observation.state", "action"):
            arr = _vectors(table, key)
            col = pa.array([row.tolist() for row in arr], type=pa.list_(pa.float32()))
            table = table.set_column(table.schema.get_field_index(key), key, col)
        return table

    _rewrite_data(written, to_list)
    back = read_episodes(written)
    np.testing.assert_array_equal(back.episodes[5].action, synth.episodes[5].action)


def test_write_accepts_a_list_and_renumbers(tmp_path, synth):
    picked = [synth.episodes[4], synth.episodes[2]]
    root = write_episodes(tmp_path / "list", picked, fps=5)
    back = read_episodes(root)
    assert back.fps == 5.0 and back.robot_type == "vlacompile-synthetic"
    assert [ep.index for ep in back.episodes] == [0, 1]
    assert [ep.task for ep in back.episodes] == [picked[0].task, picked[1].task]
    np.testing.assert_array_equal(back.episodes[1].state, picked[1].state)


# ---------------------------------------------------------------------------------------------
# Bad inputs -> EpisodeError naming the file
# ---------------------------------------------------------------------------------------------


def test_missing_dir_and_missing_info(tmp_path, written):
    with pytest.raises(EpisodeError, match="does not exist"):
        read_episodes(tmp_path / "nope")
    (written / "meta/info.json").unlink()
    with pytest.raises(EpisodeError, match="info.json") as exc:
        read_episodes(written)
    assert exc.value.source == str(written) and exc.value.hint


def test_missing_action_column_names_column_and_file(written):
    path = _rewrite_data(written, lambda t: t.drop_columns(["action"]))
    with pytest.raises(EpisodeError) as exc:
        read_episodes(written)
    err = exc.value
    assert "'action'" in err.message
    assert "file-000.parquet" in str(err)
    assert err.source == str(path)
    assert "observation.state" in err.message  # lists what is present
    assert err.hint


def test_nan_in_state_names_column_episode_and_frame(written):
    def poison(table):
        state = _vectors(table, "observation.state")
        row = 2 * 12 + 5  # episode 2, frame 5
        state[row, 1] = np.nan
        return _set_vector(table, "observation.state", state)

    _rewrite_data(written, poison)
    with pytest.raises(EpisodeError) as exc:
        read_episodes(written)
    msg = exc.value.message
    assert "observation.state" in msg and "episode 2" in msg and "frame 5" in msg and "NaN" in msg
    # The other episodes are still readable on their own.
    assert len(read_episodes(written, episodes=[0, 1, 3])) == 3


def test_inf_in_action(written):
    def poison(table):
        action = _vectors(table, "action")
        action[4 * 12 + 11, 0] = np.inf
        return _set_vector(table, "action", action)

    _rewrite_data(written, poison)
    with pytest.raises(EpisodeError, match=r"'action'.*infinite.*episode 4 at frame 11"):
        read_episodes(written)


def test_truncated_parquet_is_an_episode_error(written):
    path = written / DATA_FILE
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(EpisodeError) as exc:
        read_episodes(written)
    assert exc.value.source == str(path)
    assert exc.value.__cause__ is None and "truncated" in exc.value.hint


def test_truncated_episodes_metadata_is_an_episode_error(written):
    path = written / EPISODES_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EpisodeError) as exc:
        read_episodes(written)
    assert exc.value.source == str(path)


def test_image_size_mismatch(written):
    info_path = written / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.wrist"]["shape"] = [48, 48, 3]
    info["features"]["observation.images.front"]["shape"] = [48, 48, 3]
    info_path.write_text(json.dumps(info))
    with pytest.raises(EpisodeError, match=r"32x32.*48x48") as exc:
        read_episodes(written)
    assert exc.value.source == str(written / DATA_FILE)


def test_video_dtype_without_videos_names_the_mismatch(written):
    """info.json says video, but the dataset holds PNGs: the error names both and the fix."""
    info_path = written / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.front"]["dtype"] = "video"
    info_path.write_text(json.dumps(info))
    with pytest.raises(EpisodeError, match=r"stored as video \(dtype 'video'\), but meta/episodes has no") as exc:
        read_episodes(written)
    assert "should be 'image'" in exc.value.hint


def test_empty_dataset(tmp_path, written):
    _rewrite_data(written, lambda t: t.slice(0, 0))
    for p in (written / "meta/episodes").rglob("*.parquet"):
        p.unlink()
    with pytest.raises(EpisodeError, match="no episodes"):
        read_episodes(written)
    with pytest.raises(EpisodeError, match="no episodes"):
        write_episodes(tmp_path / "empty", [], fps=10)


def test_write_is_atomic_and_refuses_to_clobber(tmp_path, synth, monkeypatch):
    root = tmp_path / "out"
    write_episodes(root, synth)
    with pytest.raises(OutputError):
        write_episodes(root, synth)
    write_episodes(root, synth.subset([0, 1]), overwrite=True)
    assert len(read_episodes(root)) == 2

    def boom(img):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(episodes_mod, "_png", boom)
    with pytest.raises(RuntimeError):
        write_episodes(tmp_path / "fresh", synth)
    with pytest.raises(RuntimeError):
        write_episodes(root, synth, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written dataset, no temp dirs
    assert len(read_episodes(root)) == 2  # the old dataset is untouched


def test_write_refuses_nan(tmp_path, synth):
    ep = synth.episodes[0]
    bad = type(ep)(index=0, task=ep.task, images=ep.images, state=ep.state.copy(), action=ep.action)
    bad.state[3, 0] = np.nan
    with pytest.raises(EpisodeError, match="episode 0 at frame 3"):
        write_episodes(tmp_path / "bad", [bad], fps=10)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Synthetic task
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_balanced():
    a = make_synthetic_episodes(9, image_size=24, episode_length=10, seed=5)
    b = make_synthetic_episodes(9, image_size=24, episode_length=10, seed=5)
    c = make_synthetic_episodes(9, image_size=24, episode_length=10, seed=6)
    assert sorted(a.tasks) == sorted(TASKS)  # 9 episodes cover all 3 verbs x 3 colours
    for x, y in zip(a.episodes, b.episodes):
        assert x.task == y.task
        np.testing.assert_array_equal(x.action, y.action)
        np.testing.assert_array_equal(x.images["front"], y.images["front"])
    assert not all(np.array_equal(x.action, y.action) for x, y in zip(a.episodes, c.episodes))
    assert a.fps == 10.0 and (a.state_dim, a.action_dim) == (6, 4)
    assert all(np.isfinite(ep.state).all() and np.isfinite(ep.action).all() for ep in a.episodes)


def test_synthetic_actions_depend_on_the_instruction():
    kw = dict(scene_seed=11, noise_seed=4, image_size=32, episode_length=40)
    scene = make_scene(np.random.default_rng(11))
    runs = {task: make_synthetic_episode(task, **kw) for task in
            ("move to the red block", "move to the blue block", "pick up the red block", "push the red block")}
    red, blue = runs["move to the red block"], runs["move to the blue block"]
    # Same scene: the first frame is identical, the actions are not.
    np.testing.assert_array_equal(red.images["front"][0], blue.images["front"][0])
    np.testing.assert_array_equal(red.state[0], blue.state[0])
    assert np.abs(red.action[:10, :2] - blue.action[:10, :2]).mean() > 0.1
    # The expert ends at the named block.
    for ep, colour in ((red, "red"), (blue, "blue")):
        assert np.linalg.norm(ep.state[-1, :2] - scene.blocks[colour]) < 0.05
    # Verbs differ after arrival: pick up closes and lifts, move-to does not, push keeps moving.
    pick = runs["pick up the red block"]
    assert pick.action[:, 2].max() == 1.0 and pick.action[:, 3].max() == 1.0
    assert pick.state[-1, 2] == 0.0  # gripper closed
    assert red.action[:, 2:].max() == 0.0 and red.state[-1, 2] == 1.0
    push = runs["push the red block"]
    assert not np.allclose(push.action, red.action)


def test_synthetic_cameras_are_different_views():
    es = make_synthetic_episodes(2, image_size=32, cameras=("front", "side"), episode_length=5, seed=1)
    ep = es.episodes[0]
    assert ep.images["front"].shape == ep.images["side"].shape == (5, 32, 32, 3)
    assert not np.array_equal(ep.images["front"], ep.images["side"])
    # The gripper moves, so frames change over time.
    assert not np.array_equal(ep.images["front"][0], ep.images["front"][-1])


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many() -> EpisodeSet:
    return make_synthetic_episodes(27, image_size=8, episode_length=3, seed=0)


def test_split_is_by_episode_deterministic_and_stratified(many):
    train, cal, held = split_episodes(many, held_out=1 / 3, calibration=1 / 3, seed=0)
    ids = [ep.index for s in (train, cal, held) for ep in s.episodes]
    assert sorted(ids) == list(range(27))  # every episode exactly once
    assert (len(train), len(cal), len(held)) == (9, 9, 9)
    for part in (train, cal, held):  # 3 episodes per task -> one per task in each split
        assert sorted(ep.task for ep in part.episodes) == sorted(TASKS)
        assert part.camera_names == many.camera_names and part.fps == many.fps

    again = split_episodes(many, held_out=1 / 3, calibration=1 / 3, seed=0)
    other = split_episodes(many, held_out=1 / 3, calibration=1 / 3, seed=1)
    key = lambda parts: [[ep.index for ep in p.episodes] for p in parts]
    assert key(again) == key((train, cal, held))
    assert key(other) != key((train, cal, held))


def test_split_default_fractions(many):
    train, cal, held = split_episodes(many)
    assert (len(train), len(cal), len(held)) == (19, 3, 5)
    assert len({ep.task for ep in held.episodes}) == 5  # spread over tasks, not 5 of one


def test_split_empty_held_out_raises_with_counts(many):
    with pytest.raises(EpisodeError, match=r"held_out=0\.2 of 2 episode"):
        split_episodes(many.subset([0, 1]), held_out=0.2)


def test_absurd_magnitudes_are_refused_when_read(tmp_path):
    """1e30 is finite, but no robot reports it, and its square overflows float32 statistics."""
    es = make_synthetic_episodes(2, episode_length=6, image_size=32, seed=0)
    root = write_episodes(tmp_path / "ds", es)
    es.episodes[1].state[3, 2] = 1e30
    with pytest.raises(EpisodeError, match=r"holds 1e\+30 in episode 1 at frame 3"):
        write_episodes(tmp_path / "ds2", es)  # vlacompile does not write it either
    path = next((root / "data").rglob("*.parquet"))
    t = pq.read_table(path)
    state = np.array(t.column("observation.state").to_pylist(), dtype=np.float32)
    state[6 + 3, 2] = 1e30
    arr = pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), state.shape[1])
    t = t.set_column(t.column_names.index("observation.state"), "observation.state", arr)
    pq.write_table(t.replace_schema_metadata(pq.read_schema(path).metadata), path)
    with pytest.raises(EpisodeError, match=r"holds 1e\+30 in episode 1 at frame 3 \(dimension 2.*not a plausible robot value"):
        read_episodes(root)


def test_empty_stats_json_is_refused(written):
    (written / "meta" / "stats.json").write_bytes(b"")
    with pytest.raises(EpisodeError, match=r"stats.json \(the file is empty\)") as e:
        read_episodes(written)
    assert "finalize" in e.value.hint


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_gray_or_rgba_frames_for_an_rgb_camera_are_refused(tmp_path, mode):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    es = make_synthetic_episodes(1, episode_length=4, image_size=32, seed=0)
    root = write_episodes(tmp_path / "ds", es)
    path = next((root / "data").rglob("*.parquet"))
    t = pq.read_table(path)
    col = "observation.images." + es.camera_names[0]
    rows = t.column(col).to_pylist()
    buf = io.BytesIO()
    Image.new(mode, (32, 32)).save(buf, format="PNG")
    rows[0] = {"bytes": buf.getvalue(), "path": rows[0]["path"]}
    t = t.set_column(t.column_names.index(col), col, pa.array(rows, type=t.schema.field(col).type))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(path).metadata), path)
    with pytest.raises(EpisodeError, match=rf"is a {mode} PNG .* but info.json declares 3 channels"):
        read_episodes(root)
