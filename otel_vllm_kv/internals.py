"""The vLLM internals the package hooks or reads, and the two ways of checking one.

Each module declares what it touches as ``Internal`` entries (``probe.REQUIRED``,
``prefix_cache.REQUIRED``, ...); ``required()`` gathers them, so the run-time check
(``compat``) and the release-day script (``scripts/check-vllm-release``, which reads a wheel
without installing it) judge the same table:

* ``check_installed``: on the imported vLLM. Methods and slots on the live classes (a
  patched or renamed method is seen as it is now); instance attributes on a real object where
  one is cheap to build (``FreeKVCacheBlockQueue``), else in the class's own source, as vLLM
  sets them in its methods (a ``Scheduler`` needs a model configuration).
* ``check_source``: on a module's source text alone, by its syntax tree.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wrapt import FunctionWrapper

from otel_vllm_kv.patching import parameters as parameters_of


class Kind(enum.Enum):
    METHOD = "method"
    """A function of the class itself (or of the module), with its parameters where a hook takes them."""
    SLOT = "slot"
    """A ``__slots__`` member (vLLM's slotted dataclasses): read straight from the object."""
    ATTRIBUTE = "attribute"
    """An instance attribute, set by the class's own methods."""


@dataclass(frozen=True)
class Internal:
    module: str
    #: "Class.member", "Class.Nested.member" or "function".
    name: str
    kind: Kind = Kind.METHOD
    #: METHOD: each accepted parameter list after ``self`` ("name", or "name=" with a default); None: any.
    signatures: tuple[tuple[str, ...], ...] | None = None
    #: SLOT: other names the member had in other releases, newest first (the first found is read).
    spellings: tuple[str, ...] = ()
    #: False: used where present (a newer queue, say), absent in older releases.
    required: bool = True

    @property
    def owner(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def member(self) -> str:
        return self.name.rpartition(".")[2]

    def __str__(self) -> str:
        if self.kind is Kind.METHOD:
            shown = "" if self.signatures is None else "(" + " | ".join(", ".join(s) for s in self.signatures) + ")"
            return f"{self.module}.{self.name}{shown}"
        names = " | ".join((self.member, *self.spellings))
        return f"{self.module}.{self.owner}.{names} ({self.kind.value})"


def method(module: str, name: str, *signatures: tuple[str, ...]) -> Internal:
    return Internal(module, name, Kind.METHOD, signatures or None)


def slot(module: str, name: str, *spellings: str) -> Internal:
    return Internal(module, name, Kind.SLOT, spellings=spellings)


def attribute(module: str, name: str, required: bool = True) -> Internal:
    return Internal(module, name, Kind.ATTRIBUTE, required=required)


@dataclass(frozen=True)
class Finding:
    internal: Internal
    #: "present", "changed" (parameters) or "missing".
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "present" or not self.internal.required

    def __str__(self) -> str:
        return f"{self.internal}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def required() -> list[Internal]:
    """Every internal the package touches, from the modules that touch them."""
    from otel_vllm_kv.engine import admission, holders, pool_reading, prefix_cache, probe, residency
    from otel_vllm_kv.frontend import spans, tenants, unprobed_engines

    patches = (*probe.PATCHES, *spans.PATCHES, *unprobed_engines.PATCHES, *tenants.PATCHES)
    patched = list(dict.fromkeys(method(module, name) for module, name, _ in patches))
    return [
        *patched,
        *probe.REQUIRED,
        *spans.REQUIRED,
        *prefix_cache.REQUIRED,
        *pool_reading.REQUIRED,
        *admission.REQUIRED,
        *residency.REQUIRED,
        *holders.REQUIRED,
    ]


# --- On the installed vLLM ---------------------------------------------------------------------


def check_installed(internal: Internal) -> Finding:
    try:
        owner: Any = importlib.import_module(internal.module)
    except ImportError as error:
        return Finding(internal, "missing", f"module: {error}")
    for class_name in internal.owner.split(".") if internal.owner else ():
        owner = getattr(owner, class_name, None)
        if owner is None:
            return Finding(internal, "missing", f"no {class_name}")
    if internal.kind is Kind.METHOD:
        return _method_installed(internal, owner)
    if internal.kind is Kind.SLOT:
        for name in (internal.member, *internal.spellings):
            if isinstance(inspect.getattr_static(owner, name, None), types.MemberDescriptorType):
                return Finding(internal, "present", "" if name == internal.member else f"as {name}")
        return Finding(internal, "missing", "no such slot")
    builder = _BUILDERS.get(f"{internal.module}.{internal.owner}")
    if builder is not None:
        present = hasattr(builder(), internal.member)
    else:
        try:
            source = textwrap.dedent(inspect.getsource(owner))
        except (OSError, TypeError) as error:
            return Finding(internal, "missing", f"no source: {error}")
        present = _assigns_attribute(ast.parse(source).body[0], internal.member)
    return Finding(internal, "present" if present else "missing")


def _method_installed(internal: Internal, owner: Any) -> Finding:
    # The class's own function: an abstract declaration inherited from an interface does not count.
    function = vars(owner).get(internal.member) if isinstance(owner, type) else getattr(owner, internal.member, None)
    if isinstance(function, FunctionWrapper):  # our own class patch, or anyone's
        function = function.__wrapped__
    if not callable(function):
        return Finding(internal, "missing")
    if internal.signatures is None:
        return Finding(internal, "present")
    found = parameters_of(function)
    shown = None if found is None else _shown(found[1:] if isinstance(owner, type) else found)
    return _judge(internal, shown)


def _shown(found: tuple[tuple[str, Any, bool], ...]) -> tuple[str, ...] | None:
    if any(kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for _, kind, _ in found):
        return None
    return tuple(name + ("=" if default else "") for name, _, default in found)


def _judge(internal: Internal, shown: tuple[str, ...] | None) -> Finding:
    assert internal.signatures is not None
    if shown is not None and shown in internal.signatures:
        return Finding(internal, "present")
    return Finding(
        internal, "changed", "takes " + ("other kinds of parameters" if shown is None else f"({', '.join(shown)})")
    )


def _free_block_queue() -> Any:
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

    return FreeKVCacheBlockQueue([KVCacheBlock(index) for index in range(2)])


#: Real objects for classes whose instance attributes are cheap to see (no model configuration).
_BUILDERS: dict[str, Callable[[], Any]] = {"vllm.v1.core.kv_cache_utils.FreeKVCacheBlockQueue": _free_block_queue}


# --- On source text (a wheel not installed) ----------------------------------------------------


def check_source(internal: Internal, module_source: Callable[[str], str | None]) -> Finding:
    """``module_source(module)``: the module's text, None if the release has no such module."""
    text = module_source(internal.module)
    if text is None:
        return Finding(internal, "missing", "no module")
    node: ast.AST = ast.parse(text)
    for class_name in internal.owner.split(".") if internal.owner else ():
        found = _class_named(node, class_name)
        if found is None:
            return Finding(internal, "missing", f"no {class_name}")
        node = found
    if internal.kind is Kind.METHOD:
        function = _function_named(node, internal.member)
        if function is None:
            imported = not internal.owner and _imports_name(node, internal.member)
            return Finding(internal, "present" if imported else "missing")
        if internal.signatures is None:
            return Finding(internal, "present")
        return _judge(internal, _source_parameters(function, is_method=bool(internal.owner)))
    assert isinstance(node, ast.ClassDef)
    if internal.kind is Kind.SLOT:
        for name in (internal.member, *internal.spellings):
            if name in _slots(node):
                return Finding(internal, "present", "" if name == internal.member else f"as {name}")
        return Finding(internal, "missing", "no such slot")
    return Finding(internal, "present" if _assigns_attribute(node, internal.member) else "missing")


def _class_named(node: ast.AST, name: str) -> ast.ClassDef | None:
    for child in getattr(node, "body", ()):
        if isinstance(child, ast.ClassDef) and child.name == name:
            return child
    return None


def _function_named(node: ast.AST, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    found = None
    for child in getattr(node, "body", ()):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == name:
            found = child  # the last definition wins, as at run time
    return found


def _imports_name(module: ast.AST, name: str) -> bool:
    return any(
        isinstance(child, (ast.Import, ast.ImportFrom))
        and any((alias.asname or alias.name) == name for alias in child.names)
        for child in getattr(module, "body", ())
    )


def _source_parameters(function: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> tuple[str, ...] | None:
    arguments = function.args
    if arguments.posonlyargs or arguments.kwonlyargs or arguments.vararg or arguments.kwarg:
        return None
    names = [argument.arg for argument in arguments.args]
    first_default = len(names) - len(arguments.defaults)
    shown = tuple(name + ("=" if index >= first_default else "") for index, name in enumerate(names))
    return shown[1:] if is_method else shown


def _slots(cls: ast.ClassDef) -> set[str]:
    """Members of ``__slots__``, or the fields of a ``@dataclass(slots=True)``."""
    names: set[str] = set()
    slotted_dataclass = any(
        isinstance(decorator, ast.Call)
        and any(k.arg == "slots" and getattr(k.value, "value", False) is True for k in decorator.keywords)
        for decorator in cls.decorator_list
    )
    for child in cls.body:
        if slotted_dataclass and isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
            names.add(child.target.id)
        if isinstance(child, ast.Assign) and any(getattr(t, "id", None) == "__slots__" for t in child.targets):
            names.update(
                e.value
                for e in getattr(child.value, "elts", ())
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return names


def _assigns_attribute(cls: ast.AST, name: str) -> bool:
    """Whether the class's own methods set ``self.<name>``, or its body declares it."""
    for child in getattr(cls, "body", ()):
        if isinstance(child, ast.AnnAssign) and getattr(child.target, "id", None) == name:
            return True
    for node in ast.walk(cls):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for element in getattr(target, "elts", [target]):
                if (
                    isinstance(element, ast.Attribute)
                    and element.attr == name
                    and isinstance(element.value, ast.Name)
                    and element.value.id == "self"
                ):
                    return True
    return False
