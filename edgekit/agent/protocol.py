"""The agent's wire format, shared by the server on the board and the client on the workstation.

A verification request is one body: a 4-byte big-endian header length, a JSON header (format,
sha256, threads, warmup, runs, and the byte counts that follow), the model file, and the inputs
as one `.npy` array. Nothing in it is a path and nothing is unpickled: models are checked to be
ONNX (no tensor anywhere with external data, which would name files on the board) or TFLite
flatbuffers, and arrays are read in place from their checked header, never through pickle.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("onnx", "tflite")
API = "/v1"
MAX_HEADER_BYTES = 4096  # the JSON header is about 200 bytes
NPY_HEADER_BYTES = 10_000  # numpy's own limit on a .npy header it will parse
# every header field, with the bounds of the numbers (None: a string, checked on its own)
HEADER_FIELDS: dict[str, tuple[int, int] | tuple[None, None]] = {
    "format": (None, None), "sha256": (None, None), "threads": (1, 256), "warmup": (0, 1000), "runs": (1, 10000),
    "model_bytes": (1, 2**40), "inputs_bytes": (1, 2**40)}


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


def decode(body: bytes | bytearray) -> Job:
    """The job in `body`, checked before anything is allocated for it: a well-formed frame whose header has
    exactly the known fields (finite, bounded numbers), a model of the stated format whose sha256 matches,
    and a non-empty plain numeric .npy array whose header agrees with its length. Anything else is refused
    with 400 and the reason."""
    frame = memoryview(body)
    if len(frame) < 4:
        raise Refused(400, "empty request: no frame header")
    (length,) = struct.unpack(">I", frame[:4])
    if not 2 <= length <= min(MAX_HEADER_BYTES, len(frame) - 4):
        raise Refused(400, f"frame header of {length} bytes does not fit the request or the agent's limit")
    header = _header(bytes(frame[4:4 + length]))
    model_end = 4 + length + header["model_bytes"]
    if model_end + header["inputs_bytes"] != len(frame):
        raise Refused(400, f"request is {len(frame)} bytes, its header says {model_end + header['inputs_bytes']}")
    model = bytes(frame[4 + length:model_end])
    if hashlib.sha256(model).hexdigest() != header["sha256"]:
        raise Refused(400, "model sha256 does not match the header: the upload was corrupted")
    check_model(model, header["format"])
    inputs = plain_array(frame[model_end:])
    return Job(header["format"], header["sha256"], header["threads"], header["warmup"], header["runs"], model, inputs)


def _header(text: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a number")

    try:
        header = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:  # ValueError covers bad UTF-8 and over-long integers
        raise Refused(400, f"request header is not JSON: {str(err)[:80]}") from None
    if not isinstance(header, dict) or header.keys() != HEADER_FIELDS.keys():
        raise Refused(400, f"request header must have exactly the fields {', '.join(HEADER_FIELDS)}")
    for field, (low, high) in HEADER_FIELDS.items():
        value = header[field]
        if low is None or high is None:
            continue
        if type(value) is not int or not low <= value <= high:  # not bool, not float: a count, within bounds
            raise Refused(400, f"{field} must be a whole number from {low} to {high}, got {str(value)[:40]}")
    if header["format"] not in FORMATS:
        raise Refused(400, f"format must be one of {', '.join(FORMATS)}, got {str(header['format'])[:40]!r}")
    if not isinstance(header["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", header["sha256"]):
        raise Refused(400, "sha256 must be 64 lowercase hexadecimal digits")
    return header


def plain_array(data: memoryview) -> np.ndarray:
    """A non-empty numeric .npy array read in place: the shape and dtype its header states are checked against
    the bytes that follow before anything is allocated (np.load would allocate what the header claims)."""
    head = io.BytesIO(bytes(data[:NPY_HEADER_BYTES]))
    try:
        version = np.lib.format.read_magic(head)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = read_header[version](head, max_header_size=NPY_HEADER_BYTES)
    except Exception as err:  # numpy parses the header with tokenize and ast: any of their errors means malformed
        raise Refused(400, f"inputs are not a plain .npy array: {type(err).__name__}: {str(err)[:120]}") from None
    if dtype.kind not in "fiub" or dtype.fields is not None or dtype.subdtype is not None:
        raise Refused(400, f"inputs must be a plain .npy array of numbers, got dtype {str(dtype)[:40]}")
    if not shape or min(shape) < 1:
        raise Refused(400, f"inputs must be a non-empty array with a batch axis, got shape {shape}")
    body = data[head.tell():]
    if math.prod(shape) * dtype.itemsize != len(body):
        raise Refused(400, f"inputs header says {shape} {dtype}, but {len(body)} bytes follow it")
    array = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array)


def check_model(model: bytes, fmt: str) -> None:
    """Refuse anything but a self-contained model file of the stated format: an ONNX tensor anywhere in the
    model (subgraphs, functions, sparse initializers, attributes) whose data lives in a file is refused."""
    if fmt == "tflite":
        if model[4:8] != b"TFL3":
            raise Refused(400, "not a TFLite flatbuffer (no TFL3 identifier)")
        return
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.ModelProto.FromString(model)
    except (DecodeError, RecursionError):
        raise Refused(400, "not an ONNX model") from None
    if not proto.graph.node:
        raise Refused(400, "not an ONNX model (no graph)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in all_tensors(proto)):
        raise Refused(400, "ONNX models with external data are refused: they name files on the device")


def all_tensors(message: Any) -> Iterator[Any]:
    """Every TensorProto inside a protobuf message, at any depth, found by walking every message-typed field.

    onnx's own walk (`external_data_helper._get_all_tensors`) misses sparse initializers and sparse tensor
    attributes; walking the schema instead of naming the places tensors may sit misses nothing a future
    ONNX version adds either."""
    import onnx

    pending = [message]
    while pending:  # a stack, not recursion: nesting depth is the sender's choice
        current = pending.pop()
        if isinstance(current, onnx.TensorProto):
            yield current
        for field in _message_fields(current.DESCRIPTOR):
            if field.is_repeated:
                pending.extend(getattr(current, field.name))
            elif current.HasField(field.name):
                pending.append(getattr(current, field.name))


@functools.cache
def _message_fields(descriptor: Any) -> list[Any]:
    return [field for field in descriptor.fields if field.type == field.TYPE_MESSAGE]


def result_body(outputs: np.ndarray, info: dict[str, Any]) -> bytes:
    """The response: JSON with the figures, then the outputs as .npy (same framing as requests)."""
    buffer = io.BytesIO()
    np.save(buffer, outputs, allow_pickle=False)
    header = json.dumps(info).encode()
    return struct.pack(">I", len(header)) + header + buffer.getvalue()


def read_result(body: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    (length,) = struct.unpack(">I", body[:4])
    return np.load(io.BytesIO(body[4 + length:]), allow_pickle=False), json.loads(body[4:4 + length])
