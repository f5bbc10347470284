"""Checks on an output path that every writing tool makes before it reads gigabytes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InvalidArgumentError, PmtpError


def check_output(out: Path, inputs: tuple[Path, ...], overwrite: bool) -> None:
    if out.is_dir():
        raise InvalidArgumentError(f"{out}: is a directory; pass a file name, e.g. -o {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"{out.parent}: no such directory; create it or choose another -o path")
    if not out.exists():
        return
    if any(os.path.samefile(out, p) for p in inputs if Path(p).exists()):
        raise InvalidArgumentError(f"{out}: is one of the input files; choose another -o path")
    if not overwrite:
        raise InvalidArgumentError(f"{out}: already exists; pass --force to replace it")


def check_space(out: Path, needed: int) -> None:
    """Fail before writing gigabytes, not after."""
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise PmtpError(f"{out.parent}: {needed / 2**30:.2f} GiB needed for {out.name} but {free / 2**30:.2f} GiB "
                        "free; free some space or write elsewhere with -o")


def partial_path(out: Path) -> Path:
    """A hidden name next to out: renaming it is atomic, and a crash leaves no file
    that looks like a model."""
    return out.with_name(f".{out.name}.{os.getpid()}.partial")
