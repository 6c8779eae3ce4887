"""Fit the confidence calibrator on held-in images and report how it does on held-out ones.

    .venv/bin/python tools/fit_calibrator.py --model captioner/default_model \
        --manifest data_manifests/flickr8k_dev.jsonl data_manifests/coco_mini.jsonl \
        --train data_manifests/flickr8k_train.jsonl --report docs/calibration --save

Every manifest's images are split by position: even positions fit the calibrator, odd
ones check it. Per-image CIDEr-D takes its document frequencies from the image's own
manifest, as ``captioner evaluate`` would. The report (AUROC, expected calibration error,
the selective-captioning curve, each beside the raw mean log-probability as baseline) is
printed as tables and written with a reliability diagram into ``--report``; ``--save``
writes calibration.json into the model folder.

Two ceilings are printed beside the calibrator's figures, to tell a weak calibrator from a
target no calibrator can reach: the selective curve of a perfect ranking (by each image's
CIDEr-D itself), and, with ``--held-out-reference``, what one human caption of each photo
would tell about its caption (see :func:`held_out_reference_check`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.confidence import (  # noqa: E402
    ACCEPTABLE_CIDER,
    CALIBRATION_FILE,
    SIGNALS,
    Calibrator,
    FeatureStats,
    logistic_regression,
)
from captioner.consensus import Consensus  # noqa: E402
from captioner.data import read_manifest  # noqa: E402
from captioner.errors import DataError, OptionError, printable  # noqa: E402
from captioner.evaluation import index_batches  # noqa: E402
from captioner.features import cached_features  # noqa: E402
from captioner.metrics import per_image_cider, score_captions  # noqa: E402
from captioner.model import CaptionModel  # noqa: E402
from captioner.pipelines.cli import run_command  # noqa: E402
from captioner.tags import tag_description  # noqa: E402

FALLBACK_THRESHOLDS = (0.0, 0.1, 0.2, 0.3)  # 0: no fallback
MIN_PER_CLASS = 10  # acceptable and unacceptable captions each, at least, in the fitting half
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BINS = 10


@dataclass
class Scored:
    """One manifest's images: signals of their best captions and per-image CIDEr-D."""

    name: str
    signals: torch.Tensor  # (N, len(SIGNALS))
    cider: torch.Tensor  # (N,)
    captions: list[str]
    references: list[list[str]]
    descriptions: list[str | None]  # the --fallback tags text of each image (None: no tag)

    def half(self, start: int) -> "Scored":
        """Every other image from ``start`` (0: the fitting half, 1: the checking half)."""
        return Scored(self.name, self.signals[start::2], self.cider[start::2], self.captions[start::2],
                      self.references[start::2], self.descriptions[start::2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "captioner" / "default_model"))
    parser.add_argument("--manifest", nargs="+", required=True, help="manifests with references (split in two)")
    parser.add_argument("--train", required=True, help="the model's training manifest (feature statistics)")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--report", help="folder for report.json and the reliability diagram")
    parser.add_argument("--save", action="store_true", help=f"write {CALIBRATION_FILE} into the model folder")
    parser.add_argument("--held-out-reference", action="store_true",
                        help="also rank captions by one held-out human caption of each photo: a ceiling for any signal")
    args = parser.parse_args()
    sys.exit(run_command("fit_calibrator", lambda: run(args)))


def run(args: argparse.Namespace) -> None:
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        raise OptionError(f"--report {printable(args.report)}: exists and is not a folder")
    if args.held_out_reference:
        check_two_references(args.manifest)
    model = CaptionModel.load(args.model)
    model.calibrator = None  # raw signals, whatever the folder holds
    stats, consensus = training_statistics(model, args.train, args.cache_dir)
    model.consensus = consensus  # what reranking (if the decoding asks for it) and the consensus signal read
    sets = [score_manifest(model, m, stats, args.cache_dir, name)
            for m, name in zip(args.manifest, set_names(args.manifest), strict=True)]
    fit = [s.half(0).signals for s in sets], [s.half(0).cider for s in sets]
    acceptable = torch.cat(fit[1]) >= ACCEPTABLE_CIDER
    check_fittable(int(acceptable.sum()), int((~acceptable).sum()))
    calibrator = Calibrator.fit(torch.cat(fit[0]), acceptable.double(), stats)
    print("weights (standardized signals):", dict(zip(SIGNALS, (round(w, 3) for w in calibrator.weights),
                                                      strict=True)), "bias", round(calibrator.bias, 3))
    held_out = [s.half(1) for s in sets]
    mixed = Scored("mixed", torch.cat([s.signals for s in held_out]), torch.cat([s.cider for s in held_out]),
                   [], [], [])
    report = {"acceptable": calibrator.acceptable, "fit_images": sum(len(c) for c in fit[1]),
              "check": {s.name: check(calibrator, s) for s in [*held_out, mixed]},
              "fallback": {s.name: fallback_scores(calibrator, s) for s in held_out}}
    if args.held_out_reference:
        report["held_out_reference"] = held_out_reference_check(sets, stats)
    print_report(report)
    if args.report:
        write_report(report, Path(args.report))
    if args.save:
        calibrator.save(Path(args.model) / CALIBRATION_FILE)
        consensus.save(args.model)
        print(f"saved {Path(args.model) / CALIBRATION_FILE} and the consensus files beside it")


