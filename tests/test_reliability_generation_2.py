"""Issue 23 (items 3-5): no silent non-finite values, every transformers calling form, clean errors for wrong types.

Item 3: generation and log-likelihood never return or decode from NaN / inf: settings past a clear bound are refused
before any forward, the rest raise at the first non-finite forward naming the likely cause. Item 4: a plain
transformers `GenerationConfig` works as `generation_config`, a saved generation config loads with plain
transformers, `max_time` ends refinement with no mask left, and every other `GenerationConfig` field is honoured,
refused by name, or documented as harmless. Item 5: wrong types, devices, shapes and extreme values of every argument
of `generate` / `diffusion_generate` / `diffusion_loglikelihood` are a `TypeError` / `ValueError` naming the argument.

One test per reported case, then bounded property-based searches (hypothesis, fixed example budget, a wall-clock
guard per example) that require success on valid draws.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_generation import assert_valid
from time_limit import time_limit
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from modeling_llada_moe import unmasking
from modeling_llada_moe.generation_config import (
    AR_ONLY_FIELDS,
    FIELD_RULES,
    HARMLESS_FIELDS,
    NOT_RETURNED_FIELDS,
    SAVED_CACHE_KEY,
    DiffusionGenerationConfig,
)


MASK, PAD, VOCAB = 126, 120, 128
GEN = dict(max_new_tokens=8, block_length=4)
_MODELS = {}


def model():
    if "plain" not in _MODELS:
        _MODELS["plain"] = tiny_model(seed=0)
    return _MODELS["plain"]


def prompts(batch=2, length=5, seed=0):
    return torch.randint(0, PAD, (batch, length), generator=torch.Generator().manual_seed(seed))


def counting(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


# --- item 3: non-finite values ------------------------------------------------------------------------------------


def test_loglikelihood_cfg_scale_past_the_float_range_is_refused_before_any_forward():
    m = model()
    calls, handle = counting(m)
    try:
        with pytest.raises(ValueError, match=r"diffusion_loglikelihood: cfg_scale=1e\+300"):
            m.diffusion_loglikelihood([1, 2], [3, 4], mc_samples=4, batch_size=4, cfg_scale=1e300)
    finally:
        handle.remove()
    assert not calls


def test_generation_cfg_scale_past_the_float_range_is_refused_before_any_forward():
    m = model()
    calls, handle = counting(m)
    try:
        with pytest.raises(ValueError, match=r"diffusion_generate: cfg_scale=1e\+300"):
            m.diffusion_generate(prompts(), cfg_scale=1e300, **GEN)
    finally:
        handle.remove()
    assert not calls


def loud_model():
    """The tiny model with its output layer scaled by 100: cond - uncond differences of about 60 (0.6 unscaled), so a
    finite cfg_scale of 3e38 overflows float32 in the guidance."""
    if "loud" not in _MODELS:
        loud = tiny_model(seed=0)
        with torch.no_grad():
            loud.lm_head.weight.mul_(100)
        _MODELS["loud"] = loud
    return _MODELS["loud"]


@pytest.mark.parametrize("decoding", [dict(), dict(threshold=0.9)], ids=["quota", "threshold"])
def test_guidance_that_overflows_raises_naming_cfg_scale(decoding):
    with time_limit(20), pytest.raises(ValueError, match=r"cfg_scale=3e\+38"):
        loud_model().diffusion_generate(prompts(), cfg_scale=3e38, **GEN, **decoding)


def test_loglikelihood_guidance_that_overflows_raises_naming_cfg_scale():
    with pytest.raises(ValueError, match=r"diffusion_loglikelihood: .*cfg_scale=3e\+38"):
        loud_model().diffusion_loglikelihood([1, 2], [3, 4, 5], mc_samples=4, batch_size=4, cfg_scale=3e38)


def nan_weight_model():
    if "nan" not in _MODELS:
        broken = tiny_model(seed=0)
        with torch.no_grad():
            broken.lm_head.weight[5] = float("nan")
        _MODELS["nan"] = broken
    return _MODELS["nan"]


def test_nan_weights_raise_in_generation_and_loglikelihood_naming_the_weights():
    broken = nan_weight_model()
    with pytest.raises(ValueError, match="model's weights or config"):
        broken.diffusion_generate(prompts(), **GEN)
    with pytest.raises(ValueError, match="diffusion_loglikelihood: .*model's weights or config"):
        broken.diffusion_loglikelihood([1, 2], [3, 4], mc_samples=4, batch_size=4)


class PlusInfinity(LogitsProcessor):
    """Forces token 7 with a +inf logit (its softmax is then NaN)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, 7] = float("inf")
        return scores


