"""The `llada-moe` command line: `generate`, `chat`, `serve`, `convert` and `bench`.

    llada-moe generate "Why is the sky blue?" --threshold 0.9 --cache dual
    llada-moe chat --bits 4
    llada-moe serve inclusionAI/LLaDA-MoE-7B-A1B-Instruct --port 8000 --max-batch-size 16
    llada-moe convert path/to/official-checkpoint out/llada-moe-nf4 --bits 4 --push-to-hub you/LLaDA-MoE-nf4
    llada-moe convert path/to/official-checkpoint out/llada-moe-int4 --bits 4 --quant-method int4
    llada-moe bench generation -- --repeats 3

Exit codes: 0 success, 2 bad input (flags, paths, generation settings; printed as `error: ...`), 1 a failure while
running (the Hub unreachable, a converted folder that does not reload identically).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import math
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModel, PreTrainedTokenizerBase, TextStreamer

from .. import DiffusionGenerationConfig
from ..atomic_save import everything_else, staged_save
from ..configuration_llada_moe import LLaDAMoEConfig
from ..modeling_llada_moe import LLaDAMoEForMaskedLM
from .hub import hub_token, login_help, push_folder
from .inference import (
    DTYPES,
    END_OF_TURN,
    QUANT_METHODS,
    check_chat_template,
    check_messages,
    check_model_folder,
    check_model_source,
    decode_completion,
    encode_prompt,
    end_of_turn_ids,
    has_tokenizer_files,
    is_local_folder,
    load_checked_model,
    load_model_and_tokenizer,
)
from .inference import load_tokenizer as load_tokenizer_folder
from .settings import CACHE_CHOICES, DECODING_PRESETS, REMASKING_STRATEGIES, SettingError, decoding_config


DEFAULT_MODEL = "inclusionAI/LLaDA-MoE-7B-A1B-Instruct"
BENCHMARKS = {
    "generation": "decoding modes of diffusion_generate: NFE, tokens/forward, tokens/s (tiny trained model on CPU)",
    "forward": "one forward per experts implementation: latency and peak memory (7B-shaped layer)",
    "moe": "the MoE block alone per experts backend, bf16 and NF4, against the memory-bandwidth bound (GPU)",
    "serve": "llada-moe serve: requests/s and p50/p95 latency, batched vs --max-batch-size 1 (tiny model on CPU)",
}
# The destinations of the decoding flags: the user-facing settings `settings.decoding_config` takes, by their names.
DECODING_FLAGS = (
    "preset", "max_new_tokens", "steps", "block_length", "temperature", "top_k", "top_p", "cfg_scale", "remasking",
    "threshold", "factor", "cache", "stop_at_eos",
)


# ----------------------------------------------------------------------------------------------------------------
# Argument types: a bad value is an argparse error (exit 2) that names it and says what is accepted.
# ----------------------------------------------------------------------------------------------------------------


def _number(text: str, kind: type, accepted: str, ok) -> Any:
    """`text` as `kind`; not a number, a non-finite float (`inf`, `nan`) or a value `ok` refuses is an argparse error
    (exit 2) naming the flag."""
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        value = None
    if kind is float and value is not None and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; expected {accepted}")
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda v: v > 0)


def unit_interval(text: str) -> float:
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def batch_window(text: str) -> float:
    """`--batch-window-ms`: a number >= 0, at most a minute (60000)."""
    value = non_negative_float(text)
    if value > 60_000:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 60000 (a minute); expected a number of milliseconds "
                                          "in [0, 60000]")
    return value


def port_number(text: str) -> int:
    return _number(text, int, "a port number in 1..65535", lambda v: 0 < v < 65536)


def seed_value(text: str) -> int:
    return _number(text, int, "an integer in [0, 2**64)", lambda v: 0 <= v < 2**64)


def token_id(text: str) -> int:
    return _number(text, int, "a token id (an integer >= 0)", lambda v: v >= 0)


def shard_size(text: str) -> str | int:
    """`--max-shard-size`: a size such as 5GB, 500MB or a byte count."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text if not text.isdigit() else int(text))
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or a positive byte count")
    return int(text) if text.isdigit() else text


