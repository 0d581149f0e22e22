"""Real scale: a random checkpoint of the official 7B-A1B shape and layout, loaded in bf16 / int8 / nf4 and measured.

    python -m benchmarks.scale --cache ~/.cache/llada_moe/scale            # writes ~14.7 GB once, then measures (CPU)
    python -m benchmarks.scale --cache DIR --modes bf16 nf4 --device cuda  # the same on a GPU
    python -m benchmarks.scale --cache DIR --layers 2                      # a 2-layer slice of the 7B shape
    python -m benchmarks.scale --cache DIR --layers 1 --smoke              # a narrow slice: checks the script runs
    python -m benchmarks.scale --cache DIR --modes sft-qlora vrpo-qlora grpo-qlora --device cuda  # QLoRA steps

The checkpoint (written once per `--layers`, seeded) has the official layout: per-expert keys, `model_type: "llada"`,
bf16 safetensors shards; with all 16 layers it holds the official 7,356,880,896 parameters. Each mode is measured in
its own process: load time, peak ANONYMOUS memory during the load (RssAnon sampled every 10 ms: mmapped safetensors
pages are reclaimable and not counted; on a GPU the CUDA allocator's peak), `memory_report` against
`estimate_memory`, one forward of 64 tokens, `diffusion_generate` of 8 new tokens in 2 steps with the dual cache, and
32 new tokens (one block, 8 steps, dual cache) as tokens/s; quantized modes also without the expert cache
(`expert_cache_bytes=0`: every step dequantizes the experts it routes to). `nf4-bnb` loads with bitsandbytes' own CPU
quantization kernel instead of `quantization.fast_quantize` (the baseline; the model is byte-identical, so only its
load is measured). Times are single runs (minutes each at full size): read the ratios against bf16 in the same run.

The training modes (`sft-qlora`, `vrpo-qlora`, `grpo-qlora`, a second table) each time one optimizer step
(`max_steps=1`) of the real trainer under QLoRA: the NF4 base of `load_quantized(bits=4)`, `prepare_for_qlora` with
LoRA r=16 on q/k/v/o, gradient checkpointing, on synthetic rows of 64 prompt + 64 completion tokens of a word-level
tokenizer whose ids fit the checkpoint's vocabulary (it ships none; EOS and mask are the config's). SFT: 4 rows;
VRPO: 1 pair with its default 8 masked copies per side, the reference being the adapter-disabled base; GRPO: 1
prompt x 4 completions of 64 tokens (2 blocks of 32, 8 steps, rollout expert cache off), the d1 estimator, a reward
that varies under a random model (the fraction of even ids). Each row: trainable parameters, load and step seconds
(GRPO's rollout part as the trainer logs it), and the peak memory over load + step (CUDA allocator peak, or peak
anonymous RSS), so one can read what fits a 24 GB GPU.

Not in CI at full size: a 1-layer slice alone is ~2 GB (the 157k-token embedding and lm_head are 1.3 GB) and takes
minutes. `--smoke` narrows the layers instead (`SMOKE`: hidden 256, expert intermediate 128, 16 experts, a
4096-token vocabulary with the special tokens moved inside it; 16 heads and top-8 kept) and the training rows (16 +
16 tokens, 2 VRPO masks, 2 rollout steps), so the whole script runs in seconds; the tests run it to keep it from
rotting (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


MODES = ("bf16", "int8", "nf4", "nf4-bnb", "int4")  # nf4-bnb: bitsandbytes' own CPU quantizer (load only); int4: CPU
TRAINING_MODES = ("sft-qlora", "vrpo-qlora", "grpo-qlora")  # one QLoRA optimizer step of each trainer
PROMPT_TOKENS, COMPLETION_TOKENS = 64, 64  # training sequences of 128 tokens
LORA_R = 16
MiB = 2**20
# --smoke: narrow layers (the official model: hidden 2048, expert intermediate 1024, 64 experts, 157,184 tokens)
SMOKE = dict(hidden_size=256, expert_intermediate_size=128, num_experts=16, vocab_size=4096)


def rss_anon() -> int:
    """Anonymous resident bytes of this process (not the file pages of mmapped safetensors)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class PeakAnon:
    """Peak anonymous memory of the process while the block runs, sampled every 10 ms."""

    def __enter__(self) -> PeakAnon:
        self.peak, self.running = rss_anon(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_anon())


