"""LLaDA-MoE configuration.

Reads the official `config.json` of `inclusionAI/LLaDA-MoE-7B-A1B-*` unchanged (its `model_type` is `"llada"`); the
defaults are the 7B-A1B values. Every field is either honoured by the model or rejected with an error that names
it, its value and what is accepted (`TypeError` for a wrong type, `ValueError` for a value out of range); a key that
neither this class nor transformers knows is kept but warned about by name. Nothing in the file is silently ignored.
"""

import dataclasses
import difflib
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging


logger = logging.get_logger(__name__)


ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
# `model_type` of the official config.json (shared with dense LLaDA-8B).
OFFICIAL_MODEL_TYPE = "llada"
# Saved `architectures` use the official class names (tools such as GGUF converters key on them); the masked-LM class
# is `LLaDAMoEForMaskedLM` here, with `LLaDAMoEModelLM` as its alias, so either name loads the same class.
OFFICIAL_ARCHITECTURES = {"LLaDAMoEForMaskedLM": "LLaDAMoEModelLM"}

# Field types, checked before anything reads the values (a wrong type is a `TypeError` naming the field).
POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "num_experts",
    "num_experts_per_tok",
)
OPTIONAL_INT_FIELDS = (
    "num_key_value_heads",
    "dense_intermediate_size",
    "shared_expert_intermediate_size",
    "router_num_group",
    "router_topk_group",
)
# Float fields: the finite values each accepts and how the error says it (ints are accepted: JSON writes 1 for 1.0).
FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "initializer_range": (lambda value: value >= 0, "a finite float >= 0 (the std of the initial weights)"),
    "rms_norm_eps": (lambda value: value > 0, "a finite float > 0"),
    "attention_dropout": (lambda value: 0 <= value < 1, "a float in [0, 1)"),
    "routed_scaling_factor": (lambda value: value > 0, "a finite float > 0"),
    "router_aux_loss_coef": (lambda value: value >= 0, "a finite float >= 0"),
    "router_z_loss_coef": (lambda value: value >= 0, "a finite float >= 0"),
    "clip_qkv": (lambda value: value > 0, "a finite float > 0, or null for no clipping"),
}
FLOAT_FIELDS = tuple(field for field in FLOAT_RANGES if field != "clip_qkv")
OPTIONAL_FLOAT_FIELDS = ("clip_qkv",)
BOOL_FIELDS = (
    "use_cache",
    "tie_word_embeddings",
    "attention_bias",
    "qk_layernorm",
    "norm_topk_prob",
    "moe_router_enable_expert_bias",
    "output_router_logits",
    "is_encoder_decoder",
)
OPTIONAL_BOOL_FIELDS = ("output_hidden_states", "return_dict")
STRING_FIELDS = ("hidden_act", "moe_router_score_function")
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")

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


