"""safetensors files read and written by any name.

safetensors takes a path only as UTF-8 text, so reads go through
:class:`captioner.utf8_names.Utf8Name` and writes to other names through Python: a model
trained into, or copied to, a folder whose name is in another encoding works like any other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from captioner.errors import is_utf8
from captioner.outputs import new_file_mode
from captioner.utf8_names import Utf8Name


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` (raises OSError or SafetensorError as it does)."""
    with Utf8Name(path) as name:
        return load_file(name)


@contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator:
    """``safetensors.safe_open(path, framework="pt")``: names, shapes and dtypes before any data is read."""
    with Utf8Name(path) as name, safe_open(name, framework="pt") as file:
        yield file


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file``, with the file readable as any written file is.

    safetensors creates its files private (0600): a model trained on a shared machine could
    not be loaded by anyone else. It also replaces a link it is given instead of writing
    through it, so a name that is not UTF-8 gets the file's bytes written by Python (held in
    memory once; only such names pay that).
    """
    if is_utf8(os.fspath(path)):
        save_file(tensors, path)
    else:
        with open(path, "wb") as file:
            file.write(save(tensors))
    os.chmod(path, new_file_mode())
