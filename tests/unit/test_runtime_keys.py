"""Every recipe key is honoured by both runtimes, or refused by one with a one-line reason naming the key.

The test walks the :class:`~align.config.Recipe` schema for its leaf keys (``runtime.learners``,
``rewards.*.weight``), then finds with :mod:`ast` which keys the code *reads*, in three groups:

- ``shared``: ``align/**`` and ``rewards/**`` except ``align/local.py`` and ``align/config.py`` (whose reads are
  validation; the schema's own methods called from elsewhere, e.g. ``Recipe.algorithm_spec()``, are followed);
- ``local``: ``align/local.py``;
- ``ray``: ``ray_jobs/**``.

A read is an attribute chain from the recipe to a leaf (``recipe.runtime.learners``, ``plan.recipe.learner.lr``,
``self.recipe.rollout.engine``), or from an alias of a section bound in the same function or module
(``rt = recipe.runtime`` then ``rt.learners``; ``for e in recipe.rewards`` then ``e.weight``; a parameter annotated
``list[RewardEntry]``). The recipe is any name or attribute called ``recipe``, or a name bound to what
``resolve_recipe`` / ``recipe_from_dict`` / ``load_recipe`` return. A section used whole in a way the chains cannot
follow (dumped, passed on) must be listed in :data:`WHOLE_USES`, with the keys it counts as reading and why.

Then: no key is dead; a key only Ray code reads is in ``LocalRuntime.refused`` (and the reverse); every refusal names
a key that something else reads; and every refusal fires, naming its key, when a recipe sets it.
"""

from __future__ import annotations

import ast
import types
import typing
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from align import config as config_module
from align.components import Runtime, check_runtime
from align.config import Recipe, RecipeError, recipe_from_dict
from align.local import LocalRuntime

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("shared", "local", "ray")
RECIPE_LOADERS = {"resolve_recipe", "recipe_from_dict", "load_recipe"}  # calls that return a Recipe
ALL = "*"  # in WHOLE_USES: every leaf under the section

# Whole-section uses the attribute chains cannot follow: (section path, how: a method name, or "value" when the
# section is passed on as a value) -> (the keys that counts as reading, in the group where it happens; why).
WHOLE_USES: dict[tuple[str, str], tuple[str | tuple[str, ...], str]] = {
    ("model.tiny", "model_dump"): (
        ALL, "align/build.py _tiny_cache_key: the cached tiny model's key covers every size setting"),
    ("model.sft_warmup", "model_dump"): (
        ALL, "align/build.py _tiny_cache_key: the cached tiny model's key covers the SFT warm start"),
    ("", "model_dump"): (
        (), "the whole recipe written to recipe.yaml and to the trackers' config: a record of the run, which "
            "honours no key"),
    ("rewards", "value"): (
        (), "the entries passed on (composer(list(recipe.rewards))): rewards.provider.composer reads each field, "
            "found through its `entries: list[RewardEntry]` annotation"),
    ("rewards.*", "value"): (
        (), "one entry passed on to composer([entry]) (rewards/provider.py verifier), which reads its fields"),
}


# ---------------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Schema:
    leaves: list[str] = field(default_factory=list)  # dotted leaf keys, list items as "*"
    children: dict[str, dict[str, str]] = field(default_factory=dict)  # section path -> attribute -> child path
    lists: dict[str, str] = field(default_factory=dict)  # list-of-sections path -> its item path
    sections: dict[str, type[BaseModel]] = field(default_factory=dict)  # section (or item) path -> model

    def under(self, path: str) -> list[str]:
        return [k for k in self.leaves if not path or k == path or k.startswith(path + ".")]

    def class_paths(self) -> dict[str, str]:
        out = {model.__name__: path for path, model in self.sections.items()}
        assert len(out) == len(self.sections), "a section model appears twice in the schema"
        return out


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section model inside an annotation, whether it is a list of them): ``X``, ``X | None``, ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        model, _ = _nested(args[0])
        return model, model is not None
    if origin in (typing.Union, types.UnionType):
        found = [m for m in (_nested(a) for a in args) if m[0] is not None]
        if found:
            return found[0]
    return None, False


