"""Issue 13 (items 1-4, 6): decoding always terminates with no mask token left, and bad input to `diffusion_generate`
/ `generate` / `diffusion_loglikelihood` gets a `ValueError` / `TypeError` naming the argument before any forward.

One test per reported case, then bounded property-based searches (hypothesis, fixed example budget, a wall-clock
guard per example so a hang fails instead of stalling the suite).
"""

import math

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from transformers import LogitsProcessor, LogitsProcessorList

from modeling_llada_moe import generation_utils, unmasking


MASK, PAD, VOCAB = 126, 120, 128
GEN = dict(max_new_tokens=8, block_length=4)


_MODELS = {}


def model_for(tied: bool):
    """Tiny models, built once: a random one and one with `tie_word_embeddings=True`, whose mask token's input
    embedding is its own output row, so left alone it proposes the mask token everywhere."""
    if tied not in _MODELS:
        _MODELS[tied] = tiny_model(seed=0, tie_word_embeddings=tied)
    return _MODELS[tied]


def prompts(batch=2, length=6, seed=0):
    return torch.randint(0, PAD, (batch, length), generator=torch.Generator().manual_seed(seed))


def counting(model):
    """A list that gets one entry per forward of `model` (remove the hook with `.handle.remove()`)."""
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def assert_valid(out, prompt, num_return_sequences=1, max_new_tokens=8):
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape == (prompt.shape[0] * num_return_sequences, prompt.shape[1] + max_new_tokens)
    assert not (sequences == MASK).any(), "a mask token was left in the output"
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt.repeat_interleave(num_return_sequences, 0))
    assert int(sequences.min()) >= 0 and int(sequences.max()) < VOCAB


# --- item 1: decoding terminates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decoding",
    [dict(threshold=0.9), dict(factor=1.0), dict(threshold=0.9, cache_implementation="dual"),
     dict(factor=1.0, cache_implementation="prefix"), dict(threshold=0.9, cfg_scale=1.0)],
    ids=["threshold", "factor", "dual_cache", "prefix_cache", "cfg"],
)
def test_tied_embedding_model_terminates_with_no_mask_left(decoding):
    model, x = model_for(tied=True), prompts()
    with time_limit(20):
        out = model.diffusion_generate(x, return_dict_in_generate=True, **GEN, **decoding)
    assert_valid(out, x)
    assert (out.nfe <= 8).all()  # at least one token per forward


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cfg_scale=float("inf"), factor=1.0), "cfg_scale"),
        (dict(cfg_scale=float("inf"), threshold=0.9), "cfg_scale"),
        (dict(suppress_tokens=[t for t in range(VOCAB) if t != MASK], threshold=0.9), "suppress_tokens"),
        (dict(confidence_suppress_tokens=list(range(VOCAB)), threshold=0.9), "confidence_suppress_tokens"),
        (dict(suppress_tokens=list(range(64)), confidence_suppress_tokens=list(range(64, VOCAB)), factor=1.0),
         "cover the whole vocabulary"),
    ],
    ids=["cfg_inf_factor", "cfg_inf_threshold", "suppress_all", "confidence_suppress_all", "union_covers"],
)
def test_non_finite_confidences_are_rejected_before_any_forward(kwargs, message):
    model = model_for(tied=False)
    calls, handle = counting(model)
    try:
        with time_limit(20), pytest.raises(ValueError, match=message):
            model.diffusion_generate(prompts(), **GEN, **kwargs)
    finally:
        handle.remove()
    assert not calls


class SuppressEverything(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("-inf"))


class NaNLogits(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("nan"))


@pytest.mark.parametrize("processor", [SuppressEverything(), NaNLogits()], ids=["all_neg_inf", "nan"])
@pytest.mark.parametrize(
    "decoding", [dict(threshold=0.9), dict(factor=1.0), dict()], ids=["threshold", "factor", "quota"]
)
def test_logits_with_no_token_left_raise_instead_of_looping(processor, decoding):
    model = model_for(tied=False)
    with time_limit(20), pytest.raises(ValueError, match="no token left|NaN"):
        model.diffusion_generate(prompts(), logits_processor=LogitsProcessorList([processor]), **GEN, **decoding)


