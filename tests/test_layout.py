"""The map of docs/architecture.md, enforced: which package may import which, no import
cycle (imports inside functions count), no reaching into another module's private names,
and the few single-owner rules (Stripe, the back office, the workers' contract)."""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top-level package -> the directory that holds it.
PACKAGES = {
    **dict.fromkeys(
        ("core", "config", "accounts", "catalog", "gateway", "console"), ROOT / "platform"
    ),
    "billing": ROOT,
    "workers": ROOT,
}

# Who may import whom (docs/architecture.md, "Import directions"). `config` is the wiring:
# it may import everything and nothing imports it (settings are read through
# django.conf.settings). `core` is the base and imports no other package.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "workers": frozenset(),
    "accounts": frozenset({"core"}),
    "catalog": frozenset({"core", "accounts", "workers"}),
    "billing": frozenset({"core", "accounts", "catalog", "workers"}),
    "gateway": frozenset({"core", "accounts", "catalog", "billing", "workers"}),
    "console": frozenset({"core", "accounts", "catalog", "billing", "gateway", "workers"}),
    "config": frozenset(PACKAGES) - {"config"},
}

# The control plane reaches the workers through their contract (task names, queues, frozen
# payloads, Redis key names) and runs a few of their Django-free libraries itself, so both
# sides judge a template, a tokenizer or a checkpoint the same way. Nothing else.
WORKER_MODULES_THE_CONTROL_PLANE_MAY_IMPORT = frozenset(
    {
        "workers.contract",
        "workers.broker",  # the Redis broker's unacked-restore guard, for the control worker
        "workers.chat_template",  # chat templates rendered under the same budget
        "workers.template_process",  # ... in the same kind of child process
        "workers.tokenizer_limits",  # tokenizer files judged by the same limits
        "workers.compile.validate",  # an uploaded checkpoint judged as the compiler will
        "workers.grammar",  # a schema checked with the limits the worker compiles it under
    }
)


# The console is a second front end for the gateway's Files and Batch API services: it calls
# them as /v1 does, and knows nothing else of the data plane (no pipeline, no endpoints).
GATEWAY_MODULES_THE_CONSOLE_MAY_IMPORT = frozenset(
    {
        "gateway.files",  # uploads, reads and downloads of the organization's files
        "gateway.batches",  # batches created, read and cancelled
        "gateway.protocol_batches",  # the create request and the batch's wire shapes
        "gateway.models",  # the File and Batch rows those services return
        "gateway.errors",  # the OpenAI-shaped error the batches service raises
    }
)


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the first-party module imported (longest existing module prefix)
    names: tuple[str, ...]  # names taken from it by `from target import ...`
    line: int
    in_function: bool


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for name, parent in PACKAGES.items():
        for path in (parent / name).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@cache
def first_party_imports() -> tuple[Import, ...]:
    modules = module_files()

    def resolve(name: str) -> str | None:
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    found: list[Import] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, in_function in walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = resolve(alias.name)
                    if target and target != module:
                        found.append(Import(module, target, (), node.lineno, in_function))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    # `from billing import wallet` imports the module billing.wallet.
                    submodule = resolve(f"{base}.{alias.name}")
                    if submodule == f"{base}.{alias.name}":
                        target, names = submodule, ()
                    else:
                        target, names = resolve(base), (alias.name,)
                    if target and target != module:
                        found.append(Import(module, target, names, node.lineno, in_function))
    return tuple(found)


def walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node, with whether it sits inside a function (a deferred import)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        yield node, in_function
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        stack.extend((child, inside) for child in ast.iter_child_nodes(node))


def top(module: str) -> str:
    return module.split(".")[0]


def describe(imp: Import) -> str:
    where = " (inside a function)" if imp.in_function else ""
    names = f" {', '.join(imp.names)}" if imp.names else ""
    return f"{imp.importer}:{imp.line} imports {imp.target}{names}{where}"


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
    for name in PACKAGES:
        importlib.import_module(name)


def test_the_map_names_every_package_there_is() -> None:
    on_disk = {p.name for p in (ROOT / "platform").iterdir() if (p / "__init__.py").is_file()}
    assert on_disk | {"billing", "workers"} == set(PACKAGES) == set(ALLOWED)


def test_packages_import_only_in_the_directions_the_map_allows() -> None:
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if top(imp.target) != top(imp.importer)
        and top(imp.target) not in ALLOWED[top(imp.importer)]
    ]
    assert offenders == []


def test_the_import_graph_has_no_cycle() -> None:
    """Counting imports inside functions: a cycle broken only by deferring an import is
    still a cycle in the design."""
    graph: dict[str, set[str]] = {}
    for imp in first_party_imports():
        graph.setdefault(imp.importer, set()).add(imp.target)
    cycles = strongly_connected_components(graph)
    assert [sorted(c) for c in cycles if len(c) > 1] == []


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in list(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_cycle_check_finds_a_cycle_through_a_deferred_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [sorted(c) for c in strongly_connected_components(graph) if len(c) > 1] == [
        ["a", "b", "c"]
    ]
    deferred = ast.parse("def f():\n    from billing import tasks\n")
    assert [inside for node, inside in walk(deferred) if isinstance(node, ast.ImportFrom)] == [True]


def test_no_module_takes_another_modules_private_names() -> None:
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if any(name.startswith("_") and not name.startswith("__") for name in imp.names)
    ]
    assert offenders == []


def test_the_control_plane_knows_the_workers_only_through_the_contract_and_shared_libraries() -> (
    None
):
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if top(imp.importer) != "workers"
        and top(imp.target) == "workers"
        and imp.target not in WORKER_MODULES_THE_CONTROL_PLANE_MAY_IMPORT
    ]
    assert offenders == []


def test_the_console_knows_the_gateway_only_through_its_files_and_batches_services() -> None:
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if top(imp.importer) == "console"
        and top(imp.target) == "gateway"
        and imp.target not in GATEWAY_MODULES_THE_CONSOLE_MAY_IMPORT
    ]
    assert offenders == []


def test_workers_never_import_django_or_the_control_plane() -> None:
    forbidden = {"django", *PACKAGES} - {"workers"}
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


def test_core_billing_never_imports_the_back_office() -> None:
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if imp.importer.startswith("billing.")
        and not imp.importer.startswith("billing.backoffice")
        and imp.target.startswith("billing.backoffice")
    ]
    assert offenders == []


def test_only_the_stripe_client_imports_stripe() -> None:
    offenders = []
    for base in ("platform", "billing", "workers"):
        for path in (ROOT / base).rglob("*.py"):
            if path == ROOT / "billing" / "payments" / "stripe_client.py":
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


def test_the_gateway_pipeline_knows_no_endpoint_and_endpoints_know_no_other() -> None:
    """The pipeline serves /v1, /v2 and the callers to come (the batch runner, the provider
    relay), so it never imports an entry point; endpoint families share only through it,
    `gateway.replies` and `gateway.endpoints.shared`."""
    entry_points = ("gateway.endpoints", "gateway.replies", "gateway.v2", "gateway.openapi")
    offenders = [
        describe(imp)
        for imp in first_party_imports()
        if (imp.importer == "gateway.pipeline" and imp.target.startswith(entry_points))
        or (
            imp.importer.startswith("gateway.endpoints.")
            and imp.target.startswith("gateway.endpoints.")
            and imp.target != "gateway.endpoints.shared"
        )
    ]
    assert offenders == []
    assert "gateway.pipeline" in {imp.target for imp in first_party_imports()}
