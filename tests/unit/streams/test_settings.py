import pytest
from pydantic import ValidationError

from autopull.streams.settings import Settings

SECRET = "super-secret-value-123456789"


def test_validation_error_hides_graph_secret(monkeypatch):
    monkeypatch.setenv("AUTOPULL_GRAPH__CLIENT_SECRET", SECRET)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "tenant_id" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET[:6] not in str(caught.value)


@pytest.mark.parametrize(
    "section",
    [
        {"ews": {"password": SECRET, "service_endpoint": 5}},
        {"imap": {"master_password": SECRET}},
        {"tap": {"secret": SECRET, "enabled": "maybe"}},
        {"webhook": {"tokens": {"": SECRET}}},
    ],
)
def test_validation_errors_hide_every_secret(section):
    with pytest.raises(ValidationError) as caught:
        Settings(**section)
    assert SECRET not in str(caught.value)


def test_secrets_are_masked_in_repr():
    settings = Settings(
        graph={
            "tenant_id": "t",
            "client_id": "c",
            "client_secret": SECRET,
            "quarantine_mailbox": "q@example.com",
        }
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


GRAPH = {
    "tenant_id": "t",
    "client_id": "c",
    "client_secret": SECRET,
    "quarantine_mailbox": "Evidence@Example.com",
}


def test_policy_key_typo_rejected():
    with pytest.raises(ValidationError) as caught:
        Settings(policy={"quarantine_mailbx": "q@example.com"})
    assert "quarantine_mailbx" in str(caught.value)


def test_quarantine_mailboxes_include_platforms():
    settings = Settings(graph=GRAPH, policy={"quarantine_mailbox": "vault@example.com"})
    assert settings.quarantine_mailboxes() == frozenset(
        {"evidence@example.com", "vault@example.com"}
    )


def test_platform_quarantine_mailbox_never_planned():
    from autopull.streams.policy import decide

    settings = Settings(graph=GRAPH)
    alert = {
        "alert_id": "generic:1",
        "source": "generic",
        "message_id": "m1@example.net",
        "classification": "phish",
        "threat_status": "active",
        "event_class": "message_delivered",
        "sender": "billing@example.net",
        "recipients": ["evidence@example.com", "alice@example.com"],
    }
    decisions = {
        d.mailbox: d for d in decide(alert, alert["recipients"], settings.pull_policy())
    }
    assert decisions["evidence@example.com"].action == "skip"
    assert decisions["evidence@example.com"].rule == "exclude.quarantine-mailbox"
    assert decisions["alice@example.com"].action == "pull"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"graph:\n\t- x\n", "is not valid YAML: line 2, column 1: found character"),
        (b"a: 1\na: 2\n", "the key 'a' appears twice in one mapping (first on line 1)"),
        (
            b"policy:\n  quarantine_mailbox: a@example.com\n"
            b"  quarantine_mailbox: b@example.com\n",
            "line 3, column 3: the key 'quarantine_mailbox' appears twice",
        ),
        (b"- 1\n- 2\n", "contains a list, but it must be a mapping"),
        (b"!!python/object:os.system x\n", "could not determine a constructor"),
        (b"log_level: \xff\n", "is not UTF-8 (invalid byte at offset 11)"),
    ],
)
def test_bad_settings_file_named(tmp_path, monkeypatch, capsys, content, expected):
    from autopull.streams.cli import main

    path = tmp_path / "settings.yaml"
    path.write_bytes(content)
    monkeypatch.setenv("AUTOPULL_CONFIG", str(path))
    assert main(["incidents"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: The settings file {path} ")
    assert expected in error
    assert "Traceback" not in error


def test_invalid_setting_names_variable(monkeypatch, capsys):
    from autopull.streams.cli import main

    monkeypatch.setenv("AUTOPULL_WEB_PORT", "abc")
    monkeypatch.setenv("AUTOPULL_GRAPH__CLIENT_SECRET", SECRET)
    assert main(["incidents"]) == 2
    error = capsys.readouterr().err
    port = "AUTOPULL_WEB_PORT (file key web_port): Input should be a valid integer"
    tenant = "AUTOPULL_GRAPH__TENANT_ID (file key graph.tenant_id): Field required"
    assert port in error
    assert tenant in error
    assert "errors.pydantic.dev" not in error
    assert SECRET not in error


def test_environment_json_error_shows_example(monkeypatch, capsys):
    from autopull.streams.cli import main

    monkeypatch.setenv("AUTOPULL_ROUTING", "{bad")
    assert main(["incidents"]) == 2
    error = capsys.readouterr().err
    assert 'field "routing"' in error
    assert "take JSON in the environment" in error


def test_stall_timeout_below_pull_wait_rejected():
    with pytest.raises(ValidationError) as caught:
        Settings(stall_timeout_seconds=30, pull_max_wait_seconds=60)
    message = str(caught.value)
    assert "stall_timeout_seconds is 30.0" in message
    assert "pull_max_wait_seconds (60.0)" in message


def test_stall_timeout_above_pull_wait_accepted():
    settings = Settings(stall_timeout_seconds=61, pull_max_wait_seconds=60)
    assert settings.stall_timeout_seconds == 61


def test_cross_setting_error_names_variables(monkeypatch, capsys):
    from autopull.streams.cli import main

    monkeypatch.setenv("AUTOPULL_STALL_TIMEOUT_SECONDS", "10")
    assert main(["incidents"]) == 2
    error = capsys.readouterr().err
    named = (
        "AUTOPULL_PULL_MAX_WAIT_SECONDS, AUTOPULL_STALL_TIMEOUT_SECONDS (file keys "
        "pull_max_wait_seconds, stall_timeout_seconds): Value error, "
        "stall_timeout_seconds is 10.0"
    )
    assert named in error
    assert "AUTOPULL_ (file key )" not in error


def test_cli_reports_timeout_without_traceback(monkeypatch, capsys):
    from autopull.streams import watch
    from autopull.streams.cli import main

    def never_caught_up(self, timeout=30.0):
        raise TimeoutError(
            f"Reading the incidents topic did not finish within 0 s. Check that "
            f"the broker at {self.bootstrap} is reachable."
        )

    monkeypatch.setattr(watch.IncidentWatcher, "catch_up", never_caught_up)
    monkeypatch.setenv("AUTOPULL_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    assert main(["incidents"]) == 1
    error = capsys.readouterr().err
    *logged, last = error.splitlines()
    assert last.startswith("error: Reading the incidents topic did not finish")
    assert "127.0.0.1:9" in last
    # Only librdkafka's connection errors may come first, through the logger.
    assert [line for line in logged if " autopull.kafka " not in line] == []
    assert "Traceback" not in error


@pytest.mark.parametrize("value", ["", " ", "nohostport", "127.0.0.1:", "a:1,,b:2"])
def test_bootstrap_without_host_and_port_is_invalid(value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is not host:port"):
        Settings(kafka_bootstrap=value)


def test_bootstrap_servers_are_stripped():
    settings = Settings(kafka_bootstrap=" 127.0.0.1:9092 , [::1]:9093")
    assert settings.kafka_bootstrap == "127.0.0.1:9092,[::1]:9093"
