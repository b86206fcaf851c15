"""The layout keeps its promises: stages are entry points over the table2text library, imports flow one way,
bench measures through public functions, and no function grows past a screen without saying why."""

import ast

from import_graph import ROOT, graph

STAGES = {"preprocess", "train", "merge", "evaluate", "export", "infer", "score", "error_analysis", "pull"}
LONG_FUNCTION = 80  # lines; a longer one says why in a comment starting "# long:" on its first lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), i.e. each import circle."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_stages_holds_only_the_entry_points():
    found = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert found == STAGES


def test_no_stage_imports_another_stage_and_the_library_imports_no_stage():
    edges = graph()
    wrong = [(m, i) for m, imports in edges.items() for i in imports
             if i.startswith("stages.") and (m.startswith("stages.") or m.startswith("table2text"))]
    assert not wrong, wrong
    assert not [(m, i) for m, imports in edges.items() if m.startswith("table2text")
                for i in imports if i.startswith("bench")]


def test_the_import_graph_has_no_circle():
    assert cycles(graph()) == []


def test_bench_uses_only_public_names_of_the_project():
    private = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("stages", "table2text", "bench"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_no_function_of_the_stages_or_the_library_is_long_without_a_reason():
    long = []
    for path in sorted([*(ROOT / "stages").glob("*.py"), *(ROOT / "table2text").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                head = "\n".join(lines[node.lineno - 1: node.lineno + 6])
                if size > LONG_FUNCTION and "# long:" not in head:
                    long.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name} ({size} lines)")
    assert not long, long
