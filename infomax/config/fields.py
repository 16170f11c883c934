"""What both configuration schemas share (the pretraining's, :mod:`infomax.config.pretrain`, and the eval's,
:mod:`infomax.config.eval`), independent of either: fields with a help text and a declared range, one loop that
checks them, and YAML 1.2 files merged with ``key=value`` overrides into a dataclass, every error a user
can cause as one :class:`ConfigError` line that names the key and the fix.

Ours rather than OmegaConf's alone: OmegaConf types and merges (we use it for that), but reads YAML 1.1,
names no valid keys and no list entries, and knows no ranges.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from ruamel.yaml import YAML, YAMLError

# The one YAML reader of config files, overrides and saved configs: YAML 1.2, where only true/false are
# booleans (YAML 1.1, which PyYAML and OmegaConf read, turns an unquoted no/off/yes/on into one, so
# run.precision=no became 'False'), 1e-3 is a float, and a key given twice is an error.
YAML_1_2 = YAML(typ="safe", pure=True)


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message is one line with the fix."""


def _f(default: Any, help: str, **check: Any) -> Any:
    """A dataclass field with a default (copied when mutable), a one-sentence help text and what
    :func:`check_fields` checks: bounds ``gt``/``ge``/``lt``/``le`` (of each entry, for a list), ``finite``,
    ``min_len`` (lists), ``choices``, and ``why``, a reason the bound's message gives."""
    metadata = {"help": help, **check}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)



def _valid_keys(node_path: str, schema: type) -> list[str]:
    """Field names of the dataclass at a dotted path ('' = top level; list indices are skipped)."""
    cls: Any = schema
    for part in filter(lambda p: p and not p.isdigit(), node_path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or fields[part].default_factory is dataclasses.MISSING:
            return []
        default = fields[part].default_factory()
        cls = type(default[0]) if isinstance(default, list) and default else type(default)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _explain(err: OmegaConfBaseException, source: str, schema: type) -> ConfigError:
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(err, "full_key", None) or "?")  # views[0].x -> views.0.x
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = ", ".join(_valid_keys(parent, schema))
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(f"unknown config key '{key}' (from {source}); valid keys {where}: {valid}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}")
    return ConfigError(f"config error at '{key}' (from {source}): {str(err).splitlines()[0]}")


def load_structured(path: str | None, overrides: Sequence[str], schema: type, check: Callable[[Any], None]) -> Any:
    """Defaults of the dataclass ``schema`` <- YAML file <- dotted overrides, checked against the schema's
    keys and types, then by ``check`` (the schema's ``validate``)."""
    cfg = OmegaConf.structured(schema)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found; pass --config configs/<name>.yaml (see configs/)")
        loaded = _load_yaml(p)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, path, schema) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value, e.g. optim.lr=0.3")
        key, value = item.split("=", 1)
        try:
            parsed = YAML_1_2.load(value)
        except YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_problem(e)}); quote it or "
                              "fix the brackets, e.g. model.head_dims=[512,128]") from None
        _check_list_index(cfg, key.strip(), item)
        try:
            OmegaConf.update(cfg, key.strip(), parsed, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'", schema) from None
    config = _expand_home(OmegaConf.to_object(cfg))
    check(config)
    return config


def _expand_home(node: Any) -> Any:
    """Every ``~`` path of a config expanded (``run.dir='~/x'``, quoted so the shell left it alone, made a
    literal ``./~`` while the summary printed ``~/x``); nested sections and lists of paths too. In place."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _expand_home(value)
        elif isinstance(value, str) and value.startswith("~"):
            setattr(node, f.name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(node, f.name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else
                                   _expand_home(v) if dataclasses.is_dataclass(v) else v for v in value])
    return node


def _check_list_index(cfg: DictConfig, key: str, item: str) -> None:
    """``data.views.5.size`` with two views names the views there are (OmegaConf's own message does not)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if not parts[i].isdigit():
            continue
        parent = ".".join(parts[:i])
        items = OmegaConf.select(cfg, parent, default=None)
        if isinstance(items, ListConfig) and int(parts[i]) >= len(items):
            n = len(items)
            numbered = {0: "none yet", 1: "numbered 0", 2: "numbered 0 and 1"}.get(n, f"numbered 0 to {n - 1}")
            example = "[{size: 16}, {size: 16}]" if parent == "data.views" else "[...]"
            raise ConfigError(f"override '{item}': '{parent}' has {n} entries ({numbered}); set an existing one, "
                              f"or give the whole list, e.g. {parent}={example}")


def yaml_problem(e: YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def _load_yaml(path: Path) -> DictConfig:
    """A config file as a mapping (:data:`YAML_1_2`, which also rejects duplicate keys)."""
    try:
        loaded = YAML_1_2.load(path)
    except YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(loaded, dict):
        kind = {list: "list", type(None): "nothing"}.get(type(loaded), type(loaded).__name__)
        raise ConfigError(f"config file '{path}' holds a {kind}, not a mapping of sections; write it as keys such "
                          "as 'optim:' with settings under them")
    return OmegaConf.create(loaded)


def require(ok: bool, key: str, message: str) -> None:
    """The one form of a refused value (both stages' configs): the key, then what it must be."""
    if not ok:
        raise ConfigError(f"bad value for config key '{key}': {message}")


_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


def _bounds_text(m: Any) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``, ... for the bounds a field declares."""
    lo, hi = (next((k for k in pair if k in m), None) for pair in (("gt", "ge"), ("lt", "le")))
    if lo and hi:
        return f"in {'(' if lo == 'gt' else '['}{m[lo]}, {m[hi]}{')' if hi == 'lt' else ']'}"
    return f"{_BOUNDS[lo or hi][0]} {m[lo or hi]}"  # type: ignore[index]


def _in_bounds(x: Any, m: Any) -> bool:
    return all(op(x, m[b]) for b, (_, op) in _BOUNDS.items() if b in m) and (not m.get("finite") or math.isfinite(x))


def check_fields(node: Any, prefix: str = "") -> None:
    """Every field's declared choices, length and bounds (its metadata, see :func:`_f`), through nested
    configs and lists of them, each refused with its dotted key."""
    for f in dataclasses.fields(node):
        key, value, m = prefix + f.name, getattr(node, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        for i, item in enumerate(value if isinstance(value, list) else []):
            if dataclasses.is_dataclass(item):
                check_fields(item, f"{key}.{i}.")
        if "choices" in m:
            require(value in m["choices"], key, f"'{value}' is not one of {', '.join(map(str, m['choices']))}")
        if "min_len" in m:
            n = m["min_len"]
            require(len(value) >= n, key, f"needs at least {n} {'entry' if n == 1 else 'entries'}, got {value}")
        if not any(b in m for b in (*_BOUNDS, "finite")):
            continue
        if isinstance(value, list):
            require(all(_in_bounds(x, m) for x in value), key, f"needs values {_bounds_text(m)}, got {value}")
        else:
            bounds = _bounds_text(m) if any(b in m for b in _BOUNDS) else ""
            finite, why = "a finite number " if m.get("finite") else "", f" ({m['why']})" if "why" in m else ""
            require(_in_bounds(value, m), key, f"must be {finite}{bounds}{why}".rstrip() + f", got {value}")


def to_yaml(c: Any) -> str:
    """A resolved config (the pretraining's, or the eval's) as YAML: run.dir/config.yaml, TensorBoard,
    the eval's report and fit keys, the job scripts."""
    return OmegaConf.to_yaml(OmegaConf.structured(c))
