"""LLaDAMoEConfig: reads the official config.json unchanged, 7B defaults, every validation error."""

import json
import math

import pytest
import torch
from conftest import TINY, tiny_config

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


def test_reads_official_config_json(official_small):
    raw = json.loads((official_small / "config.json").read_text())
    config = LLaDAMoEConfig.from_pretrained(official_small)
    assert config.model_type == "llada_moe" and raw["model_type"] == "llada"
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "num_experts_per_tok",
        "expert_intermediate_size",
        "dense_intermediate_size",
        "moe_layer_freq",
        "qk_layernorm",
        "norm_topk_prob",
        "pad_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "router_aux_loss_coef",
        "max_position_embeddings",
    ):
        assert getattr(config, field) == raw[field], field
    assert config.rope_parameters["rope_theta"] == raw["rope_theta"] == 50000
    assert config.rope_parameters["rope_type"] == "default"
    assert config.head_dim == 16
    # The official auto_map points at remote files this package does not ship; it is not carried over.
    assert getattr(config, "auto_map", None) is None
    assert config.mask_token_id == 156895 and config.router_z_loss_coef == 0.001


def test_defaults_are_the_7b_a1b_values():
    config = LLaDAMoEConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (157184, 2048, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 16, 128)
    assert (config.num_experts, config.num_experts_per_tok, config.expert_intermediate_size) == (64, 8, 1024)
    assert config.moe_layer_freq == [1] * 16 and config.shared_expert_intermediate_size is None
    assert config.rope_parameters["rope_theta"] == 50000
    assert (config.pad_token_id, config.eos_token_id, config.mask_token_id) == (156892, 156892, 156895)
    assert not config.norm_topk_prob and config.routed_scaling_factor == 1.0
    assert (config.router_aux_loss_coef, config.router_z_loss_coef) == (0.01, 0.001)


def test_round_trips_through_json(tmp_path):
    config = tiny_config(moe_layer_freq=[0, 1], partial_rotary_factor=0.5, router_z_loss_coef=0.02)
    config.save_pretrained(tmp_path)
    again = LLaDAMoEConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.rope_parameters["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(moe_layer_freq=[1]), "moe_layer_freq"),
        (dict(moe_layer_freq=[1, 2]), "moe_layer_freq"),
        (dict(hidden_size=-64), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(expert_intermediate_size=-1), "expert_intermediate_size"),
        (dict(num_hidden_layers=-2), "num_hidden_layers"),
        (dict(num_experts=-1), "num_experts"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(moe_layer_freq=[0, 1], dense_intermediate_size=-1), "dense_intermediate_size"),
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
        (dict(rope_scaling={"rope_type": "no_such_rope"}), "rope_type"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(partial_rotary_factor=-1), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(hidden_act="no_such_act"), "hidden_act"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(clip_qkv=-3.0), "clip_qkv"),
        (dict(moe_router_score_function="sparsemax"), "moe_router_score_function"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(router_num_group=4), "router_num_group"),
        (dict(router_topk_group=2), "router_topk_group"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_z_loss_coef=-0.1), "router_z_loss_coef"),
        (dict(mask_token_id=-5), "mask_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"`[a-z_.]*{field}`="):
        LLaDAMoEConfig(**{**TINY, **overrides})


def test_scaled_rope_is_validated_by_transformers():
    config = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "linear"
    with pytest.raises(ValueError, match="`rope_parameters`=.*factor"):
        tiny_config(rope_scaling={"rope_type": "linear"})


# Values the old hand-written checks accepted although the forward of the model they describe returned NaN (issue 23,
# item 3), or that lie past a bound chosen in configuration_llada_moe.py (see ROPE_NUMBERS and the field comments).
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(rope_theta=1e-300), "rope_theta"),  # inverse frequencies overflow float32: NaN logits
        (dict(rope_theta=0.5), "rope_theta"),  # below 1 the RoPE spectrum is inverted
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor"),  # NaN logits
        (dict(rope_scaling={"rope_type": "linear", "factor": math.nan}), "factor"),  # NaN logits
        (dict(rope_scaling={"rope_type": "linear", "factor": 1e-38}), "factor"),  # NaN logits
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "factor"),  # transformers: a factor is >= 1
        (dict(rope_scaling={"rope_type": "dynamic", "factor": math.nan}), "factor"),  # NaN logits
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 1e20}), "factor"),  # NaN logits
        (dict(rope_scaling={"rope_type": "dynamic", "factor": math.inf}), "factor"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": math.nan}), "beta_fast"),
        (dict(initializer_range=10.0), "initializer_range"),  # NaN logits in fp16
        (dict(initializer_range=1e20), "initializer_range"),
        (dict(routed_scaling_factor=1e6), "routed_scaling_factor"),  # NaN logits in fp16
        (dict(routed_scaling_factor=101.0), "routed_scaling_factor"),
    ],
)
def test_values_that_made_the_forward_nan_are_rejected_by_name(overrides, field):
    with pytest.raises(ValueError, match=rf"`[a-z_.]*{field}`=.* is invalid; expected a finite number"):
        LLaDAMoEConfig(**{**TINY, **overrides})


@pytest.mark.parametrize(
    ("dtype", "overrides"),
    [
        (torch.float32, dict(rope_theta=1.0)),
        (torch.float32, dict(rope_theta=1e300)),
        (torch.float32, dict(rope_scaling={"rope_type": "linear", "factor": 1.0})),
        (torch.float32, dict(rope_scaling={"rope_type": "linear", "factor": 1e6})),
        # Longer than max_position_embeddings, so that dynamic NTK rescales its base.
        (torch.float32, dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 1e6})),
        (torch.float16, dict(initializer_range=1.0)),
        (torch.float16, dict(routed_scaling_factor=100.0)),
    ],
)
def test_values_at_the_bounds_build_a_model_with_finite_logits(dtype, overrides):
    torch.manual_seed(0)
    model = LLaDAMoEForMaskedLM(tiny_config(**overrides)).eval().to(dtype)
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_fields_are_declared_and_checked_on_assignment(tmp_path):
    config = tiny_config()
    assert LLaDAMoEConfig.__validators__["vocab_size"]  # `@strict` holds a type check and a range check per field
    with pytest.raises(TypeError, match="`hidden_size`='64' has the wrong type; expected an integer"):
        config.hidden_size = "64"
    with pytest.raises(ValueError, match=r"`attention_dropout`=1.0 is invalid; expected a finite number in \[0, 1\)"):
        config.attention_dropout = 1.0
    with pytest.raises(TypeError, match="`num_experts`=8.0 has the wrong type"):
        config.num_local_experts = 8.0  # an alias is checked as the field it sets
    config.num_experts_per_tok = 16  # a relation between fields is checked by `validate`, as at every save
    with pytest.raises(ValueError, match="`num_experts_per_tok`=16 is invalid; expected at most num_experts=8"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
