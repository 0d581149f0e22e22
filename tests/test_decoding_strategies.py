"""Issue 15: hierarchical and credit decoding, cache refresh / vicinity / warm-up, Fast-dLLM factor-rule and float64
parity, presets. Hand-made cases for each rule, then tiny-model runs: default outputs unchanged, no mask token
committed, termination (hypothesis, with a wall-clock guard per example)."""

import math
import random

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from modeling_llada_moe import DiffusionGenerationConfig, unmasking
from modeling_llada_moe.generation_utils import (
    confidence,
    decoding_preset,
    fuse_credit,
    select_by_factor,
    select_by_hierarchy,
)


MASK = 126
GEN = dict(max_new_tokens=8, block_length=4)
NEG = float("-inf")


def prompts(batch=2, length=5, seed=0):
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def counting(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    return calls, handle


# --- hierarchical decoding --------------------------------------------------------------------------------------


def test_hierarchy_commits_the_best_of_each_run_above_the_low_threshold():
    # candidates form runs {0, 1, 2} and {4, 5} (position 3 is already decoded); high 0.9, low 0.5
    scores = torch.tensor([[0.6, 0.7, 0.2, NEG, 0.4, 0.3, NEG]])
    candidates = torch.tensor([[True, True, True, False, True, True, False]])
    chosen = select_by_hierarchy(scores, candidates, 0.9, 0.5)
    # run 1: its best (0.7) passes the low threshold; run 2: its best (0.4) does not; nothing passes 0.9, and the
    # row's best (0.7) is already in
    assert chosen.tolist() == [[False, True, False, False, False, False, False]]
    # high-threshold positions come in whatever their run; a row whose runs all fail still commits its best
    scores = torch.tensor([[0.95, 0.92, 0.1, 0.3], [0.1, 0.2, 0.3, 0.25]])
    candidates = torch.ones(2, 4, dtype=torch.bool)
    chosen = select_by_hierarchy(scores, candidates, 0.9, 0.5)
    assert chosen.tolist() == [[True, True, False, False], [False, False, True, False]]
    # isolated candidates are runs of one: each passes on its own
    scores = torch.tensor([[0.6, NEG, 0.55, NEG, 0.52]])
    candidates = torch.tensor([[True, False, True, False, True]])
    assert select_by_hierarchy(scores, candidates, 0.9, 0.5).tolist() == [[True, False, True, False, True]]


def test_hierarchy_with_low_equal_high_is_the_threshold_rule_plus_run_maxima():
    scores = torch.tensor([[0.3, 0.8, 0.85, 0.1]])
    candidates = torch.ones(1, 4, dtype=torch.bool)
    # low = high = 0.8: one run, its best 0.85 >= 0.8; 0.8 >= 0.8 via the high threshold
    assert select_by_hierarchy(scores, candidates, 0.8, 0.8).tolist() == [[False, True, True, False]]


# --- credit decoding --------------------------------------------------------------------------------------------


def test_credit_accumulates_on_the_top1_token_of_masked_positions_and_decays():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2, 1e-9], [0.1, 0.1, 0.1, 0.7]]]))  # mask id 3
    masked = torch.tensor([[True, False]])
    fused, credit = fuse_credit(logits, None, masked, 3, alpha=0.7, decay=0.8, boost=0.2)
    assert credit[0, 0].tolist() == pytest.approx([0.5**0.2, 0, 0, 0])
    assert credit[0, 1].tolist() == [0, 0, 0, 0]  # not masked: no credit
    assert torch.allclose(fused[0, 0], logits[0, 0] + torch.tensor([0.7 * math.log1p(0.5**0.2), 0, 0, 0]))
    _, credit = fuse_credit(logits, credit, masked, 3, alpha=0.7, decay=0.8, boost=0.2)
    assert credit[0, 0, 0].item() == pytest.approx(0.8 * 0.5**0.2 + 0.5**0.2)
    # position 1's top-1 is the mask token: credit goes to the best other token instead
    _, credit = fuse_credit(logits, None, torch.ones(1, 2, dtype=torch.bool), 3, alpha=0.7, decay=0.8, boost=0.2)
    assert credit[0, 1, 3].item() == 0 and credit[0, 1, 0].item() == pytest.approx(0.1**0.2)


