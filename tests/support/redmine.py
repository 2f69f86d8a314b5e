"""A real Redmine (Debian's ``redmine`` package, on SQLite) for the ticketing connector's tests.

Facts this module relies on, measured on Debian 12 with redmine 5.0.4-5+deb12u1:

* Install: ``.ci/run`` preseeds debconf (``redmine/instances/default/dbconfig-install true``,
  ``database-type sqlite3``) and runs ``apt-get install --no-install-recommends redmine
  redmine-sqlite``: ~20-40 s, ~150 MB, no Apache, no service started, no PostgreSQL/MySQL touched.
* Private root. Redmine writes into its root (``tmp/``, ``log/``, ``files/``,
  ``public/plugin_assets``, ``db/schema.rb``, the bundler ``Gemfile.lock``) and Debian's
  multi-tenancy puts those under ``Rails.root/instances/$REDMINE_INSTANCE`` (``instances`` is a
  symlink to /var/lib/redmine). So every server (and :func:`prepare`) gets a private root in its
  own temp dir: real copies of ``app``, ``lib``, ``bin``, ``config`` (~3 MB; symlinks there make
  Ruby load some files twice, under two paths), symlinks to ``public``, ``config/locales`` and
  ``db/migrate``, a private ``Gemfile.lock``, and a ``Gemfile`` whose database-adapter glob
  (hard-coded to /usr/share/redmine) points at the private root, so the default instance's
  /etc/redmine config is never read. Tenant ``agentjobs``: its own ``database.yml`` (the SQLite
  file), ``secret_key.txt``, ``tmp``, ``log``, ``files``. /usr/share/redmine, /etc/redmine and
  /var/lib/redmine are only read. It runs as the current user (root in CI) - nothing needs
  www-data once the writable dirs are private.
* Serving: ``rails server`` finds no server gem; ``rackup -s webrick -E deployment`` with
  ``RUBYOPT=-rwebrick`` works (``-E deployment``: access log, no Rack::Lint). Cold start ~3 s,
  RSS ~190 MB, REST calls 15-130 ms. SIGTERM stops it.
* Golden image (:func:`prepare`, ~9 s): ``bin/rake db:migrate``, ``REDMINE_LANG=en bin/rake
  redmine:load_default_data`` (two processes: one keeps stale column info, and the latter exits
  0 even when it fails), then one ``bin/rails runner`` (:data:`SETUP_RB`): REST API on, a private
  project ``agentjobs`` (issue tracking, all trackers), the issue custom fields of
  :data:`CUSTOM_FIELDS` (for all projects and trackers, visible), user ``operator`` (Manager on
  the project), and ``meta.json`` (ids, API keys). Cached in ``$AGENTJOBS_REDMINE_CACHE``
  (default ``~/.cache/agentjobs-redmine``) under the package version + a hash of the recipe;
  each server starts from a copy of it.
* REST facts (``X-Redmine-API-Key``): a wrong key on the private project is 401 (on a public
  one it would be anonymous). ``PUT /issues/N.json`` answers 204 even when Redmine drops a
  field: a status the user's workflow does not allow (or an unknown id) is silently ignored
  (:meth:`RedmineServer.update_issue` checks). ``GET /issues.json`` lists open issues only unless
  ``status_id=*``. ``cf_<id>=v`` filters exactly (case-sensitive on SQLite) but only for
  ``is_filter`` fields - an unknown/unfilterable ``cf_<id>`` is ignored and *every* issue comes
  back - and ``v`` is parsed: ``a|b`` is OR, a leading ``!``, ``~``, ``^``, ``$``, ``*``, ``!*``
  is an operator (not, contains, starts, ends, any, none). ``f[]=cf_1&op[cf_1]==&v[cf_1][]=v``
  takes ``v`` literally and applies no status filter (closed issues included). Journals
  (``include=journals``) carry ``notes``, ``private_notes`` and ``details``:
  ``{"property": "attr", "name": "status_id", "old_value": "1", "new_value": "5"}``,
  ``{"property": "cf", "name": "<field id>", ...}``; a private note's journal is left out for
  users without ``view_private_notes`` (Manager has it, Reporter not). ``closed_on`` is set on
  closing and kept when the issue is reopened.

``python -m tests.support.redmine prepare`` builds the golden image (what CI runs up front);
``python -m tests.support.redmine serve`` runs one until Ctrl-C. Stdlib only, no pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .buildcache import flock, tail
from .services import free_port

REDMINE_HOME = Path("/usr/share/redmine")
PACKAGE = "redmine"
INSTANCE = "agentjobs"
PROJECT = "agentjobs"
OPERATOR_PASSWORD = "operator-password"  # also the admin's is the default "admin"
KEY_FIELD = "agentjobs key"
CUSTOM_FIELDS = (  # name, Redmine field format, is_filter, searchable
    (KEY_FIELD, "string", True, True),
    ("Root cause", "text", False, False),
    ("Actions taken", "text", False, False),
)
# copied (Ruby must see one path per source file), the rest of the root is symlinked or private
COPIED = ("app", "lib", "bin", "config.ru", "Rakefile")
PREPARE_TIMEOUT = 600.0

SETUP_RB = r"""
require 'json'
Setting.rest_api_enabled = '1'
Setting.default_projects_public = '0'
trackers = Tracker.sorted.to_a
admin = User.find_by_login!('admin')
admin.must_change_passwd = false
admin.save!
project = Project.find_by_identifier(ENV['AJ_PROJECT']) || Project.new
project.name = ENV['AJ_PROJECT']
project.identifier = ENV['AJ_PROJECT']
project.is_public = false
project.enabled_module_names = ['issue_tracking']
project.trackers = trackers
project.save!
fields = {}
JSON.parse(ENV['AJ_FIELDS']).each do |name, format, filter, searchable|
  cf = IssueCustomField.find_by_name(name) || IssueCustomField.new(name: name)
  cf.field_format = format
  cf.is_filter = filter
  cf.searchable = searchable
  cf.is_for_all = true
  cf.visible = true
  cf.trackers = trackers
  cf.save!
  fields[name] = cf.id
