#!/usr/bin/env python
"""Trust benchmark: replaying the feedback log, live tallying, and the policy against known agents.

Prints, then ends with one JSON line (see benchmarks/README.md for what each figure means).

The log is in the format the trust consumer writes now (``dispatcher/trust/records.py``): each
verdict is preceded by its investigation's record (``trust_dispatched``, ``trust_finding``), then
``trust_feedback`` with its admission time, all written by the trust identity — three entries per
verdict (a redelivery re-admits the feedback: one entry). Legacy bare ``OperatorFeedback`` entries
(logs written before the investigation ledger) are replayed in memory too, for comparison with
earlier runs.

1. replay rate of the feedback log —
   a. in memory: ``TrustState.on_log_entry`` (the follower's callback: ``msgspec`` decode + apply) of
      1,000,000 pre-encoded entries (``--quick``: 200,000, extrapolated) of 50 scopes; once as
      ``agentjobs phase show`` replays (no metrics), on a slice as ``agentjobs trust`` replays
      (``TrustState`` with ``TrustMetrics``), and the same verdicts as a legacy log;
   b. end to end: N entries (120,000; ``--quick``: 30,000; ``--stream-entries``; rounded up to whole
      verdicts) appended as the trust identity to the stream ``agentjobs.feedback-log`` of a temporary
      vhost, replayed by a fresh ``StreamFollower`` + ``TrustState`` until ``catch_up`` returns,
      extrapolated to 1M; baseline in the same run: a plain aio-pika stream consumer that only acks;
      then a real ``TrustService.start()`` as the trust identity over the same log;
2. live tally throughput: K real investigations (2,000; ``--quick``: 500) are recorded
   (``lifecycle.dispatched`` and a finding published as the dispatcher, applied by that
   ``TrustService`` from ``agentjobs.trust-results``), then K verdicts, one per investigation,
   published as an operator (broker-validated ``user_id``) to ``agentjobs.feedback`` and tallied;
   baseline: the same round trips (queue → confirmed append to a stream → seen on the stream → ack)
   in plain aio-pika;
2b. restart: a new ``TrustService.start()`` over the same log reads the snapshot the first one saved
   after its replay (``trust.snapshot_every``) and replays only the entries after it; baseline: the
   full replay of 1b in the same run;
3. a deterministic simulation (no broker) of agents with known true modification rates: the real
   ``TrustLedger`` at default settings vs a naive "ratio below threshold after min_samples" rule
   (the same ledger with the Wilson interval collapsed to the point estimate, so window, dwell
   and cool-down are identical), on the same seeded feedback sequences: promotion probability,
   false-promotion rate (promoted while the true rate is above the promote threshold) and time
   to promotion of a good agent.

Run: ``.venv/bin/python benchmarks/trust.py [--quick] [--trials N] [--stream-entries N]``. Needs RabbitMQ on
127.0.0.1:5672 with the management API on :15672 (``AGENTJOBS_TEST_AMQP_URL`` /
``AGENTJOBS_TEST_RABBITMQ_MGMT_URL`` override); uses a temporary vhost, deleted afterwards.
Misses against the targets are reported, never turned into a failing exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402 - after the sys.path fix-up, like the project imports below

from dispatcher.plumbing.settings import TrustSettings, load_settings  # noqa: E402
from dispatcher.trust.service import TrustMetrics, TrustState  # noqa: E402
from dispatcher.trust.policy import Reason, TrustLedger, wilson_bounds  # noqa: E402
from dispatcher.trust.records import AdmittedFeedback, LogEntry, encode_entry, entry_type  # noqa: E402
from schemas import OperatorFeedback, Phase, ShadowComparison, Verdict, encode  # noqa: E402
from tests.support.identities import url_for, user  # noqa: E402
from tests.support.trust_records import entry_id, log_entries  # noqa: E402

TARGET_REPLAY_1M_S = 20.0  # seconds to replay 1,000,000 feedback-log entries
TARGET_FALSE_PROMOTION = 0.05  # fraction of agents with true rate > promote threshold that get promoted
MILLION = 1_000_000

# The replayed log: 50 scopes (domains), each with its own true modification rate, 20 feedbacks per
# scope per day, a few re-appended duplicates (redeliveries) and rare harmful flags.
LOG_SCOPES = 50
LOG_FEEDBACK_PER_SCOPE_DAY = 20.0
LOG_DUPLICATE_RATE = 0.005  # fraction of entries that re-append one of the last 100 feedbacks
LOG_HARMFUL_RATE = 0.002  # fraction of modifications flagged harmful
LOG_SEED = 8
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

# The simulation: one agent (scope) per trial, feedback as a Poisson process.
SIM_P = (0.02, 0.05, 0.08, 0.10, 0.12, 0.15, 0.20, 0.30)  # true modification rates
SIM_GOOD_P = 0.02  # "a good agent": also followed until it reaches autonomous
SIM_FEEDBACK_PER_DAY = 20.0
SIM_HORIZON_DAYS = 120.0
SIM_SEED = 8
SIM_SCOPE = "agent"
NAIVE_Z = 1e-9  # Wilson z of the naive rule: the interval collapses to the point estimate k/n
CHECKPOINT_DAYS = (30, 60, 120)
CLEAR_FACTOR = 1.5  # "clearly bad": true rate at least this multiple of the promote threshold

RAW_MAX_ENTRIES = 50_000  # the raw stream baseline reads at most this prefix of the log (per run)
RAW_QUEUE = "bench.live-raw"
RAW_LOG = "bench.live-raw-log"
MODIFYING = (Verdict.MODIFIED, Verdict.REJECTED, Verdict.ACTION_OVERRIDDEN)
AGREED, DISAGREED = ShadowComparison(agreed=True), ShadowComparison(agreed=False)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def say(text: str = "") -> None:
    print(text, flush=True)


def quiet_logging() -> None:
    """structlog (and stdlib loggers routed through it) at warning, to stderr."""
    from schemas.logs import configure
    from dispatcher.plumbing.settings import LoggingSettings

    configure(LoggingSettings(level="warning", format="json"))


# --------------------------------------------------------------------------------------------
# the feedback log
# --------------------------------------------------------------------------------------------


class LogWriter:
    """Writes a realistic feedback log, tagging each finding with its scope's phase at the time.

    Entries are what the trust consumer appends now: for each verdict its investigation's record
    (``trust_dispatched`` + ``trust_finding`` from the dispatcher, half the gap before the verdict)
    and then ``trust_feedback`` admitted at the verdict's time; a redelivered verdict is admitted
    again (one more ``trust_feedback``, at the current time). A ledger of its own follows the log
    as it is written, fed what ``TrustState`` applies (the feedback at its admission time; the
    phase a finding was produced in is the phase its scope was in), so replaying the log must end
    in exactly this ledger's phases.
    """

    def __init__(self, trust: TrustSettings, *, scopes: int, seed: int, epoch: datetime = EPOCH) -> None:
        self.epoch = epoch
        self.rng = random.Random(seed)
        self.ledger = TrustLedger(trust)
        self.scopes = [f"domain-{i:02d}" for i in range(scopes)]
        # Mostly good agents, a tail of poor ones: 0.01 … 0.35.
        self.rates = [0.01 + 0.34 * (i / max(1, scopes - 1)) ** 2 for i in range(scopes)]
        self.mean_gap_s = 86400.0 / (LOG_FEEDBACK_PER_SCOPE_DAY * scopes)
        self.t = 0.0  # seconds after EPOCH
        self.n = 0  # distinct feedbacks written
        self.duplicates = 0
        self.operator = user("operator")
        self.recent: deque[OperatorFeedback] = deque(maxlen=100)

    def next(self, *, duplicates: bool = True) -> tuple[OperatorFeedback, list[LogEntry], bool]:
        """The next verdict, its log entries and whether it is a redelivery."""
        rng = self.rng
        if duplicates and self.recent and rng.random() < LOG_DUPLICATE_RATE:
            fb = self.recent[rng.randrange(len(self.recent))]
            at = self.epoch + timedelta(seconds=self.t)
            self.ledger.apply_feedback(msgspec.structs.replace(fb, at=at))  # counts once: a no-op, as in any replay
            self.duplicates += 1
            return fb, [AdmittedFeedback(feedback=fb, admitted_at=at, sender=self.operator)], True
        i = rng.randrange(len(self.scopes))
        scope = self.scopes[i]
        gap = rng.expovariate(1.0 / self.mean_gap_s)
        self.t += gap
        modified = rng.random() < self.rates[i]
        harmful = modified and rng.random() < LOG_HARMFUL_RATE
        phase = self.ledger.phase_for(scope)
        if phase is Phase.SHADOW:  # the operator's own resolution vs the agent's finding
            verdict_, shadow = (Verdict.MODIFIED if modified else Verdict.ACCEPTED), (DISAGREED if modified else AGREED)
        else:
            verdict_, shadow = (rng.choice(MODIFYING) if modified else Verdict.ACCEPTED), None
        self.n += 1
        fid = f"fb-{self.n:08d}"
        fb = OperatorFeedback(
            feedback_id=fid, investigation_id=f"inv-{self.n:08d}", scope=scope, phase=phase, verdict=verdict_,
            at=self.epoch + timedelta(seconds=self.t), operator=f"oncall-{i % 7}",
            changed_fields=("cause", "severity") if verdict_ is Verdict.MODIFIED else (), harmful=harmful,
            shadow=shadow,
        )
        self.ledger.apply_feedback(fb)
        self.recent.append(fb)
        return fb, log_entries([fb], recorded_before=gap / 2), False


class Delivered:
    """The attributes of an ``AbstractIncomingMessage`` that ``TrustState.on_log_entry`` reads."""

    __slots__ = ("body", "message_id", "type", "user_id")

    def __init__(self, user_id: str) -> None:
        self.body = b""
        self.message_id = ""
        self.type = ""
        self.user_id = user_id


def replay_in_memory(state: TrustState, bodies: Sequence[bytes], ids: Sequence[str], types: Sequence[str]) -> float:
    """Seconds to feed every entry (written by the trust identity) through the follower's callback."""
    entry = Delivered(user("trust"))
    on_entry = state.on_log_entry
    t0 = time.perf_counter()
    for body, mid, kind in zip(bodies, ids, types, strict=True):
        entry.body = body
        entry.message_id = mid
        entry.type = kind
        on_entry(entry)  # type: ignore[arg-type]
    return time.perf_counter() - t0


