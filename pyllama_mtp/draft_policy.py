"""The draft length of each step when ``draft="auto"``.

A step with k drafts yields on average E(k) = 1 + a1 + a1 a2 + ... + a1..ak tokens, where
a_i is the measured chance that draft i is accepted once drafts 1..i-1 were, and costs
T(k, depth) seconds, measured in this session at about this context depth. The policy
takes the k with the most expected tokens per second, and keeps its figures fresh with
probes:

- a probe is a step with another draft length; from plain decoding it is one step with a
  single draft, the shortest step that drafts; from a draft length it is the length that
  may most beat the decision, its rate raised the more the fewer samples stand behind it
  (machines are noisy: one unlucky step must not rule a length out for good). The first
  step after a change of length runs slow (graphs are rebuilt), so only steps that repeat
  the previous length, and built no graph (as where the KV span grows past a multiple of
  256 cells), are timed as they are; a probe runs two steps where that is worth it (see
  ``choose``);
- while drafts are accepted, a length with fewer than LEARN_SAMPLES steady samples at
  this depth that may beat the decision (predicted from the lengths that were, see
  ``to_learn``; one beyond the longest measured until a drafting length beats plain
  decoding, then any) is timed at once, so a cold start climbs to the best length within
  a few steps instead of one length per probe interval;
- a probe from plain decoding counts the heads' catch-up before it in its price
  (``probe_cost``), which sets how often plain decoding may afford to look;
- drafting does not turn plain on a few rejected drafts: while the first draft's
  acceptance rests on so few observations that it may still pay (``in_doubt``), one
  draft a step goes on, where each observation is cheap (after a switch to plain
  decoding each look costs a probe); once plain, probes keep the base pace while a
  more generous bound (PACE_Z) says one draft may still pay (``one_draft_may_pay``);
- probes back off exponentially (x4) while they do not change the decision (or are
  declined: the heads' catch-up before them could not pay, ``decline_probe``), except where
  the probed length came close (CLOSE_CALL) and deserves another look; so a model
  whose drafts do not pay costs ever less; when drafting could not pay even if every
  draft were accepted, probing drops to its slowest pace at once; a probe whose outcome
  contradicts the estimate (a draft accepted where acceptance looked hopeless) resets
  the pace, so drafting comes back soon after the content turns predictable again;
- a switch from drafting to plain decoding times plain decoding's next PLAIN_SAMPLES steady
  steps and decides again after them: its figure may be a guess or from a faster minute;
  where drafts were accepted more often than not, both figures start afresh and the
  length left is probed right after (``choose``): the switch may have been a slower
  minute's, priced against plain decoding's figure from a faster one;
- a shared machine's slow spells move no length's figure: each is the median of its last
  32 steady steps without a spell's, and the steps of a spell are priced at the usual
  speed (``StepTime``, ``Slowdown``), so a spell while drafting does not make plain
  decoding look faster, nor a length timed in one look dearer than the others;
- costs are kept per depth bucket (powers of two of the context length), because the
  verify/decode cost ratio changes as attention grows; a bucket starts from its nearest
  measured neighbour's costs (as one sample's worth) and entering it is probed at once.

Before the first drafting step after plain decoding, the caller lets the MTP heads catch
up with the rows they have queued (``Session.seq_mtp_catch_up``): that one-off cost does
not belong to the cost of a drafting step, and timing it in would make MTP look worse than
it is. ``sequence.step_sequences`` does this, and asks the policy of its batch size.
"""
from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Sequence

from .draft_trace import DraftTrace


ACCEPT_PRIOR = 0.5      # acceptance before anything is observed, weighted as one observation
ACCEPT_WINDOW = 16      # acceptance: the last ~16 steps' observations per position ...
ACCEPT_WINDOW_LONG = 64  # ... and the last ~64, what the policy goes by while the two agree
ACCEPT_SHIFT_Z = 3.0    # they disagree: the recent mean is this many of its spreads from the long one
CHECK_OBSERVATIONS = 2  # the load-time check's texts count as this many observations (Acceptance.observe_texts)
THIN_EVIDENCE = 2       # the generations' own observations of the first draft before probes back off
DOUBT_OBSERVATIONS = 8  # drafting stays while the first draft has fewer observations of the text's own
DOUBT_Z = 1.0           # ... and its acceptance's upper bound at this z says drafting may pay
PACE_Z = 1.75           # probes keep THIN_PROBE_BUDGET while the bound at this z says so (one_draft_may_pay)
TIME_WINDOW = 8         # switch, probe and catch-up costs: running means over about 8
COST_WINDOW = 32        # step cost per (depth bucket, k): the median of its last 32 steady steps ...
SPELL_RATIO = 1.5       # ... leaving out those above 1.5x their lower quartile (a slow spell's) ...
SPELL_MIN_SAMPLES = 8   # ... once 8 stand behind it (StepTime)
SPELL_STEPS = 3         # the machine is in a slow spell after 3 steady steps in a row off by SPELL_RATIO
FAST_SAMPLE = 0.6       # a steady step this far below its length's figure shows the samples above it slowed
PLAIN_SAMPLES = 6       # plain steps are timed until this many steady ones stand behind its cost
DEFAULT_DRAFT_COST = 0.5  # before any measurement: a draft adds half a plain step
BASE_INTERVAL = 16      # steps between probes, at first and after the decision changed
MAX_INTERVAL = 512
PROBE_BUDGET = 0.01      # while decoding plainly, probes may cost this share of the time
THIN_PROBE_BUDGET = 0.05  # the same while the first draft's acceptance rests on THIN_EVIDENCE
HOPELESS_INTERVAL = 4096  # probes while drafting could not pay even with every draft accepted
BACKOFF = 4
SWITCH_MARGIN = 1.05    # a new decision must promise 5% more tokens per second
SWITCH_HORIZON = 64     # a switch's cost is spread over at least this many steps
SEED_WEIGHT = 1         # a new depth bucket starts from its neighbour's costs, as this many samples
JOIN_WINDOW = 64        # arrivals' head catch-up: mean over about this many drafting steps
HEADS_WINDOW = 64       # rows the heads keep while sequences decode plainly: at most this many,
HEADS_WINDOW_MIN = 8    # at least this many, as many as they take in about one plain step
HEADS_WINDOW_SLACK = 1.25  # the heads' queue runs a quarter past its window before it is cut
CATCH_UP_SAMPLES = 16   # the heads' catch-up cost: fitted to this many recent catch-ups per depth
RECHECK = 8             # steps between recomputing the decision when nothing else changed
RECHECK_PLAIN = 64      # the same while decoding plainly (only a probe or a new depth changes
                        # that; on a tiny model a step takes ~0.15 ms and each recheck shows)
UNCERTAINTY = 0.15      # a probe's pick: predicted rate x (1 + this / sqrt(steady samples))
CLOSE_CALL = 0.9        # a probed length this close to the decision's rate is probed again soon
LEARN_SAMPLES = 2       # steady samples of a length before learning it is done (one can be off)
LEARN_BEYOND = 1.2      # while drafts are accepted, a length never timed here is timed at once if
LEARN_BETWEEN = 1.03    # its predicted rate times this beats the decision's (predicted beyond the
                        # longest timed length, or between two timed ones: more or less sure)


class RunningMean:
    """Mean of the samples so far, turning into an exponential moving average over about
    ``window`` samples, or groups of samples taken together (``weight``: how many samples
    stand behind ``value``, at most the window's)."""

    __slots__ = ("value", "weight", "window")

    def __init__(self, window: int):
        self.value: float | None = None
        self.weight, self.window = 0, window

    def add(self, x: float, n: int = 1) -> None:
        """``x``: one sample, or the mean of ``n`` taken together; the window spans as many
        such groups as it does single samples."""
        before = self.weight
        self.weight = min(before + n, self.window * n)
        self.value = x if not before else self.value + (x - self.value) * n / self.weight


def depth_bucket(depth: int) -> int:
    """0 below 128 tokens of context, then one bucket per doubling (2,048-4,095 -> 5)."""
    return max(0, max(int(depth), 1).bit_length() - 7)


def bucket_end(bucket: int) -> int:
    """The first depth past ``bucket`` (depth_bucket's)."""
    return 1 << (bucket + 7)


