"""`apps.settings.decoding_config`: the one translation from user-facing decoding settings (flags, request fields,
lm-eval arguments, demo controls) to a `DiffusionGenerationConfig`, and its one error type."""

import pickle
import re

import pytest
from conftest import ROOT

from modeling_llada_moe import DiffusionGenerationConfig
from modeling_llada_moe.apps.settings import SettingError, decoding_config
from modeling_llada_moe.apps.tiny_task import tiny_model


def base(**fields) -> DiffusionGenerationConfig:
    return DiffusionGenerationConfig(**{"max_new_tokens": 16, "block_length": 8, **fields})


def test_the_preset_applies_first_then_the_settings_over_the_base():
    start = base(threshold=0.5, cache_implementation="prefix", mask_token_id=7)
    config = decoding_config(start, preset="dinfer", threshold=0.8)
    assert (config.threshold, config.low_threshold, config.cache_vicinity) == (0.8, 0.62, (16, 16))  # field > preset
    assert (config.cache_mode, config.max_new_tokens, config.block_length, config.mask_token_id) == ("dual", 16, 8, 7)
    assert (start.threshold, start.cache_implementation) == (0.5, "prefix")  # the base is left unchanged
    # a preset also turns off what the base turned on; no preset and no settings: a validated copy of the base
    assert decoding_config(start, preset="llada").to_dict() == DiffusionGenerationConfig.from_preset(
        "llada", max_new_tokens=16, block_length=8, mask_token_id=7
    ).to_dict()
    assert decoding_config(start).to_dict() == start.to_dict()


def test_a_model_base_is_its_generation_config():
    model = tiny_model()
    model.generation_config.threshold = 0.7
    config = decoding_config(model, steps=4, max_new_tokens=8, block_length=4)
    assert (config.threshold, config.steps, config.mask_token_id) == (0.7, 4, model.generation_config.mask_token_id)
    assert config is not model.generation_config and model.generation_config.steps is None


def test_each_front_ends_names_and_values():
    # the command line: --cache none over a cached preset drops its cache-only fields too
    config = decoding_config(base(), preset="dinfer", cache="none")
    assert (config.cache_mode, config.cache_vicinity, config.cache_warmup_steps) == (None, None, 0)
    # the server: max_tokens / max_completion_tokens name the canvas (agreeing when both are given)
    assert decoding_config(base(), max_tokens=24).max_new_tokens == 24
    assert decoding_config(base(), max_tokens=24, max_completion_tokens=24).max_new_tokens == 24
    assert decoding_config(base(max_length=40), max_completion_tokens=8).max_length is None  # the canvas wins
    # lm-eval: values as text, use_cache as a bool (or its old kind), cache_implementation="none" winning
    config = decoding_config(base(), threshold="0.9", steps="8", temperature="0", stop_at_eos="true")
    assert (config.threshold, config.steps, config.temperature, config.stop_at_eos) == (0.9, 8, 0.0, True)
    modes = {
        "prefix": dict(use_cache="true"),
        "dual": dict(use_cache=True, cache_implementation="dual"),
        None: dict(use_cache="false", cache_implementation="dual"),
        "none": dict(cache_implementation="none", use_cache="true"),
        "old": dict(use_cache="prefix"),
    }
    assert {key: decoding_config(base(), **fields).cache_mode for key, fields in modes.items()} == {
        "prefix": "prefix", "dual": "dual", None: None, "none": None, "old": "prefix"
    }
    # the demo: slider values are floats; None turns an optional setting off
    config = decoding_config(base(threshold=0.5, steps=4), max_new_tokens=32.0, block_length=8.0, threshold=None,
                             steps=None)
    assert (config.max_new_tokens, config.block_length, config.threshold, config.steps) == (32, 8, None, None)
    assert isinstance(config.max_new_tokens, int)
    # a temperature decides sampling, whatever do_sample the base wrote; stop strings as a string or a list
    sampled = decoding_config(base(do_sample=False), temperature=0.7, top_k=5, stop_strings="END")
    assert (sampled.do_sample, sampled.top_k, sampled.stop_strings) == (None, 5, ["END"])


