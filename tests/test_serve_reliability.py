"""`llada-moe serve` cannot be wedged: settings that cannot work are refused at start-up, a dead worker is reported,
a request that can never be served or whose numbers are extreme is a 400 naming the field, disconnects are not errors.

A real uvicorn server on a free localhost port (`test_serve.serving`), driven with httpx, the openai client and raw
sockets; the command line through `cli.main`. Every client call has a timeout, so a hang fails instead of stalling.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time

import httpx
import openai
import pytest
import test_serve
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_serve import DEFAULTS, MODEL, TIMEOUT, Gates, direct_answer, in_thread, serving, user, wait_for
from time_limit import time_limit

from modeling_llada_moe import DiffusionGenerationConfig
from modeling_llada_moe.apps.cli import main
from modeling_llada_moe.apps.inference import encode_prompt
from modeling_llada_moe.apps.protocol import DecodingFields
from modeling_llada_moe.apps.serve import ServeOptions, create_app
from modeling_llada_moe.apps.settings import SettingError, decoding_config
from modeling_llada_moe.apps.tiny_task import save_tiny_folder
from modeling_llada_moe.validators import is_finite, is_int


POSITIONS = 256  # the tiny model's max_position_embeddings; 1 of them is a row tag (16 rows in base 127)


# test_serve's module-scoped fixtures (a tiny model with the served defaults, and its running server), taken as they
# are: pytest finds them as attributes of this module, and each module gets its own instances.
tiny, served = test_serve.tiny, test_serve.served


def post(running, body, endpoint="/v1/chat/completions", text: str | None = None) -> httpx.Response:
    return httpx.post(running.url + endpoint, content=text if text is not None else json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def assert_400(response: httpx.Response, param: str, *words: str) -> dict:
    error = response.json()["error"]
    assert response.status_code == 400, (response.status_code, error)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert f"`{param}`" in error["message"] or param in error["message"], error
    for word in words:
        assert word in error["message"], error
    assert "retry-after" not in response.headers
    return error


def statuses(running) -> dict[str, float]:
    """`llada_moe_requests_total` by status, summed over endpoints."""
    text = httpx.get(running.url + "/metrics", timeout=TIMEOUT).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llada_moe_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0) + float(line.split()[-1])
    return counts


# ----------------------------------------------------------------------------------------------------------------
# start-up: settings that cannot work exit 2 naming the flag
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("reliable"), **DEFAULTS)


@pytest.fixture(scope="module")
def long_default_folder(tmp_path_factory):
    """A folder whose generation_config.json asks for 300 new tokens: more than its 256 positions."""
    return save_tiny_folder(tmp_path_factory.mktemp("long_default"), max_new_tokens=300, block_length=8)


ARGPARSE_REFUSALS = [
    (["--batch-window-ms", "9.3e12"], "--batch-window-ms", "more than 60000"),
    (["--batch-window-ms", "inf"], "--batch-window-ms", "not finite"),
    (["--batch-window-ms", "nan"], "--batch-window-ms", "not finite"),
    (["--batch-window-ms", "-1"], "--batch-window-ms", "a number >= 0"),
    (["--max-queue", "0"], "--max-queue", "a positive integer"),
    (["--max-queue", "1.5"], "--max-queue", "a positive integer"),
    (["--max-batch-size", "-3"], "--max-batch-size", "a positive integer"),
    (["--max-batch-size", "2.0"], "--max-batch-size", "a positive integer"),
    (["--port", "0"], "--port", "a port number"),
    (["--port", "65536"], "--port", "a port number"),
    (["--max-new-tokens", "1e3"], "--max-new-tokens", "a positive integer"),
    (["--seed", str(2**64)], "--seed", "[0, 2**64)"),
]


@pytest.mark.parametrize("flags, flag, words", ARGPARSE_REFUSALS, ids=[" ".join(a[0]) for a in ARGPARSE_REFUSALS])
def test_flags_out_of_range_exit_2_naming_the_flag(folder, capsys, flags, flag, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(folder), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}" in err and words in err, err


def test_settings_that_cannot_serve_exit_2_before_listening(folder, long_default_folder, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            # every request without max_tokens would be refused: the canvas leaves no position for a prompt
            (["--max-new-tokens", "300"], "--max-new-tokens=300 is invalid; expected at most 254"),
            (["--max-new-tokens", "255"], "--max-new-tokens=255 is invalid; expected at most 254"),
            (["--stop", "x", "--stop", ""], "--stop=('x', '') is invalid; expected a list of non-empty strings"),
            (["--api-key", ""], "--api-key=<hidden> is invalid"),
            (["--api-key", "two words"], "--api-key=<hidden> is invalid"),
            (["--port", str(port)], f"--port={port} is invalid: cannot listen on 127.0.0.1:{port}"),
            (["--host", "192.0.2.1"], "--host='192.0.2.1' is invalid: cannot listen on 192.0.2.1"),  # TEST-NET-1
        ]
        for flags, message in cases:
            with time_limit(TIMEOUT):
                assert main(["serve", str(folder), "--port", str(free), *flags]) == 2, flags  # the last --port wins
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (flags, err)
    # a generation_config.json default that cannot be served names the file and the flag that overrides it
    assert main(["serve", str(long_default_folder), "--port", str(free)]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json has max_new_tokens=300" in err and "pass --max-new-tokens" in err, err


def test_serve_options_refuse_what_cannot_work(tiny):
    for options, option in (
        (dict(batch_window_ms=9.3e12), "batch_window_ms"),
        (dict(batch_window_ms=math.nan), "batch_window_ms"),
        (dict(batch_window_ms=True), "batch_window_ms"),
        (dict(max_queue=0), "max_queue"),
        (dict(max_queue=2.0), "max_queue"),
        (dict(max_batch_size=-1), "max_batch_size"),
        (dict(seed=2**64), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(api_key=""), "api_key"),
        (dict(max_body_bytes=0), "max_body_bytes"),
        (dict(model_name=""), "model_name"),
    ):
        with pytest.raises(ValueError, match=f"`{option}`=.* is invalid; expected"):
            ServeOptions(**options)
    model, tokenizer = tiny
    too_long = DiffusionGenerationConfig.from_dict({**model.generation_config.to_dict(), "max_new_tokens": 300})
    with pytest.raises(ValueError, match=r"`max_new_tokens`=300 is invalid; expected at most 254"):
        create_app(model, tokenizer, ServeOptions(defaults=too_long))
    # 2**70 rows in a batch would need 11 tag positions: still room for a prompt, so it starts
    create_app(model, tokenizer, ServeOptions(max_batch_size=2**70)).state.server.scheduler.close()


# ----------------------------------------------------------------------------------------------------------------
# requests that can never be served: 400, never 503 + Retry-After
# ----------------------------------------------------------------------------------------------------------------


def test_requests_larger_than_the_queue_or_a_batch_are_400(tiny):
    with serving(*tiny, max_queue=2, max_batch_size=1) as running:
        for body, param, words in (
            ({"prompt": "t1", "n": 3}, "n", "at most 2 rows this server queues"),
            ({"prompt": ["t1", "t1", "t1"]}, "prompt", "at most 2 rows this server queues"),
            ({"prompt": "t1", "n": 2, "temperature": 1.0}, "n", "at most 1 rows this server decodes together"),
            ({"prompt": ["t1", "t2"]}, "prompt", "at most 1 rows this server decodes together"),
        ):
            assert_400(post(running, {"model": MODEL, **body}, "/v1/completions"), param, *words.split(";"))
        # greedy choices of one prompt are decoded once: they fit a batch of 1
        for body in ({"prompt": "t1", "n": 2}, {"prompt": ["t1", "t1"]}):
            response = post(running, {"model": MODEL, **body}, "/v1/completions")
            assert response.status_code == 200 and len(response.json()["choices"]) == 2, response.text


def test_a_long_prompt_without_max_tokens_blames_the_prompt(served):
    long = " ".join(["t1"] * 250)  # 250 tokens + the default 16 > the 255 positions a request gets
    error = assert_400(post(served, {"model": MODEL, "prompt": long}, "/v1/completions"), "prompt",
                       "max_tokens (16 (the server's default; send a smaller max_tokens)")
    assert error["code"] == "context_length_exceeded"
    assert_400(post(served, {"model": MODEL, "prompt": long, "max_tokens": 16}, "/v1/completions"), "max_tokens")
    assert_400(post(served, {"model": MODEL, "prompt": long, "max_completion_tokens": 16}, "/v1/completions"),
               "max_completion_tokens")
    response = post(served, {"model": MODEL, "prompt": long, "max_tokens": 5}, "/v1/completions")
    assert response.status_code == 200, response.text
    # a prompt that alone fills the positions is the prompt's fault whatever max_tokens is
    assert_400(post(served, {"model": MODEL, "prompt": " ".join(["t1"] * 255), "max_tokens": 1},
                    "/v1/completions"), "prompt")


def test_max_tokens_below_the_servers_steps_says_so(tiny):
    model, tokenizer = tiny
    with serving(model, tokenizer, defaults=decoding_config(model, steps=16)) as running:
        assert_400(post(running, {"model": MODEL, "prompt": "t1", "max_tokens": 8}, "/v1/completions"), "max_tokens",
                   "`max_tokens`=8 is invalid; expected a positive integer, at least steps=16")
        response = post(running, {"model": MODEL, "prompt": "t1", "max_tokens": 8, "steps": 8}, "/v1/completions")
        assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------------------------
# numbers the decoding cannot use: 400 naming the field; a failing batch fails only the request that caused it
# ----------------------------------------------------------------------------------------------------------------


def test_a_decoding_made_non_finite_by_a_field_is_400_naming_it(served):
    body = {"model": MODEL, "messages": user("t1"), "preset": "dinfer_smooth", "cfg_scale": 1e300}
    config = decoding_config(served.app.state.server.base, preset="dinfer_smooth", cfg_scale=1e300)
    with pytest.raises(ValueError, match="cfg_scale"):  # the cause: the guided logits overflow to NaN
        served.model.diffusion_generate(encode_prompt(served.tokenizer, messages=user("t1")), generation_config=config)
    before = statuses(served)
    assert_400(post(served, body), "cfg_scale", "1e+300")
    with pytest.raises(openai.APIError, match="cfg_scale") as error:
        list(served.client().chat.completions.create(model=MODEL, messages=user("t1"), stream=True,
                                                     extra_body={"preset": "dinfer_smooth", "cfg_scale": 1e300}))
    assert error.value.body["param"] == "cfg_scale" and error.value.body["type"] == "invalid_request_error"
    after = statuses(served)
    assert after.get("500", 0) == before.get("500", 0) and after["400"] == before.get("400", 0) + 1


def test_a_failing_batch_is_decoded_again_one_request_at_a_time(served):
    gates = Gates(served.model)
    try:
        client = served.client()
        gates.close(99)
        gates.fail.add(97)
        blocker = in_thread(client.chat.completions.create, model=MODEL, messages=user("t99"), max_tokens=8)
        gates.wait_entered(99)
        # same settings: the two are decoded as one batch, which fails because of t97
        poisoned = in_thread(client.chat.completions.create, model=MODEL, messages=user("t97 t1"))
        healthy = in_thread(client.chat.completions.create, model=MODEL, messages=user("t1 t2"))
        wait_for(lambda: served.metric("llada_moe_queue_depth") == 2, "both requests queued")
        rows = served.metric("llada_moe_batch_rows_sum")
        gates.hold[99].set()
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            poisoned()
        assert healthy().choices[0].message.content == direct_answer(served.model, served.tokenizer,
                                                                     messages=user("t1 t2"))
        blocker()
        assert served.metric("llada_moe_batch_rows_sum") - rows == 2 + 1 + 1  # the pair, then each alone
    finally:
        gates.remove()


# ----------------------------------------------------------------------------------------------------------------
# a dead worker: /health says so, in-flight and new requests fail at once
# ----------------------------------------------------------------------------------------------------------------


class WorkerKilled(BaseException):
    """Not an `Exception`: what a batch's isolation does not catch (like KeyboardInterrupt or SystemExit)."""


