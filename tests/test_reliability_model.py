"""Issue 13, items 5 and 8: `LLaDAMoEConfig` rejects every bad field by name (a property test searches for
counter-examples), and saves never leave weights a load would read instead of the new ones, whatever the dtype."""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from official_reference import official_config_dict
from time_limit import time_limit

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


IDS = torch.tensor([[3, 17, 42, 5, 99, 126, 126, 126, 8, 1]])
FIELD_IN_MESSAGE = r"LLaDAMoEConfig: `([a-z_.]+)`="


def config_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("modeling_llada_moe")]


# --- item 5: config validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 2.0),
        ("num_hidden_layers", "2"),
        ("vocab_size", None),
        ("hidden_size", True),
        ("num_key_value_heads", 2.0),
        ("shared_expert_intermediate_size", 8.0),
        ("dense_intermediate_size", "96"),
        ("rms_norm_eps", "x"),
        ("initializer_range", None),
        ("routed_scaling_factor", True),
        ("clip_qkv", "1"),
        ("hidden_act", ["silu"]),
        ("moe_router_score_function", None),
        ("qk_layernorm", "no"),
        ("attention_bias", 1),
        ("use_cache", "no"),
        ("tie_word_embeddings", None),
        ("pad_token_id", 12.0),
        ("mask_token_id", 126.5),
        ("bos_token_id", True),
        ("eos_token_id", [1, "2"]),
        ("moe_layer_freq", [True, 1]),
        ("moe_layer_freq", "11"),
        ("rope_parameters", "x"),
        ("rope_theta", "50000"),
        ("partial_rotary_factor", "x"),
        ("num_local_experts", 8.0),
    ],
)
def test_wrong_types_raise_type_error_naming_the_field(field, value):
    named = "num_experts" if field == "num_local_experts" else field
    with pytest.raises(TypeError, match=rf"`{named}`={re.escape(repr(value))} has the wrong type"):
        LLaDAMoEConfig(**{**TINY, field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initializer_range", -0.02),  # used to fail inside torch.nn.init when the model was built
        ("initializer_range", math.nan),
        ("rms_norm_eps", math.inf),
        ("rms_norm_eps", math.nan),
        ("routed_scaling_factor", math.inf),
        ("rope_theta", math.inf),
        ("rope_theta", math.nan),
        ("clip_qkv", math.inf),
        ("router_aux_loss_coef", math.inf),
        ("router_z_loss_coef", math.nan),
        ("attention_dropout", math.nan),
        ("partial_rotary_factor", math.nan),
        ("pad_token_id", 500),
        ("pad_token_id", 128),
        ("bos_token_id", 128),
        ("mask_token_id", 200),
        ("eos_token_id", [1, 500]),
        ("eos_token_id", []),
        ("hidden_act", "no_such_act"),
        ("moe_layer_freq", [1, 2]),
        ("head_dim", 17),
        ("expert_intermediate_size", 22),  # built, then grouped_mm failed inside torch at the first forward
        ("hidden_size", 36),
    ],
)
def test_out_of_range_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"`{field}`=.* is invalid; expected"):
        LLaDAMoEConfig(**{**TINY, field: value})


def test_out_of_vocabulary_pad_id_is_never_written_into_outputs():
    expected = r"`pad_token_id`=500 is invalid; expected a token id in \[0, vocab_size=128\)"
    with pytest.raises(ValueError, match=expected):
        tiny_config(pad_token_id=500)


def test_valid_values_of_other_types_are_normalised():
    config = tiny_config(vocab_size=np.int64(128), routed_scaling_factor=np.float32(2.0), eos_token_id=(120, 121))
    assert type(config.vocab_size) is int and type(config.routed_scaling_factor) is float
    assert config.eos_token_id == [120, 121]
    assert tiny_config(routed_scaling_factor=1, rope_theta=50000).routed_scaling_factor == 1  # JSON writes 1 for 1.0
    assert tiny_config(head_dim=16).head_dim == 16  # a stated head_dim equal to the derived one is fine


def test_misspelled_key_is_warned_about_by_name(caplog):
    with caplog.at_level(logging.WARNING):
        config = tiny_config(hiden_size=32)
    (message,) = config_warnings(caplog)
    assert "`hiden_size`=32" in message and "did you mean `hidden_size`?" in message
    assert config.hidden_size == TINY["hidden_size"] and config.hiden_size == 32  # kept, as transformers keeps it


def test_generation_settings_in_the_model_config_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        tiny_config(temperature=0.5)
    (message,) = config_warnings(caplog)
    assert "temperature" in message and "generation_config.json" in message