class LiveClock:
    """The live ``TrustService``'s admission clock: the writer's time of live verdict i while i have been tallied.

    Verdicts are admitted one at a time in publish order, so verdict i is admitted at the time the
    writer gave it — the service's decisions can then be checked against the writer's ledger (with
    the wall clock all K would be admitted within seconds instead of the hours the writer spread
    them over). One read of the feedback counter per admission; the investigation records before the
    live part are admitted at the first live verdict's time.
    """

    def __init__(self, times: Sequence[datetime]) -> None:
        self.times = times
        self.metrics: TrustMetrics | None = None
        self.base = 0.0

    def start(self, metrics: TrustMetrics) -> None:
        self.metrics, self.base = metrics, feedback_tallied(metrics)

    def __call__(self) -> datetime:
        if self.metrics is None:
            return self.times[0]
        return self.times[min(int(feedback_tallied(self.metrics) - self.base), len(self.times) - 1)]


# --------------------------------------------------------------------------------------------
# broker helpers (plain aio-pika: publishers and the baselines)
# --------------------------------------------------------------------------------------------


async def publish_confirmed(channel: Any, exchange: str, items: Sequence[tuple[bytes, str]],
                            routing_key: Callable[[int], str], *, window: int = 5000,
                            kind: Callable[[int], str] = lambda i: "feedback", user_id: str | None = None) -> float:
    """Publish persistently with confirms, ``window`` in flight; returns seconds.

    ``user_id``: the sender's broker user, validated by the broker (as the components publish)."""
    import aio_pika

    target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
    t0 = time.perf_counter()
    for start in range(0, len(items), window):
        await asyncio.gather(*(
            target.publish(aio_pika.Message(body, message_id=mid, type=kind(start + j), user_id=user_id,
                                            content_type="application/json",
                                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                           routing_key(start + j), mandatory=True, timeout=60)
            for j, (body, mid) in enumerate(items[start:start + window])))
    return time.perf_counter() - t0


async def raw_stream_replay(url: str, stream: str, n: int, prefetch: int) -> float:
    """messages/s of a plain aio-pika consumer reading ``stream`` from the first offset, acking only."""
    import aio_pika

    done = asyncio.Event()
    count = 0

    async def on_message(message: Any) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count >= n:
            done.set()

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(stream)
        t0 = time.perf_counter()
        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        async with asyncio.timeout(600):
            await done.wait()
        return n / (time.perf_counter() - t0)


async def raw_live_roundtrip(url: str, items: Sequence[tuple[bytes, str]], queue_args: dict[str, Any],
                             prefetch: int) -> float:
    """Per second: queue delivery (prefetch 1) → confirmed append to a stream → seen on it → ack, in plain aio-pika.

    The shape of one live feedback in ``TrustService.handle`` without decoding, the ledger, metrics or logs.
    """
    import aio_pika

    n = len(items)
    done = asyncio.Event()
    seen: dict[str, asyncio.Event] = {}
    count = 0
    connection = await aio_pika.connect_robust(url)
    async with connection:
        setup = await connection.channel()
        queue = await setup.declare_queue(RAW_QUEUE, durable=True, arguments=queue_args)
        await setup.declare_queue(RAW_LOG, durable=True, arguments={"x-queue-type": "stream"})
        publisher = await connection.channel(publisher_confirms=True)
        log_channel = await connection.channel()
        await log_channel.set_qos(prefetch_count=prefetch)

        async def on_log(message: Any) -> None:
            event = seen.get(message.message_id or "")
            if event is not None:
                event.set()
            await message.ack()

        async def on_message(message: Any) -> None:
            nonlocal count
            event = seen.setdefault(message.message_id, asyncio.Event())
            await publisher.default_exchange.publish(
                aio_pika.Message(message.body, message_id=message.message_id,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT), RAW_LOG, timeout=30)
            await event.wait()
            seen.pop(message.message_id, None)
            await message.ack()
            count += 1
            if count >= n:
                done.set()

        log_queue = await log_channel.get_queue(RAW_LOG)
        await log_queue.consume(on_log, arguments={"x-stream-offset": "first"})
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=1)
        await queue.consume(on_message)
        input_connection = await aio_pika.connect_robust(url)
        async with input_connection:
            channel = await input_connection.channel(publisher_confirms=True)
            t0 = time.perf_counter()
            await publish_confirmed(channel, "", items, lambda i: RAW_QUEUE)
            async with asyncio.timeout(600):
                await done.wait()
            return n / (time.perf_counter() - t0)


