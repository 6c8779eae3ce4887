"""Finding the images (or videos) under a folder: recursive, case-insensitive, safe against link loops."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from captioner.errors import one_line
from captioner.images import is_image_path

OnError = Callable[[Path, OSError], None]


def unlisted_line(folder: Path, error: OSError) -> str:
    """The ``skipped`` line of a folder that cannot be listed: its files cannot be captioned, and the run says so."""
    return f"skipped {one_line(folder)}: cannot list this folder: {error.strerror or error}"


def walk_images(root: str | os.PathLike, on_error: OnError | None = None) -> Iterator[Path]:
    """Image files under ``root``; see :func:`walk_files`."""
    return walk_files(root, is_image_path, on_error)


def walk_videos(root: str | os.PathLike, on_error: OnError | None = None) -> Iterator[Path]:
    """Video files under ``root`` (.mp4 .avi .mov .mkv .webm .m4v, any case); see :func:`walk_files`."""
    from captioner.pipelines.video_source import is_video_path

    return walk_files(root, is_video_path, on_error)


UNFINISHED_PREFIX = ".captioner-"
"""The name a file of ours has until it is whole and renamed (a burned video copy): a killed run
can leave one behind, and a walk never takes it for a video or a photo of the user's."""


def walk_files(
    root: str | os.PathLike, wanted: Callable[[str], bool], on_error: OnError | None = None
) -> Iterator[Path]:
    """Files under ``root`` whose name ``wanted`` accepts, in a stable (sorted) order, following directory links once.

    A directory reached again through a symlink (a loop, or two links to one place) is not
    walked twice, and an unfinished file of ours (:data:`UNFINISHED_PREFIX`) is passed over.
    Dangling links with a wanted extension are yielded, so the caller reports them as
    unreadable instead of silently missing them. A folder that cannot be listed
    (no permission, a path longer than the system allows) goes to ``on_error`` so that its
    files are not missed in silence.
    """
    root = Path(root)
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError as e:
            if on_error is not None and folder != root:
                on_error(folder, e)
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            if on_error is not None:
                on_error(folder, e)
            continue
        subfolders = []
        for entry in entries:
            if _is_dir(entry):
                subfolders.append(Path(entry.path))
            elif wanted(entry.name) and not entry.name.startswith(UNFINISHED_PREFIX):
                yield Path(entry.path)
        stack.extend(reversed(subfolders))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False
