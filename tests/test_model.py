"""Model behaviour on tiny random configs: backends agree, padding, losses, checkpointing, cache, registration."""

import inspect
import re

import pytest
import torch
from accelerate import infer_auto_device_map
from conftest import tiny_config, tiny_model
from official_reference import reference_load_balancing_loss, reference_z_loss
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, DynamicCache, Trainer, TrainingArguments
from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

from modeling_llada_moe import (
    LLaDAMoEConfig,
    LLaDAMoEForMaskedLM,
    LLaDAMoEMaskedLMOutput,
    LLaDAMoEModel,
    LLaDAMoEModelLM,
)
from modeling_llada_moe.modeling_llada_moe import LLaDAMoERotaryEmbedding, masked_lm_loss


def ids(batch=2, length=12, seed=0):
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


ATTN = ["eager", "sdpa", "flex_attention"]
EXPERTS = ["eager", "grouped_mm", "batched_mm", "grouped_mm_chunked"]


@torch.no_grad()
def test_attention_and_experts_backends_agree():
    model = tiny_model()
    x = ids()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    reference = model(x).logits
    for attn in ATTN:
        for experts in EXPERTS:
            model.set_attn_implementation(attn)
            model.set_experts_implementation(experts)
            logits = model(x).logits
            assert (logits - reference).abs().max().item() < 1e-5, (attn, experts)


@torch.no_grad()
@pytest.mark.parametrize("attn", ATTN)
def test_left_padded_rows_match_rows_alone(attn):
    model = tiny_model(attn_implementation=attn)
    model.set_attn_implementation(attn)
    rows = [ids(1, 9, seed=1)[0], ids(1, 14, seed=2)[0], ids(1, 5, seed=3)[0]]
    width = max(len(r) for r in rows)
    batch = torch.full((3, width), 120)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    padded = model(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        assert (padded[i, width - len(row) :] - alone).abs().max().item() < 1e-5
    # The mask does something: without it the padded rows change.
    assert (model(batch).logits[0, -9:] - padded[0, -9:]).abs().max().item() > 1e-3


@torch.no_grad()
def test_position_ids_are_honoured():
    model = tiny_model()
    x = ids(1, 10)
    base = model(x).logits
    shifted = model(x, position_ids=torch.arange(10)[None] + 7).logits
    scrambled = model(x, position_ids=torch.tensor([[0, 2, 1, 3, 4, 5, 6, 7, 9, 8]])).logits
    assert (base - shifted).abs().max().item() < 1e-4  # RoPE is relative: a uniform shift changes ~nothing
    assert (base - scrambled).abs().max().item() > 1e-3


def test_attention_mask_of_wrong_shape_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\); expected \(2, 12\)"):
        model(ids(), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_labels_give_mean_cross_entropy_over_scored_positions():
    model = tiny_model()
    x = ids()
    labels = torch.full_like(x, -100)
    labels[0, 3], labels[1, 5], labels[1, 9] = 7, 11, 3
    out = model(x, labels=labels)
    logits = out.logits.detach()
    expected = torch.stack(
        [-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in [(0, 3), (1, 5), (1, 9)]]
    ).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    assert model(x, labels=torch.full_like(x, -100)).loss.item() == 0.0
    with pytest.raises(ValueError, match="labels has shape"):
        model(x, labels=labels[:, :4])


@pytest.mark.parametrize("masked", [False, True])
def test_router_losses_match_independent_computation_and_have_gradients(masked):
    model = tiny_model(router_aux_loss_coef=0.3, router_z_loss_coef=0.05)
    model.train()
    x = ids(2, 10)
    mask = torch.ones_like(x)
    if masked:
        mask[0, :4] = 0
    labels = x.clone()
    out = model(x, attention_mask=mask if masked else None, labels=labels, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (20, 8)
    assert out.router_logits[0].dtype == torch.float32
    routers = [r.detach() for r in out.router_logits]
    attention = mask if masked else None
    torch.testing.assert_close(out.aux_loss, reference_load_balancing_loss(routers, 8, 2, attention))
    torch.testing.assert_close(out.z_loss, reference_z_loss(routers, attention))
    ce = model(x, attention_mask=attention, labels=labels).loss
    torch.testing.assert_close(out.loss, ce + 0.3 * out.aux_loss + 0.05 * out.z_loss)

    router = model.model.layers[0].mlp.gate.weight
    (grad_aux,) = torch.autograd.grad(out.aux_loss, router, retain_graph=True)
    (grad_z,) = torch.autograd.grad(out.z_loss, router)
    assert grad_aux.abs().sum() > 0 and grad_z.abs().sum() > 0


def test_config_default_output_router_logits():
    model = tiny_model(output_router_logits=True)
    out = model(ids(), labels=ids())
    assert out.aux_loss > 0 and out.z_loss > 0  # 2.03 and 4.29 when measured
    config, plain = model.config, model(ids(), labels=ids(), output_router_logits=False)
    expected = plain.loss + config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)  # and they are in the loss
    assert model(ids(), output_router_logits=False).router_logits is None


def test_num_items_in_batch_divides_the_summed_cross_entropy():
    model = tiny_model()
    x = ids()
    labels = torch.full_like(x, -100)
    labels[0, 3], labels[1, 5], labels[1, 9] = 7, 11, 3
    mean = model(x, labels=labels).loss
    # transformers' convention: the loss of a micro-batch is its summed CE over the whole step's label count.
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=torch.tensor(12)).loss, mean * 3 / 12)
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=6).loss, mean * 3 / 6)
    # transformers' setter replaces the loss function; it gets the step's label count too.
    seen = {}
    model.loss_function = lambda logits, labels, vocab_size, num_items_in_batch=None: seen.setdefault(
        "count", torch.tensor(float(num_items_in_batch))
    )
    assert model(x, labels=labels, num_items_in_batch=5).loss.item() == 5.0 and seen["count"].item() == 5.0


