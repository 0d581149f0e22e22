"""Gradio chat demo for LLaDA-MoE that shows the canvas filling in while the model denoises.

    python examples/app.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct            # http://127.0.0.1:7860
    python examples/app.py --model PATH --bits 4 --host 0.0.0.0 --port 7860         # 4-bit, reachable on the LAN
    python examples/app.py --tiny                                                   # offline, tiny random model
    python examples/app.py --server http://127.0.0.1:8000                           # a running `llada-moe serve`

Each turn goes through the tokenizer's chat template with the whole conversation. `diffusion_generate` runs in a
worker thread with a transformers streamer (`put_draft` after every denoising step, `put` for each final block), which
hands every intermediate canvas to the page, where masked positions show as `▒▒`,
the tokens committed at the latest step are highlighted and the semi-autoregressive blocks are separate rows. The
answer (cut at the end of turn) replaces the placeholder once the canvas is done. The decoding controls (canvas
length, block length, steps, Fast-dLLM threshold, KV-cache mode, temperature, remasking) apply per message.

With `--server URL` the demo loads no model: it chats with a running `llada-moe serve` through the `openai` client
(streamed, one delta per finished block) and shows the answer growing block by block instead of the canvas.

The chat is also an API endpoint, `/chat`, for `gradio_client`:

    Client("http://127.0.0.1:7860").predict("Hi!", [], 128, 32, 0, 0.9, "dual", 0.0, "low_confidence", True,
                                            api_name="/chat")
"""

from __future__ import annotations

import argparse
import html
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check from a local demo

import gradio as gr  # noqa: E402 (after the analytics switch)
from denoise_viz import COMMITTED, MASKED, NEW, STOPPED, Cell, canvas_cells, step_colour, text_colour
from transformers.generation.streamers import BaseStreamer

from modeling_llada_moe import DiffusionGenerationConfig
from modeling_llada_moe.apps.inference import (
    decode_completion,
    encode_prompt,
    end_of_turn_ids,
    load_model_and_tokenizer,
)
from modeling_llada_moe.apps.settings import CACHE_CHOICES, DECODING_PRESETS, REMASKING_STRATEGIES, decoding_config


PRESET_CHOICES = ["custom", *DECODING_PRESETS]  # "custom": the threshold / cache / temperature / remasking controls
BLOCK_CHOICES = [4, 8, 16, 32, 64, 128]
MASK_GLYPH = "▒▒"

CANVAS_CSS = """
.canvas { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; line-height: 1.9; }
.block { border-left: 3px solid #8a9bb0; padding: 2px 0 2px 6px; margin: 4px 0; }
.legend { font-size: 11px; color: #666; margin-top: 6px; }
.bar { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border: 1px solid #999; }
.label { font-size: 11px; color: #888; margin-right: 4px; }
.cell { display: inline-block; padding: 0 4px; margin: 1px; border-radius: 3px; white-space: pre; }
.masked { background: #dddddd; color: #9a9a9a; }
.committed { background: #e8eef7; color: #1f2937; }
.stopped { background: #f3f3f3; color: #a0a0a0; }
.new { background: #ffb703; color: #1f2937; font-weight: 700; box-shadow: 0 0 0 2px #c83c00; }
"""


class GenerationCancelled(Exception):
    """Raised inside the streamer to stop a generation nobody is watching any more."""


class CanvasStreamer(BaseStreamer):
    """A transformers streamer that rebuilds the whole [B, P + N] canvas after every denoising step from what
    `diffusion_generate` streams (the prompt and each final block through `put`, the current block through
    `put_draft`; blocks not started yet are still all masks) and hands it to `on_canvas`."""

    def __init__(self, canvas_length: int, mask_id: int, on_canvas):
        self.final: list[torch.Tensor] = []  # the prompt, then each final block
        self.canvas_length, self.mask_id, self.on_canvas = canvas_length, mask_id, on_canvas

    def put(self, value: torch.Tensor) -> None:
        self.final.append(value)

    def put_draft(self, value: torch.Tensor) -> None:
        done = torch.cat([*self.final, value], dim=1)
        rest = self.canvas_length - done.shape[1]
        self.on_canvas(torch.cat([done, done.new_full((done.shape[0], rest), self.mask_id)], dim=1))

    def end(self) -> None:
        pass


