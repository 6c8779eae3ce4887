"""The ``captioner`` command: one subcommand per use case, tested in-process via ``main(argv)``.

Nothing heavy is imported until a command runs, so ``captioner --help`` answers at once.
Outputs are checked (and batch outputs opened and locked) before the model loads, so a
bad ``-o`` fails in well under a second instead of after the model has loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from captioner.errors import CaptionerError, OptionError, OutputError, count_of, one_line, printable
from captioner.options import DEFAULT_WORKERS
from captioner.pipelines.extras import require_extra
from captioner.pipelines.flags import (
    add_dataclass_flags,
    bounded_int,
    dataclass_from_args,
    exposed_fields,
    flag_name,
    probability,
)

# Exit codes: 0 all good, 1 some input failed, 2 bad arguments (argparse's own convention).
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process ended by it


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a service manager), raised where the command is so that
    its cleanups run as for Ctrl-C: a temporary export or a half-burned copy is removed."""


def _terminate(command_process: int, signum, frame) -> None:
    """SIGTERM's handler, set by ``main()`` in ``command_process``."""
    if os.getpid() == command_process:
        raise _Terminated
    # a forked helper (a DataLoader worker) inherited the handler: end as the signal would have ended it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


# Decoding fields whose result only `caption` shows (the other commands write one caption per input).
CAPTION_ONLY_FIELDS = ("n_best",)

SCORE_HELP = ("score is the caption's mean log-probability per token by the model's own reckoning (closer to 0 is "
              "surer) and min_prob the probability of its least likely word; the search ranks candidate captions "
              "differently: by their length-penalized sum of log-probabilities after token rules such as the "
              "concept boost")


class _CaptionOnly(argparse.Action):
    """A decoding flag whose result only ``captioner caption`` shows: a usage error elsewhere, saying so."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is for captioner caption; this command writes one caption per input")


def _add_model_flags(parser: argparse.ArgumentParser, *, hidden: tuple[str, ...] = CAPTION_ONLY_FIELDS) -> None:
    from captioner.options import DecodingOptions

    group = parser.add_argument_group("decoding (defaults come from the model: see its config.json)")
    add_dataclass_flags(group, DecodingOptions, exclude=hidden, show_defaults=False)
    for name in hidden:  # known, so that giving one is answered with the way on, not "unrecognized arguments"
        parser.add_argument(flag_name(name), nargs="?", action=_CaptionOnly, help=argparse.SUPPRESS)
    parser.add_argument("--model", help="model folder (default: the model shipped with the package)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="run the encoder and the decoder step in PyTorch or in ONNX Runtime (the onnx extra); "
                             "the search is the same")
    parser.add_argument("--onnx", metavar="DIR", help="with --backend onnxruntime: an export from captioner export "
                        "(default: export --model now, into a temporary folder, in about 2 s)")


def _load(args: argparse.Namespace):
    """The model and its decoding defaults with the user's flags applied.

    Flags are checked against the decoding defaults the model's JSON declares before torch
    is imported here and the model loads, so a combination that cannot work (``--n-best 6``
    with a beam of 5) costs no waiting; after loading they are checked again, against the model itself.
    """
    from captioner.options import DEFAULT_MODEL_DIR, declared_decoding

    declared = declared_decoding(getattr(args, "onnx", None) or args.model or DEFAULT_MODEL_DIR)
    if declared is not None:  # a field without a flag on this command is never given
        dataclass_from_args(args, declared)
    from captioner.api import load_model

    if getattr(args, "onnx", None) and getattr(args, "backend", "torch") != "onnxruntime":
        raise OptionError("--onnx names an export for ONNX Runtime: add --backend onnxruntime")
    if getattr(args, "backend", "torch") == "onnxruntime":
        if getattr(args, "device", None):
            raise OptionError("--device chooses where PyTorch runs; --backend onnxruntime runs on this machine's CPU")
        if args.onnx and args.model:
            raise OptionError("--onnx names an export, which holds its own model: leave out --model "
                              "(or drop --onnx to export --model now)")
        model = _load_onnx(args)
    else:
        model = load_model(args.model, device=_device(args.device))
    options = dataclass_from_args(args, model.config.decoding)
    model.check_decoding(options)
    return model, options


def _load_onnx(args: argparse.Namespace):
    """The model's ONNX export in ONNX Runtime: ``--onnx DIR``, or exported now into a temporary folder."""
    require_extra("onnx", "--backend onnxruntime")
    from captioner.onnx_runtime import load_onnx_model

    if args.onnx:
        return load_onnx_model(args.onnx)
    import tempfile

    with _stop_signals_held():  # a stop between making the folder and arranging its removal would leave it
        temporary = tempfile.TemporaryDirectory(prefix="captioner-onnx-")
    with temporary as folder:  # gone once loaded, not at exit:
        _export(args.model, Path(folder))
        return load_onnx_model(folder)  # a run stopped by a signal left 56 MB behind; sessions hold the graphs


