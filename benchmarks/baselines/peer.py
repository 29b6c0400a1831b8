"""(c) The peer: a typical hand-rolled gateway, what a competent team writes in an afternoon.

FastAPI with pydantic v2 models of the FHIR Appointment fields it uses, a dict-based code map built
from the same ConceptMap files as the gateway's, idempotency with `redis.asyncio` (`SET key NX EX`
claims the key; the answer is stored after booking and a replay returns it), and a default
`httpx.AsyncClient()` created once at start-up. It answers a FHIR-ish Appointment. Same request
(body, `Authorization: Bearer <key>`, `Idempotency-Key`) as the gateway.

Environment: SALESFORCE_LOGIN_URL, SALESFORCE_CLIENT_ID, SALESFORCE_CLIENT_SECRET (client
credentials), REDIS_URL, PEER_API_KEYS_SHA256 (comma-separated digests of the accepted keys),
PEER_KEY_PREFIX (default "peer"), PEER_CODEMAPS (default config/codemaps).

    .venv/bin/python -m benchmarks.baselines.peer --port 8002
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import redis.asyncio as redis
from fastapi import Depends, FastAPI, Header, HTTPException, Response
from pydantic import BaseModel

from benchmarks.baselines.common import env, run

API_VERSION = env("SALESFORCE_API_VERSION", "66.0")
BOOK_PATH = f"/services/data/v{API_VERSION}/connect/health/appointment-management/appointment"
IDEMPOTENCY_TTL = 72 * 3600
PENDING = b"pending"

# per source: what the gateway's config/gateway.toml says about it
SOURCES = {"cerner": {"source_system": "cerner", "time_zone": "America/Chicago"}}
TARGET = "urn:ehr-gateway:salesforce:"
KIND = {"Location": "Facility"}  # FHIR Location/ is Salesforce's Facility/


# --------------------------------------------------------------------------- FHIR models


class Coding(BaseModel):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class CodeableConcept(BaseModel):
    coding: list[Coding] = []
    text: str | None = None


class Reference(BaseModel):
    reference: str | None = None
    display: str | None = None


class Identifier(BaseModel):
    system: str | None = None
    value: str


class Participant(BaseModel):
    type: list[CodeableConcept] = []
    actor: Reference | None = None
    required: str | None = None
    status: str


class Appointment(BaseModel):
    resourceType: Literal["Appointment"]
    id: str | None = None
    identifier: list[Identifier] = []
    status: str
    serviceCategory: list[CodeableConcept] = []
    serviceType: list[CodeableConcept] = []
    specialty: list[CodeableConcept] = []
    appointmentType: CodeableConcept | None = None
    reasonCode: list[CodeableConcept] = []
    description: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    minutesDuration: int | None = None
    slot: list[Reference] = []
    comment: str | None = None
    participant: list[Participant]


class BookedParticipant(BaseModel):
    actor: Reference
    status: str = "accepted"


class BookedAppointment(BaseModel):
    resourceType: Literal["Appointment"] = "Appointment"
    id: str
    status: str = "booked"
    identifier: list[Identifier]
    start: datetime | None = None
    end: datetime | None = None
    slot: list[Reference] = []
    participant: list[BookedParticipant]


# --------------------------------------------------------------------------- Salesforce models


class SfParticipant(BaseModel):
    reference: str


class SfSlot(BaseModel):
    id: str
    reference: str


class SfBookingRequest(BaseModel):
    participants: list[SfParticipant]
    startDate: str | None = None
    endDate: str | None = None
    workTypeId: str | None = None
    timeZone: str | None = None
    sourceSystem: str | None = None
    appointmentTypes: list[str] | None = None
    serviceTypes: list[str] | None = None
    serviceCategories: list[str] | None = None
    specialties: list[str] | None = None
    slots: list[SfSlot] | None = None
    comment: str | None = None


# --------------------------------------------------------------------------- code map


def load_code_map(folder: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(system, code) -> [(Salesforce field, code)], from every ConceptMap in the folder."""
    code_map: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for path in sorted(folder.glob("*.json")):
        concept_map = json.loads(path.read_text())
        for group in concept_map.get("group", []):
            field = group["target"].removeprefix(TARGET)
            for element in group.get("element", []):
                for target in element.get("target", []):
                    code_map.setdefault((group["source"], element["code"]), []).append((field, target["code"]))
    return code_map