def test_credit_raises_a_stable_prediction_above_the_threshold_sooner():
    # a prediction that stays at p = 0.8 never passes threshold 0.9 alone; with credit c_1 = 0.8^0.2, c_2 = 1.8 c_1,
    # c_3 = 2.44 c_1 its fused probability is 0.865, 0.890, 0.903: it passes on the third step
    logits = torch.log(torch.tensor([[[0.8, 0.15, 0.05]]]))
    masked = torch.ones(1, 1, dtype=torch.bool)
    credit, passed = None, []
    for _ in range(3):
        fused, credit = fuse_credit(logits, credit, masked, 2, alpha=0.7, decay=0.8, boost=0.2)
        passed.append(fused.softmax(-1)[0, 0, 0].item() >= 0.9)
    assert passed == [False, False, True]


# --- Fast-dLLM parity: factor rule and float64 confidences -----------------------------------------------------


def fast_dllm_factor(confidences: list[float], factor: float) -> set[int]:
    """Fast-dLLM's factor rule restated from its code's behaviour: sort the masked confidences descending, find the
    first rank i (0-based, from 1 on) whose confidence is below 1 - factor / (i + 2); commit that many, but all of
    them when that rank is the last one or none fails."""
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    n, count = len(order), len(order)
    for rank in range(1, n):
        if confidences[order[rank]] < 1 - factor / (rank + 2):
            count = rank
            break
    if count == n - 1:
        count = n
    return set(order[:count])


def paper_factor(confidences: list[float], factor: float) -> set[int]:
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    count = 1
    while count < len(order) and confidences[order[count]] >= 1 - factor / (count + 2):
        count += 1
    return set(order[:count])


def random_factor_case(rng: random.Random):
    n = rng.randint(1, 8)
    confidences = [rng.choice([rng.random(), 1 - rng.random() ** 3]) for _ in range(n)]
    return confidences, rng.choice([0.5, 1.0, 2.0, 3.0])


def test_factor_rule_fast_dllm_matches_its_code_on_random_cases_and_prefix_differs_where_documented():
    rng = random.Random(0)
    differ = 0
    for _ in range(3000):
        confidences, factor = random_factor_case(rng)
        width = len(confidences) + 2  # two decoded positions around them
        scores = torch.full((1, width), NEG, dtype=torch.float64)
        scores[0, 1 : 1 + len(confidences)] = torch.tensor(confidences, dtype=torch.float64)
        candidates = scores > NEG
        fast = select_by_factor(scores, candidates, factor, "fast_dllm")[0].nonzero().flatten() - 1
        prefix = select_by_factor(scores, candidates, factor)[0].nonzero().flatten() - 1
        assert set(fast.tolist()) == fast_dllm_factor(confidences, factor), (confidences, factor)
        assert set(prefix.tolist()) == paper_factor(confidences, factor), (confidences, factor)
        differ += set(fast.tolist()) != set(prefix.tolist())
    assert 0 < differ < 3000  # the two rules differ exactly when only the last candidate fails


def test_factor_rule_commits_all_when_only_the_last_fails():
    scores = torch.tensor([[0.99, 0.95, 0.2]], dtype=torch.float64)
    candidates = torch.ones(1, 3, dtype=torch.bool)
    assert select_by_factor(scores, candidates, 1.0).tolist() == [[True, True, False]]
    assert select_by_factor(scores, candidates, 1.0, "fast_dllm").tolist() == [[True, True, True]]


def test_float64_confidences_are_fast_dllm_s_softmax():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    proposal = logits.argmax(-1)
    exact = confidence(logits, proposal, "low_confidence", None, None, torch.float64)
    assert exact.dtype == torch.float64
    expected = logits.double().softmax(-1).gather(-1, proposal[..., None]).squeeze(-1)
    assert torch.equal(exact, expected)
    assert confidence(logits, proposal, "low_confidence", None, None).dtype == torch.bfloat16  # reference default


