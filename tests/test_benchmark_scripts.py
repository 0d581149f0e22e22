"""The benchmark scripts run end to end in their smallest settings, so they never rot (figures are not checked:
performance lives in the scripts' printed tables, not in tests). A file of its own, so pytest-xdist runs it beside
the examples' tests."""

import time

from test_examples_and_benchmarks import run, table_rows


def test_generation_benchmark_prints_its_table():
    out = run("-m", "benchmarks.generation", "--train-steps", "20", "--batch", "4", "--repeats", "1")
    lines = [line for line in out.splitlines() if "|" in line]
    assert len(lines) == 5 and "dual cache + threshold 0.9" in out and "speed-up" in lines[0]


def test_forward_benchmark_prints_its_table():
    out = run("benchmarks/forward.py", "--tokens", "4", "--repeats", "1", "--dtype", "float32")
    lines = [line for line in out.splitlines() if "|" in line]
    assert len(lines) == 4 and all(name in out for name in ("eager", "grouped_mm", "batched_mm"))


def test_decode_overhead_benchmark_prints_its_table():
    out = run("-m", "benchmarks.decode_overhead", "--tiny-only", "--repeats", "1", "--max-new-tokens", "8",
              "--block-length", "4")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny")]
    assert [row[1].strip() for row in rows] == ["reference", "threshold 0.9", "dual cache + threshold 0.9"]
    assert all(int(row[2]) >= 2 and float(row[4]) > 0 for row in rows)  # forwards counted, forward time measured


def test_gpu_suite_sections_run_in_smoke_mode():
    # The two measurements the suite makes itself, on the tiny shape (the others are existing scripts).
    steps = table_rows(run("-m", "benchmarks.gpu_suite", "--smoke", "--repeats", "1", "--section", "block-steps"))
    assert set(steps) >= {"none", "prefix", "dual"} and steps["dual"][0] == "8"
    assert all(float(steps[mode][1]) > 0 for mode in ("none", "prefix", "dual"))
    memory = table_rows(run("-m", "benchmarks.gpu_suite", "--smoke", "--section", "nf4-memory"))
    weights = memory["NF4 weights + quantization state (memory_report)"][0]
    assert float(weights) > 0 and weights == memory["estimate_memory(config, 4)"][0]


def test_serve_benchmark_prints_its_table():
    # two real `llada-moe serve` processes on a saved tiny model, driven over HTTP
    out = run("-m", "benchmarks.serve", "--concurrency", "1", "2", "--requests", "4", "--repeats", "1",
              "--max-tokens", "8", "--block-length", "8")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("1", "unbatched (max 1)"), ("1", "batched (max 16)"), ("2", "unbatched (max 1)"), ("2", "batched (max 16)")
    ]
    assert all(float(row[2]) > 0 for row in rows) and "8 concurrent requests" in out


def test_moe_benchmark_prints_its_tables_on_a_tiny_layer():
    # On CPU (CUDA hidden): float32, llada_fused in Triton's interpreter; both tables, every implementation.
    start = time.perf_counter()
    out = run("-m", "benchmarks.moe", "--tiny", "--tokens", "1", "7", "--repeats", "1", "--warmup", "0",
              env={"CUDA_VISIBLE_DEVICES": ""})
    print(f"benchmarks.moe --tiny took {time.perf_counter() - start:.1f} s")
    assert "a tiny MoE layer (--tiny) (H 128, I 64, E 8, top-2), float32" in out
    tables = [part.splitlines() for part in out.split("\n## ")[1:]]
    assert [lines[0] for lines in tables] == [
        "float32 experts (speedup vs eager)",
        "NF4 experts (speedup vs dequantize + grouped_mm; GB/s counts the packed 4-bit bytes + absmax)",
    ]
    expected = (["eager", "grouped_mm", "batched_mm", "llada_fused"],
                ["dequant + grouped_mm", "grouped_mm_chunked", "llada_fused (nf4)"])
    for lines, names in zip(tables, expected, strict=True):
        rows = [[cell.strip() for cell in line.split("|")] for line in lines[3:] if line.strip()]
        assert [(row[0], row[1]) for row in rows] == [(tokens, name) for tokens in ("1", "7") for name in names]
        assert all(float(row[2]) > 0 and row[2] != "skipped" for row in rows)  # every implementation ran
        # llada_fused against the table's grouped_mm output: measured up to 3.3e-9 on outputs of up to 6.6e-3
        # (float32); a skipped expert or a dropped routing weight is off by ~1e-3.
        errors = [float(row[7]) for row in rows if row[1].startswith("llada_fused")]
        assert len(errors) == 2 and all(error < 1e-7 for error in errors), errors


