"""CUDA checks (marked `gpu`, skipped without a device): bf16 backends agree with the fp32 eager model."""

import importlib.util

import pytest
import torch
from conftest import tiny_model


pytestmark = pytest.mark.gpu


def backends():
    attn = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        attn.append("flash_attention_2")
    return attn


@torch.no_grad()
@pytest.mark.parametrize("attn", backends())
@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
def test_cuda_bf16_backends_match_fp32_reference(attn, experts):
    reference = tiny_model(seed=0)
    x = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    expected = reference(x, attention_mask=mask).logits
    model = tiny_model(seed=0).to("cuda", torch.bfloat16)
    model.set_attn_implementation(attn)
    model.set_experts_implementation(experts)
    logits = model(x.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() < 0.1
