"""bitsandbytes 4-bit on every kind of CPU: the same results, saves and memory accounting whether or not the host has
AVX512F / AVX512-BF16 (`modeling_llada_moe.bnb_layout`).

bitsandbytes' AVX512-BF16 CPU layout is made here with its own conversion function, the one `Linear4bit.forward`
calls on such hosts, so these tests exercise that layout on any host. Expected values come from a plain-torch
reading of the standard layout (`bnb_reference`), not from bitsandbytes' native kernels."""

import json

import bitsandbytes as bnb  # the dev extra installs it: a broken install fails these tests instead of skipping them
import pytest
import torch
from bnb_reference import reference_dequantize_4bit
from conftest import tiny_model
from safetensors import safe_open
from torch import nn

from modeling_llada_moe import bnb_layout
from quantization import load_quantized, memory_report


pack_for_cpu = bnb.functional._convert_weight_packed_for_cpu  # what Linear4bit.forward runs on AVX512-BF16 CPUs
# Double quantization re-quantizes absmax to 8 bits (per 256 blocks): every value of a block moves by the same fraction
# of itself. Measured at most 0.39% (randn weights, values up to 4.3, error up to 0.011; the tiny model's weights, up to
# 0.093 with std 0.02, error up to 2.3e-4). 2% is 5x that for other hosts, while an absmax read from the wrong block
# (transposed, bitsandbytes#2078) or a lost offset moves values by tens of percent.
DOUBLE_QUANT_RTOL = 2e-2


def quantized(rows: int, cols: int, nested: bool, quant_type: str = "nf4", seed: int = 0) -> bnb.nn.Params4bit:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=nested
    )
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64, bnb_quantized=True)


def in_cpu_layout(weight: bnb.nn.Params4bit) -> bnb.nn.Params4bit:
    weight.data, weight.quant_state = pack_for_cpu(weight.data, weight.quant_state)
    assert bnb_layout.is_cpu_packed(weight)
    return weight