def _export(model_folder: str | None, out: Path, *, int8: bool = False) -> None:
    """The model in ``model_folder`` (None: the shipped one) exported into ``out``, with its
    calibration and consensus data (for ``export`` and for ``--backend onnxruntime``).

    Raises:
        ModelLoadError: the model cannot be loaded, or cannot be exported (then named by its folder,
            as a load error already is).
    """
    from captioner.api import load_model
    from captioner.errors import ModelLoadError
    from captioner.model import DEFAULT_MODEL_DIR
    from captioner.onnx_export import export_onnx

    source = model_folder or DEFAULT_MODEL_DIR
    model = load_model(model_folder)
    try:
        export_onnx(model, out, calibration_from=source, int8=int8)
    except ModelLoadError as e:  # an ensemble, or a decoder without attention: the message says which model
        raise ModelLoadError(f"{printable(source)}: {e}") from e


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is over (a few lines that must not be cut in two).

    The handlers are swapped, not the signal mask: a mask holds a signal back from this thread
    only, and another thread (torch's, OpenMP's) that takes it has Python run the handler here.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets them, or sets them
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda got, _: caught.append(got))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)  # now, to the handler the command had


def _device(name: str | None) -> str | None:
    """``--device``, checked before the model loads: a torch device this machine has."""
    if name is not None:
        from captioner.options import check_device

        check_device(name, "--device")
    return name


def _print(text: str, *, err: bool = False) -> None:
    """Print one line whatever the stream's encoding (an ASCII terminal gets ``\\u`` escapes, not an error).

    Raises:
        OutputError: standard output is closed (``>&-``): the results would be lost in silence.
    """
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        if err:
            return  # closed by the caller on purpose: nowhere to report to
        raise OutputError("standard output is closed; the results have nowhere to go")
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(printable(text).encode(encoding, "backslashreplace").decode(encoding), file=stream, flush=True)


