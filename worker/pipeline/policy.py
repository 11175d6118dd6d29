"""Policy stage: turn a backend's raw category scores into an action and its violations.

``Policy.decide(scores, tenant=..., source=...)`` applies a versioned YAML document to the
raw score map a backend returned. ``violations`` and ``action`` on every verdict come from
here, never from a backend's own booleans.

The document
============

.. code-block:: yaml

    # Every category the policy knows: a hit when score >= threshold.
    categories:
      sexual:        {threshold: 0.5, action: block}
      spam:                                        # custom: only an llm judge scores it
        threshold: 0.7
        action: review
        description: Unsolicited advertising, repeated links, or messages sent in bulk.
      selfharm:      {threshold: 0.5, action: review}
      pii:           {threshold: 0.5, action: flag}
      jailbreaking:  {threshold: 0.9, action: allow}   # monitored, never a violation

    # Raw names a backend may report -> the canonical name above. Several raw names may map
    # to one canonical name; its score is then the highest of theirs.
    aliases:
      dangerous: dangerous_and_criminal_content
      criminal:  dangerous_and_criminal_content

    # Categories are an open set: any category not listed above uses this rule.
    default: {threshold: 0.5, action: flag}        # optional; this is its default value

    # Applied in order on top of the base, for matching inputs; a later match wins.
    overrides:
      - match: {tenant: kids-app}                  # tenant, source, or both (all must match)
        categories:
          sexual: {threshold: 0.2}                 # a partial rule keeps the other field
        default: {action: review}
      - match: {tenant: kids-app, source: chat}
        categories:
          pii: {action: block}

    # Optional, for MODWORKER_BACKEND=cascade only: the first stage decides an input alone
    # when every category's score lies outside [threshold - below, threshold + above).
    cascade:
      default: {below: 0.1, above: 0.1}            # categories not named under bands
      bands:
        sexual: {below: 0.05, above: 0.3}

Top-level keys: ``categories`` (name -> ``{threshold, action}``, both required, and an
optional ``description``: what the category means, for backends that judge by it, the
``llm`` backend's json dialect; a rule without one hashes as before descriptions existed),
``aliases`` (raw name -> canonical name), ``default`` (``{threshold, action}``; flag at
0.5 when omitted), ``overrides`` (a list) and ``cascade`` (uncertainty bands of the
cascade backend, see ``worker.backends.cascade``; ``modworker calibrate`` writes it) and ``dsa``
(``DsaSection``: statements of reasons, see ``worker.pipeline.statements`` and docs/dsa.md:
each category's statement category, ground and reference, the territorial scope per tenant
and which actions restrict how). Each override has ``match`` (``tenant``
and/or ``source``, exact strings; every key given must equal the input's), and
``categories`` and/or ``default`` whose rules may give only ``threshold`` or only
``action``: the missing field is taken from the rule in force at that point (the
category's own rule, else the default as changed by this override). Overrides cannot
change aliases.

- ``threshold`` is a number in [0, 1]; a category *hits* when ``score >= threshold``.
- ``action`` is one of ``allow < flag < review < block``. A hit whose action is
  ``allow`` is monitored only: it never becomes a violation.
- A verdict's action is the most severe action among the violations, ``allow`` if none.
- Names under ``categories`` (base and overrides) must be canonical: naming an alias there
  is an error, as are alias chains (an alias whose target is itself an alias).
- Unknown keys, out-of-range thresholds, unknown actions and duplicate YAML keys are
  rejected with ``PolicyError``, one line per problem naming the key path and the fix.

``Policy.version`` is the first 12 hex digits of the SHA-256 of the validated document in
a canonical form (keys sorted, defaults filled in, numbers as floats), so the same content
gives the same version however it is laid out, and any change of content changes it.
Verdicts carry it as ``policy_version``.

With no file (``Policy.load(None)``), the built-in ``worker/pipeline/default_policy.yaml`` applies:
the harms of ``mistral-moderation-2411`` block (``selfharm`` goes to review), its advisory
categories flag, and the category names of ``mistral-moderation-2603`` and OpenAI's
``omni-moderation`` are aliased onto them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from schemas import ACTION_SEVERITY, Action
from schemas.statements import (
    Country,
    DecisionAccount,
    DecisionGround,
    DecisionMonetary,
    DecisionProvision,
    DecisionVisibility,
    Keyword,
    SourceType,
    StatementCategory,
)
from worker.pipeline.verdict_data import CategoryHit

POLICY_FORMAT = 1
"""Version of the document format and its semantics; part of every ``Policy.version``."""

DEFAULT_POLICY_FILE = "default_policy.yaml"


class PolicyError(Exception):
    """A policy document that cannot be used. ``str(err)`` names the key path and the fix."""


class Decision(msgspec.Struct, frozen=True):
    """What the policy decided for one input.

    ``violations`` are the categories that hit with an action other than ``allow``, most
    severe action first, then highest score, then name. ``action`` is the first one's
    action, ``allow`` when there are none.
    """

    action: Action
    violations: list[CategoryHit]

    @property
    def flagged(self) -> bool:
        """True when downstream must do something: the action is not ``allow``."""
        return self.action != "allow"


# --- the document's models -------------------------------------------------------------


class _Strict(BaseModel):
    """Rejects unknown keys with a message that lists the allowed ones."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys_only(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                allowed = ", ".join(cls.model_fields)
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys here: {allowed}")
        return data


