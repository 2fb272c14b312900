"""Payload logging: what each model request asked and was answered, written off the request
path (docs/payload-logging.md).

Off unless DLSERVE_PAYLOAD_LOG names a directory or an http(s) URL. The guard hands every
predict and infer request to `PayloadLog.start` (None unless the request is sampled) and,
with its answer, to `Entry.finish`, which adds the request id header and appends the raw
request and response bytes to a bounded queue: no JSON, no hashing, no I/O on the event
loop. One writer thread per worker takes what is queued every FLUSH_S and hands it to the
sink: gzip-compressed JSON Lines under the directory (`FileSink`), or CloudEvents over HTTP
in KServe's inference logger format (`EventSink`). A full queue or a failing sink drops
records, counted in dlserve_payload_log_dropped_total by reason; the prediction itself
never waits for, or fails with, its log. On shutdown (after a SIGTERM drain) `close`
writes out what is queued and closes the current file.

Which version answered is read from `ANSWERED`, which the request path (service/predict.py,
`serve`) sets once it has picked the version (a canary answers some requests).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import http.client
import io
import logging
import os
import random
import re
import socket
import threading
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from dlserve.settings import Settings
from service import lifecycle
from service.metrics import Metrics

log = logging.getLogger("dlserve.service")

# The id of a logged request, sent back on its response; a client's (or a proxy's: Envoy
# and nginx set one) X-Request-Id is kept when it is a plausible id, so that the record can
# be found from the client's own logs. Documented in docs/payload-logging.md.
REQUEST_ID_HEADER = b"x-request-id"
_PLAUSIBLE_ID = re.compile(rb"[!-~]{1,128}")  # visible ASCII, no spaces
DROP_REASONS = ("queue_full", "sink_error")
# The writer wakes this often: a record reaches the URL, or the open file, about this soon.
FLUSH_S = 0.2
# Records handed to the sink at once: one gzip write, or events sent back to back on one
# kept-alive connection.
BATCH_RECORDS = 512
# Queued bodies are raw bytes, up to DLSERVE_MAX_BODY_BYTES each: bound their sum too.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# A failing URL sink is retried after this long, doubling to MAX_BACKOFF_S: meanwhile its
# records are dropped (counted), never retried, so that a dead sink costs nothing.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# A receiver that takes longer than this over one event is failing.
EVENT_TIMEOUT_S = 2.0
# The event types of KServe's inference logger (kserve/kserve, pkg/logger/worker.go).
CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"
JSON_TYPES = ("", "application/json")


@dataclass(frozen=True)
class Answered:
    """Which version answered a request: its tag, and whether it was the canary."""

    tag: str
    canary: bool


ANSWERED: ContextVar[Answered | None] = ContextVar("dlserve_answered", default=None)


@dataclass(slots=True)
class Entry:
    """One sampled request, from its arrival to its answer: what the writer gets."""

    log: PayloadLog
    id: str
    route: str
    model: str
    content_type: str
    content_encoding: str
    body: bytes
    arrived: float = field(default_factory=time.time)  # wall clock, for the record
    started: float = field(default_factory=time.perf_counter)
    latency_s: float = 0.0
    status: int = 0
    response_type: str = ""
    response: bytes = b""
    answered: Answered | None = None

    def finish(self, response: Any) -> None:
        """Send the id back on `response` (a Starlette Response, its body in hand) and
        queue the record: a few attribute reads and one append."""
        self.latency_s = time.perf_counter() - self.started
        self.status = response.status_code
        self.response_type = response.media_type or ""
        self.response = response.body
        self.answered = ANSWERED.get()
        response.raw_headers.append((REQUEST_ID_HEADER, self.id.encode()))
        self.log.offer(self)


class Sink(Protocol):
    def write(self, batch: list[Entry]) -> int:
        """Write the batch; how many records were lost (0: all written)."""

    def tick(self) -> None:
        """Called every FLUSH_S: time-based work (rotation)."""

    def close(self) -> None: ...


class PayloadLog:
    """One worker's payload log: the bounded queue and the writer thread that empties it."""

    def __init__(self, sink: Sink, settings: Settings, metrics: Metrics) -> None:
        self.sink = sink
        self.rate = settings.payload_log_sample_rate
        self.capacity = settings.payload_log_queue
        self.queue: deque[Entry] = deque()
        # Bytes queued = added - taken, each counter written by one thread only (the event
        # loop, the writer), so that neither needs a lock.
        self.added_bytes = 0
        self.taken_bytes = 0
        self.written = metrics.payload_log_written
        self.dropped = {r: metrics.payload_log_dropped.labels(reason=r) for r in DROP_REASONS}
        # Ids are 128 bits: this worker's random half, then a pseudo-random half. A new
        # uuid4 per request (an os.urandom system call) took 2.4 % of a digits worker's
        # time under load (py-spy).
        self.id_prefix = os.urandom(8).hex()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dlserve-payload-log", daemon=True)
        self.thread.start()

    def start(
        self, route: str, model: str, headers: dict[bytes, bytes], body: bytes
    ) -> Entry | None:
        """A request's record, begun; None when the sample rate leaves it out."""
        if self.rate < 1.0 and random.random() >= self.rate:
            return None
        given = headers.get(REQUEST_ID_HEADER)
        request_id = (
            given.decode("ascii")
            if given is not None and _PLAUSIBLE_ID.fullmatch(given)
            else f"{self.id_prefix}{random.getrandbits(64):016x}"
        )
        return Entry(
            self,
            request_id,
            route,
            model,
            headers.get(b"content-type", b"").decode("latin-1"),
            headers.get(b"content-encoding", b"").decode("latin-1"),
            body,
        )

    def offer(self, record: Entry) -> None:
        size = len(record.body) + len(record.response)
        if (
            len(self.queue) >= self.capacity
            or self.added_bytes - self.taken_bytes + size > MAX_QUEUED_BYTES
        ):
            self.dropped["queue_full"].inc()
            return
        self.added_bytes += size
        self.queue.append(record)

    def _take(self) -> list[Entry]:
        batch: list[Entry] = []
        while self.queue and len(batch) < BATCH_RECORDS:
            record = self.queue.popleft()
            self.taken_bytes += len(record.body) + len(record.response)
            batch.append(record)
        return batch

    def _run(self) -> None:
        while True:
            stopping = self.stopping.wait(FLUSH_S)
            while batch := self._take():
                self._write(batch)
            try:
                if stopping:  # closed by this thread: nothing else ever touches the sink
                    self.sink.close()
                    return
                self.sink.tick()
            except Exception:  # noqa: BLE001 - the writer must outlive any sink failure
                log.exception("payload log: %s failed", self.sink)
                if stopping:
                    return

    def _write(self, batch: list[Entry]) -> None:
        try:
            lost = self.sink.write(batch)
        except Exception:  # noqa: BLE001 - a bug in a sink drops records, not the thread
            log.exception("payload log: %d records could not be written", len(batch))
            lost = len(batch)
        if lost:
            self.dropped["sink_error"].inc(lost)
        if len(batch) > lost:
            self.written.inc(len(batch) - lost)

    def close(self, timeout_s: float = 10.0) -> None:
        """Have the writer write out what is queued and close the sink (the last file is
        renamed, complete); wait for it up to `timeout_s` (the drain's watchdog ends the
        worker at DLSERVE_DRAIN_TIMEOUT_S in any case)."""
        self.stopping.set()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("payload log: %d records still queued at exit", len(self.queue))


