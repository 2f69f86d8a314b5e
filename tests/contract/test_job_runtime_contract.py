"""Every JobRuntime keeps the same promises: one run per name, one terminal state per Job.

The scenarios run against each implementation in ``conftest.RUNTIME_FACTORIES``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from dispatcher.jobs import jobspec
from dispatcher.jobs.runtime import JobRuntime, JobState, LaunchOutcome, RuntimeEvent
from schemas import FailureReason

from .conftest import Harness, make_job

pytestmark = pytest.mark.timeout(60)

FAKE_VAULT_TOKEN = "s.ContractTestFakeVaultToken0001"
WRAPPING_TOKEN = b"s.WrappingTokenForTheAgent000000001"

# Appends this process's pid to the file named by argv[1]: counts how many runs happened.
RECORD_RUN = "import os, sys; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')"


def test_runtime_implements_the_port(runtime: JobRuntime) -> None:
    assert isinstance(runtime, JobRuntime)


async def test_launch_reports_running_then_succeeded(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a Job whose command exits 0
    job = make_job("ok-1", "print('finding published')", investigation_id="inv-ok")

    # When it is launched
    outcome = await runtime.launch(job)

    # Then it is created, reported running, then succeeded, with its labels
    assert outcome is LaunchOutcome.CREATED
    running = await runtime_harness.wait_for("ok-1", lambda e: e.state is JobState.RUNNING)
    done = await runtime_harness.terminal("ok-1")
    assert running.investigation_id == done.investigation_id == "inv-ok"
    assert done.state is JobState.SUCCEEDED
    assert done.reason is None
    assert done.labels["app.kubernetes.io/managed-by"] == "agentjobs"
    states = [e.state for e in runtime_harness.events["ok-1"]]
    assert states.index(JobState.RUNNING) < states.index(JobState.SUCCEEDED)
    assert "ok-1" not in await runtime.active()


async def test_second_launch_of_a_name_starts_nothing(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a running Job that records each run and waits for a release file
    runs = runtime_harness.scratch / "runs"
    release = runtime_harness.scratch / "release"
    code = (
        f"{RECORD_RUN}\n"
        "import pathlib, time\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
    )
    job = make_job("dup-1", code, str(runs), str(release))
    assert await runtime.launch(job) is LaunchOutcome.CREATED
    await runtime_harness.wait_for("dup-1", lambda e: e.state is JobState.RUNNING)

    # When the same name is launched again, while running and after it finished
    while_running = await runtime.launch(job)
    assert "dup-1" in await runtime.active()
    release.touch()
    await runtime_harness.terminal("dup-1")
    after_finish = await runtime.launch(job)

    # Then both answer ALREADY_EXISTS and the command ran exactly once
    assert while_running is LaunchOutcome.ALREADY_EXISTS
    assert after_finish is LaunchOutcome.ALREADY_EXISTS
    assert len(runs.read_text().split()) == 1


async def test_failing_command_fails_with_its_exit_code(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a Job that complains on stderr (including its secret) and exits 3
    code = (
        "import os, sys\n"
        "print('tool prometheus unreachable', file=sys.stderr)\n"
        "print('token was', os.environ['VAULT_WRAPPING_TOKEN'], file=sys.stderr)\n"
        "sys.exit(3)"
    )
    env = [{"name": "VAULT_WRAPPING_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": jobspec.secret_name("fail-1"),
                                           "key": "wrapping_token"}}}]
    job = make_job("fail-1", code, env=env)

    await runtime.launch(job, secret={"wrapping_token": WRAPPING_TOKEN})
    event = await runtime_harness.terminal("fail-1")

    # Then: failed (agent error locally, BackoffLimitExceeded on Kubernetes) with the exit
    # code; the secret is never in the message
    assert event.state is JobState.FAILED
    assert event.reason is runtime_harness.expect.nonzero_exit_reason
    assert event.exit_code == 3
    assert "exit" in event.message and "3" in event.message
    assert WRAPPING_TOKEN.decode() not in event.message
    if runtime_harness.expect.reports_stderr_tail:
        assert "tool prometheus unreachable" in event.message
        assert len(event.message.encode()) < 2048 + 200


async def test_deadline_fails_with_deadline_exceeded(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a Job that would run far longer than its 1 s deadline
    job = make_job("slow-1", "import time; time.sleep(120)", deadline=1)

    await runtime.launch(job)
    await runtime_harness.let_deadline_pass("slow-1", 1)
    event = await runtime_harness.terminal("slow-1")

    assert event.state is JobState.FAILED
    assert event.reason is FailureReason.DEADLINE_EXCEEDED
    assert "slow-1" not in await runtime.active()


async def test_memory_limit_exceeded_fails_as_oom_killed(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a Job limited to 128Mi that allocates 1 GB
    job = make_job("oom-1", "block = bytearray(1024 ** 3)", memory="128Mi")

    await runtime.launch(job)
    event = await runtime_harness.terminal("oom-1")

    # Then it is reported like Kubernetes' OOMKilled
    assert event.state is JobState.FAILED
    assert event.reason is FailureReason.OOM_KILLED
    assert event.exit_code == 137


async def test_cancel_reports_cancelled(runtime_harness: Harness, runtime: JobRuntime) -> None:
    job = make_job("cancel-1", "import time; time.sleep(120)")
    await runtime.launch(job)
    await runtime_harness.wait_for("cancel-1", lambda e: e.state is JobState.RUNNING)

    existed = await runtime.cancel("cancel-1")
    event = await runtime_harness.terminal("cancel-1")

    assert existed is True
    assert event.state is JobState.CANCELLED
    assert "cancel-1" not in await runtime.active()
    assert await runtime.cancel("never-launched") is False


async def test_secret_reaches_the_process_as_files_and_env(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a Job that mounts its input Secret where jobspec does (/var/run/agentjobs/input,
    # mode 0400) and maps one key to an env var; the process finds the files through
    # AGENTJOBS_MOUNT_ROOT (the pod's filesystem root on the host)
    out = runtime_harness.scratch / "seen.json"
    code = (
        "import json, os, stat, sys\n"
        "root = os.environ['AGENTJOBS_MOUNT_ROOT']\n"
        "d = root + sys.argv[2]\n"
        "seen = {'files': {n: open(os.path.join(d, n)).read() for n in sorted(os.listdir(d))},\n"
        "        'modes': [stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)\n"
        "                  for n in os.listdir(d)],\n"
        "        'env': os.environ.get('VAULT_WRAPPING_TOKEN'),\n"
        "        'pod': os.environ.get('POD_NAME'), 'inv': os.environ.get('INVESTIGATION')}\n"
        "json.dump(seen, open(sys.argv[1], 'w'))\n"
    )
    env = [
        {"name": "VAULT_WRAPPING_TOKEN",
         "valueFrom": {"secretKeyRef": {"name": jobspec.secret_name("sec-1"),
                                        "key": jobspec.WRAPPED_TOKEN_FILE}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "INVESTIGATION", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['agentjobs.dev/investigation-id']"}}},
    ]
    volumes = [{"name": jobspec.INPUT_VOLUME,
                "secret": {"secretName": jobspec.secret_name("sec-1"), "defaultMode": 0o400}}]
    mounts = [{"name": jobspec.INPUT_VOLUME, "mountPath": jobspec.INPUT_DIR, "readOnly": True}]
    job = make_job("sec-1", code, str(out), jobspec.INPUT_DIR, env=env, volumes=volumes,
                   mounts=mounts, investigation_id="inv-sec")
    incident = b'{"kind": "incident", "group_key": "{}:{alertname=\\"DiskFull\\"}"}'

    # When it is launched with its input files
    await runtime.launch(job, secret={jobspec.WRAPPED_TOKEN_FILE: WRAPPING_TOKEN,
                                      jobspec.INCIDENT_FILE: incident})
    event = await runtime_harness.terminal("sec-1")

    # Then the process read both files and the env var, and the files are owner-only
    assert event.state is JobState.SUCCEEDED, event.message
    seen = json.loads(out.read_text())
    assert seen["files"] == {jobspec.INCIDENT_FILE: incident.decode(),
                             jobspec.WRAPPED_TOKEN_FILE: WRAPPING_TOKEN.decode()}
    assert seen["env"] == WRAPPING_TOKEN.decode()
    assert seen["modes"] and all(mode & 0o077 == 0 for mode in seen["modes"])
    assert seen["pod"].startswith("sec-1")
    assert seen["inv"] == "inv-sec"


async def test_environment_is_scrubbed(
    runtime_harness: Harness, runtime: JobRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the dispatcher's own environment holds a Vault token
    monkeypatch.setenv("VAULT_TOKEN", FAKE_VAULT_TOKEN)
    monkeypatch.setenv("AGENTJOBS_AMQP__URL", "amqp://admin:hunter2@broker/")
    out = runtime_harness.scratch / "env.json"
    code = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    job = make_job("env-1", code, str(out), env=[{"name": "GREETING", "value": "hello"}])

    await runtime.launch(job)
    event = await runtime_harness.terminal("env-1")

    # Then the child sees what the Job declares, and none of the dispatcher's environment
    assert event.state is JobState.SUCCEEDED, event.message
    seen = json.loads(out.read_text())
    assert seen["GREETING"] == "hello"
    assert "VAULT_TOKEN" not in seen
    assert "AGENTJOBS_AMQP__URL" not in seen
    assert FAKE_VAULT_TOKEN not in json.dumps(seen)
    leaked = {k for k, v in os.environ.items() if seen.get(k) == v} - {"PATH", "HOME", "LANG",
                                                                      "LC_CTYPE", "LC_ALL"}
    assert leaked == set()


async def test_work_dir_is_removed_when_the_job_ends(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given Jobs that leave files in their working and temporary directories
    out = runtime_harness.scratch / "where"
    code = (
        "import os, sys, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'y')\n"
        "open(sys.argv[1], 'w').write(os.getcwd())\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    await runtime.launch(make_job("wd-ok", code, str(out) + "-ok", "0"))
    await runtime.launch(make_job("wd-fail", code, str(out) + "-fail", "1"))
    assert (await runtime_harness.terminal("wd-ok")).state is JobState.SUCCEEDED
    assert (await runtime_harness.terminal("wd-fail")).state is JobState.FAILED

    # Then nothing of either Job's temporary state is left on disk
    assert runtime_harness.leftover_workdirs() == []
    for suffix in ("-ok", "-fail"):
        assert not Path(Path(str(out) + suffix).read_text()).exists()


async def test_every_job_gets_exactly_one_terminal_event(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given Jobs heading for every kind of end, and one still running at close
    jobs = {
        "once-ok": make_job("once-ok", "pass"),
        "once-fail": make_job("once-fail", "raise SystemExit(2)"),
        "once-slow": make_job("once-slow", "import time; time.sleep(120)", deadline=1),
        "once-cancel": make_job("once-cancel", "import time; time.sleep(120)"),
        "once-open": make_job("once-open", "import time; time.sleep(120)"),
    }
    for job in jobs.values():
        assert await runtime.launch(job) is LaunchOutcome.CREATED
    assert await runtime.launch(jobs["once-ok"]) is LaunchOutcome.ALREADY_EXISTS
    for name in ("once-cancel", "once-open"):
        await runtime_harness.wait_for(name, lambda e: e.state is JobState.RUNNING)
    await runtime_harness.let_deadline_pass("once-slow", 1)
    await runtime.cancel("once-cancel")
    for name in ("once-ok", "once-fail", "once-slow", "once-cancel"):
        await runtime_harness.terminal(name)
    await runtime.cancel("once-cancel")  # again (already acknowledged): no second event

    # When the runtime closes (the event stream ends)
    await runtime_harness.close()

    # Then each Job had at most one terminal event, and the expected one: the Job still
    # running at close was stopped (local) or keeps running for the next dispatcher (Kubernetes)
    finals = {}
    for name in jobs:
        terminal = [e for e in runtime_harness.events[name] if e.state.terminal]
        assert len(terminal) <= 1, (name, runtime_harness.events[name])
        finals[name] = terminal[0].state if terminal else None
    stops = runtime_harness.expect.close_stops_jobs
    assert finals == {
        "once-ok": JobState.SUCCEEDED,
        "once-fail": JobState.FAILED,
        "once-slow": JobState.FAILED,
        "once-cancel": JobState.CANCELLED,
        "once-open": JobState.CANCELLED if stops else None,
    }
    assert await runtime_harness.reopen().active() == ([] if stops else ["once-open"])


async def test_an_unacknowledged_ending_is_reported_again_after_a_restart(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a dispatcher that saw a Job end but crashed before acknowledging it
    runtime_harness.acknowledge = False
    await runtime.launch(make_job("unacked-1", "raise SystemExit(4)"))
    first = await runtime_harness.terminal("unacked-1")

    # When the runtime restarts
    restarted = await runtime_harness.restart()

    # Then the same ending is reported again; once acknowledged, never again
    again = await restarted.terminal("unacked-1")
    assert (again.state, again.reason, again.exit_code) == (first.state, first.reason,
                                                           first.exit_code)
    third = await restarted.restart()
    assert await third.runtime.active() == []
    assert await third.runtime.launch(make_job("unacked-1", "pass")) is (
        LaunchOutcome.ALREADY_EXISTS)  # the finished Job is still there (until its TTL)
    await third.close()
    assert third.events["unacked-1"] == []


async def test_concurrent_launches_from_two_runtimes_create_one_run(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a second runtime on the same backing store (another dispatcher replica)
    assert runtime_harness.peer is not None
    other = runtime_harness.alongside(runtime_harness.peer())
    other.start()
    runs = runtime_harness.scratch / "runs"
    names = [f"race-{i}" for i in range(3)]
    try:
        # When both launch each name at the same time
        outcomes = {}
        for name in names:
            job = make_job(name, RECORD_RUN, f"{runs}-{name}")
            inputs = {jobspec.INCIDENT_FILE: b"{}"}  # both also race to create its Secret
            outcomes[name] = await asyncio.gather(runtime.launch(job, secret=inputs),
                                                  other.runtime.launch(job, secret=inputs))

        # Then exactly one of them created it, the command ran once, and its ending is
        # reported exactly once (by whichever runtime reports it)
        for name in names:
            assert sorted(outcomes[name]) == sorted(
                [LaunchOutcome.CREATED, LaunchOutcome.ALREADY_EXISTS]), outcomes[name]
            done = await _first_terminal(name, runtime_harness, other)
            assert done.state is JobState.SUCCEEDED, done.message
            assert len(Path(f"{runs}-{name}").read_text().split()) == 1
    finally:
        await other.close()
    for name in names:
        terminal = [e for h in (runtime_harness, other) for e in h.events[name] if e.state.terminal]
        assert len(terminal) == 1, (name, terminal)


async def _first_terminal(name: str, *harnesses: Harness) -> RuntimeEvent:
    """The terminal event of Job ``name`` as reported by whichever harness sees it first."""
    waits = [asyncio.ensure_future(h.terminal(name)) for h in harnesses]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for wait in waits:
            wait.cancel()


async def test_a_running_jobs_annotations_are_reported_until_it_ends(
    runtime_harness: Harness, runtime: JobRuntime
) -> None:
    # Given a running Job that carries a token accessor annotation (what the token sweeper reads)
    release = runtime_harness.scratch / "release-ann"
    job = make_job("ann-1", "import pathlib, sys, time\n"
                            "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.02)\n", str(release))
    job["metadata"].setdefault("annotations", {})["agentjobs.dev/token-accessor"] = "acc-ann-1"
    assert await runtime.launch(job) is LaunchOutcome.CREATED
    await runtime_harness.wait_for("ann-1", lambda e: e.state is JobState.RUNNING)

    # Then it is listed with its annotations, and where its Jobs live is named
    active = await runtime.active_annotations()
    assert active["ann-1"]["agentjobs.dev/token-accessor"] == "acc-ann-1"
    assert runtime.where.split("/", 1)[0] in ("kubernetes", "local") and runtime.where.split("/", 1)[1]

    # When it ends, it is no longer listed
    release.touch()
    await runtime_harness.terminal("ann-1")
    assert "ann-1" not in await runtime.active_annotations()