class NaNLogits(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("nan"))


@pytest.mark.parametrize("decoding", [dict(), dict(threshold=0.9), dict(factor=1.0)], ids=["quota", "thr", "factor"])
def test_plus_infinity_from_a_logits_processor_raises_naming_it(decoding):
    with time_limit(20), pytest.raises(ValueError, match="logits_processor"):
        model().diffusion_generate(prompts(), logits_processor=LogitsProcessorList([PlusInfinity()]), **GEN,
                                   **decoding)


@pytest.mark.parametrize("processor", [PlusInfinity(), NaNLogits()], ids=["inf", "nan"])
def test_remove_invalid_values_decodes_through_non_finite_logits_as_transformers_does(processor):
    x = prompts()
    out = model().diffusion_generate(
        x, logits_processor=LogitsProcessorList([processor]), remove_invalid_values=True, **GEN
    )
    assert_valid(out, x)
    if isinstance(processor, PlusInfinity):  # +inf becomes the largest float: token 7 wins everywhere
        assert (out[:, x.shape[1]:] == 7).all()


def test_huge_temperature_samples_uniformly_instead_of_the_first_tokens():
    logits = torch.zeros(1, 4000, VOCAB)
    draws = unmasking.propose_tokens(logits, 1e300, None, None, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws.flatten(), minlength=VOCAB)
    # uniform over 128 tokens: about 31 draws each (the largest of 128 such counts stays far below 100); the overflow
    # of g ** T gave token 0 about 63 % of the draws
    assert counts.max() < 100 and (counts > 0).sum() > 120


def test_overflowing_exp_samples_from_the_distribution_instead_of_the_first_token():
    # logits of 1000 + a spread: exp overflows to inf for all of them; the draw must still follow softmax(logits)
    spread = torch.linspace(0, 3, VOCAB)
    logits = (1000 + spread).expand(1, 4000, VOCAB)
    draws = unmasking.propose_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    top = int((draws == VOCAB - 1).sum())
    expected = 4000 * torch.softmax(spread, 0)[-1].item()  # about 94
    assert abs(top - expected) < 4 * expected**0.5 and int((draws == 0).sum()) < 20


def test_tiny_temperature_is_the_greedy_choice():
    logits = torch.randn(2, 30, VOCAB, generator=torch.Generator().manual_seed(0))
    draws = unmasking.propose_tokens(logits, 1e-300, None, None, torch.Generator().manual_seed(1))
    assert torch.equal(draws, logits.argmax(-1))


# --- item 4: transformers calling forms ---------------------------------------------------------------------------


