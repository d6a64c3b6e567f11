"""Datasets written by lerobot itself (tests/data/lerobot/make_fixtures.py, lerobot 0.4.4 and 0.6.1):
vlacompile reads every frame as lerobot decodes it, state and action bit for bit, and refuses
damaged videos before any work, naming the file and the episode."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlacompile.data import Episode, make_samples, read_episodes, write_episodes
from vlacompile.data.video import decode_stats
from vlacompile.errors import EpisodeError

av = pytest.importorskip("av", reason="PyAV is a vlacompile dependency; reinstall vlacompile")

FIXTURES = Path(__file__).parent / "lerobot" / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
VIDEO = [n for n in NAMES if "video" in n]


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_fixtures_cover_what_the_issue_names():
    assert {"v044_video_av1_multifile", "v044_video_h264", "v044_image_multichunk"} <= set(NAMES)
    info = json.loads((FIXTURES / "v044_video_av1_multifile" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"
    mp4s = sorted((FIXTURES / "v044_video_av1_multifile" / "videos").rglob("*.mp4"))
    assert len({p.parent.name for p in mp4s}) >= 2, "videos span several chunks"


@pytest.mark.parametrize("name", NAMES)
def test_reads_every_frame_as_lerobot_decodes_it(name):
    exp = expected(name)
    es = read_episodes(FIXTURES / name)
    order = np.lexsort((exp["frame_index"], exp["episode_index"]))
    assert [ep.index for ep in es.episodes] == sorted(set(exp["episode_index"].tolist()))
    state = np.concatenate([ep.state for ep in es.episodes])
    action = np.concatenate([ep.action for ep in es.episodes])
    assert state.tobytes() == exp["observation.state"][order].tobytes()
    assert action.tobytes() == exp["action"][order].tobytes()
    for cam in es.camera_names:
        key = es.camera_keys[cam]
        got = np.concatenate([np.asarray(ep.images[cam]) for ep in es.episodes])
        assert got.shape == exp[key][order].shape
        assert np.array_equal(got, exp[key][order]), f"{name} {cam}: {(got != exp[key][order]).mean():.3%} of pixels differ"
        assert es.image_shapes[cam] == got.shape[1:3]
    storage = set(es.camera_storage.values())
    assert storage == ({"video"} if "video" in name else {"image"})


@pytest.mark.parametrize("name", NAMES)
def test_samples_in_any_order_match_lerobot(name):
    """Random access (seeks back and forth across episodes and files) gives the same pixels."""
    exp = expected(name)
    es = read_episodes(FIXTURES / name)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(exp["episode_index"]))[:25]
    pairs = [(int(exp["episode_index"][r]), int(exp["frame_index"][r])) for r in rows]
    s = make_samples(es, chunk_size=3, frames=pairs)
    for cam in es.camera_names:
        assert np.array_equal(s.images[cam], exp[es.camera_keys[cam]][rows])
        assert np.array_equal(es.episodes[0].images[cam][-1], exp[es.camera_keys[cam]][exp["episode_index"] == es.episodes[0].index][-1])
    assert np.array_equal(s.state, exp["observation.state"][rows])


def test_opening_decodes_almost_nothing():
    """Frames are read on demand: opening checks one frame per file; a stage's samples decode only theirs."""
    root = FIXTURES / "v044_video_av1_multifile"
    n_files = len(list((root / "videos").rglob("*.mp4")))
    before = decode_stats()
    es = read_episodes(root)
    opened = decode_stats().since(before)
    assert opened.frames == n_files
    before = decode_stats()
    make_samples(es, chunk_size=2, frames=[(es.episodes[2].index, 3)])
    assert decode_stats().since(before).frames == len(es.camera_names)


def test_episode_subset_and_camera_map():
    root = FIXTURES / "v044_video_av1_multifile"
    exp = expected("v044_video_av1_multifile")
    es = read_episodes(root, episodes=[4, 1], camera_map={"wrist_cam": "observation.images.wrist", "main": "top"})
    assert [ep.index for ep in es.episodes] == [4, 1]
    assert set(es.camera_names) == {"wrist_cam", "main"}
    sel = (exp["episode_index"] == 4)
    assert np.array_equal(np.asarray(es.episodes[0].images["main"]), exp["observation.images.top"][sel])
    with pytest.raises(EpisodeError, match=r"no camera 'hand'.*observation.images.top"):
        read_episodes(root, camera_map={"wrist": "hand"})