def trainer_step(tmp_path, model, rows, batch_size: int, accumulation: int) -> tuple[dict[str, torch.Tensor], float]:
    """One plain `transformers.Trainer` SGD step (lr 1, no clipping) over `rows`: parameters after it and the loss."""
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, result.training_loss


@pytest.mark.parametrize("router_losses", [False, True])
def test_trainer_gradient_accumulation_matches_the_full_batch(tmp_path, router_losses):
    # 1, 2, 4 and 8 scored positions: however the sampler pairs the rows, the two micro-batches count different
    # numbers of labels, so a per-micro-batch mean (or a sum of means) gives other gradients than one batch of 4.
    x = ids(4, 12, seed=7)
    if router_losses:
        # The router losses see only the inputs: with one unmasked input row repeated, every micro-batch's router
        # loss equals the full batch's, so accumulation must add it once in total (weighted by the label shares).
        x = x[:1].expand(4, -1).clone()
    rows = []
    for row, count in zip(x, (1, 2, 4, 8)):
        labels = torch.full_like(row, -100)
        labels[:count] = row[:count]
        inputs = row if router_losses else row.masked_fill(labels != -100, 126)
        rows.append({"input_ids": inputs, "labels": labels})
    overrides = dict(output_router_logits=router_losses, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    before = tiny_model(seed=3, **overrides).model.layers[0].mlp.gate.weight.detach().clone()
    full, full_loss = trainer_step(tmp_path, tiny_model(seed=3, **overrides).train(), rows, 4, 1)
    accumulated, accumulated_loss = trainer_step(tmp_path, tiny_model(seed=3, **overrides).train(), rows, 2, 2)
    assert not torch.equal(full["model.layers.0.mlp.gate.weight"], before)  # the step moved the weights
    for name, value in full.items():
        torch.testing.assert_close(accumulated[name], value, atol=2e-6, rtol=1e-5, msg=name)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, labels = ids(2, 10), ids(2, 10, seed=5)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=1)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(x, labels=labels, output_router_logits=True)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert "model.layers.1.mlp.gate.weight" in grads[1]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_reentrant_checkpointing_with_router_losses_is_refused():
    model = tiny_model()
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model(ids(), labels=ids(), output_router_logits=True)
    model(ids(), labels=ids()).loss.backward()  # without router losses reentrant checkpointing is fine


@pytest.mark.parametrize("experts", EXPERTS)
def test_backward_through_each_experts_implementation(experts):
    model = tiny_model(seed=2)
    model.train()
    model.set_experts_implementation(experts)
    model(ids(), labels=ids(seed=3)).loss.backward()
    grad = model.model.layers[0].mlp.experts.gate_up.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_pad_embedding_row_is_trainable():
    # LLaDA SFT trains on <|endoftext|> padding: unlike the official padding_idx, its row must get gradient.
    model = tiny_model()
    model.train()
    x = torch.full((1, 6), 120)
    model(x, labels=x).loss.backward()
    assert model.model.embed_tokens.weight.grad[120].abs().sum() > 0


