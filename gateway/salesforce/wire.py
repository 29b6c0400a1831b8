"""Salesforce's wire shapes, as msgspec Structs. A leaf module: imports nothing of the gateway."""

from __future__ import annotations

from datetime import datetime

import msgspec


class SfParticipant(msgspec.Struct, frozen=True, omit_defaults=True):
    reference: str
    isReferenceRequired: bool | None = None


class SfSlot(msgspec.Struct, frozen=True):
    id: str
    reference: str


class BookingRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """Body of `POST …/connect/health/appointment-management/appointment` (and PUT, with `id`)."""

    participants: tuple[SfParticipant, ...]
    startDate: str | None = None
    endDate: str | None = None
    workTypeId: str | None = None
    channelId: str | None = None
    timeZone: str | None = None
    sourceSystem: str | None = None
    appointmentTypes: tuple[str, ...] | None = None
    serviceTypes: tuple[str, ...] | None = None
    serviceCategories: tuple[str, ...] | None = None
    specialties: tuple[str, ...] | None = None
    slots: tuple[SfSlot, ...] | None = None
    comment: str | None = None
    id: str | None = None


class SlotResource(msgspec.Struct, frozen=True, omit_defaults=True):
    """One resource whose free slots Get Slots is asked for."""

    resourceId: str
    resourceType: str | None = None
    serviceTerritoryId: str | None = None
    serviceResourceId: str | None = None


class SlotsRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """Body of `POST …/appointment-management/slots`: Get Slots."""

    resources: tuple[SlotResource, ...]
    startDate: str
    endDate: str
    channelId: str | None = None
    workTypeId: str | None = None
    sourceSystem: str | None = None
    appointmentTypes: tuple[str, ...] | None = None
    serviceCategories: tuple[str, ...] | None = None
    serviceTypes: tuple[str, ...] | None = None


class AvailableSlot(msgspec.Struct, frozen=True):
    """One free slot of Get Slots' answer (its "Get Slots Output")."""

    slotId: str
    slotStartDate: str
    slotEndDate: str
    sourceSystem: str | None = None


class ResourceSlotDetails(msgspec.Struct, frozen=True):
    """The free slots of one resource the request named."""

    resourceId: str
    availableSlots: tuple[AvailableSlot, ...] = ()


class SlotsAnswer(msgspec.Struct, frozen=True):
    """Get Slots' answer: `{"resourceSlotDetails": [{"resourceId", "availableSlots": [...]}]}`."""

    resourceSlotDetails: tuple[ResourceSlotDetails, ...]


class FreeSlot(msgspec.Struct, frozen=True):
    """A free slot as the client hands it on: its times read (a time Salesforce wrote without a zone
    is UTC, and `zone_assumed` says so), with the resource of the request it belongs to."""

    id: str
    start: datetime
    end: datetime
    resource_type: str  # the request's resourceType: "Provider" or "Device"
    resource_id: str
    zone_assumed: bool = False


class FoundSlots(msgspec.Struct, frozen=True):
    """What a Get Slots call found, and how many slots of its answer could not be read (left out)."""

    slots: tuple[FreeSlot, ...]
    unread: int = 0


class CancelRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """Body of `PATCH …/appointment-management/appointment/{id}`: Cancel."""

    id: str
    status: str  # "Cancelled"; no default, since omit_defaults would leave a default out of the body
    cancellationReason: str | None = None
    comment: str | None = None


class SfError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One Salesforce error: `{"message", "errorCode", "fields"}`."""

    message: str | None = None
    errorCode: str | None = None
    fields: list[str] | None = None


class TokenAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    """The OAuth token endpoint's answer. Salesforce sends no `expires_in` and no refresh token."""

    access_token: str
    instance_url: str
    token_type: str = "Bearer"
    issued_at: str | None = None
    id: str | None = None
    signature: str | None = None
    scope: str | None = None


class CompositeSub(msgspec.Struct, frozen=True, omit_defaults=True):
    """One subrequest of `POST …/composite`: `url` under /services/data/vXX.X/; a later one may name an
    earlier one's answer as `@{referenceId.field}`."""

    method: str
    url: str
    referenceId: str
    body: dict[str, object] | None = None
    httpHeaders: dict[str, str] | None = None


class CompositeRequest(msgspec.Struct, frozen=True):
    compositeRequest: tuple[CompositeSub, ...]
    allOrNone: bool = False


class CompositeSubAnswer(msgspec.Struct, frozen=True):
    """One subrequest's answer: its status and body (a query's result, a create's id, an error list)."""

    httpStatusCode: int
    referenceId: str
    body: object = None


class CompositeAnswer(msgspec.Struct, frozen=True):
    compositeResponse: tuple[CompositeSubAnswer, ...]

