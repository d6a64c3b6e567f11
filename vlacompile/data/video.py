"""MP4 camera streams of LeRobot video-mode datasets: decoding frames by timestamp, and encoding them.

PyAV, not torchcodec: PyAV's wheels bundle FFmpeg with the dav1d AV1 decoder and the libsvtav1
encoder (what lerobot writes by default), so no system FFmpeg and no coupling to the torch build
(torchcodec wheels need a matching torch and a system FFmpeg). Measured with lerobot 0.4.4, whose
default backend is torchcodec: PyAV's ``rgb24`` frames equal lerobot's decoded pixels bit for bit,
for AV1 and for H.264 (tests/data/lerobot/make_fixtures.py, the committed fixtures).

A frame is found by its presentation time, as lerobot finds it: the query is the episode's
``from_timestamp`` in the file plus the frame's ``timestamp``, and the frame whose time is within
:data:`TOLERANCE_S` of it is taken, or the read fails naming the file, the episode and both times.
A frame is never taken from a neighbouring time.

Random access seeks to the key frame before the target and decodes forward; a read at most one
key-frame interval ahead continues from the decoder's position instead. Only frames asked for are converted to RGB, and a few
recent ones are kept (``VideoFile.cache_frames``). Decode time and frame counts accumulate in
:func:`decode_stats`, so a build can log them.
"""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from vlacompile.errors import EpisodeError, MissingDependencyError

TOLERANCE_S = 1e-4  # lerobot's LeRobotDataset(tolerance_s=1e-4)

# lerobot's encoder settings (lerobot.datasets.video_utils.encode_video_frames): AV1 via SVT-AV1,
# yuv420p, a key frame every 2 frames (cheap random access), crf 30, preset 12.
DEFAULT_VCODEC = "libsvtav1"
_ENCODER_OPTIONS = {
    "libsvtav1": {"g": "2", "crf": "30", "preset": "12"},
    "h264": {"g": "2", "crf": "30"},
    "libx264": {"g": "2", "crf": "30"},
    "hevc": {"g": "2", "crf": "30"},
}


def _av():
    try:
        import av
    except ImportError:
        raise MissingDependencyError(
            "reading or writing video-mode episodes needs PyAV (the `av` package)",
            source="av",
            hint="pip install av (vlacompile declares it; reinstall vlacompile into this environment)",
        ) from None
    return av


