"""``modworker topics create`` / ``check`` against the session broker: what is stated is
what the broker has, and every difference of an existing topic is named."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.test_cli import clean_env, modworker
from tests.kafka_support import TopicSet, create_topics

STATED = ("--partitions", "3", "--replication-factor", "1", "--min-insync-replicas", "1", "--retention-ms", "3600000")


async def described(bootstrap: str, names: list[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """``{topic: (partitions, configs)}`` as the broker reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if t["topic"] in names}
        answers = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    configs = {
        name: {entry[0]: entry[1] for entry in entries}
        for answer in answers
        for _code, _message, _type, name, entries in answer.resources
    }
    return {name: (partitions[name], configs[name]) for name in names}


async def test_topics_create_states_every_topic_and_then_finds_them_as_stated(broker):
    bootstrap = broker.bootstrap_servers
    names = TopicSet.unique()
    env = clean_env(**names.env())
    everything = [*names.inputs, *names.outputs, names.conversation_state]

    missing = modworker("topics", "check", "-b", bootstrap, *STATED, env=env)
    assert missing.returncode == 1
    assert sorted(line.split()[1] for line in missing.stdout.decode().splitlines()) == sorted(everything)
    assert all(line.startswith("missing ") for line in missing.stdout.decode().splitlines())

    created = modworker("topics", "create", "-b", bootstrap, *STATED, env=env)
    out = created.stdout.decode()
    assert created.returncode == 0, created.stderr.decode() + out
    assert sorted(line.split()[1] for line in out.splitlines()) == sorted(everything)
    assert all(line.startswith("created ") for line in out.splitlines()), out

    found = await described(bootstrap, everything)
    for name in everything:
        partitions, configs = found[name]
        assert partitions == 3, name
        assert configs["min.insync.replicas"] == "1", name
    for name in [*names.inputs, *names.outputs]:
        assert (found[name][1]["cleanup.policy"], found[name][1]["retention.ms"]) == ("delete", "3600000"), name
    for name in names.outputs:
        assert found[name][1]["max.message.bytes"] == "1048588", name  # MODWORKER_MAX_OUTPUT_BYTES
    assert found[names.conversation_state][1]["cleanup.policy"] == "compact"

    again = modworker("topics", "create", "-b", bootstrap, *STATED, env=env)
    assert again.returncode == 0, again.stdout.decode()
    assert all(line.startswith("ok ") for line in again.stdout.decode().splitlines())


async def test_an_existing_topic_that_differs_is_named_with_each_difference(broker):
    bootstrap = broker.bootstrap_servers
    names = TopicSet.unique()
    env = clean_env(**names.env())
    await create_topics(bootstrap, [names.verdict], partitions=2)  # the broker's defaults otherwise

    result = modworker(
        "topics", "create", "-b", bootstrap, "--partitions", "3", "--replication-factor", "2",
        "--min-insync-replicas", "2", "--retention-ms", "3600000", env=env,
    )  # fmt: skip
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, out + err
    (line,) = [line for line in out.splitlines() if names.verdict in line]
    assert line.startswith(f"differs {names.verdict} (output): 2 partitions (stated 3); ")
    assert "replication factor 1 (stated 2)" in line
    assert "min.insync.replicas=1 (stated 2)" in line
    assert "retention.ms=604800000 (stated 3600000)" in line
    assert "topics: 6 of 6 topics not as stated: " in err and names.verdict in err
    # the other topics could not be created with replication 2 on this one broker: named too
    assert all(line.startswith("failed ") for line in out.splitlines() if names.verdict not in line), out
    partitions, _configs = (await described(bootstrap, [names.verdict]))[names.verdict]
    assert partitions == 2  # an existing topic is never altered


def test_min_insync_replicas_above_the_replication_factor_is_refused():
    result = modworker(
        "topics", "create", "-b", "127.0.0.1:1", "--replication-factor", "2", "--min-insync-replicas", "3",
        env=clean_env(),
    )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "--min-insync-replicas 3 exceeds --replication-factor 2" in err
