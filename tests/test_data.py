"""Manifests: the converters from Flickr, COCO and Karpathy layouts, reading them back, and the committed splits."""

import json
import os
import shutil
from pathlib import Path

import pytest

from captioner.data import (
    check_scorable,
    coco_manifest,
    flickr_manifest,
    flickr_token_captions,
    karpathy_manifest,
    read_manifest,
    write_manifest,
)
from captioner.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"
MANIFESTS = ROOT / "data_manifests"
FLICKR8K = MANIFESTS / ".." / ".." / "shared" / "data" / "flickr8k"  # where the manifests' paths point


def copy_samples(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for source, target in names.items():
        shutil.copy(SAMPLES / source, folder / target)


# --- Flickr token files -------------------------------------------------------------------

TOKENS = (
    "cat.jpg#0\tA cat lies on a rug .\n"
    "rocket.jpg#0\tA rocket stands on its pad .\n"
    "cat.jpg#1\tA tabby cat looks to the side .\n"
    "\n"
    "coffee.jpg#0\tA cup of coffee .\n"
    "rocket.jpg#1\t  A white rocket before launch .  \n"
    "cat.jpg#2\tA striped cat .\n"
)


@pytest.fixture
def flickr(tmp_path):
    images = tmp_path / "flickr" / "images"
    copy_samples(images, {"chelsea.png": "cat.jpg", "rocket.jpg": "rocket.jpg", "coffee.png": "coffee.jpg"})
    tokens = tmp_path / "flickr" / "captions.txt"
    tokens.write_text(TOKENS, encoding="utf-8")
    split = tmp_path / "flickr" / "train.txt"
    split.write_text("rocket.jpg\ncat.jpg\n\n", encoding="utf-8")
    return tokens, split, images


def test_flickr_token_captions_groups_per_image_in_file_order(flickr):
    tokens, _, _ = flickr
    assert flickr_token_captions(tokens) == {
        "cat.jpg": ["A cat lies on a rug .", "A tabby cat looks to the side .", "A striped cat ."],
        "rocket.jpg": ["A rocket stands on its pad .", "A white rocket before launch ."],
        "coffee.jpg": ["A cup of coffee ."],
    }


def test_flickr_manifest_keeps_split_images_in_split_order(flickr, tmp_path):
    tokens, split, images = flickr
    out = tmp_path / "manifests" / "train.jsonl"  # a different folder from the images
    assert flickr_manifest(tokens, split, images, out).written == 2

    entries = read_manifest(out)
    assert [e.image.name for e in entries] == ["rocket.jpg", "cat.jpg"]
    assert entries[0].captions == ("A rocket stands on its pad .", "A white rocket before launch .")
    assert entries[1].captions == ("A cat lies on a rug .", "A tabby cat looks to the side .", "A striped cat .")
    for entry in entries:
        assert entry.image.is_absolute()
        assert entry.image.is_file()
        assert entry.image.resolve() == (images / entry.image.name).resolve()
        assert entry.image.read_bytes() == (images / entry.image.name).read_bytes()


def test_manifest_paths_are_relative_so_the_tree_can_move(flickr, tmp_path):
    tokens, split, images = flickr
    out = tmp_path / "flickr" / "manifests" / "train.jsonl"
    flickr_manifest(tokens, split, images, out)
    stored = [json.loads(line)["image"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert stored == ["../images/rocket.jpg", "../images/cat.jpg"]

    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "flickr", moved)
    entries = read_manifest(moved / "manifests" / "train.jsonl")
    assert [e.image.resolve() for e in entries] == [
        (moved / "images" / "rocket.jpg").resolve(),
        (moved / "images" / "cat.jpg").resolve(),
    ]
    assert all(e.image.is_file() for e in entries)


def test_flickr_manifest_refuses_split_images_without_captions(flickr, tmp_path):
    tokens, split, images = flickr
    split.write_text("cat.jpg\nunknown.jpg\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=rf"^{split}: images without captions in {tokens}: 1, e.g. unknown.jpg$"):
        flickr_manifest(tokens, split, images, out)
    assert not out.exists()


def test_flickr_token_line_without_tab_names_file_and_line(tmp_path):
    tokens = tmp_path / "captions.txt"
    tokens.write_text("a.jpg#0\tA dog .\na.jpg#1 A dog without a tab .\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{tokens}:2: "):
        flickr_token_captions(tokens)


# --- COCO and Karpathy ----------------------------------------------------------------------


def test_coco_manifest(tmp_path):
    images = tmp_path / "coco" / "val2014"
    copy_samples(
        images, {"chelsea.png": "COCO_val2014_000000000042.jpg", "coffee.png": "COCO_val2014_000000000073.jpg"}
    )
    annotations = {
        "info": {},
        "images": [
            {"id": 73, "file_name": "COCO_val2014_000000000073.jpg", "width": 600, "height": 400},
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 451, "height": 300},
            {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "width": 10, "height": 10},  # no captions
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "caption": "A cat lying down.\n"},
            {"id": 2, "image_id": 73, "caption": " A cup of coffee on a saucer."},
            {"id": 3, "image_id": 42, "caption": "A tabby cat looking left."},
        ],
    }
    annotation_file = tmp_path / "captions_val2014.json"
    annotation_file.write_text(json.dumps(annotations), encoding="utf-8")
    out = tmp_path / "manifests" / "coco_val.jsonl"

    assert coco_manifest(annotation_file, images, out).written == 2
    entries = read_manifest(out)
    assert [e.image.name for e in entries] == ["COCO_val2014_000000000073.jpg", "COCO_val2014_000000000042.jpg"]
    assert entries[0].captions == ("A cup of coffee on a saucer.",)
    assert entries[1].captions == ("A cat lying down.", "A tabby cat looking left.")
    assert all(e.image.is_file() for e in entries)


def test_a_manifest_pointing_at_no_image_is_refused_and_nothing_is_written(flickr, tmp_path):
    tokens, split, _ = flickr
    out = tmp_path / "out.jsonl"
    message = rf"^none of the 2 images is in the images folder, e\.g\. {tmp_path}/rocket\.jpg; check --images; "
    with pytest.raises(DataError, match=message + "nothing written$"):
        flickr_manifest(tokens, split, tmp_path, out)
    assert not out.exists()


def test_karpathy_conversion_of_a_file_without_splits_says_it_is_not_one(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}), encoding="utf-8")
    with pytest.raises(DataError, match="not a Karpathy dataset file: no image has a split"):
        karpathy_manifest(coco, tmp_path, "train", tmp_path / "out.jsonl")