def to_salesforce(appt: Appointment, source: str, code_map: dict[tuple[str, str], list[tuple[str, str]]]) -> SfBookingRequest:
    fields: dict[str, list[str]] = {}
    concepts = [*appt.serviceType, *appt.serviceCategory, *appt.specialty, *appt.reasonCode]
    if appt.appointmentType:
        concepts.append(appt.appointmentType)
    for concept in concepts:
        for coding in concept.coding:
            for field, code in code_map.get((coding.system or "", coding.code or ""), []):
                if code not in fields.setdefault(field, []):
                    fields[field].append(code)
    participants = []
    practitioner = None
    for p in appt.participant:
        ref = p.actor.reference if p.actor else None
        if not ref or ref.startswith("#") or "/" not in ref:
            continue
        kind, ident = ref.split("/", 1)
        if kind == "Practitioner" and practitioner is None:
            practitioner = ref
        participants.append(SfParticipant(reference=f"{KIND.get(kind, kind)}/{ident}"))
    if not any(p.reference.startswith("Patient/") for p in participants):
        raise HTTPException(422, "the appointment has no patient")
    if "workTypeId" not in fields:
        raise HTTPException(422, "no work type for this appointment's codes")
    iso = lambda d: d.isoformat().replace("+00:00", "Z") if d else None  # noqa: E731
    cfg = SOURCES[source]
    return SfBookingRequest(
        participants=participants,
        startDate=iso(appt.start),
        endDate=iso(appt.end),
        workTypeId=fields["workTypeId"][0],
        timeZone=cfg["time_zone"],
        sourceSystem=cfg["source_system"],
        appointmentTypes=fields.get("appointmentTypes"),
        serviceTypes=fields.get("serviceTypes"),
        serviceCategories=fields.get("serviceCategories"),
        specialties=fields.get("specialties"),
        slots=[SfSlot(id=s.reference.split("/")[-1], reference=practitioner or "") for s in appt.slot if s.reference] or None,
        comment=appt.comment,
    )


# --------------------------------------------------------------------------- app

state: dict[str, Any] = {}


async def get_token(client: httpx.AsyncClient) -> tuple[str, str]:
    response = await client.post(
        env("SALESFORCE_LOGIN_URL").rstrip("/") + "/services/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": env("SALESFORCE_CLIENT_ID"),
              "client_secret": env("SALESFORCE_CLIENT_SECRET")},
    )
    response.raise_for_status()
    token = response.json()
    return token["access_token"], token["instance_url"].rstrip("/")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state["code_map"] = load_code_map(Path(env("PEER_CODEMAPS", "config/codemaps")) / "cerner")
    state["keys"] = {d.strip() for d in env("PEER_API_KEYS_SHA256", "").split(",") if d.strip()}
    state["prefix"] = env("PEER_KEY_PREFIX", "peer")
    state["redis"] = redis.Redis.from_url(env("REDIS_URL"))
    state["http"] = httpx.AsyncClient()
    state["token"], state["instance_url"] = await get_token(state["http"])
    try:
        yield
    finally:
        await state["http"].aclose()
        await state["redis"].aclose()


app = FastAPI(title="peer gateway", lifespan=lifespan)


async def api_key(authorization: str | None = Header(None)) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or hashlib.sha256(key.strip().encode()).hexdigest() not in state["keys"]:
        raise HTTPException(401, "invalid API key")
    return key


async def book_in_salesforce(request: SfBookingRequest) -> dict[str, Any]:
    client: httpx.AsyncClient = state["http"]
    for attempt in range(2):
        response = await client.post(
            state["instance_url"] + BOOK_PATH,
            json=request.model_dump(exclude_none=True),
            headers={"Authorization": f"Bearer {state['token']}"},
        )
        if response.status_code == 401 and attempt == 0:
            state["token"], state["instance_url"] = await get_token(client)
            continue
        break
    if response.status_code not in (200, 201):
        raise HTTPException(502 if response.status_code >= 500 else 422, f"Salesforce answered {response.status_code}")
    answer = response.json()
    if isinstance(answer, list):
        answer = answer[0]
    if not answer.get("isSuccess", True) or not answer.get("id"):
        raise HTTPException(422, "Salesforce refused the booking")
    return answer


@app.post("/fhir/{source}/Appointment", status_code=201)
async def book(
    source: str,
    appointment: Appointment,
    key: str = Depends(api_key),
    idempotency_key: str | None = Header(None),
) -> Response:
    if source not in SOURCES:
        raise HTTPException(404, "unknown source")
    if not idempotency_key:
        raise HTTPException(400, "Idempotency-Key is required")
    r: redis.Redis = state["redis"]
    record = f"{state['prefix']}:idem:{source}:{idempotency_key}"
    if not await r.set(record, PENDING, nx=True, ex=IDEMPOTENCY_TTL):
        stored = await r.get(record)
        if stored is None or stored == PENDING:
            raise HTTPException(409, "a booking with this key is in progress")
        return Response(stored, status_code=201, media_type="application/fhir+json", headers={"Idempotent-Replayed": "true"})
    try:
        sf_request = to_salesforce(appointment, source, state["code_map"])
        booked = await book_in_salesforce(sf_request)
    except BaseException:
        await r.delete(record)  # let the EHR retry
        raise
    answer = BookedAppointment(
        id=booked["id"],
        identifier=[*appointment.identifier, Identifier(system="urn:ehr-gateway:salesforce:appointment", value=booked["id"])],
        start=appointment.start,
        end=appointment.end,
        slot=[Reference(reference=s.reference) for s in appointment.slot],
        participant=[BookedParticipant(actor=Reference(reference=p.actor.reference))
                     for p in appointment.participant if p.actor and p.actor.reference and not p.actor.reference.startswith("#")],
    )
    body = answer.model_dump_json(exclude_none=True)
    await r.set(record, body, ex=IDEMPOTENCY_TTL)
    return Response(body, status_code=201, media_type="application/fhir+json",
                    headers={"Location": f"/fhir/{source}/Appointment/{booked['id']}"})


if __name__ == "__main__":
    run(app, "(c) peer: FastAPI + pydantic + httpx + redis-py SET NX")