def test_forward_cap_commits_the_rest_of_a_block_when_the_rule_commits_nothing(monkeypatch):
    # A rule that never commits (what NaN confidences once did): the cap still ends every block.
    never = lambda scores, candidates, threshold: candidates & False  # noqa: E731
    monkeypatch.setattr(unmasking, "select_by_threshold", never)
    model, x = model_for(tied=False), prompts()
    with time_limit(20):
        out = model.diffusion_generate(x, threshold=0.9, return_dict_in_generate=True, **GEN)
    assert_valid(out, x)
    cap = GEN["block_length"] + generation_utils.FORWARD_CAP_MARGIN
    assert out.nfe.tolist() == [2 * cap, 2 * cap]


def test_huge_finite_cfg_scale_still_fills_the_canvas():
    # The random model's conditional and unconditional logits differ by less than 1, so 1e30 times that stays finite
    # in float32: the call must decode. A scale past float32's range is refused before any forward.
    model, x = model_for(tied=False), prompts()
    with time_limit(20):
        out = model.diffusion_generate(x, cfg_scale=1e30, threshold=0.9, return_dict_in_generate=True, **GEN)
    assert_valid(out, x)
    with pytest.raises(ValueError, match=r"cfg_scale=1e\+300 exceeds the largest torch.float32 value"):
        model.diffusion_generate(x, cfg_scale=1e300, threshold=0.9, **GEN)


# --- item 2: the mask token is never proposed --------------------------------------------------------------------


def test_greedy_decoding_of_the_tied_model_leaves_no_mask():
    model, x = model_for(tied=True), prompts()
    assert_valid(model.diffusion_generate(x, **GEN), x)


def test_sampling_never_commits_the_mask_token():
    model, x = model_for(tied=True), prompts(4, 6, seed=3)
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        assert_valid(model.diffusion_generate(x, temperature=1.0, generator=generator, **GEN), x)


def test_mask_token_in_the_prompt_is_rejected():
    model, x = model_for(tied=False), prompts()
    x[1, 2] = MASK
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] is the mask token"):
        model.diffusion_generate(x, **GEN)
    padded = prompts()
    padded[0, 0] = MASK
    mask = torch.ones_like(padded)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="mask token"):
        model.diffusion_generate(padded, attention_mask=mask, **GEN)


# --- items 3, 4: validation at the generate boundary -------------------------------------------------------------


def test_input_ids_of_a_non_integer_dtype_raise_type_error():
    model, x = model_for(tied=False), prompts()
    for dtype in (torch.float32, torch.int16, torch.bool):
        with pytest.raises(TypeError, match=rf"input_ids has dtype {dtype}"):
            model.diffusion_generate(x.to(dtype), **GEN)
        with pytest.raises(TypeError, match="input_ids"):
            model.generate(x.to(dtype), **GEN)
    with pytest.raises(TypeError, match="input_ids"):
        model.diffusion_generate(x.tolist(), **GEN)
    assert_valid(model.diffusion_generate(x.int(), **GEN), x.int())  # int32 ids are fine


@pytest.mark.parametrize("token", [-1, VOCAB, 10**6])
def test_token_ids_outside_the_vocabulary_raise_value_error(token):
    model, x = model_for(tied=False), prompts()
    x[0, 3] = token
    with pytest.raises(ValueError, match=rf"token id {token}, outside the vocabulary \[0, {VOCAB}\)"):
        model.diffusion_generate(x, **GEN)


