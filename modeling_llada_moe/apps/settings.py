"""The one way from user-facing decoding settings to a `DiffusionGenerationConfig`.

Every front end names the same few settings: the command line's flags (`--threshold 0.9 --cache dual`), the server's
request fields (`"max_tokens": 64, "cache": "dual"`), lm-eval's model arguments and gen_kwargs (`threshold=0.9,
use_cache=true`, values that may arrive as text) and the demo's controls (numbers from sliders). `decoding_config`
reads them, applies a preset and then them over a base config, and validates the result; a value it cannot use raises
`SettingError`, which names the setting as the user wrote it.

    config = decoding_config(model, preset="fast_dllm", max_tokens=64, threshold="0.8")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from .. import DiffusionGenerationConfig
from ..generation_config import DECODING_PRESETS, REMASKING_STRATEGIES, decoding_preset
from ..validators import is_finite, is_int


__all__ = ["CACHE_CHOICES", "DECODING_PRESETS", "REMASKING_STRATEGIES", "SettingError", "decoding_config"]

CACHE_CHOICES = ("none", "prefix", "dual")
# Config fields only a cache uses, with their "off" values: turning the cache off turns them off too.
CACHE_ONLY_FIELDS = {"cache_refresh_interval": None, "cache_vicinity": None, "cache_warmup_steps": 0}


class SettingError(ValueError):
    """A decoding setting a user gave that cannot be used: `field` is its name as the user wrote it (a request field,
    a model argument or gen_kwarg, a flag's destination), `value` what was given (read: `"0.9"` shows as 0.9) and
    `accepted` what the setting takes."""

    def __init__(self, field: str, value: Any, accepted: str):
        self.field, self.value, self.accepted = field, value, accepted
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"`{field}`={shown} is invalid; {accepted}")

    def __reduce__(self):  # pickled as its parts (a worker process hands it on)
        return type(self), (self.field, self.value, self.accepted)


# ----------------------------------------------------------------------------------------------------------------
# The settings: how each is read, what it accepts, the config fields it sets
# ----------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    """A finite number, or its text (lm-eval's command line); never a bool."""
    if isinstance(value, str):
        value = float(value)
    if not is_finite(value):
        raise ValueError(value)
    return value


def _integer(value: Any) -> int:
    """A whole number: an int, a whole float (a slider's 32.0) or its text."""
    value = _number(value)
    if value != int(value):
        raise ValueError(value)
    return int(value)


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(value)
        return value

    return read


def _flag(value: Any) -> bool:
    """True or False, or their text."""
    value = {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _cache(value: Any) -> str | bool:
    """"none", "prefix" or "dual"; `use_cache`'s True (a cache, of the config's kind) and False ("none")."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(value, bool):
        return value or "none"
    return _choice(CACHE_CHOICES)(value)


def _stops(value: Any) -> list[str] | None:
    """A non-empty string or a list of them (None or [] = no stop strings)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(stop, str) and stop for stop in stops):
        raise ValueError(value)
    return list(stops) or None


def _cache_fields(value: str | bool) -> dict[str, Any]:
    if value is True:
        return {"use_cache": True}  # the config's cache_implementation, else "prefix"
    if value == "none":
        return {"cache_implementation": None, "use_cache": False, **CACHE_ONLY_FIELDS}
    return {"cache_implementation": value, "use_cache": True}


def _merge_cache(values: list[str | bool]) -> str | bool:
    """`cache_implementation` and `use_cache` given together: "none" (or False) wins, True takes the named kind."""
    if "none" in values:
        return "none"
    kinds = {value for value in values if value is not True}
    if len(kinds) > 1:
        raise ValueError(values)
    return kinds.pop() if kinds else True


@dataclass(frozen=True)
class _Setting:
    """One user-facing setting.

    read: the given value as the config holds it; raises ValueError / TypeError when it is not one.
    ok: the read value is in range (None, where `optional`, always is: it turns the setting off).
    accepted: what it takes, said in errors; a function of the config for limits that depend on other settings.
    fields: the config fields the read value sets (default: the field of the setting's name).
    aliases: other names front ends give it (the server's `max_tokens`, lm-eval's `use_cache`).
    """

    read: Callable[[Any], Any]
    ok: Callable[[Any], bool]
    accepted: str | Callable[[DiffusionGenerationConfig], str]
    optional: bool = False
    fields: Callable[[Any], dict[str, Any]] | None = None
    aliases: tuple[str, ...] = ()
    merge: Callable[[list[Any]], Any] | None = None  # several aliases given at once; default: they must agree

    def describe(self, config: DiffusionGenerationConfig) -> str:
        return self.accepted(config) if callable(self.accepted) else self.accepted


def _length_accepted(config: DiffusionGenerationConfig) -> str:
    if is_int(config.steps) and config.steps > 0:  # the base's (a server's --steps): one token per step at most
        return f"expected a positive integer, at least steps={config.steps} (one token per step at most; lower steps)"
    return "expected a positive integer"


def _steps_accepted(config: DiffusionGenerationConfig) -> str:
    if not (is_int(config.max_new_tokens) and is_int(config.block_length) and config.block_length > 0):
        return "expected a positive integer, at most max_new_tokens (one token per step)"
    return (
        f"expected a positive integer, at least the number of blocks ({config.num_blocks}) and at most max_new_tokens="
        f"{config.max_new_tokens} (one token per step)"
    )


def _threshold_accepted(config: DiffusionGenerationConfig) -> str:
    floor = f", at least low_threshold={config.low_threshold}" if config.low_threshold is not None else ""
    return f"expected a number in (0, 1]{floor}; threshold and factor are exclusive parallel-decoding rules"


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


def _unit(value) -> bool:
    return 0 < value <= 1


def _any(value) -> bool:
    return True


# In the order they are applied; an error names the first setting (in this order) the others do not explain.
_SETTINGS: dict[str, _Setting] = {
    "max_new_tokens": _Setting(
        _integer, _positive, _length_accepted,
        fields=lambda v: {"max_new_tokens": v, "max_length": None},  # the canvas beats a configured total length
        aliases=("max_tokens", "max_completion_tokens"),
    ),
    "block_length": _Setting(_integer, _positive, "expected a positive integer"),
    "steps": _Setting(_integer, _positive, _steps_accepted, optional=True),
    "temperature": _Setting(
        _number, _non_negative, "expected a number >= 0 (0 = greedy, which takes no top_k or top_p)",
        fields=lambda v: {"temperature": v, "do_sample": None},  # the temperature decides: 0 greedy, > 0 sampling
    ),
    "top_k": _Setting(_integer, _positive, "expected a positive integer, used only when sampling (temperature > 0)",
                     optional=True),
    "top_p": _Setting(_number, _unit, "expected a number in (0, 1], used only when sampling (temperature > 0)",
                     optional=True),
    "cfg_scale": _Setting(_number, _non_negative, "expected a number >= 0 (0 = no guidance)"),
    "remasking": _Setting(_choice(REMASKING_STRATEGIES), _any, f"expected one of {list(REMASKING_STRATEGIES)}"),
    "threshold": _Setting(_number, _unit, _threshold_accepted, optional=True),
    "factor": _Setting(
        _number, _positive, "expected a number > 0; threshold and factor are exclusive parallel-decoding rules",
        optional=True,
    ),
    "cache": _Setting(
        _cache, _any, f"expected one of {list(CACHE_CHOICES)} (use_cache: true or false)", fields=_cache_fields,
        aliases=("cache_implementation", "use_cache"), merge=_merge_cache,
    ),
    "stop_at_eos": _Setting(_flag, _any, "expected true or false"),
    "stop_strings": _Setting(_stops, _any, "expected a non-empty string or a list of non-empty strings", optional=True),
}
_NAMES = {alias: name for name, setting in _SETTINGS.items() for alias in (name, *setting.aliases)}


# ----------------------------------------------------------------------------------------------------------------
# The one translation
# ----------------------------------------------------------------------------------------------------------------


def decoding_config(base: Any, *, preset: str | None = None, **settings: Any) -> DiffusionGenerationConfig:
    """A new `DiffusionGenerationConfig`: `base` with the `preset` applied first, then `settings`, validated.

    Args:
        base: a `DiffusionGenerationConfig` (left unchanged), or a model: its `generation_config`.
        preset: a name of `DECODING_PRESETS` (llada, fast_dllm, dinfer, dinfer_smooth): its strategy fields, every
            one written out, so it also turns off what the base turned on; lengths and token ids stay the base's.
        settings: user-facing settings, each applied as given (None turns an optional one off: `threshold=None`,
            `steps=None` = one token per step); leave out what the user did not set. Names: max_new_tokens
            (aliases max_tokens, max_completion_tokens), block_length, steps, temperature, top_k, top_p, cfg_scale,
            remasking, threshold, factor, cache ("none" / "prefix" / "dual"; aliases cache_implementation and
            use_cache, which also takes true / false), stop_at_eos, stop_strings. Numbers may be given as text and
            counts as whole floats. "none" for the cache also drops the cache-only fields a preset or the base set.

    Raises:
        SettingError: naming the setting as given (an alias stays an alias) for an unknown name, a value it cannot
            read or out of its range, or one the other settings rule out (steps vs the canvas, top_k when greedy,
            threshold with factor); naming `preset` for an unknown preset.
    """
    config = base if isinstance(base, GenerationConfig) else base.generation_config
    if not isinstance(config, DiffusionGenerationConfig):
        config = DiffusionGenerationConfig.from_dict(config.to_dict())
    if preset is not None and (not isinstance(preset, str) or preset not in DECODING_PRESETS):
        raise SettingError("preset", preset, f"expected one of {tuple(DECODING_PRESETS)}")
    first = decoding_preset(preset) if preset is not None else {}
    given = _read(settings, _build(config, first, {}))
    result = _build(config, first, given)
    try:
        result.validate()
    except (ValueError, TypeError) as err:
        culprit = _culprit(config, first, given, preset)
        if culprit is None:
            raise
        if culprit == "preset":
            raise SettingError("preset", preset, f"its settings do not fit the base config ({err})") from err
        name, value, _ = given[culprit]
        raise SettingError(name, value, _SETTINGS[culprit].describe(result)) from err
    return result


def _read(settings: dict[str, Any], config: DiffusionGenerationConfig) -> dict[str, tuple[str, Any, dict]]:
    """{setting: (name given, read value, config fields)} in `_SETTINGS` order; a SettingError for a bad one."""
    by_setting: dict[str, list[tuple[str, Any]]] = {}
    for name, value in settings.items():
        if name not in _NAMES:
            raise SettingError(name, value, f"unknown setting; expected one of {sorted(_NAMES)}")
        setting = _SETTINGS[_NAMES[name]]
        try:
            read = value if value is None and setting.optional else setting.read(value)
            ok = read is None or setting.ok(read)
        except (ValueError, TypeError, OverflowError):
            ok = False
        if not ok:
            raise SettingError(name, value, setting.describe(config))
        by_setting.setdefault(_NAMES[name], []).append((name, read))
    given = {}
    for key, setting in _SETTINGS.items():
        if key not in by_setting:
            continue
        (name, value), *others = by_setting[key]
        if others:
            values = [value, *(other for _, other in others)]
            try:
                value = setting.merge(values) if setting.merge else values[0]
                ok = setting.merge is not None or all(other == value for other in values)
            except ValueError:
                ok = False
            if not ok:
                named = " and ".join(f"`{n}`={v!r}" for n, v in others)
                raise SettingError(name, value, f"it disagrees with {named}; pass one of them")
        fields = setting.fields(value) if setting.fields else {key: value}
        given[key] = (name, value, fields)
    return given


def _build(base: DiffusionGenerationConfig, first: dict[str, Any], given: dict) -> DiffusionGenerationConfig:
    """A copy of `base` with the preset's fields, then the given settings' fields (not validated)."""
    config = copy.deepcopy(base)
    for name, value in first.items():
        setattr(config, name, value)
    for _, _, fields in given.values():
        for name, value in fields.items():
            setattr(config, name, value)
    return config


def _valid(config: DiffusionGenerationConfig) -> bool:
    try:
        config.validate()
    except (ValueError, TypeError):
        return False
    return True


def _culprit(base: DiffusionGenerationConfig, first: dict, given: dict, preset: str | None) -> str | None:
    """The setting an invalid result blames: None when the base itself is invalid; "preset" when the preset does not
    fit the base; else the one setting without which the others fit (the last such), else the first whose addition
    makes them stop fitting."""
    if not _valid(_build(base, {}, {})):
        return None
    if not _valid(_build(base, first, {})):
        return "preset"
    for key in reversed(given):
        if _valid(_build(base, first, {k: v for k, v in given.items() if k != key})):
            return key
    applied = {}
    for key, value in given.items():
        applied[key] = value
        if not _valid(_build(base, first, applied)):
            return key
    return None
