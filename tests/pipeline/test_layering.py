"""The pipeline's layering as folder rules, read from the source with ``ast`` (function-level imports too):

    front door (cli, commands/, demo)
      -> wings: train/, oof/, inference/   (a wing never imports another wing)
        -> predictions/  -> data/  -> core/  -> smp_unet3p

Nothing imports a layer above its own, there is no import cycle, and no module grows past ``MAX_LINES``.
"""

from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "competition"
LAYERS = {"cli": 4, "commands": 4, "demo": 4, "train": 3, "oof": 3, "inference": 3, "predictions": 2,
          "data": 1, "core": 0}  # fmt: skip
WINGS = {"train", "oof", "inference"}
MAX_LINES = 420  # ~400; coco.py (every COCO quirk validated) is the longest


def import_graph(package: Path) -> dict[str, set[str]]:
    """``module -> modules of the same package it imports`` (dotted names relative to the package)."""
    import ast

    modules = {
        ".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                stem = base + (node.module.split(".") if node.module else [])
                targets = [".".join(stem + [a.name]) for a in node.names] + [".".join(stem)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name + "."):
                stem = node.module.split(".")[1:]
                targets = [".".join(stem + [a.name]) for a in node.names] + [".".join(stem)]
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package.name + ".")
                ]
            # "from .data.coco import load_coco" names the module data.coco, not data.coco.load_coco
            found |= {next((t for t in _prefixes(target) if t in modules), "") for target in targets}
        graph[name] = {m for m in found if m and m != name}
    return graph


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def folder(module: str) -> str:
    return module.split(".")[0]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break the folder rules: into a higher layer, or from one wing into another. A module
    outside every known folder is a violation too (each module lives in a tier)."""
    found = []
    for module, imports in graph.items():
        if module == "__init__":  # the package itself
            continue
        if folder(module) not in LAYERS:
            found.append(f"{module} is in no tier ({sorted(LAYERS)})")
        for target in imports:
            a, b = folder(module), folder(target)
            if not target or a not in LAYERS or b not in LAYERS:
                continue
            if LAYERS[b] > LAYERS[a] or (a in WINGS and b in WINGS and a != b):
                found.append(f"{module} imports {target}")
    return sorted(found)


def test_the_checker_sees_cycles_upward_imports_and_wings_importing_wings(tmp_path):
    pkg = tmp_path / "competition"
    for sub in ("core", "data", "train", "inference"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..core.checkpoint import load\n")
    (pkg / "core" / "checkpoint.py").write_text("def f():\n    from ..train.loop import build_model\n")
    (pkg / "inference" / "predict.py").write_text("from ..core import checkpoint\nfrom ..train.loop import x")
    splits = "from ..core.runtime import x\nfrom competition.data.coco import y"
    (pkg / "data" / "splits.py").write_text(splits)
    (pkg / "core" / "runtime.py").write_text("")
    (pkg / "data" / "coco.py").write_text("")
    (pkg / "stray.py").write_text("")
    graph = import_graph(pkg)
    assert graph["data.splits"] == {"core.runtime", "data.coco"}
    assert graph["inference.predict"] == {"core", "core.checkpoint", "train.loop"}
    assert find_cycle(graph) in (["core.checkpoint", "train.loop", "core.checkpoint"],
                                 ["train.loop", "core.checkpoint", "train.loop"])  # fmt: skip
    assert violations(graph) == [
        "core.checkpoint imports train.loop", "inference.predict imports train.loop",
        f"stray is in no tier ({sorted(LAYERS)})",
    ]


def test_competition_keeps_its_tiers_and_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"core.runtime", "train.loop", "inference.predict", "core.checkpoint", "data.splits"} <= set(graph)
    assert find_cycle(graph) is None
    assert violations(graph) == []


def test_files_stay_readable():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