# ----------------------------------------------------------------------------------------------------------------
# Decoding flags -> DiffusionGenerationConfig (shared by generate and chat)
# ----------------------------------------------------------------------------------------------------------------


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that mirror `DiffusionGenerationConfig`; a flag left out keeps the model's generation_config.json."""
    group = parser.add_argument_group("decoding (flags left out keep the model's generation_config.json)")
    group.add_argument(
        "--preset",
        choices=tuple(DECODING_PRESETS),
        help="named decoding settings (DiffusionGenerationConfig.from_preset): llada = the reference sampler, "
        "fast_dllm = threshold 0.9 + dual cache, dinfer = dInfer's LLaDA-MoE settings, dinfer_smooth = those with "
        "its iteration smoothing; other flags override it",
    )
    group.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="answer canvas length (default 128)")
    group.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="denoising steps in all, split over the blocks by length (default: max-new-tokens, one token per step)",
    )
    group.add_argument(
        "--block-length",
        type=positive_int,
        metavar="N",
        help="semi-autoregressive block size; a remainder makes a shorter last block (default 32)",
    )
    group.add_argument("--temperature", type=non_negative_float, metavar="T", help="0 = greedy (default)")
    group.add_argument("--top-k", type=positive_int, metavar="K", help="sampling filter (needs --temperature > 0)")
    group.add_argument("--top-p", type=unit_interval, metavar="P", help="nucleus filter (needs --temperature > 0)")
    group.add_argument("--cfg-scale", type=non_negative_float, metavar="S", help="classifier-free guidance (0 = off)")
    group.add_argument("--remasking", choices=REMASKING_STRATEGIES, help="how masked positions are ranked")
    group.add_argument(
        "--threshold",
        type=unit_interval,
        metavar="C",
        help="Fast-dLLM parallel decoding: commit every token with confidence >= C (the best always); e.g. 0.9",
    )
    group.add_argument(
        "--factor", type=positive_float, metavar="F", help="Fast-dLLM factor rule (exclusive with --threshold)"
    )
    group.add_argument(
        "--cache",
        "--use-cache",  # the old name of the flag
        dest="cache",
        choices=CACHE_CHOICES,
        help="approximate KV cache refreshed at each block start (cache_implementation; default none, exact)",
    )
    group.add_argument(
        "--stop-at-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop once a finished block holds an EOS; the answer ends there anyway (default: on)",
    )
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        dest="stop_strings",
        metavar="TEXT",
        help=f"stop string (repeatable); {END_OF_TURN} is added when the vocabulary has it",
    )
    group.add_argument(
        "--seed", type=seed_value, help="seed of the sampling generator (--temperature > 0, random remasking)"
    )


def decoding_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the parsed decoding flags give (`--preset` included; flags left out are not in the dict)."""
    return {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name, None) is not None}


def flags_config(
    base: LLaDAMoEForMaskedLM | DiffusionGenerationConfig, fields: dict[str, Any]
) -> DiffusionGenerationConfig:
    """`settings.decoding_config` over `base` (a model: its generation config); a `ValueError` names the flag (e.g.
    `--steps=1 is invalid; expected a positive integer, at least the number of blocks (2) ...`)."""
    try:
        return decoding_config(base, **fields)
    except SettingError as err:
        flag = "--stop" if err.field == "stop_strings" else "--" + err.field.replace("_", "-")
        raise ValueError(f"decoding flags: {flag}={err.value!r} is invalid; {err.accepted}") from err


def generation_config(
    model: LLaDAMoEForMaskedLM, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> DiffusionGenerationConfig:
    """The model's generation config with the flags applied and `<|role_end|>` as a stop string, validated.

    Raises `ValueError` naming the flag (e.g. `--steps=1 ... at least the number of blocks (2)`)."""
    stops = args.stop_strings or model.generation_config.stop_strings or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    if END_OF_TURN in tokenizer.get_vocab() and END_OF_TURN not in stops:
        stops.append(END_OF_TURN)
    return flags_config(model, {**decoding_fields(args), "stop_strings": stops or None})


def sampling_generator(args: argparse.Namespace, model: LLaDAMoEForMaskedLM) -> torch.Generator | None:
    """A seeded generator on the model's device with `--seed`, else None (fresh randomness)."""
    if args.seed is None:
        return None
    return torch.Generator(device=model.device).manual_seed(args.seed)


