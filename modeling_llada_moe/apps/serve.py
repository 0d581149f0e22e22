"""`llada-moe serve`: an OpenAI-compatible HTTP server that decodes concurrent requests together.

    llada-moe serve inclusionAI/LLaDA-MoE-7B-A1B-Instruct --threshold 0.9 --cache dual --max-batch-size 16
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events, one delta per
finished block), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format). Request and response
bodies are the pydantic models of `protocol.py`; a request FastAPI cannot validate is answered 400 with OpenAI's error
body naming the field, and the decoding fields go through `settings.decoding_config` over the server's defaults.

Dynamic batching: one worker thread owns the model. Requests whose decoding settings are equal (canvas length, steps,
block length, remasking, parallel rule, cache, sampling; a seeded request always runs alone, so its seed reproduces)
and that arrive within the batch window, or while a batch runs, are decoded as one left-padded batch. Each row decodes
exactly as it would alone (`diffusion_generate`'s padding guarantee), so greedy answers do not depend on the traffic.
Every row starts with one (or more) padding positions holding its row number: a `StoppingCriteria` reads it to stop
that row at the next block boundary when its client has gone or its text holds one of its stop strings, while the
batch goes on for the other rows.

Failures: settings that cannot work (`ServeOptions`, a default answer length that leaves no room for a prompt) are
refused when the app is made. A request that could never be served (more rows than the queue or a batch holds, a
prompt too long) is a 400 naming the field; a full queue a 503 with Retry-After. A batch that raises is decoded again
one request at a time, so only the request that causes a failure gets it: a 400 naming the field when the decoding
names a setting the request set (`cfg_scale`=1e300 makes the logits NaN), else a 500. If the worker thread itself dies,
`/health` answers 503 with the reason, the requests in flight and queued fail at once and new ones get 503 (the
command line shuts the server down, exit 1). A client that disconnects, even mid-body, is counted as 499, not an error.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .. import DiffusionGenerationConfig
from ..modeling_llada_moe import LLaDAMoEForMaskedLM
from ..validators import is_finite, is_int
from .inference import end_of_turn_ids
from .protocol import (
    MAX_CHOICES,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DecodingFields,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    Usage,
)
from .protocol import Message as ChatTurn
from .settings import SettingError, decoding_config


logger = logging.getLogger("llada_moe.serve")


# ----------------------------------------------------------------------------------------------------------------
# Errors: OpenAI's {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------------------------


class APIError(StarletteHTTPException):
    """An HTTP error answered with OpenAI's error body. An `HTTPException`, so that FastAPI passes one raised while it
    reads the body (the body limit) on to the handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return ErrorResponse(error=error).model_dump()