def write_checkpoint(folder: Path, layers: int, seed: int = 0, smoke: bool = False) -> None:
    """A random bf16 LLaDA-MoE of the official shape (first `layers` layers) saved in the official layout; `smoke`:
    narrowed to `SMOKE`."""
    from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM

    narrow = {}
    if smoke:  # the official special tokens sit 292 / 289 below the vocabulary's end: kept there
        eos = SMOKE["vocab_size"] - 292
        narrow = dict(SMOKE, pad_token_id=eos, eos_token_id=eos, mask_token_id=SMOKE["vocab_size"] - 289)
    config = LLaDAMoEConfig(num_hidden_layers=layers, moe_layer_freq=[1] * layers, **narrow)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built directly in bf16: an fp32 copy of the 7B would not fit in 24 GB
    try:
        model = LLaDAMoEForMaskedLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")  # per-expert keys, as the official checkpoint
    del model
    official_layout(folder, torch_dtype="bfloat16")
    (folder / "parameters.txt").write_text(f"{parameters}\n")


def official_layout(folder: Path, **fields) -> None:
    """Turn a folder `save_pretrained` wrote into the official checkpoint's layout: `model_type: "llada"`, the
    official architectures name, no `auto_map`, no model code or card; `fields` are set in config.json too."""
    saved = json.loads((folder / "config.json").read_text())
    saved.update(model_type="llada", architectures=["LLaDAMoEModelLM"], **fields)
    saved.pop("auto_map", None)  # the official folder's auto_map names its own remote code, not ours
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    for extra in [*folder.glob("*.py"), folder / "README.md"]:
        extra.unlink(missing_ok=True)


def measure(folder: Path, mode: str, device: str) -> dict:
    """One mode's figures, measured in this (fresh) process."""
    from modeling_llada_moe import LLaDAMoEForMaskedLM
    from quantization import estimate_memory, load_quantized, memory_report

    torch.manual_seed(0)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if mode == "nf4-bnb":
        os.environ["LLADA_MOE_FAST_QUANTIZE"] = "0"
    start = time.perf_counter()
    with PeakAnon() as anon:
        if mode == "bf16":
            model = LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device).eval()
        else:
            method = {"int8": "int8", "int4": "int4"}.get(mode, "nf4")
            model = load_quantized(folder, bits=8 if mode == "int8" else 4, method=method, device_map=device)
    load_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else anon.peak
    bits = None if mode == "bf16" else 8 if mode == "int8" else 4
    method = {"bf16": None, "int8": "int8", "int4": "int4"}.get(mode, "nf4")
    report = memory_report(model)
    estimate = estimate_memory(model.config, bits, torch.bfloat16, method=method)
    figures = dict(
        mode=mode, load_s=load_s, peak_mib=peak / MiB, weights_mib=report.total / MiB, estimate_mib=estimate.total / MiB
    )
    if mode == "nf4-bnb":
        return figures
    ids = torch.randint(0, min(150000, model.config.pad_token_id), (1, 64), device=device)  # no special tokens
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids)
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model.diffusion_generate(
            ids[:, :32], max_new_tokens=8, block_length=8, steps=2, cache_implementation="dual",
            return_dict_in_generate=True,
        )
        generate_s = time.perf_counter() - start
        figures.update(forward_s=forward_s, generate_s=generate_s, nfe=float(out.nfe.float().mean()))
        for cache in ("", "_nocache") if mode != "bf16" else ("",):
            model.expert_cache_bytes = 0 if cache else None
            start = time.perf_counter()
            model.diffusion_generate(
                ids[:, :32], max_new_tokens=32, block_length=32, steps=8, cache_implementation="dual"
            )
            figures[f"tokens_per_s{cache}"] = 32 / (time.perf_counter() - start)
    return figures