def test_a_plain_generation_config_works_and_matches_the_keyword_call():
    m, x = model(), prompts()
    plain = m.generate(x, generation_config=GenerationConfig(max_new_tokens=8))
    assert torch.equal(plain, m.generate(x, max_new_tokens=8))
    sampled = m.generate(
        x, generation_config=GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(
        sampled, m.generate(x, max_new_tokens=8, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(0))
    )


@pytest.mark.parametrize(
    "field", ["num_beams", "repetition_penalty", "output_attentions", "token_healing", "early_stopping"]
)
def test_a_plain_generation_config_with_a_field_diffusion_cannot_honour_is_refused_by_name(field):
    value = {"num_beams": 2, "repetition_penalty": 1.3}.get(field, True)
    with pytest.raises(ValueError, match=f"`{field}`"):
        model().generate(prompts(), generation_config=GenerationConfig(max_new_tokens=8, **{field: value}))


def test_saved_generation_config_loads_with_plain_transformers(tmp_path):
    DiffusionGenerationConfig(cache_implementation="dual", threshold=0.9, max_new_tokens=8, block_length=4) \
        .save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert "cache_implementation" not in saved and saved[SAVED_CACHE_KEY] == "dual"
    plain = GenerationConfig.from_pretrained(tmp_path)  # transformers' own validation passes
    ours = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert (ours.cache_implementation, ours.cache_mode, ours.threshold) == ("dual", "dual", 0.9)
    # the plain-loaded config carries the cache kind into generate
    m, x = model(), prompts()
    assert torch.equal(
        m.generate(x, generation_config=plain), m.generate(x, generation_config=ours)
    )
    assert torch.equal(
        m.generate(x, generation_config=ours), m.generate(x, cache_implementation="dual", threshold=0.9, **GEN)
    )


def test_old_folders_with_cache_implementation_dual_still_load(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"cache_implementation": "dual", "use_cache": True, "max_new_tokens": 8, "block_length": 4})
    )
    assert DiffusionGenerationConfig.from_pretrained(tmp_path).cache_mode == "dual"


def test_every_transformers_generation_field_is_honoured_refused_or_documented():
    fields = {name for name in vars(GenerationConfig()) if not name.startswith("_")} | {"_from_model_config"}
    unclassified = sorted(fields - set(FIELD_RULES) - set(HARMLESS_FIELDS))
    assert not unclassified, f"GenerationConfig fields with no rule and no documented reason: {unclassified}"
    table = (Path(__file__).parents[1] / "docs" / "generation.md").read_text()
    missing = [name for name in sorted(fields) if f"`{name}`" not in table]
    assert not missing, f"docs/generation.md's GenerationConfig table lacks {missing}"


@pytest.mark.parametrize("field", sorted(set(AR_ONLY_FIELDS) | set(NOT_RETURNED_FIELDS)))
def test_each_refused_field_is_named(field):
    bad = {"speculation_type": "dflash", "cache_config": {"x": 1}, "max_cache_len": 64, "decoder_start_token_id": 3,
           "prefill_chunk_size": 4, "continuous_batching_config": {"x": 1}}.get(field, 2)
    bad = True if AR_ONLY_FIELDS.get(field, NOT_RETURNED_FIELDS.get(field))[-1] is False else bad
    calls, handle = counting(model())
    try:
        with pytest.raises(ValueError, match=f"`{field}`"):
            model().diffusion_generate(prompts(), **{field: bad}, **GEN)
    finally:
        handle.remove()
    assert not calls


def test_renormalize_logits_changes_nothing_because_confidences_are_normalised():
    m, x = model(), prompts()
    assert torch.equal(m.diffusion_generate(x, renormalize_logits=True, threshold=0.5, **GEN),
                       m.diffusion_generate(x, threshold=0.5, **GEN))


@pytest.mark.parametrize(
    "decoding",
    [dict(), dict(threshold=0.9, cache_implementation="dual"), dict(factor=1.0, cache_implementation="prefix"),
     dict(temperature=1.0, cfg_scale=1.0), dict(credit_alpha=0.7, threshold=0.9, cont_weight=0.3)],
    ids=["reference", "dual", "prefix", "sampling_cfg", "credit_smoothing"],
)
def test_max_time_zero_fills_the_whole_canvas_in_one_forward(decoding):
    m, x = model(), prompts()
    out = m.diffusion_generate(
        x, max_time=0.0, return_dict_in_generate=True, generator=torch.Generator().manual_seed(0),
        max_new_tokens=12, block_length=4, **decoding,
    )
    assert_valid(out, x, max_new_tokens=12)
    assert out.nfe.tolist() == [1, 1]  # three blocks, one forward: the budget was spent before the first
    assert (out.unmask_step == 0).all()


