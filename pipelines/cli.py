"""The ``captioner`` command: one subcommand per use case, tested in-process via ``main(argv)``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError

# Exit codes: 0 all good, 1 some input failed, 2 bad arguments (argparse's own convention).
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (defaults come from the model)")
    group.add_argument("--method", choices=("beam", "greedy", "sample"))
    group.add_argument("--beam-size", type=int)
    group.add_argument("--max-length", type=int)
    group.add_argument("--min-length", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--no-repeat-ngram", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--seed", type=int)
    parser.add_argument("--model", help="model folder (default: the model shipped with the package)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")


def decoding_options(args: argparse.Namespace, defaults: DecodingOptions) -> DecodingOptions:
    """The model's decoding defaults with any flags the user gave."""
    fields = ("method", "beam_size", "max_length", "min_length", "length_penalty", "no_repeat_ngram",
              "temperature", "top_k", "top_p", "seed")
    changes = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return dataclasses.replace(defaults, **changes)


def _load(args: argparse.Namespace):
    from captioner.api import load_model

    model = load_model(args.model, device=args.device)
    return model, decoding_options(args, model.config.decoding)


def cmd_caption(args: argparse.Namespace) -> int:
    from captioner.pipelines.folder import result_record

    from captioner.api import caption_paths

    model, options = _load(args)
    failed = False
    for result in caption_paths(model, [Path(p) for p in args.images], options=options, batch_size=args.batch_size):
        if result.captions is None:
            print(f"skipped {result.error}", file=sys.stderr)
            failed = True
            continue
        best = result.captions[0]
        if args.json:
            print(json.dumps(result_record(result), ensure_ascii=False), flush=True)
        else:
            print(f"{result.path}\t{best.text}", flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def cmd_batch(args: argparse.Namespace) -> int:
    from captioner.pipelines.folder import caption_folder
    from captioner.pipelines.report import write_contact_sheet

    if not Path(args.folder).is_dir():
        print(f"captioner batch: {args.folder}: not a folder", file=sys.stderr)
        return EXIT_USAGE
    model, options = _load(args)
    if args.compile:
        model.compile_encoder()
    summary = caption_folder(args.folder, args.output, model=model, options=options, record_format=args.format,
                             batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    if args.html:
        write_contact_sheet(args.output, args.html)
    print(f"{summary.captioned} captioned, {summary.failed} failed, {summary.already_done} already done",
          file=sys.stderr)
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.api import evaluate

    model, options = _load(args)
    scores = evaluate(model, args.manifest, options=options, meteor=not args.no_meteor, batch_size=args.batch_size)
    for name, value in scores.items():
        print(f"{name:8s} {value:.4f}")
    if args.json:
        print(json.dumps(scores))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.train import TrainConfig, train

    overrides = {"train_manifest": args.train, "dev_manifest": args.dev, "out_dir": args.out, "epochs": args.epochs,
                 "encoder": args.encoder, "attention": args.attention, "finetune_encoder": args.finetune_encoder,
                 "batch_size": args.batch_size, "lr": args.lr, "device": args.device, "seed": args.seed}
    if args.config:
        cfg = TrainConfig.from_file(args.config, **overrides)
    else:
        if not (args.train and args.dev):
            print("captioner train: --train and --dev are required without --config", file=sys.stderr)
            return EXIT_USAGE
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    best = train(cfg, resume=args.resume)
    print(json.dumps(best))
    return EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioner.model import CaptionModel, ensemble

    combined = ensemble([CaptionModel.load(folder) for folder in args.models])
    combined.save(args.out)
    print(f"wrote an ensemble of {combined.config.ensemble_size} decoders to {args.out}")
    return EXIT_OK


def cmd_manifest(args: argparse.Namespace) -> int:
    from captioner import data

    if args.format == "flickr":
        count = data.flickr_manifest(args.captions, args.split, args.images, args.out)
    elif args.format == "coco":
        count = data.coco_manifest(args.captions, args.images, args.out)
    else:
        count = data.karpathy_manifest(args.captions, args.images, args.split, args.out)
    print(f"wrote {count} images to {args.out}")
    return EXIT_OK


def cmd_video(args: argparse.Namespace) -> int:
    from captioner.pipelines.subtitles import writer_for
    from captioner.pipelines.video import VideoOptions
    from captioner.pipelines.video_batch import plan_jobs, run_jobs

    source = Path(args.input)
    if source.is_dir() and (args.output or args.burn):
        print("captioner video: -o and --burn take one video, not a folder (use --out-dir)", file=sys.stderr)
        return EXIT_USAGE
    settings = VideoOptions(every=args.every, scenes=args.scenes, max_per_scene=args.max_per_scene,
                            min_score=args.min_score, min_duration=args.min_duration,
                            max_duration=args.max_duration, batch_size=args.batch_size)
    writer = writer_for(args.output, args.format)
    jobs = plan_jobs(source, writer.extension, output=args.output and Path(args.output),
                     out_dir=args.out_dir and Path(args.out_dir), burn=args.burn and Path(args.burn))
    model, options = _load(args)
    failed = run_jobs(jobs, model=model, writer=writer, options=options, settings=settings,
                      progress=source.is_dir() and not args.quiet)
    if source.is_dir():
        print(f"{len(jobs) - failed} subtitled, {failed} failed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Caption images and videos.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption image files; prints PATH<TAB>caption")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per line: path, caption, score")
    p.add_argument("--batch-size", type=int, default=16)
    _add_decoding_flags(p)
    p.set_defaults(run=cmd_caption)

    p = sub.add_parser("batch", help="caption every image under a folder into JSONL/CSV (resumable)")
    p.add_argument("folder")
    p.add_argument("-o", "--output", required=True, help="OUT.jsonl or OUT.csv; re-running resumes it")
    p.add_argument("--format", choices=("jsonl", "csv"), help="default: from the output's extension")
    p.add_argument("--html", help="also write a self-contained contact sheet REPORT.html")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off for large folders)")
    _add_decoding_flags(p)
    p.set_defaults(run=cmd_batch)

    p = sub.add_parser("evaluate", help="caption a manifest's images and score them")
    p.add_argument("--manifest", required=True)
    p.add_argument("--json", action="store_true", help="last line: one JSON object of scores")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the JVM start)")
    p.add_argument("--batch-size", type=int, default=32)
    _add_decoding_flags(p)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("train", help="train a caption model")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--train", help="training manifest")
    p.add_argument("--dev", help="dev manifest (early stopping on CIDEr-D)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--encoder")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--finetune-encoder", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, help="initialization and shuffling seed (ensemble members differ in it)")
    p.add_argument("--device")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("ensemble", help="combine models trained alike (e.g. different --seed) into one model")
    p.add_argument("models", nargs="+", help="model folders (each with config.json, vocab.json, model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the combined model")
    p.set_defaults(run=cmd_ensemble)

    p = sub.add_parser("manifest", help="convert a dataset's caption file into a JSONL manifest")
    p.add_argument("format", choices=("flickr", "coco", "karpathy"))
    p.add_argument("--captions", required=True, help="token file, COCO captions JSON or Karpathy dataset JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--split", help="split file (flickr) or split name (karpathy: train/val/test/restval)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_manifest)

    p = sub.add_parser("video", help="subtitle a video (or every video under a folder) as SRT, WebVTT or JSONL")
    p.add_argument("input", help="a video file, or a folder searched recursively for .mp4 .avi .mov .mkv .webm .m4v")
    p.add_argument("-o", "--output", help="OUT.srt, OUT.vtt or OUT.jsonl (one video; default: beside the video)")
    p.add_argument("--format", choices=("srt", "vtt", "jsonl"), help="default: from -o's extension, else srt")
    p.add_argument("--out-dir", help="write subtitle files here instead of beside each video")
    p.add_argument("--every", type=float, default=2.0, help="seconds between captioned frames (default: 2)")
    p.add_argument("--scenes", action="store_true", help="caption frames inside shots found by PySceneDetect")
    p.add_argument("--max-per-scene", type=int, default=3, help="frames captioned per shot at most (default: 3)")
    p.add_argument("--min-score", type=float, help="drop cues whose mean log-prob is lower (e.g. -2.5)")
    p.add_argument("--min-duration", type=float, default=1.0, help="seconds a cue lasts at least (default: 1)")
    p.add_argument("--max-duration", type=float, default=7.0, help="longer cues are split (default: 7)")
    p.add_argument("--burn", help="also write OUT.mp4: a copy of the video with the cues drawn on (one video)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_decoding_flags(p)
    p.set_defaults(run=cmd_video)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CaptionerError as e:
        print(f"captioner: error: {e}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except ValueError as e:  # bad option values (e.g. --beam-size 0) are usage errors
        print(f"captioner: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
