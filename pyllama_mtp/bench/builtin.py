"""Built-in benchmark models, generated on first use by the tiny-model factory and
cached on disk (no download): ``tiny:<name>``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import tiny_models as testing

# name -> (factory, keyword arguments); oracle models have MTP heads that agree with
# the trunk's next prediction on the given fraction of tokens.
_MODELS = {
    "tiny:step35": ("step35", dict(oracle=True, acceptance=0.9, seed=1, **testing.oracle_size_for(64e6))),
    "tiny:step35-a0.6": ("step35", dict(oracle=True, acceptance=0.6, seed=1, **testing.oracle_size_for(64e6))),
    "tiny:step35-a0.3": ("step35", dict(oracle=True, acceptance=0.3, seed=1, **testing.oracle_size_for(64e6))),
    "tiny:step35-1g": ("step35", dict(oracle=True, acceptance=0.9, seed=1, **testing.oracle_size_for(1.1e9))),
    "tiny:step35-random": ("step35", dict(seed=1)),
    "tiny:llama": ("llama", dict(seed=1)),
}
NAMES = tuple(_MODELS)


def cache_dir() -> Path:
    base = os.environ.get("PYLLAMA_MTP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyllama-mtp")
    return Path(base) / "models"


def resolve(name: str, progress=lambda text: None) -> str:
    """A path for ``name``: a built-in model (written once) or the name itself."""
    if name not in _MODELS:
        if name.startswith("tiny:"):
            raise FileNotFoundError(f"unknown built-in model {name!r}; choose one of {', '.join(NAMES)}")
        return name
    kind, kwargs = _MODELS[name]
    tag = repr(sorted(kwargs.items())) + testing.FACTORY_VERSION
    digest = hashlib.sha256(tag.encode()).hexdigest()[:12]
    path = cache_dir() / f"{name.replace(':', '-')}-{digest}.gguf"
    if not path.exists():
        progress(f"writing built-in model {name} to {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        writer = testing.write_step35 if kind == "step35" else testing.write_llama
        writer(tmp, **kwargs)
        os.replace(tmp, path)
    return str(path)


def max_draft(path: str) -> int:
    """The longest draft the file supports: its chained head count, 4 for a single
    head, 0 without MTP tensors."""
    from ..config import ModelConfig
    from ..engine import Model
    with Model(ModelConfig(path, load_mtp=False)) as m:
        n = m.info.n_layer_mtp if m.info.has_mtp_tensors else 0
    return 0 if n == 0 else (n if n > 1 else 4)


def default_drafts(path: str) -> list[int | str]:
    """0,1,2,3 (capped at the model's MTP head count) and auto when the file has MTP
    layers, else 0."""
    fixed: list[int | str] = list(range(0, min(max_draft(path), 3) + 1))
    return fixed + ["auto"] if len(fixed) > 1 else fixed
