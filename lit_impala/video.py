"""Frames -> an H.264 mp4, written atomically (imageio with the ffmpeg binary its wheel ships)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: a video gets the permissions of any file the user creates (mkstemp's are 0600)
MIN_SIDE = 160  # pixels: a smaller frame (MinAtar's 10x10 grid) is enlarged by a whole factor, each cell a block


def _even_rgb(frames: np.ndarray) -> np.ndarray:
    """``[L, H, W]`` or ``[L, H, W, C]`` (C = 1, 3 or 4) -> uint8 RGB ``[L, H', W', 3]`` with H', W'
    rounded up to even by repeating the last row / column (H.264 in yuv420p needs even sizes)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or len(frames) == 0:
        raise ValueError(f"frames must be [L, H, W, C] with L >= 1 and C in (1, 3, 4), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif frames.shape[-1] == 4:
        frames = frames[..., :3]  # drop alpha
    _, height, width, _ = frames.shape
    if min(height, width) < MIN_SIDE:  # nearest-neighbour: a cell stays a sharp square, not a blur
        factor = -(-MIN_SIDE // min(height, width))
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
        height, width = height * factor, width * factor
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int = 30) -> Path:
    """Write ``frames`` uint8 ``[L, H, W, 3]`` as an H.264 mp4 at ``path``; returns ``path``.

    Atomic: encoded under a temporary name in the same directory, then renamed, so a reader (or
    W&B) never sees half a file. Parent directories are created. Odd sizes are padded to even; frames with a side
    under ``MIN_SIDE`` pixels are enlarged by a whole factor (nearest neighbour).
    """
    import imageio.v2 as imageio  # imported here: only evaluation needs it (and its ffmpeg binary)

    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = _even_rgb(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg picks the container from the extension, so the temporary name ends in .mp4 too.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.fchmod(handle, 0o666 & ~_UMASK)
    os.close(handle)
    try:
        # macro_block_size=1: keep the frame size (imageio would otherwise resize to multiples of 16).
        with imageio.get_writer(temporary, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
