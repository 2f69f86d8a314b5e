"""The http/service sweep: what the endpoint an alert names answers now, and what Prometheus saw scraping it.

Alerts such as ``up == 0``, ``probe_success == 0``, a 5xx rate or a latency
SLO are about an endpoint, whatever they are called. An SRE's first questions:
does it accept connections at all, what does it answer, how fast, and why does
Prometheus mark its target down? The answers rank four competing causes:

* ``endpoint_down``    — nothing accepts connections (refused, no DNS name,
  reset, TLS failure), or Prometheus's scrape of it is refused;
* ``endpoint_errors``  — it answers, with 5xx;
* ``endpoint_slow``    — it times out, or answers slower than the alert's
  latency threshold (else ``DEFAULT_SLOW_S``);
* ``endpoint_healthy`` — it answers 2xx quickly now: the problem is elsewhere
  or has cleared; this contradicts the other three.

Which URL: the alert's labels only *propose* candidates (a ``probe_url``,
``url`` or ``target`` label, or ``instance`` as a URL or as ``host:port`` with
a ``path``/``handler`` label); only candidates under the Job's allowed HTTP
targets are probed (the ``http`` tool enforces it; the sweep merely skips the
others), one probe per investigation. The label values are untrusted data:
they are validated as URLs, host:port pairs and paths, and quoted in
statements.

The pods behind the endpoint are the Kubernetes sweep's; reading observations
and scoring them are pure functions here, the two tool calls the only I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.tools.base import Observation

from .base import Investigation, quote_untrusted
from .rules import DOMAIN_WORDS, AlertFacts, Draft, playbook_scores, read_series, rows

DEFAULT_SLOW_S = 1.0  # seconds: slower than this is slow when the alert names no latency threshold
MIN_SLOW_S, MAX_SLOW_S = 0.01, 30.0  # a threshold read from the expression is clamped to this range
URL_LABELS = ("probe_url", "url", "target", "instance")  # labels that may carry a full URL, in this order
PATH_LABELS = ("path", "handler")  # labels that may carry the path of an instance's endpoint
CAUSES = ("endpoint_down", "endpoint_errors", "endpoint_slow", "endpoint_healthy")

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})):(\d{1,5})$")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,500}$")
_LATENCY = re.compile(r"latency|duration|response_?time|_seconds|_ms\b|millisecond|probe_http_duration")
_THRESHOLD = re.compile(r">=?\s*([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)\s*$")
_REFUSED = re.compile(r"connection refused|connect: no route|no route to host|connection reset|network is unreachable")
_TIMEOUT = re.compile(r"deadline exceeded|timeout|timed out")
_NO_HOST = re.compile(r"no such host|lookup .* on |name resolution|server misbehaving")
_HTTP_5XX = re.compile(r"server returned HTTP status 5\d\d")


# --------------------------------------------------------------------------------------------
# Which URL, which threshold: from the alert's labels and expression (pure).
# --------------------------------------------------------------------------------------------

def host_port(value: str) -> str | None:
    """``value`` if it is a ``host:port`` pair with a valid port, else None (pure)."""
    m = _HOST_PORT.match(value.strip())
    return m.group(0) if m and 0 < int(m.group(2)) <= 65535 else None


def _url(value: str) -> str | None:
    v = value.strip()
    if not v.lower().startswith(("http://", "https://")) or any(c.isspace() for c in v):
        return None
    try:
        return v if urlsplit(v).hostname else None
    except ValueError:
        return None


def candidate_urls(labels: Mapping[str, str]) -> list[str]:
    """URLs the alert's labels point at, most specific first, without duplicates (pure)."""
    found: list[str] = [u for key in URL_LABELS if (u := _url(labels.get(key, ""))) is not None]
    path = next((p.strip() for key in PATH_LABELS if _PATH.match((p := labels.get(key, "")).strip())), "")
    for key in ("instance", "target"):
        hp = host_port(labels.get(key, ""))
        if hp is None:
            continue
        for scheme in ("http", "https"):
            if path and path != "/":
                found.append(f"{scheme}://{hp}{path}")
            found.append(f"{scheme}://{hp}/")
    return list(dict.fromkeys(found))


