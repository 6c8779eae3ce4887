"""Folder walking: recursion, extensions, link loops and dangling links."""

import os

from captioner.pipelines.sources import walk_images


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_walks_recursively_with_case_insensitive_extensions_in_stable_order(tmp_path):
    touch(tmp_path / "b.JPG")
    touch(tmp_path / "a.png")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "deeper" / "c.JpEg")
    touch(tmp_path / "sub" / "d.webp")
    found = [p.relative_to(tmp_path).as_posix() for p in walk_images(tmp_path)]
    assert found == ["a.png", "b.JPG", "sub/d.webp", "sub/deeper/c.JpEg"]


def test_symlink_loops_are_walked_once(tmp_path):
    touch(tmp_path / "sub" / "a.jpg")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # points back at the root
    os.symlink(tmp_path / "sub", tmp_path / "again")  # a second way into sub
    found = list(walk_images(tmp_path))
    assert [p.name for p in found] == ["a.jpg"]


def test_dangling_image_links_are_reported_not_hidden(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "gone_dir", tmp_path / "dangling_dir")
    assert [p.name for p in walk_images(tmp_path)] == ["dangling.jpg"]


def test_names_that_are_not_utf8_are_walked_with_the_files_after_them(tmp_path):
    touch(tmp_path / "a.png")
    odd = touch(tmp_path / os.fsdecode(b"b_\xe9.png"))
    touch(tmp_path / os.fsdecode(b"sub_\xff") / "c.jpg")  # a folder whose name is not UTF-8 either
    touch(tmp_path / "z.jpg")
    found = list(walk_images(tmp_path))
    assert [os.fsencode(p.relative_to(tmp_path)) for p in found] == [b"a.png", b"b_\xe9.png", b"z.jpg",
                                                                     b"sub_\xff/c.jpg"]
    assert found[1] == odd and found[1].read_bytes() == b"x"  # the exact bytes, so the file can be opened
