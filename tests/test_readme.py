"""The README's usage example, as printed there, runs and reaches the residual it claims."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        if "import torch" in block and importlib.util.find_spec("torch") is None:
            continue  # the PyTorch example needs the optional extra; the others still run
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    residual = float(re.search(r"relative residual ([0-9.eE+-]+)", out).group(1))
    assert residual <= 1e-10