def cmd_caption(args: argparse.Namespace) -> int:
    model, options = _load(args)  # first: a bad flag is refused before torch is imported
    from captioner.api import caption_paths
    from captioner.confidence import check_min_confidence
    from captioner.pipelines.record_formats import result_record

    check_min_confidence(args.min_confidence, model)
    _check_fallback(args)
    if args.tags and model.encoder.class_names is None:
        raise OptionError(f"--tags lists what the encoder's classifier sees; this model's encoder "
                          f"({model.config.encoder}) keeps no classifier")
    failed = False
    for result in caption_paths(model, [Path(p) for p in args.images], options=options, batch_size=args.batch_size):
        if result.captions is None:
            hint = f" (a folder: captioner batch {shlex.quote(str(result.path))} -o captions.jsonl captions the " \
                   "photos in it)" if result.path.is_dir() else ""
            _print(f"skipped {one_line(result.error)}{hint}", err=True)
            failed = True
            continue
        record = result_record(result, min_confidence=args.min_confidence, fallback=args.fallback,
                               n_best=options.n_best > 1)
        if args.json:
            _print(json.dumps(record, ensure_ascii=False))
            continue
        # with --n-best, a line per caption, best first: the first line is the one printed without it
        for caption in [record, *record.get("n_best", [])[1:]]:
            _print("\t".join(_caption_columns(args, result, caption)))
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _caption_columns(args: argparse.Namespace, result, caption: dict) -> list[str]:
    """PATH, caption, [tags], [unsure column] of one caption (a record, or one of its ``n_best``)."""
    columns = [one_line(result.path), caption["caption"]]
    if args.tags:
        columns.append(", ".join(f"{tag.label} {tag.p:.2f}" for tag in result.tags))
    if args.min_confidence is not None:  # the column is there on every line, empty for a sure caption
        instead = f"; the model said: {caption['model_caption']}" if "model_caption" in caption else ""
        columns.append(f"unsure (confidence {caption['confidence']:.2f}{instead})" if caption.get("unsure") else "")
    return columns


def cmd_batch(args: argparse.Namespace) -> int:
    from captioner.outputs import STANDARD_OUTPUT, check_writable_file
    from captioner.pipelines.folder import caption_folder
    from captioner.pipelines.ray_batch import names_parquet
    from captioner.pipelines.record_formats import format_for
    from captioner.pipelines.records import RecordFile
    from captioner.pipelines.report import write_contact_sheet

    if args.ray is not None:
        return _batch_with_ray(args)
    if not Path(args.folder).is_dir():
        hint = " (a URI source needs --ray)" if "://" in args.folder else ""
        if Path(args.folder).is_file():
            hint = f" (one photo: captioner caption {shlex.quote(args.folder)})"
        raise OptionError(f"{printable(args.folder)}: not a folder{hint}")
    if args.format == "parquet" or names_parquet(args.output):
        raise OptionError("Parquet output is a folder of Ray shards: use it with --ray")
    if args.output.endswith(("/", os.sep)) or os.path.basename(args.output) in (".", ".."):
        raise OptionError(f"{printable(args.output)}: names a folder; give a file name (a folder of shards needs "
                          "--ray)")
    if args.html:
        if args.output == STANDARD_OUTPUT or Path(args.output).exists() and not Path(args.output).is_file():
            raise OptionError(f"{printable(args.output)}: --html reads the records back from the output; "
                              "write them to a regular file")
        _check_report_path(Path(args.html), Path(args.output))
        check_writable_file(args.html)
    _check_fallback(args)
    fmt = format_for(Path(args.output), args.format)
    if args.compile and args.backend != "torch":
        raise OptionError("--compile compiles the PyTorch encoder; it does not apply to --backend onnxruntime")
    with RecordFile(args.output, fmt) as records:  # opened, locked and read before the model loads
        model, options = _load(args)
        if args.compile:
            model.compile_encoder()
        workers = DEFAULT_WORKERS if args.workers is None else args.workers
        summary = caption_folder(args.folder, records, model=model, options=options, batch_size=args.batch_size,
                                 num_workers=workers, progress=not args.quiet, retry_errors=args.retry_errors,
                                 min_confidence=args.min_confidence, fallback=args.fallback)
    if args.html:
        write_contact_sheet(args.output, args.html, fmt)
    return _batch_ended(args, summary)


def _batch_ended(args: argparse.Namespace, summary) -> int:
    """Print a batch's summary (local or Ray), warn when SOURCE held no image; the exit code."""
    from captioner.images import IMAGE_EXTENSIONS

    _print(summary.describe(), err=True)
    if not (summary.captioned or summary.failed or summary.already_done):
        _warn_none_under(args.folder, "images", IMAGE_EXTENSIONS)
    return EXIT_SOME_FAILED if summary.failed or summary.earlier_failed else EXIT_OK


