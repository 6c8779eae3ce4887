"""``captioner serve``: an HTTP API and a web page, a thin shell over the library.

``create_app`` builds the ASGI app around one loaded model. Photos from concurrent
requests meet in a :class:`captioner.batching.DynamicBatcher`, so the encoder and the
search run on shared batches. Every bad input is a JSON ``{"error": "NAME: reason"}`` with
a 4xx status: uploads are limited in bytes (before they are parsed) and in pixels (the
pipeline's limit), images are accepted by their content, not their name, and a request
that runs past its timeout gets a 504. Uploads and videos go to a private temporary
folder removed at shutdown; no path a client sends is ever opened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import shutil
import tempfile
import threading
from concurrent.futures import wait as futures_wait
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from captioner.batching import DynamicBatcher
from captioner.confidence import check_min_confidence
from captioner.errors import CaptionerError, ImageReadError, OptionError, VideoReadError, printable, shortened
from captioner.images import MAX_PIXELS, PHOTO_FORMATS, bytes_pixels
from captioner.model import CaptionModel
from captioner.options import DecodingOptions
from captioner.pipelines.flags import options_from_text
from captioner.pipelines.record_formats import check_fallback, result_record
from captioner.pipelines.subtitles import WRITERS, cue_record
from captioner.pipelines.video_options import VideoOptions

SUBTITLE_FORMATS = ("vtt", "srt", "json")
MEDIA_TYPES = {"vtt": "text/vtt", "srt": "application/x-subrip"}


@dataclass(frozen=True)
class ServerSettings:
    """Limits and batching of one server."""

    max_image_bytes: int = 32 * 2**20  # one /v1/captions request, all its images together
    max_images: int = 16  # images in one request
    max_video_bytes: int = 256 * 2**20  # one /v1/subtitles upload
    timeout: float = 120.0  # seconds a request may take before it gets a 504
    max_batch_size: int = 32  # images the dynamic batcher puts in one encoder + search batch
    max_wait: float = 0.005  # seconds the batcher waits for more images after the first
    max_wait_coming: float = 0.05  # ... and at most for those of requests already received, being decoded
    torch_threads: int | None = None  # the batcher thread's torch threads (see captioner.torch_threads)
    max_video_jobs: int = 4  # videos subtitled at once; more wait (within their timeout)
    # pixels of uploaded photos decoded at once, all requests together; more wait. Decoding holds about
    # 6.5 bytes a pixel at its peak (a 225-megapixel PNG of 656 KB took the server from 1.05 to 2.51 GB)
    max_decoding_pixels: int = MAX_PIXELS
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser (none: same origin only)


class HTTPError(Exception):
    """A bad request, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(model: CaptionModel, *, model_name: str = "default", settings: ServerSettings = ServerSettings()):
    """The ASGI app serving ``model``: the API under /v1, /healthz, and the web page at /."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["folder"] = Path(tempfile.mkdtemp(prefix="captioner-serve-"))
        state["video_jobs"] = CapacityLimiter(settings.max_video_jobs)
        # uploads are held in memory (up to max_video_bytes each): as many being received as jobs may run
        state["video_requests"] = CapacityLimiter(settings.max_video_jobs)
        state["decoding"] = PixelBudget(settings.max_decoding_pixels)
        state["batcher"] = DynamicBatcher(model, max_batch_size=settings.max_batch_size, max_wait=settings.max_wait,
                                          max_wait_coming=settings.max_wait_coming,
                                          torch_threads=settings.torch_threads)
        try:
            yield
        finally:
            state["batcher"].close()
            shutil.rmtree(state["folder"], ignore_errors=True)

    # Uploads stay in memory (the body limits bound them) instead of spooling to the system's temporary
    # folder; only a video is written, into the server's private folder, for OpenCV to read.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_image_bytes,
                                         settings.max_video_bytes)
    # no redirect from "/v1/captions/" to "/v1/captions": it would be built from the client's Host header
    app = FastAPI(title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.captioner = state  # the batcher and the private folder, for tests and benchmarks
    app.add_middleware(_BodyLimit, limits={"/v1/captions": settings.max_image_bytes,
                                           "/v1/subtitles": settings.max_video_bytes})
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"])
    _add_error_handlers(app)

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # load balancers probe with either
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return {"model": model_name, "encoder": model.config.encoder, "vocabulary": len(model.vocab),
                "calibrated": model.calibrator is not None,
                "decoding": dataclasses.asdict(model.config.decoding), "video": dataclasses.asdict(VideoOptions()),
                "limits": {"max_image_bytes": settings.max_image_bytes, "max_images": settings.max_images,
                           "max_video_bytes": settings.max_video_bytes, "max_pixels": MAX_PIXELS,
                           "timeout_seconds": settings.timeout, "image_formats": list(PHOTO_FORMATS)}}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("captioner.pipelines").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict:
        return await _within(caption_request(request), settings.timeout)  # from the first byte read to the last

    async def caption_request(request: Request) -> dict:
        form = await _form(request, settings.max_images + 1, HTTPError(
            413, f"more than {settings.max_images + 1} files in one request; send at most {settings.max_images} "
                 'images, as files named "images", and no other file'))
        uploads = [u for u in form.getlist("images") if isinstance(u, UploadFile)]
        if not uploads:
            raise HTTPError(400, 'no images: send them as multipart/form-data files named "images"')
        if len(uploads) > settings.max_images:
            raise HTTPError(413, f"{len(uploads)} images in one request; at most {settings.max_images}")
        options, min_confidence, fallback = _caption_options(model, _fields(request, form, "images"))
        size = model.encoder.preprocess.size
        names = [printable(u.filename or f"image {i + 1}") for i, u in enumerate(uploads)]
        with state["batcher"].expecting(options):  # received whole, so a slow upload never holds a batch back
            pixels = [await run_in_threadpool(_image_pixels, await u.read(), name, size, state["decoding"])
                      for u, name in zip(uploads, names, strict=True)]
            futures = [state["batcher"].submit(name, p, options) for name, p in zip(names, pixels, strict=True)]
        gathered = asyncio.gather(*map(asyncio.wrap_future, futures))
        try:
            results = await _unless_gone(request, gathered)
        finally:
            if not gathered.done():  # past the timeout, or the client left: nobody waits for the outcome now
                gathered.cancel()
                gathered.add_done_callback(_outcome_seen)
                state["batcher"].abandon(f for f in futures if not f.done())
        return {"captions": [result_record(r, min_confidence=min_confidence, fallback=fallback,
                                           n_best=options.n_best > 1) for r in results]}

    @app.post("/v1/subtitles")
    async def subtitles(request: Request) -> Response:
        return await _within(subtitle_request(request), settings.timeout)

    async def subtitle_request(request: Request) -> Response:
        async with state["video_requests"]:  # more wait here, their bodies unread, within their timeout
            return await subtitle_job(request)

    async def subtitle_job(request: Request) -> Response:
        form = await _form(request, 2, HTTPError(  # a second is read, to be refused by name below
            400, 'more than 2 files in one request: send one video, as a file named "video", and no other file'))
        videos = form.getlist("video")
        if len(videos) > 1:
            raise HTTPError(400, f'{len(videos)} videos: send one per request, as a file named "video"')
        upload = form.get("video")
        if not isinstance(upload, UploadFile):
            raise HTTPError(400, 'no video: send it as a multipart/form-data file named "video"')
        fields = _fields(request, form, "video")
        fmt = fields.pop("format", "vtt")
        if fmt not in SUBTITLE_FORMATS:
            raise HTTPError(422, f"format={fmt!r} must be one of {', '.join(SUBTITLE_FORMATS)}")
        video_options, decoding = _video_options(model, fields)
        path = state["folder"] / f"upload-{id(upload):x}"  # our name: the client's never touches the disk
        stop = threading.Event()
        # video jobs hold threads for their whole length: their own limiter leaves the rest to photo uploads
        job = asyncio.ensure_future(to_thread.run_sync(
            _subtitle, model, upload.file, path, decoding, video_options, printable(upload.filename),
            _BatchedFrames(state["batcher"], stop), limiter=state["video_jobs"]))
        try:
            result = await _unless_gone(request, job)
        finally:
            stop.set()  # a job past its timeout, or whose client left, stops at its next batch of frames
            job.cancel()  # nobody waits for its outcome now (a no-op once it is done)
            path.unlink(missing_ok=True)
        return _subtitle_response(result, fmt)

    return app


def _fields(request: Request, form, files: str) -> dict[str, str]:
    """The query's and the form's text fields as one dict; ``files`` names the route's file field.

    A name given twice (in the query and the form, or twice in either) is refused: taking
    one of the two values silently could decode with an option the client did not mean. So
    is a file under any other name: an option sent as a file would otherwise be ignored.
    """
    stray = next((k for k, v in form.multi_items() if not isinstance(v, str) and k != files), None)
    if stray is not None:
        raise HTTPError(422, f'{stray!r} is a file; send options as text fields, and files as "{files}"')
    given = [*request.query_params.multi_items(), *((k, v) for k, v in form.multi_items() if isinstance(v, str))]
    fields: dict[str, str] = {}
    for name, value in given:
        if name in fields:
            raise HTTPError(422, f"{name} is given more than once; give each option once")
        fields[name] = value
    return fields


def _caption_options(model: CaptionModel, fields: dict[str, str]):
    """(decoding options, min_confidence, fallback) from query and form fields, checked like the CLI's flags."""
    min_confidence = _number(fields.pop("min_confidence", None), "min_confidence")
    fallback = fields.pop("fallback", None)
    try:
        check_fallback(fallback, min_confidence)
        check_min_confidence(min_confidence, model)
        decoding = options_from_text(model.config.decoding, fields, others=("min_confidence", "fallback"))
        model.check_decoding(decoding)
        return decoding, min_confidence, fallback
    except OptionError as e:
        raise HTTPError(422, str(e)) from e


