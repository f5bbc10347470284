"""Llama: prompts, chat templates, streaming, OpenAI-shaped results.

A call runs one sequence through the library's driver (``sequence``): its prompt goes to
the slot whose KV cache holds the longest prefix of it, then one *step* at a time (a plain
one-token decode, or a whole MTP draft/verify cycle) turns into text. Every token except
the newest one is in the KV cache; the slot's record of it stays exact even when a
consumer stops a stream early, so the next call can reuse the common prompt prefix.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Sequence as SequenceType

from . import openai_shapes
from .call_gate import CallGate
from .chat import DEFAULT_CHAT_TEMPLATE, render_chat
from .config import ContextConfig, ModelConfig, SamplingParams
from .engine import Model, Session, build_info
from .errors import ClosedError, ContextFullError, InvalidArgumentError, PmtpError
from .exactness import check_session, raise_if_inexact
from .draft_policy import BatchDraftPolicy
from .batch import generate_batch
from .options import GenerationOptions, PreparedCall
from .sequence import Chunk, Completion, Sequence, SequenceOutput, Slots, step_sequences
from .speculative import GenerationStats, default_draft, validate_draft

__all__ = ["Llama", "Chunk", "Completion", "PreparedCall", "GenerationOptions"]

_llama_log = logging.getLogger("pyllama_mtp.llama_cpp")


def _is_prompt_list(prompt) -> bool:
    """A list of prompts (texts, or lists of token ids), not one prompt of token ids."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, bytes, list, tuple)) for p in prompt))


@dataclass
class _WallTotals:
    """Wall-clock totals of a Llama's calls, for ``llm.stats`` (the native counters keep no
    prompt/generation wall times)."""
    n_prompt: int = 0
    n_generated: int = 0
    n_timed: int = 0          # tokens after each call's first: the ones t_generate covers
    t_prompt: float = 0.0
    t_generate: float = 0.0

    def add(self, n_prompt: int, n_generated: int, t0: float, t_first: float | None, t_end: float) -> None:
        t_first = t_first if t_first is not None else t_end
        self.n_prompt += n_prompt
        self.n_generated += n_generated
        self.n_timed += max(n_generated - 1, 0)
        self.t_prompt += t_first - t0
        self.t_generate += t_end - t_first

    def add_batch(self, n_prompt: int, n_generated: int, seconds: float) -> None:
        """A generate_batch call: its sequences ran side by side, so its aggregate speed is
        every token over the batch's wall time."""
        self.n_prompt += n_prompt
        self.n_generated += n_generated
        self.n_timed += n_generated
        self.t_generate += seconds


