"""Loading a recipe: YAML file + dotted overrides -> a validated ``TrainConfig``; and writing it back.

Parsing and type checking are OmegaConf structured configs; every OmegaConf
error becomes one ``ConfigError`` line naming the key, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlclip.config.schema import TrainConfig
from rlclip.config.validation import validate
from rlclip.errors import ConfigError
from rlclip.user_code import import_user_modules


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: the key, the bad value and the fix."""
    import re

    from omegaconf.errors import ConfigKeyError

    first = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    if isinstance(err, ConfigKeyError) and key and " not in " in first:
        guess = re.search(r"Did you mean: '([^']+)'", first)
        parent = key.rpartition(".")[0]
        hint = f"did you mean {parent + '.' if parent else ''}{guess.group(1)}?" if guess else \
            "check the spelling against the fields listed in rlclip/config.py"
        return f"unknown key {key}; {hint}"
    converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", first)
    if converted and key:
        wanted = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(
            converted.group(2), converted.group(2))
        return f"{key} must be {wanted}, got {converted.group(1)!r}; fix it in the recipe or with --{key} VALUE"
    if "is not a valid bool" in first and key:
        return f"{key} must be true or false, got {getattr(err, 'value', None)!r}; fix it in the recipe or with " \
               f"--{key} true"
    section = re.match(r"Merge error: (\w+) is not a subclass of (\w+)\. value: (.*)", first)
    if section:
        name = next((f.name for f in dataclasses.fields(TrainConfig) if f.type == section.group(2)), "section")
        return (f"{name} is a section, got the {section.group(1)} {section.group(3)!r}; give its keys, "
                f"e.g. '{name}: {{key: value}}' in the recipe or --{name}.key VALUE")
    if "AnyNode is not a ListConfig" in first and key:
        return f"{key} must be a list, got {getattr(err, 'value', None)!r}; write --{key}='[a, b]'"
    return f"{key}: {first}" if key else first


def parse_overrides(args: list[str]) -> list[str]:
    """``['--a.b', '1', '--c=2']`` -> ``['a.b=1', 'c=2']`` (OmegaConf dotlist)."""
    dotlist, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            dotlist.append(key)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            dotlist.append(f"{key}={args[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value; write {arg} VALUE")
    return dotlist


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML (optional) + dotlist overrides, typed and validated.

    Bad input raises ConfigError naming the file (with line and column for YAML
    syntax and encoding errors), the key, the bad value and the fix.
    """
    import yaml

    # ``--imports my.py`` (one file, no brackets) means a one-element list.
    overrides = [f"imports=[{o[8:]}]" if o.startswith("imports=") and not o[8:].lstrip().startswith("[") else o
                 for o in overrides or []]
    recipe = OmegaConf.create()
    if path is not None:
        where = f"recipe {path}"
        try:
            raw = Path(path).read_bytes()
            text = raw.decode("utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist; pass --config path/to/recipe.yaml") from None
        except IsADirectoryError:
            raise ConfigError(f"{where} is a directory; pass the YAML file, e.g. --config recipes/smoke/tiny.yaml") from None
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                              "save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"cannot read {where} ({err.strerror}); check the path and its permissions") from None
        try:
            recipe = OmegaConf.create(text) if text.strip() else OmegaConf.create()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML there (indentation with "
                              "spaces, ': ' after keys, matching brackets and quotes)") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_omegaconf_message(err)}") from None
        if not OmegaConf.is_dict(recipe):
            raise ConfigError(f"{where} must be a mapping of sections (model:, data:, ...), not a list; "
                              "see recipes/smoke/tiny.yaml")
        if isinstance(recipe.get("imports"), str):
            recipe.imports = [recipe.imports]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), recipe)
        recipe_objective = dict(merged.objective)
        for item in overrides:
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                                  "quote it, e.g. --key='[1, 2]'") from None
        config: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {_omegaconf_message(err)}") from None
    except TypeError as err:  # e.g. a dotted override into a list element
        raise ConfigError(f"invalid config override ({err}); edit lists such as reward.funcs in the YAML "
                          "or replace them whole: --reward.funcs='[{name: correctness}]'") from None
    import_user_modules(config.imports)
    if config.objective.get("name") != recipe_objective.get("name"):
        config.objective = _switch_objective(recipe_objective, config.objective, overrides)
    validate(config)
    return config


def _switch_objective(recipe: dict[str, Any], merged: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """When ``--objective.name`` changes the objective, drop recipe settings it does not take."""
    from rlclip.objectives.base import _REGISTRY, objective_parameters

    cls = _REGISTRY.get(merged.get("name"))
    if cls is None:
        return merged  # validate() reports the unknown name
    accepted = objective_parameters(cls)
    from_cli = {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.startswith("objective.")}
    return {k: v for k, v in merged.items() if k == "name" or k in accepted or k in from_cli or k not in recipe}


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (written to ``output_dir/config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(config)))


def flat_scalars(config: TrainConfig) -> dict[str, Any]:
    """The config as ``{"section.key": scalar}`` (non-scalars as strings), for trackers' hyper-parameters."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    return flat
