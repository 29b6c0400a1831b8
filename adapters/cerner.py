"""Oracle Health (Cerner) Millennium R4.

What differs from plain R4 is mostly data, which the common parser already keeps as sent: tenant
code-set systems (`https://fhir.cerner.com/<tenant>/codeSet/14249`) stay the Coding.system, so code
maps are keyed by the exact tenant URI; resource participants with a `type` and a display-only actor,
and contained `#id` actors (video-visit rooms), land in `unresolved_participants`; `Slot/<id>` ids
such as `24477854-21304876-62852027-0` are kept whole. A Bundle entry (`{"fullUrl", "resource"}`, the
shape of Cerner's read examples) is refused with 400 like any body without a resourceType.

The one hook: Cerner's extensions (`https://fhir-ehr.cerner.com/r4/StructureDefinition/…`) are
tolerated, and a non-empty `action-comment` is used as the comment when `Appointment.comment` is
absent (`comment_path` then names `extension[i].valueString`). It is the staff's note on the action
(e.g. on a cancel), which is what Salesforce's comment holds; Appointment.comment wins when both are
sent, so nothing is concatenated.
"""

from __future__ import annotations

from typing import ClassVar

from . import _shapes as s
from .r4 import R4Adapter

ACTION_COMMENT = "https://fhir-ehr.cerner.com/r4/StructureDefinition/action-comment"


class CernerAdapter(R4Adapter):
    name: ClassVar[str] = "cerner"
    body_type: ClassVar[type[s.Body]] = s.CernerBody

    def fallback_comment(self, appt: s.Body, prefix: str) -> tuple[str | None, str | None]:
        for i, ext in enumerate(getattr(appt, "extension", None) or ()):
            if ext.url == ACTION_COMMENT and ext.valueString:
                return ext.valueString, f"{prefix}.extension[{i}].valueString"
        return None, None
