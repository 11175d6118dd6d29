"""Configuration: the documented environment names, the YAML file, and the error lines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.config import ENV_PREFIX, ConfigError, Settings, load_settings

SECRET = "sk-test-0123456789abcdefSECRET"
UNPREFIXED = ("KAFKA_BOOTSTRAP_SERVERS", "MISTRAL_API_KEY", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Each test starts from an environment with none of the worker's variables."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) or name.upper() in UNPREFIXED:
            monkeypatch.delenv(name)


@pytest.fixture
def minimal_env(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    monkeypatch.setenv("MISTRAL_API_KEY", SECRET)


def lookup(settings: Settings, path: str):
    value = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def test_defaults_are_the_documented_ones(minimal_env):
    settings = load_settings()
    assert settings.content_topic == "ugc.content"
    assert settings.conversation_topic == "ugc.conversations"
    assert settings.verdict_topic == "moderation.verdicts"
    assert settings.violation_topic == "moderation.violations"
    assert settings.dead_letter_topic == "moderation.dead-letter"
    assert settings.backend == "mistral"
    assert settings.mistral.base_url == "https://api.mistral.ai"
    assert settings.mistral.model == "mistral-moderation-latest"
    assert settings.kafka.enable_idempotence is True
    assert settings.policy_file is None


@pytest.mark.parametrize(
    ("env_name", "raw", "path", "expected"),
    [
        ("MODWORKER_GROUP_ID", "moderators-eu", "group_id", "moderators-eu"),
        ("MODWORKER_CONTENT_TOPIC", "in.content", "content_topic", "in.content"),
        ("MODWORKER_CONVERSATION_TOPIC", "in.chats", "conversation_topic", "in.chats"),
        ("MODWORKER_VERDICT_TOPIC", "out.verdicts", "verdict_topic", "out.verdicts"),
        ("MODWORKER_VIOLATION_TOPIC", "out.violations", "violation_topic", "out.violations"),
        ("MODWORKER_DEAD_LETTER_TOPIC", "out.dlq", "dead_letter_topic", "out.dlq"),
        ("MODWORKER_BACKEND", "local", "backend", "local"),
        ("MISTRAL_API_KEY", "another-key", "mistral.api_key", "another-key"),
        ("MODWORKER_MISTRAL__BASE_URL", "http://127.0.0.1:8080", "mistral.base_url", "http://127.0.0.1:8080"),
        ("MODWORKER_MISTRAL__MODEL", "mistral-moderation-2411", "mistral.model", "mistral-moderation-2411"),
        ("MODWORKER_BATCH__MAX_SIZE", "64", "batch.max_size", 64),
        ("MODWORKER_BATCH__MAX_WAIT_MS", "5", "batch.max_wait_ms", 5),
        ("MODWORKER_KAFKA__ENABLE_IDEMPOTENCE", "false", "kafka.enable_idempotence", False),
        ("MODWORKER_KAFKA__BOOTSTRAP_SERVERS", "a:1,b:2", "kafka.bootstrap_servers", "a:1,b:2"),
        ("KAFKA_BOOTSTRAP_SERVERS", "c:3", "kafka.bootstrap_servers", "c:3"),
        ("MODWORKER_KAFKA__MAX_PARTITION_FETCH_BYTES", "1048576", "kafka.max_partition_fetch_bytes", 1_048_576),
        ("MODWORKER_KAFKA__FETCH_MAX_BYTES", "8388608", "kafka.fetch_max_bytes", 8_388_608),
    ],
)
def test_each_documented_environment_name_sets_its_field(monkeypatch, minimal_env, env_name, raw, path, expected):
    before = lookup(load_settings(), path)
    assert before != expected  # the variable, not a default, must produce the value
    monkeypatch.setenv(env_name, raw)
    assert lookup(load_settings(), path) == expected


def test_policy_file_is_read_from_the_environment(monkeypatch, minimal_env, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {threshold: 0.5, action: flag}\n")
    monkeypatch.setenv("MODWORKER_POLICY_FILE", str(policy))
    assert load_settings().policy_file == policy


def test_a_policy_file_that_does_not_exist_is_named(monkeypatch, minimal_env, tmp_path):
    monkeypatch.setenv("MODWORKER_POLICY_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="MODWORKER_POLICY_FILE"):
        load_settings()


def test_the_prefixed_bootstrap_name_wins_over_the_unprefixed_one(monkeypatch, minimal_env):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "plain:9092")
    monkeypatch.setenv("MODWORKER_KAFKA__BOOTSTRAP_SERVERS", "prefixed:9092")
    assert load_settings().kafka.bootstrap_servers == "prefixed:9092"


def test_the_prefixed_api_key_wins_over_the_unprefixed_one(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_MISTRAL__API_KEY", "prefixed-key")
    assert load_settings().mistral.api_key.get_secret_value() == "prefixed-key"


# --- the YAML file ---------------------------------------------------------------------------

YAML = """\
group_id: from-yaml
content_topic: yaml.content
kafka:
  bootstrap_servers: yaml-broker:9092
  client_id: yaml-client