def _walk(schema: Schema, model: type[BaseModel], prefix: str) -> None:
    schema.sections[prefix] = model
    kids = schema.children.setdefault(prefix, {})
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        kids[name] = path
        nested, is_list = _nested(info.annotation)
        if nested is None:
            schema.leaves.append(path)
        elif is_list:
            schema.lists[path] = f"{path}.*"
            _walk(schema, nested, f"{path}.*")
        else:
            _walk(schema, nested, path)


@cache
def schema() -> Schema:
    out = Schema()
    _walk(out, Recipe, "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reads, by static analysis
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Found:
    reads: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # leaf -> ["file:line"]
    whole: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))  # (path, how) -> at

    def merge(self, other: Found, at: str | None = None) -> None:
        for key, where in other.reads.items():
            self.reads[key] += [at] if at else where
        for use, where in other.whole.items():
            self.whole[use] += [at] if at else where


class Scope:
    """The reads in one function (or a module's top level), with the aliases bound in it."""

    def __init__(self, body: Sequence[ast.AST], aliases: dict[str, str], where: str,
                 params: ast.arguments | None = None) -> None:
        self.schema, self.where = schema(), where
        self.aliases = dict(aliases)
        self.nodes = list(_own_nodes(body))
        self.parents = {child: node for node in self.nodes for child in ast.iter_child_nodes(node)}
        classes = self.schema.class_paths()
        if params is not None:
            for arg in [*params.posonlyargs, *params.args, *params.kwonlyargs]:
                path = _annotation_path(arg.annotation, classes, self.schema)
                if path is not None:
                    self.aliases[arg.arg] = path
                elif arg.arg in self.aliases:
                    del self.aliases[arg.arg]  # a parameter shadows an outer alias
        for _ in range(3):  # aliases of aliases (entries -> e)
            self._bind_aliases()
        self._drop_rebound()

    def resolve(self, node: ast.AST) -> str | None:
        """The schema path an expression stands for ("" for the recipe itself), or None."""
        if isinstance(node, ast.Name):
            return "" if node.id == "recipe" else self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == "recipe":  # self.recipe, plan.recipe
                return ""
            base = self.resolve(node.value)
            return None if base is None else self.schema.children.get(base, {}).get(node.attr)
        if isinstance(node, ast.Subscript):
            base = self.resolve(node.value)
            return None if base is None else self.schema.lists.get(base)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            return "" if name in RECIPE_LOADERS else None
        return None

    def _bind(self, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, ast.Name):
            path = self.resolve(value)
            if path is not None and path not in self.schema.leaves:
                self.aliases[target.id] = path
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts, strict=True):
                self._bind(t, v)

    def _bind_item(self, target: ast.AST, source: ast.AST) -> None:
        """``for e in recipe.rewards`` / ``for i, e in enumerate(recipe.rewards)``: ``e`` is an item."""
        if _is_enumerate(source) and isinstance(target, ast.Tuple) and len(target.elts) == 2:
            target, source = target.elts[1], source.args[0]  # type: ignore[attr-defined]
        path = self.resolve(source)
        if isinstance(target, ast.Name) and path in self.schema.lists:
            self.aliases[target.id] = self.schema.lists[path]

    def _bind_aliases(self) -> None:
        for node in self.nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                self._bind(node.targets[0], node.value)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self._bind(node.target, node.value)
            elif isinstance(node, (ast.For, ast.comprehension)):
                self._bind_item(node.target, node.iter)

    def _drop_rebound(self) -> None:
        """A name also bound to something else in the scope (``node = recipe``, then ``node = getattr(node, part)``)
        is no alias."""
        for node in self.nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                pairs = _pairs(node.targets[0], node.value)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                pairs = _pairs(node.target, node.value)
            else:
                continue
            for name, value in pairs:
                if name in self.aliases and (value is None or self.resolve(value) != self.aliases[name]):
                    del self.aliases[name]

    def found(self) -> Found:
        out = Found()
        for node in self.nodes:
            if not isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)) or isinstance(node.ctx, ast.Store):
                continue
            path = self.resolve(node)
            if path is None:
                continue
            at = f"{self.where}:{getattr(node, 'lineno', '?')}"
            if path in self.schema.leaves:
                parent = self.parents.get(node)
                if not (isinstance(parent, ast.Attribute) and self.resolve(parent) is not None):
                    out.reads[path].append(at)
                continue
            how = self._whole_use(node, path)
            if how is not None:
                out.whole[(path, how)].append(at)
        return out

    def _whole_use(self, node: ast.AST, path: str) -> str | None:
        """How a section is used when not through one of its fields; None when that is a field access, an alias,
        an iteration, a presence check, or the recipe passed on (followed where it lands)."""
        parent = self.parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return None if self.resolve(parent) is not None else parent.attr  # a method: model_dump, spec, ...
        if path == "" or (isinstance(parent, ast.Subscript) and self.resolve(parent) is not None):
            return None  # the recipe passed on, or an item taken from a list (recipe.rewards[0])
        statement = self.parents.get(parent) if isinstance(parent, ast.Tuple) else parent
        if isinstance(statement, (ast.Assign, ast.AnnAssign)):  # an alias only when bound to a plain name
            target = statement.targets[0] if isinstance(statement, ast.Assign) else statement.target
            bound = [n for n, v in _pairs(target, statement.value) if v is node] if statement.value else []
            return None if bound and all(self.aliases.get(n) == path for n in bound) else "value"
        iteration = self.parents.get(parent) if parent is not None and _is_enumerate(parent) else parent
        if isinstance(iteration, (ast.For, ast.comprehension)) and path in self.schema.lists:
            return None  # its items are aliases (_bind_item)
        if isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops):
            return None
        return "value"


