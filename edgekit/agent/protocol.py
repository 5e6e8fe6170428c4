"""The agent's wire format, shared by the server on the board and the client on the workstation.

A request is one body: a 4-byte big-endian header length, a JSON header (task, format, threads, warmup,
runs, each model's sha256 and byte count, each array's byte count), the model files, and the task's arrays
as `.npy` arrays in the task's order. Nothing in it is a path and nothing is unpickled: models are checked
to be ONNX (no tensor anywhere with external data, which would name files on the board) or TFLite
flatbuffers, and arrays are read in place from their checked header, never through pickle.

A task is what the board runs, as the host would: `run` one graph over rows of inputs (image models);
`segment` an encoder / prompt-decoder pair over images and box prompts (the encoder in the job's format, the
decoder ONNX); `lm` a language model's held-out windows and greedy decoding through its key/value cache.
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

FORMATS = ("onnx", "tflite", "pte", "openvino")
# the files a model of each format is sent as: one, or an OpenVINO IR's XML and its weights
FILES = {"onnx": ("onnx",), "tflite": ("tflite",), "pte": ("pte",), "openvino": ("openvino-xml", "openvino-bin")}
API = "/v2"
MAX_HEADER_BYTES = 4096  # the JSON header is about 300 bytes
NPY_HEADER_BYTES = 10_000  # numpy's own limit on a .npy header it will parse


@dataclass(frozen=True)
class Task:
    models: tuple[str, ...]  # each model's format: "job" (the job's format) or a fixed one
    arrays: dict[str, tuple[str, int]]  # each array: numpy kinds it may have, and its number of axes (0: any)

    def files(self, fmt: str) -> list[str]:
        """The kind of each file a job of this task in `fmt` sends, in order."""
        return [kind for model in self.models for kind in FILES[fmt if model == "job" else model]]


TASKS = {
    "run": Task(("job",), {"inputs": ("fiub", 0)}),
    "segment": Task(("job", "onnx"), {"frames": ("u", 4), "shapes": ("iu", 2), "scales": ("f", 1),
                                      "boxes": ("f", 2), "image_of": ("iu", 1)}),
    "lm": Task(("job",), {"windows": ("iu", 2), "prompts": ("iu", 2), "new_tokens": ("iu", 1)}),
}
# every header field: a count within bounds, or (None) checked on its own
COUNTS = {"threads": (1, 256), "warmup": (0, 1000), "runs": (1, 10000)}
SIZE_BOUNDS = (1, 2**40)
HEADER_FIELDS = ("task", "format", *COUNTS, "sha256", "model_bytes", "array_bytes")


class Refused(Exception):
    """A request the agent will not run; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    task: str
    format: str
    threads: int
    warmup: int
    runs: int
    models: list[bytes]
    arrays: dict[str, np.ndarray]

    @property
    def sha256(self) -> list[str]:
        return [hashlib.sha256(model).hexdigest() for model in self.models]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode(job: Job) -> bytes:
    arrays = [npy_bytes(job.arrays[name]) for name in TASKS[job.task].arrays]
    header = json.dumps({"task": job.task, "format": job.format, "threads": job.threads, "warmup": job.warmup,
                         "runs": job.runs, "sha256": job.sha256, "model_bytes": [len(m) for m in job.models],
                         "array_bytes": [len(a) for a in arrays]}).encode()
    return struct.pack(">I", len(header)) + header + b"".join(job.models) + b"".join(arrays)


def decode(body: bytes | bytearray) -> Job:
    """The job in `body`, checked before anything is allocated for it: a well-formed frame whose header has
    exactly the known fields (finite, bounded numbers, as many models and arrays as its task takes), models of
    the stated formats whose sha256 match, and non-empty plain numeric .npy arrays of the task's kinds and axes
    whose headers agree with their lengths. Anything else is refused with 400 and the reason."""
    frame = memoryview(body)
    if len(frame) < 4:
        raise Refused(400, "empty request: no frame header")
    (length,) = struct.unpack(">I", frame[:4])
    if not 2 <= length <= min(MAX_HEADER_BYTES, len(frame) - 4):
        raise Refused(400, f"frame header of {length} bytes does not fit the request or the agent's limit")
    header = _header(bytes(frame[4:4 + length]))
    task = TASKS[header["task"]]
    stated = 4 + length + sum(header["model_bytes"]) + sum(header["array_bytes"])
    if stated != len(frame):
        raise Refused(400, f"request is {len(frame)} bytes, its header says {stated}")
    at, models = 4 + length, []
    for size, digest, kind in zip(header["model_bytes"], header["sha256"], task.files(header["format"]), strict=True):
        model = bytes(frame[at:at + size])
        at += size
        if hashlib.sha256(model).hexdigest() != digest:
            raise Refused(400, "model sha256 does not match the header: the upload was corrupted")
        check_model(model, kind)
        models.append(model)
    arrays = {}
    for size, (name, (kinds, axes)) in zip(header["array_bytes"], task.arrays.items(), strict=True):
        array = plain_array(frame[at:at + size])
        at += size
        if array.dtype.kind not in kinds or (axes and array.ndim != axes):
            raise Refused(400, f"{name} must be a {axes or 'any'}-axis array of kind {kinds!r}, got "
                          f"{array.ndim} axes of {array.dtype}")
        arrays[name] = array
    return Job(header["task"], header["format"], header["threads"], header["warmup"], header["runs"], models, arrays)


