"""Check, by parsing vLLM's python sources (never importing them), that the vLLM interfaces swaa-vllm uses exist.

Why: the plugin's CUDA path (``swaa_vllm/platforms/cuda_path.py``, ``kernels/flash_attn_path.py``)
and its model-runner hooks (``swaa_vllm/worker.py``, ``swaa_vllm/prompt_lengths.py``)
run on the official CUDA build of vLLM, which cannot be imported on the CPU machines
this project is developed and tested on. Every vLLM module, class, function, method
(with the parameter names we pass), attribute, enum member, abstract method and
source fact they rely on is a record of :data:`tests.vllm_api.expectations.EXPECTATIONS`;
this module resolves each record in a vLLM source tree and says which are missing.

Usage::

    python -m tests.vllm_api.check --vllm-src DIR    # DIR/vllm/__init__.py: a source tree or site-packages
    python -m tests.vllm_api.check --wheel vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
        # extracts the wheel's vllm/**/*.py to .cache/vllm-gpu-src/<wheel stem>/ (once), then checks it

It prints one ``OK`` or ``MISSING`` line per record and a summary, and exits 1 if
any record is missing (2 if the source tree is not found).

How a record resolves (:class:`Resolver`), with standard-library ``ast`` only:

* module ``a.b.c``: ``DIR/a/b/c/__init__.py``, else ``DIR/a/b/c.py``;
* a name in a module: its first binding in source order among the module-level
  statements, looking into ``if``/``try``/``with`` blocks but not into
  ``if TYPE_CHECKING:`` (nothing there exists at run time). Bindings are classes,
  functions, assignments and imports; ``from X import Y`` and ``import X`` are
  followed into X (relative imports too; Y may be a submodule), ``from X import *``
  honours X's ``__all__``, and ``A = B`` or ``A = B if c else C`` follows B (and C:
  then both must pass). A module ``__getattr__`` naming the attribute counts
  (``vllm.platforms.current_platform``), as does a lazy table beside it mapping
  the name to ``".module:attr"`` (``vllm.LLM``), which is followed. For the
  conditional definitions the records use, the first binding is the one vLLM's
  CUDA platform takes (e.g. ``if current_platform.is_cuda():`` comes first in
  ``vllm/v1/attention/backends/fa_utils.py``);
* a name in a class: the class body (its last binding, as at run time; ``@overload``
  stubs skipped), then, for attributes, ``self.NAME = ...`` (also annotated,
  augmented or tuple assignments) in any method, then the bases defined in vLLM,
  depth-first in declaration order (bases from outside vLLM, e.g. ``ABC``, are skipped);
* parameters: positional-only, positional and keyword-only names; ``*args`` and
  ``**kwargs`` do not count as having a name;
* an enum member: an assignment in the body of a class derived from ``Enum``;
* abstract methods: ``@abstractmethod`` defs of the class and its vLLM bases that no
  class lower in that chain overrides, each of which our subclass must implement;
* a source snippet: a substring of the object's source segment (the whole module
  when the record names no object), whitespace and ``# comments`` ignored.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import io
import re
import shutil
import sys
import tokenize
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.vllm_api.expectations import EXPECTATIONS, Expect, Kind

__all__ = [
    "Missing", "Resolver", "Result", "Target", "check", "check_record", "format_result", "label", "main",
    "unpack_wheel", "vllm_version",
]

_ENUM_BASES = frozenset({"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"})
_MAX_DEPTH = 40  # re-export hops followed before giving up (guards against cycles)


class Missing(Exception):
    """A record does not resolve; ``str(exc)`` says which piece is missing and where it was looked for."""


@dataclass(frozen=True)
class Target:
    """What a name resolved to.

    Attributes:
        kind: ``"module"``, ``"class"``, ``"function"``, ``"value"`` (an assignment,
            field, instance attribute or lazy module attribute) or ``"external"``
            (bound to something outside vLLM, e.g. ``torch``).
        module: dotted module the object is defined in (for ``external``: its dotted name).
        node: its AST node (the whole module for ``module``), or None.
        owner: the class target whose body holds it, or None at module level.
        how: short note on how it was found (``"self.x = ... in __init__"``), or "".
    """

    kind: str
    module: str
    node: ast.AST | None = None
    owner: Target | None = None
    how: str = ""


@dataclass
class _Module:
    dotted: str
    path: Path
    rel: str
    source: str
    tree: ast.Module
    is_package: bool
    bindings: dict[str, list[tuple[ast.stmt, ast.alias | None]]] = field(default_factory=dict)
    star_imports: list[ast.ImportFrom] = field(default_factory=list)
    code: str | None = None  # the source with comments blanked out (for snippets), computed on first use


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_statements(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of ``body`` that may run, looking into if/try/with blocks (not ``if TYPE_CHECKING:``)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _runtime_statements(stmt.body)
            yield from _runtime_statements(stmt.orelse)
        elif isinstance(stmt, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            yield from _runtime_statements(stmt.body)
            for handler in stmt.handlers:
                yield from _runtime_statements(handler.body)
            yield from _runtime_statements(stmt.orelse)
            yield from _runtime_statements(stmt.finalbody)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _runtime_statements(stmt.body)
        else:
            yield stmt


def _target_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _target_names(elt)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> list[str]:
    names = []
    for dec in node.decorator_list:
        expr = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(expr, ast.Name):
            names.append(expr.id)
        elif isinstance(expr, ast.Attribute):
            names.append(expr.attr)
    return names


def _body_bindings(body: Iterable[ast.stmt], in_class: bool) -> dict[str, list[tuple[ast.stmt, ast.alias | None]]]:
    """Name -> its binding statements in source order (with the import alias for imports)."""
    out: dict[str, list[tuple[ast.stmt, ast.alias | None]]] = {}

    def add(name: str, stmt: ast.stmt, alias: ast.alias | None = None) -> None:
        out.setdefault(name, []).append((stmt, alias))

    for stmt in _runtime_statements(body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if "overload" not in _decorator_names(stmt):
                add(stmt.name, stmt)
        elif isinstance(stmt, ast.ClassDef):
            add(stmt.name, stmt)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in _target_names(target):
                    add(name, stmt)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if stmt.value is not None or in_class:  # a bare module-level annotation binds nothing
                add(stmt.target.id, stmt)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                add(alias.asname or alias.name.split(".")[0], stmt, alias)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if alias.name != "*":
                    add(alias.asname or alias.name, stmt, alias)
    return out


def _literal_strings(node: ast.expr | None) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[union-attr]
    return None


def _normalize(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _blank_comments(source: str) -> str:
    """``source`` with every ``# comment`` replaced by spaces (positions kept, so AST offsets still apply)."""
    lines = source.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            (row, col), (_, end) = tok.start, tok.end
            line = lines[row - 1]
            lines[row - 1] = line[:col] + " " * (end - col) + line[end:]
    return "".join(lines)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = fn.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]


