"""LoRA on the routed experts (`trl_ext.peft_experts`): one adapter per expert, applied by every experts
backend and on 4-bit experts, trained by the SFT trainer, saved / reloaded / merged through PEFT."""

import bitsandbytes as bnb  # the dev extra installs it: a broken install fails these tests instead of skipping them
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from modeling_llada_moe.apps.tiny_task import reversal_examples
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer
from trl_ext.peft_experts import ExpertsLoraLayer, experts_lora_config, load_adapter


BACKENDS = ("eager", "grouped_mm", "batched_mm", "grouped_mm_chunked")


def ids(seed=0):
    return torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(seed))


def adapted(model, **overrides):
    """`model` with random (non-zero) expert adapters only, so the experts alone change the logits."""
    settings = dict(r=2, target_modules=["experts"], init_lora_weights=False)
    return get_peft_model(model, experts_lora_config(**{**settings, **overrides}))


def expert_layer(peft_model, layer=0) -> ExpertsLoraLayer:
    return peft_model.base_model.model.model.layers[layer].mlp.experts


def test_each_expert_has_its_own_adapter():
    layer = expert_layer(adapted(tiny_model()))
    assert layer.lora_A["default"].weight.shape == (2 * 8, 64)  # [r*E, H]
    assert layer.lora_B["default"].weight.shape == (2 * 32, 2 * 8)  # [2I, r*E]
    assert layer.lora_down_A["default"].weight.shape == (2 * 8, 32)  # [r*E, I]
    before = layer.delta("gate_up", "default")
    with torch.no_grad():
        layer.lora_A["default"].weight.view(8, 2, 64)[3] += 1.0  # expert 3's factor only
    after = layer.delta("gate_up", "default")
    changed = [e for e in range(8) if not torch.equal(before[e], after[e])]
    assert changed == [3]
    # The update equals B_e A_e * scaling for that expert, in PEFT's ParamWrapper factor layout.
    a = layer.lora_A["default"].weight.view(8, 2, 64)[3]
    b = layer.lora_B["default"].weight.view(64, 2, 8)[..., 3]
    torch.testing.assert_close(after[3], b @ a * layer.scaling["default"])


def test_every_backend_applies_the_adapter():
    model = tiny_model()
    base = model(ids()).logits
    peft_model = adapted(model)
    by_backend, grads = {}, {}
    for backend in BACKENDS:
        peft_model.base_model.model.set_experts_implementation(backend)
        peft_model.zero_grad()
        by_backend[backend] = peft_model(ids()).logits
        by_backend[backend].square().mean().backward()  # and trains: the same adapter gradients everywhere
        grads[backend] = [p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n]
    assert (by_backend["eager"] - base).abs().max() > 1e-2
    assert all(grad.abs().sum() > 0 for grad in grads["eager"])
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(by_backend[backend], by_backend["eager"], rtol=1e-5, atol=1e-5)
        for grad, expected in zip(grads[backend], grads["eager"], strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    with peft_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, base, rtol=0, atol=0)


def test_fused_path_is_bypassed_with_a_message(caplog):
    peft_model = adapted(tiny_model())
    peft_model.base_model.model.set_experts_implementation("grouped_mm_chunked")
    expected = peft_model(ids()).logits
    # The fused Triton kernels read the containers in place; with an adapter active they hand over to
    # grouped_mm_chunked (no Triton needed for that), and say so.
    peft_model.base_model.model.config._experts_implementation = "llada_fused"
    from transformers.utils import logging

    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        out = peft_model(ids()).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert "does not apply a LoRA adapter on the experts" in caplog.text


def test_save_load_and_merge_give_the_adapted_logits(tmp_path):
    peft_model = adapted(tiny_model(), target_modules=["q_proj", "experts"])
    expected = peft_model(ids()).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = load_adapter(tiny_model(), str(tmp_path))
    torch.testing.assert_close(reloaded(ids()).logits, expected, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(module, ExpertsLoraLayer) for module in merged.modules())
    torch.testing.assert_close(merged(ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_qlora_on_4bit_experts(tmp_path):
    from quantization import load_quantized

    tiny_model().save_pretrained(tmp_path)
    model = load_quantized(tmp_path, bits=4, compute_dtype=torch.float32, device_map="cpu")
    assert not model.model.layers[0].mlp.experts.gate_up.weight.is_floating_point()
    # The dense model the 4-bit one dequantizes to: with the same adapter it must give the same logits.
    dequantized = tiny_model()
    with torch.no_grad():
        for layer, source in zip(dequantized.model.layers, model.model.layers, strict=True):
            gate_up, down = source.mlp.experts.dequantize_experts(0, 8, torch.float32)
            layer.mlp.experts.gate_up.weight.copy_(gate_up.reshape(-1, 64))
            layer.mlp.experts.down.weight.copy_(down.reshape(-1, 32))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                weight = getattr(source.self_attn, name).weight
                getattr(layer.self_attn, name).weight.copy_(bnb.functional.dequantize_4bit(weight, weight.quant_state))
    base = model(ids()).logits
    peft_model = adapted(model)
    out = peft_model(ids()).logits
    assert (out - base).abs().max() > 1e-2
    reference = adapted(dequantized)
    adapter = {name: value for name, value in peft_model.state_dict().items() if "lora_" in name}
    assert not reference.load_state_dict(adapter, strict=False).unexpected_keys
    # Measured: logits up to 0.61, the adapter moves them by up to 0.83, the two paths differ by 3.4e-7 (float32);
    # 2e-6 is 6x that.
    torch.testing.assert_close(out, reference(ids()).logits, rtol=0, atol=2e-6)
    peft_model.train()
    peft_model(input_ids=ids(), labels=ids()).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="quantized expert containers"):
        peft_model.merge_and_unload()


def test_sft_trains_the_expert_adapters_only(tmp_path):
    args = DiffusionSFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,  # B starts at zero: A gets its first gradient on step 2
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = DiffusionSFTTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=Dataset.from_list(reversal_examples(8, 0)),
        processing_class=tiny_tokenizer(),
        peft_config=experts_lora_config(r=2),
    )
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(before[name], param) != ("lora_" in name), name
    assert any("lora_down_B" in n and not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_bad_targets_and_options_are_refused():
    with pytest.raises(ValueError, match=r"target_modules=.*gate_up"):
        experts_lora_config(target_modules=["q_proj", "gate_up"])
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        get_peft_model(tiny_model(), experts_lora_config(r=2, lora_dropout=0.1))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        get_peft_model(tiny_model(), experts_lora_config(r=2, init_lora_weights="pissa"))
    # Plain PEFT on a container: the forward refuses and names the working target.
    wrapped = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["down"]))
    with pytest.raises(ValueError, match="Target the experts module"):
        wrapped(ids())