def latency_threshold(expression: str) -> float:
    """Seconds above which an answer is slow: the alert's own threshold when its expression is about latency
    (``… > 0.5``; milliseconds converted), else ``DEFAULT_SLOW_S`` (pure)."""
    expr = expression.strip().lower()
    m = _THRESHOLD.search(expr)
    if not _LATENCY.search(expr) or m is None:
        return DEFAULT_SLOW_S
    value = float(m.group(1))
    if "millisecond" in expr or re.search(r"_ms\b", expr):
        value /= 1000.0
    if not math.isfinite(value) or value <= 0:
        return DEFAULT_SLOW_S
    return min(MAX_SLOW_S, max(MIN_SLOW_S, value))


def about_endpoint(alert: AlertFacts) -> bool:
    """Whether the alert is about a service endpoint (its words, its domain, or a URL label), so that a healthy
    answer now speaks against it rather than merely not for an endpoint fault (pure)."""
    scores = playbook_scores(alert)
    domain = alert.labels.get("domain", "").strip().lower()
    return (scores.get("endpoint", 0.0) > 0 or scores.get("rollout", 0.0) > 0 or domain in DOMAIN_WORDS["http"]
            or any(_url(alert.labels.get(k, "")) for k in URL_LABELS))


# --------------------------------------------------------------------------------------------
# Reading the observations (tolerant, pure).
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Probe:
    url: str
    status: int | None  # None: no answer
    reason: str
    latency_s: float
    error_kind: str  # refused, timeout, dns, tls, reset, protocol; "" when it answered
    body_excerpt: str


def read_probe(obs: Observation) -> Probe | None:
    """http.probe: ``url``, ``status``, ``reason``, ``latency_s``, ``error_kind``, ``body_excerpt``."""
    d = obs.data if obs.ok else None
    if not isinstance(d, Mapping):
        return None
    status = d.get("status")
    latency = d.get("latency_s")
    return Probe(url=str(d.get("url", "")), status=status if isinstance(status, int) else None,
                 reason=str(d.get("reason", "")),
                 latency_s=float(latency) if isinstance(latency, int | float) else 0.0,
                 error_kind=str(d.get("error_kind", "")), body_excerpt=str(d.get("body_excerpt", "")))


@dataclass(frozen=True, kw_only=True)
class ScrapeTarget:
    job: str
    instance: str
    health: str  # up, down, unknown
    last_error: str
    last_scrape: str
    scrape_duration: float | None  # seconds
    scrape_url: str

    @property
    def through_exporter(self) -> bool:
        """A blackbox-style target: its health is the exporter's, not the probed endpoint's."""
        return "/probe?" in self.scrape_url


def read_targets(obs: Observation) -> list[ScrapeTarget]:
    """prometheus.targets rows: ``job``, ``instance``, ``health``, ``lastError``, ``lastScrape``,
    ``scrapeDuration``, ``scrapeUrl``."""
    if not obs.ok:
        return []
    out = []
    for r in rows(obs.data):
        duration = r.get("scrapeDuration")
        out.append(ScrapeTarget(job=str(r.get("job", "")), instance=str(r.get("instance", "")),
                                health=str(r.get("health", "unknown")).lower(),
                                last_error=str(r.get("lastError") or ""), last_scrape=str(r.get("lastScrape", "")),
                                scrape_duration=float(duration) if isinstance(duration, int | float) else None,
                                scrape_url=str(r.get("scrapeUrl", ""))))
    return out


def pick_target(targets: Iterable[ScrapeTarget], job: str) -> ScrapeTarget | None:
    """The target the alert is about: its job's, else a down one, else the first (pure)."""
    listed = [t for t in targets if not t.through_exporter]
    return (next((t for t in listed if job and t.job == job), None)
            or next((t for t in listed if t.health == "down"), None)
            or (listed[0] if listed else None))


# --------------------------------------------------------------------------------------------
# Scoring (pure).
# --------------------------------------------------------------------------------------------

def drafts_for(where: str) -> dict[str, Draft]:
    """The four competing causes about one endpoint (``where``: its URL or instance, untrusted)."""
    q = quote_untrusted(where or "(the endpoint)", 200)
    return {
        "endpoint_down": Draft(cause="endpoint_down", statement=f"{q} is down: nothing accepts connections there"),
        "endpoint_errors": Draft(cause="endpoint_errors", statement=f"{q} answers with server errors (5xx)"),
        "endpoint_slow": Draft(cause="endpoint_slow", statement=f"{q} answers too slowly or not at all in time"),
        "endpoint_healthy": Draft(cause="endpoint_healthy",
                                  statement=f"{q} answers quickly and successfully now: the problem is elsewhere "
                                            "or has cleared"),
    }