def _pairs(target: ast.AST, value: ast.AST) -> list[tuple[str, ast.AST | None]]:
    """(name, the value bound to it, or None when it cannot be told) for each name an assignment binds."""
    if isinstance(target, ast.Name):
        return [(target.id, value)]
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
        return [p for t, v in zip(target.elts, value.elts, strict=True) for p in _pairs(t, v)]
    return [(n.id, None) for n in ast.walk(target) if isinstance(n, ast.Name)]


def _is_enumerate(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "enumerate" \
        and len(node.args) == 1


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _own_nodes(body: Sequence[ast.AST]) -> Iterator[ast.AST]:
    """The nodes of a scope, without nested functions and classes (scopes of their own); lambdas belong to it."""
    stack = [n for n in body if not isinstance(n, SCOPES)]
    while stack:
        node = stack.pop()
        yield node
        stack += [c for c in ast.iter_child_nodes(node) if not isinstance(c, SCOPES)]


def _defs(body: Sequence[ast.AST]) -> Iterator[ast.AST]:
    """The functions and classes defined directly in a scope (not inside another function or class)."""
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, SCOPES):
            yield node
        else:
            stack += list(ast.iter_child_nodes(node))


def _annotation_path(annotation: ast.AST | None, classes: dict[str, str], schema: Schema) -> str | None:
    """``Recipe`` -> "", ``RewardEntry`` -> "rewards.*", ``list[RewardEntry]`` -> "rewards" (one schema class named
    in the annotation; unions such as ``str | Path | Recipe`` included)."""
    if annotation is None:
        return None
    names = [n.id for n in ast.walk(annotation) if isinstance(n, ast.Name) and n.id in classes]
    if len(names) != 1:
        return None
    path = classes[names[0]]
    listed = any(isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "list"
                 for n in ast.walk(annotation))
    if listed:
        return next((lst for lst, item in schema.lists.items() if item == path), None)
    return path