# -- records -------------------------------------------------------------------------------


def _shape(value: Any) -> Any:
    """A JSON value's outline: list lengths, nested (the first element's), per field."""
    if isinstance(value, list):
        inner = _shape(value[0]) if value and isinstance(value[0], list) else []
        return [len(value), *inner]
    if isinstance(value, dict):
        if isinstance(tensors := value.get("inputs"), list):  # Open Inference Protocol
            return {
                "inputs": [
                    {k: t.get(k) for k in ("name", "datatype", "shape")}
                    for t in tensors
                    if isinstance(t, dict)
                ]
            }
        return {k: _shape(v) for k, v in value.items() if isinstance(v, list | dict)}
    return None


def _image_size(body: bytes) -> list[int] | None:
    """[width, height] of an image file, from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)) as image:
            return list(image.size)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _summary(body: bytes, content_type: str, limit: int) -> dict[str, Any]:
    """What stands for a body over the size cap: its hash, size and shape."""
    summary: dict[str, Any] = {
        "omitted": f"larger than DLSERVE_PAYLOAD_LOG_MAX_BYTES ({limit})",
        "content_type": content_type,
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    if content_type.startswith("image/"):
        summary["size"] = _image_size(body)
    elif content_type in JSON_TYPES:
        with contextlib.suppress(orjson.JSONDecodeError):
            summary["shape"] = _shape(orjson.loads(body))
    return summary


def body_value(body: bytes, content_type: str, encoding: str, limit: int) -> Any:
    """A body as a record holds it: JSON as JSON; anything else (an image, binary tensors,
    a compressed body, JSON that does not parse) as base64 with its type; over `limit`
    bytes, a summary."""
    kind = content_type.split(";")[0].strip().lower()
    if len(body) > limit:
        return _summary(body, kind, limit)
    if kind in JSON_TYPES and encoding in ("", "identity"):
        try:
            return orjson.loads(body or b"null")
        except orjson.JSONDecodeError:
            pass
    value: dict[str, Any] = {"content_type": kind, "base64": base64.b64encode(body).decode()}
    if encoding:
        value["content_encoding"] = encoding
    return value


@functools.lru_cache(maxsize=4)
def _utc_second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _rfc3339(seconds: float) -> str:
    """2026-12-03T19:09:14.809871Z. The records of a batch share their second, formatted
    once: datetime's isoformat took 4.4 µs a record."""
    whole = int(seconds)
    return f"{_utc_second(whole)}.{int((seconds - whole) * 1e6):06d}Z"