def _warn_none_under(folder, kind: str, extensions) -> None:
    """A folder that held nothing to work on says so, naming the extensions looked for."""
    _print(f"warning: no {kind} under {printable(folder)} (files named {', '.join(sorted(extensions))})", err=True)


def _batch_with_ray(args: argparse.Namespace) -> int:
    from captioner.confidence import check_min_confidence
    from captioner.pipelines.ray_batch import check_ray_args, run_from_args

    _check_fallback(args)
    check_ray_args(args)
    model, options = _load(args)  # checks the model and the flags before Ray starts
    check_min_confidence(args.min_confidence, model)
    summary = run_from_args(args, args.model, options)
    return _batch_ended(args, summary)


def _is_are(count: int) -> str:
    return "is" if count == 1 else "are"


def _check_report_path(html: Path, output: Path) -> None:
    """The report is written whole over ``html``: never over the records, a photo or anything not a page."""
    if html.suffix.lower() not in (".html", ".htm"):
        raise OptionError(f"--html {printable(html)}: the report's name must end in .html")
    from captioner.outputs import same_file

    if same_file(html, output):
        raise OptionError(f"--html {printable(html)} is the records file -o; give the report its own name")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.api import evaluate
    from captioner.data import check_scorable, read_manifest
    from captioner.errors import DataError

    entries = read_manifest(args.manifest, require_captions=True)  # a bad manifest fails before the model loads
    check_scorable(entries, args.manifest)
    missing = [e.image for e in entries if not e.image.is_file()]
    if missing:
        listed = f"{count_of(len(missing), 'image')} listed in {printable(args.manifest)} {_is_are(len(missing))}"
        raise DataError(f"{listed} not a file, e.g. {printable(missing[0])}; scores without them would not compare")
    model, options = _load(args)
    scores = evaluate(model, args.manifest, options=options, meteor=not args.no_meteor, batch_size=args.batch_size)
    for name, value in scores.items():
        _print(f"{name:8s} {value:.4f}")
    if args.json:
        _print(json.dumps(scores))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.train import train
    from captioner.train_config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in exposed_fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.config:
        cfg = TrainConfig.from_file(args.config, **given)
    else:
        missing = [flag_name(name) for name in ("train_manifest", "dev_manifest") if name not in given]
        if missing:
            raise OptionError(f"{' and '.join(missing)} required without --config")
        cfg = TrainConfig(**given)
    best = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the run's result once (rank 0's, as it logs)
        _print(f"best: {json.dumps(best)}")  # labelled: when the last epoch is best, it repeats that epoch's line
    return EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioner.model import CaptionModel, check_distinct_decoders, check_new_model_folder, ensemble
    from captioner.outputs import same_file

    if len(args.models) < 2:
        raise OptionError(f"an ensemble combines at least 2 model folders, got {len(args.models)}")
    check_new_model_folder(args.out)
    for i, folder in enumerate(args.models):
        if any(same_file(folder, earlier) for earlier in args.models[:i]):
            raise OptionError(f"{printable(folder)} is given twice: a model averaged with itself only costs time")
    members = [CaptionModel.load(folder) for folder in args.models]
    names = [printable(folder) for folder in args.models]
    combined = ensemble(members, names=names)  # first: members that do not fit together are named as such
    check_distinct_decoders(members, names)
    combined.save(args.out)
    _print(f"wrote an ensemble of {combined.config.ensemble_size} decoders to {args.out}")
    return EXIT_OK