def test_max_time_ends_refinement_early_and_honours_stops():
    m, x = model(), prompts()
    full = m.diffusion_generate(x, return_dict_in_generate=True, **GEN)
    assert full.nfe.tolist() == [8, 8]
    eos = int(full.sequences[0, 5])  # a token the single forward of the timed call may well commit too
    timed = m.diffusion_generate(
        x, max_time=0.0, return_dict_in_generate=True, stop_at_eos=True, eos_token_id=eos, pad_token_id=PAD, **GEN
    )
    assert (timed.nfe == 1).all() and not (timed.sequences == MASK).any()
    for row in range(2):  # a row that holds the EOS is padded after its first one
        generated = timed.sequences[row, 5:].tolist()
        if eos in generated:
            cut = generated.index(eos) + 1
            assert all(token == PAD for token in generated[cut:])


def test_max_time_is_checked_like_a_config_field():
    with pytest.raises(ValueError, match="`max_time`=-1"):
        model().diffusion_generate(prompts(), max_time=-1, **GEN)
    with pytest.raises(TypeError, match="`max_time`='1'"):
        model().diffusion_generate(prompts(), max_time="1", **GEN)
    out = model().diffusion_generate(prompts(), max_time=3600.0, return_dict_in_generate=True, **GEN)
    assert out.nfe.tolist() == [8, 8]  # an ample budget changes nothing


# --- item 5: wrong types, devices, shapes, extreme values ---------------------------------------------------------


class NoEnd:
    def put(self, value):
        pass


def returns_none(input_ids, scores):
    return None


def returns_narrow(input_ids, scores):
    return scores[:, :3]


def criterion_none(input_ids, scores, **kwargs):
    return None


def criterion_wide(input_ids, scores, **kwargs):
    return torch.ones(5, dtype=torch.bool)


