"""Record Meta-World MT10 demonstrations with Meta-World's scripted experts.

    python demo/record_metaworld.py --episodes-per-task 2 --image-size 64 --out /tmp/mt10_demo

Writes a LeRobotDataset (vlacompile.data.write_episodes) holding only the successful episodes and
prints the expert's success rate, seconds and frames per episode for each task. Scenes come from
vlacompile.sim.record.record_seed, a stream separate from the evaluation scenes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlacompile.data import write_episodes  # noqa: E402
from vlacompile.sim.metaworld import MT10_INSTRUCTIONS, MetaWorldSuite  # noqa: E402
from vlacompile.sim.record import record_expert_episodes_with_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(MT10_INSTRUCTIONS), help="MT10 env names (default: all ten)")
    ap.add_argument("--episodes-per-task", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cameras", nargs="+", default=["front"], help="observation key of the one rendered camera")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--video", action="store_true",
                    help="store camera frames as AV1 MP4s, lerobot's default (lossy), instead of PNG in the parquet")
    args = ap.parse_args(argv)

    unknown = [t for t in args.tasks if t not in MT10_INSTRUCTIONS]
    if unknown:
        ap.error(f"not MT10 tasks: {unknown}; choose among {list(MT10_INSTRUCTIONS)}")
    suite = MetaWorldSuite(cameras=tuple(args.cameras), image_size=args.image_size, max_steps=args.max_steps)
    t0 = time.perf_counter()
    es, summary = record_expert_episodes_with_summary(
        suite, tasks=[MT10_INSTRUCTIONS[t] for t in args.tasks], episodes_per_task=args.episodes_per_task,
        seed=args.seed, max_steps=args.max_steps,
    )
    print(f"{'task':28s} {'success':>8s} {'s/episode':>10s} {'frames/ep':>10s}")
    for name in args.tasks:
        rows = [r for r in summary if r["env_name"] == name]
        ok = sum(r["success"] for r in rows)
        print(f"{name:28s} {ok:>4d}/{len(rows):<3d} {sum(r['seconds'] for r in rows) / len(rows):10.2f} "
              f"{sum(r['frames'] for r in rows) / len(rows):10.1f}")
    failed = len(summary) - len(es)
    print(f"kept {len(es)} of {len(summary)} episodes ({failed} failed), {es.num_frames} frames at {es.fps:g} fps, "
          f"{time.perf_counter() - t0:.1f} s")
    if not es.episodes:
        print("no successful episode to write", file=sys.stderr)
        return 1
    root = write_episodes(args.out, es, overwrite=args.overwrite, video=args.video)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {root} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
