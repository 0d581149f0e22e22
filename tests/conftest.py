"""Shared fixtures: tiny LLaDA-MoE configs and models (hidden 64, 2 layers, 8 experts, top-2), built locally."""

import sys
from pathlib import Path

import pytest
import torch

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.tiny_task`: the trained tiny model tests and benchmarks share
from benchmarks.tiny_task import tiny_tokenizer  # noqa: E402, F401 (shared by the test modules)


OFFICIAL_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official_small"
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=2,
    num_experts=8,
    num_experts_per_tok=2,
    expert_intermediate_size=32,
    dense_intermediate_size=96,
    max_position_embeddings=256,
    pad_token_id=120,
    eos_token_id=120,
    mask_token_id=126,
)


def tiny_config(**overrides) -> LLaDAMoEConfig:
    """A tiny config; keyword arguments override the defaults above."""
    return LLaDAMoEConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LLaDAMoEForMaskedLM:
    """A tiny random float32 model in eval mode."""
    torch.manual_seed(seed)
    return LLaDAMoEForMaskedLM(tiny_config(**overrides)).eval()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reversal_model() -> LLaDAMoEForMaskedLM:
    """A tiny model trained for ~20 s on digit reversal: confident, context-dependent predictions."""
    from benchmarks.tiny_task import train_reversal_model

    return train_reversal_model()


@pytest.fixture
def official_small() -> Path:
    if not (OFFICIAL_SMALL / "expected.pt").is_file():
        pytest.skip(f"official_small fixture not found at {OFFICIAL_SMALL} (expected ../shared beside the repo)")
    return OFFICIAL_SMALL
