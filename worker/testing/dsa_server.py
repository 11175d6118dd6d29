"""A loopback server that speaks the EU DSA Transparency Database API's submission wire format.

Written from the API's documentation ("API Documentation" of transparency.dsa.ec.europa.eu,
sections "Creating a Statement", "Creating Multiple Statements", "Errors", "Errors when
Creating Multiple Statements of Reason" and "PUID Error") and from the code the
documentation points to (github.com/digital-services-act/transparency-database:
``app/Http/Controllers/Api/v1/StatementMultipleAPIController.php``,
``app/Services/GroupedSubmissionsService.php``, ``app/Services/PlatformUniqueIdService.php``,
``app/Exceptions/PuidNotUnique*Exception.php``, the rate limiter of
``app/Providers/RouteServiceProvider.php``).

Endpoints:

- ``POST /api/v1/statements``: ``{"statements": [...]}`` with 1 to 100 statements. **All or
  nothing**: 201 ``{"statements": [...]}`` (each as stored, with ``uuid``, ``created_at``,
  ``platform_name``, ``permalink``, ``self``) when every statement is valid and every ``puid``
  new; otherwise nothing is stored and the answer is 422 with

  - ``{"errors": {"statement_<i>": {"<field>": ["<message>", ...]}}}`` for the statements (by
    position in the array) that break a validation rule, with Laravel's messages
    ("The selected decision ground is invalid.");
  - else ``{"message": "The platform identifier(s) are not all unique within this call.",
    "errors": {"puid": [...], "existing_puids": [...]}}`` when a ``puid`` repeats within the
    call or is already stored for the platform;
  - ``{"message": ..., "errors": {"statements": [...]}}`` for a body without 1 to 100
    statements.
- ``POST /api/v1/statement``: one statement; 201 with it as stored, 422 ``{"message", "errors"}``
  on a bad field, or 422 ``{"message": "The identifier given is not unique within this
  platform.", "errors": {"puid": [...]}, "existing": {"puid": ...}}`` for a known ``puid``.

A wrong or missing Bearer token is 401 ``{"message": "Unauthenticated."}``; 429 (scripted
through the fault plan, e.g. ``rate_limited``) is the API's plain-text "Limit Reached. Please do
not overload the API" with ``Retry-After``; 5xx bodies are ``{"message": "Server Error"}``.

What tests read: ``accepted`` (every statement stored, in order: a client that submits
twice shows here as a repeat only if the server took it twice, which it never does, so
``accepted_puids`` is the record of what reached the database), ``duplicates_refused`` (each
``puid`` refused as already there), ``invalid_refused`` (``(puid, errors)`` for each refused
statement) and ``stored`` (``puid`` -> statement). ``preload`` stores statements as if
submitted earlier. ``lose_answer(request)``, when it returns True for a call that is
accepted, stores the statements and then answers 502 (the answer lost on the way back): the
client cannot tell and must find out through the duplicate refusal of its retry.

Request recording, faults, latency and the Bearer check are ``LoopbackApiServer``'s.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any, Unpack, get_args

from schemas.statements import (
    AccountType,
    AutomatedDecision,
    ContentType,
    Country,
    DecisionAccount,
    DecisionGround,
    DecisionMonetary,
    DecisionProvision,
    DecisionVisibility,
    Keyword,
    SourceType,
    StatementCategory,
    YesNo,
)
from worker.testing.faults import Fault
from worker.testing.loopback import ApiAnswer, LoopbackApiServer, LoopbackOptions, RecordedRequest, RouteHandler

MULTIPLE_PATH = "/api/v1/statements"
SINGLE_PATH = "/api/v1/statement"
MAX_STATEMENTS = 100
"""``'statements' => 'required|array|between:1,100'``."""

NOT_UNIQUE_MULTIPLE = "The platform identifier(s) are not all unique within this call."
NOT_UNIQUE_SINGLE = "The identifier given is not unique within this platform."
RATE_LIMITED = b"Limit Reached. Please do not overload the API"


def rate_limited(retry_after_s: int = 1) -> Fault:
    """The API's 429: plain text, with ``Retry-After`` (Laravel's ``ThrottleRequests``)."""
    return Fault(
        status=429,
        body=RATE_LIMITED,
        retry_after=str(retry_after_s),
        headers={"content-type": "text/html; charset=UTF-8", "x-ratelimit-remaining": "0"},
    )


def _choices(*literals: Any) -> frozenset[str]:
    return frozenset(value for literal in literals for value in get_args(literal))


_PUID = re.compile(r"^[a-zA-Z0-9-_]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_URL = re.compile(r"^https?://[^\s/$.?#].[^\s]*$", re.I)
_LANGUAGE = re.compile(r"^[A-Z]{2}$")
_DECISIONS = ("decision_visibility", "decision_monetary", "decision_provision", "decision_account")
_ILLEGAL = "DECISION_GROUND_ILLEGAL_CONTENT"
_INCOMPATIBLE = "DECISION_GROUND_INCOMPATIBLE_CONTENT"

_CUSTOM_MESSAGES = {
    ("illegal_content_legal_ground", "required_if"): "The illegal content legal ground field is required when "
    "decision ground is illegal content.",
    ("illegal_content_explanation", "required_if"): "The illegal content explanation field is required when "
    "decision ground is illegal content.",
    ("incompatible_content_ground", "required_if"): "The incompatible content ground field is required when "
    "decision ground is incompatible content.",
    ("incompatible_content_explanation", "required_if"): "The incompatible content explanation field is required "
    "when decision ground is incompatible content.",
    ("decision_visibility_other", "required_if"): "The decision visibility other field is required when decision "
    "visibility is other.",
    ("decision_monetary_other", "required_if"): "The decision monetary other field is required when decision "
    "monetary is other.",
    ("content_type_other", "required_if"): "The content type other field is required when content is other.",
    ("content_date", "date_format"): "The content date does not match the format YYYY-MM-DD.",
    ("application_date", "date_format"): "The application date does not match the format YYYY-MM-DD.",
    ("puid", "regex"): "The puid format is invalid.",
}


def _label(field: str) -> str:
    return field.replace("_", " ")


def _message(field: str, rule: str, **values: object) -> str:
    """Laravel's validation message for ``rule`` failed on ``field`` (the API's own wording)."""
    custom = _CUSTOM_MESSAGES.get((field, rule))
    if custom is not None:
        return custom
    name = _label(field)
    templates = {
        "required": "The {name} field is required.",
        "in": "The selected {name} is invalid.",
        "array": "The {name} field must be an array.",
        "string": "The {name} field must be a string.",
        "max": "The {name} field must not be greater than {max} characters.",
        "date_format": "The {name} field must match the format Y-m-d.",
        "after_or_equal": "The {name} field must be a date after or equal to {date}.",
        "before_or_equal": "The {name} field must be a date before or equal to {date}.",
        "url": "The {name} field must be a valid URL.",
        "regex": "The {name} field format is invalid.",
        "required_without_all": "The {name} field is required when none of {others} are present.",
    }
    return templates[rule].format(name=name, **values)


class _Rules:
    """The per-statement rules of ``GroupedSubmissionsService::multi_rules`` (submission
    schema in force since 1 July 2025), checked in the API's order of fields."""

    VISIBILITY = _choices(DecisionVisibility)
    MONETARY = _choices(DecisionMonetary)
    PROVISION = _choices(DecisionProvision)
    ACCOUNT = _choices(DecisionAccount)
    ACCOUNT_TYPES = _choices(AccountType)
    KEYWORDS = _choices(Keyword)
    GROUNDS = _choices(DecisionGround)
    CONTENT_TYPES = _choices(ContentType)
    CATEGORIES = _choices(StatementCategory)
    COUNTRIES = _choices(Country)
    SOURCES = _choices(SourceType)
    YES_NO = _choices(YesNo)
    AUTOMATED_DECISIONS = _choices(AutomatedDecision)

    def __init__(self, statement: Mapping[str, Any]) -> None:
        self.statement = statement
        self.errors: dict[str, list[str]] = {}

    def fail(self, field: str, rule: str, **values: object) -> None:
        self.errors.setdefault(field, []).append(_message(field, rule, **values))

    def given(self, field: str) -> bool:
        value = self.statement.get(field)
        return value is not None and value not in ("", [])

    def check(self) -> dict[str, list[str]]:
        s = self.statement
        self._decisions()
        self._choice("account_type", self.ACCOUNT_TYPES)
        self._array_of("category_specification", self.KEYWORDS)
        self._text("category_specification_other", 500)
        ground = s.get("decision_ground")
        if not self.given("decision_ground"):
            self.fail("decision_ground", "required")
        elif ground not in self.GROUNDS:
            self.fail("decision_ground", "in")
        if self.given("decision_ground_reference_url"):
            url = s["decision_ground_reference_url"]
            if not isinstance(url, str) or not _URL.match(url):
                self.fail("decision_ground_reference_url", "url")
            self._text("decision_ground_reference_url", 500)
        for field, wanted, limit in (
            ("illegal_content_legal_ground", _ILLEGAL, 500),
            ("illegal_content_explanation", _ILLEGAL, 2_000),
            ("incompatible_content_ground", _INCOMPATIBLE, 500),
            ("incompatible_content_explanation", _INCOMPATIBLE, 2_000),
        ):
            if ground != wanted:
                continue  # exclude_unless: ignored with the other ground
            if not self.given(field):
                self.fail(field, "required_if")
            else:
                self._text(field, limit)
        if ground == _INCOMPATIBLE:
            self._choice("incompatible_content_illegal", self.YES_NO)
        if not self.given("content_type"):
            self.fail("content_type", "required")
        else:
            self._array_of("content_type", self.CONTENT_TYPES)
        if "CONTENT_TYPE_OTHER" in (s.get("content_type") or ()):
            if not self.given("content_type_other"):
                self.fail("content_type_other", "required_if")
            self._text("content_type_other", 500)
        if not self.given("category"):
            self.fail("category", "required")
        else:
            self._choice("category", self.CATEGORIES)
        self._array_of("category_addition", self.CATEGORIES)
        self._array_of("territorial_scope", self.COUNTRIES)
        if self.given("content_language"):
            language = s["content_language"]
            if not isinstance(language, str) or not _LANGUAGE.match(language):
                self.fail("content_language", "in")
        self._date("content_date", required=True, first=date(2000, 1, 1))
        self._date("application_date", required=True, first=date(2020, 1, 1))
        for field in (
            "end_date_account_restriction",
            "end_date_monetary_restriction",
            "end_date_service_restriction",
            "end_date_visibility_restriction",
        ):
            self._date(field, required=False, first=None)
        if not self.given("decision_facts"):
            self.fail("decision_facts", "required")
        else:
            self._text("decision_facts", 5_000)
        for field, choices in (
            ("source_type", self.SOURCES),
            ("automated_detection", self.YES_NO),
            ("automated_decision", self.AUTOMATED_DECISIONS),
        ):
            if not self.given(field):
                self.fail(field, "required")
            else:
                self._choice(field, choices)
        self._text("source_identity", 500)
        puid = s.get("puid")
        if not self.given("puid"):
            self.fail("puid", "required")
        elif not isinstance(puid, str):
            self.fail("puid", "string")
        else:
            if len(puid) > 500:
                self.fail("puid", "max", max=500)
            if not _PUID.match(puid):
                self.fail("puid", "regex")
        return self.errors

    def _decisions(self) -> None:
        s = self.statement
        if not any(self.given(field) for field in _DECISIONS):
            for field in _DECISIONS:
                others = " / ".join(_label(f) for f in _DECISIONS if f != field)
                self.fail(field, "required_without_all", others=others)
        self._array_of("decision_visibility", self.VISIBILITY)
        if "DECISION_VISIBILITY_OTHER" in (s.get("decision_visibility") or ()):
            if not self.given("decision_visibility_other"):
                self.fail("decision_visibility_other", "required_if")
            self._text("decision_visibility_other", 500)
        self._choice("decision_monetary", self.MONETARY)
        if s.get("decision_monetary") == "DECISION_MONETARY_OTHER":
            if not self.given("decision_monetary_other"):
                self.fail("decision_monetary_other", "required_if")
            self._text("decision_monetary_other", 500)
        self._choice("decision_provision", self.PROVISION)
        self._choice("decision_account", self.ACCOUNT)

    def _choice(self, field: str, choices: frozenset[str]) -> None:
        if self.given(field) and self.statement[field] not in choices:
            self.fail(field, "in")

    def _array_of(self, field: str, choices: frozenset[str]) -> None:
        if not self.given(field):
            return
        value = self.statement[field]
        if not isinstance(value, list):
            self.fail(field, "array")
        elif any(item not in choices for item in value):
            self.fail(field, "in")

    def _text(self, field: str, limit: int) -> None:
        value = self.statement.get(field)
        if isinstance(value, str) and len(value) > limit:
            self.fail(field, "max", max=limit)

    def _date(self, field: str, *, required: bool, first: date | None) -> None:
        if not self.given(field):
            if required:
                self.fail(field, "required")
            return
        value = self.statement[field]
        try:
            if not isinstance(value, str) or not _DATE.match(value):
                raise ValueError
            day = date.fromisoformat(value)
        except ValueError:
            self.fail(field, "date_format")
            return
        if first is not None and day < first:
            self.fail(field, "after_or_equal", date=first.isoformat())
        if day > date(2038, 1, 1):
            self.fail(field, "before_or_equal", date="2038-01-01")


