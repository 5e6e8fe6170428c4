"""The agent under 10,000+ malformed, mutated and valid requests, with clients that trickle bytes, on loopback.

    .venv/bin/python bench/fuzz_agent.py [--requests 10000] [--clients 8] [--tricklers 16] [--deadline 5]

Starts `edgekit agent` as its own process (its log in a file), sends requests built by random byte-level
mutations of valid ones (seeded: the same run every time) from several client threads while other
clients send a request one byte a second, then reports: the statuses answered, requests with no status
line, tracebacks and defects in the agent's log (all should be 0), the slowest answer against the
request deadline, and the agent's memory (its own and its workers' RSS) before and after.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TOKEN = "bench-fuzz-token-0123"


def plus_one_model() -> bytes:
    import onnx
    from onnx import helper

    floats = onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", floats, [1, 4])],
                              [helper.make_tensor_value_info("y", floats, [1, 4])],
                              initializer=[helper.make_tensor("one", floats, [4], [1.0] * 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def valid_requests() -> list[bytes]:
    """The seeds every mutation starts from: a verification, an info call, one without token."""
    from edgekit.agent.protocol import Job, encode

    model = plus_one_model()
    body = encode(Job("run", "onnx", 1, 0, 1, [model], {"inputs": np.zeros((2, 4), np.float32)}))
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    return [b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Content-Length: %d\r\n\r\n" % len(body) + body,
            b"GET /v2/info HTTP/1.1\r\n" + auth + b"\r\n",
            b"POST /v2/verify HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def mutate(rng: random.Random, request: bytes) -> bytes:
    """One to four random edits: bytes flipped, inserted or cut, header lines added or dropped, the body's
    frame or array header rewritten, the request cut short."""
    data = bytearray(request)
    for _ in range(rng.randint(1, 4)):
        edit = rng.randrange(9)
        at = rng.randrange(len(data) + 1)
        if edit == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif edit == 1:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif edit == 2:
            del data[at:at + rng.randint(1, 64)]
        elif edit == 3:
            line = rng.choice([b"Content-Length: " + rng.choice([b"-1", b"\xb2", b"9" * 25, b"1e3", b"0x10", b""]),
                               b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Connection: keep-alive",
                               b"Authorization: Bearer " + rng.randbytes(8), b"X: " + rng.randbytes(30),
                               rng.randbytes(20)])
            split = data.find(b"\r\n") + 2
            data[split:split] = line + b"\r\n"
        elif edit == 4:
            data[:data.find(b" ")] = rng.choice([b"PUT", b"HEAD", b"DELETE", b"", b"GE\x00T", b"POST POST"])
        elif edit == 5:  # a new frame header: fields of the wrong type, out of range, missing or extra
            start = data.find(b"\r\n\r\n") + 4
            fields = {"task": rng.choice(["run", "segment", "lm", "shell", None]),
                      "format": rng.choice(["onnx", "tflite", "pickle", 3]),
                      "sha256": rng.choice([["0" * 64], "0" * 64, None, ["0" * 64] * 2]),
                      "threads": rng.choice([1, 0, -1, 10**9, 1.5, True, "1", float("nan")]),
                      "warmup": rng.choice([0, 2000]), "runs": rng.choice([1, 10**6]),
                      "model_bytes": rng.choice([[0], [10], [-3], [2**50], 10, [10, 10]]),
                      "array_bytes": rng.choice([[rng.randint(-5, 5000)], rng.randint(0, 9), [1] * 5, []])}
            for field in rng.sample(sorted(fields), rng.randint(0, 2)):
                del fields[field]
            text = json.dumps(fields).encode()
            data[start:start + 4 + len(text)] = struct.pack(">I", len(text)) + text
        elif edit == 6:  # an array header that claims more, or other, than its bytes
            shape = rng.choice([(10**12,), (0, 4), (), (2**31, 2**31), (1, 4)])
            dtype = rng.choice(["<f4", ">f8", "|O", "<U4", "<c8", "|V8"])
            order = rng.choice(["False", "True"])
            header = f"{{'descr': '{dtype}', 'fortran_order': {order}, 'shape': {shape!r}, }}".encode()
            end = data.rfind(b"\x93NUMPY")
            if end >= 0:
                data[end:] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + rng.randbytes(16)
        elif edit == 7:
            del data[rng.randrange(len(data) + 1):]
        elif edit == 8:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


def final_status(answer: bytes) -> int | None:
    """The final status of an answer (after any `100 Continue`); None if there is no status line."""
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer[:4096])]
    return next((code for code in statuses if code >= 200), None)


def exchange(port: int, data: bytes) -> tuple[int | None, float]:
    """Status (None: no status line) and seconds to the answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        try:
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        except OSError:  # the agent answered and closed before taking it all (e.g. 413 from the header)
            pass
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return final_status(answer), time.monotonic() - started


