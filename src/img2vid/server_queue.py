"""The server's shared side (used by img2vid.server): the connections it serves at once (caps per server and per
client address, a 503 from the accepting thread past them) and the line of generations, which run one at a time on
the shared model in arrival order, with /progress's report of them. Why each cap exists is said beside it.
"""

from __future__ import annotations

import collections
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import PIL.Image

from img2vid.server_requests import generate

if TYPE_CHECKING:
    from img2vid.pipeline import Pipeline

TIMEOUT_S = 60  # per socket read/write: a stalled or idle client must not hold its thread and socket forever
# Uploads decoded at once; more wait their turn. Each takes up to ~1.3 GB at MAX_INPUT_PIXELS (an 8192x8192 image
# with alpha, blended in row blocks) and ~2.6 GB for a 16-bit one with a transparent colour (measured on the CPU)
DECODERS = 2
IDLE: dict[str, Any] = {"busy": False}
LOCK_POLL_S = 0.5  # a queued request checks this often whether its client is still there
# Requests that may wait for their turn: more get a 503. Each holds its image (the video's size, but the upload's
# with resize=stretch: up to 0.2 GB at MAX_INPUT_PIXELS), a thread and a socket while it waits; without a cap,
# uploads could queue until memory runs out.
MAX_WAITING = 8
# Of those places, one client address may hold this many, so that one client (a script sending a batch) cannot fill
# the line and turn everyone else away. Behind a reverse proxy every request has the proxy's address: the cap then
# bounds them all together.
MAX_WAITING_PER_CLIENT = 4
RETRY_AFTER_S = 30  # what a 503 tells the client to wait: about a video's time on a GPU
# Connections served at once, each on a thread of its own: more are answered 503 at once and closed. Without a cap,
# clients that open connections and send nothing (each read waits up to TIMEOUT_S) could take threads without end.
MAX_CONNECTIONS = 64
# Of those, one client address may hold this many: one client trickling headers or bodies into every connection (each
# read waits up to TIMEOUT_S) locked everyone else out. Behind a reverse proxy all clients share its address.
MAX_CONNECTIONS_PER_CLIENT = 16
# A refused connection's upload is read and dropped for up to REFUSED_DRAIN_S by one thread, so that its sender reads
# the 503: closing on unread bytes resets the connection, and a browser still sending shows a network error. At most
# REFUSED_AT_ONCE are drained (by one thread, whatever their number); more are closed at once.
REFUSED_DRAIN_S = 10
REFUSED_AT_ONCE = 64
_BUSY_BODY = b"too many connections at once; try again later\n"
_BUSY_RESPONSE = (
    f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    f"Content-Length: {len(_BUSY_BODY)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
).encode() + _BUSY_BODY


class ClientGone(Exception):
    """The client closed its connection: its generation stops where it is (Server.run_generation)."""


class ServerBusy(Exception):
    """MAX_WAITING requests are already waiting (or MAX_WAITING_PER_CLIENT of this client's): this one is answered
    503 with Retry-After."""


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer has closed or reset the connection. The request body has been read in full by then, so a
    readable socket with nothing to read is the peer's end of stream; bytes waiting (a pipelined next request) are
    left in place for the handler. Linux reports the peer's close behind such bytes too (POLLRDHUP)."""
    try:
        if hasattr(select, "poll"):  # select.select refuses descriptors from 1024 on (a busy server has them)
            poller = select.poll()
            hangup = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
            poller.register(sock, select.POLLIN | hangup)
            events = poller.poll(0)
            if events and events[0][1] & hangup:
                return True
            readable = bool(events)
        else:  # Windows: no poll, and no such limit on its select
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed on our side (fileno -1)
        return True


