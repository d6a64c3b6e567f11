"""Episode data: LeRobotDataset v3 I/O (image and video mode, frames read on demand), a synthetic task, and sampling."""
from vlacompile.data.episodes import Episode, EpisodeSet, read_episodes, split_episodes, write_episodes
from vlacompile.data.sampling import Samples, draw_stratified, make_samples
from vlacompile.data.synthetic import make_synthetic_episode, make_synthetic_episodes

__all__ = [
    "Episode",
    "EpisodeSet",
    "Samples",
    "draw_stratified",
    "make_samples",
    "make_synthetic_episode",
    "make_synthetic_episodes",
    "read_episodes",
    "split_episodes",
    "write_episodes",
]
