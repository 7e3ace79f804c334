"""The package's structure: subpackages in layers, each importing only the layers below it, and
no import cycle between modules (docs/architecture.md draws the same order)."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "exporter", "api_token_exporter")
# bottom-up; a module may import its own layer and the ones before it, never one after it
LAYERS = ("core", "mixin", "alerting", "analytics", "web", "proxy", "cli")
FACADES = ("__init__", "asgi")          # the public names, re-exported from the layers


def modules():
    """{dotted name under the package: path} for every module."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def imports_of(name, path, known):
    """Modules of the package that ``name`` imports, at the top or inside a function."""
    is_package = path.endswith("__init__.py")
    package = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        package = []
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "api_token_exporter":
                base = []
            else:
                continue
            target = base + [p for p in (node.module or "").split(".") if p and p != "api_token_exporter"]
            target_name = ".".join(target)
            for alias in node.names:        # `from . import x` imports the module x
                sub = ".".join(target + [alias.name])
                out.add(sub if sub in known else target_name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("api_token_exporter."):
                    out.add(alias.name[len("api_token_exporter."):])
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                module = node.module or "" if isinstance(node, ast.ImportFrom) else alias.name
                assert not module.startswith("devstack"), f"{name} imports the dev stack ({module})"
    return {m for m in out if m and m != name}


def graph():
    known = modules()
    return {name: {m for m in imports_of(name, path, known) if m in known} for name, path in known.items()}


def layer(name):
    top = name.split(".")[0]
    return None if top in FACADES else LAYERS.index(top)


def test_every_module_is_in_a_layer():
    for name in modules():
        top = name.split(".")[0]
        assert top in LAYERS or top in FACADES, f"{name}: not in a layer ({', '.join(LAYERS)})"


def test_layers_import_only_downward():
    wrong = []
    for name, targets in graph().items():
        if layer(name) is None:
            continue
        for target in targets:
            if layer(target) is None or layer(target) > layer(name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    # parent packages' __init__ are imported with their modules: a module importing its own
    # package's __init__ is not a cycle through it unless __init__ imports back
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    """``from .x import _private`` reaches into another module's insides."""
    crossing = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("api_token_exporter")):
                crossing += [f"{name}: {alias.name} from {node.module}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not crossing, "private names imported across modules:\n" + "\n".join(crossing)


@pytest.mark.parametrize("broken, message", [
    ({"core.a": {"web.b"}, "web.b": set()}, "core.a -> web.b"),
])
def test_the_layer_check_can_fail(broken, message, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "graph", lambda: broken)
    with pytest.raises(AssertionError, match=message):
        test_layers_import_only_downward()
