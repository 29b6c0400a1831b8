"""Property-based tests: no bad input hurts the gateway (issue 5).

Whatever arrives (arbitrary bytes, arbitrary JSON, or a real corpus payload with keys dropped, values
of the wrong JSON type, deep nesting, huge or odd unicode strings), the adapters and the booking path
either accept it or refuse it with a 400/422 GatewayError, and the HTTP layer answers below 500 with
an OperationOutcome, never a stack trace. Refusals never repeat values from the input: a marker
string planted in the payload must not show up in any issue (code-invalid issues excepted, which by
design quote the code and system that have no mapping: codes are not patient data).

Examples are bounded and derandomized (the `fuzz` profile below), and no example database is written,
so the suite is reproducible and leaves no `.hypothesis/` folder behind.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from adapters import ADAPTERS, get_adapter
from gateway.booking.booker import Booker, Prepared
from gateway.canonical import CanonicalBooking
from gateway.booking.codemaps import load_all
from gateway.errors import GatewayError, InvalidRequest, Unprocessable
from gateway.booking.fhir import error_body
from gateway.state.idempotency import fingerprint, key_material
from gateway.settings import load_file_settings
from tests.conftest import CLIENT_ID, CLIENT_SECRET, CONFIG, CORPUS, KEYS, make_settings
from tests.test_corpus import EXPECTED, NOT_BOOKINGS

settings.register_profile(
    "fuzz",
    derandomize=True,  # the same examples on every run and every machine
    database=None,  # no .hypothesis/ folder
    deadline=None,  # the first examples pay for imports and connections
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("fuzz")
EXAMPLES = 200  # per adapter/booking property
HTTP_EXAMPLES = 150  # per HTTP property

# -- what a payload can be made of --------------------------------------------------------------

# corpus file -> source (and so adapter) it is a booking for; the $find requests go to epic
CORPUS_FILES: dict[str, str] = {name: source for name, (source, _) in EXPECTED.items()}
CORPUS_FILES.update({name: "epic" for name in NOT_BOOKINGS})
DOCS: dict[str, Any] = {name: json.loads((CORPUS / name).read_bytes()) for name in sorted(CORPUS_FILES)}

# a marker that cannot occur in a path, a JSON type name or a message by chance
markers = st.integers(0, 16**8 - 1).map(lambda n: f"MK{n:08x}")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# keys the Structs declare, so random objects get decoded deeply instead of skipped
FHIR_KEYS = st.sampled_from(
    "resourceType identifier system value status serviceCategory serviceType specialty appointmentType "
    "start end comment slot participant actor reference coding code display text parameter name "
    "valueString valueUri valueIdentifier valueReference resource fullUrl extension url".split()
)
fhir_json = st.recursive(
    scalars | st.sampled_from(["Appointment", "Parameters", "Slot/1", "Patient/1", "appt-resource"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(FHIR_KEYS | st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)

PathT = tuple[str | int, ...]


def _paths(doc: Any, here: PathT = ()) -> Iterator[PathT]:
    yield here
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*here, i))


def _get(doc: Any, path: PathT) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _set(doc: Any, path: PathT, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"resource": value}
    return value


_BAD_UTF8 = "<not-utf-8>"


@st.composite
def mutated(draw: st.DrawFn, marker: str) -> tuple[str, bytes]:
    """A corpus payload with one to four mutations; returns (its source, the body bytes)."""
    name = draw(st.sampled_from(sorted(DOCS)))
    doc = json.loads(json.dumps(DOCS[name]))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        old = _get(doc, path)
        op = draw(st.sampled_from([
            "drop", "json", "marker", "marker-in", "wrap", "unwrap", "nest", "huge", "unicode",
            "scalar", "add-key", "dup", "bad-utf8",
        ]))
        if op == "drop" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif op == "json":
            doc = _set(doc, path, draw(fhir_json))
        elif op == "marker":
            doc = _set(doc, path, marker)
        elif op == "marker-in":  # the marker where a string is expected, one level down
            doc = _set(doc, path, draw(st.sampled_from([
                {"reference": marker}, [{"reference": marker}], {"value": marker, "system": marker},
                [{"coding": [{"system": marker, "code": marker}], "text": marker}], f"Patient/{marker}",
                f"Slot/{marker}", f"http://x/{marker}/Slot/{marker}", f"#{marker}", [marker],
            ])))
        elif op == "wrap":
            doc = _set(doc, path, [old])
        elif op == "unwrap" and isinstance(old, list) and old:
            doc = _set(doc, path, old[0])
        elif op == "nest":
            doc = _set(doc, path, _nest(old, draw(st.integers(1, 40)), draw(st.booleans())))
        elif op == "huge":
            doc = _set(doc, path, marker * draw(st.integers(1, 20_000)))
        elif op == "unicode":
            doc = _set(doc, path, draw(st.text(min_size=1, max_size=30)) + marker)
        elif op == "bad-utf8":  # a string with bytes that are not UTF-8, patched in after dumps
            doc = _set(doc, path, marker + _BAD_UTF8)
        elif op == "scalar":
            doc = _set(doc, path, draw(scalars))
        elif op == "add-key" and isinstance(old, dict):
            old[draw(FHIR_KEYS | st.just(marker))] = draw(st.sampled_from([marker, [marker], {"x": marker}]))
        elif op == "dup" and isinstance(old, list) and old:
            old.append(json.loads(json.dumps(old[-1])))
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode().replace(_BAD_UTF8.encode(), b"\xff\xc3(")
    if draw(st.integers(0, 4)) == 0:  # now and then, break the bytes too
        cut = draw(st.integers(0, len(body)))
        body = draw(st.sampled_from([body[:cut], body[:cut] + b"\xff" + body[cut:], body + b"}", body + b" x", b"\xef\xbb\xbf" + body]))
    return CORPUS_FILES[name], body


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def payloads(marker: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(_encode),
        fhir_json.map(_encode),
        st.fixed_dictionaries({"resourceType": st.sampled_from(["Appointment", "Parameters"])}, optional={
            k: fhir_json for k in ("participant", "slot", "serviceCategory", "parameter", "start", "identifier")
        }).map(_encode),
        mutated(marker).map(lambda x: x[1]),
    )


# -- checks -------------------------------------------------------------------------------------


def _assert_quiet(error: GatewayError, marker: str, *, codes_may_show: bool = False) -> None:
    """A 4xx whose OperationOutcome repeats nothing of the input."""
    assert 400 <= error.status < 500, (type(error), error.status)
    assert error.issues
    for issue in error.issues:
        if codes_may_show and issue.code == "code-invalid":
            continue  # names the unmapped code and system by design
        assert marker not in issue.diagnostics, issue
        assert not any(marker in e for e in issue.expression), issue
    outcome = msgspec.json.decode(error_body(error))
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"]


def _check_parse(body: bytes, marker: str) -> None:
    for name in ADAPTERS:
        try:
            booking = get_adapter(name).parse(body)
        except GatewayError as exc:
            assert isinstance(exc, (InvalidRequest, Unprocessable)) and exc.status in (400, 422), exc
            _assert_quiet(exc, marker)
        else:
            assert isinstance(booking, CanonicalBooking)
            fingerprint(booking)  # the idempotency record encodes it


# -- the adapters -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=EXAMPLES)
@given(body=st.binary(max_size=300), marker=markers)
# found by these properties: a wrong type before broken JSON, and bad UTF-8 inside a string (both 500s)
@example(body=b'{"resourceType": ["Appointment"]} x', marker="MK")
@example(body=b'{"resourceType": "\xffAppointment"}', marker="MK")
@example(body=b'{"resourceType": {"\xff": 1}}', marker="MK")
@example(body=b'{"resourceType": "Parameters", "parameter": [{"name": "appt-resource", '
         b'"resource": {"resourceType": "Appointment", "comment": "\xfe"}}]}', marker="MK")
def test_adapters_arbitrary_bytes(body: bytes, marker: str):
    _check_parse(body, marker)


@settings(FUZZ, max_examples=EXAMPLES)
@given(value=json_values | fhir_json, marker=markers)
def test_adapters_arbitrary_json(value: Any, marker: str):
    _check_parse(_encode(value), marker)


@settings(FUZZ, max_examples=EXAMPLES)
@given(data=st.data(), marker=markers)
def test_adapters_mutated_corpus(data: st.DataObject, marker: str):
    _, body = data.draw(mutated(marker))
    _check_parse(body, marker)


# -- code maps and rules (the dry run) ----------------------------------------------------------


@pytest.fixture(scope="module")
def booker() -> Booker:
    file = load_file_settings(CONFIG)
    return Booker(file.sources, load_all(CONFIG, list(file.sources)))


@settings(FUZZ, max_examples=EXAMPLES)
@given(data=st.data(), marker=markers)
def test_prepare_mutated_corpus(booker: Booker, data: st.DataObject, marker: str):
    source, body = data.draw(mutated(marker))
    # its own source most of the time, another dialect now and then
    source = data.draw(st.sampled_from([source, source, source, *KEYS]))
    try:
        prepared = booker.prepare(source, body)
    except GatewayError as exc:
        _assert_quiet(exc, marker, codes_may_show=True)
    else:
        assert isinstance(prepared, Prepared)
        msgspec.json.encode(prepared.mapped.request)  # what would be sent to Salesforce
        key_material(None, prepared.booking, fingerprint(prepared.booking))


# -- the HTTP layer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(redis_url: str, key_prefix: str) -> Iterator[str]:
    """One sandbox and one gateway for the module: @given runs many examples against them."""
    from gateway.app import create_app
    from gateway.sandbox import SandboxConfig, create_sandbox_app
    from gateway.edges.server import ThreadedServer

    with ThreadedServer(create_sandbox_app(SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET))) as sandbox:
        settings_ = make_settings(redis_url, f"{key_prefix}:fuzz-{uuid.uuid4().hex[:6]}", sandbox.url)
        with ThreadedServer(create_app(settings_)) as server:  # type: ignore[arg-type]
            yield server.url


# header values as bytes: any valid HTTP/1.1 field value (RFC 9110: visible ASCII, space and tab
# inside, obs-text 0x80-0xff). Controls and DEL make the request itself malformed: uvicorn's parser
# answers those with its own plain-text 400 before the app sees them, so they are not sent here.
_FIELD = frozenset(b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)))
header_bytes = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c in _FIELD).strip(b" \t"))
ODD_SOURCES = ["athena", "CERNER", "c%C3%A9rner", "%00", "hl7v2", "x" * 300, "%2e%2e", "cerner%2F"]
operations = st.sampled_from(["/Appointment", "/Appointment/$book", "/Appointment/$translate"])
_MEDIA_OK = [b"application/fhir+json", b"application/json", b"application/json; charset=utf-8",
             b"APPLICATION/FHIR+JSON;fhirVersion=4.0"]
_MEDIA_BAD = [b"text/plain", b"", b"application/xml", b"application/", b";", b"application/json;;;=",
              b"multipart/form-data; boundary=x", b"application/fhir+json\xff", b"application/jsonx"]
media = st.sampled_from(_MEDIA_OK) | st.sampled_from(_MEDIA_OK + _MEDIA_BAD) | header_bytes
idempotency_keys = st.sampled_from([
    b"", b'"', b'""', b'"abc"', b"x" * 255, b"x" * 256, b"\xc3\xa9t\xc3\xa9", b"\x80", b"a\tb", b"{}",
    b"key with spaces", b"\xff\xfe", b"%00",
]) | header_bytes


@st.composite
def authorizations(draw: st.DrawFn, source: str) -> bytes | None:
    good = KEYS.get(source, KEYS["cerner"])
    # half the time a key that is let in, so the other headers and the body are reached
    accepted = st.sampled_from([f"Bearer {good}", f"bearer   {good}", f"BEARER {good}"]).map(str.encode)
    refused = st.sampled_from([
        None, b"", b"Bearer", f"Bearer\t{good}".encode(), f"Basic {good}".encode(), f"Bearer {KEYS['epic']}".encode(),
        f"Bearer {good}\xff".encode("latin-1"), f"Bearer {good} {good}".encode(),
    ]) | header_bytes | header_bytes.map(lambda b: b"Bearer " + b)
    return draw(accepted if draw(st.sampled_from([True, True, False])) else refused)


_BOOKS = (CORPUS / "cerner-millennium-r4/r4_appointment_video_visit_entry.json").read_bytes()


def _assert_answer(r: httpx.Response) -> None:
    event(f"HTTP {r.status_code}")  # shown by --hypothesis-show-statistics
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"], outcome


def _post(base_url: str, path: str, body: bytes, headers: dict[str, bytes | None]) -> httpx.Response:
    # h11 (httpx) refuses to send a value with edge whitespace: the server never sees one either
    sent = {k: v.strip(b" \t") for k, v in headers.items() if v is not None}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        return client.post(path, content=body, headers=sent)


@settings(FUZZ, max_examples=HTTP_EXAMPLES)
@given(data=st.data(), marker=markers)
def test_http_bodies(base_url: str, data: st.DataObject, marker: str):
    """Good key and media type, any body: only the body's own problems come back."""
    source = data.draw(st.sampled_from(list(KEYS)))
    path = f"/fhir/{source}" + data.draw(operations)
    body = data.draw(payloads(marker))
    r = _post(base_url, path, body, {"Authorization": f"Bearer {KEYS[source]}".encode(),
                                     "Content-Type": b"application/fhir+json"})
    _assert_answer(r)


@settings(FUZZ, max_examples=HTTP_EXAMPLES)
@given(data=st.data(), marker=markers)
def test_http_headers_and_paths(base_url: str, data: st.DataObject, marker: str):
    """Odd keys, media types and Idempotency-Key values, with any body (or one that books)."""
    source = data.draw(st.sampled_from([*KEYS] * 6 + ODD_SOURCES))  # mostly one that routes
    path = f"/fhir/{source}" + data.draw(operations)
    headers = {
        "Authorization": data.draw(authorizations(source)),
        "Content-Type": data.draw(media | st.none()),
        "Idempotency-Key": data.draw(idempotency_keys | st.none()),
    }
    # the one corpus file that books, so odd keys and media types also reach the Salesforce call
    body = data.draw(st.sampled_from([b"", b"{}", _BOOKS, _BOOKS]) | payloads(marker))
    _assert_answer(_post(base_url, path, body, headers))
