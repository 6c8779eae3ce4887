"""Grid-search beam size and length penalty on a dev manifest; optionally save the best.

    .venv/bin/python tools/tune_decoding.py --model runs/flickr8k/best \
        --manifest data_manifests/flickr8k_dev.jsonl --beams 1 3 5 --alphas 0 0.5 1 --save

Encoder grids come from the feature cache, so each setting costs only the search.
Selection is by CIDEr-D, ties broken by BLEU-4. ``--save`` writes the winner into the
model folder's config.json as its default decoding options.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner import concepts  # noqa: E402
from captioner.data import read_manifest  # noqa: E402
from captioner.decoding import DecodingOptions  # noqa: E402
from captioner.evaluation import evaluate_grids, grid_batches  # noqa: E402
from captioner.features import cached_features  # noqa: E402
from captioner.model import CONFIG_FILE, CaptionModel  # noqa: E402
from captioner.options import declared_decoding  # noqa: E402
from captioner.outputs import write_atomically  # noqa: E402
from captioner.pipelines.cli import run_command  # noqa: E402
from captioner.quantize import int8_decoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--no-repeat", type=int, nargs="+", default=[0])
    parser.add_argument("--boosts", type=float, nargs="+", default=[0.0], help="concept_boost values")
    parser.add_argument("--consensus-weights", type=float, nargs="+", default=[0.0],
                        help="consensus_weight values (reranking the beam by agreement with the nearest training "
                             "photos' captions; needs a model with consensus data)")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--int8", action="store_true", help="score with the decoder's weights quantized to int8")
    parser.add_argument("--head-nouns-only", action="store_true",
                        help="concept boost from class labels' head nouns alone, without the grounding map")
    parser.add_argument("--save", action="store_true", help="write the best options into the model's config.json")
    args = parser.parse_args()
    sys.exit(run_command("tune_decoding", lambda: tune(args)))


def grid(args: argparse.Namespace, decoding: DecodingOptions) -> list[DecodingOptions]:
    """Every setting to score, each checked as the CLI checks options: a bad value is refused before any work."""
    return [dataclasses.replace(decoding, method="beam" if beam > 1 else "greedy", beam_size=beam,
                                length_penalty=alpha, no_repeat_ngram=ngram, n_best=1, concept_boost=boost,
                                consensus_weight=weight)
            for beam, alpha, ngram, boost, weight in itertools.product(args.beams, args.alphas, args.no_repeat,
                                                                       args.boosts, args.consensus_weights)]


def tune(args: argparse.Namespace) -> None:
    declared = declared_decoding(args.model)
    if declared is not None:
        grid(args, declared)  # before the model and its features load
    model = CaptionModel.load(args.model)
    settings = grid(args, model.config.decoding)
    for options in settings:
        model.check_decoding(options)
    if args.int8:
        model.decoder = int8_decoder(model.decoder)
    if args.head_nouns_only:
        concepts.grounded_words = dict  # every label falls back to its head noun, as before the map
    entries = read_manifest(args.manifest, require_captions=True)
    grids = cached_features(model.encoder, [e.image for e in entries], args.cache_dir)
    references = [e.captions for e in entries]
    results = []
    print("| beam | length penalty | no-repeat n-gram | concept boost | consensus weight | BLEU-1 | BLEU-4 | "
          "ROUGE-L | CIDEr-D | words |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for options in settings:
        batches = grid_batches(lambda ids: grids[ids].float(), len(entries))
        scores, texts = evaluate_grids(model, batches, references, options)
        words = sum(len(t.split()) for t in texts) / len(texts)
        results.append((scores["CIDEr-D"], scores["BLEU-4"], options))
        print(f"| {options.beam_size} | {options.length_penalty} | {options.no_repeat_ngram} | "
              f"{options.concept_boost} | {options.consensus_weight} | {scores['BLEU-1']:.4f} | "
              f"{scores['BLEU-4']:.4f} | {scores['ROUGE-L']:.4f} | {scores['CIDEr-D']:.4f} | {words:.1f} |", flush=True)
    cider, bleu4, best = max(results, key=lambda r: (r[0], r[1]))
    print(f"\nbest: beam {best.beam_size}, length penalty {best.length_penalty}, no-repeat {best.no_repeat_ngram}, "
          f"concept boost {best.concept_boost}, consensus weight {best.consensus_weight}: CIDEr-D {cider:.4f}, "
          f"BLEU-4 {bleu4:.4f}")
    if args.save:
        config = dataclasses.replace(model.config, decoding=best)
        write_atomically(Path(args.model) / CONFIG_FILE, lambda f: f.write(config.to_json()))
        print(f"saved into {args.model}/{CONFIG_FILE}")


if __name__ == "__main__":
    main()