def test_a_dead_worker_is_reported_and_every_request_fails_at_once(tiny):
    model, tokenizer = tiny
    with serving(model, tokenizer, max_batch_size=1) as running:
        gates = Gates(model)
        try:
            client = running.client()
            assert httpx.get(running.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
            gates.close(99)
            in_flight = in_thread(client.chat.completions.create, model=MODEL, messages=user("t99 t1"))
            gates.wait_entered(99)
            queued = in_thread(client.completions.create, model=MODEL, prompt="t3 t4", max_tokens=8)
            wait_for(lambda: running.metric("llada_moe_queue_depth") == 1, "the request queued")

            def kill(module, args, kwargs):
                raise WorkerKilled("injected: the forward raised a BaseException")

            killer = model.register_forward_pre_hook(kill, with_kwargs=True)
            try:
                gates.hold[99].set()  # the held forward goes on into the killing hook
                for call in (in_flight, queued):
                    with pytest.raises(openai.APIStatusError) as error:
                        call()
                    assert error.value.status_code == 503 and "decoding worker has stopped" in error.value.message
                    assert "WorkerKilled: injected" in error.value.message
            finally:
                killer.remove()
            health = httpx.get(running.url + "/health", timeout=TIMEOUT)
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert "WorkerKilled" in health.json()["error"]
            assert running.metric("llada_moe_worker_up") == 0
            start = time.monotonic()
            response = post(running, {"model": MODEL, "messages": user("t1")})
            assert response.status_code == 503 and response.json()["error"]["code"] == "worker_stopped"
            assert "retry-after" not in response.headers  # retrying will not help
            streamed = httpx.post(running.url + "/v1/chat/completions", timeout=TIMEOUT,
                                  json={"model": MODEL, "messages": user("t1"), "stream": True})
            assert streamed.status_code == 503 and time.monotonic() - start < 5  # at once, not after a timeout
        finally:
            gates.remove()


# ----------------------------------------------------------------------------------------------------------------
# disconnects are not errors
# ----------------------------------------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_disconnects_mid_body_mid_stream_and_mid_wait_are_not_errors(served, capfd):
    records = Records()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "llada_moe", "asyncio")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        before = statuses(served)
        port = int(served.url.rsplit(":", 1)[1])
        for head in (b"Content-Length: 1000\r\n", b"Transfer-Encoding: chunked\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                body = b'{"model": "tiny", "mess'  # 23 bytes of 1000, or a chunk of 0x17 bytes and no end
                body = body if head.startswith(b"Content") else b"17\r\n" + body + b"\r\n"
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + head + b"\r\n" + body)
                time.sleep(0.2)  # the server reads what came, then waits for the rest
        wait_for(lambda: statuses(served).get("499", 0) >= before.get("499", 0) + 2, "the cut bodies to end")
        # mid-stream: the client reads one event and goes
        with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": user("t5 t6"), "stream": True, "max_tokens": 64}) as r:
            next(r.iter_lines())
        # mid-wait: a non-streamed request whose client times out
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "t2", "max_tokens": 128},
                       timeout=0.05)
        wait_for(lambda: statuses(served).get("499", 0) >= before.get("499", 0) + 3, "the abandoned request to end")
        wait_for(lambda: served.metric("llada_moe_queue_depth") == 0, "the queue to empty")
        after = statuses(served)
        assert {s: n for s, n in after.items() if s not in ("200", "499") and n != before.get(s, 0)} == {}, after
        assert served.client().completions.create(model=MODEL, prompt="t1").choices[0].text is not None
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    problems = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR or r.exc_info]
    assert problems == []
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# request fields at their extremes: valid ones answer 200 (greedy: the answer of diffusion_generate), invalid ones
# 400 naming the field; never a 500, never a hang
# ----------------------------------------------------------------------------------------------------------------