def _scopes(body: Sequence[ast.AST], aliases: dict[str, str], where: str) -> Iterator[Scope]:
    """A module's scopes: its top level, then every class body and function; inner ones inherit the aliases."""
    outer = Scope(body, aliases, where)
    yield outer
    for node in _defs(body):
        if isinstance(node, ast.ClassDef):
            yield from _scopes(node.body, outer.aliases, where)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = Scope(node.body, outer.aliases, where, node.args)
            yield scope
            for inner in _defs(node.body):
                yield from _scopes([inner], scope.aliases, where)


def _is_validator(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any("validator" in ast.unparse(d) for d in decorators)


@cache
def schema_methods() -> dict[tuple[str, str], Found]:
    """What each method of a schema class in ``align/config.py`` reads (``self`` bound to its section); validators
    are left out (their reads check, they do not honour)."""
    source = Path(config_module.__file__)
    tree = ast.parse(source.read_text())
    classes = schema().class_paths()
    out: dict[tuple[str, str], Found] = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef) or cls.name not in classes:
            continue
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef) and not _is_validator(fn):
                scope = Scope(fn.body, {"self": classes[cls.name]}, f"align/config.py {cls.name}.{fn.name}")
                out[(classes[cls.name], fn.name)] = scope.found()
    return out


def _expand(found: Found, seen: frozenset[tuple[str, str]] = frozenset()) -> Found:
    """Follow calls of the schema's own methods (``recipe.algorithm_spec()``) into what they read."""
    methods = schema_methods()
    out = Found()
    for key, where in found.reads.items():
        out.reads[key] += where
    for use, where in found.whole.items():
        if use in methods and use not in seen:
            out.merge(_expand(methods[use], seen | {use}), at=f"{where[0]} via {use[0] or 'recipe'}.{use[1]}()")
        elif use not in methods:
            out.whole[use] += where
    return out


def group_of(relative: str) -> str | None:
    if relative.startswith("ray_jobs/"):
        return "ray"
    if relative == "align/local.py":
        return "local"
    if relative == "align/config.py":
        return None
    if relative.startswith(("align/", "rewards/")):
        return "shared"
    return None


@cache
def analysis() -> dict[str, Found]:
    """Group -> the reads (schema methods followed) and the unresolved whole-section uses of its files."""
    out = {g: Found() for g in GROUPS}
    for package in ("align", "rewards", "ray_jobs"):
        for file in sorted((ROOT / package).rglob("*.py")):
            relative = file.relative_to(ROOT).as_posix()
            group = group_of(relative)
            if group is None:
                continue
            tree = ast.parse(file.read_text(), filename=relative)
            for scope in _scopes(tree.body, {}, relative):
                out[group].merge(_expand(scope.found()))
    return out


@cache
def reads() -> dict[str, dict[str, list[str]]]:
    """Group -> leaf key -> where it is read, with the allow-listed whole-section uses counted in."""
    out: dict[str, dict[str, list[str]]] = {}
    for group, found in analysis().items():
        keys: dict[str, list[str]] = defaultdict(list)
        for key, where in found.reads.items():
            keys[key] += where
        for (path, how), where in found.whole.items():
            if (path, how) in WHOLE_USES:
                counted = WHOLE_USES[(path, how)][0]
                for key in schema().under(path) if counted == ALL else counted:
                    keys[key] += [f"{w} ({path}.{how})" for w in where]
        out[group] = dict(keys)
    return out


def readers(key: str) -> set[str]:
    """The groups that read ``key`` (a leaf, or a section: any leaf under it)."""
    return {g for g, keys in reads().items() for leaf in schema().under(key) if leaf in keys}


def _where(group: str, key: str) -> str:
    spots = sorted({w for leaf in schema().under(key) for w in reads()[group].get(leaf, [])})
    return ", ".join(spots[:3]) + (" ..." if len(spots) > 3 else "")