def test_manifest_conversion_replaces_an_earlier_manifest_and_nothing_else(flickr, tmp_path, capsys):
    from captioner.pipelines.cli import main

    tokens, split, images = flickr
    config = tmp_path / "config.json"
    config.write_text('{"epochs": 3}\n', encoding="utf-8")
    argv = ["manifest", "flickr", "--captions", str(tokens), "--split", str(split), "--images", str(images), "--out"]
    assert main([*argv, str(config)]) == 2 and config.read_text(encoding="utf-8") == '{"epochs": 3}\n'
    assert "--out " in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "m.jsonl")]) == 0 and main([*argv, str(tmp_path / "m.jsonl")]) == 0
    assert len(read_manifest(tmp_path / "m.jsonl")) == 2
    split.write_bytes(b"\xff\xfe not text\n")  # the split file is named, not the caption file
    assert main([*argv, str(tmp_path / "m2.jsonl")]) == 1
    assert f"{split}: not a split file of image names (not UTF-8 text" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.jsonl")  # as /dev/stdout can be: reading it back to check it waited for ever
    assert main([*argv, str(tmp_path / "pipe.jsonl")]) == 2
    assert "pipe.jsonl: exists and is not a regular file; give a new file name" in capsys.readouterr().err


def test_images_the_folder_lacks_are_left_out_and_named_once(flickr, tmp_path, capsys):
    from captioner.pipelines.cli import main

    tokens, split, images = flickr
    split.write_text("rocket.jpg\ncat.jpg\ncoffee.jpg\n", encoding="utf-8")
    (images / "cat.jpg").unlink()
    out = tmp_path / "m.jsonl"
    converted = flickr_manifest(tokens, split, images, out)
    assert converted.written == 2 and converted.missing == (str(images / "cat.jpg"),)
    assert [e.image.name for e in read_manifest(out)] == ["rocket.jpg", "coffee.jpg"]
    argv = ["manifest", "flickr", "--captions", str(tokens), "--split", str(split), "--images", str(images)]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: 1 image with captions is not in --images {images}, "
                            f"e.g. {images / 'cat.jpg'}; left out of the manifest\n")
    assert captured.out == f"wrote 2 images to {out}\n"