INT_FIELDS = ("max_tokens", "max_completion_tokens", "steps", "block_length", "top_k")
FLOAT_FIELDS = ("temperature", "top_p", "threshold", "factor", "cfg_scale")
CHOICES = {"cache": ("none", "prefix", "dual"), "remasking": ("low_confidence", "random", "margin", "entropy"),
           "preset": ("llada", "fast_dllm", "dinfer", "dinfer_smooth")}
EXTREME = st.sampled_from([0, -1, 2**31, 2**63, 2**64, 2**70, 10**400, 1e300, 1.7976931348623157e308, 5e-324, -0.0,
                           math.inf, -math.inf, math.nan, 1.5, True, None, "1", [1], {}])


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Three times in four a value of the field's type and range (alone), else an extreme or a wrong type."""
    return st.one_of(valid, valid, valid, EXTREME)


COUNT = st.integers(1, 24) | st.sampled_from([247, 248, 300])  # about the longest answers beside a prompt
FIELDS = {
    "max_tokens": field(COUNT),
    "max_completion_tokens": field(COUNT),
    "steps": field(st.integers(1, 24)),
    "block_length": field(st.integers(1, 24) | st.just(2**70)),
    "top_k": field(st.integers(1, 200) | st.just(2**63)),
    "temperature": field(st.floats(0, 3) | st.sampled_from([0, 1e-300, 5e-324, 1e300])),
    "top_p": field(st.floats(0, 1, exclude_min=True) | st.just(1)),
    "threshold": field(st.floats(0, 1, exclude_min=True)),
    "factor": field(st.floats(0, 10, exclude_min=True) | st.sampled_from([1e-300, 1e300])),
    "cfg_scale": field(st.floats(0, 3) | st.sampled_from([1e30, 1e300, 1.7976931348623157e308])),
    **{name: field(st.sampled_from(choices)) | st.sampled_from(["x", ""]) for name, choices in CHOICES.items()},
    "seed": field(st.sampled_from([0, 7, 2**63 - 1, 2**63, 2**64 - 1])),
    "n": field(st.integers(1, 16) | st.just(17)),
    "stop": field(st.lists(st.text("t1 2", min_size=1, max_size=3), max_size=4) | st.text("t12 ", max_size=300)
                  | st.just(["t1", ""])),
}
REQUESTS = st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: FIELDS[name] for name in names}))


