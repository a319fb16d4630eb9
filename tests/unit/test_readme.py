"""The README's Python snippets run as written (in a fresh interpreter: they register names globally)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "make quickstart" in text
    assert "make test" in text


def test_readme_python_snippets_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    checks = (
        "\nassert spec.policy_loss == 'sign_pg'\nassert mine.policy_loss == 'cispo'\n"
        "assert loss.dim() == 0 and logp.grad is not None\n"
        "assert scores.total.tolist() == [1.0] and scores.valid.tolist() == [True]\nprint('readme ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", "\n".join(blocks) + checks], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "readme ok" in out.stdout