BAD = [
    # (settings, the field the error names, words of its message)
    (dict(max_tokens=0), "max_tokens", "expected a positive integer"),  # a count
    (dict(block_length="eight"), "block_length", "expected a positive integer"),
    (dict(steps=2.5), "steps", "expected a positive integer"),
    (dict(top_k=True), "top_k", "expected a positive integer"),  # a bool is not a count
    (dict(temperature=-1), "temperature", "expected a number >= 0"),  # a number
    (dict(threshold=float("nan")), "threshold", "expected a number in (0, 1]"),
    (dict(cfg_scale="inf"), "cfg_scale", "expected a number >= 0"),
    (dict(remasking="best"), "remasking", "['low_confidence', 'random', 'margin', 'entropy']"),  # a choice
    (dict(cache="full"), "cache", "['none', 'prefix', 'dual']"),
    (dict(use_cache="maybe"), "use_cache", "['none', 'prefix', 'dual']"),
    (dict(preset="turbo"), "preset", "('llada', 'fast_dllm', 'dinfer', 'dinfer_smooth')"),
    (dict(stop_at_eos="yes"), "stop_at_eos", "expected true or false"),  # a flag
    (dict(stop_strings=["a", ""]), "stop_strings", "non-empty strings"),  # a list
    (dict(beam_width=4), "beam_width", "unknown setting"),
    # what the other settings rule out
    (dict(steps=1), "steps", "at least the number of blocks (2) and at most max_new_tokens=16"),
    (dict(max_new_tokens=4, steps=8), "steps", "at most max_new_tokens=4"),
    (dict(top_k=5), "top_k", "used only when sampling"),
    (dict(temperature=0.0, top_p=0.5), "top_p", "used only when sampling"),
    (dict(threshold=0.9, factor=1.0), "factor", "exclusive"),
    (dict(preset="dinfer", threshold=0.5), "threshold", "at least low_threshold=0.62"),
    (dict(max_tokens=8, max_completion_tokens=9), "max_tokens", "disagrees with `max_completion_tokens`=9"),
    (dict(cache_implementation="dual", use_cache="prefix"), "cache_implementation", "disagrees with `use_cache`"),
]


@pytest.mark.parametrize("settings, field, words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_value_raises_setting_error_naming_the_field(settings, field, words):
    with pytest.raises(SettingError) as info:
        decoding_config(base(), **settings)
    error = info.value
    assert isinstance(error, ValueError) and error.field == field and words in str(error)
    assert str(error).startswith(f"`{field}`={error.value!r} is invalid; ") and error.accepted in str(error)


def test_errors_show_the_value_as_read():
    error = pickle.loads(pickle.dumps(SettingError("steps", 0, "expected a positive integer")))
    assert (error.field, error.value, str(error)) == ("steps", 0, "`steps`=0 is invalid; expected a positive integer")
    with pytest.raises(SettingError, match=r"^`steps`=1 is invalid"):
        decoding_config(base(), steps=1.0)  # a slider's 1.0 is the count 1
    with pytest.raises(SettingError) as info:
        decoding_config(base(), remasking="x" * 500)
    assert len(str(info.value)) < 200 and str(info.value).startswith("`remasking`='xxx")


def test_an_invalid_base_is_the_configs_own_error():
    broken = base()
    broken.top_k = 5  # greedy with a sampling filter: no setting given explains it
    with pytest.raises(ValueError, match="DiffusionGenerationConfig: `top_k`=5") as info:
        decoding_config(broken, block_length=4)
    assert not isinstance(info.value, SettingError)
    sampling = base(temperature=0.7, top_k=5)  # valid, but not with a greedy preset
    with pytest.raises(SettingError, match="`preset`='llada' is invalid; its settings do not fit") as info:
        decoding_config(sampling, preset="llada")
    assert info.value.field == "preset"
    assert decoding_config(sampling, preset="llada", temperature=0.5).top_k == 5  # unless the settings fix it


def test_no_front_end_calls_a_private_model_method():
    sources = sorted((ROOT / "modeling_llada_moe" / "apps").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    assert len(sources) > 8
    for path in sources:
        text = path.read_text()
        assert "_resolve_generation_config" not in text, path
        # a model's private method (model._x(...), self.model._x(...)); the lm-eval class's own `self._model` is an
        # attribute, not a call of the model's methods
        assert not re.search(r"\bmodel\._\w+\(", text), path
        assert not re.search(r"\b_model\._\w+\(", text), path
