"""The project's own loads never unpickle: every torch.load in lamda_pipe passes
weights_only=True, and nothing calls pickle.load(s), numpy.load with allow_pickle or
torch.jit.load. (Resuming goes through DeepSpeed's load_checkpoint, which does unpickle:
docs/errors.md and the README say to resume only checkpoints you trust.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "lamda_pipe"


def unsafe_loads(source: str, name: str) -> list[str]:
    """'file:line call' for each load in `source` that could unpickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        call = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if call.endswith("torch.load"):
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{name}:{node.lineno} {call}")
        elif call in ("pickle.load", "pickle.loads", "torch.jit.load", "cloudpickle.load"):
            found.append(f"{name}:{node.lineno} {call}")
        elif call.endswith("np.load") or call.endswith("numpy.load"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{name}:{node.lineno} {call}")
    return found


def test_no_load_in_the_package_can_unpickle():
    found = [hit for path in sorted(PACKAGE.rglob("*.py"))
             for hit in unsafe_loads(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert found == []


def test_the_check_sees_an_unsafe_load():
    assert unsafe_loads("import torch\nx = torch.load(p)\n", "f.py") == ["f.py:2 torch.load"]
    assert unsafe_loads("x = torch.load(p, weights_only=False)\n", "f.py") == ["f.py:1 torch.load"]
    assert unsafe_loads("x = torch.load(p, map_location='cpu', weights_only=True)\n", "f.py") == []
    assert unsafe_loads("import pickle\npickle.loads(b)\n", "f.py") == ["f.py:2 pickle.loads"]
    assert unsafe_loads("np.load(p, allow_pickle=True)\n", "f.py") == ["f.py:1 np.load"]
