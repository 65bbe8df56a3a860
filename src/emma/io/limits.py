"""Input bounds: every reader checks them before it decodes anything large."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emma.errors import ImageTooLargeError


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a reader accepts.

    Defaults fit a large CT series or a full-field mammogram and stop decompression bombs.
    """

    max_file_bytes: int = 2 * 1024**3  # one file on disk
    max_pixels: int = 64 * 1024 * 1024  # rows * columns of one frame (e.g. 8192 x 8192)
    max_frames: int = 4096  # frames in one multi-frame object
    max_slices: int = 4096  # files in one series
    max_total_voxels: int = 1024 * 1024 * 1024  # rows * columns * frames (or slices) in one object

    def check_file(self, path: str | os.PathLike[str]) -> None:
        size = Path(path).stat().st_size
        if size > self.max_file_bytes:
            raise ImageTooLargeError(f"{path}: file is {size} bytes, over the limit of {self.max_file_bytes}")

    def check_image(self, rows: int, columns: int, frames: int = 1, what: str = "image") -> None:
        if rows <= 0 or columns <= 0:
            raise ImageTooLargeError(f"{what}: invalid size {rows}x{columns}")
        if rows * columns > self.max_pixels:
            raise ImageTooLargeError(
                f"{what}: {columns}x{rows} pixels per frame, over the limit of {self.max_pixels}"
            )
        if frames > self.max_frames:
            raise ImageTooLargeError(f"{what}: {frames} frames, over the limit of {self.max_frames}")
        if rows * columns * frames > self.max_total_voxels:
            raise ImageTooLargeError(
                f"{what}: {rows * columns * frames} voxels, over the limit of {self.max_total_voxels}"
            )

    def check_slices(self, n: int, what: str = "series") -> None:
        if n > self.max_slices:
            raise ImageTooLargeError(f"{what}: {n} files, over the limit of {self.max_slices}")


DEFAULT_LIMITS = Limits()
