"""The package's rooms: each role (engine, frontend, exporter) imports only shared modules, never a
sibling role; shared modules import no role; every public name is defined in ``names`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import otel_vllm_kv
from otel_vllm_kv import names

PACKAGE = Path(otel_vllm_kv.__file__).parent
ROLES = ("engine", "frontend", "exporter")
#: The two modules that see every role: the instrumentor installs each, and the version check
#: gathers the vLLM internals each touches.
SEE_EVERY_ROLE = {Path("__init__.py"), Path("internals.py")}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def role_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "otel_vllm_kv" and parts[1] in ROLES else None


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", package_modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_imports_from_a_sibling_role(path):
    relative = path.relative_to(PACKAGE)
    own_role = relative.parts[0] if relative.parts[0] in ROLES else None
    if relative in SEE_EVERY_ROLE:
        return
    reached = {role_of(module) for module in imported_modules(path)} - {None, own_role}
    assert not reached, f"{relative} imports from the role package(s) {sorted(reached)}"


def test_the_check_sees_a_sideways_import(tmp_path):
    sideways = tmp_path / "module.py"
    sideways.write_text("from otel_vllm_kv.exporter.gauges import CALLBACKS\nfrom otel_vllm_kv import frontend\n")
    assert {role_of(module) for module in imported_modules(sideways)} >= {"exporter", "frontend"}


def test_every_public_name_string_is_defined_once():
    # A metric or attribute name written as a literal anywhere else would drift from ``names``.
    defined = {value for key, value in vars(names).items() if key.isupper() and isinstance(value, str) and "." in value}
    assert len(defined) >= 30
    for path in package_modules():
        if path.name == "names.py":
            continue
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & defined, f"{path.relative_to(PACKAGE)} spells {sorted(literals & defined)} itself"
