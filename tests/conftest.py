"""Shared fixtures: tiny LLaDA-MoE configs and models (hidden 64, 2 layers, 8 experts, top-2), built locally."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import TINY_CONFIG as TINY  # noqa: F401 (shared by the test modules)
from modeling_llada_moe.apps.tiny_task import tiny_config, tiny_model, tiny_tokenizer  # noqa: F401


if os.environ.get("PYTEST_XDIST_WORKER"):
    # setup.cfg runs the suite in 2 pytest-xdist workers (one per core of the CI machine): each uses one thread, and
    # so do the processes its tests start; two workers of 2 threads each on 2 cores spend their time waiting.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """`examples/<name>.py` as a module (examples/ is not a package), registered under its own name so that a
    sibling it imports (app.py imports denoise_viz) resolves as it does when the script runs."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llada-moe ARGV` run in this process (`capsys` captures the output)."""
    from modeling_llada_moe.apps import cli

    capsys.readouterr()
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse: --help, bad flags
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


# A small random checkpoint in the official layout and what the official code produced from it (recorded data,
# see its README.md); it ships with the repository, so the parity tests run from any clone.
OFFICIAL_SMALL = Path(__file__).resolve().parent / "data" / "official_small"


# Marks transformers' common model tests carry (tests/test_transformers_common.py); `--strict-markers` needs them.
TRANSFORMERS_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
)


def run_python(code: str, *argv, cwd, env: dict[str, str]) -> str:
    """`python -c code argv...` in a fresh interpreter (its own imports, e.g. without this package on the path);
    fails the test with its output unless it exits 0, and returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def pytest_configure(config):
    for marker in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{marker}: a mark of transformers' common model tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# TrainingArguments of the quick CPU trainer runs in the tests: no reports, checkpoints, progress bars or data-loader
# workers.
QUICK_TRAINING = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    disable_tqdm=True,
    dataloader_num_workers=0,
)

# One plain SGD step (no clipping): two runs that must give the same update compare their weights exactly.
ONE_SGD_STEP = dict(max_steps=1, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny models
    are overhead-bound, so one thread is faster, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reversal_model() -> LLaDAMoEForMaskedLM:
    """A tiny model trained for ~30 s on digit reversal: confident, context-dependent predictions. 900 steps, not the
    helper's default 600: at 600 the model's greedy accuracy depends on the host's float kernels (0.80-0.89 for
    seeds 0-2 on an AVX512-BF16 CPU, ~0.93 elsewhere), and the threshold / cache agreement tests with it; at 900 it
    was 0.98-1.00 with agreement >= 0.97 for every seed tried."""
    from modeling_llada_moe.apps.tiny_task import train_reversal_model

    return train_reversal_model(steps=900)


@pytest.fixture
def official_small() -> Path:
    return OFFICIAL_SMALL