class AnswerStreamer(TextStreamer):
    """Prints the answer as `diffusion_generate` finalises each block, up to the first end-of-turn id (EOS or
    `<|role_end|>`), so the streamed text is the text `decode_completion` returns."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_ids = set(end_of_turn_ids(tokenizer))
        self.stopped = False
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            super().put(value)
            return
        if self.stopped:
            return
        ids = value.reshape(-1).tolist()
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                ids, self.stopped = ids[:i], True
                break
        if ids:
            super().put(torch.tensor(ids))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:  # the non-streamed answer is stripped: drop leading whitespace here too
            text = text.lstrip()
            self.started = bool(text)
        super().on_finalized_text(text, stream_end)


# ----------------------------------------------------------------------------------------------------------------
# generate / chat
# ----------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    group = parser.add_argument_group("model")
    if positional:
        group.add_argument("model", help="local folder (official layout or saved by llada-moe) or Hub repo id")
    else:
        group.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"local folder (official layout or saved by llada-moe) or Hub repo id (default {DEFAULT_MODEL})",
        )
    group.add_argument("--tokenizer", help="tokenizer folder or repo id (default: the model's)")
    group.add_argument(
        "--bits", type=int, choices=(4, 8), help="load quantized: 4 (NF4, or int4 with --quant-method) or 8 (LLM.int8)"
    )
    add_quant_method_argument(group)
    group.add_argument(
        "--dtype",
        default="auto",
        choices=sorted(DTYPES),
        help="weights dtype (compute dtype with --bits); auto = the checkpoint's",
    )
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own code, if it has any")


def add_quant_method_argument(group) -> None:
    group.add_argument(
        "--quant-method",
        choices=tuple(QUANT_METHODS),
        help="with --bits 4, the kernels: " + "; ".join(f"{name} = {what}" for name, what in QUANT_METHODS.items()),
    )


def check_quantization_flags(args: argparse.Namespace) -> None:
    """--quant-method picks the 4-bit kernels: it needs --bits 4, and int4 runs on the CPU only."""
    method = getattr(args, "quant_method", None)
    if method is None:
        return
    if args.bits != 4:
        bits = "no --bits (no quantization)" if args.bits is None else f"--bits {args.bits}"
        raise ValueError(
            f"--quant-method {method} applies with --bits 4 only, not with {bits}; accepted: --bits 4 --quant-method "
            f"{{{','.join(QUANT_METHODS)}}}, or --bits 8 (LLM.int8) without --quant-method"
        )
    device = getattr(args, "device", None)
    if method == "int4" and device is not None and device != "cpu":
        raise ValueError(
            f"--device {device}: --quant-method int4 runs on the CPU only; use --device cpu or leave --device out"
        )


def load(args: argparse.Namespace) -> tuple[LLaDAMoEForMaskedLM, PreTrainedTokenizerBase]:
    return load_model_and_tokenizer(
        args.model,
        bits=args.bits,
        quant_method=args.quant_method,
        dtype=args.dtype,
        device=args.device,
        tokenizer_name_or_path=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
    )


def read_messages(value: str) -> list[dict[str, str]]:
    """`--messages`: a JSON file, or a JSON string, holding a list of {"role", "content"} turns."""
    path = Path(value).expanduser()
    text = path.read_text() if path.is_file() else value
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as err:
        if not value.lstrip().startswith(("[", "{")):
            raise ValueError(f"--messages {value!r}: no such file, and not a JSON list of chat turns") from err
        raise ValueError(f"--messages: invalid JSON ({err}); expected a list of {{'role', 'content'}} turns") from err
    try:
        check_messages(messages)
    except ValueError as err:
        raise ValueError(f"--messages: {err}") from err
    return messages


def read_prompt(args: argparse.Namespace) -> tuple[str | None, list[dict[str, str]] | None]:
    """(prompt, messages) from the positional prompt, `--prompt`, `--messages` or piped stdin; one of them."""
    given = [name for name, value in (("PROMPT", args.prompt), ("--prompt", args.prompt_option)) if value is not None]
    if args.messages is not None:
        given.append("--messages")
    if len(given) > 1:
        raise ValueError(f"give the prompt once: got {' and '.join(given)}")
    if args.messages is not None:
        if args.no_chat_template:
            raise ValueError("--messages are chat turns and need the chat template; drop --no-chat-template")
        return None, read_messages(args.messages)
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: pass PROMPT, --prompt TEXT, --messages JSON, or pipe the prompt on stdin")
        prompt = sys.stdin.read().strip()
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if args.system is not None and args.no_chat_template:
        raise ValueError("--system needs the chat template; drop --no-chat-template")
    return prompt, None


def require_chat_template(tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, what: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{what} needs a tokenizer with a chat template, and the tokenizer of {args.tokenizer or args.model!r} "
            "has none (a base model?); use `llada-moe generate --no-chat-template TEXT` for plain completion"
        )


def run_generate(args: argparse.Namespace) -> int:
    prompt, messages = read_prompt(args)
    model, tokenizer = load(args)
    if messages is not None:
        require_chat_template(tokenizer, args, "--messages")
    elif args.system is not None:
        require_chat_template(tokenizer, args, "--system")
    config = generation_config(model, tokenizer, args)
    chat_template = False if args.no_chat_template else None
    input_ids = encode_prompt(tokenizer, prompt, messages, system=args.system, chat_template=chat_template)
    streamer = None if args.no_stream or args.json else AnswerStreamer(tokenizer)
    start = time.perf_counter()
    out = model.diffusion_generate(
        input_ids.to(model.device),
        generation_config=config,
        streamer=streamer,
        generator=sampling_generator(args, model),
        tokenizer=tokenizer,
        return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - start
    text = decode_completion(tokenizer, out.sequences[0, input_ids.shape[1] :])
    if args.json:
        result = {
            "text": text,
            "nfe": int(out.nfe[0]),
            "tokens_per_forward": round(float(out.tokens_per_forward[0]), 4),
            "seconds": round(seconds, 4),
            "prompt_tokens": int(input_ids.shape[1]),
            "generated_tokens": int((out.unmask_step[0] >= 0).sum()),
        }
        print(json.dumps(result, ensure_ascii=False))
    elif streamer is None:
        print(text)
    return 0


CHAT_HELP = "/reset clears the conversation, /system TEXT sets the system prompt (/system alone drops it), /exit quits"


def run_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    require_chat_template(tokenizer, args, "chat")
    check_chat_template(tokenizer)  # a broken template: exit 2 now, not a traceback at the first turn
    config = generation_config(model, tokenizer, args)
    generator = sampling_generator(args, model)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"LLaDA-MoE chat ({args.model}). {CHAT_HELP}; Ctrl-D also quits.", file=sys.stderr)
    system, messages = args.system, []
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/system":
            system = rest.strip() or None
            print(f"(system prompt {'set' if system else 'removed'})", file=sys.stderr)
            continue
        if command.startswith("/") and command[1:].isalpha():
            print(f"unknown command {command!r}: {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        streamer = None if args.no_stream else AnswerStreamer(tokenizer)
        try:
            # The template may refuse this conversation only (a system turn it does not take): say so, keep chatting.
            input_ids = encode_prompt(tokenizer, messages=messages, system=system)
            out = model.diffusion_generate(
                input_ids.to(model.device),
                generation_config=config,
                streamer=streamer,
                generator=generator,
                tokenizer=tokenizer,
            )
        except ValueError as err:  # e.g. the conversation outgrew max_position_embeddings
            messages.pop()
            print(f"error: {err} (/reset starts a new conversation)", file=sys.stderr)
            continue
        answer = decode_completion(tokenizer, out[0, input_ids.shape[1] :])
        if streamer is None:
            print(answer)
        messages.append({"role": "assistant", "content": answer})
    return 0


# ----------------------------------------------------------------------------------------------------------------
# serve
# ----------------------------------------------------------------------------------------------------------------


# The flag of each `ServeOptions` field (and of the decoding defaults' max_new_tokens) a `ServeOptionError` names.
SERVE_FLAGS = {
    "model_name": "--served-model-name", "stop": "--stop", "seed": "--seed", "max_batch_size": "--max-batch-size",
    "batch_window_ms": "--batch-window-ms", "max_queue": "--max-queue", "api_key": "--api-key",
    "max_new_tokens": "--max-new-tokens", "defaults": "the decoding flags",
}


def serve_option_error(err: ValueError, args: argparse.Namespace) -> ValueError:
    """A `ServeOptionError` worded with the flag it names (a value from the model's generation_config.json says so)."""
    flag = SERVE_FLAGS.get(err.option, err.option)
    if err.option == "max_new_tokens" and args.max_new_tokens is None:
        return ValueError(f"the model's generation_config.json has max_new_tokens={err.value}, too long to serve: "
                          f"pass --max-new-tokens, expected {err.accepted}")
    value = "<hidden>" if err.option == "api_key" else repr(err.value)
    return ValueError(f"{flag}={value} is invalid; expected {err.accepted}")


def listening_socket(host: str, port: int):
    """A socket bound to `host`:`port`, made before the model loads so that an address that cannot be used is an
    error naming the flag (exit 2) at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"--host={host!r} is invalid; expected an address or a name of this machine ({err})") from err
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        flag, value = ("--port", port) if err.errno in (errno.EADDRINUSE, errno.EACCES) else ("--host", host)
        raise ValueError(f"{flag}={value!r} is invalid: cannot listen on {host}:{port} ({err.strerror})") from err
    return sock


def run_serve(args: argparse.Namespace) -> int:
    check_model_source(args.model)
    try:
        import uvicorn

        from .serve import ServeOptionError, ServeOptions, create_app
    except ImportError as err:
        raise ImportError(f"`llada-moe serve` needs the serve extra: pip install 'llada-moe[serve]' ({err})") from err
    try:  # the settings that need no model first: a bad one fails before the (long) load
        options = ServeOptions(
            model_name=args.served_model_name or args.model,
            stop=tuple(args.stop_strings),
            seed=args.seed,
            max_batch_size=args.max_batch_size,
            batch_window_ms=args.batch_window_ms,
            max_queue=args.max_queue,
            api_key=args.api_key,
        )
    except ServeOptionError as err:
        raise serve_option_error(err, args) from err
    sock = listening_socket(args.host, args.port)
    try:
        model, tokenizer = load(args)
        check_chat_template(tokenizer)  # a template that cannot render a conversation: exit 2 before serving
        options.defaults = flags_config(model, decoding_fields(args))  # --preset, then the flags
        try:
            app = create_app(model, tokenizer, options)
        except ServeOptionError as err:
            raise serve_option_error(err, args) from err
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
        failures = []

        def stop(reason: str) -> None:  # the decoding worker died: shut down, exit 1
            failures.append(reason)
            server.should_exit = True

        app.state.server.scheduler.on_failure.append(stop)
        # uvicorn handles SIGINT / SIGTERM: no new connections, in-flight requests finish, then the batcher stops.
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        print(f"error: the decoding worker stopped ({failures[0]}); the server shut down", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(args: argparse.Namespace, config: LLaDAMoEConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `--tokenizer` (default: the source), or None with a warning when the source has none (a
    local source without tokenizer files, or a Hub repo without one). A tokenizer that is there but does not load
    (a corrupt file) is a `ValueError` naming the folder or file: converting without it would lose it silently."""
    source = args.tokenizer or args.source
    local_without_tokenizer = is_local_folder(source) and not has_tokenizer_files(source)
    try:
        if args.tokenizer is None and local_without_tokenizer:
            raise OSError(f"{source!r} holds no tokenizer files")
        # `config=`: AutoTokenizer would otherwise read the official config.json, which names remote code.
        return load_tokenizer_folder(source, config=config, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        if args.tokenizer is not None:
            raise ValueError(f"--tokenizer {args.tokenizer!r}: could not load a tokenizer ({err})") from err
        if is_local_folder(source) and not local_without_tokenizer:
            raise ValueError(f"the source's tokenizer does not load: {err}; fix it or pass --tokenizer PATH") from err
        print(
            f"warning: no tokenizer found in {source!r}; the folder holds the model only (pass --tokenizer PATH)",
            file=sys.stderr,
        )
        return None


def verify_input(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))


class VerificationError(RuntimeError):
    """The converted folder does not reload as the source model (non-finite or different logits)."""


def remove_if_new(destination: Path, existed: bool) -> None:
    """After a failed convert: remove the destination folder if this run created it (it is empty then)."""
    if not existed:
        with contextlib.suppress(OSError):
            destination.rmdir()


def verify_folder(destination: Path, quantized: bool, expected: torch.Tensor | None, input_ids: torch.Tensor) -> str:
    """Reload the converted folder with `AutoModel.from_pretrained(trust_remote_code=True)` and run a forward;
    returns a one-line report, raises `VerificationError` when the logits differ from the source model's."""
    kwargs = {"device_map": "cpu"} if quantized else {}
    model = AutoModel.from_pretrained(destination, trust_remote_code=True, dtype="auto", **kwargs).eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    if not torch.isfinite(logits).all():
        raise VerificationError("the reloaded model gives non-finite logits")
    if expected is None:
        return "reloaded with AutoModel.from_pretrained(trust_remote_code=True): forward OK"
    if not torch.equal(logits, expected):
        difference = (logits.float() - expected.float()).abs().max().item()
        raise VerificationError(f"reloaded logits differ from the source model's (max |diff| {difference})")
    return "reloaded with AutoModel.from_pretrained(trust_remote_code=True): logits identical to the source model"


def check_destination(args: argparse.Namespace) -> Path:
    """The destination folder, refused when it is the source or holds files (unless --overwrite). `--overwrite`
    replaces the folder as a whole, so it must be a model folder (a `config.json`) and hold neither the source nor
    the `--tokenizer` folder."""
    destination = Path(args.destination).expanduser()
    if Path(args.source).expanduser().resolve() == destination.resolve():
        raise ValueError(f"destination {str(destination)!r} is the source folder; choose a new folder")
    if destination.is_file() or (destination.is_dir() and any(destination.iterdir()) and not args.overwrite):
        raise ValueError(f"destination {str(destination)!r} is not an empty folder; choose a new one or --overwrite")
    if destination.is_dir() and any(destination.iterdir()):
        if not (destination / "config.json").is_file():
            raise ValueError(
                f"--overwrite replaces the destination as a whole, and {str(destination)!r} holds files but no "
                "config.json: it is not a model folder; choose a new or empty folder"
            )
        for flag, source in (("the source", args.source), ("--tokenizer", args.tokenizer)):
            path = Path(source).expanduser().resolve() if source is not None else None
            if path is not None and path.exists() and destination.resolve() in path.parents:
                raise ValueError(
                    f"{flag} {source!r} lies inside the destination {str(destination)!r}, which --overwrite "
                    "replaces as a whole; choose another destination"
                )
    return destination


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"--push-to-hub {repo_id!r}: {err} Expected owner/name.") from err
    if hub_token() is None:
        print("note: no Hugging Face token found; the folder will be saved but not pushed", file=sys.stderr)