end
operator = User.find_by_login('operator') || User.new
operator.login = 'operator'
operator.firstname = 'On-call'
operator.lastname = 'Operator'
operator.mail = 'operator@example.invalid'
operator.password = operator.password_confirmation = ENV['AJ_OPERATOR_PASSWORD']
operator.must_change_passwd = false
operator.status = User::STATUS_ACTIVE
operator.save!
manager = Role.find_by_name!('Manager')
Member.find_by(user_id: operator.id, project_id: project.id) ||
  Member.create!(principal: operator, project: project, roles: [manager])
meta = {
  'redmine_version' => Redmine::VERSION.to_s,
  'admin_login' => 'admin', 'admin_password' => 'admin', 'admin_id' => admin.id,
  'admin_api_key' => admin.api_key,
  'operator_login' => 'operator', 'operator_password' => ENV['AJ_OPERATOR_PASSWORD'],
  'operator_id' => operator.id, 'operator_api_key' => operator.api_key,
  'project_id' => project.id, 'project_identifier' => project.identifier,
  'custom_fields' => fields,
  'statuses' => IssueStatus.sorted.map { |s| [s.name, s.id] }.to_h,
  'closed_statuses' => IssueStatus.sorted.select(&:is_closed).map(&:name),
  'default_status' => trackers.first.default_status.name,
  'priorities' => IssuePriority.active.sorted.map { |p| [p.name, p.id] }.to_h,
  'default_priority' => IssuePriority.default&.name,
  'trackers' => trackers.map { |t| [t.name, t.id] }.to_h,
  'default_tracker' => trackers.first.name,
  'roles' => Role.givable.sorted.map { |r| [r.name, r.id] }.to_h,
}
File.write(ENV['AJ_META_OUT'], JSON.pretty_generate(meta))
"""


class RedmineUnavailable(Exception):
    """Redmine is not installed here or cannot run (tests skip with ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RedmineError(RuntimeError):
    """A REST call answered something other than what the helper expected."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# --------------------------------------------------------------------------- #
# the golden image
# --------------------------------------------------------------------------- #


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTJOBS_REDMINE_CACHE") or Path.home() / ".cache" / "agentjobs-redmine")


def package_version() -> str:
    """The installed ``redmine`` package's version; :class:`RedmineUnavailable` if none."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", PACKAGE],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedmineUnavailable(f"cannot ask dpkg about {PACKAGE}: {exc}") from exc
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or not status.endswith(" installed") or not version:
        raise RedmineUnavailable(f"the Debian package {PACKAGE} is not installed "
                                 "(.ci/run installs it: redmine redmine-sqlite, preseeded for SQLite)")
    for need in ("config.ru", "Gemfile", "app", "lib", "config", "db/migrate"):
        if not (REDMINE_HOME / need).exists():
            raise RedmineUnavailable(f"{REDMINE_HOME / need} is missing (broken {PACKAGE} install?)")
    for tool in ("ruby", "rackup"):
        if shutil.which(tool) is None:
            raise RedmineUnavailable(f"{tool} not found on PATH (ruby, ruby-rack: {PACKAGE} depends on them)")
    return version


def _recipe_digest() -> str:
    recipe = json.dumps([SETUP_RB, CUSTOM_FIELDS, COPIED, PROJECT, INSTANCE, OPERATOR_PASSWORD])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def golden_dir(version: str | None = None) -> Path:
    return cache_dir() / f"{version or package_version()}-{_recipe_digest()}"


def build_root(root: Path, database: Path) -> Path:
    """A private Redmine root at ``root`` whose tenant uses the SQLite file ``database``."""
    root.mkdir(parents=True)
    for name in COPIED:
        src = REDMINE_HOME / name
        if src.is_dir():
            shutil.copytree(src, root / name, symlinks=True)
        else:
            shutil.copy2(src, root / name)
    (root / "config").mkdir()
    for src in (REDMINE_HOME / "config").iterdir():
        if src.name == "database.yml":  # the default instance's: never read
            continue
        if src.name == "locales":
            (root / "config" / "locales").symlink_to(src)
        elif src.is_dir():
            shutil.copytree(src, root / "config" / src.name, symlinks=True)
        else:
            shutil.copy2(src, root / "config" / src.name)
    (root / "public").symlink_to(REDMINE_HOME / "public")
    (root / "db").mkdir()
    (root / "db" / "migrate").symlink_to(REDMINE_HOME / "db" / "migrate")
    gemfile = (REDMINE_HOME / "Gemfile").read_text()
    (root / "Gemfile").write_text(gemfile.replace(f"{REDMINE_HOME}/{{config,instances", f"{root}/{{config,instances"))
    lock = (REDMINE_HOME / "Gemfile.lock").resolve()
    if lock.is_file():
        shutil.copyfile(lock, root / "Gemfile.lock")
    tenant = root / "instances" / INSTANCE
    for sub in ("config", "tmp/cache", "log", "files", "public/plugin_assets"):
        (tenant / sub).mkdir(parents=True)
    (tenant / "config" / "database.yml").write_text(json.dumps({"production": {
        "adapter": "sqlite3", "database": str(database), "pool": 10, "timeout": 10000, "encoding": "utf8"}}))
    (tenant / "config" / "secret_key.txt").write_text(secrets.token_hex(64))
    return root


def _env(root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    drop = ("RAILS_", "RACK_", "BUNDLE", "GEM_", "RUBY", "REDMINE_", "X_DEBIAN_SITEID", "DATABASE_URL",
            "SECRET_KEY_BASE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(RAILS_ENV="production", REDMINE_INSTANCE=INSTANCE, BUNDLE_GEMFILE=str(root / "Gemfile"),
               LANG="C.UTF-8", LC_ALL="C.UTF-8")
    env.update(extra or {})
    return env


def _run(cmd: Sequence[str], root: Path, log: Path, what: str, env: Mapping[str, str] | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            rc: int | str = subprocess.run(cmd, cwd=root, env=_env(root, env), stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT,
                                           timeout=PREPARE_TIMEOUT, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {PREPARE_TIMEOUT:.0f} s"
        except OSError as exc:
            raise RedmineUnavailable(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if rc != 0:
        raise RedmineUnavailable(f"{what} failed (exit {rc}); log {log}:\n{tail(log)}")


def prepare() -> Path:
    """The golden image's directory (``redmine.sqlite3``, ``meta.json``, ``prepare.log``), built
    once per package version and recipe. :class:`RedmineUnavailable` if it cannot be had."""
    version = package_version()
    golden = golden_dir(version)
    if (golden / "meta.json").is_file():
        return golden
    with flock(cache_dir() / ".lock"):
        if (golden / "meta.json").is_file():
            return golden
        work = Path(tempfile.mkdtemp(prefix="building-", dir=cache_dir()))
        try:
            database, meta, log = work / "redmine.sqlite3", work / "meta.json", work / "prepare.log"
            root = build_root(work / "root", database)
            ruby = shutil.which("ruby") or "ruby"
            # two processes: one would keep the pre-migration column info ("unknown attribute")
            _run([ruby, "bin/rake", "db:migrate"], root, log, "rake db:migrate")
            # (exits 0 even when it fails: SETUP_RB's find_by_name! calls notice)
            _run([ruby, "bin/rake", "redmine:load_default_data"], root, log,
                 "rake redmine:load_default_data", {"REDMINE_LANG": "en"})
            (work / "setup.rb").write_text(SETUP_RB)
            _run([ruby, "bin/rails", "runner", str(work / "setup.rb")], root, log, "rails runner setup.rb",
                 {"AJ_PROJECT": PROJECT, "AJ_FIELDS": json.dumps([list(f) for f in CUSTOM_FIELDS]),
                  "AJ_OPERATOR_PASSWORD": OPERATOR_PASSWORD, "AJ_META_OUT": str(meta)})
            data = json.loads(meta.read_text())
            data["package_version"] = version
            meta.write_text(json.dumps(data, indent=2) + "\n")
            shutil.rmtree(root)
            (work / "setup.rb").unlink()
            work.chmod(0o755)
            shutil.rmtree(golden, ignore_errors=True)  # a leftover without meta.json
            work.rename(golden)  # meta.json last in, so its presence means complete
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return golden


# --------------------------------------------------------------------------- #
# the server
# --------------------------------------------------------------------------- #

_RUNNING: set[RedmineServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Own session (Ctrl-C reaches our teardown first): an interrupted run would leave it behind.
    for server in list(_RUNNING):
        server.close()


class RedmineServer:
    """One private Redmine on 127.0.0.1, started from a copy of the golden image.

    ``stop()`` then ``start()`` brings back the same database on the same port (an outage);
    ``close()`` stops it and removes its temp dir. The helpers act as ``operator`` unless given
    ``api_key`` (``server.api_key`` is the admin's).
    """

    def __init__(self, golden: Path | None = None, *, port: int | None = None) -> None:
        self.golden = golden or prepare()
        self.meta: dict[str, Any] = json.loads((self.golden / "meta.json").read_text())
        self.api_key: str = self.meta["admin_api_key"]
        self.operator_api_key: str = self.meta["operator_api_key"]
        self.project: str = self.meta["project_identifier"]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("not started")
        return self.workdir / "root"

    @property
    def database(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("not started")
        return self.workdir / "redmine.sqlite3"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("not started")
        return self.workdir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart after :meth:`stop`) and wait until REST answers."""
        if self.running:
            return
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="agentjobs-redmine-"))
            shutil.copyfile(self.golden / "redmine.sqlite3", self.database)
            build_root(self.root, self.database)
        argv = [shutil.which("rackup") or "rackup", "-s", "webrick", "-E", "deployment",
                "-o", "127.0.0.1", "-p", str(self.port), "config.ru"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(argv, cwd=self.root, env=_env(self.root, {"RUBYOPT": "-rwebrick"}),
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redmine exited early ({self._proc.returncode}):\n{self.logtail()}")
                with contextlib.suppress(OSError, ValueError):
                    if self.request("GET", f"/projects/{self.project}.json", api_key=self.api_key,
                                    timeout=5)[0] == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redmine at {self.url} not ready after {timeout:.0f} s:\n"
                                       f"{self.logtail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; keeps the database for :meth:`start`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self.workdir is None:
            _RUNNING.discard(self)

    def close(self) -> None:
        self.stop()
        _RUNNING.discard(self)
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def logtail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines) if self.workdir is not None else "(not started)"

    def __enter__(self) -> RedmineServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- REST ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, api_key: str | None = None,
                params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
                timeout: float = 15.0) -> tuple[int, Any]:
        """``(status, parsed JSON or None)``; never raises for an HTTP status. ``api_key=""``
        sends no key (anonymous)."""
        url = self.url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = {"Accept": "application/json"}
        key = self.operator_api_key if api_key is None else api_key
        if key:
            headers["X-Redmine-API-Key"] = key
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw.strip() else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def _ok(self, expect: int, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, answer = self.request(method, path, body, **kw)
        if status != expect:
            raise RedmineError(f"{method} {path}: {status} (expected {expect}): {answer!r}", status, answer)
        return answer

    def _id(self, table: str, name: str) -> int:
        ids = self.meta[table]
        if name not in ids:
            raise ValueError(f"no {table[:-1]} {name!r} in this Redmine: {sorted(ids)}")
        return int(ids[name])

    def _fields(self, *, status: str | None = None, priority: str | None = None, tracker: str | None = None,
                custom_fields: Mapping[str, str | None] | None = None, **fields: Any) -> dict[str, Any]:
        issue = dict(fields)
        if status is not None:
            issue["status_id"] = self._id("statuses", status)
        if priority is not None:
            issue["priority_id"] = self._id("priorities", priority)
        if tracker is not None:
            issue["tracker_id"] = self._id("trackers", tracker)
        if custom_fields:
            issue["custom_fields"] = [{"id": self._id("custom_fields", name), "value": value}
                                      for name, value in custom_fields.items()]
        return issue

    def create_issue(self, subject: str, *, key: str | None = None, api_key: str | None = None,
                     **fields: Any) -> dict[str, Any]:
        """POST an issue to the project (``key`` → the ``agentjobs key`` field; ``status``,
        ``priority``, ``tracker`` by name, ``custom_fields`` by name); returns the issue."""
        custom = dict(fields.pop("custom_fields", None) or {})
        if key is not None:
            custom[KEY_FIELD] = key
        issue = self._fields(project_id=self.project, subject=subject, custom_fields=custom, **fields)
        return self._ok(201, "POST", "/issues.json", {"issue": issue}, api_key=api_key)["issue"]

    def get_issue(self, issue_id: int, include_journals: bool = True, *,
                  api_key: str | None = None) -> dict[str, Any]:
        params = {"include": "journals"} if include_journals else None
        return self._ok(200, "GET", f"/issues/{issue_id}.json", params=params, api_key=api_key)["issue"]

    def update_issue(self, issue_id: int, *, api_key: str | None = None, **fields: Any) -> None:
        """PUT ``fields``: ``status``/``priority``/``tracker`` by name, ``custom_fields`` as
        ``{name: value}``, ``notes``, ``private_notes=True``, anything else as Redmine names it.
        Raises when Redmine silently ignored a status change (workflow)."""
        self._ok(204, "PUT", f"/issues/{issue_id}.json", {"issue": self._fields(**fields)}, api_key=api_key)
        if (wanted := fields.get("status")) is not None:
            now = self.get_issue(issue_id, include_journals=False, api_key=api_key)["status"]["name"]
            if now != wanted:
                raise RedmineError(f"issue {issue_id}: Redmine ignored the change to {wanted!r} "
                                   f"(still {now!r}: not allowed by the user's workflow)")

    def find_issues(self, key: str, *, api_key: str | None = None) -> list[dict[str, Any]]:
        """Issues whose ``agentjobs key`` is exactly ``key``, closed ones included, oldest first.
        The literal filter form (``cf_<id>=<key>`` would parse ``|``, ``!``, ``~``... in the key),
        re-checked (Redmine ignores a filter it cannot apply)."""
        cf = f"cf_{self._id('custom_fields', KEY_FIELD)}"
        params = [("project_id", self.project), ("f[]", "status_id"), ("op[status_id]", "*"),
                  ("f[]", cf), (f"op[{cf}]", "="), (f"v[{cf}][]", key), ("sort", "id"), ("limit", 100)]
        issues = self._ok(200, "GET", "/issues.json", params=params, api_key=api_key)["issues"]
        return [issue for issue in issues if custom_field(issue, KEY_FIELD) == key]


def custom_field(issue: Mapping[str, Any], name: str) -> Any:
    """The value of the custom field ``name`` in an issue as REST returns it (None if absent)."""
    for cf in issue.get("custom_fields", ()):
        if cf.get("name") == name:
            return cf.get("value")
    return None


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "prepare"
    if command not in ("prepare", "serve"):
        print("usage: python -m tests.support.redmine [prepare|serve]", file=sys.stderr)
        return 2
    began = time.monotonic()
    try:
        golden = prepare()
    except RedmineUnavailable as exc:
        print(f"redmine unavailable: {exc.reason}", file=sys.stderr)
        return 3
    print(f"redmine golden image: {golden} ({time.monotonic() - began:.1f} s)")
    if command == "serve":
        with RedmineServer(golden) as server:
            print(f"{server.url}  admin/admin key {server.api_key}  "
                  f"operator/{OPERATOR_PASSWORD} key {server.operator_api_key}  (Ctrl-C stops)")
            with contextlib.suppress(KeyboardInterrupt):
                while server.running:
                    time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
