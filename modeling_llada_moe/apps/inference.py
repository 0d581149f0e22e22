"""Loading a model and tokenizer for inference, and turning prompts or chat messages into ids and generated ids back
into text: the shared plumbing of the `llada-moe` command line, the examples, the Gradio demo and the lm-eval model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..atomic_save import staged_save, weight_files
from ..configuration_llada_moe import read_json_object
from ..generation_config import DiffusionGenerationConfig
from ..modeling_llada_moe import LLaDAMoEForMaskedLM, check_local_checkpoint


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The 4-bit kernels `bits=4` can load with: bitsandbytes NF4 (the default) or torch's CPU int4 kernel.
QUANT_METHODS = {"nf4": "bitsandbytes NF4, CPU or GPU", "int4": "torch's CPU int4 kernel, CPU only"}
END_OF_TURN = "<|role_end|>"  # the Ling chat template's end of a turn
# The JSON files a tokenizer folder may hold (checked one by one so a corrupt one is named), and the files that say a
# folder has a tokenizer at all.
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "vocab.json",
)
TOKENIZER_FILES = (*TOKENIZER_JSON_FILES, "tokenizer.model", "merges.txt", "vocab.txt")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when available and the CPU otherwise; a CUDA device without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available here; use 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def check_model_source(name_or_path: str | Path, what: str = "model") -> None:
    """Fail early and clearly on a local path that is not a model (or tokenizer) folder; Hub repo ids pass."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if what == "model" and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {text!r} is a folder without a config.json; expected a model folder")
        return
    if path.exists():
        raise FileNotFoundError(f"{what} {text!r} is a file; expected a folder or a Hub repo id (owner/name)")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or not text.strip()
    if looks_local:
        raise FileNotFoundError(f"{what} {text!r}: no such folder (and not a Hub repo id of the form owner/name)")


def is_local_folder(name_or_path: str | Path) -> bool:
    return Path(str(name_or_path)).expanduser().is_dir()


def read_json_file(path: Path, what: str) -> dict:
    """The JSON object in `path` (the model package's `read_json_object`); an unreadable file is a `ValueError`
    naming it too."""
    try:
        return read_json_object(path, what)
    except OSError as err:
        raise ValueError(f"{str(path)!r}: could not read the {what} ({err})") from err


def check_model_folder(folder: str | Path) -> None:
    """Check the files a load of the local model folder `folder` reads, before loading it (and the tokenizer):
    `config.json`, then what the model's `from_pretrained` checks itself (`check_local_checkpoint`): a
    `generation_config.json` when there is one (never silently replaced by defaults) and the safetensors weights
    (the single file, or the index and the shards it names). A damaged file is a `ValueError` naming it."""
    folder = Path(str(folder)).expanduser()
    read_json_file(folder / "config.json", "model config")
    check_local_checkpoint(folder, None, None, DiffusionGenerationConfig)