def feedback_tallied(metrics: TrustMetrics) -> float:
    """``agentjobs_feedback_total`` summed over verdicts: feedback the service has tallied."""
    return sum(s.value for m in metrics.feedback.collect() for s in m.samples if s.name.endswith("_total"))


def refused_total(metrics: TrustMetrics) -> float:
    """``agentjobs_trust_refused_total`` over every reason and kind: inputs the service refused."""
    return sum(s.value for m in metrics.refused.collect() for s in m.samples if s.name.endswith("_total"))


async def queue_depth(url: str, queue: str) -> int:
    """Messages in ``queue`` now (passive declare)."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


# --------------------------------------------------------------------------------------------
# the simulation
# --------------------------------------------------------------------------------------------


class Arm(msgspec.Struct, kw_only=True):
    """One rule's outcomes for one true rate."""

    promoted: int = 0
    first_s: list[float] = []  # time to first promotion, of the promoted trials
    autonomous_s: list[float] = []  # time to autonomous (good agent only), of the trials that got there
    by_day: dict[int, int] = {}  # trials promoted within each checkpoint day


def run_rule(trust: TrustSettings, ats: Sequence[datetime], mods: Sequence[bool],
             feedback: Callable[[int, Phase], OperatorFeedback], *, until_autonomous: bool
             ) -> tuple[float | None, float | None]:
    """Feed one agent's feedback through a fresh ledger: (s to first promotion, s to autonomous)."""
    ledger = TrustLedger(trust)
    first: float | None = None
    start = ats[0] if ats else EPOCH
    for i in range(len(ats)):
        change = ledger.apply_feedback(feedback(i, ledger.phase_for(SIM_SCOPE)))
        if change is None or change.reason != Reason.PROMOTED:
            continue
        took = (change.at - start).total_seconds()
        if first is None:
            first = took
            if not until_autonomous:
                break
        if change.to_phase is Phase.AUTONOMOUS:
            return first, took
    return first, None


