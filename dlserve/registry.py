"""The model registry: each model is declared once, in one module, and everything iterates.

A model module (dlserve/models/digits.py, ...) defines `MODEL = ModelSpec(...)`: the
model's name, its runner (arrays in, arrays out), its HTTP routes with the request and
response types they really parse and return, its Open Inference Protocol tensors, where
its data set is, and what trains, exports, evaluates, benchmarks and batch-scores it. The
CLI, the service, the bench and batch scoring read `available()`; none of them names a
model. Adding a model is one more module listed in BUILTIN in dlserve/catalog.py (or named
in DLSERVE_MODEL_MODULES, for one that lives elsewhere), plus its training and export code:
docs/adding-a-model.md.

This module is part of the torch-free core that the serving image carries. Code the core
must not import (training and export need PyTorch; evaluation, data readers and the bench
stay out of the image) is named by `Ref("module:attribute")` and imported only by the
command that runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from dlserve.catalog import registered
from dlserve.errors import InputError, describe_validation_errors
from dlserve.prepared import Prepared

if TYPE_CHECKING:
    from dlserve.protocol import Tensors
    from dlserve.runners.base import Runner
    from dlserve.settings import Settings

JSON = "application/json"
T = TypeVar("T")
Int8Method = Literal["dynamic", "static"]  # see PrecisionPlan.int8
INT8_METHODS: tuple[str, ...] = get_args(Int8Method)


@dataclass(frozen=True)
class Ref(Generic[T]):
    """Code named by "module:attribute", imported the first time it is used."""

    target: str

    def load(self) -> T:
        module, _, attribute = self.target.partition(":")
        target: T = getattr(importlib.import_module(module), attribute)
        return target


@dataclass(frozen=True)
class PrecisionPlan:
    """How `dlserve export MODEL --precision int8|fp16` builds and judges the model's
    variants: the evaluation metric a variant is compared on against its FP32 version, the
    most it may lose (in the metric's own units), and how INT8 is made."""

    metric: str  # a key of the model's `evaluate` result, e.g. "accuracy" or "rmse"
    max_loss: float  # accuracy 0.003 is 0.3 points; RMSE 0.01 is 0.01
    higher_is_better: bool = True
    # "dynamic": weights INT8, activations quantised at run time (no data needed);
    # "static": activations too, with ranges calibrated on `calibration`'s inputs.
    int8: Int8Method = "dynamic"
    # (Manifest, DataSource, how many) -> model input feeds made from training data, for
    # "static"
    calibration: Ref[Callable[..., list[dict[str, Any]]]] | None = None

    def loss(self, reference: float, variant: float) -> float:
        """How much worse `variant` is than `reference` (negative: better)."""
        return reference - variant if self.higher_is_better else variant - reference


@dataclass(frozen=True)
class DataSource:
    """Where a model's data set is read from, and the URL that fills in missing files
    (None: nothing is downloaded, the user provides the folder)."""

    folder: Path
    url: str | None


@dataclass(frozen=True)
class Route:
    """One HTTP route's contract: what it parses, what it answers, which bodies it takes.

    `prepare(runner, request, settings)` checks the parsed request against the model and
    the limits (raising `InputError` with the field's name) and preprocesses it;
    `respond(runner, prepared, result)` turns the runner's result into the response.
    """

    path: str
    summary: str
    response: type[BaseModel]
    prepare: Callable[[Any, Any, Settings], Prepared]
    respond: Callable[[Any, Prepared, Any], BaseModel]
    request: type[BaseModel] | None = None  # None: the body is one file, handed over as bytes
    content_types: tuple[str, ...] = (JSON,)  # "image/*" means any image type
    # A cheaper parse of the common, well-formed body (bytes → request, or None whenever it
    # is not sure); the request type's own parse runs when it gives None, and reports what
    # is wrong exactly as it always does.
    parse_fast: Callable[[bytes], Any] | None = None

    @property
    def name(self) -> str:
        """A Python name for the route: /digits/predict_image → digits_predict_image."""
        return self.path.strip("/").replace("/", "_")

    def accepts(self, media_type: str) -> bool:
        """Whether a body of this media type (lower case, no parameters) is taken; a JSON
        route also takes a body with no Content-Type."""
        if self.request is not None and media_type == "":
            return True
        return any(
            media_type == t or (t.endswith("/*") and media_type.startswith(t[:-1]))
            for t in self.content_types
        )

    def parse(self, body: bytes) -> Any:
        """The body as this route's request type (a file route: the bytes themselves).
        An empty JSON body reads as `{}`, so that it is reported by missing field."""
        if self.request is None:
            return body
        if self.parse_fast is not None and (fast := self.parse_fast(body)) is not None:
            return fast
        try:
            return self.request.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise InputError(describe_validation_errors(exc.errors(include_url=False))) from None


@dataclass(frozen=True)
class Lookup:
    """One GET route that answers from a loaded model's own data without running it (the
    recommender's movie search): its query parameters and response types, and `answer`.

    `answer(runner, query)` takes the parsed query; a query the type refuses is a 400
    naming the parameter, before `answer` is called.
    """

    path: str
    summary: str
    query: type[BaseModel]
    response: type[BaseModel]
    answer: Callable[[Any, Any], BaseModel]

    def parse(self, params: Mapping[str, str]) -> BaseModel:
        try:
            return self.query.model_validate(dict(params))
        except ValidationError as exc:
            raise InputError(describe_validation_errors(exc.errors(include_url=False))) from None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    summary: str  # one line: what it does, on what, with what
    runner: type[Runner[Any, Any]]
    routes: tuple[Route, ...]
    data: Callable[[Settings], DataSource]
    # (data_dir, artifacts_dir, *, epochs, seed, quick, download_url) -> metrics
    train: Ref[Callable[..., dict[str, Any]]]
    # (artifacts_dir, *, precision) -> StoredModel
    export: Ref[Callable[..., Any]]
    # (runner, DataSource) -> metrics on held-out data
    evaluate: Ref[Callable[[Any, DataSource], dict[str, Any]]]
    workload: Ref[Any]  # bench.workloads.Workload: inputs for `dlserve bench`
    # Its Open Inference Protocol interface (/v2/models/<name>/infer); None: not offered.
    tensors: Tensors | None = None
    lookups: tuple[Lookup, ...] = ()  # GET routes beside the predict routes
    # scoring.adapters.Scorer: the columns `dlserve score` reads and writes for this model
    # (None: the model has no batch scoring, and `dlserve score` says so)
    scoring: Ref[Any] | None = None
    # Its FP16 and INT8 variants (None: `dlserve export --precision` refuses them)
    precision: PrecisionPlan | None = None
    # Minutes a full `dlserve train` takes on the 2-core machine: `dlserve serve` trains
    # the missing models shortest first, so that it starts serving as early as it can.
    train_minutes: float = 1.0

    def load_runner(self, settings: Settings) -> Runner[Any, Any]:
        return self.runner.load(self.name, settings)


def available(extra_modules: tuple[str, ...] = ()) -> dict[str, ModelSpec]:
    """Every registered model by name: the built-in ones, then those of `extra_modules`."""
    return registered(extra_modules)


def load_runner(name: str, settings: Settings) -> Runner[Any, Any]:
    """The latest stored version of model `name`, opened on the best execution provider."""
    return available(settings.model_modules)[name].load_runner(settings)


def serving(settings: Settings) -> dict[str, ModelSpec]:
    """The models the settings ask for (DLSERVE_MODELS), by name, in that order."""
    known = available(settings.model_modules)
    return {name: known[name] for name in settings.models}
