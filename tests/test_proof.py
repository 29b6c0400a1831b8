"""The exactly-once proof, bounded for the suite: 300 bookings, a third of them sent twice (at once
or again later), the sandbox failing a fifth of Book calls (a third before storing, a third dropping
the answer after storing, a third storing and then answering 503, 429 or 401), Redis killed and
restarted once, a gateway worker killed once, and a fifth of the bookings for patients the org comes to
know only during the run (held, then booked once each). The longer run is `benchmarks/exactly_once.py`; its
figures are in the README."""

from __future__ import annotations

from benchmarks.exactly_once import ProofOptions, run_proof


async def test_every_booking_is_exactly_one_appointment(tmp_path):
    opts = ProofOptions(bookings=300, workers=2, concurrency=32, fault_ratio=0.2, deadline_seconds=180)
    fig = await run_proof(opts, tmp_path)
    print("\n" + fig.table())
    # the run met what it was meant to meet
    assert fig.faults_before_store > 0 and fig.faults_dropped_after_store > 0 and fig.faults_answered_after_store > 0
    assert fig.redis_restarts == 1 and fig.workers_killed == 1
    assert fig.queued > 0 and fig.adopted > 0  # the queue and the look-up both did work
    # bookings whose patient the org came to know during the run were held, then each booked once
    assert fig.late > 0 and fig.held >= fig.late and fig.released == fig.late
    # and every booking is one appointment, answered with its id
    assert fig.refusals == [] and fig.refused == 0
    assert fig.acknowledged == fig.bookings == 300
    assert fig.appointments == 300 and fig.duplicates == 0 and fig.lost == 0
    assert fig.mismatched_answers == 0
    assert fig.sends > fig.bookings  # failures forced re-sends, and none of them doubled a booking
