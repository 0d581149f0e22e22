"""Online RL (GRPO with verifiable rewards) of LLaDA-MoE with TRL (`DiffusionGRPOTrainer`).

    # a real model, GSM8K-style data (`prompt` + `answer` columns), LoRA, d1's estimator, the numeric reward
    python examples/grpo.py --model_name_or_path PATH_OR_REPO --dataset_name DATA --use_peft --bf16 \\
        --reward_funcs numeric_match --likelihood_estimator d1 --num_generations 6 --num_iterations 4 \\
        --max_completion_length 256 --block_length 32 --diffusion_steps 128 --temperature 0.9 --beta 0.04
    # your own reward functions (TRL's signature: fn(prompts, completions, **columns) -> list[float | None])
    python examples/grpo.py ... --reward_funcs my_rewards:correctness my_rewards:format --reward_weights 1.0 0.2
    # offline demo (CPU, ~30 s): SFT a tiny model on the format of digit reversal, then GRPO on exact match
    python examples/grpo.py --tiny --output_dir /tmp/llada-moe-grpo-demo --use_cpu --bf16 false --report_to none

Every `DiffusionGRPOConfig` field (TRL's GRPOConfig plus `likelihood_estimator`, `p_mask`, `num_mc_samples`,
`decoding_preset`, `diffusion_steps`, `block_length`, ...) and TRL's `ModelConfig` flags are command-line options.
`--reward_funcs` takes built-in names (`exact_match`, `numeric_match`) or `module:function` references (the module is
imported by name, so it must be importable: installed, or in the working directory). Full fine-tuning with `--beta` >
0 loads a second, frozen copy of the model as the reference. Flags that cannot apply are refused (exit status 2).
"""

from __future__ import annotations

import importlib
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from modeling_llada_moe.apps.tiny_task import PAD_ID, SEPARATOR, tiny_model, tiny_tokenizer, train_to_answer
from trl_ext import DiffusionGRPOConfig, DiffusionGRPOTrainer
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


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of a conversational [{"role", "content"}] completion."""
    if isinstance(completion, list):
        return " ".join(message.get("content", "") for message in completion)
    return completion


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion equals the `answer` column (whitespace-normalised), else 0.0."""
    return [float(completion_text(c).split() == str(a).split()) for c, a in zip(completions, answer)]


NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def last_number(text: str) -> float | None:
    """The last number in `text` (GSM8K answers end with "#### 42"), or None."""
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def numeric_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last number of the completion equals the last number of the `answer` column, else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer):
        got, expected = last_number(completion_text(completion)), last_number(target)
        rewards.append(float(got is not None and expected is not None and abs(got - expected) < 1e-6))
    return rewards


BUILT_IN_REWARDS = {"exact_match": exact_match, "numeric_match": numeric_match}


def resolve_reward(name: str):
    """A built-in reward name, or "module:function" imported by name."""
    if name in BUILT_IN_REWARDS:
        return BUILT_IN_REWARDS[name]
    module_name, separator, function_name = name.partition(":")
    if not separator or not module_name or not function_name:
        raise ValueError(
            f"--reward_funcs {name!r}: expected a built-in name ({', '.join(BUILT_IN_REWARDS)}) or module:function"
        )
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward_funcs {name!r}: cannot import it ({error})") from error
    if not callable(function):
        raise ValueError(f"--reward_funcs {name!r}: {function!r} is not callable")
    return function


@dataclass
class RewardArguments:
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={
            "help": "Reward functions: built-in names (exact_match, numeric_match: against the `answer` column) or "
            "module:function references; weights with --reward_weights."
        },
    )
    tiny: bool = field(default=False, metadata={"help": "Offline demo on a tiny model (SFT on the format, then GRPO)."})


# ---- the --tiny demo: digit reversal, answered reversed or copied at random after SFT ----

DIGITS = 3