BAD_FIELDS = {
    "suppress_outside_vocab": (dict(suppress_tokens=[133]), ValueError, r"suppress_tokens=\[133\]"),
    "confidence_suppress_outside_vocab": (dict(confidence_suppress_tokens=[500]), ValueError, "outside the vocab"),
    "suppress_negative": (dict(suppress_tokens=[-3]), ValueError, r"suppress_tokens=\[-3\]"),
    "more_steps_than_tokens": (dict(steps=9), ValueError, "`steps`=9.*at most max_new_tokens=8"),
    "suppress_not_a_list": (dict(suppress_tokens="5"), TypeError, "suppress_tokens"),
    "temperature_str": (dict(temperature="0.5"), TypeError, "`temperature`='0.5'"),
    "temperature_nan": (dict(temperature=float("nan")), ValueError, "`temperature`=nan"),
    "temperature_inf": (dict(temperature=float("inf")), ValueError, "`temperature`=inf"),
    "cfg_nan": (dict(cfg_scale=float("nan")), ValueError, "`cfg_scale`=nan"),
    "cfg_inf": (dict(cfg_scale=float("inf")), ValueError, "`cfg_scale`=inf"),
    "cfg_str": (dict(cfg_scale="1"), TypeError, "`cfg_scale`='1'"),
    "top_p_above_one": (dict(temperature=1.0, top_p=1.5), ValueError, "`top_p`=1.5"),
    "top_p_zero": (dict(temperature=1.0, top_p=0.0), ValueError, "`top_p`=0.0"),
    "top_k_float": (dict(temperature=1.0, top_k=2.0), TypeError, "`top_k`=2.0"),
    "threshold_nan": (dict(threshold=float("nan")), ValueError, "`threshold`=nan"),
    "factor_inf": (dict(factor=float("inf")), ValueError, "`factor`=inf"),
    "factor_str": (dict(factor="1"), TypeError, "`factor`='1'"),
    "max_new_tokens_str": (dict(max_new_tokens="8"), TypeError, "`max_new_tokens`='8'"),
    "block_length_bool": (dict(block_length=True), TypeError, "`block_length`=True"),
    "mask_token_float": (dict(mask_token_id=126.5), TypeError, "`mask_token_id`=126.5"),
    "mask_token_bool": (dict(mask_token_id=True), TypeError, "`mask_token_id`=True"),
    "pad_outside_vocab": (dict(pad_token_id=500), ValueError, "pad_token_id=500"),
    "eos_outside_vocab": (dict(eos_token_id=[120, 999]), ValueError, "eos_token_id=999"),
    "stop_strings_empty": (dict(stop_strings=""), ValueError, "`stop_strings`"),
    "stop_strings_int": (dict(stop_strings=[5]), ValueError, r"`stop_strings`=\[5\]"),
    "stop_strings_empty_item": (dict(stop_strings=["x", ""]), ValueError, "non-empty"),
    "stop_at_eos_str": (dict(stop_at_eos="no"), TypeError, "`stop_at_eos`='no'"),
    "stop_at_eos_int": (dict(stop_at_eos=1), TypeError, "`stop_at_eos`=1"),
    "output_history_str": (dict(output_history="yes"), TypeError, "`output_history`"),
    "return_dict_int": (dict(return_dict_in_generate=0), TypeError, "`return_dict_in_generate`=0"),
    "do_sample_str": (dict(do_sample="False"), TypeError, "`do_sample`"),
    "use_cache_int": (dict(use_cache=1), ValueError, "`use_cache`=1"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_bad_generation_fields_raise_naming_the_field_before_any_forward(case):
    model = model_for(tied=False)
    kwargs, error, message = BAD_FIELDS[case]
    calls, handle = counting(model)
    try:
        with time_limit(20), pytest.raises(error, match=message):
            model.diffusion_generate(prompts(), **{**GEN, **kwargs})
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize(
    ("values", "error"),
    [(2, ValueError), (-1, ValueError), (0.5, ValueError), ("list", TypeError)],
    ids=["twos", "minus_ones", "halves", "list"],
)
def test_attention_mask_must_hold_only_zeros_and_ones(values, error):
    model, x = model_for(tied=False), prompts()
    mask = torch.ones_like(x).tolist() if values == "list" else torch.full(x.shape, values)
    calls, handle = counting(model)
    try:
        with pytest.raises(error, match="attention_mask"):
            model.diffusion_generate(x, attention_mask=mask, **GEN)
    finally:
        handle.remove()
    assert not calls
    float_mask = torch.ones(x.shape, dtype=torch.float32)  # 0.0 / 1.0 floats are 0 / 1
    assert_valid(model.diffusion_generate(x, attention_mask=float_mask, **GEN), x)


def test_stop_strings_are_checked_before_the_first_block(tmp_path):
    from conftest import tiny_tokenizer

    model, tokenizer = model_for(tied=False), tiny_tokenizer()
    calls, handle = counting(model)
    try:
        for bad in ([5], "", [""], ["ok", None]):
            with pytest.raises(ValueError, match="stop_strings"):
                model.diffusion_generate(prompts(), stop_strings=bad, tokenizer=tokenizer, **GEN)
    finally:
        handle.remove()
    assert not calls


# --- item 6: diffusion_loglikelihood -----------------------------------------------------------------------------


def loglik(model, prefix, target, **kwargs):
    return model.diffusion_loglikelihood(prefix, target, **{"mc_samples": 4, "batch_size": 4, **kwargs})


BAD_LOGLIK = {
    "target_outside_vocab": (([1, 2], [3, 500]), {}, ValueError, "target_ids holds token id 500"),
    "prefix_negative": (([1, -2], [3]), {}, ValueError, "prefix_ids holds token id -2"),
    "float_tensor": ((torch.tensor([1.0, 2.0]), [3]), {}, TypeError, "prefix_ids has dtype torch.float32"),
    "float_list": (([1, 2], [3.7]), {}, TypeError, "target_ids holds 3.7"),
    "bool_tensor": (([1], torch.tensor([True])), {}, TypeError, "target_ids has dtype torch.bool"),
    "two_rows": ((torch.ones(2, 3, dtype=torch.long), [3]), {}, ValueError, r"prefix_ids has shape \(2, 3\)"),
    "mask_in_target": (([1], [MASK]), {}, ValueError, "mask token"),
    "too_long": (([1] * 250, [2] * 10), {}, ValueError, "max_position_embeddings=256"),
    "cfg_inf": (([1], [2, 3]), dict(cfg_scale=float("inf")), ValueError, "cfg_scale=inf"),
    "cfg_nan": (([1], [2, 3]), dict(cfg_scale=float("nan")), ValueError, "cfg_scale=nan"),
    "cfg_negative": (([1], [2, 3]), dict(cfg_scale=-1.0), ValueError, "cfg_scale=-1.0"),
    "mc_samples_str": (([1], [2, 3]), dict(mc_samples="8"), TypeError, "mc_samples='8'"),
    "batch_size_float": (([1], [2, 3]), dict(batch_size=2.0), TypeError, "batch_size=2.0"),
    "mc_samples_zero": (([1], [2, 3]), dict(mc_samples=0), ValueError, "mc_samples=0"),
    "mask_token_float": (([1], [2, 3]), dict(mask_token_id=126.5), ValueError, "mask_token_id=126.5"),
    "generator_int": (([1], [2, 3]), dict(generator=3), TypeError, "generator=3"),
    "empty_target": (([1], []), {}, ValueError, "target_ids is empty"),
    "string_ids": (("12", [2]), {}, TypeError, "prefix_ids is a str"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOGLIK))
def test_bad_loglikelihood_inputs_raise_before_any_forward(case):
    model = model_for(tied=False)
    (prefix, target), kwargs, error, message = BAD_LOGLIK[case]
    calls, handle = counting(model)
    try:
        with pytest.raises(error, match=message):
            loglik(model, prefix, target, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_loglikelihood_takes_one_row_as_list_1d_or_1_by_t():
    model = model_for(tied=False)
    prefix, target = [5, 6, 7], [8, 9]
    scores = [
        loglik(model, p, t, generator=torch.Generator().manual_seed(0))
        for p, t in [(prefix, target), (torch.tensor(prefix), torch.tensor(target)),
                     (torch.tensor([prefix]), torch.tensor([target], dtype=torch.int32)), ([], target)]
    ]
    assert scores[0] == scores[1] == scores[2] and all(torch.isfinite(s) and s <= 0 for s in scores)


# --- property-based searches -------------------------------------------------------------------------------------

# Each field: valid values, and invalid ones (wrong type, NaN / inf, out of range or vocabulary). An example is a
# valid setting with, half the time, one or two fields replaced by invalid values.
VALID = {
    "max_new_tokens": st.sampled_from([1, 3, 4, 8]),
    "block_length": st.sampled_from([1, 2, 3, 4]),
    "steps": st.sampled_from([None, 8]),
    "temperature": st.one_of(st.just(0.0), st.floats(min_value=0.1, max_value=3.0)),
    "cfg_scale": st.sampled_from([0.0, 0.5, 2.0, 1e30]),
    "remasking": st.sampled_from(["low_confidence", "random", "margin", "entropy"]),
    "threshold": st.one_of(st.none(), st.floats(min_value=0.01, max_value=1.0)),
    "factor": st.one_of(st.none(), st.floats(min_value=0.1, max_value=4.0)),
    "cache_implementation": st.sampled_from([None, "prefix", "dual"]),
    "mask_token_id": st.sampled_from([None, MASK]),
    "suppress_tokens": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    "confidence_suppress_tokens": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    "stop_at_eos": st.booleans(),
    "num_return_sequences": st.sampled_from([1, 2]),
    "return_dict_in_generate": st.booleans(),
}
BAD_NUMBERS = st.sampled_from([float("nan"), float("inf"), -1.0, "0.5", None, [1]])
INVALID = {
    "max_new_tokens": st.sampled_from([0, -1, 2.0, "8", None]),
    "block_length": st.sampled_from([0, True, "4", 2.5]),
    "steps": st.sampled_from([0, 3.5, "4"]),
    "temperature": BAD_NUMBERS,
    "top_k": st.sampled_from([0, 2.5, "5"]),
    "top_p": st.sampled_from([0.0, 1.5, float("nan"), "0.9"]),
    "cfg_scale": BAD_NUMBERS,
    "remasking": st.sampled_from(["best", None, 1]),
    "threshold": st.sampled_from([0.0, 1.5, float("nan"), float("inf"), "0.9"]),
    "factor": st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1"]),
    "cache_implementation": st.sampled_from(["full", 1]),
    "mask_token_id": st.sampled_from([126.5, -1, VOCAB, True, PAD]),
    "suppress_tokens": st.sampled_from([[MASK], [t for t in range(VOCAB) if t != MASK], "5", [True], [-1], [VOCAB]]),
    "confidence_suppress_tokens": st.sampled_from([list(range(VOCAB)), [VOCAB + 3], [2.0]]),
    "stop_at_eos": st.sampled_from(["no", 1, None]),
    "stop_strings": st.sampled_from(["", [5], [""]]),
    "num_return_sequences": st.sampled_from([0, "2", 1.0]),
    "return_dict_in_generate": st.sampled_from(["yes", 1]),
    "pad_token_id": st.sampled_from([MASK, VOCAB, -5, 1.5]),
}


@st.composite
def generation_kwargs(draw):
    """(kwargs, valid): a jointly valid setting (threshold and factor exclusive, steps a whole number per block),
    and, half the time, one or two fields replaced by invalid values (valid=False)."""
    kwargs = {name: draw(strategy) for name, strategy in VALID.items() if draw(st.booleans())}
    if kwargs.get("threshold") is not None and kwargs.get("factor") is not None:
        del kwargs["factor"]
    if kwargs.get("steps") is not None:
        kwargs["steps"] = kwargs.get("max_new_tokens", 8)  # one token per step: valid for every block split
    valid = not draw(st.booleans())
    if not valid:
        for name in draw(st.lists(st.sampled_from(sorted(INVALID)), min_size=1, max_size=2, unique=True)):
            kwargs[name] = draw(INVALID[name])
    return kwargs, valid


VALID_PROMPTS = ("ok", "int32", "padded")
PROMPTS = st.one_of(
    st.sampled_from(["ok", "ok", "ok", "int32", "padded"]),
    st.sampled_from(["float", "int16", "bool", "negative", "oov", "mask", "1d", "empty", "list"]),
)


def make_prompt(kind: str):
    x = prompts(2, 5, seed=1)
    if kind == "padded":
        return x, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return {
        "ok": x, "float": x.float(), "int16": x.short(), "bool": x.bool(), "int32": x.int(),
        "negative": x - 200, "oov": x + VOCAB, "mask": x.masked_fill(x == x[0, 0], MASK), "1d": x[0],
        "empty": x[:, :0], "list": x.tolist(),
    }[kind], None


def check_generation(model, prompt_kind, kwargs):
    """Run one call: "ok" (checked: shape, prompt kept, no mask token) or "error" (a clear ValueError / TypeError)."""
    x, attention_mask = make_prompt(prompt_kind)
    kwargs = {"max_new_tokens": 8, "block_length": 4, **kwargs}
    try:
        with time_limit(10):
            out = model.diffusion_generate(
                x, attention_mask=attention_mask, generator=torch.Generator().manual_seed(0), **kwargs
            )
    except (ValueError, TypeError) as err:
        assert "diffusion_generate" in str(err) or "DiffusionGenerationConfig" in str(err), repr(err)
        return "error"
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = kwargs["max_new_tokens"]
    assert sequences.shape == (x.shape[0] * kwargs.get("num_return_sequences", 1), x.shape[1] + new)
    assert not (sequences[:, x.shape[1]:] == MASK).any()
    assert torch.equal(sequences[:, : x.shape[1]], x.repeat_interleave(kwargs.get("num_return_sequences", 1), 0))
    return "ok"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tied=st.booleans(), prompt_kind=PROMPTS, kwargs=generation_kwargs())
def test_generation_kwargs_give_a_valid_result_or_a_clear_error(tied, prompt_kind, kwargs):
    kwargs, valid = kwargs
    outcome = check_generation(model_for(tied), prompt_kind, kwargs)
    if valid and prompt_kind in VALID_PROMPTS:
        assert outcome == "ok", (prompt_kind, kwargs)  # a valid call must decode, not be refused


IDS = st.one_of(
    st.lists(st.integers(min_value=-1, max_value=VOCAB), max_size=5),
    st.sampled_from([[1.5], [True], torch.tensor([[1, 2], [3, 4]]), torch.tensor([1.0]), [MASK], "12", [3] * 300]),
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    tied=st.booleans(), prefix=IDS, target=IDS,
    mc_samples=st.sampled_from([1, 2, 4, 0, 3, "4", 2.0]), batch_size=st.sampled_from([1, 2, 0, True]),
    cfg_scale=st.sampled_from([0.0, 1.0, float("inf"), float("nan"), -1.0, "1"]),
)
def test_loglikelihood_inputs_give_a_finite_score_or_a_clear_error(tied, prefix, target, mc_samples, batch_size,
                                                                   cfg_scale):
    model = model_for(tied)
    valid = (
        all(
            isinstance(ids, list) and ids and all(type(i) is int and 0 <= i < VOCAB and i != MASK for i in ids)
            for ids in (prefix, target)
        )
        and len(prefix) + len(target) <= 256
        and mc_samples in (1, 2, 3, 4) and type(mc_samples) is int
        and batch_size in (1, 2) and type(batch_size) is int
        and cfg_scale in (0.0, 1.0) and type(cfg_scale) is float
    )
    try:
        with time_limit(10):
            score = model.diffusion_loglikelihood(prefix, target, mc_samples, batch_size, cfg_scale)
    except (ValueError, TypeError) as err:
        assert not valid, f"a valid call was refused: {err!r}"
        assert "diffusion_loglikelihood" in str(err), repr(err)
        return
    assert score.shape == () and math.isfinite(score.item()) and score.item() <= 0