def type_problems(body: dict) -> set[str]:
    """The fields whose JSON value has the wrong type or is out of the protocol's range."""
    bad = set()
    for name, value in body.items():
        if value is None:
            continue
        if name in INT_FIELDS:
            ok = is_int(value)
        elif name in FLOAT_FIELDS:  # an int too large for a float is no number either
            ok = abs(value) < 2**1024 if is_int(value) else is_finite(value)
        elif name in CHOICES:
            ok = isinstance(value, str)
        elif name == "seed":
            ok = is_int(value) and 0 <= value < 2**64
        elif name == "n":
            ok = is_int(value) and 1 <= value <= 16
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            ok = isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)
        else:
            ok = True
        if not ok:
            bad.add(name)
    return bad


def as_json(body: dict) -> str:
    """JSON text of `body`; infinities written as 1e999 / -1e999 (valid JSON that reads as infinite)."""
    return json.dumps(body).replace("-Infinity", "-1e999").replace("Infinity", "1e999")


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chat=st.booleans(), fields=REQUESTS)
@example(chat=True, fields={"preset": "dinfer_smooth", "cfg_scale": 1e300})  # NaN logits: was a 500
@example(chat=False, fields={"cfg_scale": 1e300, "max_tokens": 247})
@example(chat=False, fields={"temperature": 1.0, "seed": 2**64 - 1, "n": 2})  # was a 400 (seed < 2**63)
@example(chat=True, fields={"temperature": math.inf, "max_tokens": 2**64})
@example(chat=False, fields={"max_tokens": 248})
def test_request_fields_at_their_extremes(served, chat, fields):
    server = served.app.state.server
    body = {"model": MODEL, **({"messages": user("t1 t2")} if chat else {"prompt": "t1 t2"}), **fields}
    with time_limit(30):
        response = post(served, None, "/v1/chat/completions" if chat else "/v1/completions", text=as_json(body))
    assert response.status_code in (200, 400), (response.status_code, response.text)
    error = response.json().get("error")
    bad = type_problems(fields)
    if bad:
        assert response.status_code == 400 and error["param"] in bad, (bad, error)
        return
    # the decoding fields as the server reads them: in the protocol's order, JSON 3 as 3.0 where a float is wanted
    decoding = {name: float(fields[name]) if name in FLOAT_FIELDS else fields[name]
                for name in DecodingFields.model_fields if fields.get(name) is not None}
    if decoding.get("top_p") == 1:
        del decoding["top_p"]
    try:
        config = decoding_config(server.base, **decoding)
    except SettingError as err:
        assert response.status_code == 400 and error["param"] == err.field, (err, error)
        return
    input_ids = encode_prompt(served.tokenizer, None if chat else "t1 t2", user("t1 t2") if chat else None,
                              chat_template=None if chat else False)
    if input_ids.shape[1] + config.max_new_tokens > POSITIONS - 1:
        length = [name for name in ("max_tokens", "max_completion_tokens") if name in decoding]
        assert response.status_code == 400 and error["param"] == (length[0] if length else "prompt" if not chat
                                                                    else "messages"), error
        return
    greedy = config.temperature == 0 and config.remasking != "random"
    try:
        with time_limit(30):
            expected = direct_answer(served.model, served.tokenizer, None if chat else "t1 t2",
                                     user("t1 t2") if chat else None, generation_config=config)
    except ValueError as err:  # the decoding itself refuses these settings (e.g. non-finite guided logits)
        assert response.status_code == 400 and error["param"] in decoding and error["param"] in str(err), error
        return
    assert response.status_code == 200, (fields, error)
    choices = response.json()["choices"]
    assert len(choices) == (fields.get("n") or 1)
    # A guidance scale far above the usual (<= 3) saturates confidences to exactly 1.0, and which of the tied
    # positions commits first may differ with the batch's padding: the text is compared below that.
    if greedy and not fields.get("stop") and config.cfg_scale <= 3:
        texts = [c["message"]["content"] if chat else c["text"] for c in choices]
        assert texts == [expected] * len(choices), (fields, texts, expected)
