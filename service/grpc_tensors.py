"""The Open Inference Protocol's gRPC messages ↔ the tensors of dlserve/protocol.py.

A `ModelInferRequest` becomes the same `Decoded` request as a REST body does (its inputs
checked by the same `decode_inputs`, `from_values` and `from_binary`), so that the model's
own `Tensors` declaration checks both alike (service/protocol.py, `prepare_decoded`).
Inputs come as `raw_input_contents` (tritonclient always; kserve's client for
numpy data) or as typed `contents` (kserve's client for lists); the answer comes the same
way, as both Triton's and KServe's servers do: raw outputs for raw inputs, typed ones
otherwise (tritonclient reads raw outputs only, and sends only raw inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import ValidationError

from dlserve import protocol
from dlserve.errors import InputError, describe_validation_errors
from service import grpc_inference_pb2 as pb

# Each datatype's field of InferTensorContents and the numpy type its values read as
# (FP16 has none: raw contents only, as the protocol says).
CONTENTS: dict[str, tuple[str, type[np.generic]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int64),
    "INT16": ("int_contents", np.int64),
    "INT32": ("int_contents", np.int64),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint64),
    "UINT16": ("uint_contents", np.uint64),
    "UINT32": ("uint_contents", np.uint64),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float64),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", np.object_),
}
FIELDS = sorted({field for field, _ in CONTENTS.values()})


def parameters(given: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf map of InferParameter (or ModelRepositoryParameter) as plain values."""
    out = {}
    for key, value in given.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which is not None else None
    return out


def decode(message: Any, tensors: protocol.Tensors, *, max_body: int) -> protocol.Decoded:
    """A ModelInferRequest → its request and named input arrays, checked against `tensors`
    (InputError, naming the tensor or field, for whatever does not fit)."""
    try:
        request = protocol.InferRequest.model_validate(
            {
                "id": message.id or None,
                "parameters": parameters(message.parameters) or None,
                "inputs": [
                    {
                        "name": t.name,
                        "shape": list(t.shape),
                        "datatype": t.datatype,
                        "parameters": parameters(t.parameters) or None,
                    }
                    for t in message.inputs
                ],
                "outputs": [
                    {"name": o.name, "parameters": parameters(o.parameters) or None}
                    for o in message.outputs
                ]
                or None,
            }
        )
    except ValidationError as exc:
        raise InputError(describe_validation_errors(exc.errors(include_url=False))) from None
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InputError(
            f"raw_input_contents: {len(raw)} entries for {len(message.inputs)} inputs "
            "(one per input, in the order of `inputs`)"
        )

    def array_of(i: int, tensor: protocol.RequestInput, where: str) -> np.ndarray:
        given = message.inputs[i]
        if raw:
            if given.HasField("contents"):
                raise InputError(f"{where}: contents given as well as raw_input_contents")
            return protocol.from_binary(raw[i], tensor, where, max_body)
        return protocol.from_values(_typed(given.contents, tensor, where), tensor, where, max_body)

    return protocol.Decoded(request, protocol.decode_inputs(request, tensors, array_of))


def _typed(contents: Any, tensor: protocol.RequestInput, where: str) -> np.ndarray:
    """The flat elements of one input's typed contents, from the field of its datatype."""
    if tensor.datatype not in CONTENTS:
        raise InputError(f"{where}: {tensor.datatype} data goes in raw_input_contents only")
    field, kind = CONTENTS[tensor.datatype]
    stray = [f for f in FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InputError(
            f"{where}: {tensor.datatype} data goes in contents.{field}, not {', '.join(stray)}"
        )
    return np.asarray(getattr(contents, field), dtype=kind)


def encode(
    model: str,
    version: str,
    request: protocol.Decoded,
    arrays: dict[str, np.ndarray],
    wanted: list[tuple[str, bool]],
    *,
    raw: bool,
) -> Any:
    """The ModelInferResponse: each output asked for (`wanted`, in order), as raw bytes when
    `raw` (the request's inputs were raw), else in its typed contents field; all raw when
    one has no typed field (FP16: a precision variant's output)."""
    response = pb.ModelInferResponse(
        model_name=model, model_version=version, id=request.request.id or ""
    )
    raw = raw or any(protocol.datatype_of(arrays[name]) not in CONTENTS for name, _ in wanted)
    for name, _ in wanted:
        array = arrays[name]
        datatype = protocol.datatype_of(array)
        output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(protocol.to_binary(array))
        else:
            getattr(output.contents, CONTENTS[datatype][0]).extend(array.ravel().tolist())
    return response
