"""Pure parts of the local process runner: Kubernetes quantities, exit classification,
stderr redaction, and the manifest → local plan translation."""

from __future__ import annotations

import signal
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.jobs.process import (
    OOM_EXIT_CODE,
    classify,
    cpu_cores,
    memory_bytes,
    parse_quantity,
)
from dispatcher.jobs.local import build_plan, expand, redact_text, stderr_tail
from schemas.errors import PermanentError

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}

# --- quantities -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("128Mi", 134217728), ("1G", 10**9),
     ("1.5Gi", 3 * 2**29), ("2", 2), ("1e3", 1000), ("100k", 100_000), ("0.5Ki", 512)],
)
def test_memory_quantities_in_bytes(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500m", 0.5), ("2", 2.0), ("0.25", 0.25), ("1500m", 1.5), ("100m", 0.1), (1, 1.0),
     ("0.0001", 0.001)],  # below a millicore rounds up, like the API server
)
def test_cpu_quantities_in_cores(text: str | int, expected: float) -> None:
    assert cpu_cores(text) == expected


@pytest.mark.parametrize("text", ["", "Mi", "12MB", "1.2.3", "ten", "5 Gi", "1e", "--1", "0x10"])
def test_invalid_quantities_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["0", "-1Gi", "0m"])
def test_limits_must_be_positive(text: str) -> None:
    with pytest.raises(ValueError):
        memory_bytes(text)
    with pytest.raises(ValueError):
        cpu_cores(text)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(BINARY | DECIMAL)))
def test_integer_quantities_scale_exactly(n: int, suffix: str) -> None:
    assert memory_bytes(f"{n}{suffix}") == n * (BINARY | DECIMAL)[suffix]


@given(st.integers(min_value=1, max_value=64_000))
def test_millicores_round_trip(millis: int) -> None:
    assert cpu_cores(f"{millis}m") == millis / 1000
    assert parse_quantity(f"{millis}m") == Decimal(millis) / 1000


@given(st.text(max_size=12))
def test_parser_accepts_or_raises_value_error_only(text: str) -> None:
    try:
        value = parse_quantity(text)
    except ValueError:
        return
    assert isinstance(value, Decimal)


# --- classification ---------------------------------------------------------------------------


def test_clean_exit_is_not_oom() -> None:
    outcome = classify(0, memory_limited=True, stderr_tail="MemoryError handled, carrying on")
    assert (outcome.exit_code, outcome.oom_suspected) == (0, False)


def test_python_memory_error_under_a_limit_is_oom_with_137() -> None:
    tail = 'Traceback (most recent call last):\n  File "<string>", line 1\nMemoryError\n'
    outcome = classify(1, memory_limited=True, stderr_tail=tail)
    assert outcome.oom_suspected and outcome.exit_code == OOM_EXIT_CODE
    assert "MemoryError" in outcome.why


def test_memory_error_without_a_limit_is_a_plain_failure() -> None:
    outcome = classify(1, memory_limited=False, stderr_tail="MemoryError")
    assert (outcome.exit_code, outcome.oom_suspected) == (1, False)


@pytest.mark.parametrize("text", ["terminate called after throwing an instance of "
                                  "'std::bad_alloc'", "fatal error: runtime: out of memory",
                                  "java.lang.OutOfMemoryError: Java heap space",
                                  "FATAL ERROR: Reached heap limit Allocation failed - "
                                  "JavaScript heap out of memory"])
def test_other_runtimes_allocation_failures_count_as_oom(text: str) -> None:
    assert classify(2, memory_limited=True, stderr_tail=text).oom_suspected


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS])
def test_fatal_signals_under_a_memory_limit_are_oom(sig: int) -> None:
    outcome = classify(-sig, memory_limited=True)
    assert outcome.oom_suspected and outcome.exit_code == OOM_EXIT_CODE and outcome.signal == sig


def test_fatal_signal_without_a_memory_limit_reports_128_plus_signal() -> None:
    outcome = classify(-signal.SIGSEGV, memory_limited=False)
    assert (outcome.exit_code, outcome.oom_suspected) == (128 + signal.SIGSEGV, False)


def test_signals_we_sent_are_never_oom() -> None:
    outcome = classify(-signal.SIGKILL, memory_limited=True, signalled_by_us=True,
                       stderr_tail="MemoryError")
    assert (outcome.exit_code, outcome.oom_suspected) == (137, False)


def test_cgroup_oom_kill_is_certain() -> None:
    outcome = classify(-signal.SIGKILL, cgroup_oom_kills=1)
    assert outcome.oom_suspected and outcome.exit_code == OOM_EXIT_CODE


@pytest.mark.parametrize(("returncode", "used"), [(-signal.SIGXCPU, 10.0),
                                                  (-signal.SIGKILL, 15.2)])