def _header(text: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a number")

    try:
        header = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:  # ValueError covers bad UTF-8 and over-long integers
        raise Refused(400, f"request header is not JSON: {str(err)[:80]}") from None
    if not isinstance(header, dict) or set(header) != set(HEADER_FIELDS):
        raise Refused(400, f"request header must have exactly the fields {', '.join(HEADER_FIELDS)}")
    if header["task"] not in TASKS:
        raise Refused(400, f"task must be one of {', '.join(TASKS)}, got {str(header['task'])[:40]!r}")
    if header["format"] not in FORMATS:
        raise Refused(400, f"format must be one of {', '.join(FORMATS)}, got {str(header['format'])[:40]!r}")
    for field, bounds in COUNTS.items():
        _count(field, header[field], bounds)
    task = TASKS[header["task"]]
    files = len(task.files(header["format"]))
    for field, wanted in (("sha256", files), ("model_bytes", files), ("array_bytes", len(task.arrays))):
        if not isinstance(header[field], list) or len(header[field]) != wanted:
            raise Refused(400, f"{field} must list {wanted} values for a {header['task']} task")
    for value in header["model_bytes"] + header["array_bytes"]:
        _count("a byte count", value, SIZE_BOUNDS)
    if not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in header["sha256"]):
        raise Refused(400, "sha256 must list 64 lowercase hexadecimal digits per model")
    return header


def _count(field: str, value: Any, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if type(value) is not int or not low <= value <= high:  # not bool, not float: a count, within bounds
        raise Refused(400, f"{field} must be a whole number from {low} to {high}, got {str(value)[:40]}")


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


def check_model(model: bytes, kind: str) -> None:
    """Refuse anything but a self-contained model file of the stated kind: an ONNX tensor anywhere in the model
    (subgraphs, functions, sparse initializers, attributes) whose data lives in a file is refused, and so is an
    OpenVINO IR with a document type (entities expand or name files) or another root than `net`. An IR's
    weights are bytes its XML indexes; the runtime reads both from memory."""
    identifiers = {"tflite": (b"TFL3", "a TFLite flatbuffer"), "pte": (b"ET12", "an ExecuTorch program")}
    if kind in identifiers:
        identifier, what = identifiers[kind]
        if model[4:8] != identifier:
            raise Refused(400, f"not {what} (no {identifier.decode()} identifier)")
        return
    if kind == "openvino-bin":
        return
    if kind == "openvino-xml":
        _check_ir(model)
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


def _check_ir(model: bytes) -> None:
    import xml.etree.ElementTree as ElementTree

    if b"<!DOCTYPE" in model.upper() or b"<!ENTITY" in model.upper():
        raise Refused(400, "OpenVINO IRs with a document type are refused: its entities expand or name files")
    try:
        root = ElementTree.fromstring(model)
    except (ElementTree.ParseError, RecursionError):
        raise Refused(400, "not an OpenVINO IR (not XML)") from None
    if root.tag != "net":
        raise Refused(400, f"not an OpenVINO IR (its root is <{root.tag[:40]}>, not <net>)")


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


def result_body(outputs: dict[str, np.ndarray], info: dict[str, Any]) -> bytes:
    """The response: JSON with the figures and the arrays' names and sizes, then the arrays as .npy (the
    requests' framing)."""
    arrays = {name: npy_bytes(array) for name, array in outputs.items()}
    header = json.dumps({**info, "arrays": {name: len(data) for name, data in arrays.items()}}).encode()
    return struct.pack(">I", len(header)) + header + b"".join(arrays.values())


def read_result(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    (length,) = struct.unpack(">I", body[:4])
    info = json.loads(body[4:4 + length])
    outputs, at = {}, 4 + length
    for name, size in info.pop("arrays").items():
        outputs[name] = np.load(io.BytesIO(body[at:at + size]), allow_pickle=False)
        at += size
    return outputs, info
