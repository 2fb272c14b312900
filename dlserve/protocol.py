"""The Open Inference Protocol (KServe v2 REST; Triton's and MLServer's too), torch-free.

A model speaks it through its `Tensors` declaration (in its module of dlserve/models/):
which named tensors it takes and gives, and how they become the runner's input and come
back from its result. This module decodes an infer request (JSON, with Triton's binary
tensor extension: `Inference-Header-Content-Length` and `binary_data_size`) into named
numpy arrays, and encodes the response the same two ways. Every client mistake is an
`InputError` that names the tensor or field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from dlserve.errors import InputError, PayloadTooLarge, describe_validation_errors

if TYPE_CHECKING:
    from dlserve.prepared import Prepared
    from dlserve.settings import Settings

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


@dataclass(frozen=True)
class TensorDecl:
    """One named tensor of a model's protocol interface; -1 in `shape` is any size."""

    name: str
    datatypes: tuple[str, ...]  # accepted (inputs) or given (outputs); metadata shows the first
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


@dataclass(frozen=True)
class Tensors:
    """A model's protocol interface, declared in its registry module.

    `prepare(runner, inputs, parameters, settings)` checks the named input arrays (as the
    JSON route checks its fields) and makes the runner's input; `answer(runner, prepared,
    result)` gives the named output arrays."""

    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    prepare: Callable[[Any, dict[str, np.ndarray], dict[str, Any], Settings], Prepared]
    answer: Callable[[Any, Prepared, Any], dict[str, np.ndarray]]
    parameters: dict[str, str] = field(default_factory=dict)  # request parameters it reads
    # A JSON infer request that works when pasted: /docs.json shows it for this model.
    example: dict[str, Any] = field(default_factory=dict)

    def metadata(self, name: str, version: str, platform: str) -> dict[str, Any]:
        return {
            "name": name,
            "versions": [version],
            "platform": platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def config(self, name: str, platform: str, max_batch_size: int) -> dict[str, Any]:
        """Triton's model configuration (its model-configuration extension), which Triton's
        tools (perf_analyzer, model_analyzer) read. When every tensor's first axis is the
        batch, it is declared as Triton's batch axis, up to `max_batch_size` items."""
        batched = all(t.shape[:1] == (-1,) for t in (*self.inputs, *self.outputs))

        def dims(t: TensorDecl) -> list[int]:
            return (list(t.shape[1:]) or [1]) if batched else list(t.shape)

        def entry(t: TensorDecl) -> dict[str, Any]:
            kind = t.datatypes[0].replace("BYTES", "STRING")  # Triton's name for it
            out = {
                "name": t.name,
                "data_type": "TYPE_" + kind,
                "dims": dims(t),
                "optional": t.optional,
            }
            if batched and len(t.shape) == 1:  # [N] itself: Triton writes dims [1], no reshape
                out["reshape"] = {"shape": []}
            return out

        return {
            "name": name,
            "platform": platform,
            "backend": "onnxruntime",
            "max_batch_size": max_batch_size if batched else 0,
            "input": [entry(t) for t in self.inputs],
            "output": [
                {k: v for k, v in entry(t).items() if k != "optional"} for t in self.outputs
            ],
        }


class _Open(BaseModel):
    # The protocol lets clients add fields (extensions); they are kept, not refused.
    model_config = ConfigDict(extra="allow")


class RequestInput(_Open):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(_Open):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Open):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Decoded:
    request: InferRequest
    inputs: dict[str, np.ndarray]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.request.parameters or {}


def decode(body: bytes, header_length: str | None, tensors: Tensors, *, max_body: int) -> Decoded:
    """A REST infer request → its JSON part and named input arrays, checked against `tensors`."""
    json_part, binary = body, b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InputError(
                f"Inference-Header-Content-Length: {header_length!r} is not a "
                f"byte count within the {len(body)}-byte body"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = InferRequest.model_validate_json(json_part or b"{}")
    except ValidationError as exc:
        raise InputError(describe_validation_errors(exc.errors(include_url=False))) from None
    offset = 0

    def array_of(i: int, tensor: RequestInput, where: str) -> np.ndarray:
        nonlocal offset
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            return _from_json(tensor, where, max_body)
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InputError(
                f"{where}: binary_data_size {size!r} does not fit the "
                f"{len(binary)} bytes after the JSON header"
            )
        offset += size
        return from_binary(binary[offset - size : offset], tensor, where, max_body)

    arrays = decode_inputs(request, tensors, array_of)
    if offset != len(binary):
        raise InputError(
            f"body: {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    return Decoded(request, arrays)


def decode_inputs(
    request: InferRequest,
    tensors: Tensors,
    array_of: Callable[[int, RequestInput, str], np.ndarray],
) -> dict[str, np.ndarray]:
    """The request's input arrays by name, each made by `array_of(index, input, where)` (from
    JSON or binary data over REST, typed or raw contents over gRPC: service/grpc_tensors.py)
    once its name and datatype are checked against `tensors`; every input it needs given."""
    declared = {t.name: t for t in tensors.inputs}
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}] ({tensor.name})"
        decl = declared.get(tensor.name)
        if decl is None:
            raise InputError(
                f"{where}: no input of that name; this model takes {', '.join(declared)}"
            )
        if tensor.name in arrays:
            raise InputError(f"{where}: sent twice")
        if tensor.datatype not in decl.datatypes:
            raise InputError(
                f"{where}: datatype {tensor.datatype} is not accepted; send "
                f"{' or '.join(decl.datatypes)}"
            )
        arrays[tensor.name] = array_of(i, tensor, where)
    missing = [t.name for t in tensors.inputs if not t.optional and t.name not in arrays]
    if missing:
        raise InputError(
            f"inputs: missing {', '.join(missing)}; this model takes "
            + ", ".join(t.name + ("" if not t.optional else " (optional)") for t in tensors.inputs)
        )
    return arrays


