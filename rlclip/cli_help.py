"""What the CLI can tell about itself: config fields (``rlclip train --help``) and objectives (``rlclip objectives``).

Both listings are generated: the fields from the config dataclasses and the
string literal under each field (its docstring, read from the source with
``ast``), the objectives from the registry and their constructor signatures.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from functools import cache
from pathlib import Path
from typing import Any

from rlclip.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@cache
def field_docs(module_file: str) -> dict[tuple[str, str], str]:
    """``(class name, field name) -> docstring`` for the dataclasses of a source file."""
    tree = ast.parse(Path(module_file).read_text())
    docs: dict[tuple[str, str], str] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt, following in zip(cls.body, cls.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[(cls.name, stmt.target.id)] = " ".join(following.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every config field as ``(dotted name, type, default, doc)``, sections expanded in order."""
    from rlclip.config import schema as config_module

    cls = cls or config_module.TrainConfig
    docs = field_docs(inspect.getsourcefile(config_module))
    rows = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows.extend(config_fields(type(default), f"{prefix}{f.name}."))
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f"{prefix}{f.name}", kind, default, docs.get((cls.__name__, f.name), "")))
    return rows


def train_help(section: str | None = None) -> str:
    """The ``rlclip train --help`` text: usage, then every field (or one section's) with default and doc."""
    rows = config_fields()
    sections = sorted({name.split(".")[0] for name, *_ in rows if "." in name})
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            raise ConfigError(f"no config section or field {section!r}; choose one of {', '.join(sections)}")
    lines = ["usage: rlclip train --config RECIPE.yaml [--section.field VALUE ...] [--help [SECTION]]", "",
             "Every field below can be set in the recipe or overridden on the command line, e.g.",
             "  rlclip train --config recipes/smoke/tiny.yaml --objective.name troll --max_steps 10", "",
             f"Recipes: {', '.join(recipe_names())}",
             "Objective settings (objective.*): see rlclip objectives.", ""]
    from rlclip.config.ranges import CHOICES, RANGES

    current = None
    for name, kind, default, doc in rows:
        head = name.split(".")[0] if "." in name else ""
        if head != current:
            current = head
            lines.append(f"{head}:" if head else "top level:")
        allowed = f", must {RANGES[name].describe()}" if name in RANGES else \
            f", one of {'|'.join(CHOICES[name])}" if name in CHOICES else ""
        lines.append(f"  --{name} ({kind}, default {default!r}{allowed})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def recipe_names() -> list[str]:
    """The shipped recipes, as paths relative to the repository (empty for an installed wheel)."""
    if not RECIPES.is_dir():
        return []
    return sorted(str(p.relative_to(RECIPES.parent)) for p in RECIPES.rglob("*.yaml"))


def objectives_listing(imports: list[str] | None = None) -> str:
    """``rlclip objectives``: each registered objective, its paper line, and its settings with defaults."""
    from rlclip.objectives.base import _REGISTRY, AGG_MODES, KL_ESTIMATORS, Objective, objective_parameters
    from rlclip.user_code import import_user_modules

    if imports:
        import_user_modules(imports)

    def settings(params: dict[str, inspect.Parameter]) -> str:
        return ", ".join(f"{key}={'(required)' if p.default is inspect.Parameter.empty else repr(p.default)}"
                         for key, p in params.items()) or "(none of its own)"

    shared = objective_parameters(Objective)
    blocks = ["Set one in a recipe as objective: {name: NAME, SETTING: VALUE} or with --objective.name NAME.",
              f"Settings every objective takes: {settings(shared)}",
              f"  agg: one of {', '.join(AGG_MODES)}; kl_estimator: one of {', '.join(KL_ESTIMATORS)}", ""]
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        own = {k: p for k, p in objective_parameters(cls).items() if k not in shared}
        blocks.append(f"{name}: {summary}\n    settings: {settings(own)}")
    return "\n".join(blocks)