def set_names(manifests: list[str]) -> list[str]:
    """Each manifest's name in the report: its file's stem, or its path where two stems are equal."""
    stems = [Path(m).stem for m in manifests]
    return [stem if stems.count(stem) == 1 else m for m, stem in zip(manifests, stems, strict=True)]


def check_two_references(manifests: list[str]) -> None:
    """``--held-out-reference`` judges each caption against the references it does not hold out,
    so every image needs two; refused before any captioning, not after it all.

    Raises:
        OptionError: naming the first image with fewer.
    """
    for manifest in manifests:
        for entry in read_manifest(manifest, require_captions=True):
            if sum(bool(c.strip()) for c in entry.captions) < 2:
                raise OptionError(f"--held-out-reference needs two reference captions of every image; "
                                  f"{printable(manifest)}: {printable(entry.image)} has fewer")


def check_fittable(acceptable: int, unacceptable: int) -> None:
    """Refuse a fitting half a calibrator cannot learn from, before anything is saved.

    With one class (every caption acceptable, or none) the weights go to 0 and the bias to
    an extreme: every caption would read as confidence 0 (or 1), whatever it says.
    """
    if min(acceptable, unacceptable) < MIN_PER_CLASS:
        raise DataError(f"the fitting half holds {acceptable} acceptable and {unacceptable} unacceptable captions "
                        f"(per-image CIDEr-D >= {ACCEPTABLE_CIDER}); a calibrator needs at least {MIN_PER_CLASS} of "
                        "each: give more images")


def training_statistics(model: CaptionModel, manifest: str, cache_dir: str) -> tuple[FeatureStats, Consensus]:
    """The training images' feature statistics and consensus data (pooled features, references)."""
    entries = read_manifest(manifest, require_captions=True)
    grids = cached_features(model.encoder, [e.image for e in entries], cache_dir)
    pooled = torch.cat([grids[ids].float().mean(dim=(2, 3)) for ids in index_batches(len(entries), 500)])
    return FeatureStats.of(pooled), Consensus.build(pooled, [e.captions for e in entries])


def score_manifest(model: CaptionModel, manifest: str, stats: FeatureStats, cache_dir: str, name: str) -> Scored:
    entries = read_manifest(manifest, require_captions=True)
    grids = cached_features(model.encoder, [e.image for e in entries], cache_dir)
    rows, captions, descriptions = [], [], []
    for ids in index_batches(len(entries)):
        grid = grids[ids].float()
        probs = model.encoder.classify(grid)
        best = [n_best[:1] for n_best in model.caption_grid(grid)]
        rows.extend(model.confidence_signals(grid, best, probs, stats, model.consensus))
        captions.extend(n_best[0].text for n_best in best)
        descriptions.extend(tag_description(tags) for tags in model.tags(grid))
    cider = per_image_cider({str(i): e.captions for i, e in enumerate(entries)},
                            {str(i): c for i, c in enumerate(captions)})
    return Scored(name, torch.cat(rows), torch.tensor([cider[str(i)] for i in range(len(entries))]),
                  captions, [e.captions for e in entries], descriptions)