def check_loading_info(source: str | Path, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its config (a `config.json` edited to add or remove a layer,
    say): transformers only warns, then initialises the missing weights at random and drops the unexpected ones. A
    `ValueError` names `source`, the keys (the first few of each kind) and how many there are."""
    parts = []
    for kind, effect in (("missing_keys", "missing from the checkpoint, would be random"), ("unexpected_keys", "in "
                         "the checkpoint but not in the model the config describes, would be dropped")):
        keys = sorted(info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            parts.append(f"{len(keys)} weights {effect}: {shown}")
    if parts:
        raise ValueError(
            f"{str(source)!r}: the weights do not match the model its config.json describes ({'; '.join(parts)}); "
            "was config.json edited (num_hidden_layers, moe_layer_freq, ...)? Restore it or re-save the checkpoint."
        )


def check_quantization(bits: int | None, quant_method: str | None) -> None:
    """`bits` None, 4 or 8, and `quant_method` (the 4-bit kernels: "nf4" bitsandbytes, "int4" torch's CPU kernel)
    only with `bits=4`."""
    if bits not in (None, 4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r}: expected 4 (NF4 or int4), 8 (LLM.int8) or None (no quantization)")
    if quant_method is not None and (not isinstance(quant_method, str) or quant_method not in QUANT_METHODS):
        raise ValueError(
            f"quant_method={quant_method!r}: expected one of {list(QUANT_METHODS)} (with bits=4), or None (NF4)"
        )
    if quant_method is not None and bits != 4:
        raise ValueError(
            f"quant_method={quant_method!r} picks the 4-bit kernels and applies with bits=4 only, not bits={bits}; "
            f"accepted: bits=4 with quant_method in {list(QUANT_METHODS)}, or bits=8 (LLM.int8) without one"
        )


def load_checked_model(
    name_or_path: str | Path,
    bits: int | None = None,
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = None,
    quant_method: str | None = None,
    **overrides,
) -> LLaDAMoEForMaskedLM:
    """`LLaDAMoEForMaskedLM.from_pretrained` (or `quantization.load_quantized` with `bits`, and `quant_method` "nf4" /
    "int4" with 4 bits) in eval mode, refusing a checkpoint whose weights do not match its config
    (`check_loading_info`) instead of warning."""
    check_quantization(bits, quant_method)
    if bits is not None:
        from quantization import load_quantized

        compute = None if dtype == "auto" else DTYPES.get(dtype, dtype)
        model, info = load_quantized(
            name_or_path, bits=bits, method=quant_method, compute_dtype=compute, device_map=device_map or "cpu",
            output_loading_info=True, **overrides,
        )
    else:
        model, info = LLaDAMoEForMaskedLM.from_pretrained(
            name_or_path, dtype=DTYPES.get(dtype, dtype), output_loading_info=True, **overrides
        )
    check_loading_info(name_or_path, info)
    return model.eval()


def chat_template_source(tokenizer: PreTrainedTokenizerBase) -> str:
    """How errors name the tokenizer's chat template: its file in a local tokenizer folder, else the tokenizer."""
    folder = Path(str(tokenizer.name_or_path)).expanduser()
    if folder.is_dir():
        for name in ("chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():
                return repr(str(folder / name))
        if (folder / "tokenizer_config.json").is_file():
            return f"`chat_template` of {str(folder / 'tokenizer_config.json')!r}"
    return f"of tokenizer {tokenizer.name_or_path!r}"


def render_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The prompt text of `messages` (with the assistant turn opened, or the last message continued with
    `add_generation_prompt=False`); a template that does not render (a jinja syntax error, a `raise_exception(...)`
    call, an error inside it) is a `ValueError` naming the template."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            tokenize=False,
        )
    except ImportError:  # jinja2 missing: a missing dependency, not a bad template
        raise
    except Exception as err:  # jinja2's TemplateSyntaxError / TemplateError, or whatever the template's code raised
        raise ValueError(
            f"the chat template {chat_template_source(tokenizer)} does not render "
            f"{[message['role'] for message in messages]} turns ({type(err).__name__}: {err}); fix the template, or "
            "tokenize the prompt as it is (`--no-chat-template`, `chat_template=False`)"
        ) from err
    if not isinstance(text, str):
        raise ValueError(
            f"the chat template {chat_template_source(tokenizer)} rendered {type(text).__name__}, not text"
        )
    return text


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Render a probe conversation (one user turn) once, so that a broken chat template is refused up front (a
    `ValueError` naming it) rather than at the first request; a tokenizer without a template passes."""
    if getattr(tokenizer, "chat_template", None) is not None:
        render_chat_template(tokenizer, [{"role": "user", "content": "Hello"}])


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(str(folder)).expanduser()
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained`; for a local folder every failure is a `ValueError` naming the folder (and the
    file, when one of its JSON files is corrupt). Hub failures stay `OSError`."""
    if not is_local_folder(name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    folder = Path(str(name_or_path)).expanduser()
    if not has_tokenizer_files(folder):
        raise ValueError(
            f"tokenizer folder {str(name_or_path)!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        )
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).exists():
            read_json_file(folder / name, "tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:  # tokenizers' own Exception, ValueError, OSError, KeyError, ...
        raise ValueError(
            f"tokenizer folder {str(name_or_path)!r}: could not load a tokenizer ({type(err).__name__}: {err})"
        ) from err


def load_model_and_tokenizer(
    name_or_path: str | Path,
    bits: int | None = None,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    tokenizer_name_or_path: str | Path | None = None,
    trust_remote_code: bool = False,
    quant_method: str | None = None,
) -> tuple[LLaDAMoEForMaskedLM, PreTrainedTokenizerBase]:
    """A LLaDA-MoE checkpoint (official layout, this package's folder, or a Hub id) in eval mode, and its tokenizer.

    `bits` 4 or 8 loads through `quantization.load_quantized`: bitsandbytes NF4 / LLM.int8, or with `bits=4,
    quant_method="int4"` torch's CPU int4 kernel (CPU only: `device` defaults to the CPU then). Otherwise the weights
    are loaded in `dtype` (`"auto"` = the checkpoint's) and moved to `device` (default: CUDA when available).

    A damaged local folder (corrupt `config.json` / `generation_config.json` / tokenizer file, an empty or truncated
    `.safetensors`) is a `ValueError` naming the file, and so are weights that do not match the config (missing or
    unexpected keys: transformers would only warn); an unreachable Hub is an `OSError`.
    """
    check_quantization(bits, quant_method)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    check_model_source(name_or_path)
    if tokenizer_name_or_path is not None:
        check_model_source(tokenizer_name_or_path, what="tokenizer")
    device = pick_device("cpu" if device is None and quant_method == "int4" else device)
    if quant_method == "int4" and device.type != "cpu":
        raise ValueError(
            f"device={str(device)!r}: quant_method='int4' runs on the CPU only (torch's CPU int4 kernel); use "
            "device='cpu' (or None), or quant_method='nf4' (bitsandbytes) on a GPU"
        )
    if is_local_folder(name_or_path):
        check_model_folder(name_or_path)
    tokenizer_source = tokenizer_name_or_path or name_or_path
    source = name_or_path
    try:
        if bits is not None:
            device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
            model = load_checked_model(
                name_or_path, bits=bits, dtype=dtype, device_map=device_map, quant_method=quant_method
            )
        else:
            model = load_checked_model(name_or_path, dtype=dtype).to(device)
        source = tokenizer_source
        # `config=`: AutoTokenizer would otherwise read config.json itself, and the official one names remote code.
        tokenizer = load_tokenizer(tokenizer_source, config=model.config, trust_remote_code=trust_remote_code)
    except OSError as err:
        if is_local_folder(source):
            raise ValueError(f"could not load the local folder {str(source)!r}: {err}") from err
        raise OSError(
            f"could not load {str(source)!r}: not a complete local model folder, and the Hub could not serve "
            f"it (no network, or a private repo without a token?). Cause: {err}"
        ) from err
    return model, tokenizer


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    system: str | None = None,
    chat_template: bool | None = None,
) -> torch.LongTensor:
    """[1, P] prompt ids from a plain `prompt` or chat `messages`.

    A plain prompt goes through the chat template as one user turn (after `system`, if given) when the tokenizer has
    a template and `chat_template` is not False; `chat_template=False` tokenizes the text as it is. A template that
    does not render is a `ValueError` naming it (`render_chat_template`).
    """
    if (prompt is None) == (messages is None):
        raise ValueError("encode_prompt: give exactly one of `prompt` (text) or `messages` (a list of chat turns)")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if messages is None and (chat_template is False or (chat_template is None and not has_template)):
        if system is not None:
            raise ValueError("encode_prompt: a `system` prompt needs the chat template (chat_template=False given)")
        text = prompt
    else:
        if not has_template:
            raise ValueError(
                "encode_prompt: the tokenizer has no chat template; pass a plain prompt with chat_template=False"
            )
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        check_messages(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        text = render_chat_template(tokenizer, messages)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError(f"encode_prompt: the prompt {text!r} tokenizes to nothing")
    return ids


def check_messages(messages) -> None:
    """Chat turns must be dicts with a `role` in system/user/assistant and a string `content`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages={messages!r}: expected a non-empty list of {{'role', 'content'}} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]={message!r}: expected a dict with role 'system', 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}]={message!r}: `content` must be a string")


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end an answer: EOS and, with the Ling chat template's vocabulary, `<|role_end|>`."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if END_OF_TURN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return ids


def completion_ids(tokenizer: PreTrainedTokenizerBase, generated: torch.Tensor) -> list[int]:
    """The generated ids (one row, prompt excluded) up to the first end-of-turn id."""
    ids = generated.tolist()
    stops = set(end_of_turn_ids(tokenizer))
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def decode_completion(tokenizer: PreTrainedTokenizerBase, generated: torch.Tensor) -> str:
    """The answer text of one generated row (prompt excluded): cut at the first end-of-turn id, specials dropped."""
    return tokenizer.decode(completion_ids(tokenizer, generated), skip_special_tokens=True).strip()


def save_model_and_tokenizer(model, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Model and tokenizer saved into `folder` as one all-or-nothing save (a failure in either leaves the folder as
    it was); the weight files of an earlier save there are replaced. Returns the folder."""
    with staged_save(folder, weight_files) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(folder)