def test_an_image_the_split_names_twice_is_written_once_so_evaluate_takes_the_manifest(flickr, tmp_path, capsys):
    from captioner.pipelines.cli import main

    tokens, split, images = flickr
    split.write_text("rocket.jpg\ncat.jpg\nrocket.jpg\ncoffee.jpg\ncat.jpg\n", encoding="utf-8")
    out = tmp_path / "m.jsonl"
    converted = flickr_manifest(tokens, split, images, out)
    assert converted.written == 3 and converted.repeated == (str(images / "rocket.jpg"), str(images / "cat.jpg"))
    entries = read_manifest(out)
    assert [e.image.name for e in entries] == ["rocket.jpg", "cat.jpg", "coffee.jpg"]
    assert entries[0].captions == ("A rocket stands on its pad .", "A white rocket before launch .")  # not twice
    check_scorable(entries, out)
    argv = ["manifest", "flickr", "--captions", str(tokens), "--split", str(split), "--images", str(images)]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().err == (f"warning: 2 images are listed more than once in {split}, e.g. "
                                       f"{images / 'rocket.jpg'}; written once, with all their captions\n")


def test_a_coco_image_listed_twice_gets_the_new_captions_of_the_second_listing(tmp_path):
    """Within one listing a caption written twice stays twice: two annotators wrote it (the committed
    Flickr8k manifests hold 9 such images), and dropping one would change the training data."""
    copy_samples(tmp_path / "images", {"chelsea.png": "a.png"})
    annotations = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"},
                              {"id": 3, "file_name": "gone.png"}, {"id": 4, "file_name": "gone.png"}],
                   "annotations": [{"image_id": 1, "caption": "A cat ."}, {"image_id": 1, "caption": "A cat ."},
                                   {"image_id": 2, "caption": "A tabby ."}, {"image_id": 2, "caption": "A cat ."},
                                   {"image_id": 3, "caption": "Gone ."}, {"image_id": 4, "caption": "Gone ."}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations), encoding="utf-8")
    converted = coco_manifest(tmp_path / "captions.json", tmp_path / "images", tmp_path / "m.jsonl")
    assert converted.written == 1 and converted.missing == (str(tmp_path / "images" / "gone.png"),)
    assert converted.repeated == (str(tmp_path / "images" / "a.png"),)  # the missing one is named as missing only
    assert read_manifest(tmp_path / "m.jsonl")[0].captions == ("A cat .", "A cat .", "A tabby .")


def test_a_manifest_written_through_a_linked_folder_checks_the_images_where_they_are(flickr, tmp_path):
    tokens, split, images = flickr
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    assert flickr_manifest(tokens, split, images, tmp_path / "link" / "m.jsonl").written == 2
    assert all(e.image.is_file() for e in read_manifest(tmp_path / "real" / "deep" / "m.jsonl"))


def test_an_image_name_that_is_not_utf8_is_named_and_nothing_is_written(flickr, tmp_path):
    tokens, split, images = flickr
    odd = tmp_path / os.fsdecode(b"im g\xff")
    shutil.copytree(images, odd)
    out = tmp_path / "m.jsonl"
    with pytest.raises(DataError, match=r"rocket\.jpg: its name is not UTF-8, which a manifest \(JSON\) cannot hold"):
        flickr_manifest(tokens, split, odd, out)
    assert not out.exists()


