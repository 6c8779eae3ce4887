"""Progress bars on a terminal only."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr when it is a terminal; a silent one otherwise.

    In a log file or a pipe the bar's carriage-return frames pile up into one unreadable
    line, many kilobytes long on a long job; the lines printed beside the bar (skipped
    files, epoch scores, the closing summary) say what a log needs.
    """
    return tqdm(iterable, disable=not show or not sys.stderr.isatty(), file=sys.stderr, **kwargs)