def test_fast_dllm_rules_decode_through_the_sampling_loop():
    model = tiny_model(seed=3)
    x = prompts()
    out = model.diffusion_generate(x, factor=1.0, factor_rule="fast_dllm", confidence_dtype="float64", **GEN)
    assert not (out == MASK).any()


# --- cache refresh, vicinity and warm-up -----------------------------------------------------------------------


def test_cache_refresh_interval_vicinity_and_warmup_shape_the_forwards():
    model = tiny_model(seed=4)
    widths = []

    def record(module, args, kwargs, out):
        widths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        base = dict(steps=8, cache_implementation="dual")  # prompt 5 + 8 tokens, blocks [5, 9) and [9, 13)
        model.diffusion_generate(prompts(1), **GEN, **base)
        assert widths == [13, 4, 4, 4] * 2
        widths.clear()
        model.diffusion_generate(prompts(1), **GEN, **base, cache_refresh_interval=2)
        assert widths == [13, 4, 13, 4] * 2
        widths.clear()
        model.diffusion_generate(prompts(1), **GEN, **base, cache_vicinity=(2, 3))
        # block 1: [3, 12) (9 columns); block 2: [7, 13) (cut at the canvas end)
        assert widths == [13, 9, 9, 9, 13, 6, 6, 6]
        widths.clear()
        model.diffusion_generate(prompts(1), **GEN, **base, cache_warmup_steps=3)
        assert widths == [13, 13, 13, 4, 13, 4, 4, 4]
        widths.clear()
        model.diffusion_generate(prompts(1), **GEN, steps=8, cache_implementation="prefix", cache_vicinity=(2, 0))
        assert widths == [13, 10, 10, 10, 13, 6, 6, 6]
    finally:
        handle.remove()


def test_a_vicinity_as_wide_as_the_canvas_is_exact():
    # recomputing every column every step is the uncached forward
    model = tiny_model(seed=6)
    x = prompts()
    plain = model.diffusion_generate(x, threshold=0.5, **GEN)
    cached = model.diffusion_generate(x, threshold=0.5, cache_implementation="dual", cache_vicinity=(20, 20), **GEN)
    assert torch.equal(plain, cached)
    refreshed = model.diffusion_generate(
        x, threshold=0.5, cache_implementation="dual", cache_refresh_interval=1, **GEN
    )
    assert torch.equal(plain, refreshed)


# --- iteration smoothing (cont_weight) and threshold decay ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(threshold=0.5, cache_implementation="dual", cache_vicinity=(2, 2)),
        dict(threshold=0.9, cache_implementation="prefix"),
        dict(cfg_scale=1.0),
    ],
)
def test_smoothing_at_weight_zero_is_the_plain_sampler(kwargs):
    # the embeddings path (inputs_embeds plus a zero smoothing term) gives the token-id path's tokens exactly
    model = tiny_model(seed=7)
    x = prompts(3, 6, seed=3)
    plain = model.diffusion_generate(x, **GEN, **kwargs)
    zero = model.diffusion_generate(x, **GEN, **kwargs, cont_weight=0.3, cont_weight_init=0.0, cont_weight_growth=0.0)
    assert torch.equal(plain, zero)


def test_smoothing_feeds_each_forward_the_expected_embedding_of_the_last_prediction():
    model = tiny_model(seed=5)
    embedding = model.get_input_embeddings().weight
    inputs, outputs = [], []
    pre = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
    )
    post = model.register_forward_hook(lambda module, args, out: outputs.append(out.logits.clone()))
    x = prompts(2, 5, seed=4)
    try:
        out = model.diffusion_generate(
            x, max_new_tokens=4, block_length=4, cont_weight=0.16, output_history=True, return_dict_in_generate=True
        )
    finally:
        pre.remove()
        post.remove()
    assert len(inputs) == 4
    assert torch.equal(inputs[0], embedding[torch.cat([x, torch.full((2, 4), MASK)], 1)])  # nothing predicted yet
    for n in (1, 2, 3):
        canvas = out.history[n - 1]  # the canvas the n-th forward (from 0) reads
        weight = min(0.15 + 0.02 * (n - 1), 0.16)  # set by the forward before it: 0.15, then capped at 0.16
        predicted = weight * torch.softmax(outputs[n - 1][:, 5:].float(), -1) @ embedding
        expected = embedding[canvas].clone()
        still = canvas[:, 5:] == MASK
        expected[:, 5:][still] += predicted[still]
        torch.testing.assert_close(inputs[n], expected)
        assert still.any()