def karpathy_image(filepath, filename, split, *raws):
    image = {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": r.split()} for r in raws]}
    if filepath is not None:
        image["filepath"] = filepath
    return image


@pytest.fixture
def karpathy(tmp_path):
    images = tmp_path / "coco"
    copy_samples(images / "val2014", {"chelsea.png": "COCO_val2014_1.jpg", "coffee.png": "COCO_val2014_2.jpg"})
    copy_samples(images / "train2014", {"rocket.jpg": "COCO_train2014_3.jpg"})
    dataset = {
        "dataset": "coco",
        "images": [
            karpathy_image("val2014", "COCO_val2014_1.jpg", "test", "A cat on a rug .", "A tabby cat ."),
            karpathy_image("train2014", "COCO_train2014_3.jpg", "train", "A rocket on a pad ."),
            karpathy_image("val2014", "COCO_val2014_2.jpg", "restval", " A cup of coffee . "),
            karpathy_image("val2014", "COCO_val2014_9.jpg", "val", "Not copied."),
        ],
    }
    dataset_file = tmp_path / "dataset_coco.json"
    dataset_file.write_text(json.dumps(dataset), encoding="utf-8")
    return dataset_file, images


def test_karpathy_manifest_keeps_filepath_subfolder(karpathy, tmp_path):
    dataset_file, images = karpathy
    out = tmp_path / "manifests" / "test.jsonl"
    assert karpathy_manifest(dataset_file, images, "test", out).written == 1
    [entry] = read_manifest(out)
    assert entry.image.resolve() == (images / "val2014" / "COCO_val2014_1.jpg").resolve()
    assert entry.image.is_file()
    assert entry.captions == ("A cat on a rug .", "A tabby cat .")


@pytest.mark.parametrize(
    "split, expected",
    [("train", ["train2014/COCO_train2014_3.jpg"]), ("restval", ["val2014/COCO_val2014_2.jpg"]), ("nope", [])],
)
def test_karpathy_manifest_selects_one_split(karpathy, tmp_path, split, expected):
    dataset_file, images = karpathy
    out = tmp_path / f"{split}.jsonl"
    if not expected:  # an unknown split: said, and no empty manifest left behind
        with pytest.raises(DataError, match="no images with captions"):
            karpathy_manifest(dataset_file, images, split, out)
        assert not out.exists()
        return
    assert karpathy_manifest(dataset_file, images, split, out).written == len(expected)
    entries = read_manifest(out)
    assert [e.image.resolve() for e in entries] == [(images / p).resolve() for p in expected]
    if split == "restval":
        assert entries[0].captions == ("A cup of coffee .",)


def test_karpathy_manifest_without_filepath(tmp_path):
    """Flickr Karpathy files have no filepath field: images sit directly in the image folder."""
    images = tmp_path / "Flickr8k_Dataset"
    copy_samples(images, {"chelsea.png": "1000.jpg"})
    dataset_file = tmp_path / "dataset_flickr8k.json"
    dataset = {"dataset": "flickr8k", "images": [karpathy_image(None, "1000.jpg", "val", "A cat .")]}
    dataset_file.write_text(json.dumps(dataset), encoding="utf-8")
    out = tmp_path / "val.jsonl"
    assert karpathy_manifest(dataset_file, images, "val", out).written == 1
    [entry] = read_manifest(out)
    assert entry.image.resolve() == (images / "1000.jpg").resolve()
    assert entry.captions == ("A cat .",)


# --- read_manifest ---------------------------------------------------------------------------


def test_read_manifest_round_trip_and_absolute_paths(tmp_path):
    absolute = SAMPLES / "rocket.jpg"
    path = tmp_path / "m.jsonl"
    write_manifest(path, [("sub/cat.png", ["Un chat tigré .", "A cat ."]), (str(absolute), [])])
    entries = read_manifest(path)
    assert entries[0].image == tmp_path.resolve() / "sub" / "cat.png"
    assert entries[0].captions == ("Un chat tigré .", "A cat .")
    assert entries[1].image == absolute
    assert entries[1].captions == ()
    # characters str.splitlines() breaks at, which JSON leaves unescaped; and a file saved with CRLF endings
    odd = [("line\u2028sep.png", ["A cat\x85 on a mat \u2029 ."]), ("b.png", ["A dog ."])]
    write_manifest(path, odd)
    assert [(e.image.name, e.captions) for e in read_manifest(path)] == [(n, tuple(c)) for n, c in odd]
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert [(e.image.name, e.captions) for e in read_manifest(path)] == [(n, tuple(c)) for n, c in odd]


def test_read_manifest_given_a_relative_path_returns_absolute_images(tmp_path, monkeypatch):
    """Entries outlive a change of working folder (data loader workers, the CLI)."""
    copy_samples(tmp_path / "data" / "images", {"chelsea.png": "cat.png"})
    write_manifest(tmp_path / "data" / "m.jsonl", [("images/cat.png", ["A cat ."])])
    monkeypatch.chdir(tmp_path)
    [entry] = read_manifest("data/m.jsonl")
    assert entry.image.is_absolute()
    monkeypatch.chdir(tmp_path / "data" / "images")
    assert entry.image.is_file()


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"image": "b.jpg", "captions": ["x"]',  # cut short
        "not json at all",
        '{"captions": ["no image"]}',
        '["b.jpg", ["x"]]',
        '"b.jpg"',
        '{"image": null, "captions": ["x"]}',
        '{"image": "b.jpg", "captions": null}',
        '{"image": "b.jpg", "captions": "a caption that is not a list"}',
        '{"image": "", "captions": ["x"]}',
        '{"image": 7, "captions": ["x"]}',
        '{"image": "b.jpg", "captions": ["x", ""]}',
        '{"image": "b.jpg", "captions": ["x", "   "]}',
        '{"image": "b.jpg", "captions": ["x", 3]}',
        '{"image": "b.jpg", "captions": [["nested"]]}',
        '{"image": "b.jpg", "captions": ["a \\udcff dog"]}',  # a lone surrogate: scoring failed on it, at the end
    ],
)
def test_read_manifest_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"image": "a.jpg", "captions": ["ok"]})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")  # blank line 2 still counts
    with pytest.raises(DataError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("bad_line", ['{"image": "b.jpg", "captions": []}', '{"image": "b.jpg"}'])
def test_read_manifest_can_require_captions_and_names_the_line(tmp_path, bad_line):
    """Training and evaluation need references: the scorer would fail on an assert, after a whole epoch."""
    path = tmp_path / "m.jsonl"
    good = json.dumps({"image": "a.jpg", "captions": ["ok"]})
    path.write_text(f"{good}\n{bad_line}\n", encoding="utf-8")
    assert [e.captions for e in read_manifest(path)] == [("ok",), ()]
    with pytest.raises(DataError, match=rf"^{path}:2: not a manifest record \(no captions"):
        read_manifest(path, require_captions=True)


def test_references_of_punctuation_alone_are_named_by_line_before_any_work(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.jpg", "captions": ["ok"]}\n{"image": "b.jpg", "captions": ["...", "!"]}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not a manifest record \(its captions hold no words"):
        read_manifest(path, require_captions=True)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_manifest_without_entries_is_refused(tmp_path, content):
    path = tmp_path / "blank.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: manifest has no entries$"):
        read_manifest(path)