PROGRESS_PREFIX = "*denoising…"


def stream_generation(model, input_ids: torch.Tensor, **settings: Any) -> Iterator[tuple[str, Any]]:
    """Run `model.diffusion_generate(input_ids, **settings)` (a `generation_config=` and / or its fields) in a worker
    thread and yield its progress as it happens:
    `("step", canvas)` after every denoising step ([B, P + N] ids, masks in place), then `("done", output)` (a
    `DiffusionGenerateOutput`). An error in the worker (e.g. a `ValueError` for bad settings) is re-raised here;
    closing the iterator early stops the worker at its next step."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    mask_id = model.generation_config.mask_token_id
    mask_id = model.config.mask_token_id if mask_id is None else mask_id

    def on_step(canvas: torch.Tensor) -> None:
        if stop.is_set():
            raise GenerationCancelled
        events.put(("step", canvas.cpu()))

    def work() -> None:
        try:
            config = settings.get("generation_config") or model.generation_config
            canvas = settings.get("max_new_tokens", config.max_new_tokens)
            streamer = CanvasStreamer(input_ids.shape[1] + canvas, mask_id, on_step)
            output = model.diffusion_generate(input_ids, streamer=streamer, return_dict_in_generate=True, **settings)
            events.put(("done", output))
        except GenerationCancelled:
            pass
        except Exception as err:  # handed to the consumer, which raises it in its own thread
            events.put(("error", err))

    worker = threading.Thread(target=work, name="diffusion_generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        stop.set()


def canvas_html(cells: list[Cell], block_length: int, unmask_step: list[int] | None = None) -> str:
    """The canvas as HTML, one row per block: `▒▒` for masked cells, tokens committed at the latest step
    highlighted, pad filled in after a stop greyed. With `unmask_step` (the finished generation's, one step index per
    cell) committed cells are coloured by the step that unmasked them, as in `denoise_viz.render_heatmap`."""
    total = max(unmask_step, default=0) + 1 if unmask_step else 0
    parts = ['<div class="canvas">']
    for start in range(0, len(cells), block_length):
        parts.append(f'<div class="block"><span class="label">block {start // block_length}</span>')
        for i in range(start, min(start + block_length, len(cells))):
            cell, style = cells[i], ""
            text = MASK_GLYPH if cell.state == MASKED else escape(cell.text)
            if total and cell.state != MASKED and unmask_step[i] >= 0:
                fill = step_colour(unmask_step[i], total)
                style = f' style="background: rgb{fill}; color: rgb{text_colour(fill)}" title="step {unmask_step[i]}"'
            parts.append(f'<span class="cell {cell.state}"{style}>{text}</span>')
        parts.append("</div>")
    if total:
        gradient = ", ".join(f"rgb{step_colour(k, 5)}" for k in range(5))
        parts.append(
            f'<div class="legend">colour = step that unmasked the token: 0 <span class="bar" '
            f'style="background: linear-gradient(to right, {gradient})"></span> {total - 1}</div>'
        )
    parts.append("</div>")
    return "".join(parts)


def escape(text: str) -> str:
    """HTML-escape `text`, and the characters Gradio's HTML template syntax would interpret."""
    return html.escape(text).replace("$", "&#36;").replace("{", "&#123;").replace("}", "&#125;")


