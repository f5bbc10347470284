"""Llama: prompts, chat templates, streaming, stop strings, OpenAI-shaped results.

The generation loop asks the native session for one *step* at a time (a plain
one-token decode, or a whole MTP draft/verify cycle) and turns the step's tokens
into text. Every token except the newest one is in the KV cache; the loop keeps
that mirror exact even when a consumer stops a stream early, so the next call can
reuse the common prompt prefix.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from . import openai_shapes
from .call_gate import CallGate
from .chat import DEFAULT_CHAT_TEMPLATE, render_chat
from .config import ContextConfig, ModelConfig, SamplingParams
from .engine import Model, Session, StepResult, build_info
from .errors import ClosedError, ContextFullError, InvalidArgumentError, PmtpError
from .draft_policy import BatchDraftPolicy, DraftPolicy, step_auto
from .batch import generate_batch
from .speculative import GenerationStats, validate_draft
from .text import StopMatcher, Utf8StreamDecoder

_llama_log = logging.getLogger("pyllama_mtp.llama_cpp")


@dataclass(frozen=True)
class Chunk:
    """What one decode step added to a stream."""
    text: str
    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]    # per token: an MTP draft the target accepted
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None          # per token (when asked)
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str              # "stop" (EOS or stop string) or "length"
    n_prompt_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclass(frozen=True)
class PreparedCall:
    """One call's prompt and options, checked before anything runs (``Llama.prepare``):
    what a sequence needs to run, whichever loop runs it (``generate``/``stream``,
    ``generate_batch`` or the server's scheduler)."""
    tokens: list[int]               # the prompt's token ids
    max_tokens: int | None
    sampling: SamplingParams
    draft: int | str                # a checked draft length, or "auto"
    stops: list[str]


def _first(step: StepResult, n: int) -> StepResult:
    """The step's first n tokens (the rest fall after EOG or the token limit)."""
    if n == len(step.tokens):
        return step
    return dataclasses.replace(
        step, tokens=step.tokens[:n], from_draft=step.from_draft[:n],
        logprobs=None if step.logprobs is None else step.logprobs[:n],
        top_logprobs=None if step.top_logprobs is None else step.top_logprobs[:n])


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError("stop must be a non-empty string or a list of non-empty strings")
    return list(stop)


class SequenceOutput:
    """One sequence's step results -> Chunks: cuts at end-of-generation, max_tokens and
    the context end (the chunk that ends it carries the finish reason), decodes UTF-8
    across token boundaries and holds back text that a stop string may be starting."""

    def __init__(self, pieces: list[bytes], eog: frozenset[int], max_tokens: int | None, n_ctx: int, stops):
        self.pieces, self.eog, self.n_ctx = pieces, eog, n_ctx
        self.left = max_tokens if max_tokens is not None else n_ctx
        self.decoder = Utf8StreamDecoder()
        self.matcher = StopMatcher(stops)
        self.finish_reason: str | None = None

    def _cut(self, step: StepResult, n_past: int) -> tuple[int, str | None]:
        n = 0
        for tok in step.tokens:
            if tok in self.eog:
                return n, "stop"
            n += 1
            self.left -= 1
            if self.left == 0:
                return n, "length"
        return n, ("length" if n_past >= self.n_ctx else None)

    def push(self, step: StepResult, n_past: int) -> Chunk:
        """The chunk for one step; ``n_past``: tokens in the sequence's KV cache after it."""
        n, finish = self._cut(step, n_past)
        step = _first(step, n)
        text = self.decoder.feed(b"".join(self.pieces[t] for t in step.tokens))
        safe, stopped = self.matcher.feed(text)
        if not stopped and finish is not None:
            tail, stopped = self.matcher.feed(self.decoder.flush())
            safe += tail if stopped else tail + self.matcher.flush()
        if stopped:
            finish = "stop"
        self.finish_reason = finish
        return Chunk(safe, step.tokens, step.from_draft, finish, step.logprobs, step.top_logprobs)


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
    where drafting does not pay (``draft_policy``).

    ``rpc=["host:port", ...]`` spreads the trunk over RPC workers (``pyllama-mtp-rpc-worker``
    on each host): with ``n_gpu_layers=N`` the last N layers go to the workers' devices (and
    local GPUs), split by ``tensor_split``; the first layers stay on this CPU. With
    ``mtp_placement="local"`` (the default) the MTP layers and the output layer stay on this
    host, so drafting costs no network round trips; ``"split"`` places them like any layer.
    A worker that does not answer within ``rpc_timeout`` seconds counts as lost: the call
    raises ``RpcError`` and the Llama must be closed and created again.

    ``parallel=N`` lets the session decode N sequences together (each with ``n_ctx``
    tokens of context): the server's ``--parallel``. ``generate``/``stream`` use the first.

    Threads may share a Llama: calls take turns (a ``generate`` for the call, a stream from
    its first chunk until it ends or is closed), so other threads wait; a thread that starts
    a call while it holds an open stream of the same Llama gets ``ConcurrentUseError``.
    ``close()`` from any thread is safe: waiting calls and open streams raise ``ClosedError``.
    """

    def __init__(self, model_path: str | os.PathLike, *, mtp: bool | str | os.PathLike = False, draft: int | str = 3,
                 n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = -1,
                 threads: int | None = None, threads_batch: int | None = None, seed: int | None = None,
                 use_mmap: bool = True, flash_attn: bool | None = None, type_k: str | None = None,
                 type_v: str | None = None, split_mode: str = "layer", main_gpu: int = 0,
                 tensor_split: Sequence[float] | None = None, chat_template: str | None = None,
                 swa_guard: bool = True, unsafe_split_verify: bool = False, accept: str | None = None,
                 rpc: str | Sequence[str] | None = None, mtp_placement: str = "local", rpc_timeout: float = 120.0,
                 parallel: int = 1, verbose: bool = False, progress=None):
        self._gate = CallGate("Llama")
        if verbose:
            _llama_log.setLevel(logging.INFO)
            if not logging.getLogger().handlers:
                logging.basicConfig()
        self.accept = SamplingParams(accept=accept).accept   # validated before anything loads
        use_mtp = mtp is not False and mtp is not None
        separate_mtp = use_mtp and mtp is not True
        if use_mtp and draft != "auto" and (not isinstance(draft, int) or isinstance(draft, bool) or draft < 1):
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
            # "auto" keeps every chained head ready (or 4 drafts for a single head)
            draft_max = (heads if heads > 1 else 4) if draft == "auto" else draft
            ctx = ContextConfig(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                threads=threads if threads is not None else ContextConfig().threads,
                                threads_batch=threads_batch, type_k=type_k, type_v=type_v,
                                flash_attn=flash_attn, draft_max=draft_max if use_mtp else 0,
                                swa_guard=swa_guard, unsafe_split_verify=unsafe_split_verify,
                                n_seq_max=parallel)
            self.session = Session(self.model, ctx, mtp_model=self.mtp_model)
        except BaseException:
            self.close()
            raise
        self._n_ctx = self.session.n_ctx
        self.draft = draft if use_mtp else 0                 # the default per call
        self.draft_max = self.session.draft_max
        self.seed = seed if seed is not None else 0xFFFFFFFF
        self._chat_template = chat_template
        self._kv_tokens: list[int] = []   # mirror of the tokens in the target KV cache
        self.prompt_tokens_reused = 0     # prompt tokens the last call found in the KV cache
        # one policy per Llama: what it learns about acceptance and costs carries over calls
        self._policy = DraftPolicy(self.draft_max) if self.draft_max else None
        self._batch_policy = BatchDraftPolicy(self.draft_max) if self.draft_max else None   # generate_batch's
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

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        with self._gate.native():
            return self.model.detokenize(tokens, unparse_special=special)

    @staticmethod
    def build_info() -> dict:
        return build_info()

    # --------------------------------------------------------- generation

    def _sampling(self, temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                  frequency_penalty, seed, accept) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty,
                              seed=self.seed if seed is None else seed,
                              accept=self.accept if accept is None else accept)

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

    def _load_prompt(self, tokens: list[int]) -> None:
        """Make the KV cache hold ``tokens``, reusing the longest common prefix."""
        common = 0
        for a, b in zip(self._kv_tokens, tokens):
            if a != b:
                break
            common += 1
        keep = min(common, len(tokens) - 1)   # the last prompt token is decoded for its logits
        try:
            if keep == 0:
                self.session.reset()
            else:
                self.session.rollback(keep)
        except PmtpError:
            keep = 0
            self.session.reset()
        self._kv_tokens = tokens[:keep]
        self.prompt_tokens_reused = keep
        self.session.prefill(tokens[keep:])
        self._kv_tokens = list(tokens)

    def _steps(self, tokens: list[int], sampling: SamplingParams, draft) -> Iterator[tuple[StepResult, int]]:
        """Yield the first sampled token, then each step's tokens, until the consumer stops;
        each with the number of tokens in the KV cache after it. Runs inside a turn."""
        session, gate = self.session, self._gate
        with gate.native():
            session.set_sampling(sampling)
            self._load_prompt(tokens)
            session.sample()
            result, n_past = session.last_result, session.n_past
        generated = list(result.tokens)
        policy = self._policy if draft == "auto" else None
        if policy:
            policy.start_sequence()
        try:
            while True:
                yield result, n_past
                with gate.native():
                    result = step_auto(session, policy)[0] if policy else session.step(draft)
                    n_past = session.n_past
                generated.extend(result.tokens)
        finally:
            # Everything generated except the newest token is in the KV cache.
            self._kv_tokens = tokens + generated[:-1]

    def prepare(self, prompt, max_tokens: int | None = 256, *, temperature: float = 0.0, top_k: int = 40,
                top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop=None, seed: int | None = None,
                draft: int | None = None, accept: str | None = None, logprobs: int | None = None,
                mtp: bool | None = None) -> PreparedCall:
        """Check one call's prompt and options (as :meth:`stream` takes them) without running
        anything; raises InvalidArgumentError (and loses no state) when one is wrong."""
        if mtp is not None and not isinstance(mtp, bool):
            raise InvalidArgumentError(f"mtp must be True or False per call, got {mtp!r}")
        if mtp is False:
            draft = 0
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise InvalidArgumentError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")
        sampling = self._sampling(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                                  frequency_penalty, seed, accept)
        if logprobs is not None:
            sampling = dataclasses.replace(sampling, n_logprobs=logprobs)
        penalties = repeat_penalty != 1.0 or presence_penalty != 0.0 or frequency_penalty != 0.0
        if sampling.accept is None and penalties:
            # rejection sampling does not model penalties yet; matching stays exact with them
            sampling = dataclasses.replace(sampling, accept="match")
        k = validate_draft(self.draft if draft is None else draft, self.draft_max)
        return PreparedCall(self._prompt_tokens(prompt), max_tokens, sampling, k, _stops(stop))

    def check_request(self, prompt, max_tokens: int | None = 256, **kwargs) -> list[int]:
        """Validate a call's options and return the prompt's token ids, without
        touching the context (safe from another thread while one generates)."""
        return self.prepare(prompt, max_tokens, **kwargs).tokens

    def chat_tokens(self, messages) -> list[int]:
        """The prompt token ids of ``messages`` under the chat template."""
        return self._chat_tokens(messages)

    def stream(self, prompt, max_tokens: int | None = 256, **kwargs) -> Iterator[Chunk]:
        """Generate from ``prompt`` (text or token ids), one chunk per decode step.

        Options: temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
        frequency_penalty, stop (str or list), seed, mtp (False: plain decoding for this
        call), draft (MTP draft length for this call, 0 = plain decoding, or "auto"), accept ("rejection" or "match": how drafts are accepted at
        temperature > 0), logprobs (None; 0 for each token's logprob; k <= 20 for the top k
        too, from the target's raw logits, accepted drafts included)."""
        return self._stream(self.prepare(prompt, max_tokens, **kwargs))

    def _stream(self, call: PreparedCall) -> Iterator[Chunk]:
        with self._gate.turn():       # from the first chunk until the stream ends or is closed
            yield from self._chunks(call)

    def _chunks(self, call: PreparedCall) -> Iterator[Chunk]:
        output = SequenceOutput(self.model.token_pieces, self.model.eog_tokens, call.max_tokens, self._n_ctx,
                                call.stops)
        t0, t_first, n = time.perf_counter(), None, 0
        tokens = call.tokens
        try:
            for step, n_past in self._steps(tokens, call.sampling, call.draft):
                chunk = output.push(step, n_past)
                if t_first is None:
                    t_first = time.perf_counter()
                n += len(chunk.tokens)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._wall.add(len(tokens), n, t0, t_first, time.perf_counter())

    def generate(self, prompt, max_tokens: int | None = 256, **kwargs) -> Completion:
        """Generate a whole completion; keyword arguments as for :meth:`stream`."""
        call = self.prepare(prompt, max_tokens, **kwargs)
        with self._gate.turn():
            return self._generate(call)

    def generate_batch(self, prompts: Sequence, max_tokens: int | None = 256, *, progress: bool | None = None,
                       **kwargs) -> list[Completion]:
        """Generate a completion for every prompt (text or token ids), decoding up to
        ``parallel`` of them at once with MTP across all (continuous batching: a finished
        sequence's slot takes the next prompt). Options as for :meth:`stream`, the same for
        every prompt; all prompts are checked before any runs. Completions come in the order
        of ``prompts``, each with its own stats; greedy output of each equals ``generate``
        of it alone, bit for bit. A progress bar goes to stderr for 8 or more prompts when it
        is a terminal (``progress=True``/``False`` forces it on or off)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
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
        t0 = time.perf_counter()
        t_first = None
        texts, tokens, finish, lps, tops = [], [], "length", [], []
        for chunk in self._chunks(call):
            if t_first is None:
                t_first = time.perf_counter()
            texts.append(chunk.text)
            tokens.extend(chunk.tokens)
            lps.extend(chunk.logprobs or ())
            tops.extend(chunk.top_logprobs or ())
            finish = chunk.finish_reason or finish
        t_end = time.perf_counter()
        t_first = t_first or t_end
        with self._gate.native():
            span = GenerationStats.from_native(self.session.stats()).minus(before)
        stats = dataclasses.replace(span, n_prompt_tokens=len(call.tokens), n_generated=len(tokens),
                                    t_prompt_s=t_first - t0, t_generate_s=t_end - t_first)
        with_lp = call.sampling.n_logprobs >= 0
        return Completion("".join(texts), tuple(tokens), finish, len(call.tokens), stats,
                          tuple(lps) if with_lp else None, tuple(tops) if with_lp else None)

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

    def _usage_extra(self, stats: GenerationStats) -> dict:
        return {"drafted_tokens": stats.drafted, "accepted_tokens": stats.accepted}

    def _logprobs_object(self, result: Completion, chat: bool):
        """OpenAI logprobs for a finished completion (None when not asked)."""
        if result.logprobs is None:
            return None
        pieces = self.model.token_pieces
        tokens = [pieces[t] for t in result.tokens]
        tops = [[(pieces[t], lp) for t, lp in alts] for alts in result.top_logprobs]
        if chat:
            return openai_shapes.chat_logprobs(tokens, result.logprobs, tops)
        return openai_shapes.completion_logprobs(tokens, result.logprobs, tops)

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
                extra_usage=self._usage_extra(total))
        if stream:
            chunks = self.stream(prompt, max_tokens, **kwargs)
            return (openai_shapes.completion_chunk(cid, name, created, c.text, c.finish_reason) for c in chunks)
        result = self.generate(prompt, max_tokens, **kwargs)
        return openai_shapes.completion_response(cid, name, created, result.text, result.finish_reason,
                                                 result.n_prompt_tokens, len(result.tokens),
                                                 logprobs=self._logprobs_object(result, chat=False),
                                                 extra_usage=self._usage_extra(result.stats))

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
                                           extra_usage=self._usage_extra(result.stats))

    def _chat_chunks(self, cid, created, name, tokens, max_tokens, kwargs):
        yield openai_shapes.chat_chunk(cid, name, created, {"role": "assistant", "content": ""}, None)
        for c in self.stream(tokens, max_tokens, **kwargs):
            if c.text:
                yield openai_shapes.chat_chunk(cid, name, created, {"content": c.text}, None)
            if c.finish_reason:
                yield openai_shapes.chat_chunk(cid, name, created, {}, c.finish_reason)
