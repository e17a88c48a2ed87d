"""The HTTP service end to end: a real server on a free port in a background thread, driven with http.client,
generating with the tiny random model."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from conftest import make_image

from img2vid import Pipeline, server_queue, server_requests
from img2vid import server as server_module
from img2vid.cli import main
from img2vid.errors import NonFiniteVideo
from img2vid.server import Handler, generate, make_server, parse_params
from img2vid.video import read_video

H, W, FRAMES, STEPS = 32, 48, 3, 2  # the tiny model needs multiples of 4 (2 VAE levels x 2 UNet levels)
SMALL = {"height": H, "width": W, "frames": FRAMES, "steps": STEPS}
LIMIT = 64 * 1024  # a small body limit keeps the 413 test cheap


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny", seed=3)


@pytest.fixture(scope="module")
def address(pipe) -> Iterator[tuple[str, int]]:
    server = make_server(pipe, "127.0.0.1", 0, model="tiny", max_body=LIMIT, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    make_image(56, 40, seed=0).save(buf, format="PNG")
    return buf.getvalue()


def request(
    address, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(address, body: bytes, job: str | None = None, **params) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Img2vid-Job": job} if job else None
    return request(address, "POST", "/generate?" + urlencode({**SMALL, **params}), body, headers)


def progress(address, job: str | None = None) -> dict:
    status, headers, body = request(address, "GET", "/progress" + (f"?job={job}" if job else ""))
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"  # a cached answer would freeze the page's display
    return json.loads(body)


def poll_until(address, condition, timeout: float = 30) -> dict:
    """/progress until `condition(state)` holds; fails (never hangs) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition(state := progress(address)):
        assert time.monotonic() < deadline, f"/progress never got there; last: {state}"
        time.sleep(0.01)
    return state


def frames_of(video: bytes, fmt: str, tmp_path: Path) -> np.ndarray:
    path = tmp_path / f"got.{fmt}"
    path.write_bytes(video)
    return read_video(path)[0]


def test_page_has_the_form(address):
    status, headers, body = request(address, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for field in ("image", "frames", "steps", "fps", "motion_bucket_id", "noise_aug_strength", "min_guidance"):
        assert f'id="{field}"' in page
    for field in ("max_guidance", "guidance_reuse", "seed", "resize", "format", "segments", "go"):
        assert f'id="{field}"' in page
    assert "fetch(" in page and "/generate" in page and "<option>gif</option>" in page
    # polls /progress while generating, naming its request so it can tell its own progress from a queue
    assert (
        'fetch("/progress?job=" + job' in page
        and "p.ahead" in page
        and "setInterval(" in page
        and "clearInterval(timer)" in page
    )
    assert '"X-Img2vid-Job": job' in page
    # Stop aborts the request, which closes the connection: the server then stops the generation (tests below)
    assert 'id="stop"' in page and "new AbortController()" in page and "signal: abort.signal" in page
    assert "URL.revokeObjectURL(shown)" in page  # each new video frees the last one's blob
    assert "http://" not in page and "https://" not in page  # self-contained: no external assets


def test_health(address):
    status, headers, body = request(address, "GET", "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["ok"] is True and payload["model"] == "tiny" and payload["version"]


def test_generate_mp4_is_seeded_and_reproducible(address, png, tmp_path):
    status, headers, video = post(address, png, seed=42, motion_bucket_id=30, fps=6)
    assert status == 200, video
    assert headers["content-type"] == "video/mp4" and headers["x-img2vid-seed"] == "42"
    info = json.loads(headers["x-img2vid-params"])
    assert info["num_frames"] == FRAMES and info["motion_bucket_id"] == 30 and info["fps"] == 6
    assert (info["width"], info["height"], info["num_inference_steps"]) == (W, H, STEPS)
    assert (info["format"], info["device"], info["dtype"]) == ("mp4", "cpu", "float32")
    frames = frames_of(video, "mp4", tmp_path)
    assert frames.shape == (FRAMES, H, W, 3)
    _, headers2, video2 = post(address, png, seed=42, motion_bucket_id=30, fps=6)
    assert headers2["x-img2vid-seed"] == "42"
    assert video2 == video or np.array_equal(frames_of(video2, "mp4", tmp_path), frames)
    assert info["guidance_reuse"] == 1 and info["segments"] == 1  # exact guidance, one segment unless asked


def test_guidance_reuse_reaches_the_pipeline(address, png, tmp_path):
    """The approximate mode is a request parameter too, recorded with the video; it changes the frames."""
    _, headers, exact = post(address, png, seed=7, format="webm")
    status, headers, reused = post(address, png, seed=7, guidance_reuse=2, format="webm")
    assert status == 200, reused
    assert json.loads(headers["x-img2vid-params"])["guidance_reuse"] == 2
    assert not np.array_equal(frames_of(reused, "webm", tmp_path), frames_of(exact, "webm", tmp_path))


def test_segments_make_a_longer_video(address, png, tmp_path):
    """segments=2 chains a second segment from the first one's last frame: 2*(F-1)+1 frames, recorded."""
    status, headers, video = post(address, png, seed=9, segments=2, format="webm")
    assert status == 200, video
    info = json.loads(headers["x-img2vid-params"])
    assert info["segments"] == 2 and info["num_frames"] == FRAMES and info["seed"] == 9
    assert info["video_frames"] == 2 * (FRAMES - 1) + 1
    assert frames_of(video, "webm", tmp_path).shape == (2 * (FRAMES - 1) + 1, H, W, 3)


def test_concurrent_requests_both_succeed(address, png):
    # The lock serialises generations on the shared model; both callers get their own seeded video.
    results: dict[int, tuple[int, dict[str, str], bytes]] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, post(address, png, seed=s))) for s in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {s: (r[0], r[1]["x-img2vid-seed"]) for s, r in results.items()} == {5: (200, "5"), 6: (200, "6")}
    assert results[5][2] != results[6][2]


