"""`edgekit agent`: the HTTP server on the board that runs artifacts for `edgekit build/verify --device`.

Built on the standard library (http.server, ssl) on purpose: it runs on small boards that should need
nothing beyond the runtimes. What a bare http.server lacks is added here:
- every request needs the shared token (`Authorization: Bearer <token>`), checked before the body is read;
- at most `max_connections` connections are served at once; the next ones are answered 503;
- each request must arrive whole within `request_timeout` seconds in total (a client that trickles
  bytes is cut off at that deadline with 408, not given a fresh timeout per byte), and a response
  must be taken within the same time;
- bodies over `max_mb` are refused from their Content-Length (413), and the bodies held at once, read
  or waiting in a queue, stay within `memory_mb` (503 beyond);
- nothing the client sends becomes a path (protocol.py checks every field); each runtime runs one
  job at a time from a bounded queue, with a timeout (worker.py);
- every request gets a status line, whatever it holds; an unexpected failure is a 500 and one log line.
"""

from __future__ import annotations

import hmac
import importlib.util
import io
import json
import platform
import re
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edgekit import __version__
from edgekit.agent.protocol import API, TASKS, Refused, decode, result_body
from edgekit.agent.worker import Lane
from edgekit.errors import first_line

RUNTIMES = {"onnx": ("onnxruntime", "onnxruntime"), "tflite": ("litert", "ai_edge_litert"),
            "pte": ("executorch", "executorch"), "openvino": ("openvino", "openvino")}  # lane, module it imports
BUSY_DEADLINE_S = 5.0  # how long a connection over the cap may take to say what it wanted before its 503