def body_json(body: bytes, content_type: str, encoding: str, limit: int, valid: bool) -> bytes:
    """`body_value` as JSON text. A body the route has parsed as JSON (`valid`: it was
    answered 200) is spliced in as it came, its line breaks (whitespace, in valid JSON)
    made spaces: parsing and writing it again cost ~40 µs of the writer's time (holding
    the GIL the event loop needs) per single-image digits record."""
    kind = content_type.split(";")[0].strip().lower()
    if valid and len(body) <= limit and kind in JSON_TYPES and encoding in ("", "identity"):
        return body.replace(b"\n", b" ").replace(b"\r", b" ")
    return orjson.dumps(body_value(body, content_type, encoding, limit))


def record(entry: Entry, mode: str, limit: int) -> bytes:
    """A request's record, one line of JSON (docs/payload-logging.md shows one)."""
    answered = entry.answered
    head = orjson.dumps(
        {
            "id": entry.id,
            "time": _rfc3339(entry.arrived),
            "route": entry.route,
            "model": entry.model,
            "model_tag": answered.tag if answered else None,
            "endpoint": ("canary" if answered.canary else "default") if answered else None,
            "status": entry.status,
            "latency_ms": round(entry.latency_s * 1000, 3),
        }
    )
    parts = [head[:-1]]
    answered_ok = entry.status == 200
    if mode != "response":
        parts += [
            b',"inputs":',
            body_json(entry.body, entry.content_type, entry.content_encoding, limit, answered_ok),
        ]
    if mode != "request":
        # The service wrote it: JSON whenever its type says so.
        parts += [b',"outputs":', body_json(entry.response, entry.response_type, "", limit, True)]
    parts.append(b"}\n")
    return b"".join(parts)


# -- sinks ---------------------------------------------------------------------------------