def _runtimes() -> dict[str, Runtime]:
    pytest.importorskip("ray")
    from ray_jobs.runtime import RayRuntime

    return {"local": LocalRuntime(), "ray": RayRuntime()}


# ---------------------------------------------------------------------------------------------------------------
# The promise
# ---------------------------------------------------------------------------------------------------------------
def test_schema_walk_sees_every_section() -> None:
    leaves = schema().leaves
    assert len(leaves) == len(set(leaves))
    for key in ("name", "seed", "plugins", "runtime.learners", "model.tiny.hidden_size", "model.sft_warmup.steps",
                "rewards.*.weight", "credit.options", "learner.betas", "checkpoint.keep"):
        assert key in leaves, key
    assert "rewards" not in leaves and "model.tiny" not in leaves and "credit" not in leaves


def test_analysis_follows_chains_and_aliases() -> None:
    """The forms the analysis must see, on the real code (a blind spot here would make every check below vacuous)."""
    r = reads()
    assert "align/build.py" in _where("shared", "learner.lr")  # learner = recipe.learner; learner.lr
    assert "align/build.py" in _where("shared", "data.answer_regex")  # d = recipe.data
    assert "align/build.py" in _where("shared", "model.sft_warmup.eval_every")  # warm = recipe.model.sft_warmup
    assert "rewards/provider.py" in _where("shared", "rewards.*.timeout")  # for e in entries: list[RewardEntry]
    assert "rewards/provider.py" in _where("shared", "credit.options")
    assert "align/api.py" in _where("shared", "runtime.threads")  # config = resolve_recipe(...)
    assert "algorithm_spec" in _where("shared", "learner.beta")  # Recipe.algorithm_spec(), followed
    assert "ray_jobs/placement.py" in _where("ray", "runtime.learners")  # rt = recipe.runtime; rt.learners
    assert "ray_jobs/rollout_service.py" in _where("ray", "runtime.weight_sync")  # self.recipe.runtime.weight_sync
    assert "align/local.py" in _where("local", "learner.max_grad_norm")
    assert "runtime.learners" not in r["local"] and "runtime.learners" not in r["shared"]


def test_whole_section_uses_are_explained() -> None:
    """Every use of a section the chains cannot follow is in WHOLE_USES, and every entry there still occurs."""
    found = {use: where for g in GROUPS for use, where in analysis()[g].whole.items()}
    unexplained = {use: where for use, where in found.items() if use not in WHOLE_USES}
    assert not unexplained, "sections used whole, which the analysis cannot follow; read their fields, or add to " \
        "WHOLE_USES what they count as reading and why: " + "; ".join(
            f"{path or 'recipe'}.{how} at {', '.join(where[:3])}" for (path, how), where in unexplained.items())
    stale = sorted(set(WHOLE_USES) - set(found))
    assert not stale, f"WHOLE_USES entries no longer found in the code: {stale}"
    for path, how in WHOLE_USES:
        assert path == "" or path in schema().sections or path in schema().lists, (path, how)


def test_every_key_is_read() -> None:
    dead = [k for k in schema().leaves if not readers(k)]
    assert not dead, f"recipe keys that no code reads (set, validated, then ignored by both runtimes): {dead}"


def test_runtime_only_keys_are_refused_by_the_other_runtime() -> None:
    runtimes = _runtimes()
    problems = []
    for key in schema().leaves:
        groups = readers(key)
        if "shared" in groups:
            continue
        for reader, ignorer in (("ray", "local"), ("local", "ray")):
            if groups == {reader} and key not in runtimes[ignorer].refused:
                problems.append(
                    f"recipe key {key!r} is read only by the {reader} runtime ({_where(reader, key)}): the {ignorer} "
                    f"runtime ignores it silently; add it to {type(runtimes[ignorer]).__name__}.refused with a "
                    f"one-line reason, or make the {ignorer} runtime honour it")
    assert not problems, "\n".join(problems)


