"""Settings: defaults that work locally, TOML, env overrides, and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.redaction import MASK, redact
from dispatcher.plumbing.settings import Settings, SettingsError, load_settings
from schemas import Phase


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentjobs.toml"
    path.write_text(text)
    return path


def test_defaults_point_at_a_developer_machine() -> None:
    settings = load_settings()
    assert settings.amqp.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.runtime.kind == "local"
    assert settings.trust.initial_phase is Phase.SHADOW
    assert "default" in settings.classes


def test_file_then_environment_with_double_underscore_nesting(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [amqp]
        prefetch = 50
        [classes.database]
        memory = "1Gi"
        [classes.network]
        deadline = 300
        """,
    )
    settings = load_settings(
        path,
        {
            "AGENTJOBS_AMQP__PREFETCH": "75",
            "AGENTJOBS_CLASSES__DATABASE__DEADLINE": "600",
            "AGENTJOBS_ADMISSION__CANCEL_ON_RESOLVE": "false",
            "UNRELATED": "x",
        },
    )
    assert settings.amqp.prefetch == 75  # env wins over file
    assert settings.classes["database"].memory == "1Gi"  # file
    assert settings.classes["database"].deadline == 600  # env, nested two levels
    assert settings.classes["network"].deadline == 300  # new class from file
    assert "default" in settings.classes  # defaults kept
    assert settings.admission.cancel_on_resolve is False


def test_config_file_can_come_from_agentjobs_config(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[k8s]\nnamespace = 'runs'\n")
    assert load_settings(None, {"AGENTJOBS_CONFIG": str(path)}).k8s.namespace == "runs"


def test_json_values_for_lists_and_tables_from_the_environment() -> None:
    settings = load_settings(None, {"AGENTJOBS_CLASSES__HUGE": '{"memory": "8Gi"}'})
    assert settings.classes["huge"].memory == "8Gi"


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().amqp.prefetch = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "env", "origin", "key", "problem"),
    [
        ('[amqp]\nprefetch = "lots"\n', {}, "FILE", "amqp.prefetch", "expected int, got str"),
        ("[amqp]\nprefech = 5\n", {}, "FILE", "amqp.prefech", "unknown key"),
        ("[nonsense]\nx = 1\n", {}, "FILE", "nonsense", "unknown key"),
        ("[amqp]\nprefetch = 0\n", {}, "FILE", "amqp.prefetch", "expected int >= 1"),
        ('[runtime]\nkind = "docker"\n', {}, "FILE", "runtime.kind", "'docker' is not one of local, kubernetes"),
        ('[trust]\ninitial_phase = "yolo"\n', {}, "FILE", "trust.initial_phase", "'yolo' is not one of shadow"),
        ('[classes.db]\nmemory = 5\n', {}, "FILE", "classes.*.memory", "expected str, got int"),
        ("", {"AGENTJOBS_AMQP__PREFETCH": "many"}, "AGENTJOBS_AMQP__PREFETCH", "amqp.prefetch", "expected int"),
        ("", {"AGENTJOBS_VAULT__ADRR": "x"}, "AGENTJOBS_VAULT__ADRR", "vault.adrr", "unknown key"),
        (
            "[trust]\npromote_threshold = 0.4\ndemote_threshold = 0.3\n",
            {},
            "FILE",
            "trust",
            "hysteresis",
        ),
    ],
)
def test_errors_name_origin_key_and_problem(tmp_path, toml, env, origin, key, problem) -> None:
    path = _toml(tmp_path, toml)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env)
    err = caught.value
    assert err.origin == (str(path) if origin == "FILE" else origin)
    assert err.key == key
    assert problem in err.problem


def test_missing_and_broken_files_are_errors_not_defaults(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="file not found"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(SettingsError, match="invalid TOML"):
        load_settings(_toml(tmp_path, "[amqp\n"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "bin.toml")


def test_redacted_settings_show_no_secret() -> None:
    settings = load_settings(
        None,
        {
            "AGENTJOBS_AMQP__URL": "amqp://agent:s3cr3t-pw@rabbit:5672/prod",
            "AGENTJOBS_VAULT__TOKEN": "s.AbCdEfGhIjKlMnOpQrSt",
            "AGENTJOBS_BRIDGE__BASIC_PASSWORD": "hunter2",
            "AGENTJOBS_LLM__API_KEY": "sk-live-123",
        },
    )
    shown = repr(redact(settings))
    for secret in ("s3cr3t-pw", "AbCdEfGhIjKlMnOpQrSt", "hunter2", "sk-live-123"):
        assert secret not in shown
    assert "amqp://agent:***@rabbit:5672/prod" in shown
    assert redact(settings)["vault"]["token"] == MASK
    assert redact(settings)["vault"]["wrap_ttl"] == 60  # not a secret despite its name