class Server(ThreadingHTTPServer):
    """The HTTP server plus what every request thread shares: the pipeline and the queue that serialises it."""

    daemon_threads = True  # a hung client must not keep the process alive at shutdown

    def __init__(
        self, address: tuple[str, int], handler: type, pipe: Pipeline, model: str | None, max_body: int, quiet: bool
    ) -> None:
        if ":" in address[0]:  # an IPv6 address (`--host ::`); the class default AF_INET cannot bind it
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.pipe, self.model, self.max_body, self.quiet = pipe, model, max_body, quiet
        self.settings: dict[str, Any] = {}  # how the model runs (variant, compile, two GPUs): in X-Img2vid-Params
        self.decoders = threading.BoundedSemaphore(DECODERS)
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._per_client: collections.Counter[str] = collections.Counter()  # open connections by address
        self._per_client_lock = threading.Lock()
        self._refused: queue.Queue[socket.socket] = queue.Queue(REFUSED_AT_ONCE)
        self._refuser: threading.Thread | None = None
        # One generation at a time, in arrival order: a plain lock lets any waiter in, and overtaken requests
        # could wait forever. The queue holds a ticket per waiting request; the first runs when none is running.
        self._turn = threading.Condition()
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._running = False
        # What /progress reports. The generating thread replaces `_state` whole, never edits it, and it and the
        # queue change under `_state_lock`, so a reader always sees one report and the waiting count of that moment.
        self._state_lock = threading.Lock()
        self._state: dict[str, Any] = IDLE

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, or, past MAX_CONNECTIONS (or MAX_CONNECTIONS_PER_CLIENT of its address), a
        503 from the accepting thread and the close."""
        client = str(client_address[0])
        with self._per_client_lock:
            mine = self._per_client[client] < MAX_CONNECTIONS_PER_CLIENT
            if mine:
                self._per_client[client] += 1
        if not mine or not self.connections.acquire(blocking=False):
            if mine:
                self._release(client)
            try:
                request.settimeout(1.0)  # a few hundred bytes into a fresh socket's buffer: never a wait, but bounded
                request.sendall(_BUSY_RESPONSE)
                request.shutdown(socket.SHUT_WR)  # the answer is whole; what the client still sends is dropped
                self._drain(request)
            except (OSError, queue.Full):
                request.close()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its places go back
            self.connections.release()
            self._release(client)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()
            self._release(str(client_address[0]))

    def _drain(self, sock: socket.socket) -> None:
        """Hand a refused connection to the refusing thread (started on first use), which reads and drops what its
        client sends until the client closes or REFUSED_DRAIN_S pass, then closes it. queue.Full past
        REFUSED_AT_ONCE."""
        if self._refuser is None:
            self._refuser = threading.Thread(target=self._refusing, name="img2vid-refused", daemon=True)
            self._refuser.start()
        self._refused.put_nowait(sock)

    def _refusing(self) -> None:
        selector = selectors.DefaultSelector()  # poll/epoll: no limit on descriptor numbers, as select has
        deadlines: dict[socket.socket, float] = {}
        while True:
            try:  # block for new work when idle, else only look
                while True:
                    sock = self._refused.get(block=not deadlines)
                    sock.setblocking(False)
                    deadlines[sock] = time.monotonic() + REFUSED_DRAIN_S
                    selector.register(sock, selectors.EVENT_READ)
            except queue.Empty:
                pass
            done = [sock for sock, end in deadlines.items() if time.monotonic() > end]
            for key, _ in selector.select(timeout=0.2):
                try:
                    if not key.fileobj.recv(1 << 16):  # the client closed: our side can close without a reset
                        done.append(key.fileobj)
                except BlockingIOError:
                    pass
                except OSError:
                    done.append(key.fileobj)
            for sock in set(done):
                selector.unregister(sock)
                del deadlines[sock]
                sock.close()

    def _release(self, client: str) -> None:
        with self._per_client_lock:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]  # the counter holds only clients with open connections

    def progress(self, job: str | None = None) -> dict[str, Any]:
        """/progress's JSON object (module docstring); job: the asking client's token, whose place in the queue it
        adds. The running request's token is shown only to a client that asks with it: another client's token is
        not everyone's to read (the page tells its own generation from another's by it)."""
        with self._state_lock:
            report = {**self._state, "waiting": len(self._queue)}
            ahead = next((i for i, ticket in enumerate(self._queue) if job and ticket.job == job), None)
        if "job" in report and (job is None or report["job"] != job):
            report["job"] = None
        return report if ahead is None else {**report, "ahead": ahead}

    def run_generation(
        self,
        image: PIL.Image.Image,
        size: tuple[int, int],
        params: dict[str, Any],
        job: str | None,
        gone: Callable[[], bool] = lambda: False,
        client: str | None = None,
    ) -> tuple[bytes, dict]:
        """`generate` of `prepare`'s image and size in its turn (first come, first served), reporting to /progress;
        idle again when it ends, failed or not. gone() says whether the client has left: checked while queued and at
        every report, it raises ClientGone. MAX_WAITING waiting already, or MAX_WAITING_PER_CLIENT from this client
        (its address): ServerBusy."""

        def report(stage: str, done: int, total: int, segment: int, segments: int) -> None:
            if gone():  # a syscall, microseconds: between steps that take milliseconds to seconds
                raise ClientGone(f"client left at {stage} {done}/{total} of segment {segment}/{segments}")
            state = {"busy": True, "job": job, "stage": stage, "done": done, "total": total}
            state.update(segment=segment, segments=segments)
            with self._state_lock:
                self._state = state

        ticket = _Ticket(job, client)
        with self._turn:
            with self._state_lock:  # the queue changes under both locks: /progress counts it under the second
                if len(self._queue) >= MAX_WAITING:
                    raise ServerBusy(f"{len(self._queue)} requests are waiting already; try again later")
                mine = sum(1 for waiting in self._queue if client is not None and waiting.client == client)
                if mine >= MAX_WAITING_PER_CLIENT:
                    raise ServerBusy(f"{mine} requests of this client are waiting already; try again later")
                self._queue.append(ticket)
            while self._running or self._queue[0] is not ticket:
                self._turn.wait(LOCK_POLL_S)
                if gone():
                    with self._state_lock:
                        self._queue.remove(ticket)
                    self._turn.notify_all()  # the next in line may be first now
                    raise ClientGone("client left while queued")
            self._running = True
            with self._state_lock:  # one change: a reader never sees the turn taken and the server idle
                self._queue.popleft()
                self._state = {"busy": True, "job": job}
        try:
            return generate(self.pipe, image, params, self.model, report, size, self.settings)
        finally:
            with self._turn:
                with self._state_lock:
                    self._state = IDLE
                self._running = False
                self._turn.notify_all()


class _Ticket:
    """A waiting request's place in the queue: compared by identity (two requests may share a job token); client is
    its peer's address (host only: each connection has a port of its own)."""

    __slots__ = ("job", "client")

    def __init__(self, job: str | None, client: str | None = None) -> None:
        self.job, self.client = job, client
