"""Masked-diffusion SFT of LLaDA-MoE with TRL (`DiffusionSFTTrainer`).

    # a real checkpoint, a Hub dataset (conversational or prompt-completion), LoRA
    python examples/sft.py --model_name_or_path inclusionAI/LLaDA-MoE-7B-A1B-Base \\
        --dataset_name trl-lib/Capybara --output_dir llada-moe-sft --use_peft --bf16
    # a local file (json / jsonl / csv / parquet), QLoRA on 4-bit weights
    python examples/sft.py --model_name_or_path PATH --dataset_name data.jsonl --load_in_4bit --use_peft ...
    # several processes
    accelerate launch --num_processes 2 examples/sft.py ...
    # offline demo: a tiny LLaDA-MoE learns digit reversal on CPU (~1 minute)
    python examples/sft.py --tiny --output_dir /tmp/llada-moe-sft-demo

Every `DiffusionSFTConfig` field (TRL's SFTConfig plus `loss_normalization`, `random_length_prob`,
`load_balance_coef`, ...) and TRL's `ModelConfig` flags (`--use_peft`, `--lora_r`, `--load_in_4bit`, ...) are
command-line options. As in TRL's scripts: `--resume_from_checkpoint PATH`, `--model_revision`,
`--attn_implementation`, `--eval_strategy steps` evaluates on `--dataset_test_split` (default "test"; the --tiny demo
has its own held-out rows), and `--push_to_hub` pushes the model when training is done (checked before training: a
token, not offline, a valid `--hub_model_id`). Flags that cannot apply are refused (exit status 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from modeling_llada_moe.apps.tiny_task import reversal_examples, tiny_model, tiny_tokenizer
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer
from trl_ext.scripts import (
    check_script_flags,
    end_distributed_run,
    load_script_inputs,
    script_peft_config,
    set_attn_implementation,
    train_and_save,
)


@dataclass
class DemoArguments:
    tiny: bool = field(default=False, metadata={"help": "Offline demo: a tiny model learns digit reversal."})
    demo_examples: int = field(default=2000, metadata={"help": "Training rows of the tiny demo."})


def exact_match(model, tokenizer, rows) -> float:
    model.eval()
    prompts = torch.tensor([tokenizer(row["prompt"]).input_ids for row in rows]).to(model.device)
    answers = torch.tensor([tokenizer(row["completion"]).input_ids + [tokenizer.eos_token_id] for row in rows])
    out = model.diffusion_generate(prompts, max_new_tokens=answers.shape[1], block_length=answers.shape[1])
    return (out[:, prompts.shape[1] :].cpu() == answers).all(dim=1).float().mean().item()


def main() -> None:
    parser = TrlParser((ScriptArguments, DiffusionSFTConfig, ModelConfig, DemoArguments))
    script_args, training_args, model_args, demo_args = parser.parse_args_and_config()
    check_script_flags(parser, script_args, training_args, model_args, demo_args.tiny)
    if demo_args.tiny:
        model, tokenizer = tiny_model(seed=0), tiny_tokenizer()
        set_attn_implementation(model, model_args)
        train = Dataset.from_list(reversal_examples(demo_args.demo_examples, seed=0))
        held_out = reversal_examples(64, seed=999)
        evaluation = Dataset.from_list(held_out) if training_args.eval_strategy != "no" else None
    else:
        model, tokenizer, train, evaluation = load_script_inputs(parser, script_args, training_args, model_args)
        held_out = None

    peft_config = script_peft_config(model_args, model)
    if held_out is not None and training_args.process_index == 0:
        print(f"exact match before training: {exact_match(model, tokenizer, held_out):.2f}")
    trainer = DiffusionSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_and_save(trainer, script_args, training_args, evaluate=evaluation is not None)
    if held_out is not None and trainer.accelerator.is_main_process:
        print(f"exact match after training: {exact_match(trainer.model, tokenizer, held_out):.2f}")


if __name__ == "__main__":
    main()
    end_distributed_run()  # several processes: leave without gloo's teardown (see its docstring)
