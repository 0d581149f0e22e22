"""`llada-moe serve`: an OpenAI-compatible HTTP server that decodes concurrent requests together.

    llada-moe serve inclusionAI/LLaDA-MoE-7B-A1B-Instruct --threshold 0.9 --cache dual --max-batch-size 16
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events, one delta per
finished block), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

Dynamic batching: one worker thread owns the model. Requests whose decoding settings are equal (canvas length, steps,
block length, remasking, parallel rule, cache, sampling; a seeded request always runs alone, so its seed reproduces)
and that arrive within the batch window, or while a batch runs, are decoded as one left-padded batch. Each row decodes
exactly as it would alone (`diffusion_generate`'s padding guarantee), so greedy answers do not depend on the traffic.
Every row starts with one (or more) padding positions holding its row number: a `StoppingCriteria` reads it to stop
that row at the next block boundary when its client has gone or its text holds one of its stop strings, while the
batch goes on for the other rows.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..generation_utils import REMASKING_STRATEGIES, DiffusionGenerationConfig, decoding_preset
from ..modeling_llada_moe import LLaDAMoEForMaskedLM
from .inference import end_of_turn_ids


logger = logging.getLogger("llada_moe.serve")

MAX_CHOICES = 16  # rows one request may ask for: n x prompts
MAX_STOPS = 4  # OpenAI's limit on `stop`
CACHE_CHOICES = ("none", "prefix", "dual")
# Request fields that set the `DiffusionGenerationConfig` field of the same name.
NUMBER_FIELDS = {
    "temperature": ("a number >= 0 (0 = greedy)", lambda v: v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "threshold": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "factor": ("a number > 0", lambda v: v > 0),
    "cfg_scale": ("a number >= 0", lambda v: v >= 0),
}
INTEGER_FIELDS = ("steps", "block_length", "top_k")
# Standard OpenAI fields this server has no use for, accepted only with the value that means "off".
NEUTRAL_FIELDS = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
DECODING_FIELDS = ("steps", "block_length", "threshold", "factor", "cache", "remasking", "cfg_scale", "top_k", "preset")
COMMON_FIELDS = (
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
    "stream_options", "user", *NEUTRAL_FIELDS, *DECODING_FIELDS,
)
CHAT_FIELDS = ("messages", *COMMON_FIELDS)
COMPLETION_FIELDS = ("prompt", *COMMON_FIELDS)
# Config fields named in a `DiffusionGenerationConfig` error -> the request field that set them.
REQUEST_NAMES = {"max_new_tokens": "max_tokens", "cache_implementation": "cache", "use_cache": "cache"}


# ----------------------------------------------------------------------------------------------------------------
# Errors: OpenAI's {"error": {"message", "type", "param", "code"}}
# ----------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, value: Any, accepted: str) -> APIError:
    """400 naming the field, its value and what is accepted."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return APIError(400, f"`{param}`={shown} is invalid; expected {accepted}", param=param, code="invalid_value")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def same_value(given: Any, neutral: Any) -> bool:
    """`given` is `neutral` in JSON terms (0 and 0.0 alike; true is not 1)."""
    if neutral is None or isinstance(neutral, bool):
        return given is neutral
    if is_int(neutral):
        return is_number(given) and given == neutral
    return type(given) is type(neutral) and given == neutral


def check_text(param: str, value: Any) -> str:
    """A string that can be encoded (JSON allows lone surrogates, which no tokenizer takes)."""
    if not isinstance(value, str):
        raise bad(param, value, "a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"`{param}` holds a lone surrogate ({err.reason}); expected valid Unicode text",
                       param=param, code="invalid_value") from err
    return value


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


class Scheduler:
    """Owns the model in one worker thread; coalesces compatible queued jobs into left-padded batches."""

    def __init__(self, model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase, metrics: Metrics,
                 max_batch_size: int, batch_window_ms: float, max_queue: int):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_batch_size, self.window, self.max_queue = max_batch_size, batch_window_ms / 1000, max_queue
        self.pending: deque[Job] = deque()
        self.condition = threading.Condition()
        self.closing = False
        vocab = model.config.vocab_size
        mask = model.generation_config.mask_token_id
        self.mask_id = model.config.mask_token_id if mask is None else mask
        self.base = vocab - 1  # tag digits: every id but the mask
        self.thread = threading.Thread(target=self.work, name="llada-moe-batcher", daemon=True)
        self.thread.start()

    def tag_columns(self, rows: int) -> int:
        columns = 1
        while self.base**columns < rows:
            columns += 1
        return columns

    @property
    def reserved_positions(self) -> int:
        """Positions a row's tag takes at the largest batch (prompt + max_tokens must leave room for it)."""
        return self.tag_columns(max(self.max_batch_size, MAX_CHOICES))

    def submit(self, job: Job) -> None:
        with self.condition:
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
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            if batch:
                self.run(batch)

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
            logger.exception("a batch of %d rows failed", len(rows))
            self.metrics.batch_failures.inc()
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.send("error", f"{type(err).__name__}: {err}")
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