def test_hugging_face_cache_layout(tmp_path):
    repo = tmp_path / "datasets--lerobot--fixture"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(FIXTURES / "v044_video_h264", snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    es = read_episodes(repo)
    assert es.root == snap and len(es.episodes) == 3


# -- damaged videos: clear errors before any work, never a shifted frame ---------------------------


def copy_fixture(tmp_path: Path, name: str = "v044_video_h264") -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def first_mp4(root: Path) -> Path:
    return sorted((root / "videos").rglob("*.mp4"))[0]


def edit_episode_meta(root: Path, column: str, episode: int, value) -> None:
    path = next((root / "meta" / "episodes").rglob("*.parquet"))
    t = pq.read_table(path)
    vals = t.column(column).to_pylist()
    idx = t.column("episode_index").to_pylist().index(episode)
    vals[idx] = value
    t = t.set_column(t.column_names.index(column), column, pa.array(vals, type=t.schema.field(column).type))
    pq.write_table(t, path)


def test_missing_mp4_names_the_file_and_episode(tmp_path):
    root = copy_fixture(tmp_path)
    mp4 = first_mp4(root)
    mp4.unlink()
    with pytest.raises(EpisodeError, match=r"video file is missing \(episode 0, camera observation.images.front\)") as e:
        read_episodes(root)
    assert str(mp4) in str(e.value)


def test_truncated_mp4_is_refused_when_opened(tmp_path):
    root = copy_fixture(tmp_path)
    mp4 = first_mp4(root)
    data = mp4.read_bytes()
    mp4.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeError, match=r"episode \d+, camera observation.images.front") as e:
        read_episodes(root)
    assert str(mp4) in str(e.value)


def test_not_a_video_is_refused(tmp_path):
    root = copy_fixture(tmp_path)
    first_mp4(root).write_bytes(b"this is not an mp4 file at all" * 10)
    with pytest.raises(EpisodeError, match=r"cannot open video|no video stream"):
        read_episodes(root)


def test_timestamp_outside_the_file(tmp_path):
    root = copy_fixture(tmp_path)
    edit_episode_meta(root, "videos/observation.images.front/from_timestamp", 1, 100.0)
    with pytest.raises(EpisodeError, match=r"episode 1 reads frames at 100.0000-.* but the video spans 0.0000-"):
        read_episodes(root)


def test_video_with_fewer_frames_than_rows(tmp_path):
    """The MP4 re-muxed without its last 4 frames: the last episode's rows outnumber its frames."""
    root = copy_fixture(tmp_path)
    mp4 = first_mp4(root)
    short = mp4.with_suffix(".short.mp4")
    with av.open(str(mp4)) as src, av.open(str(short), "w") as dst:
        s_in = src.streams.video[0]
        s_out = dst.add_stream_from_template(s_in)
        packets = [p for p in src.demux(s_in) if p.size]
        for p in sorted(packets, key=lambda p: p.dts)[:-4]:
            p.stream = s_out
            dst.mux(p)
    short.replace(mp4)
    with pytest.raises(EpisodeError, match=r"episode 2.*(video ends|spans|holds)") as e:
        read_episodes(root)
    assert str(mp4) in str(e.value)


def test_segment_shorter_than_the_episode(tmp_path):
    root = copy_fixture(tmp_path)
    edit_episode_meta(root, "videos/observation.images.front/to_timestamp", 0, 0.5)
    with pytest.raises(EpisodeError, match=r"episode 0 has 20 rows but its segment of the video \(0.0000-0.5000 s\) holds 8 frames"):
        read_episodes(root)


def test_a_shifted_timestamp_is_an_error_not_a_neighbouring_frame(tmp_path):
    """Half a frame off: lerobot's tolerance is 1e-4 s, so no frame may be taken."""
    root = copy_fixture(tmp_path)
    edit_episode_meta(root, "videos/observation.images.front/from_timestamp", 1, 20 / 15 + 0.5 / 15)
    edit_episode_meta(root, "videos/observation.images.front/to_timestamp", 1, 36 / 15 + 0.5 / 15)
    es = read_episodes(root, episodes=[0])  # other episodes are fine
    assert len(es.episodes[0]) == 20
    with pytest.raises(EpisodeError, match=r"no frame within 0.0001 s of .* \(episode 1, camera observation.images.front\)"):
        es = read_episodes(root, episodes=[1])
        np.asarray(es.episodes[0].images["front"])


def test_video_mode_without_episode_metadata(tmp_path):
    root = copy_fixture(tmp_path)
    shutil.rmtree(root / "meta" / "episodes")
    with pytest.raises(EpisodeError, match="stored as video, but meta/episodes/ is missing"):
        read_episodes(root)


# -- writing what lerobot's tools need ---------------------------------------------------------------


