"""Memory the CPU backend allocates for large buffers asks for transparent huge pages (patch
0020): a one-token decode reads every weight once, and with 4 KiB pages the TLB misses cost
up to 12% of a decode where the system grants huge pages only on madvise."""
from __future__ import annotations

import json
import sys

import pytest

import factories as testing
from conftest import run_isolated

LIST_ADVISED = """
import json, re

def advised_mib():
    '''Sizes (MiB) of this process's mappings of 16 MiB or more that asked for huge pages.'''
    sizes, size = [], 0
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
        elif line.startswith("VmFlags:") and " hg" in line and size >= 16 << 20:
            sizes.append(size >> 20)
    return sizes

from pyllama_mtp.config import ModelConfig
from pyllama_mtp.engine import Model
before = advised_mib()
with Model(ModelConfig({path!r}, use_mmap=False)) as m:
    print(json.dumps([before, advised_mib()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_a_model_loaded_without_mmap_asks_for_huge_pages(tmp_path):
    path = testing.write_step35(tmp_path / "m.gguf", seed=1, n_embd=512, n_head=8, n_head_kv=2, head_dim=64)
    assert path.stat().st_size > 24 << 20
    proc = run_isolated(LIST_ADVISED.format(path=str(path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [] and after, f"advised mappings before / after loading: {before} / {after}"
