"""Datasets written by lerobot's own API, and lerobot's own decode of them, as test fixtures.

Run in the side environment of ../shared/lerobot-side (lerobot 0.4.4 there; 0.6.1 in venv061):

    /work/side/venv/bin/python tests/data/lerobot/make_fixtures.py tests/data/lerobot/fixtures
    /work/side/venv061/bin/python tests/data/lerobot/make_fixtures.py tests/data/lerobot/fixtures --only v061_video

Each fixture is a dataset folder written by ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode``
/ ``finalize`` and, beside it, ``<name>.expected.npz``: what ``LeRobotDataset.__getitem__`` returns
for every frame in index order (its video decode, torchcodec in these environments, as uint8 HWC;
state, action, timestamp, episode_index, frame_index). vlacompile's tests read the folders without
lerobot and compare. Regenerate rather than edit.

It also checks, and records in ``interop.json``, two things only lerobot can judge: that lerobot
reads a video-mode dataset vlacompile wrote (frames equal to vlacompile's own decode), and that
lerobot's ``delete_episodes`` on a vlacompile dataset keeps the quantile statistics.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]


def frames_for(episode: int, t: int, h: int, w: int, phase: int) -> np.ndarray:
    """A smooth scene with a moving square: compresses well and survives lossy video honestly."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(1, w - 1) + 7 * t) % 256, (yy * 255 // max(1, h - 1) + 40 * episode) % 256,
                    np.full((h, w), (60 * phase + 5 * t) % 256)], -1).astype(np.uint8)
    cy, cx = (3 * t + 5 * episode) % max(1, h - 8), (5 * t + 3 * phase) % max(1, w - 8)
    img[cy:cy + 8, cx:cx + 8] = (255, 255, 255)
    return img


CONFIGS = {
    # lerobot's defaults (AV1) with two cameras of different sizes, files and chunks forced small.
    # About two episodes per MP4 (so episodes start mid-file), the cameras' files splitting at different episodes.
    "v044_video_av1_multifile": dict(use_videos=True, vcodec="libsvtav1", fps=10, episodes=[8, 7, 9, 6, 8, 7, 6],
                                     cams={"top": (48, 64), "wrist": (32, 40)}, state=3, action=2,
                                     chunks_size=2, video_mb=0.0075, data_mb=0.001),
    # H.264, one camera, another fps, longer episodes in one file.
    "v044_video_h264": dict(use_videos=True, vcodec="h264", fps=15, episodes=[20, 16, 18],
                            cams={"front": (40, 56)}, state=4, action=4),
    # Image mode (PNG in the parquet), several data files and chunks, cameras of different sizes.
    "v044_image_multichunk": dict(use_videos=False, fps=20, episodes=[8, 7, 9, 6],
                                  cams={"left": (24, 32), "right": (20, 28)}, state=2, action=3,
                                  chunks_size=2, data_mb=0.001),
    # The same kind of video dataset written by lerobot 0.6.1 (its layout since 0.5).
    "v061_video": dict(use_videos=True, vcodec="libsvtav1", fps=10, episodes=[10, 12, 9],
                       cams={"top": (32, 48), "side": (24, 32)}, state=3, action=2, chunks_size=2, video_mb=0.003),
}


