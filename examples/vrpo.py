"""VRPO preference optimization (LLaDA 1.5) of LLaDA-MoE with TRL (`VRPOTrainer`).

    # a real model and a Hub preference dataset (prompt / chosen / rejected), LoRA: the reference is the base
    python examples/vrpo.py --model_name_or_path PATH_OR_REPO --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir llada-moe-vrpo --use_peft --bf16 --num_mc_samples 8 --beta 0.2 --learning_rate 5e-7
    # a local file, QLoRA on 4-bit weights
    python examples/vrpo.py --model_name_or_path PATH --dataset_name prefs.jsonl --load_in_4bit --use_peft ...
    # full fine-tuning: the reference is a second copy loaded from the same path (or --precompute_ref_log_probs)
    accelerate launch --num_processes 2 examples/vrpo.py --model_name_or_path PATH --dataset_name ...
    # offline demo (CPU, ~1 minute): SFT a tiny model to answer either of two digits, then VRPO to prefer the first
    python examples/vrpo.py --tiny --output_dir /tmp/llada-moe-vrpo-demo --use_cpu --bf16 false --report_to none

Every `VRPOConfig` field (TRL's DPOConfig plus `num_mc_samples`, `num_timesteps`, `antithetic`, `elbo_form`, ...) and
TRL's `ModelConfig` flags are command-line options. As in TRL's scripts: `--resume_from_checkpoint PATH`,
`--model_revision`, `--attn_implementation` (policy and reference), `--eval_strategy steps` evaluates on
`--dataset_test_split` (the --tiny demo has its own held-out pairs), and `--push_to_hub` pushes the model when training
is done (checked before training). Flags that cannot apply are refused (exit status 2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import tiny_model, tiny_tokenizer
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer, VRPOConfig, VRPOTrainer
from trl_ext.scripts import (
    check_script_flags,
    end_distributed_run,
    fresh_reference,
    load_script_inputs,
    load_script_model,
    script_peft_config,
    set_attn_implementation,
    train_and_save,
)


@dataclass
class DemoArguments:
    tiny: bool = field(default=False, metadata={"help": "Offline demo on a tiny model (SFT, then VRPO)."})


def digit_pairs(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < count:
        a, b = rng.sample(range(1, 21), 2)
        pairs.add((a, b))
    return sorted(pairs)


def tiny_sft_model(training_args: VRPOConfig, tokenizer) -> LLaDAMoEForMaskedLM:
    """A tiny LLaDA-MoE taught (masked-diffusion SFT) to answer either of the two prompt digits."""
    model = tiny_model(seed=0)
    rows = [{"prompt": f"t{a} t{b}", "completion": f" t{answer}"} for a, b in digit_pairs(150, 0) for answer in (a, b)]
    sft_args = DiffusionSFTConfig(
        output_dir=str(Path(training_args.output_dir) / "sft"),
        num_train_epochs=25,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        report_to="none",
        use_cpu=training_args.use_cpu,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    DiffusionSFTTrainer(
        model=model, args=sft_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    ).train()
    return model.eval()


def first_digit_rate(model, pairs) -> float:
    """How often greedy decoding answers the first prompt digit (the preferred one)."""
    model.eval()
    prompts = torch.tensor(pairs).to(model.device)
    answer = model.diffusion_generate(prompts, max_new_tokens=2, block_length=2, steps=2)[:, 2]
    return (answer.cpu() == prompts[:, 0].cpu()).float().mean().item()


def main() -> None:
    parser = TrlParser((ScriptArguments, VRPOConfig, ModelConfig, DemoArguments))
    script_args, training_args, model_args, demo_args = parser.parse_args_and_config()
    check_script_flags(parser, script_args, training_args, model_args, demo_args.tiny)
    ref_model, held_out = None, None
    if demo_args.tiny:
        tokenizer = tiny_tokenizer()
        model = tiny_sft_model(training_args, tokenizer)
        set_attn_implementation(model, model_args)
        ref_model = fresh_reference(model, model_args)
        train_pairs, held_out = digit_pairs(150, 0), digit_pairs(40, 1)
        train, evaluation = (
            Dataset.from_list([{"prompt": f"t{a} t{b}", "chosen": f" t{a}", "rejected": f" t{b}"} for a, b in pairs])
            for pairs in (train_pairs, held_out)
        )
        evaluation = evaluation if training_args.eval_strategy != "no" else None
    else:
        model, tokenizer, train, evaluation = load_script_inputs(parser, script_args, training_args, model_args)
        if not model_args.use_peft and not training_args.precompute_ref_log_probs:
            ref_model = load_script_model(model_args)  # a separate, frozen copy; never a deepcopy of the policy

    peft_config = script_peft_config(model_args, model)
    if held_out is not None and training_args.process_index == 0:
        print(f"answers the preferred digit before VRPO: {first_digit_rate(model, held_out):.2f}")
    trainer = VRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_and_save(trainer, script_args, training_args, evaluate=evaluation is not None)
    if held_out is not None and trainer.accelerator.is_main_process:
        print(f"answers the preferred digit after VRPO: {first_digit_rate(trainer.model, held_out):.2f}")


if __name__ == "__main__":
    main()
    end_distributed_run()  # several processes: leave without gloo's teardown (see its docstring)
