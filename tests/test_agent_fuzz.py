"""The agent's protocol under random requests: whatever arrives, the answer is an HTTP status line and the
agent keeps serving. (bench/fuzz_agent.py runs the same idea at 10,000+ requests, with timings and memory.)"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import struct
import threading
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from edgekit.agent.server import Agent

TOKEN = "fuzz-token-0123"
# every status a request may get; 500 (a defect the agent caught) and a missing status line are failures
STATUSES = {200, 400, 401, 404, 405, 408, 411, 413, 414, 422, 431, 503, 505}


def _plus_one() -> bytes:
    floats = onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", floats, [1, 4])],
                              [helper.make_tensor_value_info("y", floats, [1, 4])],
                              initializer=[helper.make_tensor("one", floats, [4], [1.0] * 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


MODEL = _plus_one()
GOOD_HEADER = {"task": "run", "format": "onnx", "sha256": [hashlib.sha256(MODEL).hexdigest()], "threads": 1,
               "warmup": 0, "runs": 1, "model_bytes": [len(MODEL)]}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
arrays = st.one_of(
    st.builds(lambda shape, dtype: _npy(np.zeros(shape, dtype)),
              st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
              st.sampled_from(["float32", "float64", "int8", "uint8", "bool", ">f4", "complex64", "U3"])),
    st.just(_npy(np.zeros((1, 4), np.float32))),
    st.binary(max_size=200),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A verification body: a valid one, or one with some header fields, counts or bytes changed."""
    inputs = draw(arrays)
    header: dict = {**GOOD_HEADER, "array_bytes": [len(inputs)]}
    for field in draw(st.lists(st.sampled_from([*header, "extra"]), max_size=3)):
        header[field] = draw(json_values)
    text = json.dumps(header).encode()
    body = bytearray(struct.pack(">I", len(text)) + text + MODEL + inputs)
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(body) - 1))
        body[position] = draw(st.integers(0, 255))
    return bytes(body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body)


header_lines = st.lists(st.one_of(
    st.just(f"Authorization: Bearer {TOKEN}".encode()),
    st.tuples(st.sampled_from([b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection",
                               b"Content-Type", b"X-Anything"]),
              st.one_of(st.sampled_from([b"Bearer " + TOKEN.encode(), b"0", b"-1", b"1e3", b"\xb2", b"9" * 30,
                                         b"chunked", b"100-continue", b"close", b"keep-alive"]),
                        st.binary(max_size=40))).map(lambda pair: pair[0] + b": " + pair[1]),
    st.binary(max_size=60),
), max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"", b"P\x00ST"]))
    path = draw(st.sampled_from([b"/v2/verify", b"/v2/info", b"/", b"/v2/../../etc/passwd", b"*"])
                | st.binary(min_size=1, max_size=30).filter(lambda b: not re.search(rb"\s", b)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"", b"HTTP/1.1 extra"]))
    body = draw(frames() | st.binary(max_size=300))
    lines = draw(header_lines)
    if draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    return b" ".join(filter(None, [method, path, version])) + b"\r\n" + b"".join(line + b"\r\n" for line in lines) \
        + b"\r\n" + body


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    server = Agent(("127.0.0.1", 0), TOKEN, name="fuzz", max_mb=1, memory_mb=4, request_timeout=2,
                   max_connections=16, job_timeout=20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_every_request_gets_a_status_line_and_the_agent_serves_on(agent: Agent,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    port = agent.server_address[1]

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=requests())
    def answered(data: bytes) -> None:
        answer = exchange(port, data)
        status = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
        assert status and int(status[1]) in STATUSES, (data[:300], answer[:300])

    answered()
    inputs = _npy(np.zeros((1, 4), np.float32))
    header = json.dumps({**GOOD_HEADER, "array_bytes": [len(inputs)]}).encode()
    frame = struct.pack(">I", len(header)) + header + MODEL + inputs
    answer = exchange(port, f"POST /v2/verify HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Length: {len(frame)}\r\n\r\n".encode() + frame)
    assert answer.startswith(b"HTTP/1.1 200 ")
    log = capfd.readouterr().err
    assert "Traceback" not in log and "internal error" not in log and "connection dropped" not in log