def cmd_manifest(args: argparse.Namespace) -> int:
    from captioner import data
    from captioner.errors import DataError

    if args.format in ("flickr", "karpathy") and not args.split:
        raise OptionError(f"manifest {args.format} needs --split")
    if args.format == "coco" and args.split:
        raise OptionError("manifest coco converts every image of the captions file; --split is for flickr and "
                          "karpathy (convert each COCO captions_*.json on its own)")
    data.check_new_manifest(args.out, inputs=(args.captions, args.split))
    if not os.path.isdir(args.images):
        raise OptionError(f"--images {printable(args.images)}: not a folder (the manifest's image paths start there)")
    try:
        if args.format == "flickr":
            converted = data.flickr_manifest(args.captions, args.split, args.images, args.out)
        elif args.format == "coco":
            converted = data.coco_manifest(args.captions, args.images, args.out)
        else:
            converted = data.karpathy_manifest(args.captions, args.images, args.split, args.out)
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:  # JSON and Unicode errors too
        raise DataError(f"{printable(args.captions)}: not a {args.format} caption file ({type(e).__name__}: "
                        f"{e})") from e
    if converted.missing:
        count = len(converted.missing)
        _print(f"warning: {count_of(count, 'image')} with captions {_is_are(count)} not in --images "
               f"{printable(args.images)}, e.g. {printable(converted.missing[0])}; left out of the manifest", err=True)
    if converted.captionless:
        count = len(converted.captionless)
        _print(f"warning: {count_of(count, 'image')} {_is_are(count)} listed without a caption (or only blank "
               f"ones), e.g. {printable(converted.captionless[0])}; left out of the manifest", err=True)
    if converted.unlisted_captions:
        _print(f"warning: {count_of(converted.unlisted_captions, 'caption')} in {printable(args.captions)} "
               "name an image id its images do not list; left out of the manifest", err=True)
    if converted.repeated:
        count = len(converted.repeated)
        listing = args.split if args.format == "flickr" else args.captions  # karpathy's --split names a split
        _print(f"warning: {count_of(count, 'image')} {_is_are(count)} listed more than once in "
               f"{printable(listing)}, e.g. {printable(converted.repeated[0])}; written once, with all their captions",
               err=True)
    _print(f"wrote {converted.written} images to {printable(args.out)}")
    return EXIT_OK


def cmd_video(args: argparse.Namespace) -> int:
    from captioner.confidence import check_min_confidence
    from captioner.pipelines.sources import unlisted_line
    from captioner.pipelines.subtitles import writer_for
    from captioner.pipelines.video_batch import prepare_jobs, run_jobs
    from captioner.pipelines.video_options import VideoOptions

    source = Path(args.input)
    settings = dataclass_from_args(args, VideoOptions())
    writer = writer_for(args.output, args.format)
    unlisted: list[str] = []  # folders whose videos cannot be found: each a failure of the run
    jobs = prepare_jobs(source, writer.extension, output=args.output and Path(args.output),
                        out_dir=args.out_dir and Path(args.out_dir), burn=args.burn and Path(args.burn),
                        on_error=lambda folder, error: unlisted.append(unlisted_line(folder, error)))
    for line in unlisted:
        _print(line, err=True)
    model, options = _load(args)
    check_min_confidence(settings.min_confidence, model)  # once, not as a failure of every video
    run = run_jobs(jobs, model=model, writer=writer, options=options, settings=settings,
                   progress=source.is_dir() and not args.quiet)
    run.failed += len(unlisted)
    if source.is_dir():
        _print(run.summary(len(jobs) + len(unlisted)), err=True)
        if not jobs:
            from captioner.pipelines.video_source import VIDEO_EXTENSIONS

            _warn_none_under(source, "videos", VIDEO_EXTENSIONS)
    return EXIT_OK if run.complete else EXIT_SOME_FAILED


def _caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption image files; prints PATH<TAB>caption", epilog=SCORE_HELP)
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: path, caption, score, min_prob, tags, confidence, unsure")
    p.add_argument("--tags", action="store_true",
                   help="also print the encoder's ImageNet labels with their probabilities (PATH<TAB>caption<TAB>tags)")
    _add_min_confidence_flag(p, "adds a column 'unsure (confidence C)'; JSON records get \"unsure\": true")
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=16)
    _add_model_flags(p, hidden=())
    p.set_defaults(run=cmd_caption)