def test_exhausted_cpu_budget_is_not_mistaken_for_oom(returncode: int, used: float) -> None:
    outcome = classify(returncode, memory_limited=True, cpu_budget=10, cpu_seconds=used)
    assert outcome.cpu_limit_exceeded and not outcome.oom_suspected


# --- redaction --------------------------------------------------------------------------------

SECRET = b"s.UnitTestWrappingToken0000000001"


def test_secret_values_are_masked_in_text() -> None:
    text = f"token={SECRET.decode()} and again {SECRET.decode()}"
    assert SECRET.decode() not in redact_text(text, [SECRET])


def test_stderr_tail_is_bounded_and_redacted(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_text("x" * 10_000 + "\n" + f"leaked {SECRET.decode()}\n" + "last line\n")
    tail = stderr_tail(log, [SECRET], limit=2048)
    assert len(tail.encode()) <= 2048 + len("…".encode())
    assert tail.endswith("last line")
    assert SECRET.decode() not in tail
    assert stderr_tail(tmp_path / "missing.log", [SECRET]) == ""


# --- manifest → plan --------------------------------------------------------------------------


def job(**container) -> dict:
    base = {"name": "agent", "command": ["/bin/true"], **container}
    return {
        "metadata": {"name": "aj-plan-1", "namespace": "runs",
                     "labels": {"agentjobs.dev/investigation-id": "inv-1", "domain": "db"}},
        "spec": {"activeDeadlineSeconds": 100, "ttlSecondsAfterFinished": 30,
                 "template": {"metadata": {"labels": {"phase": "shadow"}},
                              "spec": {"containers": [base],
                                       "volumes": [{"name": "v", "secret": {"secretName": "s"}},
                                                   {"name": "scratch", "emptyDir": {}}]}}},
    }


def test_plan_builds_env_in_kubernetes_order(tmp_path: Path) -> None:
    manifest = job(
        args=["--id", "$(INV)", "$$(literal)"],
        env=[{"name": "INV", "valueFrom": {"fieldRef": {
                 "fieldPath": "metadata.labels['agentjobs.dev/investigation-id']"}}},
             {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
             {"name": "PHASE", "valueFrom": {"fieldRef": {
                 "fieldPath": "metadata.labels['phase']"}}},
             {"name": "URL", "value": "http://$(NS).svc/$(UNDEFINED)"},
             {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "tok"}}},
             {"name": "MEM", "valueFrom": {"resourceFieldRef": {
                 "resource": "limits.memory", "divisor": "1Mi"}}}],
        resources={"limits": {"memory": "256Mi", "cpu": "500m"}},
    )
    plan = build_plan(manifest, {"tok": SECRET}, tmp_path / "w")
    # the Job's labels, not the pod template's, carry the investigation id; fieldRefs see the
    # pod's labels (the template's)
    assert plan.env["INV"] == ""
    assert plan.env["PHASE"] == "shadow"
    assert plan.env["URL"] == "http://runs.svc/$(UNDEFINED)"
    assert plan.env["TOKEN"] == SECRET.decode()
    assert plan.env["MEM"] == "256"
    assert plan.env["AGENTJOBS_MOUNT_ROOT"] == str(tmp_path / "w" / "mounts")
    assert plan.argv == ["/bin/true", "--id", "", "$(literal)"]
    assert plan.limits.memory_bytes == 256 * 2**20
    assert plan.limits.cpu_cores == 0.5
    assert plan.limits.cpu_seconds == 51  # 0.5 cores × 100 s deadline, +1
    assert plan.investigation_id == "inv-1"
    assert (plan.deadline_seconds, plan.ttl_seconds) == (100, 30)
    assert plan.secret_values == [SECRET]


def test_plan_materialises_secret_and_empty_dir_mounts_under_the_mount_root(
    tmp_path: Path,
) -> None:
    manifest = job(volumeMounts=[{"name": "v", "mountPath": "/var/run/secrets/agentjobs"},
                                 {"name": "scratch", "mountPath": "/scratch"}],
                   workingDir="/scratch")
    plan = build_plan(manifest, {"wrapping_token": SECRET}, tmp_path / "w")
    root = tmp_path / "w" / "mounts"
    assert plan.files == [(root / "var/run/secrets/agentjobs/wrapping_token", SECRET, 0o400)]
    assert root / "scratch" in plan.dirs
    assert plan.cwd == root / "scratch"


@pytest.mark.parametrize(
    "container",
    [{"command": []},
     {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]},
     {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}]},
     {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]},
     {"volumeMounts": [{"name": "v", "mountPath": "/"}]}],
    ids=["no-command", "configmap", "unknown-field", "unknown-volume", "root-mount"],
)
def test_plan_rejects_what_cannot_run_locally(tmp_path: Path, container: dict) -> None:
    with pytest.raises(PermanentError) as caught:
        build_plan(job(**container), {}, tmp_path / "w")
    assert caught.value.reason == "invalid_job"


def test_dollar_expansion_follows_kubernetes() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)-$", env) == "1-two-$(C)-$(A)-$"