def shown(value: Any) -> str:
    """`value` as JSON for an error message: at most 80 characters, lone surrogates escaped."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad(param: str, value: Any, accepted: str) -> APIError:
    """400 naming the field, its value and what is accepted."""
    return APIError(400, f"`{param}`={shown(value)} is invalid; expected {accepted}", param=param, code="invalid_value")


def field_path(loc: Sequence[str | int]) -> str | None:
    """The request field a pydantic error location names: ("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def invalid_request(errors: Sequence[dict[str, Any]]) -> APIError:
    """The 400 of a `RequestValidationError`: its first error, naming the field."""
    error = errors[0]
    kind, message = error["type"], error["msg"]
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', message)}",
                        code="invalid_json")
    param = field_path(error["loc"])
    if param is None:
        sent = "not sent as JSON (Content-Type: application/json)" if isinstance(error.get("input"), bytes) else (
            f"{message[:1].lower()}{message[1:]}")
        return APIError(400, f"the request body must be a JSON object of the request's fields; it is {sent}",
                        code="invalid_body")
    if kind == "missing":
        return APIError(400, f"`{param}` is required", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return APIError(400, f"`{param}` is an unknown field", param=param, code="unknown_field")
    message = message[:1].lower() + message[1:]
    return APIError(400, f"`{param}`={shown(error['input'])} is invalid; {message}", param=param,
                    code="invalid_value")


# ----------------------------------------------------------------------------------------------------------------
# A request, its rows, and the per-row text
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Row:
    """One choice of a request: its prompt ids and the generated ids received block by block."""

    index: int
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    stop_cut: int | None = None  # generated length kept when a stop string ended the row
    sent: str = ""  # streamed text so far
    # Greedy choices of one request with the same prompt: decoded once (this row), the copies get its tokens.
    copies: list[Row] = field(default_factory=list)

    def receive(self, tokens: list[int]) -> None:
        for row in (self, *self.copies):
            row.ids.extend(tokens)

    def stopped(self, cut: int) -> None:
        for row in (self, *self.copies):
            row.stop_cut = cut

    def answer(self, job: Job) -> tuple[str, list[int], bool]:
        """(text, answer ids, ended): the ids up to the first end-of-turn id or the stop-string cut, their text
        without specials, cut before the first stop string; `ended` once the answer can grow no more by a stop."""
        ids, ended = self.ids, False
        for i, token in enumerate(ids):
            if token in job.end_ids:
                ids, ended = ids[:i], True
                break
        if self.stop_cut is not None and self.stop_cut <= len(ids):
            ids, ended = ids[: self.stop_cut], True
        text = job.decode(ids)
        hits = [text.find(stop) for stop in job.stops if stop in text]
        if hits:
            text, ended = text[: min(hits)], True
        return text, ids, ended


@dataclass(eq=False)
class Job:
    """One HTTP request: its rows, decoding config and the events the worker sends back to the handler."""

    kind: str  # "chat.completion" or "text_completion"
    rows: list[Row]
    config: DiffusionGenerationConfig
    stops: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    prompt_tokens: int
    tokenizer: PreTrainedTokenizerBase
    tokenizer_lock: threading.Lock  # a fast tokenizer may not be used from two threads at once
    end_ids: set[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    fields: dict[str, Any] = field(default_factory=dict)  # the decoding fields the request set, as it named them

    key: str = ""

    def __post_init__(self):
        # Jobs with the same key decode together: equal settings (and a seeded job only with itself).
        self.key = self.config.to_json_string(use_diff=False) + (f"seed:{self.id}" if self.seed is not None else "")

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def send(self, kind: str, payload: Any = None) -> None:
        """From the worker thread: hand an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def row_ended(self, row: Row) -> bool:
        return row.stop_cut is not None or any(token in self.end_ids for token in row.ids)


# ----------------------------------------------------------------------------------------------------------------
# The worker: batching, the per-row stop, the block streamer
# ----------------------------------------------------------------------------------------------------------------


# The request fields that set a decoding config field of another name (an error naming it blames them).
REQUEST_FIELDS = {"max_new_tokens": ("max_tokens", "max_completion_tokens"), "cache_implementation": ("cache",)}


def decoding_failed(job: Job, err: Exception) -> APIError:
    """The error a job gets when its decoding raised: a `ValueError` naming a decoding setting the request itself
    set (`cfg_scale`=1e300 making the logits NaN) is the request's fault, a 400 naming that field; anything else is
    the server's, a 500."""
    if isinstance(err, ValueError):
        for name in re.findall(r"\b([a-z_]+)`?=", str(err)):  # "cfg_scale=1e+300", "`cfg_scale`=1e+300"
            for field in REQUEST_FIELDS.get(name, (name,)):
                if field in job.fields:
                    return APIError(400, f"`{field}`={shown(job.fields[field])} is invalid: the decoding it asks "
                                    f"for fails ({err})", param=field, code="invalid_value")
    return APIError(500, f"decoding failed: {type(err).__name__}: {err}", code="decoding_failed",
                    kind="server_error")


def worker_stopped(reason: str) -> APIError:
    return APIError(503, f"the decoding worker has stopped ({reason}); this server cannot answer any request until "
                    "it is restarted", code="worker_stopped", kind="server_error")


class BatchCancelled(Exception):
    """Raised in the streamer when every request of a batch has gone: nothing left to decode for."""


class RowStops(StoppingCriteria):
    """Stops a row of the batch when its request was cancelled or its text holds one of its stop strings.

    `diffusion_generate` calls it once a block is final, with one row's prompt and generated prefix; the row number
    is read from the tag positions at the start of the left padding (see `tag_ids`)."""

    def __init__(self, rows: list[tuple[Job, Row]], width: int, tag_columns: int, base: int, mask_id: int):
        self.rows, self.width, self.tag_columns, self.base, self.mask_id = rows, width, tag_columns, base, mask_id

    def row_of(self, input_ids: torch.Tensor) -> int:
        number = 0
        for token in reversed(input_ids[0, : self.tag_columns].tolist()):
            number = number * self.base + (token - (token > self.mask_id))
        return number

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        job, row = self.rows[self.row_of(input_ids)]
        stop = job.cancelled
        if not stop and job.stops:
            text = job.decode(input_ids[0, self.width :].tolist())
            if any(s in text for s in job.stops):
                row.stopped(input_ids.shape[1] - self.width)
                stop = True
        return torch.tensor([stop], device=input_ids.device)


def decoded_rows(job: Job) -> list[Row]:
    """The rows of `job` the model decodes. Greedy decoding draws nothing and a row decodes alike in any batch, so
    the `n` choices of one prompt are the same: the first is decoded, the others are its copies (given its tokens
    and its stop). Sampled rows are all decoded."""
    config = job.config
    greedy = config.temperature == 0 and config.remasking != "random"
    first: dict[tuple[int, ...], Row] = {}
    decoded = []
    for row in job.rows:
        row.copies = []
        original = first.get(tuple(row.prompt)) if greedy else None
        if original is None:
            first[tuple(row.prompt)] = row
            decoded.append(row)
        else:
            original.copies.append(row)
    return decoded


def tag_columns(rows: int, base: int) -> int:
    """Tag positions a batch of `rows` rows takes: base-`base` digits of the largest row number."""
    columns = 1
    while base**columns < rows:
        columns += 1
    return columns


def tag_ids(number: int, columns: int, base: int, mask_id: int) -> list[int]:
    """`number` in `columns` base-`base` digits as token ids, skipping the mask id (a prompt may not hold it)."""
    digits = []
    for _ in range(columns):
        number, digit = divmod(number, base)
        digits.append(digit + (digit >= mask_id))
    return digits


class BlockStreamer(BaseStreamer):
    """Gets each final block of the batch from `diffusion_generate`, hands every job its rows' tokens and finishes a
    job as soon as all its rows have ended; counts forwards; aborts when every job has been cancelled."""

    def __init__(self, rows: list[tuple[Job, Row]], metrics: Metrics):
        self.rows, self.metrics, self.prompt_seen = rows, metrics, False
        self.jobs = list(dict.fromkeys(job for job, _ in rows))

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for (job, row), tokens in zip(self.rows, value.tolist()):
            if not job.finished and not job.cancelled:
                row.receive(tokens)
        for job in self.jobs:
            if job.finished or job.cancelled:
                continue
            job.send("block")
            if all(job.row_ended(row) for row in job.rows):
                job.finished = True
                job.send("done")

    def put_draft(self, value: torch.Tensor) -> None:
        self.metrics.forwards.inc()
        if all(job.cancelled for job in self.jobs):
            raise BatchCancelled

    def end(self) -> None:
        pass


class QueueFull(Exception):
    pass


class WorkerStopped(Exception):
    """The worker thread has died: no request can be decoded any more."""


class Scheduler:
    """Owns the model in one worker thread; coalesces compatible queued jobs into left-padded batches."""

    def __init__(self, model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase, metrics: Metrics,
                 max_batch_size: int, batch_window_ms: float, max_queue: int):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_batch_size, self.window, self.max_queue = max_batch_size, batch_window_ms / 1000, max_queue
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []  # the jobs of the batch in flight
        self.condition = threading.Condition()
        self.closing = False
        self.failure: str | None = None  # why the worker died; then every request fails at once
        self.on_failure: list[Callable[[str], None]] = []  # called (from the worker) when it dies
        metrics.worker_up.set(1)
        vocab = model.config.vocab_size
        mask = model.generation_config.mask_token_id
        self.mask_id = model.config.mask_token_id if mask is None else mask
        self.base = vocab - 1  # tag digits: every id but the mask
        self.thread = threading.Thread(target=self.work, name="llada-moe-batcher", daemon=True)
        self.thread.start()

    def tag_columns(self, rows: int) -> int:
        return tag_columns(rows, self.base)

    @property
    def reserved_positions(self) -> int:
        """Positions a row's tag takes at the largest batch (prompt + max_tokens must leave room for it)."""
        return self.tag_columns(max(self.max_batch_size, MAX_CHOICES))

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.failure is not None:
                raise WorkerStopped(self.failure)
            if self.closing:
                raise QueueFull("the server is shutting down")
            waiting = sum(len(queued.rows) for queued in self.pending)
            if waiting + len(job.rows) > self.max_queue:
                raise QueueFull(f"{waiting} rows are waiting (the queue holds {self.max_queue})")
            self.pending.append(job)
            self.metrics.queue_depth.set(waiting + len(job.rows))
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job from the queue, or stop its rows at the next block boundary."""
        with self.condition:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
                self.metrics.queue_depth.set(sum(len(queued.rows) for queued in self.pending))
        job.send("cancelled")  # ends the handler waiting for the job's events
        self.metrics.cancelled.inc()

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued job, then stop the worker."""
        with self.condition:
            self.closing = True
            self.condition.notify()
        self.thread.join(timeout)

    def next_batch(self) -> list[Job] | None:
        """Wait for work; the oldest job and the compatible ones queued behind it, within the batch window."""
        with self.condition:
            while not self.pending and not self.closing:
                self.condition.wait()
            if not self.pending:
                return None
            deadline = self.pending[0].arrived + self.window
            while not self.closing and time.monotonic() < deadline and self.rows_ready() < self.max_batch_size:
                self.condition.wait(max(0.0, deadline - time.monotonic()))
                if not self.pending:
                    return []
            first = self.pending[0]
            batch, rows = [], 0
            width = max(len(row.prompt) for row in first.rows)
            for job in list(self.pending):
                job_width = max(width, *(len(row.prompt) for row in job.rows))
                fits = job_width + self.reserved_positions + job.config.max_new_tokens
                if job.key != first.key or (batch and (rows + len(job.rows) > self.max_batch_size or
                                                       fits > self.model.config.max_position_embeddings)):
                    continue
                batch.append(job)
                rows, width = rows + len(job.rows), job_width
                self.pending.remove(job)
            self.metrics.queue_depth.set(sum(len(job.rows) for job in self.pending))
            return batch

    def rows_ready(self) -> int:
        key = self.pending[0].key
        return sum(len(job.rows) for job in self.pending if job.key == key)

    def work(self) -> None:
        try:
            while True:
                batch = self.next_batch()
                if batch is None:
                    return
                if batch:
                    self.running = batch
                    self.run(batch)
                    self.running = []
        except BaseException as err:  # the worker itself failed (not one batch): nothing can be decoded any more
            self.die(err)

    def die(self, err: BaseException) -> None:
        """The worker is dead: record why, fail the batch in flight and every queued job at once, refuse new ones
        (`submit`), and tell the `on_failure` callbacks (the command line stops the server: exit 1)."""
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        logger.critical("the decoding worker stopped (%s); every request now fails", reason, exc_info=err)
        with self.condition:
            self.failure = reason
            jobs, self.running = [*self.running, *self.pending], []
            self.pending.clear()
            self.metrics.queue_depth.set(0)
        self.metrics.worker_up.set(0)
        for job in jobs:
            if not job.finished and not job.cancelled:
                job.finished = True
                job.send("error", worker_stopped(reason))
        for callback in self.on_failure:
            callback(reason)

    def run(self, jobs: list[Job]) -> None:
        rows = [(job, row) for job in jobs for row in decoded_rows(job)]
        started = time.monotonic()
        for job in jobs:
            self.metrics.queue_seconds.observe(started - job.arrived)
        self.metrics.batch_rows.observe(len(rows))
        columns = self.tag_columns(len(rows))
        width = columns + max(len(row.prompt) for _, row in rows)
        config = jobs[0].config
        pad = config.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, row) in enumerate(rows):
            input_ids[i, :columns] = torch.tensor(tag_ids(i, columns, self.base, self.mask_id))
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            attention_mask[i, width - len(row.prompt) :] = 1
        seed = jobs[0].seed
        device = self.model.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        try:
            self.model.diffusion_generate(
                input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                streamer=BlockStreamer(rows, self.metrics),
                stopping_criteria=[RowStops(rows, width, columns, self.base, self.mask_id)],
                generator=generator,
                tokenizer=self.tokenizer,
            )
        except BatchCancelled:
            pass
        except Exception as err:  # a fault inside this batch fails its requests only; the worker goes on
            alive = [job for job in jobs if not job.finished and not job.cancelled]
            retry = [job for job in alive if not (job.stream and any(row.ids for row in job.rows))]
            if len(jobs) > 1 and retry:
                # Which request caused it is unknown: decode again each one that has sent nothing yet, alone, so
                # a request fails only for what it does itself (a row decodes alone as in any batch).
                logger.warning("a batch of %d requests failed (%s: %s); decoding them one by one", len(jobs),
                               type(err).__name__, err)
                for job in alive:
                    if job not in retry:
                        job.finished = True
                        job.send("error", decoding_failed(job, err))
                for job in retry:
                    for row in job.rows:
                        row.ids, row.stop_cut, row.copies = [], None, []
                    self.run([job])
                return
            failure = decoding_failed(jobs[0], err)
            if failure.status >= 500:
                logger.exception("a batch of %d rows failed", len(rows))
                self.metrics.batch_failures.inc()
            for job in alive:
                job.finished = True
                job.send("error", decoding_failed(job, err))
            return
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.send("done")


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llada_moe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("llada_moe_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("llada_moe_completion_tokens", "completion tokens returned", registry=r)
        self.forwards = Counter("llada_moe_forwards", "model forwards (denoising steps) over a batch", registry=r)
        self.cancelled = Counter("llada_moe_cancelled_requests", "requests whose client went away", registry=r)
        self.batch_failures = Counter("llada_moe_batch_failures", "batches that raised an exception", registry=r)
        self.batch_rows = Histogram("llada_moe_batch_rows", "rows decoded together", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("llada_moe_queue_depth", "rows waiting for a batch", registry=r)
        self.worker_up = Gauge("llada_moe_worker_up", "1 while the decoding worker runs, 0 once it has died",
                               registry=r)
        self.queue_seconds = Histogram("llada_moe_queue_seconds", "time from arrival to the start of its batch",
                                       registry=r)
        self.latency = Histogram("llada_moe_request_seconds", "time from arrival to the last token", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


# ----------------------------------------------------------------------------------------------------------------
# The server: request parsing, responses, the FastAPI app
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ServeOptions:
    """Settings of `create_app`.

    Args:
        model_name: the id `/v1/models` lists and requests must name in `model`.
        defaults: decoding defaults (default: the model's generation config); request fields override them.
        stop: stop strings added to every request's.
        seed: seed of requests that give none (a seeded request runs alone).
        max_batch_size: rows decoded together at most.
        batch_window_ms: how long the oldest queued request waits for company.
        max_queue: rows waiting at most; more answer 503 with Retry-After.
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies answer 413.

    Raises:
        ServeOptionError: (a `ValueError`) naming the option, for a value the server cannot work with (e.g. a batch
            window above a minute, NaN, a queue of 0, an empty stop string or API key).
    """

    model_name: str = "llada-moe"
    defaults: DiffusionGenerationConfig | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 5.0
    max_queue: int = 256
    api_key: str | None = None
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        """Refuse settings a server cannot work with (a `ServeOptionError` naming the option), so that it never
        starts only to fail every request."""
        checks = (
            ("model_name", lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
            ("stop", lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str) and s for s in v),
             "a list of non-empty strings (an empty one would end every answer at once)"),
            ("seed", lambda v: v is None or (is_int(v) and 0 <= v < 2**64), "None or an integer in [0, 2**64)"),
            ("max_batch_size", lambda v: is_int(v) and v >= 1, "a positive integer"),
            ("batch_window_ms", lambda v: is_finite(v) and 0 <= v <= MAX_BATCH_WINDOW_MS,
             f"a number of milliseconds in [0, {MAX_BATCH_WINDOW_MS}]"),
            ("max_queue", lambda v: is_int(v) and v >= 1, "a positive integer"),
            ("api_key", lambda v: v is None or (isinstance(v, str) and v != "" and all("!" <= c <= "~" for c in v)),
             "None or a non-empty key of visible ASCII characters (no spaces: a bearer token cannot carry them)"),
            ("max_body_bytes", lambda v: is_int(v) and v >= 1, "a positive integer"),
        )
        for name, ok, accepted in checks:
            if not ok(getattr(self, name)):
                raise ServeOptionError(name, getattr(self, name), accepted)
        self.stop = tuple(self.stop)
        if self.defaults is not None and not isinstance(self.defaults, DiffusionGenerationConfig):
            raise ServeOptionError("defaults", self.defaults, "None or a DiffusionGenerationConfig")


MAX_BATCH_WINDOW_MS = 60_000  # a request waits at most a minute for company


class ServeOptionError(ValueError):
    """A server setting that cannot work: `option` names it (a `ServeOptions` field, or `max_new_tokens` of the
    decoding defaults), `value` is what was given (an API key is never shown) and `accepted` what it takes."""

    def __init__(self, option: str, value: Any, accepted: str):
        self.option, self.value, self.accepted = option, value, accepted
        shown = "<hidden>" if option == "api_key" and value is not None else repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"`{option}`={shown} is invalid; expected {accepted}")


class Server:
    """Turns validated OpenAI requests into jobs for the `Scheduler` and their events into OpenAI responses."""

    def __init__(self, model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase, options: ServeOptions):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        # Default: stop decoding a row once a block holds its end of turn: the answer is the same, sooner.
        base = options.defaults if options.defaults is not None else decoding_config(model, stop_at_eos=True)
        eos = base.eos_token_id if base.eos_token_id is not None else model.config.eos_token_id
        eos = [] if eos is None else [eos] if is_int(eos) else list(eos)
        self.end_ids = set(end_of_turn_ids(tokenizer)) | set(eos)
        pad = base.pad_token_id if base.pad_token_id is not None else model.config.pad_token_id
        # Rows stop at an end of turn (EOS or <|role_end|>); the answer up to it is the same either way.
        self.base = copy.deepcopy(base)
        self.base.update(eos_token_id=sorted(self.end_ids) or None, pad_token_id=pad if pad is not None else
                         (sorted(self.end_ids)[0] if self.end_ids else None), stop_strings=None,
                         num_return_sequences=1, return_dict_in_generate=False, output_history=False)
        self.tokenizer_lock = threading.Lock()
        self.mask_id = self.base.mask_token_id if self.base.mask_token_id is not None else model.config.mask_token_id
        try:
            self.base.validate()
        except (ValueError, TypeError) as err:
            raise ServeOptionError("defaults", base, f"a valid DiffusionGenerationConfig ({err})") from err
        positions = model.config.max_position_embeddings
        reserved = tag_columns(max(options.max_batch_size, MAX_CHOICES), model.config.vocab_size - 1)
        if reserved + 2 > positions:
            raise ServeOptionError("max_batch_size", options.max_batch_size, f"a size whose row tags ({reserved} "
                                   f"positions) leave room for a prompt in the model's {positions} positions")
        if self.base.max_new_tokens + reserved + 1 > positions:
            raise ServeOptionError(
                "max_new_tokens", self.base.max_new_tokens,
                f"at most {positions - reserved - 1} (the model's max_position_embeddings {positions}, less {reserved} "
                "for batching and 1 for the shortest prompt): the default answer length of every request that sends "
                "no max_tokens",
            )
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, tokenizer, self.metrics, options.max_batch_size, options.batch_window_ms,
                                   options.max_queue)

    # -- requests -------------------------------------------------------------------------------------------------

    def parse(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """The job of a validated request; an `APIError` for what only the model can check (its name, the decoding
        settings over the server's defaults, the prompt's tokens and length)."""
        if request.model != self.options.model_name:
            raise APIError(404, f"`model`={request.model!r} does not exist; this server serves "
                           f"{self.options.model_name!r}", param="model", code="model_not_found")
        config = self.decoding_config(request)
        fields = request.model_dump(include=set(DecodingFields.model_fields), exclude_none=True)
        chat = isinstance(request, ChatCompletionRequest)
        prompts = self.chat_prompt(request.messages) if chat else [self.encode("prompt", p) for p in request.prompt]
        n = request.n or 1
        where = "messages" if chat else "prompt"
        if n * len(prompts) > MAX_CHOICES:
            raise bad("n", n, f"at most {MAX_CHOICES} choices in all (n x {len(prompts)} prompts)")
        # A request larger than the queue or (its rows the model decodes) than a batch could never be served.
        greedy = config.temperature == 0 and config.remasking != "random"
        decoded = len(set(map(tuple, prompts))) * (1 if greedy else n)
        for rows, limit, what in ((n * len(prompts), self.options.max_queue, "rows this server queues"),
                                  (decoded, self.options.max_batch_size, "rows this server decodes together")):
            if rows > limit:
                param, value = ("n", n) if n > 1 else (where, f"{len(prompts)} prompts")
                raise bad(param, value, f"at most {limit} {what} in all (n x {len(prompts)} prompt(s) = {rows} rows; "
                          "--max-queue and --max-batch-size set the limits)")
        limit = self.model.config.max_position_embeddings - self.scheduler.reserved_positions
        length_fields = [name for name in ("max_tokens", "max_completion_tokens") if name in fields]
        for prompt in prompts:
            if self.mask_id in prompt:
                raise APIError(400, f"`{where}` holds the mask token (id {self.mask_id}), which a prompt may not hold",
                               param=where, code="invalid_value")
            if len(prompt) + config.max_new_tokens > limit:
                # Blame max_tokens only where the request set it and a shorter answer would fit.
                param = length_fields[0] if length_fields and len(prompt) < limit else where
                length = length_fields[0] if length_fields else "max_tokens"
                default = "" if length_fields else " (the server's default; send a smaller max_tokens)"
                raise APIError(400, f"the prompt ({len(prompt)} tokens) + {length} ({config.max_new_tokens}"
                               f"{default}) = {len(prompt) + config.max_new_tokens} tokens exceed the {limit} "
                               "positions this server can give one request (the model's max_position_embeddings "
                               f"{self.model.config.max_position_embeddings}, less "
                               f"{self.scheduler.reserved_positions} for batching)", param=param,
                               code="context_length_exceeded")
        seed = self.options.seed if request.seed is None else request.seed
        if config.temperature == 0 and config.remasking != "random":
            seed = None  # greedy decoding draws nothing: no generator, and the job batches with any other
        rows = [Row(i * n + j, prompt) for i, prompt in enumerate(prompts) for j in range(n)]
        return Job(kind="chat.completion" if chat else "text_completion", rows=rows, config=config,
                   stops=list(dict.fromkeys([*request.stop, *self.options.stop])), seed=seed,
                   stream=bool(request.stream),
                   include_usage=bool(request.stream_options and request.stream_options.include_usage),
                   prompt_tokens=sum(map(len, prompts)), tokenizer=self.tokenizer, tokenizer_lock=self.tokenizer_lock,
                   end_ids=self.end_ids, loop=loop, events=asyncio.Queue(), fields=fields)

    def decoding_config(self, request: GenerationRequest) -> DiffusionGenerationConfig:
        """The request's `DiffusionGenerationConfig`: the server's defaults, the request's preset, then its decoding
        fields; a value the settings refuse is a 400 naming the request field."""
        fields = request.model_dump(include=set(DecodingFields.model_fields), exclude_none=True)
        if fields.get("top_p") == 1:
            del fields["top_p"]  # OpenAI's neutral value, also with greedy decoding
        try:
            return decoding_config(self.base, **fields)
        except SettingError as err:
            raise APIError(400, str(err), param=err.field, code="invalid_value") from err

    def chat_prompt(self, messages: list[ChatTurn]) -> list[list[int]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                           code="no_chat_template")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        try:
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja2's TemplateError: a template may refuse an order of roles
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages",
                           code="invalid_value") from err
        return [self.encode("messages", text)]

    def encode(self, where: str, text: str) -> list[int]:
        with self.tokenizer_lock:
            ids = self.tokenizer(text).input_ids
        if not ids:
            raise APIError(400, f"`{where}` tokenizes to nothing; give some text", param=where, code="invalid_value")
        return list(ids)

    # -- responses ------------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except WorkerStopped as err:
            raise worker_stopped(str(err)) from err
        except QueueFull as err:
            raise APIError(503, f"the server is busy: {err}; retry shortly", code="overloaded", kind="server_error",
                           headers={"Retry-After": "1"}) from err

    def finish(self, job: Job) -> tuple[list[tuple[int, str, str]], Usage]:
        """(index, text, finish_reason) of each choice of a finished job, and its usage."""
        choices, completion = [], 0
        for row in job.rows:
            text, ids, ended = row.answer(job)
            completion += len(ids)
            choices.append((row.index, text.strip(), "stop" if ended else "length"))
        prompt = job.prompt_tokens
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.latency.observe(time.monotonic() - job.arrived)
        return choices, Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def envelope(self, job: Job) -> dict[str, Any]:
        prefix = "chatcmpl-" if job.kind == "chat.completion" else "cmpl-"
        return {"id": prefix + job.id, "created": job.created, "model": self.options.model_name}

    async def complete(self, job: Job) -> ChatCompletion | Completion | None:
        """The response of a non-streamed job; None when it was cancelled (its client has gone)."""
        while True:
            kind, payload = await job.events.get()
            if kind == "cancelled":
                return None
            if kind == "error":
                raise payload
            if kind == "done":
                break
        choices, usage = self.finish(job)
        if job.kind == "chat.completion":
            return ChatCompletion(**self.envelope(job), object="chat.completion", usage=usage, choices=[
                ChatChoice(index=index, message=ChatMessage(role="assistant", content=text), finish_reason=reason,
                           logprobs=None) for index, text, reason in choices])
        return Completion(**self.envelope(job), object="text_completion", usage=usage, choices=[
            CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=None)
            for index, text, reason in choices])

    def delta(self, job: Job, row: Row, final: bool) -> str:
        """The text of `row` not streamed yet; held back while it may still change (trailing whitespace, a
        partial character, a possible start of a stop string)."""
        text, _, ended = row.answer(job)
        text = text.lstrip()
        if final or ended:
            text = text.rstrip()
        else:
            text = text.rstrip().rstrip("\ufffd")
            for stop in job.stops:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        if not text.startswith(row.sent) or len(text) <= len(row.sent):
            return ""
        new, row.sent = text[len(row.sent) :], text
        return new

    def chunk(self, job: Job, index: int | None, text: str | None = None, reason: str | None = None,
              role: bool = False, usage: Usage | None = None) -> str:
        """One server-sent event: a choice's delta (or, with `index` None, the final usage chunk)."""
        extra = {"usage": usage} if job.include_usage else {}  # unset fields are left out of the event
        if job.kind == "chat.completion":
            delta = ChatDelta(content=text) if text else ChatDelta()  # the finish_reason chunk: an empty delta
            if role:
                delta = ChatDelta(role="assistant", content="")
            choices = [] if index is None else [ChatChunkChoice(index=index, delta=delta, finish_reason=reason,
                                                                logprobs=None)]
            body = ChatCompletionChunk(**self.envelope(job), object="chat.completion.chunk", choices=choices, **extra)
        else:
            choices = [] if index is None else [CompletionChoice(index=index, text=text or "", finish_reason=reason,
                                                                 logprobs=None)]
            body = CompletionChunk(**self.envelope(job), object="text_completion", choices=choices, **extra)
        return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"

    async def stream(self, job: Job, watcher: asyncio.Task) -> AsyncIterator[str]:
        try:
            if job.kind == "chat.completion":
                for row in job.rows:
                    yield self.chunk(job, row.index, role=True)
            while True:
                kind, payload = await job.events.get()
                if kind == "cancelled":
                    return
                if kind == "error":
                    yield f"data: {json.dumps(payload.body())}\n\n"
                    return
                final = kind == "done"
                for row in job.rows:
                    text = self.delta(job, row, final)
                    if text:
                        yield self.chunk(job, row.index, text)
                if final:
                    break
            choices, usage = self.finish(job)
            for index, _, reason in choices:
                yield self.chunk(job, index, reason=reason)
            if job.include_usage:
                yield self.chunk(job, None, usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not job.finished:
                self.scheduler.cancel(job)


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client closes the connection (uvicorn sends `http.disconnect`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class ClientGone(StarletteHTTPException):
    """The client closed the connection before its request body was complete: nobody to answer, not an error."""

    def __init__(self):
        super().__init__(499, "the client closed the connection while sending the request body")


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes (as declared, or as it arrives) is answered 413, and a
    client that disconnects before its body is complete ends the request as `ClientGone` (499). Both are raised from
    `receive`, inside the route that reads the body, so the app's handlers answer them."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        received, complete = 0, False

        async def limited() -> Message:
            nonlocal received, complete
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise APIError(413, f"the request body ({declared} bytes) is larger than {self.limit} bytes",
                               code="body_too_large")
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                raise ClientGone
            received += len(message.get("body", b""))
            complete = complete or (message["type"] == "http.request" and not message.get("more_body", False))
            if received > self.limit:
                raise APIError(413, f"the request body is larger than {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, limited, send)


def create_app(model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase,
               options: ServeOptions | None = None) -> FastAPI:
    """The OpenAI-compatible app for a loaded model and tokenizer; serve it with uvicorn. The batching worker starts
    here and stops (after finishing queued requests) when the app's lifespan ends."""
    import contextlib

    options = options or ServeOptions()
    server = Server(model, tokenizer, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.close)

    # strict_content_type=False: a body sent without a Content-Type is read as JSON too (curl -d, some clients).
    app = FastAPI(title="llada-moe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  strict_content_type=False)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.state.server = server

    def answer(error: APIError, endpoint: str) -> JSONResponse:
        server.metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return answer(error, request.url.path)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        server.metrics.requests.labels(request.url.path, "499").inc()  # nginx's "client closed request"
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return answer(invalid_request(error.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "method_not_allowed" if error.status_code == 405 else None
        return answer(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=kind),
                      "other")

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return answer(APIError(500, f"internal error: {type(error).__name__}", kind="server_error"), request.url.path)

    async def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", kind="authentication_error")

    async def generate(request: Request, body: GenerationRequest) -> Response:
        job = server.parse(body, asyncio.get_running_loop())
        server.submit(job)
        watcher = asyncio.create_task(watch_disconnect(request, lambda: server.scheduler.cancel(job)))
        endpoint = request.url.path
        if job.stream:
            server.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(server.stream(job, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await server.complete(job)
        finally:
            watcher.cancel()
        if result is None:  # nobody to answer: nginx's "client closed request"
            server.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        server.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(result.model_dump())

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(request, body)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body)

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(object="list", data=[ModelCard(id=options.model_name, object="model", created=0,
                                                        owned_by="llada-moe")])

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        failure = server.scheduler.failure
        if failure is not None:  # a load balancer takes the server out; the command line exits (status 1)
            return JSONResponse({"status": "error", "model": options.model_name,
                                 "error": f"the decoding worker has stopped: {failure}"}, status_code=503)
        return JSONResponse({"status": "ok", "model": options.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