@dataclass
class DecodeStats:
    frames: int = 0  # frames returned (converted to RGB)
    decoded: int = 0  # frames the decoder produced, skipped ones included
    seeks: int = 0
    seconds: float = 0.0

    def since(self, earlier: "DecodeStats") -> "DecodeStats":
        return DecodeStats(self.frames - earlier.frames, self.decoded - earlier.decoded,
                           self.seeks - earlier.seeks, self.seconds - earlier.seconds)

    def describe(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else float("nan")
        return (f"{self.frames} video frames in {self.seconds:.1f} s ({fps:.0f} frames/s; "
                f"{self.decoded} decoded, {self.seeks} seeks)")


_STATS = DecodeStats()


def decode_stats() -> DecodeStats:
    """A snapshot of the process's video decoding so far (``.since(snapshot)`` for a stage's share)."""
    return DecodeStats(_STATS.frames, _STATS.decoded, _STATS.seeks, _STATS.seconds)


@dataclass(frozen=True)
class VideoInfo:
    """What an MP4's header says about its first video stream."""

    path: Path
    codec: str
    width: int
    height: int
    fps: float
    frames: int  # from the header; 0 when the container does not say
    start_s: float
    duration_s: float


class VideoFile:
    """One MP4 file, opened on first use and closed by :meth:`close` (or by a :class:`VideoPool`)."""

    cache_frames = 16

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._container = None
        self._stream = None
        self._frames: Iterator | None = None  # the decoder's generator, positioned after _last_s
        self._last_s: float | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # pts -> RGB frame
        # The widest key-frame interval seen: a target at most this far ahead is reached by decoding
        # forward; farther, a seek is cheaper (lerobot writes a key frame every 2 frames).
        self._gop_s = 0.0
        self._last_key_s: float | None = None

    # -- opening ---------------------------------------------------------------------------------

    def _error(self, what: str, hint: str, context: str = "") -> EpisodeError:
        return EpisodeError(what + (f" ({context})" if context else ""), source=self.path, hint=hint)

    def _open(self, context: str = ""):
        if self._container is not None:
            return
        av = _av()
        if not self.path.is_file():
            raise self._error("video file is missing", "restore the dataset's videos/ folder (or re-download it)", context)
        if self.path.stat().st_size == 0:
            raise self._error("video file is empty", "the file was truncated; restore it from the original dataset", context)
        try:
            container = av.open(str(self.path), mode="r")
        except av.error.FFmpegError as exc:
            raise self._error(f"cannot open video ({exc})", "the file is not a readable MP4 or is truncated; restore it",
                              context) from None
        fmt = container.format
        if (fmt.name or "").endswith("_pipe") or fmt.name == "image2":
            # FFmpeg opens a still image (a PNG renamed .mp4) as a one-frame "video": without this it
            # was reported as a video with fewer frames than the parquet's rows.
            container.close()
            raise self._error(f"is not a video: FFmpeg reads it as {fmt.long_name or fmt.name} (a still image)",
                              "restore the camera's MP4 from the original dataset (lerobot writes one MP4 per camera and "
                              "chunk, AV1 or H.264)", context)
        if not container.streams.video:
            container.close()
            raise self._error("the file has no video stream", "restore the camera's MP4 from the original dataset", context)
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            container.close()
            raise self._error("the video's codec has no decoder in this FFmpeg build",
                              "re-encode the videos as AV1 or H.264 (lerobot's encoders), which PyAV's wheels decode",
                              context)
        self._container, self._stream = container, stream

    def info(self, context: str = "") -> VideoInfo:
        self._open(context)
        s = self._stream
        fps = float(s.average_rate) if s.average_rate else (float(s.guessed_rate) if s.guessed_rate else 0.0)
        tb = float(s.time_base)
        start = float(s.start_time * tb) if s.start_time is not None else 0.0
        if s.duration is not None:
            duration = float(s.duration * tb)
        elif self._container.duration is not None:
            duration = self._container.duration / 1e6
        else:
            duration = float("nan")
        return VideoInfo(self.path, s.codec_context.name, int(s.codec_context.width), int(s.codec_context.height),
                         fps, int(s.frames or 0), start, duration)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._frames = None
        self._last_s = None
        self._cache.clear()

    # -- decoding --------------------------------------------------------------------------------

    def _seek(self, target_s: float, context: str) -> None:
        av = _av()
        s = self._stream
        offset = max(0, int(math.floor((target_s - TOLERANCE_S) / float(s.time_base))))
        try:
            self._container.seek(offset, stream=s, backward=True, any_frame=False)
        except av.error.FFmpegError as exc:
            raise self._error(f"cannot seek to {target_s:.4f} s ({exc})", "the file is truncated or corrupt; restore it",
                              context) from None
        self._frames = self._container.decode(s)
        self._last_s = self._last_key_s = None
        _STATS.seeks += 1

    def _next(self, context: str):
        av = _av()
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except av.error.FFmpegError as exc:
            raise self._error(f"cannot decode the video ({exc})", "the file is truncated or corrupt; restore it",
                              context) from None
        _STATS.decoded += 1
        return frame

    def _frame_at(self, target_s: float, context: str) -> np.ndarray:
        tb = float(self._stream.time_base)
        for p, img in self._cache.items():
            if abs(p * tb - target_s) < TOLERANCE_S:
                self._cache.move_to_end(p)
                return img
        ahead = self._last_s is not None and self._last_s < target_s - TOLERANCE_S <= self._last_s + self._gop_s
        if self._frames is None or not ahead:
            self._seek(target_s, context)
        retried = False
        before: float | None = None
        while True:
            frame = self._next(context)
            if frame is None:
                last = before if before is not None else self._last_s
                raise self._error(
                    f"no frame at {target_s:.4f} s: the video ends"
                    + (f" at {last:.4f} s" if last is not None else " before it"),
                    "the video has fewer frames than the episode's rows in the parquet; the file is truncated "
                    "or the dataset's metadata is wrong: restore the video or re-export the dataset", context)
            t = float(frame.pts * tb) if frame.pts is not None else float(frame.time)
            self._last_s = t
            if frame.key_frame:
                if self._last_key_s is not None and t > self._last_key_s:
                    self._gop_s = max(self._gop_s, t - self._last_key_s)
                self._last_key_s = t
            if t < target_s - TOLERANCE_S:
                before = t
                continue
            if t > target_s + TOLERANCE_S:
                if before is None and not retried:  # the seek landed past the target: decode from the start
                    retried = True
                    self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
                    self._frames = self._container.decode(self._stream)
                    _STATS.seeks += 1
                    continue
                raise self._error(
                    f"no frame within {TOLERANCE_S:g} s of {target_s:.4f} s: the nearest are "
                    + (f"{before:.4f} s and " if before is not None else "")
                    + f"{t:.4f} s",
                    "the episode's timestamps and the video's frame times disagree (a different fps, or frames "
                    "dropped while recording); re-export the dataset", context)
            img = frame.to_ndarray(format="rgb24")
            self._cache[int(frame.pts)] = img
            while len(self._cache) > self.cache_frames:
                self._cache.popitem(last=False)
            return img

    def frames_at(self, times_s: Iterable[float], *, context: str = "") -> np.ndarray:
        """uint8 [N, H, W, 3] frames at these presentation times (seconds), in the order given."""
        times = np.asarray(list(times_s), dtype=np.float64)
        self._open(context)
        t0 = time.perf_counter()
        out: np.ndarray | None = None
        for i in np.argsort(times, kind="stable"):
            img = self._frame_at(float(times[i]), context)
            if out is None:
                out = np.empty((len(times), *img.shape), dtype=np.uint8)
            out[i] = img
        _STATS.frames += len(times)
        _STATS.seconds += time.perf_counter() - t0
        if out is None:
            info = self.info(context)
            out = np.empty((0, info.height, info.width, 3), dtype=np.uint8)
        return out


class VideoPool:
    """Open :class:`VideoFile` s by path, at most ``max_open`` at a time (least recently used closed)."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._files: OrderedDict[Path, VideoFile] = OrderedDict()

    def get(self, path: Path) -> VideoFile:
        path = Path(path)
        vf = self._files.get(path)
        if vf is None:
            vf = self._files[path] = VideoFile(path)
        self._files.move_to_end(path)
        while len(self._files) > self.max_open:
            _, old = self._files.popitem(last=False)
            old.close()
        return vf

    def close(self) -> None:
        for vf in self._files.values():
            vf.close()
        self._files.clear()


class VideoWriter:
    """Frames of consecutive episodes into one MP4, one frame every 1/fps s from time 0."""

    def __init__(self, path: str | Path, fps: float, width: int, height: int, *, vcodec: str = DEFAULT_VCODEC):
        av = _av()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration to stderr otherwise
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            av.codec.Codec(vcodec, "w")
        except Exception:
            raise EpisodeError(f"this FFmpeg build has no {vcodec!r} encoder", source=vcodec,
                               hint=f"use one of {sorted(_ENCODER_OPTIONS)} (PyAV's wheels bundle libsvtav1)") from None
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream(vcodec, rate=rate, options=dict(_ENCODER_OPTIONS.get(vcodec, {})))
        self._stream.width, self._stream.height = int(width), int(height)
        self._stream.pix_fmt = "yuv420p"
        self._time_base = Fraction(1) / rate
        self.frames = 0
        self.bytes = 0  # encoded so far (the muxer buffers its writes, so the file's size lags)

    def add(self, frames: np.ndarray) -> None:
        """uint8 [T, H, W, 3] frames, appended after the ones already written."""
        av = _av()
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = self.frames, self._time_base
            for packet in self._stream.encode(frame):
                self.bytes += packet.size
                self._container.mux(packet)
            self.frames += 1

    @property
    def duration_s(self) -> float:
        return float(self.frames * self._time_base)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


class VideoConcat:
    """MP4 files of the same encoding appended into one, packets copied (no re-encoding), each
    shifted to start where the previous ended: what lerobot's concatenate_video_files does."""

    def __init__(self, path: str | Path):
        av = _av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = None
        self.duration_s = 0.0
        self.bytes = 0

    def append(self, part: str | Path, duration_s: float) -> float:
        """Append ``part`` (``duration_s`` long); returns the time at which it starts in this file."""
        av = _av()
        start = self.duration_s
        with av.open(str(part), mode="r") as src:
            s_in = src.streams.video[0]
            if self._stream is None:
                self._stream = self._container.add_stream_from_template(s_in, opaque=True)  # remux: parameters, no codec
            shift = int(round(start / float(s_in.time_base)))
            for packet in src.demux(s_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.pts = None if packet.pts is None else packet.pts + shift
                packet.dts += shift
                packet.stream = self._stream
                self.bytes += packet.size
                self._container.mux(packet)
        self.duration_s = start + duration_s
        return start

    def close(self) -> None:
        self._container.close()
