"""The Gradio chat demo (examples/app.py), served on localhost and driven through gradio_client like a user would."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_example


os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_llada_moe.apps.inference import decode_completion, encode_prompt  # noqa: E402
from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE, tiny_model, tiny_tokenizer  # noqa: E402


def load_app():
    load_example("denoise_viz")  # app.py imports it from beside itself
    return load_example("app")


SETTINGS = dict(max_new_tokens=16, block_length=8)


@pytest.fixture(scope="module")
def served():
    """(client, model, tokenizer): the demo with a tiny random model, launched on a free localhost port."""
    from gradio_client import Client

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and loses a lot on a busy machine
    app = load_app()
    model, tokenizer = tiny_model(seed=0), tiny_tokenizer(LING_CHAT_TEMPLATE)
    demo = app.build_demo(model, tokenizer, **SETTINGS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False, download_files=False)
        yield client, model, tokenizer
    finally:
        demo.close()
        torch.set_num_threads(threads)


def chat(client, message, history):
    """Submit one turn with the test settings; returns every streamed update (history, canvas, status, textbox)."""
    job = client.submit(message, history, 16, 8, 0, 0, "none", 0.0, "low_confidence", True, api_name="/chat")
    job.result(timeout=60)
    return job.outputs()


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def direct_answer(model, tokenizer, messages) -> str:
    input_ids = encode_prompt(tokenizer, messages=messages)
    out = model.diffusion_generate(input_ids, **SETTINGS)
    return decode_completion(tokenizer, out[0, input_ids.shape[1] :])


def test_chat_streams_the_canvas_and_answers_like_diffusion_generate(served):
    client, model, tokenizer = served
    updates = chat(client, "t1 t2 t3 t4", [])
    history, canvas, status, textbox = updates[-1]
    expected = direct_answer(model, tokenizer, [{"role": "user", "content": "t1 t2 t3 t4"}])
    assert expected and [m["role"] for m in history] == ["user", "assistant"]
    assert text_of(history[-1]) == expected and textbox == ""
    assert "forward passes" in status and 'class="cell masked"' not in canvas and 'title="step 0"' in canvas

    steps = updates[:-1]  # one update per denoising step (one token per step here, unless a stop cut it short)
    assert 8 <= len(steps) <= 16
    first = steps[0][1]
    assert first.count('class="cell masked"') == 15 and first.count('class="cell new"') == 1
    assert first.count('class="block"') == 2 and "denoising" in text_of(steps[0][0][-1])
    masked_counts = [update[1].count('class="cell masked"') for update in steps]
    assert masked_counts == sorted(masked_counts, reverse=True) and len(set(masked_counts)) == len(steps)
    assert re.fullmatch(r"step \d+: \+1 tokens, \d+/16 unmasked", steps[-1][2])

    # A second turn goes through the chat template with the whole conversation.
    updates = chat(client, "t5 t6", history)
    history = updates[-1][0]
    expected_second = direct_answer(
        model,
        tokenizer,
        [
            {"role": "user", "content": "t1 t2 t3 t4"},
            {"role": "assistant", "content": expected},
            {"role": "user", "content": "t5 t6"},
        ],
    )
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert text_of(history[-1]) == expected_second


def test_an_interrupted_turns_progress_message_is_not_sent_to_the_model(served):
    client, model, tokenizer = served
    # The page was left mid-generation: the history ends with the progress message of an unfinished answer.
    interrupted = chat(client, "t7 t8", [])[2][0]
    assert "denoising" in text_of(interrupted[-1])
    history = chat(client, "t1 t2 t3 t4", interrupted)[-1][0]
    expected = direct_answer(
        model, tokenizer, [{"role": "user", "content": "t7 t8"}, {"role": "user", "content": "t1 t2 t3 t4"}]
    )
    assert text_of(history[-1]) == expected and [m["role"] for m in history] == ["user", "user", "assistant"]


def test_chat_reports_bad_settings(served):
    from gradio_client.exceptions import AppError

    client = served[0]
    with pytest.raises(AppError, match=r"`steps`=1 is invalid; expected a positive integer, at least the number"):
        client.predict("t1", [], 24, 16, 1, 0, "none", 0.0, "low_confidence", True, api_name="/chat")
    with pytest.raises(AppError, match=r"`steps`=2.5 is invalid; expected a positive integer"):
        client.predict("t1", [], 16, 8, 2.5, 0, "none", 0.0, "low_confidence", True, api_name="/chat")


def test_canvas_html_escapes_tokens():
    app = load_app()
    cells = [app.Cell("<b>{x}$", "committed"), app.Cell("", "masked")]
    html = app.canvas_html(cells, block_length=1)
    assert "&lt;b&gt;&#123;x&#125;&#36;" in html and app.MASK_GLYPH in html and html.count('class="block"') == 2
    coloured = app.canvas_html([app.Cell("a", "committed"), app.Cell("b", "stopped")], 2, unmask_step=[3, -1])
    assert 'title="step 3"' in coloured and coloured.count("style=") == 2  # the a cell and the legend bar


def test_app_command_line(capsys):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "examples/app.py", "--help"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0 and "--share" in result.stdout and "--tiny" in result.stdout

    app = load_app()  # the same parser in-process: bad flags fail before any model is loaded
    for argv, message in (
        (["--tiny", "--bogus"], "unrecognized arguments: --bogus"),
        (["--tiny", "--port", "70000"], "--port 70000: expected a port number in 1..65535"),
        (["--tiny", "--bits", "3"], "argument --bits: invalid choice: 3"),
        ([], "pass exactly one of --model PATH_OR_REPO, --tiny or --server URL"),
        (["--tiny", "--max-new-tokens", "24", "--block-length", "0"], "--block-length 0: expected a positive integer"),
        (["--model", "/no/such/folder"], "'/no/such/folder': no such folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            app.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