def message_text(content: Any) -> str:
    """The text of a chat message's content as the Chatbot hands it over: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def conversation(message: str, history) -> list[dict[str, str]]:
    """The chat history as text turns, then the new user `message` (a `gr.Error` when it is empty). A progress
    placeholder left by an interrupted generation is not part of the conversation."""
    if not message or not message.strip():
        raise gr.Error("Type a message first.")
    turns = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
    turns = [turn for turn in turns if not turn["content"].startswith(PROGRESS_PREFIX)]
    turns.append({"role": "user", "content": message})
    return turns


def decoding_settings(
    max_new_tokens: float,
    block_length: float,
    steps: float,
    threshold: float,
    cache: str,
    temperature: float,
    remasking: str,
    preset: str = "custom",
    base: Any = None,
) -> DiffusionGenerationConfig:
    """The `DiffusionGenerationConfig` of the UI controls over `base` (a model: its generation config; default
    `DiffusionGenerationConfig()`): `steps` 0 = one token per step, `threshold` 0 = off, `cache` one of none / prefix
    / dual; a `preset` other than "custom" (`DiffusionGenerationConfig.from_preset`) replaces the threshold, cache,
    temperature and remasking controls. Raises `SettingError` (a `ValueError`) naming a value the controls cannot
    mean."""
    controls = dict(max_new_tokens=max_new_tokens, block_length=block_length, steps=steps or None)
    if preset == "custom":
        preset = None
        controls.update(threshold=threshold or None, cache=cache, temperature=temperature, remasking=remasking)
    return decoding_config(DiffusionGenerationConfig() if base is None else base, preset=preset, **controls)


def build_demo(
    model,
    tokenizer,
    max_new_tokens: int = 128,
    block_length: int = 32,
    steps: int = 0,
    threshold: float = 0.0,
    cache: str = "none",
    temperature: float = 0.0,
    title: str = "LLaDA-MoE",
) -> gr.Blocks:
    """The chat demo as a `gr.Blocks` (not launched): pass a loaded model and its tokenizer (with a chat template)
    and the initial values of the decoding controls. Its `/chat` endpoint takes (message, history, max_new_tokens,
    block_length, steps, threshold, cache, temperature, remasking, stop_at_turn_end, preset) and streams (chat history,
    canvas HTML, status, cleared textbox)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("build_demo: the tokenizer has no chat template; the demo needs one for multi-turn chat")
    if cache not in CACHE_CHOICES:
        raise ValueError(f"build_demo: cache={cache!r}; expected one of {list(CACHE_CHOICES)}")
    mask_id = model.generation_config.mask_token_id
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    turn_end = end_of_turn_ids(tokenizer)

    def chat(
        message, history, max_new_tokens, block_length, steps, threshold, cache, temperature, remasking, stop,
        preset="custom",
    ):
        turns = conversation(message, history)
        try:
            config = decoding_settings(
                max_new_tokens, block_length, steps, threshold, cache, temperature, remasking, preset, base=model
            )
            input_ids = encode_prompt(tokenizer, messages=turns).to(model.device)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        if stop and turn_end:  # stop decoding blocks once one holds an end of turn; the answer is unchanged
            config.update(stop_at_eos=True, eos_token_id=turn_end)
        prompt_length, length = input_ids.shape[1], config.max_new_tokens
        started, previous, step, output = time.perf_counter(), None, 0, None
        try:
            for kind, payload in stream_generation(model, input_ids, generation_config=config):
                if kind == "step":
                    step += 1
                    cells = canvas_cells(payload[0], previous, prompt_length, tokenizer, mask_id)
                    previous = payload[0]
                    done = sum(cell.state != MASKED for cell in cells)
                    new = sum(cell.state == NEW for cell in cells)
                    status = f"step {step}: +{new} tokens, {done}/{length} unmasked"
                    progress = f"{PROGRESS_PREFIX} step {step}, {done}/{length} tokens*"
                    thinking = {"role": "assistant", "content": progress}
                    yield [*turns, thinking], canvas_html(cells, config.block_length), status, ""
                else:
                    output = payload
        except ValueError as err:  # the settings diffusion_generate rejects (e.g. block length vs canvas)
            raise gr.Error(str(err)) from err
        seconds = time.perf_counter() - started
        answer = decode_completion(tokenizer, output.sequences[0, prompt_length:])
        cells = canvas_cells(output.sequences[0], None, prompt_length, tokenizer, mask_id)
        stopped = (output.unmask_step[0] < 0).tolist()  # the pad filled in after the end of turn
        cells = [Cell(cell.text, STOPPED if pad else COMMITTED) for cell, pad in zip(cells, stopped)]
        status = (
            f"done: {int(output.nfe[0])} forward passes, {float(output.tokens_per_forward[0]):.2f} tokens/forward, "
            f"{seconds:.1f} s"
        )
        reply = {"role": "assistant", "content": answer}
        html_canvas = canvas_html(cells, config.block_length, output.unmask_step[0].tolist())
        yield [*turns, reply], html_canvas, status, ""

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {html.escape(title)}: masked-diffusion chat")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="chat", height=360)
                with gr.Row():
                    textbox = gr.Textbox(
                        placeholder="Message", label="message", show_label=False, scale=5, autofocus=True
                    )
                    send = gr.Button("Send", variant="primary", scale=1)
                clear = gr.Button("Clear chat", size="sm")
            with gr.Column(scale=2):
                status = gr.Markdown("The canvas fills in here while the model denoises.", label="status")
                canvas = gr.HTML("", label="canvas", css_template=CANVAS_CSS)
        with gr.Accordion("Decoding", open=True):
            with gr.Row():
                new_tokens = gr.Slider(8, 1024, value=max_new_tokens, step=8, label="max new tokens (canvas)")
                blocks = gr.Dropdown(sorted({*BLOCK_CHOICES, block_length}), value=block_length, label="block length")
                steps_box = gr.Slider(0, 1024, value=steps, step=1, label="steps (0 = one token per step)")
                threshold_box = gr.Slider(0, 1, value=threshold, step=0.05, label="threshold (0 = off)")
            with gr.Row():
                cache_box = gr.Radio(CACHE_CHOICES, value=cache, label="KV cache")
                temperature_box = gr.Slider(0, 2, value=temperature, step=0.1, label="temperature (0 = greedy)")
                remasking_box = gr.Dropdown(list(REMASKING_STRATEGIES), value="low_confidence", label="remasking")
                stop_box = gr.Checkbox(value=True, label="stop at end of turn")
                preset_box = gr.Dropdown(
                    PRESET_CHOICES, value="custom", label="preset (replaces threshold, cache, temperature, remasking)"
                )
        controls = [
            new_tokens, blocks, steps_box, threshold_box, cache_box, temperature_box, remasking_box, stop_box,
            preset_box,
        ]
        gr.on(
            triggers=[textbox.submit, send.click],
            fn=chat,
            inputs=[textbox, chatbot, *controls],
            outputs=[chatbot, canvas, status, textbox],
            api_name="chat",
            show_progress="hidden",
        )
        clear.click(lambda: ([], "", ""), outputs=[chatbot, canvas, status], api_visibility="private")
    return demo


