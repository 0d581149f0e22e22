"""Speed of diffusion_generate's decoding modes on a fixed prompt set: NFE, tokens per forward, time, tokens/s.

CPU (default): the tiny LLaDA-MoE trained for ~20 s on digit reversal (apps/tiny_task.py), 16 prompts,
8 answer tokens in blocks of 4: reference (1 token per step), threshold 0.9, prefix cache + threshold, dual cache
+ threshold. Accuracy against the true reversal is printed too.

`--sweep`: the task that separates decoding modes, 4-digit addition (`apps/tiny_task.py`; every answer digit
hangs on a carry chain), with a tiny model trained by `DiffusionSFTTrainer` (`--model` loads one saved earlier,
`--save` keeps the one trained here): the presets (`DiffusionGenerationConfig.from_preset`) and each strategy knob,
each on `--seeds` held-out prompt sets of `--batch` problems: mean NFE per row, tokens per forward, exact-match
accuracy (all answer digits right) and tokens/s, with the spread over the sets.

GPU (`--device cuda`): a random 7B-A1B-shaped bf16 model. Random weights give no confident tokens, so parallel
decoding is emulated with a fixed schedule of `--tokens-per-step` tokens per step (`steps` = max_new_tokens / k):
reference (1 token/step), k tokens/step, prefix cache + k, dual cache + k.

Every row is the median of `--repeats` runs after a warm-up; ratios are against the reference in the same run.

    python -m benchmarks.generation
    python -m benchmarks.generation --device cuda --prompt-length 128 --max-new-tokens 256 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modeling_llada_moe import DiffusionGenerationConfig, LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.timing import timed
from modeling_llada_moe.apps.tiny_task import (
    ADDEND_DIGITS,
    DIGITS,
    addition_batch,
    addition_examples,
    reversal_batch,
    tiny_model,
    tiny_tokenizer,
    train_reversal_model,
)


def train_addition_model(
    steps: int = 1750, seed: int = 0, output_dir: str | None = None, **config_overrides
) -> LLaDAMoEForMaskedLM:
    """A tiny LLaDA-MoE trained on `ADDEND_DIGITS`-digit addition with `DiffusionSFTTrainer` (batch 64, lr 3e-3);
    returned in eval mode (with `output_dir`, checkpoints every steps / 8 land there). Stopped short of convergence
    on purpose: the decoding modes separate only while the model is unsure of some carries (at 1750 steps greedy
    one-token-per-step decoding gets ~87 % of the sums exactly right; at 2000, 98 %). 1750 steps take ~10 minutes
    on 2 busy CPU cores."""
    import tempfile

    from datasets import Dataset

    from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer

    model = tiny_model(seed, **config_overrides).train()
    with tempfile.TemporaryDirectory() as scratch:
        args = DiffusionSFTConfig(
            output_dir=output_dir or scratch,
            per_device_train_batch_size=64,
            max_steps=steps,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            warmup_steps=0,
            seed=seed,
            report_to="none",
            bf16=False,
            use_cpu=True,
            save_strategy="steps" if output_dir else "no",
            save_steps=max(steps // 8, 1),
            save_only_model=True,
            logging_steps=max(steps // 10, 1),
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        data = Dataset.from_list(addition_examples(min(64 * steps, 32_768), seed))  # repeats past 512 steps
        DiffusionSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer()).train()
    return model.eval()


def cpu_setup(args):
    model = train_reversal_model(steps=args.train_steps or 600)
    tasks = reversal_batch(args.batch, torch.Generator().manual_seed(0))
    prompts, answers = tasks[:, :DIGITS], tasks[:, DIGITS:]
    base = dict(max_new_tokens=DIGITS, block_length=DIGITS // 2)
    modes = {
        "reference (1 token/step)": dict(base),
        "threshold 0.9": dict(base, threshold=0.9),
        "prefix cache + threshold 0.9": dict(base, threshold=0.9, cache_implementation="prefix"),
        "dual cache + threshold 0.9": dict(base, threshold=0.9, cache_implementation="dual"),
    }
    return model, prompts, answers, modes


def sweep_modes(new_tokens: int) -> dict[str, DiffusionGenerationConfig]:
    """The presets, then each strategy knob on top of the one it refines (the README's strategies table)."""
    base = dict(max_new_tokens=new_tokens, block_length=new_tokens)
    preset = DiffusionGenerationConfig.from_preset
    dual = dict(base, cache_implementation="dual")
    return {
        "preset llada (reference)": preset("llada", **base),
        "preset fast_dllm": preset("fast_dllm", **base),
        "preset dinfer": preset("dinfer", **base),
        "steps = max_new_tokens / 2": preset("llada", **base, steps=new_tokens // 2),
        "remasking margin": preset("llada", **base, remasking="margin"),
        "threshold 0.9 (no cache)": preset("llada", **base, threshold=0.9),
        "threshold 0.7 + dual": preset("fast_dllm", **base, threshold=0.7),
        "threshold 0.5 + dual": preset("fast_dllm", **base, threshold=0.5),
        "factor 1.0 + dual": preset("fast_dllm", **dual, threshold=None, factor=1.0),
        "factor 1.0 + dual, fast_dllm rule": preset("fast_dllm", **dual, threshold=None, factor=1.0,
                                                    factor_rule="fast_dllm"),
        "fast_dllm + credit 0.7": preset("fast_dllm", **base, credit_alpha=0.7),
        "fast_dllm + credit 0.3": preset("fast_dllm", **base, credit_alpha=0.3),
        "fast_dllm + hierarchy low 0.62": preset("fast_dllm", **base, low_threshold=0.62),
        "fast_dllm + hierarchy 0.62 + credit 0.3": preset("fast_dllm", **base, low_threshold=0.62, credit_alpha=0.3),
        "threshold 0.76 + dual": preset("fast_dllm", **base, threshold=0.76),
        "preset dinfer_smooth": preset("dinfer_smooth", **base),
        "dinfer_smooth - threshold decay": preset("dinfer_smooth", **base, threshold_decay=None),
        "dinfer_smooth - vicinity - warm-up": preset("dinfer_smooth", **base, cache_vicinity=None,
                                                     cache_warmup_steps=0),
        "dinfer - vicinity - warm-up": preset("dinfer", **base, cache_vicinity=None, cache_warmup_steps=0),
        "fast_dllm + smoothing 0.3": preset("fast_dllm", **base, cont_weight=0.3),
        "fast_dllm + smoothing 0.3 + decay 0.02": preset("fast_dllm", **base, cont_weight=0.3, threshold_decay=0.02),
        "dinfer with threshold 0.85": preset("dinfer", **base, threshold=0.85),
        "dinfer + credit 0.7": preset("dinfer", **base, credit_alpha=0.7),
        "dinfer + refresh every 2": preset("dinfer", **base, cache_refresh_interval=2),
    }


def run_sweep(args) -> None:
    torch.manual_seed(0)
    if args.model:
        model = LLaDAMoEForMaskedLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        start = time.perf_counter()
        steps = args.train_steps or 1750
        model = train_addition_model(steps=steps)
        print(f"# trained {steps} DiffusionSFTTrainer steps in {time.perf_counter() - start:.0f} s")
        if args.save:
            model.save_pretrained(args.save)
    sets = [addition_batch(args.batch, seed=10_000 + seed) for seed in range(args.seeds)]
    new_tokens = ADDEND_DIGITS + 2  # the sum's digits, then the EOS the SFT data ends with
    print(
        f"# diffusion_generate on cpu, tiny model, {ADDEND_DIGITS}-digit addition ({new_tokens} new tokens, one "
        f"block), {args.seeds} prompt sets x {args.batch}; mean (min-max over the sets)"
    )
    header = f"| {'mode':<40} | {'NFE/row':>17} | {'tok/fwd':>7} | {'exact-match acc':>17} | {'tok/s':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, config in sweep_modes(new_tokens).items():
        nfe, tpf, accuracy, seconds = [], [], [], 0.0
        for prompts, answers in sets:
            start = time.perf_counter()
            out = model.diffusion_generate(prompts, generation_config=config, return_dict_in_generate=True)
            seconds += time.perf_counter() - start
            nfe.append(out.nfe.float().mean().item())
            tpf.append(out.tokens_per_forward.mean().item())
            generated = out.sequences[:, prompts.shape[1] : prompts.shape[1] + answers.shape[1]]
            accuracy.append((generated == answers).all(dim=1).float().mean().item())
        tokens = args.seeds * args.batch * new_tokens
        print(
            f"| {name:<40} | {statistics.mean(nfe):5.2f} ({min(nfe):.2f}-{max(nfe):.2f}) | "
            f"{statistics.mean(tpf):7.2f} | {statistics.mean(accuracy):.3f} "
            f"({min(accuracy):.2f}-{max(accuracy):.2f}) | {tokens / seconds:7.0f} |"
        )


def gpu_setup(args):
    torch.manual_seed(0)
    config = LLaDAMoEConfig()
    with torch.device(args.device):
        model = LLaDAMoEForMaskedLM(config).to(torch.bfloat16).eval()
    prompts = torch.randint(0, 150000, (args.batch, args.prompt_length), device=args.device)
    k, new = args.tokens_per_step, args.max_new_tokens
    base = dict(max_new_tokens=new, block_length=args.block_length)
    modes = {
        "reference (1 token/step)": dict(base, steps=new),
        f"{k} tokens/step": dict(base, steps=new // k),
        f"prefix cache + {k} tokens/step": dict(base, steps=new // k, cache_implementation="prefix"),
        f"dual cache + {k} tokens/step": dict(base, steps=new // k, cache_implementation="dual"),
    }
    return model, prompts, None, modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--train-steps", type=int, default=None, help="CPU: training steps of the tiny model (600; --sweep: 1750)"
    )
    parser.add_argument("--sweep", action="store_true", help="CPU: presets and strategy knobs on the addition task")
    parser.add_argument("--model", help="--sweep: a saved addition model (else one is trained, --train-steps)")
    parser.add_argument("--save", help="--sweep: save the model trained here to this folder")
    parser.add_argument("--seeds", type=int, default=3, help="--sweep: held-out prompt sets")
    parser.add_argument("--prompt-length", type=int, default=128, help="GPU: random prompt length")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="GPU: tokens to generate")
    parser.add_argument("--block-length", type=int, default=32, help="GPU: block length")
    parser.add_argument("--tokens-per-step", type=int, default=4, help="GPU: forced tokens per step")
    args = parser.parse_args()
    if args.sweep:
        return run_sweep(args)
    device = torch.device(args.device)
    model, prompts, answers, modes = cpu_setup(args) if device.type == "cpu" else gpu_setup(args)

    what = "tiny digit-reversal model" if device.type == "cpu" else "random 7B-A1B bf16 model"
    print(f"# diffusion_generate on {device}, {what}, batch {prompts.shape[0]}, median of {args.repeats} runs")
    header = f"{'mode':<34} | {'NFE/row':>7} | {'tok/fwd':>7} | {'time s':>8} | {'tok/s':>9} | {'speed-up':>8}"
    if answers is not None:
        header += f" | {'accuracy':>8}"
    print(header)
    print("-" * len(header))
    reference_time = None
    for name, kwargs in modes.items():
        seconds, out = timed(
            lambda kwargs=kwargs: model.diffusion_generate(prompts, return_dict_in_generate=True, **kwargs),
            device,
            args.repeats,
        )
        reference_time = reference_time or seconds
        generated = prompts.shape[0] * kwargs["max_new_tokens"]
        row = (
            f"{name:<34} | {out.nfe.float().mean():>7.2f} | {out.tokens_per_forward.mean():>7.2f} | "
            f"{seconds:>8.3f} | {generated / seconds:>9.1f} | {reference_time / seconds:>7.2f}x"
        )
        if answers is not None:
            accuracy = (out.sequences[:, prompts.shape[1] :] == answers).float().mean()
            row += f" | {accuracy:>8.3f}"
        print(row)


if __name__ == "__main__":
    main()
