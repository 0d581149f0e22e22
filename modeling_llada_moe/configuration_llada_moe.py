"""LLaDA-MoE configuration.

Reads the official `config.json` of `inclusionAI/LLaDA-MoE-7B-A1B-*` unchanged (its `model_type` is `"llada"`); the
defaults are the 7B-A1B values. Each field is declared once with its type, default and range (`@strict`, as
transformers 5.23's own configs); relations between fields are the `validate_*` methods. Every field is either
honoured by the model or rejected with an error that names it, its value and what is accepted (`TypeError` for a
wrong type, `ValueError` for a value out of range); a key that neither this class nor transformers knows is kept but
warned about by name. Nothing in the file is silently ignored.
"""

import dataclasses
import difflib
import functools
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

from .validators import (
    checked,
    in_interval,
    interval_words,
    is_int,
    is_number,
    multiple_of,
    must_be_null,
    named_errors,
    number_in,
    one_of,
    positive,
    rejected,
    wrong_type,
)


logger = logging.get_logger(__name__)


ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
# `model_type` of the official config.json (shared with dense LLaDA-8B).
OFFICIAL_MODEL_TYPE = "llada"
# Saved `architectures` use the official class names (tools such as GGUF converters key on them); the masked-LM class
# is `LLaDAMoEForMaskedLM` here, with `LLaDAMoEModelLM` as its alias, so either name loads the same class.
OFFICIAL_ARCHITECTURES = {"LLaDAMoEForMaskedLM": "LLaDAMoEModelLM"}
# The grouped_mm experts (the default on CPU, the fallback of the fused CUDA kernels) need rows of 16 bytes in bf16 /
# fp16, which any other width fails inside torch at the first forward.
ALIGNED = "grouped_mm experts need 16-byte aligned rows"

# Numbers of `rope_parameters` (the official file states `rope_theta` and `partial_rotary_factor` at the top level),
# with the ranges outside which the forward returns NaN or the rotation means nothing. Any other number there must be
# finite. rope_theta >= 1 keeps every inverse frequency theta^(-2i/d) in (0, 1]: below 1 they exceed 1 rad/token
# and grow with i (an inverted spectrum), and from about 1e-44 they overflow float32 (the logits were NaN). A scaled
# RoPE's `factor` is >= 1 as transformers documents it (it warned below 1): factor 0 or NaN gave NaN logits, and so
# did a linear factor of 1e-38; 1e6 is far beyond any published context extension (at most 64) and below the 1e16
# from which dynamic NTK's base update cancels to 0 in float64 (a dynamic factor of 1e20 gave NaN logits).
ROPE_NUMBERS: dict[str, dict[str, float | bool]] = {
    "rope_theta": dict(low=1.0),
    "partial_rotary_factor": dict(low=0.0, high=1.0, low_open=True),  # and an even rotary width (with head_dim)
    "factor": dict(low=1.0, high=1e6),
}


# Keys a config.json may hold that transformers reads (or knowingly drops) besides the dataclass fields: arguments of
# `PreTrainedConfig.__post_init__` / `from_pretrained`, what saves write (`auto_map`, `quantization_config`), and
# what transformers 4 wrote. None of them is warned about; private `_keys` are not either.
TRANSFORMERS_CONFIG_KEYS = frozenset(
    {
        "model_type",
        "torch_dtype",
        "num_labels",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "name_or_path",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "auto_map",
        "quantization_config",
        "custom_pipelines",
        # transformers 4 `PretrainedConfig` arguments (still in files it saved).
        "is_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
        "torchscript",
        "pruned_heads",
        "use_bfloat16",
        "tf_legacy_loss",
    }
)


@functools.cache
def known_config_keys(cls: type) -> frozenset[str]:
    """Every key `cls(**config_dict)` understands: its fields, attribute aliases, settable properties and the keys
    transformers itself consumes."""
    keys = {field.name for field in dataclasses.fields(cls)} | set(cls.attribute_map) | TRANSFORMERS_CONFIG_KEYS
    keys |= {name for name in dir(cls) if isinstance(getattr(cls, name, None), property)}
    return frozenset(keys)


