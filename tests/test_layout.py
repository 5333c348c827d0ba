"""The layout rules of DESIGN.md, guarded."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_a_plain_directory() -> None:
    assert (ROOT / "platform").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_is_the_standard_library() -> None:
    import platform

    assert hasattr(platform, "python_version")
    assert Path(platform.__file__).parent == Path(sys.modules["os"].__file__).parent


def test_no_tests_platform_directory() -> None:
    assert not (ROOT / "tests" / "platform").exists()


def test_apps_import_as_top_level_names() -> None:
    for name in (
        "core",
        "config",
        "accounts",
        "catalog",
        "gateway",
        "console",
        "billing",
        "workers",
    ):
        importlib.import_module(name)


def test_workers_never_import_django_or_the_control_plane() -> None:
    forbidden = ("django", "core", "config", "accounts", "catalog", "gateway", "console", "billing")
    offenders = []
    for path in (ROOT / "workers").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_only_the_stripe_client_imports_stripe() -> None:
    offenders = []
    for base in ("platform", "billing", "workers"):
        for path in (ROOT / base).rglob("*.py"):
            if path.name == "stripe_client.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import) and any(
                    a.name.split(".")[0] == "stripe" for a in node.names
                ):
                    offenders.append(str(path))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stripe"):
                    offenders.append(str(path))
    assert offenders == []