def test_read_manifest_names_a_file_that_is_not_valid_utf8_printably(tmp_path):
    path = tmp_path / os.fsdecode(b"b\xe9.jsonl")
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_manifest(path)
    assert "b\\xe9.jsonl: manifest has no entries" in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogates


def test_read_manifest_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=rf"^{path}: cannot read manifest"):
        read_manifest(path)


def test_a_link_loop_in_a_manifest_is_left_to_the_image_reader_not_a_crash_of_the_duplicate_check(tmp_path):
    from captioner.data import ManifestEntry, check_scorable

    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    check_scorable([ManifestEntry(tmp_path / "a.jpg", ("x",)), ManifestEntry(tmp_path / "b.jpg", ("y",))], "m.jsonl")


def test_a_device_is_refused_as_a_manifest_before_it_is_read():
    with pytest.raises(DataError, match="^/dev/zero: not a manifest: a device, not a file$"):
        read_manifest("/dev/zero")  # never ends: reading it whole ran out of memory


def test_read_manifest_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"image": "a.jpg", "captions": ["café"]}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}: not a manifest: a manifest is UTF-8 text, one JSON object a "
                                        r"line \(byte 36 is not UTF-8\)$"):
        read_manifest(path)


# --- committed Flickr8k manifests --------------------------------------------------------------


def test_committed_flickr8k_manifests():
    if not (FLICKR8K / "images").is_dir():
        pytest.skip(f"shared Flickr8k images not present at {FLICKR8K.resolve()}")
    images = (FLICKR8K / "images").resolve()
    reference = flickr_token_captions(FLICKR8K / "captions.txt")
    seen = {}
    for split, count in [("train", 6000), ("dev", 1000)]:
        entries = read_manifest(MANIFESTS / f"flickr8k_{split}.jsonl")
        assert len(entries) == count
        names = [e.image.name for e in entries]
        assert names == (FLICKR8K / "splits" / f"{split}.txt").read_text(encoding="utf-8").split()
        for entry in entries:
            assert len(entry.captions) == 5, entry.image
            assert all(c.strip() for c in entry.captions), entry.image
            assert entry.captions == tuple(reference[entry.image.name]), entry.image
            assert entry.image.resolve().parent == images, entry.image
            assert entry.image.is_file(), entry.image
        seen[split] = set(names)
        assert len(seen[split]) == count  # no image listed twice
    assert not seen["train"] & seen["dev"]