_UNREACHABLE = {  # error kind → (weight for endpoint_down, weight for endpoint_errors, why)
    "refused": (3.0, -1.5, "connection refused: nothing listens there"),
    "dns": (2.5, -1.5, "its host name does not resolve"),
    "reset": (1.5, 1.0, "the connection was closed or reset before an answer"),
    "tls": (1.5, -0.5, "the TLS handshake failed"),
    "protocol": (-1.0, 1.5, "something answers, but not with valid HTTP"),
}


def assess_probe(drafts: Mapping[str, Draft], obs: Observation, threshold: float, *, about: bool) -> None:
    """What the endpoint answered, for and against each cause (``about``: the alert is about this endpoint,
    so a healthy answer weighs fully) (pure)."""
    probe = read_probe(obs)
    if probe is None:
        return  # the probe did not run (outside the targets, budget): nothing observed about the endpoint
    down, errors, slow, healthy = (drafts[c] for c in CAUSES)
    q = quote_untrusted(probe.url, 200)
    if probe.status is None:
        if probe.error_kind == "timeout":
            slow.statement = f"{q} does not answer within {probe.latency_s:.1f} s"
            slow.supports(obs, f"no answer within {probe.latency_s:.1f} s (the probe's timeout)", 3.0)
            errors.contradicts(obs, "it does not answer at all, with an error or otherwise", 1.0)
        else:
            w_down, w_errors, why = _UNREACHABLE.get(probe.error_kind, (1.0, 0.0, f"{probe.error_kind or 'unknown'}"
                                                                                    " failure"))
            if w_down > 0:
                down.statement = f"{q} is down: {why}"
                down.supports(obs, why, w_down)
            else:
                down.contradicts(obs, why, -w_down)
            if w_errors > 0:
                errors.supports(obs, why, w_errors)
            elif w_errors < 0:
                errors.contradicts(obs, f"{why}: there is no answer to be an error", -w_errors)
            slow.contradicts(obs, f"{why}, at once ({probe.latency_s:.3f} s): not a matter of speed", 1.5)
        healthy.contradicts(obs, f"no answer: {probe.reason or probe.error_kind}", 3.0)
        return
    took = f"{probe.status} {probe.reason}".strip() + f" in {probe.latency_s:.3f} s"
    down.contradicts(obs, f"it answers ({took})", 3.0)
    is_slow = probe.latency_s > threshold
    if is_slow:
        slow.statement = f"{q} answers in {probe.latency_s:.2f} s, slower than {threshold:g} s"
        slow.supports(obs, f"answered in {probe.latency_s:.2f} s, above the {threshold:g} s threshold", 3.0)
        if probe.latency_s > 3 * threshold:
            slow.supports(obs, f"more than three times the {threshold:g} s threshold", 0.5)
    else:
        slow.contradicts(obs, f"answered in {probe.latency_s:.3f} s, within the {threshold:g} s threshold", 2.0)
    body = f"; body: {quote_untrusted(probe.body_excerpt, 120)}" if probe.body_excerpt else ""
    if probe.status >= 500:
        status = f"{probe.status} {probe.reason}".strip()
        errors.statement = f"{q} answers {status}: the service fails its requests"
        errors.supports(obs, f"it answers {status}{body}", 3.0)
        healthy.contradicts(obs, f"it answers {probe.status}", 3.0)
        return
    if probe.status >= 400:
        errors.contradicts(obs, f"it answers {probe.status}: a client error, not a server failure", 1.0)
    else:
        errors.contradicts(obs, f"it answers {probe.status}, not a server error", 2.0)
    if is_slow:
        healthy.contradicts(obs, f"it answers, but in {probe.latency_s:.2f} s", 2.0)
        return
    healthy.statement = (f"{q} answers {took} now: the endpoint is healthy, the problem is elsewhere or has "
                         "cleared")
    weight = (2.5 if probe.status < 400 else 1.0) if about else 1.0
    healthy.supports(obs, f"it answers {took}", weight)


