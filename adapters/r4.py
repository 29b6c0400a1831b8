"""The common FHIR parser: an R4 (or STU3) Appointment, or `$book` Parameters carrying one, into a
CanonicalBooking. The dialects (`fhir`, `cerner`, `epic`) are subclasses that change a few hooks.

Choices every dialect shares:

- Participants: an actor reference `Patient/x` becomes `Patient/x`, `Location/x` becomes
  `Facility/x`, `Practitioner/x` and `PractitionerRole/x` become `Practitioner/x`, `Device/x` stays.
  Absolute URLs use their last two segments (after dropping a `/_history/<v>` suffix). An actor
  named by its identifier (`{"type": "Patient", "identifier": {system, value}}`) is kept with its
  system, for the identity step to look up under it (gateway/identity); these are the EHR's ids,
  never sent to Salesforce as they are. Anything else (RelatedPerson, HealthcareService, a
  contained `#id`, a display-only actor, an identifier without a `type`, a participant with only a
  `type`) is never guessed: its path goes to `unresolved_participants`, as
  `<resource>.participant[i].actor` when an actor was sent and `<resource>.participant[i]` when not.
- Slots: `slot[i].reference` must be a Slot reference (`Slot/<id>` or an absolute URL ending so);
  anything else is a 422 naming `slot[i].reference`, since dropping it would book something else.
- `serviceCategory` is read as an array (R4) or a single object (STU3) in every dialect; the path is
  `serviceCategory[i]` or `serviceCategory` accordingly. Coding systems are kept exactly as sent.
- `start`/`end` are kept as sent (the rules step checks them); `identifier`s without a `value` are
  skipped (they cannot identify anything); an empty `comment` counts as absent.
- `$book` (Argonaut `appt-resource`, IHE `appointment-resource`): the resource is parsed with the
  same rules under the prefix `Parameters.parameter[i].resource`. A non-empty `comment` parameter
  replaces Appointment.comment (it is what the booking party wrote at booking time; the resource's
  comment may be the scheduler's from `$find`), and `comment_path` names the parameter. Argonaut's
  `patient-id` adds the Patient participant when the resource does not already carry it.
- A key repeated within one JSON object is a 400 (`adapters/_keys.py`): which one counts is ambiguous.
- Required bindings: `status` outside FHIR's appointmentstatus and `participant[i].status` outside
  participationstatus are a 400 (`code-invalid`) naming each element. R4's sets serve every
  dialect: STU3's are the same but for R4's added `checked-in` and `waitlist`, and a body does not
  say which version it is, so every valid STU3 body passes (and an STU3 `waitlist` does too).
- Errors never quote the body: they name the FHIR path and the JSON types involved. A resourceType
  is only repeated when it is a FHIR resource type name.
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

from adapters._keys import check_keys
from gateway.canonical import (
    CanonicalBooking,
    Concept,
    Identifier,
    Instant,
    Participant,
    ParticipantKind,
    Slot,
)
from gateway.errors import InvalidRequest, Issue, Unprocessable

from . import _shapes as s

# FHIR reference type -> (participant kind, Salesforce reference type)
_KINDS: dict[str, tuple[ParticipantKind, str]] = {
    "Patient": ("Patient", "Patient"),
    "Location": ("Facility", "Facility"),
    "Practitioner": ("Practitioner", "Practitioner"),
    "PractitionerRole": ("Practitioner", "Practitioner"),
    "Device": ("Device", "Device"),
}

# parameter names that carry the Appointment in $book: Argonaut (STU3) and IHE ITI (R4)
_RESOURCE_PARAMS = frozenset({"appt-resource", "appointment-resource"})
_MISSING_APPT = "Parameters.parameter.where(name='appt-resource')"

# FHIR R4 (and STU3) resource type names: the only resourceType values an error message repeats
_RESOURCE_TYPES = frozenset(
    """Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodySite BodyStructure Bundle
    CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim
    ClaimResponse ClinicalImpression CodeSystem Communication CommunicationRequest
    CompartmentDefinition Composition ConceptMap Condition Consent Contract Coverage
    CoverageEligibilityRequest CoverageEligibilityResponse DataElement DetectedIssue Device
    DeviceComponent DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement DiagnosticReport
    DocumentManifest DocumentReference EffectEvidenceSynthesis EligibilityRequest
    EligibilityResponse Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare
    EventDefinition Evidence EvidenceVariable ExampleScenario ExpansionProfile
    ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse
    HealthcareService ImagingManifest ImagingStudy Immunization ImmunizationEvaluation
    ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice Library Linkage List
    Location Measure MeasureReport Media Medication MedicationAdministration MedicationDispense
    MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
    PractitionerRole Procedure ProcedureRequest ProcessRequest ProcessResponse Provenance
    Questionnaire QuestionnaireResponse ReferralRequest RelatedPerson RequestGroup ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis
    Schedule SearchParameter Sequence ServiceDefinition ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult VisionPrescription""".split()
)

# required bindings: hl7.org/fhir/R4/valueset-appointmentstatus.html and valueset-participationstatus.html
APPOINTMENT_STATUSES = frozenset({"proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                                  "entered-in-error", "checked-in", "waitlist"})
PARTICIPATION_STATUSES = frozenset({"accepted", "declined", "tentative", "needs-action"})

_JSON_TYPES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "null": "null",
    "array": "an array",
    "object": "an object",
}
_TYPE_ERROR = re.compile(r"^Expected `([^`]*)`, got `([^`]*)`")
_TOO_LONG = re.compile(r"^Expected `array` of length <= (\d+)")
_AT = re.compile(r" - at `\$([^`]*)`$")
_BYTE = re.compile(r"\(byte (\d+)\)")


def _json_type(name: str) -> str:
    return _JSON_TYPES.get(name, "another JSON type")


def _type_error(exc: msgspec.ValidationError, root: str) -> InvalidRequest:
    """msgspec's "Expected `str | null`, got `int` - at `$.a[0].b`" as a FHIR-path message.

    Rebuilt from the two type names only, so nothing of the input can leak into it."""
    text = str(exc)
    at = _AT.search(text)
    path = root + (at.group(1) if at else "")
    too_long = _TOO_LONG.match(text)
    if too_long:
        return InvalidRequest(f"{path} has more than {too_long.group(1)} items", expression=(path,))
    m = _TYPE_ERROR.match(text)
    if m is None:
        return InvalidRequest(f"{path} has the wrong JSON type or shape", expression=(path,))
    wanted = " or ".join(_json_type(t) for t in m.group(1).split(" | ") if t != "null")
    return InvalidRequest(
        f"{path} must be {wanted or 'null'}, not {_json_type(m.group(2))}", expression=(path,)
    )


def _not_json(exc: msgspec.DecodeError | UnicodeDecodeError | RecursionError) -> InvalidRequest:
    if isinstance(exc, UnicodeDecodeError):  # its position is within one string, not the body
        return InvalidRequest("The body is not valid JSON (a string in it is not UTF-8)")
    if isinstance(exc, RecursionError):  # msgspec's own depth guard: arrays or objects nested too deep
        return InvalidRequest("The body nests arrays or objects too deeply")
    m = _BYTE.search(str(exc))
    where = f" (malformed at byte {m.group(1)})" if m else " (it is empty or truncated)"
    return InvalidRequest(f"The body is not valid JSON{where}")


def resolve_reference(ref: str) -> tuple[str, str] | None:
    """`Patient/1`, `https://host/base/Patient/1` or `Patient/1/_history/2` -> ("Patient", "1").

    None for a contained (`#id`), conditional (`Patient?…`), `urn:` or otherwise unusable one."""
    if not ref or ref[0] == "#":
        return None
    rtype, sep, rid = ref.partition("/")
    if sep and rid and "/" not in rid:  # the common relative `Type/id`
        if rtype and ":" not in rtype and "?" not in rid and "#" not in rid:
            return rtype, rid
        return None
    parts = ref.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        del parts[-2:]
    if len(parts) < 2:
        return None
    rtype, rid = parts[-2], parts[-1]
    if not rtype or not rid or "?" in rid or "#" in rid or ":" in rtype:
        return None
    return rtype, rid


def _participant(ref: str, path: str) -> Participant | None:
    resolved = resolve_reference(ref)
    if resolved is None:
        return None
    kind = _KINDS.get(resolved[0])
    if kind is None:
        return None
    return Participant(kind=kind[0], reference=f"{kind[1]}/{resolved[1]}", path=path,
                       role=resolved[0] == "PractitionerRole")


def _actor(actor: s.Reference, path: str) -> Participant | None:
    """A participant's actor: its literal reference, else a logical one (`identifier` with a `type`
    naming the kind; an identifier without a system is read as the kind's own ids, like a literal)."""
    if actor.reference:
        return _participant(actor.reference, path)
    ident, kind = actor.identifier, _KINDS.get(actor.type or "")
    if ident is None or not ident.value or kind is None:
        return None
    return Participant(kind=kind[0], reference=f"{kind[1]}/{ident.value}", path=f"{path}.identifier",
                       system=ident.system or None, role=actor.type == "PractitionerRole")


