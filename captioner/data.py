"""Caption manifests: the one data format used for training, evaluation and tests.

A manifest is JSONL, one image per line: ``{"image": "path.jpg", "captions": ["...", ...]}``.
A relative ``image`` path resolves against the manifest file's own folder, so a manifest
and its images can move together. Converters turn the common dataset layouts into it.
"""

from __future__ import annotations

import json
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from captioner.errors import DataError, OptionError, is_utf8, printable, shortened
from captioner.outputs import file_identity, same_file, write_atomically


@dataclass(frozen=True)
class ManifestEntry:
    """One image and its reference captions."""

    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # reference captions, as written by annotators


def read_manifest(path: str | os.PathLike, *, require_captions: bool = False) -> list[ManifestEntry]:
    """Read a JSONL manifest, resolving relative image paths against its folder.

    Every line is checked when read, so a bad one stops a run before any work (a line
    without captions would otherwise fail in the scorer, after a whole training epoch).

    Args:
        require_captions: every entry must have at least one caption (training, evaluation).
    Raises:
        DataError: ``FILE:LINE: reason`` for a malformed line; ``FILE: reason`` for an
            unreadable file or one without entries.
    """
    path = Path(path)
    try:
        base = path.resolve().parent
        if is_device(path):
            raise DataError(f"{printable(path)}: not a manifest: a device, not a file")
        # a byte-order mark (Notepad) is not a record; lines end at "\n" (read_text turns "\r\n" into it) alone, as
        # str.splitlines() would also break a caption at U+2028 or U+0085, which write_manifest leaves unescaped
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{printable(path)}: not a manifest: a manifest is UTF-8 text, one JSON object a line "
                        f"(byte {e.start} is not UTF-8)") from e
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise DataError(f"{printable(path)}: cannot read manifest: {getattr(e, 'strerror', None) or e}") from e
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            image, captions = _parse_record(line, require_captions)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{printable(path)}:{number}: not a manifest record ({e})") from e
        entries.append(ManifestEntry(image if image.is_absolute() else base / image, captions))
    if not entries:
        raise DataError(f"{printable(path)}: manifest has no entries")
    return entries


def _parse_record(line: str, require_captions: bool) -> tuple[Path, tuple[str, ...]]:
    """One manifest line -> (image path as written, captions); ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, not {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip() or "\0" in image:
        raise ValueError(f"image must be a non-empty file name, not {image!r}")
    captions = record.get("captions", [])
    if not isinstance(captions, list):  # a bare string would be split into one-letter captions
        raise ValueError(f"captions must be a list, not {type(captions).__name__}")
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"every caption must be non-empty text, not {caption!r}")
        if not is_utf8(caption):
            # JSON's "\udcff" escape reads as a lone surrogate: no text, and the scorer's tokenizer fails on it
            # at the very end of an evaluation, after every image was captioned
            raise ValueError(f"caption {caption!r} holds a lone surrogate (a \\udXXX escape), which is not text")
    if require_captions and not captions:
        raise ValueError("no captions; training and scoring need reference captions")
    if require_captions and not any(ch.isalnum() for caption in captions for ch in caption):
        raise ValueError("its captions hold no words, only punctuation; scoring needs words to compare")
    return Path(image), tuple(captions)


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as a manifest (whole): the one kind of file a conversion may replace."""
    try:
        read_manifest(path)
    except DataError:
        return False
    return True