def test_official_config_and_our_saves_load_without_warnings(official_small, tmp_path, caplog):
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "config.json").write_text(json.dumps(official_config_dict()))
    tiny_model().save_pretrained(tmp_path / "ours")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LLaDAMoEConfig.from_pretrained(official_small)
        LLaDAMoEConfig.from_pretrained(tmp_path / "official")
        LLaDAMoEConfig.from_pretrained(tmp_path / "ours")
        LLaDAMoEConfig(**LLaDAMoEConfig().to_dict())
        # Keys transformers itself reads or writes (v5 and v4 files), private keys of other tools.
        tiny_config(
            torch_dtype="bfloat16",
            num_labels=2,
            output_attentions=False,
            auto_map={},
            transformers_version="4.57.0",
            architectures=["LLaDAMoEModelLM"],
            is_decoder=False,
            tokenizer_class=None,
            _name_or_path="x",
        )
    assert config_warnings(caplog) == []


# Values of many types for many fields; TINY as the base, so valid draws build a tiny model.
FIELDS = [
    "vocab_size",
    "hidden_size",
    "dense_intermediate_size",
    "expert_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "clip_qkv",
    "qk_layernorm",
    "num_experts",
    "num_experts_per_tok",
    "moe_layer_freq",
    "norm_topk_prob",
    "routed_scaling_factor",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "router_num_group",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "rope_theta",
    "partial_rotary_factor",
    "output_router_logits",
]
VALUES = st.one_of(
    st.integers(-2, 130),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, -0.02, 1e-5, 50000.0, math.inf, -math.inf, math.nan, 1e300]),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "x", "silu", "gelu", "softmax", "sigmoid", "no", "1"]),
    st.lists(st.integers(-1, 2), max_size=3),
    st.sampled_from([[1, 1], [0, 1], {"rope_type": "default"}, (1, 2), np.int64(4), np.float64(0.5)]),
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_config_fields_property_builds_or_names_the_field(overrides):
    with time_limit(10):
        try:
            config = LLaDAMoEConfig(**{**TINY, **overrides})
        except (TypeError, ValueError) as err:
            match = re.search(FIELD_IN_MESSAGE, str(err))
            assert match is not None, f"{overrides}: {type(err).__name__}: {err}"
            assert match.group(1).split(".")[0] in set(FIELDS) | {"rope_parameters"}, str(err)
            return
        # A config that builds is the config of a working model (no error from inside torch).
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok"):
            assert type(getattr(config, field)) is int and getattr(config, field) > 0
        for field in ("initializer_range", "rms_norm_eps", "routed_scaling_factor"):
            assert math.isfinite(getattr(config, field))
        for field in ("qk_layernorm", "use_cache", "attention_bias", "tie_word_embeddings", "norm_topk_prob"):
            assert type(getattr(config, field)) is bool
        assert LLaDAMoEConfig(**config.to_dict()).to_dict() == config.to_dict()
        if config.vocab_size * config.hidden_size * config.num_experts < 5e6:
            torch.manual_seed(0)
            model = LLaDAMoEForMaskedLM(config).eval()
            with torch.no_grad():
                logits = model(torch.randint(0, config.vocab_size, (1, 4))).logits
            assert logits.shape == (1, 4, config.vocab_size)


# Valid values only (each alone and in any combination with the tiny config): the config must build and the model
# must run. The property test above accepts a clear error for any input, so a config that refused everything would
# pass it; this one would not.
VALID = {
    "hidden_act": st.sampled_from(["silu", "gelu", "relu"]),
    "initializer_range": st.floats(1e-4, 1.0),
    "rms_norm_eps": st.floats(1e-8, 1e-2),
    "max_position_embeddings": st.integers(16, 4096),
    "dense_intermediate_size": st.integers(1, 128),
    "expert_intermediate_size": st.integers(1, 8).map(lambda n: 8 * n),  # 16-byte rows for grouped_mm
    "shared_expert_intermediate_size": st.none() | st.integers(1, 64),
    "attention_dropout": st.floats(0.0, 0.9),
    "clip_qkv": st.none() | st.floats(1e-3, 1e4),
    "num_experts_per_tok": st.integers(1, 8),
    "moe_layer_freq": st.lists(st.integers(0, 1), min_size=2, max_size=2),
    "routed_scaling_factor": st.floats(1e-3, 16.0),
    "moe_router_score_function": st.sampled_from(["softmax", "sigmoid"]),
    "router_aux_loss_coef": st.floats(0.0, 1.0),
    "router_z_loss_coef": st.floats(0.0, 1.0),
    "rope_theta": st.floats(10.0, 1e7),
    "partial_rotary_factor": st.sampled_from([0.25, 0.5, 1.0]),  # rotary dims 4, 8, 16 of head_dim 16
    **{
        field: st.booleans()
        for field in ("use_cache", "tie_word_embeddings", "attention_bias", "qk_layernorm", "norm_topk_prob")
    },
    "moe_router_enable_expert_bias": st.booleans(),
    "output_router_logits": st.booleans(),
}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.fixed_dictionaries({}, optional=VALID))
def test_config_valid_fields_property_builds_and_runs(overrides):
    with time_limit(10):
        config = LLaDAMoEConfig(**{**TINY, **overrides})
        for field, value in overrides.items():
            held = config.rope_parameters if field in ("rope_theta", "partial_rotary_factor") else vars(config)
            assert held[field] == value, field
        assert LLaDAMoEConfig(**config.to_dict()).to_dict() == config.to_dict()
        torch.manual_seed(0)
        model = LLaDAMoEForMaskedLM(config).eval()
        with torch.no_grad():
            logits = model(IDS).logits
        assert logits.shape == (1, IDS.shape[1], 128) and torch.isfinite(logits).all()


