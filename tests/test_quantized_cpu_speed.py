"""What makes the 4-bit 7B usable on CPU, checked for exactness on tiny inputs with real bitsandbytes:

- `quantization.fast_quantize`: our CPU kernel for bitsandbytes' `quantize_4bit` op writes the same bytes and absmax
  as bitsandbytes' own (NaN, infinities, zero blocks, values next to every code midpoint, partial last blocks, both
  code books, every input dtype, with and without double quantization), compiled and eager; it is in place only
  inside its context; `load_quantized` gives the same quantized model with it as without it.
- `modeling_llada_moe.expert_cache`: while a generation runs, quantized experts are dequantized once (within the
  budget) and only when tokens route to them; outputs are identical with the cache on, off, or too small for all.

Speed and memory at the 7B shape: `benchmarks/scale.py` (not timed here)."""

import bitsandbytes.functional as bnb_functional  # the dev extra installs it: a broken install fails, not skips
import pytest
import torch
from conftest import tiny_model

from modeling_llada_moe import expert_cache
from modeling_llada_moe.modeling_llada_moe import LLaDAMoEExperts
from quantization import fast_quantize, load_quantized


def bitsandbytes_quantize(values, quant_type, double_quant):
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU")
    return bnb_functional.quantize_4bit(values, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def our_quantize(values, quant_type, double_quant):
    with fast_quantize.fast_4bit_quantization():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU")
        return bnb_functional.quantize_4bit(
            values, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
        )


def assert_same_quantization(ours, theirs):
    (data, state), (ref_data, ref_state) = ours, theirs
    assert torch.equal(data, ref_data) and data.dtype == ref_data.dtype and data.shape == ref_data.shape
    torch.testing.assert_close(state.absmax, ref_state.absmax, rtol=0, atol=0, equal_nan=True)
    if ref_state.nested:
        torch.testing.assert_close(state.offset, ref_state.offset, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(state.state2.absmax, ref_state.state2.absmax, rtol=0, atol=0, equal_nan=True)


def hard_values(quant_type, count=1000 * 64 + 37):
    """Values on both sides of every midpoint (scaled by a block maximum of 1), zero / NaN / inf blocks, a partial
    last block and an odd count."""
    bounds, _ = fast_quantize.midpoints(quant_type)
    near = []
    for bound in torch.tensor(bounds):
        for step in range(-3, 4):
            value = bound
            for _ in range(abs(step)):
                value = torch.nextafter(value, torch.tensor(2.0 if step > 0 else -2.0))
            near.append(value.item())
    near = torch.tensor(near)
    rest_of_blocks = torch.zeros((len(near) // 63 + 1) * 63)
    rest_of_blocks[: len(near)] = near
    # each block's maximum is its first value, 1.0, so the others are scaled by exactly 1
    blocks = torch.cat([torch.ones(len(rest_of_blocks) // 63, 1), rest_of_blocks.view(-1, 63)], dim=1)
    special = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    special[0] = 0.0
    special[1, 5] = float("nan")
    special[2, 7] = float("inf")
    special[3, 9] = -float("inf")
    special[4] *= 1e-30  # tiny block maximum
    rest = torch.randn(count, generator=torch.Generator().manual_seed(1))  # a partial last block, an odd count
    return torch.cat([blocks.view(-1), special.view(-1), rest])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_bytes_as_bitsandbytes_eager(monkeypatch, quant_type, dtype):
    monkeypatch.setattr(fast_quantize, "KERNEL", fast_quantize._Kernel())
    monkeypatch.setenv("LLADA_MOE_COMPILE_QUANTIZE", "0")
    values = hard_values(quant_type).to(dtype)
    for double_quant in (False, True):
        assert_same_quantization(
            our_quantize(values, quant_type, double_quant), bitsandbytes_quantize(values, quant_type, double_quant)
        )
    assert all(fn is fast_quantize._quantize_blocks for fn in fast_quantize.KERNEL.compiled.values())


def test_same_bytes_as_bitsandbytes_compiled():
    """The compiled kernel (what loading runs) on a 2-D bf16 weight of whole chunks and a partial one."""
    weight = hard_values("nf4", 2 * fast_quantize.CHUNK_BLOCKS * 64 + 640)
    weight = weight[: 2 * fast_quantize.CHUNK_BLOCKS * 64 + 640].view(-1, 128).to(torch.bfloat16)
    assert_same_quantization(our_quantize(weight, "nf4", True), bitsandbytes_quantize(weight, "nf4", True))
    key = ((fast_quantize.CHUNK_BLOCKS, 64), torch.bfloat16, "nf4")
    assert fast_quantize.KERNEL.compiled[key] is not fast_quantize._quantize_blocks  # compiled, not the fallback


def test_kernel_is_only_in_place_inside_the_context():
    with pytest.raises(RuntimeError, match="inside"):
        with fast_quantize.fast_4bit_quantization():
            raise RuntimeError("inside")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(seed=0, moe_layer_freq=[0, 1]).save_pretrained(folder)
    return folder


def test_load_quantized_gives_the_same_model_with_either_kernel(saved, monkeypatch):
    ours = load_quantized(saved, bits=4, device_map="cpu").state_dict()
    monkeypatch.setenv("LLADA_MOE_FAST_QUANTIZE", "0")
    theirs = load_quantized(saved, bits=4, device_map="cpu").state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


class Counting:
    """Counts `dequantize_experts` calls per experts module while the model runs (our own code, instrumented)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int, int]] = []
        original = LLaDAMoEExperts.dequantize_experts

        def counted(module, first, last, dtype):
            self.calls.append((id(module), first, last))
            return original(module, first, last, dtype)

        monkeypatch.setattr(LLaDAMoEExperts, "dequantize_experts", counted)


def generate(model, **kwargs):
    prompt = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    return model.diffusion_generate(
        prompt, max_new_tokens=8, block_length=8, steps=4, cache_implementation="dual", **kwargs
    )


def test_generation_dequantizes_each_routed_expert_once_and_results_do_not_change(saved, monkeypatch):
    model = load_quantized(saved, bits=4, device_map="cpu")
    experts = model.model.layers[1].mlp.experts
    model.expert_cache_bytes = 0
    off = generate(model)
    counting = Counting(monkeypatch)
    model.expert_cache_bytes = 1 << 30
    on = generate(model)
    assert torch.equal(on, off)
    assert experts.dense_cache is None  # released when the generation returns
    assert all(last == first + 1 for _, first, last in counting.calls)  # one expert at a time
    once = [(module, first) for module, first, _ in counting.calls]
    assert len(once) == len(set(once)) and 0 < len(once) <= experts.num_experts  # 4 steps, each expert at most once

    counting.calls.clear()
    per_expert = (2 * experts.intermediate_dim + experts.intermediate_dim) * experts.hidden_dim * 2  # bf16
    model.expert_cache_bytes = 2 * per_expert  # room for 2 of the experts tokens route to
    assert torch.equal(generate(model), off)
    assert len(counting.calls) > len(set(counting.calls))  # past the budget, experts are dequantized again


def test_only_routed_experts_are_dequantized(saved, monkeypatch):
    model = load_quantized(saved, bits=4, device_map="cpu")
    experts = model.model.layers[1].mlp.experts
    counting = Counting(monkeypatch)
    hidden = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[5, 1], [1, 6], [6, 5]])
    with torch.no_grad():
        out = experts(hidden, index, torch.full((3, 2), 0.5, dtype=torch.bfloat16))
    assert sorted(first for _, first, _ in counting.calls) == [1, 5, 6]
    gate_up, down = experts.gate_up_proj.float(), experts.down_proj.float()
    expected = torch.zeros(3, 64)
    for token in range(3):
        for expert in index[token].tolist():
            gate, up = (hidden[token].float() @ gate_up[expert].T).chunk(2)
            expected[token] += 0.5 * (torch.nn.functional.silu(gate) * up) @ down[expert].T
    # Measured: outputs up to 2.7e-3 (mean 6e-4), bf16 experts vs this float32 sum differ by up to 1.2e-5 (one bf16
    # step); 6e-5 is 5x that. Swapped gate/up, a skipped expert or a dropped routing weight: 4e-4 to 2.8e-3.
    torch.testing.assert_close(out.float(), expected, atol=6e-5, rtol=0)


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), ("1GB", TypeError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_budgets_are_refused(saved, value, error):
    model = load_quantized(saved, bits=4, device_map="cpu")
    model.expert_cache_bytes = value
    with pytest.raises(error, match="expert_cache_bytes"):
        generate(model)


@pytest.mark.parametrize("raw", ["-2", "lots", "nan"])
def test_bad_environment_budget_is_refused(saved, monkeypatch, raw):
    model = load_quantized(saved, bits=4, device_map="cpu")
    monkeypatch.setenv(expert_cache.ENV_BUDGET, raw)
    with pytest.raises(ValueError, match=expert_cache.ENV_BUDGET):
        generate(model)


def test_plain_models_have_no_cache(monkeypatch):
    model = tiny_model(seed=0)
    with expert_cache.cached_expert_weights(model, None) as cache:
        assert cache is None
