"""`load_quantized`: a ready 4/8-bit LLaDA-MoE (bitsandbytes NF4 / LLM.int8, or torch's CPU int4) from the official
checkpoint, a folder of this package, or a folder already quantized by it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.int4_cpu import QUANT_METHOD as INT4_QUANT_METHOD
from modeling_llada_moe.int4_cpu import check_cpu_device_map

from .fast_quantize import fast_4bit_quantization
from .presets import (
    COMPUTE_DTYPES,
    DEFAULT_GROUP_SIZE,
    bnb_config,
    check_method_options,
    int4_config,
    quantization_method,
)


def _check_source(path_or_repo: str | Path) -> None:
    """A model folder, or a name that can be a Hub repo id; else a ValueError naming it (transformers would say
    "Repo id must be ..." about a folder that is simply missing)."""
    path = Path(path_or_repo)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"path_or_repo={str(path)!r}: the folder has no config.json (not a saved model folder)")
        return
    if path.exists():
        raise ValueError(f"path_or_repo={str(path)!r} is a file; expected a model folder or a Hub repo id")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(path_or_repo))
    except HFValidationError as error:
        raise ValueError(
            f"path_or_repo={str(path_or_repo)!r}: no such folder, and not a Hub repo id ('name' or 'namespace/name')"
        ) from error


def _saved_quantization(path_or_repo: str | Path, **hub_kwargs) -> dict | None:
    """The `quantization_config` of a saved folder / Hub repo, or None when its weights are not quantized."""
    local = Path(path_or_repo) / "config.json"
    if not local.is_file():
        from transformers.utils import cached_file

        local = Path(cached_file(str(path_or_repo), "config.json", **hub_kwargs))
    try:
        config = json.loads(local.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{local}: not a JSON config file ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{local}: expected a JSON object of config fields, got {type(config).__name__}")
    return config.get("quantization_config")


def _saved_method(saved: dict) -> tuple[int | None, str]:
    """(bits, method) of a saved `quantization_config`: ("int4" for this package's CPU int4, the bitsandbytes 4-bit
    quant type ("nf4" / "fp4") or "int8"); bits is None for a method `load_quantized` does not read."""
    quant_method = saved.get("quant_method", "bitsandbytes")
    if quant_method == INT4_QUANT_METHOD:
        return 4, "int4"
    if quant_method == "bitsandbytes" and saved.get("load_in_4bit"):
        return 4, saved.get("bnb_4bit_quant_type", "nf4")
    if quant_method == "bitsandbytes" and saved.get("load_in_8bit"):
        return 8, "int8"
    return None, str(quant_method)


def _check_saved(
    path_or_repo, saved: dict, bits: int, method: str | None, group_size: int | None, double_quant: bool | None
) -> str:
    """The saved folder's method, after checking it is the one asked for (`method=None`: whichever method of `bits`
    bits it holds) and that `group_size` / `double_quant`, when given, are the folder's."""
    saved_bits, saved_method = _saved_method(saved)
    if saved_bits is None:
        raise ValueError(
            f"{path_or_repo} holds weights quantized with quant_method={saved_method!r}, which load_quantized does not "
            f"read (it reads bitsandbytes and {INT4_QUANT_METHOD!r}); load it with LLaDAMoEForMaskedLM.from_pretrained"
        )
    if saved_bits != bits:
        raise ValueError(f"{path_or_repo} holds {saved_bits}-bit weights, not the requested bits={bits}")
    if method is not None and method != saved_method:
        raise ValueError(
            f"{path_or_repo} holds {saved_method} weights, not the requested method={method!r}; pass "
            f"method={saved_method!r} (or None) to load them"
        )
    if group_size is not None and group_size != saved.get("group_size"):
        raise ValueError(
            f"{path_or_repo} holds int4 weights of group_size={saved.get('group_size')}, not the requested "
            f"group_size={group_size}; pass group_size={saved.get('group_size')} (or None) to load them"
        )
    if saved_method in ("nf4", "fp4") and double_quant is not None:
        if double_quant != bool(saved.get("bnb_4bit_use_double_quant")):
            raise ValueError(
                f"{path_or_repo} holds {saved_method} weights with double_quant="
                f"{bool(saved.get('bnb_4bit_use_double_quant'))}, not the requested double_quant={double_quant}; "
                "leave double_quant unset to load them"
            )
    return saved_method


