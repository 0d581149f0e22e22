"""Speed of diffusion_generate's decoding modes on a fixed prompt set: NFE, tokens per forward, time, tokens/s.

CPU (default): the tiny LLaDA-MoE trained for ~20 s on digit reversal (benchmarks/tiny_task.py), 16 prompts,
8 answer tokens in blocks of 4: reference (1 token per step), threshold 0.9, prefix cache + threshold, dual cache
+ threshold (`--sweep` adds the other speed/quality knobs one at a time). Accuracy against the true reversal is
printed too.

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

from benchmarks.tiny_task import DIGITS, reversal_batch, train_reversal_model
from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


def timed(fn, device: torch.device, repeats: int):
    fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def cpu_setup(args):
    model = train_reversal_model(steps=args.train_steps)
    tasks = reversal_batch(args.batch, torch.Generator().manual_seed(0))
    prompts, answers = tasks[:, :DIGITS], tasks[:, DIGITS:]
    base = dict(max_new_tokens=DIGITS, block_length=DIGITS // 2)
    modes = {
        "reference (1 token/step)": dict(base),
        "threshold 0.9": dict(base, threshold=0.9),
        "prefix cache + threshold 0.9": dict(base, threshold=0.9, cache_implementation="prefix"),
        "dual cache + threshold 0.9": dict(base, threshold=0.9, cache_implementation="dual"),
    }
    if args.sweep:  # the speed/quality knobs one at a time (the README's generation-strategies table)
        modes.update(
            {
                "steps = max_new_tokens / 2": dict(base, steps=DIGITS // 2),
                "steps = max_new_tokens / 4": dict(base, steps=DIGITS // 4),
                "block_length = max_new_tokens": dict(base, block_length=DIGITS),
                "remasking margin": dict(base, remasking="margin"),
                "remasking entropy": dict(base, remasking="entropy"),
                "remasking random": dict(base, remasking="random"),
                "threshold 0.7": dict(base, threshold=0.7),
                "threshold 0.5": dict(base, threshold=0.5),
                "factor 1.0": dict(base, factor=1.0),
                "temperature 0.7 (sampling)": dict(base, temperature=0.7),
            }
        )
    return model, prompts, answers, modes


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
    parser.add_argument("--train-steps", type=int, default=600, help="CPU: training steps of the tiny model")
    parser.add_argument("--sweep", action="store_true", help="CPU: also steps, block length, remasking, thresholds")
    parser.add_argument("--prompt-length", type=int, default=128, help="GPU: random prompt length")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="GPU: tokens to generate")
    parser.add_argument("--block-length", type=int, default=32, help="GPU: block length")
    parser.add_argument("--tokens-per-step", type=int, default=4, help="GPU: forced tokens per step")
    args = parser.parse_args()
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