def server_fields(
    max_new_tokens: float, block_length: float, steps: float, threshold: float, cache: str, temperature: float,
    remasking: str, preset: str = "custom",
) -> dict[str, Any]:
    """The request fields of `llada-moe serve` for the UI controls (`decoding_settings`' arguments, checked the same
    way): a preset other than "custom" goes by name and replaces threshold, cache, temperature and remasking."""
    config = decoding_settings(max_new_tokens, block_length, steps, threshold, cache, temperature, remasking, preset)
    fields = {"max_tokens": config.max_new_tokens, "block_length": config.block_length}
    if config.steps is not None:
        fields["steps"] = config.steps
    if preset != "custom":
        return {**fields, "preset": preset}
    fields.update(temperature=config.temperature, remasking=config.remasking, cache=cache)
    if config.threshold is not None:
        fields["threshold"] = config.threshold
    return fields


def stream_from_server(
    server: str, messages: list[dict[str, str]], fields: dict[str, Any], api_key: str | None = None,
    model: str | None = None,
) -> Iterator[str]:
    """Chat with a running `llada-moe serve` at `server` (its root URL): yields the answer so far after each
    finished block. `fields` are request fields (`server_fields`); `model` defaults to the one the server lists."""
    from openai import OpenAI

    client = OpenAI(base_url=server.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
    model = model or client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, extra_body=fields)
    answer = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            answer += chunk.choices[0].delta.content
            yield answer


