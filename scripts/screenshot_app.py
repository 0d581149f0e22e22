"""Screenshot of the Gradio chat demo after one real chat turn, taken with headless Chromium (not run in CI).

    python scripts/screenshot_app.py                    # trains a tiny chat model (~1 min) -> docs/app_screenshot.png
    python scripts/screenshot_app.py --model PATH --prompt "Hi!" --out shot.png
    python scripts/screenshot_app.py --random           # a tiny random model instead (no training)

Without `--model`, a tiny LLaDA-MoE learns a chat version of digit reversal: the user sends five digit tokens of the
tiny word-level vocabulary ("t3 t1 t4 t1 t5"), the assistant answers them reversed and ends its turn. The script
saves that model as a folder, starts `examples/app.py` on localhost, opens it in headless Chromium (Debian's
`chromium` package: `apt-get install chromium`) and drives it over the DevTools protocol through a websocket
(aiohttp, which gradio already installs): types the prompt, presses Send, waits for the answer and saves a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import torch

from modeling_llada_moe.apps.inference import END_OF_TURN, encode_prompt
from modeling_llada_moe.apps.tiny_task import (
    LING_CHAT_TEMPLATE,
    save_tiny_folder,
    tiny_model,
    tiny_tokenizer,
    train_to_answer,
)


ROOT = Path(__file__).resolve().parents[1]



DIGITS, CANVAS, BLOCK = 5, 16, 8


def chat_reversal_batch(tokenizer, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[size, P] chat prompts holding DIGITS random digit tokens, and [size, CANVAS] answers: the digits reversed,
    the end of turn, then pad."""
    template = encode_prompt(tokenizer, " ".join(["t1"] * DIGITS))[0]
    first = template.tolist().index(1)  # where the user's digits sit in the templated prompt
    digits = torch.randint(1, 11, (size, DIGITS), generator=generator)
    prompts = template.repeat(size, 1)
    prompts[:, first : first + DIGITS] = digits
    answers = torch.full((size, CANVAS), tokenizer.pad_token_id)
    answers[:, :DIGITS] = digits.flip(1)
    answers[:, DIGITS] = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return prompts, answers


def train_chat_reversal(steps: int, seed: int = 0):
    """A tiny model trained with `train_to_answer` on `chat_reversal_batch`; about a minute on 2 CPU cores for 800
    steps, then exact on held-out prompts."""
    tokenizer = tiny_tokenizer(LING_CHAT_TEMPLATE)
    model = train_to_answer(
        tiny_model(seed), lambda generator: chat_reversal_batch(tokenizer, 64, generator), steps, seed
    )
    prompts, answers = chat_reversal_batch(tokenizer, 32, torch.Generator().manual_seed(seed + 1))
    out = model.diffusion_generate(prompts, max_new_tokens=CANVAS, block_length=BLOCK)
    exact = (out[:, prompts.shape[1] :] == answers).all(dim=1).float().mean().item()
    print(f"trained {steps} steps; exact match on 32 held-out prompts: {exact:.2f}")
    return model


def wait_for_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[1]} exited with code {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered at {url} within {timeout:.0f} s")


class DevTools:
    """The few Chrome DevTools protocol calls the screenshot needs, over one page websocket."""

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse):
        self.websocket, self.next_id = websocket, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.websocket.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.websocket.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_until(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not show {what} within {timeout:.0f} s")
            await asyncio.sleep(0.25)


async def drive_page(debug_port: int, url: str, prompt: str, out: Path, width: int, height: int, timeout: float):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{debug_port}/json/list") as response:
            pages = [target for target in await response.json() if target["type"] == "page"]
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as websocket:
            page = DevTools(websocket)
            await page.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            await page.call("Page.navigate", url=url)
            await page.wait_until("!!document.querySelector('textarea')", timeout, "the message box")
            await page.evaluate("document.querySelector('textarea').focus()")
            await page.call("Input.insertText", text=prompt)
            await page.evaluate(
                "[...document.querySelectorAll('button')].find(b => b.innerText.trim() == 'Send').click()"
            )
            await page.wait_until("document.body.innerText.includes('done:')", timeout, "a finished answer")
            await asyncio.sleep(1.0)  # let the last update paint
            shot = await page.call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder with a chat-template tokenizer (default: train a tiny one)")
    parser.add_argument("--random", action="store_true", help="use a tiny random model instead of training one")
    parser.add_argument("--train-steps", type=int, default=800, help="training steps of the tiny chat model")
    parser.add_argument("--prompt", default="t3 t1 t4 t1 t5", help="the message to send")
    parser.add_argument(
        "--app-args",
        default="--max-new-tokens 16 --block-length 8",
        help="extra flags for examples/app.py (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "app_screenshot.png")
    parser.add_argument("--port", type=int, default=7861, help="port for the demo (default 7861)")
    parser.add_argument("--size", default="1280x900", help="browser viewport WIDTHxHEIGHT (default 1280x900)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="Chromium binary")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the app and the answer")
    args = parser.parse_args(argv)
    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1280x900")
    if shutil.which(args.chromium) is None:
        parser.error(f"--chromium {args.chromium!r} not found; install Debian's `chromium` package")

    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and loses a lot on a busy machine
    work = Path(tempfile.mkdtemp(prefix="llada_moe_screenshot_"))
    if args.model is None:
        model = None if args.random else train_chat_reversal(args.train_steps)
        args.model = str(save_tiny_folder(work / "model", model=model))
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "examples" / "app.py"), "--model", args.model, "--port", str(args.port)]
    app = subprocess.Popen([*command, *args.app_args.split()], env=env)
    browser = None
    try:
        url = f"http://127.0.0.1:{args.port}/"
        wait_for_http(url, app, args.timeout)
        profile = work / "chromium"
        browser = subprocess.Popen(
            [
                args.chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--no-first-run",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"  # Chromium writes the debugging port it picked here
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or browser.poll() is not None:
                raise RuntimeError(f"{args.chromium} did not start its DevTools endpoint")
            time.sleep(0.2)
        debug_port = int(port_file.read_text().split()[0])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(drive_page(debug_port, url, args.prompt, args.out, width, height, args.timeout))
        print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    finally:
        for process in (browser, app):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
