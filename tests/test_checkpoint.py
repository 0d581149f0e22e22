"""Official-checkpoint compatibility: load parity against recorded and independent references, save/reload."""

import json
import re

import pytest
import torch
from conftest import tiny_model
from official_reference import (
    official_config_dict,
    official_state_dict,
    reference_forward,
    write_official_checkpoint,
)
from safetensors import safe_open

from modeling_llada_moe import LLaDAMoEForMaskedLM, LLaDAMoEModel
from modeling_llada_moe.modeling_llada_moe import EXPERT_BIAS_FP32_PATTERN, ROUTER_FP32_PATTERN


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def load(folder, **kwargs):
    model, info = LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
def test_recorded_official_logits(official_small, attn, experts):
    expected = torch.load(official_small / "expected.pt", weights_only=True)
    model = load(official_small, mask_token_id=301, attn_implementation=attn, experts_implementation=experts)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    # The fixture's tolerance: the official code differs from itself by up to 2.3e-5 (eager vs sdpa, batch size).
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)


VARIANTS = {
    "7b_layout": {},
    "dense_layer_and_shared_expert": dict(moe_layer_freq=[0, 1], shared_expert_intermediate_size=48),
    "gqa_partial_rotary_clip_bias": dict(
        num_key_value_heads=2, partial_rotary_factor=0.5, clip_qkv=1.5, attention_bias=True
    ),
    "router_options": dict(norm_topk_prob=True, routed_scaling_factor=2.5, moe_router_enable_expert_bias=True),
    "no_qk_norm_tied": dict(qk_layernorm=False, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_layout_folder_matches_independent_reference(tmp_path, variant):
    config = official_config_dict(**VARIANTS[variant])
    state_dict = official_state_dict(config, seed=3)
    folder = write_official_checkpoint(tmp_path / "official", config, state_dict)
    model = load(folder, mask_token_id=126)
    ids = torch.randint(0, 120, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    expected, _ = reference_forward(state_dict, config, ids)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_sigmoid_router_matches_reference(tmp_path):
    config = official_config_dict(moe_router_score_function="sigmoid", norm_topk_prob=True)
    state_dict = official_state_dict(config, seed=4)
    model = load(write_official_checkpoint(tmp_path / "official", config, state_dict), mask_token_id=126)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    expected, _ = reference_forward(state_dict, config, ids)
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() <= 1e-5


def test_flattened_layout_is_expert_major(tmp_path):
    config = official_config_dict()
    state_dict = official_state_dict(config, seed=5)
    model = load(write_official_checkpoint(tmp_path / "official", config, state_dict), mask_token_id=126)
    experts = model.model.layers[1].mlp.experts
    for e in (0, 3, 7):
        p = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(experts.gate_up_proj[e, :32], state_dict[f"{p}.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[e, 32:], state_dict[f"{p}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], state_dict[f"{p}.down_proj.weight"])
    assert experts.gate_up.weight.shape == (8 * 64, 64) and experts.down.weight.shape == (8 * 64, 32)


@pytest.mark.parametrize("variant", ["7b_layout", "dense_layer_and_shared_expert", "router_options"])
def test_load_save_load_is_bit_exact_with_official_keys(tmp_path, variant):
    config = official_config_dict(**VARIANTS[variant])
    state_dict = official_state_dict(config, seed=6)
    model = load(write_official_checkpoint(tmp_path / "official", config, state_dict), mask_token_id=126)
    model.save_pretrained(tmp_path / "saved")
    saved = saved_tensors(tmp_path / "saved")
    assert set(saved) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(saved[key], value), key
    reloaded = load(tmp_path / "saved")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.mask_token_id == 126


def test_raw_state_dict_of_a_saved_folder_loads_strictly(tmp_path):
    # Trainer reloads checkpoints with a plain load_state_dict of the saved (per-expert) tensors.
    config = official_config_dict()
    state_dict = official_state_dict(config, seed=10)
    model = load(write_official_checkpoint(tmp_path / "official", config, state_dict), mask_token_id=126)
    other = LLaDAMoEForMaskedLM(model.config)
    other.load_state_dict(state_dict, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_save_is_sharded_with_index(tmp_path):
    config = official_config_dict()
    state_dict = official_state_dict(config, seed=7)
    model = load(write_official_checkpoint(tmp_path / "official", config, state_dict), mask_token_id=126)
    model.save_pretrained(tmp_path / "saved", max_shard_size="200KB")
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(state_dict)
    assert torch.equal(load(tmp_path / "saved").lm_head.weight, state_dict["lm_head.weight"])


def test_base_model_loads_from_official_folder(tmp_path):
    config = official_config_dict()
    state_dict = official_state_dict(config, seed=8)
    folder = write_official_checkpoint(tmp_path / "official", config, state_dict)
    base, info = LLaDAMoEModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] <= {"lm_head.weight"}
    assert torch.equal(
        base.layers[0].mlp.experts.down_proj[2], state_dict["model.layers.0.mlp.experts.2.down_proj.weight"]
    )


def test_bf16_load_keeps_router_and_expert_bias_fp32(tmp_path):
    config = official_config_dict(moe_router_enable_expert_bias=True, moe_layer_freq=[0, 1])
    state_dict = official_state_dict(config, seed=9, dtype=torch.bfloat16)
    folder = write_official_checkpoint(tmp_path / "official", config, state_dict)
    model = LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16)
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.expert_bias.dtype == torch.float32
    assert moe.experts.gate_up.weight.dtype == torch.bfloat16
    # The dense layer's `mlp.gate_proj` is not the router and stays bf16.
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    expected, _ = reference_forward({k: v.float() for k, v in state_dict.items()}, config, ids)
    # bf16 activations against fp32 math on the same weights: ~1% mean error (a near-tie route may flip).
    assert (logits.float() - expected).abs().mean().item() < 0.03


@pytest.mark.parametrize(
    "overrides, kept",
    [
        (dict(), {ROUTER_FP32_PATTERN}),
        (dict(moe_router_enable_expert_bias=True), {ROUTER_FP32_PATTERN, EXPERT_BIAS_FP32_PATTERN}),
        (dict(moe_layer_freq=[0, 0]), set()),
    ],
)
def test_fp32_module_lists_name_existing_modules_once(tmp_path, overrides, kept):
    # transformers: `_keep_in_fp32_modules` upcasts under fp16 only, `_keep_in_fp32_modules_strict` under fp16 and
    # bf16; a pattern belongs in one list and must name a module the model has.
    model = tiny_model(**overrides)
    assert not model._keep_in_fp32_modules & model._keep_in_fp32_modules_strict
    names = list(model.state_dict())
    for pattern in model._keep_in_fp32_modules | model._keep_in_fp32_modules_strict:
        assert any(re.search(rf"(?:^|\.){pattern}(?:\.|$)", name) for name in names), pattern
    assert model._keep_in_fp32_modules_strict == kept
    model.save_pretrained(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = LLaDAMoEForMaskedLM.from_pretrained(tmp_path, dtype=dtype)
        fp32 = {name for name, tensor in loaded.state_dict().items() if tensor.dtype == torch.float32}
        assert fp32 == {name for name in names if "mlp.gate." in name or name.endswith("mlp.expert_bias")}, dtype


def test_from_pretrained_without_a_folder_takes_the_state_dict():
    # transformers' way to build a model from tensors in memory: `from_pretrained(None, config=, state_dict=)`.
    model = tiny_model(seed=5)
    again = LLaDAMoEForMaskedLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    x = torch.randint(0, 120, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    assert type(again.generation_config) is type(model.generation_config)
    initialised = LLaDAMoEForMaskedLM.from_pretrained(None, config=model.config, state_dict={})
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in initialised.parameters())


def test_dense_llada_config_is_rejected(tmp_path):
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llada", "d_model": 4096, "n_layers": 32}))
    with pytest.raises(ValueError, match="dense LLaDA"):
        LLaDAMoEForMaskedLM.from_pretrained(folder)