def _check_bindings(a: s.Body, p: str) -> None:
    """The Appointment's codes bound `required` in FHIR: one outside its value set is a 400 naming
    every such element (the value itself is not repeated)."""
    issues = []
    if a.status is not None and a.status not in APPOINTMENT_STATUSES:
        issues.append(Issue(code="code-invalid", expression=(f"{p}.status",), diagnostics=(
            f"{p}.status is not a code of FHIR's appointmentstatus ({', '.join(sorted(APPOINTMENT_STATUSES))})")))
    for i, part in enumerate(a.participant or ()):
        if part.status is not None and part.status not in PARTICIPATION_STATUSES:
            path = f"{p}.participant[{i}].status"
            issues.append(Issue(code="code-invalid", expression=(path,), diagnostics=(
                f"{path} is not a code of FHIR's participationstatus ({', '.join(sorted(PARTICIPATION_STATUSES))})")))
    if issues:
        raise InvalidRequest(issues=issues)


def _concept(cc: s.CodeableConcept, path: str) -> Concept:
    return Concept(path=path, codings=cc.coding or (), text=cc.text)


def _concepts(ccs: tuple[s.CodeableConcept, ...] | None, path: str) -> tuple[Concept, ...]:
    if not ccs:
        return ()
    out = []
    i = 0
    for cc in ccs:
        out.append(Concept(path=f"{path}[{i}]", codings=cc.coding or (), text=cc.text))
        i += 1
    return tuple(out)


