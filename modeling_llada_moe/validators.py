"""The checks every settings surface shares (model config, generation config; the app layer reuses them): what
counts as an integer, a number, a finite number. A bool is never a count, a size or a token id."""

from __future__ import annotations

import collections.abc
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huggingface_hub.dataclasses import as_validated_field
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError


def is_int(value: Any) -> bool:
    """An integer and not a bool (`True` is an `int` to Python, not a size or a token id)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (ints included, as JSON writes `1` for 1.0) and not a bool; finiteness is `is_finite`'s."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int_list(value: Any) -> bool:
    """A list or tuple of integers (token ids, a pair of sizes)."""
    return isinstance(value, (list, tuple)) and all(is_int(item) for item in value)


def is_text_list(value: Any) -> bool:
    """A list or tuple of non-empty strings."""
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value)


# What each `FieldRule.kind` accepts, and how a type error says so unless the rule words it itself.
KINDS: dict[str, tuple[collections.abc.Callable[[Any], bool], str]] = {
    "int": (is_int, "expected an integer"),
    "number": (is_number, "expected a finite number"),
    "bool": (lambda value: isinstance(value, bool), "expected True or False"),
    "int_list": (is_int_list, "expected a list of integers"),
    "text_list": (is_text_list, "expected a list of non-empty strings"),
    "any": (lambda value: True, ""),
}


@dataclass(frozen=True)
class FieldRule:
    """The declared check of one settings field.

    `kind`: a name in `KINDS` (a tuple of names: any of them) or a class the value must be an instance of; a
    "number" must also be finite, a list have `length` items when that is set. `minimum` (inclusive), `above`
    (exclusive) and `maximum` (inclusive) bound the value (every item of a list); `choices` lists the accepted values.
    `allow_none`: None is accepted. `accepted` says in words what a value must be: the `ValueError` of a value out
    of range (and of a None the rule refuses, when it has a range or choices). `type_accepted` says what its type
    must be: the `type_error` (`TypeError` unless the rule says otherwise) of a value of another type (and of a None
    the rule refuses, when nothing else bounds the value).
    """

    kind: str | tuple[str, ...] | type = "any"
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    length: int | None = None
    choices: tuple = ()
    allow_none: bool = False
    accepted: str = ""
    type_accepted: str = ""
    type_error: type[Exception] = TypeError

    def _has_bounds(self) -> bool:
        return bool(self.choices) or any(bound is not None for bound in (self.minimum, self.above, self.maximum))

    def _type_ok(self, value: Any) -> bool:
        if self.length is not None and isinstance(value, (list, tuple)) and len(value) != self.length:
            return False
        if isinstance(self.kind, type):
            return isinstance(value, self.kind)
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        return any(KINDS[kind][0](value) for kind in kinds)

    def type_problem(self, value: Any) -> tuple[type[Exception], str] | None:
        """The error a value of the wrong type (or a non-finite number) gets, as (exception class, accepted), or
        None. A None the rule refuses is left to `value_problem` when the rule bounds the value."""
        if value is None and (self.allow_none or self._has_bounds()):
            return None
        if not self._type_ok(value):
            kind = self.kind if isinstance(self.kind, str) else "any"
            return self.type_error, self.type_accepted or KINDS.get(kind, (None, "expected the declared type"))[1]
        if self.kind == "number" and not is_finite(value):
            return ValueError, "expected a finite number"
        return None

    def value_problem(self, value: Any) -> tuple[type[Exception], str] | None:
        """The `ValueError` a value of the right type outside the declared range gets, as (ValueError, accepted)."""
        if value is None:
            return None if self.allow_none else (ValueError, self.accepted)
        if self.choices and value not in self.choices:
            return ValueError, self.accepted
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if (
                (self.minimum is not None and not item >= self.minimum)
                or (self.above is not None and not item > self.above)
                or (self.maximum is not None and not item <= self.maximum)
            ):
                return ValueError, self.accepted
        return None


def is_finite(value: Any) -> bool:
    """A real number that is neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)


# --- Declared field checks for `@strict` configs (`huggingface_hub.dataclasses.strict`, as transformers 5.23's own
# configs use them): a field is declared once with its type and a validator, `rejected` / `wrong_type` word the error.