class FileSink:
    """Gzip-compressed JSON Lines, one file at a time per worker, rotated by size (of the
    JSON written, before compression) and age.

    The file being written is `.NAME.part` (hidden); rotation closes its gzip stream,
    fsyncs it and renames it to NAME, so every `payloads-*.jsonl.gz` is a complete gzip
    file and a reader never sees a half-written one. Names sort by the time they were
    opened: payloads-<UTC time>-<pid>-<n>.jsonl.gz."""

    def __init__(self, directory: Path, settings: Settings) -> None:
        self.directory = directory
        self.mode = settings.payload_log_mode
        self.limit = settings.payload_log_max_bytes
        self.rotate_bytes = settings.payload_log_rotate_bytes
        self.rotate_s = settings.payload_log_rotate_s
        self.count = 0
        self.raw: io.BufferedWriter | None = None
        self.gz: gzip.GzipFile | None = None
        self.part = self.final = Path()
        self.opened = 0.0
        self.size = 0  # JSON bytes in the current file: zlib holds back what it compressed
        self.failing = False  # said once per run of failures, not per batch

    def __str__(self) -> str:
        return str(self.directory)

    def _open(self) -> None:
        self.count += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"payloads-{stamp}-{os.getpid()}-{self.count:05d}.jsonl.gz"
        self.final, self.part = self.directory / name, self.directory / f".{name}.part"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.raw = open(self.part, "wb")  # noqa: SIM115 - closed by _rotate
        # Level 1: digits records (MNIST test images) shrank 5.5:1 at 146 MB/s, against
        # 7.4:1 at 20 MB/s for zlib's default (6), too slow for one worker's 4,000 requests/s
        # of ~3 KB each.
        self.gz = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=1)
        self.opened = time.monotonic()

    def _rotate(self) -> None:
        gz, raw = self.gz, self.raw
        self.gz = self.raw = None
        self.size = 0
        if gz is None or raw is None:
            return
        try:
            gz.close()
            raw.flush()
            os.fsync(raw.fileno())
        finally:
            with contextlib.suppress(OSError):
                raw.close()
        os.replace(self.part, self.final)

    def write(self, batch: list[Entry]) -> int:
        lines = [record(entry, self.mode, self.limit) for entry in batch]
        done = 0
        while done < len(lines):
            # What fits in the current file (at least one record), in one compressor call.
            take, room = 1, self.rotate_bytes - self.size - len(lines[done])
            while done + take < len(lines) and room >= len(lines[done + take]):
                room -= len(lines[done + take])
                take += 1
            chunk = b"".join(lines[done : done + take])
            try:
                if self.gz is None:
                    self._open()
                assert self.gz is not None
                self.gz.write(chunk)
                self.size += len(chunk)
                if self.size >= self.rotate_bytes:
                    self._rotate()
            except OSError as exc:
                self._abandon(exc)
                return len(lines) - done
            done += take
        self.failing = False
        return 0

    def _abandon(self, exc: OSError) -> None:
        """After a failed write, close the current file if it can still be closed (keeping
        the records before the failure), else give it up; the next batch opens a new one."""
        if not self.failing:
            log.warning("payload log: cannot write in %s (%s); dropping records", self, exc)
        self.failing = True
        with contextlib.suppress(OSError):
            self._rotate()
        with contextlib.suppress(OSError):  # there still when it could not be closed
            self.part.unlink(missing_ok=True)

    def tick(self) -> None:
        if self.gz is not None and time.monotonic() - self.opened >= self.rotate_s:
            try:
                self._rotate()
            except OSError as exc:
                self._abandon(exc)

    def close(self) -> None:
        self._rotate()


@dataclass(frozen=True)
class Event:
    """One CloudEvent in HTTP binary content mode: its ce-* headers and its data."""

    headers: dict[str, str]
    data: bytes


