"""Layer contracts at run time: align and rewards import with torch alone, never ray, vllm or deepspeed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_packages_do_not_import_heavy_runtimes() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import align, rewards
        for pkg in (align, rewards):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(info.name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "vllm", "deepspeed"})
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"align/rewards imported: {out.stdout.strip()}"
