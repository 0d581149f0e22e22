"""The checks every settings surface shares (model config, generation config; the app layer reuses them): what
counts as an integer, a number, a finite number. A bool is never a count, a size or a token id."""

from __future__ import annotations

import collections.abc
import math
import numbers
from dataclasses import dataclass
from typing import Any


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