def is_int(value: Any) -> bool:
    """An integer and not a bool (`True` is an `int` to Python, not a size or a token id)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (ints included, as JSON writes `1` for 1.0) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
        rms_norm_eps (`float`, defaults to 1e-5): epsilon of every RMSNorm, the q/k norms included.
        rope_parameters (`dict`, *optional*): RoPE settings; the official keys `rope_theta` (50000),
            `rope_scaling` and `partial_rotary_factor` are accepted and folded in here.
        attention_bias (`bool`, defaults to `False`), attention_dropout (`float`, defaults to 0.0),
        clip_qkv (`float`, *optional*): clamp q, k and v to +-clip_qkv after the q/k norms.
        qk_layernorm (`bool`, defaults to `True`): RMSNorm over head_dim on queries and keys before RoPE.
        num_experts (`int`, defaults to 64), num_experts_per_tok (`int`, defaults to 8): routed experts and top-k.
        moe_layer_freq (`list[int]`, *optional*): one 0/1 flag per layer, 1 = MoE layer, 0 = dense MLP layer;
            `None` means every layer is MoE.
        norm_topk_prob (`bool`, defaults to `False`): renormalise the top-k routing weights to sum to 1.
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routing weights.
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

    vocab_size: int = 157184
    hidden_size: int = 2048
    dense_intermediate_size: int = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = False
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892
    mask_token_id: int | None = 156895
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    clip_qkv: float | None = None
    qk_layernorm: bool = True
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_layer_freq: list[int] | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    router_num_group: int | None = None
    router_topk_group: int | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001

    def __post_init__(self, **kwargs):
        # `model_type` is the class's; a value read from a file is not a setting of the model.
        kwargs.pop("model_type", None)
        # Aliases (`num_local_experts`) are set before the checks, so the value they carry is checked too.
        for alias, field in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, field, kwargs.pop(alias))
        self._check_types(kwargs)
        # Not a field (the model derives it); a file that states it is checked against the derived value.
        head_dim = kwargs.pop("head_dim", None)
        warn_about_unknown_keys(type(self), kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._validate()
        if head_dim is not None and head_dim != self.head_dim:
            raise ValueError(
                f"LLaDAMoEConfig: `head_dim`={head_dim!r} is invalid; expected null or hidden_size // "
                f"num_attention_heads = {self.head_dim} (LLaDA-MoE derives it)."
            )

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

    def _check_types(self, kwargs: dict[str, Any]) -> None:
        """`TypeError` naming the first field whose value has the wrong type; numpy scalars become Python numbers."""

        def fail(field: str, value: Any, accepted: str) -> None:
            raise TypeError(f"LLaDAMoEConfig: `{field}`={value!r} has the wrong type; expected {accepted}.")

        for field in POSITIVE_INT_FIELDS + OPTIONAL_INT_FIELDS:
            value = getattr(self, field)
            if value is None and field in OPTIONAL_INT_FIELDS:
                continue
            if not is_int(value):
                fail(field, value, "an integer" + (" or null" if field in OPTIONAL_INT_FIELDS else ""))
            setattr(self, field, int(value))
        for field in FLOAT_FIELDS + OPTIONAL_FLOAT_FIELDS:
            value = getattr(self, field)
            if value is None and field in OPTIONAL_FLOAT_FIELDS:
                continue
            if not is_real(value):
                fail(field, value, "a number" + (" or null" if field in OPTIONAL_FLOAT_FIELDS else ""))
            if type(value) not in (int, float):
                setattr(self, field, float(value))
        for field in BOOL_FIELDS + OPTIONAL_BOOL_FIELDS:
            value = getattr(self, field)
            if not (isinstance(value, bool) or (value is None and field in OPTIONAL_BOOL_FIELDS)):
                fail(field, value, "true or false" + (" or null" if field in OPTIONAL_BOOL_FIELDS else ""))
        for field in STRING_FIELDS:
            if not isinstance(getattr(self, field), str):
                fail(field, getattr(self, field), "a string")
        for field in TOKEN_ID_FIELDS:
            value = getattr(self, field)
            if field == "eos_token_id" and isinstance(value, (list, tuple)):
                if not all(is_int(token) for token in value):
                    fail(field, value, "an integer token id, a list of them, or null")
                self.eos_token_id = [int(token) for token in value]
            elif value is not None:
                if not is_int(value):
                    fail(field, value, "an integer token id or null")
                setattr(self, field, int(value))
        freq = self.moe_layer_freq
        if freq is not None and (not isinstance(freq, (list, tuple)) or not all(is_int(flag) for flag in freq)):
            fail("moe_layer_freq", freq, "a list of integer flags (1 = MoE layer, 0 = dense layer) or null")
        for field, value in (("rope_parameters", self.rope_parameters), ("rope_scaling", kwargs.get("rope_scaling"))):
            if value is not None and not isinstance(value, dict):
                fail(field, value, "a dict of RoPE settings or null")
        rope = kwargs.get("rope_scaling") or self.rope_parameters or {}
        for field in ("rope_theta", "partial_rotary_factor"):
            value = kwargs.get(field, rope.get(field))
            if value is not None and not is_real(value):
                fail(field, value, "a number")
        if not isinstance(rope.get("rope_type", rope.get("type", "default")), str):
            fail("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "a string")
        head_dim = kwargs.get("head_dim")
        if head_dim is not None and not is_int(head_dim):
            fail("head_dim", head_dim, "an integer or null")

    def _validate(self) -> None:
        def fail(field: str, value: Any, accepted: str) -> None:
            raise ValueError(f"LLaDAMoEConfig: `{field}`={value!r} is invalid; expected {accepted}.")

        for field in POSITIVE_INT_FIELDS + ("num_key_value_heads",):
            value = getattr(self, field)
            if value <= 0:
                fail(field, value, "a positive integer")
        for field, (accepts, accepted) in FLOAT_RANGES.items():
            value = getattr(self, field)
            if value is not None and not (math.isfinite(value) and accepts(value)):
                fail(field, value, accepted)
        if self.hidden_size % self.num_attention_heads:
            fail(
                "num_attention_heads",
                self.num_attention_heads,
                f"a divisor of hidden_size={self.hidden_size} (head_dim = hidden_size / num_attention_heads)",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        # The grouped_mm experts (the default on CPU, the fallback of the fused CUDA kernels) need rows of 16 bytes in
        # bf16 / fp16, which any other width fails inside torch at the first forward.
        for field in ("hidden_size", "expert_intermediate_size"):
            if getattr(self, field) % 8:
                fail(field, getattr(self, field), "a multiple of 8 (grouped_mm experts need 16-byte aligned rows)")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok, f"at most num_experts={self.num_experts}")

        freq = self.moe_layer_freq
        if not isinstance(freq, (list, tuple)) or len(freq) != self.num_hidden_layers:
            fail("moe_layer_freq", freq, f"a list of num_hidden_layers={self.num_hidden_layers} flags (1=MoE, 0=dense)")
        if any(flag not in (0, 1) for flag in freq):
            fail("moe_layer_freq", freq, "entries 0 (dense MLP layer) or 1 (MoE layer)")
        self.moe_layer_freq = [int(flag) for flag in freq]
        if 0 in self.moe_layer_freq and (self.dense_intermediate_size is None or self.dense_intermediate_size <= 0):
            fail("dense_intermediate_size", self.dense_intermediate_size, "a positive integer when a layer is dense")
        shared = self.shared_expert_intermediate_size
        if shared is not None and shared <= 0:
            fail("shared_expert_intermediate_size", shared, "a positive integer, or null for no shared expert")

        if self.hidden_act not in ACT2FN:
            fail("hidden_act", self.hidden_act, f"one of {sorted(ACT2FN)}")
        if self.moe_router_score_function not in ROUTER_SCORE_FUNCTIONS:
            fail("moe_router_score_function", self.moe_router_score_function, f"one of {ROUTER_SCORE_FUNCTIONS}")
        for field in ("router_num_group", "router_topk_group"):
            if getattr(self, field) is not None:
                fail(field, getattr(self, field), "null: group-limited routing is not implemented by LLaDA-MoE")
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for field in TOKEN_ID_FIELDS:
            value = getattr(self, field)
            if value == defaults[field]:
                # The 7B's ids, kept by a config.json without the key (the official file has no mask id): generation,
                # the log-likelihood and the CLI reject one outside the vocabulary where they use it, asking for it.
                continue
            if value == []:
                fail(field, value, "at least one token id in the list, or null for none")
            for token in value if isinstance(value, list) else [value]:
                if token is not None and not 0 <= token < self.vocab_size:
                    fail(field, value, f"a token id in [0, vocab_size={self.vocab_size}) or null")
        self._validate_rope()

    def _validate_rope(self) -> None:
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"LLaDAMoEConfig: `rope_parameters.rope_type`={rope_type!r} is invalid; expected 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )
        theta = rope.get("rope_theta")
        if not is_real(theta):
            raise TypeError(f"LLaDAMoEConfig: `rope_theta`={theta!r} has the wrong type; expected a number.")
        if not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"LLaDAMoEConfig: `rope_theta`={theta!r} is invalid; expected a finite positive float.")
        factor = rope.get("partial_rotary_factor", 1.0)
        if not is_real(factor):
            raise TypeError(
                f"LLaDAMoEConfig: `partial_rotary_factor`={factor!r} has the wrong type; expected a number in (0, 1]."
            )
        if not 0.0 < factor <= 1.0 or int(self.head_dim * factor) % 2:
            raise ValueError(
                f"LLaDAMoEConfig: `partial_rotary_factor`={factor!r} is invalid; expected a float in (0, 1] giving an "
                f"even rotary width (head_dim={self.head_dim})."
            )
        if rope_type != "default":
            # transformers validates the keys each scaled RoPE needs (factor, original length, ...).
            try:
                self.validate_rope()
            except (KeyError, TypeError) as err:
                raise ValueError(f"LLaDAMoEConfig: `rope_parameters`={rope!r} is invalid: {err}") from err


__all__ = ["LLaDAMoEConfig"]
