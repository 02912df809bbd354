"""House rules checked on the source tree: no import circle, no file over 500 lines.

The import graph counts every import of an rlclip module, at the top of a file
or inside a function (a lazy import still ties two modules together), and
``from package import name`` counts as an import of ``package.name`` when that
is a module. A circle is a strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rlclip"
RECIPE = ROOT.parent / "recipes/smoke/tiny.yaml"
MAX_LINES = 500
LINE_LIMIT_EXEMPT: set[str] = set()  # files allowed over MAX_LINES until they are split


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``rlclip.x.y`` -> its file (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The rlclip modules that ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in modules:
                    found.add(child)
                elif source in modules:
                    found.add(source)
    found.discard(module)
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "rlclip"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from rlclip import top\n")
    (package / "top.py").write_text("from rlclip.sub import leaf\n")
    modules = module_files(package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["rlclip.sub.leaf"] == {"rlclip.top"}
    assert graph["rlclip.sub"] == {"rlclip.sub.leaf"}
    assert import_circles(graph) == [["rlclip.sub.leaf", "rlclip.top"]]


def test_no_import_circle():
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert import_circles(graph) == []


def test_no_file_over_500_lines():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in ROOT.rglob("*.py")}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LINE_LIMIT_EXEMPT}
    assert too_long == {}, f"split these along a seam: {too_long}"


def _numeric_fields() -> list[str]:
    from rlclip.cli_help import config_fields

    return [name for name, kind, _default, _doc in config_fields()
            if kind.replace(" ", "") in ("int", "float", "int|None", "float|None")]


def test_every_numeric_config_field_has_a_range_or_a_reason():
    from rlclip.config.ranges import RANGES, UNBOUNDED

    fields = set(_numeric_fields())
    assert len(fields) > 50  # the walk found the sections
    assert fields - set(RANGES) - set(UNBOUNDED) == set(), "give these a Range (or say why they have none)"
    assert set(RANGES) | set(UNBOUNDED) <= fields, "the tables name fields the schema no longer has"


@pytest.mark.parametrize("key", sorted(__import__("rlclip.config.ranges", fromlist=["RANGES"]).RANGES))
def test_every_ranged_field_rejects_a_value_outside_its_range(key):
    from rlclip.config import load_config
    from rlclip.config.ranges import RANGES
    from rlclip.errors import ConfigError

    bad = RANGES[key].outside()
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must .*, got {re.escape(str(bad))}(\.0)?(; .*)?$"):
        load_config(RECIPE, [f"{key}={bad}"])
    # the bound's own side passes (a group of one needs an estimator without a group baseline)
    load_config(RECIPE, [f"{key}={_inside(RANGES[key])}", *INSIDE_NEEDS.get(key, [])])


INSIDE_NEEDS = {"rollout.group_size": ["advantage.name=gae"]}


def _inside(allowed) -> float:
    if allowed.low is not None:
        return allowed.low + (0.5 if allowed.low_open else 0) if allowed.high is None or not allowed.low_open \
            else (allowed.low + allowed.high) / 2
    return allowed.high - (0.5 if allowed.high_open else 0)


@pytest.mark.parametrize("key", ["model.dtype", "rollout.prompt_overflow", "reward.on_error", "advantage.name",
                                 "train.optimizer", "logging.report_to", "rollout.backend", "rollout.is_mode"])
def test_every_choice_field_rejects_an_unknown_value(key):
    from rlclip.config import load_config
    from rlclip.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^unknown {re.escape(key)} 'bogus'; choose"):
        load_config(RECIPE, [f"{key}=bogus"])


def test_lora_rank_zero_is_refused_before_the_model_loads(capsys):
    from rlclip.cli import main

    assert main(["train", "--config", str(RECIPE), "--lora.enabled", "true", "--lora.r", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rlclip train: error: lora.r must be >= 1, got 0"
