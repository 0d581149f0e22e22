"""The lm-eval model `llada_moe`: Monte-Carlo likelihoods, rolling windows, batched generation with stop strings,
chat templates, argument errors, and the command line, on real lm-eval objects and a local task (no Hub)."""

import json
import os
import subprocess
import sys

import lm_eval
import pytest
import torch
from conftest import ROOT
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from modeling_llada_moe.apps.evaluation import LLaDAMoELM, rolling_windows
from modeling_llada_moe.apps.tiny_task import (
    LING_CHAT_TEMPLATE,
    MASK_ID,
    PAD_ID,
    save_tiny_folder,
    tiny_model,
    tiny_tokenizer,
    train_reversal_model,
)
from modeling_llada_moe.forward_process import example_generator


TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
GREEDY_8 = {"until": ["t120"], "max_gen_toks": 8, "do_sample": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model is overhead-bound: one thread is faster, and steadier on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny model trained for a few seconds on 8-digit reversal: it ranks the reversal above shuffles."""
    return train_reversal_model(steps=150)


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def make_lm(model=None, tokenizer=None, **kwargs) -> LLaDAMoELM:
    kwargs = {"mc_num": 8, "block_length": 4, **kwargs}
    return LLaDAMoELM(
        pretrained=model if model is not None else tiny_model(), tokenizer=tokenizer or tiny_tokenizer(), **kwargs
    )


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=arg, idx=i) for i, arg in enumerate(args)]


def ids(text: str) -> list[int]:
    return tiny_tokenizer().encode(text)


def test_registered_beside_lm_evals_own_models():
    assert get_model("llada_moe") is LLaDAMoELM
    assert get_model("hf").__name__ == "HFLM"


# --- loglikelihood --------------------------------------------------------------------------------------------------


def test_multiple_choice_task_trained_beats_random(trained, task_manager):
    accuracy = {}
    for name, model in {"trained": trained, "random": tiny_model()}.items():
        out = lm_eval.simple_evaluate(model=make_lm(model), tasks=["reversal_choice"], task_manager=task_manager)
        accuracy[name] = out["results"]["reversal_choice"]["acc,none"]
    # 24 questions, 4 choices (chance 0.25); measured 0.83 trained, 0.38 random.
    assert accuracy["trained"] >= 0.65 and accuracy["trained"] >= accuracy["random"] + 0.25, accuracy


def test_loglikelihood_is_the_models_elbo_on_lm_evals_split():
    model = tiny_model(seed=3)
    lm = make_lm(model, mc_num=16, mc_batch_size=4, seed=7)
    # The context's trailing space moves to the continuation; an empty context is conditioned on EOS (no BOS).
    out = lm.loglikelihood(requests("loglikelihood", ("t1 t2 t3 ", "t4 t5"), ("", "t6 t7 t8")), disable_tqdm=True)
    for (value, greedy), (prefix, target) in zip(out, [([1, 2, 3], [4, 5]), ([PAD_ID], [6, 7, 8])]):
        generator = example_generator(7, prefix, target)
        expected = model.diffusion_loglikelihood(prefix, target, mc_samples=16, batch_size=4, generator=generator)
        assert value == pytest.approx(expected.item(), rel=1e-6) and value < 0
        assert greedy is False  # greedy_check="off"
    # Deterministic per request, whatever the order and batch.
    again = lm.loglikelihood(requests("loglikelihood", ("", "t6 t7 t8"), ("t1 t2 t3", " t4 t5")), disable_tqdm=True)
    assert again == out[::-1]


def test_one_token_continuation_is_one_exact_forward():
    model = tiny_model(seed=4)
    value, _ = make_lm(model, mc_num=128).loglikelihood(requests("loglikelihood", ("t1 t2", " t9")), True)[0]
    logits = model(torch.tensor([[1, 2, MASK_ID]])).logits[0, -1]
    assert value == pytest.approx(logits.log_softmax(-1)[9].item(), rel=1e-5)


def test_long_context_is_cut_from_the_left_and_long_continuation_refused():
    model = tiny_model(seed=5)
    lm = make_lm(model, max_length=6, seed=1)
    [(value, _)] = lm.loglikelihood(requests("loglikelihood", ("t1 t2 t3 t4 t5 t6 t7 t8", " t9 t10")), True)
    kept = [5, 6, 7, 8]
    expected = model.diffusion_loglikelihood(kept, [9, 10], 8, 8, generator=example_generator(1, kept, [9, 10]))
    assert value == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="continuation of 7 tokens exceeds max_length=6"):
        lm.loglikelihood(requests("loglikelihood", ("t1", " t2 t3 t4 t5 t6 t7 t8")), True)


def test_greedy_checks(trained):
    prompt = torch.tensor([ids("t3 t1 t4 t1 t5 t9 t2 t6")])
    decoded = trained.diffusion_generate(prompt, max_new_tokens=4, block_length=4, steps=4)[0, 8:].tolist()
    masked = torch.cat([prompt, torch.full((1, 4), MASK_ID)], 1)
    one_step = trained(masked).logits[0, 8:].argmax(-1).tolist()
    wrong = [t % 10 + 1 for t in decoded]

    def is_greedy(check, target):
        lm = make_lm(trained, greedy_check=check)
        continuation = " " + " ".join(f"t{t}" for t in target)
        return lm.loglikelihood(requests("loglikelihood", ("t3 t1 t4 t1 t5 t9 t2 t6", continuation)), True)[0][1]

    assert is_greedy("decode", decoded) and is_greedy(True, decoded)  # LLaDA's check; true means decode
    assert not is_greedy("decode", wrong) and not is_greedy("off", decoded)
    assert is_greedy("one_step", one_step) and not is_greedy("one_step", [t % 10 + 1 for t in one_step])


# --- loglikelihood_rolling ------------------------------------------------------------------------------------------


def test_rolling_windows_score_each_token_once():
    tokens = list(range(20))
    assert rolling_windows(tokens, [99], 12) == [
        ([99], tokens[:11]),
        (tokens[5:11], tokens[11:17]),
        (tokens[11:17], tokens[17:20]),
    ]
    assert rolling_windows(tokens[:5], [99], 12) == [([99], tokens[:5])]
    assert rolling_windows([], [99], 12) == []
    with pytest.raises(ValueError, match="max_length=1 leaves no room"):
        rolling_windows(tokens, [99], 1)


def test_loglikelihood_rolling_sums_window_elbos():
    model = tiny_model(seed=6)
    lm = make_lm(model, max_length=12, seed=3)
    document = [i % 10 + 1 for i in range(20)]
    [value] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (" ".join(f"t{t}" for t in document),)), True)
    expected = sum(
        model.diffusion_loglikelihood(p, t, 8, 8, generator=example_generator(3, p, t)).item()
        for p, t in [([PAD_ID], document[:11]), (document[5:11], document[11:17]), (document[11:17], document[17:])]
    )
    assert value == pytest.approx(expected, rel=1e-6)


# --- generate_until -------------------------------------------------------------------------------------------------

PROMPTS = ["t3 t1 t4 t1 t5 t9 t2 t6", "t5 t3", "t8 t9 t7 t9 t3", "t2 t7 t1 t8 t2 t8 t1 t8", "t4"]


def direct_generation(model, prompt: str, max_new_tokens: int, block_length: int) -> str:
    """The text `diffusion_generate` gives for one prompt, cut at the first EOS."""
    out = model.diffusion_generate(
        torch.tensor([ids(prompt)]), max_new_tokens=max_new_tokens, block_length=block_length
    )
    generated = out[0, len(ids(prompt)) :].tolist()
    generated = generated[: generated.index(PAD_ID)] if PAD_ID in generated else generated
    return tiny_tokenizer().decode(generated)


def test_generation_is_diffusion_generate_and_batching_changes_nothing(trained):
    reqs = requests("generate_until", *[(prompt, dict(GREEDY_8)) for prompt in PROMPTS])
    one_by_one = make_lm(trained, batch_size=1).generate_until(reqs, disable_tqdm=True)
    batched = make_lm(trained, batch_size=4).generate_until(reqs, disable_tqdm=True)
    assert batched == one_by_one
    assert one_by_one == [direct_generation(trained, prompt, 8, 4) for prompt in PROMPTS]
    assert len(one_by_one[0].split()) == 8


def test_canvas_rounds_up_to_whole_blocks_and_is_trimmed(trained):
    lm = make_lm(trained, block_length=4)
    [text] = lm.generate_until(requests("generate_until", (PROMPTS[0], {"max_gen_toks": 6})), True)
    assert text.split() == direct_generation(trained, PROMPTS[0], 8, 4).split()[:6]
    fixed = make_lm(trained, block_length=4, max_new_tokens=4)  # a fixed canvas, like LLaDA's gen_length
    [text] = fixed.generate_until(requests("generate_until", (PROMPTS[0], {"max_gen_toks": 100})), True)
    assert text == direct_generation(trained, PROMPTS[0], 4, 4)


def test_until_stops_rows_early_and_cuts_the_text(trained):
    lm = make_lm(trained)
    calls = []
    hook = trained.register_forward_hook(lambda *args: calls.append(1))
    try:
        [full] = lm.generate_until(requests("generate_until", (PROMPTS[0], dict(GREEDY_8))), True)
        forwards_full = len(calls)
        stop = full.split()[1]  # a token of the first block
        calls.clear()
        gen_kwargs = {**GREEDY_8, "until": [stop]}
        [cut] = lm.generate_until(requests("generate_until", (PROMPTS[0], gen_kwargs)), True)
    finally:
        hook.remove()
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    assert len(calls) == 4 < forwards_full == 8  # one forward per token; the row stopped after its first block


def test_generate_task_with_chat_template(trained, task_manager):
    chat = tiny_tokenizer(LING_CHAT_TEMPLATE)
    lm = make_lm(trained, chat, batch_size=4)
    assert lm.apply_chat_template([{"role": "user", "content": "t1 t2"}]) == (
        "<role>HUMAN</role>t1 t2<|role_end|><role>ASSISTANT</role>"
    )
    assert lm.chat_template(True) == LING_CHAT_TEMPLATE
    broken = make_lm(trained, tiny_tokenizer("{{ raise_exception('no system turns') }}"), batch_size=4)
    with pytest.raises(ValueError, match=r"chat template .* does not render .*no system turns"):
        broken.apply_chat_template([{"role": "user", "content": "t1 t2"}])
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["reversal_generate"],
        task_manager=task_manager,
        limit=3,
        apply_chat_template=True,
        log_samples=True,
    )
    assert "exact_match,none" in out["results"]["reversal_generate"]
    for sample in out["samples"]["reversal_generate"]:
        prompt = sample["arguments"][0][0]
        assert prompt == f"<role>HUMAN</role>{sample['doc']['prompt']}<|role_end|><role>ASSISTANT</role>"
        assert isinstance(sample["resps"][0][0], str)


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mc_nun": 4}, r"unknown model argument\(s\) \['mc_nun'\]"),
        ({"mc_num": 12, "mc_batch_size": 8}, "mc_batch_size=8 must divide mc_num=12"),
        ({"greedy_check": "always"}, "greedy_check='always': expected one of"),
        ({"batch_size": "auto"}, "'auto' is not supported"),
        ({"max_new_tokens": 8, "gen_length": 16}, "are aliases"),
        ({"max_new_tokens": 8, "block_length": 4, "steps": 1}, "`steps`=1 is invalid"),
        ({"remasking": "lowest"}, "`remasking`='lowest' is invalid"),
        ({"bits": 4}, "bits=4 applies when pretrained is a path"),
        ({"tokenizer": None}, "a built model needs tokenizer="),
    ],
)
def test_bad_model_arguments_are_named(kwargs, message):
    args = {"pretrained": tiny_model(), "tokenizer": tiny_tokenizer(), **kwargs}
    with pytest.raises(ValueError, match=message):
        LLaDAMoELM(**args)


def test_bad_models_and_gen_kwargs_are_named():
    with pytest.raises(ValueError, match="expected a masked-diffusion LM"):
        LLaDAMoELM(pretrained=torch.nn.Linear(2, 2), tokenizer=tiny_tokenizer())
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LLaDAMoELM(pretrained="./nowhere/at/all")
    lm = make_lm()
    for gen_kwargs, message in [
        ({"num_beams": 4, "until": []}, r"unknown gen_kwargs \['num_beams'\]"),
        ({"do_sample": True}, "do_sample=True needs a temperature > 0"),
        ({"max_gen_toks": 8, "steps": 1, "block_length": 4}, "`steps`=1 is invalid"),
        ({"max_gen_toks": 300}, "leaves no room for the prompt in max_length=256"),
    ]:
        with pytest.raises(ValueError, match=message):
            lm.generate_until(requests("generate_until", ("t1 t2", gen_kwargs)), True)


# --- command line ---------------------------------------------------------------------------------------------------

CLI_SEED = 8


@pytest.fixture(scope="module", autouse=True)
def command_line_run(tmp_path_factory):
    """lm-eval's command line on a saved tiny model, started in the background when the module starts (indexing
    lm-eval's 14k task files takes ~15 s) and read by `test_lm_eval_command_line` at the end."""
    work = tmp_path_factory.mktemp("lm_eval_cli")
    folder = save_tiny_folder(work / "model", model=tiny_model(seed=CLI_SEED), chat=False)
    command = [sys.executable, "-m", "modeling_llada_moe.apps.evaluation", "--model", "llada_moe"]
    command += ["--model_args", f"pretrained={folder},mc_num=8,block_length=4", "--device", "cpu"]
    command += ["--tasks", "reversal_choice,reversal_generate", "--include_path", str(TASKS), "--limit", "4"]
    command += ["--output_path", str(work / "results"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(work / "stdout", "w") as stdout, open(work / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    yield process, work
    if process.poll() is None:
        process.kill()
        process.wait()


def test_lm_eval_command_line(command_line_run, task_manager):
    process, work = command_line_run
    returncode = process.wait(timeout=600)
    stdout, stderr = (work / "stdout").read_text(), (work / "stderr").read_text()
    assert returncode == 0, stdout + stderr
    assert "reversal_choice" in stdout and "exact_match" in stdout  # lm-eval's results table
    # The folder the command line loaded scores every sample exactly as the same model in memory.
    in_memory = lm_eval.simple_evaluate(
        model=make_lm(tiny_model(seed=CLI_SEED)),
        tasks=["reversal_choice", "reversal_generate"],
        task_manager=task_manager,
        limit=4,
        log_samples=True,
    )["samples"]
    for task in ("reversal_choice", "reversal_generate"):
        [path] = (work / "results").rglob(f"samples_{task}_*.jsonl")
        from_cli = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(from_cli) == len(in_memory[task]) == 4
        for cli_sample, sample in zip(sorted(from_cli, key=lambda s: s["doc_id"]), in_memory[task]):
            assert cli_sample["doc_id"] == sample["doc_id"]
            assert leaves(cli_sample["resps"]) == leaves(sample["resps"]), task


def leaves(value) -> list[str]:
    """The values of a nested response as strings (lm-eval's sample files store (logprob, is_greedy) as strings)."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    return [str(value)]


def test_cache_model_arguments_set_cache_implementation():
    modes = {
        "dual": make_lm(cache_implementation="dual"),
        "prefix": make_lm(use_cache="prefix"),  # the old spelling names the kind
        None: make_lm(cache_implementation="none", use_cache="true"),
    }
    assert {mode: lm.generation_config.cache_mode for mode, lm in modes.items()} == {m: m for m in modes}
    assert make_lm(use_cache="false").generation_config.cache_mode is None