def warn_about_unknown_keys(cls: type, kwargs: dict[str, Any]) -> None:
    """Warn by name about keys the model never reads: misspellings (with the closest field) and generation settings,
    which transformers drops from a model config."""
    known = known_config_keys(cls)
    generation = set(GenerationConfig._get_default_generation_params())
    unknown = [key for key in kwargs if key not in known and key not in generation and not key.startswith("_")]
    for key in unknown:
        close = difflib.get_close_matches(key, [field.name for field in dataclasses.fields(cls)], n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        logger.warning(
            f"{cls.__name__}: unknown key `{key}`={kwargs[key]!r}{hint}; it is stored on the config but no part of "
            "the model reads it."
        )
    ignored = [key for key in kwargs if key in generation and key not in known]
    if ignored:
        logger.warning(
            f"{cls.__name__}: generation settings {ignored} in the model config are ignored (transformers drops them); "
            "put them in generation_config.json or pass them to `generate`."
        )


def config_file(pretrained_model_name_or_path: str | os.PathLike, subfolder: str = "") -> str:
    """How errors name the config file `from_pretrained(pretrained_model_name_or_path)` reads: its path (quoted) for
    a local file or folder, else "config.json of 'owner/name'" (a Hub repo)."""
    path = Path(pretrained_model_name_or_path)
    if path.is_file():
        return repr(str(path))
    if path.is_dir():
        return repr(str(path / subfolder / "config.json"))
    return f"config.json of {str(pretrained_model_name_or_path)!r}"


def read_json_object(path: Path, what: str, expected: str = "a JSON object") -> dict:
    """The JSON object in the local file `path`; a `ValueError` naming it and what is wrong when it is not UTF-8 JSON
    or not an object (a list, `null`, a string, a number). Shared by the model files and the app layer."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{str(path)!r} is a corrupt {what}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} is a corrupt {what}: expected {expected}, got {type(data).__name__} {str(data)[:60]!r}"
        )
    return data


@named_errors
@strict
class LLaDAMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaDA-MoE masked-diffusion model (bidirectional attention, sparse SwiGLU experts).

    Args:
        vocab_size (`int`, defaults to 157184): rows of the embedding and of `lm_head`.
        hidden_size (`int`, defaults to 2048): model width H.
        dense_intermediate_size (`int`, defaults to 8192): width of the SwiGLU MLP of dense layers
            (`moe_layer_freq[i] == 0`); unused when every layer is MoE, as in the 7B.
        expert_intermediate_size (`int`, defaults to 1024): width I of each routed expert.
        shared_expert_intermediate_size (`int`, *optional*): width of an always-on shared expert added to the MLP
            output of every layer; `None` (the 7B) builds none.
        num_hidden_layers (`int`, defaults to 16), num_attention_heads (`int`, defaults to 16),
        num_key_value_heads (`int`, *optional*): `None` means multi-head attention (as many KV heads as heads).
        hidden_act (`str`, defaults to `"silu"`): activation of the SwiGLU gate.
        max_position_embeddings (`int`, defaults to 8192): longest sequence the RoPE was trained for.
        initializer_range (`float`, defaults to 0.02): std of the initial weights, in [0, 1].
        rms_norm_eps (`float`, defaults to 1e-5): epsilon of every RMSNorm, the q/k norms included.
        rope_parameters (`dict`, *optional*): RoPE settings; the official keys `rope_theta` (50000),
            `rope_scaling` and `partial_rotary_factor` are accepted and folded in here. `rope_theta` >= 1; a scaled
            RoPE's `factor` in [1, 1e6]; every number finite.
        attention_bias (`bool`, defaults to `False`), attention_dropout (`float`, defaults to 0.0),
        clip_qkv (`float`, *optional*): clamp q, k and v to +-clip_qkv after the q/k norms.
        qk_layernorm (`bool`, defaults to `True`): RMSNorm over head_dim on queries and keys before RoPE.
        num_experts (`int`, defaults to 64), num_experts_per_tok (`int`, defaults to 8): routed experts and top-k.
        moe_layer_freq (`list[int]`, *optional*): one 0/1 flag per layer, 1 = MoE layer, 0 = dense MLP layer;
            `None` means every layer is MoE.
        norm_topk_prob (`bool`, defaults to `False`): renormalise the top-k routing weights to sum to 1.
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routing weights; in (0, 100].
        moe_router_score_function (`str`, defaults to `"softmax"`): `"softmax"` over all experts or `"sigmoid"`.
        moe_router_enable_expert_bias (`bool`, defaults to `False`): a per-expert bias buffer added to the router
            scores; as in the official code the biased scores are also the mixing weights.
        router_num_group, router_topk_group (`int`, *optional*): group-limited routing is not implemented (the
            official code ignores these fields); only `None` is accepted.
        output_router_logits (`bool`, defaults to `False`): return router logits and add the auxiliary losses.
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the load-balancing loss.
        router_z_loss_coef (`float`, defaults to 0.001): weight of the router z-loss.
        mask_token_id (`int`, defaults to 156895): the `<|mask|>` token of the diffusion process (not a key of the
            official file, which hard-codes it in its samplers).
        pad_token_id, eos_token_id (defaults to 156892, `<|endoftext|>`), bos_token_id (*optional*).
        tie_word_embeddings (`bool`, defaults to `False`).
    """

    model_type = "llada_moe"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    default_theta = 50_000.0

    # q/k/v are split by whole heads, so the per-head q/k norms stay local to a rank. The experts are split by
    # `base_model_ep_plan` (whole experts per rank) when `DistributedConfig(ep_size=...)` asks for it; with tp_size
    # alone, by expert tensor parallelism: every rank holds a slice of every expert's intermediate dimension, and the
    # partial outputs are all-reduced (the model file's "llada_moe_tp_experts" style; `tp_plan={"model.layers.*.mlp.
    # experts": "replicate"}` keeps whole experts on every rank instead). See README, "Scaling out".
    base_model_tp_plan: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts": "llada_moe_tp_experts",
    }
    # Expert parallelism: tokens go to the rank owning their expert through transformers' EP dispatch. Each rank
    # keeps whole experts, as contiguous rows of the flattened containers (cut by the model's
    # `maybe_distribute_model`, so no parameter rule here: a Shard(0) DTensor could not be read from per-expert keys).
    base_model_ep_plan: ClassVar[dict[str, str]] = {"layers.*.mlp.experts": "ep_dispatch_experts"}
    base_model_pp_plan: ClassVar[dict[str, Any]] = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = positive(default=157184)
    hidden_size: int = multiple_of(8, ALIGNED)(default=2048)
    dense_intermediate_size: int | None = positive(default=8192)
    expert_intermediate_size: int = multiple_of(8, ALIGNED)(default=1024)
    shared_expert_intermediate_size: int | None = checked(
        lambda value: value > 0, "a positive integer, or null for no shared expert"
    )(default=None)
    num_hidden_layers: int = positive(default=16)
    num_attention_heads: int = positive(default=16)
    num_key_value_heads: int | None = positive(default=None)
    hidden_act: str = one_of(ACT2FN)(default="silu")
    max_position_embeddings: int = positive(default=8192)
    # transformers' LlamaConfig bound: std 10 already gave NaN logits in fp16 (and 1 did not, in fp32, bf16, fp16).
    initializer_range: float | int = number_in(0.0, 1.0)(default=0.02)
    rms_norm_eps: float | int = number_in(0.0, low_open=True)(default=1e-5)
    use_cache: bool = False
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = checked(
        lambda value: value != [], "at least one token id in the list, or null for none"
    )(default=156892)
    mask_token_id: int | None = 156895
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = number_in(0.0, 1.0, high_open=True)(default=0.0)
    clip_qkv: float | int | None = number_in(0.0, low_open=True)(default=None)
    qk_layernorm: bool = True
    num_experts: int = positive(default=64)
    num_experts_per_tok: int = positive(default=8)
    moe_layer_freq: list[int] | None = checked(
        lambda value: all(flag in (0, 1) for flag in value), "entries 0 (dense MLP layer) or 1 (MoE layer)"
    )(default=None)
    norm_topk_prob: bool = False
    # Published MoE configs use 1 to 16 (DeepSeek-V2); 100 is well past them and below where half-precision expert
    # outputs overflow (the tiny model's fp16 logits were NaN from 1e6).
    routed_scaling_factor: float | int = number_in(0.0, 100.0, low_open=True)(default=1.0)
    moe_router_score_function: str = one_of(ROUTER_SCORE_FUNCTIONS)(default="softmax")
    moe_router_enable_expert_bias: bool = False
    router_num_group: int | None = must_be_null("group-limited routing is not implemented by LLaDA-MoE")(default=None)
    router_topk_group: int | None = must_be_null("group-limited routing is not implemented by LLaDA-MoE")(default=None)
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = number_in(0.0)(default=0.01)
    router_z_loss_coef: float | int = number_in(0.0)(default=0.001)
    # PreTrainedConfig's own fields, declared again with the same defaults: its annotations are strings (`from
    # __future__ import annotations`), which `@strict` does not check.
    output_hidden_states: bool | None = False
    return_dict: bool | None = True
    is_encoder_decoder: bool = False
    dtype: str | torch.dtype | None = checked(
        lambda value: isinstance(value, torch.dtype) or isinstance(getattr(torch, value, None), torch.dtype),
        "a torch dtype or its name ('float32', 'bfloat16', ...), or null",
    )(default=None)

    def __post_init__(self, **kwargs):
        # `model_type` is the class's; a value read from a file is not a setting of the model.
        kwargs.pop("model_type", None)
        # Not a field (the model derives it); a file that states it is checked against the derived value.
        head_dim = kwargs.pop("head_dim", None)
        if head_dim is not None and not is_int(head_dim):
            raise wrong_type(self, "head_dim", head_dim, "an integer or null")
        if not isinstance(kwargs.get("rope_scaling"), dict | None):
            raise wrong_type(self, "rope_scaling", kwargs["rope_scaling"], "a dict of RoPE settings or null")
        warn_about_unknown_keys(type(self), kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        if head_dim is not None and head_dim != self.head_dim:
            raise rejected(
                self, "head_dim", head_dim, f"null or hidden_size // num_attention_heads = {self.head_dim} (derived)"
            )

    def validate_architecture(self) -> None:
        """Part of `@strict`'s validation: the relations between the sizes."""
        if self.hidden_size % self.num_attention_heads:
            accepted = f"a divisor of hidden_size={self.hidden_size} (head_dim = hidden_size / num_attention_heads)"
            raise rejected(self, "num_attention_heads", self.num_attention_heads, accepted)
        if self.num_attention_heads % self.num_key_value_heads:
            accepted = f"a divisor of num_attention_heads={self.num_attention_heads}"
            raise rejected(self, "num_key_value_heads", self.num_key_value_heads, accepted)
        if self.num_experts_per_tok > self.num_experts:
            raise rejected(
                self, "num_experts_per_tok", self.num_experts_per_tok, f"at most num_experts={self.num_experts}"
            )
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            accepted = f"a list of num_hidden_layers={self.num_hidden_layers} flags (1=MoE, 0=dense)"
            raise rejected(self, "moe_layer_freq", self.moe_layer_freq, accepted)
        if 0 in self.moe_layer_freq and self.dense_intermediate_size is None:
            accepted = "a positive integer when a layer is dense"
            raise rejected(self, "dense_intermediate_size", self.dense_intermediate_size, accepted)

    def validate_token_ids(self) -> None:
        """Part of `@strict`'s validation: every special token id inside the vocabulary. The 7B's ids, which a
        config.json without the key keeps (the official file has no mask id), are exempt: generation, the
        log-likelihood and the CLI reject one outside the vocabulary where they use it, asking for it."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for name in (name for name in defaults if name.endswith("_token_id")):
            value = getattr(self, name)
            if value == defaults[name]:
                continue
            for token in value if isinstance(value, list) else [value]:
                if token is not None and not 0 <= token < self.vocab_size:
                    raise rejected(self, name, value, f"a token id in [0, vocab_size={self.vocab_size}) or null")

    def validate_rope(self) -> None:
        """Part of `@strict`'s validation: the RoPE type, its numbers in range, then transformers' own checks of the
        keys a scaled RoPE needs."""
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if not isinstance(rope_type, str):
            raise wrong_type(self, "rope_parameters.rope_type", rope_type, "a string")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            accepted = f"'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}"
            raise rejected(self, "rope_parameters.rope_type", rope_type, accepted)
        for key, value in {"rope_theta": None, **rope}.items():
            name = key if key in ("rope_theta", "partial_rotary_factor") else f"rope_parameters.{key}"
            if key in ROPE_NUMBERS and not is_number(value):
                raise wrong_type(self, name, value, "a number")
            bounds = ROPE_NUMBERS.get(key, {})
            if is_number(value) and not in_interval(value, **bounds):
                raise rejected(self, name, value, interval_words(**bounds))
        factor = rope.get("partial_rotary_factor", 1.0)
        if int(self.head_dim * factor) % 2:
            raise rejected(self, "partial_rotary_factor", factor, f"an even rotary width (head_dim={self.head_dim})")
        if rope_type != "default":
            try:
                super().validate_rope()
            except (KeyError, TypeError) as err:
                raise rejected(self, "rope_parameters", rope, f"the keys of a '{rope_type}' RoPE: {err}") from err

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> "LLaDAMoEConfig":
        """transformers' `from_pretrained`; a value the file holds that the config refuses is the same `ValueError` /
        `TypeError`, naming the file too (`'folder/config.json': LLaDAMoEConfig: `hidden_size`=-1 is invalid; ...`)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (ValueError, TypeError) as err:
            file = config_file(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if type(err) not in (ValueError, TypeError) or file in str(err):
                raise
            raise type(err)(f"{file}: {err}") from err

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """The JSON object of `json_file`; anything else (not JSON, not UTF-8, a list, `null`, a string, a number) is a
        `ValueError` naming the file and what is wrong with it (transformers fails later with an `AttributeError` or
        a `TypeError` that names neither)."""
        return read_json_object(Path(json_file), "model config", "a JSON object of settings")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == OFFICIAL_MODEL_TYPE:
            # The official file says "llada", a name dense LLaDA-8B shares: accept it only with MoE fields.
            if "num_experts" not in config_dict or "expert_intermediate_size" not in config_dict:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: model_type 'llada' without `num_experts` / "
                    "`expert_intermediate_size` is dense LLaDA, not LLaDA-MoE; this package loads LLaDA-MoE only."
                )
            # Its `auto_map` names the official remote files, not this package's: drop it (saving writes ours).
            config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        """The serialized config (what `config.json` holds), with `architectures` under the official class names."""
        output = super().to_dict()
        if output.get("architectures"):
            output["architectures"] = [OFFICIAL_ARCHITECTURES.get(name, name) for name in output["architectures"]]
        return output

    @property
    def head_dim(self) -> int:
        """Width of one attention head; the official model derives it as hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` routes through experts (True) or is a dense SwiGLU MLP (False)."""
        return bool(self.moe_layer_freq[layer_idx])


__all__ = ["LLaDAMoEConfig"]
