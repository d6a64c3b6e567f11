"""Video-mode episodes streamed: a build's data path holds what its stages hold, not the dataset.

    python bench/bench_video_stream.py /work/bench-assets/video-stream [--frames 20000 200000]

Writes LeRobot v3 video datasets (AV1, lerobot's encoder settings; two cameras at 96x128 and
64x80; episodes of 200 frames at 30 fps; frames generated on the fly, so writing holds one episode)
of each size, then, in a fresh process per dataset, runs the data path of `vlacompile build`:
open the dataset (every MP4 checked, one frame each), split it, draw the distillation set (512
observations), the calibration set (64) and the held-out set verify reads (every 4th frame of the
held-out episodes, at most 400), and reports the process's peak resident memory and the frames
per second decoded. Then one sequential decode of 20,000 frames (every frame of 50 episodes,
one camera) for the decoder's own rate. Prints a Markdown table; writes ASSETS/bench.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CAMS = {"top": (96, 128), "wrist": (64, 80)}
EPISODE = 200
FPS = 30


class GeneratedFrames:
    """An episode's frames made when asked for (a moving gradient and square): no dataset in memory."""

    dtype = np.dtype(np.uint8)

    def __init__(self, episode: int, n: int, hw: tuple[int, int], phase: int):
        self.e, self.n, self.hw, self.phase = episode, n, hw, phase
        self.shape = (n, *hw, 3)

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype=None, copy=None):
        h, w = self.hw
        yy, xx = np.mgrid[0:h, 0:w]
        t = np.arange(self.n)[:, None, None]
        out = np.empty((self.n, h, w, 3), np.uint8)
        out[..., 0] = np.clip(xx * 200 // w + t % 50, 0, 255)
        out[..., 1] = np.clip(yy * 200 // h + (self.e * 13) % 50, 0, 255)
        out[..., 2] = 60 + 40 * self.phase
        for i in range(self.n):
            cy, cx = (3 * i + self.e) % (h - 12), (5 * i + 7 * self.phase) % (w - 12)
            out[i, cy:cy + 12, cx:cx + 12] = 255
        return out


def generate(root: Path, frames: int) -> float:
    from vlacompile.data import Episode, write_episodes

    rng = np.random.default_rng(0)
    n_eps = frames // EPISODE
    eps = [Episode(index=e, task=f"task {e % 10}",
                   images={c: GeneratedFrames(e, EPISODE, hw, i) for i, (c, hw) in enumerate(CAMS.items())},
                   state=rng.normal(size=(EPISODE, 6)).astype(np.float32), action=rng.normal(size=(EPISODE, 6)).astype(np.float32))
           for e in range(n_eps)]
    t0 = time.perf_counter()
    write_episodes(root, eps, fps=FPS, video=True, overwrite=True)
    return time.perf_counter() - t0


def data_path(root: Path) -> dict:
    """What `vlacompile build` does with the episodes before and around its stages (run in a fresh process)."""
    from vlacompile.data import draw_stratified, make_samples, read_episodes, split_episodes
    from vlacompile.data.video import decode_stats

    t0 = time.perf_counter()
    es = read_episodes(root)
    t_open = time.perf_counter() - t0
    train, calib, held = split_episodes(es, seed=0)
    distill = draw_stratified(train, 512, chunk_size=50, seed=0)
    calibration = draw_stratified(calib, 64, chunk_size=50, seed=0)
    pairs = [(ep.index, t) for ep in held.episodes for t in range(0, len(ep), 4)][:400]
    verify = make_samples(held, chunk_size=50, frames=pairs)
    d = decode_stats()
    held_bytes = sum(v.nbytes for s in (distill, calibration, verify) for v in s.images.values())
    return {"frames": es.num_frames, "episodes": len(es), "open_s": round(t_open, 2), "decode": d.describe(),
            "decoded_frames": d.frames, "decode_s": round(d.seconds, 2), "samples_image_mb": round(held_bytes / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def sequential(root: Path) -> dict:
    from vlacompile.data import read_episodes
    from vlacompile.data.video import decode_stats

    es = read_episodes(root)
    es = es.subset(range(min(50, len(es))))
    before = decode_stats()
    for ep in es.episodes:
        np.asarray(ep.images["top"])
    d = decode_stats().since(before)
    return {"frames": d.frames, "seconds": round(d.seconds, 2), "fps": round(d.frames / d.seconds, 1), "seeks": d.seeks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("assets", type=Path)
    ap.add_argument("--frames", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--child", choices=["data_path", "sequential"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"data_path": data_path, "sequential": sequential}[args.child](args.assets)))
        return
    from vlacompile.targets import host_device_string

    results: dict = {"device": host_device_string(), "cameras": {c: list(hw) for c, hw in CAMS.items()}, "datasets": {}}
    for n in args.frames:
        root = args.assets / f"frames-{n}"
        if not (root / "meta" / "info.json").is_file():
            print(f"writing {n} frames to {root} ...", flush=True)
            results.setdefault("write_seconds", {})[n] = round(generate(root, n), 1)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        runs = {}
        for child in ("data_path", "sequential"):
            out = subprocess.run([sys.executable, __file__, str(root), "--child", child], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{child} on {root} failed:\n{out.stderr[-3000:]}")
            runs[child] = json.loads(out.stdout.strip().splitlines()[-1])
        results["datasets"][n] = {"bytes": size, **runs}
        print(json.dumps(results["datasets"][n]), flush=True)
    (args.assets / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nvideo-mode data path on {results['device']} (one run each, fresh process)\n")
    print("| dataset | on disk | open | decoded | peak RSS | sequential decode |")
    print("|---|---|---|---|---|---|")
    for n, r in results["datasets"].items():
        dp, sq = r["data_path"], r["sequential"]
        print(f"| {n:,} frames, {dp['episodes']} episodes | {r['bytes'] / 2**20:.0f} MB | {dp['open_s']} s | "
              f"{dp['decoded_frames']} frames in {dp['decode_s']} s | {dp['peak_rss_mb']} MB | {sq['fps']} frames/s |")
    sizes = list(results["datasets"])
    if len(sizes) >= 2:
        a, b = results["datasets"][sizes[0]], results["datasets"][sizes[-1]]
        print(f"\npeak RSS ratio {sizes[-1]} vs {sizes[0]} frames: "
              f"{b['data_path']['peak_rss_mb'] / a['data_path']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