def _default_compute_dtype(device_map) -> torch.dtype:
    wants_cuda = device_map not in ("cpu", {"": "cpu"}) and torch.cuda.is_available()
    if wants_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "load_quantized with method='nf4' or 'int8' needs bitsandbytes: pip install 'llada-moe[quant]' "
            "(bitsandbytes>=0.50.2); method='int4' (CPU) needs none"
        ) from err


def load_quantized(
    path_or_repo: str | Path,
    bits: int = 4,
    compute_dtype: torch.dtype | None = None,
    device_map: str | dict | None = "auto",
    double_quant: bool | None = None,
    method: str | None = None,
    group_size: int | None = None,
    **from_pretrained_kwargs,
) -> LLaDAMoEForMaskedLM:
    """Load LLaDA-MoE with `bits`-bit attention projections and experts, ready for `diffusion_generate`.

    `method` picks the kernels: with `bits=4`, "nf4" (the default; bitsandbytes NF4, CPU or GPU, `double_quant`
    default True) or "int4" (torch's CPU int4 kernel, CPU only: `modeling_llada_moe.int4_cpu`, `group_size` input
    features per scale and zero, 32 / 64 / 128 / 256, default 64); with `bits=8`, "int8" (bitsandbytes LLM.int8).
    Only "int4" works without bitsandbytes.

    Works on the official checkpoint layout (quantized while loading: the experts are merged, then quantized, never
    staged in full precision), on folders saved by this package, and on folders saved quantized by it (their own
    `quantization_config` is used; `bits`, and `method` / `group_size` when given, must agree with it). Non-quantized
    parts (embeddings, norms, `lm_head`) are in `compute_dtype` (default: bf16, or fp16 on GPUs without bf16); the
    router stays fp32.
    """
    requested = method
    method = quantization_method(bits, method)
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={compute_dtype!r}: expected one of {COMPUTE_DTYPES} (or None: bf16, or fp16 on GPUs "
            "without bf16)"
        )
    _check_source(path_or_repo)
    hub_kwargs = {
        k: from_pretrained_kwargs[k] for k in ("revision", "token", "cache_dir") if k in from_pretrained_kwargs
    }
    saved = _saved_quantization(path_or_repo, **hub_kwargs)
    if saved is not None:
        method = _check_saved(path_or_repo, saved, bits, requested, group_size, double_quant)
    check_method_options(method, double_quant, group_size)
    if method == "int4":
        check_cpu_device_map(device_map)  # before reading any weight
        device_map = "cpu"
    else:
        _require_bitsandbytes()
    if device_map not in (None, "auto", "cpu") and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for a GPU, but CUDA is not available; use 'cpu' or 'auto'")
    if torch.cuda.is_available() and device_map != "cpu" and bits == 8 and torch.cuda.get_device_capability() < (7, 5):
        raise ValueError("bitsandbytes LLM.int8 needs a GPU of compute capability >= 7.5; use bits=4 or the CPU")
    compute_dtype = compute_dtype or _default_compute_dtype(device_map)
    if saved is not None:
        quantization_config = None  # the folder's own settings, read back by transformers
    elif method == "int4":
        quantization_config = int4_config(DEFAULT_GROUP_SIZE if group_size is None else group_size)
    else:
        dq = True if double_quant is None else double_quant
        quantization_config = bnb_config(bits, compute_dtype=compute_dtype, double_quant=dq)
    # Quantizing NF4 on the fly on CPU: bitsandbytes' generic kernel is most of the load time and peak memory; ours
    # writes the same bytes (fast_quantize). Folders saved quantized and GPU loads don't quantize on the CPU.
    quantizing = quantization_config is not None and method == "nf4"
    with fast_4bit_quantization() if quantizing else contextlib.nullcontext():
        loaded = LLaDAMoEForMaskedLM.from_pretrained(
            path_or_repo,
            quantization_config=quantization_config,
            dtype=compute_dtype,
            device_map=device_map,
            **from_pretrained_kwargs,
        )
    if isinstance(loaded, tuple):  # output_loading_info=True: (model, loading info), as from_pretrained returns them
        return loaded[0].eval(), loaded[1]
    return loaded.eval()