def smooth(e: int, n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip(np.stack([np.stack([xx * 4 + 3 * t, yy * 6 + 20 * e, np.full((h, w), 90)], -1)
                             for t in range(n)]), 0, 255).astype(np.uint8)


def some_episodes() -> list[Episode]:
    rng = np.random.default_rng(3)
    return [Episode(index=e, task=["a", "b"][e % 2], images={"top": smooth(e, n, 32, 48), "wrist": smooth(e + 5, n, 24, 32)},
                    state=rng.normal(size=(n, 3)).astype(np.float32), action=rng.normal(size=(n, 2)).astype(np.float32))
            for e, n in enumerate([9, 12, 7, 10])]


@pytest.mark.parametrize("video", [False, True])
def test_written_episode_stats_carry_quantiles_of_every_feature(tmp_path, video):
    """lerobot's aggregate_stats (delete_episodes, merge) keeps a quantile only when every episode has it."""
    root = write_episodes(tmp_path / "ds", some_episodes(), fps=10, video=video)
    t = pq.read_table(next((root / "meta" / "episodes").rglob("*.parquet")))
    info = json.loads((root / "meta" / "info.json").read_text())
    for feat in info["features"]:
        for q in ("q01", "q10", "q50", "q90", "q99"):
            assert f"stats/{feat}/{q}" in t.column_names, (feat, q)
    q = np.array(t.column("stats/observation.state/q50").to_pylist()[1])
    ep1 = some_episodes()[1].state
    assert np.allclose(q, np.quantile(ep1.astype(np.float64), 0.5, axis=0))
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert {"q01", "q99"} <= set(stats["observation.images.top"])


def test_video_mode_round_trip(tmp_path):
    eps = some_episodes()
    root = write_episodes(tmp_path / "ds", eps, fps=10, video=True, video_files_size_in_mb=0.001)
    mp4s = sorted((root / "videos" / "observation.images.top").rglob("*.mp4"))
    assert len(mp4s) >= 2, "small files: episodes spread over several MP4s"
    es = read_episodes(root)
    assert es.camera_storage == {"top": "video", "wrist": "video"}
    assert es.image_shapes == {"top": (32, 48), "wrist": (24, 32)}
    for mine, back in zip(eps, es.episodes):
        assert back.state.tobytes() == mine.state.tobytes()
        for cam in ("top", "wrist"):
            got = np.asarray(back.images[cam]).astype(np.float64)
            mse = np.mean((got - mine.images[cam]) ** 2)
            assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 30, "AV1 at crf 30 on smooth frames: PSNR above 30 dB"


def test_write_refuses_an_encoder_ffmpeg_lacks(tmp_path):
    with pytest.raises(EpisodeError, match="no 'nonexistent-codec' encoder"):
        write_episodes(tmp_path / "ds", some_episodes(), fps=10, video=True, vcodec="nonexistent-codec")
    assert not (tmp_path / "ds").exists()


def test_interop_record_says_lerobot_agreed():
    """What only lerobot can judge, recorded by the generator: it reads vlacompile's video mode as
    vlacompile does, and its delete_episodes keeps vlacompile's quantiles."""
    rec = json.loads((FIXTURES / "interop.json").read_text())
    for mode in ("image", "video"):
        assert all(rec[mode]["lerobot_frames_equal_vlacompile"].values())
        assert all(set(q) == {"q01", "q10", "q50", "q90", "q99"} for q in rec[mode]["delete_episodes_quantiles"].values())


def test_state_and_action_subsets_by_name():
    root = FIXTURES / "v044_video_h264"
    exp = expected("v044_video_h264")
    es = read_episodes(root, state_names=["joint3", "joint0"], action_names=["cmd1"])
    assert es.state_dim == 2 and es.action_dim == 1 and es.state_names == ("joint3", "joint0")
    order = np.lexsort((exp["frame_index"], exp["episode_index"]))
    assert np.array_equal(np.concatenate([ep.state for ep in es.episodes]), exp["observation.state"][order][:, [3, 0]])
    assert np.array_equal(np.concatenate([ep.action for ep in es.episodes]), exp["action"][order][:, [1]])
    with pytest.raises(EpisodeError, match=r"observation.state has no dimensions named \['elbow'\]") as e:
        read_episodes(root, state_names=["elbow"])
    assert "joint0" in e.value.hint


def test_a_codec_ffmpeg_cannot_decode(tmp_path):
    """The H.264 sample entry renamed: FFmpeg finds no decoder for it."""
    root = copy_fixture(tmp_path)
    mp4 = first_mp4(root)
    mp4.write_bytes(mp4.read_bytes().replace(b"avc1", b"zzz1"))
    with pytest.raises(EpisodeError, match=r"codec has no decoder in this FFmpeg build \(episode 0, camera"):
        read_episodes(root)
