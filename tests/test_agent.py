"""`edgekit agent` on loopback: end-to-end verification on a "device", each refusal, timeouts, and a load test."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import edgekit
from edgekit.agent.protocol import Job, encode
from edgekit.agent.server import Agent
from edgekit.cli import main
from edgekit.errors import UsageError
from edgekit.passes.export import export_onnx
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner
from edgekit.runtimes.remote import RemoteDevice

from .conftest import TinyNet

TOKEN = "test-token-0123"


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    server = Agent(("127.0.0.1", 0), TOKEN, name="test-board", max_mb=64, queue_size=64, job_timeout=60, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server: Agent) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def tiny_onnx() -> bytes:
    torch.manual_seed(0)
    return export_onnx(TinyNet().eval(), (1, 3, 32, 32), 17).SerializeToString()


def post(server: Agent, body: bytes, token: str | None = TOKEN, path: str = "/v1/verify",
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url_of(server)}{path}", data=body, method="POST",
                                     headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def job(model: bytes, inputs: np.ndarray, fmt: str = "onnx", runs: int = 3) -> Job:
    return Job(fmt, hashlib.sha256(model).hexdigest(), 1, 1, runs, model, inputs)


def test_build_verifies_on_the_device_and_labels_its_figures(agent: Agent, tiny_model: nn.Module,
                                                             photos: Path) -> None:
    result = edgekit.build(tiny_model, "x86-64", calib=photos, device_url=url_of(agent), device_token=TOKEN,
                           overrides={"gates.max_latency_ms": 1000.0}, quiet=True)
    report = result.report
    device = report["device"]
    assert device["name"] == "test-board" and device["sha256"] == report["artifact"]["sha256"]
    assert report["latency_ms"]["measured_device"]["label"] == "measured: test-board"
    assert report["latency_ms"]["measured_host"]["label"] == "measured: host"
    assert device["accuracy"]["top1_agreement"] == report["top1_agreement"] == 1.0
    latency_gate = next(g for g in report["gates"] if g["name"] == "max_latency_ms")
    assert latency_gate["basis"] == "measured: test-board" and latency_gate["value"] == device["latency_ms"]["p50"]
    on_disk = json.loads((result.out / "report.json").read_text())
    assert on_disk["device"]["latency_ms"]["p50"] == device["latency_ms"]["p50"]


def test_verify_command_updates_a_built_folder(agent: Agent, mobilenet_v3_pth: Path, photos: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["build", str(mobilenet_v3_pth), "--arch", "mobilenet_v3_small", "--target", "raspberry-pi-5",
                 "--format", "onnx", "--calib", str(photos), "--out", "built", "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("EDGEKIT_AGENT_TOKEN", TOKEN)
    assert main(["verify", "built", "--device", url_of(agent), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"]["latency_ms"]["label"] == "measured: test-board"
    assert report["device"]["accuracy"]["top1_agreement"] == 1.0
    manifest = json.loads(Path("built/manifest.json").read_text())
    assert manifest["outputs"]["report.json"]["sha256"] == hashlib.sha256(Path("built/report.json").read_bytes()
                                                                          ).hexdigest()
    Path("built/model.onnx").write_bytes(b"tampered")
    assert main(["verify", "built", "--device", url_of(agent)]) == 2
    assert "changed since it was built" in capsys.readouterr().err


def test_refusals(agent: Agent, tiny_onnx: bytes, tmp_path: Path) -> None:
    inputs = np.zeros((1, 3, 32, 32), np.float32)
    good = encode(job(tiny_onnx, inputs))
    assert post(agent, good, token=None)[0] == 401
    assert post(agent, good, token="wrong-token-0000")[0] == 401
    assert post(agent, good, path="/v1/../../etc/passwd")[0] == 404
    # over the 64 MB limit: refused from its Content-Length, before a byte of the body is read
    connection = http.client.HTTPConnection("127.0.0.1", agent.server_address[1], timeout=30)
    connection.putrequest("POST", "/v1/verify")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", str(65_000_000))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    with pytest.raises(UsageError, match="over the agent's 64 MB limit"):
        RemoteDevice(url_of(agent), TOKEN).verify(bytes(65_000_000), "onnx", inputs, 1, 0, 1)
    status, answer = post(agent, encode(job(b"not a model at all", inputs)))
    assert status == 400 and "not an ONNX model" in answer["error"]
    status, answer = post(agent, encode(job(b"\0\0\0\0NOPE" + bytes(64), inputs, fmt="tflite")))
    assert status == 400 and "TFL3" in answer["error"]
    corrupted_model = bytearray(good)
    corrupted_model[200] ^= 0xFF
    assert post(agent, bytes(corrupted_model))[1]["error"].startswith("model sha256 does not match")
    # an ONNX model whose weights live in a file named by the client: never opened
    model = onnx.load_from_string(tiny_onnx)
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="/etc/passwd")
    status, answer = post(agent, encode(job(model.SerializeToString(), inputs)))
    assert status == 400 and "external data" in answer["error"]
    # a pickled object array in place of the inputs
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    header = json.dumps({"format": "onnx", "sha256": hashlib.sha256(tiny_onnx).hexdigest(), "threads": 1,
                         "warmup": 0, "runs": 1, "model_bytes": len(tiny_onnx),
                         "inputs_bytes": len(pickled.getvalue())}).encode()
    status, answer = post(agent, struct.pack(">I", len(header)) + header + tiny_onnx + pickled.getvalue())
    assert status == 400 and "plain .npy" in answer["error"]
    status, answer = post(agent, good[:-10])
    assert status == 400
    # the model loads but the runtime refuses its inputs: reported, and the agent keeps serving
    status, answer = post(agent, encode(job(tiny_onnx, np.zeros((1, 3, 8, 8), np.float32))))
    assert status == 422 and "runtime refused" in answer["error"]
    assert post(agent, good)[0] == 200
    with pytest.raises(UsageError, match="answered 401"):
        RemoteDevice(url_of(agent), "wrong-token-0000").info()


def test_fifty_concurrent_verifications_none_lost(agent: Agent, tiny_onnx: bytes) -> None:
    device = RemoteDevice(url_of(agent), TOKEN)
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1, (2, 3, 32, 32)).astype(np.float32) for _ in range(50)]
    local = OnnxRuntimeRunner(tiny_onnx, 1)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            results[index] = device.verify(tiny_onnx, "onnx", batches[index], 1, 0, 2)[0]
        except BaseException as err:  # collected: a lost or failed job fails the test below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and sorted(results) == list(range(50))
    for index, outputs in results.items():  # each client got its own inputs' outputs back
        np.testing.assert_allclose(outputs, local.run(batches[index]), rtol=1e-5, atol=1e-6)


def test_full_queue_refuses_and_a_hung_job_times_out() -> None:
    slow = export_onnx(nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)]).eval(),
                       (1, 64, 64, 64), 17).SerializeToString()
    server = Agent(("127.0.0.1", 0), TOKEN, queue_size=1, job_timeout=1.0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lane = server.lanes["onnx"]
        inputs = np.zeros((1, 64, 64, 64), np.float32)
        running = lane.submit(job(slow, inputs, runs=10000))  # far longer than the 1 s timeout
        while lane.jobs.qsize():  # wait until the worker has taken it
            time.sleep(0.01)
        waiting = lane.submit(job(slow, inputs, runs=1))
        status, answer = post(server, encode(job(slow, inputs, runs=1)))
        assert status == 503 and "queue is full" in answer["error"]
        with pytest.raises(Exception, match="ran past 1 s"):
            running.result(timeout=60)
        waiting.result(timeout=60)  # the restarted worker runs the next job
    finally:
        server.shutdown()
        server.server_close()


def test_an_emulated_agent_labels_its_timings_and_gates_use_the_estimate(tiny_model: nn.Module,
                                                                        photos: Path) -> None:
    server = Agent(("127.0.0.1", 0), TOKEN, name="qemu-aarch64", emulated=True, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report = edgekit.build(tiny_model, "raspberry-pi-5", format="onnx", calib=photos, device_url=url_of(server),
                               device_token=TOKEN, overrides={"gates.max_latency_ms": 1000.0}, quiet=True).report
    finally:
        server.shutdown()
        server.server_close()
    assert report["latency_ms"]["emulated_device"]["label"] == "emulated: qemu-aarch64"
    assert "measured_device" not in report["latency_ms"]
    latency_gate = next(g for g in report["gates"] if g["name"] == "max_latency_ms")
    assert latency_gate["basis"] == "estimated: raspberry-pi-5"