class Rejected(ValueError):
    """A field validator's verdict: the value is out of range, and `accepted` says what the field takes (the config
    names the field and the value when it reports it)."""

    def __init__(self, accepted: str):
        super().__init__(f"expected {accepted}")
        self.accepted = accepted


def rejected(owner: object, field: str, value: Any, accepted: str) -> ValueError:
    """The `ValueError` a config raises for a value out of range: its class, the field, the value, what is accepted."""
    return ValueError(f"{type(owner).__name__}: `{field}`={value!r} is invalid; expected {accepted}.")


def wrong_type(owner: object, field: str, value: Any, accepted: str) -> TypeError:
    """The `TypeError` a config raises for a value of the wrong type."""
    return TypeError(f"{type(owner).__name__}: `{field}`={value!r} has the wrong type; expected {accepted}.")


def checked(accepts: Callable[[Any], bool], accepted: str) -> Callable[..., Any]:
    """A field declaration whose values must pass `accepts` (`None` passes: the declared type says whether it is
    allowed): `size: int = checked(lambda v: v > 0, "a positive integer")(default=8)`."""

    def validator(value: Any) -> None:
        if value is not None and not accepts(value):
            raise Rejected(accepted)

    return as_validated_field(validator)


positive = checked(lambda value: value > 0, "a positive integer")


def multiple_of(step: int, why: str) -> Callable[..., Any]:
    """A positive integer divisible by `step`."""
    return checked(lambda value: value > 0 and value % step == 0, f"a positive multiple of {step} ({why})")


def number_in(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[..., Any]:
    """A finite number in the interval [low, high] (`low_open` / `high_open` exclude an end; None leaves it open)."""
    return checked(
        functools.partial(in_interval, low=low, high=high, low_open=low_open, high_open=high_open),
        interval_words(low, high, low_open=low_open, high_open=high_open),
    )


def in_interval(
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """Whether `value` is finite and inside the interval (see `number_in`)."""
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return math.isfinite(value) and above and below


def interval_words(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> str:
    """How an error says the interval: "a finite number > 0", "a finite number in [0, 1)"."""
    if low is not None and high is not None:
        return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return "a finite number" if high is None else f"a finite number {'<' if high_open else '<='} {high:g}"


def one_of(choices: typing.Collection[str]) -> Callable[..., Any]:
    """One of a fixed set of names."""
    return checked(lambda value: value in choices, f"one of {sorted(choices)}")


def must_be_null(reason: str) -> Callable[..., Any]:
    """A field kept for files that state it, whose only accepted value is null."""
    return checked(lambda value: False, f"null: {reason}")


def describe_type(annotation: Any) -> str:
    """A declared type in the words of an error: `int | None` -> "an integer or null"."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        words = [describe_type(arg) for arg in typing.get_args(annotation)]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return "a list" if item is Any else f"a list of {describe_type(item).split(' ', 1)[1]}s"
    if typing.get_origin(annotation) is typing.Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if annotation in TYPE_WORDS:
        return TYPE_WORDS[annotation]
    name = getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))
    return f"a {name}"


TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a dict",
    type(None): "null",
    None: "null",
}


def as_python(value: Any) -> Any:
    """numpy scalars as Python numbers and tuples as lists (what JSON holds), so that the declared types check them."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [as_python(item) for item in value]
    return value


def named_errors(cls: type) -> type:
    """Apply over `@strict`: a rejected value raises a plain `TypeError` / `ValueError` naming the class, the field,
    its value and what is accepted (huggingface_hub wraps both in a `StrictDataclass*Error`, which callers that
    catch `ValueError` miss). Values are read as `as_python` reads them; `attribute_map` aliases are checked under
    the field they set."""
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name: str, value: Any) -> None:
        name = type(self).attribute_map.get(name, name)
        field = type(self).__dataclass_fields__.get(name)
        if field is None:
            return strict_setattr(self, name, value)
        try:
            strict_setattr(self, name, as_python(value))
        except StrictDataclassFieldValidationError as err:
            cause = err.__cause__
            if isinstance(cause, Rejected):
                raise rejected(self, name, value, cause.accepted) from None
            if isinstance(cause, TypeError):
                raise wrong_type(self, name, value, describe_type(field.type)) from None
            raise rejected(self, name, value, str(cause)) from None

    @functools.wraps(strict_validate)
    def validate(self) -> None:
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as err:
            raise err.__cause__ from None

    cls.__setattr__ = __setattr__
    cls.validate = validate
    return cls
