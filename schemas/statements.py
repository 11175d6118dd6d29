"""The statement of reasons: one per verdict that restricts content (topic
``moderation.statements-of-reasons``, key = the input's key), when the worker runs with
``MODWORKER_DSA__ENABLED=true``.

Its fields are those of a statement in the EU DSA Transparency Database API ("API
Documentation", ``POST /api/v1/statement``; the submission schema in force since 1 July
2025), with the same names, the same enum keys (``DECISION_VISIBILITY_CONTENT_REMOVED``,
not its label) and the same limits, so a record's value is a request body as it stands.
The enum values below are the keys of that API's validation rules
(``app/Http/Requests/StatementStoreRequest.php`` and ``app/Models/Statement.php`` of
github.com/digital-services-act/transparency-database).

``puid`` is the verdict's ``verdict_id``: a statement published twice for the same verdict
(at-least-once) has the same ``puid``, so the database refuses the second as a duplicate.
The other fields say nothing of the verdict; join on ``puid`` = ``verdict_id``.

``StatementOfReasons.model_validate`` checks what the API checks and a little more: the
worker never writes a field the API would ignore (``illegal_content_*`` on a statement
on the ground of the terms of service, ``*_other`` without an ``OTHER`` choice).
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DecisionVisibility = Literal[
    "DECISION_VISIBILITY_CONTENT_REMOVED",
    "DECISION_VISIBILITY_CONTENT_DISABLED",
    "DECISION_VISIBILITY_CONTENT_DEMOTED",
    "DECISION_VISIBILITY_CONTENT_AGE_RESTRICTED",
    "DECISION_VISIBILITY_CONTENT_INTERACTION_RESTRICTED",
    "DECISION_VISIBILITY_CONTENT_LABELLED",
    "DECISION_VISIBILITY_OTHER",
]
DecisionMonetary = Literal["DECISION_MONETARY_SUSPENSION", "DECISION_MONETARY_TERMINATION", "DECISION_MONETARY_OTHER"]
DecisionProvision = Literal[
    "DECISION_PROVISION_PARTIAL_SUSPENSION",
    "DECISION_PROVISION_TOTAL_SUSPENSION",
    "DECISION_PROVISION_PARTIAL_TERMINATION",
    "DECISION_PROVISION_TOTAL_TERMINATION",
]
DecisionAccount = Literal["DECISION_ACCOUNT_SUSPENDED", "DECISION_ACCOUNT_TERMINATED"]
AccountType = Literal["ACCOUNT_TYPE_BUSINESS", "ACCOUNT_TYPE_PRIVATE"]
DecisionGround = Literal["DECISION_GROUND_ILLEGAL_CONTENT", "DECISION_GROUND_INCOMPATIBLE_CONTENT"]
ContentType = Literal[
    "CONTENT_TYPE_APP",
    "CONTENT_TYPE_AUDIO",
    "CONTENT_TYPE_IMAGE",
    "CONTENT_TYPE_PRODUCT",
    "CONTENT_TYPE_SYNTHETIC_MEDIA",
    "CONTENT_TYPE_TEXT",
    "CONTENT_TYPE_VIDEO",
    "CONTENT_TYPE_OTHER",
]
StatementCategory = Literal[
    "STATEMENT_CATEGORY_ANIMAL_WELFARE",
    "STATEMENT_CATEGORY_CONSUMER_INFORMATION",
    "STATEMENT_CATEGORY_CYBER_VIOLENCE",
    "STATEMENT_CATEGORY_CYBER_VIOLENCE_AGAINST_WOMEN",
    "STATEMENT_CATEGORY_DATA_PROTECTION_AND_PRIVACY_VIOLATIONS",
    "STATEMENT_CATEGORY_ILLEGAL_OR_HARMFUL_SPEECH",
    "STATEMENT_CATEGORY_INTELLECTUAL_PROPERTY_INFRINGEMENTS",
    "STATEMENT_CATEGORY_NEGATIVE_EFFECTS_ON_CIVIC_DISCOURSE_OR_ELECTIONS",
    "STATEMENT_CATEGORY_NOT_SPECIFIED_NOTICE",
    "STATEMENT_CATEGORY_OTHER_VIOLATION_TC",
    "STATEMENT_CATEGORY_PROTECTION_OF_MINORS",
    "STATEMENT_CATEGORY_RISK_FOR_PUBLIC_SECURITY",
    "STATEMENT_CATEGORY_SCAMS_AND_FRAUD",
    "STATEMENT_CATEGORY_SELF_HARM",
    "STATEMENT_CATEGORY_UNSAFE_AND_PROHIBITED_PRODUCTS",
    "STATEMENT_CATEGORY_VIOLENCE",
]
Keyword = Literal[
    "KEYWORD_ADULT_SEXUAL_MATERIAL",
    "KEYWORD_AGE_SPECIFIC_RESTRICTIONS",
    "KEYWORD_AGE_SPECIFIC_RESTRICTIONS_MINORS",
    "KEYWORD_ANIMAL_HARM",
    "KEYWORD_BIOMETRIC_DATA_BREACH",
    "KEYWORD_BULLYING_AGAINST_GIRLS",
    "KEYWORD_CHILD_SEXUAL_ABUSE_MATERIAL",
    "KEYWORD_CHILD_SEXUAL_ABUSE_MATERIAL_DEEPFAKE",
    "KEYWORD_CONTENT_PROMOTING_EATING_DISORDERS",
    "KEYWORD_COORDINATED_HARM",
    "KEYWORD_COPYRIGHT_INFRINGEMENT",
    "KEYWORD_CYBER_BULLYING_INTIMIDATION",
    "KEYWORD_CYBER_HARASSMENT",
    "KEYWORD_CYBER_HARASSMENT_AGAINST_WOMEN",
    "KEYWORD_CYBER_INCITEMENT",
    "KEYWORD_CYBER_STALKING",
    "KEYWORD_CYBER_STALKING_AGAINST_WOMEN",
    "KEYWORD_DATA_FALSIFICATION",
    "KEYWORD_DEFAMATION",
    "KEYWORD_DESIGN_INFRINGEMENT",
    "KEYWORD_DISCRIMINATION",
    "KEYWORD_FEMALE_GENDERED_DISINFORMATION",
    "KEYWORD_GEOGRAPHIC_INDICATIONS_INFRINGEMENT",
    "KEYWORD_GEOGRAPHICAL_REQUIREMENTS",
    "KEYWORD_GOODS_SERVICES_NOT_PERMITTED",
    "KEYWORD_GROOMING_SEXUAL_ENTICEMENT_MINORS",
    "KEYWORD_HATE_SPEECH",
    "KEYWORD_HIDDEN_ADVERTISEMENT",
    "KEYWORD_HUMAN_EXPLOITATION",
    "KEYWORD_HUMAN_TRAFFICKING",
    "KEYWORD_ILLEGAL_ORGANIZATIONS",
    "KEYWORD_IMPERSONATION_ACCOUNT_HIJACKING",
    "KEYWORD_INAUTHENTIC_ACCOUNTS",
    "KEYWORD_INAUTHENTIC_LISTINGS",
    "KEYWORD_INAUTHENTIC_USER_REVIEWS",
    "KEYWORD_INCITEMENT_AGAINST_WOMEN",
    "KEYWORD_INCITEMENT_VIOLENCE_HATRED",
    "KEYWORD_INSUFFICIENT_INFORMATION_ON_TRADERS",
    "KEYWORD_LANGUAGE_REQUIREMENTS",
    "KEYWORD_MISINFORMATION_DISINFORMATION",
    "KEYWORD_MISLEADING_INFO_CONSUMER_RIGHTS",
    "KEYWORD_MISLEADING_INFO_GOODS_SERVICES",
    "KEYWORD_MISSING_PROCESSING_GROUND",
    "KEYWORD_NON_CONSENSUAL_IMAGE_SHARING",
    "KEYWORD_NON_CONSENSUAL_IMAGE_SHARING_AGAINST_WOMEN",
    "KEYWORD_NON_CONSENSUAL_MATERIAL_DEEPFAKE",
    "KEYWORD_NON_CONSENSUAL_MATERIAL_DEEPFAKE_AGAINST_WOMEN",
    "KEYWORD_NONCOMPLIANCE_PRICING",
    "KEYWORD_NUDITY",
    "KEYWORD_PATENT_INFRINGEMENT",
    "KEYWORD_PHISHING",
    "KEYWORD_PROHIBITED_PRODUCTS",
    "KEYWORD_PYRAMID_SCHEMES",
    "KEYWORD_RIGHT_TO_BE_FORGOTTEN",
    "KEYWORD_RISK_ENVIRONMENTAL_DAMAGE",
    "KEYWORD_RISK_PUBLIC_HEALTH",
    "KEYWORD_SELF_MUTILATION",
    "KEYWORD_STALKING",
    "KEYWORD_SUICIDE",
    "KEYWORD_TERRORIST_CONTENT",
    "KEYWORD_TRADE_SECRET_INFRINGEMENT",
    "KEYWORD_TRADEMARK_INFRINGEMENT",
    "KEYWORD_TRAFFICKING_WOMEN_GIRLS",
    "KEYWORD_UNLAWFUL_SALE_ANIMALS",
    "KEYWORD_UNSAFE_CHALLENGES",
    "KEYWORD_UNSAFE_PRODUCTS",
    "KEYWORD_VIOLATION_EU_LAW",
    "KEYWORD_VIOLATION_NATIONAL_LAW",
    "KEYWORD_OTHER",
]
Country = Literal[
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE",
    "IS", "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
]  # fmt: skip
"""The EU/EEA country codes the database accepts in ``territorial_scope`` (ISO 3166-1
alpha-2, but ``GR`` for Greece, as the database writes it)."""
SourceType = Literal[
    "SOURCE_ARTICLE_16", "SOURCE_TRUSTED_FLAGGER", "SOURCE_TYPE_OTHER_NOTIFICATION", "SOURCE_VOLUNTARY"
]
AutomatedDecision = Literal[
    "AUTOMATED_DECISION_FULLY", "AUTOMATED_DECISION_PARTIALLY", "AUTOMATED_DECISION_NOT_AUTOMATED"
]
YesNo = Literal["Yes", "No"]

_CONTENT_DATES = (date(2000, 1, 1), date(2038, 1, 1))
_APPLICATION_DATES = (date(2020, 1, 1), date(2038, 1, 1))
_LAST_DATE = date(2038, 1, 1)


class StatementOfReasons(BaseModel):
    """One statement of reasons, as the DSA Transparency Database API takes it.

    ``model_validate`` raises ``pydantic.ValidationError`` naming every field that the API
    would refuse. Dates serialise as ``YYYY-MM-DD``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    decision_visibility: list[DecisionVisibility] | None = Field(
        default=None, min_length=1, description="Restrictions of the content's visibility."
    )
    decision_visibility_other: str | None = Field(default=None, min_length=1, max_length=500)
    decision_monetary: DecisionMonetary | None = None
    decision_monetary_other: str | None = Field(default=None, min_length=1, max_length=500)
    decision_provision: DecisionProvision | None = None
    decision_account: DecisionAccount | None = None
    account_type: AccountType | None = None

    decision_ground: DecisionGround
    decision_ground_reference_url: str | None = Field(
        default=None, max_length=500, pattern=r"^https?://\S+$", description="The law or terms relied on."
    )
    illegal_content_legal_ground: str | None = Field(default=None, min_length=1, max_length=500)
    illegal_content_explanation: str | None = Field(default=None, min_length=1, max_length=2_000)
    incompatible_content_ground: str | None = Field(default=None, min_length=1, max_length=500)
    incompatible_content_explanation: str | None = Field(default=None, min_length=1, max_length=2_000)
    incompatible_content_illegal: YesNo | None = None

    category: StatementCategory
    category_addition: list[StatementCategory] | None = Field(default=None, min_length=1)
    category_specification: list[Keyword] | None = Field(default=None, min_length=1)
    category_specification_other: str | None = Field(default=None, min_length=1, max_length=500)

    content_type: list[ContentType] = Field(min_length=1)
    content_type_other: str | None = Field(default=None, min_length=1, max_length=500)
    content_language: str | None = Field(default=None, pattern=r"^[A-Z]{2}$", description="ISO 639-1, upper case.")
    content_date: date = Field(description="When the content was posted (2000-01-01 to 2038-01-01).")
    application_date: date = Field(description="When the decision took effect (2020-01-01 to 2038-01-01).")
    end_date_account_restriction: date | None = None
    end_date_monetary_restriction: date | None = None
    end_date_service_restriction: date | None = None
    end_date_visibility_restriction: date | None = None
    territorial_scope: list[Country] = Field(min_length=1, description="Where the restriction applies.")

    decision_facts: str = Field(min_length=1, max_length=5_000)
    source_type: SourceType
    source_identity: str | None = Field(default=None, min_length=1, max_length=500)
    automated_detection: YesNo
    automated_decision: AutomatedDecision
    puid: str = Field(min_length=1, max_length=500, pattern=r"^[a-zA-Z0-9_-]+$")

    @model_validator(mode="after")
    def _consistent(self) -> StatementOfReasons:
        problems: list[str] = []
        if not (self.decision_visibility or self.decision_monetary or self.decision_provision or self.decision_account):
            problems.append(
                "one of decision_visibility, decision_monetary, decision_provision, decision_account is required"
            )
        pairs = (
            ("decision_visibility_other", "DECISION_VISIBILITY_OTHER" in (self.decision_visibility or ())),
            ("decision_monetary_other", self.decision_monetary == "DECISION_MONETARY_OTHER"),
            ("content_type_other", "CONTENT_TYPE_OTHER" in self.content_type),
            ("category_specification_other", "KEYWORD_OTHER" in (self.category_specification or ())),
        )
        for name, needed in pairs:
            given = getattr(self, name) is not None
            if needed and not given:
                problems.append(f"{name} is required with the OTHER choice")
            elif given and not needed and name != "category_specification_other":
                problems.append(f"{name} is given without the OTHER choice")
        illegal = self.decision_ground == "DECISION_GROUND_ILLEGAL_CONTENT"
        ground = ("illegal_content_legal_ground", "illegal_content_explanation")
        terms = ("incompatible_content_ground", "incompatible_content_explanation")
        for name in ground if illegal else terms:
            if getattr(self, name) is None:
                problems.append(f"{name} is required with decision_ground {self.decision_ground}")
        for name in (*terms, "incompatible_content_illegal") if illegal else ground:
            if getattr(self, name) is not None:
                problems.append(f"{name} does not belong with decision_ground {self.decision_ground}")
        if self.source_type == "SOURCE_VOLUNTARY" and self.source_identity is not None:
            problems.append("source_identity does not belong with source_type SOURCE_VOLUNTARY")
        for name, value, (first, last) in (
            ("content_date", self.content_date, _CONTENT_DATES),
            ("application_date", self.application_date, _APPLICATION_DATES),
        ):
            if not first <= value <= last:
                problems.append(f"{name} {value} is outside {first} to {last}")
        for name in (
            "end_date_account_restriction",
            "end_date_monetary_restriction",
            "end_date_service_restriction",
            "end_date_visibility_restriction",
        ):
            end = getattr(self, name)
            if end is not None and not self.application_date <= end <= _LAST_DATE:
                problems.append(f"{name} {end} is before application_date or after {_LAST_DATE}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
