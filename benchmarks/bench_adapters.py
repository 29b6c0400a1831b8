"""Time `Adapter.parse` on corpus bodies: `python benchmarks/bench_adapters.py [iterations]`.

Prints µs per parse for each file (best of 3 runs of N iterations, default 50_000)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters import get_adapter  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"

CASES = [
    ("cerner", "cerner-millennium-r4/r4_appointment_create.json"),
    ("cerner", "cerner-millennium-r4/r4_appointment_video_visit_entry.json"),
    ("cerner", "cerner-millennium-r4/r4_proposed_appointment_create.json"),
    ("fhir", "fhir-r4-official/Appointment-example.json"),
    ("fhir", "fhir-r4-official/Appointment-examplereq.json"),
    ("epic", "epic/epic-stu3-appointment-book-request.json"),
]


def bench(adapter_name: str, body: bytes, n: int) -> float:
    parse = get_adapter(adapter_name).parse
    parse(body)  # warm up, and fail loudly if the body does not parse
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            parse(body)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    print(f"{'adapter':8} {'file':62} {'bytes':>6} {'µs/parse':>9}")
    for adapter_name, rel in CASES:
        body = (CORPUS / rel).read_bytes()
        us = bench(adapter_name, body, n)
        print(f"{adapter_name:8} {rel:62} {len(body):6d} {us:9.2f}")


if __name__ == "__main__":
    main()