def simulate(trust: TrustSettings, trials: int, seed: int) -> dict[str, dict[float, Arm]]:
    """Every true rate x trial under both rules, on common random numbers (pure, deterministic)."""
    rules = {"policy": trust, "naive": msgspec.structs.replace(trust, confidence_z=NAIVE_Z)}
    arms = {rule: {p: Arm(by_day=dict.fromkeys(CHECKPOINT_DAYS, 0)) for p in SIM_P} for rule in rules}
    horizon_s = SIM_HORIZON_DAYS * 86400.0
    mean_gap_s = 86400.0 / SIM_FEEDBACK_PER_DAY
    ids: list[str] = []
    for trial in range(trials):
        # One arrival sequence and one uniform draw per feedback for every p: feedback i is a
        # modification iff u_i < p, so rules and rates are compared on the same luck.
        rng = random.Random(seed * 1_000_003 + trial)
        times, us = [], []
        t = rng.expovariate(1.0 / mean_gap_s)
        while t <= horizon_s:
            times.append(t)
            us.append(rng.random())
            t += rng.expovariate(1.0 / mean_gap_s)
        ats = [EPOCH + timedelta(seconds=x) for x in times]
        while len(ids) < len(ats):
            ids.append(f"fb-{len(ids)}")
        for p in SIM_P:
            mods = [u < p for u in us]
            cache: dict[tuple[int, Phase], OperatorFeedback] = {}  # both rules share the Structs

            def feedback(i: int, phase: Phase, mods: list[bool] = mods,
                         cache: dict[tuple[int, Phase], OperatorFeedback] = cache) -> OperatorFeedback:
                fb = cache.get((i, phase))
                if fb is None:
                    modified = mods[i]
                    shadow = (DISAGREED if modified else AGREED) if phase is Phase.SHADOW else None
                    fb = cache[(i, phase)] = OperatorFeedback(
                        feedback_id=ids[i], investigation_id=ids[i], scope=SIM_SCOPE, phase=phase,
                        verdict=Verdict.MODIFIED if modified else Verdict.ACCEPTED, at=ats[i], shadow=shadow)
                return fb

            for rule, settings in rules.items():
                first, autonomous = run_rule(settings, ats, mods, feedback, until_autonomous=p == SIM_GOOD_P)
                arm = arms[rule][p]
                if first is not None:
                    arm.promoted += 1
                    arm.first_s.append(first)
                    for day in CHECKPOINT_DAYS:
                        arm.by_day[day] += first <= day * 86400.0
                if autonomous is not None:
                    arm.autonomous_s.append(autonomous)
    return arms


def naive_rule_mismatches(trust: TrustSettings) -> int:
    """(k, n) pairs where the collapsed Wilson bound and "k/n < threshold" disagree (should be 0)."""
    bad = 0
    for n in range(1, trust.window + 1):
        for k in range(n + 1):
            bad += (wilson_bounds(k, n, NAIVE_Z)[1] <= trust.promote_threshold) != (k / n < trust.promote_threshold)
    return bad


def pool(arms: dict[float, Arm], ps: Sequence[float], trials: int) -> dict[str, Any]:
    """One rule's promotions pooled over true rates ``ps``: rate, 95 % Wilson interval, worst p, by day."""
    promoted = sum(arms[p].promoted for p in ps)
    total = trials * len(ps)
    lo, hi = wilson_bounds(promoted, total, 1.96)
    worst = max(ps, key=lambda p: arms[p].promoted)
    return {"rate": round(promoted / total, 4), "lo": round(lo, 4), "hi": round(hi, 4), "worst": worst,
            "worst_rate": round(arms[worst].promoted / trials, 4),
            "by_day": {d: round(sum(arms[p].by_day[d] for p in ps) / total, 4) for d in CHECKPOINT_DAYS}}


def days(seconds: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1, nearest rank) of durations, in days; None when empty."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return round(ordered[rank - 1] / 86400.0, 2)