def word_tokenizer(config):
    """A word-level tokenizer that fits the checkpoint's vocabulary (it ships none): "t0".."t255" are ids 0..255,
    "<eos>" (also the pad) and "<mask>" are the config's EOS and mask ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)} | {"<eos>": config.eos_token_id, "<mask>": config.mask_token_id}
    backend = Tokenizer(WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<eos>", eos_token="<eos>", mask_token="<mask>", unk_token="t0"
    )


def words(count: int, rng) -> str:
    return " ".join(f"t{rng.randrange(1, 256)}" for _ in range(count))


def even_ids(completions, completion_ids, **kwargs) -> list[float]:
    """GRPO reward: the fraction of even ids in a completion (varies under a random model, so advantages are not 0)."""
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def measure_training(folder: Path, mode: str, device: str, smoke: bool = False) -> dict:
    """One QLoRA optimizer step (NF4 base, LoRA r=16 on the attention projections, gradient checkpointing) of the
    real trainer on synthetic 64 + 64-token rows: seconds, peak memory over load + step, trainable parameters.
    `smoke`: 16 + 16 tokens, 2 VRPO masks, 2 rollout steps (only checks that every trainer runs)."""
    with tempfile.TemporaryDirectory(prefix="scale-") as output_dir:
        return train_one_step(folder, mode, device, output_dir, smoke)


def train_one_step(folder: Path, mode: str, device: str, output_dir: str, smoke: bool) -> dict:
    import random

    from datasets import Dataset
    from peft import LoraConfig

    from quantization import load_quantized, prepare_for_qlora
    from quantization.qlora import ATTENTION_TARGETS
    from trl_ext import (
        DiffusionGRPOConfig,
        DiffusionGRPOTrainer,
        DiffusionSFTConfig,
        DiffusionSFTTrainer,
        VRPOConfig,
        VRPOTrainer,
    )

    torch.manual_seed(0)
    rng = random.Random(0)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        output_dir=output_dir, max_steps=1, learning_rate=1e-4, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, seed=0,
    )
    with PeakAnon() as anon:
        start = time.perf_counter()
        model = load_quantized(folder, bits=4, device_map=device)
        # Rollouts would keep dense copies of the experts they dequantize, within half the free memory (expert_cache):
        # off, so the peak is what the step needs, not a budget that grows with the free memory.
        model.expert_cache_bytes = 0
        model = prepare_for_qlora(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=ATTENTION_TARGETS))
        load_s = time.perf_counter() - start
        load_peak = torch.cuda.max_memory_allocated() if on_gpu else anon.peak
        tokenizer = word_tokenizer(model.config)
        prompt_tokens, completion_tokens = (16, 16) if smoke else (PROMPT_TOKENS, COMPLETION_TOKENS)
        prompt = lambda: words(prompt_tokens, rng)  # noqa: E731
        completion = lambda: " " + words(completion_tokens - 1, rng)  # noqa: E731  (the trainers append the EOS)
        if mode == "sft-qlora":
            batch = "4 rows"
            data = Dataset.from_list([{"prompt": prompt(), "completion": completion()} for _ in range(4)])
            trainer = DiffusionSFTTrainer(
                model=model, args=DiffusionSFTConfig(per_device_train_batch_size=4, **common), train_dataset=data,
                processing_class=tokenizer,
            )
        elif mode == "vrpo-qlora":
            args = VRPOConfig(per_device_train_batch_size=1, **common, **(dict(num_mc_samples=2) if smoke else {}))
            batch = f"1 pair x {args.num_mc_samples} masks"
            data = Dataset.from_list([{"prompt": prompt(), "chosen": completion(), "rejected": completion()}])
            trainer = VRPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
        else:
            args = DiffusionGRPOConfig(
                per_device_train_batch_size=4, num_generations=4, max_completion_length=completion_tokens,
                block_length=completion_tokens // 2, diffusion_steps=2 if smoke else 8, **common,
            )
            batch = "1 prompt x 4 completions"
            data = Dataset.from_list([{"prompt": prompt()} for _ in range(4)])
            trainer = DiffusionGRPOTrainer(
                model, reward_funcs=even_ids, args=args, train_dataset=data, processing_class=tokenizer
            )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        if on_gpu:
            torch.cuda.synchronize()
        step_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else anon.peak
    logs = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    figures = dict(
        mode=mode, batch=batch, tokens=f"{prompt_tokens} + {completion_tokens}", load_s=load_s, step_s=step_s,
        peak_mib=peak / MiB, load_peak_mib=load_peak / MiB, trainable=trainable,
        loss=logs["train_loss"],
    )
    if "rollout/seconds" in logs:
        figures["rollout_s"] = logs["rollout/seconds"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="folder for the random checkpoint (~14.7 GB)")
    parser.add_argument("--layers", type=int, default=16, help="layers of the 7B shape to keep (16 = the full model)")
    parser.add_argument("--modes", nargs="+", choices=MODES + TRAINING_MODES, default=list(MODES + TRAINING_MODES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="narrow layers (hidden 256, 16 experts, 4096 tokens): checks that the script runs, figures mean nothing",
    )
    parser.add_argument("--measure", choices=MODES + TRAINING_MODES, help=argparse.SUPPRESS)  # one mode, in a child
    args = parser.parse_args()
    if not 1 <= args.layers <= 16:
        parser.error(f"--layers {args.layers}: expected 1 to 16 (the official model has 16)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    folder = args.cache / f"llada-moe-7b-a1b-random-{args.layers}-layers{'-smoke' if args.smoke else ''}"
    if args.measure:
        if args.measure in TRAINING_MODES:
            print(json.dumps(measure_training(folder, args.measure, args.device, smoke=args.smoke)))
        else:
            print(json.dumps(measure(folder, args.measure, args.device)))
        return
    if not (folder / "parameters.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_checkpoint(folder, args.layers, smoke=args.smoke)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    parameters = int((folder / "parameters.txt").read_text())
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 2**30
    print(f"# {folder.name}: {parameters:,} parameters, {size:.2f} GiB of safetensors; device {args.device}")
    rows = []
    for mode in args.modes:
        command = [sys.executable, "-m", "benchmarks.scale", "--cache", str(args.cache), "--layers", str(args.layers)]
        command += ["--smoke"] if args.smoke else []
        done = subprocess.run([*command, "--device", args.device, "--measure", mode], capture_output=True, text=True)
        if done.returncode:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    training = [row for row in rows if row["mode"] in TRAINING_MODES]
    rows = [row for row in rows if row["mode"] in MODES]
    peak = "peak GPU MiB" if args.device.startswith("cuda") else "peak anon MiB"
    if rows:
        print_load_table(rows, peak)
    if training:
        print_training_table(training, peak)


def print_training_table(rows: list[dict], peak: str) -> None:
    print(f"\n## One QLoRA step (NF4 base, LoRA r={LORA_R} on q/k/v/o, gradient checkpointing)\n")
    print(f"| mode | batch | tokens (prompt + completion) | trainable params | load s | step s | of which rollout s | "
          f"{peak}: load + step (load alone) | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        rollout = f"{row['rollout_s']:.2f}" if "rollout_s" in row else "–"
        print(
            f"| {row['mode']} | {row['batch']} | {row['tokens']} | {row['trainable']:,} | {row['load_s']:.2f} | "
            f"{row['step_s']:.2f} | "
            f"{rollout} | {row['peak_mib']:.0f} ({row['load_peak_mib']:.0f}) | {row['loss']:.4g} |"
        )


def print_load_table(rows: list[dict], peak: str) -> None:
    base = next((row for row in rows if row["mode"] == "bf16"), None)
    print(
        f"| mode | load s | {peak} (x weights) | weights MiB (report / estimate) | forward 64 tok s | "
        "generate 8 tok s (NFE) | 32 new tokens: tok/s | without expert cache: tok/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def ratio(row: dict, key: str) -> str:
        if key not in row:
            return "–"
        value = f"{row[key]:.2f}"
        return f"{value} ({row[key] / base[key]:.2f}x)" if base and row is not base and key in base else value

    for row in rows:
        peak_ratio = row["peak_mib"] / row["weights_mib"]
        nfe = f" ({row['nfe']:.0f})" if "nfe" in row else ""
        print(
            f"| {row['mode']} | {ratio(row, 'load_s')} | {row['peak_mib']:.0f} ({peak_ratio:.2f}x) | "
            f"{row['weights_mib']:.0f} / {row['estimate_mib']:.0f} | {ratio(row, 'forward_s')} | "
            f"{ratio(row, 'generate_s')}{nfe} | {ratio(row, 'tokens_per_s')} | {ratio(row, 'tokens_per_s_nocache')} |"
        )


if __name__ == "__main__":
    main()
