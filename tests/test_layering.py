"""The package's layers: a lower layer never imports a higher one (also inside functions).

``types`` < ``geometry`` / ``curves`` < ``perfusion`` / ``models`` (pure torch/numpy: no Lightning, Hydra) < ``io``
< ``data``; the CLIs and the LightningModule on top may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stm_dlp

ROOT = Path(stm_dlp.__file__).parent
RANK = {"types": 0, "geometry": 1, "curves": 1, "perfusion": 2, "models": 2, "io": 3, "data": 4}
PURE = {"types", "geometry", "curves", "perfusion", "models"}  # may not use the training / config stack
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").parts[0]


def test_lower_layers_never_import_higher_ones():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = _layer(path)
        if layer not in RANK:
            continue
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "stm_dlp" and len(parts) > 1:
                target = parts[1]
                if target != layer and RANK.get(target, 99) >= RANK[layer]:
                    problems.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {module}")
            elif layer in PURE and parts[0] in FRAMEWORKS:
                problems.append(f"{path.relative_to(ROOT)}:{line} ({layer}, pure) imports {module}")
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_the_check_sees_a_violation(tmp_path):
    """The scan catches an import inside a function (so the test above can fail)."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from stm_dlp.data.dicom import read_dicom_study\n", encoding="utf-8")
    assert _imports(bad) == [(2, "stm_dlp.data.dicom")]