class PositionRate:
    """One draft position's acceptance: the mean of the last ~ACCEPT_WINDOW_LONG steps'
    observations, except after a change of text, where it restarts from the last
    ~ACCEPT_WINDOW steps' and forgets as fast as they do for ACCEPT_WINDOW steps.

    A window of 16 steps alone dips by chance: at acceptance 0.55 its estimate has a
    spread of about 0.09, and a dip of two to three spreads turns a drafting length that
    wins 20% into a loss on paper. After the switch to plain decoding only probes observe
    acceptance again, each backing off, so a dip of luck held plain decoding for hundreds
    of steps (``simulate_auto.py``, acceptance 0.55 on a tiny model's costs: 15% of the
    time plain where drafting 2 wins 25%). Over 64 steps the spread halves. A real change
    of text (acceptance 1.0 to 0) still shows within a few steps: the short mean leaves
    the long one by more than ACCEPT_SHIFT_Z of its own spread, and the long one is
    restarted from it."""

    __slots__ = ("long", "recent", "since_shift")

    def __init__(self):
        self.long = RunningMean(ACCEPT_WINDOW_LONG)
        self.recent = RunningMean(ACCEPT_WINDOW)
        self.since_shift = ACCEPT_WINDOW

    @property
    def value(self) -> float | None:
        return self.long.value

    @property
    def weight(self) -> int:
        return self.long.weight

    def start(self, value: float) -> None:
        """Begin from ``value``, as one observation."""
        for m in (self.long, self.recent):
            m.value, m.weight = value, 1

    def add(self, x: float, n: int = 1) -> None:
        """``x``: one observation, or the mean of ``n`` taken together (RunningMean.add)."""
        long, recent = self.long, self.recent
        long.add(x, n)
        recent.add(x, n)
        self.since_shift += 1
        if self.since_shift == ACCEPT_WINDOW:
            long.window = ACCEPT_WINDOW_LONG        # the new text has settled: average it long
        p = min(max(long.value, 0.05), 0.95)
        spread = (p * (1 - p) / (2 * ACCEPT_WINDOW - 1)) ** 0.5   # of a running mean over ACCEPT_WINDOW
        if abs(recent.value - long.value) > ACCEPT_SHIFT_Z * spread:
            long.value, long.weight, long.window = recent.value, recent.weight, ACCEPT_WINDOW
            self.since_shift = 0


class Acceptance:
    """Per-position acceptance estimates, shared by every policy of one engine."""

    def __init__(self, draft_max: int):
        self.positions = [PositionRate() for _ in range(draft_max)]
        self.seen = [0] * draft_max     # per position, the generations' own observations (not the check's)
        self._expected: dict[int, float] = {}     # expected_tokens by k, until an observation

    def rate(self, i: int) -> float:
        """a_(i+1): observed, or the previous position's when position i was never tried."""
        m = self.positions[i]
        if m.value is not None:
            return m.value
        return self.rate(i - 1) if i > 0 else ACCEPT_PRIOR

    def observations(self, i: int) -> int:
        """How many observations (the prior counting as one) stand behind a_(i+1), at most
        the window."""
        return self.positions[i].weight

    def observe_texts(self, k: int, texts: list[list[int]]) -> None:
        """Steps of k drafts taken on texts other than the generation's (the load-time
        check's: per text, the drafts accepted in each of its steps): per position, the mean
        over the texts that tried it of each one's share of drafts accepted there, counted
        as CHECK_OBSERVATIONS observations. The check's texts are not the user's: how often
        the heads get them right is a prior for the user's text, not evidence of it (in
        simulation, on a tiny model's costs, a check that saw every draft of six steps
        accepted cost a 64-token generation on a text whose drafts are all rejected 24%
        against plain decoding with each step one observation, 10% with all of them two);
        and its texts, not its steps, are what vary (the steps of one text accept alike)."""
        self._expected.clear()
        shares: list[list[float]] = [[] for _ in range(k)]
        for steps in texts:
            for i in range(k):
                tried = [n for n in steps if n >= i]
                if not tried:
                    break
                shares[i].append(sum(n > i for n in tried) / len(tried))
        for i, s in enumerate(shares):
            if s:
                m, mean = self._tried(i), sum(s) / len(s)
                for _ in range(CHECK_OBSERVATIONS):
                    m.add(mean)

    def observe(self, k: int, accepted: Sequence[int]) -> None:
        """One step of k drafts: the drafts accepted in each of its sequences. Per position,
        the share of the sequences that tried it which had it accepted, taken together as
        that many observations: the windows span steps whatever the batch (PositionRate).
        Counted one by one, eight sequences left two steps in it, and the estimate swung
        with each step's luck; a dip turns a batch plain, where only probes observe
        acceptance again. On a server at two clients, acceptance 0.6, the trace showed
        plain decoding from such a dip for the rest of the run; in simulation (two drafts
        winning 7-10%) plain decoding held about three steps in four, under half once each
        step's sequences were taken together."""
        self._expected.clear()
        tried = len(accepted)                   # every sequence tried the first draft
        for i in range(k if tried else 0):
            hits = sum(n > i for n in accepted)
            self._tried(i).add(hits / tried, tried)
            self.seen[i] += tried
            if not hits:
                break
            tried = hits                        # position i+1 was tried where i was accepted

    def _tried(self, i: int) -> PositionRate:
        """Position i's estimate, about to take an observation: one never tried starts from
        its estimate so far (the prior, or the previous position's), as one observation."""
        m = self.positions[i]
        if m.value is None:
            m.start(self.rate(i))
        return m

    def upper_bound(self, i: int, z: float) -> float:
        """A one-sided upper confidence bound of a_(i+1) (Wilson's score interval at ``z``),
        from its observations so far (the prior counting as one)."""
        n = max(self.observations(i), 1)
        p = self.rate(i)
        z2 = z * z
        centre = p + z2 / (2 * n)
        spread = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
        return min(1.0, (centre + spread) / (1 + z2 / n))

    def expected_tokens(self, k: int) -> float:
        e = self._expected.get(k)
        if e is None:
            total, run = 1.0, 1.0
            for i in range(k):
                run *= self.rate(i)
                total += run
            e = self._expected[k] = total
        return e


