"""The only module that touches cffi: loads libpmtp, declares its ABI from the
marked region of ``pmtp.h``, and turns status codes into exceptions.

ABI mode (``ffi.dlopen``) means no compiled extension module: one wheel serves
every CPython version.
"""
from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

from cffi import FFI

from . import errors

_CDEF_BEGIN = "/* --- cffi cdef begin --- */"
_CDEF_END = "/* --- cffi cdef end --- */"

_STATUS_ERRORS = {
    1: errors.InvalidArgumentError,
    2: errors.ModelLoadError,
    3: errors.ContextFullError,
    4: errors.DecodeError,
    5: errors.MtpError,
    6: errors.SwaGuardError,
    7: errors.OutOfMemoryError,
    8: errors.AbortedError,
    9: errors.InternalError,  # a buffer too small is our bug, not the caller's
    10: errors.InternalError,
    11: errors.RpcError,
}

log = logging.getLogger("pyllama_mtp.llama_cpp")
# Quiet unless the application configures logging (or Llama(verbose=True) does).
log.addHandler(logging.NullHandler())
# ggml_log_level -> logging level
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


def _lib_dir() -> Path:
    override = os.environ.get("PYLLAMA_MTP_LIB_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("pyllama_mtp") / "lib"))


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libpmtp.dylib"
    if sys.platform == "win32":
        return "pmtp.dll"
    return "libpmtp.so"


def _read_cdef(header: Path) -> str:
    text = header.read_text()
    start, end = text.index(_CDEF_BEGIN), text.index(_CDEF_END)
    return text[start + len(_CDEF_BEGIN):end].replace("PMTP_API ", "")


def _find_header(lib_dir: Path) -> Path:
    for candidate in (lib_dir / "pmtp.h", Path(__file__).resolve().parent.parent / "csrc" / "pmtp.h"):
        if candidate.exists():
            return candidate
    raise ImportError(f"pmtp.h not found next to the native library in {lib_dir}")


def _load():
    lib_dir = _lib_dir()
    path = lib_dir / _lib_name()
    if not path.exists():
        raise ImportError(
            f"native library {path} is missing: pyllama_mtp was not built. "
            "Install it with `pip install .` from the source tree (it compiles llama.cpp), "
            "or set PYLLAMA_MTP_LIB_DIR to a directory holding libpmtp.")
    ffi = FFI()
    ffi.cdef(_read_cdef(_find_header(lib_dir)))
    return ffi, ffi.dlopen(str(path))


ffi, lib = _load()

@ffi.callback("void(int, const char *, void *)")
def _on_log(level, text, _user):
    py_level = _LOG_LEVELS.get(level, logging.INFO)
    if log.isEnabledFor(py_level):
        log.log(py_level, "%s", ffi.string(text).decode("utf-8", "replace"))


lib.pmtp_set_log_callback(_on_log, ffi.NULL)


def last_error() -> str:
    return ffi.string(lib.pmtp_last_error()).decode("utf-8", "replace")


def check(status: int, context: str = "") -> None:
    """Raise the exception for a non-zero status, with the native message."""
    if status == 0:
        return
    message = last_error() or f"status {status}"
    if context:
        message = f"{context}: {message}"
    raise _STATUS_ERRORS.get(status, errors.InternalError)(message)


def read_string(fn, *args) -> str:
    """Call ``fn(*args, buf, cap, n_out)`` growing the buffer until it fits."""
    cap = 4096
    n_out = ffi.new("size_t *")
    while True:
        buf = ffi.new("char[]", cap)
        status = fn(*args, buf, cap, n_out)
        if status == 9 and n_out[0] + 1 > cap:
            cap = n_out[0] + 1
            continue
        check(status)
        return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")
