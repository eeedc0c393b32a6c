"""The package's layout: no import circle between surgeon's modules (lazy imports inside functions included)."""
import ast

from conftest import ROOT


def imports_of(path) -> set[str]:
    """surgeon modules a file imports anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "surgeon":
                rest = node.module.split(".")[1:]
                names = rest[:1] or [alias.name for alias in node.names]
            else:
                continue
            out.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("surgeon."))
    return out


def graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in (ROOT / "surgeon").glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(files) - {name} for name, path in files.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_the_package():
    found = cycle(graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_the_circle_check_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_paths_imports_nothing_of_ours():
    assert graph()["paths"] == set()