def test_scale_benchmark_runs_a_narrow_one_layer_slice(tmp_path):
    # The 7B's 1-layer slice alone is ~2 GB and minutes on CPU: --smoke narrows its layers (see benchmarks/scale.py).
    start = time.perf_counter()
    out = run("-m", "benchmarks.scale", "--cache", str(tmp_path), "--layers", "1", "--smoke")
    print(f"benchmarks.scale --layers 1 --smoke took {time.perf_counter() - start:.1f} s")
    folder = tmp_path / "llada-moe-7b-a1b-random-1-layers-smoke"
    assert f"wrote {folder}" in out and "3,937,056 parameters" in out and "failed" not in out
    config = (folder / "config.json").read_text()
    assert '"model_type": "llada"' in config and '"num_experts": 16' in config  # the official layout, narrowed
    loading, training = out.split("\n## One QLoRA step")
    rows = table_rows(loading)
    assert list(rows)[2:] == ["bf16", "int8", "nf4", "nf4-bnb", "int4"]  # after the header and its rule: every mode ran
    weights = {mode: [float(mib) for mib in rows[mode][2].split(" / ")] for mode in rows if mode in MODES}
    assert all(report == estimate for report, estimate in weights.values())  # memory_report == estimate_memory
    assert weights["nf4"][0] == weights["nf4-bnb"][0] < weights["int8"][0] < weights["bf16"][0]
    assert weights["nf4"][0] <= weights["int4"][0] <= weights["int8"][0]  # whole MiB: the smoke model is 5 MiB
    for mode in ("bf16", "int8", "nf4", "int4"):
        assert rows[mode][4].endswith(" (2)")  # 8 new tokens in 2 steps: 2 forwards
        assert float(rows[mode][5].split()[0]) > 0
    assert rows["bf16"][6] == "–" and all(float(rows[mode][6].split()[0]) > 0 for mode in ("int8", "nf4", "int4"))
    assert rows["nf4-bnb"][3:] == ["–"] * 4  # load only
    # One QLoRA step of each trainer (real trainers, NF4 base): LoRA r=16 on q/k/v/o of the one layer (hidden 256)
    steps = table_rows(training)
    assert list(steps)[2:] == ["sft-qlora", "vrpo-qlora", "grpo-qlora"]
    assert [steps[mode][0] for mode in list(steps)[2:]] == ["4 rows", "1 pair x 2 masks", "1 prompt x 4 completions"]
    for mode in ("sft-qlora", "vrpo-qlora", "grpo-qlora"):
        batch, tokens, trainable, load_s, step_s, rollout_s, peak, loss = steps[mode]
        assert tokens == "16 + 16" and trainable == f"{4 * 16 * (256 + 256):,}"
        total, load = (float(mib) for mib in peak.strip(")").split(" ("))
        assert float(load_s) > 0 and float(step_s) > 0 and 0 < load <= total
        if mode == "grpo-qlora":
            assert 0 < float(rollout_s) < float(step_s)  # the rollout is part of the step
        else:
            assert rollout_s == "–"
    # At step 0 the adapters are zero: SFT's loss is about ln(4096) = 8.32 for a random model (measured 8.13 and
    # 8.22), VRPO's is exactly -log sigmoid(0) (policy = reference), GRPO's is ~0 (advantages of a group sum to 0).
    assert 7.5 < float(steps["sft-qlora"][7]) < 9
    assert abs(float(steps["vrpo-qlora"][7]) - 0.6931) < 1e-4
    assert abs(float(steps["grpo-qlora"][7])) < 1e-4


MODES = ("bf16", "int8", "nf4", "nf4-bnb", "int4")