def assess_target(drafts: Mapping[str, Draft], obs: Observation, target: ScrapeTarget | None,
                  probed: str | None, threshold: float, *, about: bool = True) -> None:
    """What Prometheus saw scraping the target (``probed``: host:port of the probed URL, if any; ``about``:
    the alert is about this endpoint — else a target that is simply up, unprobed, says nothing) (pure)."""
    if target is None or (target.health == "up" and probed is None and not about):
        return
    down, errors, slow, healthy = (drafts[c] for c in CAUSES)
    who = f"Prometheus's scrape of {quote_untrusted(target.instance, 120)} (job {quote_untrusted(target.job, 60)})"
    error = target.last_error
    if target.health == "down":
        said = f"{who} fails: {quote_untrusted(error, 200)}" if error else f"{who} fails"
        if _REFUSED.search(error):
            if not down.evidence_for:  # no probe said it first: Prometheus's words are the statement
                down.statement = f"{quote_untrusted(target.instance, 120)} is down: {said}"
            down.supports(obs, said, 2.5)
        elif _TIMEOUT.search(error):
            slow.supports(obs, said, 2.0)
        elif _NO_HOST.search(error):
            down.supports(obs, said, 2.0)
        elif _HTTP_5XX.search(error):
            errors.supports(obs, said, 2.0)
            down.contradicts(obs, f"{who} gets an HTTP answer", 1.0)
        else:
            down.supports(obs, said, 1.0)
        healthy.contradicts(obs, said, 1.5)
        return
    if target.health == "up":
        same = probed is None or probed.lower() == target.instance.lower()
        at = f" (last at {target.last_scrape})" if target.last_scrape else ""
        down.contradicts(obs, f"{who} succeeds{at}" + ("" if same else ": the process answers on its metrics port"),
                         2.0 if same else 0.5)
        healthy.supports(obs, f"{who} succeeds{at}", 0.5)
        if target.scrape_duration is not None and target.scrape_duration > threshold:
            slow.supports(obs, f"{who} takes {target.scrape_duration:.2f} s", 1.0)


def assess_condition(drafts: Mapping[str, Draft], expr_obs: Observation | None) -> None:
    """The alert's own expression, re-run: still holding, a healthy answer now missed what Prometheus sees;
    cleared, healthy is what the endpoint is (pure)."""
    if expr_obs is None or not expr_obs.ok:
        return
    healthy = drafts["endpoint_healthy"]
    if not (healthy.evidence_for or healthy.evidence_against):
        return  # the endpoint itself was not examined: the condition alone says nothing about it
    if read_series(expr_obs):
        healthy.contradicts(expr_obs, "the alert's condition still holds: what fails is not what one request "
                                      "shows", 1.5)
    else:
        healthy.supports(expr_obs, "the alert's condition has cleared", 1.0)


# --------------------------------------------------------------------------------------------
# The sweep: the only I/O.
# --------------------------------------------------------------------------------------------

def _allowed(inv: Investigation, url: str) -> bool:
    tool: Any = inv.tools.get("http")
    allows = getattr(tool, "allows", None)
    if not callable(allows):
        return True  # a tool without the check still refuses what it must not probe
    try:
        return bool(allows(url))
    except Exception:  # noqa: BLE001 - a broken check allows nothing
        return False


def _host_port_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return f"{parts.hostname}:{port}" if parts.hostname and port else None


async def sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Probe the endpoint the alert's labels name (if it is an allowed target), ask Prometheus about the
    target, and score the four causes."""
    threshold = latency_threshold(alert.expression)
    url = None
    if inv.offers("http", "probe"):
        url = next((u for u in candidate_urls(alert.labels) if _allowed(inv, u)), None)
    instance = alert.labels.get("instance", "").strip()
    ask_prometheus = inv.offers("prometheus", "targets") and (host_port(instance) or _url(instance))
    if url is None and not ask_prometheus:
        return []
    drafts = drafts_for(url or instance)
    if url is not None:
        assess_probe(drafts, await inv.call("http", "probe", {"url": url}), threshold, about=about_endpoint(alert))
    if ask_prometheus:
        targets_obs = await inv.call("prometheus", "targets", {"instance": instance})
        target = pick_target(read_targets(targets_obs), alert.labels.get("job", ""))
        assess_target(drafts, targets_obs, target, _host_port_of(url) if url else None, threshold,
                      about=about_endpoint(alert))
    if alert.generator_url and inv.offers("prometheus", "alert_expression"):  # cached: the reasoner ran it
        assess_condition(drafts, await inv.call("prometheus", "alert_expression",
                                                {"generator_url": alert.generator_url}))
    # Only what was examined: an untouched draft would be raised by the reasoner's own re-run of the alert's
    # expression and look like a candidate nothing was ever asked about.
    return [d for d in drafts.values() if d.evidence_for or d.evidence_against]
