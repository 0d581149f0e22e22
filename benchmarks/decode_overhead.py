"""Host time of the decoding loop outside the model forward: selection, caches, bookkeeping, per step.

    python -m benchmarks.decode_overhead                 # the tiny model and a 1-layer slice of the 7B shape (CPU)
    python -m benchmarks.decode_overhead --device cuda   # the same on a GPU (synchronized around each forward)
    python -m benchmarks.decode_overhead --compile       # also: the loop with `compile_config` (inductor) vs eager

Each `diffusion_generate` call is timed whole, and every forward of the model inside it is timed by forward hooks;
what is left, divided by the number of forwards, is the loop's own cost per step. The 7B slice keeps the official
vocabulary (157,184 logits per position: softmax, confidence and argmax over it are loop work) and hidden size with
one decoder layer, so its forward is a sixteenth of the real one while the loop's work is the same. Medians of
`--repeats` runs after a warm-up (fp32 on CPU, bf16 on a GPU).

`--compile` adds a second table: the whole step (forward and loop) per forward, eager against the forwards compiled by
inductor through `compile_config` (CUDA graphs, `mode="reduce-overhead"`, where no cache is used on a GPU; else
`mode="default"`), the compile itself excluded (a warm-up call), and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import tiny_model


class ForwardTimer:
    """Sums the wall time of the model's forwards (hooks on the top-level module)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device, self.total, self.count, self.start = device, 0.0, 0, 0.0
        self.handles = [
            model.register_forward_pre_hook(self.before),
            model.register_forward_hook(self.after),
        ]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def before(self, *args) -> None:
        self.sync()
        self.start = time.perf_counter()

    def after(self, *args) -> None:
        self.sync()
        self.total += time.perf_counter() - self.start
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(model, prompt, settings: dict, repeats: int) -> dict:
    device = prompt.device
    model.diffusion_generate(prompt, **settings)  # warm-up
    rows = []
    for _ in range(repeats):
        timer = ForwardTimer(model, device)
        timer.sync()
        start = time.perf_counter()
        model.diffusion_generate(prompt, **settings)
        timer.sync()
        total = time.perf_counter() - start
        timer.remove()
        rows.append((total, timer.total, timer.count))
    total, forward, count = (statistics.median(values) for values in zip(*rows))
    return dict(total_ms=total * 1e3, forward_ms=forward * 1e3, forwards=count, host_ms=(total - forward) * 1e3)


MODES = {
    "reference": dict(),
    "threshold 0.9": dict(threshold=0.9),
    "dual cache + threshold 0.9": dict(threshold=0.9, cache_implementation="dual"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--tiny-only", action="store_true", help="skip the 7B-shaped slice (a quick check)")
    parser.add_argument("--compile", action="store_true", help="also time the loop with compile_config (inductor)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {"tiny (hidden 64, 2 layers, 8 experts)": tiny_model(seed=0).to(device)}
    if not args.tiny_only:
        slice_config = LLaDAMoEConfig(num_hidden_layers=1, moe_layer_freq=[1])
        # bf16 on a GPU; fp32 on CPU, where bf16 matmuls are several times slower and would only stretch the run
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        name = f"7B shape, 1 of 16 layers ({'bf16' if dtype == torch.bfloat16 else 'fp32'})"
        models[name] = LLaDAMoEForMaskedLM(slice_config).to(device, dtype)
    print(
        f"# {args.max_new_tokens} new tokens in blocks of {args.block_length}, batch 1, 32-token prompt, "
        f"{args.device}, median of {args.repeats}"
    )
    print("| model | mode | forwards | total ms | forward ms | loop ms per step | loop share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, model in models.items():
        model.eval()
        vocab = min(model.config.vocab_size, 120)
        prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
        for mode, extra in MODES.items():
            settings = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length, **extra)
            with torch.inference_mode():
                row = measure(model, prompt, settings, args.repeats)
            print(
                f"| {name} | {mode} | {row['forwards']:.0f} | {row['total_ms']:.1f} | {row['forward_ms']:.1f} | "
                f"{row['host_ms'] / row['forwards']:.2f} | {row['host_ms'] / row['total_ms']:.0%} |",
                flush=True,
            )
    if args.compile:
        compiled_table(models, args, device)


def timed_generation(model, prompt, settings: dict, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` calls after a warm-up call (which compiles), and the tokens."""
    out = model.diffusion_generate(prompt, **settings)
    times = []
    for _ in range(repeats):
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.diffusion_generate(prompt, **settings)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def compiled_table(models: dict, args, device: torch.device) -> None:
    from transformers import CompileConfig

    print()
    print("| model | mode | compile mode | forwards | eager ms/step | compiled ms/step | speed-up | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, model in models.items():
        vocab = min(model.config.vocab_size, 120)
        prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
        for mode, extra in MODES.items():
            settings = dict(
                max_new_tokens=args.max_new_tokens, block_length=args.block_length, return_dict_in_generate=True,
                **extra,
            )
            cudagraphs = device.type == "cuda" and "cache_implementation" not in extra
            compile_mode = "reduce-overhead" if cudagraphs else "default"
            torch._dynamo.reset()  # each mode compiles its own graphs (dynamo's recompile limit is per function)
            model.__dict__.pop("_compiled_call", None)
            with torch.inference_mode():
                eager_s, eager = timed_generation(model, prompt, settings, args.repeats)
                compiled_s, compiled = timed_generation(
                    model, prompt, dict(settings, compile_config=CompileConfig(mode=compile_mode)), args.repeats
                )
            forwards = int(eager.nfe.max())
            print(
                f"| {name} | {mode} | {compile_mode} | {forwards} | {eager_s / forwards * 1e3:.2f} | "
                f"{compiled_s / forwards * 1e3:.2f} | {eager_s / compiled_s:.2f}x | "
                f"{torch.equal(eager.sequences, compiled.sequences)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