class Llama:
    """A GGUF model with a context, ready to generate; MTP speculative decoding with ``mtp=``.

    ``mtp=True`` uses the MTP layers inside the model file; ``mtp="path.gguf"`` uses an
    MTP-only file next to a trunk-only one. ``draft`` is how many tokens the MTP heads
    propose per step (overridable per call, up to this value); ``"auto"`` picks it every
    step from this session's measured step costs and acceptance, and decodes plainly
    where drafting does not pay (``draft_policy``). Left out, it is ``"auto"`` for a model
    on this host's CPU and 3 for one with layers on a GPU or RPC workers
    (``speculative.default_draft``); ``llm.draft`` tells which.

    ``rpc=["host:port", ...]`` spreads the trunk over RPC workers (``pyllama-mtp-rpc-worker``
    on each host): with ``n_gpu_layers=N`` the last N layers go to the workers' devices (and
    local GPUs), split by ``tensor_split``; the first layers stay on this CPU. With
    ``mtp_placement="local"`` (the default) the MTP layers and the output layer stay on this
    host, so drafting costs no network round trips (and a model with MTP layers keeps its
    output layer here with ``mtp=False`` too, so plain and MTP logits have the same bits);
    ``"split"`` places them like any layer.
    A worker that does not answer within ``rpc_timeout`` seconds counts as lost: the call
    raises ``RpcError`` and the Llama must be closed and created again.

    ``parallel=N`` lets the session decode N sequences together (each with ``n_ctx``
    tokens of context): the server's ``--parallel`` and ``generate_batch``'s width. A call
    goes to the slot whose KV cache holds the longest prefix of its prompt and prefills
    only the rest (a chat's next turn); ``reset()`` forgets every slot's cache.

    Threads may share a Llama: calls take turns (a ``generate`` for the call, a stream from
    its first chunk until it ends or is closed), so other threads wait; a thread that starts
    a call while it holds an open stream of the same Llama gets ``ConcurrentUseError``.
    ``close()`` from any thread is safe: waiting calls and open streams raise ``ClosedError``.

    With MTP on, the constructor first checks on the session itself that a verify batch
    computes what one-token decoding computes, bit for bit (``exactness``): where it does
    not (a device or RPC worker whose kernels depend on the batch size) it raises
    ``InexactVerifyError`` rather than let drafts change the output; ``check_exact=False``
    skips the check.
    """

    def __init__(self, model_path: str | os.PathLike, *, mtp: bool | str | os.PathLike = False, draft: int | str | None = None,
                 n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = -1,
                 threads: int | None = None, threads_batch: int | None = None, seed: int | None = None,
                 use_mmap: bool = True, flash_attn: bool | None = None, type_k: str | None = None,
                 type_v: str | None = None, split_mode: str = "layer", main_gpu: int = 0,
                 tensor_split: SequenceType[float] | None = None, chat_template: str | None = None,
                 swa_guard: bool = True, unsafe_split_verify: bool = False, accept: str | None = None,
                 rpc: str | SequenceType[str] | None = None, mtp_placement: str = "local", rpc_timeout: float = 120.0,
                 parallel: int = 1, check_exact: bool = True, verbose: bool = False, progress=None):
        self._gate = CallGate("Llama")
        if verbose:
            _llama_log.setLevel(logging.INFO)
            if not logging.getLogger().handlers:
                logging.basicConfig()
        self.accept = SamplingParams(accept=accept).accept   # validated before anything loads
        use_mtp = mtp is not False and mtp is not None
        separate_mtp = use_mtp and mtp is not True
        if use_mtp and draft not in ("auto", None) and (not isinstance(draft, int) or isinstance(draft, bool) or draft < 1):
            raise InvalidArgumentError(f"draft must be an int >= 1 or 'auto' when mtp is on, got {draft!r}")
        load = dict(n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, split_mode=split_mode, main_gpu=main_gpu,
                    tensor_split=tuple(tensor_split) if tensor_split is not None else None)
        remote = dict(rpc=rpc, mtp_placement=mtp_placement, rpc_timeout=rpc_timeout)
        self.model = Model(ModelConfig(os.fspath(model_path), load_mtp=use_mtp and not separate_mtp, **load, **remote),
                           progress=progress)
        self.mtp_model = None
        try:
            if separate_mtp:
                # a separate MTP file stays on this host unless its placement follows the split
                mtp_remote = remote if mtp_placement == "split" else {}
                self.mtp_model = Model(ModelConfig(os.fspath(mtp), load_mtp=True, **load, **mtp_remote))
            heads = (self.mtp_model or self.model).info.n_layer_mtp
            if draft is None and use_mtp:
                draft = default_draft(self.model.devices)
            # "auto" keeps every chained head ready (or 4 drafts for a single head)
            draft_max = (heads if heads > 1 else 4) if draft == "auto" else draft
            ctx = ContextConfig(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                threads=threads if threads is not None else ContextConfig().threads,
                                threads_batch=threads_batch, type_k=type_k, type_v=type_v,
                                flash_attn=flash_attn, draft_max=draft_max if use_mtp else 0,
                                swa_guard=swa_guard, unsafe_split_verify=unsafe_split_verify,
                                n_seq_max=parallel)
            self.session = Session(self.model, ctx, mtp_model=self.mtp_model)
            self.exactness = None
            if self.session.draft_max and check_exact:
                self.exactness = check_session(self.session)
                raise_if_inexact(self.exactness, self.model.devices)
        except BaseException:
            self.close()
            raise
        self._n_ctx = self.session.n_ctx
        self.draft = draft if use_mtp else 0                 # the default per call
        self.draft_max = self.session.draft_max
        self.seed = seed if seed is not None else 0xFFFFFFFF
        self._chat_template = chat_template
        self._slots = Slots(self.session.n_seq_max)
        self.prompt_tokens_reused = 0     # prompt tokens the last call found in the KV cache
        # one policy per Llama (every batch size, one sequence included): what it learns about
        # acceptance and costs carries over calls
        self._policy = BatchDraftPolicy(self.draft_max) if self.draft_max else None
        if self._policy is not None and self.exactness is not None:
            self._policy.seed(self.exactness.seed)      # the check's step costs and acceptance
        self._stats_base = GenerationStats()
        self._wall = _WallTotals()

    @property
    def devices(self):
        """Every device the model uses (local CPU, RPC workers' devices, local GPUs) with
        free/total memory; see ``DeviceInfo``."""
        return self.model.devices

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the model and context (safe from any thread: waits for a step in flight;
        other threads' calls and open streams then raise ClosedError)."""
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.close()
        for name in ("session", "mtp_model", "model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._gate.closed or (self.session.closed if hasattr(self, "session") else True)

    # ------------------------------------------------------------- basics

    @property
    def n_ctx(self) -> int:
        if self.closed:
            raise ClosedError("this Llama was closed; create a new one")
        return self._n_ctx

    @property
    def info(self):
        return self.model.info

    @property
    def stats(self) -> GenerationStats:
        """Speculative-decoding counters and timings of every generate/stream/chat call since
        this Llama was created (or reset_stats); tok/s counts each call's tokens after its first."""
        with self._gate.native():
            span = GenerationStats.from_native(self.session.stats()).minus(self._stats_base)
        w = self._wall
        return dataclasses.replace(span, n_prompt_tokens=w.n_prompt, n_generated=w.n_generated,
                                   t_prompt_s=w.t_prompt, t_generate_s=w.t_generate, n_timed=w.n_timed)

    def reset_stats(self) -> None:
        with self._gate.native():
            self._stats_base = GenerationStats.from_native(self.session.stats())
        self._wall = _WallTotals()

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        with self._gate.native():
            return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: SequenceType[int], *, special: bool = False) -> str:
        with self._gate.native():
            return self.model.detokenize(tokens, unparse_special=special)

    @staticmethod
    def build_info() -> dict:
        return build_info()

    # --------------------------------------------------------- generation

    def reset(self) -> None:
        """Forget what every sequence slot's KV cache holds: the next call prefills its whole
        prompt (as a fresh Llama would)."""
        with self._gate.turn(), self._gate.native():
            for seq in range(self.session.n_seq_max):
                self.session.seq_reset(seq)
            self._slots.forget()

    def _prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        else:
            tokens = [int(t) for t in prompt]
            n_vocab = self.info.n_vocab
            bad = [t for t in tokens if not 0 <= t < n_vocab]
            if bad:
                raise InvalidArgumentError(f"prompt token ids {bad[:5]} are outside [0, {n_vocab})")
        if not tokens:
            raise InvalidArgumentError("the prompt is empty (and the model adds no BOS token); give some text")
        if len(tokens) >= self.n_ctx:
            raise ContextFullError(
                f"prompt has {len(tokens)} tokens but the context holds {self.n_ctx} (with room for at least one "
                f"generated token); shorten the prompt or create the Llama with a larger n_ctx")
        return tokens

    def prepare(self, prompt, max_tokens: int | None = 256, **options) -> PreparedCall:
        """Check one call's prompt and options (as :meth:`stream` takes them) without running
        anything; raises InvalidArgumentError (and loses no state) when one is wrong."""
        return self.prepare_options(prompt, GenerationOptions(max_tokens=max_tokens, **options))

    def prepare_options(self, prompt, options: GenerationOptions) -> PreparedCall:
        """:meth:`prepare` with the options as one GenerationOptions (the server builds one
        from each request)."""
        sampling = options.sampling(self.seed, self.accept)
        draft = validate_draft(options.draft_or(self.draft), self.draft_max)
        return PreparedCall(self._prompt_tokens(prompt), options.max_tokens, sampling, draft, options.stop)

    def check_request(self, prompt, max_tokens: int | None = 256, **kwargs) -> list[int]:
        """Validate a call's options and return the prompt's token ids, without
        touching the context (safe from another thread while one generates)."""
        return self.prepare(prompt, max_tokens, **kwargs).tokens

    def chat_tokens(self, messages) -> list[int]:
        """The prompt token ids of ``messages`` under the chat template."""
        return self._chat_tokens(messages)

    def stream(self, prompt, max_tokens: int | None = 256, **kwargs) -> Iterator[Chunk]:
        """Generate from ``prompt`` (text or token ids), one chunk per decode step.

        Options (see GenerationOptions): temperature, top_k, top_p, min_p, repeat_penalty,
        presence_penalty, frequency_penalty, stop (str or list), seed, mtp (False: plain
        decoding for this call), draft (MTP draft length for this call, 0 = plain decoding,
        or "auto"), accept ("rejection" or "match": how drafts are accepted at temperature >
        0), logprobs (None; 0 for each token's logprob; k <= 20 for the top k too, from the
        target's raw logits, accepted drafts included)."""
        return self._stream(self.prepare(prompt, max_tokens, **kwargs))

    def _stream(self, call: PreparedCall) -> Iterator[Chunk]:
        with self._gate.turn():       # from the first chunk until the stream ends or is closed
            yield from self._chunks(self.open_sequence(call))

    def open_sequence(self, call: PreparedCall) -> Sequence:
        """A sequence for ``call`` in the free slot that holds most of its prompt (give the
        slot back with :meth:`release`); its steps turn into text with this model's tokens."""
        seq, held = self._slots.take(call.tokens)
        output = SequenceOutput(self.model.token_pieces, self.model.eog_tokens, call.max_tokens, self._n_ctx,
                                call.stops)
        return Sequence(seq, call, output, held)

    def release(self, s: Sequence) -> None:
        """Give ``s``'s slot back, noting what its KV cache holds (nothing if unknown)."""
        try:
            with self._gate.native():
                holds = s.cached(self.session.seq_n_past(s.seq))
        except PmtpError:
            holds = []
        self._slots.give_back(s.seq, holds)

    def _chunks(self, s: Sequence) -> Iterator[Chunk]:
        """Run one sequence through the driver, a chunk per step, until it ends or the
        consumer stops; its slot keeps what its KV cache holds, for the next call's prompt."""
        session, gate = self.session, self._gate
        policy = self._policy if s.draft == "auto" else None
        try:
            with gate.native():
                s.load(session)
                self.prompt_tokens_reused = s.reused
                s.prefill(session)
                chunk = s.begin(session)
            while True:
                yield chunk
                if chunk.finish_reason is not None:
                    return
                with gate.native():
                    chunk = step_sequences(session, [s], policy)[0]
        finally:
            s.end("length")
            self.release(s)
            self._wall.add(s.n_prompt, s.n_generated, s.t_start, s.t_first, s.t_end)

    def generate(self, prompt, max_tokens: int | None = 256, **kwargs) -> Completion:
        """Generate a whole completion; keyword arguments as for :meth:`stream`."""
        call = self.prepare(prompt, max_tokens, **kwargs)
        with self._gate.turn():
            return self._generate(call)

    def generate_batch(self, prompts: SequenceType, max_tokens: int | None = 256, *, progress: bool | None = None,
                       **kwargs) -> list[Completion]:
        """Generate a completion for every prompt (text or token ids), decoding up to
        ``parallel`` of them at once with MTP across all (continuous batching: a finished
        sequence's slot takes the next prompt). Options as for :meth:`stream`, the same for
        every prompt; all prompts are checked before any runs. Completions come in the order
        of ``prompts``, each with its own stats; greedy output of each equals ``generate``
        of it alone, bit for bit. A progress bar goes to stderr for 8 or more prompts when it
        is a terminal (``progress=True``/``False`` forces it on or off)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, SequenceType):
            raise InvalidArgumentError("prompts must be a list of prompts (each text or a list of token ids)")
        if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise InvalidArgumentError("prompts is a list of ints: pass [token_ids] for one tokenized prompt")
        calls = [self.prepare(p, max_tokens, **kwargs) for p in prompts]
        with self._gate.turn():
            t0 = time.perf_counter()
            results = generate_batch(self, calls, progress)
            self._wall.add_batch(sum(r.n_prompt_tokens for r in results), sum(len(r.tokens) for r in results),
                                 time.perf_counter() - t0)
            return results

    def _generate(self, call: PreparedCall) -> Completion:
        with self._gate.native():
            before = GenerationStats.from_native(self.session.stats())
        s = self.open_sequence(call)
        for _ in self._chunks(s):
            pass
        with self._gate.native():
            span = GenerationStats.from_native(self.session.stats()).minus(before)
        # it ran alone: the session's timers and SWA recoveries over the call are its own
        stats = dataclasses.replace(s.stats(), t_draft_s=span.t_draft_s, t_verify_s=span.t_verify_s,
                                    t_catchup_s=span.t_catchup_s, t_prefill_s=span.t_prefill_s,
                                    t_decode_s=span.t_decode_s, swa_recoveries=span.swa_recoveries)
        return s.completion(stats)

    # --------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str:
        return self._chat_template or self.model.chat_template or DEFAULT_CHAT_TEMPLATE

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.model.detokenize([token], unparse_special=True)

    def render_chat(self, messages, *, add_generation_prompt: bool = True, **extra) -> str:
        return render_chat(self.chat_template, messages, bos_token=self._special_text(self.info.token_bos),
                           eos_token=self._special_text(self.info.token_eos),
                           add_generation_prompt=add_generation_prompt, **extra)

    def _chat_tokens(self, messages) -> list[int]:
        text = self.render_chat(messages)
        bos = self._special_text(self.info.token_bos)
        add_bos = not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_bos, parse_special=True)

    def chat(self, messages, max_tokens: int | None = 256, **kwargs) -> Completion:
        """Render ``messages`` with the model's chat template and generate the reply."""
        return self.generate(self._chat_tokens(messages), max_tokens, **kwargs)

    def stream_chat(self, messages, max_tokens: int | None = 256, **kwargs) -> Iterator[Chunk]:
        return self.stream(self._chat_tokens(messages), max_tokens, **kwargs)

    # ------------------------------------------------------- OpenAI shapes

    def _model_name(self) -> str:
        return os.path.basename(self.model.path)

    def _logprobs_object(self, result: Completion, chat: bool):
        """OpenAI logprobs for a finished completion (None when not asked)."""
        if result.logprobs is None:
            return None
        return openai_shapes.logprobs_object(self.model.token_pieces, result.tokens, result.logprobs,
                                             result.top_logprobs, chat)

    def create_completion(self, prompt, max_tokens: int | None = 16, *, stream: bool = False, **kwargs):
        """OpenAI ``/v1/completions`` shaped result (a dict, or an iterator of chunk dicts).
        ``prompt`` may be a list of prompts (texts or token-id lists), as in OpenAI's API: they
        run together through :meth:`generate_batch`, one choice each, in order."""
        cid, created, name = openai_shapes.new_id("cmpl"), int(time.time()), self._model_name()
        if _is_prompt_list(prompt):
            if stream:
                raise InvalidArgumentError("stream=True takes one prompt; pass a list of prompts without stream")
            results = self.generate_batch(prompt, max_tokens, **kwargs)
            total = GenerationStats(drafted=sum(r.stats.drafted for r in results),
                                    accepted=sum(r.stats.accepted for r in results))
            return openai_shapes.completions_response(
                cid, name, created, [(r.text, r.finish_reason, self._logprobs_object(r, chat=False)) for r in results],
                sum(r.n_prompt_tokens for r in results), sum(len(r.tokens) for r in results),
                extra_usage=openai_shapes.draft_usage(total))
        if stream:
            chunks = self.stream(prompt, max_tokens, **kwargs)
            return (openai_shapes.completion_chunk(cid, name, created, c.text, c.finish_reason) for c in chunks)
        result = self.generate(prompt, max_tokens, **kwargs)
        return openai_shapes.completion_response(cid, name, created, result.text, result.finish_reason,
                                                 result.n_prompt_tokens, len(result.tokens),
                                                 logprobs=self._logprobs_object(result, chat=False),
                                                 extra_usage=openai_shapes.draft_usage(result.stats))

    def create_chat_completion(self, messages, max_tokens: int | None = None, *, stream: bool = False,
                               top_logprobs: int | None = None, **kwargs):
        """OpenAI ``/v1/chat/completions`` shaped result (a dict, or an iterator of chunk dicts).
        ``logprobs=True`` (with ``top_logprobs=k``) adds the chat logprobs object."""
        if kwargs.get("logprobs") is True or kwargs.get("logprobs") is False:
            kwargs["logprobs"] = (top_logprobs or 0) if kwargs["logprobs"] else None
        cid, created, name = openai_shapes.new_id("chatcmpl"), int(time.time()), self._model_name()
        tokens = self._chat_tokens(messages)
        if stream:
            return self._chat_chunks(cid, created, name, tokens, max_tokens, kwargs)
        result = self.generate(tokens, max_tokens, **kwargs)
        return openai_shapes.chat_response(cid, name, created, result.text, result.finish_reason,
                                           result.n_prompt_tokens, len(result.tokens),
                                           logprobs=self._logprobs_object(result, chat=True),
                                           extra_usage=openai_shapes.draft_usage(result.stats))

    def _chat_chunks(self, cid, created, name, tokens, max_tokens, kwargs):
        yield openai_shapes.chat_chunk(cid, name, created, {"role": "assistant", "content": ""}, None)
        for c in self.stream(tokens, max_tokens, **kwargs):
            if c.text:
                yield openai_shapes.chat_chunk(cid, name, created, {"content": c.text}, None)
            if c.finish_reason:
                yield openai_shapes.chat_chunk(cid, name, created, {}, c.finish_reason)