def test_smoothing_changes_the_decoding_terminates_and_never_commits_the_mask_token():
    model = tiny_model(seed=7)
    x = prompts(3, 6, seed=3)
    kwargs = dict(max_new_tokens=12, block_length=4)
    plain = model.diffusion_generate(x, cache_implementation="prefix", threshold=0.9, **kwargs)
    smooth = model.diffusion_generate(
        x, cache_implementation="prefix", threshold=0.9, cont_weight=0.3, return_dict_in_generate=True, **kwargs
    )
    assert not torch.equal(plain, smooth.sequences)
    assert not (smooth.sequences == MASK).any() and (smooth.nfe <= 12 + 3 * 2).all()


def test_threshold_decay_starts_at_one_and_falls_to_the_threshold():
    model = tiny_model(seed=9)
    x = prompts(3, 5, seed=5)
    kwargs = dict(max_new_tokens=8, block_length=8, threshold=0.01, return_dict_in_generate=True)
    plain = model.diffusion_generate(x, **kwargs)
    assert ((plain.unmask_step == 0).sum(1) > 1).all()  # threshold 0.01 commits several tokens in its first forward
    decayed = model.diffusion_generate(x, threshold_decay=0.5, **kwargs)  # thresholds 1.0, 0.5, then 0.01
    assert (decayed.unmask_step == 0).sum(1).tolist() == [1, 1, 1]
    assert not (decayed.sequences == MASK).any()
    # the hierarchy's high threshold decays the same way; its low threshold stays
    high = model.diffusion_generate(x, low_threshold=0.01, threshold_decay=0.5, **kwargs)
    assert not (high.sequences == MASK).any()
    # At the first forward the high threshold has decayed to 1.0, so only the hierarchy's low threshold can select:
    # the best of each run of masked positions (0.3 and 0.4 here) when it is >= 0.01. A low threshold that decayed
    # with the high one (to 1.0) would select nothing.
    policy = unmasking.HierarchyPolicy(threshold=0.9, low_threshold=0.01, decay=0.5)
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.4, 0.2]])
    candidates = torch.tensor([[True, True, False, True, True]])
    assert policy.threshold_at(0) == 1.0
    assert policy.rule(scores, candidates, 0).tolist() == [[True, False, False, True, False]]
    assert policy.rule(scores, candidates, 1).tolist() == [[True, False, False, True, False]]  # high 0.5: no more


# --- defaults unchanged, presets -------------------------------------------------------------------------------


def test_defaults_switch_every_strategy_off():
    config = DiffusionGenerationConfig()
    assert (config.low_threshold, config.credit_alpha, config.cache_refresh_interval, config.cache_vicinity) == (
        None, None, None, None
    )
    assert (config.cache_warmup_steps, config.factor_rule, config.confidence_dtype) == (0, "prefix", None)
    assert (config.cont_weight, config.threshold_decay) == (None, None)


def test_dinfer_preset_decodes_with_its_strategies():
    config = DiffusionGenerationConfig.from_preset("dinfer", **GEN)
    assert (config.threshold, config.low_threshold, config.cache_mode) == (0.76, 0.62, "dual")
    assert (config.cache_vicinity, config.cache_warmup_steps) == ((16, 16), 4)
    assert (config.cont_weight, config.threshold_decay) == (None, None)
    smooth = DiffusionGenerationConfig.from_preset("dinfer_smooth", **GEN)
    assert (smooth.cont_weight, smooth.cont_weight_init, smooth.cont_weight_growth) == (0.3, 0.15, 0.02)
    assert (smooth.threshold_decay, smooth.threshold, smooth.low_threshold, smooth.cache_vicinity) == (
        0.02, 0.76, 0.62, (16, 16)
    )
    out = tiny_model(seed=7).diffusion_generate(prompts(), generation_config=smooth, return_dict_in_generate=True)
    assert not (out.sequences == MASK).any() and (out.nfe <= 8 + 2 * 2).all()
    # a later preset switches the smoothing off again
    both = {**decoding_preset("dinfer_smooth"), **decoding_preset("dinfer")}
    assert DiffusionGenerationConfig(**both).cont_weight is None
    model = tiny_model(seed=7)
    out = model.diffusion_generate(prompts(), generation_config=config, return_dict_in_generate=True)
    assert not (out.sequences == MASK).any() and (out.nfe <= 8 + 2 * 2).all()
    fast = DiffusionGenerationConfig.from_preset("fast_dllm")
    assert (fast.confidence_dtype, fast.threshold, fast.cache_mode) == ("float64", 0.9, "dual")