class _Rule(_Strict):
    threshold: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    action: Action
    description: str | None = Field(default=None, min_length=1, max_length=2_000)

    @model_serializer(mode="wrap")
    def _omit_absent_description(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A rule without a description hashes as it did before descriptions existed, so
        # adding the field changed no existing policy's version.
        data = handler(self)
        if isinstance(data, dict) and data.get("description") is None:
            data.pop("description", None)
        return data


class _RulePatch(_Strict):
    threshold: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    action: Action | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> _RulePatch:
        if self.threshold is None and self.action is None:
            raise ValueError("empty rule: give threshold, action or both")
        return self

    def over(self, rule: _Rule) -> _Rule:
        return _Rule(
            threshold=rule.threshold if self.threshold is None else self.threshold,
            action=rule.action if self.action is None else self.action,
            description=rule.description,
        )


class _Match(_Strict):
    tenant: str | None = Field(default=None, min_length=1)
    source: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> _Match:
        if self.tenant is None and self.source is None:
            raise ValueError("empty match: give tenant, source or both")
        return self

    def matches(self, tenant: str | None, source: str | None) -> bool:
        return (self.tenant is None or self.tenant == tenant) and (self.source is None or self.source == source)


class _Override(_Strict):
    match: _Match
    categories: dict[str, _RulePatch] = Field(default_factory=dict)
    default: _RulePatch | None = None


class _Band(_Strict):
    below: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    above: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


class _Cascade(_Strict):
    default: _Band | None = None
    bands: dict[str, _Band] = Field(default_factory=dict)


EU_COUNTRIES: tuple[Country, ...] = (
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU",
    "IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
)  # fmt: skip
EEA_COUNTRIES: tuple[Country, ...] = (*EU_COUNTRIES, "IS", "LI", "NO")


class DsaMapping(_Strict):
    """What a statement of reasons says for one category (``dsa.categories.<name>``)."""

    category: StatementCategory
    specification: list[Keyword] = Field(default_factory=list)
    ground: DecisionGround
    reference: str = Field(min_length=1, max_length=500)
    """The law (illegal content) or the terms-of-service clause (incompatible content) relied on."""
    explanation: str | None = Field(default=None, min_length=1, max_length=1_000)
    """Why content of this category is illegal or incompatible on that ground; a generic sentence when absent."""
    reference_url: str | None = Field(default=None, max_length=500, pattern=r"^https?://\S+$")
    also_illegal: bool | None = None
    """Incompatible-content ground only: the content is also considered illegal."""

    @model_validator(mode="after")
    def _also_illegal_needs_the_terms(self) -> DsaMapping:
        if self.also_illegal is not None and self.ground == "DECISION_GROUND_ILLEGAL_CONTENT":
            raise ValueError("also_illegal belongs with ground DECISION_GROUND_INCOMPATIBLE_CONTENT only; remove it")
        return self


class DsaRestriction(_Strict):
    """What one action does to the content and the account (``dsa.restrictions.<action>``),
    in the API's decision fields; at least one of them."""

    decision_visibility: list[DecisionVisibility] | None = Field(default=None, min_length=1)
    decision_visibility_other: str | None = Field(default=None, min_length=1, max_length=500)
    decision_monetary: DecisionMonetary | None = None
    decision_monetary_other: str | None = Field(default=None, min_length=1, max_length=500)
    decision_provision: DecisionProvision | None = None
    decision_account: DecisionAccount | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> DsaRestriction:
        if not (self.decision_visibility or self.decision_monetary or self.decision_provision or self.decision_account):
            raise ValueError(
                "empty restriction: give decision_visibility, decision_monetary, decision_provision or decision_account"
            )
        return self


def _default_restrictions() -> dict[Action, DsaRestriction]:
    return {"block": DsaRestriction(decision_visibility=["DECISION_VISIBILITY_CONTENT_REMOVED"])}


class DsaScope(_Strict):
    """Where restrictions apply (``dsa.territorial_scope``): country codes, or ``EU``/``EEA``."""

    default: list[Country | Literal["EU", "EEA"]] = Field(min_length=1)
    tenants: dict[str, list[Country | Literal["EU", "EEA"]]] = Field(default_factory=dict)

    def of(self, tenant: str | None) -> list[Country]:
        """The countries for ``tenant`` (its own list, else ``default``), sorted, EU/EEA expanded."""
        named = self.tenants.get(tenant, self.default) if tenant is not None else self.default
        countries: set[Country] = set()
        for code in named:
            countries.update(EU_COUNTRIES if code == "EU" else EEA_COUNTRIES if code == "EEA" else (code,))
        return sorted(countries)


class DsaSection(_Strict):
    """The ``dsa`` section: what the worker needs to write statements of reasons."""

    categories: dict[str, DsaMapping] = Field(default_factory=dict)
    default: DsaMapping | None = None
    """For restricting categories not under ``categories``; without it, each must be listed."""
    territorial_scope: DsaScope
    restrictions: dict[Action, DsaRestriction] = Field(default_factory=_default_restrictions)
    """Which actions restrict content, and how. Default: ``block`` removes it."""
    source_type: SourceType = "SOURCE_VOLUNTARY"

    @model_validator(mode="after")
    def _allow_never_restricts(self) -> DsaSection:
        if "allow" in self.restrictions:
            raise ValueError("dsa.restrictions.allow: an allowed input is not restricted; remove it")
        return self

    def mapping(self, category: str) -> DsaMapping | None:
        """The mapping of a canonical category: its own, else ``default``."""
        return self.categories.get(category, self.default)


class _Document(_Strict):
    categories: dict[str, _Rule] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    default: _Rule = Field(default_factory=lambda: _Rule(threshold=0.5, action="flag"))
    overrides: list[_Override] = Field(default_factory=list)
    cascade: _Cascade | None = None
    dsa: DsaSection | None = None

    @model_validator(mode="after")
    def _aliases_are_consistent(self) -> _Document:
        problems = []
        for raw, target in self.aliases.items():
            if not raw or not target:
                problems.append(f"aliases: empty category name in {raw!r}: {target!r}")
            elif target in self.aliases:
                problems.append(
                    f"aliases.{raw}: its target {target!r} is itself an alias; point it at the final name"
                    f" {self.aliases[target]!r}"
                    if target != raw
                    else f"aliases.{raw}: an alias of itself; remove it"
                )
        named: list[tuple[str, Mapping[str, object]]] = [("categories", self.categories)] + [
            (f"overrides[{i}].categories", o.categories) for i, o in enumerate(self.overrides)
        ]
        if self.cascade is not None:
            named.append(("cascade.bands", self.cascade.bands))
        if self.dsa is not None:
            named.append(("dsa.categories", self.dsa.categories))
        for where, categories in named:
            for name in categories:
                if not name:
                    problems.append(f"{where}: empty category name")
                elif name in self.aliases:
                    problems.append(
                        f"{where}.{name}: {name!r} is an alias of {self.aliases[name]!r} (see aliases);"
                        f" configure {self.aliases[name]!r} instead"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --- the policy ------------------------------------------------------------------------


_CONTEXTS_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class _Rules:
    """The rules in force for one combination of matching overrides.

    ``hits_at`` and ``default_hits_at`` are what ``decide`` compares scores with: a
    category's threshold, or infinity where its action is ``allow`` (it never hits).
    """

    categories: dict[str, _Rule]
    default: _Rule
    hits_at: dict[str, float] = field(init=False)
    default_hits_at: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hits_at", {name: _hits_at(rule) for name, rule in self.categories.items()})
        object.__setattr__(self, "default_hits_at", _hits_at(self.default))


def _hits_at(rule: _Rule) -> float:
    return math.inf if rule.action == "allow" else rule.threshold


def _hit(name: str, score: float, rule: _Rule) -> CategoryHit:
    return CategoryHit(name, score, rule.threshold, rule.action)


_FLOATS_ONLY = {float}


class Policy:
    """A validated policy document, ready to decide. Immutable; safe to share.

    Create with ``Policy.load(path)`` (``None``: the built-in default) or
    ``Policy.from_mapping(document)``; both raise ``PolicyError`` on a bad document.
    """

    version: str
    """Stable content hash of the document: 12 hex digits."""

    _BUILTIN: ClassVar[str] = "built-in default policy"

    def __init__(self, document: _Document) -> None:
        """Use ``load`` or ``from_mapping``; this takes an already validated document."""
        self._document = document
        self._aliases = dict(document.aliases)
        self._overrides = tuple(document.overrides)
        self._base = _Rules(dict(document.categories), document.default)
        # Keyed by which overrides matched: bounded by the distinct tenant/source values the
        # document names, however many tenants the stream carries.
        self._resolved: dict[tuple[int, ...], _Rules] = {(): self._base}
        # The same per (tenant, source): matching every override per message cost more than
        # the rest of ``decide``; bounded, as tenants and sources come from the input.
        self._for_context: dict[tuple[str | None, str | None], _Rules] = {}
        self._contexts: list[_Rules] | None = None  # every combination that can match (``thresholds``)
        # A document without ``cascade`` hashes as it did before that key existed, so adding
        # the key to the format changed no deployed policy's version.
        # The same for ``dsa``.
        absent = {name for name in ("cascade", "dsa") if getattr(document, name) is None}
        dumped = document.model_dump(mode="json", exclude=absent or None)
        canonical_form = json.dumps(
            {"format": POLICY_FORMAT, "document": dumped},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        self.version = hashlib.sha256(canonical_form.encode("utf-8")).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Policy(version={self.version!r}, categories={len(self._base.categories)}, overrides={len(self._overrides)})"

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """Read a policy YAML file, or the built-in default when ``path`` is ``None``.

        Raises ``PolicyError`` when the file is missing, is not YAML, or is not a valid
        policy document.
        """
        if path is None:
            text = resources.files("worker.pipeline").joinpath(DEFAULT_POLICY_FILE).read_text(encoding="utf-8")
            return cls._from_yaml(text, cls._BUILTIN)
        origin = f"policy file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(
                f"{origin}: no such file; fix MODWORKER_POLICY_FILE, or unset it to use the built-in default"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise PolicyError(f"{origin}: cannot read it ({err}); it must be a readable UTF-8 YAML file") from None
        return cls._from_yaml(text, origin)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> Policy:
        """Validate an already parsed document (the YAML file's content as a mapping)."""
        return cls._validate(document, "policy document")

    @classmethod
    def _from_yaml(cls, text: str, origin: str) -> Policy:
        try:
            document = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise PolicyError(f"{origin}: not valid YAML: {_yaml_problem(err)}; fix it there") from None
        except RecursionError:
            raise PolicyError(f"{origin}: not valid YAML: nested too deeply to parse; fix it there") from None
        if document is None:
            raise PolicyError(f"{origin}: the document is empty; give at least 'categories' or 'default'")
        return cls._validate(document, origin)

    @classmethod
    def _validate(cls, document: Any, origin: str) -> Policy:
        if not isinstance(document, Mapping):
            raise PolicyError(
                f"{origin}: the top level must be a mapping with keys categories, aliases, default, overrides"
                f" (got {type(document).__name__})"
            )
        try:
            return cls(_Document.model_validate(dict(document)))
        except ValidationError as err:
            raise PolicyError("\n".join(f"{origin}: {line}" for e in err.errors() for line in _describe(e))) from None

    def category_descriptions(self) -> dict[str, str | None]:
        """Every category the document names, base first then overrides', with its description.

        What a judge that is told the categories (the llm backend's json dialect) must
        score: a category named only in an override still needs a score for its tenants.
        """
        named: dict[str, str | None] = {name: rule.description for name, rule in self._base.categories.items()}
        for override in self._overrides:
            for name in override.categories:
                named.setdefault(name, None)
        return named

    @property
    def dsa(self) -> DsaSection | None:
        """The ``dsa`` section (statements of reasons), None when the document has none."""
        return self._document.dsa

    def possible_actions(self, category: str | None) -> frozenset[str]:
        """Every action a hit of ``category`` (canonical; None: a category the document does
        not name, which the default rule decides) can have, under the base rules or any
        combination of overrides that can match together."""
        return frozenset(
            (resolved.default if category is None else resolved.categories.get(category, resolved.default)).action
            for resolved in self._every_context()
        )

    def canonical(self, category: str) -> str:
        """The canonical name of a raw category name (itself when it has no alias)."""
        return self._aliases.get(category, category)

    def threshold(self, category: str, *, tenant: str | None = None, source: str | None = None) -> float:
        """The threshold of ``category`` (canonical) for an input of ``tenant`` and ``source``:
        its rule's with the matching overrides applied, else the default rule's."""
        rules = self._for_context.get((tenant, source)) or self._rules_for(tenant, source)
        return rules.categories.get(category, rules.default).threshold

    def cascade_band(self, category: str) -> tuple[float, float] | None:
        """``(below, above)`` of the cascade's uncertainty band for a canonical category: its
        own under ``cascade.bands``, else ``cascade.default``; None when the document gives
        neither (the cascade then uses its configured default)."""
        cascade = self._document.cascade
        if cascade is None:
            return None
        band = cascade.bands.get(category, cascade.default)
        return None if band is None else (band.below, band.above)

    def thresholds(self, category: str) -> tuple[float, ...]:
        """Every threshold at which ``category`` (canonical) can become a violation, under the
        base rules or any combination of overrides that can match together (sorted,
        distinct). Empty when its action is ``allow`` everywhere. For decisions that cannot
        see the input's tenant and source (the cascade's bands): near any of these, the
        input is near a decision boundary."""
        rules = (resolved.categories.get(category, resolved.default) for resolved in self._every_context())
        return tuple(sorted({rule.threshold for rule in rules if rule.action != "allow"}))

    def _every_context(self) -> list[_Rules]:
        """The rules of every (tenant, source) an input can have: overrides match by equality,
        so each named tenant and source, and one not named (``None``), stand for all. Matched
        overrides stack in order, as ``decide`` applies them."""
        if self._contexts is not None:
            return self._contexts
        tenants = [None, *dict.fromkeys(o.match.tenant for o in self._overrides if o.match.tenant is not None)]
        sources = [None, *dict.fromkeys(o.match.source for o in self._overrides if o.match.source is not None)]
        seen: dict[tuple[int, ...], _Rules] = {}
        for tenant in tenants:
            for source in sources:
                matched = tuple(i for i, o in enumerate(self._overrides) if o.match.matches(tenant, source))
                if matched not in seen:
                    seen[matched] = self._resolve(matched)
        self._contexts = list(seen.values())
        return self._contexts

    def with_cascade_bands(
        self, default: tuple[float, float] | None, bands: Mapping[str, tuple[float, float]]
    ) -> Policy:
        """This policy with its ``cascade`` section replaced (what ``modworker calibrate`` writes)."""
        cascade = _Cascade(
            default=None if default is None else _Band(below=default[0], above=default[1]),
            bands={name: _Band(below=b, above=a) for name, (b, a) in bands.items()},
        )
        return Policy(self._document.model_copy(update={"cascade": cascade}))

    def document(self) -> dict[str, Any]:
        """The validated document as plain data (``yaml.safe_dump`` writes it back)."""
        return self._document.model_dump(mode="json", exclude_none=True)

    def decide(self, scores: Mapping[str, float], *, tenant: str | None = None, source: str | None = None) -> Decision:
        """Apply the policy to one input's raw scores.

        ``scores`` is the backend's open map of raw category -> score in [0, 1]. Raw names
        are resolved through the aliases; a canonical category's score is the highest of
        the raw scores that map to it. Rules come from the base document with the
        overrides matching ``tenant``/``source`` applied in order. Categories the policy
        does not name use the default rule.

        Raises ``ValueError`` when a score is not a finite number: backends promise
        scores in [0, 1], and guessing a value for a broken one could let harm through.
        """
        aliases = self._aliases
        values = scores.values()
        if (
            set(map(type, values)) <= _FLOATS_ONLY
            and math.isfinite(sum(values))  # any NaN or infinity makes the sum one (an overflow: the slow path)
            and aliases.keys().isdisjoint(scores)
        ):
            merged: Mapping[str, float] = scores  # the common case: finite floats under canonical names
        else:
            merged = self._merged(scores)
        rules = self._for_context.get((tenant, source)) or self._rules_for(tenant, source)
        hits_at, default_hits_at = rules.hits_at, rules.default_hits_at
        hit_names = [name for name, score in merged.items() if score >= hits_at.get(name, default_hits_at)]
        if not hit_names:
            return Decision(action="allow", violations=[])
        categories, default = rules.categories, rules.default
        violations = [_hit(name, merged[name], categories.get(name, default)) for name in hit_names]
        if len(violations) > 1:
            violations.sort(key=lambda hit: (-ACTION_SEVERITY[hit.action], -hit.score, hit.category))
        return Decision(action=violations[0].action if violations else "allow", violations=violations)

    def _merged(self, scores: Mapping[str, float]) -> dict[str, float]:
        """Scores checked one by one and resolved through the aliases (each canonical
        category the highest of its raw scores); raises ``ValueError`` as ``decide`` says."""
        merged: dict[str, float] = {}
        aliases = self._aliases
        for raw, value in scores.items():
            # Backends give floats: one type test for them, the full test for anything else.
            if type(value) is float and math.isfinite(value):
                score = value
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"score for category {raw!r} is not a finite number: {value!r}")
            else:
                score = float(value)
            name = aliases.get(raw, raw)
            previous = merged.get(name)
            merged[name] = score if previous is None else max(previous, score)
        return merged

    def _rules_for(self, tenant: str | None, source: str | None) -> _Rules:
        matched = tuple(i for i, override in enumerate(self._overrides) if override.match.matches(tenant, source))
        rules = self._resolve(matched)
        if len(self._for_context) >= _CONTEXTS_REMEMBERED:
            self._for_context.clear()
        self._for_context[(tenant, source)] = rules
        return rules

    def _resolve(self, matched: tuple[int, ...]) -> _Rules:
        """The base rules with the overrides at ``matched`` applied in order (cached)."""
        rules = self._resolved.get(matched)
        if rules is None:
            categories = dict(self._base.categories)
            default = self._base.default
            for i in matched:
                override = self._overrides[i]
                if override.default is not None:
                    default = override.default.over(default)
                for name, patch in override.categories.items():
                    categories[name] = patch.over(categories.get(name, default))
            rules = self._resolved[matched] = _Rules(categories, default)
        return rules


# --- YAML and error messages -----------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)  # a set key passes the test above ('in' takes it as a frozenset), not this
        except TypeError:  # a list, mapping or set as a key (YAML's '? [a, b]'): refused as PyYAML would
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _scalar_or_yaml_error(kind: str) -> Any:
    """SafeLoader's constructor of ``kind`` scalars, raising ``ConstructorError`` where PyYAML's
    raises ValueError, KeyError or AttributeError: a date that does not exist (``2026-13-45``)
    or an explicit tag on a value that is not one (``!!int abc``, ``!!timestamp x``)."""
    tag = f"tag:yaml.org,2002:{kind}"
    construct = yaml.SafeLoader.yaml_constructors[tag]

    def checked(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, AttributeError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {kind}", node.start_mark
            ) from None

    return checked


for _kind in ("bool", "int", "float", "timestamp"):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_kind}", _scalar_or_yaml_error(_kind))


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err).replace("\n", " ")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(str(part)):
            path += f".{part}" if path else str(part)
        else:
            path += f"[{str(part)!r}]"
    return path