def ids(seed=0):
    return torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(seed=0, moe_layer_freq=[0, 1]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize(("rows", "cols", "start", "end"), [(256, 32, 4, 12), (64, 96, 2, 6), (128, 64, 3, 10)])
def test_rows_of_any_width_dequantize_right(rows, cols, start, end, nested):
    # 32- and 96-wide rows are not whole 64-value blocks: bitsandbytes' AVX512 dequantize of a 2-D shape mis-scales
    # them; the flat read is right on every host.
    weight = quantized(rows, cols, nested, seed=rows + cols)
    expected = reference_dequantize_4bit(weight)
    torch.testing.assert_close(bnb_layout.dequantize_4bit_rows(weight, 0, rows, torch.float32), expected)
    torch.testing.assert_close(bnb_layout.dequantize_4bit_rows(weight, start, end, torch.float32), expected[start:end])
    with pytest.raises(ValueError, match="outside"):
        bnb_layout.dequantize_4bit_rows(weight, 0, rows + 1, torch.float32)
    if cols % 64:
        with pytest.raises(ValueError, match="split a 4-bit block"):
            bnb_layout.dequantize_4bit_rows(weight, 0, 1, torch.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_cpu_layout_is_read_in_place(nested, quant_type):
    weight = quantized(96, 128, nested, quant_type)
    expected = reference_dequantize_4bit(weight, absmax_dtype=torch.bfloat16)  # the layout keeps absmax in bf16
    in_cpu_layout(weight)
    torch.testing.assert_close(bnb_layout.dequantize_4bit_rows(weight, 0, 96, torch.float32), expected)
    for start, end in [(32, 64), (16, 48), (5, 90), (70, 71)]:  # whole tiles of 32 rows, and not
        got = bnb_layout.dequantize_4bit_rows(weight, start, end, torch.bfloat16)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected[start:end].bfloat16().float())


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_restore_standard_layout(nested):
    weight = quantized(64, 192, nested)
    original_bytes = weight.data.clone()
    in_cpu_layout(weight)
    holds = bnb_layout.dequantize_4bit_rows(weight, 0, 64, torch.float32)
    bnb_layout.restore_standard_layout(weight)
    assert not bnb_layout.is_cpu_packed(weight) and weight.quant_state.nested == nested
    assert torch.equal(weight.data, original_bytes)  # the 4-bit codes are untouched
    restored = reference_dequantize_4bit(weight)
    if nested:  # absmax is quantized again (8-bit, per 256 blocks), as double quant does
        torch.testing.assert_close(restored, holds, atol=0, rtol=DOUBLE_QUANT_RTOL)
    else:
        assert torch.equal(restored, holds)  # exactly the values the CPU layout computed with


def state_bytes(weight) -> int:
    state = weight.quant_state
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_memory_report_counts_the_cpu_layout(saved_model):
    model = load_quantized(saved_model, bits=4, device_map="cpu", double_quant=True)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    before, standard = memory_report(model), state_bytes(q_proj)
    in_cpu_layout(q_proj)  # double quant undone: one bf16 absmax per block (64 rows x 1 block) beside the code
    assert state_bytes(q_proj) == 64 * 2 + 16 * 4 != standard
    after = memory_report(model)
    growth = after.components["quantization_state"] - before.components["quantization_state"]
    assert growth == 64 * 2 + 16 * 4 - standard
    assert after.total == model.get_memory_footprint() + sum(
        state_bytes(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )


def test_an_avx512_bf16_host_keeps_the_standard_layout(saved_model):
    # On an AVX512-BF16 CPU every Linear4bit is built with this flag set; its first inference forward would then
    # rewrite the weight (and fail on the dense layer's 96-wide rows). The model keeps the standard layout instead.
    model = load_quantized(saved_model, bits=4, device_map="cpu", double_quant=False)
    with torch.no_grad():
        expected = model(ids()).logits
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in linears:
        module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        logits = model(ids()).logits
    assert not any(bnb_layout.is_cpu_packed(m.weight) for m in linears)
    assert torch.equal(logits, expected)
    assert not any(m.support_avx512bf16_for_cpu for m in linears)


def test_widths_bitsandbytes_cannot_take_stay_unquantized(saved_model, caplog):
    model = load_quantized(saved_model, bits=4, device_map="cpu")
    dense = model.model.layers[0].mlp
    assert type(dense.down_proj) is nn.Linear and dense.down_proj.in_features == 96
    assert dense.down_proj.weight.dtype == torch.bfloat16
    assert isinstance(dense.gate_proj, bnb.nn.Linear4bit)  # 64 inputs: whole blocks
    # The expert containers' 32-wide down rows are read flat by the package, so they are quantized.
    assert isinstance(model.model.layers[1].mlp.experts.down, bnb.nn.Linear4bit)
    assert bnb_layout.linears_4bit_cannot_take(tiny_model(moe_layer_freq=[0, 1]).model) == ["layers.0.mlp.down_proj"]


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_save_after_the_cpu_layout_reloads_what_was_computed(saved_model, tmp_path, nested):
    """What a forward on an AVX512-BF16 host leaves behind (attention, dense MLP and the experts' gate_up container in
    the CPU layout) saves as the standard layout and reloads to the weights the model computed with. bitsandbytes'
    own inverse would write a transposed absmax without double quant (bitsandbytes#2078)."""
    model = load_quantized(saved_model, bits=4, device_map="cpu", double_quant=nested)
    packable = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and module.in_features % 64 == 0 and module.out_features % 32 == 0
    }
    assert "model.layers.1.mlp.experts.gate_up" in packable and len(packable) == 11
    computed = {}
    for name, module in packable.items():
        in_cpu_layout(module.weight)
        computed[name] = bnb_layout.dequantize_4bit_rows(module.weight, 0, module.out_features, torch.float32)
    experts = model.model.layers[1].mlp.experts
    hidden = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    index, weights = torch.randint(0, 8, (6, 2), generator=torch.Generator().manual_seed(1)), torch.rand(6, 2)
    with torch.no_grad():
        routed = experts(hidden, index, weights.bfloat16())  # the chunked experts read the CPU layout in place

    model.save_pretrained(tmp_path / "q")
    assert not any(bnb_layout.is_cpu_packed(m.weight) for m in packable.values())
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        absmax = f.get_tensor("model.layers.0.self_attn.q_proj.weight.absmax")
    assert absmax.dtype == (torch.uint8 if nested else torch.float32) and absmax.shape == (64,)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    reloaded = load_quantized(tmp_path / "q", bits=4, device_map="cpu")
    for name, values in computed.items():
        module = reloaded.get_submodule(name)
        got = bnb_layout.dequantize_4bit_rows(module.weight, 0, module.out_features, torch.float32)
        if nested:
            torch.testing.assert_close(got, values, atol=0, rtol=DOUBLE_QUANT_RTOL)
        else:
            assert torch.equal(got, values), name
    with torch.no_grad():
        again = reloaded.model.layers[1].mlp.experts(hidden, index, weights.bfloat16())
        if nested:
            # Measured: outputs up to 4.4e-3 (mean 7e-4), error up to 1.9e-5 (the re-quantized absmax); 1e-4 is 5x
            # that, and a skipped expert or a dropped routing weight moves outputs by 1e-3 or more.
            torch.testing.assert_close(again.float(), routed.float(), atol=1e-4, rtol=0)
        else:
            assert torch.equal(again, routed)
        # The model itself was restored in place before writing: it and the folder hold the same weights.
        assert torch.equal(model(ids()).logits, reloaded(ids()).logits)