def test_random_seed_is_reported(address, png):
    status, headers, _ = post(address, png)
    assert status == 200 and int(headers["x-img2vid-seed"]) >= 0


@pytest.mark.parametrize("fmt, mime", [("gif", "image/gif"), ("webm", "video/webm")])
def test_other_formats_and_resize(address, png, tmp_path, fmt, mime):
    status, headers, video = post(address, png, format=fmt, resize="crop", seed=1)
    assert status == 200, video
    assert headers["content-type"] == mime
    assert frames_of(video, fmt, tmp_path).shape == (FRAMES, H, W, 3)


@pytest.mark.parametrize(
    "body, params, expected",
    [
        (b"not an image at all", {}, "not an image"),
        (None, {"steps": 0}, "steps: 0 is out of range 1..1000"),
        (None, {"steps": "many"}, "steps: expected an integer, got 'many'"),
        (None, {"frames": 300}, "frames: 300 is out of range 1..256"),
        (None, {"guidance_reuse": 0}, "guidance_reuse: 0 is out of range 1..1000"),
        (None, {"segments": 0}, "segments: 0 is out of range 1..64"),
        (None, {"segments": 2, "frames": 1}, "2 segments need at least 2 frames per segment, got 1"),
        (None, {"width": 50}, "width 50 is not a multiple of 4"),
        (None, {"min_guidance": 4, "max_guidance": 2}, "min_guidance 4.0 is above max_guidance 2.0"),
        (None, {"format": "avi"}, "format must be one of mp4, webm, gif"),
        (None, {"colour": "red"}, "unknown parameter 'colour'"),
        (b"", {}, "no image"),
    ],
)
def test_bad_input_is_400_with_one_line(address, png, body, params, expected):
    status, headers, text = post(address, png if body is None else body, **params)
    assert status == 400 and headers["content-type"].startswith("text/plain")
    line = text.decode()
    assert expected in line and line.endswith("\n") and line.count("\n") == 1 and "Traceback" not in line


