"""The source layout's rules (docs/layout.md): no import circles, each layer imports only those below it,
and nothing outside models/ asks a model's class or internals, nothing outside teacher/ a teacher's."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gkd"

# what each package may import from gkd (besides errors, and itself); train/ and the commands sit on top
BELOW = {
    "models": {"losses", "hub", "data", "machine", "models"},
    "data": {"hub", "data"},
    "parallel": {"models", "data", "losses", "parallel"},
    "teacher": {"models", "data", "losses", "parallel", "httpclient", "evaluate", "config", "atomic", "teacher"},
    "rollout": {"models", "data", "parallel", "httpclient", "machine", "rollout"},
}


def _imports() -> dict[str, set[str]]:
    """module (dotted, under gkd) -> the gkd modules it imports, lazy imports included."""
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gkd"):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("gkd")}
        graph[name] = targets - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_circle_between_modules_or_packages():
    graph = _imports()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    packages: dict[str, set[str]] = {}
    for m, targets in graph.items():
        packages.setdefault(_package(m), set()).update(_package(t) for t in targets if _package(t) != _package(m))
    assert _cycle(packages) is None, "package circle: " + " -> ".join(_cycle(packages))


def test_each_layer_imports_only_the_layers_below():
    wrong = [f"{m} imports {t}" for m, targets in _imports().items() if _package(m) in BELOW
             for t in targets if _package(t) not in BELOW[_package(m)] | {"errors"}]
    assert not wrong, wrong


def test_no_teacher_or_model_class_checks_outside_their_packages():
    """Only teacher/ names its classes (train/build.py makes them) and reaches into a teacher's model; only
    models/ reads a model's class name or expert shapes: the rest asks the protocol or the adapter."""
    wrong = []
    for path in SRC.rglob("*.py"):
        where, package = path.relative_to(SRC), path.relative_to(SRC).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if package != "teacher" and name in ("LocalTeacher", "RemoteTeacher") and str(where) != "train/build.py":
                wrong.append(f"{where}:{node.lineno} names {name}")
            if (package != "teacher" and isinstance(node, ast.Attribute) and node.attr == "model"
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "teacher"):
                wrong.append(f"{where}:{node.lineno} reaches into the teacher's model")
            model_class = name == "__name__" and "unwrap(" in ast.unparse(node)
            expert_shape = name == "gate_up_proj" and str(where) != "parallel/expert.py"  # EP splits these tensors
            if package != "models" and (model_class or expert_shape):
                wrong.append(f"{where}:{node.lineno} reads a model's internals ({ast.unparse(node)})")
    assert not wrong, wrong


def test_the_trainer_only_loops():
    tree = ast.parse((SRC / "train" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 200