def fmt_days(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.log_entries = 200_000 if args.quick else MILLION
        # Three entries per verdict: 30k entries are ~10k verdicts, ~10 days of the log (past the
        # 7-day dwell, so good scopes have been promoted before the live part).
        self.stream_entries = args.stream_entries or (30_000 if args.quick else 120_000)
        self.live = 500 if args.quick else 2000
        self.metrics_slice = 20_000 if args.quick else 50_000
        self.trials = args.trials or (100 if args.quick else 500)
        self.f: dict[str, Any] = {"quick": self.quick}
        self.settings = load_settings(None, {})

    # -- 0. the log --------------------------------------------------------------------------
    def write_log(self) -> None:
        # The live verdicts follow the first stream_entries entries (rounded up to a whole verdict):
        # the K after them, with no redeliveries among them. The log is dated so that its live part
        # ends about now (the service admits them on LiveClock: their own times).
        verdicts_to_live_end = self.stream_entries / 3 + self.live
        span_s = verdicts_to_live_end * 86400.0 / (LOG_FEEDBACK_PER_SCOPE_DAY * LOG_SCOPES)
        epoch = datetime.now(UTC) - timedelta(seconds=span_s)
        writer = LogWriter(self.settings.trust, scopes=LOG_SCOPES, seed=LOG_SEED, epoch=epoch)
        bodies: list[bytes] = []
        ids: list[str] = []
        types: list[str] = []
        legacy: list[bytes] = []  # the same verdicts as a legacy log: bare OperatorFeedback
        legacy_ids: list[str] = []
        live: list[OperatorFeedback] = []
        self.stream_n = 0
        t0 = time.perf_counter()
        while len(bodies) < self.log_entries:
            in_live = self.stream_n > 0 and len(live) < self.live
            fb, entries, duplicate = writer.next(duplicates=not in_live)
            for entry in entries:
                bodies.append(encode_entry(entry))
                ids.append(entry_id(entry))
                types.append(entry_type(entry))
            legacy.append(encode(fb))
            legacy_ids.append(fb.feedback_id)
            if in_live:
                live.append(fb)
                if len(live) == self.live:
                    self.phases_after_live = writer.ledger.phases()
            elif not self.stream_n and len(bodies) >= self.stream_entries:
                self.stream_n = len(bodies)
                self.phases_at_stream = writer.ledger.phases()
        self.bodies, self.ids, self.types = bodies, ids, types
        self.legacy, self.legacy_ids = legacy, legacy_ids
        self.live_feedbacks = live
        self.phases_at_end = writer.ledger.phases()
        days_covered = writer.t / 86400.0
        changed = sum(ph is not Phase.SHADOW for ph in self.phases_at_end.values())
        self.f.update(log_entries=len(bodies), log_verdicts=writer.n, log_duplicate_entries=writer.duplicates,
                      log_format="trust_dispatched + trust_finding + trust_feedback (records.py), by the trust "
                                 "identity", log_scopes=LOG_SCOPES, log_days=round(days_covered, 1),
                      log_mean_entry_bytes=round(sum(map(len, bodies)) / len(bodies)),
                      log_legacy_mean_entry_bytes=round(sum(map(len, legacy)) / len(legacy)))
        say(f"feedback log: {len(bodies):,} entries in the trust consumer's current format (trust_dispatched + "
            f"trust_finding + trust_feedback per verdict: {writer.n:,} verdicts, {writer.duplicates:,} re-admitted "
            f"duplicates) over {LOG_SCOPES} scopes and {days_covered:.0f} days, {self.f['log_mean_entry_bytes']} "
            f"bytes each on average; {changed} scopes ended above shadow (written in {time.perf_counter() - t0:.1f} s)")

    # -- 1a. replay in memory ----------------------------------------------------------------
    def replay_memory(self) -> None:
        n = len(self.bodies)
        state = TrustState(self.settings)
        took = replay_in_memory(state, self.bodies, self.ids, self.types)
        rate = n / took
        one_m = MILLION / rate
        same = state.ledger.phases() == self.phases_at_end and state.refused_entries == 0
        ok = one_m < TARGET_REPLAY_1M_S
        verdicts_per_s = self.f["log_verdicts"] / took
        self.f.update(replay_ledger_events_per_s=round(rate), replay_ledger_1m_s=round(one_m, 2),
                      replay_ledger_1m_extrapolated=n != MILLION, replay_ledger_phases_match=same,
                      replay_ledger_refused_entries=state.refused_entries,
                      replay_ledger_verdicts_per_s=round(verdicts_per_s),
                      replay_ledger_1m_verdicts_s=round(MILLION / verdicts_per_s, 2),
                      replay_target_1m_s=TARGET_REPLAY_1M_S, replay_ledger_target_met=ok)
        say("\n1a. Replay in memory: TrustState.on_log_entry (the follower's callback: msgspec decode + apply)")
        say(f"   no metrics (as `agentjobs phase show`): {n:,} entries in {took:.2f} s = {rate:,.0f} entries/s"
            f" → 1M entries in {one_m:.1f} s{' (extrapolated)' if n != MILLION else ''}"
            f"   [target < {TARGET_REPLAY_1M_S:.0f} s: {verdict(ok)}]; = {verdicts_per_s:,.0f} verdicts/s "
            f"(1M verdicts in {MILLION / verdicts_per_s:.1f} s)")
        say(f"   replayed phases equal those the log was written with: {'yes' if same else 'NO'} "
            f"({state.refused_entries} entries refused)")

        m = min(self.metrics_slice, n)
        state = TrustState(self.settings, TrustMetrics())
        took = replay_in_memory(state, self.bodies[:m], self.ids[:m], self.types[:m])
        rate = m / took
        one_m = MILLION / rate
        ok = one_m < TARGET_REPLAY_1M_S
        self.f.update(replay_ledger_metrics_events_per_s=round(rate), replay_ledger_metrics_1m_s=round(one_m, 1),
                      replay_ledger_metrics_entries=m, replay_ledger_metrics_target_met=ok)
        say(f"   with TrustMetrics (as `agentjobs trust`): first {m:,} entries in {took:.2f} s = {rate:,.0f} entries/s"
            f" → 1M in {one_m:.1f} s (extrapolated)   [target < {TARGET_REPLAY_1M_S:.0f} s: {verdict(ok)}]")

        # The same verdicts as a legacy log (bare OperatorFeedback, tallied on the sender's at): what
        # this figure measured before the investigation ledger, one entry per verdict.
        n = len(self.legacy)
        state = TrustState(self.settings)
        took = replay_in_memory(state, self.legacy, self.legacy_ids, ["feedback"] * n)
        rate = n / took
        same = state.ledger.phases() == self.phases_at_end
        self.f.update(replay_legacy_events_per_s=round(rate), replay_legacy_1m_s=round(MILLION / rate, 2),
                      replay_legacy_entries=n, replay_legacy_phases_match=same)
        say(f"   legacy log of the same verdicts (bare OperatorFeedback, no metrics): {n:,} entries in {took:.2f} s = "
            f"{rate:,.0f} entries/s → 1M in {MILLION / rate:.1f} s; phases match: {'yes' if same else 'NO'}")

    # -- 1b + 2. the broker ------------------------------------------------------------------
    async def broker(self) -> None:
        import aio_pika

        from dispatcher.plumbing.amqp import connect
        from dispatcher.plumbing.streamlog import PREFETCH, StreamFollower
        from dispatcher.plumbing.topology import declare, dispatcher_topology
        from schemas.routing import DEAD, FEEDBACK, FEEDBACK_LOG, routing_word
        from dispatcher.trust.service import TrustService
        from tests.support.services import RabbitMQ, temporary_vhost
        from tests.support.trust_records import record_investigations

        rabbitmq = RabbitMQ.from_env()
        await rabbitmq.check()
        async with rabbitmq.management() as mgmt, temporary_vhost(mgmt, hint="bench-trust") as vhost:
            url = rabbitmq.vhost_url(vhost.name)  # the broker administrator: topology, baselines, inspection
            # Every component as its own identity (temporary_vhost granted them all on the vhost).
            settings = load_settings(None, {"AGENTJOBS_AMQP__URL": url_for(url, "trust"),
                                            "AGENTJOBS_METRICS__PORT": "0", "AGENTJOBS_LOGGING__LEVEL": "warning"})
            topology = dispatcher_topology(settings.amqp)
            n = self.stream_n
            raw_entries = min(n, RAW_MAX_ENTRIES)
            say(f"\nRabbitMQ vhost {vhost.name}")

            connection = await aio_pika.connect_robust(url)
            async with connection:
                await declare(await connection.channel(), topology)
            # Append the first n entries to the feedback log as the trust consumer does: as the trust
            # identity (user_id validated by the broker; entries from anyone else are refused).
            connection = await aio_pika.connect_robust(url_for(url, "trust"))
            async with connection:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                items = list(zip(self.bodies[:n], self.ids[:n], strict=True))
                took = await publish_confirmed(channel, "", items, lambda i: FEEDBACK_LOG,
                                               kind=lambda i: self.types[i], user_id=user("trust"))
            self.f.update(stream_entries=n, stream_publish_per_s=round(n / took))

            # 1b. Raw baseline once before and once after the follower (the broker is shared), mean of both.
            raws = [await raw_stream_replay(url, FEEDBACK_LOG, raw_entries, PREFETCH)]

            # A fresh StreamFollower + TrustState (no metrics), as `agentjobs phase show` replays.
            state = TrustState(settings)
            follower = StreamFollower(FEEDBACK_LOG, state.on_log_entry, name="feedback-log")
            connection = await connect(settings.amqp, name="bench-trust-replay")
            try:
                t0 = time.perf_counter()
                await follower.start(connection)
                await follower.catch_up(connection, timeout=600)
                took = time.perf_counter() - t0
            finally:
                await follower.stop()
                await connection.close()
            raws.append(await raw_stream_replay(url, FEEDBACK_LOG, raw_entries, PREFETCH))
            raw = statistics.fmean(raws)
            rate = n / took
            one_m = MILLION / rate
            same = (state.ledger.phases() == self.phases_at_stream and follower.applied == n
                    and state.refused_entries == 0)
            ok = one_m < TARGET_REPLAY_1M_S
            self.f.update(stream_replay_events_per_s=round(rate), stream_replay_1m_s=round(one_m, 1),
                          raw_stream_consume_per_s=round(raw), raw_stream_entries=raw_entries,
                          stream_replay_ratio_vs_raw=round(rate / raw, 3),
                          stream_replay_phases_match=same, stream_replay_refused_entries=state.refused_entries,
                          stream_replay_target_met=ok)
            say(f"1b. Replay from the stream {FEEDBACK_LOG} ({n:,} entries in the current format, appended as "
                f"{user('trust')} with confirms at {self.f['stream_publish_per_s']:,}/s)")
            say(f"   StreamFollower + TrustState (no metrics), start → catch_up returned: {took:.2f} s = "
                f"{rate:,.0f} entries/s → 1M in {one_m:.1f} s (extrapolated)   [target < {TARGET_REPLAY_1M_S:.0f} s: "
                f"{verdict(ok)}]")
            say(f"   raw baseline: plain aio-pika stream consumer, ack only, prefetch {PREFETCH}, first "
                f"{raw_entries:,} entries: {raw:,.0f} entries/s (mean of {raws[0]:,.0f} before and {raws[1]:,.0f} "
                f"after the follower); ratio follower/raw {rate / raw:.3f}")
            say(f"   replayed phases equal those the log was written with: {'yes' if same else 'NO'} "
                f"({state.refused_entries} entries refused)")

            # The real service over the same log, as the trust identity: start() replays it (with
            # metrics) before consuming. Its admission clock is the writer's timeline (LiveClock).
            live = self.live_feedbacks
            clock = LiveClock([fb.at for fb in live])
            service = TrustService(settings, clock=clock)
            t0 = time.perf_counter()
            try:
                await service.start()
            except Exception as exc:
                self.f.update(service_start_error=repr(exc))
                say(f"   TrustService.start() FAILED after {time.perf_counter() - t0:.1f} s: {exc!r}")
                await service.stop()
                return
            took = time.perf_counter() - t0
            rate = n / took
            replay_refused = service.state.refused_entries
            self.f.update(service_start_s=round(took, 2), service_replay_events_per_s=round(rate),
                          service_replay_1m_s=round(MILLION / rate, 1), service_user=service.user,
                          service_replay_refused_entries=replay_refused)
            say(f"   TrustService.start() as {service.user} (connect, declare, replay with metrics, consume): "
                f"{took:.2f} s = {rate:,.0f} entries/s → 1M in {MILLION / rate:.1f} s (extrapolated)   "
                f"[target < {TARGET_REPLAY_1M_S:.0f} s: {verdict(MILLION / rate < TARGET_REPLAY_1M_S)}]; "
                f"{replay_refused} entries refused")
            say("   (its catch-up only gives up when the log stops coming, so a long log delays readiness; it never "
                "fails start-up)")

            # 2. Live tally: K real investigations recorded, then one verdict on each, tallied one by one.
            k = len(live)
            try:
                refused_before = refused_total(service.metrics)
                investigations = [(fb.investigation_id, fb.scope, fb.phase) for fb in live]
                t0 = time.perf_counter()
                await record_investigations(url, investigations)  # as the dispatcher
                deadline = t0 + 600.0
                while (any(service.state.investigations.needs_finding(inv) for inv, _, _ in investigations)
                       and time.perf_counter() < deadline):
                    await asyncio.sleep(0.01)
                record_s = time.perf_counter() - t0
                recorded = sum(not service.state.investigations.needs_finding(inv) for inv, _, _ in investigations)

                clock.start(service.metrics)
                before = feedback_tallied(service.metrics)
                live_items = [(encode(fb), fb.feedback_id) for fb in live]
                keys = [f"feedback.{routing_word(fb.scope)}" for fb in live]
                input_connection = await aio_pika.connect_robust(url_for(url, "operator"))
                async with input_connection:
                    channel = await input_connection.channel(publisher_confirms=True, on_return_raises=True)
                    t0 = time.perf_counter()
                    publishing = asyncio.create_task(publish_confirmed(channel, FEEDBACK, live_items,
                                                                       lambda i: keys[i], user_id=user("operator")))
                    deadline = t0 + 600.0
                    while feedback_tallied(service.metrics) - before < k and time.perf_counter() < deadline:
                        await asyncio.sleep(0.002)
                    took = time.perf_counter() - t0
                    await publishing
                tallied = int(feedback_tallied(service.metrics) - before)
                refused = int(refused_total(service.metrics) - refused_before)
                same = service.state.ledger.phases() == self.phases_after_live
                published = int(sum(s.value for m in service.metrics.changes.collect() for s in m.samples
                                    if s.name.endswith("_total")))
            finally:
                await service.stop()
            dead = await queue_depth(url, DEAD)
            live_rate = tallied / took
            queue_args = next(q.arguments for q in topology.queues if q.name == FEEDBACK)
            raw_live = await raw_live_roundtrip(url, live_items, dict(queue_args), PREFETCH)
            self.f.update(live_feedbacks=k, live_tallied=tallied, live_tally_per_s=round(live_rate, 1),
                          live_raw_roundtrip_per_s=round(raw_live, 1),
                          live_ratio_vs_raw=round(live_rate / raw_live, 3), live_phases_match=same,
                          live_phase_changes_published=published, live_investigations_recorded=recorded,
                          live_record_s=round(record_s, 2), live_refused=refused, dead_letters=dead,
                          live_sender=user("operator"))
            say(f"\n2. Live tally: {recorded:,} investigations recorded first (lifecycle.dispatched + finding "
                f"published as {user('dispatcher')}, applied by the service from its results queue: "
                f"{record_s:.2f} s); then "
                f"{k:,} verdicts, one per investigation, published (confirmed) as {user('operator')} to exchange "
                f"{FEEDBACK} → tallied by TrustService ({tallied:,} within {took:.2f} s): {live_rate:,.1f} feedbacks/s")
            say(f"   refused during recording and live: {refused}; messages in {DEAD}: {dead}")
            say(f"   raw baseline: the same round trips in plain aio-pika (quorum queue, prefetch 1 → confirmed "
                f"append to a stream → seen on it → ack): {raw_live:,.1f}/s; ratio {live_rate / raw_live:.3f}")
            say(f"   phases after the live feedbacks equal the writer's: {'yes' if same else 'NO'}; "
                f"{published} PhaseChanged published (decisions made during replay, first feedback after start)")

            # 2b. Restart: start() saved a snapshot after replaying the log (trust.snapshot_every);
            # a new consumer reads it and replays only the entries after it (the records and verdicts of 2).
            every = settings.trust.snapshot_every
            restarted = TrustService(settings)
            t0 = time.perf_counter()
            try:
                await restarted.start()
                took = time.perf_counter() - t0
                replayed = restarted._feedback_log.applied
                same = (restarted.state.ledger.phases() == self.phases_after_live
                        and restarted.state.refused_entries == 0)
            finally:
                await restarted.stop()
            full = self.f["service_start_s"]
            total = n + 3 * k  # the records (2 per investigation) and verdicts of 2
            # Worst case for any log length: the newest snapshot is up to snapshot_every entries old.
            worst = took + every / self.f["stream_replay_events_per_s"]
            self.f.update(restart_from_snapshot_s=round(took, 2), restart_replayed_entries=replayed,
                          restart_phases_match=same, restart_ratio_vs_full_replay=round(took / full, 3),
                          restart_worst_case_s=round(worst, 1), snapshot_every=every,
                          restart_target_met=worst < TARGET_REPLAY_1M_S)
            say(f"\n2b. Restart from the snapshot (trust.snapshot_every = {every:,}): TrustService.start() over the "
                f"same {total:,}-entry log: {took:.2f} s, {replayed:,} entries replayed after the snapshot; "
                f"phases match: {'yes' if same else 'NO'}")
            say(f"   same-run baseline: the full replay above took {full:.2f} s → ratio {took / full:.3f}; worst case "
                f"for a log of any length (snapshot {every:,} entries old): {worst:.1f} s   "
                f"[target < {TARGET_REPLAY_1M_S:.0f} s for 1M: {verdict(worst < TARGET_REPLAY_1M_S)}]")

    # -- 3. the simulation --------------------------------------------------------------------
    def simulation(self) -> None:
        trust = self.settings.trust
        mismatches = naive_rule_mismatches(trust)
        t0 = time.perf_counter()
        arms = simulate(trust, self.trials, SIM_SEED)
        took = time.perf_counter() - t0
        thr = trust.promote_threshold
        bad = [p for p in SIM_P if p > thr]
        say(f"\n3. Simulation: {self.trials:,} agents per true modification rate, {SIM_FEEDBACK_PER_DAY:g} "
            f"feedbacks/day (Poisson), {SIM_HORIZON_DAYS:g} days, starting in {trust.initial_phase}; default "
            f"TrustSettings (window {trust.window}, min_samples {trust.min_samples}, promote when upper Wilson "
            f"(z={trust.confidence_z}) ≤ {thr}, "
            f"dwell {trust.min_dwell / 86400:g} d, cool-down {trust.cooldown / 86400:g} d) vs naive "
            f"(k/n < {thr} after {trust.min_samples} samples, same window/dwell/cool-down; "
            f"{mismatches} (k, n) mismatches with that rule); {took:.1f} s")
        say(f"   {'true p':>7} {'policy promoted':>22} {'median d':>9} {'naive promoted':>22} {'median d':>9}")
        per_p: dict[str, dict[str, Any]] = {}
        for p in SIM_P:
            cells = []
            row: dict[str, Any] = {}
            for rule in ("policy", "naive"):
                arm = arms[rule][p]
                lo, hi = wilson_bounds(arm.promoted, self.trials, 1.96)
                frac = arm.promoted / self.trials
                cells.append(f"{frac:7.1%} [{lo:5.1%},{hi:6.1%}]")
                cells.append(f"{fmt_days(days(arm.first_s, 0.5)):>9}")
                row[f"{rule}_promoted_fraction"] = round(frac, 4)
                row[f"{rule}_median_days_to_promotion"] = days(arm.first_s, 0.5)
            mark = "  (> threshold: a promotion is false)" if p > thr else ""
            say(f"   {p:7.2f} {cells[0]:>22} {cells[1]} {cells[2]:>22} {cells[3]}{mark}")
            per_p[f"{p:.2f}"] = row
        clear = [p for p in bad if p >= CLEAR_FACTOR * thr - 1e-12]
        pooled = {rule: pool(arms[rule], bad, self.trials) for rule in ("policy", "naive")}
        pooled_clear = {rule: pool(arms[rule], clear, self.trials) for rule in ("policy", "naive")}
        ok = pooled["policy"]["rate"] <= TARGET_FALSE_PROMOTION
        for title, table, target in ((f"every true p > {thr}", pooled, True),
                                     (f"true p ≥ {CLEAR_FACTOR:g} x threshold", pooled_clear, False)):
            chosen = bad if target else clear
            say(f"   false promotions, pooled over {title} ({', '.join(f'{p:g}' for p in chosen)}):")
            for rule, x in table.items():
                steps = ", ".join(f"{x['by_day'][d]:.1%} by day {d}" for d in CHECKPOINT_DAYS)
                shown = target and rule == "policy"
                tail = f"   [target ≤ {TARGET_FALSE_PROMOTION:.0%}: {verdict(ok)}]" if shown else ""
                say(f"     {rule:6}: {x['rate']:6.1%} [95% CI {x['lo']:.1%}, {x['hi']:.1%}] ({steps}); "
                    f"worst p={x['worst']:g}: {x['worst_rate']:.1%}{tail}")
        good = {rule: arms[rule][SIM_GOOD_P] for rule in ("policy", "naive")}
        say(f"   good agent (p={SIM_GOOD_P}): days to first promotion p50/p90, to autonomous p50/p90 "
            f"(of those that got there):")
        for rule, arm in good.items():
            say(f"     {rule:6}: {fmt_days(days(arm.first_s, 0.5))} / {fmt_days(days(arm.first_s, 0.9))} d "
                f"(promoted {arm.promoted / self.trials:.1%}); autonomous {fmt_days(days(arm.autonomous_s, 0.5))} / "
                f"{fmt_days(days(arm.autonomous_s, 0.9))} d (reached {len(arm.autonomous_s) / self.trials:.1%})")
        self.f.update(
            sim_trials_per_p=self.trials, sim_feedback_per_day=SIM_FEEDBACK_PER_DAY, sim_horizon_days=SIM_HORIZON_DAYS,
            sim_promote_threshold=thr, sim_naive_rule_mismatches=mismatches, sim_by_p=per_p,
            false_promotion_p_values=bad,
            false_promotion_rate_policy=pooled["policy"]["rate"],
            false_promotion_rate_policy_ci95=[pooled["policy"]["lo"], pooled["policy"]["hi"]],
            false_promotion_rate_naive=pooled["naive"]["rate"],
            false_promotion_worst_p_policy=pooled["policy"]["worst"],
            false_promotion_worst_rate_policy=pooled["policy"]["worst_rate"],
            false_promotion_rate_policy_by_day=pooled["policy"]["by_day"],
            false_promotion_rate_naive_by_day=pooled["naive"]["by_day"],
            false_promotion_clear_p_values=clear,
            false_promotion_clear_rate_policy=pooled_clear["policy"]["rate"],
            false_promotion_clear_rate_naive=pooled_clear["naive"]["rate"],
            false_promotion_target=TARGET_FALSE_PROMOTION, false_promotion_target_met=ok,
            good_agent_p=SIM_GOOD_P,
            good_agent_days_to_promotion_p50_policy=days(good["policy"].first_s, 0.5),
            good_agent_days_to_promotion_p90_policy=days(good["policy"].first_s, 0.9),
            good_agent_days_to_promotion_p50_naive=days(good["naive"].first_s, 0.5),
            good_agent_days_to_promotion_p90_naive=days(good["naive"].first_s, 0.9),
            good_agent_days_to_autonomous_p50_policy=days(good["policy"].autonomous_s, 0.5),
            good_agent_days_to_autonomous_p50_naive=days(good["naive"].autonomous_s, 0.5),
            sim_s=round(took, 1),
        )

    async def main(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        t_begin = time.perf_counter()
        say(f"agentjobs trust benchmark{' (--quick)' if self.quick else ''}: "
            f"policy {self.settings.trust.policy_version}")
        self.write_log()
        self.replay_memory()
        await self.broker()
        self.bodies, self.ids, self.types, self.legacy, self.legacy_ids = [], [], [], [], []  # free the log
        self.simulation()
        f = self.f
        f["duration_s"] = round(time.perf_counter() - t_begin, 1)
        say(f"\nTargets: replay 1M < {TARGET_REPLAY_1M_S:.0f} s — in memory {verdict(f['replay_ledger_target_met'])}"
            f" ({f['replay_ledger_1m_s']} s), with metrics {verdict(f['replay_ledger_metrics_target_met'])}"
            f" ({f['replay_ledger_metrics_1m_s']} s), from the stream "
            f"{verdict(f.get('stream_replay_target_met', False))}"
            f" ({f.get('stream_replay_1m_s')} s); false promotions ≤ {TARGET_FALSE_PROMOTION:.0%} "
            f"{verdict(f['false_promotion_target_met'])} ({f['false_promotion_rate_policy']:.1%})"
            f"  (total {f['duration_s']} s)")
        print(json.dumps(f), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller log, fewer trials (about a minute)")
    parser.add_argument("--trials", type=int, help="simulated agents per true rate (overrides --quick)")
    parser.add_argument("--stream-entries", type=int, help="entries appended to the stream for 1b (overrides --quick)")
    args = parser.parse_args()
    quiet_logging()
    from dispatcher.plumbing import tasks
    try:
        tasks.run(Bench(args).main())  # the event loop `agentjobs trust` runs on
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the vhost is deleted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
