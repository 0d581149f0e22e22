"""4/8-bit LLaDA-MoE with real bitsandbytes on CPU: what is quantized, footprint, accuracy, generation, save/reload,
memory accounting, QLoRA.

The model keeps bitsandbytes' 4-bit weights on the standard layout on every CPU (`modeling_llada_moe.bnb_layout`);
`test_bnb_cpu_layout.py` covers the AVX512-BF16 CPU layout and saving after a forward on any host."""

import json
import sys

import bitsandbytes as bnb  # the dev extra installs it: a broken install fails these tests instead of skipping them
import pytest
import torch
from conftest import tiny_config, tiny_model
from official_reference import official_config_dict, official_state_dict, write_official_checkpoint
from torch import nn

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from quantization import (
    bnb_config,
    check_lora_targets,
    estimate_memory,
    load_quantized,
    memory_report,
    prepare_for_qlora,
    qlora_target_modules,
)


MODES = {"nf4": dict(bits=4, double_quant=False), "nf4_dq": dict(bits=4, double_quant=True), "int8": dict(bits=8)}
QUANT_LINEAR = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model(seed=0, moe_layer_freq=[0, 1])
    model.save_pretrained(folder)
    return folder, model


def ids(seed=0):
    return torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantizes_attention_experts_and_dense_mlp_only(saved_model, mode):
    folder, _ = saved_model
    model = load_quantized(folder, device_map="cpu", **MODES[mode])
    quantized = {
        name for name, module in model.named_modules() if isinstance(module, QUANT_LINEAR[MODES[mode]["bits"]])
    }
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {"model.layers.1.mlp.experts.gate_up", "model.layers.1.mlp.experts.down"}
    expected |= {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj")}  # the dense layer
    if MODES[mode]["bits"] == 8:
        expected.add("model.layers.0.mlp.down_proj")
    else:  # 96 inputs are not whole 64-blocks: kept unquantized (see bnb_layout), on every host
        assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert quantized == expected
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.config._experts_implementation == "grouped_mm_chunked"


def test_skip_list_adds_to_the_defaults(saved_model):
    config = bnb_config(4, skip_modules=["o_proj"])
    assert {"lm_head", "embed_tokens", "o_proj"} <= set(config.llm_int8_skip_modules)
    model = LLaDAMoEForMaskedLM.from_pretrained(saved_model[0], quantization_config=config, dtype=torch.bfloat16)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize(("mode", "limit"), [("nf4", 0.32), ("nf4_dq", 0.32), ("int8", 0.42)])
def test_footprint_against_fp32(saved_model, mode, limit):
    folder, fp32_model = saved_model
    model = load_quantized(folder, device_map="cpu", **MODES[mode])
    ratio = memory_report(model).total / memory_report(fp32_model).total
    print(f"{mode}: {ratio:.3f} of fp32")
    assert ratio <= limit


# Measured: nf4 0.119, nf4_dq 0.120, int8 0.0127-0.0131 (it varies from run to run). A dropped routing weight in the
# quantized experts gives nf4 0.133 (hidden by the 4-bit error), int8 0.062; int8's limit is 3x its error.
@pytest.mark.parametrize(("mode", "limit"), [("nf4", 0.3), ("nf4_dq", 0.3), ("int8", 0.04)])
def test_logits_error_within_quantization_expectations(saved_model, mode, limit):
    folder, fp32_model = saved_model
    model = load_quantized(folder, device_map="cpu", **MODES[mode])
    with torch.no_grad():
        reference = fp32_model(ids()).logits
        logits = model(ids()).logits.float()
    relative = ((logits - reference).abs().mean() / reference.abs().mean()).item()
    print(f"{mode}: mean relative logit error {relative:.4f}")
    assert relative < limit


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chunked_experts_equal_dequantize_then_grouped_mm(saved_model, mode):
    model = load_quantized(saved_model[0], device_map="cpu", **MODES[mode])
    experts = model.model.layers[1].mlp.experts
    hidden = torch.randn(12, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, 8, (12, 2), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(12, 2, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        chunked = experts(hidden, index, weights)
        model.set_experts_implementation("grouped_mm")  # reads the whole dequantized stack
        whole = experts(hidden, index, weights)
    # Measured (AVX512-BF16 host, every mode): outputs up to 4.3e-3 (mean 9e-4), chunked - whole exactly 0 (both read
    # the same dequantized weights). 1e-4 is ~3 bf16 steps at the largest output, for other hosts' bf16 matmuls; a
    # skipped expert, a dropped routing weight or swapped gate/up in grouped_mm_chunked move them by 1.1e-3 to 3.8e-3.
    torch.testing.assert_close(chunked.float(), whole.float(), atol=1e-4, rtol=0)
    assert experts.gate_up_proj.shape == (8, 64, 64) and experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", sorted(MODES))
def test_generation_runs_quantized(saved_model, mode):
    model = load_quantized(saved_model[0], device_map="cpu", **MODES[mode])
    out = model.diffusion_generate(ids()[:, :5], max_new_tokens=8, block_length=4, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 13) and not (out.sequences == 126).any()
    cached = model.diffusion_generate(
        ids()[:, :5], max_new_tokens=8, block_length=4, threshold=0.5, cache_implementation="dual"
    )
    assert not (cached == 126).any()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_save_and_reload_is_bit_exact(saved_model, tmp_path, mode):
    model = load_quantized(saved_model[0], device_map="cpu", **MODES[mode])
    with torch.no_grad():
        before = model(ids()).logits  # a forward first: saving afterwards must still write what loads back
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit" if MODES[mode]["bits"] == 4 else "load_in_8bit"]
    reloaded = load_quantized(tmp_path / "q", bits=MODES[mode]["bits"], device_map="cpu")
    original, again = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(again)
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, reloaded(ids()).logits)
        assert torch.equal(before, reloaded(ids()).logits)
    with pytest.raises(ValueError, match="holds"):
        load_quantized(tmp_path / "q", bits=12 - MODES[mode]["bits"], device_map="cpu")
    with pytest.raises(ValueError, match="save_original_format=True"):
        model.save_pretrained(tmp_path / "again", save_original_format=True)


def test_official_layout_loads_quantized(tmp_path):
    config = official_config_dict()
    folder = write_official_checkpoint(tmp_path / "official", config, official_state_dict(config, seed=1))
    model = load_quantized(folder, bits=4, device_map="cpu", mask_token_id=126)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up, bnb.nn.Linear4bit)
    reference = LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        error = (model(ids()).logits.float() - reference(ids()).logits).abs().mean() / reference(
            ids()
        ).logits.abs().mean()
    assert error < 0.3


@pytest.mark.parametrize("mode", sorted(MODES))
def test_memory_report_sums_to_the_true_bytes_and_matches_the_estimate(saved_model, mode):
    model = load_quantized(saved_model[0], device_map="cpu", **MODES[mode])
    report = memory_report(model)
    state_bytes = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            state = weight.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            state_bytes += sum(t.numel() * t.element_size() for t in tensors)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            state_bytes += weight.SCB.numel() * 4
    assert report.total == model.get_memory_footprint() + state_bytes
    assert report.components["quantization_state"] == state_bytes > 0
    estimate = estimate_memory(
        model.config, MODES[mode]["bits"], torch.bfloat16, MODES[mode].get("double_quant", False)
    )
    assert estimate.components == report.components
    fp32 = tiny_model(moe_layer_freq=[0, 1])
    assert estimate_memory(fp32.config, None, torch.float32).components == memory_report(fp32).components


def test_estimate_for_the_7b():
    config = LLaDAMoEConfig()
    gib = {
        name: estimate_memory(config, bits, dtype, dq).total / 2**30
        for name, bits, dtype, dq in [
            ("bf16", None, torch.bfloat16, False),
            ("int8", 8, torch.bfloat16, False),
            ("nf4", 4, torch.bfloat16, False),
            ("nf4_dq", 4, torch.bfloat16, True),
        ]
    }
    print({name: round(size, 2) for name, size in gib.items()})
    assert 13.6 < gib["bf16"] < 13.8 and 7.4 < gib["int8"] < 7.55
    assert 4.65 < gib["nf4"] < 4.8 and 4.35 < gib["nf4_dq"] < 4.5


def test_qlora_trains_attention_adapters(saved_model):
    model = load_quantized(saved_model[0], bits=4, device_map="cpu")
    assert qlora_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = prepare_for_qlora(model, r=4)
    peft_model.train()
    batch = ids()
    loss = peft_model(input_ids=batch, labels=batch).loss
    loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_lora_on_expert_containers_is_refused(saved_model):
    from peft import LoraConfig, get_peft_model

    model = load_quantized(saved_model[0], bits=4, device_map="cpu")
    with pytest.raises(ValueError, match="expert containers"):
        check_lora_targets(model, ["gate_up", "q_proj"])
    with pytest.raises(ValueError, match="expert containers"):
        prepare_for_qlora(model, LoraConfig(r=4, target_modules=["down"]))
    # Wrapped anyway (plain PEFT): the forward refuses instead of silently skipping the adapter.
    wrapped = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["gate_up"]))
    with pytest.raises(ValueError, match="PEFT adapter wraps an expert container"):
        wrapped(input_ids=ids())


def test_clear_errors(saved_model, monkeypatch):
    with pytest.raises(ValueError, match="bits=3"):
        load_quantized(saved_model[0], bits=3)
    with pytest.raises(ValueError, match="bits=3"):
        bnb_config(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_quantized(saved_model[0], bits=4, device_map="cuda")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"llada-moe\[quant\]"):
        load_quantized(saved_model[0], bits=4)


def test_unquantized_estimate_defaults():
    assert estimate_memory(tiny_config(), None, torch.float32).total == memory_report(tiny_model()).total


def test_damaged_or_missing_sources_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"path_or_repo='.*missing'.*no such folder, and not a Hub repo id"):
        load_quantized(tmp_path / "missing", bits=4, device_map="cpu")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"file\.bin' is a file"):
        load_quantized(tmp_path / "file.bin", bits=4, device_map="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_quantized(empty, bits=4, device_map="cpu")
    for text, what in (("[1, 2]", "got list"), ("null", "got NoneType"), ('"text"', "got str"), ("{", "not a JSON")):
        (empty / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"config\.json: .*{what}"):
            load_quantized(empty, bits=4, device_map="cpu")