def reversal_rows(size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        digits = [f"t{rng.randint(1, 10)}" for _ in range(DIGITS)]
        rows.append({"prompt": " ".join(digits) + f" {SEPARATOR}", "answer": " ".join(digits[::-1])})
    return rows


def format_sft_batch(generator: torch.Generator, size: int = 64):
    """Half reversed, half copied answers: the model learns the format (three prompt digits, EOS), not the task."""
    digits = torch.randint(1, 11, (size, DIGITS), generator=generator)
    reverse = torch.rand(size, generator=generator) < 0.5
    answers = torch.where(reverse[:, None], digits.flip(1), digits)
    separator = tiny_tokenizer().convert_tokens_to_ids(SEPARATOR)
    prompts = torch.cat([digits, torch.full((size, 1), separator)], 1)
    return prompts, torch.cat([answers, torch.full((size, 1), PAD_ID)], 1)


def held_out_exact_match(model, tokenizer, rows) -> float:
    """Greedy decoding of the held-out prompts: the fraction answered exactly."""
    model.eval()
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(row["prompt"].split()) for row in rows]).to(model.device)
    out = model.diffusion_generate(ids, max_new_tokens=DIGITS + 1, block_length=DIGITS + 1, steps=DIGITS + 1)
    completions = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return sum(exact_match(completions, [row["answer"] for row in rows])) / len(rows)


def tiny_defaults(training_args: DiffusionGRPOConfig, parser) -> None:
    """The demo's canvas (three digits and EOS, one token per step) unless set on the command line."""
    given = {arg.lstrip("-").split("=")[0] for arg in sys.argv[1:] if arg.startswith("--")}
    defaults = dict(
        max_completion_length=DIGITS + 1,
        block_length=DIGITS + 1,
        diffusion_steps=DIGITS + 1,
        temperature=1.0,
        per_device_train_batch_size=64,
        num_generations=8,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        max_steps=40,
        logging_steps=5,
        save_strategy="no",
        gradient_checkpointing=False,
    )
    for name, value in defaults.items():
        if name not in given:
            setattr(training_args, name, value)
    # GRPOConfig derived the generation batch from the batch size it was parsed with.
    training_args.generation_batch_size = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.steps_per_generation
    )
    if training_args.diffusion_steps > training_args.max_completion_length:
        parser.error("--diffusion_steps: at most --max_completion_length")


def main() -> None:
    parser = TrlParser((ScriptArguments, DiffusionGRPOConfig, ModelConfig, RewardArguments))
    script_args, training_args, model_args, reward_args = parser.parse_args_and_config()
    check_script_flags(parser, script_args, training_args, model_args, reward_args.tiny)
    try:
        reward_funcs = [resolve_reward(name) for name in reward_args.reward_funcs]
    except ValueError as error:
        parser.error(str(error))
    ref_model, held_out = None, None
    if reward_args.tiny:
        tiny_defaults(training_args, parser)
        tokenizer = tiny_tokenizer()
        model = train_to_answer(tiny_model(seed=0), format_sft_batch, steps=150, seed=0)
        set_attn_implementation(model, model_args)
        if training_args.beta != 0.0 and not model_args.use_peft:
            ref_model = fresh_reference(model, model_args)
        train = Dataset.from_list(reversal_rows(2000, 0))
        held_out = reversal_rows(128, 123)
        evaluation = Dataset.from_list(reversal_rows(32, 7)) if training_args.eval_strategy != "no" else None
    else:
        model, tokenizer, train, evaluation = load_script_inputs(parser, script_args, training_args, model_args)
        if training_args.beta != 0.0 and not model_args.use_peft:
            ref_model = load_script_model(model_args)  # a separate, frozen copy; never a deepcopy of the policy

    peft_config = script_peft_config(model_args, model)
    if held_out is not None and training_args.process_index == 0:
        print(f"held-out exact match before GRPO: {held_out_exact_match(model, tokenizer, held_out):.2f}")
    trainer = DiffusionGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        ref_model=ref_model,
    )
    train_and_save(trainer, script_args, training_args, evaluate=False)
    if held_out is not None and trainer.accelerator.is_main_process:
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        print("reward per logging step: " + " ".join(f"{value:.2f}" for value in rewards))
        print(f"held-out exact match after GRPO: {held_out_exact_match(trainer.model, tokenizer, held_out):.2f}")
    if Path(training_args.output_dir).is_dir() and trainer.accelerator.is_main_process:
        print(f"saved to {training_args.output_dir}")


if __name__ == "__main__":
    main()
    end_distributed_run()  # several processes: leave without gloo's teardown (see its docstring)
