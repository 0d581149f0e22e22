"""Quickstart: fine-tune a tiny LLaDA-MoE with DiffusionSFTTrainer, save it as a Hub folder, reload it, generate.

    python examples/quickstart.py                       # offline, CPU, about a minute
    python examples/quickstart.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct   # a real checkpoint (network/GPU)

Offline (the default), it builds a tiny LLaDA-MoE (hidden 64, 2 layers, 8 experts, top-2) and a word-level
tokenizer, fine-tunes it with `trl_ext.DiffusionSFTTrainer` to reverse four digits ("t3 t9 t1 t5 t100" ->
" t5 t1 t9 t3"), saves it with its tokenizer as a Hub folder that carries the model code, reloads it with
`AutoModel.from_pretrained(..., trust_remote_code=True)`, and decodes held-out prompts with the reference sampler and
with threshold parallel decoding + dual KV cache, printing accuracy, forward passes (NFE) and tokens/s for each.

With `--model`, the same evaluation runs on a real checkpoint (no training): a few chat questions with known
answers, decoded both ways. `--out` then also saves it as a Hub folder and reloads it from there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from modeling_llada_moe.apps.inference import (
    decode_completion,
    encode_prompt,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
)
from modeling_llada_moe.apps.tiny_task import reversal_examples, tiny_model, tiny_tokenizer


# Known-answer questions for a real checkpoint: (question, text the answer must contain).
CHAT_QUESTIONS = [
    ("What is 17 + 25? Answer with the number only.", "42"),
    ("What is the capital of France? Answer with one word.", "Paris"),
    ("How many legs does a spider have? Answer with the number only.", "8"),
    ("Spell the word 'cat' backwards. Answer with the word only.", "tac"),
]
DECODERS = {
    "reference sampler (1 token/step)": dict(),
    "threshold 0.9 + dual cache": dict(threshold=0.9, cache_implementation="dual"),
}


CANVAS = 5  # new tokens decoded per prompt: the four reversed digits and EOS


def train_tiny(out: Path, epochs: int, examples: int) -> None:
    """Fine-tune a tiny random LLaDA-MoE on digit reversal with DiffusionSFTTrainer and save model + tokenizer."""
    from datasets import Dataset

    from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer

    args = DiffusionSFTConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=32,
        num_train_epochs=epochs,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        dataloader_num_workers=0,
    )
    trainer = DiffusionSFTTrainer(
        model=tiny_model(seed=0),
        args=args,
        train_dataset=Dataset.from_list(reversal_examples(examples, seed=0)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    save_model_and_tokenizer(trainer.model, trainer.processing_class, out)  # one all-or-nothing save


def evaluate(
    model, tokenizer, prompts: list[torch.Tensor], answers: list[str], exact: bool = True, **generation
) -> dict[str, dict[str, float]]:
    """Decode every prompt with each decoder: accuracy (exact match, or the answer contained in the reply when not
    `exact`), forward passes per prompt and generated tokens per second."""
    rows = {}
    for name, decoder in DECODERS.items():
        correct, nfe, tokens, seconds = 0, 0, 0, 0.0
        for prompt, answer in zip(prompts, answers):
            start = time.perf_counter()
            out = model.diffusion_generate(
                prompt.to(model.device), return_dict_in_generate=True, **generation, **decoder
            )
            seconds += time.perf_counter() - start
            text = decode_completion(tokenizer, out.sequences[0, prompt.shape[1] :])
            correct += text == answer if exact else answer.lower() in text.lower()
            nfe += int(out.nfe.sum())
            tokens += out.sequences.shape[1] - prompt.shape[1]
        rows[name] = dict(accuracy=correct / len(prompts), nfe=nfe / len(prompts), tokens_per_s=tokens / seconds)
    return rows


def print_table(rows: dict[str, dict[str, float]]) -> None:
    print(f"\n| {'decoding':<34} | accuracy | NFE/prompt | tokens/s |")
    print(f"| {'-' * 34} | -------- | ---------- | -------- |")
    for name, row in rows.items():
        print(f"| {name:<34} | {row['accuracy']:>8.2f} | {row['nfe']:>10.1f} | {row['tokens_per_s']:>8.0f} |")


def run_tiny(out: Path, epochs: int, examples: int) -> None:
    start = time.perf_counter()
    train_tiny(out, epochs, examples)
    print(f"\nfine-tuned a tiny LLaDA-MoE with DiffusionSFTTrainer in {time.perf_counter() - start:.1f} s")
    print(f"saved Hub folder {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")

    # The folder carries its code: where llada-moe is not installed, trust_remote_code runs the folder's copy (here
    # the installed package is imported, and transformers prefers its registered class).
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    print(f"reloaded with AutoModel.from_pretrained(trust_remote_code=True): {type(model).__name__}")

    held_out = reversal_examples(64, seed=999)
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in held_out]
    answers = [row["completion"].strip() for row in held_out]
    print(f'example: "{held_out[0]["prompt"]}" -> expected "{answers[0]}"')
    # The canvas is what training saw: four digits and the EOS after them (LLaDA learns its answer length from that
    # EOS; positions past it are never trained, so what a model writes there would depend on the training seed).
    rows = evaluate(model, tokenizer, prompts, answers, max_new_tokens=CANVAS, block_length=CANVAS)
    print_table(rows)
    out_ids = model.diffusion_generate(
        prompts[0], max_new_tokens=CANVAS, block_length=CANVAS, threshold=0.9, cache_implementation="dual"
    )
    answer = decode_completion(tokenizer, out_ids[0, prompts[0].shape[1] :])
    print(f'\nthreshold + dual cache on the example: "{answer}"')


def run_checkpoint(name: str, out: Path | None, bits: int | None) -> None:
    model, tokenizer = load_model_and_tokenizer(name, bits=bits)
    print(f"loaded {name} on {model.device}")
    if out is not None:
        save_model_and_tokenizer(model, tokenizer, out)
        device = model.device
        del model
        model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype="auto", device_map=device).eval()
        print(f"saved Hub folder {out} and reloaded it with trust_remote_code=True")
    prompts = [encode_prompt(tokenizer, question) for question, _ in CHAT_QUESTIONS]
    answers = [answer for _, answer in CHAT_QUESTIONS]
    rows = evaluate(model, tokenizer, prompts, answers, max_new_tokens=64, block_length=32, exact=False)
    print_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a real checkpoint (Hub id or folder) instead of the tiny demo")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None, help="with --model: bitsandbytes 4/8-bit")
    parser.add_argument("--out", type=Path, default=None, help="where to save the Hub folder (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=5, help="tiny demo: training epochs")
    parser.add_argument("--examples", type=int, default=2000, help="tiny demo: training rows")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.examples < 32:
        parser.error(f"--epochs {args.epochs} / --examples {args.examples}: need >= 1 epoch and >= 32 rows")
    start = time.perf_counter()
    if args.model is None:
        run_tiny(args.out or Path(tempfile.mkdtemp(prefix="llada_moe_quickstart_")), args.epochs, args.examples)
    else:
        run_checkpoint(args.model, args.out, args.bits)
    print(f"\nquickstart finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
