"""Composite (`POST /services/data/vXX.X/composite`), from the REST API guide's
`resources-composite-composite-post` and its request and result pages.

Up to 25 subrequests, of which up to 5 queries, run in order in one API call. A later subrequest may use
an earlier one's answer in its `url` or `body` as `@{refId.field}` or `@{refId.records[0].Field}`; a
reference to a value that is not there (its subrequest failed, or the path leads nowhere) fails that
subrequest with PROCESSING_HALTED, naming the reference. With `allOrNone`, one failure rolls every write
of the call back: the failed subrequest keeps its error and every other one answers PROCESSING_HALTED.

Supported subrequests: `GET …/query?q=`, `GET …/sobjects/{Obj}/{id}`, `POST …/sobjects/{Obj}`,
`PATCH …/sobjects/Account/SourceSystemIdentifier/{value}`; any other answers 404 NOT_FOUND.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from gateway.sandbox import soql, sobjects
from gateway.sandbox.sobjects import NOT_FOUND, Result, allow_save, refused
from gateway.sandbox.state import SandboxState

MAX_SUBREQUESTS = 25
MAX_QUERIES = 5
METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")  # case-sensitive, as the subrequest page says
_REFERENCE_ID = re.compile(r"[A-Za-z0-9_]+")
_REFERENCE = re.compile(r"@\{([A-Za-z0-9_]+)((?:\.[A-Za-z0-9_]+|\[\d+\])+)\}")
_STEP = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]")
HALTED = "The transaction was rolled back since another operation in the same transaction failed."


class Subrequest(msgspec.Struct, forbid_unknown_fields=True):
    method: str
    url: str
    referenceId: str
    body: Any = None
    httpHeaders: dict[str, str] | None = None


class CompositeRequest(msgspec.Struct, forbid_unknown_fields=True):
    compositeRequest: list[Subrequest]
    allOrNone: bool = False
    collateSubrequests: bool = False  # accepted; the sandbox runs subrequests in order either way


def _parser_error(message: str) -> Result:
    return refused(400, {"message": message, "errorCode": "JSON_PARSER_ERROR"})


def decode(body: bytes, version: str) -> CompositeRequest | Result:
    """The request, or the 400 Salesforce answers before running anything (its sanity checks of the
    whole body: a missing `referenceId` is one, `'referenceId' is a required field.`)."""
    try:
        request = msgspec.json.decode(body, type=CompositeRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field `referenceId`" in text:
            return _parser_error("'referenceId' is a required field.")
        return _parser_error(f"Cannot deserialize the request body: {text}")  # names types and paths only
    except msgspec.DecodeError:
        return _parser_error("The request body is not valid JSON.")
    if not request.compositeRequest:
        return _parser_error("'compositeRequest' needs at least one subrequest.")
    seen: set[str] = set()
    prefix = f"/services/data/{version}/"
    for sub in request.compositeRequest:
        if _REFERENCE_ID.fullmatch(sub.referenceId) is None:
            return _parser_error("A referenceId may hold only letters, digits and underscores.")
        if sub.referenceId in seen:
            return _parser_error(f"Duplicate referenceId '{sub.referenceId}'.")
        seen.add(sub.referenceId)
        if sub.method not in METHODS:
            return _parser_error(f"Invalid method in subrequest '{sub.referenceId}'.")
        # inference from Composite Batch's page: an invalid url is refused before any subrequest runs
        if not sub.url.startswith(prefix):
            return _parser_error(f"The url of subrequest '{sub.referenceId}' must begin with {prefix}")
    return request


def _capped(request: CompositeRequest, version: str) -> Result | None:
    """Past the caps, one result with no referenceId, as orgs answer (seen: `LIMIT_EXCEEDED`, "The
    request can’t contain more than 25 operations."; the 5-query message follows it, an inference)."""
    queries = sum(1 for s in request.compositeRequest if _route(s.url, version)[0] in ("query", "queryAll"))
    if len(request.compositeRequest) > MAX_SUBREQUESTS:
        message = f"The request can’t contain more than {MAX_SUBREQUESTS} operations."
    elif queries > MAX_QUERIES:
        message = f"The request can’t contain more than {MAX_QUERIES} query operations."
    else:
        return None
    return Result(200, {"compositeResponse": [{"body": [{"errorCode": "LIMIT_EXCEEDED", "message": message}],
                                               "httpHeaders": {}, "httpStatusCode": 400, "referenceId": None}]})


def _route(url: str, version: str) -> tuple[str, list[str], str]:
    """A subrequest url's first path segment, all its segments and its query string."""
    rest = url[len(f"/services/data/{version}/"):]
    path, _, query = rest.partition("?")
    parts = [unquote(p) for p in path.split("/") if p]
    return (parts[0] if parts else ""), parts, query


# references -------------------------------------------------------------------------------------------


class _Missing(Exception):
    def __init__(self, reference: str, ref_id: str) -> None:
        super().__init__(reference)
        self.reference, self.ref_id = reference, ref_id


def _value(match: re.Match[str], done: Mapping[str, Result]) -> Any:
    ref_id, path = match.group(1), match.group(2)
    result = done.get(ref_id)
    if result is None or result.status >= 300:
        raise _Missing(match.group(0), ref_id)
    value: Any = result.body
    for name, index in _STEP.findall(path):
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            raise _Missing(match.group(0), ref_id)
    if value is None or isinstance(value, (dict, list)):
        raise _Missing(match.group(0), ref_id)
    return value


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _substitute(item: Any, done: Mapping[str, Result]) -> Any:
    """References in a string (a whole-string reference keeps its JSON type), list or object."""
    if isinstance(item, str):
        whole = _REFERENCE.fullmatch(item)
        if whole is not None:
            return _value(whole, done)
        return _REFERENCE.sub(lambda m: _text(_value(m, done)), item)
    if isinstance(item, list):
        return [_substitute(v, done) for v in item]
    if isinstance(item, dict):
        return {k: _substitute(v, done) for k, v in item.items()}
    return item


def _halted(message: str) -> Result:
    return refused(400, {"errorCode": "PROCESSING_HALTED", "message": message})


# running ----------------------------------------------------------------------------------------------


def call(state: SandboxState, version: str, method: str, url: str, body: Any, allow: bool,
         lenient: frozenset[str]) -> Result:
    """One REST call as a subrequest makes it (`url` already holds its references' values)."""
    first, parts, query = _route(url, version)
    if first == "query" and len(parts) == 1 and method == "GET":
        state.count("query_calls")
        q = parse_qs(query, keep_blank_values=True).get("q", [""])[0]
        if not q:
            return refused(400, {"message": "A query string (q) is required.", "errorCode": "MALFORMED_QUERY"})
        try:
            return Result(200, soql.execute(q, state, version, lenient))
        except soql.SoqlError as exc:
            return refused(400, {"message": exc.message, "errorCode": exc.code})
    if first != "sobjects":
        return NOT_FOUND
    if method == "GET" and len(parts) == 3:
        return sobjects.read(state, version, parts[1], parts[2], parse_qs(query).get("fields", [None])[0])
    if method == "POST" and len(parts) == 2:
        return sobjects.create(state.org, version, parts[1], body, allow_duplicates=allow)
    if method == "PATCH" and len(parts) == 4:
        return sobjects.upsert(state.org, version, parts[1], parts[2], parts[3], body, allow_duplicates=allow)
    return NOT_FOUND


def _one(state: SandboxState, version: str, sub: Subrequest, done: Mapping[str, Result],
         headers: Mapping[str, str], lenient: frozenset[str]) -> Result:
    try:
        url = _substitute(sub.url, done)
        body = _substitute(sub.body, done)
    except _Missing as missing:
        return _halted(f"Invalid reference specified. No value for {missing.reference} found in "
                       f"{missing.ref_id}. Provided referenceId ({missing.ref_id}) or the field path may be invalid.")
    allow = allow_save(sub.httpHeaders, headers)
    return call(state, version, sub.method, url, body, allow, lenient)


def _entry(sub: Subrequest, result: Result) -> dict[str, Any]:
    return {"body": result.body, "httpHeaders": dict(result.headers), "httpStatusCode": result.status,
            "referenceId": sub.referenceId}


def run(state: SandboxState, version: str, request: CompositeRequest, headers: Mapping[str, str],
        lenient: frozenset[str]) -> Result:
    """Every subrequest in order, holding the org so no other write lands between them; with
    `allOrNone`, a failure (an answer of 300 or more: nothing was written) rolls all writes back."""
    if (capped := _capped(request, version)) is not None:
        return capped
    org = state.org
    done: dict[str, Result] = {}
    failed: int | None = None
    with org.locked():
        point = org.savepoint() if request.allOrNone else None
        for index, sub in enumerate(request.compositeRequest):
            if failed is not None:
                break  # allOrNone: nothing runs after the failure
            done[sub.referenceId] = _one(state, version, sub, done, headers, lenient)
            if request.allOrNone and done[sub.referenceId].status >= 300:
                failed = index
        if failed is not None:
            org.rollback(point)
    entries = []
    for index, sub in enumerate(request.compositeRequest):
        result = done[sub.referenceId] if failed is None or index == failed else _halted(HALTED)
        entries.append(_entry(sub, result))
    return Result(200, {"compositeResponse": entries})
