"""`llada-moe serve`: a real uvicorn server on a free localhost port, driven with the real `openai` client and httpx.

One server per module (a tiny random model, 16-token canvases in blocks of 8) keeps the file to well under a minute.
Timing-dependent situations (a busy worker, a batch in flight) are made deterministic with gates: a forward pre-hook
on the model that holds (or fails) a forward whose input holds a chosen token, so the test decides when it goes on.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import ROOT, load_example
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from modeling_llada_moe import DiffusionGenerationConfig
from modeling_llada_moe.apps.inference import decode_completion, encode_prompt
from modeling_llada_moe.apps.serve import ServeOptions, create_app
from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE, save_tiny_folder, tiny_model, tiny_tokenizer


MODEL = "tiny"
DEFAULTS = dict(max_new_tokens=16, block_length=8)
TIMEOUT = 60  # seconds any one client call may take before the test fails instead of hanging


# ----------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Running:
    url: str
    model: object
    tokenizer: object
    app: object

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), timeout=TIMEOUT,
                             max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus sample over its labels (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        pattern = rf"{re.escape(name)}(\{{.*\}})? "
        return sum(float(line.split()[-1]) for line in text.splitlines() if re.match(pattern, line))


@contextlib.contextmanager
def serving(model, tokenizer, **options):
    """`create_app` served by uvicorn in a thread on a free localhost port; shut down (and joined) on exit."""
    app = create_app(model, tokenizer, ServeOptions(model_name=MODEL, **options))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(url, model, tokenizer, app)
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and loses a lot on a busy machine
    model = tiny_model(seed=0)
    for name, value in DEFAULTS.items():
        setattr(model.generation_config, name, value)
    yield model, tiny_tokenizer(LING_CHAT_TEMPLATE)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(tiny):
    with serving(*tiny, max_batch_size=8, batch_window_ms=10) as running:
        yield running


class Gates:
    """A forward pre-hook on the model: a forward whose input holds a gated token waits until the gate opens (or
    raises, for a `fail` gate). `entered[token]` is set once such a forward is waiting."""

    def __init__(self, model):
        self.hold: dict[int, threading.Event] = {}
        self.entered: dict[int, threading.Event] = {}
        self.fail: set[int] = set()
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        for token in self.fail:
            if (input_ids == token).any():
                raise RuntimeError(f"injected fault: token {token} in the batch")
        for token, gate in self.hold.items():
            if (input_ids == token).any():
                self.entered[token].set()
                assert gate.wait(TIMEOUT), "a gate was never opened"

    def close(self, token: int) -> None:
        self.hold[token], self.entered[token] = threading.Event(), threading.Event()

    def wait_entered(self, token: int) -> None:
        assert self.entered[token].wait(TIMEOUT), f"no forward reached the gate of token {token}"

    def remove(self) -> None:
        for gate in self.hold.values():
            gate.set()
        self.handle.remove()


@pytest.fixture
def gates(served):
    gates = Gates(served.model)
    yield gates
    gates.remove()


def direct_answer(model, tokenizer, prompt=None, messages=None, **decoding) -> str:
    """What `diffusion_generate` answers for the prompt alone (chat template for messages, plain text otherwise)."""
    input_ids = encode_prompt(tokenizer, prompt, messages, chat_template=False if prompt is not None else None)
    out = model.diffusion_generate(input_ids, **decoding)
    return decode_completion(tokenizer, out[0, input_ids.shape[1] :])


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def in_thread(function, *args, **kwargs):
    """Start `function` in a thread; the returned callable joins it and returns its result (or raises its error)."""
    result = {}

    def run():
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as err:  # handed to the caller
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the call did not finish"
        if "error" in result:
            raise result["error"]
        return result["value"]

    return join


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------------------
# chat, completions, streaming
# ----------------------------------------------------------------------------------------------------------------


def test_chat_streamed_and_not_answers_like_diffusion_generate(served):
    client = served.client()
    messages = [{"role": "system", "content": "t9 t9"}, *user("t1 t2 t3 t4")]
    expected = direct_answer(served.model, served.tokenizer, messages=messages)
    response = client.chat.completions.create(model=MODEL, messages=messages)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    prompt_tokens = encode_prompt(served.tokenizer, messages=messages).shape[1]
    assert response.usage.prompt_tokens == prompt_tokens
    answer_ids = served.tokenizer(expected).input_ids if expected else []
    assert response.usage.completion_tokens >= len(answer_ids)
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length") and response.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    finals = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens and not chunks[-1].choices
    # one content delta per finished block at most (16 tokens in blocks of 8)
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) <= 2


def test_completions_with_prompt_lists_and_n(served):
    client = served.client()
    prompts = ["t5 t6 t7", "t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2)
    assert response.object == "text_completion" and [c.index for c in response.choices] == [0, 1, 2, 3]
    for choice in response.choices:
        assert choice.text == direct_answer(served.model, served.tokenizer, prompt=prompts[choice.index // 2])
    assert response.usage.prompt_tokens == 3 + 11
    streamed = list(client.completions.create(model=MODEL, prompt=prompts[0], stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == response.choices[0].text


def test_greedy_choices_of_one_prompt_are_decoded_once(served):
    client = served.client()
    prompts = ["t5 t6 t7", "t1 t2"]
    expected = [direct_answer(served.model, served.tokenizer, prompt=prompt) for prompt in prompts]
    words = expected[0].split()
    stop = " ".join(words[1:3]) if len(words) >= 3 else "never there"  # a stop the first answer reaches
    rows_before = served.metric("llada_moe_batch_rows_sum")
    response = client.completions.create(model=MODEL, prompt=prompts, n=3, stop=[stop])
    # one decoded row per prompt, every choice the greedy answer (its stop included)
    assert served.metric("llada_moe_batch_rows_sum") - rows_before == 2
    for choice in response.choices:
        answer = expected[choice.index // 3]
        assert choice.text == (answer[: answer.index(stop)] if stop in answer else answer)
    assert len({(choice.text, choice.finish_reason) for choice in response.choices[:3]}) == 1
    # sampled choices are all decoded
    rows_before = served.metric("llada_moe_batch_rows_sum")
    client.completions.create(model=MODEL, prompt="t5 t6 t7", n=3, temperature=1.0, seed=3)
    assert served.metric("llada_moe_batch_rows_sum") - rows_before == 3


def test_stop_strings_are_cut_from_the_text(served):
    client = served.client()
    for digits in ("t1 t2 t3 t4", "t7 t8", "t3 t3 t3", "t10 t4 t6 t2 t5"):
        expected = direct_answer(served.model, served.tokenizer, messages=user(digits), max_new_tokens=16)
        words = expected.split()
        if len(words) >= 4:
            break
    else:
        pytest.skip("the tiny random model ended every answer early")
    stop = " ".join(words[2:4])
    cut = expected[: expected.index(stop)].strip()
    response = client.chat.completions.create(model=MODEL, messages=user(digits), stop=[stop, "never there"])
    assert response.choices[0].message.content == cut and response.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=MODEL, messages=user(digits), stop=stop, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == cut


def test_extra_body_knobs_preset_and_seed(served):
    client = served.client()
    messages = user("t2 t4 t6")
    knobs = dict(steps=8, block_length=4, threshold=0.5, cache="dual", remasking="margin", cfg_scale=0.5)
    expected = direct_answer(
        served.model, served.tokenizer, messages=messages, steps=8, block_length=4, threshold=0.5,
        cache_implementation="dual", remasking="margin", cfg_scale=0.5,
    )
    response = client.chat.completions.create(model=MODEL, messages=messages, extra_body=knobs)
    assert response.choices[0].message.content == expected

    for preset in ("fast_dllm", "dinfer"):  # the preset's strategy over the model's lengths and ids
        config = DiffusionGenerationConfig.from_preset(preset, **DEFAULTS)
        expected = direct_answer(served.model, served.tokenizer, messages=messages, generation_config=config)
        response = client.chat.completions.create(model=MODEL, messages=messages, extra_body={"preset": preset})
        assert response.choices[0].message.content == expected

    sampled = [
        client.chat.completions.create(model=MODEL, messages=messages, temperature=1.5, top_p=0.9, seed=7, n=2)
        for _ in range(2)
    ]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]


# ----------------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------------


def test_32_concurrent_requests_from_8_threads_answer_as_alone(served):
    client = served.client()
    rng = torch.Generator().manual_seed(0)
    requests = []
    for i in range(32):
        digits = " ".join(f"t{int(d)}" for d in torch.randint(1, 11, (1 + i % 7,), generator=rng))
        knobs = {} if i % 4 else {"threshold": 0.6}  # two groups of compatible settings
        requests.append((digits, knobs))
    expected = [direct_answer(served.model, served.tokenizer, messages=user(d), **k) for d, k in requests]
    batches_before = served.metric("llada_moe_batch_rows_count")

    def ask(request):
        digits, knobs = request
        return client.chat.completions.create(model=MODEL, messages=user(digits), extra_body=knobs)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests, timeout=TIMEOUT))
    assert [a.choices[0].message.content for a in answers] == expected
    batches = served.metric("llada_moe_batch_rows_count") - batches_before
    assert batches < 32  # requests were decoded together


# ----------------------------------------------------------------------------------------------------------------
# faults
# ----------------------------------------------------------------------------------------------------------------


def test_disconnect_mid_batch_cancels_its_rows_and_the_batch_goes_on(served, gates):
    client = served.client()
    gates.close(99)  # a request holding t99 keeps the worker busy
    gates.close(98)  # the batch holding t98 waits at its first forward
    blocker = in_thread(client.chat.completions.create, model=MODEL, messages=user("t99"), max_tokens=8)
    gates.wait_entered(99)
    # A queued request whose client gives up leaves the queue, and its handler ends (499, nobody to answer).
    closed = served.metric('llada_moe_requests_total{endpoint="/v1/completions",status="499"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "t1"}, timeout=0.5)
    wait_for(lambda: served.metric('llada_moe_requests_total{endpoint="/v1/completions",status="499"}') == closed + 1,
             "the abandoned request's handler to end")
    assert served.metric("llada_moe_queue_depth") == 0
    stream = client.chat.completions.create(model=MODEL, messages=user("t98 t1"), stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"  # sent as soon as the request is queued
    other = in_thread(client.chat.completions.create, model=MODEL, messages=user("t3 t4 t5"))
    wait_for(lambda: served.metric("llada_moe_queue_depth") == 2, "both requests queued")
    cancelled = served.metric("llada_moe_cancelled_requests_total")
    gates.hold[99].set()
    gates.wait_entered(98)  # the batch of both requests is in flight
    stream.close()
    wait_for(lambda: served.metric("llada_moe_cancelled_requests_total") == cancelled + 1, "the cancellation")
    gates.hold[98].set()
    assert other().choices[0].message.content == direct_answer(served.model, served.tokenizer,
                                                               messages=user("t3 t4 t5"))
    blocker()

    # A batch whose only client has gone stops after the forward in flight.
    gates.close(96)
    stream = client.chat.completions.create(model=MODEL, messages=user("t96"), stream=True)
    next(iter(stream))
    gates.wait_entered(96)
    stream.close()
    wait_for(lambda: served.metric("llada_moe_cancelled_requests_total") == cancelled + 2, "the cancellation")
    start = served.metric("llada_moe_forwards_total")
    gates.hold[96].set()
    follow_up = dict(model=MODEL, messages=user("t5"), extra_body={"remasking": "entropy"})
    client.chat.completions.create(**follow_up)  # runs after the cancelled batch: the worker is serial
    middle = served.metric("llada_moe_forwards_total")
    client.chat.completions.create(**follow_up)
    follow_up_forwards = served.metric("llada_moe_forwards_total") - middle
    assert middle - start - follow_up_forwards == 1  # of the 16 the cancelled request would have taken


def test_a_failing_batch_fails_only_its_requests(served, gates):
    client = served.client()
    gates.close(99)
    gates.fail.add(97)
    blocker = in_thread(client.chat.completions.create, model=MODEL, messages=user("t99"), max_tokens=8)
    gates.wait_entered(99)
    poisoned = in_thread(client.chat.completions.create, model=MODEL, messages=user("t97 t1"))
    healthy = in_thread(client.chat.completions.create, model=MODEL, messages=user("t1 t2"), max_tokens=8)
    wait_for(lambda: served.metric("llada_moe_queue_depth") == 2, "both requests queued")
    gates.hold[99].set()
    with pytest.raises(openai.InternalServerError) as error:
        poisoned()
    assert "injected fault" in error.value.message and error.value.body["type"] == "server_error"
    expected = direct_answer(served.model, served.tokenizer, messages=user("t1 t2"), max_new_tokens=8)
    assert healthy().choices[0].message.content == expected
    blocker()
    streamed = client.chat.completions.create(model=MODEL, messages=user("t97"), stream=True)
    with pytest.raises(openai.APIError, match="injected fault"):
        list(streamed)


def test_api_key_and_full_queue(tiny):
    with serving(*tiny, api_key="secret", max_queue=2, max_batch_size=1) as running:
        gates = Gates(running.model)
        try:
            with pytest.raises(openai.AuthenticationError):
                running.client(api_key="wrong").models.list()
            response = httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "t1"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(running.url + "/health").json()["status"] == "ok"
            client = running.client(api_key="secret")
            assert [m.id for m in client.models.list().data] == [MODEL]

            gates.close(99)
            blocker = in_thread(client.completions.create, model=MODEL, prompt="t99", max_tokens=8)
            gates.wait_entered(99)
            queued = in_thread(client.completions.create, model=MODEL, prompt="t1", n=2)
            wait_for(lambda: running.metric("llada_moe_queue_depth") == 2, "the queue to fill")
            response = httpx.post(running.url + "/v1/completions", headers={"Authorization": "Bearer secret"},
                                  json={"model": MODEL, "prompt": "t2"}, timeout=TIMEOUT)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            gates.hold[99].set()
            assert len(queued().choices) == 2 and blocker().choices[0].finish_reason in ("stop", "length")
        finally:
            gates.remove()


BAD_REQUESTS = [
    ({"messages": user("t1")}, "model", "is required"),
    ({"model": MODEL}, "messages", "is required"),
    ({"model": MODEL, "messages": []}, "messages", "at least 1 item"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "t1"}]}, "messages[0].role", "'user'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string"),
    ({"model": MODEL, "messages": user("t1"), "max_tokens": 0}, "max_tokens", "a positive integer"),
    ({"model": MODEL, "messages": user("t1"), "max_tokens": 1000}, "max_tokens", "exceed the 255 positions"),
    ({"model": MODEL, "messages": user("t1"), "temperature": -1}, "temperature", "a number >= 0"),
    ({"model": MODEL, "messages": user("t1"), "top_p": 0.5}, "top_p", "only when sampling"),
    ({"model": MODEL, "messages": user("t1"), "steps": 1}, "steps", "at least the number of blocks (2)"),
    ({"model": MODEL, "messages": user("t1"), "cache": "full"}, "cache", "['none', 'prefix', 'dual']"),
    ({"model": MODEL, "messages": user("t1"), "remasking": "best"}, "remasking", "low_confidence"),
    ({"model": MODEL, "messages": user("t1"), "preset": "turbo"}, "preset", "'llada', 'fast_dllm', 'dinfer'"),
    ({"model": MODEL, "messages": user("t1"), "threshold": 0.9, "factor": 1.0}, "factor", "exclusive"),
    ({"model": MODEL, "messages": user("t1"), "n": 0}, "n", "greater than or equal to 1"),
    ({"model": MODEL, "messages": user("t1"), "stop": ["a", ""]}, "stop", "non-empty string"),
    ({"model": MODEL, "messages": user("t1"), "seed": -1}, "seed", "greater than or equal to 0"),
    ({"model": MODEL, "messages": user("t1"), "stream": "yes"}, "stream", "a valid boolean"),
    ({"model": MODEL, "messages": user("t1"), "frequency_penalty": 1}, "frequency_penalty", "not supported"),
    ({"model": MODEL, "messages": user("t1"), "beam_width": 4}, "beam_width", "unknown field"),
    ({"model": MODEL, "messages": user("t126")}, "messages", "mask token"),
    ({"model": MODEL, "messages": user("\ud800")}, "messages[0].content", "lone surrogate"),
]


@pytest.mark.parametrize("body, param, words", BAD_REQUESTS, ids=[b[1] for b in BAD_REQUESTS])
def test_bad_requests_get_400_naming_the_field(served, body, param, words):
    response = httpx.post(served.url + "/v1/chat/completions", content=json.dumps(body), timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400, error
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_other_refusals(served):
    url = served.url
    response = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=TIMEOUT)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "t1"}, timeout=TIMEOUT)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "t1 " * 400_000},
                          timeout=TIMEOUT)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert httpx.get(url + "/v1/nothing", timeout=TIMEOUT).status_code == 404
    assert httpx.get(url + "/v1/chat/completions", timeout=TIMEOUT).json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError, match="`max_tokens`=-3 is invalid"):
        served.client().completions.create(model=MODEL, prompt="t1", max_tokens=-3)
    metrics = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    for name in ("llada_moe_requests_total", "llada_moe_completion_tokens_total", "llada_moe_forwards_total",
                 "llada_moe_batch_rows_bucket", "llada_moe_queue_depth", "llada_moe_request_seconds_bucket"):
        assert name in metrics, name


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = {
    "model": st.sampled_from([MODEL, "other"]) | JSON,
    "messages": st.just(user("t1 t2")) | st.lists(st.fixed_dictionaries({"role": JSON, "content": JSON}),
                                                  max_size=2) | JSON,
    "prompt": st.sampled_from(["t1 t2", "", "t126", "\ud800"]) | JSON,
    "max_tokens": st.integers(-2, 20) | JSON,
    "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-1, 2) | JSON,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | JSON,
    "seed": st.integers(-5, 2**64) | JSON,
    "n": st.integers(-1, 20) | JSON,
    "stream": st.booleans() | JSON,
    "steps": st.integers(-1, 20) | JSON,
    "block_length": st.integers(-1, 20) | JSON,
    "threshold": st.floats(-1, 2) | JSON,
    "factor": st.floats(-1, 2) | JSON,
    "cache": st.sampled_from(["none", "prefix", "dual", "x"]) | JSON,
    "remasking": st.sampled_from(["low_confidence", "random", "margin", "entropy", "x"]) | JSON,
    "cfg_scale": st.floats(-1, 3) | JSON,
    "preset": st.sampled_from(["llada", "fast_dllm", "dinfer", "x"]) | JSON,
    "stream_options": st.just({"include_usage": True}) | JSON,
    "logprobs": JSON,
    "unknown": JSON,
}


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.fixed_dictionaries({}, optional=FIELD_VALUES) | JSON)
def test_random_bodies_get_400_never_500(served, endpoint, body):
    with time_limit(30):
        response = httpx.post(served.url + endpoint, content=json.dumps(body), timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
        if response.status_code == 200:
            if isinstance(body, dict) and body.get("stream") is True:
                assert response.text.rstrip().endswith("data: [DONE]"), response.text
            return
        assert response.status_code in (400, 404), (response.status_code, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if error["param"] is not None:  # the message names the field (an odd name by its repr)
            name = error["param"].split("[")[0].split(".")[0]
            assert name in error["message"] or repr(name) in error["message"], error


# ----------------------------------------------------------------------------------------------------------------
# the command line, the import rule
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("serve_folder"), **DEFAULTS)


def test_serve_command_refuses_bad_input_with_exit_2(chat_folder, capsys):
    from modeling_llada_moe.apps.cli import main

    for argv, message in (
        (["serve", "/no/such/folder"], "'/no/such/folder': no such folder"),
        (["serve", str(chat_folder), "--steps", "1"], "--steps=1 is invalid; expected a positive integer, at least"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    for argv, message in (
        (["serve", str(chat_folder), "--port", "70000"], "'70000' is not a port number in 1..65535"),
        (["serve", str(chat_folder), "--preset", "turbo"], "invalid choice: 'turbo'"),
        (["serve", str(chat_folder), "--max-batch-size", "0"], "'0' is not a positive integer"),
        (["serve", str(chat_folder), "--batch-window-ms", "-1"], "'-1' is not a number >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_serve_command_drains_in_flight_requests_on_sigterm(chat_folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "modeling_llada_moe.apps.cli", "serve", str(chat_folder), "--port", str(port),
               "--served-model-name", MODEL, "--max-new-tokens", "64", "--preset", "llada", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the server to start")
        body = {"model": MODEL, "messages": user("t1 t2"), "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # in flight
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":' in rest[-2].replace(" ", "")
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's, without a traceback
        assert process.wait(TIMEOUT) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)


APP_LAYER = {"cli", "evaluation", "inference", "hub", "serve", "fastapi", "uvicorn", "starlette", "prometheus_client",
             "openai", "quantization", "trl_ext"}


def test_the_hub_model_files_never_import_the_server():
    from test_hub_roundtrip import MODEL_FILES

    for name in MODEL_FILES:
        tree = ast.parse((ROOT / "modeling_llada_moe" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [alias.name for alias in node.names if not node.module]
            else:
                continue
            for module in modules:
                assert not APP_LAYER & set(module.split(".")), f"{name} imports {module}"


def test_the_command_line_works_without_the_serve_extra(chat_folder, monkeypatch, capsys):
    # cli.py imports the server only inside `llada-moe serve`, so the other commands need none of its packages ...
    tree = ast.parse((ROOT / "modeling_llada_moe" / "apps" / "cli.py").read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top_level for alias in node.names} | {node.module for node in top_level
                                                                          if isinstance(node, ast.ImportFrom)}
    assert not {"serve", "uvicorn", "fastapi", "prometheus_client"} & names
    # ... and without them `llada-moe serve` says what to install (exit 1: nothing wrong with the input).
    from modeling_llada_moe.apps.cli import main

    monkeypatch.delitem(sys.modules, "modeling_llada_moe.apps.serve")
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["serve", str(chat_folder)]) == 1
    assert "needs the serve extra: pip install 'llada-moe[serve]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the example client and the Gradio demo's --server mode
# ----------------------------------------------------------------------------------------------------------------


def test_serve_client_example(served, capsys):
    load_example("serve_client").main(["--base-url", served.url + "/v1", "--model", MODEL, "--prompt", "t1 t2 t3",
                                       "--max-tokens", "16"])
    out = capsys.readouterr().out
    expected = direct_answer(served.model, served.tokenizer, messages=user("t1 t2 t3"))
    assert "finish_reason=" in out and f"\n{expected}\n" in out
    assert "streamed, one delta per finished block:\n" + expected in out
    assert "sampled choice 1 (temperature 0.8, seed 0)" in out and "completion (no chat template" in out


def test_gradio_demo_chats_through_a_running_server(served):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    load_example("denoise_viz")  # app.py imports it from beside itself
    app = load_example("app")
    fields = app.server_fields(16, 8, 0, 0, "none", 0.0, "low_confidence")
    messages = [*user("t1 t2"), {"role": "assistant", "content": "t2 t1"}, *user("t3 t4")]
    answers = list(app.stream_from_server(served.url, messages, fields))
    expected = direct_answer(served.model, served.tokenizer, messages=messages)
    assert (answers[-1] if answers else "") == expected and len(answers) <= 2  # one per block with new text
    answers = list(app.stream_from_server(served.url, messages, app.server_fields(16, 8, 0, 0, "none", 0, "margin",
                                                                                  "dinfer")))
    config = DiffusionGenerationConfig.from_preset("dinfer", **DEFAULTS)
    assert (answers[-1] if answers else "") == direct_answer(served.model, served.tokenizer, messages=messages,
                                                             generation_config=config)
    assert app.server_fields(32, 8, 8, 0.9, "dual", 0.5, "margin") == {
        "max_tokens": 32, "temperature": 0.5, "block_length": 8, "steps": 8, "threshold": 0.9, "remasking": "margin",
        "cache": "dual"}
    assert app.build_remote_demo(served.url, max_new_tokens=16, block_length=8) is not None
    with pytest.raises(SystemExit):
        app.main(["--server", "localhost:8000"])