# --- item 8: saves -------------------------------------------------------------------------------------------------


def logits(model: LLaDAMoEForMaskedLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_sharded_save_after_an_unsharded_save_loads_the_new_weights(tmp_path):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(logits(LLaDAMoEForMaskedLM.from_pretrained(tmp_path)), logits(new))


def test_unsharded_save_after_a_sharded_save_leaves_no_index_or_shards(tmp_path):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "pytorch_model.bin").write_bytes(b"an earlier tool's weights")  # read with use_safetensors=False
    new.save_pretrained(tmp_path)
    weights = sorted(
        path.name for path in tmp_path.iterdir() if path.name.startswith(("model.", "model-", "pytorch_model"))
    )
    assert weights == ["model.safetensors"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # nothing left aside
    assert torch.equal(logits(LLaDAMoEForMaskedLM.from_pretrained(tmp_path)), logits(new))


def test_failed_save_keeps_the_earlier_weights(tmp_path):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path, max_shard_size="100KB")
    with pytest.raises(ValueError, match="nonsense"):
        new.save_pretrained(tmp_path, max_shard_size="nonsense")
    assert torch.equal(logits(LLaDAMoEForMaskedLM.from_pretrained(tmp_path)), logits(old))


def test_other_variants_are_left_alone(tmp_path):
    tiny_model(seed=0).save_pretrained(tmp_path, variant="ema")
    new = tiny_model(seed=1)
    new.save_pretrained(tmp_path)
    assert (tmp_path / "model.ema.safetensors").exists() and (tmp_path / "model.safetensors").exists()


CASTS = {
    "to": lambda model: model.to(torch.bfloat16),
    "to_kwarg": lambda model: model.to(dtype=torch.bfloat16),
    "bfloat16": lambda model: model.bfloat16(),
    "half": lambda model: model.half(),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_cast_model_keeps_router_fp32_and_reloads_bit_exactly(tmp_path, cast):
    torch.manual_seed(0)
    config = tiny_config(moe_layer_freq=[0, 1], moe_router_enable_expert_bias=True)
    model = LLaDAMoEForMaskedLM(config).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.expert_bias.normal_(std=0.01)
    model = CASTS[cast](model)
    narrow = torch.float16 if cast == "half" else torch.bfloat16
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.dtype == moe.expert_bias.dtype == model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == moe.experts.gate_up.weight.dtype == narrow
    model.save_pretrained(tmp_path)
    reloaded = LLaDAMoEForMaskedLM.from_pretrained(tmp_path).eval()
    for (name, tensor), (_, again) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert tensor.dtype == again.dtype and torch.equal(tensor, again), name
    assert torch.equal(logits(model), logits(reloaded))


def test_router_stays_exact_through_a_half_and_back():
    model = tiny_model(seed=3)
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    model.half().float()
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    assert model.double().model.layers[0].mlp.gate.weight.dtype == torch.float64  # wider casts apply as asked


def test_bf16_autocast_training_still_works():
    model = tiny_model(seed=4).train()
    labels = IDS.masked_fill(IDS != 126, -100)
    labels[0, 5:8] = torch.tensor([7, 8, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=labels).loss
    loss.backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert torch.isfinite(loss) and gate.grad is not None and gate.grad.dtype == torch.float32


def test_from_pretrained_refuses_a_corrupt_generation_config(tmp_path):
    tiny_model(seed=0).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 8,')
    with pytest.raises(ValueError, match="generation_config.json' is a corrupt generation config"):
        LLaDAMoEForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()  # missing is fine: the defaults from the model config
    assert LLaDAMoEForMaskedLM.from_pretrained(tmp_path).generation_config.mask_token_id == TINY["mask_token_id"]
