"""Checks that the independent reference in ``official_reference.py`` reproduces the official LLaDA-MoE code.

The fixture ``tests/data/official_small`` holds a small random checkpoint in the official layout and the logits the
official model produced from it. The official model ignores
``attention_mask`` (there is no padded official output), so padding is checked as "padded row == the same row
alone" on a generated tiny model instead.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_SMALL
from official_reference import (
    load_official_checkpoint,
    official_config_dict,
    official_state_dict,
    reference_forward,
)


@pytest.fixture(scope="module")
def official_small():
    """Return ``(config, state_dict, expected)`` for the official_small fixture."""
    config, state_dict = load_official_checkpoint(OFFICIAL_SMALL)
    expected = torch.load(OFFICIAL_SMALL / "expected.pt", weights_only=True)
    return config, state_dict, expected


def test_fixture_ships_inside_the_repository():
    # From a fresh clone the parity tests must run, not skip: the recorded data lives in tests/data, tracked by git.
    root = Path(__file__).resolve().parents[1]
    assert OFFICIAL_SMALL.is_relative_to(root / "tests" / "data")
    files = sorted(path.name for path in OFFICIAL_SMALL.iterdir())
    assert {"config.json", "expected.pt", "model.safetensors.index.json", "README.md"} <= set(files)
    if shutil.which("git") and (root / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *files], cwd=OFFICIAL_SMALL, capture_output=True, text=True)
        assert ignored.returncode == 1 and not ignored.stdout, f"git ignores {ignored.stdout}"


@torch.no_grad()
def test_reference_forward_matches_official_logits(official_small):
    config, state_dict, expected = official_small
    logits, router_logits = reference_forward(state_dict, config, expected["input_ids"])

    # 1e-4 is the fixture's documented tolerance: the official code differs from itself by up to 2.3e-5
    # (eager vs sdpa, batch sizes), and fp32 GEMM rounding differs across CPUs.
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)
    batch, seq = expected["input_ids"].shape
    assert len(router_logits) == config["num_hidden_layers"]
    assert all(r.shape == (batch * seq, config["num_experts"]) for r in router_logits)


@torch.no_grad()
def test_left_padded_row_matches_row_alone():
    # A generated tiny model (logits of std ~1), not the fixture: the fixture's peaky lm_head gives logits up
    # to ~33, where fp32 GEMM rounding alone moves logits by ~1.5e-5 whenever the batch shape changes.
    config = official_config_dict()
    state_dict = official_state_dict(config, seed=0)
    ids = torch.randint(0, config["pad_token_id"], (2, 20), generator=torch.Generator().manual_seed(1))
    pad_id, num_pad = config["pad_token_id"], 6
    row, full_row = ids[1, :14], ids[0]  # the unpadded neighbour makes the masked row share a batch
    padded = torch.stack([torch.cat([torch.full((num_pad,), pad_id), row]), full_row])
    mask = torch.stack([torch.cat([torch.zeros(num_pad), torch.ones(len(row))]), torch.ones(len(full_row))]).long()
    # Left padding shifts positions; numbering from the first real token makes them match the row alone.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    padded_logits, _ = reference_forward(state_dict, config, padded, attention_mask=mask, position_ids=position_ids)
    alone_logits, _ = reference_forward(state_dict, config, row[None])
    full_logits, _ = reference_forward(state_dict, config, full_row[None])

    assert not padded_logits.isnan().any()
    torch.testing.assert_close(padded_logits[0, num_pad:], alone_logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_logits[1], full_logits[0], atol=1e-5, rtol=0)

    # Guard against a vacuous pass: without the mask the pad tokens are attended and the logits move.
    unmasked_logits, _ = reference_forward(state_dict, config, padded, position_ids=position_ids)
    assert (unmasked_logits[0, num_pad:] - alone_logits[0]).abs().max() > 1e-3
