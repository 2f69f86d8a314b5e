"""LocalRuntime promises beyond the shared contract: many runtimes on one state dir, crashes,
TTL, invalid Jobs, closing — and the process runner's containment underneath."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.jobs import process
from dispatcher.jobs.process import Cgroup2, Limits, ProcessSpec
from dispatcher.jobs.runtime import JobState, LaunchOutcome
from dispatcher.jobs.local import LocalRuntime
from schemas import FailureReason
from schemas.errors import PermanentError

from .conftest import EVENT_TIMEOUT, Harness, make_job

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
RECORD_RUN = "import os, sys; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')"
WAIT_FOR_FILE = (
    "import pathlib, sys, time\n"
    "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
)


@pytest.fixture
async def open_runtime():
    """Opens LocalRuntimes; closes them after the test, so a failure leaves no process behind."""
    opened: list[LocalRuntime] = []

    def open_(state_dir: Path, **kwargs) -> LocalRuntime:
        opened.append(LocalRuntime(state_dir, **kwargs))
        return opened[-1]

    yield open_
    for runtime in opened:
        await runtime.close()


class Clock:
    """A settable UTC clock."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def started(runtime: LocalRuntime) -> Harness:
    state = runtime.state_dir
    harness = Harness(kind="local", runtime=runtime, scratch=Path("/nonexistent"),
                      leftover_workdirs=lambda: sorted((state / "work").iterdir()),
                      reopen=lambda: LocalRuntime(state))
    harness.start()
    return harness


async def run_script(script: str, *args: str) -> tuple[int, str]:
    """Run a Python script that imports agentjobs in a separate process (a second dispatcher)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(script), *args,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(EVENT_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return proc.returncode, out.decode()


# --- many runtimes, one state dir -------------------------------------------------------------


async def test_two_runtimes_launching_one_name_create_one_process(
    tmp_path: Path, open_runtime
) -> None:
    # Given two runtimes (two dispatchers) sharing one state dir
    state, runs, release = tmp_path / "state", tmp_path / "runs", tmp_path / "release"
    a, b = open_runtime(state), open_runtime(state)
    ha, hb = await started(a), await started(b)
    job = make_job("shared-1", RECORD_RUN + "\n" + WAIT_FOR_FILE, str(runs), str(release))

    # When both launch the same Job at once
    outcomes = await asyncio.gather(a.launch(job), b.launch(job), a.launch(job), b.launch(job))

    # Then exactly one is created; both see it as active; it ran once
    assert sorted(outcomes).count(LaunchOutcome.CREATED) == 1
    winner, other = (ha, hb) if outcomes[0] is LaunchOutcome.CREATED else (hb, ha)
    await winner.wait_for("shared-1", lambda e: e.state is JobState.RUNNING)
    assert await a.active() == await b.active() == ["shared-1"]
    release.touch()
    assert (await winner.terminal("shared-1")).state is JobState.SUCCEEDED
    assert len(runs.read_text().split()) == 1
    await ha.close()
    await hb.close()
    assert other.events["shared-1"] == []


async def test_cancel_through_another_runtime_is_reported_by_the_owner(
    tmp_path: Path, open_runtime
) -> None:
    state = tmp_path / "state"
    a, b = open_runtime(state, grace_seconds=2), open_runtime(state, grace_seconds=2)
    ha = await started(a)
    await a.launch(make_job("shared-2", "import time; time.sleep(120)"))
    await ha.wait_for("shared-2", lambda e: e.state is JobState.RUNNING)

    assert await b.cancel("shared-2") is True

    assert (await ha.terminal("shared-2")).state is JobState.CANCELLED
    assert await a.active() == await b.active() == []
    await ha.close()
    await b.close()


async def test_cancelled_job_is_removed_once_its_ending_is_acknowledged(
    tmp_path: Path, open_runtime
) -> None:
    # Given a Job that ended, its ending not yet acknowledged by its runtime
    state = tmp_path / "state"
    a, b = open_runtime(state), open_runtime(state)
    ha = await started(a)
    ha.acknowledge = False
    await a.launch(make_job("gone-1", "pass"))
    ending = await ha.terminal("gone-1")

    # When another runtime cancels (deletes) it
    assert await b.cancel("gone-1") is True

    # Then it stays until the ending is acknowledged, then the name is free again
    assert await b.launch(make_job("gone-1", "pass")) is LaunchOutcome.ALREADY_EXISTS
    await a.acknowledge(ending)
    assert not (state / "jobs" / "gone-1").exists()
    assert await b.launch(make_job("gone-1", "pass")) is LaunchOutcome.CREATED
    await ha.close()


RACE = """
    import asyncio, pathlib, sys, time
    from dispatcher.jobs.local import LocalRuntime
    from tests.contract.conftest import make_job

    async def main():
        state, runs, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
        runtime = LocalRuntime(state)
        job = make_job("race-1", sys.argv[4], runs)
        print("ready", flush=True)
        while not go.exists():  # a start line, so the launches really overlap
            time.sleep(0.001)
        outcome = await runtime.launch(job)
        print(f"OUTCOME={outcome.value}", flush=True)
        if outcome.value == "created":
            async for event in runtime.events():
                if event.state.terminal:
                    break
        await runtime.close()

    asyncio.run(main())
