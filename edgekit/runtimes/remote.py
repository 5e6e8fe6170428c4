"""Run an artifact on a real device through its `edgekit agent`: send it, run it there, get outputs and timings.

The device's answers come back in the same form as this host's (outputs stacked per input, timings
in milliseconds), so verification compares them with the reference exactly as it does for the host.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from edgekit.agent.protocol import API, Job, encode, read_result
from edgekit.errors import StageError, UsageError

TOKEN_ENV = "EDGEKIT_AGENT_TOKEN"
CA_ENV = "EDGEKIT_AGENT_CA"  # a PEM file of the CA (or the self-signed certificate) an https agent is checked with


class RemoteDevice:
    def __init__(self, url: str, token: str | None = None, timeout: float = 900, ca_file: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--device takes the agent's URL (http://board:8765), got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV)
        if not self.token:
            raise UsageError(f"the agent at {self.url} needs its token: --device-token or {TOKEN_ENV}")
        self.timeout = timeout
        self._tls = _client_tls(ca_file or os.environ.get(CA_ENV)) if self.url.startswith("https://") else None
        self._info: dict[str, Any] | None = None

    def _call(self, path: str, body: bytes | None = None, timeout: float | None = None) -> bytes:
        request = urllib.request.Request(f"{self.url}{API}/{path}", data=body, method="POST" if body else "GET",
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._tls) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            try:
                reason = json.loads(err.read()).get("error", err.reason)
            except ValueError:
                reason = err.reason
            if err.code == 404 and path == "info":
                reason = f"{reason} (is it an agent of another edgekit version? this one speaks {API})"
            kind = UsageError if err.code in (401, 404, 413) else StageError
            raise kind(f"agent at {self.url} answered {err.code}: {reason}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StageError(f"cannot reach the agent at {self.url}: {reason}") from None

    def info(self) -> dict[str, Any]:
        self._info = json.loads(self._call("info"))
        return self._info

    def run(self, job: Job) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The job's output arrays from the device, and the device's latency figures."""
        body = encode(job)
        info = self._info or self.info()
        limit = info["max_bytes"]
        if len(body) > limit:  # said here: the agent refuses it unread, which a client sees as a broken pipe
            raise UsageError(f"the artifact and its inputs are {len(body) / 1e6:.1f} MB, over the agent's "
                             f"{limit / 1e6:g} MB limit (agent --max-mb)")
        # as long as the agent may take: an emulated board runs a 1024 px encoder for minutes
        wait = max(self.timeout, info.get("job_timeout_s", 0) + info.get("request_timeout_s", 0))
        outputs, info = read_result(self._call("verify", body, wait))
        if info.get("sha256") != job.sha256:
            raise StageError(f"the agent at {self.url} ran a different artifact (sha256 {info.get('sha256')})")
        return outputs, info

    def record(self, info: dict[str, Any], accuracy: dict[str, Any], latency: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """The report's `device` block of a job's answer: where it ran, the family's accuracy there, and the
        device's latency (the agent's figures, or the family's own reading of the job's timings)."""
        return {"name": info["device"], "url": self.url, "runtime": info["runtime"], "sha256": info["sha256"][0],
                "seconds": info["seconds"], "accuracy": accuracy, "latency_ms": latency or info["latency_ms"]}


def _client_tls(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name checked, against `ca_file` if given, else the system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"{ca_file}: cannot load the agent's CA certificate ({getattr(err, 'strerror', None) or err})"
                         f" (${CA_ENV})") from None