class Server:
    """Turns OpenAI request bodies into jobs for the `Scheduler` and their events into OpenAI responses."""

    def __init__(self, model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase, options: ServeOptions):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        if options.defaults is not None:
            base = options.defaults
        else:  # stop decoding a row once a block holds its end of turn: the answer is the same, sooner
            base = model._resolve_generation_config(None, {"stop_at_eos": True})
        eos = base.eos_token_id if base.eos_token_id is not None else model.config.eos_token_id
        eos = [] if eos is None else [eos] if is_int(eos) else list(eos)
        self.end_ids = set(end_of_turn_ids(tokenizer)) | set(eos)
        pad = base.pad_token_id if base.pad_token_id is not None else model.config.pad_token_id
        # Rows stop at an end of turn (EOS or <|role_end|>); the answer up to it is the same either way.
        fixed = {"eos_token_id": sorted(self.end_ids) or None, "pad_token_id": pad if pad is not None else
                 (sorted(self.end_ids)[0] if self.end_ids else None), "stop_strings": None,
                 "num_return_sequences": 1, "return_dict_in_generate": False, "output_history": False}
        self.base = model._resolve_generation_config(base, fixed)
        self.tokenizer_lock = threading.Lock()
        self.mask_id = self.base.mask_token_id if self.base.mask_token_id is not None else model.config.mask_token_id
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, tokenizer, self.metrics, options.max_batch_size, options.batch_window_ms,
                                   options.max_queue)

    # -- parsing --------------------------------------------------------------------------------------------------

    def parse(self, body: Any, kind: str, loop: asyncio.AbstractEventLoop) -> Job:
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_body")
        accepted = CHAT_FIELDS if kind == "chat.completion" else COMPLETION_FIELDS
        unknown = sorted(set(body) - set(accepted))
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown}; accepted are {sorted(accepted)}", param=unknown[0],
                           code="unknown_field")
        for name, neutral in NEUTRAL_FIELDS.items():
            if name in body and not any(same_value(body[name], value) for value in neutral):
                raise bad(name, body[name], f"{' or '.join(json.dumps(v) for v in neutral)}: not supported by "
                          "masked-diffusion decoding")
        if "model" not in body:
            raise APIError(400, "`model` is required", param="model", code="missing_field")
        if body["model"] != self.options.model_name:
            check_text("model", body["model"])
            raise APIError(404, f"`model`={body['model']!r} does not exist; this server serves "
                           f"{self.options.model_name!r}", param="model", code="model_not_found")
        config = self.decoding_config(body)
        prompts = self.chat_prompt(body) if kind == "chat.completion" else self.completion_prompts(body)
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not is_int(n) or not 1 <= n <= MAX_CHOICES:
            raise bad("n", n, f"an integer in [1, {MAX_CHOICES}]")
        if n * len(prompts) > MAX_CHOICES:
            raise bad("n", n, f"at most {MAX_CHOICES} choices in all (n x {len(prompts)} prompts)")
        limit = self.model.config.max_position_embeddings - self.scheduler.reserved_positions
        where = "messages" if kind == "chat.completion" else "prompt"
        for prompt in prompts:
            if self.mask_id in prompt:
                raise APIError(400, f"`{where}` holds the mask token (id {self.mask_id}), which a prompt may not hold",
                               param=where, code="invalid_value")
            if len(prompt) + config.max_new_tokens > limit:
                param = "max_tokens" if len(prompt) < limit else where
                raise APIError(400, f"the prompt ({len(prompt)} tokens) + max_tokens ({config.max_new_tokens}) = "
                               f"{len(prompt) + config.max_new_tokens} tokens exceed the {limit} positions this "
                               "server can give one request (the model's max_position_embeddings "
                               f"{self.model.config.max_position_embeddings}, less "
                               f"{self.scheduler.reserved_positions} for batching)", param=param,
                               code="context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
            raise bad("seed", seed, "an integer in [0, 2**63)")
        seed = self.options.seed if seed is None else seed
        if config.temperature == 0 and config.remasking != "random":
            seed = None  # greedy decoding draws nothing: no generator, and the job batches with any other
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad("stream", stream, "true or false")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                    options.get("include_usage", False), bool):
                raise bad("stream_options", options, '{"include_usage": true|false}')
            if not stream:
                raise bad("stream_options", options, "to be left out unless `stream` is true")
            include_usage = options.get("include_usage", False)
        if body.get("user") is not None:
            check_text("user", body["user"])
        rows = [Row(i * n + j, prompt) for i, prompt in enumerate(prompts) for j in range(n)]
        return Job(kind=kind, rows=rows, config=config, stops=self.stop_strings(body), seed=seed, stream=stream,
                   include_usage=include_usage, prompt_tokens=sum(map(len, prompts)), tokenizer=self.tokenizer,
                   tokenizer_lock=self.tokenizer_lock, end_ids=self.end_ids, loop=loop, events=asyncio.Queue())

    def stop_strings(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and len(stop) <= MAX_STOPS:
            stops = list(stop)
        else:
            raise bad("stop", stop, f"a string or a list of at most {MAX_STOPS} strings")
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise bad("stop", body["stop"], f"a non-empty string or a list of at most {MAX_STOPS} of them")
            check_text("stop", stop)
        return list(dict.fromkeys([*stops, *self.options.stop]))

    def decoding_config(self, body: dict) -> DiffusionGenerationConfig:
        """The request's `DiffusionGenerationConfig`: the server's defaults (or the request's preset), then its
        fields; a value the config refuses is a 400 naming the request field."""
        kwargs: dict[str, Any] = {}
        tokens = {name: body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
        for name, value in tokens.items():
            if not is_int(value) or value < 1:
                raise bad(name, value, "a positive integer")
        if len(set(tokens.values())) > 1:
            raise APIError(400, f"`max_tokens`={tokens['max_tokens']} and `max_completion_tokens`="
                           f"{tokens['max_completion_tokens']} disagree; pass one of them", param="max_tokens",
                           code="invalid_value")
        if tokens:
            kwargs["max_new_tokens"] = next(iter(tokens.values()))
        for name, (accepted, ok) in NUMBER_FIELDS.items():
            value = body.get(name)
            if value is None:
                continue
            if not is_number(value) or not ok(value):
                raise bad(name, value, accepted)
            kwargs[name] = float(value)
        if kwargs.get("top_p") == 1.0:
            del kwargs["top_p"]  # OpenAI's neutral value, also with greedy decoding
        for name in INTEGER_FIELDS:
            value = body.get(name)
            if value is not None:
                if not is_int(value) or value < 1:
                    raise bad(name, value, "a positive integer")
                kwargs[name] = value
        remasking = body.get("remasking")
        if remasking is not None:
            if remasking not in REMASKING_STRATEGIES:
                raise bad("remasking", remasking, f"one of {list(REMASKING_STRATEGIES)}")
            kwargs["remasking"] = remasking
        preset = body.get("preset")
        if preset is not None:
            check_text("preset", preset)
            try:  # the preset's strategy fields over the server's defaults, then the request's own fields
                kwargs = {**decoding_preset(preset), **kwargs}
            except ValueError as err:
                raise APIError(400, f"`preset`={preset!r}: {err}", param="preset", code="invalid_value") from err
        cache = body.get("cache")
        if cache is not None:
            if cache not in CACHE_CHOICES:
                raise bad("cache", cache, f"one of {list(CACHE_CHOICES)}")
            if cache == "none" and kwargs.get("cache_implementation"):
                # no cache over a cached preset: its cache-only knobs go too (as `--cache none` does)
                kwargs.update(cache_refresh_interval=None, cache_vicinity=None, cache_warmup_steps=0)
            kwargs["cache_implementation"] = None if cache == "none" else cache
            kwargs["use_cache"] = cache != "none"
        try:
            return self.model._resolve_generation_config(self.base, kwargs)
        except (ValueError, TypeError) as err:
            message = str(err).replace("DiffusionGenerationConfig: ", "")
            found = re.search(r"`(\w+)`", message)
            name = REQUEST_NAMES.get(found.group(1), found.group(1)) if found else None
            message = re.sub(r"`(\w+)`", lambda m: f"`{REQUEST_NAMES.get(m.group(1), m.group(1))}`", message)
            raise APIError(400, message, param=name, code="invalid_value") from err

    def chat_prompt(self, body: dict) -> list[list[int]]:
        messages = body.get("messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages",
                           code="no_chat_template")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", messages, "a non-empty list of {\"role\", \"content\"} objects")
        turns = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise bad(where, message, "an object with `role` and `content`")
            extra = sorted(set(message) - {"role", "content"})
            if extra:
                raise bad(where, message, f"an object with `role` and `content` only (got {extra})")
            role = message.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise bad(f"{where}.role", role, "'system', 'developer', 'user' or 'assistant'")
            turns.append({"role": "system" if role == "developer" else role,
                          "content": self.content_text(f"{where}.content", message.get("content"))})
        try:
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja2's TemplateError: a template may refuse an order of roles
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages",
                           code="invalid_value") from err
        return [self.encode("messages", text)]

    @staticmethod
    def content_text(where: str, content: Any) -> str:
        """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
        if isinstance(content, str):
            return check_text(where, content)
        if isinstance(content, list) and content:
            parts = []
            for i, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
                    raise bad(f"{where}[{i}]", part, '{"type": "text", "text": "..."} (text parts only)')
                parts.append(check_text(f"{where}[{i}].text", part["text"]))
            return "".join(parts)
        raise bad(where, content, "a string or a non-empty list of text parts")

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [self.encode("prompt", check_text("prompt", prompt))]
        if isinstance(prompt, list) and 0 < len(prompt) <= MAX_CHOICES and all(isinstance(p, str) for p in prompt):
            return [self.encode("prompt", check_text("prompt", p)) for p in prompt]
        raise bad("prompt", prompt, f"a string or a list of 1 to {MAX_CHOICES} strings")

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
        except QueueFull as err:
            raise APIError(503, f"the server is busy: {err}; retry shortly", code="overloaded", kind="server_error",
                           headers={"Retry-After": "1"}) from err

    def finish(self, job: Job) -> tuple[list[dict], dict]:
        """(choices, usage) of a finished job."""
        choices, completion = [], 0
        for row in job.rows:
            text, ids, ended = row.answer(job)
            completion += len(ids)
            reason = "stop" if ended else "length"
            if job.kind == "chat.completion":
                choices.append({"index": row.index, "message": {"role": "assistant", "content": text.strip()},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": row.index, "text": text.strip(), "finish_reason": reason, "logprobs": None})
        prompt = job.prompt_tokens
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.latency.observe(time.monotonic() - job.arrived)
        return choices, {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}

    def envelope(self, job: Job, chunk: bool = False) -> dict[str, Any]:
        prefix = "chatcmpl-" if job.kind == "chat.completion" else "cmpl-"
        kind = job.kind + (".chunk" if chunk and job.kind == "chat.completion" else "")
        return {"id": prefix + job.id, "object": kind, "created": job.created, "model": self.options.model_name}

    async def complete(self, job: Job) -> dict[str, Any] | None:
        """The response body of a non-streamed job; None when it was cancelled (its client has gone)."""
        while True:
            kind, payload = await job.events.get()
            if kind == "cancelled":
                return None
            if kind == "error":
                raise APIError(500, f"decoding failed: {payload}", code="decoding_failed", kind="server_error")
            if kind == "done":
                choices, usage = self.finish(job)
                return {**self.envelope(job), "choices": choices, "usage": usage}

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

    def chunk(self, job: Job, index: int, text: str | None = None, reason: str | None = None,
              role: bool = False) -> str:
        if job.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        body = {**self.envelope(job, chunk=True), "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

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
                    error = APIError(500, f"decoding failed: {payload}", code="decoding_failed", kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                final = kind == "done"
                for row in job.rows:
                    text = self.delta(job, row, final)
                    if text:
                        yield self.chunk(job, row.index, text)
                if final:
                    break
            choices, usage = self.finish(job)
            for choice in choices:
                yield self.chunk(job, choice["index"], reason=choice["finish_reason"])
            if job.include_usage:
                yield f"data: {json.dumps({**self.envelope(job, chunk=True), 'choices': [], 'usage': usage})}\n\n"
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


async def read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body ({declared} bytes) is larger than {limit} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also ints past 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err


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

    app = FastAPI(title="llada-moe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def answer(error: APIError, endpoint: str) -> JSONResponse:
        server.metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return answer(error, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "method_not_allowed" if error.status_code == 405 else None
        return answer(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=kind),
                      "other")

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return answer(APIError(500, f"internal error: {type(error).__name__}", kind="server_error"), request.url.path)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", kind="authentication_error")

    async def generate(request: Request, kind: str) -> Response:
        authorize(request)
        body = await read_body(request, options.max_body_bytes)
        job = server.parse(body, kind, asyncio.get_running_loop())
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
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "text_completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "llada-moe"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": options.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