def _batch_parser(sub) -> None:
    from captioner.pipelines.ray_batch import add_ray_flags
    from captioner.pipelines.record_formats import RECORD_FORMATS

    p = sub.add_parser("batch", help="caption every image under a folder into JSONL/CSV (resumable)",
                       epilog=SCORE_HELP)
    p.add_argument("folder")
    p.add_argument("-o", "--output", required=True, help="OUT.jsonl or OUT.csv; re-running resumes it; - for "
                   "standard output")
    p.add_argument("--format", choices=sorted({*RECORD_FORMATS, "parquet"}),
                   help="default: from the output's extension (parquet: with --ray)")
    p.add_argument("--html", help="also write a self-contained contact sheet REPORT.html")
    p.add_argument("--retry-errors", action="store_true",
                   help="caption again the files the output holds errors for; each path keeps one record")
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=32)
    p.add_argument("--workers", type=bounded_int(0, 64),
                   help=f"processes decoding images (default {DEFAULT_WORKERS}: none on 2 cores, where they slow "
                        "the encoder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off for large folders)")
    _add_min_confidence_flag(p, "records keep the caption with \"unsure\": true; the contact sheet greys it")
    _add_model_flags(p)
    add_ray_flags(p)
    p.set_defaults(run=cmd_batch)


def _add_min_confidence_flag(p, effect: str) -> None:
    from captioner.pipelines.record_formats import FALLBACKS

    p.add_argument("--min-confidence", type=probability, metavar="X",
                   help="mark captions whose confidence (estimated probability that the caption is acceptable, "
                        f"from a calibrated model such as the default) is below X as unsure: {effect}")
    p.add_argument("--fallback", choices=FALLBACKS,
                   help="with --min-confidence: an unsure caption gives way to a plain description from the "
                        "encoder's likeliest ImageNet label ('a photo of an espresso'); the model's own caption "
                        "is kept as model_caption")


def _check_fallback(args: argparse.Namespace) -> None:
    if args.fallback and args.min_confidence is None:  # check_fallback's rule, in the flags' names
        raise OptionError("--fallback replaces unsure captions: give --min-confidence too")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="caption a manifest's images and score them")
    p.add_argument("--manifest", required=True)
    p.add_argument("--json", action="store_true", help="last line: one JSON object of scores")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the JVM start)")
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=32)
    _add_model_flags(p)
    p.set_defaults(run=cmd_evaluate)