def special_ids(*configs) -> dict[str, int]:
    """{"pad_token_id": id, "eos_token_id": id, ...} of the pad and EOS ids the configs set (EOS may be a list)."""
    ids = {}
    for config in configs:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            for one in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(one, int) and not isinstance(one, bool):
                    ids.setdefault(f"{name}={one}", one)
    return ids


def check_mask_token_id(mask_token_id: int | None, vocab_size: int, flagged: bool, *configs) -> None:
    """The mask id must be in the vocabulary and differ from the pad and EOS ids (it would be written into answers
    and never be committed)."""
    where = "--mask-token-id" if flagged else "mask_token_id"
    if mask_token_id is None or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"{where}={mask_token_id} is not in the vocabulary [0, {vocab_size}); pass "
            "--mask-token-id ID (the official config.json has no mask id; the 7B's <|mask|> is 156895)"
        )
    for name, value in special_ids(*configs).items():
        if value == mask_token_id:
            raise ValueError(
                f"{where}={mask_token_id} equals {name.split('=')[0]}; the mask id must differ from the pad and EOS ids"
            )


def run_convert(args: argparse.Namespace) -> int:
    check_model_source(args.source)
    destination = check_destination(args)
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    if is_local_folder(args.source):
        check_model_folder(args.source)
    overrides = {} if args.mask_token_id is None else {"mask_token_id": args.mask_token_id}
    config = LLaDAMoEConfig.from_pretrained(args.source, **overrides)
    source_generation = DiffusionGenerationConfig.from_model_config(config)
    if is_local_folder(args.source) and (Path(args.source).expanduser() / "generation_config.json").is_file():
        source_generation = DiffusionGenerationConfig.from_pretrained(args.source)
    check_mask_token_id(
        config.mask_token_id, config.vocab_size, args.mask_token_id is not None, config, source_generation
    )
    tokenizer = load_tokenizer(args, config)

    if tokenizer is not None:
        check_chat_template(tokenizer)  # the folder would carry a template that cannot render a conversation

    input_ids, expected = verify_input(config.vocab_size), None
    # Missing or unexpected weights (a config.json edited to add or remove a layer) are an error, not a warning.
    model = load_checked_model(
        args.source, bits=args.bits, dtype=args.dtype, device_map="cpu", quant_method=args.quant_method, **overrides
    )
    # Unquantized and int4 folders reload bit-exactly: their logits are compared with the source model's.
    if (args.bits is None or args.quant_method == "int4") and not args.no_verify:
        with torch.no_grad():
            expected = model(input_ids).logits
    if args.mask_token_id is not None or model.generation_config.mask_token_id is None:
        # --mask-token-id goes into generation_config.json too: generation reads the mask id from there first.
        model.generation_config.mask_token_id = model.config.mask_token_id

    # The whole folder is staged and verified, then replaces the destination as a whole (every earlier file goes:
    # an old tokenizer, chat template or card would not fit the new weights); a failure anywhere before that, the
    # verification included, leaves the destination exactly as it was (absent, if it was).
    existed, report = destination.exists(), None
    try:
        with staged_save(destination, everything_else) as staging:
            model.save_pretrained(staging, **({"max_shard_size": args.max_shard_size} if args.max_shard_size else {}))
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            del model  # before the reload: a 7B should not be in memory twice
            gc.collect()
            files = ", ".join(sorted(path.name for path in staging.iterdir()))
            if not args.no_verify:
                report = verify_folder(staging, args.bits is not None, expected, input_ids)
    except VerificationError as err:
        remove_if_new(destination, existed)
        print(f"error: {destination}: {err}; the destination was left as it was", file=sys.stderr)
        return 1
    except (OSError, SafetensorError) as err:  # a full disk, a file too large, no permission
        remove_if_new(destination, existed)
        raise OSError(
            f"could not write {str(destination)!r} ({type(err).__name__}: {err}); the destination was left as it was"
        ) from err
    except BaseException:
        remove_if_new(destination, existed)
        raise
    print(f"saved {destination} ({'with' if tokenizer is not None else 'without'} tokenizer): {files}")
    if report is not None:
        print(report)
    if args.push_to_hub is not None:
        if hub_token() is None:
            print(login_help(destination, args.push_to_hub, args.private))
        else:
            print(f"pushed to {push_folder(destination, args.push_to_hub, args.private)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------------


def find_benchmarks(package_root: Path | None = None) -> Path:
    """The repository root holding `benchmarks/` (beside this package in an editable install, or the current
    folder); `FileNotFoundError` explains what to do when the package was installed without it."""
    package_root = package_root or Path(__file__).resolve().parents[2]
    for root in (package_root, Path.cwd()):
        if all((root / "benchmarks" / f"{name}.py").is_file() for name in BENCHMARKS):
            return root
    raise FileNotFoundError(
        f"the benchmarks are not installed with the package (no benchmarks/ beside {package_root} or in "
        f"{Path.cwd()}); clone the llada-moe repository, `pip install -e .` in it, and run `llada-moe bench` there"
    )


def run_bench(args: argparse.Namespace) -> int:
    root = find_benchmarks()
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    saved_argv = sys.argv
    sys.argv = [f"llada-moe bench {args.name}", *extra]
    try:  # each benchmark is a script that imports only installed packages
        runpy.run_path(str(root / "benchmarks" / f"{args.name}.py"), run_name="__main__")  # argparse prog: argv[0]
    except SystemExit as exit:  # the benchmark's own argparse (--help, a bad flag)
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `llada-moe` argument parser with its five subcommands."""
    parser = argparse.ArgumentParser(
        prog="llada-moe",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    generate = commands.add_parser(
        "generate",
        help="answer one prompt (streamed block by block)",
        formatter_class=raw,
        description="Answer one prompt with diffusion_generate, printing each block as soon as it is final.",
        epilog=(
            "examples:\n"
            '  llada-moe generate "Explain diffusion language models." --threshold 0.9 --cache dual\n'
            "  llada-moe generate --messages chat.json --bits 4 --json\n"
            '  echo "t1 t2" | llada-moe generate --model ./tiny --no-chat-template'
        ),
    )
    generate.add_argument("prompt", nargs="?", help="the prompt (or --prompt, --messages, or piped on stdin)")
    generate.add_argument("--prompt", dest="prompt_option", metavar="TEXT", help="the prompt, as an option")
    generate.add_argument(
        "--messages", metavar="JSON", help='chat turns: a JSON file or string, [{"role": "user", "content": "..."}]'
    )
    generate.add_argument("--system", metavar="TEXT", help="system prompt (chat template only)")
    generate.add_argument(
        "--no-chat-template", action="store_true", help="tokenize the prompt as it is (base models, completion)"
    )
    generate.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object: text, nfe, tokens_per_forward, seconds, ..."
    )
    add_model_arguments(generate)
    add_decoding_arguments(generate)
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser(
        "chat",
        help="multi-turn chat on stdin",
        formatter_class=raw,
        description="Chat with the model's chat template, keeping the conversation. One line is one turn; lines\n"
        "are read from stdin, so a conversation can be piped in. Commands:\n"
        "  /reset         clear the conversation\n"
        "  /system TEXT   set the system prompt (/system alone drops it)\n"
        "  /exit          quit (so does EOF, Ctrl-D)",
        epilog='example:\n  printf "Hi!\\nAnd in French?\\n" | llada-moe chat --threshold 0.9 --cache dual',
    )
    chat.add_argument("--system", metavar="TEXT", help="system prompt (change it with /system TEXT)")
    chat.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")
    add_model_arguments(chat)
    add_decoding_arguments(chat)
    chat.set_defaults(run=run_chat)

    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server that batches concurrent requests",
        formatter_class=raw,
        description="Serve the model over an OpenAI-compatible HTTP API (FastAPI + uvicorn):\n"
        "  POST /v1/chat/completions, POST /v1/completions (stream: true = one SSE delta per finished block),\n"
        "  GET /v1/models, GET /health, GET /metrics (Prometheus).\n"
        "Requests with equal decoding settings that arrive within the batch window, or while a batch runs, are\n"
        "decoded as one left-padded batch; each answer is the one the request gets alone. The decoding flags set\n"
        "the defaults; a request overrides them with its own fields (max_tokens, temperature, top_p, stop, seed, n)\n"
        "and the extra fields steps, block_length, threshold, factor, cache, remasking, cfg_scale, top_k, preset.\n"
        "Needs the serve extra: pip install 'llada-moe[serve]'.",
        epilog=(
            "examples:\n"
            "  llada-moe serve inclusionAI/LLaDA-MoE-7B-A1B-Instruct --threshold 0.9 --cache dual\n"
            "  llada-moe serve ./llada-moe-nf4 --bits 4 --host 0.0.0.0 --api-key $KEY --max-batch-size 32"
        ),
    )
    add_model_arguments(serve, positional=True)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    group.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    group.add_argument("--served-model-name", metavar="NAME", help="the `model` id clients send (default: MODEL)")
    group.add_argument(
        "--max-batch-size", type=positive_int, default=8, metavar="N", help="rows decoded together at most (default 8)"
    )
    group.add_argument(
        "--batch-window-ms",
        type=batch_window,
        default=5.0,
        metavar="MS",
        help="how long a request waits for others to batch with, at most 60000 (default 5; requests queued while "
        "a batch runs join the next one anyway)",
    )
    group.add_argument(
        "--max-queue", type=positive_int, default=256, metavar="N", help="rows waiting at most; more get 503 (256)"
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("LLADA_MOE_API_KEY"),
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on /v1/* (default: $LLADA_MOE_API_KEY; none = open)",
    )
    group.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's"
    )
    add_decoding_arguments(serve)
    serve.set_defaults(run=run_serve)

    convert = commands.add_parser(
        "convert",
        help="official checkpoint -> Hub folder of this package (optionally quantized, pushed)",
        formatter_class=raw,
        description="Convert a LLaDA-MoE checkpoint (the official layout, or a folder of this package) into a folder\n"
        "that loads with AutoModel.from_pretrained(folder, trust_remote_code=True) without this package:\n"
        "weights, config with auto_map, the model code, a model card and the tokenizer. With --bits the\n"
        "weights are quantized first (bitsandbytes, or torch's CPU int4 with --quant-method int4). The folder\n"
        "is then reloaded with trust_remote_code and checked (--no-verify skips that); --push-to-hub uploads it.",
        epilog=(
            "examples:\n"
            "  llada-moe convert inclusionAI/LLaDA-MoE-7B-A1B-Instruct out/llada-moe-instruct\n"
            "  llada-moe convert ./official out/nf4 --bits 4 --push-to-hub you/LLaDA-MoE-7B-A1B-Instruct-nf4\n"
            "  llada-moe convert ./official out/int4 --bits 4 --quant-method int4"
        ),
    )
    convert.add_argument("source", help="official checkpoint folder or Hub repo id")
    convert.add_argument("destination", help="new folder to write")
    convert.add_argument(
        "--bits", type=int, choices=(4, 8), help="quantize: 4 (NF4, or int4 with --quant-method) or 8 (LLM.int8)"
    )
    add_quant_method_argument(convert)
    convert.add_argument(
        "--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (compute dtype with --bits)"
    )
    convert.add_argument(
        "--mask-token-id",
        type=token_id,
        metavar="ID",
        help="mask token id to record (the official config.json has none; the 7B default 156895 applies)",
    )
    convert.add_argument("--tokenizer", help="tokenizer to copy (default: the source's)")
    convert.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own code")
    convert.add_argument("--max-shard-size", type=shard_size, metavar="SIZE", help="e.g. 5GB (default: transformers')")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty destination (an earlier model folder) as a whole, once the new one is complete",
    )
    convert.add_argument("--no-verify", action="store_true", help="skip the trust_remote_code reload check")
    convert.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repo (needs a token)")
    convert.add_argument("--private", action="store_true", help="create the Hub repo private")
    convert.set_defaults(run=run_convert)

    bench = commands.add_parser(
        "bench",
        help="run a benchmark of the repository's benchmarks/",
        formatter_class=raw,
        description="Run one of the repository's benchmarks (needs the repository: an editable install, or the\n"
        "repository as the current folder). Arguments after the name (or after --) go to the benchmark:\n"
        + "\n".join(f"  {name:<11} {what}" for name, what in BENCHMARKS.items()),
        epilog="examples:\n  llada-moe bench generation -- --repeats 3\n  llada-moe bench forward -- --help",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(run=run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llada-moe` script: parse `argv` (default: the command line), run, return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        check_quantization_flags(args)
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad input: flags, paths, configs, generation settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as err:  # could not run: no network, a missing optional dependency
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