def _count(shape: list[int], where: str, max_body: int) -> int:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > max_body:  # no tensor of more elements than body bytes can be real
        raise PayloadTooLarge(
            f"{where}: shape {shape} is {count:,} elements, more than the request could carry"
        )
    return count


def _from_json(tensor: RequestInput, where: str, max_body: int) -> np.ndarray:
    _count(tensor.shape, where, max_body)  # a shape too large is that (413), whatever the data
    dtype = DATATYPES[tensor.datatype]
    data = tensor.data
    if not isinstance(data, list):
        data = [data] if data is not None else None
    if data is None:
        raise InputError(
            f"{where}: no data (give `data`, or binary data with parameters.binary_data_size)"
        )
    try:
        flat = np.asarray(data, dtype=object if dtype.kind == "O" else None).ravel()
    except ValueError:
        raise InputError(f"{where}: data is a ragged list; send it flat, row-major") from None
    return from_values(flat, tensor, where, max_body)


def from_values(flat: np.ndarray, tensor: RequestInput, where: str, max_body: int) -> np.ndarray:
    """The input array from its elements as given, flat (JSON's numbers, true/false and
    strings, or gRPC's typed contents), checked against its datatype and shape."""
    count = _count(tensor.shape, where, max_body)
    dtype = DATATYPES[tensor.datatype]
    if flat.size != count:
        raise InputError(f"{where}: {flat.size} values for shape {tensor.shape} ({count} expected)")
    if dtype.kind == "O":
        if not all(isinstance(x, str | bytes) for x in flat):
            raise InputError(f"{where}: BYTES data in JSON must be strings")
        items = [x.encode() if isinstance(x, str) else x for x in flat]
        return np.array(items, dtype=object).reshape(tensor.shape)
    if flat.dtype.kind not in "biuf" or (flat.dtype.kind == "b") != (dtype.kind == "b"):
        kind = "true/false" if dtype.kind == "b" else "numbers"
        raise InputError(f"{where}: data must be {kind} for {tensor.datatype}")
    if dtype.kind in "iu" and flat.dtype.kind == "f" and flat.size:  # [] reads as floats
        raise InputError(f"{where}: {tensor.datatype} data must be whole numbers")
    if (
        dtype.kind in "iu"
        and flat.size
        and (flat.min() < np.iinfo(dtype).min or flat.max() > np.iinfo(dtype).max)
    ):
        raise InputError(f"{where}: a value is outside the range of {tensor.datatype}")
    return flat.astype(dtype).reshape(tensor.shape)


def from_binary(raw: bytes, tensor: RequestInput, where: str, max_body: int) -> np.ndarray:
    """The input array from its raw bytes: little-endian elements, row-major (BYTES: each
    element after its 4-byte little-endian length), as REST's binary extension and gRPC's
    raw_input_contents carry it."""
    count = _count(tensor.shape, where, max_body)
    dtype = DATATYPES[tensor.datatype]
    if dtype.kind != "O":
        if len(raw) != count * dtype.itemsize:
            raise InputError(
                f"{where}: {len(raw)} bytes of binary data for shape "
                f"{tensor.shape} of {tensor.datatype} "
                f"({count * dtype.itemsize} expected)"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(tensor.shape)
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InputError(f"{where}: BYTES data ends inside an element's 4-byte length")
        n = int.from_bytes(raw[at : at + 4], "little")
        if at + 4 + n > len(raw):
            raise InputError(f"{where}: a BYTES element of {n} bytes runs past its data")
        items.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    if len(items) != count:
        raise InputError(
            f"{where}: {len(items)} BYTES elements for shape {tensor.shape} ({count} expected)"
        )
    return np.array(items, dtype=object).reshape(tensor.shape)


def requested_outputs(decoded: Decoded, tensors: Tensors) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return: those asked for, else all of them."""
    binary_all = bool(decoded.parameters.get("binary_data_output", False))
    given = {t.name for t in tensors.outputs}
    if decoded.request.outputs is None:
        return [(t.name, binary_all) for t in tensors.outputs]
    out = []
    for i, o in enumerate(decoded.request.outputs):
        if o.name not in given:
            raise InputError(
                f"outputs[{i}] ({o.name}): no output of that name; this model "
                f"gives {', '.join(given)}"
            )
        out.append((o.name, bool((o.parameters or {}).get("binary_data", binary_all))))
    return out


def datatype_of(array: np.ndarray) -> str:
    return next(name for name, dt in DATATYPES.items() if dt == array.dtype)


def to_binary(array: np.ndarray) -> bytes:
    """An output array as raw bytes (from_binary's layout)."""
    if array.dtype.kind == "O":
        return b"".join(len(x).to_bytes(4, "little") + x for x in array.ravel())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode(
    model: str,
    version: str,
    request_id: str | None,
    arrays: dict[str, np.ndarray],
    wanted: list[tuple[str, bool]],
) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its extra headers: the JSON object, followed by the
    binary data of the outputs asked for as binary (Inference-Header-Content-Length)."""
    outputs, blobs = [], []
    for name, as_binary in wanted:
        array = arrays[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if as_binary:
            blob = to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype.kind == "O":
            entry["data"] = [x.decode("utf-8", "replace") for x in array.ravel()]
        else:
            entry["data"] = array.ravel()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def parameter(parameters: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    """A request parameter of the expected type; InputError names it otherwise."""
    value = parameters.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InputError(f"parameters.{name}: expected {kind.__name__}, got {json.dumps(value)}")
    return value
