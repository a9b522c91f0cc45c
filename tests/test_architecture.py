"""The arrows of docs/architecture.md that import-linter cannot state: no module imports a private name (``_x``)
or a private module of another package. (Layers and circles: the contracts in pyproject.toml, run by
``lint-imports`` in the test command and by the test below.)"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "featstore", "heads", "bench")


def _private(parts: list[str]) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def private_imports() -> list[str]:
    """``file:line: what`` for every import of a private module or name of another package."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    parts = node.module.split(".")
                    if parts[0] not in PACKAGES or parts[0] == package:
                        continue
                    names = [a.name for a in node.names]
                    if _private(parts[1:]) or any(_private([n]) for n in names):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import "
                                     f"{', '.join(names)}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        parts = alias.name.split(".")
                        if parts[0] in PACKAGES and parts[0] != package and _private(parts[1:]):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}")
    return found


def test_no_private_imports_across_packages():
    assert private_imports() == []


def test_private_import_check_finds_one(tmp_path, monkeypatch):
    """The scanner itself: a planted cross-package private import is reported."""
    fake = tmp_path / "bench"
    fake.mkdir()
    (fake / "x.py").write_text("from extract.train import _hidden\nimport heads._impl\nfrom bench.y import _ok\n")
    for other in ("extract", "featstore", "heads"):
        (tmp_path / other).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = private_imports()
    assert len(found) == 2 and "_hidden" in found[0] and "heads._impl" in found[1]


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install '.[test]')")
def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python\n") and "register_head" in b
            or b.startswith("python\n") and "def run(" in b]


def test_architecture_examples_run(tmp_path):
    """The smallest complete head and protocol of docs/architecture.md work as printed."""
    from featstore.store import FeatureStore, Layout
    from heads.base import HEADS

    head_src, protocol_src = _doc_blocks()
    try:
        exec(compile(head_src, "architecture.md:head", "exec"), {})
        namespace: dict = {}
        exec(compile(protocol_src, "architecture.md:protocol", "exec"), namespace)
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(4, 8)) * 4
        labels = np.repeat(np.arange(4), 25)
        x = (centres[labels] + rng.normal(size=(100, 8))).astype(np.float32)
        path = tmp_path / "s.zarr"
        store = FeatureStore.create(path, Layout(n=len(labels), dim=8, dtype="float32", chunk_rows=64),
                                    fingerprint={"model": "doc-test"}, classes=[f"c{i}" for i in range(4)],
                                    labels=labels, ids=[f"s{i}" for i in range(len(labels))])
        for c in range(store.n_chunks):
            lo, hi = store.chunk_range(c)
            store.write_chunk(c, x[lo:hi])
        store.close()
        res = namespace["run"](str(path), folds=3, out=tmp_path / "out")
        assert 0.9 < res["centroid"]["acc"] <= 1.0   # four well separated clusters
        assert (tmp_path / "out" / "results.json").is_file()
    finally:
        HEADS.pop("centroid", None)
