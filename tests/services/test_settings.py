"""One settings object: environment prefix, derived paths, documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import REPO_ROOT, Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_live_under_the_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FLYWHEEL_STATE_DIR", "FLYWHEEL_REGISTRY_DIR", "FLYWHEEL_DOWNLOADS_DIR", "FLYWHEEL_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(_env_file=None)
    assert s.state_dir == REPO_ROOT / "var"
    assert s.registry == s.state_dir / "registry"
    assert s.downloads == s.state_dir / "downloads"
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.manages_kafka


def test_environment_prefix_and_derived_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("FLYWHEEL_API_KEYS", '{"k1": "alice"}')
    s = Settings(_env_file=None)
    assert s.registry == tmp_path / "registry"
    assert s.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert not s.manages_kafka
    assert s.api_keys == {"k1": "alice"}
    assert s.topic("feedback") == "flywheel.feedback"


def test_every_setting_is_documented() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_serving_limits_and_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_RELAY_IDENTITIES", '["mx1", "mx2"]')
    monkeypatch.setenv("FLYWHEEL_SPAMD_TELL_CLIENTS", '["192.0.2.0/24"]')
    monkeypatch.setenv("FLYWHEEL_SPAMD_TELL_SECRET", "a-long-shared-secret-value")
    monkeypatch.setenv("FLYWHEEL_SPAMD_ALLOW_TELL", "true")
    s = Settings(_env_file=None)
    assert s.relay_identities == ["mx1", "mx2"] and s.spamd_tell_clients == ["192.0.2.0/24"] and s.spamd_allow_tell
    assert s.spamd_tell_secret is not None and s.spamd_tell_secret.get_secret_value() == "a-long-shared-secret-value"
    assert "a-long-shared-secret-value" not in repr(s)  # never in a log line that prints the settings

    assert s.child_env()["FLYWHEEL_SPAMD_TELL_SECRET"] == "a-long-shared-secret-value"  # workers get the value


def test_unparseable_jvm_options_are_refused_by_name() -> None:
    assert Settings(_env_file=None, kafka_jvm_options="-Xss2m -Dx='a b'").streams().kafka_jvm_options
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_JVM_OPTIONS"):
        Settings(_env_file=None, kafka_jvm_options="-Dx='unclosed")


def test_serving_defaults_are_the_safe_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FLYWHEEL_SPAMD_ALLOW_TELL", "FLYWHEEL_RELAY_IDENTITIES", "FLYWHEEL_API_HOST"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(_env_file=None)
    assert s.spamd_allow_tell is False and s.relay_identities == [] and s.api_host == "127.0.0.1"
    assert s.classify_threads >= 1 and s.classify_queue >= 1 and s.spamd_max_connections >= 1