def _train_parser(sub) -> None:
    from captioner.train_config import TrainConfig

    p = sub.add_parser("train", help="train a caption model")
    p.add_argument("--config", help="JSON file of training settings (any of the fields below); flags override it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_dataclass_flags(p.add_argument_group("training settings"), TrainConfig)
    p.set_defaults(run=cmd_train)


def cmd_serve(args: argparse.Namespace) -> int:
    require_extra("serve", "serve")
    import uvicorn

    from captioner.api import load_model
    from captioner.pipelines.server import ServerSettings, create_app
    from captioner.torch_threads import keep_torch_off_this_thread

    _check_port_free(args.host, args.port)  # before the model loads, not after
    # the event loop's thread stays off torch, so the batcher thread runs the model at full speed
    threads = keep_torch_off_this_thread()
    settings = ServerSettings(max_image_bytes=args.max_upload_mb * 2**20, max_video_bytes=args.max_video_mb * 2**20,
                              timeout=args.timeout, max_batch_size=args.max_batch_size,
                              max_wait=args.max_wait_ms / 1000, max_wait_coming=args.max_wait_coming_ms / 1000,
                              cors_origins=tuple(args.cors_origin),
                              torch_threads=threads)
    model = load_model(args.model, device=_device(args.device))
    # the folder's name, not its path: clients learn nothing of the server's file system
    app = create_app(model, model_name=Path(args.model).name if args.model else "default", settings=settings)
    _print(f"serving {args.model or 'the default model'} on http://{args.host}:{args.port}/", err=True)
    # without a grace limit, a stop signal would wait for a long video's whole timeout
    with _stopped_by_sigterm():
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.shutdown_grace)
    return EXIT_OK


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM, a service manager's stop, ends the server as a success once uvicorn has shut it down.

    uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it
    found; :func:`run_command`'s would turn it into ``terminated`` and exit 143, which systemd
    counts as a failed stop.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int) -> None:
    """Raises OptionError when ``host:port`` cannot be listened on (taken, or not this machine's address)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise OptionError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP API (POST /v1/captions, /v1/subtitles) and a web page at /")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=bounded_int(1, 65535), default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--device", help="torch device, e.g. cuda (default: CPU)")
    p.add_argument("--max-batch-size", type=bounded_int(1, 1024), default=32,
                   help="images from concurrent requests captioned in one batch (default: 32)")
    p.add_argument("--max-wait-ms", type=bounded_int(0, 1000), default=5,
                   help="how long a batch waits for more images after its first (default: 5)")
    p.add_argument("--max-wait-coming-ms", type=bounded_int(0, 1000), default=50,
                   help="how long a batch may wait, after its first image, for those of requests already "
                        "received and being decoded (default: 50; 0: never)")
    p.add_argument("--timeout", type=bounded_int(1, 86400), default=120,
                   help="seconds per request before a 504 (default: 120)")
    p.add_argument("--shutdown-grace", type=bounded_int(0, 86400), default=10,
                   help="seconds running requests may finish after SIGTERM or Ctrl-C before they are stopped "
                   "(default: 10)")
    p.add_argument("--max-upload-mb", type=bounded_int(1, 4096), default=32,
                   help="megabytes of images in one request (default: 32; at most 16 images a request)")
    p.add_argument("--max-video-mb", type=bounded_int(1, 65536), default=256,
                   help="megabytes of one video upload (default: 256)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="let pages from this origin call the API (repeatable; default: none)")
    p.set_defaults(run=cmd_serve)


def cmd_export(args: argparse.Namespace) -> int:
    require_extra("onnx", "export")
    from captioner.onnx_export import OPSET, check_export_folder

    made = not os.path.lexists(args.out)
    out = check_export_folder(args.out)  # before the model loads, as every command checks its outputs
    try:
        _export(args.model, out, int8=args.int8)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # emptied by export_onnx: nothing left of a failed export
        raise
    _print(f"wrote ONNX graphs (opset {OPSET}{', int8 weights' if args.int8 else ''}) and runtime.json to {out}")
    return EXIT_OK


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export the model as ONNX graphs (encoder, classifier, decoder start and step)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("-o", "--out", required=True, help="new or empty folder for the graphs and runtime.json")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--int8", action="store_true", help="store the decoder graphs' and the classifier's weights as "
                   "int8 (ONNX Runtime dynamic quantization; the encoder stays float)")
    p.set_defaults(run=cmd_export)


def _ensemble_parser(sub) -> None:
    p = sub.add_parser("ensemble", help="combine models trained alike (e.g. different --seed) into one model")
    p.add_argument("models", nargs="+", help="model folders (each with config.json, vocab.json, model.safetensors)")
    p.add_argument("--out", required=True, help="new folder for the combined model")
    p.set_defaults(run=cmd_ensemble)


def _manifest_parser(sub) -> None:
    p = sub.add_parser("manifest", help="convert a dataset's caption file into a JSONL manifest")
    p.add_argument("format", choices=("flickr", "coco", "karpathy"))
    p.add_argument("--captions", required=True, help="token file, COCO captions JSON or Karpathy dataset JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--split", help="split file (flickr) or split name (karpathy: train/val/test/restval)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_manifest)


def _video_parser(sub) -> None:
    from captioner.pipelines.subtitles import WRITERS
    from captioner.pipelines.video_options import VideoOptions

    p = sub.add_parser("video", help="subtitle a video (or every video under a folder) as SRT, WebVTT or JSONL",
                       epilog=SCORE_HELP)
    p.add_argument("input", help="a video file, or a folder searched recursively for .mp4 .avi .mov .mkv .webm .m4v")
    p.add_argument("-o", "--output", help="OUT.srt, OUT.vtt or OUT.jsonl (one video; - for standard output; "
                   "default: beside the video)")
    p.add_argument("--format", choices=sorted(WRITERS), help="default: from -o's extension, else srt")
    p.add_argument("--out-dir", help="write subtitle files here instead of beside each video")
    p.add_argument("--burn", help="also write OUT.mp4: a copy of the video with the cues drawn on (one video)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(p.add_argument_group("frame sampling and cues"), VideoOptions)
    _add_model_flags(p)
    p.set_defaults(run=cmd_video)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to look) instead of the whole usage text."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


# Arguments that name files or folders: an empty one would silently mean the current folder.
PATH_ARGUMENTS = ("images", "folder", "input", "output", "html", "out_dir", "burn", "model", "manifest", "config",
                  "out", "captions", "split")


def _reject_empty_paths(args: argparse.Namespace) -> None:
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if value == "" or (isinstance(value, list) and "" in value):
            raise OptionError(f"{'--' if name not in ('images', 'folder', 'input') else ''}"
                              f"{name.replace('_', '-')}: an empty path was given")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="captioner", description="Caption images and videos.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_caption_parser, _batch_parser, _evaluate_parser, _train_parser, _ensemble_parser, _manifest_parser,
                _video_parser, _serve_parser, _export_parser):
        add(sub)
    return parser


def _error(program: str, message: str) -> None:
    """One line, in one write: the processes of a torchrun job share the terminal, and print()'s
    separate write of the newline let another process's line run into this one."""
    if sys.stderr is not None:  # closed on purpose (2>&-): nowhere to report to
        sys.stderr.write(f"{program}: error: {one_line(message)}\n")
        sys.stderr.flush()