def build_remote_demo(
    server: str, api_key: str | None = None, max_new_tokens: int = 128, block_length: int = 32,
    title: str = "LLaDA-MoE",
) -> gr.Blocks:
    """The chat demo for a running `llada-moe serve` (no model in this process): the same decoding controls, the
    answer streamed block by block. Its `/chat` endpoint takes (message, history, max_new_tokens, block_length,
    steps, threshold, cache, temperature, remasking, preset) and streams (chat history, status, cleared textbox)."""

    def chat(message, history, max_new_tokens, block_length, steps, threshold, cache, temperature, remasking, preset):
        turns = conversation(message, history)
        try:
            fields = server_fields(max_new_tokens, block_length, steps, threshold, cache, temperature, remasking,
                                   preset)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        started, answer, blocks = time.perf_counter(), "", 0
        try:
            for answer in stream_from_server(server, turns, fields, api_key):
                blocks += 1
                yield [*turns, {"role": "assistant", "content": answer}], f"{blocks} blocks streamed", ""
        except Exception as err:  # the openai client's APIError (a 400 names the bad field), an unreachable server
            raise gr.Error(f"{server}: {err}") from err
        status = f"done in {time.perf_counter() - started:.1f} s ({server})"
        yield [*turns, {"role": "assistant", "content": answer}], status, ""

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {html.escape(title)}: masked-diffusion chat via {html.escape(server)}")
        chatbot = gr.Chatbot(label="chat", height=360)
        with gr.Row():
            textbox = gr.Textbox(placeholder="Message", label="message", show_label=False, scale=5, autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1)
        status = gr.Markdown("", label="status")
        with gr.Accordion("Decoding", open=True), gr.Row():
            new_tokens = gr.Slider(8, 1024, value=max_new_tokens, step=8, label="max new tokens (canvas)")
            blocks = gr.Dropdown(sorted({*BLOCK_CHOICES, block_length}), value=block_length, label="block length")
            steps_box = gr.Slider(0, 1024, value=0, step=1, label="steps (0 = one token per step)")
            threshold_box = gr.Slider(0, 1, value=0, step=0.05, label="threshold (0 = off)")
            cache_box = gr.Radio(CACHE_CHOICES, value="none", label="KV cache")
            temperature_box = gr.Slider(0, 2, value=0, step=0.1, label="temperature (0 = greedy)")
            remasking_box = gr.Dropdown(list(REMASKING_STRATEGIES), value="low_confidence", label="remasking")
            preset_box = gr.Dropdown(
                PRESET_CHOICES, value="custom", label="preset (replaces threshold, cache, temperature, remasking)"
            )
        controls = [new_tokens, blocks, steps_box, threshold_box, cache_box, temperature_box, remasking_box, preset_box]
        gr.on(
            triggers=[textbox.submit, send.click],
            fn=chat,
            inputs=[textbox, chatbot, *controls],
            outputs=[chatbot, status, textbox],
            api_name="chat",
            show_progress="hidden",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or Hub repo id (official checkpoint or saved by llada-moe)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and word-level tokenizer (offline)")
    parser.add_argument("--server", metavar="URL", help="chat with a running `llada-moe serve` at URL (no model here)")
    parser.add_argument("--api-key", default=os.environ.get("LLADA_MOE_API_KEY"), help="the server's key (--server)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=None, help="load 4- or 8-bit (bitsandbytes)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="initial canvas length (default 128)")
    parser.add_argument("--block-length", type=int, default=None, help="initial block length (default 32)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    args = parser.parse_args(argv)

    if args.tiny + bool(args.model) + bool(args.server) != 1:
        parser.error("pass exactly one of --model PATH_OR_REPO, --tiny or --server URL")
    if args.server is not None and not args.server.startswith(("http://", "https://")):
        parser.error(f"--server {args.server!r}: expected an http:// or https:// URL")
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: expected a port number in 1..65535")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--block-length", args.block_length)):
        if value is not None and value < 1:  # checked before anything loads; a shorter last block is fine
            parser.error(f"{flag} {value}: expected a positive integer")
    if args.server is not None:
        demo = build_remote_demo(args.server, args.api_key, args.max_new_tokens or 128, args.block_length or 32)
        demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
        return
    if args.tiny:
        from modeling_llada_moe.apps.tiny_task import save_tiny_folder

        source, new_tokens, block = save_tiny_folder(tempfile.mkdtemp(prefix="llada_moe_tiny_")), 32, 8
    else:
        source, new_tokens, block = args.model, 128, 32
    new_tokens = args.max_new_tokens or new_tokens
    block = args.block_length or block
    try:
        model, tokenizer = load_model_and_tokenizer(source, bits=args.bits, device=args.device)
        demo = build_demo(model, tokenizer, max_new_tokens=new_tokens, block_length=block)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
