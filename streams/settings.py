"""One settings object for the whole worker: environment `AUTOPULL_*` and YAML.

Values come, highest first, from keyword arguments, the environment (nested fields
with `__`, e.g. `AUTOPULL_GRAPH__CLIENT_SECRET`), the YAML file named by
`AUTOPULL_CONFIG`, and the defaults below. Secrets are `SecretStr` fields and are
unwrapped only where a client library needs them.
"""

from __future__ import annotations

import os
import re
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from autopull.connectors.directory import DirectorySettings
from autopull.connectors.intel import IntelSettings
from autopull.connectors.mail.ews import EwsSettings
from autopull.connectors.mail.gmail import GmailSettings
from autopull.connectors.mail.graph import GraphSettings
from autopull.connectors.mail.imap import ImapSettings
from autopull.connectors.sources.tap_api import TapSettings
from autopull.streams.policy import PolicySettings
from autopull.streams.policy_file import default_policy, load_policy
from autopull.streams.webhook import WebhookSettings

MIB = 1024 * 1024

Role = Literal["read", "analyst", "admin"]


class ApiKey(BaseModel):
    """One REST API key, kept as the SHA-256 hex digest of the key, with its role."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key.")
    role: Role = Field(description="read, analyst or admin.")


class PolicyConfig(BaseModel):
    """The pull policy file and its parameters."""

    # A misspelt key would silently drop a protection such as the quarantine
    # mailbox, so unknown keys are errors here as everywhere else.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    file: Path | None = Field(
        default=None,
        description="YAML policy file (docs/policy.md); empty means the default "
        "policy shipped with Autopull.",
    )

    quarantine_mailbox: str = Field(
        default="",
        description="Central quarantine mailbox; it is never the target of a pull.",
    )
    excluded_mailboxes: list[str] = Field(
        default_factory=list,
        description="Mailboxes never pulled from, such as service accounts.",
    )
    hold_above_mailboxes: int = Field(
        default=50,
        ge=1,
        description="A message in more mailboxes than this waits for approval.",
    )
    search_window_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Seconds either way from the alert's delivery time in which a "
        "message without a usable Message-ID is searched, by sender and subject.",
    )

    @field_validator("quarantine_mailbox")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    def policy_settings(
        self, quarantine_mailboxes: frozenset[str] = frozenset()
    ) -> PolicySettings:
        """Load the policy file and return it with the parameters of the settings.

        `quarantine_mailboxes` are the platforms' quarantine mailboxes, skipped like
        `quarantine_mailbox`.

        Raises PolicyError, naming the line and the reason, when the file is
        invalid.
        """
        policy = default_policy() if self.file is None else load_policy(self.file)
        return PolicySettings(
            quarantine_mailbox=self.quarantine_mailbox,
            quarantine_mailboxes=quarantine_mailboxes,
            excluded_mailboxes=frozenset(self.excluded_mailboxes),
            hold_above_mailboxes=self.hold_above_mailboxes,
            rules=policy.rules,
            search_window_seconds=self.search_window_seconds,
        )


PullConfidence = Literal["definitive", "strong", "medium"]


def _default_pull_confidences() -> list[PullConfidence]:
    return ["definitive", "strong"]


class TraceConfig(BaseModel):
    """Forward tracing: which evidence pulls a copy, and where the search stops."""

    model_config = ConfigDict(hide_input_in_errors=True)

    enabled: bool = Field(
        default=True, description="Search the mailboxes of pulled copies for forwards."
    )
    pull_confidences: list[PullConfidence] = Field(
        default_factory=_default_pull_confidences,
        description="Confidences whose copies are pulled; medium ones wait for "
        "approval otherwise, and a matching subject alone is never enough.",
    )
    max_depth: int = Field(
        default=5, ge=1, description="Forward hops followed before copies wait."
    )
    max_mailboxes: int = Field(
        default=200,
        ge=1,
        description="Mailboxes of one incident before further copies wait.",
    )
    search_max_attempts: int = Field(
        default=6,
        ge=1,
        description="Failed searches of one mailbox before its copy is marked failed "
        "and waits for a retry command.",
    )
    search_retry_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds before the first new search of a mailbox whose search "
        "failed; the wait doubles after each further failure.",
    )
    search_retry_max_seconds: float = Field(
        default=900.0,
        gt=0,
        description="Maximum seconds between two searches of a mailbox whose "
        "search failed.",
    )


class Settings(BaseSettings):
    """Settings of an Autopull worker and of the command line tools."""

    # Validation errors never echo input values, because they may be secrets.
    model_config = SettingsConfigDict(
        env_prefix="AUTOPULL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092",
        description="Kafka bootstrap servers, host:port[,...].",
    )
    topic_prefix: str = Field(
        default="autopull.", description="Prefix of every topic name."
    )
    app_id: str = Field(
        default="",
        description="Faust application id (consumer group and changelog names); "
        "empty means the topic prefix without its trailing dot.",
    )
    topic_partitions: int = Field(
        default=8, ge=1, description="Partitions of each topic Autopull creates."
    )
    topic_replication: int = Field(
        default=1, ge=1, description="Replication factor of each topic."
    )
    raw_retention_days: int = Field(
        default=14,
        ge=1,
        description="Retention of alerts.raw and alerts.dead, in days.",
    )
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent schema registry URL; without it topics use the Avro "
        "single-object encoding.",
    )
    store: str = Field(
        default="rocksdb://",
        description="Faust table store: rocksdb:// in production, memory:// in tests.",
    )
    data_dir: Path = Field(
        default=Path(".cache/worker"),
        description="Folder for the worker's table stores.",
    )
    web_host: str = Field(
        default="127.0.0.1", description="Address the web server binds."
    )
    web_port: int = Field(default=6066, ge=0, le=65535, description="Web server port.")
    web_enabled: bool = Field(
        default=True, description="Serve the REST API and metrics."
    )
    api_ack_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Maximum wait for Kafka to acknowledge a REST API command "
        "before the API replies 503, in seconds.",
    )
    ingest_max_bytes: int = Field(
        default=MIB, ge=1024, description="Largest alert body accepted, in bytes."
    )
    incident_max_bytes: int = Field(
        default=16 * MIB,
        ge=MIB,
        description="Largest incident record, in bytes. The REST API (413) and the "
        "CLI reject a command that would make an incident larger before sending it. "
        "Any other such event goes to alerts.dead, with both sizes in its reason, and "
        "the incident stays as it was. An incident takes roughly 300 bytes per "
        "mailbox (an estimate), so the default holds about 50,000 mailboxes.",
    )
    pull_batch_size: int = Field(
        default=64, ge=1, description="Pull commands processed together by one agent."
    )
    pull_batch_seconds: float = Field(
        default=0.5, gt=0, description="Maximum wait to fill a pull batch, in seconds."
    )
    pull_max_attempts: int = Field(
        default=5, ge=1, description="Attempts of a throttled pull before it is parked."
    )
    pull_attempt_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Maximum time one platform attempt of a pull may take, in seconds; "
        "a slower attempt counts as a transient failure and is retried.",
    )
    pull_max_wait_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Maximum in-process wait for a throttled pull, in seconds; longer "
        "waits park the command on its topic.",
    )
    incident_window_hours: float = Field(
        default=24.0,
        gt=0,
        description="Size of the hopping campaign and message windows, in hours: "
        "alerts of one campaign or message within this time join one incident.",
    )
    incident_window_step_hours: float = Field(
        default=1.0,
        gt=0,
        description="Step of the hopping campaign and message windows, in hours. "
        "The window size must be a whole multiple of it.",
    )
    recipient_window_hours: float = Field(
        default=24.0,
        gt=0,
        description="Size of the tumbling windows that count each mailbox's "
        "messages, clicks and campaigns, in hours.",
    )
    session_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Kafka consumer session timeout, in seconds."
    )
    stall_timeout_seconds: float = Field(
        default=90.0,
        gt=0,
        description="Seconds in which a worker reads no record while its input "
        "partitions have records to read, after which it seeks them back to their "
        "committed offsets; after a second such period /livez returns 503. Must "
        "exceed pull_max_wait_seconds.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level of log lines written."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as plain text or as JSON objects."
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="The pull policy."
    )
    graph: GraphSettings | None = Field(
        default=None, description="Microsoft 365 tenant reached through Graph."
    )
    ews: EwsSettings | None = Field(
        default=None, description="Exchange organisation reached through EWS."
    )
    imap: ImapSettings | None = Field(
        default=None, description="IMAP server (Domino, Dovecot) for its mailboxes."
    )
    gmail: GmailSettings | None = Field(
        default=None,
        description="Google Workspace domain reached through the Gmail API.",
    )
    routing: dict[str, str] = Field(
        default_factory=dict,
        description="Platform of each mailbox or domain (graph, ews, gmail, imap); "
        "an exact address wins over its domain. An address that matches no entry is "
        "external: its pull fails with an error naming this setting, and forward "
        "tracing only reports forwards to it. Left "
        "empty with one platform configured, every address goes to that platform, "
        "and the worker logs a warning at start.",
    )
    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict,
        description="REST API keys by name; the name is recorded as the actor.",
    )
    tap: TapSettings = Field(
        default_factory=TapSettings, description="The TAP SIEM API poller."
    )
    webhook: WebhookSettings = Field(
        default_factory=WebhookSettings, description="The alert ingest webhook."
    )
    intel: IntelSettings = Field(
        default_factory=IntelSettings, description="Threat-intelligence feeds."
    )
    directory: DirectorySettings | None = Field(
        default=None, description="LDAP directory for recipients and lists."
    )
    trace: TraceConfig = Field(
        default_factory=TraceConfig, description="Forward tracing of pulled copies."
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",")]
        for server in servers:
            host, colon, port = server.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ValueError(
                    f"{server!r} is not host:port; give the bootstrap servers as "
                    "host:port, several separated by commas, such as 127.0.0.1:9092"
                )
        return ",".join(servers)

    @model_validator(mode="after")
    def _check_windows(self) -> Settings:
        size = self.incident_window_hours * 3600
        step = self.incident_window_step_hours * 3600
        if step > size or size % step or step % 1:
            raise ValueError(
                f"incident_window_step_hours is {self.incident_window_step_hours}, "
                f"but it must be a whole number of seconds that divides "
                f"incident_window_hours ({self.incident_window_hours}) evenly; for "
                "example 24 hours in steps of 1 hour."
            )
        return self

    @model_validator(mode="after")
    def _check_stall_timeout(self) -> Settings:
        # A pull that waits out throttling reads no record meanwhile, and that wait
        # alone must not look like a stalled consumer.
        if self.stall_timeout_seconds <= self.pull_max_wait_seconds:
            raise ValueError(
                f"stall_timeout_seconds is {self.stall_timeout_seconds}, but it must "
                f"exceed pull_max_wait_seconds ({self.pull_max_wait_seconds}); raise "
                "it or lower pull_max_wait_seconds."
            )
        return self

    def quarantine_mailboxes(self) -> frozenset[str]:
        """Return every quarantine mailbox: the policy's and each platform's.

        Their copies are evidence, so no pull may target them, whether or not the
        policy names them.
        """
        mailboxes = {self.policy.quarantine_mailbox}
        for platform in (self.graph, self.ews, self.gmail, self.imap):
            if platform is not None:
                mailboxes.add(platform.quarantine_mailbox.strip().lower())
        return frozenset(mailboxes - {""})

    def pull_policy(self) -> PolicySettings:
        """Return the loaded policy, with every quarantine mailbox excluded.

        Raises PolicyError, naming the line and the reason, when the policy file
        is invalid.
        """
        return self.policy.policy_settings(self.quarantine_mailboxes())

    @property
    def max_record_bytes(self) -> int:
        """Return the largest record the worker writes to or reads from a topic.

        Raw alerts and dead letters carry whole input bodies with framing, and
        incidents may reach `incident_max_bytes`; 1 MiB is left for the envelope.
        """
        return max(self.ingest_max_bytes * 4, self.incident_max_bytes) + MIB

    @property
    def compacted_segment_bytes(self) -> int:
        """Return the segment size of compacted topics and changelogs.

        Kafka compacts only closed segments, and its default segment of 1 GiB let
        an incident rewritten for every outcome keep gigabytes of old versions.
        A segment still has room for four of the largest records.
        """
        return max(128 * MIB, 4 * self.max_record_bytes)

    @property
    def faust_id(self) -> str:
        """Return the Faust application id."""
        return self.app_id or self.topic_prefix.rstrip(".") or "autopull"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("AUTOPULL_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(
                    f"The settings file {config_file!r} named by AUTOPULL_CONFIG was "
                    "not found; fix the path or unset the variable."
                )
            sources.append(SettingsFileSource(settings_cls, config_file))
        return tuple(sources)


class SettingsFileError(ValueError):
    """A settings file that cannot be read as a YAML mapping of settings."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key given twice in one mapping.

    Plain `yaml.safe_load` keeps the last of two equal keys, so a second
    `quarantine_mailbox:` further down a file would silently win.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} appears twice in one mapping (first on line "
                    f"{first})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class SettingsFileSource(YamlConfigSettingsSource):
    """The YAML settings file, read strictly: UTF-8, one mapping, unique keys."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        data = file_path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SettingsFileError(
                f"The settings file {file_path} is not UTF-8 (invalid byte at offset "
                f"{error.start}); save it as UTF-8."
            ) from error
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as error:
            raise SettingsFileError(
                f"The settings file {file_path} is not valid YAML: "
                f"{_yaml_problem(error)}. Fix that line; docs/configuration.md "
                "shows the format."
            ) from error
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise SettingsFileError(
                f"The settings file {file_path} contains a "
                f"{type(loaded).__name__}, but it must be a mapping of setting names "
                "to values, such as "
                "'kafka_bootstrap: 127.0.0.1:9092'."
            )
        return loaded


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _named_settings(message: str) -> str:
    """Return the variables and file keys of the top-level settings in `message`."""
    names = [
        name
        for name in Settings.model_fields
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)
    ]
    if not names:
        return "settings"
    variables = ", ".join(f"AUTOPULL_{name.upper()}" for name in names)
    return f"{variables} (file keys {', '.join(names)})"


def describe_settings_error(error: ValidationError) -> str:
    """Describe each invalid setting by its environment variable and file key.

    Input values are left out, because they may be secrets.
    """
    count = error.error_count()
    lines = [f"{count} invalid setting{'s' if count != 1 else ''}:"]
    for problem in error.errors(include_url=False, include_input=False):
        path = [str(part) for part in problem["loc"]]
        if not path:
            # A check across settings has no location, so name the settings that
            # its message mentions.
            lines.append(f"  {_named_settings(problem['msg'])}: {problem['msg']}")
            continue
        variable = "AUTOPULL_" + "__".join(path).upper()
        key = ".".join(path)
        lines.append(f"  {variable} (file key {key}): {problem['msg']}")
    lines.append(
        "Fix these in the environment or in the file named by AUTOPULL_CONFIG; "
        "docs/configuration.md lists every setting."
    )
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, the YAML file and `overrides`."""
    return Settings(**overrides)
