"""The package's rooms depend on each other one way only, and the GPU kernels live in one room.

Layers, lowest first: base modules (errors, atomic, eviction) < kernels < runtime < profiles <
exporter < trt_plugins < backends < serving, bench and the command line (DESIGN.md's room table).
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "baklava"


def _room_imports() -> dict[str, dict[str, set[str]]]:
    """``{room: {imported room: {file, ...}}}`` over every import, top-level or inside a function."""
    edges: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        room = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baklava"):
                segments = node.module.split(".")
                targets = [segments[1]] if len(segments) > 1 else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("baklava.")]
            else:
                continue
            for target in targets:
                if target != room:
                    edges[room][target].add(path.name)
    return edges


def test_no_two_rooms_import_each_other():
    edges = _room_imports()
    cycles = [
        (a, b, sorted(files), sorted(edges[b][a]))
        for a in edges
        for b, files in edges[a].items()
        if a < b and a in edges.get(b, {})
    ]
    assert cycles == []
    assert "kernels" in edges["runtime"] and "kernels" in edges["trt_plugins"]  # both use the one room


def test_lower_rooms_do_not_reach_up():
    edges = _room_imports()
    above = {
        "kernels": {"runtime", "profiles", "exporter", "trt_plugins", "backends", "serving", "bench", "cli"},
        "runtime": {"profiles", "exporter", "trt_plugins", "backends", "serving", "bench", "cli"},
        "exporter": {"trt_plugins", "backends", "serving", "bench", "cli"},
        "serving": {"cli", "bench"},
    }
    for room, forbidden in above.items():
        assert not forbidden & set(edges[room]), (
            room,
            {t: edges[room][t] for t in forbidden & set(edges[room])},
        )


def test_triton_kernels_live_in_the_kernels_room_or_the_plugins():
    """The runtime's kernels are in ``kernels/``; ``trt_plugins/`` holds only the ahead-of-time
    variants TensorRT's plugins launch (``aot_*``) and the glue."""
    holders = {
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "@triton.jit" in path.read_text()
    }
    assert holders, "no kernels found: the scan is broken"
    stray = {h for h in holders if not (h.startswith("kernels/") or h.startswith("trt_plugins/aot_"))}
    assert stray == set()