"""


async def test_dispatcher_processes_racing_for_one_name_create_it_once(tmp_path: Path) -> None:
    # Given four dispatcher processes ready to launch the same Job on one state dir
    state, runs, go = tmp_path / "state", tmp_path / "runs", tmp_path / "go"
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(RACE),
            str(state), str(runs), str(go), RECORD_RUN,
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(4)
    ]
    async with asyncio.timeout(EVENT_TIMEOUT):
        for racer in racers:
            assert (await racer.stdout.readline()).strip() == b"ready"

        # When they are released together
        go.touch()
        results = [await racer.communicate() for racer in racers]

    # Then one created it, three found it, and it ran once
    assert [r.returncode for r in racers] == [0] * 4, [err.decode() for _, err in results]
    outcomes = sorted(line.split("=", 1)[1] for out, _ in results
                      for line in out.decode().splitlines() if line.startswith("OUTCOME="))
    assert outcomes == ["already_exists"] * 3 + ["created"]
    assert len(runs.read_text().split()) == 1


# --- crash leftovers --------------------------------------------------------------------------

CRASH_AFTER_LAUNCH = """
    import asyncio, os, sys
    from dispatcher.jobs.local import LocalRuntime
    from tests.contract.conftest import make_job

    state, name, code, wait_exit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    runtime = None

    async def main():
        global runtime
        runtime = LocalRuntime(state)
        await runtime.launch(make_job(name, code, deadline=int(sys.argv[5])))
        record = (runtime.state_dir / "jobs" / name / "record.json").read_text()
        return __import__("json").loads(record)["pid"]

    pid = asyncio.run(main())
    print(pid, flush=True)
    if wait_exit:  # the Job ends while we are still its parent, and we die without noticing
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    os._exit(0)  # crash: no close(), no terminal record
"""


async def test_job_left_behind_by_a_crash_is_reported_lost_once(
    tmp_path: Path, open_runtime
) -> None:
    # Given a dispatcher that crashed after its Job had ended unobserved
    state = tmp_path / "state"
    await run_script(CRASH_AFTER_LAUNCH, str(state), "crashed-1", "pass", "1", "60")

    # When a restarted runtime looks at its state
    restarted = open_runtime(state)
    harness = await started(restarted)
    active = await restarted.active()

    # Then the Job is not active and is reported LOST, with a clear message
    assert active == []
    event = await harness.terminal("crashed-1")
    assert event.state is JobState.LOST
    assert event.reason is FailureReason.JOB_LOST
    assert "crash" in event.message
    await harness.close()

    # And a second restart does not report it again; the name stays taken
    again = open_runtime(state)
    harness2 = await started(again)
    assert await again.active() == []
    assert await again.launch(make_job("crashed-1", "pass")) is LaunchOutcome.ALREADY_EXISTS
    await harness2.close()
    assert harness2.events["crashed-1"] == []
    assert list((state / "work").iterdir()) == []


async def test_running_job_of_a_crashed_runtime_is_adopted_and_stoppable(
    tmp_path: Path, open_runtime
) -> None:
    # Given a dispatcher that crashed while its Job was running
    state = tmp_path / "state"
    _, out = await run_script(CRASH_AFTER_LAUNCH, str(state), "orphan-1",
                              "import time; time.sleep(120)", "0", "600")
    pid = int(out.split()[-1])
    assert process.is_alive(pid, None)

    # When a restarted runtime starts
    restarted = open_runtime(state, grace_seconds=2)
    harness = await started(restarted)

    # Then it knows the Job is still running, and can stop it
    assert await restarted.active() == ["orphan-1"]
    assert await restarted.launch(make_job("orphan-1", "pass")) is LaunchOutcome.ALREADY_EXISTS
    assert await restarted.cancel("orphan-1") is True
    event = await harness.terminal("orphan-1")
    assert event.state is JobState.CANCELLED
    assert not process.is_alive(pid, None)
    assert await restarted.active() == []
    await harness.close()


async def test_adopted_job_still_meets_its_deadline(tmp_path: Path, open_runtime) -> None:
    state = tmp_path / "state"
    _, out = await run_script(CRASH_AFTER_LAUNCH, str(state), "orphan-2",
                              "import time; time.sleep(120)", "0", "1")
    restarted = open_runtime(state, grace_seconds=2)
    harness = await started(restarted)
    assert await restarted.active() in ([], ["orphan-2"])  # the deadline may already be due

    event = await harness.terminal("orphan-2")

    assert event.state is JobState.FAILED
    assert event.reason is FailureReason.DEADLINE_EXCEEDED
    assert not process.is_alive(int(out.split()[-1]), None)
    await harness.close()


# --- records, TTL, closing --------------------------------------------------------------------


async def test_name_is_taken_until_the_ttl_after_finishing_passes(
    tmp_path: Path, open_runtime
) -> None:
    # Given a finished Job with ttlSecondsAfterFinished=60
    clock = Clock()
    runtime = open_runtime(tmp_path / "state", clock=clock)
    harness = await started(runtime)
    runs = tmp_path / "runs"
    job = make_job("ttl-1", RECORD_RUN, str(runs), ttl=60)
    assert await runtime.launch(job) is LaunchOutcome.CREATED
    await harness.terminal("ttl-1")

    # When it is launched again before and after the TTL
    clock.now += timedelta(seconds=59)
    before = await runtime.launch(job)
    clock.now += timedelta(seconds=2)
    after = await runtime.launch(job)

    # Then the record answers ALREADY_EXISTS until it expires; then the name is free
    assert (before, after) == (LaunchOutcome.ALREADY_EXISTS, LaunchOutcome.CREATED)
    await harness.wait_for(
        "ttl-1", lambda _: sum(e.state.terminal for e in harness.events["ttl-1"]) == 2)
    assert len(runs.read_text().split()) == 2
    await harness.close()


async def test_close_stops_running_jobs_and_reports_them_cancelled(
    tmp_path: Path, open_runtime
) -> None:
    state = tmp_path / "state"
    runtime = open_runtime(state, grace_seconds=2)
    harness = await started(runtime)
    await runtime.launch(make_job("close-1", "import time; time.sleep(120)"))
    await harness.wait_for("close-1", lambda e: e.state is JobState.RUNNING)
    pid = json.loads((state / "jobs" / "close-1" / "record.json").read_text())["pid"]

    await harness.close()

    terminal = [e for e in harness.events["close-1"] if e.state.terminal]
    assert [e.state for e in terminal] == [JobState.CANCELLED]
    assert not process.is_alive(pid, None)
    # the record remains, like a finished Job object
    again = open_runtime(state)
    assert await again.active() == []
    assert await again.launch(make_job("close-1", "pass")) is LaunchOutcome.ALREADY_EXISTS
    await again.close()


async def test_job_that_cannot_start_is_rejected_and_leaves_no_claim(
    tmp_path: Path, open_runtime
) -> None:
    runtime = open_runtime(tmp_path / "state")
    job = make_job("bad-1", "pass")
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["no-such-agent-binary"]

    with pytest.raises(PermanentError) as caught:
        await runtime.launch(job)

    assert caught.value.reason == "invalid_job"
    assert "no-such-agent-binary" in caught.value.message
    assert await runtime.launch(make_job("bad-1", "pass")) is LaunchOutcome.CREATED
    await runtime.close()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda j: j["metadata"]["labels"].pop("agentjobs.dev/investigation-id"),
        lambda j: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        .update(memory="lots"),
        lambda j: j["spec"]["template"]["spec"]["containers"][0].pop("command"),
        lambda j: j["metadata"].update(name="Not/A/Name"),
        lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "missing"}}}),
        lambda j: j["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].append(
            {"name": "x", "mountPath": "/../etc"}),
    ],
    ids=["no-investigation-label", "bad-quantity", "no-command", "bad-name",
         "missing-secret-key", "mount-escape"],
)
async def test_invalid_manifest_is_a_permanent_error(tmp_path: Path, open_runtime, mutate) -> None:
    job = make_job("inv-1", "pass", volumes=[{"name": "x", "emptyDir": {}}])
    mutate(job)
    runtime = open_runtime(tmp_path / "state")
    with pytest.raises(PermanentError) as caught:
        await runtime.launch(job, secret={"token": b"t"})
    assert caught.value.reason == "invalid_job"
    assert await runtime.active() == []
    await runtime.close()


async def test_secrets_never_reach_the_logs(tmp_path: Path, open_runtime) -> None:
    secret = b"s.NeverLogThisWrappingToken00001"
    runtime = open_runtime(tmp_path / "state")
    harness = await started(runtime)
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "v", "key": "token"}}}]
    job = make_job("log-1", "import os, sys; print(os.environ['TOKEN'], file=sys.stderr); "
                   "sys.exit(1)", env=env)
    with capture_logs() as logs:
        await runtime.launch(job, secret={"token": secret})
        event = await harness.terminal("log-1")
        await harness.close()
    assert logs, "the runtime logs its decisions"
    assert secret.decode() not in repr(logs)
    assert secret.decode() not in event.message


# --- the process runner underneath ------------------------------------------------------------


def spec_for(tmp_path: Path, code: str, **kw) -> ProcessSpec:
    return ProcessSpec(argv=[sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"},
                       cwd=tmp_path, stdout_path=tmp_path / "out", stderr_path=tmp_path / "err",
                       **kw)


async def test_runner_applies_rlimits_in_the_child(tmp_path: Path) -> None:
    code = ("import resource, json\n"
            "print(json.dumps([resource.getrlimit(getattr(resource, n))[0] for n in\n"
            "  ('RLIMIT_CORE', 'RLIMIT_NOFILE', 'RLIMIT_AS', 'RLIMIT_CPU')]))")
    proc = await process.spawn(spec_for(tmp_path, code, limits=Limits(
        memory_bytes=256 * 2**20, cpu_seconds=30, open_files=256)))
    result = await proc.wait()
    assert result.returncode == 0
    assert json.loads((tmp_path / "out").read_text()) == [0, 256, 256 * 2**20, 30]
    assert result.limiter == "rlimit"


async def test_runner_kills_the_whole_process_group_at_the_deadline(tmp_path: Path) -> None:
    # Given a process that starts a grandchild which ignores SIGTERM
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'])\n"
            "open('grandchild', 'w').write(str(p.pid))\n"
            "time.sleep(120)")
    proc = await process.spawn(spec_for(tmp_path, code, deadline=1, grace=0.5))
    result = await proc.wait()
    grandchild = int((tmp_path / "grandchild").read_text())

    assert result.timed_out and not result.oom_suspected
    assert result.signal == signal.SIGTERM
    async with asyncio.timeout(EVENT_TIMEOUT):  # SIGKILLed with its group when the leader ended
        while process.is_alive(grandchild, None):
            await asyncio.sleep(0.01)


async def test_runner_reports_a_missing_executable_as_file_not_found(tmp_path: Path) -> None:
    spec = ProcessSpec(argv=["definitely-not-installed"], env={"PATH": "/usr/bin"},
                       cwd=tmp_path, stdout_path=tmp_path / "o", stderr_path=tmp_path / "e")
    with pytest.raises(FileNotFoundError):
        await process.spawn(spec)


async def test_runner_uses_a_delegated_cgroup_when_one_is_writable(tmp_path: Path) -> None:
    # Given a directory shaped like a delegated cgroup v2 parent (the real one is not
    # writable on this host: the memory controller lives in a v1 hierarchy)
    parent = tmp_path / "cg"
    parent.mkdir()
    (parent / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (parent / "cgroup.subtree_control").write_text("cpu memory\n")
    cgroup, why = Cgroup2.detect(parent)
    assert cgroup is not None, why

    # When a process is spawned with limits
    work = tmp_path / "work"
    work.mkdir()
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    proc = await process.spawn(spec_for(work, code, limits=Limits(
        memory_bytes=128 * 2**20, cpu_cores=0.5)), cgroup=cgroup, name="cg-1")
    leaf = proc.cgroup_leaf
    result = await proc.wait()

    # Then the leaf got memory.max / cpu.max, the child joined it and no RLIMIT_AS was set
    assert leaf is not None and leaf.parent == parent
    assert (leaf / "memory.max").read_text() == str(128 * 2**20)
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "cgroup.procs").read_text() == str(proc.pid)
    assert result.limiter == "cgroup2" and result.returncode == 0
    assert int((work / "out").read_text()) == resource.RLIM_INFINITY


def test_cgroup_detection_declines_without_delegated_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    cgroup, why = Cgroup2.detect(tmp_path)
    assert cgroup is None
    assert "memory" in why
