"""Statements stage: a DSA statement of reasons for each verdict that restricts content.

``StatementBuilder.statement(job, verdict)`` turns a verdict into a ``StatementOfReasons``
(``schemas.statements``) by the policy's ``dsa`` section (``worker.pipeline.policy.DsaSection``):

- a verdict *restricts* when its action is a key of ``dsa.restrictions`` (by default only
  ``block``) and it has violations; a degraded verdict (decided by the fail policy, without
  scores) names no category and gets no statement;
- the first violation (the most severe, then the highest score) gives ``category``,
  ``decision_ground`` and its legal or contractual reference and explanation; the other
  violations' statement categories are ``category_addition``, and ``category_specification``
  is every violation's keywords;
- ``decision_visibility`` and the other decision fields come from the action's restriction;
- ``territorial_scope`` is the tenant's; ``content_type`` is text; ``content_date`` is the
  event's ``created_at``, else the input record's timestamp; ``application_date`` the day
  of the verdict;
- ``automated_detection`` is ``Yes`` and ``automated_decision`` ``AUTOMATED_DECISION_FULLY``:
  the machine decided alone;
- ``puid`` is the ``verdict_id``; ``decision_facts`` lists the violated categories with
  their scores and thresholds, the model and the policy version.

A human review decision's superseding verdict (``review_statement``) gets the same statement
but for: ``automated_decision`` ``AUTOMATED_DECISION_PARTIALLY`` when the reviewer confirmed
the machine verdict's action, else ``AUTOMATED_DECISION_NOT_AUTOMATED`` (a person decided);
``automated_detection`` stays ``Yes`` (the machine flagged it for review); ``decision_facts``
says a person reviewed it; ``content_date`` is given by the caller; ``puid`` is the new
verdict's id.

Contract: ``statement`` and ``review_statement`` validate the result against the model and raises
``StatementRejected`` (a one-line reason) when it does not hold; it raises nothing else.
``dsa_problem(policy)`` says in one line what the policy lacks for ``MODWORKER_DSA__ENABLED``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from pydantic import ValidationError

from schemas.statements import StatementOfReasons
from worker.pipeline.policy import DsaMapping, DsaSection, Policy
from worker.pipeline.types import Job
from worker.pipeline.verdict_data import Verdict

_MAX_FACTS = 5_000


class StatementRejected(Exception):
    """The statement a verdict would get does not hold to the schema; ``str(err)`` says why."""


def dsa_problem(policy: Policy, origin: str = "the policy") -> str | None:
    """What ``policy`` lacks to write a statement for every verdict that restricts, in one
    line; None when nothing is missing."""
    section = policy.dsa
    if section is None:
        return (
            f"{origin} has no 'dsa' section: add one mapping each category that restricts to a statement category "
            "and ground, with the territorial scope (see docs/dsa.md), or set MODWORKER_DSA__ENABLED=false"
        )
    restricting = set(section.restrictions)
    if section.default is not None:
        return None
    missing = [
        name
        for name in policy.category_descriptions()
        if name not in section.categories and restricting & policy.possible_actions(name)
    ]
    if restricting & policy.possible_actions(None):
        missing.append("every category the policy does not name (its default rule restricts)")
    if missing:
        return f"{origin}: dsa.categories lacks {', '.join(missing)}: map each, or give dsa.default"
    return None


class StatementBuilder:
    """Builds statements of reasons for one worker: a fixed ``dsa`` section."""

    def __init__(self, section: DsaSection) -> None:
        self._section = section

    def restricts(self, verdict: Verdict) -> bool:
        """True when ``verdict`` gets a statement: a restricting action with violations."""
        return verdict.action in self._section.restrictions and bool(verdict.violations) and not verdict.degraded

    def statement(self, job: Job, verdict: Verdict) -> StatementOfReasons:
        """The statement of reasons for a restricting ``verdict`` of ``job``; raises
        ``StatementRejected`` when it would not be valid."""
        return self._statement(
            verdict, _content_date(job, verdict), "AUTOMATED_DECISION_FULLY", decision_facts(verdict)
        )

    def review_statement(self, verdict: Verdict, *, content_date: date, confirmed: bool) -> StatementOfReasons:
        """The statement of reasons for a restricting superseding ``verdict`` (a reviewer's
        decision); ``confirmed``: the reviewer kept the machine verdict's action. Raises
        ``StatementRejected`` when it would not be valid."""
        automated = "AUTOMATED_DECISION_PARTIALLY" if confirmed else "AUTOMATED_DECISION_NOT_AUTOMATED"
        return self._statement(verdict, content_date, automated, review_facts(verdict, confirmed))

    def _statement(self, verdict: Verdict, content_date: date, automated: str, facts: str) -> StatementOfReasons:
        section = self._section
        first = verdict.violations[0]
        mapping = section.mapping(first.category)
        if mapping is None:  # dsa_problem refuses such a policy at start-up
            raise StatementRejected(f"dsa.categories has no mapping for {first.category!r} and no dsa.default")
        restriction = section.restrictions[verdict.action]
        categories: list[str] = []
        keywords: list[str] = []
        for hit in verdict.violations:
            other = section.mapping(hit.category)
            if other is None:
                continue
            categories.append(other.category)
            keywords.extend(other.specification)
        additions = [c for c in dict.fromkeys(categories) if c != mapping.category]
        values: dict[str, object] = {
            **restriction.model_dump(exclude_none=True),
            "decision_ground": mapping.ground,
            **_ground_fields(mapping, first.category),
            "category": mapping.category,
            "category_addition": additions or None,
            "category_specification": list(dict.fromkeys(keywords)) or None,
            "content_type": ["CONTENT_TYPE_TEXT"],
            "content_date": content_date,
            "application_date": verdict.decided_at.astimezone(UTC).date(),
            "territorial_scope": section.territorial_scope.of(verdict.tenant),
            "decision_facts": facts,
            "source_type": section.source_type,
            "automated_detection": "Yes",
            "automated_decision": automated,
            "puid": verdict.verdict_id,
        }
        try:
            return StatementOfReasons.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'statement'}: {e['msg']}" for e in err.errors()
            )
            raise StatementRejected(f"its statement of reasons is invalid: {problems}") from None


def _ground_fields(mapping: DsaMapping, category: str) -> dict[str, object]:
    if mapping.ground == "DECISION_GROUND_ILLEGAL_CONTENT":
        explanation = mapping.explanation or f"Content of the category {category} is illegal under {mapping.reference}."
        fields: dict[str, object] = {
            "illegal_content_legal_ground": mapping.reference,
            "illegal_content_explanation": explanation,
        }
    else:
        explanation = (
            mapping.explanation or f"Content of the category {category} is not allowed by {mapping.reference}."
        )
        fields = {"incompatible_content_ground": mapping.reference, "incompatible_content_explanation": explanation}
        if mapping.also_illegal is not None:
            fields["incompatible_content_illegal"] = "Yes" if mapping.also_illegal else "No"
    if mapping.reference_url is not None:
        fields["decision_ground_reference_url"] = mapping.reference_url
    return fields


def _content_date(job: Job, verdict: Verdict) -> date:
    """When the content was posted: the event's ``created_at``, else the record's timestamp."""
    created = job.event.created_at
    if created is not None:
        return (created.astimezone(UTC) if created.tzinfo is not None else created).date()
    if job.record.timestamp and job.record.timestamp > 0:
        return datetime.fromtimestamp(job.record.timestamp / 1000, UTC).date()
    return verdict.decided_at.astimezone(UTC).date()


def decision_facts(verdict: Verdict) -> str:
    """The facts relied on, written for the person the decision concerns: which categories
    the content was found to violate, with what score against which threshold."""
    found = "; ".join(
        f"{hit.category} (score {hit.score:.2f}, threshold {hit.threshold:.2f}, action {hit.action})"
        for hit in verdict.violations
    )
    model = f"model {verdict.model}" if verdict.model else f"backend {verdict.backend}"
    text = (
        f"An automated classifier ({model}, moderation policy version {verdict.policy_version}) scored this "
        f"{'conversation turn' if verdict.kind == 'conversation' else 'content'} and found it to violate: {found}. "
        f"A score is the classifier's confidence from 0 to 1 that the content belongs to the category; the policy "
        f"acts at or above the threshold. Resulting action: {verdict.action}. No person took part in this decision."
    )
    return text if len(text) <= _MAX_FACTS else text[: _MAX_FACTS - 1] + "…"


def review_facts(verdict: Verdict, confirmed: bool) -> str:
    """The facts of a reviewer's decision, written for the person it concerns."""
    found = "; ".join(hit.category for hit in verdict.violations)
    how = (
        "confirmed the action an automated classifier proposed"
        if confirmed
        else "decided the action in place of an automated classifier's"
    )
    text = (
        f"A person reviewed this {'conversation turn' if verdict.kind == 'conversation' else 'content'}, {how}, "
        f"and found it to violate: {found} (moderation policy version {verdict.policy_version}). "
        f"Resulting action: {verdict.action}."
    )
    return text if len(text) <= _MAX_FACTS else text[: _MAX_FACTS - 1] + "…"


def statement_bytes(statement: StatementOfReasons) -> bytes:
    """The record value: the API's request body, absent fields left out."""
    return statement.model_dump_json(exclude_none=True).encode()