def fallback_scores(calibrator: Calibrator, scored: Scored) -> list[dict]:
    """Corpus BLEU-4 and CIDEr-D when captions below each threshold give way to their tag description."""
    confidence = calibrator.confidence(scored.signals).tolist()
    references = {str(i): refs for i, refs in enumerate(scored.references)}
    rows = []
    for threshold in FALLBACK_THRESHOLDS:
        replaced = [c < threshold and d is not None for c, d in zip(confidence, scored.descriptions, strict=True)]
        texts = [d if r else c for c, d, r in zip(scored.captions, scored.descriptions, replaced, strict=True)]
        scores = score_captions(references, {str(i): t for i, t in enumerate(texts)}, meteor=False)
        rows.append({"min_confidence": threshold, "replaced": round(sum(replaced) / len(replaced), 4),
                     "BLEU-4": round(scores["BLEU-4"], 4), "CIDEr-D": round(scores["CIDEr-D"], 4)})
    return rows


def check(calibrator: Calibrator, scored: Scored) -> dict:
    confidence = calibrator.confidence(scored.signals)
    baseline = scored.signals[:, SIGNALS.index("mean_logprob")]
    acceptable = scored.cider >= ACCEPTABLE_CIDER
    return {
        "images": len(scored.cider),
        "acceptable_share": round(float(acceptable.double().mean()), 4),
        "auroc": round(auroc(confidence, acceptable), 4),
        "auroc_mean_logprob": round(auroc(baseline, acceptable), 4),
        "ece": round(expected_calibration_error(confidence, acceptable), 4),
        "reliability": reliability(confidence, acceptable),
        "selective": selective_curve(confidence, scored.cider),
        "selective_mean_logprob": selective_curve(baseline, scored.cider),
        "selective_perfect": selective_curve(scored.cider, scored.cider),
    }


def held_out_reference_check(sets: list[Scored], stats: FeatureStats) -> list[dict]:
    """AUROC of the signals beside that of one more human caption of each photo, per reference position.

    For reference position k, "acceptable" is judged against the image's other references;
    the calibrator is refitted to that label on the fitting halves. On the checking halves
    its confidence is ranked beside the k-th reference's own CIDEr-D for the caption (a
    human's description of the very photo, which no signal computed from the photo and the
    caption can know better), and beside a regression on both.
    """
    rows = []
    for k in range(min(len(refs) for s in sets for refs in s.references)):
        labels, human = [], []
        for s in sets:
            candidates = {str(i): c for i, c in enumerate(s.captions)}
            others = per_image_cider({str(i): refs[:k] + refs[k + 1:] for i, refs in enumerate(s.references)},
                                     candidates)
            one = per_image_cider({str(i): [refs[k]] for i, refs in enumerate(s.references)}, candidates)
            labels.append(torch.tensor([others[str(i)] >= ACCEPTABLE_CIDER for i in range(len(s.captions))]))
            human.append(torch.tensor([one[str(i)] for i in range(len(s.captions))], dtype=torch.float64))
        fit_labels = torch.cat([y[0::2] for y in labels]).double()
        calibrator = Calibrator.fit(torch.cat([s.signals[0::2] for s in sets]), fit_labels, stats)
        both = [torch.cat([s.signals, h[:, None]], dim=1) for s, h in zip(sets, human, strict=True)]
        scores = {"signals": [calibrator.confidence(s.signals[1::2]) for s in sets],
                  "human caption": [h[1::2] for h in human],
                  "both": _regression_scores(torch.cat([b[0::2] for b in both]), fit_labels, [b[1::2] for b in both])}
        checked = [y[1::2] for y in labels]
        names = [s.name for s in sets] + ["mixed"]
        rows.append({"reference": k + 1, **{
            ranking: dict(zip(names, [round(auroc(x, y), 4) for x, y in zip(parts, checked, strict=True)]
                              + [round(auroc(torch.cat(parts), torch.cat(checked)), 4)], strict=True))
            for ranking, parts in scores.items()}})
    return rows


def _regression_scores(fit: torch.Tensor, labels: torch.Tensor, checks: list[torch.Tensor]) -> list[torch.Tensor]:
    """A logistic regression's logits, fitted on ``fit`` (no signs fixed), for each of ``checks``."""
    center, scale = fit.mean(dim=0), fit.std(dim=0).clamp_min(1e-9)
    weights, bias = logistic_regression((fit - center) / scale, labels, 1.0)
    return [(x - center) / scale @ weights + bias for x in checks]


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive].double(), score[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)


