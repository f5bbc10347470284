"""Model and process factories for the tests (and the benchmark scripts that need them):
everything of :mod:`pyllama_mtp.tiny_models`, which the package ships for its built-in
benchmark models, plus what only tests use: the qwen35 and glm4moe layouts, broken files,
Hugging Face checkpoints (``hf_checkpoint``) and local RPC workers (``rpc_local``)."""
from pyllama_mtp.tiny_models import *  # noqa: F401,F403
from pyllama_mtp.tiny_models import _step35_bytes  # noqa: F401

from .broken import write_broken  # noqa: F401
from .glm4moe import write_glm4moe  # noqa: F401
from .qwen35 import write_qwen35  # noqa: F401
