"""Closing the loop on a real broker: machine verdicts from a worker run with the review
stage on, human review decisions on the review topic (the worker answers each with a
superseding verdict), ``modworker labels export``, ``modworker calibrate --labels``, and
the candidate policy judging the same inputs again in the worker's shadow.

The loopback Mistral server scores ``selfharm`` as each text's marker says (0.0 to 0.975);
the reviewers find self-harm from 0.3 on, while the built-in policy sends it to review
only from 0.5. So the candidate must move the threshold to 0.3, and in the shadow the
inputs scored 0.3 to 0.5 must go to review where the live policy allowed them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from schemas import ReviewDecision
from tests.conftest import worker_env
from tests.kafka_support import create_topics, produce, read_all, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend
from worker.cli import main
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.pipeline.shadow import create_shadow

N = 40
REVIEWED_FROM = 0.3


def score_of(i: int) -> float:
    return i / N


async def run_worker_until(monkeypatch, env: dict[str, str], done) -> None:
    """The worker as ``modworker run`` builds it (with the shadow the settings ask for)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    policy = Policy.load(None)
    worker = ModerationWorker(
        settings, backend=create_backend(settings), policy=policy, shadow=create_shadow(settings, policy)
    )
    task = asyncio.create_task(worker.run())
    try:
        await done()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def test_reviews_become_labels_a_candidate_policy_and_a_shadow_that_decides_with_it(
    broker, topics, mistral, api_key, monkeypatch, tmp_path: Path, capsys
):
    bootstrap = broker.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    reviews_topic, shadow_topic, replay_verdicts = (
        f"moderation.reviews.{tag}",
        f"moderation.shadow-verdicts.{tag}",
        f"moderation.verdicts.replay.{tag}",
    )
    await create_topics(bootstrap, [reviews_topic, shadow_topic, replay_verdicts], partitions=2)
    events = [{"id": f"c-{i}", "text": f"post {i} <<selfharm:{score_of(i)}>>", "tenant": "acme"} for i in range(N)]
    await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in events])

    # 1. Machine verdicts, with their text, from a worker with the review stage on.
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_INCLUDE_TEXT="true",
        MODWORKER_REVIEWS__ENABLED="true",
        MODWORKER_REVIEWS__TOPIC=reviews_topic,
    )
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

    def review(event_id: str, verdict_id: str, harmful: bool, review_id: str, at: datetime) -> tuple[bytes, bytes]:
        decision = ReviewDecision(
            review_id=review_id,
            verdict_id=verdict_id,
            event_id=event_id,
            reviewer_id="reviewer-7",
            action="review" if harmful else "allow",
            categories=["selfharm"] if harmful else [],
            decided_at=at,
        )
        return event_id.encode(), decision.model_dump_json().encode()

    verdicts: dict[str, dict] = {}

    async def verdicts_then_reviews() -> None:
        for record in await wait_for_count(bootstrap, topics.verdict, N):
            verdict = json.loads(record.value)
            verdicts[verdict["event_id"]] = verdict
        assert len(verdicts) == N and verdicts["c-39"]["text"] == events[39]["text"]
        # 2. Human decisions: one per verdict, an older contrary one for c-35 produced after
        # the newer (the newer must win), one naming a verdict that is not on the topic.
        decisions = [
            review(f"c-{i}", verdicts[f"c-{i}"]["verdict_id"], score_of(i) >= REVIEWED_FROM, f"r-{i}", now)
            for i in range(N)
        ]
        decisions.append(review("c-35", verdicts["c-35"]["verdict_id"], False, "r-35-old", now - timedelta(hours=1)))
        decisions.append(review("c-gone", "no-such-verdict", True, "r-gone", now))
        await produce(bootstrap, reviews_topic, decisions)
        # The worker answers each decision with a superseding verdict on the same topic.
        await wait_for_count(bootstrap, topics.verdict, 2 * N)

    await run_worker_until(monkeypatch, env, verdicts_then_reviews)
    on_topic = [json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, idle_s=1)]
    human = [v for v in on_topic if v.get("decided_by") == "human"]
    assert len(human) >= N and all(v["supersedes"] for v in human)

    # 3. modworker labels export
    labels = tmp_path / "labels.jsonl"
    argv = ["labels", "export", "--out", str(labels), "-b", bootstrap]  # MODWORKER_REVIEWS__TOPIC names it
    assert await asyncio.to_thread(main, argv) == 0
    err = capsys.readouterr().err
    assert f"wrote {N} lines" in err
    assert "joined 40, without verdict 1, without text 0, superseded 1, duplicates 0" in err
    assert f"human verdicts {len(human)}," in err  # the worker's superseding verdicts: never the machine side
    lines = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    by_event = {line["event_id"]: line for line in lines}
    assert by_event["c-35"]["labels"] == {"review": ["selfharm"]}  # the newest decision
    assert by_event["c-35"]["human_action"] == "review" and by_event["c-35"]["machine_action"] == "review"
    assert by_event["c-12"]["machine_action"] == "allow" and by_event["c-12"]["text"] == events[12]["text"]
    assert by_event["c-12"]["scores"]["selfharm"] == 0.3

    # 4. modworker calibrate --labels
    candidate_file, report_file = tmp_path / "candidate.yaml", tmp_path / "calibration.json"
    argv = ["calibrate", "--labels", str(labels), "--write-policy", str(candidate_file), "--report", str(report_file)]
    assert await asyncio.to_thread(main, argv) == 0
    summary = capsys.readouterr().out
    assert "human workload (sent to review) 50.0% -> 70.0%" in summary
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["proposed"] == {"selfharm": 0.3}
    assert report["categories"]["selfharm"]["change"]["recall"] > 0
    candidate = Policy.load(candidate_file)
    assert candidate.version == report["candidate_policy_version"] != Policy.load(None).version
    assert yaml.safe_load(candidate_file.read_text(encoding="utf-8"))["categories"]["selfharm"]["threshold"] == 0.3

    # 5. The candidate in the worker's shadow, over the same inputs (a new group reads them again).
    shadow_env = {
        **env,
        "MODWORKER_GROUP_ID": f"shadow-{tag}",
        "MODWORKER_VERDICT_TOPIC": replay_verdicts,
        "MODWORKER_SHADOW__POLICY_FILE": str(candidate_file),
        "MODWORKER_SHADOW__SAMPLE": "1.0",
        "MODWORKER_SHADOW__TOPIC": shadow_topic,
    }
    await run_worker_until(monkeypatch, shadow_env, lambda: wait_for_count(bootstrap, shadow_topic, N))
    shadows = {s["event_id"]: s for s in (json.loads(r.value) for r in await read_all(bootstrap, shadow_topic))}
    assert len(shadows) == N
    assert {s["policy_version"] for s in shadows.values()} == {candidate.version}
    disagree = sorted(e for e, s in shadows.items() if not s["agree"])
    assert disagree == sorted(f"c-{i}" for i in range(N) if REVIEWED_FROM <= score_of(i) < 0.5)
    assert {(shadows[e]["live_action"], shadows[e]["action"]) for e in disagree} == {("allow", "review")}