def test_truncated_image_is_400(address, png):
    status, _, text = post(address, png[: len(png) // 2])
    assert status == 400 and b"truncated or corrupt" in text


def test_oversized_body_is_413_without_reading_it(address):
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Length", str(LIMIT + 1))
        conn.endheaders()  # the body is never sent: the server must answer from the header alone
        r = conn.getresponse()
        assert r.status == 413 and b"over the limit" in r.read()
    finally:
        conn.close()


def test_unknown_path_is_404(address):
    assert request(address, "GET", "/nope")[0] == 404
    assert request(address, "POST", "/nope", b"x")[0] == 404


def raw(address, data: bytes, timeout: float = 10, half_close: bool = False) -> bytes:
    """Send raw bytes (what http.client would refuse to), then read until the server closes the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # the client's side ends here: no more body is coming
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# \xb2: latin-1 superscript two, which str.isdigit() accepts and int() refuses; 5000 digits: over int()'s limit;
# two different lengths: which one? (request smuggling's trick)
@pytest.mark.parametrize(
    "length_headers, code, message",
    [
        (b"Content-Length: \xb2\r\n", b"411 ", b"Content-Length"),
        (b"Content-Length: " + b"9" * 5000 + b"\r\n", b"413 ", b"over the limit"),
        (b"Content-Length: 2\r\nContent-Length: 100\r\n", b"411 ", b"one valid Content-Length"),
        # chunked framing beside a length: its chunk sizes were read as the image's bytes
        (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"411 ", b"(not chunked)"),
    ],
    ids=["superscript", "5000-digits", "two-values", "chunked-and-length"],
)
def test_malformed_content_length_gets_an_answer(address, length_headers, code, message):
    reply = raw(address, b"POST /generate HTTP/1.1\r\nHost: [::1]\r\n" + length_headers + b"\r\nab", half_close=True)
    head, _, text = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 " + code) and message in text and text.count(b"\n") == 1


def test_a_multipart_form_upload_is_told_to_send_the_image_itself(address, png):
    """curl -F image=@x.png (or an HTML form) sends a multipart body: it said "not an image", now what to do."""
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    status, _, text = request(address, "POST", "/generate?" + urlencode(SMALL), png, headers)
    assert (
        status == 400
        and text == b"send the image itself as the request body (curl --data-binary @in.png), not a form\n"
    )


def test_body_shorter_than_its_content_length_is_400(address, png):
    """A client that closes early sent a prefix: even one that decodes (here the whole PNG) is not the upload."""
    head = f"POST /generate?{urlencode(SMALL)} HTTP/1.1\r\nContent-Length: {len(png) + 10}\r\n\r\n".encode()
    reply = raw(address, head + png, half_close=True)
    assert reply.startswith(b"HTTP/1.0 400") and f"ended after {len(png)} of its {len(png) + 10}".encode() in reply


def test_oversized_body_is_drained_so_the_client_reads_the_413(address):
    """http.client (as a browser) sends the whole body before it reads: closing on it unread reset the connection."""
    status, _, text = request(address, "POST", "/generate", b"x" * (160 * LIMIT))
    assert status == 413 and b"over the limit" in text


def test_stalled_and_idle_clients_time_out(address, monkeypatch):
    monkeypatch.setattr(Handler, "timeout", 0.3)  # read when a connection starts
    start = time.monotonic()
    reply = raw(address, b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789")  # 90 bytes short
    assert reply.startswith(b"HTTP/1.0 408") and b"stalled" in reply
    assert raw(address, b"") == b""  # an idle connection is closed, not held forever
    assert time.monotonic() - start < 5


def test_wrong_method_is_405_and_stdlib_errors_are_plain_text(address):
    status, headers, text = request(address, "GET", "/generate")
    assert (status, headers["allow"], text) == (405, "POST", b"/generate takes POST with the image as the body\n")
    status, headers, _ = request(address, "POST", "/health", b"x")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, text = request(address, "PUT", "/generate", b"x")  # http.server's own error path
    assert status == 501 and headers["content-type"].startswith("text/plain") and text.count(b"\n") == 1


def test_huge_size_is_400_before_any_work(address, png, monkeypatch):
    status, _, text = post(address, png, width=4096, height=4096)
    assert status == 400 and b"4096x4096 is over this server's limit" in text
    status, _, text = post(address, png, width=10**400, height=64)  # past any encoder; fit_size would overflow
    assert status == 400 and b"width: 100000000000...(401 characters) is out of range 1..16384" in text, text
    # resize=fit keeps the image's aspect at about width*height pixels: far more for a 1x400 sliver, so the limit
    # holds for the size it picks (4x780 here), not just for the one asked for
    monkeypatch.setattr(server_requests, "MAX_PIXELS", W * H)
    sliver = io.BytesIO()
    make_image(1, 400).save(sliver, format="PNG")
    status, _, text = post(address, sliver.getvalue(), resize="fit")
    assert status == 400 and f"over this server's limit of {W * H} pixels".encode() in text


def test_long_video_over_the_limit_is_400_before_any_work(address, png, monkeypatch):
    """A chain of segments stays on the host until encoded: frames x segments is capped in pixels, before the lock."""
    monkeypatch.setattr(server_requests, "MAX_VIDEO_PIXELS", 10 * W * H)
    status, _, text = post(address, png, frames=4, segments=3)  # 3 * (4 - 1) + 1 = 10 frames: at the limit
    assert status == 200, text
    status, _, text = post(address, png, frames=4, segments=4)  # 13 frames
    assert status == 400 and f"13 frames of {W}x{H} are over this server's limit".encode() in text, text
    # steps=1000&segments=64 passed every check and would have held the GPU for hours: steps are capped too
    status, _, text = post(address, png, steps=500, segments=3)
    assert status == 400 and text == b"500 steps x 3 segments is over this server's limit of 1000 steps a request\n"


def test_fit_passes_the_image_at_the_video_size(pipe):
    """resize=fit crops the image to the size it chose (in the model's multiple): resize_image's own "fit" chose
    again in multiples of 64, another size, which the pipeline then stretched to this one."""
    sizes = []

    class Spy:  # the pipeline, recording the size of the image each call is given
        config, default_decode_chunk_size = pipe.config, pipe.default_decode_chunk_size
        device, dtype = pipe.device, pipe.dtype

        def __call__(self, image, **kw):
            sizes.append(image.size)
            return pipe(image, **kw)

    params = parse_params(urlencode({**SMALL, "resize": "fit", "width": 40, "height": 40, "seed": 1}))
    _, info = generate(Spy(), make_image(30, 100, seed=0), params, None)
    assert sizes == [(info["width"], info["height"])] and info["resize"] == "fit"
    assert info["width"] < info["height"]  # the portrait's aspect, about 40 x 40 pixels


def test_bad_size_does_not_wait_for_a_running_generation(address, png, monkeypatch):
    """Size and segment checks need the model's config, not the model: a typo is answered while another request
    holds the generation lock."""
    reached, release = hold_generations(monkeypatch)
    first = threading.Thread(target=post, args=(address, png), kwargs={"seed": 1})
    first.start()
    try:
        assert reached.wait(30)
        conn = http.client.HTTPConnection(*address, timeout=5)  # far less than the held generation
        conn.request("POST", "/generate?" + urlencode({**SMALL, "width": 50}), body=png)
        r = conn.getresponse()
        assert r.status == 400 and b"width 50 is not a multiple of 4" in r.read()
        conn.close()
        assert progress(address)["busy"]  # answered while the generation was still held
    finally:
        release.set()
        first.join(timeout=60)


def test_client_gone_before_the_response_is_no_traceback(address, png, monkeypatch, capsys):
    reached, release = hold_generations(monkeypatch)
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(f"POST /generate?{urlencode(SMALL)} HTTP/1.1\r\nContent-Length: {len(png)}\r\n\r\n".encode() + png)
    try:
        assert reached.wait(30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: a reset, so the server's first write fails
    finally:
        release.set()
    poll_until(address, lambda p: not p["busy"])
    time.sleep(0.2)  # the handler writes after the lock is released
    assert "Traceback" not in capsys.readouterr().err
    assert request(address, "GET", "/health")[0] == 200


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here")
def test_ipv6_host(pipe):
    try:
        socket.socket(socket.AF_INET6).close()
        server = make_server(pipe, "::1", 0, quiet=True)
    except OSError as e:
        if "family" not in str(e):
            pytest.skip(f"no IPv6 loopback here: {e}")
        raise  # "Address family for hostname not supported": the server's own fault
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert request(("::1", server.server_address[1]), "GET", "/health")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_serve_is_a_cli_command(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--model", "--device", "--dtype", "--low-memory", "--compile"):
        assert option in out
    assert main(["serve", "--port", "70000"]) == 2
    assert "70000 is out of range 0..65535" in capsys.readouterr().err


def test_serve_binds_before_loading_the_model(address, tmp_path, capsys, monkeypatch):
    """A port in use is reported at once, in a line naming it, not after a model load of a minute."""
    import img2vid.cli

    def no_load(*args: object) -> None:
        raise AssertionError("the model was loaded before the port was bound")

    monkeypatch.setattr(img2vid.cli, "load_pipeline", no_load)
    model = Pipeline.from_config("tiny", seed=0).save_pretrained(tmp_path / "m")
    host, port = address
    assert main(["serve", "--model", str(model), "--host", host, "--port", str(port), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"img2vid: error: cannot serve on {host}:{port}: "), lines


def test_serve_shows_clients_model_names_not_local_paths(tmp_path, monkeypatch):
    """/health and X-Img2vid-Params name a local model (and a --unet) by its own name, not by where it lies on the
    server's disk: a server given --host answers anyone on the network. A hub id is shown as it is."""
    import img2vid.server

    seen = {}

    def no_serve(server, model=None):
        seen.update(model=server.model, settings=server.settings, printed=model)
        server.server_close()
        return 0

    monkeypatch.setattr(img2vid.server, "serve", no_serve)
    private = tmp_path / "home" / "someone" / "private"
    model = Pipeline.from_config("tiny", seed=0).save_pretrained(private / "my-svd")
    unet = Pipeline.from_config("tiny", seed=1).save_pretrained(private / "my-unet") / "unet"
    args = ["serve", "--model", str(model), "--unet", str(unet), "--port", "0", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert seen["model"] == "my-svd" and seen["settings"]["unet"] == "unet" and seen["printed"] == str(model)
    assert "someone" not in json.dumps(seen["settings"])


def test_progress_when_idle(address):
    assert progress(address) == {"busy": False, "waiting": 0}


def expected_reports(steps: int, chunks: int, segments: int) -> list[tuple]:
    """What one generation reports: per segment denoise 0..steps (0 before the first step), then its decode chunks;
    then export, uncounted."""
    one = [("denoise", i, steps) for i in range(steps + 1)] + [("decode", i, chunks) for i in range(1, chunks + 1)]
    return [(*r, k, segments) for k in range(1, segments + 1) for r in one] + [("export", 0, 0, segments, segments)]


@pytest.mark.parametrize(
    "segments, frames, steps, chunk, chunks",
    [(1, FRAMES, STEPS, None, 1), (2, FRAMES, STEPS, None, 1), (1, 5, 3, 2, 3)],  # chunk 2: low-memory's decoding
)
def test_generate_reports_progress(pipe, monkeypatch, segments, frames, steps, chunk, chunks):
    monkeypatch.setattr(pipe, "default_decode_chunk_size", chunk)
    reports: list[tuple] = []
    params = parse_params(urlencode({**SMALL, "frames": frames, "steps": steps, "segments": segments, "seed": 4}))
    video, info = generate(pipe, make_image(56, 40, seed=0), params, "tiny", lambda *r: reports.append(r))
    assert video and info["segments"] == segments and info["decode_chunk_size"] == (chunk or frames)
    assert reports == expected_reports(steps, chunks, segments)


def test_generate_passes_every_parameter_to_the_pipeline(pipe, monkeypatch):
    """The frames a request encodes are the library call's with the request's fps, motion bucket, noise
    augmentation, guidance and steps (a parameter dropped on the way, e.g. noise_aug_strength left at its default,
    changed no reply but the video)."""
    import torch

    import img2vid.video

    encoded = []
    monkeypatch.setattr(img2vid.video, "export_video", lambda video, path, **kw: encoded.append(video) or path)
    query = {**SMALL, "seed": 9, "fps": 11, "motion_bucket_id": 40, "noise_aug_strength": 0.3}
    query.update(min_guidance=1.5, max_guidance=2.5, resize="stretch")
    image = make_image(56, 40, seed=0)
    with pytest.raises(FileNotFoundError):  # the stand-in writes nothing: the frames are what it kept
        generate(pipe, image, parse_params(urlencode(query)), "tiny")
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, fps=11, motion_bucket_id=40)
    kw.update(noise_aug_strength=0.3, min_guidance_scale=1.5, max_guidance_scale=2.5, decode_chunk_size=FRAMES)
    want = pipe(image, generator=torch.Generator().manual_seed(9), output_type="pt", **kw).frames[0]
    assert torch.equal(encoded[0], want)
    default = pipe(image, generator=torch.Generator().manual_seed(9), output_type="pt", **{**kw, "fps": 7}).frames[0]
    assert not torch.equal(encoded[0], default)


def test_generate_without_report_still_works(pipe):
    video, info = generate(pipe, make_image(56, 40, seed=0), parse_params(urlencode({**SMALL, "seed": 4})), None)
    assert video and info["seed"] == 4


def test_progress_while_generating_and_queued(address, png, monkeypatch):
    """A generation held after its first denoise step: /progress shows it busy with that step and its job, then a
    second request queued behind it; both finish and /progress is idle again."""
    reached, release = threading.Event(), threading.Event()
    real = Pipeline.__call__

    def held(self, *args, progress, **kwargs):
        def hook(stage: str, done: int, total: int) -> None:
            progress(stage, done, total)
            if stage == "denoise" and done == 1 and not release.is_set():
                reached.set()
                release.wait(30)  # bounded: a failing test must not hang the suite

        return real(self, *args, progress=hook, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    results: dict[str, int] = {}
    threads = [
        threading.Thread(
            target=lambda j=j, s=s: results.__setitem__(j, post(address, png, job=j, seed=1, segments=s)[0])
        )
        for j, s in (("first", 2), ("second", 1))
    ]
    try:
        threads[0].start()
        assert reached.wait(30), "the first generation never reached its first step"
        state = progress(address, job="first")
        assert state == {
            "busy": True, "job": "first", "stage": "denoise", "done": 1, "total": STEPS, "segment": 1, "segments": 2,
            "waiting": 0,
        }  # fmt: skip
        # another client's token is shown only to the client that sent it
        assert progress(address)["job"] is None and progress(address, job="other")["job"] is None
        threads[1].start()
        state = poll_until(address, lambda p: p["waiting"] == 1)
        assert state["busy"] and state["job"] is None and (state["stage"], state["done"]) == ("denoise", 1)
        assert progress(address, job="second") == {**state, "ahead": 0}
    finally:
        release.set()
        for t in threads:
            t.join(timeout=60)
    assert results == {"first": 200, "second": 200}
    assert progress(address) == {"busy": False, "waiting": 0}


def test_progress_is_reset_after_a_failing_generation(address, png, monkeypatch):
    def broken(self, *args, progress, **kwargs):
        progress("denoise", 1, STEPS)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(Pipeline, "__call__", broken)
    status, _, text = post(address, png, job="doomed", seed=1)
    assert status == 500 and b"out of memory (simulated)" in text
    assert progress(address) == {"busy": False, "waiting": 0}
    monkeypatch.undo()
    assert post(address, png, seed=1)[0] == 200  # the lock was released too


def test_nan_frames_are_a_500_in_one_line_without_a_traceback(address, png, monkeypatch, capfd):
    """A model whose frames come out NaN (bad weights, float16 overflow): the server's failure, not the request's,
    said in its one line; no traceback (it adds nothing to the message)."""

    def nan(self, *args, **kwargs):
        raise NonFiniteVideo("the decoded video holds NaN values: the weights hold NaN or infinite values")

    monkeypatch.setattr(Pipeline, "__call__", nan)
    status, _, text = post(address, png, seed=1)
    assert status == 500 and text.startswith(b"the decoded video holds NaN values"), text
    assert "Traceback" not in capfd.readouterr().err


def test_found_before_the_queue_and_said_in_the_params(address, png, monkeypatch):
    """A GIF over 50 fps is refused before the model runs (it was, after the whole generation); resize=fit's asked
    size and the server's settings (variant, compile, two GPUs) are in X-Img2vid-Params, as in the CLI's sidecar;
    the waiting line is capped (503 with Retry-After) and holds images at the video's size, not the upload's."""

    def never(self, *args, **kwargs):
        raise AssertionError("the model ran")

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "__call__", never)
        status, _, text = post(address, png, format="gif", fps=60)
        assert status == 400 and text == b"fps 60 is too fast for a GIF (at most 50 fps)\n", text
        m.setattr(server_queue, "MAX_WAITING", 0)
        status, headers, text = post(address, png, seed=1)
        assert status == 503 and headers["retry-after"] == "30" and b"requests are waiting already" in text
    held = []
    real = server_module.Server.run_generation

    def spy(self, image, size, *args, **kwargs):
        held.append((image.size, size))
        before, self.settings = self.settings, {"variant": "fp16", "compiled": False, "guidance_parallel": False}
        try:
            return real(self, image, size, *args, **kwargs)
        finally:
            self.settings = before

    monkeypatch.setattr(server_module.Server, "run_generation", spy)
    status, headers, _ = post(address, png, seed=2, resize="fit", width=64, height=64)
    info = json.loads(headers["x-img2vid-params"])
    assert status == 200 and (info["fit_width"], info["fit_height"]) == (64, 64) and info["variant"] == "fp16"
    assert held == [((info["width"], info["height"]),) * 2]  # fitted: the prepared image is the video's size


def test_connections_past_the_cap_get_a_503_at_once(pipe):
    """Each connection takes a thread while it is served: past MAX_CONNECTIONS (clients that connect and send
    nothing, each read waiting up to 60 s) the next one is answered 503 at once and closed, and served again once
    a place is free."""
    server = make_server(pipe, "127.0.0.1", 0, model="tiny", quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = server.server_address[:2]
        for _ in range(server_queue.MAX_CONNECTIONS):  # every place taken, as by idle connections
            assert server.connections.acquire(blocking=False)
        status, headers, text = request(address, "GET", "/health")
        assert (
            status == 503
            and headers["retry-after"] == "30"
            and text == b"too many connections at once; try again later\n"
        )
        # an upload refused so reads the 503 too: its body is drained (closing on it reset the connection, and the
        # sender saw a broken pipe, a browser "Failed to fetch")
        status, _, text = request(address, "POST", "/generate", bytes(2 << 20))
        assert status == 503 and text == b"too many connections at once; try again later\n"
        server.connections.release()
        assert request(address, "GET", "/health")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_one_client_cannot_hold_every_connection_nor_trickle_a_body_forever(pipe, png, monkeypatch):
    """One address trickling headers into all 64 connections (each read waits 60 s) locked every other client
    out: an address holds at most MAX_CONNECTIONS_PER_CLIENT, and its places come back as its connections close;
    a body sent a byte at a time passed every read's wait: the whole body has a deadline (408)."""
    monkeypatch.setattr(server_queue, "MAX_CONNECTIONS_PER_CLIENT", 2)
    monkeypatch.setattr(server_module, "BODY_MIN_S", 0.5)
    monkeypatch.setattr(server_module, "BODY_MIN_RATE", 10**9)
    server = make_server(pipe, "127.0.0.1", 0, model="tiny", quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = server.server_address[:2]
        idle = [socket.create_connection(address, timeout=10) for _ in range(2)]  # 127.0.0.1's two places
        poll = time.monotonic() + 10
        while server._per_client["127.0.0.1"] < 2:  # accepted by the server's thread
            assert time.monotonic() < poll
            time.sleep(0.01)
        status, _, text = request(address, "GET", "/health")
        assert status == 503 and text == b"too many connections at once; try again later\n"
        other = socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0))  # another address
        other.sendall(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert other.recv(12) == b"HTTP/1.0 200"
        other.close()
        idle[0].close()
        poll = time.monotonic() + 10
        while request(address, "GET", "/health")[0] != 200:  # its place came back
            assert time.monotonic() < poll
            time.sleep(0.05)
        idle[1].sendall(f"POST /generate HTTP/1.1\r\nContent-Length: {len(png)}\r\n\r\n".encode() + png[:10])
        for byte in png[10:14]:  # under every read's wait, over the whole body's deadline
            time.sleep(0.2)
            idle[1].sendall(bytes([byte]))
        reply = idle[1].recv(4096)
        assert reply.startswith(b"HTTP/1.0 408") and b"the request body came too slowly" in reply, reply
        idle[1].close()
    finally:
        server.shutdown()
        server.server_close()


def test_peer_closed_sees_the_end_of_stream_only():
    a, b = socket.socketpair()
    try:
        assert not server_module.peer_closed(a)  # open and quiet
        b.sendall(b"GET /health HTTP/1.1\r\n")  # a pipelined next request is not a goodbye, and stays unread
        assert not server_module.peer_closed(a)
        assert a.recv(64).startswith(b"GET /health")
        b.close()
        assert server_module.peer_closed(a)
    finally:
        a.close()
    assert server_module.peer_closed(a)  # our own side closed: nothing to answer either


@pytest.mark.skipif(not hasattr(server_queue.select, "POLLRDHUP"), reason="Linux's POLLRDHUP only")
def test_peer_closed_behind_unread_bytes():
    """A client that sent bytes past its body, then left: the close behind the unread bytes is seen (a peek at the
    first byte saw data forever, and the generation ran to its end for nobody)."""
    a, b = socket.socketpair()
    try:
        b.sendall(b"trailing garbage")
        assert not server_module.peer_closed(a)
        b.close()
        assert server_module.peer_closed(a)
        assert a.recv(64) == b"trailing garbage"  # still left in place
    finally:
        a.close()


def test_peer_closed_on_a_descriptor_past_select_s_limit():
    """A server with over 1024 open files gets sockets select.select refuses: an open client is not gone."""
    import os

    resource = pytest.importorskip("resource")  # Unix; Windows' select has no such limit
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1100:
        pytest.skip("the open-file limit is too low for a descriptor past 1024")
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1100))
    try:
        assert not server_module.peer_closed(high)
        b.close()
        a.close()
        assert server_module.peer_closed(high)
    finally:
        high.close()
        a.close()


def hold_generations(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Generations pause as they start (`reached` is set) until `release`."""
    reached, release = threading.Event(), threading.Event()
    real = Pipeline.__call__

    def held(self, *args, **kwargs):
        reached.set()
        release.wait(30)  # bounded: a failing test must not hang the suite
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    return reached, release


def send_post(address, png: bytes, job: str | None = None, source: str | None = None, **params) -> socket.socket:
    """The request sent, its answer left to read; source: the client's address (another of the loopback network)."""
    sock = socket.create_connection(address, timeout=10, source_address=(source, 0) if source else None)
    query = urlencode({**SMALL, **params})
    head = f"POST /generate?{query} HTTP/1.1\r\nContent-Length: {len(png)}\r\n"
    sock.sendall((head + (f"X-Img2vid-Job: {job}\r\n" if job else "") + "\r\n").encode() + png)
    return sock


def hold_after_first_step(monkeypatch) -> tuple[threading.Event, threading.Event, list[tuple[str, int]]]:
    """Generations pause after their first denoise step (`reached` is set) until `release`; `stopped` gets the
    (stage, done) of each report at which the server found the client gone (ClientGone)."""
    reached, release = threading.Event(), threading.Event()
    stopped: list[tuple[str, int]] = []
    real = Pipeline.__call__

    def held(self, *args, progress, **kwargs):
        def hook(stage: str, done: int, total: int) -> None:
            try:
                progress(stage, done, total)
            except server_module.ClientGone:
                stopped.append((stage, done))
                raise
            if (stage, done) == ("denoise", 1):
                reached.set()
                release.wait(30)  # bounded: a failing test must not hang the suite

        return real(self, *args, progress=hook, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    return reached, release, stopped


def test_a_client_that_leaves_stops_its_generation(address, png, monkeypatch, capsys):
    """Closing the connection mid-generation (a closed browser tab) stops the generation at its next step: the
    lock is free for the next request at once, not after the whole video."""
    reached, release, stopped = hold_after_first_step(monkeypatch)
    sock = send_post(address, png, seed=1, steps=6)
    try:
        assert reached.wait(30)
        sock.close()  # an ordinary close (FIN): the server sees the end of the stream
    finally:
        release.set()
    poll_until(address, lambda p: not p["busy"])
    assert stopped == [("denoise", 2)]  # the step after the client left, not the sixth nor the decode
    assert progress(address) == {"busy": False, "waiting": 0}
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    assert post(address, png, seed=1)[0] == 200  # the lock was released


@pytest.mark.skipif(not hasattr(server_queue.select, "POLLRDHUP"), reason="Linux's POLLRDHUP only")
def test_a_client_that_sent_extra_bytes_and_left_stops_its_generation(address, png, monkeypatch):
    reached, release, stopped = hold_after_first_step(monkeypatch)
    sock = send_post(address, png, seed=1, steps=6)
    try:
        assert reached.wait(30)
        sock.sendall(b"bytes past the Content-Length")
        sock.close()
    finally:
        release.set()
    poll_until(address, lambda p: not p["busy"])
    assert stopped == [("denoise", 2)]


def test_a_queued_client_that_leaves_never_runs(address, png, monkeypatch):
    reached, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = Pipeline.__call__

    def held(self, *args, **kwargs):
        calls.append(1)
        reached.set()
        release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    monkeypatch.setattr(server_queue, "LOCK_POLL_S", 0.02)
    result: list[int] = []
    first = threading.Thread(target=lambda: result.append(post(address, png, seed=1)[0]))
    first.start()
    try:
        assert reached.wait(30)
        queued = send_post(address, png, seed=2)
        poll_until(address, lambda p: p["waiting"] == 1)
        queued.close()
        state = poll_until(address, lambda p: p["waiting"] == 0)
        assert state["busy"]  # the first is still held: the queued one left the queue by itself
    finally:
        release.set()
        first.join(timeout=60)
    assert result == [200] and calls == [1]  # the queued request never reached the pipeline
    assert progress(address) == {"busy": False, "waiting": 0}


NODE = shutil.which("node")
FIELDS = {"width": W, "height": H, "frames": FRAMES, "steps": STEPS, "seed": 5}


def run_page(address, png: bytes, tmp_path: Path, mode: str, **fields) -> dict:
    """The page's own script, run by Node against the server (tests/page_harness.js): what it shows at the end."""
    image = tmp_path / "in.png"
    image.write_bytes(png)
    page_file = Path(server_module.__file__).with_name("page.html")
    harness = Path(__file__).with_name("page_harness.js")
    base = "http://{}:{}".format(*address)
    args = [NODE, str(harness), base, str(page_file), str(image), json.dumps({**FIELDS, **fields}), mode]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="no Node.js to run the page's script")
def test_page_generates_and_shows_the_video(address, png, tmp_path):
    shown = run_page(address, png, tmp_path, "wait")
    assert shown["stopShown"] and shown["stopHidden"] and not shown["goDisabled"]  # Stop only while running
    assert shown["status"].startswith("seed 5, ") and shown["error"] == ""
    assert shown["result"] == ["video", "br", "a"]
    bad = run_page(address, png, tmp_path, "wait", width=50)
    assert bad["error"].startswith("width 50 is not a multiple of 4") and bad["result"] == []


@pytest.mark.skipif(NODE is None, reason="no Node.js to run the page's script")
def test_page_stop_button_stops_the_generation(address, png, monkeypatch, tmp_path):
    _, release, stopped = hold_after_first_step(monkeypatch)  # released once the page has pressed Stop
    try:
        shown = run_page(address, png, tmp_path, "stop", steps=6)
    finally:
        release.set()
    assert shown["statuses"] == ["denoise 1/6"]  # Stop was pressed mid-generation, as the page showed it
    assert (shown["status"], shown["error"], shown["result"]) == ("stopped", "", [])
    assert shown["stopHidden"] and not shown["goDisabled"]
    poll_until(address, lambda p: not p["busy"])
    assert stopped == [("denoise", 2)]  # the server stopped at the next step


def test_queued_requests_run_in_arrival_order(address, png, monkeypatch):
    """First come, first served: the seeds reach the pipeline in the order their requests queued (a polled lock let
    any waiter in, and a request could be overtaken again and again)."""
    reached, release = threading.Event(), threading.Event()
    order: list[int] = []
    real = Pipeline.__call__

    def held(self, *args, generator, **kwargs):
        order.append(generator.initial_seed())
        if len(order) == 1:
            reached.set()
            release.wait(30)
        return real(self, *args, generator=generator, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    monkeypatch.setattr(server_queue, "LOCK_POLL_S", 0.02)
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(post(address, png, seed=100)[0]))
    first.start()
    socks = []
    try:
        assert reached.wait(30)
        for k in range(1, 5):  # each queued before the next is sent
            socks.append(send_post(address, png, seed=100 + k, job=f"j{k}"))
            poll_until(address, lambda p, k=k: p["waiting"] == k)
        # each request's place in the line: those queued before it, not the total (the page's "waiting for N")
        for k in range(1, 5):
            status, _, body = request(address, "GET", f"/progress?job=j{k}")
            assert status == 200 and json.loads(body)["ahead"] == k - 1, body
        assert "ahead" not in json.loads(request(address, "GET", "/progress?job=nobody")[2])
    finally:
        release.set()
        first.join(timeout=60)
    for sock in socks:
        sock.settimeout(60)
        assert sock.recv(12).startswith(b"HTTP/1.0 200")
        sock.close()
    assert results == [200] and order == [100, 101, 102, 103, 104]


def test_one_client_cannot_fill_the_waiting_line(address, png, monkeypatch):
    """A client address holds at most MAX_WAITING_PER_CLIENT of the waiting places (one script's batch filled all of
    them and turned every other client away); another address still gets in line, and both of the first client's
    accepted requests and the other's run."""
    reached, release = hold_generations(monkeypatch)
    monkeypatch.setattr(server_queue, "MAX_WAITING_PER_CLIENT", 1)
    monkeypatch.setattr(server_queue, "LOCK_POLL_S", 0.02)
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(post(address, png, seed=1)[0]))
    first.start()
    socks = []
    try:
        assert reached.wait(30)
        socks.append(send_post(address, png, seed=2))  # from 127.0.0.1, as the running one: it may wait
        poll_until(address, lambda p: p["waiting"] == 1)
        status, headers, text = post(address, png, seed=3)  # a second waiting request of 127.0.0.1
        assert status == 503 and headers["retry-after"] == "30", (status, text)
        assert text == b"1 requests of this client are waiting already; try again later\n", text
        socks.append(send_post(address, png, source="127.0.0.2", seed=4))  # another address of the loopback network
        poll_until(address, lambda p: p["waiting"] == 2)
    finally:
        release.set()
        first.join(timeout=60)
    for sock in socks:
        sock.settimeout(60)
        assert sock.recv(12).startswith(b"HTTP/1.0 200")
        sock.close()
    assert results == [200]


def test_other_sites_and_rebound_names_are_refused(address, png, monkeypatch):
    """Any page the user visits could POST to a local server through the browser (a no-cors fetch needs no
    permission) and run generations on the GPU; a DNS-rebinding page (its name resolved to 127.0.0.1) could read
    /health, /progress and the videos. Such requests carry another site's Origin or Host: 403. The page's own
    requests, curl and scripts (no Origin) are served."""
    host = f"127.0.0.1:{address[1]}"

    def never(self, *args, **kwargs):
        raise AssertionError("the model ran")

    for name in ("attacker.example", f"attacker.example:{address[1]}", "192.168.1.7"):
        status, _, text = request(address, "GET", "/health", headers={"Host": name})
        assert status == 403 and b"is not this machine's name" in text, (name, text)
    for name in (host, f"localhost:{address[1]}", "localhost", f"[::1]:{address[1]}", "127.0.0.2"):
        assert request(address, "GET", "/health", headers={"Host": name})[0] == 200, name
    with monkeypatch.context() as m:
        m.setattr(Pipeline, "__call__", never)
        for headers in ({"Origin": "https://attacker.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            status, _, text = request(address, "POST", "/generate?" + urlencode(SMALL), png, headers)
            assert status == 403 and b"requests from another site" in text, (headers, text)  # read: body drained
    headers = {"Origin": f"http://{host}", "Host": host, "Sec-Fetch-Site": "same-origin"}  # the page's own POST
    assert request(address, "POST", "/generate?" + urlencode({**SMALL, "seed": 1}), png, headers)[0] == 200


def test_errors_show_control_characters_as_replacements_and_forbid_sniffing(address):
    """An error echoing the request showed its control characters raw (a terminal's escape codes reached whoever
    printed the answer); every answer says its type is not to be guessed."""
    reply = raw(address, b"GET /x\x1b[31mred HTTP/1.0\r\n\r\n")
    head, _, text = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 404") and text.startswith("not found: /x\ufffd[31mred (try /".encode()), reply
    assert b"\r\nX-Content-Type-Options: nosniff" in head


def test_bad_guidance_and_long_numbers_are_400_at_once(address, png):
    status, _, text = post(address, png, max_guidance=70000, min_guidance=0)
    assert status == 400 and text == b"max_guidance: 70000 is out of range 0..65504.0\n", text
    status, _, text = post(address, png, width="9" * 5000)
    assert status == 400 and text == b"width: 999999999999...(5000 characters) is out of range 1..16384\n", text
    status, _, text = post(address, png, steps="x" * 3000)
    assert status == 400 and len(text) < 100 and b"expected an integer" in text, text


def test_an_image_declaring_too_many_pixels_is_400_before_decoding(address, monkeypatch):
    monkeypatch.setattr(server_requests, "MAX_INPUT_PIXELS", 100 * 100)
    big = io.BytesIO()
    make_image(101, 100).save(big, format="PNG")
    status, _, text = post(address, big.getvalue())
    assert status == 400 and b"is 101x100: over the limit of 10000 pixels" in text, text


@pytest.mark.parametrize("line", [b"PRI * HTTP/2.0", b"GET /health HTTP/1.x", b"GET /health HTTP/1.1 extra"])
def test_a_bad_request_line_gets_a_status_line(address, line):
    reply = raw(address, line + b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.0 (400|505) ", reply), reply
    assert reply.split(b"\r\n\r\n", 1)[1].count(b"\n") == 1


def test_exotic_formats_and_bad_exif_are_400_and_a_large_image_says_so(address, png, monkeypatch):
    """Formats outside UPLOAD_FORMATS are refused before decoding (Pillow's ICO decodes its PNG while opening, DDS
    raised NotImplementedError: a 500), a bad EXIF block is ignored (SyntaxError: a 500), and the size
    limit's message is its own, not "truncated or corrupt"."""
    ico = io.BytesIO()
    make_image(32, 32).save(ico, format="ICO")
    status, _, text = post(address, ico.getvalue())
    assert status == 400 and b"not an image in a format this server takes" in text, text
    bad_exif = io.BytesIO()
    make_image(64, 64).save(bad_exif, format="PNG", exif=b"Exif\0\0XX\0\0\0\0\0\0")
    status, _, text = post(address, bad_exif.getvalue())
    assert status == 200, text  # a malformed EXIF block is ignored: the pixels are fine (images.load_image)
    monkeypatch.setattr(server_requests, "MAX_INPUT_PIXELS", 100 * 100)
    big = io.BytesIO()
    make_image(101, 100).save(big, format="PNG")
    status, _, text = post(address, big.getvalue())
    assert status == 400 and text.startswith(b"the uploaded image is 101x100: over the limit"), text


def test_a_large_post_to_another_path_still_reads_its_answer(address):
    """A 4 MB body POSTed to /health or an unknown path: the 405 / 404 reaches Python's http.client (the unread
    body used to reset the connection, a BrokenPipeError on the client's side)."""
    for path, code in (("/health", 405), ("/nope", 404)):
        conn = http.client.HTTPConnection(*address, timeout=30)
        conn.request("POST", path, b"\0" * 4_000_000)
        assert conn.getresponse().status == code
        conn.close()


def test_raw_utf8_in_the_query_and_path_is_echoed_as_sent(address, png):
    query = "format=gïf&" + urlencode(SMALL)
    head = f"POST /generate?{query} HTTP/1.0\r\nContent-Length: {len(png)}\r\n\r\n".encode()
    reply = raw(address, head + png)
    assert reply.startswith(b"HTTP/1.0 400") and "got 'gïf'".encode() in reply, reply
    reply = raw(address, "GET /vidéo HTTP/1.0\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 404") and "not found: /vidéo ".encode() in reply, reply