def check_new_manifest(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse, before any work, a manifest to write that would replace an input or a file that is not a manifest.

    An earlier manifest is replaced, nothing else: a conversion or a tool given its own input
    as ``--out`` would lose the references for good.

    Raises:
        OptionError: naming ``--out`` and why.
    """
    for source in inputs:
        if source and same_file(out, source):
            raise OptionError(f"--out {printable(out)} is an input of this run; write the manifest elsewhere")
    if os.path.exists(out):
        if not os.path.isfile(out):  # /dev/stdout: reading it back to check would wait for ever
            raise OptionError(f"--out {printable(out)}: exists and is not a regular file; give a new file name")
        if not is_manifest(out):
            raise OptionError(f"--out {printable(out)}: exists and is not a manifest; give a new file name")


def is_device(path: Path) -> bool:
    """``path`` is a character or block device, which a file we read whole must not be.

    /dev/zero never ends: reading it whole ran out of memory. A pipe, as from ``<(...)``, still reads.

    Raises:
        OSError: ``path`` cannot be looked at.
    """
    mode = path.stat().st_mode
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def check_scorable(entries: list[ManifestEntry], manifest: str | os.PathLike) -> None:
    """Refuse a manifest whose CIDEr-D would not mean anything: one image, or an image listed twice.

    CIDEr-D weighs each word by how few of the evaluated images' references use it, so with
    one image every weight is 0 (a perfect caption scores 0.0), and a repeated line counts
    its words twice: the first 3 dev lines score 0.4796, the same lines twice 0.3643.

    Raises:
        DataError: naming the manifest, and the repeated image.
    """
    seen: set[tuple[int, int] | str] = set()
    for entry in entries:
        image = file_identity(entry.image) or os.path.realpath(entry.image)  # a link to x.jpg, or a/../x.jpg, is x.jpg
        if image in seen:
            raise DataError(f"{printable(manifest)}: {printable(entry.image)} is listed more than once; CIDEr-D "
                            "weighs words by how many of the images use them, so a repeated line changes every "
                            "score")
        seen.add(image)
    if len(seen) < 2:
        raise DataError(f"{printable(manifest)}: 1 image; CIDEr-D weighs words by how many of the images use them, "
                        "so it needs at least 2 (with 1 it is 0 whatever the caption)")


def write_manifest(path: str | os.PathLike, records: list[tuple[str, list[str]]]) -> None:
    """Write ``(image, captions)`` pairs as JSONL, whole or not at all; image paths are written as given.

    Raises:
        OutputError: the file cannot be written (the message names it).
    """

    def write(file) -> None:
        for image, captions in records:
            file.write(json.dumps({"image": image, "captions": list(captions)}, ensure_ascii=False) + "\n")

    write_atomically(path, write)


def relative_image_path(image: Path, manifest: Path) -> str:
    """Path of ``image`` relative to the manifest's folder (absolute if on another drive)."""
    try:
        return os.path.relpath(image.resolve(), manifest.resolve().parent)
    except ValueError:
        return str(image.resolve())


def _source_text(path: str | os.PathLike, what: str) -> str:
    """A conversion's input file, whole; a device (``/dev/zero`` never ends) is refused before reading.

    Raises:
        DataError: ``path`` is a device, or not UTF-8 text.
        OSError: it cannot be read.
    """
    if is_device(Path(path)):
        raise DataError(f"{printable(path)}: a device, not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{printable(path)}: not {what} (not UTF-8 text: byte {e.start})") from e


def flickr_token_captions(token_file: str | os.PathLike) -> dict[str, list[str]]:
    """Parse a Flickr8k/30k token file (``NAME.jpg#N<TAB>caption``) into name -> captions."""
    captions: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(_source_text(token_file, "a Flickr token file").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep:
            raise DataError(f"{token_file}:{number}: expected NAME#N<TAB>caption")
        captions[key.rsplit("#", 1)[0]].append(caption.strip())
    if not captions:
        raise DataError(f"{printable(token_file)}: no captions in it (expected NAME#N<TAB>caption lines)")
    return dict(captions)


def flickr_manifest(
    token_file: str | os.PathLike, split_file: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike
) -> Converted:
    """Write a manifest for the images named in ``split_file`` (see :func:`_write_converted`)."""
    captions = flickr_token_captions(token_file)
    names = [n.strip() for n in _source_text(split_file, "a split file of image names").splitlines() if n.strip()]
    missing = [n for n in names if n not in captions]
    if missing:
        raise DataError(f"{printable(split_file)}: images without captions in {printable(token_file)}: "
                        f"{len(missing)}, e.g. {printable(missing[0])}")
    records = [(Path(image_dir) / n, captions[n]) for n in names]
    return _write_converted(Path(out), records, split_file, Path(image_dir))


def coco_manifest(
    annotation_file: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike
) -> Converted:
    """Write a manifest from a COCO ``captions_*.json`` file (see :func:`_write_converted`)."""
    data = json.loads(_source_text(annotation_file, "a COCO captions file"))
    by_id: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        by_id[ann["image_id"]].append(_text(ann, "caption").strip())
    listed = {img["id"] for img in data["images"]}
    records = [(Path(image_dir) / _text(img, "file_name"), by_id[img["id"]]) for img in data["images"]]
    unlisted = sum(len(captions) for image_id, captions in by_id.items() if image_id not in listed)
    return replace(_write_converted(Path(out), records, annotation_file, Path(image_dir)), unlisted_captions=unlisted)


def karpathy_manifest(
    dataset_file: str | os.PathLike, image_dir: str | os.PathLike, split: str, out: str | os.PathLike
) -> Converted:
    """Write a manifest for one split of a Karpathy ``dataset_*.json``.

    ``split`` is ``train``, ``val``, ``test`` or ``restval``; COCO entries keep their
    ``filepath`` sub-folder (see :func:`_write_converted`).
    """
    data = json.loads(_source_text(dataset_file, "a Karpathy dataset file"))
    if not any("split" in img for img in data["images"]):
        raise DataError(f"{printable(dataset_file)}: not a Karpathy dataset file: no image has a split")
    records = [(Path(image_dir) / _text(img, "filepath", "") / _text(img, "filename"),
                [_text(sentence, "raw").strip() for sentence in img["sentences"]])
               for img in data["images"] if img.get("split") == split]
    return _write_converted(Path(out), records, dataset_file, Path(image_dir))


def _text(record: dict, key: str, default: str | None = None) -> str:
    """``record[key]``, which must be text (a JSON null or number in a file name would become a path)."""
    value = record[key] if default is None else record.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text, not {shortened(repr(value), 40)}")
    return value


@dataclass(frozen=True)
class Converted:
    """What a caption-file conversion wrote."""

    written: int  # images with captions found in the images folder: the manifest's lines
    missing: tuple[str, ...]  # images with captions not found there, left out, as found under the images folder
    repeated: tuple[str, ...] = ()  # images the source lists more than once, written once with all their captions
    captionless: tuple[str, ...] = ()  # images the source lists with no caption (or only blank ones), left out
    unlisted_captions: int = 0  # captions naming an image the source does not list (COCO), left out


def _write_converted(out: Path, records: list[tuple[Path, list[str]]], source: str | os.PathLike,
                     images: Path) -> Converted:
    """Write the images that have captions (blank ones dropped) and are in the images folder.

    ``records`` hold each image's path under the images folder; the manifest holds it
    relative to its own folder. An image the folder lacks is left out, not written:
    training refuses a manifest naming a photo that is not there, and an evaluation would
    skip it. The caller says how many.

    Raises:
        DataError: no image of ``source`` has a caption (for this split), none of them is
            in the images folder, a name leads outside it (``/etc/x``, ``../x``), or a found
            image's name is not UTF-8: nothing is written.
    """
    inside = os.path.abspath(images)
    for image, _ in records:
        if os.path.commonpath([inside, os.path.abspath(image)]) != inside:
            raise DataError(f"{printable(source)}: the image {printable(image)} is not under --images "
                            f"{printable(images)}; nothing written")
    kept, repeated, captionless = _once_each(records)
    if not kept:
        raise DataError(f"{printable(source)}: no images with captions (for this split); nothing written")
    written: list[tuple[str, list[str]]] = []
    found: set[Path] = set()  # the images written
    missing: dict[str, None] = {}  # in order, each image once
    for image, captions in kept:
        if not image.is_file():
            missing[str(image)] = None
            continue
        stored = relative_image_path(image, out)
        if not is_utf8(stored):
            raise DataError(f"{printable(image)}: its name is not UTF-8, which a manifest (JSON) cannot hold; "
                            "rename it; nothing written")
        written.append((stored, captions))
        found.add(image)
    if not written:
        raise DataError(f"none of the {len(kept)} images is in the images folder, e.g. {printable(kept[0][0])}; "
                        "check --images; nothing written")
    write_manifest(out, written)
    return Converted(len(written), tuple(missing), tuple(str(image) for image in repeated if image in found),
                     tuple(str(image) for image in captionless))


def _once_each(
    records: list[tuple[Path, list[str]]]
) -> tuple[list[tuple[Path, list[str]]], tuple[Path, ...], tuple[Path, ...]]:
    """Each image once, at its first place, with its non-blank captions; the images listed more than once;
    and those left with no caption.

    A later listing adds only the captions the image does not have yet: a Flickr split that
    names an image twice repeats the same captions, a COCO file may give each listing its own.
    Within one listing a caption written twice stays twice (two annotators wrote it; the
    committed Flickr8k manifests keep 9 such). ``evaluate`` refuses a manifest naming an
    image twice (it changes every CIDEr-D weight), and training would see its captions twice.
    """
    merged: dict[Path, list[str]] = {}
    repeated: dict[Path, None] = {}
    for image, captions in records:
        captions = [c for c in captions if c.strip()]
        if image in merged:
            repeated[image] = None
            merged[image] += [c for c in dict.fromkeys(captions) if c not in merged[image]]
        else:
            merged[image] = captions
    return ([(image, captions) for image, captions in merged.items() if captions], tuple(repeated),
            tuple(image for image, captions in merged.items() if not captions))
