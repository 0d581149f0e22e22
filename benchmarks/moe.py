"""Per-layer latency and weight bandwidth of the MoE experts implementations, bf16 and NF4, on one 7B-shaped layer.

One `LLaDAMoEExperts` built from `LLaDAMoEConfig()` defaults (H 2048, I 1024, 64 experts, top-8) with random bf16
weights and random softmax routing, at several token counts. Each implementation is timed with CUDA events (median of
`--repeats` runs after `--warmup` runs). Weight bandwidth = bytes of the distinct experts the routing hits (what an
ideal kernel must read once) / time, also as a fraction of the device's peak HBM bandwidth (`--peak-tbps`; defaults
H100 3.35, H200 4.8 TB/s by device name).

    python benchmarks/moe.py                                  # tokens 1 32 256 2048 16384
    python benchmarks/moe.py --tokens 1 64 512 --repeats 200
    python benchmarks/moe.py --no-nf4 --peak-tbps 2.0         # e.g. an H100 PCIe
    python -m benchmarks.moe --tiny --tokens 1 7 --repeats 1  # smoke run of every row; also on CPU (see below)

bf16: eager (per-expert loop), grouped_mm, batched_mm (skipped when its per-slot weight gather would exceed
`--batched-mm-limit-gib`) and llada_fused (`fused_moe_experts_forward`).
NF4 (bitsandbytes, blocksize 64; `--double-quant` for the nested absmax): llada_fused reading the packed weights vs
dequantize + grouped_mm (both stacks dequantized by bitsandbytes every call), plus `grouped_mm_chunked` (dequantizes
8 experts at a time) when the modeling file registers it. The `max err` column compares llada_fused with the
grouped_mm row of the same table.

Needs CUDA and triton (bitsandbytes for the NF4 table). Without CUDA it prints a message and exits 0: the Triton
interpreter runs the kernels on CPU, but far too slowly to time. `--tiny` (a smoke run that keeps the script from
rotting; its figures mean nothing) measures a tiny layer (H 128, I 64, 8 experts, top-2) instead, and without CUDA runs
it on CPU: float32 (the interpreter cannot do bf16), wall-clock timing, llada_fused in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    batched_mm_experts_forward,
    grouped_mm_experts_forward,
)

from modeling_llada_moe import LLaDAMoEConfig
from modeling_llada_moe.modeling_llada_moe import LLaDAMoEExperts


PEAK_TBPS = {"H200": 4.8, "H100": 3.35}  # HBM3e / HBM3 (SXM); an H100 PCIe has 2.0: pass --peak-tbps


def peak_bandwidth(override: float | None) -> float | None:
    """Peak HBM bandwidth in bytes/s: the argument, else a default for the detected device, else None."""
    if override is not None:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps * 1e12
    return None


def time_ms(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` runs, each timed by its own pair of CUDA events (by the wall clock
    without CUDA: `--tiny` on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class DequantizedView:
    """What transformers' grouped_mm reads (`gate_up_proj`, `down_proj`, gate flags), dequantizing the 4-bit
    containers with bitsandbytes on every access: the "dequantize + grouped_mm" baseline."""

    has_gate, has_bias, is_transposed, has_post_expert_norm, _is_expert_parallel = True, False, False, False, False

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype):
        self.experts, self.dtype = experts, dtype
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn

    def _dense(self, linear: torch.nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).to(self.dtype)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._dense(self.experts.gate_up).view(self.num_experts, -1, self.experts.hidden_dim)

    @property
    def down_proj(self) -> torch.Tensor:
        return self._dense(self.experts.down).view(self.num_experts, self.experts.hidden_dim, -1)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def quantized_copy(experts: LLaDAMoEExperts, config: LLaDAMoEConfig, double_quant: bool) -> LLaDAMoEExperts:
    """The experts with both containers as NF4 `Linear4bit` (quantized on the GPU), as a bnb-loaded model has them."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        quantized = LLaDAMoEExperts(config)
    for name in ("gate_up", "down"):
        dense = getattr(experts, name)
        packed, state = bnb.functional.quantize_4bit(
            dense.weight.data, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        linear = bnb.nn.Linear4bit(
            dense.in_features,
            dense.out_features,
            bias=False,
            compute_dtype=dense.weight.dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        linear.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=64,
            compress_statistics=double_quant,
            quant_type="nf4",
            bnb_quantized=True,
            module=linear,
        )
        setattr(quantized, name, linear)
    return quantized.eval()


HEADER = (
    f"{'tokens':>6} | {'implementation':<22} | {'median ms':>9} | {'speedup':>7} | {'hit':>4} | {'GB/s':>8} | "
    f"{'%peak':>6} | {'max err':>8} | note"
)
# (name, fn(x, top_k_index, top_k_weights) or None when unavailable, reason to skip at a token count or None)
Impl = tuple[str, "Callable | None", "Callable[[int], str | None] | None"]


def print_row(tokens: int, name: str, ms: float | None, base_ms: float | None, error: str, note: str, **bw) -> None:
    if ms is None:
        cells = f"{'skipped':>9} | {'':>7} | {bw['hit']:>4} | {'':>8} | {'':>6} | {'':>8}"
    else:
        bandwidth = bw["weight_bytes"] / (ms * 1e-3)
        fraction = f"{100 * bandwidth / bw['peak']:5.1f}%" if bw["peak"] else "   n/a"
        cells = (
            f"{ms:>9.3f} | {base_ms / ms:>6.2f}x | {bw['hit']:>4} | {bandwidth / 1e9:>8.0f} | {fraction} | {error:>8}"
        )
    print(f"{tokens:>6} | {name:<22} | {cells} | {note}")


def run_table(title: str, impls: list[Impl], inputs: dict, bytes_per_expert: int, peak: float | None, args) -> None:
    """Time every implementation at every token count and print one row each. The speedup is against the first
    timed row of a token count; `max err` compares llada_fused with the first grouped_mm row."""
    print(f"\n## {title}")
    print(HEADER)
    print("-" * len(HEADER))
    with torch.inference_mode():
        for tokens, (x, index, weights, hit) in inputs.items():
            base_ms = reference = None
            for name, fn, skip in impls:
                bw = dict(hit=hit, weight_bytes=hit * bytes_per_expert, peak=peak)
                reason = "triton not installed" if fn is None else skip(tokens) if skip else None
                if reason:
                    print_row(tokens, name, None, None, "", reason, **bw)
                    continue
                ms = time_ms(lambda fn=fn, x=x, i=index, w=weights: fn(x, i, w), args.warmup, args.repeats)
                out = fn(x, index, weights)
                base_ms = base_ms or ms
                error = ""
                if "grouped_mm" in name and reference is None:
                    reference = out
                elif "llada_fused" in name and reference is not None:
                    error = f"{(out.float() - reference.float()).abs().max().item():.2e}"
                print_row(tokens, name, ms, base_ms, error, "", **bw)
                del out
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256, 2048, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tbps", type=float, default=None, help="peak HBM bandwidth in TB/s (default by name)")
    parser.add_argument("--batched-mm-limit-gib", type=float, default=16.0, help="skip batched_mm above this gather")
    parser.add_argument("--no-nf4", action="store_true", help="skip the NF4 table")
    parser.add_argument("--double-quant", action="store_true", help="NF4 with double-quantized absmax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny layer, on CPU without CUDA (a smoke run: figures mean nothing)"
    )
    args = parser.parse_args()

    on_cpu = not torch.cuda.is_available()
    if on_cpu and not args.tiny:
        print(
            "benchmarks/moe.py: no CUDA device. The fused Triton kernels only run in the Triton interpreter on CPU, "
            "which is far too slow to time; nothing measured (--tiny runs a tiny layer on CPU)."
        )
        return
    if on_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before fused_moe decorates its kernels: they then run on CPU tensors
    try:
        import triton  # noqa: F401

        from modeling_llada_moe.fused_moe import fused_moe_experts_forward as fused
    except ImportError:
        fused = None

    torch.manual_seed(args.seed)
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if on_cpu else torch.bfloat16  # Triton's interpreter cannot do bf16
    dtype_name = "float32" if on_cpu else "bf16"
    tiny = dict(hidden_size=128, expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    config = LLaDAMoEConfig(**(tiny if args.tiny else {}))
    config.dtype = dtype  # what quantized containers are dequantized to by the experts' properties
    config._experts_implementation = "eager"  # calling the module runs its own per-expert loop
    with device:
        experts = LLaDAMoEExperts(config).to(dtype).eval()
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.02)
    E, H, I = config.num_experts, config.hidden_size, config.expert_intermediate_size  # noqa: E741, N806
    top_k = config.num_experts_per_tok
    expert_elements = 3 * I * H  # gate + up + down of one expert
    peak = peak_bandwidth(args.peak_tbps)
    where = "CPU (Triton interpreter)" if on_cpu else torch.cuda.get_device_name()
    layer = "a tiny MoE layer (--tiny)" if args.tiny else "one 7B-shaped MoE layer"
    print(f"# {where}: {layer} (H {H}, I {I}, E {E}, top-{top_k}), {dtype_name}")
    timer = "the wall clock" if on_cpu else "CUDA events"
    print(
        f"# median of {args.repeats} runs timed with {timer}; GB/s = bytes of the distinct experts hit / time; "
        f"peak {f'{peak / 1e12:.2f} TB/s' if peak else 'unknown (pass --peak-tbps)'}"
    )

    inputs = {}
    for tokens in args.tokens:
        x = torch.randn(tokens, H, device=device, dtype=dtype)
        weights, index = torch.randn(tokens, E, device=device).softmax(dim=-1).topk(top_k, dim=-1)
        inputs[tokens] = (x, index, weights.to(dtype), torch.unique(index).numel())

    def batched_mm_skip(tokens: int) -> str | None:
        gather = tokens * top_k * expert_elements * dtype.itemsize  # one gate_up + down copy per token slot
        if gather > args.batched_mm_limit_gib * 2**30:
            return f"gather {gather / 2**30:.0f} GiB > --batched-mm-limit-gib"
        return None

    dense_impls = [
        ("eager", lambda x, i, w, m=experts: m(x, i, w), None),
        ("grouped_mm", lambda x, i, w, m=experts: grouped_mm_experts_forward(m, x, i, w), None),
        ("batched_mm", lambda x, i, w, m=experts: batched_mm_experts_forward(m, x, i, w), batched_mm_skip),
        ("llada_fused", fused and (lambda x, i, w, m=experts: fused(m, x, i, w)), None),
    ]
    dense_title = f"{dtype_name} experts (speedup vs eager)"
    run_table(dense_title, dense_impls, inputs, expert_elements * dtype.itemsize, peak, args)

    if args.no_nf4:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("\n(NF4 table skipped: bitsandbytes is not installed)")
        return
    quantized = quantized_copy(experts, config, args.double_quant)
    del experts, dense_impls
    torch.cuda.empty_cache()
    dequantized = DequantizedView(quantized, dtype)
    nf4_impls = [("dequant + grouped_mm", lambda x, i, w: grouped_mm_experts_forward(dequantized, x, i, w), None)]
    if "grouped_mm_chunked" in ALL_EXPERTS_FUNCTIONS:
        chunked = ALL_EXPERTS_FUNCTIONS["grouped_mm_chunked"]
        nf4_impls.append(("grouped_mm_chunked", lambda x, i, w: chunked(quantized, x, i, w), None))
    nf4_impls.append(("llada_fused (nf4)", fused and (lambda x, i, w: fused(quantized, x, i, w)), None))
    # Packed nibbles plus one absmax per 64 weights (fp32, or a uint8 code with double quant).
    nf4_bytes = expert_elements // 2 + expert_elements // 64 * (1 if args.double_quant else 4)
    kind = "NF4 + double quant" if args.double_quant else "NF4"
    title = f"{kind} experts (speedup vs dequantize + grouped_mm; GB/s counts the packed 4-bit bytes + absmax)"
    run_table(title, nf4_impls, inputs, nf4_bytes, peak, args)


if __name__ == "__main__":
    sys.exit(main())