def test_the_readmes_manifest_command_writes_the_committed_manifests_byte_for_byte(tmp_path):
    """A conversion rule that drops or adds a caption (9 train images hold one written twice) shows here."""
    if not (FLICKR8K / "images").is_dir():
        pytest.skip(f"shared Flickr8k images not present at {FLICKR8K.resolve()}")
    for split in ("train", "dev"):
        out = MANIFESTS / f".test_{split}.jsonl"  # beside the committed one: image paths are relative to it
        try:
            flickr_manifest(FLICKR8K / "captions.txt", FLICKR8K / "splits" / f"{split}.txt", FLICKR8K / "images", out)
            assert out.read_bytes() == (MANIFESTS / f"flickr8k_{split}.jsonl").read_bytes()
        finally:
            out.unlink(missing_ok=True)


def test_conversion_drops_blank_captions_and_images_left_without_any(tmp_path):
    annotations = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                   "annotations": [{"image_id": 1, "caption": "  "}, {"image_id": 2, "caption": "A dog ."},
                                   {"image_id": 2, "caption": ""}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    copy_samples(tmp_path, {"chelsea.png": "b.jpg"})
    out = tmp_path / "m.jsonl"
    assert coco_manifest(tmp_path / "captions.json", tmp_path, out).written == 1
    [entry] = read_manifest(out, require_captions=True)
    assert entry.image.name == "b.jpg" and entry.captions == ("A dog .",)


def test_what_a_conversion_leaves_out_is_counted_and_said(tmp_path, capsys):
    from captioner.pipelines.cli import main

    annotations = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                   "annotations": [{"image_id": 1, "caption": " "}, {"image_id": 2, "caption": "A dog ."},
                                   {"image_id": 7, "caption": "A cat ."}, {"image_id": 8, "caption": "A cup ."}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    copy_samples(tmp_path, {"chelsea.png": "b.jpg", "coffee.png": "a.jpg"})
    converted = coco_manifest(tmp_path / "captions.json", tmp_path, tmp_path / "m.jsonl")
    assert (converted.written, converted.captionless, converted.unlisted_captions) == (1, (str(tmp_path / "a.jpg"),), 2)
    assert main(["manifest", "coco", "--captions", str(tmp_path / "captions.json"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "m.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: 1 image is listed without a caption (or only blank ones), e.g. {tmp_path}/a.jpg; left "
                   "out of the manifest",
                   f"warning: 2 captions in {tmp_path}/captions.json name an image id its images do not list; left "
                   "out of the manifest"]
    assert main(["manifest", "coco", "--captions", str(tmp_path / "captions.json"), "--images", str(tmp_path),
                 "--split", "x.txt", "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "--split is for flickr and karpathy" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.jpg", "sub/../../outside.jpg"])
def test_an_image_name_leading_outside_the_images_folder_is_refused(tmp_path, name):
    images = tmp_path / "images"
    copy_samples(images, {"chelsea.png": "a.jpg"})
    dataset = {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A cat ."}]},
                          {"filename": name, "split": "test", "sentences": [{"raw": "A host ."}]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(DataError, match=r"dataset.json: the image .* is not under --images .*images; nothing written"):
        karpathy_manifest(tmp_path / "dataset.json", images, "test", tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_a_device_or_an_empty_caption_file_is_named_not_read_for_ever(flickr, tmp_path):
    tokens, split, images = flickr
    for convert in (lambda: flickr_manifest("/dev/zero", split, images, tmp_path / "m.jsonl"),
                    lambda: flickr_manifest(tokens, "/dev/zero", images, tmp_path / "m.jsonl"),
                    lambda: coco_manifest("/dev/urandom", images, tmp_path / "m.jsonl"),
                    lambda: karpathy_manifest("/dev/zero", images, "test", tmp_path / "m.jsonl")):
        with pytest.raises(DataError, match=r"^/dev/\w+: a device, not a file$"):
            convert()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt: no captions in it \(expected NAME#N<TAB>caption lines\)"):
        flickr_manifest(tmp_path / "empty.txt", split, images, tmp_path / "m.jsonl")


def test_a_file_name_that_is_not_text_is_named(tmp_path):
    dataset = {"images": [{"filename": "a.jpg", "filepath": None, "split": "test", "sentences": [{"raw": "A cat"}]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="filepath must be text, not None"):
        karpathy_manifest(tmp_path / "dataset.json", tmp_path, "test", tmp_path / "m.jsonl")
