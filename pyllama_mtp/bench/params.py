"""Command-line values with llama-bench's semantics: comma lists, ranges
(``first-last`` or ``first-last+step`` / ``first-last*mult``), and the cross product."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

_RANGE = re.compile(r"^(-?\d+)-(-?\d+)(?:([+*])(\d+))?$")


class UsageError(ValueError):
    """A bad command-line value; the CLI prints it with the usage line."""


def parse_int_list(text: str, name: str) -> list[int]:
    """'1,2,4-8+2,16-64*2' -> [1, 2, 4, 6, 8, 16, 32, 64]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"{name}: empty value in {text!r}")
        m = _RANGE.match(part)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            op, step = m.group(3) or "+", int(m.group(4) or 1)
            if last < first or step < 1 or (op == "*" and (step < 2 or first < 1)):
                raise UsageError(f"{name}: bad range {part!r}")
            value = first
            while value <= last:
                out.append(value)
                value = value + step if op == "+" else value * step
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise UsageError(f"{name}: {part!r} is not an integer or range") from None
    return out


def parse_pairs(text: str, name: str) -> list[tuple[int, int]]:
    """'512,128' or '512,128;1024,256' -> [(512, 128), ...] (llama-bench's -pg)."""
    pairs = []
    for part in text.split(";"):
        values = parse_int_list(part, name)
        if len(values) != 2:
            raise UsageError(f"{name}: expected pp,tg pairs, got {part!r}")
        pairs.append((values[0], values[1]))
    return pairs


def parse_choice_list(text: str, name: str, choices) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    bad = [v for v in values if v not in choices]
    if bad:
        raise UsageError(f"{name}: {bad[0]!r} is not one of {', '.join(sorted(choices))}")
    return values


def parse_draft_list(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        if part.strip() == "auto":
            out.append("auto")
        else:
            out.extend(parse_int_list(part, "--draft"))
    if any(isinstance(d, int) and d < 0 for d in out):
        raise UsageError("--draft: values must be >= 0")
    return out


@dataclass(frozen=True)
class Instance:
    """One model + context configuration; tests run on it with several draft lengths."""
    model: str
    threads: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: int


@dataclass(frozen=True)
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int
    n_draft: int | str

    @property
    def label(self) -> str:
        if self.n_prompt and self.n_gen:
            base = f"pp{self.n_prompt}+tg{self.n_gen}"
        elif self.n_prompt:
            base = f"pp{self.n_prompt}"
        else:
            base = f"tg{self.n_gen}"
        return f"{base} @ d{self.n_depth}" if self.n_depth else base


def expand(models, threads, ngl, batch, ubatch, ctk, ctv, fa) -> list[Instance]:
    return [Instance(*values) for values in itertools.product(models, threads, ngl, batch, ubatch, ctk, ctv, fa)]


def bench_tests(n_prompt, n_gen, pg, depths, drafts) -> list[BenchTest]:
    tests = []
    for depth in depths:
        for p in n_prompt:
            if p > 0:
                tests.append(BenchTest(p, 0, depth, 0))
        for n in n_gen:
            if n > 0:
                tests.extend(BenchTest(0, n, depth, d) for d in drafts)
        for p, n in pg:
            tests.extend(BenchTest(p, n, depth, d) for d in drafts)
    return tests
