"""The agent's wire format, shared by the server on the board and the client on the workstation.

A verification request is one body: a 4-byte big-endian header length, a JSON header (format,
sha256, threads, warmup, runs, and the byte counts that follow), the model file, and the inputs
as one `.npy` array. Nothing in it is a path and nothing is unpickled: models are checked to be
ONNX (without external data, which would name files on the board) or TFLite flatbuffers, and
arrays are read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("onnx", "tflite")
API = "/v1"


class Refused(Exception):
    """A request the agent will not run; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    format: str
    sha256: str
    threads: int
    warmup: int
    runs: int
    model: bytes
    inputs: np.ndarray


def encode(job: Job) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(job.inputs), allow_pickle=False)
    arrays = buffer.getvalue()
    header = json.dumps({"format": job.format, "sha256": job.sha256, "threads": job.threads, "warmup": job.warmup,
                         "runs": job.runs, "model_bytes": len(job.model), "inputs_bytes": len(arrays)}).encode()
    return struct.pack(">I", len(header)) + header + job.model + arrays


def decode(body: bytes) -> Job:
    """The job in `body`, checked: a well-formed frame, a model of the stated format whose sha256 matches,
    numeric inputs. Anything else is refused with 400 and the reason."""
    if len(body) < 4:
        raise Refused(400, "empty request")
    (length,) = struct.unpack(">I", body[:4])
    try:
        header = json.loads(body[4:4 + length])
        fmt, digest = header["format"], header["sha256"]
        threads, warmup, runs = int(header["threads"]), int(header["warmup"]), int(header["runs"])
        model_end = 4 + length + int(header["model_bytes"])
        inputs_end = model_end + int(header["inputs_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise Refused(400, f"malformed request header: {err}") from None
    if inputs_end != len(body):
        raise Refused(400, f"request is {len(body)} bytes, its header says {inputs_end}")
    if fmt not in FORMATS:
        raise Refused(400, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (1 <= threads <= 256 and 0 <= warmup <= 1000 and 1 <= runs <= 10000):
        raise Refused(400, "threads, warmup or runs out of range (1-256, 0-1000, 1-10000)")
    model = body[4 + length:model_end]
    if hashlib.sha256(model).hexdigest() != digest:
        raise Refused(400, "model sha256 does not match the header: the upload was corrupted")
    check_model(model, fmt)
    try:
        inputs = np.load(io.BytesIO(body[model_end:inputs_end]), allow_pickle=False)
    except ValueError as err:
        raise Refused(400, f"inputs are not a plain .npy array: {err}") from None
    if inputs.dtype.kind not in "fiub" or inputs.ndim < 1 or len(inputs) == 0:
        raise Refused(400, f"inputs must be a non-empty numeric array, got {inputs.dtype} {inputs.shape}")
    return Job(fmt, digest, threads, warmup, runs, model, inputs)


def check_model(model: bytes, fmt: str) -> None:
    """Refuse anything but a self-contained model file of the stated format."""
    if fmt == "tflite":
        if model[4:8] != b"TFL3":
            raise Refused(400, "not a TFLite flatbuffer (no TFL3 identifier)")
        return
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.ModelProto.FromString(model)
    except DecodeError:
        raise Refused(400, "not an ONNX model") from None
    if not graph.graph.node:
        raise Refused(400, "not an ONNX model (no graph)")
    tensors = [*graph.graph.initializer, *(a.t for n in graph.graph.node for a in n.attribute if a.HasField("t"))]
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in tensors):
        raise Refused(400, "ONNX models with external data are refused: they name files on the device")


def result_body(outputs: np.ndarray, info: dict[str, Any]) -> bytes:
    """The response: JSON with the figures, then the outputs as .npy (same framing as requests)."""
    buffer = io.BytesIO()
    np.save(buffer, outputs, allow_pickle=False)
    header = json.dumps(info).encode()
    return struct.pack(">I", len(header)) + header + buffer.getvalue()


def read_result(body: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    (length,) = struct.unpack(">I", body[:4])
    return np.load(io.BytesIO(body[4 + length:]), allow_pickle=False), json.loads(body[4:4 + length])