def _os_error_message(error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


def _silence_stdout() -> None:
    """After a broken pipe (``captioner caption ... | head -1``), let the interpreter exit quietly."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one ``captioner: error: ...`` line and an exit code."""
    args = build_parser().parse_args(argv)

    def command() -> int:
        _reject_empty_paths(args)
        return args.run(args)

    return run_command("captioner", command)


def run_command(program: str, command: Callable[[], int | None]) -> int:
    """``command()``'s exit code, every failure ending as one ``PROGRAM: error: ...`` line; for the
    tools in tools/ too, so that they meet the same bar as the CLI.

    SIGTERM ends it as Ctrl-C does: the command's cleanups run.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.getsignal(signal.SIGTERM)
    if on_main_thread:
        signal.signal(signal.SIGTERM, functools.partial(_terminate, os.getpid()))
    try:
        return command() or EXIT_OK
    except _Terminated:
        _error(program, "terminated")
        return EXIT_TERMINATED
    except OptionError as e:  # a value out of range: a usage error, like argparse's own
        _error(program, str(e))
        return EXIT_USAGE
    except CaptionerError as e:
        _error(program, str(e))
        return EXIT_SOME_FAILED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_SOME_FAILED
    except OSError as e:
        _error(program, _os_error_message(e))
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        _error(program, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug of ours: still one line, with a way to see more
        if os.environ.get("CAPTIONER_DEBUG"):
            raise
        _error(program, f"unexpected {type(e).__name__}: {e} (a bug; set CAPTIONER_DEBUG=1 for the traceback and "
                        "report it)")
        return EXIT_SOME_FAILED
    finally:
        if on_main_thread:
            # a caller's own handler (main() called from Python) is back; None: one set outside Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