def statement_errors(statement: Any) -> dict[str, list[str]]:
    """The API's validation errors for one statement, ``{field: [message, ...]}``; empty when valid."""
    if not isinstance(statement, Mapping):
        return {"statement": ["The statement must be an object."]}
    return _Rules(statement).check()


class DsaTransparencyServer(LoopbackApiServer):
    """The DSA Transparency Database submission API on loopback. ``with DsaTransparencyServer() as srv``.

    ``api_key`` is the platform's token; ``platform_name`` goes into stored statements.
    See the module docstring for the endpoints and what tests read, and ``LoopbackApiServer``
    for ``fault_plan``, ``latency_s`` and the request log.
    """

    def __init__(
        self,
        *,
        platform_name: str = "Test Forum",
        lose_answer: Callable[[RecordedRequest], bool] | None = None,
        **options: Unpack[LoopbackOptions],
    ) -> None:
        options.setdefault("api_key", "test-token")
        super().__init__(**options)
        self.platform_name = platform_name
        self.lose_answer = lose_answer
        self._store_lock = threading.Lock()
        self._stored: dict[str, dict[str, Any]] = {}
        self._accepted: list[dict[str, Any]] = []
        self._duplicates: list[str] = []
        self._invalid: list[tuple[str | None, dict[str, list[str]]]] = []

    # ---- what tests read ------------------------------------------------------------------

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """Every statement stored through the API, in order (a copy)."""
        with self._store_lock:
            return list(self._accepted)

    @property
    def accepted_puids(self) -> list[str]:
        return [statement["puid"] for statement in self.accepted]

    @property
    def stored(self) -> dict[str, dict[str, Any]]:
        """``puid`` -> statement, preloaded ones included (a copy)."""
        with self._store_lock:
            return dict(self._stored)

    @property
    def duplicates_refused(self) -> list[str]:
        """Each ``puid`` refused because it was already stored, in order (repeats kept)."""
        with self._store_lock:
            return list(self._duplicates)

    @property
    def invalid_refused(self) -> list[tuple[str | None, dict[str, list[str]]]]:
        """``(puid, errors)`` of each statement refused on validation, in order."""
        with self._store_lock:
            return list(self._invalid)

    def preload(self, statements: Iterable[Mapping[str, Any]]) -> None:
        """Store statements as if submitted before (they are not in ``accepted``)."""
        with self._store_lock:
            for statement in statements:
                self._stored[str(statement["puid"])] = dict(statement)

    # ---- the API's shapes -------------------------------------------------------------------

    def routes(self) -> Mapping[str, RouteHandler]:
        return {MULTIPLE_PATH: self._multiple, SINGLE_PATH: self._single}

    def error_body(self, status: int, message: str) -> Any:
        if status == 401:
            return {"message": "Unauthenticated."}
        if status == 429:
            return RATE_LIMITED
        if status >= 500:
            return {"message": "Server Error"}
        return {"message": message}

    def validation_error(self, errors: list[str]) -> ApiAnswer:
        message = "The statements field is required."
        return ApiAnswer(422, {"message": message, "errors": {"statements": [message]}})

    # ---- routes -------------------------------------------------------------------------------

    def _multiple(self, request: RecordedRequest) -> Any:
        body = request.body
        statements = body.get("statements") if isinstance(body, dict) else None
        if not isinstance(statements, list) or not statements:
            raise self.validation_error([])
        if len(statements) > MAX_STATEMENTS:
            message = f"The statements field must have between 1 and {MAX_STATEMENTS} items."
            raise ApiAnswer(422, {"message": message, "errors": {"statements": [message]}})
        errors: dict[str, dict[str, list[str]]] = {}
        for index, statement in enumerate(statements):
            problems = statement_errors(statement)
            if problems:
                errors[f"statement_{index}"] = problems
        if errors:
            with self._store_lock:
                for index in sorted(int(name.removeprefix("statement_")) for name in errors):
                    puid = statements[index].get("puid") if isinstance(statements[index], dict) else None
                    self._invalid.append((puid, errors[f"statement_{index}"]))
            raise ApiAnswer(422, {"errors": errors})
        puids = [str(statement["puid"]) for statement in statements]
        repeated = sorted({puid for puid in puids if puids.count(puid) > 1})
        with self._store_lock:
            duplicates = repeated or [puid for puid in puids if puid in self._stored]
            if duplicates:
                self._duplicates.extend(p for p in duplicates if p in self._stored)
                raise ApiAnswer(
                    422,
                    {
                        "message": NOT_UNIQUE_MULTIPLE,
                        "errors": {"puid": [NOT_UNIQUE_MULTIPLE], "existing_puids": duplicates},
                    },
                )
            stored = [self._store(statement) for statement in statements]
        if self.lose_answer is not None and self.lose_answer(request):
            raise ApiAnswer(502, self.error_body(502, "Bad Gateway"))
        raise ApiAnswer(201, {"statements": stored})

    def _single(self, request: RecordedRequest) -> Any:
        statement = request.body
        problems = statement_errors(statement)
        if problems:
            first = next(iter(problems.values()))[0]
            count = sum(len(messages) for messages in problems.values()) - 1
            message = first + (f" (and {count} more error{'s' if count > 1 else ''})" if count else "")
            with self._store_lock:
                self._invalid.append((statement.get("puid") if isinstance(statement, dict) else None, problems))
            raise ApiAnswer(422, {"message": message, "errors": problems})
        puid = str(statement["puid"])
        with self._store_lock:
            if puid in self._stored:
                self._duplicates.append(puid)
                raise ApiAnswer(
                    422,
                    {"message": NOT_UNIQUE_SINGLE, "errors": {"puid": [NOT_UNIQUE_SINGLE]}, "existing": {"puid": puid}},
                )
            stored = self._store(statement)
        raise ApiAnswer(201, stored)

    def _store(self, statement: Mapping[str, Any]) -> dict[str, Any]:
        """Store one statement (the caller holds the lock) and return it as the API answers it."""
        identifier = str(uuid.uuid4())
        created = dict(statement)
        created.update(
            {
                "uuid": identifier,
                "created_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                "platform_name": self.platform_name,
                "permalink": f"{self.base_url}/statement/{identifier}",
                "self": f"{self.base_url}/api/v1/statement/{identifier}",
            }
        )
        self._stored[str(statement["puid"])] = created
        self._accepted.append(created)
        return created