class StepTime:
    """One length's cost at one depth, at the machine's usual speed (``Slowdown``): the
    median of its last COST_WINDOW steady samples, so that a stalled step or the slow
    second step after a change of length (caches still cold) moves it little, leaving out
    once SPELL_MIN_SAMPLES stand behind it the samples above SPELL_RATIO times their lower
    quartile, so that a slow spell of a shared machine (a dozen steps at 1.5-3x, the
    noise's usual shape on a 2-core VM with a busy neighbour) does not move it either; a
    sample below FAST_SAMPLE times the figure drops the samples it shows were slowed (a
    step cannot run faster than the machine allows, while a neighbour can slow it down
    any amount); ``guess`` stands in while there are none.

    The median of the last 8 moved with every spell: on tiny:step35 (acceptance 0.9) a
    spell while drafting 3 priced it at 16 ms against 7 ms, the policy went to 2 and to 1
    as further spells priced each in turn, then to plain decoding, whose figure came from a
    quiet minute, and decoded plainly for the rest of the bench's rounds (0.49x draft 3).
    """

    __slots__ = ("samples", "ordered", "guess", "value", "updated")

    def __init__(self, guess: float | None = None, copies: int = 0):
        self.samples: deque[float] = deque([guess] * copies if guess is not None else (), maxlen=COST_WINDOW)
        self.ordered = sorted(self.samples)     # the same, in order of size
        self.guess, self.updated = guess, -1
        self.value = guess

    @property
    def weight(self) -> int:
        return len(self.samples)

    def add(self, x: float, step: int = -1) -> None:
        ordered = self.ordered
        if ordered and x < FAST_SAMPLE * self.value:
            cut = x / FAST_SAMPLE
            self.samples = deque((s for s in self.samples if s <= cut), maxlen=COST_WINDOW)
            del ordered[bisect.bisect_right(ordered, cut):]
        if len(self.samples) == COST_WINDOW:
            del ordered[bisect.bisect_left(ordered, self.samples[0])]
        self.samples.append(x)
        bisect.insort(ordered, x)
        # the median, leaving out the samples above SPELL_RATIO times the lower quartile
        # once SPELL_MIN_SAMPLES stand behind it (a spell's); the lower of the middle two
        n = len(ordered)
        if n >= SPELL_MIN_SAMPLES:
            n = bisect.bisect_right(ordered, SPELL_RATIO * ordered[(n - 1) // 4])
        self.value = ordered[(n - 1) // 2]
        self.updated = step

    def restart(self) -> None:
        """Drop the samples (their era may be over); the figure stands as a guess until
        the next steady sample."""
        self.samples.clear()
        self.ordered.clear()
        self.guess = self.value

    def add_provisional(self, x: float, step: int = -1) -> None:
        """A sample known to run high (see StepCosts): kept, as the least of such samples,
        only until a real one comes; one below the estimate shows that the estimate ran
        high and counts as a real one."""
        if not self.samples:
            self.guess = self.value = x if self.guess is None else min(self.guess, x)
            self.updated = step
        elif x < self.value:
            self.add(x, step)


def _usual(ratio: float) -> bool:
    """A step's time over its length's figure is within SPELL_RATIO either way."""
    return 1 <= ratio * SPELL_RATIO and ratio <= SPELL_RATIO


class Slowdown:
    """How much slower than usual the machine runs now (``factor``): 1.0, or while
    SPELL_STEPS steady steps in a row took more than SPELL_RATIO times their length's
    figure (or less than its inverse), the median of their ratios; back to 1.0 once
    SPELL_STEPS in a row are within SPELL_RATIO again. Nothing in between: a factor that
    followed every step would carry each step's noise into every length's figure."""

    __slots__ = ("factor", "recent")

    def __init__(self):
        self.factor = 1.0
        self.recent: deque[float] = deque(maxlen=SPELL_STEPS)

    def observe(self, ratio: float) -> None:
        """``ratio``: a steady step's seconds over its length's figure (a figure is kept at
        factor 1)."""
        self.recent.append(ratio)
        if len(self.recent) < SPELL_STEPS or (self.factor == 1.0 and _usual(ratio)):
            return
        if all(r > SPELL_RATIO for r in self.recent) or all(r * SPELL_RATIO < 1 for r in self.recent):
            self.factor = statistics.median(self.recent)
        elif all(_usual(r) for r in self.recent):
            self.factor = 1.0


class StepCosts:
    """Measured seconds of a step with k drafts, by depth bucket.

    Only a step that drafts as many tokens as the step before it is timed as it is
    (steady): a step after a change of length rebuilds compute graphs and runs with cold
    caches, which costs a tiny model several times a steady step. Such a sample only
    stands in while the length has no steady one here.

    Samples are kept divided by the machine's slowdown when they were taken, and figures
    are given times the slowdown now (``Slowdown``, one for all the batch sizes' costs):
    a length timed first in a slow spell (the first steps at a new depth, a probe) is then
    priced as the others, which were timed at the usual speed, and a decision stays the
    same through a spell (it scales every length alike), while what is weighed in seconds
    (a switch's cost, the heads' catch-up) is weighed against this minute's step costs.
    """

    def __init__(self, slowdown: Slowdown | None = None):
        self.slowdown = slowdown if slowdown is not None else Slowdown()
        self.buckets: dict[int, dict[int, StepTime]] = {}
        # points() by (bucket, steady_only), with the slowdown factor they were given at,
        # until the figures change: a decision predicts every length's cost, each from the
        # points, and on a tiny model building them anew for each showed in profiles
        self._points: dict[tuple[int, bool], tuple[float, dict[int, float]]] = {}

    def add(self, bucket: int, k: int, seconds: float, step: int, steady: bool = True) -> None:
        self._points.clear()
        by_k = self.buckets.setdefault(bucket, {})
        m = by_k.get(k)
        if m is None:
            m = by_k[k] = StepTime()
        factor = self.slowdown.factor
        if steady and m.weight >= SPELL_STEPS:
            ratio = seconds / m.value
            self.slowdown.observe(ratio)
            # a step that ran at the usual speed for its length is taken as it is, even in
            # a spell (it may be the spell's end); one that did not, at the spell's factor
            factor = 1.0 if _usual(ratio) else self.slowdown.factor
        if steady:
            m.add(seconds / factor, step)
        else:
            m.add_provisional(seconds / factor, step)

    def steady(self, bucket: int, k: int) -> bool:
        return self.samples(bucket, k) > 0

    def samples(self, bucket: int, k: int) -> int:
        """Steady samples behind the estimate (at most its window)."""
        m = self.buckets.get(bucket, {}).get(k)
        return m.weight if m is not None else 0

    def points(self, bucket: int, steady_only: bool = False) -> dict[int, float]:
        """Each length's figure here, by length (``steady_only``: where steady samples stand
        behind it). Callers must not change the dict."""
        key = (bucket, steady_only)
        f = self.slowdown.factor
        cached = self._points.get(key)
        if cached is not None and cached[0] == f:    # (another size class may have moved the factor)
            return cached[1]
        pts = {k: m.value * f for k, m in sorted(self.buckets.get(bucket, {}).items())
               if m.value is not None and (m.weight > 0 or not steady_only)}
        self._points[key] = (f, pts)
        return pts

    def restart(self, bucket: int, k: int) -> None:
        """``k``'s figure here is to be timed afresh (``StepTime.restart``)."""
        m = self.buckets.get(bucket, {}).get(k)
        if m is not None and m.value is not None:
            self._points.clear()
            m.restart()

    def last_update(self, bucket: int, k: int) -> int:
        m = self.buckets.get(bucket, {}).get(k)
        return m.updated if m is not None else -1

    def seed_bucket(self, bucket: int) -> None:
        """Start an unmeasured bucket from its nearest measured neighbour's costs, weighted
        as SEED_WEIGHT samples: its first steps refine them instead of replacing them (a
        lone sample can be far off)."""
        others = [b for b in self.buckets if b != bucket and self.points(b)]
        if not others or self.points(bucket):
            return
        near = min(others, key=lambda b: abs(b - bucket))
        self._points.clear()
        self.buckets[bucket] = {k: StepTime(m.value, min(m.weight, SEED_WEIGHT))
                                for k, m in self.buckets[near].items() if m.value is not None}

    def seed(self, other: "StepCosts", scale: float) -> None:
        """Start from another's figures times ``scale``, as guesses the first sample replaces."""
        self._points.clear()
        for b, by_k in other.buckets.items():
            for k, m in by_k.items():
                if m.value is not None:
                    self.buckets.setdefault(b, {})[k] = StepTime(m.value * scale)

    def predict(self, bucket: int, k: int, steady_only: bool = False) -> float | None:
        """Seconds of a step with k drafts here: measured, or interpolated from what was
        (``steady_only``: from steady samples alone, leaving out the high ones of steps
        that followed a change of length)."""
        pts = self.points(bucket, steady_only)
        if k in pts:
            return pts[k]
        if len(pts) >= 2:
            return _line(pts, k)
        others = sorted((b for b in self.buckets if b != bucket and self.points(b, steady_only)),
                        key=lambda b: abs(b - bucket))
        if not pts:                                      # nothing here yet: the nearest bucket's figure
            return self.predict(others[0], k, steady_only) if others else None
        (j, t_j), = pts.items()                          # one point: the nearest bucket's shape
        for b in others:
            shape = self.points(b, steady_only)
            if len(shape) >= 2 or (j in shape and k in shape):
                t_k_b, t_j_b = _line(shape, k), _line(shape, j)
                if t_j_b > 0:
                    return t_j * t_k_b / t_j_b
        return t_j * (1 + DEFAULT_DRAFT_COST * k) / (1 + DEFAULT_DRAFT_COST * j)


def _line(pts: dict[int, float], k: int) -> float:
    """Piecewise-linear through the measured points, extended by the nearest segment, but
    never falling beyond them: a step with more drafts does more work, so a segment that
    falls (a slow spell while the shorter length was timed) is extended flat; followed
    down, it would make a long draft look free."""
    if k in pts:
        return pts[k]
    xs = sorted(pts)
    if len(xs) == 1:
        return pts[xs[0]]
    if k < xs[0]:
        a, b = xs[0], xs[1]
    elif k > xs[-1]:
        a, b = xs[-2], xs[-1]
    else:
        a = max(x for x in xs if x < k)
        b = min(x for x in xs if x > k)
    slope = (pts[b] - pts[a]) / (b - a)
    if a < k < b:
        return max(pts[a] + slope * (k - a), 1e-9)
    end = a if k < a else b                      # extended from the nearest measured point
    return max(pts[end] + max(slope, 0.0) * (k - end), 1e-9)


class DraftPolicy:
    """Picks each step's draft length from this session's measured costs and acceptance
    (see the module's docstring). ``choose(depth)`` before the step, ``update(...)`` after."""

    def __init__(self, draft_max: int, acceptance: Acceptance | None = None, slowdown: Slowdown | None = None):
        self.draft_max = draft_max
        self.acceptance = acceptance or Acceptance(draft_max)
        self.costs = StepCosts(slowdown)
        self.steps = 0
        self.interval = BASE_INTERVAL
        self.next_probe = 3                # the first steps decode plainly (the second is timed), the third drafts once
        self.probing: int | None = None    # the decision a running probe departed from
        self.bucket = 0
        self.last_k = 0
        self.trial_left = 0                # steps a probe still runs at trial_k
        self.trial_k = 0
        self._surprised = False            # a probe's draft was accepted against the odds
        self._best = 0                     # the decision, recomputed every RECHECK(_PLAIN) steps
        self.doubting = False              # it drafts only while acceptance is in doubt (in_doubt)
        self.timed = True                  # whether the chosen step must be timed and reported
        self.coast = 0                     # plain steps the driver takes without asking (step_sequences)
        self.plain_retime = 0              # steady plain steps still to time after a switch to plain (choose)
        self.left: int | None = None       # the length such a switch left, timed again after them
        self.switch_cost = RunningMean(TIME_WINDOW)   # extra seconds of a change of length
        self.join_cost = RunningMean(JOIN_WINDOW)     # seconds per drafting step for arrivals (BatchDraftPolicy)
        self.stay = RunningMean(TIME_WINDOW)          # steps a batch stays in this size class (BatchDraftPolicy)
        self.probe_cost = RunningMean(TIME_WINDOW)    # extra seconds of a probe from plain decoding
        self._recheck_at = 0
        self.guessed_plain = False         # costs seeded from another batch size (BatchDraftPolicy)

    @property
    def decision(self) -> int:
        """The length the policy has settled on (a probe departs from it for a step or two)."""
        return self._best

    # ------------------------------------------------------------------ estimates

    def expected_tokens(self, k: int) -> float:
        return self.acceptance.expected_tokens(k)

    def rates(self, bucket: int | None = None) -> dict[int, float]:
        """Expected tokens per second for each draft length with a cost estimate."""
        b = self.bucket if bucket is None else bucket
        join = self.join_cost.value or 0.0
        out = {}
        for k in range(self.draft_max + 1):
            t = self.costs.predict(b, k)
            if t is not None and t > 0:
                out[k] = self.expected_tokens(k) / (t + (join if k > 0 else 0.0))
        return out

    def best(self, bucket: int | None = None) -> int:
        """The length with the most expected tokens per second, counting what switching to
        it costs: the measured extra time of a switch (graphs rebuilt, caches cold),
        there and back, spread over the steps a decision lasts (the probe interval, at
        least SWITCH_HORIZON). The current decision stays unless another beats it by more
        than SWITCH_MARGIN."""
        rates = self.rates(bucket)
        if not rates:
            return 0
        if self.switch_cost.value:
            spread = 2 * self.switch_cost.value / max(self.interval, SWITCH_HORIZON)
            for k in rates:
                if k != self._best:      # seconds per step E/rate, plus the spread switch cost
                    e = self.expected_tokens(k)
                    rates[k] = e / (e / rates[k] + spread)
        top = max(rates, key=lambda k: (rates[k], -k))
        current = self._best
        if current in rates and rates[top] <= rates[current] * SWITCH_MARGIN:
            return current
        return top

    def _decision(self) -> int:
        """``best()``, except that a switch from drafting to plain decoding waits until the
        first draft's acceptance is known well enough (``in_doubt``; ``doubting`` says so,
        and the decision is then recomputed at every step)."""
        best = self.best()
        self.doubting = best == 0 and self.in_doubt()
        return 1 if self.doubting else best

    def in_doubt(self) -> bool:
        """The last step drafted, and the first draft's acceptance rests on fewer than
        DOUBT_OBSERVATIONS observations of the generations' own texts (the load-time check's
        and the prior are not evidence of them), so few that its upper bound (DOUBT_Z) would still
        make a step with one draft beat plain decoding. Then drafting one token goes on: each
        step adds an observation where the heads are current and no graphs change, while
        after a switch to plain decoding every look costs a probe (the heads' catch-up,
        graphs rebuilt both ways) and, with its single observation a probe, backs off; a
        drafting model whose first few drafts were rejected by chance (two or three in a
        row happen often at an acceptance of 0.5) would stay plain for most of a
        generation. Near the break-even acceptance a step drafting one costs about what a
        plain one does, and far below it the bound drops within a few steps. The check's
        texts counted as three observations (with the prior): on a tiny acceptance-0.6
        model whose check accepted 39% of first drafts, six steps of the generation ended
        the doubt, and two of six 192-token bench runs then decoded plainly throughout;
        counted apart, none of eight did."""
        if self.last_k <= 0:
            return False
        return self.one_draft_may_pay(DOUBT_Z)

    def one_draft_may_pay(self, z: float) -> bool:
        """The first draft's acceptance rests on fewer than DOUBT_OBSERVATIONS of the
        generations' own observations, and its upper bound at ``z`` would make a step with
        one draft beat a plain one. A step with one draft costs its steady figure, or, while
        fewer than LEARN_SAMPLES steady steps stand behind that, the lower of its figure
        and the prior shape's (DEFAULT_DRAFT_COST): the steps after a switch run high, and
        one steady step may be a stalled one (on the 0.7 GB F16 oracle's costs in
        simulate_auto.py, one steady step timed at 1.4x drafting's cost, with three drafts
        rejected, held plain decoding for whole runs)."""
        if self.draft_max < 1 or self.acceptance.seen[0] >= DOUBT_OBSERVATIONS:
            return False
        b = self.bucket
        if not self.costs.steady(b, 0):
            return False        # plain decoding's figure runs high (see StepCosts): no fair test
        t0 = self.costs.predict(b, 0)
        if self.costs.samples(b, 1) >= LEARN_SAMPLES:
            t1 = self.costs.predict(b, 1, steady_only=True)
        else:
            t1 = min(filter(None, (self.costs.predict(b, 1), t0 * (1 + DEFAULT_DRAFT_COST))))
        return (1 + self.acceptance.upper_bound(0, z)) / t1 > 1 / t0

    def _acceptance_rules_out(self, bucket: int) -> bool:
        """At ``bucket``'s costs no draft length would beat plain decoding even if every
        draft position were accepted as often as the first draft's upper bound (DOUBT_Z)
        allows, after at least THIN_EVIDENCE of the generations' own observations of it."""
        t0 = self.costs.predict(bucket, 0)
        if not t0 or self.acceptance.seen[0] < THIN_EVIDENCE:
            return False
        a = self.acceptance.upper_bound(0, DOUBT_Z)
        for k in range(1, self.draft_max + 1):
            t = self.costs.predict(bucket, k)
            if not t or sum(a ** i for i in range(k + 1)) / t >= 1 / t0:
                return False
        return True

    def hopeless(self) -> bool:
        """Drafting would not beat plain decoding here even if every draft were accepted
        (a length not timed steadily given LEARN_BEYOND's benefit of the doubt: a line
        through two noisy points is no proof, and verify costs grow less than linearly)."""
        t0 = self.costs.predict(self.bucket, 0)
        drafting = range(1, self.draft_max + 1)
        if t0 is None or not any(self.costs.steady(self.bucket, k) for k in drafting):
            return False
        if any(0 < self.costs.samples(self.bucket, k) < LEARN_SAMPLES for k in drafting):
            return False                    # one step is no proof: it may have been stalled
        if self.costs.samples(self.bucket, 0) < PLAIN_SAMPLES:
            return False                    # nor are two plain ones: a lucky pair would rule drafting out
        def best_case(k: int) -> float:
            margin = 1.0 if self.costs.steady(self.bucket, k) else LEARN_BEYOND
            return margin * (k + 1) / self.costs.predict(self.bucket, k)
        return all(best_case(k) < 1 / t0 for k in range(1, self.draft_max + 1))

    # ------------------------------------------------------------------ decisions

    def choose(self, depth: int = 0) -> int:
        self.steps += 1
        self.timed = True
        bucket = depth_bucket(depth)
        if bucket != self.bucket:
            shallower, deeper, self.bucket = self.bucket, bucket > self.bucket, bucket
            self._recheck_at = 0
            # a depth not measured yet: its costs differ, probe now; unless plain decoding
            # has won long enough to probe at the slowest pace, or the drafts' acceptance
            # alone rules drafting out (a verify's cost relative to a decode's grows with
            # depth: what did not pay above does not pay deeper; and a probe from plain
            # decoding costs the heads' catch-up, a dozen plain steps' worth on some models)
            settled_plain = self._best == 0 and (self.interval >= MAX_INTERVAL
                                                 or self._acceptance_rules_out(shallower))
            if not self.costs.points(bucket) and not (deeper and settled_plain):
                self.next_probe = min(self.next_probe, self.steps)
            self.costs.seed_bucket(bucket)
        if self.draft_max < 1:
            return 0
        if self.trial_left:
            self.trial_left -= 1
            return self.trial_k
        if self.steps < self._recheck_at and self.steps < self.next_probe:
            # costs drift slowly: no need to recompute every step, nor to time every plain one
            # once PLAIN_SAMPLES stand behind its cost here (one would rest on the second step
            # after a change of length, which runs slow); the step before a probe is timed too,
            # so that the probe is weighed against a fresh figure of plain decoding
            self.timed = self._best > 0 or self._plain_unsettled() or self.steps + 1 >= self.next_probe
            return self._best
        before, best = self._best, self._decision()
        self._best = best
        if best > 0:
            self.plain_retime, self.left = 0, None
        elif before > 0:
            # A switch from drafting to plain decoding: plain decoding's figure here was taken
            # before drafting began, perhaps in a faster minute (a shared VM's speed drifts
            # by 10-25% within a minute), or is a guess (another depth's, the load-time
            # check's), while drafting's figures are this minute's. Once decoding plainly,
            # nothing timed it again. On a tiny acceptance-0.6 model whose drafting pays
            # 1.2-1.3x, plain's figure stood at 3.46 ms while its steps took 4.1 ms, and
            # plain decoding held for two calls (380 steps). On tiny:step35 after a
            # 2,048-token prompt, the check's 3.2 ms (timed at depth 0; 4.8 ms there) beat
            # drafting 3 (12 ms, acceptance 0.9), and drafting came back 55 steps later at
            # the next probe. So the plain steps after the switch are timed, and the
            # decision is looked at again once they are (update_time).
            self.plain_retime = PLAIN_SAMPLES
            if self.promising():
                # Drafts were accepted: the switch was the costs', and drafting's figure
                # may be a slower minute's (a shared VM slowed 1.2-1.35x for 50 steps, not
                # a spell: on the 0.7 GB Q4_K_M oracle after 2,048 tokens drafting 1 read
                # 17 ms where it took 14, against plain decoding's 9.7 from a faster
                # minute; plain decoding won on paper, and held for the last 200 steps of
                # the run). Both figures start afresh: plain decoding's from the steps
                # timed now, the length left's from a probe right after them.
                self.costs.restart(self.bucket, 0)
                self.costs.restart(self.bucket, before)
                self.left = before
        self._recheck_at = self.steps + (1 if self.doubting else RECHECK if best or self.plain_retime else RECHECK_PLAIN)
        unproven = self.plain_unproven(best)
        if unproven:
            self.next_probe = min(self.next_probe, self.steps)
        if self.steps >= self.next_probe:
            self.probing = best
            if unproven or (self.guessed_plain and best > 0 and not self.costs.steady(self.bucket, 0)):
                # plain decoding's figure is a guess: time it before it decides anything
                # more (see plain_unproven; with drafts accepted, another batch size's
                # figure scaled runs high and would keep a large batch drafting where
                # plain decoding is faster)
                learning, k = False, 0
            else:
                learn = self.to_learn(best)     # drafts are accepted: a length that may win, not timed yet
                learning = learn is not None
                k = learn if learning else self._probe_length(best)
            # A probe's own step is timed high (see StepCosts); a second step at the same
            # length gives its steady cost. Worth it where drafting runs anyway, learning
            # wants it, drafts are accepted and the length has fewer than LEARN_SAMPLES
            # steady steps here, or the probe is one the thin-evidence pace asked for
            # (finish_step, PACE_Z): its second step is a second observation for a third
            # of a plain step, where another probe would pay the heads' catch-up and two
            # switches again. From plain decoding with drafts rejected, one step.
            if best > 0 or learning or (self.promising() and self.costs.samples(self.bucket, k) < LEARN_SAMPLES) \
                    or (k == 1 and self.acceptance.seen[0] >= THIN_EVIDENCE and self.one_draft_may_pay(PACE_Z)):
                self.trial_k, self.trial_left = k, 1
                if learning:                    # as many steady steps as learning wants
                    self.trial_left = max(1, LEARN_SAMPLES - self.costs.samples(self.bucket, k))
            return k
        return best

    def plain_unproven(self, best: int) -> bool:
        """The decision drafts, its drafts are accepted no more often than not, and plain
        decoding's figure at this depth is not to be trusted: so thin a margin may be that
        figure's alone, so plain decoding is timed at once rather than at the next probe.
        Not to be trusted: no steady step stands behind it (the load-time check's, see
        ``BatchDraftPolicy.seed``, or another batch size's: a check whose steps ran slow,
        there beside a thread that had decoded before vendor patch 0025, timed a 23 ms plain
        step at 36 ms, and a 64-token call then drafted one rejected token a step at 0.85x
        plain), or it ran high (``plain_ran_high``)."""
        return (best > 0 and self.probing is None and not self.trial_left and not self.promising()
                and (not self.costs.steady(self.bucket, 0) or self.plain_ran_high()))

    def plain_ran_high(self) -> bool:
        """Plain decoding's figure here stands at or above a drafting length's steady one,
        on fewer than PLAIN_SAMPLES steady steps. A step that drafts does all that a plain
        step does and more, so the plain steps behind it were slowed (a busy machine, a
        stall): the median of two or three such steps is theirs. Left alone it never heals,
        since drafting steps do not time plain decoding and probes from a drafting
        decision go first to the lengths with fewer samples: in simulation, acceptance 0
        and a generation's first two or three plain steps slowed 1.6-3x, the policy drafted
        on 109-180 of the last 180 steps of 200."""
        b = self.bucket
        if self.costs.samples(b, 0) >= PLAIN_SAMPLES:
            return False
        t0 = self.costs.predict(b, 0)
        return any(self.costs.steady(b, k) and self.costs.predict(b, k) <= t0
                   for k in range(1, self.draft_max + 1))

    def _probe_length(self, best: int) -> int:
        """The length of a probe that is not learning (see ``to_learn``)."""
        if best == 0:
            return 1                        # the shortest step that drafts
        # a length with no steady sample here first (its figure is a guess: seeded from
        # another batch size or depth), else the one that may most beat the decision: its
        # rate raised the more the fewer steady samples stand behind it (an unlucky one must
        # not rule a length out for good); the stalest among equals
        rates = self.rates()
        def hope(k: int) -> tuple[bool, float, int]:
            n = self.costs.samples(self.bucket, k)
            return (n == 0, rates.get(k, 0.0) * (1 + UNCERTAINTY / max(n, 1) ** 0.5),
                    -self.costs.last_update(self.bucket, k))
        return max(self._neighbours(best), key=hope)

    def promising(self) -> bool:
        """Drafts have been accepted more often than not."""
        return self.acceptance.rate(0) > ACCEPT_PRIOR

    def to_learn(self, best: int) -> int | None:
        """While drafts are accepted: of the lengths with fewer than LEARN_SAMPLES steady
        samples at this depth, the one with the best hopeful rate, if that beats ``best``'s;
        else None. Hopeful: the length's own samples, or a prediction from the steady samples
        of the others, times LEARN_BEYOND (LEARN_BETWEEN between two measured lengths);
        before any drafting length has a steady sample, the more hopeful of a probe's step
        (which ran high: graphs rebuilt) and the prior shape (DEFAULT_DRAFT_COST) --
        optimism that costs a few steps to correct. Where the decision itself drafts a length
        that has no steady sample here, that length comes first: its steps cost nothing
        beyond the decision's."""
        if not self.promising():
            return None
        rates = self.rates()
        if best not in rates:
            return None
        b = self.bucket
        if best > 0 and not self.costs.steady(b, best):
            # the decision drafts on figures from elsewhere (the load-time check's, a
            # shallower depth's): its own steps time it here at no detour, where a climb from
            # one draft would spend a short generation's first steps on lengths it ruled out
            return best
        measured = [k for k in range(self.draft_max + 1) if self.costs.steady(b, k)]
        t0 = self.costs.predict(b, 0)
        candidates = {}
        # one length beyond the longest measured at a time until a measured one beats plain
        # decoding (a long draft is the dearest probe, worth it only once the shorter ones
        # show that drafting pays), then the one predicted best, wherever it is: a climb
        # that stopped at every length on its way cost a short generation several steps
        if any(rates.get(k, 0.0) > rates.get(0, 0.0) for k in measured if k > 0):
            top = self.draft_max
        else:
            top = min(max(measured, default=0) + 1, self.draft_max)
        for k in range(1, top + 1):
            n = self.costs.samples(b, k)
            if n >= LEARN_SAMPLES:
                continue
            margin = LEARN_BETWEEN if not n and measured and k < max(measured) else LEARN_BEYOND
            # its own sample so far (it may have been unlucky), or the shape of the cost curve
            if n or any(j > 0 for j in measured):
                t = self.costs.predict(b, k, steady_only=True)
            else:
                guess = t0 * (1 + DEFAULT_DRAFT_COST * k) if t0 else None
                t = min(filter(None, (self.costs.predict(b, k), guess)), default=None)
            if t:
                candidates[k] = margin * self.expected_tokens(k) / t
        if not candidates:
            return None
        k = max(candidates, key=lambda j: (candidates[j], -j))
        return k if candidates[k] > rates[best] else None

    def still_learning(self, best: int) -> bool:
        """Drafts are accepted but a length that may win has no steady cost at this depth
        yet (see ``to_learn``)."""
        return self.to_learn(best) is not None

    def _neighbours(self, best: int) -> list[int]:
        """What a probe from ``best`` may try: from plain decoding the shortest drafting step;
        from a draft length every other length."""
        if best == 0:
            return [1]
        return [k for k in range(self.draft_max + 1) if k != best]

    def coast_budget(self, depth: int) -> int:
        """Plain steps to come (from ``depth``, one token each) before the policy has anything
        to decide, time or probe: up to the next recheck, the step before a probe (timed), or
        the next depth bucket; 0 while plain steps are timed (``_plain_unsettled``)."""
        if self._best != 0 or self.probing is not None or self.trial_left or self._plain_unsettled():
            return 0
        until = min(self._recheck_at, self.next_probe - 1) - self.steps - 1
        return max(0, min(until, bucket_end(self.bucket) - depth))

    def _plain_unsettled(self) -> bool:
        """Plain steps here are timed: the last step drafted (this one is a switch), fewer
        than PLAIN_SAMPLES steady steps stand behind plain decoding's figure, or a switch to
        plain decoding is timing it again (``plain_retime``)."""
        return self.last_k != 0 or self.plain_retime > 0 or self.costs.samples(self.bucket, 0) < PLAIN_SAMPLES

    def coast_step(self) -> bool:
        """Whether this step is a plain one the policy coasts through (``coast``); if so,
        it is counted."""
        if not self.coast:
            return False
        self.coast -= 1
        self.steps += 1
        return True

    def start_sequence(self, depth: int | None = None) -> None:
        """A new generation begins (after a prompt was prefilled) at ``depth``: its first
        step is not steady, whatever length it has (prefill ran graphs of its own), and the
        heads have the prompt's rows queued. Except where plain decoding coasts and the new
        generation starts in the depth bucket it coasts in: then nothing is left to decide
        or time before the coasting ends (plain steps are not timed then, and a switch to
        drafting is decided only at a recheck or a probe), so the new generation coasts on
        from its first step (deciding and timing it cost a tiny model about half a plain
        step's worth of Python per call)."""
        if self.coast and depth is not None and depth_bucket(depth) == self.bucket:
            self.coast = min(self.coast, bucket_end(self.bucket) - depth)
            return
        self.last_k = -1
        self.coast = 0

    def catch_up_first(self, k: int) -> bool:
        """Whether the heads should take their queued rows before a step with k drafts
        (the previous step decoded plainly, or none ran yet), so that the step's time is a
        drafting step's."""
        return k > 0 and self.last_k <= 0

    def update(self, k: int, n_accepted: int, seconds: float, depth: int | None = None,
               catch_up: float = 0.0, rebuilt: bool = False) -> None:
        self.update_time(k, seconds, depth, catch_up, rebuilt=rebuilt)
        self.update_acceptance(k, (n_accepted,))
        self.finish_step(k)

    def update_time(self, k: int, seconds: float, depth: int | None = None, catch_up: float = 0.0,
                    same_batch: bool = True, joined: float = 0.0, rebuilt: bool = False) -> None:
        """A step's seconds, without the heads' catch-up before it (``catch_up`` seconds):
        a drafting step's cost does not include it (plain decoding leaves the heads only
        their newest rows, see ``sequence.PLAIN_HEADS_WINDOW``, so a switch catches up on a
        bounded number of rows); a probe from plain decoding pays it, a part of the price of
        looking (``probe_cost``).

        Several sequences (BatchDraftPolicy): a step right after the batch changed (a
        sequence joined or left: ``same_batch`` False) runs slow whatever its length (graphs
        rebuilt for the new rows, the newcomer's KV cold), so, like a change of length, it
        is not timed as steady; the heads' catch-up on a newcomer's prompt (``joined``
        seconds, paid only by a step that drafts) is a cost of drafting on a busy server,
        kept apart as the mean per drafting step (``join_cost``) and added to every
        drafting length's step.

        ``rebuilt``: the step built the target's compute graph anew (``Session.graph_builds``)
        although its length and batch stayed: its KV span grew past a multiple of 256 cells.
        That step runs slow too (on a tiny model 2-4x a steady one) and is not steady. It
        comes with every new depth bucket from 256 on, where the policy times the first step,
        so where generations keep ending a few dozen tokens into a bucket its figures would
        rest on such steps alone: after five generations of 1,024 tokens a model whose drafts
        are never accepted had plain decoding timed at 1.7x its cost at 1,024 tokens, and
        drafted 30 rejected tokens there."""
        bucket = self.bucket if depth is None else depth_bucket(depth)
        steady = k == self.last_k and same_batch and not rebuilt
        if k > 0:
            self.join_cost.add(joined)
        if k != self.last_k and same_batch:
            # what the switch cost beyond a steady step of this length; and what a probe from
            # plain decoding cost beyond a plain step (the price of looking, whatever the
            # length's steady cost turns out to be); not where the batch changed too
            if self.costs.steady(bucket, k):
                self.switch_cost.add(max(seconds - self.costs.points(bucket)[k], 0.0))
            if k > 0 and self.last_k <= 0 and self.costs.steady(bucket, 0):
                self.probe_cost.add(max(seconds - self.costs.predict(bucket, 0), 0.0) + catch_up)
        self.costs.add(bucket, k, seconds, self.steps, steady=steady)
        if k == 0 and steady and self.plain_retime:
            self.plain_retime -= 1
            if not self.plain_retime:
                self._recheck_at = 0        # plain decoding's figure is fresh: decide again
                if self.left is not None:
                    self.next_probe = min(self.next_probe, self.steps + 1)
                    self.left = None

    def update_acceptance(self, k: int, accepted: Sequence[int]) -> bool:
        """Record a step's acceptance (the drafts accepted in each of its sequences that
        drafted); True when most of its first drafts were accepted where the estimate
        called that unlikely (the content may have turned predictable). Most, not one: of
        eight sequences at acceptance 0.3 one has a first draft accepted in nearly every
        step, and a surprise resets the pace of probes, so a server whose plain decoding
        won probed at the base pace for good (8 clients in simulation: 0.97x plain on
        average, 0.92x in the worst run)."""
        if k == 0 or not accepted:
            return False
        surprise = (2 * sum(n > 0 for n in accepted) > len(accepted)) and self.acceptance.rate(0) < 0.5
        self.acceptance.observe(k, accepted)
        self._surprised = self._surprised or surprise
        if surprise:
            self._recheck_at = 0
        return surprise

    def finish_step(self, k: int) -> None:
        self.last_k = k
        if self.probing is None:
            self._surprised = False
            return
        if self.trial_left:                 # the probe's second step comes next
            return
        before, self.probing = self.probing, None
        self._recheck_at = 0
        after = self._decision()
        learning = self.still_learning(after)
        if self.hopeless():                 # only the costs could change that: the slowest pace
            self.interval = max(MAX_INTERVAL, min(self.interval * BACKOFF, HOPELESS_INTERVAL))
        elif after != before or self._surprised or learning:
            self.interval = BASE_INTERVAL
            if learning:
                # a length that may win has too few steady samples here: time it at the next step, not
                # an interval later (a cold start would otherwise climb one length per
                # interval, and a short generation end before it reaches the best one)
                self._surprised = False
                self.next_probe = self.steps + 1
                return
        elif after > 0 and self._close_call(k, after):
            # the probed length came within CLOSE_CALL of the decision: a few noisy samples
            # may have decided it, so look again at the base pace (cheap: the two are close)
            self.interval = max(BASE_INTERVAL, self._affordable_interval(after))
        elif after == 0 and (self.acceptance.seen[0] < THIN_EVIDENCE or self.one_draft_may_pay(PACE_Z)):
            # plain decoding stays on one rejected draft of the generation's own, or on so
            # few that drafting may still pay (PACE_Z): too few to tell acceptance 0.5
            # from 0, so look again soon: at the base pace, with THIN_PROBE_BUDGET of the
            # time for probes. Three rejected drafts in a row come one time in thirteen at
            # acceptance 0.58; after them a probe at 1% of the time came 444 steps later,
            # and on the 0.7 GB F16 oracle's costs in simulation (drafting 1.2x plain) three
            # runs in 24 decoded plainly throughout. The load-time check's texts are no
            # evidence of the user's text (see Acceptance.observe_texts): counted here
            # with the prior, a check that saw few drafts accepted and a first probe whose
            # draft was rejected (four times in ten at acceptance 0.6) backed probes off
            # to 1% of the time, and the 0.7 GB Q4_K_M oracle decoded plainly on 63% of a
            # bench cell's steps where drafting 1-2 win 13-17%
            self.interval = max(BASE_INTERVAL, self._affordable_interval(budget=THIN_PROBE_BUDGET))
        else:
            self.interval = min(self.interval * BACKOFF, MAX_INTERVAL)
            if after == 0:
                self.interval = max(self.interval, self._affordable_interval())
        self._surprised = False
        self.next_probe = self.steps + self.interval

    def decline_probe(self) -> None:
        """The step ``choose`` made a probe of runs plainly after all: the batch policy found
        that the heads' catch-up before it could not pay (``BatchDraftPolicy.decide``). The
        pace backs off as after a probe that changed nothing: a declined probe adds no
        observation, so the pace for thin evidence would ask again every BASE_INTERVAL
        steps, and each ask times a few plain steps (on a tiny model at a long context,
        where a step drafting one costs more than two plain ones, that was 3 of every 16
        steps and 4% of the time)."""
        if self.probing is None:
            return
        self.probing, self.trial_left = None, 0
        self.interval = min(self.interval * BACKOFF, MAX_INTERVAL)
        self.next_probe = self.steps + self.interval

    def _close_call(self, probed: int, best: int) -> bool:
        rates = self.rates()
        return probed != best and probed in rates and best in rates and rates[probed] >= CLOSE_CALL * rates[best]

    def _affordable_interval(self, best: int = 0, budget: float = PROBE_BUDGET) -> int:
        """Enough steps between probes that probing costs at most PROBE_BUDGET of the time
        (on a tiny model at a long context a probe from plain decoding, with the heads
        catching up and graphs rebuilt both ways, costs dozens of plain steps; from a draft
        length a probe costs its two switches)."""
        t = self.costs.predict(self.bucket, best)
        if best > 0:
            probe = 2 * self.switch_cost.value if self.switch_cost.value is not None else None
        elif self.probe_cost.value is not None:
            # there (the probe's step beyond a plain one) and back (the next plain step
            # rebuilds its graphs: a switch)
            probe = self.probe_cost.value + (self.switch_cost.value or self.probe_cost.value)
        else:
            probe = None
        if not t or probe is None:
            return 0
        return int(min(probe / (budget * t), HOPELESS_INTERVAL))


class CatchUpCost:
    """Seconds the heads take to catch up on r queued rows of one sequence, by depth bucket:
    a line a + b r fitted to the last CATCH_UP_SAMPLES catch-ups there (a fixed cost per
    call, graphs built for each head, and a cost per row that grows with the context, as
    every row attends over it); the nearest bucket's where this one has none."""

    def __init__(self):
        self.buckets: dict[int, deque[tuple[int, float]]] = {}
        self._lines: dict[int, tuple[float, float]] = {}   # line() by bucket, until a catch-up is added

    def add(self, bucket: int, rows: int, seconds: float) -> None:
        if rows > 0:
            self._lines.clear()
            self.buckets.setdefault(bucket, deque(maxlen=CATCH_UP_SAMPLES)).append((rows, seconds))

    def line(self, bucket: int) -> tuple[float, float] | None:
        """(a, b): seconds a + b r for a catch-up of r rows here; None before any."""
        if not self.buckets:
            return None
        line = self._lines.get(bucket)
        if line is None:
            near = min(self.buckets, key=lambda b: (abs(b - bucket), -b))
            line = self._lines[bucket] = _cost_line(self.buckets[near])
        return line

    def predict(self, bucket: int, rows: list[int]) -> float | None:
        """Seconds for catch-ups of these row counts (one per sequence); None before any."""
        line = self.line(bucket)
        if line is None:
            return None
        a, b = line
        return sum(a + b * r for r in rows if r > 0)


def _cost_line(pts) -> tuple[float, float]:
    """a + b r through (rows, seconds) samples, a and b >= 0. A line needs row counts that
    differ by 2x or more: through near-equal ones (every catch-up of 16-17 prompt rows)
    one noisy sample makes the slope anything; then the cost is proportional to rows."""
    rows = [r for r, _ in pts]
    if max(rows) >= 2 * min(rows):
        n = len(pts)
        mr, ms = sum(rows) / n, sum(s for _, s in pts) / n
        b = sum((r - mr) * (s - ms) for r, s in pts) / sum((r - mr) ** 2 for r in rows)
        a = ms - b * mr
        if b < 0:
            return ms, 0.0                                              # no growth with rows seen
        if a >= 0:
            return a, b
    return 0.0, sum(s for _, s in pts) / sum(rows)


def size_class(n: int) -> int:
    """The batch sizes that share one cost estimate: 1, 2, 3-4, 5-8, 9-16, ... (named by
    their largest)."""
    return 1 << (max(n, 1) - 1).bit_length()


class BatchDraftPolicy:
    """The draft length of a step that decodes n sequences together.

    A step's cost depends on how many sequences it holds, so every class of batch sizes
    (``size_class``: 1, 2, 3-4, 5-8, ...) has its own DraftPolicy; all of them share one
    acceptance estimate. A busy server passes through every size between arrivals: one
    estimate per size would learn the sizes it visits briefly (7 of 8 slots, say) from a
    few noisy steps, and draft there on noise. Within a class step times are taken as they
    are: a step's cost grows much less than its row count (the weights are read once for
    all rows), so scaling a 5-sequence step's time by 8/5 would make plain steps look
    dearer than drafting ones and bias the class toward drafting. A class seen for the
    first time starts from the nearest class's costs scaled by size, as guesses. Tokens per
    second of the step are n times the expected tokens per sequence over the step's time,
    so each maximises exactly that.

    Churn (requests that end and arrive every few steps) costs drafting in two ways the
    step times alone hide: the heads take every newcomer's prompt rows (``joined``, spread
    over drafting steps), and a batch that decoded plainly must let the heads take the
    rows it queued before it drafts again (``switch_in_cost``), which pays only if the
    batch stays in its size class long enough (``decide``). A step right after the batch
    changed is not a steady sample of any length.
    """

    def __init__(self, draft_max: int, trace: DraftTrace | None = None):
        self.draft_max = draft_max
        self.acceptance = Acceptance(draft_max)
        self.slowdown = Slowdown()                     # the machine's, shared by every size class's costs
        self.trace = trace if trace is not None else DraftTrace.from_env()   # see draft_trace
        self.last_same_batch: bool | None = None       # whether the last timed step's batch held still
        self.by_size: dict[int, DraftPolicy] = {}      # size class -> its policy
        self.last_members: tuple = ()                  # the sequences of the last timed step
        self.current_class, self.run_steps = 0, 0      # the size class of the last steps, for how long
        self.last_k = -1                               # the length of the last step that asked
        self.switch_in_cost = RunningMean(TIME_WINDOW)  # heads' catch-up when drafting starts after plain
        self.catch_up = CatchUpCost()                  # the same, per sequence, by rows queued
        self.plain_window = HEADS_WINDOW               # the heads' window while decoding plainly (heads_window)

    def seed(self, seed) -> None:
        """Start from what the load-time check measured (``exactness.StepSeed``; None, as
        where the check did not run or found a difference: nothing to start from): one
        sequence's steady plain steps and a steady step of ``seed.draft`` drafts near the
        start of a context, and how many drafts were accepted there and on the check's
        other texts (a prior for the user's text, ``Acceptance.observe_texts``). They are this
        session's own figures, so the first generation drafts at the length they favour
        from its first step instead of decoding plainly, probing one draft and climbing
        (several steps of a short generation); its own steps refine them as any others.
        The first probe comes at the base pace: the early one a cold start makes (to see
        whether drafts are accepted at all) would only re-measure what the check did.

        The times count as provisional (``StepTime.add_provisional``: they stand until the
        first steady step of their length replaces them): a busy machine at load, or, before
        vendor patch 0025, the OpenMP runtime throttled while the check's own thread ran
        beside a caller's thread that had decoded, can make its steps take several times what
        they take later (a tiny model's 0.15 ms plain step took 5 ms there); and drafting
        that such a plain figure alone favours is checked at once (``plain_unproven``)."""
        if seed is None:
            return
        p = self.policy(1)
        p.costs.add(0, 0, min(seed.plain_s), step=0, steady=False)
        p.costs.add(0, seed.draft, seed.draft_s, step=0, steady=False)
        self.acceptance.observe_texts(seed.draft, [list(seed.accepted)] + [[n] for n in seed.other_texts])
        p.next_probe = max(p.next_probe, BASE_INTERVAL)

    def policy(self, n: int) -> DraftPolicy:
        c = size_class(n)
        if c not in self.by_size:
            p = DraftPolicy(self.draft_max, self.acceptance, self.slowdown)
            if self.by_size:
                near = min(self.by_size, key=lambda m: abs(m - c))
                p.costs.seed(self.by_size[near].costs, c / near)
                p.next_probe = BASE_INTERVAL
                p.guessed_plain = True
            self.by_size[c] = p
        return self.by_size[c]

    def enter(self, n: int) -> DraftPolicy:
        """The policy of a step of n sequences; called once per step, it also measures how
        many steps in a row the batch stays in a size class (``stay``)."""
        c = size_class(n)
        if c == self.current_class:
            self.run_steps += 1
        else:
            if self.current_class in self.by_size and self.run_steps:
                self.by_size[self.current_class].stay.add(self.run_steps)
            self.current_class, self.run_steps = c, 1
        p = self.by_size.get(c)          # (every step: on a tiny model each lookup shows)
        return p if p is not None else self.policy(n)

    def coast_alone(self) -> bool:
        """Whether a step of one sequence alone, in a run of such steps, is one its policy
        coasts through (plain, nothing to decide, time or trace); if so, it is counted as
        ``enter`` and ``step_sequences`` would count it."""
        if self.current_class != 1 or self.trace is not None:
            return False
        p = self.by_size.get(1)
        if p is None or not p.coast_step():
            return False
        self.run_steps += 1
        return True

    def decide(self, p: DraftPolicy, depth: int = 0, switch_in: list[tuple[int, int | None]] | None = None) -> int:
        """``p``'s length for this step, unless it would start drafting after plain
        decoding where the heads' catch-up on the rows queued meanwhile costs more than
        drafting gains, at the rates estimated now, over the steps drafting can run: the
        steps the batch is expected to stay in this size class, and no more than its
        sequences have tokens left. On a busy server whose full batch decodes plainly, a
        batch that shrinks for a few steps between arrivals (or a last sequence with a few
        tokens to go) would otherwise pay for the heads to take every plain row of every
        sequence; and a short generation after a long prompt would pay for the heads to
        take the prompt where its few tokens cannot win that back.

        ``switch_in``: for each sequence whose heads would catch up before this step (it
        decoded plainly, or alone has just been prefilled), its queued rows
        (``Session.seq_mtp_queued``) and tokens left (None: no limit). Without it, the
        batch's last step and the mean of past catch-ups stand in."""
        k = p.choose(depth)
        if k > 0 and not self._switch_in_pays(p, k, switch_in):
            k = 0       # a probe or a learning step too (several sequences): it would not pay here either
            if not self.plain_guessed(p):   # (a guessed plain figure: time it, then ask again)
                p.decline_probe()
        self.last_k = k
        return k

    def _switch_in_pays(self, p: DraftPolicy, k: int, switch_in) -> bool:
        if switch_in is None:                   # the caller knows no rows: the mean of past catch-ups
            if self.last_k != 0:
                return True
            cost, left = self.switch_in_cost.value, None
        else:
            if not switch_in:
                return True                     # nothing queued: the sequences drafted last step
            cost = self.catch_up.predict(p.bucket, [rows for rows, _ in switch_in])
            if cost is None:
                cost = self.switch_in_cost.value
            lefts = [n for _, n in switch_in]
            left = None if any(n is None for n in lefts) else max(lefts)
        if self.probes_a_guess(p, k) and self._catch_up_affordable_for_a_guess(p, cost, [rows for rows, _ in switch_in or ()]):
            return True
        stay = p.stay.value
        if cost is None or (stay is None and left is None):
            return True
        if stay is None and p._best == 0 and k != p._best:
            # one sequence's probe for drafting: priced by the probe pace (probe_cost), as
            # long as drafting could win the catch-up back on the tokens left if every
            # draft were accepted (a probe that cannot pay, say after a long prompt whose
            # tail the heads lack, waits for one that can)
            return left is None or cost < self._best_case_saving(p, left)
        if stay is not None and self.plain_guessed(p):
            return False    # plain decoding's figure here is another class's, scaled: time it first
        rates = p.rates()
        if k not in rates or 0 not in rates:
            return True
        e = p.expected_tokens(k)
        step = e / rates[k]                   # seconds of a drafting step
        plain = e / rates[0]                  # seconds for its tokens decoded plainly
        return cost < self._steps_ahead(p, e, left) * (plain - step)

    @staticmethod
    def probes_a_guess(p: DraftPolicy, k: int) -> bool:
        """Whether a step of k drafts is a probe from plain decoding of a length never timed
        in ``p``'s class at its depth, a class that started from another batch size's costs:
        its cost is that guess, scaled by size (for two sequences twice one sequence's
        drafting step, where a step reads the weights once for both), and the probe is what
        times it. Priced by the guess, as what drafting would gain, it was declined and
        backed off: on a server at two clients after a one-client round (0.7 GB Q4_K_M
        oracle, acceptance 0.6, draft 1 at 1.10x plain) the class decoded plainly on all its
        382 steps; at four clients each probe waited for a newcomer that ``admits`` held by
        the guess, and a newcomer is always there. So ``decide`` lets such a probe run, and
        ``admits`` a newcomer to it, where the heads lack no more rows than plain decoding
        leaves them (``_catch_up_affordable_for_a_guess``)."""
        b = p.bucket
        return p.guessed_plain and p.decision == 0 and k > 0 and p.costs.last_update(b, k) < 0

    @staticmethod
    def _catch_up_affordable_for_a_guess(p: DraftPolicy, cost: float | None, rows) -> bool:
        """Whether the heads' catch-up on ``rows`` (per sequence), ``cost`` seconds as
        predicted, costs about a plain step of ``p``'s batch at most, as ``heads_window``
        keeps it while decoding plainly, or, where the batch usually stays in its size class
        for many steps, at most THIN_PROBE_BUDGET of their plain time (timing a guess is
        paid once per class and depth: a batch of four whose heads each kept their fewest
        rows caught up in 1.5 plain steps on the 0.7 GB F16 oracle after 2,048 tokens, and
        the class decoded plainly on all its 842 steps where draft 1 ran at 1.11x plain);
        where either is not timed here, whether the rows are within that window."""
        plain = p.costs.predict(p.bucket, 0)
        if cost is None or not plain:
            return all(r <= HEADS_WINDOW * HEADS_WINDOW_SLACK for r in rows)
        stay = p.stay.value or 0.0
        return cost <= plain * max(HEADS_WINDOW_SLACK, THIN_PROBE_BUDGET * stay)

    def _steps_ahead(self, p: DraftPolicy, e: float, left: int | None) -> float | None:
        """Drafting steps (``e`` tokens each) a switch to drafting can count on: those the
        batch usually stays in its size class (a batch that has held longer than usual may
        hold on), and no more than until the longest-running sequence ends (``left`` tokens;
        None: no limit). None where neither is known."""
        horizons = []
        if p.stay.value is not None:
            horizons.append(max(p.stay.value, self.run_steps))
        if left is not None:
            horizons.append(max(left / e, 1.0))
        return min(horizons) if horizons else None

    @staticmethod
    def _best_case_saving(p: DraftPolicy, left: int) -> float:
        """Seconds drafting would save over ``left`` tokens if every draft were accepted, at
        the best length (from ``p``'s step costs at its depth; unknown costs: no limit)."""
        t0 = p.costs.predict(p.bucket, 0)
        if not t0:
            return float("inf")
        best = 0.0
        for j in range(1, p.draft_max + 1):
            t = p.costs.predict(p.bucket, j)
            if t is None:
                return float("inf")
            best = max(best, left / (j + 1) * ((j + 1) * t0 - t))
        return best

    def admits(self, p: DraftPolicy, k: int, rows: int, left: int | None) -> bool:
        """Whether one sequence whose heads lack ``rows`` rows should draft k along with its
        batch (policy ``p``) rather than decode plainly while the others draft: the heads'
        catch-up on those rows (``CatchUpCost``) against what drafting saves on the tokens it
        has left (``left``; None: no limit), over no more steps than the batch usually
        stays in its size class. Not while plain decoding has no timed cost in this class
        (the saving would be a guess); unpriced otherwise (no catch-up timed yet): yes."""
        if rows <= 0:
            return True
        if self.plain_guessed(p):
            return False        # the saving would rest on another class's figure: time plain first
        cost = self.catch_up.predict(p.bucket, [rows])
        if self.probes_a_guess(p, k) and self._catch_up_affordable_for_a_guess(p, cost, [rows]):
            return True         # the probe would wait for it, priced by the guess it times
        rates = p.rates()
        if cost is None or k not in rates or 0 not in rates:
            return True
        e = p.expected_tokens(k)
        steps = self._steps_ahead(p, e, left)
        if steps is None:
            return True
        # held, it would cost the step a decode call of its own, every step (see split_cost)
        return cost < steps * (e / rates[0] - e / rates[k] + self.split_cost(p.bucket))

    def split_cost(self, bucket: int) -> float:
        """Seconds a step adds when some of its sequences decode plainly beside drafting ones:
        a decode call takes one draft length for all its sequences, so the held ones take a
        call of their own (weights read again): about one sequence's plain step at this
        depth, where that was timed; else 0."""
        lone = self.by_size.get(1)
        if lone is None or not lone.costs.steady(bucket, 0):
            return 0.0
        return lone.costs.predict(bucket, 0)

    @staticmethod
    def plain_guessed(p: DraftPolicy) -> bool:
        """Whether ``p``'s plain step cost at its depth is not measured there (seeded from
        another size class, scaled)."""
        return p.costs.last_update(p.bucket, 0) < 0

    def holds_off(self, p: DraftPolicy, held: int, auto: int) -> bool:
        """Whether a step of policy ``p`` whose ``held`` of ``auto`` sequences are held back
        (``admits``) decodes plainly after all: where every one is held, where a probe from
        plain decoding would run beside held ones (it waits until they are gone), or where
        the batch's size class has no plain step timed yet (held ones wait for its figure)."""
        return held > 0 and (p.decision == 0 or held == auto or self.plain_guessed(p))

    def hold_off(self) -> int:
        """The step decodes plainly after all (see ``sequence._admit_newcomers``)."""
        self.last_k = 0
        return 0

    def heads_window(self, p: DraftPolicy, n: int) -> int:
        """How many of their newest rows the heads keep while the n sequences of a step of
        policy ``p`` decode plainly (``Session.seq_mtp_window``): as many as they take, at a
        switch to drafting, in about one plain step of the batch, so that a probe from
        plain decoding costs about one step more than a drafting step, not a dozen (on a
        small trunk with three dense chained heads a catch-up row cost a tenth of a plain
        step; on a large trunk the heads are a small part of it and keep the most). A power
        of two from HEADS_WINDOW_MIN to HEADS_WINDOW (fewer rows: less context for the first
        drafts after the switch; the output never changes); HEADS_WINDOW until plain
        decoding and a catch-up are timed at this depth."""
        line = self.catch_up.line(p.bucket)
        if line is None or not p.costs.steady(p.bucket, 0):
            return HEADS_WINDOW
        a, b = line
        budget = p.costs.predict(p.bucket, 0) / n - a       # one sequence's share of a plain step
        window = HEADS_WINDOW
        while window > HEADS_WINDOW_MIN and b * window * HEADS_WINDOW_SLACK > budget:
            window //= 2
        return window

    def observe_catch_up(self, depth: int, rows: int, seconds: float) -> None:
        """One sequence's heads took ``rows`` queued rows in ``seconds`` (``CatchUpCost``)."""
        self.catch_up.add(depth_bucket(depth), rows, seconds)

    def choose(self, n: int, depth: int = 0, switch_in: list[tuple[int, int | None]] | None = None) -> int:
        return self.decide(self.enter(n), depth, switch_in)

    def update(self, n: int, k: int, n_accepted: list[int], seconds: float, depth: int | None = None,
               catch_up: float = 0.0, members: tuple = (), arrivals: bool = False, joined: float = 0.0,
               drafting: int | None = None, rebuilt: bool = False) -> None:
        """One timed step of n sequences: ``members`` their slots, ``arrivals`` whether one of
        them is new there (a step whose batch differs from the previous timed one is not
        steady, see DraftPolicy.update_time); ``joined``: the heads' catch-up on newcomers'
        prompts, not in ``seconds``; ``drafting``: how many of them drafted k (None: all;
        fewer where held newcomers decoded plainly beside them, see ``admits``); ``rebuilt``:
        the step built the target's graph anew (see DraftPolicy.update_time).

        A step where only d of n sequences drafted is taken as a step of all n drafting by
        the rows it added to a plain step: T0 + (T - T0 - split) n / d (the cost a drafting
        sequence adds to a plain step of n, less the held ones' decode call of their own,
        ``split_cost``); where that would scale its noise more than twice, or plain
        decoding has no measured cost here, its time is not kept."""
        p = self.policy(n)
        same_batch = self.last_same_batch = members == self.last_members and not arrivals
        if k > 0 and catch_up > 0 and n > 1:
            self.switch_in_cost.add(catch_up)     # (alone, a new prompt's rows: probe_cost's part)
            if not (same_batch and p.costs.steady(p.bucket, 0)):
                # update_time cannot price this probe (no steady plain figure beside it, as
                # where the batch never holds still); its catch-up is the bulk of the price,
                # and the pace of probes from plain decoding depends on it
                p.probe_cost.add(catch_up)
        self.last_members = members
        if k > 0 and drafting is not None and drafting < n:
            bucket = p.bucket if depth is None else depth_bucket(depth)
            t0 = p.costs.predict(bucket, 0) if p.costs.steady(bucket, 0) else None
            if t0 is None or 2 * drafting < n:
                p.join_cost.add(joined)
                seconds = None
            else:
                seconds = t0 + max(seconds - t0 - self.split_cost(bucket), 0.0) * n / drafting
        if seconds is not None:
            p.update_time(k, seconds, depth, catch_up, same_batch=same_batch, joined=joined, rebuilt=rebuilt)
        p.update_acceptance(k, n_accepted)
        p.finish_step(k)
