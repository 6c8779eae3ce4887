"""Sequence-level distillation data: a training manifest whose images also carry a teacher's captions.

    .venv/bin/python tools/distill_captions.py --teacher runs/ensemble \
        --manifest data_manifests/flickr8k_train.jsonl --copies 2 \
        --out data_manifests/flickr8k_train_distill.jsonl

A student trained on the teacher's beam-search captions as well as the references learns
the mode the teacher's search finds, which is how one decoder keeps most of an ensemble's
gain (Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016). The teacher's
captions are appended to each image's references ``--copies`` times (their weight in the
cross-entropy); nothing else changes, so ``captioner train`` needs no new option.
With ``--teacher-only`` the references are left out: a decoder already trained on them
(``init_from``, e.g. one member of the teacher ensemble) is then fine-tuned on the
teacher's captions alone, which costs a fifth of an epoch on the references. Encoder
grids come from the feature cache that training uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.data import check_new_manifest, read_manifest, relative_image_path, write_manifest  # noqa: E402
from captioner.evaluation import grid_batches  # noqa: E402
from captioner.features import cached_features  # noqa: E402
from captioner.model import CaptionModel  # noqa: E402
from captioner.pipelines.cli import run_command  # noqa: E402
from captioner.pipelines.flags import bounded_int  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="model folder whose beam captions are the extra targets")
    parser.add_argument("--manifest", required=True, help="training manifest (images and reference captions)")
    parser.add_argument("--out", required=True, help="manifest to write: references plus teacher captions")
    parser.add_argument("--copies", type=bounded_int(1, 100), default=1, help="times each teacher caption is added")
    parser.add_argument("--teacher-only", action="store_true",
                        help="drop the references: the teacher's captions alone (to fine-tune a trained student)")
    parser.add_argument("--cache-dir", default="cache")
    args = parser.parse_args()
    sys.exit(run_command("distill_captions", lambda: distill(args)))


def distill(args: argparse.Namespace) -> None:
    check_new_manifest(args.out, inputs=(args.manifest,))
    teacher = CaptionModel.load(args.teacher)
    entries = read_manifest(args.manifest, require_captions=True)
    grids = cached_features(teacher.encoder, [e.image for e in entries], args.cache_dir)
    captions = [n_best[0].text for batch in grid_batches(lambda ids: grids[ids].float(), len(entries))
                for n_best in teacher.caption_grid(batch)]
    out = Path(args.out)
    references = [() if args.teacher_only else e.captions for e in entries]
    records = [(relative_image_path(e.image, out), [*refs, *[caption] * args.copies])
               for e, refs, caption in zip(entries, references, captions, strict=True)]
    write_manifest(out, records)
    words = sum(len(c.split()) for c in captions) / len(captions)
    print(f"wrote {len(records)} images with {args.copies} teacher caption(s) each (mean {words:.1f} words) to {out}")


if __name__ == "__main__":
    main()