def trickle(port: int, seconds: float) -> tuple[int | None, float]:
    """A request whose body comes one byte a second: the status it gets and the seconds until it comes."""
    request = f"POST /v2/verify HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds * 4) as connection:
        connection.sendall(request)
        while time.monotonic() - started < seconds * 3:
            if select.select([connection], [], [], 1.0)[0]:  # the answer came (or the connection closed)
                break
            connection.sendall(b"x")
        answered = time.monotonic() - started
        try:
            answer = connection.recv(4096)
        except OSError:
            answer = b""
    return final_status(answer), answered


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the agent and its runtime workers)."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    total_kb = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def start_agent(log: Path, deadline: float) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "edgekit", "agent", "--port", "0", "--name", "fuzz", "--max-mb", "1",
               "--memory-mb", "8", "--max-connections", "64", "--request-timeout", str(deadline),
               "--job-timeout", "30"]
    environment = {**os.environ, "EDGEKIT_AGENT_TOKEN": TOKEN,
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                  os.environ.get("PYTHONPATH", "")])}
    agent = subprocess.Popen(command, stderr=log.open("w"), stdout=subprocess.DEVNULL, env=environment)
    for _ in range(600):
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return agent, int(found[1])
        if agent.poll() is not None:
            raise SystemExit(f"the agent did not start:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit("the agent did not start within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tricklers", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=5.0, help="the agent's --request-timeout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    seeds = valid_requests()
    rng = random.Random(args.seed)
    requests = [seeds[i % 3] if i % 10 == 0 else mutate(rng, rng.choice(seeds)) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "agent.log"
        agent, port = start_agent(log, args.deadline)
        try:
            for request in seeds[:2] * 5:  # workers started, first models loaded
                exchange(port, request)
            before = rss_mb(agent.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(args.tricklers) as slow:
                trickled = [slow.submit(trickle, port, args.deadline) for _ in range(args.tricklers)]
                with ThreadPoolExecutor(args.clients) as pool:
                    answers = list(pool.map(lambda data: exchange(port, data), requests))
                cut_off = [future.result() for future in trickled]
            seconds = time.monotonic() - started
            after = rss_mb(agent.pid)
            alive = [exchange(port, seeds[1])[0], exchange(port, seeds[0])[0]]
        finally:
            agent.send_signal(signal.SIGINT)  # as Ctrl-C: the agent stops its workers and exits
            agent.wait(timeout=30)
        text = log.read_text()

    statuses = collections.Counter(status for status, _ in answers)
    print(f"requests: {len(answers)} in {seconds:.1f} s from {args.clients} clients "
          f"({len(answers) / seconds:.0f}/s), {args.tricklers} clients trickling one byte a second")
    print("statuses: " + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(),
                                                                                  key=lambda kv: str(kv[0]))))
    unanswered = [data for data, (status, _) in zip(requests, answers, strict=True) if status is None]
    print(f"no status line: {len(unanswered)} (of which empty requests, nothing to answer: "
          f"{sum(1 for data in unanswered if not data.strip())})")
    for data in unanswered:
        if data.strip():
            print(f"  unanswered: {data[:200]!r}")
    print(f"tracebacks in the agent's log: {text.count('Traceback')}; internal errors (500): "
          f"{text.count('internal error')}; connections dropped by an exception: {text.count('connection dropped')}")
    for line in sorted({line for line in text.splitlines() if "internal error" in line})[:5]:
        print(f"  {line}")
    if "Traceback" in text:
        first = text[text.index("Traceback"):].splitlines()
        print("  first traceback:\n    " + "\n    ".join(first[:25]))
    print(f"slowest answer: {max(t for _, t in answers):.2f} s (deadline {args.deadline:g} s); "
          f"trickling clients cut off after {min(t for _, t in cut_off):.1f}-{max(t for _, t in cut_off):.1f} s "
          f"with {dict(collections.Counter(s for s, _ in cut_off))}")
    print(f"agent RSS (with workers): {before:.0f} MB before, {after:.0f} MB after; "
          f"still serving (info, verify): {alive}")


if __name__ == "__main__":
    main()
