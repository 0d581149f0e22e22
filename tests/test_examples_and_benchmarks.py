"""The demo and the benchmark scripts run end to end (small settings), so they never rot."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from modeling_llada_moe.apps.tiny_task import save_tiny_folder


DECODER_NAMES = ("reference sampler (1 token/step)", "threshold 0.9 + dual cache")


def run(*args: str, env: dict[str, str] | None = None) -> str:
    """stdout of `python *args` run from the repository root (`env`: variables set on top of this process's)."""
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of a printed markdown table, by first cell."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows}


def test_quickstart_trains_saves_reloads_and_decodes(tmp_path):
    """The README's main job, with its default settings."""
    start = time.perf_counter()
    out = run("examples/quickstart.py", "--out", str(tmp_path / "hub"))
    print(f"quickstart took {time.perf_counter() - start:.1f} s")
    rows = table_rows(out)
    assert float(rows["reference sampler (1 token/step)"][0]) >= 0.9  # accuracy after SFT (1.00 when measured)
    assert float(rows["threshold 0.9 + dual cache"][0]) >= 0.9
    assert float(rows["threshold 0.9 + dual cache"][1]) < float(rows["reference sampler (1 token/step)"][1])  # NFE
    assert "reloaded with AutoModel.from_pretrained(trust_remote_code=True)" in out
    saved = {path.name for path in (tmp_path / "hub").iterdir()}
    assert {"generation_utils.py", "tokenizer.json", "model.safetensors"} <= saved


def test_quickstart_runs_a_given_checkpoint(tmp_path):
    """`--model` with a checkpoint folder (a tiny random one here): loads, saves to --out, reloads, decodes."""
    save_tiny_folder(tmp_path / "checkpoint")
    out = run("examples/quickstart.py", "--model", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "hub"))
    assert "saved Hub folder" in out and set(table_rows(out)) >= set(DECODER_NAMES)
    missing = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--model", str(tmp_path / "nowhere")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert missing.returncode != 0 and "no such folder" in missing.stderr


def test_quantized_inference_example():
    estimate = run("examples/quantized_inference.py", "--estimate")
    assert "| nf4 + dq | 4.43 |" in estimate
    out = run("examples/quantized_inference.py", "--tiny", "--bits", "4", "--device-map", "cpu")
    assert "| quantization_state |" in out and "tokens/forward" in out


SFT_DEMO = ["--tiny", "--report_to", "none", "--bf16", "false", "--use_cpu", "--save_strategy", "no"]


def test_sft_example_offline_demo(tmp_path):
    out = run("examples/sft.py", *SFT_DEMO, "--output_dir", str(tmp_path), "--max_steps", "5", "--demo_examples", "64")
    assert "exact match before training" in out and "exact match after training" in out
    assert "training on 1 process(es)" in out and (tmp_path / "model.safetensors").exists()


def launch_two_processes(script: str, *args: str) -> str:
    """`accelerate launch` of an example in 2 CPU processes (DDP over gloo); returns its stdout."""
    launcher = str(Path(sys.executable).with_name("accelerate"))
    with socket.socket() as probe:  # a free port, so launches from parallel test runs do not meet on 29500
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    flags += ["--main_process_port", port]
    result = subprocess.run(
        [launcher, "launch", *flags, "--dynamo_backend", "no", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sft_trains_in_two_processes_with_accelerate(tmp_path):
    args = ["--output_dir", str(tmp_path), "--max_steps", "3", "--demo_examples", "64"]
    out = launch_two_processes("examples/sft.py", *SFT_DEMO, *args, "--per_device_train_batch_size", "4")
    assert "training on 2 process(es)" in out and (tmp_path / "model.safetensors").exists()


VRPO_DEMO = [
    "--tiny",
    "--report_to",
    "none",
    "--bf16",
    "false",
    "--use_cpu",
    "--save_strategy",
    "no",
    "--num_mc_samples",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--disable_tqdm",
    "true",
]


def test_vrpo_example_offline_demo(tmp_path):
    out = run("examples/vrpo.py", *VRPO_DEMO, "--output_dir", str(tmp_path), "--max_steps", "3")
    assert "preferred digit before VRPO" in out and "preferred digit after VRPO" in out
    assert (tmp_path / "model.safetensors").exists()


def test_vrpo_trains_in_two_processes_with_accelerate(tmp_path):
    out = launch_two_processes("examples/vrpo.py", *VRPO_DEMO, "--output_dir", str(tmp_path), "--max_steps", "2")
    assert "training on 2 process(es)" in out and (tmp_path / "model.safetensors").exists()
