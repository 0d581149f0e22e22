"""Where one denoising step's time goes: one full forward over a canvas of the 7B shape, by part of the model and by
torch operator.

    python -m benchmarks.profile_step --cache DIR --modes bf16 int4 --positions 64 256
    python -m benchmarks.profile_step --cache DIR --layers 2 --modes nf4     # a 2-layer slice of the 7B shape

The checkpoint is the random one `benchmarks/scale.py` writes (written here too when `--cache` lacks it). Each mode
runs in its own process: load, one warm-up forward (page-in and first-call costs are not a step's), then `--steps`
forwards timed part by part (wall time between forward hooks of the attention blocks, the router, the experts and
`lm_head`; "rest" is the step minus those: embeddings, norms, rotary, residuals) and one under `torch.profiler` for
the operator table. Threads: `--threads` (default 2, as `benchmarks/peers.py`). Not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


MODES = ("bf16", "int8", "nf4", "int4")
PARTS = ("attention", "router", "experts", "lm_head")


def load(folder: Path, mode: str):
    from modeling_llada_moe import LLaDAMoEForMaskedLM

    if mode == "bf16":
        return LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu").eval()
    from quantization import load_quantized

    if mode == "int4":
        return load_quantized(folder, bits=4, method="int4", device_map="cpu")
    return load_quantized(folder, bits=8 if mode == "int8" else 4, device_map="cpu")


class PartTimer:
    """Wall time spent inside modules of each part, from forward pre/post hooks."""

    def __init__(self, model):
        from modeling_llada_moe.modeling_llada_moe import LLaDAMoEAttention, LLaDAMoEExperts, LLaDAMoETopKRouter

        kinds = {LLaDAMoEAttention: "attention", LLaDAMoETopKRouter: "router", LLaDAMoEExperts: "experts"}
        self.totals = dict.fromkeys(PARTS, 0.0)
        for module in model.modules():
            part = next((name for kind, name in kinds.items() if isinstance(module, kind)), None)
            if module is model.lm_head:
                part = "lm_head"
            if part is not None:
                module.register_forward_pre_hook(self._start)
                module.register_forward_hook(lambda mod, args, out, part=part: self._stop(mod, part))

    def _start(self, module, args) -> None:
        module._profile_start = time.perf_counter()

    def _stop(self, module, part: str) -> None:
        self.totals[part] += time.perf_counter() - module._profile_start

    def reset(self) -> None:
        self.totals = dict.fromkeys(PARTS, 0.0)


def measure(folder: Path, mode: str, positions: list[int], steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load(folder, mode)
    timer = PartTimer(model)
    vocabulary = min(150000, model.config.pad_token_id)
    rows = []
    for count in positions:
        ids = torch.randint(0, vocabulary, (1, count))
        with torch.inference_mode():
            model(ids)
            step_times, parts = [], []
            for _ in range(steps):
                timer.reset()
                start = time.perf_counter()
                model(ids)
                step_times.append(time.perf_counter() - start)
                parts.append(dict(timer.totals))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                model(ids)
        step = statistics.median(step_times)
        part_s = {name: statistics.median(p[name] for p in parts) for name in PARTS}
        part_s["rest"] = max(step - sum(part_s.values()), 0.0)
        events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        total = sum(event.self_cpu_time_total for event in events) or 1
        operators = [
            (event.key, event.self_cpu_time_total / 1e6, event.self_cpu_time_total / total, event.count)
            for event in events[:10]
        ]
        rows.append(dict(positions=count, step_s=step, parts=part_s, operators=operators))
    return dict(mode=mode, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="folder of benchmarks/scale.py's random checkpoint")
    parser.add_argument("--layers", type=int, default=16, help="layers of the 7B shape (16 = the full model)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["bf16", "int4"])
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 256], help="canvas lengths")
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per canvas (the median is shown)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    from benchmarks.scale import write_checkpoint

    folder = args.cache / f"llada-moe-7b-a1b-random-{args.layers}-layers"
    if args.measure:
        print(json.dumps(measure(folder, args.measure, args.positions, args.steps, args.threads)))
        return
    if not (folder / "parameters.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint(folder, args.layers)
    for mode in args.modes:
        command = [sys.executable, "-m", "benchmarks.profile_step", *sys.argv[1:], "--measure", mode]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(f"{mode}: failed\n{result.stderr[-3000:]}")
            continue
        report = json.loads(result.stdout.strip().splitlines()[-1])
        for row in report["rows"]:
            step = row["step_s"]
            print(f"\n### {mode}, {row['positions']} positions, {args.layers} layers, {args.threads} threads: "
                  f"{step:.3f} s per step (median of {args.steps})\n")
            print("| part | s | share |\n| --- | --- | --- |")
            for name, seconds in row["parts"].items():
                print(f"| {name} | {seconds:.3f} | {seconds / step:.0%} |")
            print("\n| operator (self time, one step under the profiler) | s | share | calls |")
            print("| --- | --- | --- | --- |")
            for name, seconds, share, calls in row["operators"]:
                print(f"| {name} | {seconds:.3f} | {share:.0%} | {calls} |")


if __name__ == "__main__":
    main()
