"""The benchmark scripts run end to end in their smallest settings, so they never rot (figures are not checked:
performance lives in the scripts' printed tables, not in tests). A file of its own, so pytest-xdist runs it beside
the examples' tests."""

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