def make(name: str, cfg: dict, out: Path) -> None:
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    kind = "video" if cfg["use_videos"] else "image"
    features = {f"observation.images.{c}": {"dtype": kind, "shape": (h, w, 3), "names": ["height", "width", "channels"]}
                for c, (h, w) in cfg["cams"].items()}
    features["observation.state"] = {"dtype": "float32", "shape": (cfg["state"],), "names": [f"joint{i}" for i in range(cfg["state"])]}
    features["action"] = {"dtype": "float32", "shape": (cfg["action"],), "names": [f"cmd{i}" for i in range(cfg["action"])]}
    v06 = lerobot.__version__.startswith(("0.5", "0.6"))
    kwargs = {}
    if cfg["use_videos"] and not v06:  # 0.5+ configures encoders with RGBEncoderConfig; its default is AV1 too
        kwargs["vcodec"] = cfg["vcodec"]
    ds = LeRobotDataset.create(f"vlacompile/{name}", fps=cfg["fps"], features=features, root=root, robot_type="fixture-arm",
                               use_videos=cfg["use_videos"], **kwargs)
    # Small files and chunks, so a few frames already span several.
    settings = {"chunks_size": cfg.get("chunks_size"), "video_files_size_in_mb": cfg.get("video_mb"),
                "data_files_size_in_mb": cfg.get("data_mb")}
    if hasattr(ds.meta, "update_chunk_settings"):
        ds.meta.update_chunk_settings(**settings)
    else:
        for k, v in settings.items():
            if v is not None:
                ds.meta.info[k] = v
    rng = np.random.default_rng(len(name))
    for e, length in enumerate(cfg["episodes"]):
        for t in range(length):
            frame = {f"observation.images.{c}": frames_for(e, t, h, w, i) for i, (c, (h, w)) in enumerate(cfg["cams"].items())}
            frame["observation.state"] = rng.normal(size=cfg["state"]).astype(np.float32)
            frame["action"] = rng.normal(size=cfg["action"]).astype(np.float32)
            frame["task"] = ["pick the cube", "open the drawer"][e % 2]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    expected = read_with_lerobot(root)
    np.savez_compressed(out / f"{name}.expected.npz", **expected)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    print(f"{name}: lerobot {lerobot.__version__}, {sum(cfg['episodes'])} frames, {len(files)} files: {files}")


def read_with_lerobot(root: Path) -> dict[str, np.ndarray]:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(f"vlacompile/{root.name}", root=root)
    items = [ds[i] for i in range(len(ds))]
    out = {}
    for key in ds.meta.camera_keys:
        out[key] = np.stack([(it[key].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0) for it in items])
    for key in ("observation.state", "action", "timestamp", "episode_index", "frame_index"):
        out[key] = np.stack([it[key].numpy() for it in items])
    return out


def interop(out: Path) -> dict:
    """lerobot reads vlacompile's video mode; lerobot's delete_episodes keeps vlacompile's quantiles."""
    sys.path.insert(0, str(REPO))
    from lerobot.datasets.dataset_tools import delete_episodes
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from vlacompile.data import Episode, read_episodes, write_episodes

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        eps = [Episode(index=e, task=["reach", "push"][e % 2],
                       images={"top": np.stack([frames_for(e, t, 32, 48, 0) for t in range(n)]),
                               "wrist": np.stack([frames_for(e, t, 24, 32, 1) for t in range(n)])},
                       state=rng.normal(size=(n, 3)).astype(np.float32), action=rng.normal(size=(n, 2)).astype(np.float32))
               for e, n in enumerate([9, 11, 10, 8])]
        for video in (False, True):
            root = write_episodes(tmp / f"vla_{'video' if video else 'image'}", eps, fps=10, video=video)
            ours = read_episodes(root)
            theirs = read_with_lerobot(root)
            same = {}
            for cam in ours.camera_names:
                mine = np.concatenate([np.asarray(ep.images[cam]) for ep in ours.episodes])
                same[cam] = bool(np.array_equal(mine, theirs[f"observation.images.{cam}"]))
            same["state"] = bool(np.array_equal(np.concatenate([ep.state for ep in ours.episodes]), theirs["observation.state"]))
            ds = LeRobotDataset("vla/x", root=root)
            kept = delete_episodes(ds, [1], output_dir=tmp / f"deleted_{video}", repo_id="vla/y")
            stats = json.loads((Path(kept.root) / "meta" / "stats.json").read_text())
            result["video" if video else "image"] = {
                "lerobot_frames_equal_vlacompile": same,
                "delete_episodes_quantiles": {k: sorted(q for q in v if q.startswith("q")) for k, v in stats.items()},
                "episodes_after_delete": kept.meta.total_episodes,
            }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="*", help="fixture names (default: those for this lerobot version)")
    args = ap.parse_args()
    import lerobot

    major = "v061" if lerobot.__version__.startswith(("0.5", "0.6")) else "v044"
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or [n for n in CONFIGS if n.startswith(major)]
    for name in names:
        make(name, CONFIGS[name], args.out)
    if not args.only and major == "v044":
        res = {"lerobot": lerobot.__version__, **interop(args.out)}
        (args.out / "interop.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