BAD = {
    "low_threshold_without_threshold": (dict(low_threshold=0.5), ValueError, "`low_threshold`=0.5"),
    "low_threshold_above_threshold": (dict(threshold=0.6, low_threshold=0.7), ValueError, r"\(0, threshold=0.6\]"),
    "credit_alpha": (dict(credit_alpha=-1.0), ValueError, "`credit_alpha`=-1.0"),
    "credit_decay": (dict(credit_decay=0.0), ValueError, "`credit_decay`=0.0"),
    "credit_boost_type": (dict(credit_boost="0.2"), TypeError, "`credit_boost`='0.2'"),
    "factor_rule": (dict(factor=1.0, factor_rule="paper"), ValueError, "`factor_rule`='paper'"),
    "confidence_dtype": (dict(confidence_dtype="float16"), ValueError, "`confidence_dtype`='float16'"),
    "refresh_without_cache": (dict(cache_refresh_interval=2), ValueError, "applies to a cache only"),
    "refresh_zero": (dict(cache_implementation="dual", cache_refresh_interval=0), ValueError, "refresh_interval`=0"),
    "vicinity_type": (dict(cache_implementation="dual", cache_vicinity=(1, 2.0)), TypeError, "`cache_vicinity`"),
    "vicinity_negative": (dict(cache_implementation="dual", cache_vicinity=(-1, 2)), ValueError, ">= 0"),
    "warmup_negative": (dict(cache_implementation="dual", cache_warmup_steps=-1), ValueError, "warmup_steps`=-1"),
    "cont_weight": (dict(cont_weight=0.0), ValueError, "`cont_weight`=0.0"),
    "cont_weight_nan": (dict(cont_weight=float("nan")), ValueError, "`cont_weight`=nan"),
    "cont_weight_init": (dict(cont_weight=0.3, cont_weight_init=-0.1), ValueError, "`cont_weight_init`=-0.1"),
    "cont_weight_growth_type": (dict(cont_weight=0.3, cont_weight_growth="0.02"), TypeError, "`cont_weight_growth`"),
    "threshold_decay_without_threshold": (dict(threshold_decay=0.02), ValueError, "set threshold too"),
    "threshold_decay_negative": (dict(threshold=0.9, threshold_decay=-0.02), ValueError, "`threshold_decay`=-0.02"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_strategy_settings_raise_naming_the_field_before_any_forward(case):
    model = tiny_model()
    calls, handle = counting(model)
    kwargs, error, message = BAD[case]
    try:
        with pytest.raises(error, match=message):
            model.diffusion_generate(prompts(), **GEN, **kwargs)
    finally:
        handle.remove()
    assert not calls


# --- termination and the mask token (property test) -------------------------------------------------------------


@st.composite
def strategies(draw):
    kwargs = {}
    rule = draw(st.sampled_from(["threshold", "hierarchy", "factor", "quota"]))
    if rule in ("threshold", "hierarchy"):
        kwargs["threshold"] = draw(st.sampled_from([0.3, 0.9, 1.0]))
        if rule == "hierarchy":
            kwargs["low_threshold"] = draw(st.sampled_from([0.1, kwargs["threshold"]]))
    elif rule == "factor":
        kwargs["factor"] = draw(st.sampled_from([0.5, 2.0]))
        kwargs["factor_rule"] = draw(st.sampled_from(["prefix", "fast_dllm"]))
    if draw(st.booleans()):
        kwargs.update(credit_alpha=draw(st.sampled_from([0.7, 50.0])), credit_boost=draw(st.sampled_from([0.2, 1.0])))
    cache = draw(st.sampled_from([None, "prefix", "dual"]))
    if cache:
        kwargs.update(
            cache_implementation=cache,
            cache_refresh_interval=draw(st.sampled_from([None, 1, 2])),
            cache_vicinity=draw(st.sampled_from([None, (1, 1), (16, 16)])),
            cache_warmup_steps=draw(st.sampled_from([0, 4])),
        )
    if draw(st.booleans()):
        kwargs.update(
            cont_weight=draw(st.sampled_from([0.3, 5.0])), cont_weight_growth=draw(st.sampled_from([0.02, 1.0]))
        )
    if "threshold" in kwargs and draw(st.booleans()):
        kwargs["threshold_decay"] = draw(st.sampled_from([0.02, 0.5]))
    kwargs["confidence_dtype"] = draw(st.sampled_from([None, "float64"]))
    kwargs["temperature"] = draw(st.sampled_from([0.0, 0.0, 1.0]))
    return kwargs


_MODELS = {}


def model_for(tied: bool):
    """Tied embeddings: left alone, the model proposes the mask token everywhere."""
    if tied not in _MODELS:
        _MODELS[tied] = tiny_model(seed=0, tie_word_embeddings=tied)
        _MODELS[tied].diffusion_generate(prompts(1), **GEN)  # first-call costs stay outside the time limit
    return _MODELS[tied]


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tied=st.booleans(), kwargs=strategies())
def test_every_strategy_terminates_and_never_commits_the_mask_token(tied, kwargs):
    model = model_for(tied)
    x = prompts(2, 5, seed=1)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with time_limit(30):  # a decode takes well under a second; this catches a hang, not a busy machine
        out = model.diffusion_generate(
            x, attention_mask=mask, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True,
            **GEN, **kwargs,
        )
    assert not (out.sequences == MASK).any() and torch.equal(out.sequences[:, :5], x)
    assert (out.nfe <= 2 * (4 + 2)).all()


# --- presets in the command line, the lm-eval model and the demo ------------------------------------------------


def test_cli_preset_flag_applies_the_preset_under_explicit_flags(capsys):
    from modeling_llada_moe.apps.cli import build_parser, decoding_fields, flags_config

    parser = build_parser()
    base = DiffusionGenerationConfig(threshold=0.5, cache_implementation="prefix")
    args = parser.parse_args(["generate", "--model", "m", "--preset", "dinfer", "--threshold", "0.8", "hi"])
    config = flags_config(base, decoding_fields(args))
    assert (config.threshold, config.low_threshold, config.cache_vicinity) == (0.8, 0.62, (16, 16))
    args = parser.parse_args(["generate", "--model", "m", "--preset", "dinfer", "--cache", "none", "hi"])
    config = flags_config(base, decoding_fields(args))
    assert (config.cache_implementation, config.cache_vicinity, config.cache_warmup_steps) == (None, None, 0)
    kept = flags_config(base, decoding_fields(parser.parse_args(["generate", "--model", "m", "hi"])))
    assert (kept.threshold, kept.cache_implementation) == (0.5, "prefix")  # flags left out keep the base's
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--preset", "fastdllm", "hi"])
    assert "invalid choice: 'fastdllm'" in capsys.readouterr().err


def test_lm_eval_model_takes_a_preset():
    import lm_eval  # noqa: F401  (a dev dependency: missing, the test fails)

    from modeling_llada_moe.apps.evaluation import LLaDAMoELM
    from modeling_llada_moe.apps.tiny_task import tiny_tokenizer

    model = tiny_model()
    model.generation_config.threshold = 0.5  # a preset replaces the model's strategy settings
    lm = LLaDAMoELM(pretrained=model, tokenizer=tiny_tokenizer(), block_length=4, preset="fast_dllm")
    assert (lm.generation_config.threshold, lm.generation_config.cache_mode) == (0.9, "dual")
    lm = LLaDAMoELM(pretrained=model, tokenizer=tiny_tokenizer(), block_length=4, preset="llada")
    assert (lm.generation_config.threshold, lm.generation_config.cache_mode) == (None, None)
    with pytest.raises(ValueError, match="`preset`='fast' is invalid; expected one of"):
        LLaDAMoELM(pretrained=model, tokenizer=tiny_tokenizer(), preset="fast")


def test_demo_decoding_settings_take_a_preset():
    import os

    import gradio  # noqa: F401  (a dev dependency: missing, the test fails)
    from conftest import load_example

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    load_example("denoise_viz")  # app.py imports it from beside itself
    app = load_example("app")
    settings = app.decoding_settings(64, 32, 0, 0.0, "none", 0.0, "low_confidence", "fast_dllm")
    assert (settings.threshold, settings.cache_implementation, settings.max_new_tokens) == (0.9, "dual", 64)
    assert app.decoding_settings(64, 32, 0, 0.5, "none", 0.0, "low_confidence").threshold == 0.5
    with pytest.raises(ValueError, match="`preset`='x'"):
        app.decoding_settings(64, 32, 0, 0.0, "none", 0.0, "low_confidence", "x")


# --- early termination: a finished row costs no forwards ---------------------------------------------------------


class SureOfRowZero:
    """A logits processor that makes every position of the rows whose prompt starts with token 7 certain of token 5."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[input_ids[:, 0] == 7, 5] += 100.0
        return scores


@pytest.mark.parametrize("kwargs", [{}, dict(cache_implementation="dual"), dict(cfg_scale=1.0, credit_alpha=0.7)])
def test_a_row_whose_block_is_final_leaves_the_forwards(kwargs):
    model = tiny_model(seed=8)
    x = prompts(2, 5, seed=2)
    x[0, 0], x[1, 0] = 7, 8
    batch_sizes = []
    handle = model.register_forward_hook(
        lambda module, args, kw, out: batch_sizes.append((args[0] if args else kw["input_ids"]).shape[0]),
        with_kwargs=True,
    )
    try:
        out = model.diffusion_generate(
            x, threshold=1.0, logits_processor=[SureOfRowZero()], return_dict_in_generate=True, **GEN, **kwargs
        )
        alone = model.diffusion_generate(x[1:], threshold=1.0, logits_processor=[SureOfRowZero()], **GEN, **kwargs)
    finally:
        handle.remove()
    copies = 2 if kwargs.get("cfg_scale") else 1
    # row 0 fills each block in one forward; row 1 commits one token per forward (threshold 1.0)
    assert out.nfe.tolist() == [2, 8]
    assert batch_sizes[:8] == [2 * copies, copies, copies, copies] * 2
    assert torch.equal(out.sequences[1:], alone) and (out.sequences[0, 5:] == 5).all()


# --- the benchmark task ------------------------------------------------------------------------------------------


def test_addition_task_writes_the_sum_with_its_carries():
    from modeling_llada_moe.apps.tiny_task import addition_batch, addition_examples, addition_text

    # digits d are tokens t(d+1); addends padded to 4 digits, the sum to 5
    assert addition_text(9999, 1) == ("t10 t10 t10 t10 t101 t1 t1 t1 t2 t100", " t2 t1 t1 t1 t1")
    assert addition_examples(3, seed=1) == addition_examples(3, seed=1) != addition_examples(3, seed=2)
    prompts_, answers = addition_batch(5, seed=3)
    assert prompts_.shape == (5, 10) and answers.shape == (5, 5)
    a = int("".join(str(t - 1) for t in prompts_[0, :4].tolist()))
    b = int("".join(str(t - 1) for t in prompts_[0, 5:9].tolist()))
    assert int("".join(str(t - 1) for t in answers[0].tolist())) == a + b


def test_generation_benchmark_sweep_trains_and_prints_every_preset(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "benchmarks.generation", "--sweep", "--train-steps", "3", "--seeds", "2"]
    result = subprocess.run(
        [*command, "--batch", "4", "--save", str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 24 and all(f"preset {name}" in result.stdout for name in ("llada", "fast_dllm", "dinfer"))
    assert (tmp_path / "model" / "config.json").is_file()
