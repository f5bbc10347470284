#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree into vendor/llama.cpp and apply vendor/patches.

The source comes from the package registry (the llama.cpp submodule inside a PyPI
sdist named in vendor/llama.cpp.pin), is checked against the pinned sha256, and is
extracted without any of the sdist's other files. Patches in vendor/patches/*.patch
are applied in name order. A stamp file records the pin and the patch hashes so a
re-run is a no-op unless something changed.

Usage: python scripts/fetch_llama_cpp.py [--force] [--sdist PATH] [--dest DIR --no-patches]

--dest DIR --no-patches extracts the pristine tree elsewhere (the upstream reference that
scripts/build_upstream.sh builds for side-by-side benchmarks).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor"
PIN_FILE = VENDOR / "llama.cpp.pin"
PATCH_DIR = VENDOR / "patches"
DEST = VENDOR / "llama.cpp"
STAMP = DEST / ".pyllama-mtp-stamp"


def read_pin() -> dict[str, str]:
    pin = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def stamp_text(pin: dict[str, str], with_patches: bool = True) -> str:
    lines = [f"sdist {pin['package']}=={pin['version']} sha256 {pin['sha256']}"]
    lines += [f"patch {p.name} {sha256_of(p)}" for p in patches()] if with_patches else ["no patches"]
    return "\n".join(lines) + "\n"


def download_sdist(pin: dict[str, str], workdir: Path) -> Path:
    cache = Path(os.environ.get("PYLLAMA_MTP_SDIST_CACHE", ROOT / ".cache" / "sdist"))
    cache.mkdir(parents=True, exist_ok=True)
    for cached in cache.glob(f"*{pin['version']}.tar.gz"):
        if sha256_of(cached) == pin["sha256"]:
            return cached
    args = ["download", "--no-deps", "--no-binary", pin["package"], f"{pin['package']}=={pin['version']}",
            "-d", str(workdir)]
    # Inside pip's isolated build environment PYTHONPATH hides the interpreter's own
    # pip; the download needs the real one.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    for launcher in ([sys.executable, "-m", "pip"], [shutil.which("pip3") or "pip3"], [shutil.which("pip") or "pip"]):
        try:
            if subprocess.run(launcher + args, env=env).returncode == 0:
                break
        except OSError:
            continue
    else:
        raise SystemExit("could not download the pinned llama.cpp sdist with pip; "
                         "run `python scripts/fetch_llama_cpp.py` with network access first")
    found = list(workdir.glob("*.tar.gz"))
    if len(found) != 1:
        raise SystemExit(f"expected one sdist from pip download, found {found}")
    shutil.copy2(found[0], cache / found[0].name)
    return cache / found[0].name


def extract_subdirectory(sdist: Path, subdirectory: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rest = m.name.partition("/")
            if not rest.startswith(subdirectory + "/"):
                continue
            rel = rest[len(subdirectory) + 1:]
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            m.name = rel
            members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    # Fresh mtimes: a file that goes back to an older version (a patch removed) must still
    # look newer than the objects built from the patched one, or the build keeps them.
    for path in tmp.rglob("*"):
        if path.is_file():
            os.utime(path)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def apply_patches(dest: Path) -> None:
    for patch in patches():
        print(f"applying {patch.name}", file=sys.stderr)
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                       cwd=dest, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-extract even if up to date")
    ap.add_argument("--sdist", type=Path, help="use this sdist instead of downloading")
    ap.add_argument("--dest", type=Path, default=DEST, help=f"where to extract (default: {DEST})")
    ap.add_argument("--no-patches", action="store_true", help="leave the tree as upstream ships it")
    args = ap.parse_args()
    if args.no_patches and args.dest.resolve() == DEST.resolve():
        raise SystemExit("--no-patches needs --dest: the package is always built from the patched tree")
    pin = read_pin()
    dest, stamp = args.dest, args.dest / STAMP.name
    want = stamp_text(pin, with_patches=not args.no_patches)
    if not args.force and stamp.exists() and stamp.read_text() == want:
        return 0
    with tempfile.TemporaryDirectory() as work:
        sdist = args.sdist or download_sdist(pin, Path(work))
        digest = sha256_of(sdist)
        if digest != pin["sha256"]:
            raise SystemExit(f"{sdist}: sha256 {digest} does not match the pin {pin['sha256']}")
        extract_subdirectory(sdist, pin["subdirectory"], dest)
    if not args.no_patches:
        apply_patches(dest)
    stamp.write_text(want)
    print(f"llama.cpp {pin['upstream_commit']} ready in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
