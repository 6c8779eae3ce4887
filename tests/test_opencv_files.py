"""Handing files to OpenCV: absolute names, and links for names it cannot take."""

import os

from captioner.pipelines.opencv_files import OpenCVName


def test_opencv_names_are_absolute_and_links_are_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = OpenCVName("pipe:0.mp4")  # relative, FFmpeg would read standard input
    assert plain.name == str(tmp_path / "pipe:0.mp4")
    odd = tmp_path / os.fsdecode(b"\xff.mkv")
    odd.write_bytes(b"x")
    alias = OpenCVName(odd)
    assert alias.name.endswith("link.mkv") and alias.name.isascii() and os.path.samefile(alias.name, odd)
    alias.close()
    assert not os.path.lexists(alias.name) and odd.exists()