CASES = {
    "generator_str_sampling": (dict(generator="seed", temperature=1.0), TypeError, "generator='seed'"),
    "generator_str_random": (dict(generator="seed", remasking="random"), TypeError, "generator='seed'"),
    "generator_int": (dict(generator=3), TypeError, "generator=3"),
    "streamer_int": (dict(streamer=3), TypeError, "streamer=3"),
    "streamer_without_end": (dict(streamer=NoEnd()), TypeError, "streamer=.*end()"),
    "generation_config_dict": (dict(generation_config={"max_new_tokens": 8}), TypeError, "generation_config="),
    "generation_config_str": (dict(generation_config="fast"), TypeError, "generation_config='fast'"),
    "tokenizer_str_with_stop_strings": (dict(tokenizer="tok", stop_strings=["a"]), TypeError, "tokenizer='tok'"),
    "token_type_ids_str": (dict(token_type_ids="abc"), TypeError, "token_type_ids"),
    "token_type_ids_wrong_shape": (dict(token_type_ids=torch.zeros(3, 3, dtype=torch.long)), ValueError,
                                   "token_type_ids"),
    "processor_returns_none": (dict(logits_processor=[returns_none]), ValueError, "logits_processor returned"),
    "processor_wrong_shape": (dict(logits_processor=[returns_narrow]), ValueError, "logits_processor returned"),
    "criterion_returns_none": (dict(stopping_criteria=[criterion_none]), ValueError, "stopping criterion"),
    "criterion_wrong_shape": (dict(stopping_criteria=[criterion_wide]), ValueError, "stopping criterion"),
    "num_return_sequences_2_40": (dict(num_return_sequences=2**40), ValueError, "num_return_sequences=1099511627776"),
    "input_ids_meta": (dict(input_ids="meta"), ValueError, "input_ids is on the meta device"),
    "attention_mask_meta": (dict(attention_mask="meta"), ValueError, "attention_mask is on the meta device"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_arguments_raise_naming_them(case):
    kwargs, error, message = CASES[case]
    kwargs = dict(kwargs)
    x = prompts()
    if kwargs.pop("input_ids", None) == "meta":
        x = x.to("meta")
    if kwargs.get("attention_mask") == "meta":
        kwargs["attention_mask"] = torch.ones(x.shape, dtype=torch.long, device="meta")
    m = model()
    calls, handle = counting(m)
    try:
        with time_limit(20), pytest.raises(error, match=message):
            m.generate(x, **GEN, **kwargs)
    finally:
        handle.remove()
    assert not calls or "processor" in case or "criterion" in case  # those are found by calling them


@pytest.mark.parametrize(
    ("prefix", "target", "kwargs", "message"),
    [
        ([2**70], [3], {}, "prefix_ids holds token id 1180591620717411303424"),
        ([1], [-(2**70)], {}, "target_ids holds token id"),
        (torch.tensor([1, 2], device="meta"), [3], {}, "prefix_ids is on the meta device"),
        ([1], [2, 3], dict(batch_size=2**40, mc_samples=2**40), "batch_size=1099511627776"),
        ([1], [2, 3], dict(generator="seed"), "generator='seed'"),
    ],
    ids=["id_2_70", "id_minus_2_70", "meta", "batch_2_40", "generator_str"],
)
def test_wrong_loglikelihood_arguments_raise_naming_them(prefix, target, kwargs, message):
    m = model()
    calls, handle = counting(m)
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            m.diffusion_loglikelihood(prefix, target, **{"mc_samples": 4, "batch_size": 4, **kwargs})
    finally:
        handle.remove()
    assert not calls


def test_valid_hooks_are_accepted():
    m, x = model(), prompts()
    tokenizer = tiny_tokenizer()
    out = m.generate(
        x, token_type_ids=torch.zeros_like(x), tokenizer=tokenizer, stop_strings=["zzzz"], pad_token_id=PAD,
        stopping_criteria=StoppingCriteriaList([lambda ids, scores, **kw: torch.zeros(ids.shape[0], dtype=torch.bool)]),
        logits_processor=LogitsProcessorList([lambda ids, scores: scores]), **GEN,
    )
    assert_valid(out, x)


# --- property-based: wrong-typed arguments ----------------------------------------------------------------------


class Streamer:
    def put(self, value):
        pass

    def end(self):
        pass


# Each argument: (value, valid) pairs. A draw sets one or two arguments; valid draws must succeed, the others must
# raise a TypeError / ValueError naming one of the invalid arguments.
ARGUMENTS = {
    "generator": [(None, True), (torch.Generator().manual_seed(0), True), ("seed", False), (3, False), ([1], False)],
    "streamer": [(None, True), (Streamer(), True), (3, False), (NoEnd(), False), ("s", False)],
    "generation_config": [(None, True), (GenerationConfig(max_new_tokens=8), True),
                          (DiffusionGenerationConfig(max_new_tokens=8, block_length=4), True),
                          ({"max_new_tokens": 8}, False), ("cfg", False), (3, False)],
    "token_type_ids": [(None, True), ("zeros", True), ("abc", False), ([0, 0], False), ("ones", False),
                       ("wide", False)],
    "logits_processor": [(None, True), ([lambda i, s: s], True), ([returns_none], False), ([returns_narrow], False),
                         (3, False), ([3], False)],
    "num_return_sequences": [(1, True), (2, True), (2**40, False), (2**70, False), (0, False), (2.0, False)],
    "max_time": [(None, True), (0.0, True), (3600, True), (-1.0, False), (float("nan"), False), ("1", False)],
    "cfg_scale": [(0.0, True), (1.0, True), (1e300, False), (float("inf"), False)],
    "temperature": [(0.0, True), (1e-300, True), (1e300, True), (float("nan"), False), (-1.0, False)],
    "output_attentions": [(None, True), (False, True), (True, False)],
    "remove_invalid_values": [(None, True), (True, True), ("yes", False)],
    "input_ids": [("ok", True), ("meta", False), ("float", False), ("list", False)],
}


@st.composite
def argument_draws(draw):
    names = draw(st.lists(st.sampled_from(sorted(ARGUMENTS)), min_size=1, max_size=2, unique=True))
    return {name: draw(st.sampled_from(ARGUMENTS[name])) for name in names}


def materialize(name, value, x):
    if name == "token_type_ids" and isinstance(value, str) and value != "abc":
        return {"zeros": torch.zeros_like(x), "ones": torch.ones_like(x), "wide": torch.zeros(2, 9, dtype=x.dtype)}[
            value
        ]
    return value


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(draws=argument_draws())
def test_wrong_typed_arguments_succeed_when_valid_and_raise_naming_them_otherwise(draws):
    m, x = model(), prompts()
    kwargs = {}
    for name, (value, _) in draws.items():
        if name == "input_ids":
            x = {"ok": x, "meta": x.to("meta"), "float": x.float(), "list": x.tolist()}[value]
        else:
            kwargs[name] = materialize(name, value, x if isinstance(x, torch.Tensor) else prompts())
    invalid = [name for name, (_, valid) in draws.items() if not valid]
    if "generation_config" not in kwargs or kwargs["generation_config"] is None:
        kwargs.update(GEN)
    else:
        kwargs.setdefault("block_length", 4)
    try:
        with time_limit(20):
            out = m.generate(x, **kwargs)
    except (TypeError, ValueError) as err:
        assert invalid, f"a valid call raised: {err!r}"
        assert any(name in str(err) for name in invalid), f"{err!r} names none of {invalid}"
        return
    assert not invalid, f"an invalid call succeeded: {invalid}"
    copies = kwargs.get("num_return_sequences", 1)
    assert out.shape == (2 * copies, 13) and not (out == MASK).any()


LOGLIK_ARGUMENTS = {
    "prefix_ids": [([1, 2], True), ([], True), ([2**70], False), ([-(2**63) - 1], False), ("meta", False),
                   (torch.tensor([1.5]), False)],
    "target_ids": [([3, 4], True), (torch.tensor([[3, 4]]), True), ([2**64], False), ([], False), ("meta", False)],
    "cfg_scale": [(0.0, True), (2.0, True), (1e300, False), (float("nan"), False), ("1", False)],
    "batch_size": [(4, True), (2**40, False), (2**70, False), (True, False)],
    "generator": [(None, True), (torch.Generator().manual_seed(0), True), ("seed", False)],
    "mask_token_id": [(None, True), (MASK, True), (2**70, False), (126.0, False)],
}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(draws=st.lists(st.sampled_from(sorted(LOGLIK_ARGUMENTS)), min_size=1, max_size=2, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: st.sampled_from(LOGLIK_ARGUMENTS[name]) for name in names})
))
def test_loglikelihood_arguments_succeed_when_valid_and_raise_naming_them_otherwise(draws):
    kwargs = {"prefix_ids": [1, 2], "target_ids": [3, 4], "mc_samples": 4, "batch_size": 4}
    for name, (value, _) in draws.items():
        kwargs[name] = torch.tensor([1, 2], device="meta") if value == "meta" else value
    if kwargs["batch_size"] != 4 and not isinstance(kwargs["batch_size"], bool):
        kwargs["mc_samples"] = kwargs["batch_size"]
    invalid = [name for name, (_, valid) in draws.items() if not valid]
    try:
        with time_limit(20):
            score = model().diffusion_loglikelihood(**kwargs)
    except (TypeError, ValueError) as err:
        assert invalid, f"a valid call raised: {err!r}"
        assert any(name in str(err) for name in invalid), f"{err!r} names none of {invalid}"
        return
    assert not invalid, f"an invalid call succeeded: {invalid}"
    assert torch.isfinite(score) and score.item() <= 0