def _describe(error: Mapping[str, Any]) -> list[str]:
    """One line per problem: the key path, what is wrong, and what to write instead."""
    # pydantic adds the failing type (e.g. 'function-after[...]') to the location of
    # validator errors; it is noise to someone editing YAML.
    loc = tuple(p for p in error.get("loc", ()) if not (isinstance(p, str) and "[" in p and p.endswith("]")))
    path = _key_path(loc) or "top level"
    kind = error.get("type", "")
    got = error.get("input")
    if kind == "value_error":
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        lines = message.split("\n")
        # Document-level checks name their own paths already.
        return lines if not loc else [f"{path}: {line}" for line in lines]
    if kind == "missing":
        return [f"{path}: required key missing; add it"]
    if loc and loc[-1] == "threshold":
        return [f"{path}: must be a number from 0 to 1 (got {got!r}); fix the value"]
    if loc and loc[0] == "dsa" and kind in ("literal_error", "enum"):
        return [f"{path}: {error.get('msg', 'invalid value')} (got {got!r}); fix the value"]
    if (loc and loc[-1] == "action") or kind == "literal_error":
        return [f"{path}: must be one of allow, flag, review, block (got {got!r}); fix the value"]
    if kind in ("string_type", "string_too_short"):
        return [f"{path}: must be a non-empty string (got {got!r}); quote it if it looks like a number"]
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return [f"{path}: must be a mapping of keys to values (got {type(got).__name__}); fix its layout"]
    if kind == "list_type":
        return [f"{path}: must be a list (got {type(got).__name__}); write each override as '- match: ...'"]
    return [f"{path}: {error.get('msg', 'invalid value')} (got {got!r}); fix the value"]
