"""The HTTP API: in-process through the ASGI test client, and as a real uvicorn process on loopback."""

import contextlib
import json
import os

import pytest
from conftest import SAMPLES, SHARED_SAMPLES
from test_video_source import damage_middle, write_video

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'captioner[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from captioner.pipelines.server import ServerSettings, _too_large_text, create_app  # noqa: E402

CAT = SAMPLES / "chelsea.png"


@pytest.fixture(scope="module")
def client(request):
    from captioner.api import load_model

    app = create_app(load_model(), settings=ServerSettings(max_image_bytes=4 * 2**20, max_video_bytes=8 * 2**20))
    with TestClient(app) as test_client:
        yield test_client


def photo(path, name=None):
    return ("images", (name or path.name, path.read_bytes(), "application/octet-stream"))


def test_health_and_model_description(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["calibrated"] and info["decoding"]["beam_size"] == 5 and info["limits"]["max_images"] == 16


def test_captions_are_the_cli_records_and_decoding_options_apply(client, capsys):
    from captioner.pipelines.cli import main

    response = client.post("/v1/captions", files=[photo(CAT), photo(SHARED_SAMPLES / "coffee.png")])
    assert response.status_code == 200
    records = response.json()["captions"]
    assert main(["caption", "--json", str(CAT)]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert records[0] == {**cli, "path": "chelsea.png"}
    assert records[1]["tags"][0]["label"] == "espresso"
    greedy = client.post("/v1/captions?method=greedy&n_best=1", files=[photo(CAT)]).json()["captions"][0]
    assert "cat" in greedy["caption"]
    three = client.post("/v1/captions", data={"n_best": "3"}, files=[photo(CAT)]).json()["captions"][0]
    assert len(three["n_best"]) == 3 and three["n_best"][0]["caption"] == three["caption"]
    unsure = client.post("/v1/captions?min_confidence=1&fallback=tags",
                         files=[photo(SHARED_SAMPLES / "coffee.png")]).json()["captions"][0]
    assert unsure["caption"] == "a photo of an espresso" and unsure["unsure"] is True


@pytest.mark.parametrize("query, message", [
    ("beam_size=0", "beam_size=0 must be a whole number"),
    ("beam_size=three", "beam_size='three' is not a whole number"),
    ("beam_size=" + "9" * 5000, "beam_size='" + "9" * 40 + "...' is not a whole number"),
    ("shoe_size=9", "unknown option 'shoe_size'"),
    ("fallback=tags", "give min_confidence too"),
    ("method=greedy&beam_size=4", "decoding option beam_size applies to method 'beam' only, not 'greedy'"),
    ("min_confidence=2", "must be a number in [0, 1]"),
    ("concept_boost=0&concept_threshold=0.2", "concept_threshold picks the labels whose words concept_boost raises"),
])
def test_bad_options_are_422_with_the_reason(client, query, message):
    response = client.post(f"/v1/captions?{query}", files=[photo(CAT)])
    assert response.status_code == 422 and message in response.json()["error"]


def test_options_the_model_cannot_act_on_are_422(small_model):
    with TestClient(create_app(small_model)) as bare:  # a model as trained here: no consensus data
        response = bare.post("/v1/captions?consensus_weight=1", files=[photo(CAT)])
        assert response.status_code == 422 and "this model has no consensus.json" in response.json()["error"]
        response = bare.post("/v1/subtitles?consensus_weight=1", files=[("video", ("a.mp4", b"not read", "video/mp4"))])
        assert response.status_code == 422 and "this model has no consensus.json" in response.json()["error"]
        assert bare.post("/v1/captions", files=[photo(CAT)]).status_code == 200


def test_a_video_option_the_sampling_mode_does_not_read_is_422(client):
    response = client.post("/v1/subtitles?max_per_scene=2", files=[("video", ("a.mp4", b"not read", "video/mp4"))])
    assert response.status_code == 422
    assert "video option max_per_scene applies to mode 'scenes' only, not 'uniform'" in response.json()["error"]


def test_odd_requests_get_json_answers_not_redirects_or_silence(client, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    assert client.head("/healthz").status_code == 200 and client.head("/").status_code == 200
    slash = client.post("/v1/captions/", files=[photo(CAT)], follow_redirects=False)
    assert slash.status_code == 404 and "error" in slash.json()
    as_file = client.post("/v1/captions", files=[photo(CAT), ("beam_size", ("b.txt", b"1", "text/plain"))])
    assert as_file.status_code == 422 and "'beam_size' is a file" in as_file.json()["error"]
    for count in (17, 18):
        many = client.post("/v1/captions", files=[photo(tmp_path / "tiny.png")] * count)
        assert many.status_code == 413 and "at most 16" in many.json()["error"]


def test_an_option_given_twice_is_refused_not_resolved_silently(client):
    twice = client.post("/v1/captions?beam_size=1&beam_size=5", files=[photo(CAT)])
    assert twice.status_code == 422 and "beam_size is given more than once" in twice.json()["error"]
    both = client.post("/v1/captions?beam_size=1", data={"beam_size": "5"}, files=[photo(CAT)])
    assert both.status_code == 422 and "beam_size is given more than once" in both.json()["error"]


def test_an_unknown_option_is_answered_with_every_option_the_route_takes(client, tmp_path):
    listed = client.post("/v1/captions?shoe_size=9", files=[photo(CAT)]).json()["error"]
    assert all(name in listed for name in ("beam_size", "min_confidence", "fallback"))
    clip = write_video(tmp_path / "clip.mp4", [("rocket.jpg", 1)])
    listed = client.post("/v1/subtitles?shoe_size=9", files={"video": ("clip.mp4", clip.read_bytes())}).json()["error"]
    assert all(name in listed for name in ("beam_size", "every", "min_confidence", "format"))


def test_bad_uploads_are_4xx_json_naming_the_file_never_500(client, tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    data = (SHARED_SAMPLES / "rocket.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    from PIL import Image

    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    (tmp_path / "page.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    Image.open(CAT).convert("RGB").resize((64, 64)).save(tmp_path / "icon.ico")  # Pillow reads it; we do not take it
    accepted = "not an image in a format accepted here (one of JPEG, PNG, WEBP, GIF, BMP, TIFF)"
    cases = {"notes.jpg": (415, accepted), "cut.jpg": (400, "truncated"), "empty.png": (400, "empty file"),
             "bomb.png": (413, "exceeds"), "page.svg": (415, "not an image"), "icon.ico": (415, accepted)}
    for name, (status, reason) in cases.items():
        response = client.post("/v1/captions", files=[photo(tmp_path / name, "../../etc/" + name)])
        assert (response.status_code, reason in response.json()["error"]) == (status, True), name
        assert "Traceback" not in response.text
    assert client.post("/v1/captions").status_code == 400  # no files at all
    named = client.post("/v1/captions", files=[photo(tmp_path / "cut.jpg", "exceeds.jpg")])
    assert named.status_code == 400  # the status comes from the reason, never from the client's file name
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "error" in missing.json()
    huge = ("images", ("big.jpg", b"\xff" * (5 * 2**20), "image/jpeg"))
    response = client.post("/v1/captions", files=[huge])
    assert (response.status_code, response.json()["error"]) == (413, "the upload is larger than the limit of 4 MiB "
                                                                     "(4194304 bytes)")
    assert _too_large_text(65536 * 2**20) == "the upload is larger than the limit of 65536 MiB (68719476736 bytes)"
    assert client.post("/v1/captions", files=[photo(CAT)] * 17).status_code == 413
    many = client.post("/v1/captions", files=[photo(tmp_path / "notes.jpg")] * 18)  # past the form parser's limit
    assert (many.status_code, many.json()["error"]) == (413, 'more than 17 files in one request; send at most 16 '
                                                              'images, as files named "images", and no other file')
    stray = client.post("/v1/captions", files=[photo(CAT)] * 16 + [("x", ("x.jpg", b"x", "image/jpeg"))] * 3)
    assert stray.status_code == 413 and "no other file" in stray.json()["error"]  # only 16 of them were images


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "B") -> bytes:
    return b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)


def test_an_upload_cut_short_is_refused_not_answered_for_the_files_that_arrived(client):
    parts = [("one.jpg", CAT.read_bytes()), ("two.jpg", CAT.read_bytes()), ("three.jpg", CAT.read_bytes())]
    headers = {"content-type": "multipart/form-data; boundary=B"}
    whole = client.post("/v1/captions", content=_multipart(parts) + b"--B--\r\n", headers=headers)
    assert [r["path"] for r in whole.json()["captions"]] == ["one.jpg", "two.jpg", "three.jpg"]
    cut_bodies = {"no closing boundary": _multipart(parts),
                  "the last file cut": _multipart(parts)[:-len(parts[2][1]) // 2],
                  "the last part's headers only": _multipart(parts[:2]) + _multipart([("three.jpg", b"")])[:-4]}
    for how, body in cut_bodies.items():
        response = client.post("/v1/captions", content=body, headers=headers)
        assert response.status_code == 400, how
        assert response.json()["error"].startswith("the upload was cut short: the body ended before its closing"), how


def test_the_closing_boundary_is_seen_when_it_arrives_split_between_chunks():
    import asyncio

    from captioner.pipelines.server import _ClosingBoundary

    def seen(chunks: list[bytes]) -> bool:
        messages = iter([{"type": "http.request", "body": c, "more_body": True} for c in chunks])

        async def receive():
            return next(messages)

        end = _ClosingBoundary(receive, b"boundary")

        async def read_all():
            for _ in chunks:
                await end.receive()
            return end.seen

        return asyncio.run(read_all())

    body = _multipart([("a.jpg", b"\xff\xd8 data")], "boundary") + b"--boundary--\r\n"
    assert all(seen([body[:cut], body[cut:]]) for cut in range(len(body)))
    assert seen([bytes([b]) for b in body])  # a byte at a time
    assert not seen([body[:-4]]) and not seen([body[:-10], body[-10:-4]])


def test_subtitles_for_an_uploaded_video_in_each_format(client, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", [("chelsea.png", 3), ("rocket.jpg", 3)])
    upload = {"video": ("clip.mp4", clip.read_bytes(), "video/mp4")}
    vtt = client.post("/v1/subtitles", files=upload)
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT") and "-->" in vtt.text
    assert vtt.headers["content-type"].startswith("text/vtt")
    srt = client.post("/v1/subtitles?format=srt&every=1", files=upload)
    assert srt.text.startswith("1\n00:00:00,000 --> ")
    cues = client.post("/v1/subtitles", data={"format": "json"}, files=upload).json()["cues"]
    assert cues and "cat" in cues[0]["text"]
    bad = client.post("/v1/subtitles", files={"video": ("clip.mp4", b"not a video at all", "video/mp4")})
    assert bad.status_code == 415 and bad.json()["error"].startswith("clip.mp4: ")
    empty = client.post("/v1/subtitles", files={"video": ("clip.mp4", b"", "video/mp4")})
    assert (empty.status_code, empty.json()["error"]) == (400, "clip.mp4: empty file")  # as for an empty photo
    assert client.post("/v1/subtitles?format=doc", files=upload).status_code == 422
    assert client.post("/v1/subtitles?every=0", files=upload).status_code == 422
    two = client.post("/v1/subtitles", files=[("video", ("a.mp4", clip.read_bytes(), "video/mp4")),
                                              ("video", ("b.mp4", clip.read_bytes(), "video/mp4"))])
    assert two.status_code == 400 and two.json()["error"].startswith("2 videos: send one per request")
    three = client.post("/v1/subtitles", files=[("video", (f"{n}.mp4", b"x", "video/mp4")) for n in "abc"])
    assert (three.status_code, three.json()["error"]) == (
        400, 'more than 2 files in one request: send one video, as a file named "video", and no other file')
    assert os.listdir(client.app.state.captioner["folder"]) == []  # every upload gone from the private folder


def test_a_video_with_frames_over_the_pixel_limit_is_413_before_any_frame_is_captioned(client, tmp_path,
                                                                                       monkeypatch):
    import captioner.pipelines.video_source

    monkeypatch.setattr(captioner.pipelines.video_source, "MAX_PIXELS", 320 * 240 - 1)
    clip = write_video(tmp_path / "clip.mp4", [("chelsea.png", 1)])
    batcher = client.app.state.captioner["batcher"]
    before = sum(batcher.batch_sizes)
    answer = client.post("/v1/subtitles", files={"video": ("clip.mp4", clip.read_bytes(), "video/mp4")})
    assert answer.status_code == 413 and answer.json()["error"] == ("clip.mp4: 320x240 pixels per frame exceeds "
                                                                    f"the limit of {320 * 240 - 1}")
    assert sum(batcher.batch_sizes) == before


def test_a_video_past_its_timeout_gets_504_and_its_frames_stop_reaching_the_batcher(tmp_path):
    import time

    from captioner.api import load_model

    clip = write_video(tmp_path / "long.mp4", [("chelsea.png", 30), ("rocket.jpg", 30)])  # 600 frames
    app = create_app(load_model(), settings=ServerSettings(timeout=1.0))
    with TestClient(app) as test_client:
        batcher = app.state.captioner["batcher"]
        response = test_client.post("/v1/subtitles?every=0.1", files={"video": ("long.mp4", clip.read_bytes())})
        assert response.status_code == 504 and "longer than 1 s" in response.json()["error"]
        assert batcher.batch_sizes  # the frames went through the server's batcher
        time.sleep(2.0)  # a batch already submitted finishes (at most 16 frames)
        stopped = sum(batcher.batch_sizes)
        time.sleep(2.0)
        assert sum(batcher.batch_sizes) == stopped < 600  # nothing more after the request ended
        assert test_client.post("/v1/captions", files=[photo(CAT)]).status_code == 200
        assert os.listdir(app.state.captioner["folder"]) == []


def test_warnings_about_a_damaged_video_name_the_upload_not_the_servers_file(client, tmp_path):
    clip = damage_middle(write_video(tmp_path / "clip.mp4", [("chelsea.png", 5.0), ("rocket.jpg", 5.0)]))
    answer = client.post("/v1/subtitles?format=json&every=2", files={"video": ("holiday.mp4", clip.read_bytes())})
    assert answer.status_code == 200
    warnings = answer.json()["warnings"]
    assert warnings and warnings[0].startswith("holiday.mp4: skipped undecodable frames at ")
    assert "notes" in answer.json() and "captioner-serve" not in answer.text


@contextlib.contextmanager
def server_in_thread(settings):
    """A real uvicorn server in this process, on loopback, serving the default model with ``settings``."""
    import threading
    import time

    import uvicorn
    from conftest import free_port

    from captioner.api import load_model

    app = create_app(load_model(), settings=settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def quick_server():
    """A real uvicorn server, in this process, whose requests time out after 4 s."""
    with server_in_thread(ServerSettings(timeout=4.0)) as server:
        yield server


def _partial_upload(server, stop_after: float):
    """Headers and half of a one-photo body; then the server's answer within ``stop_after`` s (None: none)."""
    import socket

    body = CAT.read_bytes()
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body) + 200}\r\n\r\n--b\r\n").encode()
    connection = socket.create_connection(("127.0.0.1", server.config.port))
    connection.sendall(head + b'Content-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
                       + body[: len(body) // 2])
    connection.settimeout(stop_after)
    answer = b""
    try:
        while True:  # headers and body may come in separate segments: read until the body is whole
            chunk = connection.recv(4096)
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), None)
            if not chunk or (length is not None and len(body) >= length):
                return answer or None
    except TimeoutError:
        return answer or None
    finally:
        connection.close()


def test_an_upload_that_stalls_gets_504_within_the_timeout(quick_server):
    answer = _partial_upload(quick_server, stop_after=10.0)
    assert answer is not None and answer.startswith(b"HTTP/1.1 504") and b"longer than 4 s" in answer


def test_a_client_that_goes_away_mid_upload_is_not_an_error_of_the_server(quick_server, caplog):
    import logging
    import socket
    import time

    server_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    server_log.addHandler(caplog.handler)
    try:
        body = CAT.read_bytes()
        connection = socket.create_connection(("127.0.0.1", quick_server.config.port))
        connection.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                           f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
        connection.close()
        time.sleep(0.5)
    finally:
        server_log.removeHandler(caplog.handler)
    assert "Exception in ASGI application" not in caplog.text


def test_photos_past_their_timeout_stop_and_leave_the_batcher_to_the_next_request(quick_server, caplog):
    import gc
    import time

    import httpx

    url = f"http://127.0.0.1:{quick_server.config.port}/v1/captions"
    heavy = "?beam_size=64&n_best=64&max_length=100&min_length=99"  # far over 4 s for 16 photos on 2 cores
    answer = httpx.post(url + heavy, files=[photo(CAT)] * 16, timeout=60)
    assert answer.status_code == 504
    started = time.monotonic()
    after = httpx.post(url, files=[photo(CAT)], timeout=60)
    assert after.status_code == 200 and time.monotonic() - started < 4  # not queued behind the abandoned search
    gc.collect()  # asyncio reports an outcome nobody retrieved when its future is collected
    assert "never retrieved" not in caplog.text


def test_photos_whose_client_went_away_stop_at_once_and_leave_the_batcher_to_the_next_request(quick_server):
    import socket
    import time

    import httpx

    batcher = quick_server.config.app.state.captioner["batcher"]
    earlier = sum(batcher.batch_sizes)
    head = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    part = head + CAT.read_bytes() + b"\r\n"
    body = part * 16 + b"--b--\r\n"
    heavy = "beam_size=64&n_best=64&max_length=100&min_length=99"  # far over 4 s for 16 photos on 2 cores
    connection = socket.create_connection(("127.0.0.1", quick_server.config.port))
    connection.sendall(f"POST /v1/captions?{heavy} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                       f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.0)
    assert sum(batcher.batch_sizes) == earlier + 16  # the 16 photos are being captioned
    connection.close()
    started = time.monotonic()
    after = httpx.post(f"http://127.0.0.1:{quick_server.config.port}/v1/captions", files=[photo(CAT)], timeout=60)
    assert after.status_code == 200 and "cat" in after.json()["captions"][0]["caption"]
    assert time.monotonic() - started < 2  # the abandoned search stopped; its timeout was 3 s away
    assert sum(batcher.batch_sizes) == earlier + 16 + 1  # the cat's own batch, after the 16


def test_a_video_whose_client_went_away_stops_before_its_timeout(quick_server, tmp_path):
    import socket
    import time

    clip = write_video(tmp_path / "long.mp4", [("chelsea.png", 30), ("rocket.jpg", 30)])  # 600 frames
    batcher = quick_server.config.app.state.captioner["batcher"]
    before = sum(batcher.batch_sizes)
    body = (b'--b\r\nContent-Disposition: form-data; name="video"; filename="long.mp4"\r\n\r\n'
            + clip.read_bytes() + b"\r\n--b--\r\n")
    connection = socket.create_connection(("127.0.0.1", quick_server.config.port))
    connection.sendall(f"POST /v1/subtitles?every=0.1 HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                       f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.0)  # the job is captioning frames
    connection.close()
    time.sleep(1.5)  # noticed at once; a batch already submitted finishes
    stopped = sum(batcher.batch_sizes)
    time.sleep(1.5)
    assert before < stopped == sum(batcher.batch_sizes) < before + 600  # nothing more, well before the 4 s timeout
    assert os.listdir(quick_server.config.app.state.captioner["folder"]) == []


@pytest.mark.slow
def test_a_video_upload_beyond_max_video_jobs_waits_unread(tmp_path):
    import socket
    import threading
    import time

    import httpx

    long = write_video(tmp_path / "long.mp4", [("chelsea.png", 30), ("rocket.jpg", 30)]).read_bytes()
    short = write_video(tmp_path / "short.mp4", [("rocket.jpg", 1)]).read_bytes()
    answers = []
    with server_in_thread(ServerSettings(max_video_jobs=1)) as server:
        port = server.config.port
        gate = server.config.app.state.captioner["video_requests"]
        body = (b'--b\r\nContent-Disposition: form-data; name="video"; filename="long.mp4"\r\n\r\n'
                + long + b"\r\n--b--\r\n")
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(f"POST /v1/subtitles?every=0.1 HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                           f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)  # the long video holds the one job
        second = threading.Thread(target=lambda: answers.append(httpx.post(
            f"http://127.0.0.1:{port}/v1/subtitles", files={"video": ("short.mp4", short)}, timeout=60)))
        second.start()
        time.sleep(1.0)
        assert (gate.borrowed_tokens, gate.statistics().tasks_waiting) == (1, 1)  # its body not yet read
        connection.close()  # the long job stops; the waiting one goes ahead
        second.join(timeout=60)
        assert answers[0].status_code == 200 and answers[0].text.startswith("WEBVTT")


@pytest.mark.slow
def test_a_stop_signal_waits_for_a_long_video_only_as_long_as_the_grace(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import ROOT, free_port

    clip = write_video(tmp_path / "long.mp4", [("chelsea.png", 60), ("rocket.jpg", 60)])  # 1,200 frames
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "captioner.pipelines.cli", "serve", "--port", str(port),
                               "--shutdown-grace", "1"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        body = (b'--b\r\nContent-Disposition: form-data; name="video"; filename="long.mp4"\r\n\r\n'
                + clip.read_bytes() + b"\r\n--b--\r\n")
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(f"POST /v1/subtitles?every=0.1&beam_size=32 HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           f"multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)  # the job is captioning frames: minutes of them at beam 32 on 2 cores
        stopped = time.time()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)  # without the grace limit: the 120 s request timeout
        assert time.time() - stopped < 1 + 10  # the grace, and a frame batch to finish
        connection.settimeout(10)
        answer = connection.recv(65536)
        connection.close()
        # the stopped request is told why, in JSON; the server's stop is a success (systemd: not a failed unit)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"the server is shutting down' in answer
        log = server.stderr.read().decode()
        assert server.returncode == 0 and "Traceback" not in log and "terminated" not in log, log
    finally:
        server.kill()
        server.wait()


def test_the_private_folder_is_removed_at_shutdown():
    from captioner.api import load_model

    app = create_app(load_model())
    with TestClient(app) as test_client:
        assert test_client.get("/healthz").status_code == 200
        private = app.state.captioner["folder"]
        assert private.is_dir()
    assert not private.exists()


def test_the_page_is_self_contained(client):
    page = client.get("/").text
    assert "<script>" in page and "v1/captions" in page and "v1/subtitles" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


@pytest.mark.slow
def test_a_real_server_captions_concurrent_requests_in_shared_batches(live_server):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def post(_):
        return httpx.post(live_server + "/v1/captions", files=[photo(CAT)], timeout=60).json()["captions"][0]

    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(post, range(16)))
    assert {r["caption"] for r in records} == {"a cat is playing with a toy"}
    cors = httpx.options(live_server + "/v1/captions", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in cors.headers  # CORS is off unless asked


def test_the_pixel_budget_lets_a_large_picture_decode_only_when_it_fits():
    """Decodes share one budget of pixels: small ones side by side, one too large for what is left waits."""
    import threading
    import time

    from captioner.pipelines.server import PixelBudget

    budget, events = PixelBudget(100), []
    first_in, release_first = threading.Event(), threading.Event()

    def hold(name: str, pixels: int, entered: threading.Event | None = None, leave: threading.Event | None = None):
        with budget.hold(pixels):
            events.append(f"{name} in ({budget.used})")
            if entered is not None:
                entered.set()
            if leave is not None:
                leave.wait(10)
        events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("a", 60, first_in, release_first))
    first.start()
    assert first_in.wait(10)
    hold("small", 30)  # fits beside a: no wait
    late = threading.Thread(target=hold, args=("large", 1000))  # more than all: waits until a is done, then alone
    late.start()
    time.sleep(0.2)
    assert events == ["a in (60)", "small in (90)", "small out"]
    release_first.set()
    first.join(10)
    late.join(10)
    assert events[3:] == ["a out", "large in (100)", "large out"] and budget.used == 0
