"""The package's layout keeps its promises: no import cycles, layers import only downwards, small
modules, and layer types known only to `fxlora.kinds`."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fxlora"

#: each layer may import from the layers listed for it (and from itself)
ALLOWED = {
    "config_values": set(),
    "config": {"errors", "config_values"},
    "errors": set(),
    "dtypes": set(),
    "boundary": set(),
    "variants": {"errors"},
    "kinds": {"boundary", "config", "errors", "dtypes", "variants"},
    "core": {"boundary", "config", "errors", "dtypes", "variants", "kinds"},
    "tracing": {"boundary", "config", "errors", "kinds"},
    "planning": {"boundary", "config", "errors", "dtypes", "variants", "kinds", "core", "tracing"},
    "passes": {"boundary", "config", "errors", "dtypes", "variants", "kinds", "core", "tracing"},
    "runtime": {"boundary", "config", "errors", "dtypes", "variants", "kinds", "core", "tracing", "planning", "passes"},
    "io": {"boundary", "config", "errors", "dtypes", "variants", "kinds", "core", "tracing", "planning"},
    "model": {"boundary", "config", "errors", "dtypes", "variants", "kinds", "core", "tracing", "planning", "passes", "runtime", "io"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_at_load(path: Path, known: dict[str, Path]) -> set[str]:
    """fxlora modules `path` imports when it is loaded (not under ``if TYPE_CHECKING:``)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxlora"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fxlora"))
    return {m for m in out if m in known}


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "fxlora"


def test_no_import_cycles_and_layers_import_only_downwards():
    known = modules()
    graph = {m: imports_at_load(p, known) - {m} for m, p in known.items()}
    for module, deps in graph.items():
        here = layer_of(module)
        if here == "fxlora":
            continue  # the package's public API imports from everywhere
        wrong = {d for d in deps if layer_of(d) != here and layer_of(d) not in ALLOWED[here]}
        assert not wrong, f"{module} imports {sorted(wrong)}, above its layer {here!r}"
    # no cycle: a topological order exists
    done, visiting = set(), []

    def visit(m):
        if m in done:
            return
        assert m not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        visiting.append(m)
        for d in graph[m]:
            visit(d)
        visiting.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_layer_kinds_are_not_switched_on_outside_kinds():
    """No code outside `fxlora.kinds` compares a layer kind with a kind's name: it asks the kind."""
    from fxlora.kinds import registered_kinds

    names = "|".join(kind.name for kind in registered_kinds())
    switches = re.compile(rf"kind(\.name)?\s*[!=]=\s*[\"']({names})[\"']|[\"']({names})[\"']\s*[!=]=\s*\w*kind")
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if p.parent.name != "kinds"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if switches.search(line)
    ]
    assert not offenders, offenders


def test_the_checks_see_real_violations(tmp_path):
    """The checks catch what they look for (they are not vacuous)."""
    from fxlora.kinds import registered_kinds

    names = "|".join(kind.name for kind in registered_kinds())
    switches = re.compile(rf"kind(\.name)?\s*[!=]=\s*[\"']({names})[\"']")
    assert switches.search('if meta.kind == "embedding":') and not switches.search('if kind == "call_module":')
    known = {"fxlora.io.a": tmp_path / "a.py", "fxlora.model.b": tmp_path / "b.py"}
    (tmp_path / "a.py").write_text("from fxlora.model.b import thing\n")
    (tmp_path / "b.py").write_text("from fxlora.io.a import other\n")
    deps = imports_at_load(known["fxlora.io.a"], known)
    assert deps == {"fxlora.model.b"} and "model" not in ALLOWED["io"]
