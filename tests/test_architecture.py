"""The package's data flow, as its imports: slide → tissue → tiling → model/inference → stitching → writers →
statistics, with torch-free contracts at the bottom and the command line at the top. A module imports only
modules of its own layer or of layers upstream (earlier in LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import wsiseg

PKG = Path(wsiseg.__file__).parent

LAYERS = [
    {"errors", "atomic", "timing", "card", "detections", "features"},  # contracts and helpers, torch-free
    {"slide"},
    {"tissue"},
    {"tiling"},
    {"model", "pretrained", "stitching"},  # the network and its ImageNet start; the seam rule (torch-free)
    {"inference"},
    {"cells", "outputs", "stats"},  # cells around nuclei, writers and slide statistics (torch-free)
    {"sink", "parts"},  # the writing side of a run; the journal of finished parts (torch-free)
    {"pipeline"},
    {"batch"},
    {"datasets", "augment", "evaluation"},
    {"training", "calibration"},
    {"cli"},
]


def _imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsiseg."):
            deps.add(node.module.split(".")[1])
    return deps - {"__version__"}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    placed = set().union(*LAYERS)
    assert modules == placed, f"unplaced: {modules - placed}, gone: {placed - modules}"


def test_modules_import_only_upstream():
    layer = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    wrong = []
    for p in PKG.glob("*.py"):
        if p.stem in ("__init__", "__main__"):
            continue
        for dep in _imports(p):
            if dep in layer and layer[dep] > layer[p.stem]:
                wrong.append(f"{p.stem} (layer {layer[p.stem]}) imports {dep} (layer {layer[dep]})")
    assert not wrong, wrong


def test_torch_free_layers_do_not_import_torch():
    torch_free = LAYERS[0] | {"slide", "tissue", "tiling", "stitching", "cells", "outputs", "stats", "sink", "parts"}
    for m in torch_free:
        tree = ast.parse((PKG / f"{m}.py").read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "torchvision"}, m
