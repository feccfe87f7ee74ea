"""The package's import structure: no circles, every module imports only its own floor or below, and only
the command line (mobilellm.commands, mobilellm.cli) parses arguments. docs/architecture.md draws it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mobilellm"

# Floors, bottom up: a module may import modules of its own floor or a lower one. Keys are top-level
# modules or packages of mobilellm.
FLOORS = [
    {"errors", "fileio", "sysinfo", "precision"},
    {"config", "chat_template", "tokenizer"},
    {"model", "quantize"},
    {"checkpoint"},
    {"data", "inference", "export", "convert"},
    {"train"},
    {"eval", "study_curve"},
    {"finetune", "study", "quickstart", "bench", "info", "serve"},
    {"commands", "cli", "__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
COMMAND_LINE = {"commands", "cli", "__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every mobilellm module this file imports, at module level or inside functions."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mobilellm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "mobilellm":
                continue
            for alias in node.names:  # `from mobilellm.eval import tasks` imports the module mobilellm.eval.tasks
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m in MODULES}


FILES = {module_name(p): p for p in SRC.rglob("*.py")}
MODULES = set(FILES)
GRAPH = {name: imports(path) - {name} for name, path in FILES.items()}


def top(name: str) -> str:
    return name.split(".")[1] if "." in name else "__init__"


def test_every_module_has_a_floor():
    missing = sorted({top(m) for m in MODULES} - set(FLOOR) - {"__init__"})
    assert not missing, f"add these to FLOORS in tests/test_layering.py: {missing}"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if top(m) != "__init__" and top(d) != "__init__" and FLOOR[top(d)] > FLOOR[top(m)])


def test_no_import_circles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_import_only_their_floor_or_below():
    upward = upward_imports(GRAPH)
    assert not upward, "imports of a higher floor: " + ", ".join(upward)


def test_only_the_command_line_parses_arguments():
    offenders = []
    for name, path in FILES.items():
        if top(name) in COMMAND_LINE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == "argparse":
                offenders.append(name)
            elif isinstance(node, ast.FunctionDef) and node.name == "register":
                offenders.append(f"{name}.register")
    assert not offenders, f"command-line code outside mobilellm.commands: {sorted(set(offenders))}"


def test_the_checks_catch_what_they_look_for():
    graph = {"mobilellm.model": {"mobilellm.checkpoint"}, "mobilellm.checkpoint": {"mobilellm.model"},
             "mobilellm.config": {"mobilellm.commands.generate"}, "mobilellm.commands.generate": set()}
    assert find_cycles(graph) == [["mobilellm.checkpoint", "mobilellm.model", "mobilellm.checkpoint"]]
    assert upward_imports(graph) == ["mobilellm.config -> mobilellm.commands.generate",
                                     "mobilellm.model -> mobilellm.checkpoint"]
