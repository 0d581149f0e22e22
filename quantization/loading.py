"""`load_quantized`: a ready 4/8-bit LLaDA-MoE from the official checkpoint, a folder of this package, or a folder
already quantized by it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from modeling_llada_moe import LLaDAMoEForMaskedLM

from .fast_quantize import fast_4bit_quantization
from .presets import bnb_config


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


def _default_compute_dtype(device_map) -> torch.dtype:
    wants_cuda = device_map not in ("cpu", {"": "cpu"}) and torch.cuda.is_available()
    if wants_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def load_quantized(
    path_or_repo: str | Path,
    bits: int = 4,
    compute_dtype: torch.dtype | None = None,
    device_map: str | dict | None = "auto",
    double_quant: bool = True,
    **from_pretrained_kwargs,
) -> LLaDAMoEForMaskedLM:
    """Load LLaDA-MoE with bitsandbytes `bits`-bit attention projections and experts, ready for `diffusion_generate`.

    Works on the official checkpoint layout (quantized while loading: the experts are merged, then quantized, never
    staged in full precision), on folders saved by this package, and on folders saved quantized by it (their own
    `quantization_config` is used; `bits` must agree). Non-quantized parts (embeddings, norms, `lm_head`) are in
    `compute_dtype` (default: bf16, or fp16 on GPUs without bf16); the router stays fp32.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "load_quantized needs bitsandbytes: pip install 'llada-moe[quant]' (bitsandbytes>=0.50.2)"
        ) from err
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected 4 (NF4) or 8 (LLM.int8)")
    if device_map not in (None, "auto", "cpu") and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for a GPU, but CUDA is not available; use 'cpu' or 'auto'")
    if torch.cuda.is_available() and device_map != "cpu" and bits == 8 and torch.cuda.get_device_capability() < (7, 5):
        raise ValueError("bitsandbytes LLM.int8 needs a GPU of compute capability >= 7.5; use bits=4 or the CPU")
    _check_source(path_or_repo)
    compute_dtype = compute_dtype or _default_compute_dtype(device_map)
    hub_kwargs = {
        k: from_pretrained_kwargs[k] for k in ("revision", "token", "cache_dir") if k in from_pretrained_kwargs
    }
    saved = _saved_quantization(path_or_repo, **hub_kwargs)
    if saved is not None:
        saved_bits = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else None
        if saved_bits != bits:
            raise ValueError(f"{path_or_repo} holds {saved_bits}-bit weights, not the requested bits={bits}")
        quantization_config = None  # the folder's own settings, read back by transformers
    else:
        quantization_config = bnb_config(bits, compute_dtype=compute_dtype, double_quant=double_quant)
    # Quantizing on the fly on CPU: bitsandbytes' generic kernel is most of the load time and peak memory; ours
    # writes the same bytes (fast_quantize). Folders saved quantized and GPU loads don't quantize on the CPU.
    quantizing = quantization_config is not None and bits == 4
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