def reliability(confidence: torch.Tensor, acceptable: torch.Tensor) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence, share acceptable."""
    bins = (confidence * BINS).long().clamp(max=BINS - 1)
    rows = []
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            rows.append({"bin": [b / BINS, (b + 1) / BINS], "count": int(inside.sum()),
                         "confidence": round(float(confidence[inside].mean()), 4),
                         "acceptable": round(float(acceptable[inside].double().mean()), 4)})
    return rows


def _no_nan(value):
    """``value`` with NaN (an AUROC of a set with one class) as null: NaN is not JSON."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def expected_calibration_error(confidence: torch.Tensor, acceptable: torch.Tensor) -> float:
    rows = reliability(confidence, acceptable)
    return sum(r["count"] * abs(r["confidence"] - r["acceptable"]) for r in rows) / len(confidence)


def selective_curve(score: torch.Tensor, cider: torch.Tensor) -> list[dict]:
    """Mean per-image CIDEr-D of the captions kept when keeping the highest-scored share."""
    order = score.argsort(descending=True)
    rows = []
    for share in SHARES:
        kept = cider[order[: max(1, round(share * len(order)))]]
        rows.append({"kept": share, "mean_cider": round(float(kept.mean()), 4)})
    return rows


def print_report(report: dict) -> None:
    print(f"\nacceptable = {report['acceptable']}; fitted on {report['fit_images']} images\n")
    print("| check set | images | acceptable | AUROC | AUROC (mean log-prob) | ECE | CIDEr-D kept 50% / all "
          "| same by mean log-prob | same by a perfect ranking |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in report["check"].items():
        half, everything = r["selective"][4]["mean_cider"], r["selective"][-1]["mean_cider"]
        base, perfect = r["selective_mean_logprob"][4]["mean_cider"], r["selective_perfect"][4]["mean_cider"]
        print(f"| {name} | {r['images']} | {r['acceptable_share']:.2f} | {r['auroc']:.3f} | "
              f"{r['auroc_mean_logprob']:.3f} | {r['ece']:.3f} | {half:.3f} / {everything:.3f} "
              f"({_ratio(half, everything)}) | {base:.3f} ({_ratio(base, everything)}) | "
              f"{perfect:.3f} ({_ratio(perfect, everything)}) |")
    if "held_out_reference" in report:
        print_held_out_reference(report["held_out_reference"])
    print("\n| check set | --min-confidence with --fallback tags | captions replaced | BLEU-4 | CIDEr-D |")
    print("|---|---|---|---|---|")
    for name, rows in report["fallback"].items():
        for r in rows:
            print(f"| {name} | {r['min_confidence'] or 'none'} | {r['replaced']:.0%} | {r['BLEU-4']:.4f} | "
                  f"{r['CIDEr-D']:.4f} |")


def print_held_out_reference(rows: list[dict]) -> None:
    print("\nAUROC, acceptable judged against the other references, by what ranks the captions:\n")
    print("| held-out reference | check set | the signals (calibrator refitted) | that human caption's CIDEr-D "
          "| both |")
    print("|---|---|---|---|---|")
    for row in rows:
        for name in row["signals"]:
            print(f"| {row['reference']} | {name} | {row['signals'][name]:.3f} | {row['human caption'][name]:.3f} | "
                  f"{row['both'][name]:.3f} |")
    for ranking in ("signals", "human caption", "both"):
        values = sorted(row[ranking]["mixed"] for row in rows)
        print(f"mixed, {ranking}: median {statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})")


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.2f}x" if whole else "-"


def write_report(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(_no_nan(report), indent=1, allow_nan=False), encoding="utf-8")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for index, (name, r) in enumerate(report["check"].items()):
        color, rows = f"C{index}", r["reliability"]
        left.plot([x["confidence"] for x in rows], [x["acceptable"] for x in rows], marker="o", color=color,
                  label=f"{name} (ECE {r['ece']:.3f})")
        for curve, style, label in (("selective", "-", "confidence"), ("selective_mean_logprob", ":", "mean log-prob"),
                                    ("selective_perfect", "--", "perfect ranking")):
            right.plot([x["kept"] for x in r[curve]], [x["mean_cider"] for x in r[curve]], color=color,
                       linestyle=style, marker="o" if curve == "selective" else None, label=f"{name}: {label}")
    left.set(xlabel="confidence (bin mean)", ylabel=f"share acceptable ({report['acceptable']})",
             title="Reliability, held-out images", xlim=(0, 1), ylim=(0, 1))
    right.set(xlabel="share of captions kept (most confident first)", ylabel="mean per-image CIDEr-D",
              title="Selective captioning")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "reliability.png", dpi=100)
    plt.close(figure)
    print(f"wrote {folder / 'report.json'} and {folder / 'reliability.png'}")


if __name__ == "__main__":
    main()
