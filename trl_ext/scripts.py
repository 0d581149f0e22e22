"""Loading for the TRL-style training scripts (`examples/sft.py`, `examples/vrpo.py`): data and model from their
command-line arguments."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from trl import ModelConfig, ScriptArguments

from modeling_llada_moe import LLaDAMoEForMaskedLM


LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_script_dataset(script_args: ScriptArguments) -> Dataset:
    """`--dataset_name`: a local json/jsonl/csv/parquet file, or a Hub dataset (with `--dataset_config`, split
    `--dataset_train_split`)."""
    path = Path(script_args.dataset_name)
    if path.suffix in LOCAL_FORMATS and path.is_file():
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split)


def load_script_model(model_args: ModelConfig) -> LLaDAMoEForMaskedLM:
    """`--model_name_or_path` as LLaDA-MoE: 4/8-bit through `quantization.load_quantized` with `--load_in_4bit` /
    `--load_in_8bit`, otherwise in `--dtype` (default: the checkpoint's)."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from quantization import load_quantized

        return load_quantized(model_args.model_name_or_path, bits=4 if model_args.load_in_4bit else 8)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return LLaDAMoEForMaskedLM.from_pretrained(model_args.model_name_or_path, dtype=dtype or "auto")
