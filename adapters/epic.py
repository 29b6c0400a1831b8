"""Epic: R4 reads and STU3 scheduling.

STU3 shapes are read by the common parser (a single `serviceCategory` object; the singular `reason`,
like `reasonCode`, is not part of a booking; the old `http://hl7.org/fhir/v2/0276` system and Epic's
customer OIDs `urn:oid:1.2.840.114350…` are kept exactly as sent, the code maps cover them).

The hook is `$book`. Besides the Argonaut form (`appt-resource`), Epic's own STU3 `$book` carries
only identifiers: `patient` and `appointment` as `valueIdentifier` and `appointmentNote` as a string.
It yields a booking with the Patient participant `Patient/<value>` named by that identifier (its
system kept; path `Parameters.parameter[i].valueIdentifier`), the appointment identifier, the note as comment and
nothing else; the rules step refuses it, naming what is missing. `appointmentNote` is a comment
parameter in both forms (it replaces Appointment.comment, as the Argonaut `comment` does).
"""

from __future__ import annotations

from typing import ClassVar

from gateway.canonical import Identifier, Participant
from gateway.errors import Unprocessable

from . import _shapes as s
from .r4 import _MISSING_APPT, R4Adapter, _BookExtras


class EpicAdapter(R4Adapter):
    name: ClassVar[str] = "epic"
    comment_params: ClassVar[frozenset[str]] = frozenset({"comment", "appointmentNote"})
    identifier_only_book: ClassVar[bool] = True

    def book_parameter(self, name: str | None, prm: s.Param, path: str, extras: _BookExtras) -> None:
        if name == "patient":
            ident = prm.valueIdentifier
            if ident is not None and ident.value:
                extras.participants.append(
                    Participant(kind="Patient", reference=f"Patient/{ident.value}", path=f"{path}.valueIdentifier",
                                system=ident.system or None)
                )
            else:
                extras.unresolved.append(path)
        elif name == "appointment":
            ident = prm.valueIdentifier
            if ident is not None and ident.value:
                extras.identifiers.append(Identifier(value=ident.value, system=ident.system))

    def _missing_appointment(self) -> Unprocessable:
        return Unprocessable(
            "$book Parameters carry neither an appt-resource Appointment nor Epic's patient and "
            "appointment identifiers",
            expression=(_MISSING_APPT, "Parameters.parameter.where(name='appointment')"),
        )
