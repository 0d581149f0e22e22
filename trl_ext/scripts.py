"""Loading for the TRL-style training scripts (`examples/sft.py`, `examples/vrpo.py`, `examples/grpo.py`): data,
model and tokenizer from their command-line arguments, the checks that TRL's script flags are honoured, never silently
ignored, and the steps the scripts share (LoRA config, a fresh reference, train / save / evaluate / push)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import torch
from datasets import Dataset, load_dataset
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments, get_peft_config

from modeling_llada_moe import LLaDAMoEForMaskedLM


LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_script_dataset(script_args: ScriptArguments, split: str | None = None) -> Dataset:
    """`--dataset_name`: a local json/jsonl/csv/parquet file (one split, "train"), or a Hub dataset or local dataset
    folder (with `--dataset_config`), split `split` (default `--dataset_train_split`)."""
    split = split or script_args.dataset_train_split
    path = Path(script_args.dataset_name)
    if path.suffix in LOCAL_FORMATS and path.is_file():
        if split != "train":
            raise ValueError(
                f"split {split!r}: --dataset_name {path} is a single file, whose only split is 'train'; put the "
                "splits in a folder (train.jsonl, test.jsonl, ...) or a Hub dataset"
            )
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(script_args.dataset_name, script_args.dataset_config, split=split)


def load_script_eval_dataset(script_args: ScriptArguments, training_args: TrainingArguments) -> Dataset | None:
    """`--dataset_test_split` of `--dataset_name` when evaluation is on (`--eval_strategy` other than "no"), as TRL's
    scripts do; None otherwise."""
    if training_args.eval_strategy == "no":
        return None
    return load_script_dataset(script_args, split=script_args.dataset_test_split)


def model_load_kwargs(model_args: ModelConfig) -> dict:
    """`--model_revision` and `--attn_implementation` as `from_pretrained` keywords. A revision other than "main" of
    a local folder is refused: a folder has no revisions, so it would be ignored."""
    if model_args.model_revision != "main" and Path(model_args.model_name_or_path).is_dir():
        raise ValueError(
            f"--model_revision {model_args.model_revision}: --model_name_or_path {model_args.model_name_or_path} is "
            "a local folder, which has no revisions"
        )
    kwargs = {"revision": model_args.model_revision}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def load_script_model(model_args: ModelConfig) -> LLaDAMoEForMaskedLM:
    """`--model_name_or_path` as LLaDA-MoE (at `--model_revision`, with `--attn_implementation`): 4/8-bit through
    `quantization.load_quantized` with `--load_in_4bit` / `--load_in_8bit`, otherwise in `--dtype` (default: the
    checkpoint's)."""
    kwargs = model_load_kwargs(model_args)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from quantization import load_quantized

        return load_quantized(model_args.model_name_or_path, bits=4 if model_args.load_in_4bit else 8, **kwargs)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return LLaDAMoEForMaskedLM.from_pretrained(model_args.model_name_or_path, dtype=dtype or "auto", **kwargs)


def load_script_tokenizer(model_args: ModelConfig):
    """The tokenizer of `--model_name_or_path` at `--model_revision`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_load_kwargs(model_args)["revision"]
    )


def check_tiny_demo_flags(model_args: ModelConfig, script_args: ScriptArguments | None = None) -> None:
    """The offline `--tiny` demo builds its model and data in memory: loading flags would be ignored, so refuse them."""
    if model_args.model_name_or_path or (script_args is not None and script_args.dataset_name):
        raise ValueError("--tiny builds its own model and data: drop --model_name_or_path / --dataset_name")
    if model_args.model_revision != "main":
        raise ValueError(f"--model_revision {model_args.model_revision}: the --tiny demo loads no model")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit: the --tiny demo loads no model to quantize")


def check_push_to_hub(training_args: TrainingArguments) -> None:
    """With `--push_to_hub`, fail before training rather than after it: offline mode, no token, or an invalid
    `--hub_model_id` (default: the name of `--output_dir`) raise a ValueError saying what to do."""
    if not training_args.push_to_hub:
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or drop the flag")
    if not (training_args.hub_token or huggingface_hub.get_token()):
        raise ValueError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or pass "
            "--hub_token"
        )
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repository id: {error}") from error


def set_attn_implementation(model, model_args: ModelConfig) -> None:
    """`--attn_implementation` on a model built in memory (the `--tiny` demos)."""
    if model_args.attn_implementation is not None:
        model.set_attn_implementation(model_args.attn_implementation)


def check_script_flags(parser, script_args: ScriptArguments, training_args, model_args: ModelConfig, tiny: bool):
    """`check_push_to_hub`, and `check_tiny_demo_flags` for the `--tiny` demo; a refused flag exits through
    `parser.error` (status 2)."""
    try:
        check_push_to_hub(training_args)
        if tiny:
            check_tiny_demo_flags(model_args, script_args)
    except ValueError as error:
        parser.error(str(error))


def load_script_inputs(parser, script_args: ScriptArguments, training_args, model_args: ModelConfig):
    """Model, tokenizer, train and eval datasets of a script run on real data (`load_script_*`); missing or refused
    flags exit through `parser.error`."""
    if not model_args.model_name_or_path or not script_args.dataset_name:
        parser.error("pass --model_name_or_path and --dataset_name, or --tiny for the offline demo")
    try:
        tokenizer, model = load_script_tokenizer(model_args), load_script_model(model_args)
        evaluation = load_script_eval_dataset(script_args, training_args)
    except ValueError as error:
        parser.error(str(error))
    return model, tokenizer, load_script_dataset(script_args), evaluation


def fresh_reference(model, model_args: ModelConfig) -> LLaDAMoEForMaskedLM:
    """A separately built copy of an in-memory policy as the frozen reference (never a `copy.deepcopy`, which a TRL
    trainer's patched `forward` would tie to the policy), with `--attn_implementation`."""
    reference = LLaDAMoEForMaskedLM(model.config)
    reference.load_state_dict(model.state_dict())
    set_attn_implementation(reference, model_args)
    return reference


def script_peft_config(model_args: ModelConfig, model):
    """TRL's `get_peft_config` from the `--use_peft` / `--lora_*` flags; without `--lora_target_modules`, the
    attention and dense MLP projections (`quantization.qlora_target_modules`: never the expert containers or the
    router)."""
    peft_config = get_peft_config(model_args)
    if peft_config is not None and not model_args.lora_target_modules:
        from quantization import qlora_target_modules

        peft_config.target_modules = qlora_target_modules(model)
    return peft_config


def train_and_save(trainer, script_args: ScriptArguments, training_args, evaluate: bool) -> None:
    """Train (resuming from `--resume_from_checkpoint`), save to `--output_dir`, evaluate when `evaluate` (printing
    the eval loss), and push with `--push_to_hub`."""
    if trainer.accelerator.is_main_process:
        print(f"training on {trainer.accelerator.num_processes} process(es), {trainer.accelerator.device}")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if evaluate:
        metrics = trainer.evaluate()
        if trainer.accelerator.is_main_process:
            print(f"eval loss: {metrics['eval_loss']:.4f}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def end_distributed_run() -> None:
    """End a script launched on several processes (`accelerate launch`, torchrun) once its work is done.

    A process that leaves the interpreter with its gloo process group alive can abort in the group's teardown
    ("terminate called without an active exception": gloo's worker threads outlive the interpreter, see
    pytorch/pytorch#179291), and an explicit `destroy_process_group` can block on a peer that is still busy (the main
    process evaluating while the others are done). So each process runs the exit handlers (trackers, loggers) while
    the interpreter is alive, flushes its output, and leaves without the interpreter's teardown. A single process
    returns and exits normally."""
    import atexit
    import os
    import sys

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
