"""What a test that compiles from this checkout needs (the source it builds, the tools), as
one skip reason; shared by the tests that build llama.cpp in other configurations."""
from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHED_TREE = ROOT / "vendor" / "llama.cpp" / "CMakeLists.txt"


def build_blocker(tools: tuple[str, ...] = ("cmake", "ninja"), needs: Path = PATCHED_TREE,
                  hint: str = "") -> str | None:
    """Why the build cannot run here (None: it can): ``needs`` is missing (an installed
    package without its source), or one of ``tools`` is not on PATH (``hint``: how to get it)."""
    if not needs.exists():
        return f"{needs.relative_to(ROOT)} is not here (an installed package without its source)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"no {tool}" + (f" ({hint})" if hint else "")
    return None