mistral:
  api_key: yaml-key
  model: yaml-model
batch:
  max_size: 7
  max_wait_ms: 70
"""


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "worker.yaml"
    path.write_text(YAML)
    return path


def test_a_yaml_file_supplies_settings(config_file):
    settings = load_settings(config_file=config_file)
    assert settings.group_id == "from-yaml"
    assert settings.content_topic == "yaml.content"
    assert settings.kafka.bootstrap_servers == "yaml-broker:9092"
    assert settings.mistral.api_key.get_secret_value() == "yaml-key"
    assert (settings.batch.max_size, settings.batch.max_wait_ms) == (7, 70)


def test_the_environment_wins_over_the_yaml_file_key_by_key(monkeypatch, config_file):
    monkeypatch.setenv("MODWORKER_GROUP_ID", "from-env")
    monkeypatch.setenv("MODWORKER_BATCH__MAX_SIZE", "9")
    monkeypatch.setenv("MODWORKER_KAFKA__ENABLE_IDEMPOTENCE", "false")
    settings = load_settings(config_file=config_file)
    assert settings.group_id == "from-env"
    assert settings.batch.max_size == 9
    assert settings.kafka.enable_idempotence is False
    # the rest of the same sections still comes from the file
    assert settings.batch.max_wait_ms == 70
    assert settings.kafka.client_id == "yaml-client"
    assert settings.content_topic == "yaml.content"


def test_the_unprefixed_environment_names_win_over_the_yaml_file(monkeypatch, config_file):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env-broker:9092")
    monkeypatch.setenv("MISTRAL_API_KEY", "env-key")
    settings = load_settings(config_file=config_file)
    assert settings.kafka.bootstrap_servers == "env-broker:9092"
    assert settings.mistral.api_key.get_secret_value() == "env-key"
    assert settings.mistral.model == "yaml-model"


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--config") as caught:
        load_settings(config_file=tmp_path / "nope.yaml")
    assert "nope.yaml" in str(caught.value)


def test_a_bad_value_in_the_yaml_file_names_its_environment_variable(tmp_path, minimal_env):
    path = tmp_path / "worker.yaml"
    path.write_text("batch:\n  max_size: lots\n")
    with pytest.raises(ConfigError, match="MODWORKER_BATCH__MAX_SIZE"):
        load_settings(config_file=path)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_name", "raw"),
    [
        ("MODWORKER_BATCH__MAX_SIZE", "lots"),
        ("MODWORKER_BATCH__MAX_SIZE", "0"),
        ("MODWORKER_BATCH__MAX_WAIT_MS", "-1"),
        ("MODWORKER_KAFKA__ENABLE_IDEMPOTENCE", "maybe"),
        ("MODWORKER_BACKEND", "watson"),
        ("MODWORKER_KAFKA__SECURITY_PROTOCOL", "TLS"),
        ("MODWORKER_KAFKA__MAX_PARTITION_FETCH_BYTES", "1000"),
        ("MODWORKER_KAFKA__FETCH_MAX_BYTES", "1MiB"),
    ],
)
def test_a_bad_value_gives_one_line_naming_the_variable(monkeypatch, minimal_env, env_name, raw):
    monkeypatch.setenv(env_name, raw)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert env_name in message
    assert "Traceback" not in message


def test_a_missing_mistral_api_key_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "MISTRAL_API_KEY" in message
    assert "export MISTRAL_API_KEY" in message
    assert "\n" not in message


def test_commands_that_call_no_backend_run_without_a_key(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    assert load_settings(require_backend=False).mistral.api_key is None


def test_a_missing_bootstrap_server_is_named(monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", SECRET)
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        load_settings()


def test_sasl_without_credentials_names_the_missing_settings(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    with pytest.raises(ConfigError, match="MODWORKER_KAFKA__SASL_USERNAME"):
        load_settings()


# --- secrets -----------------------------------------------------------------------------


def test_the_api_key_never_appears_when_settings_are_printed(minimal_env, monkeypatch):
    monkeypatch.setenv("MODWORKER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_USERNAME", "user")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_PASSWORD", SECRET + "-password")
    settings = load_settings()
    assert settings.mistral.api_key.get_secret_value() == SECRET
    for shown in (str(settings), repr(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert SECRET not in shown


def test_the_api_key_never_appears_in_a_config_error(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_BATCH__MAX_SIZE", "lots")
    monkeypatch.setenv("MODWORKER_OPENAI__API_KEY", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "yaml_text",
    [
        f"mistral: {SECRET}\n",  # the key written where its section belongs
        f"openai: {SECRET}\n",
        f"mistral:\n  api_key: [{SECRET}]\n",
        f"kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: [{SECRET}]\n",
    ],
)
def test_a_misplaced_secret_in_the_yaml_file_is_not_echoed(tmp_path, monkeypatch, yaml_text):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    path = tmp_path / "worker.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path, require_backend=False)
    assert SECRET not in str(caught.value)
    assert ENV_PREFIX in str(caught.value)


def test_scoring_settings_keep_their_old_http_names_for_one_release(monkeypatch):
    monkeypatch.setenv("MODWORKER_HTTP__FAIL_POLICY", "review")
    monkeypatch.setenv("MODWORKER_HTTP__MAX_CONCURRENCY", "7")
    settings = Settings()
    assert settings.scoring.fail_policy == "review" and settings.scoring.max_concurrency == 7
    assert len(settings.deprecations) == 2
    assert all("deprecated" in note and "MODWORKER_SCORING__" in note for note in settings.deprecations)


def test_the_new_scoring_name_wins_over_its_deprecated_alias(monkeypatch):
    monkeypatch.setenv("MODWORKER_HTTP__FAIL_POLICY", "review")
    monkeypatch.setenv("MODWORKER_SCORING__FAIL_POLICY", "allow")
    settings = Settings()
    assert settings.scoring.fail_policy == "allow"
    assert settings.deprecations == [
        "MODWORKER_HTTP__FAIL_POLICY is deprecated and ignored: MODWORKER_SCORING__FAIL_POLICY is set"
    ]


# -- routing: cascade, fallback, shadow --------------------------------------------------


def test_the_cascade_stage_names_are_read_from_the_contract_variables(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_BACKEND", "cascade")
    monkeypatch.setenv("MODWORKER_CASCADE__FIRST", "local")
    monkeypatch.setenv("MODWORKER_CASCADE__THEN", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    settings = load_settings()
    assert (settings.backend, settings.cascade.first, settings.cascade.then) == ("cascade", "local", "openai")
    assert settings.backends_in_use() == ["local", "openai"]


def test_a_cascade_needs_the_key_of_its_remote_stage(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    monkeypatch.setenv("MODWORKER_BACKEND", "cascade")
    with pytest.raises(ConfigError, match="MISTRAL_API_KEY is not set"):
        load_settings()


def test_the_fallback_policy_needs_a_fallback_backend_other_than_the_primary(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_SCORING__FAIL_POLICY", "fallback")
    with pytest.raises(ConfigError, match="MODWORKER_FALLBACK__BACKEND is required"):
        load_settings()
    monkeypatch.setenv("MODWORKER_FALLBACK__BACKEND", "mistral")
    with pytest.raises(ConfigError, match="must differ from MODWORKER_BACKEND"):
        load_settings()
    monkeypatch.setenv("MODWORKER_FALLBACK__BACKEND", "local")
    assert load_settings().backends_in_use() == ["mistral", "local"]


def test_the_shadow_is_off_unless_sampled_and_a_candidate_is_named(monkeypatch, minimal_env, tmp_path):
    assert not load_settings().shadow.enabled
    monkeypatch.setenv("MODWORKER_SHADOW__SAMPLE", "0.1")
    assert not load_settings().shadow.enabled
    monkeypatch.setenv("MODWORKER_SHADOW__POLICY_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="MODWORKER_SHADOW__POLICY_FILE: no such file"):
        load_settings()
    (tmp_path / "missing.yaml").write_text("default: {threshold: 0.4, action: flag}\n")
    assert load_settings().shadow.enabled
    monkeypatch.setenv("MODWORKER_SHADOW__SAMPLE", "1.5")
    with pytest.raises(ConfigError, match="MODWORKER_SHADOW__SAMPLE"):
        load_settings()


# --- misspelled settings and malformed files -------------------------------------------------


def test_a_misspelled_variable_is_a_warning_naming_the_closest_setting_not_an_error(monkeypatch, minimal_env):
    # An older image started with a newer ConfigMap (a rollback) sees variables it does not
    # know: it must start, and say which ones it ignores.
    monkeypatch.setenv("MODWORKER_BATCH__MAXSIZE", "64")
    settings = load_settings()
    assert settings.batch.max_size != 64
    assert settings.unknown_variables == [
        "MODWORKER_BATCH__MAXSIZE is not a setting and is ignored (did you mean MODWORKER_BATCH__MAX_SIZE?); "
        "rename or unset it"
    ]


def test_a_variable_far_from_every_setting_is_named_without_a_guess(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_QQQQ", "1")
    assert load_settings().unknown_variables == ["MODWORKER_QQQQ is not a setting and is ignored; rename or unset it"]


def test_known_variables_give_no_warning(monkeypatch, minimal_env):
    monkeypatch.setenv("MODWORKER_BATCH__MAX_SIZE", "64")
    assert load_settings().unknown_variables == []


def test_every_variable_a_setting_reads_is_accepted(monkeypatch, minimal_env):
    from worker.config import settings_reference, unknown_environment_names

    documented = {env.split(" (or ")[-1].rstrip(")"): "x" for env, _, _ in settings_reference()}
    assert len(documented) > 50
    also_read = {
        "MODWORKER_HTTP__FAIL_POLICY": "x",  # a deprecated alias, still read for one release
        "MODWORKER_LOCAL__LABELS__toxic": "offensive",  # a key of a mapping setting
        "MODWORKER_BATCH": '{"max_size": 3}',  # a whole section as JSON
        "modworker_batch__max_size": "3",  # names are read without regard to case
        "MODWORKER_KAFKA_JARS": "/jars",  # read by the test broker, not a setting
        "KAFKA_BOOTSTRAP_SERVERS": "b:1",
        "OTHER_TOOL_SETTING": "x",
    }
    assert unknown_environment_names({**documented, **also_read}) == []
    monkeypatch.setenv("modworker_batch__max_size", "3")
    assert load_settings().batch.max_size == 3


def test_an_unknown_key_in_the_yaml_file_is_named_with_its_line_and_the_closest_key(tmp_path, minimal_env):
    path = tmp_path / "worker.yaml"
    path.write_text("group_id: g\nbatch: {max_sise: 64}\nkafka:\n  client_id: c\n  sesion_timeout_ms: 6000\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"configuration error: --config {path}: unknown setting batch.max_sise at line 2, column 9 "
        "(did you mean batch.max_size?); fix or remove the key",
        f"configuration error: --config {path}: unknown setting kafka.sesion_timeout_ms at line 5, column 3 "
        "(did you mean kafka.session_timeout_ms?); fix or remove the key",
    ]


def test_a_malformed_yaml_file_is_one_line_with_its_line_and_column(tmp_path, minimal_env):
    path = tmp_path / "worker.yaml"
    path.write_text("batch:\n  max_size: 64\n   max_wait_ms: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"configuration error: --config {path}: not valid YAML: ")
    assert "at line 3, column 15" in message and message.endswith("; fix it there")


def test_a_yaml_file_whose_top_level_is_no_mapping_is_one_line(tmp_path, minimal_env):
    path = tmp_path / "worker.yaml"
    path.write_text("- kafka\n- batch\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_settings(config_file=path)


# --- modworker config / config check ---------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from worker import cli

    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_prints_the_effective_settings_with_secrets_masked(monkeypatch, capsys, config_file):
    monkeypatch.setenv("MODWORKER_BATCH__MAX_SIZE", "9")
    monkeypatch.setenv("MODWORKER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_USERNAME", "user")
    monkeypatch.setenv("MODWORKER_KAFKA__SASL_PASSWORD", SECRET + "-password")
    monkeypatch.setenv("MISTRAL_API_KEY", SECRET)
    code, out, err = run_cli(capsys, "config", "--config", str(config_file), "-b", "cli-broker:9092")
    assert code == 0, err
    shown = dict(line.split("=", 1) for line in out.splitlines())
    assert SECRET not in out + err
    assert shown["MODWORKER_MISTRAL__API_KEY"] == "********"  # set, and masked
    assert shown["MODWORKER_KAFKA__SASL_PASSWORD"] == "********"
    assert shown["MODWORKER_OPENAI__API_KEY"] == ""  # unset
    assert shown["MODWORKER_BATCH__MAX_SIZE"] == "9"  # the environment over the file
    assert shown["MODWORKER_BATCH__MAX_WAIT_MS"] == "70"  # the file
    assert shown["MODWORKER_KAFKA__BOOTSTRAP_SERVERS"] == "cli-broker:9092"  # -b over everything
    assert shown["MODWORKER_VERDICT_TOPIC"] == "moderation.verdicts"  # a default
    from worker.config import settings_reference

    assert len(shown) == len(settings_reference())

    code, changed, _ = run_cli(capsys, "config", "--changed", "--config", str(config_file))
    assert code == 0
    names = [line.split("=", 1)[0] for line in changed.splitlines()]
    assert "MODWORKER_BATCH__MAX_WAIT_MS" in names and "MODWORKER_VERDICT_TOPIC" not in names


def test_config_check_passes_a_complete_configuration(minimal_env, capsys):
    code, out, err = run_cli(capsys, "config", "check")
    assert (code, err) == (0, "")
    assert out.startswith("configuration ok: backend mistral, policy built-in default (version ")
    assert "Kafka broker:9092" in out
    for args in (("config", "-b", "cli:1", "check"), ("config", "check", "-b", "cli:1")):  # -b before or after
        code, out, _ = run_cli(capsys, *args)
        assert code == 0 and "Kafka cli:1" in out, args


def test_config_check_names_every_problem_on_its_own_line(monkeypatch, capsys, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("categories:\n  sexual: {threshold: 1.5, action: block}\n")
    shadow = tmp_path / "shadow.yaml"
    shadow.write_text("categories: [\n")
    monkeypatch.setenv("MODWORKER_POLICY_FILE", str(policy))
    monkeypatch.setenv("MODWORKER_SHADOW__POLICY_FILE", str(shadow))
    code, out, err = run_cli(capsys, "config", "check")
    lines = err.splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 4, lines
    assert all(line.startswith("modworker: configuration error: ") for line in lines)
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in lines[0]
    assert "MISTRAL_API_KEY is not set" in lines[1]
    assert lines[2].startswith(f"modworker: configuration error: MODWORKER_POLICY_FILE: policy file {policy}: ")
    assert "categories.sexual.threshold: must be a number from 0 to 1 (got 1.5)" in lines[2]
    assert lines[3].startswith("modworker: configuration error: MODWORKER_SHADOW__POLICY_FILE: ")


def test_config_check_reports_an_invalid_value_and_warns_of_an_unknown_variable(monkeypatch, minimal_env, capsys):
    monkeypatch.setenv("MODWORKER_BATCH__MAXSIZE", "64")
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 0
    assert err.splitlines() == [
        "modworker: warning: MODWORKER_BATCH__MAXSIZE is not a setting and is ignored "
        "(did you mean MODWORKER_BATCH__MAX_SIZE?); rename or unset it"
    ]
    monkeypatch.setenv("MODWORKER_BATCH__MAX_SIZE", "lots")
    code, out, err = run_cli(capsys, "config", "check")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "MODWORKER_BATCH__MAX_SIZE" in err


def test_exactly_once_is_off_by_default_and_refuses_a_non_idempotent_producer(monkeypatch, minimal_env):
    assert load_settings().delivery == "at_least_once"
    monkeypatch.setenv("MODWORKER_DELIVERY", "exactly_once")
    monkeypatch.setenv("MODWORKER_EXACTLY_ONCE__TRANSACTIONAL_ID_PREFIX", "prod-")
    settings = load_settings()
    assert (settings.delivery, settings.exactly_once.transactional_id_prefix) == ("exactly_once", "prod-")
    monkeypatch.setenv("MODWORKER_KAFKA__ENABLE_IDEMPOTENCE", "false")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert "MODWORKER_DELIVERY=exactly_once" in message and "MODWORKER_KAFKA__ENABLE_IDEMPOTENCE" in message
    monkeypatch.setenv("MODWORKER_DELIVERY", "exactly-once")
    with pytest.raises(ConfigError, match="MODWORKER_DELIVERY: "):
        load_settings()


def test_one_poison_attempt_is_refused_as_an_outage_could_dead_letter_healthy_inputs():
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka={"bootstrap_servers": "broker:9092"}, scoring={"poison_attempts": 1}, require_backend=False)
    message = str(caught.value)
    assert "MODWORKER_SCORING__POISON_ATTEMPTS" in message and "greater than or equal to 2" in message
    settings = load_settings(
        kafka={"bootstrap_servers": "broker:9092"}, scoring={"poison_attempts": 2}, require_backend=False
    )
    assert settings.scoring.poison_attempts == 2


async def test_the_fetch_bounds_default_to_a_fraction_of_the_in_flight_byte_cap_and_reach_the_consumer(minimal_env):
    from worker.pipeline.source import Source

    settings = load_settings()
    kafka = settings.kafka
    # docs/benchmarks.md (memory): aiokafka's 1 MiB per partition and 50 MiB per response were
    # the largest holder while draining; read records count against the byte cap only once polled.
    assert (kafka.max_partition_fetch_bytes, kafka.fetch_max_bytes) == (128 * 1024, 512 * 1024)
    assert kafka.fetch_max_bytes * 64 <= settings.max_in_flight_bytes

    async def nothing(tps: object) -> None:
        return None

    source = Source(settings, on_assign=nothing, on_revoke=nothing, rebalance_timeout_ms=10_000)
    consumer = source._consumer  # what aiokafka builds its fetcher from, at start
    assert (consumer._max_partition_fetch_bytes, consumer._fetch_max_bytes) == (128 * 1024, 512 * 1024)