class Resolver:
    """Resolves dotted vLLM names in one source tree by parsing its files (cached per module).

    Args:
        src_root: the directory holding the ``vllm/`` package (a source tree, an
            unpacked wheel or a site-packages directory).

    Raises:
        FileNotFoundError: if ``src_root/vllm/__init__.py`` does not exist.
    """

    def __init__(self, src_root: Path) -> None:
        self.src_root = Path(src_root)
        if not (self.src_root / "vllm" / "__init__.py").is_file():
            raise FileNotFoundError(f"{self.src_root} holds no vllm/__init__.py (pass the directory above vllm/)")
        self._modules: dict[str, _Module | None] = {}

    # -- modules ---------------------------------------------------------------------------------------

    def module_file(self, dotted: str) -> Path | None:
        """The file of module ``dotted`` (package ``__init__.py`` first, as Python's finder), or None."""
        base = self.src_root.joinpath(*dotted.split("."))
        for path in (base / "__init__.py", base.with_suffix(".py")):
            if path.is_file():
                return path
        return None

    def module(self, dotted: str) -> _Module | None:
        """The parsed module ``dotted``, or None when it is not a file of this tree.

        Raises:
            Missing: if the file does not parse.
        """
        if dotted in self._modules:
            return self._modules[dotted]
        path = self.module_file(dotted)
        mod = None
        if path is not None:
            source = path.read_text(encoding="utf-8")
            rel = path.relative_to(self.src_root).as_posix()
            try:
                tree = ast.parse(source, filename=str(path))
            except SyntaxError as exc:
                raise Missing(f"{rel} does not parse: {exc}") from None
            mod = _Module(dotted, path, rel, source, tree, path.name == "__init__.py")
            mod.bindings = _body_bindings(tree.body, in_class=False)
            mod.star_imports = [
                s for s in _runtime_statements(tree.body)
                if isinstance(s, ast.ImportFrom) and any(a.name == "*" for a in s.names)
            ]
        self._modules[dotted] = mod
        return mod

    def need_module(self, dotted: str) -> _Module:
        """The parsed module ``dotted``.

        Raises:
            Missing: if the tree has no such module file (or it does not parse).
        """
        mod = self.module(dotted)
        if mod is None:
            rel = "/".join(dotted.split("."))
            raise Missing(f"module {dotted} not found: no {rel}.py or {rel}/__init__.py")
        return mod

    def where(self, target: Target) -> str:
        """``vllm/x/y.py:LINE`` of a target (or its dotted name when outside vLLM)."""
        if target.kind == "external":
            return f"outside vLLM ({target.module})"
        mod = self.module(target.module)
        line = getattr(target.node, "lineno", None)
        return f"{mod.rel}:{line}" if mod and line else (mod.rel if mod else target.module)

    def source_of(self, target: Target) -> str:
        """The source text of a target (the whole file for a module), comments blanked out."""
        mod = self.module(target.module)
        if mod is None or target.node is None:
            return ""
        if mod.code is None:
            mod.code = _blank_comments(mod.source)
        if target.kind == "module":
            return mod.code
        return ast.get_source_segment(mod.code, target.node) or ""

    # -- names -------------------------------------------------------------------------------------------

    def resolve(self, module: str, qualname: str, instance_attrs: bool = False) -> list[Target]:
        """Every target ``module.qualname`` may be (one, or one per branch of ``A = B if c else C``).

        Args:
            instance_attrs: the last part may also be a ``self.NAME = ...`` assignment (attributes).

        Raises:
            Missing: naming the first piece that does not resolve.
        """
        targets = [Target("module", module, self.need_module(module).tree)]
        parts = qualname.split(".") if qualname else []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            targets = [t for base in targets for t in self.member(base, part, instance_attrs=last and instance_attrs)]
        return targets

    def member(self, base: Target, name: str, instance_attrs: bool = False, depth: int = 0) -> list[Target]:
        """Targets of ``base.name`` for a module or class target.

        Args:
            instance_attrs: also accept ``self.name = ...`` in a class's methods.

        Raises:
            Missing: if ``base`` has no such member, or is not a vLLM module or class.
        """
        if base.kind == "module":
            return self._module_name(self.need_module(base.module), name, depth)
        if base.kind == "class":
            return self._class_member(base, name, instance_attrs)
        raise Missing(f"cannot look up {name!r} inside {self._describe(base)}: not a vLLM module or class")

    def _describe(self, target: Target) -> str:
        name = getattr(target.node, "name", None) or ""
        return f"{target.kind} {name} at {self.where(target)}".replace("  ", " ")

    def _module_name(self, mod: _Module, name: str, depth: int) -> list[Target]:
        if depth > _MAX_DEPTH:
            raise Missing(f"gave up following {name!r} through {_MAX_DEPTH} re-exports (cycle?) at {mod.rel}")
        bindings = mod.bindings.get(name)
        if bindings:
            stmt, alias = bindings[0]
            return self._from_binding(mod, stmt, alias, depth + 1)
        sub = f"{mod.dotted}.{name}"
        if mod.is_package and self.module_file(sub) is not None:
            return [Target("module", sub, self.need_module(sub).tree)]
        for star in mod.star_imports:
            source = self._import_base(mod, star)
            smod = self.module(source)
            if smod is not None and name in self._exported(smod):
                return self._module_name(smod, name, depth + 1)
        lazy = self._lazy_attribute(mod, name, depth)
        if lazy is not None:
            return lazy
        raise Missing(f"no binding of {name} in {mod.rel} (no def, class, assignment or import of it)")

    def _exported(self, mod: _Module) -> set[str]:
        for stmt, _ in mod.bindings.get("__all__", []):
            names = _literal_strings(getattr(stmt, "value", None))
            if names is not None:
                return set(names)
        return {n for n in mod.bindings if not n.startswith("_")}

    def _lazy_attribute(self, mod: _Module, name: str, depth: int) -> list[Target] | None:
        """``name`` served by the module's ``__getattr__``: named in it, or in a ``{name: ".mod:attr"}`` table."""
        getattr_fn = next(
            (s for s, _ in mod.bindings.get("__getattr__", []) if isinstance(s, ast.FunctionDef)), None
        )
        if getattr_fn is None:
            return None
        for node in ast.walk(getattr_fn):
            if isinstance(node, ast.Constant) and node.value == name:
                return [Target("value", mod.dotted, getattr_fn, how=f"lazy via {mod.rel} __getattr__")]
        for stmt in _runtime_statements(mod.tree.body):
            value = getattr(stmt, "value", None)
            if not isinstance(value, ast.Dict):
                continue
            for key, val in zip(value.keys, value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == name:
                    if isinstance(val, ast.Constant) and isinstance(val.value, str) and ":" in val.value:
                        rel_module, attr = val.value.split(":", 1)
                        name_part = rel_module.lstrip(".")
                        dotted = self._absolute(mod, name_part, len(rel_module) - len(name_part))
                        return self._module_name(self.need_module(dotted), attr, depth + 1)
                    return [Target("value", mod.dotted, stmt, how=f"lazy table in {mod.rel}")]
        return None

    def _absolute(self, mod: _Module, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        package = mod.dotted.split(".") if mod.is_package else mod.dotted.split(".")[:-1]
        if level > 1:
            package = package[: len(package) - (level - 1)]
        return ".".join([*package, module] if module else package)

    def _import_base(self, mod: _Module, stmt: ast.ImportFrom) -> str:
        return self._absolute(mod, stmt.module, stmt.level)

    def _from_binding(self, mod: _Module, stmt: ast.stmt, alias: ast.alias | None, depth: int) -> list[Target]:
        if isinstance(stmt, ast.ClassDef):
            return [Target("class", mod.dotted, stmt)]
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [Target("function", mod.dotted, stmt)]
        if isinstance(stmt, ast.Import):
            dotted = alias.name if alias.asname else alias.name.split(".")[0]
            if self.module(dotted) is None:
                return [Target("external", dotted, stmt)]
            return [Target("module", dotted, self.need_module(dotted).tree)]
        if isinstance(stmt, ast.ImportFrom):
            source = self._import_base(mod, stmt)
            smod = self.module(source)
            if smod is None:
                sub = f"{source}.{alias.name}"
                if self.module(sub) is not None:
                    return [Target("module", sub, self.need_module(sub).tree)]
                return [Target("external", sub, stmt)]
            try:
                return self._module_name(smod, alias.name, depth)
            except Missing as exc:
                raise Missing(f"{mod.rel}:{stmt.lineno} imports {alias.name} from {source}, but: {exc}") from None
        value = getattr(stmt, "value", None)
        single = (
            isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
        ) or isinstance(stmt, ast.AnnAssign)
        if single and value is not None:
            followed = self._follow(mod, value, depth)
            if followed is not None:
                return followed
        return [Target("value", mod.dotted, stmt)]

    def _follow(self, mod: _Module, expr: ast.expr, depth: int) -> list[Target] | None:
        """Targets of an alias expression (``B``, ``a.B``, ``B if c else C``), or None for any other value."""
        if isinstance(expr, ast.Name):
            if expr.id not in mod.bindings and hasattr(builtins, expr.id):
                return [Target("external", f"builtins.{expr.id}")]
            return self._module_name(mod, expr.id, depth + 1)
        if isinstance(expr, ast.Attribute):
            bases = self._follow(mod, expr.value, depth + 1)
            if bases is None or any(b.kind in ("external", "value") for b in bases):
                return None
            return [t for b in bases for t in self.member(b, expr.attr, depth=depth + 1)]
        if isinstance(expr, ast.IfExp):
            body, orelse = self._follow(mod, expr.body, depth), self._follow(mod, expr.orelse, depth)
            if body is not None and orelse is not None:
                return body + orelse
        return None

    # -- classes -----------------------------------------------------------------------------------------

    def bases(self, cls: Target) -> list[Target]:
        """The class and its bases defined in vLLM, depth-first in declaration order, each once."""
        order: list[Target] = []
        seen: set[tuple[str, int]] = set()

        def visit(c: Target) -> None:
            key = (c.module, c.node.lineno)
            if key in seen:
                return
            seen.add(key)
            order.append(c)
            mod = self.need_module(c.module)
            for expr in c.node.bases:
                if isinstance(expr, ast.Subscript):  # Generic[T], AttentionImplBase[T]
                    expr = expr.value
                try:
                    resolved = self._follow(mod, expr, 0) or []
                except Missing:
                    resolved = []  # a base vLLM binds to nothing we can read: skipped, as external ones
                for base in resolved:
                    if base.kind == "class":
                        visit(base)

        visit(cls)
        return order

    def is_enum(self, cls: Target) -> bool:
        """Whether the class derives from ``Enum`` (or ``IntEnum``, ``StrEnum``, ``Flag``...)."""
        for c in self.bases(cls):
            for expr in c.node.bases:
                name = getattr(expr, "id", None) or getattr(expr, "attr", None)
                if name in _ENUM_BASES:
                    return True
        return False

    def abstract_methods(self, cls: Target) -> dict[str, Target]:
        """The class's abstract methods (``@abstractmethod`` and not overridden lower in its vLLM chain)."""
        decided: dict[str, Target | None] = {}
        for c in self.bases(cls):
            for name, bindings in _body_bindings(c.node.body, in_class=True).items():
                if name not in decided:
                    stmt = bindings[-1][0]
                    abstract = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        "abstractmethod" in _decorator_names(stmt)
                    )
                    decided[name] = Target("function", c.module, stmt, owner=c) if abstract else None
        return {name: t for name, t in decided.items() if t is not None}

    def _class_member(self, cls: Target, name: str, instance_attrs: bool) -> list[Target]:
        chain = self.bases(cls)
        for c in chain:
            bindings = _body_bindings(c.node.body, in_class=True).get(name)
            if bindings:
                stmt = bindings[-1][0]  # the class body's last binding wins, as at run time
                if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind = "class" if isinstance(stmt, ast.ClassDef) else "function"
                    return [Target(kind, c.module, stmt, owner=c)]
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    return [Target("value", c.module, stmt, owner=c, how="imported in the class body")]
                return [Target("value", c.module, stmt, owner=c, how="class attribute or field")]
            if instance_attrs:
                found = self._self_assignment(c, name)
                if found is not None:
                    return [found]
        names = ", ".join(getattr(c.node, "name", "?") for c in chain)
        what = f"no {name}"
        if instance_attrs:
            what = f"no class attribute, field, method, property or assignment self.{name}"
        raise Missing(f"{what} in class {cls.node.name} or its vLLM bases (looked in {names})")

    def _self_assignment(self, cls: Target, name: str) -> Target | None:
        for fn in cls.node.body:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.args.args:
                continue
            self_name = fn.args.args[0].arg
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    targets = [node.target]
                else:
                    continue
                for target in targets:
                    for elt in ast.walk(target):
                        if (
                            isinstance(elt, ast.Attribute) and elt.attr == name
                            and isinstance(elt.value, ast.Name) and elt.value.id == self_name
                            and isinstance(elt.ctx, ast.Store)
                        ):
                            return Target("value", cls.module, node, owner=cls,
                                          how=f"{self_name}.{name} = ... in {cls.node.name}.{fn.name}")
        return None


# -- checking records ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """The outcome of one record: ``ok`` and a one-line ``detail`` (where it was found, or what is missing)."""

    record: Expect
    ok: bool
    detail: str


def _check_target(resolver: Resolver, rec: Expect, target: Target) -> str:
    """Detail for a target that satisfies ``rec``.

    Raises:
        Missing: if the target is not what ``rec`` requires.
    """
    where = resolver.where(target)
    if rec.kind is Kind.MODULE:
        if target.kind != "module":
            raise Missing(f"{rec.module} is a {target.kind}, not a module")
        return where
    if rec.kind is Kind.CLASS:
        if target.kind != "class":
            raise Missing(f"{rec.obj} is a {target.kind} at {where}, not a class")
        return where
    if rec.kind in (Kind.FUNCTION, Kind.METHOD):
        if target.kind != "function":
            raise Missing(f"{rec.obj} is a {target.kind} at {where}, not a function")
        if rec.kind is Kind.METHOD and target.owner is None:
            raise Missing(f"{rec.obj} is a module-level function at {where}, not a method")
        if rec.kind is Kind.FUNCTION and target.owner is not None:
            raise Missing(f"{rec.obj} is a method at {where}, not a module-level function")
        names = _params(target.node)
        absent = [p for p in rec.params if p not in names]
        if absent:
            kwarg = target.node.args.kwarg
            note = f", **{kwarg.arg}; **kwargs does not count" if kwarg else ""
            raise Missing(f"no parameter {', '.join(absent)} at {where} (has {', '.join(names) or 'none'}{note})")
        decorators = _decorator_names(target.node)
        lacking = [d for d in rec.decorators if d not in decorators]
        if lacking:
            raise Missing(f"not @{', @'.join(lacking)} at {where} (decorators: {', '.join(decorators) or 'none'})")
        return where
    if rec.kind is Kind.ATTRIBUTE:
        how = target.how
        if target.kind == "function":
            how = " ".join(f"@{d}" for d in _decorator_names(target.node)) or "a method"
        return f"{where}" + (f" ({how})" if how else "")
    if rec.kind is Kind.ENUM_MEMBER:
        owner = target.owner
        if owner is None or not resolver.is_enum(owner):
            raise Missing(f"{rec.obj} at {where} is not a member of an Enum class")
        if target.kind != "value" or not isinstance(target.node, (ast.Assign, ast.AnnAssign)):
            raise Missing(f"{rec.obj} at {where} is a {target.kind}, not an enum member assignment")
        return where
    if rec.kind is Kind.ABSTRACTS:
        if target.kind != "class":
            raise Missing(f"{rec.obj} is a {target.kind} at {where}, not a class")
        open_methods = resolver.abstract_methods(target)
        unimplemented = sorted(set(open_methods) - set(rec.params))
        if unimplemented:
            declared = ", ".join(f"{n} ({resolver.where(open_methods[n])})" for n in unimplemented)
            raise Missing(f"abstract in vLLM, not implemented by our subclass: {declared}")
        return f"{where}; abstract: {', '.join(sorted(open_methods)) or 'none'}"
    if rec.kind is Kind.SOURCE:
        if target.kind == "external":
            raise Missing(f"{rec.obj} is defined {where}; its source is not checked")
        if _normalize(rec.snippet) not in _normalize(resolver.source_of(target)):
            raise Missing(f"the source at {where} does not contain {rec.snippet!r} (whitespace and comments ignored)")
        return where
    raise ValueError(f"unknown record kind {rec.kind!r}")


def check_record(resolver: Resolver, rec: Expect) -> Result:
    """Resolve one record.

    Returns:
        A :class:`Result`; never raises :class:`Missing` (it becomes ``ok=False``).
    """
    try:
        if rec.kind is Kind.MODULE:
            targets = [Target("module", rec.module, resolver.need_module(rec.module).tree)]
        else:
            targets = resolver.resolve(rec.module, rec.obj, instance_attrs=rec.kind is Kind.ATTRIBUTE)
        details = [_check_target(resolver, rec, t) for t in targets]
    except Missing as exc:
        return Result(rec, False, str(exc))
    return Result(rec, True, "; ".join(dict.fromkeys(details)))


def check(records: Sequence[Expect], resolver: Resolver) -> list[Result]:
    """Resolve every record against one source tree.

    Args:
        records: the manifest (usually :data:`~tests.vllm_api.expectations.EXPECTATIONS`).
        resolver: a :class:`Resolver` of the vLLM source tree.

    Returns:
        One :class:`Result` per record, in order.
    """
    return [check_record(resolver, rec) for rec in records]


def label(rec: Expect) -> str:
    """Human name of a record: ``vllm.v1.worker.gpu.states.RequestState attribute prompt_len``."""
    if rec.kind is Kind.MODULE:
        return f"{rec.module} module"
    if rec.kind is Kind.ABSTRACTS:
        return f"{rec.module}.{rec.obj} abstract methods within ({', '.join(rec.params)})"
    if rec.kind is Kind.SOURCE:
        snippet = rec.snippet if len(rec.snippet) <= 70 else rec.snippet[:67] + "..."
        return f"{rec.module}{'.' + rec.obj if rec.obj else ''} source contains {snippet!r}"
    parent, _, leaf = rec.obj.rpartition(".")
    if rec.params:
        leaf += f"({', '.join(rec.params)})"
    if rec.decorators:
        leaf = "@" + " @".join(rec.decorators) + " " + leaf
    return f"{rec.module}{'.' + parent if parent else ''} {rec.kind.value} {leaf}"


def format_result(result: Result) -> str:
    """One output line: ``OK      <label>  [<where>]`` or ``MISSING <label>: <reason> -- used by ...``."""
    if result.ok:
        return f"OK      {label(result.record)}  [{result.detail}]"
    return f"MISSING {label(result.record)}: {result.detail} -- used by {result.record.used_by}"


def vllm_version(src_root: Path) -> str:
    """The ``__version__`` in ``vllm/_version.py`` (read with ast), or ``"unknown version"``."""
    path = Path(src_root) / "vllm" / "_version.py"
    if path.is_file():
        for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in stmt.targets):
                if isinstance(stmt.value, ast.Constant):
                    return str(stmt.value.value)
    return "unknown version"


