"""img2vid as a small HTTP service (stdlib only): `GET /` a self-contained web page, `POST /generate` an image in,
the encoded video out, `GET /health` a JSON liveness probe, `GET /progress` what the server is doing. Start it with
`img2vid serve`.

Design: the request body IS the image (any format Pillow reads) and the parameters travel in the query string, so there
is no multipart parsing to get wrong and `curl --data-binary @cat.png 'host:8000/generate?seed=1'` just works. The model
is shared by every request thread, so generations run one at a time, in arrival order; other requests (the page,
/health) stay responsive meanwhile. Errors are one line of plain text: 400 for the caller's input, 413 for an oversized
body, 405 for a known path's wrong method, 408 for a stalled upload, 503 with Retry-After when MAX_WAITING requests wait
already, or MAX_WAITING_PER_CLIENT of the same client address (or MAX_CONNECTIONS are open), 500 for our own failures
(the traceback goes to the server's stderr, never to the client). A client that disconnects stops its generation at the
next step or decode chunk (or never starts it, if it was still queued), so a closed browser tab does not keep the GPU
and the queue busy; so does one that sent bytes past its body before closing. (A client that half-closes, shutting its
sending side after the body, looks the same to TCP and is treated as gone; browsers, curl and Python's clients do not.)
Raw UTF-8 in the query and in headers is read as UTF-8 (http.server reads it as Latin-1), so the errors that echo it
show what was sent.

`GET /progress` (JSON, never cached) is polled by the page while its POST is in flight. Idle:
`{"busy": false, "waiting": 0}`. Generating:
`{"busy": true, "job": "k3x9", "stage": "denoise", "done": 12, "total": 25, "segment": 2, "segments": 3, "waiting": 1}`
- waiting: requests (past their input checks) waiting for their turn, behind the running one.
- ahead: with `/progress?job=TOKEN` while that request waits, how many of the waiting ones came before it (the
  running one not counted); absent otherwise. The page shows it as its place in the line.
- job: the running request's `X-Img2vid-Job` header (any short token the client picks) when `?job=` names that
  token, so a client can tell its own generation from one it is queued behind; null otherwise (other clients'
  tokens are not shown).
- stage, done, total: "denoise" finished steps/steps (0 from the segment's start), then "decode" chunks, per
  segment; "export" with total 0 (not counted) while the video file is written. These fields are
  absent for the few milliseconds between a request's turn and its first report.
- segment, segments: the segment running (1-based) of how many (1 and 1 for a plain video; img2vid.longer).
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import json
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from img2vid import __version__
from img2vid.errors import InputError, NonFiniteVideo
from img2vid.server_queue import (
    RETRY_AFTER_S,
    TIMEOUT_S,
    ClientGone,
    Server,
    ServerBusy,
    peer_closed,
)
from img2vid.server_requests import (
    FORMATS,
    MAX_INPUT_PIXELS,
    MAX_PIXELS,
    MAX_VIDEO_PIXELS,
    check_request,
    decode_image,
    generate,
    parse_params,
    prepare,
)

if TYPE_CHECKING:
    from img2vid.pipeline import Pipeline

# the request's side (parameters, image, generation) lives in img2vid.server_requests; its names are also here
__all__ = ["MAX_BODY_BYTES", "MAX_PIXELS", "MAX_VIDEO_PIXELS", "MAX_INPUT_PIXELS", "FORMATS", "make_server", "serve"]
__all__ += ["check_request", "generate", "parse_params"]

MAX_BODY_BYTES = 32 * 1024 * 1024
DRAIN_BYTES = 256 * 1024 * 1024  # a refused body up to this size is read and dropped (Handler._discard says why)
# A whole upload's deadline: at least BODY_MIN_S, else its length at BODY_MIN_RATE bytes a second (32 MiB: 8.5 min)
BODY_MIN_S = 60
BODY_MIN_RATE = 64 * 1024


def _host_name(value: str) -> str:
    """The host of a Host header or an Origin's authority, lower case, without its port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    """Whether a bound address or a host name only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "localhost.")


def as_utf8(text: str) -> str:
    """Text that http.server decoded as Latin-1 (the request line, headers), read as the UTF-8 it almost always is;
    bytes that are not UTF-8 become U+FFFD."""
    return text.encode("latin-1", "replace").decode("utf-8", "replace")


