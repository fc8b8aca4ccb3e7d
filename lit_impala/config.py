"""Typed configuration: the argument types of our classes are the one statement of what a value may be.

jsonargparse's restricted types (``PositiveInt``, ``ClosedUnitInterval``, ...) and ``Literal[...]`` are
checked at parse time by the CLI and shown in ``--help``; ``check_arguments`` applies the same annotations
when Python code builds the classes directly, so a notebook gets the same error as the command line.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Literal, Union

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

__all__ = [
    "ClosedUnitInterval",
    "ConfigError",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OneLineErrorParser",
    "PositiveFloat",
    "PositiveInt",
    "argument_defaults",
    "check_arguments",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line naming it and exit 2, like ``python -m lit_impala`` (argparse's
    default prints the whole usage first). The launcher's and the benchmarks' command lines."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


class ConfigError(ValueError):
    """A configuration the run cannot start with; the CLI prints its message as one line, exit code 2."""


def argument_defaults(cls: type) -> dict:
    """``{name: default}`` of ``cls.__init__``'s arguments that have one."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def check_arguments(function: Callable, arguments: dict) -> None:
    """Check ``arguments`` (``locals()`` of ``function``) against ``function``'s restricted-number and
    ``Literal`` annotations; a ``ValueError`` naming the first argument that does not fit."""
    for name, hint in typing.get_type_hints(function).items():
        if name in arguments and name != "return":
            _check(name, hint, arguments[name])


def _check(name: str, hint, value) -> None:
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        options = [option for option in options if option is not type(None)]
        if len(options) != 1:
            return  # only Optional[X] is checked here; jsonargparse checks the rest at parse time
        hint = options[0]
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name} must be one of {list(typing.get_args(hint))}, got {value!r}")
    elif _is_restricted_number(hint):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a {hint.__name__}, got {value!r}")
        try:
            hint(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a {hint.__name__}, got {value!r} ({error})") from None


def _is_restricted_number(hint) -> bool:
    # jsonargparse's restricted types subclass int or float and validate in their constructor.
    return isinstance(hint, type) and issubclass(hint, (int, float)) and hint not in (int, float, bool)