def test_refusals_name_keys_used_elsewhere() -> None:
    problems = []
    for name, runtime in _runtimes().items():
        others = {"shared", *(set(GROUPS) - {"shared", name})}
        for key in runtime.refused:
            if not schema().under(key) or (key not in schema().leaves and key not in schema().sections):
                problems.append(f"{type(runtime).__name__}.refused names {key!r}, which is not a recipe key")
            elif not readers(key) & others:
                problems.append(f"{type(runtime).__name__}.refused names recipe key {key!r}, which neither the "
                                f"other runtime nor the shared code reads: the {name} runtime refuses a key that "
                                "does nothing anywhere")
            elif "*" in key:
                problems.append(f"{type(runtime).__name__}.refused names {key!r}: check_runtime cannot tell "
                                "whether a list item sets a key")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The refusals fire
# ---------------------------------------------------------------------------------------------------------------
MINIMAL: dict[str, Any] = {"rewards": [{"name": "exact_match"}]}


def _field(key: str) -> Any:
    *sections, last = key.split(".")
    model = schema().sections[".".join(sections)]
    return model.model_fields[last]


def _candidates(info: Any) -> list[Any]:
    """Values of a field's annotation, other than its default, to try in order."""
    annotation, default = info.annotation, info.get_default(call_default_factory=True)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return list(args)
    kinds = args if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    out: list[Any] = []
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            out += typing.get_args(kind)
        elif kind is bool:
            out += [not default, True]
        elif kind is int:
            out += [default + 1, default - 1, 1] if isinstance(default, int) else [1, 2]
        elif kind is float:
            out += [default * 2, default / 2, 0.5] if isinstance(default, float) else [0.5, 1.0]
        elif kind is str:
            out += ["ray://x:1", "x"]
        elif typing.get_origin(kind) is dict:
            out += [{"x": 1}]
        elif typing.get_origin(kind) is list:
            out += [["x"]]
    return out


def _setting(key: str, value: Any, backend: str) -> dict[str, Any]:
    data: dict[str, Any] = {**MINIMAL, "runtime": {"backend": backend}}
    node = data
    *sections, last = key.split(".")
    for part in sections:
        node[part] = dict(node.get(part, {}))
        node = node[part]
    node[last] = value
    return data


def _recipe_setting(key: str, backend: str) -> Recipe:
    info = _field(key)
    default = info.get_default(call_default_factory=True)
    for value in _candidates(info):
        if value == default:
            continue
        try:
            recipe = recipe_from_dict(_setting(key, value, backend))
        except RecipeError:
            continue
        node: Any = recipe
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, (key, node, value)
        return recipe
    raise AssertionError(f"no valid non-default value found for {key!r} ({info.annotation}); extend _candidates")


@pytest.mark.parametrize("name", ["local", "ray"])
def test_refused_keys_are_refused_by_name(name: str) -> None:
    runtime = LocalRuntime() if name == "local" else _runtimes()["ray"]
    for key in runtime.refused:
        recipe = _recipe_setting(key, name)
        with pytest.raises(RecipeError) as err:
            check_runtime(recipe, runtime)
        assert f"'{key}'" in str(err.value), f"the refusal of {key!r} does not name it: {err.value}"
        assert "\n" not in str(err.value)


def test_a_recipe_without_refused_keys_passes_the_local_runtime() -> None:
    check_runtime(recipe_from_dict(MINIMAL), LocalRuntime())
    # keys the local runtime honours pass even when set explicitly
    honoured = recipe_from_dict({**MINIMAL, "runtime": {"backend": "local", "device": "cpu", "threads": 1,
                                                        "probe_every": 2, "overlap": True},
                                 "learner": {"lr": 1e-3, "max_grad_norm": 0.5}})
    check_runtime(honoured, LocalRuntime())