class Agent(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of clients waits in the backlog rather than being reset

    def __init__(self, address: tuple[str, int], token: str, *, name: str | None = None, max_mb: float = 256,
                 memory_mb: float = 512, queue_size: int = 64, job_timeout: float = 300,
                 request_timeout: float = 120, max_connections: int = 128, tls: ssl.SSLContext | None = None,
                 quiet: bool = False, emulated: bool = False) -> None:
        if len(token) < 8:
            raise ValueError("the agent's token must have at least 8 characters")
        if memory_mb < max_mb:
            raise ValueError(f"memory_mb ({memory_mb:g}) must hold at least one request of max_mb ({max_mb:g})")
        self.token = token.encode()
        self.name = name or socket.gethostname()
        self.max_bytes = int(max_mb * 1e6)
        self.memory = _Budget(int(memory_mb * 1e6))
        self.job_timeout = job_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusals = threading.BoundedSemaphore(max_connections)  # connections being told 503
        self.quiet = quiet
        self.emulated = emulated  # under qemu: outputs are the ARM runtime's, timings are not the device's
        self.lanes = {fmt: Lane(name, queue_size, job_timeout) for fmt, (name, module) in RUNTIMES.items()
                      if importlib.util.find_spec(module)}  # a lane for each runtime this board has
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._close_lanes()
            raise
        self.tls = tls is not None
        if tls is not None:  # the handshake happens in each connection's thread, under its deadline
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def info(self) -> dict[str, Any]:
        from importlib import metadata

        def version(package: str) -> str | None:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return None

        return {
            "device": self.name, "edgekit": __version__, "platform": platform.platform(),
            "machine": platform.machine(), "runtimes": {"onnxruntime": version("onnxruntime"),
                                                        "litert": version("ai-edge-litert"),
                                                        "executorch": version("executorch"),
                                                        "openvino": version("openvino"),
                                                        "trtexec": shutil.which("trtexec")},
            "tasks": list(TASKS), "emulated": self.emulated, "max_bytes": self.max_bytes,
            "memory_bytes": self.memory.total,
            "job_timeout_s": self.job_timeout, "request_timeout_s": self.request_timeout,
            "max_connections": self.max_connections, "tls": self.tls,
            "queued": {lane.name: lane.jobs.qsize() for lane in self.lanes.values()},
        }

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in its own thread if a slot is free; else answer it 503 in a thread of the
        refusal pool; past both (a flood), close it unanswered."""
        if self._slots.acquire(blocking=False):
            handler, slots = _Handler, self._slots
        elif self._refusals.acquire(blocking=False):
            handler, slots = _Busy, self._refusals
        else:
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve_connection, args=(request, client_address, handler, slots),
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: the slot goes back, the connection is closed (handle_error)
            slots.release()
            raise

    def _serve_connection(self, request: Any, client_address: Any, handler: type, slots: threading.Semaphore) -> None:
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            slots.release()
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, never a traceback: a connection that broke (reset, failed TLS handshake) concerns no one else."""
        if not self.quiet:
            err = sys.exc_info()[1]
            sys.stderr.write(f"edgekit agent: {client_address[0]}: connection dropped "
                             f"({type(err).__name__}: {first_line(err) if err else ''})\n")

    def server_close(self) -> None:
        super().server_close()
        self._close_lanes()

    def _close_lanes(self) -> None:
        for lane in self.lanes.values():
            lane.close()


class _Budget:
    """Bytes of request bodies held at once, across every connection and every queued job."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        with self._lock:
            if self.held + size > self.total:
                raise Refused(503, f"the agent holds {self.held / 1e6:.1f} MB of requests; {size / 1e6:.1f} MB more "
                              f"is over its {self.total / 1e6:g} MB (agent --memory-mb); retry later")
            self.held += size
        try:
            yield
        finally:
            with self._lock:
                self.held -= size


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each allowed only the time left until the current request's deadline."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline = 0.0
        self.received = 0  # bytes of the current request

    def restart(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self.connection.settimeout(left)
        count = self.connection.recv_into(buffer)
        self.received += count
        return count


class _Handler(BaseHTTPRequestHandler):
    server: Agent
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # errors found before the version is parsed still get a status line
    busy = False  # _Busy: over the connection cap, every request is answered 503

    def setup(self) -> None:
        super().setup()  # wfile: each write sent whole, within the socket's timeout
        self.rfile.close()  # replaced by a reader that keeps to the request's deadline
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)
        self._responded = False
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(self._deadline())  # the whole handshake, not each step
            self.connection.do_handshake()

    def _deadline(self) -> float:
        return min(self.server.request_timeout, BUSY_DEADLINE_S) if self.busy else self.server.request_timeout

    def handle_one_request(self) -> None:
        """One request under one deadline; a request cut off by it is answered 408."""
        self.reader.restart(self._deadline())
        self.raw_requestline, self._responded = b"", False
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self.send_error(414)
                return
            if not self.parse_request():
                return
            self._answer()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            if self.reader.received and not self._responded:  # a request had begun: say why it is cut off
                self._send_error_quietly(408, "the request did not arrive within the agent's deadline")
        except (ConnectionError, ssl.SSLError):
            self.close_connection = True

    def parse_request(self) -> bool:
        """http.server's parsing, without its HTTP/0.9 mode (answers without a status line) or silence on
        a blank request line."""
        self.request_version = self.default_request_version
        self.command = None  # type: ignore[assignment]  # typeshed says str; http.server's parse_request sets None
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.requestline.split()) != 3:
            self.close_connection = True
            self.send_error(400, "a request line is METHOD PATH HTTP/1.1")
            return False
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        return True  # `100 Continue` is sent by _verify, only once the token and size are accepted

    def send_response(self, code: int, message: str | None = None) -> None:
        self.connection.settimeout(self.server.request_timeout)  # a client that will not read is dropped
        self._responded = True
        super().send_response(code, message)

    def _send_error_quietly(self, status: int, message: str) -> None:
        try:
            self._send(status, json.dumps({"error": message}).encode())
        except (OSError, ssl.SSLError):
            pass  # the client is gone: nothing left to tell

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"edgekit agent: {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        try:
            if self.busy:
                raise Refused(503, f"the agent is serving its {self.server.max_connections} connections; retry later")
            self._authorize()
            routes = {f"{API}/info": ("GET", self._info), f"{API}/verify": ("POST", self._verify)}
            if self.path not in routes:
                raise Refused(404, f"no such endpoint: {self.path[:200]}")
            method, route = routes[self.path]
            if self.command != method:
                raise Refused(405, f"{self.path} takes {method}")
            route()
        except Refused as err:
            self._send(err.status, json.dumps({"error": str(err)}).encode())
        except (TimeoutError, ConnectionError, ssl.SSLError):
            raise
        except Exception as err:  # a defect here must cost one request and a log line, never the agent
            self.log_error("internal error: %s: %s", type(err).__name__, first_line(err))
            self._send(500, json.dumps({"error": f"internal error: {type(err).__name__}"}).encode())

    def _authorize(self) -> None:
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.server.token):
            raise Refused(401, "missing or wrong token")

    def _info(self) -> None:
        self._send(200, json.dumps(self.server.info()).encode())

    def _content_length(self) -> int:
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            raise Refused(400 if lengths else 411, "send the body with a Content-Length, not a Transfer-Encoding")
        if not lengths:
            raise Refused(411, "Content-Length is required")
        if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0]):
            raise Refused(400, "Content-Length must be one number of ASCII digits")
        length = int(lengths[0])
        if length > self.server.max_bytes:
            raise Refused(413, f"request of {length / 1e6:.1f} MB is over the agent's "
                          f"{self.server.max_bytes / 1e6:g} MB limit")
        return length

    def _read_body(self, length: int) -> bytearray:
        body = bytearray(length)
        view, got = memoryview(body), 0
        try:
            while got < length:
                count = self.rfile.readinto(view[got:])
                if not count:
                    raise Refused(400, f"request body ended after {got} of its {length} bytes")
                got += count
        except TimeoutError:
            raise Refused(408, f"the request's {length} bytes did not arrive within the agent's "
                          f"{self.server.request_timeout:g} s deadline") from None
        return body

    def _verify(self) -> None:
        length = self._content_length()
        with self.server.memory.reserve(length):
            if self.headers.get("Expect", "").lower() == "100-continue":
                self.send_response_only(100)
                self.end_headers()
            job = decode(self._read_body(length))
            if job.format not in self.server.lanes:
                raise Refused(422, f"this agent has no {RUNTIMES[job.format][0]} runtime for {job.format} models "
                              f"(install it beside edgekit on the device)")
            lane = self.server.lanes[job.format]
            queued = time.perf_counter()
            future = lane.submit(job)
            try:
                outputs, info = future.result(timeout=self.server.job_timeout * (lane.jobs.maxsize + 1))
            except FutureTimeout:
                raise Refused(504, "the job did not finish in time") from None
            timings = np.array(info.pop("timings_ms"))
            info.update({
                "device": self.server.name, "sha256": job.sha256, "seconds": round(time.perf_counter() - queued, 3),
                "latency_ms": {"label": f"{'emulated' if self.server.emulated else 'measured'}: {self.server.name}",
                               "p50": round(float(np.percentile(timings, 50)), 4),
                               "p90": round(float(np.percentile(timings, 90)), 4),
                               "min": round(float(timings.min()), 4), "runs": len(timings), "warmup": job.warmup,
                               "runtime": info["runtime"], "device": self.server.name,
                               "machine": platform.machine()},
            })
            self._send(200, result_body(outputs, info), "application/octet-stream")


class _Busy(_Handler):
    busy = True
