"""The GPU suite: one command that runs the GPU tests and the GPU benchmarks and writes one markdown report.

    python -m benchmarks.gpu_suite --out gpu_report.md      # one H100/H200, about 6-8 minutes
    python -m benchmarks.gpu_suite --smoke --out report.md  # CPU, tiny shapes: checks that every section runs

Sections, each in its own process with its own time limit (a failure or time-out is written into the report and
the suite goes on):

1. `pytest -m gpu` (CUDA tests: bf16 backends, fused kernels at the 7B shape, the compiled sampling loop).
2. The MoE block per backend (`benchmarks/moe.py`: eager, grouped_mm, batched_mm, llada_fused; bf16 and NF4) at
   1/32/64/128/256 tokens, with achieved weight GB/s against the device's HBM peak.
3. The random 7B-A1B-shaped bf16 model: latency of one denoising step with no cache, the prefix cache and the dual
   cache, against the weight-bandwidth roofline (bytes of the weights one forward must read / HBM peak).
4. Decoding throughput (`benchmarks/generation.py --device cuda`) at batch 1 and 8: reference sampler vs k tokens per
   step with and without caches.
5. NF4: the 7B shape quantized while loading (`quantization.load_quantized`), its weight bytes against
   `estimate_memory`, and the peak GPU memory of loading and of a 32-token generation with the dual cache.
6. The decoding loop's host time per step (`benchmarks/decode_overhead.py --tiny-only --compile`), and eager against
   `compile_config` (inductor; CUDA graphs where no cache is used) with token identity.

On the `device` tool (the image has torch and an older transformers, no trl/bitsandbytes): see the README's
"GPU suite" section for the command and the wheels to carry.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_llada_moe.apps.timing import timed  # median seconds of a call after a warm-up, CUDA-synchronised


ROOT = Path(__file__).resolve().parent.parent
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}  # as benchmarks/moe.py


def peak_bytes_per_second(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tbps * 1e12 for key, tbps in PEAK_TBPS.items() if key in name), None)


def build_model(smoke: bool, device: torch.device):
    from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
    from modeling_llada_moe.apps.tiny_task import tiny_config

    torch.manual_seed(0)
    config = tiny_config() if smoke else LLaDAMoEConfig()
    with torch.device(device):
        model = LLaDAMoEForMaskedLM(config)
    return model.to(torch.float32 if device.type == "cpu" else torch.bfloat16).eval()


def weight_bytes_read(model, tokens: int) -> int:
    """Bytes one forward over `tokens` positions must read: every non-expert weight, and the experts a uniform
    top-k routing is expected to hit in each MoE layer (E * (1 - (1 - k/E)^tokens))."""
    config = model.config
    experts_bytes, other = 0, 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if ".mlp.experts." in name:
            experts_bytes += size
        else:
            other += size
    moe_layers = sum(1 for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    per_expert = experts_bytes / max(moe_layers * config.num_experts, 1)
    hit = config.num_experts * (1 - (1 - config.num_experts_per_tok / config.num_experts) ** tokens)
    return int(other + moe_layers * hit * per_expert)


def block_steps(args) -> None:
    """Section 3: ms per denoising step of the 7B shape (batch 1), no cache / prefix / dual, against the roofline."""
    device = torch.device(args.device)
    model = build_model(args.smoke, device)
    prompt_len, canvas = (8, 8) if args.smoke else (128, 32)
    prompt = torch.randint(0, model.config.vocab_size - 2, (1, prompt_len), device=device)
    peak = peak_bytes_per_second(device)
    print(f"{model.config.num_hidden_layers} layers, prompt {prompt_len}, one block of {canvas}, one token per step")
    print("| cache | positions per forward | ms per step (median) | roofline ms | % of roofline |")
    print("| --- | --- | --- | --- | --- |")
    for mode, positions in ((None, prompt_len + canvas), ("prefix", canvas), ("dual", canvas)):
        kwargs = dict(max_new_tokens=canvas, block_length=canvas, steps=canvas, cache_implementation=mode)
        with torch.inference_mode():
            seconds, out = timed(
                lambda kwargs=kwargs: model.diffusion_generate(prompt, return_dict_in_generate=True, **kwargs),
                device,
                args.repeats,
            )
        step_ms = 1e3 * seconds / out.nfe.float().mean().item()
        roofline_ms = 1e3 * weight_bytes_read(model, positions) / peak if peak else math.nan
        share = f"{100 * roofline_ms / step_ms:.0f}%" if peak else "n/a"
        print(f"| {mode or 'none'} | {positions} | {step_ms:.2f} | {roofline_ms:.2f} | {share} |")


def nf4_memory(args) -> None:
    """Section 5: NF4 load of the 7B shape; weight bytes vs estimate; peak GPU memory of loading and generating."""
    from quantization import estimate_memory, load_quantized, memory_report

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        model = build_model(args.smoke, torch.device("cpu") if args.smoke else device)
        model.save_pretrained(folder)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load_quantized(folder, bits=4, device_map=args.device)
        load_s = time.perf_counter() - start
    load_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    report, estimate = memory_report(model), estimate_memory(model.config, 4, model.dtype)
    prompt = torch.randint(0, model.config.vocab_size - 2, (1, 8 if args.smoke else 128), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model.diffusion_generate(
            prompt, max_new_tokens=32, block_length=32, threshold=0.9, cache_implementation="dual",
            return_dict_in_generate=True,
        )
    generate_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    mib = 2**20
    print("| what | MiB |")
    print("| --- | --- |")
    print(f"| NF4 weights + quantization state (memory_report) | {report.total / mib:.1f} |")
    print(f"| estimate_memory(config, 4) | {estimate.total / mib:.1f} |")
    print(f"| peak allocated while loading ({load_s:.1f} s) | {load_peak / mib:.1f} |")
    print(f"| peak allocated generating 32 tokens, dual cache ({out.nfe.float().mean():.0f} forwards) | "
          f"{generate_peak / mib:.1f} |")


SECTIONS = {"block-steps": block_steps, "nf4-memory": nf4_memory}


def plan(args) -> list[tuple[str, list[str], int]]:
    """(title, command, seconds allowed) of every section, in order."""
    here = [sys.executable, "-m", "benchmarks.gpu_suite", "--device", args.device, "--repeats", str(args.repeats)]
    here += ["--scratch", args.scratch] + (["--smoke"] if args.smoke else [])
    # The GPU-marked tests that need no trl (the device image has none): CUDA backends and the fused kernels.
    tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs"]
    tests += ["tests/test_gpu.py", "tests/test_fused_moe.py", "tests/test_compiled_decoding.py"]
    moe = [sys.executable, "-m", "benchmarks.moe", "--tokens", "1", "32", "64", "128", "256", "--repeats", "20"]
    generation = [sys.executable, "-m", "benchmarks.generation", "--device", args.device, "--max-new-tokens", "64"]
    generation += ["--block-length", "32", "--prompt-length", "128", "--repeats", str(args.repeats)]
    overhead = [sys.executable, "-m", "benchmarks.decode_overhead", "--device", args.device, "--tiny-only", "--compile"]
    return [
        ("GPU tests (`pytest -m gpu`)", tests, 240),
        ("MoE block per backend (benchmarks/moe.py)", moe, 120),
        ("7B-shaped model: a denoising step vs the weight-bandwidth roofline", here + ["--section", "block-steps"], 90),
        ("Decoding throughput, batch 1", generation + ["--batch", "1"], 75),
        ("Decoding throughput, batch 8", generation + ["--batch", "8"], 75),
        ("NF4 7B: weights and peak GPU memory", here + ["--section", "nf4-memory"], 150),
        ("Decoding loop: host overhead, eager vs compiled (tiny model)", overhead, 150),
    ]


def run_suite(args) -> int:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: tiny shapes)"
    lines = [
        "# llada-moe GPU suite",
        "",
        f"device: {name}; torch {torch.__version__}; started {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    failures = 0
    for title, command, limit in plan(args):
        if args.smoke and ("moe.py" in title or "throughput" in title or "compiled" in title):
            lines += ["", f"## {title}", "", "skipped in a smoke run (needs CUDA)"]
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            output = done.stdout + (done.stderr[-3000:] if done.returncode else "")
        except subprocess.TimeoutExpired as expired:
            status, output = f"timed out after {limit} s", (expired.stdout or b"").decode(errors="replace")
        failures += status != "ok"
        seconds = time.perf_counter() - start
        lines += ["", f"## {title}", "", f"{status}, {seconds:.0f} s: `{' '.join(command[1:])}`", "", output.strip()]
        print(f"{title}: {status} ({seconds:.0f} s)", flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"report: {args.out} ({failures} section(s) failed)")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_report.md", help="markdown report path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for checking the suite without a GPU")
    parser.add_argument("--scratch", default=os.environ.get("TMPDIR", tempfile.gettempdir()),
                        help="folder for the temporary 7B checkpoint of the NF4 section (needs ~15 GB)")
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected a positive number of runs")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --smoke on a CPU)")
    if args.section:
        SECTIONS[args.section](args)
        return
    sys.exit(run_suite(args))


if __name__ == "__main__":
    main()
