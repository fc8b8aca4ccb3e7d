"""What a sweep runs: a grid of ``fit`` overrides times seeds, parsed from the launcher's command line and named.

Pure functions: no process, no file. A setting's name is its directory under the sweep's (``lr=0.001,unroll_length=20``,
Hydra's ``key=value,key=value`` naming of a multirun's overrides); each seed of it runs in ``<setting>/seed<S>``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

# A ``fit`` argument without its dashes: ``model.lr``, ``trainer.max_steps``, ``config``.
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._+=,-]")  # '/' in an env id, spaces, quotes: '_' in a directory name
# Set by --seeds, one run per seed; a grid or --set value for it would silently be overridden.
SEED_KEY = "seed_everything"


class GridError(ValueError):
    """A bad ``--seeds``, ``--grid`` or ``--set`` value; the message names the option and the value."""


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its directory name and the ``--key=value`` arguments it adds to every seed's ``fit``."""

    name: str
    overrides: tuple[str, ...]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2,3"`` or ``"0-3"`` (or both: ``"0-2,7"``) as a list of distinct non-negative seeds, in order."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise GridError(f"--seeds: expected seeds as 0,1,2 or a range 0-3, got {text!r}")
        span = range(int(first), int(last if dash else first) + 1)
        if not span:
            raise GridError(f"--seeds: the range {part!r} is empty")
        seeds.extend(span)
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise GridError(f"--seeds: seed {repeated[0]} is given twice in {text!r}")
    return seeds


def split_values(text: str) -> list[str]:
    """Comma-separated values, a comma inside brackets or braces kept in its value (``[64,64],[128]``)."""
    values, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append("".join(current))
            current = []
        else:
            current.append(char)
    values.append("".join(current))
    return values


def parse_key_value(text: str, option: str) -> tuple[str, str]:
    """``key=value`` (``--key=value`` too) as (key, value), the key checked to be a ``fit`` argument's name."""
    key, equals, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not equals or not _KEY.match(key):
        raise GridError(f"{option}: expected KEY=VALUE with KEY a fit argument such as model.lr, got {text!r}")
    if key == SEED_KEY:
        raise GridError(f"{option}: {text!r}: the seeds are set by --seeds")
    return key, value


def parse_axis(text: str) -> tuple[str, tuple[str, ...]]:
    """One ``--grid`` value, ``model.lr=0.001,0.0003``, as (key, values)."""
    key, values_text = parse_key_value(text, "--grid")
    values = tuple(value.strip() for value in split_values(values_text))
    if any(not value for value in values):
        raise GridError(f"--grid: an empty value in {text!r} (expected KEY=V1,V2,...)")
    repeated = [value for value in values if values.count(value) > 1]
    if repeated:
        raise GridError(f"--grid: {key} value {repeated[0]!r} is given twice in {text!r}")
    return key, values


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part (``model.lr`` -> ``lr``) for names, the whole key where two would read the same."""
    last = {key: key.rsplit(".", 1)[-1] for key in keys}
    return {key: name if list(last.values()).count(name) == 1 else key for key, name in last.items()}


def setting_name(pairs: list[tuple[str, str]]) -> str:
    """``[("lr", "0.001"), ("env_id", "MinAtar/Breakout-v1")]`` -> ``lr=0.001,env_id=MinAtar_Breakout-v1``."""
    return _UNSAFE_IN_NAME.sub("_", ",".join(f"{key}={value}" for key, value in pairs))


def expand(axes: list[tuple[str, tuple[str, ...]]], fixed: list[tuple[str, str]], base_name: str) -> list[Setting]:
    """Every combination of the ``axes`` values (the first axis varies slowest), each with the ``fixed`` overrides
    (``--set``); without axes, one setting named ``base_name``.

    Raises:
        GridError: a key given twice (two axes, or an axis and ``--set``), or two settings with one name.
    """
    keys = [key for key, _ in axes] + [key for key, _ in fixed]
    repeated = [key for key in keys if keys.count(key) > 1]
    if repeated:
        raise GridError(f"--grid/--set: {repeated[0]} is given twice")
    shown = short_keys([key for key, _ in axes])
    settings = []
    for values in itertools.product(*(values for _, values in axes)):
        pairs = list(zip([key for key, _ in axes], values, strict=True))
        name = setting_name([(shown[key], value) for key, value in pairs]) if pairs else base_name
        settings.append(Setting(name, tuple(f"--{key}={value}" for key, value in [*pairs, *fixed])))
    names = [setting.name for setting in settings]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash is not None:
        raise GridError(f"--grid: two settings would share the directory {clash!r}: make their values differ in "
                        "letters, digits or . _ + = , -")
    return settings


def fit_arguments(config: str, setting: Setting, seed: int) -> list[str]:
    """One run's ``python -m lit_impala`` arguments: the config, the setting's overrides, the seed."""
    return ["fit", "--config", config, *setting.overrides, f"--{SEED_KEY}={seed}"]
