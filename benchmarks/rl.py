"""The likelihood estimators of `DiffusionGRPOTrainer` compared on a tiny model: variance of the sequence
log-likelihood and of the policy-gradient estimate against the number of Monte-Carlo samples, forwards per training
example, and rollout versus update seconds per training step.

    python -m benchmarks.rl            # or: python benchmarks/rl.py
    python benchmarks/rl.py --samples 1 2 4 --repeats 32 --steps 4

The model is the tiny LLaDA-MoE of `modeling_llada_moe/apps/tiny_task.py`, SFT-trained for a few seconds on the
format of 3-digit reversal (it answers reversed or copied digits at random): the starting point of the learning tests
in tests/test_grpo.py. k Monte-Carlo samples means: "elbo" with `num_mc_samples=k`; "d1" and "coupled" averaged over k
independent mask seeds (d1 redraws the prompt mask; coupled the mask rate and pair). "seq var" is the variance over
`--repeats` seed sets of the sequence log-likelihood (sum of the per-token estimates), averaged over completions;
"grad var" is E||g - E g||^2 / ||E g||^2 of the gradient of sum_i A_i * loglik_i (fixed completions and advantages)
over the seed sets.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

from modeling_llada_moe.apps.tiny_task import PAD_ID, tiny_model, tiny_tokenizer, train_to_answer
from trl_ext import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_ext.grpo import ESTIMATORS, VIEWS_PER_ESTIMATOR, diffusion_token_logps


DIGITS, SEPARATOR_ID, MASK = 3, 100, 126


def format_batch(generator: torch.Generator, size: int = 64):
    digits = torch.randint(1, 11, (size, DIGITS), generator=generator)
    reverse = torch.rand(size, generator=generator) < 0.5
    answers = torch.where(reverse[:, None], digits.flip(1), digits)
    prompts = torch.cat([digits, torch.full((size, 1), SEPARATOR_ID)], 1)
    return prompts, torch.cat([answers, torch.full((size, 1), PAD_ID)], 1)


def estimate(model, prompts, canvas, estimator: str, samples: int, seed: int) -> torch.Tensor:
    """Sequence log-likelihoods [B] from `samples` Monte-Carlo samples of `estimator`."""
    mask = torch.ones_like(prompts)
    kwargs = dict(estimator=estimator, mask_token_id=MASK, p_mask=0.15)
    if estimator == "elbo":
        seeds = torch.arange(len(prompts)) + 1000 * seed
        return diffusion_token_logps(model, prompts, mask, canvas, seeds, num_mc_samples=samples, **kwargs)[0].sum(-1)
    total = 0
    for k in range(samples):
        seeds = torch.arange(len(prompts)) + 1000 * (seed * samples + k)
        total = total + diffusion_token_logps(model, prompts, mask, canvas, seeds, **kwargs)[0].sum(-1)
    return total / samples


def variances(model, prompts, canvas, advantages, estimator: str, samples: int, repeats: int):
    values, grads = [], []
    params = [p for p in model.parameters() if p.requires_grad]
    for seed in range(repeats):
        loglik = estimate(model, prompts, canvas, estimator, samples, seed)
        grad = torch.autograd.grad((advantages * loglik).sum(), params, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grad, params)]))
        values.append(loglik.detach())
    values, grads = torch.stack(values), torch.stack(grads)
    mean_grad = grads.mean(0)
    grad_var = ((grads - mean_grad) ** 2).sum(1).mean() / mean_grad.pow(2).sum().clamp(min=1e-30)
    return values.var(0).mean().item(), values.mean().item(), grad_var.item()


def step_times(model_state, estimator: str, steps: int) -> tuple[float, float]:
    """Mean rollout and whole-step seconds of `steps` GRPO steps (8 prompts x 8 completions)."""
    model = tiny_model(0)
    model.load_state_dict(model_state)
    rows = [
        {"prompt": f"t{a} t{b} t{c} t100", "answer": f"t{c} t{b} t{a}"}
        for a in range(1, 11)
        for b in range(1, 11)
        for c in range(1, 3)
    ]
    with tempfile.TemporaryDirectory() as output_dir:
        args = DiffusionGRPOConfig(
            output_dir=output_dir,
            report_to="none",
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=64,
            num_generations=8,
            max_completion_length=DIGITS + 1,
            block_length=DIGITS + 1,
            diffusion_steps=DIGITS + 1,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            gradient_checkpointing=False,
            disable_tqdm=True,
            likelihood_estimator=estimator,
            learning_rate=3e-4,
        )
        trainer = DiffusionGRPOTrainer(
            model,
            reward_funcs=lambda completions, answer, **kw: [
                float(c.split() == a.split()) for c, a in zip(completions, answer)
            ],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
        )
        trainer.remove_callback(PrinterCallback)  # the table is the output
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    rollout = sum(entry["rollout/seconds"] for entry in logs) / len(logs)
    total = sum(entry["step_time"] for entry in logs) / len(logs)
    return rollout, total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4], help="Monte-Carlo sample counts")
    parser.add_argument("--repeats", type=int, default=24, help="seed sets per variance estimate")
    parser.add_argument("--rows", type=int, default=16, help="completions in the fixed batch")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps timed per estimator (0: skip)")
    parser.add_argument("--sft_steps", type=int, default=150, help="format-SFT steps of the starting model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = train_to_answer(tiny_model(0), format_batch, steps=args.sft_steps, seed=0)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    prompts, answers = format_batch(generator, args.rows)
    advantages = torch.randn(args.rows, generator=generator)
    model.train()
    print(f"{'estimator':<9} {'k':>3} {'fwd/example':>11} {'seq mean':>9} {'seq var':>9} {'grad var':>9}")
    for estimator in ESTIMATORS:
        for samples in args.samples:
            seq_var, seq_mean, grad_var = variances(
                model, prompts, answers, advantages, estimator, samples, args.repeats
            )
            forwards = VIEWS_PER_ESTIMATOR[estimator](samples) * (samples if estimator != "elbo" else 1)
            print(f"{estimator:<9} {samples:>3} {forwards:>11} {seq_mean:>9.3f} {seq_var:>9.4f} {grad_var:>9.3f}")
    if args.steps:
        print(f"\n{'estimator':<9} {'rollout s/step':>14} {'update s/step':>13}   (GRPO, 64 completions, mu=1)")
        for estimator in ESTIMATORS:
            rollout, total = step_times(state, estimator, args.steps)
            print(f"{estimator:<9} {rollout:>14.3f} {total - rollout:>13.3f}")


if __name__ == "__main__":
    main()