@functools.cache
def page() -> bytes:
    """The web page (page.html beside this module: HTML and its script, edited as such), read on first use."""
    return importlib.resources.files("img2vid").joinpath("page.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = f"img2vid/{__version__}"
    timeout = TIMEOUT_S  # StreamRequestHandler sets it on the connection's socket

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")  # a browser takes the type said, never guesses
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: no server failure, so no traceback
            self.close_connection = True
            self.log_message("client went away before the %d response", code)

    def _error(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        # one line, and control characters echoed from the request (a terminal's escape codes) shown as U+FFFD
        line = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(text.split()))
        self._send(code, (line + "\n").encode(), "text/plain; charset=utf-8", headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, 414, 431, 501 for other methods) as our one line of plain
        text, not its HTML page."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # still the default while the request line failed to parse, and
            self.request_version = "HTTP/1.0"  # at 0.9 the stdlib writes no status line and no headers
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _content_length(self) -> int | None:
        """The one Content-Length as an int; None when absent, given twice with different values or not digits, or
        beside a Transfer-Encoding (chunked framing is not read: it would be taken for the image's bytes)."""
        if self.headers.get_all("Transfer-Encoding"):
            return None
        values = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if len(values) != 1 or not (text := values.pop()).isascii() or not text.isdigit():  # "²".isdigit() too
            return None
        digits = text.lstrip("0") or "0"
        return int(digits) if len(digits) < 19 else 10**18  # int() refuses over 4300 digits; all are over the limit

    def _discard(self, length: int) -> None:
        """Read and drop up to DRAIN_BYTES of a refused body: closing on unread data resets the connection, and a
        browser, still sending, then shows a network error instead of our answer."""
        left = min(length, DRAIN_BYTES)
        try:
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:  # timed out or reset: the connection closes anyway
            pass

    def _read_body(self, length: int) -> bytes:
        """The body's `length` bytes (fewer if the client closes), within a deadline for the whole of it: each read
        waits up to `timeout`, but a client sending a byte a minute passed every read's wait and held its thread and
        connection for as long as it liked. The deadline allows the slowest upload worth waiting for."""
        deadline = time.monotonic() + max(BODY_MIN_S, length / BODY_MIN_RATE)
        parts, got = [], 0
        while got < length:
            try:
                chunk = self.rfile.read1(min(length - got, 1 << 16))
            except TimeoutError:
                raise TimeoutError(f"the request body stalled: no data for {self.timeout} s") from None
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the request body came too slowly: {got} of {length} bytes in the time allowed")
        return b"".join(parts)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _refused(self) -> bool:
        """Answers 403 and returns True for a request another site makes through the user's browser.

        DNS rebinding: a page of attacker.example whose name then resolves to 127.0.0.1 is same-origin with this
        server to the browser, and could read /health, /progress and the videos; its requests carry
        `Host: attacker.example`. So a server bound to a loopback address answers only Host names of this machine
        (localhost, a loopback address). Cross-site POSTs: any page may send a POST without asking (a no-cors
        fetch), and run generations on the user's GPU and fill the waiting line; browsers name the page's origin in
        `Origin` and say `Sec-Fetch-Site: cross-site`, so a POST whose Origin is not this server's host is refused.
        Clients that send neither (curl, scripts) are not browsers, and are served."""
        host = _host_name(self.headers.get("Host") or "")
        if is_loopback(_host_name(str(self.server.server_address[0]))) and host and not is_loopback(host):
            self.close_connection = True
            self._error(403, f"Host {host} is not this machine's name: open the page at http://localhost:PORT/")
            return True
        if self.command != "POST":
            return False
        origin = (self.headers.get("Origin") or "").strip()
        site = (self.headers.get("Sec-Fetch-Site") or "").strip().lower()
        origin_host = urlsplit(origin).netloc.lower() if origin not in ("", "null") else origin
        same = origin_host == (self.headers.get("Host") or "").strip().lower()
        if site == "cross-site" or (origin and not same):
            self.close_connection = True
            self._discard(self._content_length() or 0)
            self._error(403, f"requests from another site ({origin or site}) are refused: use this server's page")
            return True
        return False

    def do_GET(self) -> None:
        if self._refused():
            return
        url = urlsplit(as_utf8(self.path))
        path = url.path
        if path in ("/", "/index.html"):
            self._send(200, page(), "text/html; charset=utf-8")
        elif path == "/health":
            body = json.dumps({"ok": True, "model": self.server.model, "version": __version__}).encode()
            self._send(200, body, "application/json")
        elif path == "/progress":
            # no-store: a cached answer would freeze the page's progress display
            job = (parse_qs(url.query).get("job") or [""])[0].strip()[:64] or None  # as X-Img2vid-Job is cut
            body = json.dumps(self.server.progress(job)).encode()
            self._send(200, body, "application/json", {"Cache-Control": "no-store"})
        elif path == "/generate":
            self._error(405, "/generate takes POST with the image as the body", {"Allow": "POST"})
        else:
            self._error(404, f"not found: {path} (try /, /health, /progress or POST /generate)")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if self._refused():
            return
        url = urlsplit(as_utf8(self.path))
        if url.path != "/generate":
            # The body is read and dropped first (as a 413's): closing on unread data reset the connection, and
            # clients still sending saw a broken pipe instead of the answer
            self.close_connection = True
            self._discard(self._content_length() or 0)
            if url.path in ("/", "/index.html", "/health", "/progress"):
                self._error(405, f"{url.path} takes GET (POST /generate)", {"Allow": "GET, HEAD"})
            else:
                self._error(404, f"not found: {url.path} (POST /generate)")
            return
        length = self._content_length()
        if length is None:
            self.close_connection = True  # without a length the body's end is unknown: the connection is unusable
            self._error(411, "send the image as the request body with one valid Content-Length header (not chunked)")
            return
        if length > self.server.max_body:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            self._error(413, f"request body of {length} bytes is over the limit of {self.server.max_body} bytes")
            self._discard(length)
            return
        try:
            data = self._read_body(length)
        except TimeoutError as e:
            self.close_connection = True
            self._error(408, str(e))
            return
        try:
            if len(data) < length:  # the client closed early: a prefix that happens to decode is not the upload
                raise InputError(f"the request body ended after {len(data)} of its {length} bytes (Content-Length)")
            params = parse_params(url.query)  # cheap checks first: a typo never waits for the lock
            if (self.headers.get("Content-Type") or "").lower().startswith("multipart/"):  # curl -F, an HTML form
                raise InputError("send the image itself as the request body (curl --data-binary @in.png), not a form")
            with self.server.decoders:  # checks that need the image (size, segments) too, before the queue
                image, size = prepare(self.server.pipe.config, decode_image(data), params)
            data = b""  # the upload's bytes are not held while the request waits
            job = as_utf8(self.headers.get("X-Img2vid-Job") or "").strip()[:64] or None  # capped: echoed to all
            gone = functools.partial(peer_closed, self.connection)
            video, info = self.server.run_generation(image, size, params, job, gone, str(self.client_address[0]))
        except ClientGone as e:  # nobody to answer: no response, no traceback
            self.close_connection = True
            self.log_message("%s; generation stopped", e)
            return
        except InputError as e:
            self._error(400, str(e) or "bad request")
            return
        except ServerBusy as e:
            self._error(503, str(e), {"Retry-After": str(RETRY_AFTER_S)})
            return
        except NonFiniteVideo as e:  # the model's failure, said in a line: a traceback would add nothing
            self._error(500, str(e))
            return
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"unexpected {type(e).__name__}: {e}")
            return
        headers = {"X-Img2vid-Seed": str(info["seed"]), "X-Img2vid-Params": json.dumps(info, separators=(",", ":"))}
        headers["Content-Disposition"] = f'inline; filename="img2vid-{info["seed"]}.{params["format"]}"'
        self._send(200, video, FORMATS[params["format"]], headers)


def make_server(
    pipe: Pipeline,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | None = None,
    max_body: int = MAX_BODY_BYTES,
    quiet: bool = False,
) -> ThreadingHTTPServer:
    """A bound, not yet serving server (port 0: any free port, see `server.server_address`); call serve_forever.
    `pipe` may be set later (server.pipe), before serving: the CLI binds first, so a taken port fails at once."""
    try:
        return Server((host, port), Handler, pipe, model, max_body, quiet)
    except OSError as e:  # in use, not ours, unknown host: say where, in a line
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def serve(server: ThreadingHTTPServer, model: str | None = None) -> int:
    """Serve a bound server (`make_server`) until Ctrl-C."""
    host, port = server.server_address[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"img2vid serving {model} on http://{shown_host}:{port}/ (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