@torch.no_grad()
def test_cache_feeds_earlier_keys_to_new_tokens():
    # With one layer, keys of the prefix depend on the prefix only, so a cached forward of the suffix must equal
    # the suffix positions of the full forward: this checks RoPE offsets, cache update and mask lengths.
    model = tiny_model(num_hidden_layers=1, moe_layer_freq=[1])
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    full = model(x, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    first = model(x[:, :7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True)
    assert first.past_key_values.get_seq_length() == 7
    second = model(x[:, 7:], attention_mask=mask, past_key_values=first.past_key_values)
    torch.testing.assert_close(second.logits, full[:, 7:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_logits_to_keep_and_hidden_states():
    model = tiny_model()
    out = model(ids(), logits_to_keep=3, output_hidden_states=True, output_attentions=False)
    assert out.logits.shape == (2, 3, 128)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.logits, model(ids()).logits[:, -3:], atol=1e-6, rtol=0)
    assert isinstance(model(ids(), return_dict=False), tuple)


def test_signatures_tell_transformers_what_the_model_supports():
    # transformers reads these by introspection: typed `**kwargs` (output_attentions, num_items_in_batch, ...), the
    # output class of the LM (router_logits), and a RoPE module built from `config` (and an optional `device`).
    for model_class in (LLaDAMoEModel, LLaDAMoEForMaskedLM):
        kwargs = inspect.signature(model_class.forward).parameters["kwargs"].annotation
        (typed,) = kwargs.__args__
        assert {"output_attentions", "output_hidden_states"} <= set(typed.__annotations__), model_class
    assert "num_items_in_batch" in typed.__annotations__
    output = LLaDAMoEForMaskedLM.forward.__annotations__["return"]
    assert output is LLaDAMoEMaskedLMOutput and "router_logits" in output.__dataclass_fields__
    rope = LLaDAMoERotaryEmbedding(tiny_config(), device="cpu")
    assert rope.inv_freq.device.type == "cpu"
    torch.testing.assert_close(rope.inv_freq, tiny_model().model.rotary_emb.inv_freq)
    model = tiny_model()
    assert model.loss_type == "ForMaskedLM" and model.loss_function is masked_lm_loss


def test_auto_classes_are_registered(tmp_path):
    config = tiny_config()
    assert AutoConfig.for_model("llada_moe").__class__ is LLaDAMoEConfig
    assert type(AutoModel.from_config(config)) is LLaDAMoEForMaskedLM
    assert type(AutoModelForMaskedLM.from_config(config)) is LLaDAMoEForMaskedLM
    assert LLaDAMoEModelLM is LLaDAMoEForMaskedLM
    tiny_model().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDAMoEConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is LLaDAMoEForMaskedLM


def test_experts_implementation_selection(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = LLaDAMoEForMaskedLM.from_pretrained(tmp_path, experts_implementation="batched_mm")
    assert model.config._experts_implementation == "batched_mm"
    assert LLaDAMoEForMaskedLM.from_pretrained(tmp_path).config._experts_implementation == "grouped_mm_chunked"
    with pytest.raises((ValueError, KeyError), match="no_such_impl"):
        model.set_experts_implementation("no_such_impl")


def test_device_map_auto_and_no_split_modules(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = LLaDAMoEForMaskedLM.from_pretrained(tmp_path, device_map="auto")
    assert set(model._no_split_modules) == {"LLaDAMoEDecoderLayer"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.isfinite(model(ids()).logits).all()
    # With too little memory for the whole model, accelerate places whole decoder layers, never parts of one.
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    device_map = infer_auto_device_map(
        model,
        max_memory={"cpu": int(layer_bytes * 1.5), "disk": 10**9},
        no_split_module_classes=["LLaDAMoEDecoderLayer"],
    )
    assert set(device_map.values()) == {"cpu", "disk"}
    assert not any(re.match(r"model\.layers\.\d+\.", name) for name in device_map), device_map


def test_tensor_parallel_plan_names_real_modules_and_known_styles():
    model = tiny_model()
    names = [name for name, _ in model.named_modules()]
    plan = {**{f"model.{k}": v for k, v in model.config.base_model_tp_plan.items()}, **model._tp_plan}
    for pattern, style in plan.items():
        assert style in ALL_PARALLEL_STYLES, style
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(name) for name in names), pattern
    assert model.supports_tp_plan


def test_dense_and_shared_expert_layers_are_built_as_configured():
    model = tiny_model(moe_layer_freq=[0, 1], shared_expert_intermediate_size=24, moe_router_enable_expert_bias=True)
    dense, moe = model.model.layers
    assert dense.mlp.gate_proj.weight.shape == (96, 64) and not hasattr(dense.mlp, "experts")
    assert moe.mlp.experts.gate_up.weight.shape == (8 * 2 * 32, 64)
    assert dense.shared_expert.up_proj.weight.shape == (24, 64) and moe.shared_expert is not None
    assert "model.layers.1.mlp.expert_bias" in model.state_dict()
    out = model(ids(), output_router_logits=True, labels=ids())
    assert len(out.router_logits) == 1  # only MoE layers route