class _BookExtras:
    """What $book Parameters add around (or, for Epic, instead of) the Appointment resource."""

    __slots__ = ("comment", "comment_path", "participants", "unresolved", "identifiers")

    def __init__(self) -> None:
        self.comment: str | None = None
        self.comment_path: str | None = None
        self.participants: list[Participant] = []
        self.unresolved: list[str] = []
        self.identifiers: list[Identifier] = []


class R4Adapter:
    """Plain FHIR R4: an Appointment, or `$book` Parameters (Argonaut / IHE) carrying one."""

    name: ClassVar[str] = "fhir"
    body_type: ClassVar[type[s.Body]] = s.Body
    # $book parameters whose valueString is the booking comment
    comment_params: ClassVar[frozenset[str]] = frozenset({"comment"})
    # does a $book without an Appointment resource, made only of identifiers, count as a booking?
    identifier_only_book: ClassVar[bool] = False

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(self.body_type)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- entry point --------------------------------------------------------------------------

    def parse(self, body: bytes) -> CanonicalBooking:
        res = self._decode(body, "")
        if res.resourceType == "Appointment":
            return self._appointment(res, "Appointment", None)
        return self._parameters(res)

    # -- dialect hooks ------------------------------------------------------------------------

    def fallback_comment(self, appt: s.Body, prefix: str) -> tuple[str | None, str | None]:
        """The comment (and its path) when Appointment.comment is absent."""
        return None, None

    def book_parameter(self, name: str | None, prm: s.Param, path: str, extras: _BookExtras) -> None:
        """A $book parameter the common code does not know (ignored unless a dialect reads it)."""

    def _missing_appointment(self) -> Unprocessable:
        return Unprocessable(
            "$book Parameters carry no appt-resource parameter with an Appointment resource",
            expression=(_MISSING_APPT,),
        )

    # -- decoding -----------------------------------------------------------------------------

    def _decode(self, raw: bytes | msgspec.Raw, prefix: str) -> s.Body:
        """One decode pass into the dialect's Struct; `prefix` is "" for the body, or the path of
        a $book parameter's resource (which may only be an Appointment)."""
        try:
            res = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            # slow path only: find out whether the body itself is the problem before blaming a field
            root = self._check_head(raw, prefix)
            raise _type_error(exc, root) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            # msgspec raises UnicodeDecodeError, not DecodeError, for bad UTF-8 inside a string it reads,
            # and RecursionError for nesting past its depth limit
            raise _not_json(exc) from None
        self._check_type(res.resourceType, res.fullUrl, res.resource, prefix)
        if not prefix:  # the whole body, once it is JSON of the right shape
            try:
                check_keys(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise _not_json(exc) from None
        return res

    def _check_head(self, raw: bytes | msgspec.Raw, prefix: str) -> str:
        try:
            head = msgspec.json.decode(raw, type=s.Head)
        except msgspec.ValidationError as exc:
            m = _TYPE_ERROR.match(str(exc))
            got = _json_type(m.group(2)) if m else "not an object"
            what = prefix or "The body"
            raise InvalidRequest(
                f"{what} must be a FHIR resource (a JSON object), not {got}",
                expression=(prefix,) if prefix else (),
            ) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            # the typed decode stops at the first wrong type, before it sees that the JSON is broken
            # further on (trailing bytes, bad UTF-8); this whole-body decode does see it
            raise _not_json(exc) from None
        rt = head.resourceType
        if rt is not None and not isinstance(rt, str):
            path = f"{prefix}.resourceType" if prefix else "resourceType"
            raise InvalidRequest(f"{path} must be a string", expression=(path,))
        self._check_type(rt, head.fullUrl, head.resource, prefix)
        return prefix or str(rt)

    @staticmethod
    def _check_type(rt: str | None, full_url: object, resource: object, prefix: str) -> None:
        allowed = ("Appointment",) if prefix else ("Appointment", "Parameters")
        if rt in allowed:
            return
        path = f"{prefix}.resourceType" if prefix else "resourceType"
        expected = "Appointment" if prefix else "Appointment, or Parameters for $book"
        if rt is None:
            if full_url is not msgspec.UNSET or resource is not msgspec.UNSET:
                msg = (
                    f"{prefix or 'The body'} is a Bundle entry (fullUrl and resource), not a "
                    f"resource: send the entry's resource, the {expected}, itself"
                )
            else:
                msg = f"{path} is missing; expected {expected}"
        else:
            got = rt if rt in _RESOURCE_TYPES else "not a FHIR resource type"
            msg = f"{path} is {got}; expected {expected}"
        raise InvalidRequest(msg, expression=(path,))

    # -- Appointment --------------------------------------------------------------------------

    def _appointment(self, a: s.Body, p: str, extras: _BookExtras | None) -> CanonicalBooking:
        _check_bindings(a, p)
        participants: list[Participant] = []
        unresolved: list[str] = []
        if a.participant:
            i = 0
            for part in a.participant:
                actor = part.actor
                if actor is None:
                    unresolved.append(f"{p}.participant[{i}]")
                else:
                    path = f"{p}.participant[{i}].actor"
                    resolved = _actor(actor, path)
                    if resolved is None:
                        unresolved.append(path)
                    else:
                        participants.append(resolved)
                i += 1

        slots: tuple[Slot, ...] = ()
        if a.slot:
            slot_list = []
            i = 0
            for ref in a.slot:
                slot_list.append(self._slot(ref, f"{p}.slot[{i}]"))
                i += 1
            slots = tuple(slot_list)

        sc = a.serviceCategory
        if sc is None:
            categories: tuple[Concept, ...] = ()
        elif isinstance(sc, tuple):
            categories = _concepts(sc, f"{p}.serviceCategory")
        else:
            categories = (_concept(sc, f"{p}.serviceCategory"),)

        if a.comment:
            comment, comment_path = a.comment, f"{p}.comment"
        else:
            comment, comment_path = self.fallback_comment(a, p)

        identifiers: list[Identifier] = []
        if a.identifier:
            for x in a.identifier:
                if x.value:
                    identifiers.append(Identifier(value=x.value, system=x.system))

        if extras is not None:
            if extras.comment:
                comment, comment_path = extras.comment, extras.comment_path
            seen = {x.reference for x in participants}
            participants += [x for x in extras.participants if x.reference not in seen]
            unresolved += extras.unresolved
            identifiers += [x for x in extras.identifiers if x not in identifiers]

        return CanonicalBooking(
            resource_path=p,
            identifiers=tuple(identifiers),
            status=a.status,
            start=Instant(a.start, f"{p}.start") if a.start is not None else None,
            end=Instant(a.end, f"{p}.end") if a.end is not None else None,
            appointment_types=(
                (_concept(a.appointmentType, f"{p}.appointmentType"),) if a.appointmentType else ()
            ),
            service_types=_concepts(a.serviceType, f"{p}.serviceType"),
            service_categories=categories,
            specialties=_concepts(a.specialty, f"{p}.specialty"),
            participants=tuple(participants),
            unresolved_participants=tuple(unresolved),
            slots=slots,
            comment=comment,
            comment_path=comment_path,
            cancel_reason=_concept(a.cancelationReason, f"{p}.cancelationReason") if a.cancelationReason else None,
            resource_id=a.id,
        )

    @staticmethod
    def _slot(ref: s.Reference, path: str) -> Slot:
        resolved = resolve_reference(ref.reference) if ref.reference else None
        if resolved is None or resolved[0] != "Slot":
            raise Unprocessable(
                issues=[
                    Issue(
                        code="value",
                        diagnostics=f"{path}.reference is not a Slot reference (expected Slot/<id>)",
                        expression=(f"{path}.reference",),
                    )
                ]
            )
        return Slot(id=resolved[1], path=path)

    # -- $book Parameters ---------------------------------------------------------------------

    def _parameters(self, body: s.Body) -> CanonicalBooking:
        extras = _BookExtras()
        appt: tuple[int, msgspec.Raw] | None = None
        for i, prm in enumerate(body.parameter or ()):
            name = prm.name
            pp = f"Parameters.parameter[{i}]"
            if name in _RESOURCE_PARAMS:
                if appt is not None:
                    raise InvalidRequest(
                        f"{pp}: $book takes one Appointment resource, this is a second one",
                        expression=(pp,),
                    )
                if prm.resource is msgspec.UNSET:
                    raise Unprocessable(
                        f"{pp}.resource is missing: {name} must carry the Appointment resource",
                        expression=(f"{pp}.resource",),
                    )
                appt = (i, prm.resource)
            elif name in self.comment_params:
                if prm.valueString and extras.comment is None:
                    extras.comment, extras.comment_path = prm.valueString, f"{pp}.valueString"
            elif name == "patient-id":  # Argonaut: a Patient reference as a uri
                ref, path = prm.valueUri, f"{pp}.valueUri"
                patient = _participant(ref, path) if ref else None
                if ref is None and prm.valueReference is not None:
                    patient = _actor(msgspec.structs.replace(prm.valueReference, type=prm.valueReference.type or "Patient"),
                                     f"{pp}.valueReference")
                if patient is not None and patient.kind == "Patient":
                    extras.participants.append(patient)
                else:
                    extras.unresolved.append(pp)
            else:
                self.book_parameter(name, prm, pp, extras)

        if appt is not None:
            prefix = f"Parameters.parameter[{appt[0]}].resource"
            return self._appointment(self._decode(appt[1], prefix), prefix, extras)
        if self.identifier_only_book and (extras.participants or extras.identifiers):
            # Epic's form has ids only: what is missing belongs in an appt-resource Appointment,
            # so refusals name paths inside the one the caller should send
            return CanonicalBooking(
                resource_path="Parameters.parameter.where(name='appt-resource').resource",
                identifiers=tuple(extras.identifiers),
                participants=tuple(extras.participants),
                unresolved_participants=tuple(extras.unresolved),
                comment=extras.comment,
                comment_path=extras.comment_path,
            )
        raise self._missing_appointment()


class FhirAdapter(R4Adapter):
    """The `fhir` dialect: plain R4, Argonaut and IHE $book; the common rules unchanged."""
