"""An EHR twin's calendar: schedules with free slots on a fixed grid, a slot taken only once, and
the appointments made on it, each with a version that every change moves on.

The twin is served from a background thread while a test reads it from its own, so every access
goes through one lock and readers get copies, never live objects.
"""

from __future__ import annotations

import itertools
import threading
from datetime import date, datetime, timedelta, timezone

import msgspec

from gateway.twins.config import TwinConfig, TwinSchedule


class Slot(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # <schedule id>-<YYYYMMDDHHMM>: the schedule and start can be read back from it
    schedule: TwinSchedule
    start: datetime
    end: datetime
    status: str  # free | busy


class Appointment(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    slot: str
    schedule: TwinSchedule
    start: datetime
    end: datetime
    patient: str
    status: str  # booked | cancelled | proposed
    version: int
    identifiers: tuple[tuple[str, str], ...] = ()  # (system, value) the booking carried
    comment: str | None = None
    cancel_reason: str | None = None


class Taken(Exception):
    """The slot is no longer free."""


class Calendar:
    def __init__(self, config: TwinConfig) -> None:
        self._config = config
        self._schedules = {s.id: s for s in config.all_schedules()}
        first = date.fromisoformat(config.start_date) if config.start_date else datetime.now(timezone.utc).date()
        self._first = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
        self._lock = threading.Lock()
        self._taken: dict[str, str] = {}  # slot id -> appointment id
        self._appointments: dict[str, Appointment] = {}
        self._numbers = itertools.count(config.first_number)
        self._extra: dict[str, Slot] = {}  # the booked ones' slots, off the grid
        self._hold_booked()

    def _hold_booked(self) -> None:
        for b in self._config.booked:
            start, end = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (b.start, b.end))
            self._extra[b.slot_id] = Slot(id=b.slot_id, schedule=b.schedule, start=start, end=end, status="busy")
            self._taken[b.slot_id] = b.appointment_id
            self._appointments[b.appointment_id] = Appointment(
                id=b.appointment_id, slot=b.slot_id, schedule=b.schedule, start=start, end=end, patient=b.patient,
                status="booked", version=0)

    @property
    def schedules(self) -> list[TwinSchedule]:
        return list(self._schedules.values())

    def _starts(self, start: datetime, end: datetime) -> list[datetime]:
        c, step, found = self._config, timedelta(minutes=self._config.slot_minutes), []
        for day in range(c.days):
            moment = self._first + timedelta(days=day, hours=c.day_start_hour)
            close = self._first + timedelta(days=day, hours=c.day_end_hour)
            while moment + step <= close:
                if start <= moment < end:
                    found.append(moment)
                moment += step
        return found

    def _slot(self, schedule: TwinSchedule, start: datetime) -> Slot:
        sid = f"{schedule.id}-{start:%Y%m%d%H%M}"
        return Slot(id=sid, schedule=schedule, start=start, end=start + timedelta(minutes=self._config.slot_minutes),
                    status="busy" if sid in self._taken else "free")

    def slots(self, start: datetime, end: datetime, schedules: list[TwinSchedule] | None = None,
              *, free_only: bool = True) -> list[Slot]:
        """Slots starting in [start, end), sorted by start, then schedule."""
        with self._lock:
            found = [self._slot(s, t) for t in self._starts(start, end) for s in (schedules or self.schedules)]
        return [s for s in found if s.status == "free" or not free_only]

    def slot(self, slot_id: str) -> Slot | None:
        extra = self._extra.get(slot_id)
        if extra is not None:
            with self._lock:
                return msgspec.structs.replace(extra, status="busy" if slot_id in self._taken else "free")
        schedule_id, _, stamp = slot_id.rpartition("-")
        schedule = self._schedules.get(schedule_id)
        try:
            start = datetime.strptime(stamp, "%Y%m%d%H%M").replace(tzinfo=timezone.utc)
        except ValueError:
            return None
        if schedule is None or start not in self._starts(start, start + timedelta(minutes=1)):
            return None
        with self._lock:
            return self._slot(schedule, start)

    def book(self, slot_id: str, patient: str, *, identifiers: tuple[tuple[str, str], ...] = (),
             comment: str | None = None, status: str = "booked", exclusive: bool = True) -> Appointment:
        """Raises KeyError for an unknown slot, Taken for one no longer free. Not `exclusive`: a
        server that keeps no occupancy books the slot again and leaves it free."""
        slot = self.slot(slot_id)
        if slot is None:
            raise KeyError(slot_id)
        with self._lock:
            if slot_id in self._taken and exclusive:
                raise Taken(slot_id)
            appointment = Appointment(id=str(10_000_000 + next(self._numbers)), slot=slot_id, schedule=slot.schedule,
                                      start=slot.start, end=slot.end, patient=patient, status=status, version=0,
                                      identifiers=identifiers, comment=comment)
            if exclusive:
                self._taken[slot_id] = appointment.id
            self._appointments[appointment.id] = appointment
            return appointment

    def get(self, appointment_id: str) -> Appointment | None:
        with self._lock:
            return self._appointments.get(appointment_id)

    def cancel(self, appointment_id: str, reason: str | None = None) -> Appointment:
        """The appointment cancelled (its slot free again), at the next version; KeyError if unknown.
        Cancelling a cancelled appointment changes nothing."""
        with self._lock:
            found = self._appointments[appointment_id]
            if found.status == "cancelled":
                return found
            self._taken.pop(found.slot, None)
            changed = msgspec.structs.replace(found, status="cancelled", version=found.version + 1, cancel_reason=reason)
            self._appointments[appointment_id] = changed
            return changed

    def touch(self, appointment_id: str) -> Appointment:
        """The appointment at its next version, as after a change made elsewhere; KeyError if unknown."""
        with self._lock:
            found = self._appointments[appointment_id]
            changed = msgspec.structs.replace(found, version=found.version + 1)
            self._appointments[appointment_id] = changed
            return changed

    def appointments(self) -> list[Appointment]:
        with self._lock:
            return list(self._appointments.values())

    def find(self, *, patient: str | None = None, identifier: tuple[str, str] | None = None) -> list[Appointment]:
        """Appointments of a patient, or carrying an identifier: what a client looks up after a lost answer."""
        return [a for a in self.appointments()
                if (patient is None or a.patient == patient) and (identifier is None or identifier in a.identifiers)]

    def reset(self) -> None:
        with self._lock:
            self._taken.clear()
            self._appointments.clear()
        self._hold_booked()