def unpack_wheel(wheel: Path, dest_root: Path) -> Path:
    """Extract the wheel's ``vllm/**/*.py`` into ``dest_root/<wheel stem>/`` unless already done.

    Returns:
        The directory holding the extracted ``vllm/`` (pass it as ``--vllm-src``).

    Raises:
        FileNotFoundError: if the wheel does not exist.
        ValueError: if it holds no ``vllm/*.py`` (not a vLLM wheel).
    """
    wheel, dest_root = Path(wheel), Path(dest_root)
    if not wheel.is_file():
        raise FileNotFoundError(f"no wheel {wheel}")
    dest = dest_root / wheel.name.removesuffix(".whl")
    done = dest / ".unpacked"
    if done.is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
        if "vllm/__init__.py" not in members:
            raise ValueError(f"{wheel} holds no vllm/__init__.py: not a vLLM wheel")
        zf.extractall(partial, members)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    done.write_text(f"{len(members)} files from {wheel.name}\n")
    return dest


def main(argv: Sequence[str] | None = None, records: Sequence[Expect] = EXPECTATIONS) -> int:
    """Command line (see the module docstring).

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        records: the manifest to check (tests pass altered copies).

    Returns:
        0 if every record resolves, 1 if any is missing, 2 if the sources are not found.
    """
    parser = argparse.ArgumentParser(prog="python -m tests.vllm_api.check", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vllm-src", type=Path, help="directory holding vllm/ (source tree or site-packages)")
    source.add_argument("--wheel", type=Path, help="a vLLM wheel: its vllm/*.py are extracted, then checked")
    parser.add_argument("--unpack-to", type=Path, default=Path(".cache/vllm-gpu-src"),
                        help="where --wheel is extracted, as <dir>/<wheel stem>/ (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        src = unpack_wheel(args.wheel, args.unpack_to) if args.wheel else args.vllm_src
        resolver = Resolver(src)
    except (FileNotFoundError, ValueError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = check(records, resolver)
    for result in results:
        print(format_result(result))
    missing = [r for r in results if not r.ok]
    print(f"vLLM {vllm_version(src)} at {src}: {len(results)} records, "
          f"{len(results) - len(missing)} OK, {len(missing)} MISSING")
    if missing:
        print("MISSING: " + "; ".join(label(r.record) for r in missing))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
