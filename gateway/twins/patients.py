"""The people an EHR twin holds: its dialect's seeded ones (`config.default_patients`, or the
config's own), and those added through `POST /twin/patients`; `/twin/reset` goes back to the seed.

The twin is served from a background thread while a test reads it from its own: one lock, and
patients are frozen, so a reader never sees one half-changed."""

from __future__ import annotations

import re
import threading
from datetime import date
from typing import Any

import msgspec

from gateway.twins.config import MRN_SYSTEMS, TwinPatient

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR's id
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,100}")
_PHONE = re.compile(r"[0-9+()\-. ]{3,32}")


class Patients:
    def __init__(self, seed: tuple[TwinPatient, ...]) -> None:
        self._seed = seed
        self._lock = threading.Lock()
        self._by_id = {p.id: p for p in seed}

    def add(self, patient: TwinPatient) -> bool:
        """False when the id is already another patient's (an MRN may repeat, as after a bad merge)."""
        with self._lock:
            if patient.id in self._by_id:
                return False
            self._by_id[patient.id] = patient
            return True

    def get(self, patient_id: str) -> TwinPatient | None:
        with self._lock:
            return self._by_id.get(patient_id)

    def all(self) -> list[TwinPatient]:
        with self._lock:
            return list(self._by_id.values())

    def reset(self) -> None:
        with self._lock:
            self._by_id = {p.id: p for p in self._seed}


class _PatientIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    family: str
    given: str | list[str]
    birthDate: str
    gender: str
    mrn: str
    phone: str | None = None


def _problem(p: _PatientIn, given: tuple[str, ...]) -> str | None:
    """The first field that is not what a FHIR Patient holds, by its name only (never its value)."""
    if not _ID.fullmatch(p.id):
        return "id"
    if not _NAME.fullmatch(p.family):
        return "family"
    if not given or not all(_NAME.fullmatch(g) for g in given):
        return "given"
    try:
        date.fromisoformat(p.birthDate)
    except ValueError:
        return "birthDate"
    if len(p.birthDate) != 10:
        return "birthDate"
    if p.gender not in ("male", "female", "other", "unknown"):
        return "gender"
    if not _ID.fullmatch(p.mrn):
        return "mrn"
    if p.phone is not None and not _PHONE.fullmatch(p.phone):
        return "phone"
    return None


def _field(error: msgspec.ValidationError) -> str:
    """The field msgspec's message names (after "field" or "at"), never a value it may quote."""
    named = re.findall(r"(?:field|at) `(?:\$\.)?([^`]{1,60})`", str(error))
    return named[-1] if named else "the body"


def read_patient(body: bytes) -> TwinPatient:
    """The patient `POST /twin/patients` sends; ValueError naming the first bad field otherwise."""
    try:
        p = msgspec.json.decode(body, type=_PatientIn)
    except msgspec.ValidationError as exc:
        raise ValueError(f"patients: {_field(exc)} is missing or of the wrong type") from None
    except msgspec.DecodeError:
        raise ValueError("patients: the body is not a JSON object") from None
    given = (p.given,) if isinstance(p.given, str) else tuple(p.given)
    if (bad := _problem(p, given)) is not None:
        raise ValueError(f"patients: {bad} is not valid")
    return TwinPatient(id=p.id, family=p.family, given=given, birthDate=p.birthDate,
                       gender=p.gender, mrn=p.mrn, phone=p.phone)  # type: ignore[arg-type]


def listing(p: TwinPatient, dialect: str) -> dict[str, Any]:
    """A patient as the twin's control endpoints list it: the fields `POST /twin/patients` takes, and
    the system of its MRN."""
    return {**msgspec.to_builtins(p), "given": list(p.given), "mrnSystem": MRN_SYSTEMS[dialect]}
