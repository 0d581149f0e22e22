"""Independent reference for the official LLaDA-MoE checkpoint layout and forward math.

Written from ``shared/reference/architecture.md`` sections 1-3, not from the official source. It deliberately
imports neither ``transformers`` nor the package under test, so tests can use it as a neutral oracle:

- :func:`official_config_dict` builds an official-layout ``config.json`` dict for a tiny model.
- :func:`official_state_dict` draws random weights under the official key names.
- :func:`write_official_checkpoint` / :func:`load_official_checkpoint` write and read a sharded folder in the
  official Hugging Face layout (config, generation config, safetensors shards and index).
- :func:`reference_forward` is a functional forward pass that follows the official math, extended with an
  optional key-padding ``attention_mask`` (the official model ignores masks).
- :func:`reference_load_balancing_loss` and :func:`reference_z_loss` are the auxiliary router losses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


__all__ = [
    "load_official_checkpoint",
    "official_config_dict",
    "official_state_dict",
    "reference_forward",
    "reference_load_balancing_loss",
    "reference_z_loss",
    "write_official_checkpoint",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def official_config_dict(**overrides) -> dict:
    """Return an official-layout ``config.json`` dict for a tiny LLaDA-MoE model.

    The keys are exactly those of the official file (every ``LLaDAConfig`` field plus ``architectures``,
    ``auto_map``, ``model_type``, ``torch_dtype`` and ``transformers_version``). Defaults describe a tiny model:
    vocab 128, hidden 64, 4 heads / 4 kv heads, 2 layers, 8 experts with top-2, expert width 32, dense width 96.

    Args:
        **overrides: keys to replace (or add) after the defaults are filled in. ``moe_layer_freq`` is not
            resized automatically when ``num_hidden_layers`` is overridden; pass both.

    Returns:
        A fresh ``dict`` that ``json.dump`` can write as-is.
    """
    config = {
        "architectures": ["LLaDAMoEModelLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_lladamoe.LLaDAConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        },
        "bos_token_id": None,
        "clip_qkv": None,
        "dense_intermediate_size": 96,
        "eos_token_id": 120,
        "expert_intermediate_size": 32,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "max_position_embeddings": 256,
        "model_type": "llada",
        "moe_layer_freq": [1, 1],
        "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "num_attention_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "pad_token_id": 120,
        "partial_rotary_factor": 1.0,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000,
        "routed_scaling_factor": 1,
        "router_aux_loss_coef": 0.01,
        "router_num_group": None,
        "router_topk_group": None,
        "shared_expert_intermediate_size": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "5.23.0",
        "use_cache": False,
        "vocab_size": 128,
    }
    config.update(overrides)
    return config


def _head_dim(config: dict) -> int:
    # The official config has no head_dim key: the modeling code always derives it from hidden / heads.
    return config["hidden_size"] // config["num_attention_heads"]


def _num_kv_heads(config: dict) -> int:
    # LLaDAConfig maps num_key_value_heads=None to "same as num_attention_heads".
    nkv = config.get("num_key_value_heads")
    return config["num_attention_heads"] if nkv is None else nkv


def _is_moe_layer(config: dict, layer: int) -> bool:
    return bool(config["moe_layer_freq"][layer])


# ---------------------------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------------------------


def official_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Draw random weights for ``config`` under the official state-dict key names.

    Tensors are drawn in float32 from one ``torch.Generator`` seeded with ``seed`` in the official module order
    (embedding, then per layer the attention projections, q/k norms, MLP / router / experts, shared expert,
    expert bias, the two layer norms, then the final norm and ``lm_head``), then cast to ``dtype``. Scales are
    chosen so the forward is non-degenerate: norm weights are ``1 + 0.1 * randn`` (q/k norms ``1.25 + 0.1 *
    randn``, as in the fixture, so attention is not uniform), embeddings have std 0.5, linear layers std
    ``1/sqrt(fan_in)``, the router ``1.5/sqrt(hidden)`` (router logits of std ~1.5, so top-k choices are
    neither ties nor one-hot) and the expert bias ``0.05 * randn`` (comparable to routing probabilities).

    Args:
        config: an official-layout config dict (see :func:`official_config_dict`).
        seed: generator seed; the same seed and config give bit-identical tensors.
        dtype: dtype of the returned tensors.

    Returns:
        An insertion-ordered ``dict`` from official key name to a contiguous tensor. ``lm_head.weight`` is
        omitted when ``tie_word_embeddings`` is true.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    nh = config["num_attention_heads"]
    nkv = _num_kv_heads(config)
    hd = _head_dim(config)
    num_experts = config["num_experts"]
    expert_inter = config["expert_intermediate_size"]
    dense_inter = config["dense_intermediate_size"]
    shared_inter = config.get("shared_expert_intermediate_size")

    def randn(*shape: int, std: float, mean: float = 0.0) -> Tensor:
        return (mean + std * torch.randn(*shape, generator=gen)).to(dtype).contiguous()

    def linear(out_features: int, in_features: int) -> Tensor:
        return randn(out_features, in_features, std=1.0 / math.sqrt(in_features))

    def norm(size: int, mean: float = 1.0) -> Tensor:
        return randn(size, std=0.1, mean=mean)

    def swiglu(prefix: str, inter: int) -> dict[str, Tensor]:
        return {
            f"{prefix}.gate_proj.weight": linear(inter, hidden),
            f"{prefix}.up_proj.weight": linear(inter, hidden),
            f"{prefix}.down_proj.weight": linear(hidden, inter),
        }

    sd: dict[str, Tensor] = {"model.embed_tokens.weight": randn(config["vocab_size"], hidden, std=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, out_features in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd), ("o", hidden)):
            # o_proj's input width is hard-coded to hidden_size in the official attention.
            sd[f"{p}.self_attn.{name}_proj.weight"] = linear(out_features, hidden)
            if config.get("attention_bias"):
                sd[f"{p}.self_attn.{name}_proj.bias"] = randn(out_features, std=0.02)
        if config.get("qk_layernorm"):
            sd[f"{p}.self_attn.q_norm.weight"] = norm(hd, mean=1.25)
            sd[f"{p}.self_attn.k_norm.weight"] = norm(hd, mean=1.25)
        if _is_moe_layer(config, i):
            sd[f"{p}.mlp.gate.weight"] = randn(num_experts, hidden, std=1.5 / math.sqrt(hidden))
            for e in range(num_experts):
                sd.update(swiglu(f"{p}.mlp.experts.{e}", expert_inter))
            if config.get("moe_router_enable_expert_bias"):
                sd[f"{p}.mlp.expert_bias"] = randn(num_experts, std=0.05)
        else:
            sd.update(swiglu(f"{p}.mlp", dense_inter))
        if shared_inter is not None:
            # The shared expert hangs off the decoder layer itself, not off ``mlp``.
            sd.update(swiglu(f"{p}.shared_expert", shared_inter))
        sd[f"{p}.input_layernorm.weight"] = norm(hidden)
        sd[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
    sd["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = linear(config["vocab_size"], hidden)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folder I/O
# ---------------------------------------------------------------------------------------------------------------


def _shard_of_key(key: str, layer_to_shard: list[int], num_shards: int) -> int:
    # Like the fixture: the embedding goes with the first layers, the final norm and lm_head with the last.
    if key.startswith("model.layers."):
        return layer_to_shard[int(key.split(".")[2])]
    if key.startswith("model.embed_tokens."):
        return 0
    return num_shards - 1


def write_official_checkpoint(folder, config: dict, state_dict: dict[str, Tensor], num_shards: int = 2) -> Path:
    """Write a checkpoint folder in the official Hugging Face layout.

    Files written: ``config.json`` (sorted keys, indent 2), ``generation_config.json`` (eos/pad ids),
    ``model-0000k-of-0000n.safetensors`` shards (metadata ``{"format": "pt"}``) and
    ``model.safetensors.index.json`` (``metadata.total_size`` in bytes and a sorted ``weight_map``). Layers are
    split into ``num_shards`` contiguous groups, earlier shards taking the extra layer (3 layers / 2 shards gives
    layers 0-1 | layer 2, as in the fixture); the embedding goes to the first shard, every non-layer tensor
    after the layers (final norm, lm_head) to the last.

    Args:
        folder: destination directory (``str`` or ``Path``); created if missing, existing files overwritten.
        config: the config dict to write.
        state_dict: official-key tensors, e.g. from :func:`official_state_dict`.
        num_shards: number of safetensors shards, between 1 and ``num_hidden_layers``.

    Returns:
        The folder as a ``Path``.
    """
    folder = Path(folder)
    num_layers = config["num_hidden_layers"]
    if not 1 <= num_shards <= max(1, num_layers):
        raise ValueError(f"num_shards must be in [1, {max(1, num_layers)}], got {num_shards}")
    folder.mkdir(parents=True, exist_ok=True)

    base, extra = divmod(num_layers, num_shards)
    layer_to_shard: list[int] = []
    for shard in range(num_shards):
        layer_to_shard += [shard] * (base + (1 if shard < extra else 0))

    shards: list[dict[str, Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in state_dict.items():
        shards[_shard_of_key(key, layer_to_shard, num_shards)][key] = tensor.detach().contiguous()

    weight_map: dict[str, str] = {}
    total_size = 0
    for k, tensors in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()

    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    generation_config = {
        "_from_model_config": True,
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "transformers_version": config.get("transformers_version", "5.23.0"),
    }
    for name, payload in (
        ("config.json", config),
        ("generation_config.json", generation_config),
        ("model.safetensors.index.json", index),
    ):
        (folder / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return folder


def load_official_checkpoint(folder) -> tuple[dict, dict[str, Tensor]]:
    """Read an official-layout checkpoint folder (sharded with an index, or a single ``model.safetensors``).

    Args:
        folder: directory holding ``config.json`` and the safetensors file(s).

    Returns:
        ``(config, state_dict)``: the parsed ``config.json`` and every tensor under its official key, in the
        dtype stored on disk.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state_dict: dict[str, Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                state_dict[key] = f.get_tensor(key)
    return config, state_dict


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # OLMoE-style: statistics in fp32, cast back to the input dtype, and only then multiply by the weight.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _linear(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    # F.linear (not ``x @ W.t()``) so the fp32 GEMM path, hence rounding, is the one nn.Linear uses.
    return torch.nn.functional.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _swiglu(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    gate = _linear(x, sd, f"{prefix}.gate_proj")
    up = _linear(x, sd, f"{prefix}.up_proj")
    return _linear(torch.nn.functional.silu(gate) * up, sd, f"{prefix}.down_proj")


def _rope_tables(config: dict, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Return ``(cos, sin)`` of shape [B or 1, T, rotary_dim], computed in fp32 and cast to ``dtype``."""
    rope_scaling = config.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        raise NotImplementedError(f"only default RoPE is modelled, got rope_scaling={rope_scaling}")
    rotary_dim = int(_head_dim(config) * config["partial_rotary_factor"])
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (float(config["rope_theta"]) ** exponent)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [B, heads, T, hd] (rotate_half convention)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def _attention(
    a: Tensor, sd: dict[str, Tensor], p: str, config: dict, cos: Tensor, sin: Tensor, key_mask: Tensor | None
) -> Tensor:
    bsz, seq, _ = a.shape
    nh, nkv, hd = config["num_attention_heads"], _num_kv_heads(config), _head_dim(config)
    eps = config["rms_norm_eps"]

    q = _linear(a, sd, f"{p}.q_proj").view(bsz, seq, nh, hd)
    k = _linear(a, sd, f"{p}.k_proj").view(bsz, seq, nkv, hd)
    v = _linear(a, sd, f"{p}.v_proj").view(bsz, seq, nkv, hd)
    if config.get("qk_layernorm"):
        # One [hd] weight shared by every head, normalising each head separately, before clipping and RoPE.
        q = _rms_norm(q, sd[f"{p}.q_norm.weight"], eps)
        k = _rms_norm(k, sd[f"{p}.k_norm.weight"], eps)
    clip = config.get("clip_qkv")
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    # GQA: query head h reads kv head h // (nh // nkv), as with HF's repeat_kv.
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)

    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if key_mask is not None:
        # Finite fill instead of -inf, so a fully masked query row softmaxes to uniform rather than NaN.
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(bsz, seq, nh * hd)
    return _linear(out, sd, f"{p}.o_proj")


def _sparse_moe(m: Tensor, sd: dict[str, Tensor], p: str, config: dict) -> tuple[Tensor, Tensor]:
    """Return the routed-expert output [N, H] and the fp32 router logits [N, E] for flat inputs ``m`` [N, H]."""
    num_experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    # The router matmul runs in the activation dtype, like the official one; only the softmax is fp32.
    router_logits = torch.nn.functional.linear(m, sd[f"{p}.gate.weight"])
    # Extension: `moe_router_score_function` "sigmoid" scores each expert independently.
    if config.get("moe_router_score_function", "softmax") == "sigmoid":
        probs = torch.sigmoid(router_logits.float())
    else:
        probs = torch.softmax(router_logits.float(), dim=-1)
    bias = sd.get(f"{p}.expert_bias")
    if bias is not None:
        # Added to the probabilities; the biased values are also the mixing weights (official quirk).
        probs = probs + bias.float()
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    # Extensions over the official block (which ignores both): honour norm_topk_prob and routed_scaling_factor.
    if config.get("norm_topk_prob"):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = (weights * float(config.get("routed_scaling_factor") or 1.0)).to(m.dtype)

    out = torch.zeros_like(m)
    # Accumulate by expert id (the official summation order), which matters at bf16 rounding level.
    for e in range(num_experts):
        token_idx, slot = torch.where(chosen == e)
        if token_idx.numel() == 0:
            continue
        y = _swiglu(m[token_idx], sd, f"{p}.experts.{e}") * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(m.dtype))
    return out, router_logits.float()


def reference_forward(
    state_dict: dict[str, Tensor],
    config: dict,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run the official LLaDA-MoE forward (bidirectional, no cache) functionally from a state dict.

    The activation dtype is that of ``model.embed_tokens.weight``; mixed-precision steps follow the official
    code (RMSNorm statistics, RoPE tables, attention softmax and router softmax in fp32).

    Args:
        state_dict: official-key tensors (see :func:`official_state_dict` / :func:`load_official_checkpoint`).
        config: official-layout config dict.
        input_ids: [B, T] integer token ids.
        attention_mask: optional [B, T] of 0/1. Extension over the official code (which ignores masks): keys
            with 0 are excluded from attention. Query rows at masked positions still get (meaningless) logits.
        position_ids: optional [T], [1, T] or [B, T] RoPE positions; defaults to ``arange(T)``.

    Returns:
        ``(logits, router_logits)``: logits [B, T, vocab] in the activation dtype, and one fp32 tensor
        [B*T, num_experts] of pre-softmax router logits per MoE layer, in layer order (token order is
        row-major over [B, T]).
    """
    sd = state_dict
    bsz, seq = input_ids.shape
    eps = config["rms_norm_eps"]
    h = sd["model.embed_tokens.weight"][input_ids]  # no embedding scale
    dtype = h.dtype

    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device)
    position_ids = position_ids.reshape(-1, seq)  # [1 or B, T]
    cos, sin = _rope_tables(config, position_ids, dtype)
    key_mask = None if attention_mask is None else attention_mask.to(torch.bool)

    router_logits_list: list[Tensor] = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = _rms_norm(h, sd[f"{p}.input_layernorm.weight"], eps)
        h = h + _attention(a, sd, f"{p}.self_attn", config, cos, sin, key_mask)

        m = _rms_norm(h, sd[f"{p}.post_attention_layernorm.weight"], eps).reshape(bsz * seq, -1)
        if _is_moe_layer(config, i):
            mlp_out, router_logits = _sparse_moe(m, sd, f"{p}.mlp", config)
            router_logits_list.append(router_logits)
        else:
            mlp_out = _swiglu(m, sd, f"{p}.mlp")
        if config.get("shared_expert_intermediate_size") is not None:
            mlp_out = mlp_out + _swiglu(m, sd, f"{p}.shared_expert")
        h = h + mlp_out.reshape(bsz, seq, -1)

    h = _rms_norm(h, sd["model.norm.weight"], eps)
    lm_head = sd["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else sd["lm_head.weight"]
    return torch.nn.functional.linear(h, lm_head), router_logits_list


# ---------------------------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------------------------


def _token_weights(router_logits_list: list[Tensor], attention_mask: Tensor | None) -> Tensor | None:
    """Per-row 0/1 weights [num_layers * N] for the concatenated router logits, or None without a mask."""
    if attention_mask is None:
        return None
    flat = attention_mask.reshape(-1).float()
    if flat.numel() != router_logits_list[0].shape[0]:
        raise ValueError(f"attention_mask has {flat.numel()} tokens, router logits {router_logits_list[0].shape[0]}")
    return flat.repeat(len(router_logits_list))  # layers are concatenated in order, tokens row-major in each


def reference_load_balancing_loss(
    router_logits_list: list[Tensor], num_experts: int, top_k: int, attention_mask: Tensor | None = None
) -> Tensor:
    """Switch-style load-balancing loss over all MoE layers (architecture.md §3.7).

    With r the concatenation of every layer's router logits, p = softmax(r) and a one-hot [N, top_k, E] of the
    top-k experts of p: f = mean over tokens of the one-hot ([top_k, E]), P = mean over tokens of p ([E]),
    loss = E * sum(f * P) (summed over k and E). Perfectly balanced routing gives ``top_k``.

    Args:
        router_logits_list: per MoE layer, [B*T, E] router logits (as returned by :func:`reference_forward`).
        num_experts: E.
        top_k: experts chosen per token.
        attention_mask: optional [B, T] 0/1; tokens with 0 are left out of both means.

    Returns:
        A scalar fp32 tensor (0.0 when the list is empty).
    """
    if not router_logits_list:
        return torch.tensor(0.0)
    logits = torch.cat([r.float() for r in router_logits_list], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    one_hot = torch.nn.functional.one_hot(chosen, num_experts).float()  # [N, k, E]
    weights = _token_weights(router_logits_list, attention_mask)
    if weights is None:
        f = one_hot.mean(dim=0)
        big_p = probs.mean(dim=0)
    else:
        f = (one_hot * weights[:, None, None]).sum(dim=0) / weights.sum()
        big_p = (probs * weights[:, None]).sum(dim=0) / weights.sum()
    return num_experts * (f * big_p[None, :]).sum()


def reference_z_loss(router_logits_list: list[Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """Router z-loss: mean over tokens and MoE layers of logsumexp(r)^2 (the paper's z-loss, unweighted).

    Every layer sees the same tokens, so the mean over the concatenation equals the average of per-layer means.

    Args:
        router_logits_list: per MoE layer, [B*T, E] router logits.
        attention_mask: optional [B, T] 0/1; tokens with 0 are left out of the mean.

    Returns:
        A scalar fp32 tensor (0.0 when the list is empty).
    """
    if not router_logits_list:
        return torch.tensor(0.0)
    logits = torch.cat([r.float() for r in router_logits_list], dim=0)
    z = torch.logsumexp(logits, dim=-1).pow(2)
    weights = _token_weights(router_logits_list, attention_mask)
    if weights is None:
        return z.mean()
    return (z * weights).sum() / weights.sum()