def _video_options(model: CaptionModel, fields: dict[str, str]) -> tuple[VideoOptions, DecodingOptions]:
    video_names = {f.name for f in dataclasses.fields(VideoOptions)}
    try:
        video = options_from_text(VideoOptions(), {k: v for k, v in fields.items() if k in video_names})
        decoding = options_from_text(model.config.decoding, {k: v for k, v in fields.items() if k not in video_names},
                                     exclude=("n_best",), others=(*video_names, "format"))
        model.check_decoding(decoding)
        check_min_confidence(video.min_confidence, model)
    except OptionError as e:
        raise HTTPError(422, str(e)) from e
    return video, decoding


def _number(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise HTTPError(422, f"{name}={shortened(text, 40)!r} is not a number") from None


class PixelBudget:
    """How many pixels are being decoded at once, across all requests: a decode waits until its
    picture's pixels fit in ``capacity``.

    The pixel limit bounds one picture, not the memory of many: a PNG of zeros holding 225
    million pixels is 656 KB, so each of a request's 16 images can be one, and requests decode
    in a pool of 40 threads. With this, pictures of ordinary size still decode side by side (twenty
    12-megapixel photos at once), while the largest ones take their turn.
    """

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # one over the capacity waits for all the others, then decodes alone
        with self._changed:
            self._changed.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def _declared_pixels(data: bytes) -> int:
    """The pixels an upload's header announces (read without decoding); 0 for what is not a picture
    we accept, which the decode then refuses at no cost."""
    try:
        with Image.open(io.BytesIO(data), formats=PHOTO_FORMATS) as image:
            return image.width * image.height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


async def _form(request: Request, max_files: int, too_many: HTTPError) -> FormData:
    """The request's multipart form, with ``too_many`` for more than ``max_files`` files (Starlette's
    own 400 says only "Too many files", in its words, not the API's), and a 400 for a body cut short.

    Starlette returns the parts it has read when a body stops before its closing boundary (a
    client whose file stream failed, a proxy that gave up), so a request of three photos could
    be answered with two captions and a 200.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary") if content_type == b"multipart/form-data" else None
    end = _ClosingBoundary(request.receive, boundary) if boundary else None
    try:
        form = await (Request(request.scope, end.receive) if end else request).form(max_files=max_files)
    except StarletteHTTPException as e:
        if "Too many files" in str(e.detail):
            raise too_many from e
        raise
    if end and not end.seen:
        await form.close()
        raise HTTPError(400, "the upload was cut short: the body ended before its closing multipart boundary, "
                             "so a file in it may be missing; nothing was captioned, send it again")
    return form


class _ClosingBoundary:
    """A request body's ``receive``, watching for the multipart close delimiter (``--BOUNDARY--``)."""

    def __init__(self, receive, boundary: bytes):
        self._receive, self._mark = receive, b"--" + boundary + b"--"
        self._tail, self.seen = b"", False

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request" and not self.seen:
            window = self._tail + message.get("body", b"")
            self.seen = self._mark in window
            self._tail = window[-(len(self._mark) - 1):]  # a delimiter split between two chunks
        return message


def _image_pixels(data: bytes, name: str, size: int, budget: PixelBudget):
    """Decoded, checked pixels of one upload; 415 for what is not an accepted image, 413 for too many pixels."""
    try:
        with budget.hold(_declared_pixels(data)):
            return bytes_pixels(data, name, size, formats=PHOTO_FORMATS)
    except ImageReadError as e:
        message = str(e)
        reason = message.removeprefix(f"{name}: ")  # judged on the reason alone, never on the client's file name
        status = 415 if reason.startswith("not an image") else 413 if "exceeds" in reason else 400
        raise HTTPError(status, message) from e


def _subtitle(model, upload, path: Path, decoding: DecodingOptions, settings: VideoOptions, name: str,
              caption: _BatchedFrames):
    """Write the upload to ``path`` (for OpenCV) and subtitle it; runs in a worker thread, off the event loop."""
    from captioner.pipelines.video import subtitle_source
    from captioner.pipelines.video_source import OpenCVSource

    if caption.stop.is_set():  # started after its request was over: write nothing
        raise _Stopped
    with path.open("wb") as f:
        shutil.copyfileobj(upload, f)
    try:
        # FFmpeg's own thread count: the model runs on the batcher's thread, not beside it here
        with OpenCVSource(path) as source:
            result = subtitle_source(source, model=model, options=decoding, settings=settings, caption=caption)
    except VideoReadError as e:
        why = str(e).split(": ", 1)[-1]
        status = 413 if "exceeds the limit" in why else 400 if why == "empty file" else 415  # as for a photo
        raise HTTPError(status, f"{name}: {why}") from e
    private = printable(path)  # warnings and notes name the upload, never the server's own file

    def named(lines: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f"{name}{line[len(private):]}" if line.startswith(private) else line for line in lines)

    return dataclasses.replace(result, warnings=named(result.warnings), notes=named(result.notes))


class _Stopped(Exception):
    """A video job whose request is over (its timeout passed): nobody waits for its cues."""


class _BatchedFrames:
    """A video's frames captioned by the server's batcher: on its thread (the one that runs torch,
    see captioner.torch_threads), in batches shared with photo requests, and never after ``stop``:
    frames not captioned yet are then withdrawn, and the job raises."""

    def __init__(self, batcher: DynamicBatcher, stop: threading.Event):
        self.batcher, self.stop = batcher, stop

    def __call__(self, pixels, options):
        if self.stop.is_set():
            raise _Stopped
        futures = [self.batcher.submit(f"frame {i}", frame.numpy(), options) for i, frame in enumerate(pixels)]
        while futures_wait(futures, timeout=0.1).not_done:
            if self.stop.is_set():
                self.batcher.abandon(futures)  # frames not started are skipped, a batch of only these stops
                raise _Stopped
        return [future.result().captions for future in futures]


def _subtitle_response(result, fmt: str) -> Response:
    if fmt == "json":
        return JSONResponse({"cues": [cue_record(s) for s in result.segments], "duration": round(result.duration, 3),
                             "frames_captioned": result.frames_captioned, "warnings": list(result.warnings),
                             "notes": list(result.notes)})
    text = io.StringIO()
    WRITERS[fmt]().write(result.segments, text)
    return PlainTextResponse(text.getvalue(), media_type=MEDIA_TYPES[fmt])


def _outcome_seen(future: asyncio.Future) -> None:
    """Mark a given-up future's outcome as seen, so asyncio logs no 'exception was never retrieved'."""
    if not future.cancelled():
        future.exception()


async def _unless_gone(request: Request, job: asyncio.Future):
    """``job``'s result, unless the client disconnects first: then ClientDisconnect (the caller
    then abandons its images, or stops its video's frames from reaching the batcher).

    The request's body is read by now, so the server's next message for it is the disconnect:
    waiting for it costs nothing until it comes, where asking ``is_disconnected`` every half
    second took a tenth of the event loop's time with 16 clients waiting.
    """
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job in done:
        return job.result()
    job.cancel()
    gone.result()  # what reading the request raised, if it did, rather than a disconnect it was not
    raise ClientDisconnect()


async def _disconnect(request: Request) -> None:
    """Returns once the client has disconnected (any body still unread is skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _within(work, seconds: float):
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise HTTPError(504, f"the request took longer than {seconds:g} s") from None
    except asyncio.CancelledError:
        # Only the server's shutdown cancels a request, once --shutdown-grace is over. Answered here,
        # the client learns why, where uvicorn would log a traceback and send a plain-text 500.
        task = asyncio.current_task()
        if hasattr(task, "uncancel"):  # Python 3.11: the task is no longer being cancelled
            task.uncancel()
        raise HTTPError(503, "the server is shutting down and stopped this request; send it again") from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, nothing is logged

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, error: HTTPError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(CaptionerError)
    async def captioner_error(request: Request, error: CaptionerError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(error).__name__})"}, status_code=500)


class _BodyLimit:
    """Refuses a request body over its path's limit: at once from Content-Length, else while it streams in."""

    def __init__(self, app, limits: dict[str, int]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(send, limit)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPError(413, _too_large_text(limit))
            return message

        await self.app(scope, counted, send)


async def _too_large(send, limit: int) -> None:
    response = JSONResponse({"error": _too_large_text(limit)}, status_code=413)
    await response({"type": "http"}, None, send)


def _too_large_text(limit: int) -> str:
    """The whole request is refused before any file in it is named, so the message names the limit."""
    mib = limit / 2**20
    shown = f"{mib:.0f}" if mib.is_integer() else f"{mib:.2f}"
    return f"the upload is larger than the limit of {shown} MiB ({limit} bytes)"
