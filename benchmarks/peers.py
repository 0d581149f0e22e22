"""Side by side on CPU: a denoising step of this package against llama.cpp's LLaDA-MoE (`llama-diffusion-cli`, GGUF).

    python -m benchmarks.peers --cache ~/.cache/llada_moe/scale       # the full 7B shape (16 layers), all threads
    python -m benchmarks.peers --cache DIR --layers 2 --threads 2     # a 2-layer slice of it, 2 threads each side
    python -m benchmarks.peers --cache DIR --parts users              # only the users' path check (a tiny model)

llama.cpp comes from the `llama-cpp-python` source distribution (`LLAMA_CPP_PYTHON`), which vendors llama.cpp with
its LLaDA-MoE graph (`src/models/llada-moe.cpp`), `examples/diffusion/` and `convert_hf_to_gguf.py`: `pip download`
fetches it into `--llama-cpp` (default CACHE/llama.cpp) and cmake builds `llama-diffusion-cli` and `llama-quantize`
there once (native CPU flags, AMX kernels left out: see `NO_AMX`); later runs reuse them. Nothing of llama.cpp is
copied into this repository.

The checkpoint is the one `benchmarks/scale.py` writes (random, seeded, the official layout; written here when
missing). It ships no tokenizer, and the converter needs one: a byte-level BPE of 2,048 entries with their merges
(trained on this repository's docs) with the official EOS / pad (156892) and mask (156895) ids, saved in
`--work`/CHECKPOINT/hf (default CACHE/peers) beside symlinks to the checkpoint's files. llama.cpp's converter reads
that folder unchanged, in its own process, with one override: a BPE pre-tokenizer it does not list (ours) falls back
to GPT-2's regex, which is the one ours uses. BF16 is converted once, Q8_0 and Q4_0 come from `llama-quantize`; the
GGUFs stay in the work folder. The tokenizer's chat template renders the prompt unchanged (`llama-diffusion-cli`
always applies the GGUF's template, ChatML when it has none), so both sides see the same prompt ids.

Parts (`--parts`, all by default), every measurement in its own process, the same thread count on both sides
(`--threads`; llama.cpp `-t` / `-tb`, torch `set_num_threads` and OMP_NUM_THREADS):
- `speed`: seconds per denoising step, one full forward over the whole canvas, no cache, at `--positions` (64 and
  256; the canvas of a step halfway through an answer: its first half prompt text, the rest masks), llama.cpp BF16 /
  Q8_0 / Q4_0 against our modes (`OURS`: bf16, int8, nf4, int4: torch's CPU int4 kernel) at the same precision,
  the fastest of ours at each.
  llama.cpp: the median step time its log stamps (`--log-timestamps`: from one step's start to the next) over
  `--steps` steps after a warm-up step, less its mean sampling time, with the weights read into memory before
  (`-lm none`, no mmap). Ours: the median of `--steps` calls of `model(ids)` under `torch.inference_mode()` after a
  warm-up. Ours also gives the dual-cache block step (a forward of the 32-token block after the prompt against the
  cached keys / values of the rest), which llama.cpp has no equivalent of, its load time and peak anonymous memory
  (`scale.PeakAnon`; llama.cpp: peak RSS).
- `answer`: the time to a 256-token answer after a 64-token prompt in blocks of 32 with the same denoising forwards
  per block (`--answer-steps` in all, ours), for `--answer-precisions`: ours `diffusion_generate(...,
  cache_implementation="dual")` against `llama-diffusion-cli -ub 320 --diffusion-block-length 32`. llama.cpp counts
  the prompt in its blocks (320 / 32 = 10, the last two past the canvas, empty), so it gets `--diffusion-steps` 10/8
  of ours and runs one forward on each empty block. The goal: ours at most half of llama.cpp's time.
- `users`: a tiny model with the official vocabulary and special ids, saved by `save_pretrained`, converted by
  `llada-moe convert` from an official-layout folder, and fine-tuned with a LoRA on q/k/v/o merged by
  `merge_and_unload`: each folder converts with llama.cpp's converter (f32) and runs in `llama-diffusion-cli`, and one
  greedy step (`--top-k 1`) over a fully masked 48-token answer must print the text of our argmax (its `lm_head`
  scores only printable ASCII tokens, so the texts compare exactly; at a position whose two best logits are within
  `TIE` of each other, a random model's near-tie, either token is accepted and the table says how many there were).
  llama.cpp runs with f32 keys / values there (its cache is f16 by default).

Not in CI: it builds llama.cpp (minutes) and, at full size, converts 14.7 GB. The figures depend on the machine
(torch reaches AMX through oneDNN for bf16, llama.cpp's BF16 path does not): read them with the CPU model and thread
count printed above the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python source distribution that vendors llama.cpp
TOOLS = ("llama-diffusion-cli", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
)
# On a CPU with AMX, GGML_NATIVE compiles llama.cpp's AMX kernels in, and in this version they crash the first Q8_0 /
# Q4_0 matmul (SIGILL / SIGSEGV in tinygemm_kernel_amx, on a virtual machine where AMX itself works): they are left
# out, so Q8_0 / Q4_0 run llama.cpp's AVX512 kernels (repacked), as on a CPU without AMX.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
ANSWER_PROMPT, ANSWER_TOKENS, BLOCK = 64, 256, 32
USERS_PROMPT, USERS_CANVAS = 16, 64  # the users' path: one step over a 48-token answer
TIE = 1e-3  # the users' path: two logits closer than this (relative to the largest) are a tie
VOCAB_ENTRIES = 2048  # of the byte-level BPE (256 bytes + 1,792 merges); the model's 157,184 rows are padded
MiB = 2**20
PROMPT_TEXT = (
    "A masked diffusion language model writes every position of its answer at once and then refines the whole "
    "canvas over a few denoising steps, committing the tokens it is most sure of first. "
)


def bf16(folder: Path):
    import torch

    from modeling_llada_moe import LLaDAMoEForMaskedLM

    return LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def quantized(**kwargs) -> Callable[[Path], object]:
    def load(folder: Path):
        from quantization import load_quantized

        return load_quantized(folder, **kwargs)

    return load


# Our modes: name -> (the precision llama.cpp is compared at, loader of a checkpoint folder). One row per mode.
OURS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "bf16": ("bf16", bf16),
    "int8": ("8-bit", quantized(bits=8)),
    "nf4": ("4-bit", quantized(bits=4)),
    "int4": ("4-bit", quantized(bits=4, method="int4", device_map="cpu")),  # torch's CPU int4 kernel, group 64
}
LLAMA = {"bf16": "BF16", "8-bit": "Q8_0", "4-bit": "Q4_0"}  # llama.cpp's type at each precision
PRECISIONS = tuple(LLAMA)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp: download, build, convert, run
# ---------------------------------------------------------------------------------------------------------------


def llama_cpp(folder: Path, jobs: int) -> tuple[Path, Path]:
    """(llama.cpp source, folder of its built tools): the sdist is downloaded and built into `folder` once."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").is_file():
        archive = folder / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not archive.is_file():
            print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution into {folder}")
            run_checked([
                sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-binary",
                ":all:", "--no-deps", "-d", str(folder),
            ])
        with tarfile.open(archive) as sdist:
            sdist.extractall(folder, filter="data")
    build, tools = folder / "build", folder / "build" / "bin"
    flags = [*CMAKE_FLAGS, *([f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"] if has_amx() else [])]
    stamp = build / "peers-cmake-flags.txt"  # a build made with other flags (or by hand) is configured again
    if not all((tools / tool).is_file() for tool in TOOLS) or not stamp.is_file() or stamp.read_text() != str(flags):
        print(f"building {', '.join(TOOLS)} in {build} (minutes)")
        start = time.perf_counter()
        run_checked(["cmake", "-S", str(source), "-B", str(build), *flags])
        run_checked(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS])
        stamp.write_text(str(flags))
        print(f"built in {time.perf_counter() - start:.0f} s")
    return source, tools


def has_amx() -> bool:
    with open("/proc/cpuinfo") as info:
        return any(line.startswith("flags") and " amx_int8" in line for line in info)


def run_checked(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    return done


# llama.cpp's converter as it is, in its own process: only a BPE pre-tokenizer it does not list falls back to GPT-2's
# regex (the byte-level BPE here uses it); a listed one is kept.
CONVERT = """
import convert_hf_to_gguf
from conversion.base import TextModel

listed = TextModel.get_vocab_base_pre


def pre_tokenizer(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"


TextModel.get_vocab_base_pre = pre_tokenizer
convert_hf_to_gguf.main()
"""


def convert(source: Path, folder: Path, gguf: Path, outtype: str) -> float:
    """`convert_hf_to_gguf.py folder --outtype outtype` into `gguf`; returns the seconds it took."""
    start = time.perf_counter()
    partial = gguf.with_suffix(".partial")
    env = dict(os.environ, PYTHONPATH=str(source))
    command = [sys.executable, "-c", CONVERT, str(folder), "--outfile", str(partial), "--outtype", outtype]
    run_checked(command, env=env)
    partial.rename(gguf)
    return time.perf_counter() - start


def quantize(tools: Path, bf16_gguf: Path, gguf: Path, kind: str, threads: int) -> float:
    start = time.perf_counter()
    partial = gguf.with_suffix(".partial")
    run_checked([str(tools / "llama-quantize"), str(bf16_gguf), str(partial), kind, str(threads)])
    partial.rename(gguf)
    return time.perf_counter() - start


STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "  # --log-timestamps --log-prefix: minutes.seconds.ms.us and the level
STEP = re.compile(STAMP + r"[\r\n]?diffusion step: (\d+)/")
TOTAL = re.compile(STAMP + r"\ntotal time: ([\d.]+)ms, time per step: [\d.]+ms, sampling time per step: ([\d.]+)ms")
ANSWER = re.compile(STAMP + r"\n(.*)\Z", re.DOTALL)  # the answer text, printed last


def seconds(match: re.Match) -> float:
    minutes, secs, ms, us = (int(group) for group in match.groups()[:4])
    return minutes * 60 + secs + ms / 1e3 + us / 1e6


def diffusion_cli(
    tools: Path, gguf: Path, prompt: str, canvas: int, steps: int, block: int, threads: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """One `llama-diffusion-cli` run, greedy (`--top-k 1`; `--temp 0` alone samples at temperature 1 there), weights
    read into memory (`-lm none`). Returns the seconds of each step (from the log's timestamps), the total and mean
    sampling seconds it prints, its peak RSS and the answer text it prints."""
    command = [
        str(tools / "llama-diffusion-cli"), "-m", str(gguf), "-p", prompt, "-ub", str(canvas), "-b", str(canvas),
        "-c", str(canvas), "--diffusion-steps", str(steps), "--diffusion-block-length", str(block),
        "-t", str(threads), "-tb", str(threads), "--temp", "0", "--top-k", "1", "--seed", "0", "-lm", "none",
        "--log-timestamps", "--log-prefix", "--log-colors", "off", *extra,
    ]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    total = TOTAL.search(text)
    if process.returncode or total is None:
        raise RuntimeError(f"llama-diffusion-cli failed ({process.returncode}): {' '.join(command)}\n{text[-3000:]}")
    starts = [seconds(match) for match in STEP.finditer(text)]
    return dict(
        step_s=[end - start for start, end in zip(starts, [*starts[1:], seconds(total)])],
        total_s=float(total.group(5)) / 1e3,
        sampling_s=float(total.group(6)) / 1e3,
        peak_mib=usage.ru_maxrss * 1024 / MiB,
        answer=answer.group(5).strip() if (answer := ANSWER.search(text, total.end())) else "",
    )


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer the converter needs, and the prompts
# ---------------------------------------------------------------------------------------------------------------


def byte_level_tokenizer(eos_token_id: int, mask_token_id: int):
    """A byte-level BPE of `VOCAB_ENTRIES` entries (GPT-2's pre-tokenizer, real merges) trained on this repository's
    docs, with "<|endoftext|>" (EOS and pad) and "<|mask|>" at the model's ids and a chat template that renders the
    text as it is (llama-diffusion-cli always applies the GGUF's template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = Path(__file__).resolve().parents[1] / "docs"
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_ENTRIES, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([PROMPT_TEXT] + [page.read_text() for page in sorted(docs.glob("*.md"))], trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = model["vocab"] | {"<|endoftext|>": eos_token_id, "<|mask|>": mask_token_id}
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>"
    )
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    return tokenizer


def prompt_of(tokenizer, tokens: int) -> tuple[str, list[int]]:
    """The shortest start of `PROMPT_TEXT` (repeated) that encodes to exactly `tokens` ids, and the ids: the same
    text goes to llama.cpp, whose GPT-2 pre-tokenizer and BPE give the same ids."""
    text = PROMPT_TEXT * (tokens // 8 + 1)
    for end in range(1, len(text) + 1):
        if text[end - 1] != " ":
            ids = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
            if len(ids) == tokens:
                return text[:end], ids
    raise ValueError(f"no start of the prompt text encodes to {tokens} tokens")


def converter_folder(checkpoint: Path, work: Path) -> Path:
    """`work/hf`: symlinks to the checkpoint's files plus the byte-level tokenizer; made once. A new tokenizer
    invalidates the GGUFs made from the folder before."""
    folder = work / "hf"
    if (folder / "tokenizer.json").is_file():
        return folder
    for stale in work.glob("*.gguf"):
        stale.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.suffix in (".json", ".safetensors"):
            (folder / path.name).symlink_to(path.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    byte_level_tokenizer(config["eos_token_id"], config.get("mask_token_id", 156895)).save_pretrained(folder)
    return folder


def ggufs(source: Path, tools: Path, folder: Path, work: Path, threads: int) -> dict[str, dict]:
    """{llama.cpp type: {"path", "gib"}}: BF16 converted, Q8_0 / Q4_0 quantized from it (each made once)."""
    made = {}
    for kind in LLAMA.values():
        path = work / f"model-{kind.lower()}.gguf"
        if not path.is_file():
            if kind == "BF16":
                seconds_taken = convert(source, folder, path, "bf16")
            else:
                seconds_taken = quantize(tools, work / "model-bf16.gguf", path, kind, threads)
            print(f"made {path.name} in {seconds_taken:.0f} s")
        made[kind] = dict(path=path, gib=path.stat().st_size / 2**30)
    return made


# ---------------------------------------------------------------------------------------------------------------
# Our side, one mode per process
# ---------------------------------------------------------------------------------------------------------------


def measure(mode: str, checkpoint: Path, tokenizer_folder: Path, args: argparse.Namespace) -> dict:
    """One of our modes, in this (fresh) process: load, then per canvas size the median seconds of a full forward
    and of a dual-cache block step; with `answer`, the 256-token answer with the dual cache."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from benchmarks.scale import PeakAnon
    from modeling_llada_moe.generation_cache import DiffusionBlockCache

    torch.set_num_threads(args.threads)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_folder)
    start = time.perf_counter()
    with PeakAnon() as anon:
        model = OURS[mode][1](checkpoint)
        load_s, load_peak = time.perf_counter() - start, anon.peak
        mask = model.config.mask_token_id
        figures = dict(mode=mode, load_s=load_s, load_peak_mib=load_peak / MiB, step_s={}, dual_step_s={})
        with torch.inference_mode():
            for positions in args.positions:
                _, prompt = prompt_of(tokenizer, positions // 2)
                ids = torch.tensor([prompt + [mask] * (positions - len(prompt))])
                figures["step_s"][positions] = median_seconds(lambda ids=ids: model(ids), args.steps)
                cache = DiffusionBlockCache("dual", model.config.num_hidden_layers)
                model(ids, past_key_values=cache, logits_to_keep=BLOCK)  # the refresh: every position's keys
                cache.select_block(len(prompt), len(prompt) + BLOCK)  # the first block after the prompt
                block = ids[:, len(prompt) : len(prompt) + BLOCK]
                figures["dual_step_s"][positions] = median_seconds(
                    lambda block=block, cache=cache: model(block, past_key_values=cache), args.steps
                )
            if OURS[mode][0] in args.answer_precisions and "answer" in args.parts:
                _, prompt = prompt_of(tokenizer, ANSWER_PROMPT)
                start = time.perf_counter()
                out = model.diffusion_generate(
                    torch.tensor([prompt]), max_new_tokens=ANSWER_TOKENS, block_length=BLOCK,
                    steps=args.answer_steps, cache_implementation="dual", return_dict_in_generate=True,
                )
                figures.update(answer_s=time.perf_counter() - start, answer_forwards=int(out.nfe.max()))
    figures["peak_mib"] = anon.peak / MiB
    return figures


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# The users' path: folders this package writes, through llama.cpp's converter and diffusion CLI
# ---------------------------------------------------------------------------------------------------------------


def users_path(source: Path, tools: Path, work: Path, threads: int) -> list[dict]:
    """Each folder a user has (save_pretrained, `llada-moe convert`, a merged LoRA) converted (f32) and run in
    llama-diffusion-cli: one greedy step over a fully masked answer against our argmax, as text."""
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks.scale import official_layout
    from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
    from quantization.qlora import ATTENTION_TARGETS

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    # The official vocabulary and special ids: the converter writes the official mask id (156895) whatever the
    # config says, so a model must keep it where the 7B has it.
    config = LLaDAMoEConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, moe_layer_freq=[1, 1],
        num_experts=8, num_experts_per_tok=2, expert_intermediate_size=32, dense_intermediate_size=96,
    )
    tokenizer = byte_level_tokenizer(config.eos_token_id, config.mask_token_id)
    torch.manual_seed(0)
    model = LLaDAMoEForMaskedLM(config).eval()
    with torch.no_grad():  # only printable ASCII tokens can win the argmax: the two texts then compare exactly
        printable = torch.zeros(config.vocab_size, dtype=torch.bool)
        for token_id in range(VOCAB_ENTRIES):
            piece = tokenizer.decode([token_id])
            printable[token_id] = piece.isascii() and piece.isprintable() and piece.strip() != ""
        model.lm_head.weight[~printable] = 0
        model.lm_head.weight[printable] *= 10  # clear winners: no near-ties between f32 implementations

    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-users-", dir=work) as tmp:
        tmp = Path(tmp)
        folders = {}
        folders["save_pretrained"] = tmp / "saved"
        model.save_pretrained(folders["save_pretrained"])
        tokenizer.save_pretrained(folders["save_pretrained"])

        official = tmp / "official"  # the official checkpoint's layout, with our tokenizer: what convert takes
        model.save_pretrained(official)
        tokenizer.save_pretrained(official)
        official_layout(official)
        folders["llada-moe convert"] = tmp / "converted"
        run_checked([
            sys.executable, "-m", "modeling_llada_moe.apps.cli", "convert", str(official),
            str(folders["llada-moe convert"]),
        ])

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(ATTENTION_TARGETS), init_lora_weights=False)
        merged = get_peft_model(LLaDAMoEForMaskedLM.from_pretrained(folders["save_pretrained"]), lora)
        merged = merged.merge_and_unload().eval()
        folders["merged LoRA (q/k/v/o)"] = tmp / "merged"
        merged.save_pretrained(folders["merged LoRA (q/k/v/o)"])
        tokenizer.save_pretrained(folders["merged LoRA (q/k/v/o)"])

        prompt, prompt_ids = prompt_of(tokenizer, USERS_PROMPT)
        for name, folder in folders.items():
            saved = json.loads((folder / "config.json").read_text())
            row = dict(
                folder=name, model_type=saved.get("model_type"), architectures=saved.get("architectures"),
                auto_map="auto_map" in saved,
            )
            ours = LLaDAMoEForMaskedLM.from_pretrained(folder, dtype=torch.float32).eval()
            ids = torch.tensor([prompt_ids + [config.mask_token_id] * (USERS_CANVAS - USERS_PROMPT)])
            with torch.inference_mode():
                logits = ours(ids).logits[0, USERS_PROMPT:]
            top = logits.topk(2, dim=-1)
            ours_text = tokenizer.decode(top.indices[:, 0])
            # Positions whose two best tokens are within f32 rounding of each other (a random model has them):
            # either token is the same answer. TIE is relative to the largest logit.
            ties = ((top.values[:, 0] - top.values[:, 1]) < TIE * logits.abs().max()).nonzero().flatten().tolist()
            accepted = set()
            for choice in itertools.product((0, 1), repeat=min(len(ties), 8)):
                picked = top.indices[:, 0].clone()
                for position, second in zip(ties, choice):
                    picked[position] = top.indices[position, second]
                accepted.add(tokenizer.decode(picked).strip())
            try:
                convert(source, folder, tmp / f"{folder.name}.gguf", "f32")
                row["converted"] = True
                # f32 keys / values too (llama.cpp's cache is f16 by default): the comparison is of f32 forwards.
                run = diffusion_cli(
                    tools, tmp / f"{folder.name}.gguf", prompt, USERS_CANVAS, 1, USERS_CANVAS, threads,
                    extra=("-ctk", "f32", "-ctv", "f32"),
                )
                same = run["answer"] in accepted
                row.update(ran=True, same=same, ties=len(ties), ours=ours_text, llama=run["answer"])
            except RuntimeError as error:
                row.update(converted=row.get("converted", False), ran=False, same=False, error=str(error)[-1500:])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def child(args: argparse.Namespace, *extra: str) -> dict | list:
    """One measurement in a fresh process (its own memory; the same thread count for torch and OpenMP)."""
    command = [
        sys.executable, "-m", "benchmarks.peers", "--cache", str(args.cache), "--layers", str(args.layers),
        "--work", str(args.work), "--llama-cpp", str(args.llama_cpp), "--threads", str(args.threads),
        "--steps", str(args.steps), "--answer-steps", str(args.answer_steps), "--positions",
        *map(str, args.positions), "--answer-precisions", *args.answer_precisions, "--parts", *args.parts, *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="benchmarks/scale.py's checkpoint folder")
    parser.add_argument("--layers", type=int, default=16, help="layers of the 7B shape (16 = the full model)")
    parser.add_argument("--work", type=Path, help="GGUFs and the tokenizer folder (default: CACHE/peers)")
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's source and build (default: CACHE/llama.cpp)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of both sides (default: all)"
    )
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 256], help="canvas sizes of the step rows")
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per row and side (+1 warm-up)")
    parser.add_argument("--modes", nargs="+", choices=list(OURS), default=list(OURS), help="our modes (OURS)")
    parser.add_argument(
        "--parts", nargs="+", choices=("speed", "answer", "users"), default=["speed", "answer", "users"],
        help="speed: one denoising step; answer: a 256-token answer; users: the users' path (a tiny model)",
    )
    parser.add_argument(
        "--answer-steps", type=int, default=64, help="our denoising steps for the 256-token answer (a multiple of 8)"
    )
    parser.add_argument(
        "--answer-precisions", nargs="+", choices=PRECISIONS, default=["bf16", "4-bit"],
        help="precisions the answer is timed at (each side's fastest mode there)",
    )
    # one job in a child: one of our modes, the users' path, or writing the checkpoint (as benchmarks/scale.py does)
    parser.add_argument("--measure", choices=[*OURS, "users", "checkpoint"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.layers <= 16:
        parser.error(f"--layers {args.layers}: expected 1 to 16 (the official model has 16)")
    if args.answer_steps % (ANSWER_TOKENS // BLOCK):
        parser.error(f"--answer-steps {args.answer_steps}: expected a multiple of {ANSWER_TOKENS // BLOCK} blocks")
    if any(positions < 2 * BLOCK or positions - positions // 2 <= args.steps for positions in args.positions):
        parser.error(f"--positions: each at least {2 * BLOCK}, half of it (the masks) more than --steps")
    args.work = args.work or args.cache / "peers"
    args.llama_cpp = args.llama_cpp or args.cache / "llama.cpp"
    checkpoint = args.cache / f"llada-moe-7b-a1b-random-{args.layers}-layers"
    work = args.work / checkpoint.name
    if args.measure == "checkpoint":
        from benchmarks.scale import write_checkpoint

        checkpoint.mkdir(parents=True, exist_ok=True)
        write_checkpoint(checkpoint, args.layers)
        print(json.dumps(str(checkpoint)))
        return
    if args.measure == "users":
        source, tools = llama_cpp(args.llama_cpp, args.threads)
        print(json.dumps(users_path(source, tools, args.work / "users-path", args.threads)))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, checkpoint, work / "hf", args)))
        return

    source, tools = llama_cpp(args.llama_cpp, os.cpu_count() or 1)
    print(f"# {cpu_model()}, {args.threads} threads on both sides; llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}")
    if {"speed", "answer"} & set(args.parts):
        if not (checkpoint / "parameters.txt").is_file():
            print(f"writing {checkpoint} (benchmarks/scale.py's random checkpoint)")
            child(args, "--measure", "checkpoint")
        folder = converter_folder(checkpoint, work)
        made = ggufs(source, tools, folder, work, args.threads)
        speed_and_answer(args, tools, checkpoint, folder, made)
    if "users" in args.parts:
        print_users(child(args, "--measure", "users"))


def speed_and_answer(
    args: argparse.Namespace, tools: Path, checkpoint: Path, folder: Path, made: dict[str, dict]
) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    print(f"# {checkpoint.name}: {int((checkpoint / 'parameters.txt').read_text()):,} parameters")
    answer_prompt, _ = prompt_of(tokenizer, ANSWER_PROMPT)
    llama = {}
    for precision in PRECISIONS:
        kind = LLAMA[precision]
        if not any(OURS[mode][0] == precision for mode in args.modes):
            continue
        entry = llama[precision] = dict(kind=kind, gib=made[kind]["gib"], step_s={}, peak_mib=0.0)
        if "speed" in args.parts:
            for positions in args.positions:
                prompt, _ = prompt_of(tokenizer, positions // 2)
                path, steps = made[kind]["path"], args.steps + 1  # the first step is a warm-up
                run = diffusion_cli(tools, path, prompt, positions, steps, positions, args.threads)
                entry["step_s"][positions] = statistics.median(run["step_s"][1:]) - run["sampling_s"]
                entry["peak_mib"] = max(entry["peak_mib"], run["peak_mib"])
        if "answer" in args.parts and precision in args.answer_precisions:
            canvas = ANSWER_PROMPT + ANSWER_TOKENS
            steps = args.answer_steps * (canvas // BLOCK) // (ANSWER_TOKENS // BLOCK)
            run = diffusion_cli(tools, made[kind]["path"], answer_prompt, canvas, steps, BLOCK, args.threads)
            entry.update(answer_s=run["total_s"], answer_forwards=len(run["step_s"]), answer_cli_steps=steps)
            entry["peak_mib"] = max(entry["peak_mib"], run["peak_mib"])
    ours = []
    for mode in args.modes:
        try:
            ours.append(child(args, "--measure", mode))
        except RuntimeError as error:
            print(f"{mode}: failed\n{error}")
    if "speed" in args.parts:
        print_speed(args, llama, ours)
    if "answer" in args.parts:
        print_answer(args, llama, ours)


def print_speed(args: argparse.Namespace, llama: dict, ours: list[dict]) -> None:
    print(f"\n## One denoising step: a full forward over the canvas, no cache (median of {args.steps} steps)\n")
    print("| positions | precision | llama.cpp | s/step | ours (fastest) | s/step | ours / llama.cpp | "
          "ours: dual-cache block step s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for positions in args.positions:
        for precision, entry in llama.items():
            rows = [row for row in ours if OURS[row["mode"]][0] == precision]
            if not rows:
                continue
            best = min(rows, key=lambda row: row["step_s"][str(positions)])
            theirs, mine = entry["step_s"][positions], best["step_s"][str(positions)]
            print(f"| {positions} | {precision} | {entry['kind']} | {theirs:.3f} | {best['mode']} | {mine:.3f} | "
                  f"{mine / theirs:.2f}x | {best['dual_step_s'][str(positions)]:.3f} |")
    print("\n| side | mode | load s | peak MiB (load) | " + " | ".join(f"s/step @{n}" for n in args.positions) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in args.positions) + " |")
    for entry in llama.values():
        steps = " | ".join(f"{entry['step_s'][n]:.3f}" for n in args.positions)
        print(f"| llama.cpp | {entry['kind']} ({entry['gib']:.2f} GiB GGUF) | – | {entry['peak_mib']:.0f} (RSS) | "
              f"{steps} |")
    for row in ours:
        steps = " | ".join(f"{row['step_s'][str(n)]:.3f}" for n in args.positions)
        print(f"| ours | {row['mode']} | {row['load_s']:.1f} | {row['peak_mib']:.0f} ({row['load_peak_mib']:.0f}, "
              f"anon) | {steps} |")


def print_answer(args: argparse.Namespace, llama: dict, ours: list[dict]) -> None:
    print(f"\n## A {ANSWER_TOKENS}-token answer after a {ANSWER_PROMPT}-token prompt, blocks of {BLOCK}, "
          f"{args.answer_steps // (ANSWER_TOKENS // BLOCK)} denoising steps per block (goal: ours <= 0.5x)\n")
    print("| precision | llama.cpp | forwards | s | ours (dual cache) | forwards | s | s/forward | "
          "ours / llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, entry in llama.items():
        rows = [row for row in ours if OURS[row["mode"]][0] == precision and "answer_s" in row]
        if "answer_s" not in entry or not rows:
            continue
        best = min(rows, key=lambda row: row["answer_s"])
        print(
            f"| {precision} | {entry['kind']} (--diffusion-steps {entry['answer_cli_steps']}) | "
            f"{entry['answer_forwards']} | {entry['answer_s']:.2f} | {best['mode']} | {best['answer_forwards']} | "
            f"{best['answer_s']:.2f} | {best['answer_s'] / best['answer_forwards']:.3f} | "
            f"{best['answer_s'] / entry['answer_s']:.2f}x |"
        )


def print_users(rows: list[dict]) -> None:
    print("\n## The users' path: folders this package writes, in llama.cpp (tiny model, official vocabulary)\n")
    print("| folder | config.json | converter | llama-diffusion-cli | one greedy step: same text as ours |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        tied = f" ({row['ties']} tied position(s), either token)" if row.get("ties") else ""
        config = f"`{row['model_type']}`, {row['architectures']}" + (", auto_map" if row["auto_map"] else "")
        print(f"| {row['folder']} | {config} | {'ok' if row['converted'] else 'failed'} | "
              f"{'ran' if row['ran'] else 'failed'} | {'yes' if row['same'] else 'no'}{tied} |")
    for row in rows:
        if not row["same"]:
            detail = row.get("error") or f"ours {row['ours']!r}, llama.cpp {row['llama']!r}"
            print(f"\n{row['folder']}: {detail}")


if __name__ == "__main__":
    main()
