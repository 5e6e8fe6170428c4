"""`edgekit agent`: the HTTP server on the board that runs artifacts for `edgekit build/verify --device`.

Every request needs the shared token (`Authorization: Bearer <token>`), checked before the body is
read; bodies over the size limit are refused from their Content-Length; requests are read and
checked in memory (no path the client sends reaches the filesystem; only ONNX and TFLite models,
only plain arrays); each runtime runs one job at a time from a bounded queue, with a timeout.
"""

from __future__ import annotations

import hmac
import json
import platform
import shutil
import socket
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edgekit import __version__
from edgekit.agent.protocol import API, Refused, decode, result_body
from edgekit.agent.worker import Lane


class Agent(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of clients waits in the backlog rather than being reset

    def __init__(self, address: tuple[str, int], token: str, *, name: str | None = None, max_mb: float = 256,
                 queue_size: int = 64, job_timeout: float = 300, read_timeout: float = 60, quiet: bool = False,
                 emulated: bool = False) -> None:
        if len(token) < 8:
            raise ValueError("the agent's token must have at least 8 characters")
        self.token = token.encode()
        self.name = name or socket.gethostname()
        self.max_bytes = int(max_mb * 1e6)
        self.job_timeout = job_timeout
        self.read_timeout = read_timeout
        self.quiet = quiet
        self.emulated = emulated  # under qemu: outputs are the ARM runtime's, timings are not the device's
        self.lanes = {"onnx": Lane("onnxruntime", queue_size, job_timeout),
                      "tflite": Lane("litert", queue_size, job_timeout)}
        super().__init__(address, _Handler)

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
                                                        "trtexec": shutil.which("trtexec")},
            "emulated": self.emulated, "max_bytes": self.max_bytes, "job_timeout_s": self.job_timeout,
            "queued": {lane.name: lane.jobs.qsize() for lane in self.lanes.values()},
        }

    def server_close(self) -> None:
        super().server_close()
        for lane in self.lanes.values():
            lane.close()


class _Handler(BaseHTTPRequestHandler):
    server: Agent
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # a client that stalls mid-request is dropped
        super().setup()

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

    def _refuse(self, err: Refused) -> None:
        self._send(err.status, json.dumps({"error": str(err)}).encode())

    def _authorize(self) -> None:
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.server.token):
            raise Refused(401, "missing or wrong token")

    def do_GET(self) -> None:
        try:
            self._authorize()
            if self.path != f"{API}/info":
                raise Refused(404, f"no such endpoint: {self.path}")
            self._send(200, json.dumps(self.server.info()).encode())
        except Refused as err:
            self._refuse(err)

    def do_POST(self) -> None:
        try:
            self._authorize()
            if self.path != f"{API}/verify":
                raise Refused(404, f"no such endpoint: {self.path}")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused(411, "Content-Length is required")
            if int(length) > self.server.max_bytes:
                raise Refused(413, f"request of {int(length) / 1e6:.1f} MB is over the agent's "
                              f"{self.server.max_bytes / 1e6:g} MB limit")
            body = self.rfile.read(int(length))
            if len(body) != int(length):
                raise Refused(400, "request body ended early")
            self._verify(body)
        except Refused as err:
            self._refuse(err)
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def _verify(self, body: bytes) -> None:
        job = decode(body)
        queued = time.perf_counter()
        future = self.server.lanes[job.format].submit(job)
        try:
            outputs, info = future.result(timeout=self.server.job_timeout * (self.server.lanes[job.format]
                                                                              .jobs.maxsize + 1))
        except FutureTimeout:
            raise Refused(504, "the job did not finish in time") from None
        timings = np.array(info.pop("timings_ms"))
        info.update({
            "device": self.server.name, "sha256": job.sha256, "seconds": round(time.perf_counter() - queued, 3),
            "latency_ms": {"label": f"{'emulated' if self.server.emulated else 'measured'}: {self.server.name}",
                           "p50": round(float(np.percentile(timings, 50)), 4),
                           "p90": round(float(np.percentile(timings, 90)), 4), "min": round(float(timings.min()), 4),
                           "runs": job.runs, "warmup": job.warmup, "runtime": info["runtime"],
                           "device": self.server.name, "machine": platform.machine()},
        })
        self._send(200, result_body(outputs, info), "application/octet-stream")


def serve(host: str, port: int, token: str, **options: Any) -> None:
    """Run the agent until interrupted."""
    agent = Agent((host, port), token, **options)
    print(f"edgekit agent {agent.name} listening on http://{host}:{agent.server_address[1]} "
          f"(onnxruntime and LiteRT lanes, {agent.max_bytes / 1e6:g} MB limit)", file=sys.stderr, flush=True)
    try:
        agent.serve_forever()
    finally:
        agent.server_close()