def events(entry: Entry, mode: str, limit: int, source: str) -> list[Event]:
    """A request's CloudEvents as KServe's logger sends them: the request event (mode all or
    request) and, when the answer is a 200, the response event (mode all or response), both
    with the request's id, in binary content mode. A body over the cap is replaced by its
    JSON summary, marked by the `omitted` attribute."""
    answered = entry.answered
    common = {
        "ce-specversion": "1.0",
        "ce-id": entry.id,
        "ce-source": source,
        "ce-time": _rfc3339(entry.arrived),
        "ce-inferenceservicename": entry.model,
        "ce-component": "predictor",
        "ce-endpoint": "canary" if answered and answered.canary else "default",
        "ce-modelversion": answered.tag if answered else "",
        "ce-route": entry.route,
    }
    wanted = []
    if mode != "response":
        wanted.append((CE_REQUEST, entry.body, entry.content_type or "application/json"))
    if mode != "request" and entry.status == 200:
        wanted.append((CE_RESPONSE, entry.response, entry.response_type))
    out = []
    for kind, body, content_type in wanted:
        headers = {**common, "ce-type": kind, "content-type": content_type}
        if kind == CE_REQUEST and entry.content_encoding:
            headers["content-encoding"] = entry.content_encoding
        if len(body) > limit:
            body = orjson.dumps(_summary(body, content_type.split(";")[0].strip().lower(), limit))
            headers.update({"content-type": "application/json", "ce-omitted": "true"})
            headers.pop("content-encoding", None)
        out.append(Event(headers, body))
    return out


class EventSink:
    """CloudEvents POSTed to a URL, back to back on one kept-alive connection."""

    def __init__(self, url: str, settings: Settings) -> None:
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.mode = settings.payload_log_mode
        self.limit = settings.payload_log_max_bytes
        self.source = f"urn:dlserve:{socket.gethostname()}"
        self.connection: http.client.HTTPConnection | None = None
        self.backoff_s = 0.0
        self.retry_at = 0.0

    def __str__(self) -> str:
        return self.url

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.connection = kind(self.host, self.port, timeout=EVENT_TIMEOUT_S)
        return self.connection

    def _send(self, event: Event) -> None:
        connection = self._connect()
        connection.request("POST", self.path, body=event.data, headers=event.headers)
        response = connection.getresponse()
        response.read()  # the connection is reused only once the answer is read
        if not 200 <= response.status < 300:
            raise OSError(f"the receiver answered {response.status} {response.reason}")

    def write(self, batch: list[Entry]) -> int:
        if time.monotonic() < self.retry_at:
            return len(batch)
        for i, entry in enumerate(batch):
            try:
                for event in events(entry, self.mode, self.limit, self.source):
                    self._send(event)
            except (OSError, http.client.HTTPException) as exc:
                self._fail(exc)
                return len(batch) - i
        self.backoff_s = 0.0
        return 0

    def _fail(self, exc: Exception) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if not self.backoff_s:
            log.warning("payload log: cannot send to %s (%s); dropping records", self, exc)
        self.backoff_s = min(MAX_BACKOFF_S, max(BACKOFF_S, 2 * self.backoff_s))
        self.retry_at = time.monotonic() + self.backoff_s

    def tick(self) -> None:
        pass

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def check_target(settings: Settings) -> None:
    """Refuse to start when DLSERVE_PAYLOAD_LOG is a directory that cannot be created or
    written (checked by writing a file in it), as the metrics directory is: found at start,
    not as a stream of dropped records."""
    target = settings.payload_log
    if not target or is_url(target):
        return
    directory = Path(target).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem: OSError | None = exc
    else:
        problem = lifecycle.unwritable(directory)
    if problem is not None:
        lifecycle.refuse_to_start(
            f"DLSERVE_PAYLOAD_LOG: cannot write in {directory} ({problem.strerror}); "
            "name a writable directory, or an http(s) URL"
        )


def open_log(settings: Settings, metrics: Metrics) -> PayloadLog | None:
    """This worker's payload log, started; None when DLSERVE_PAYLOAD_LOG is unset."""
    target = settings.payload_log
    if not target:
        return None
    sink: Sink = (
        EventSink(target, settings)
        if is_url(target)
        else FileSink(Path(target).expanduser(), settings)
    )
    for reason in DROP_REASONS:  # present from the start at 0 (service/app.py says why)
        metrics.payload_log_dropped.labels(reason=reason)
    log.info(
        "payload log: %s, mode %s, sample rate %g",
        sink,
        settings.payload_log_mode,
        settings.payload_log_sample_rate,
    )
    return PayloadLog(sink, settings, metrics)
