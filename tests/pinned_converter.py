"""Run the pinned llama.cpp converter (vendor/llama.cpp/convert_hf_to_gguf.py) on a tiny
checkpoint from tests/factories/hf_checkpoint.py, in a subprocess, with two stand-ins:

* transformers' AutoConfig is made to fail, so the converter reads config.json as shipped.
  transformers >= 5.23 knows step3p5 and renames the original keys the converter looks up
  (num_attention_groups, moe_num_experts, ...), which makes it fail with KeyError; with an
  older transformers it reads config.json this way anyway.
* Step35Model.set_vocab writes the test vocabulary: the tiny checkpoints have no Hugging
  Face tokenizer, and the converter identifies real tokenizers by hashing their output.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp"
SCRIPT = VENDOR / "convert_hf_to_gguf.py"

_SHIM = textwrap.dedent("""
    import runpy, sys
    vendor = sys.argv.pop(1)
    sys.path.insert(0, sys.argv.pop(1))   # the tests directory: factories
    sys.path[:0] = [vendor, vendor + "/gguf-py"]
    import transformers

    def no_auto_config(*args, **kwargs):
        raise ValueError("read config.json as shipped")

    transformers.AutoConfig.from_pretrained = no_auto_config
    from conversion.step3 import Step35Model
    from factories.hf_checkpoint import add_tokenizer
    Step35Model.set_vocab = lambda self: add_tokenizer(self.gguf_writer)
    sys.argv[0] = vendor + "/convert_hf_to_gguf.py"
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def missing() -> str | None:
    """Why the converter cannot run here (None: it can)."""
    if not SCRIPT.is_file():
        return f"no pinned llama.cpp tree at {VENDOR} (an installed package without its source tree)"
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"the converter needs {module} (pip install '.[parity]')"
    return None


def convert(src_dir, out, *, outtype: str = "f32", split: str | None = None) -> Path:
    """split: None (trunk and MTP in one file), "mtp" (--mtp) or "trunk" (--no-mtp)."""
    flags = {None: [], "mtp": ["--mtp"], "trunk": ["--no-mtp"]}[split]
    tests_dir = str(Path(__file__).resolve().parent)
    cmd = [sys.executable, "-c", _SHIM, str(VENDOR), tests_dir, str(src_dir), "--outfile", str(out), "--outtype", outtype,
           *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"converter failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return Path(out)
