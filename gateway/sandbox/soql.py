"""A small SOQL subset over the sandbox's ServiceAppointment records.

Enough for a client to look a booking up after an uncertain outcome (a dropped connection, a
timeout): `SELECT f, ... | COUNT() FROM ServiceAppointment [WHERE c AND c ...] [ORDER BY f [ASC|DESC]
[NULLS FIRST|LAST], ...] [LIMIT n] [OFFSET n]`, where a condition is `Field op literal` with op one of
`= != <> < <= > >= LIKE`, or `Field [NOT] IN (literal, ...)`. Literals: 'quoted strings', unquoted
dateTimes (`2025-01-06T09:00:00Z`), dates, numbers, `null`, `true`, `false`. Like Salesforce, string
comparisons ignore case and a quoted literal against a dateTime field is refused.
Anything else answers MALFORMED_QUERY rather than being guessed at.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, Callable

import msgspec

SOBJECT = "ServiceAppointment"

# field name -> type, in the order `FIELDS(ALL)`-like listings would use
FIELD_TYPES: dict[str, str] = {
    "Id": "id",
    "AppointmentNumber": "string",
    "Status": "string",
    "SchedStartTime": "datetime",
    "SchedEndTime": "datetime",
    "Comments": "string",
    "WorkTypeId": "id",
    "ParentRecordId": "id",
    "ServiceTerritoryId": "id",
    "AppointmentType": "string",
    "EngagementChannelTypeId": "id",
    "CancellationReason": "string",
    "CreatedDate": "datetime",
    "LastModifiedDate": "datetime",
    "SourceSystem__c": "string",
    "PractitionerId__c": "string",
    "DeviceId__c": "string",
    "ExternalSlotId__c": "string",
    "TimeZone__c": "string",
}
_CANONICAL = {name.lower(): name for name in FIELD_TYPES}


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Tok(msgspec.Struct, frozen=True):
    kind: str  # str, datetime, date, number, op, punct, word, end
    text: str
    value: Any = None


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[,()])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    """,
    re.VERBOSE,
)

_KEYWORDS = {
    "select", "from", "where", "and", "or", "not", "like", "in", "order", "by", "asc", "desc",
    "nulls", "first", "last", "limit", "offset", "null", "true", "false", "count",
}  # fmt: skip


def _tokenize(q: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(q):
        m = _TOKEN.match(q, pos)
        if m is None:
            raise SoqlError("MALFORMED_QUERY", f"unexpected character at position {pos}")
        pos = m.end()
        kind = m.lastgroup
        text = m.group()
        if kind == "ws":
            continue
        if kind == "str":
            tokens.append(_Tok("str", text, text[1:-1]))
        elif kind == "datetime":
            tokens.append(_Tok("datetime", text, _parse_dt(text)))
        elif kind == "date":
            tokens.append(_Tok("date", text, date.fromisoformat(text)))
        elif kind == "number":
            tokens.append(_Tok("number", text, float(text)))
        else:
            tokens.append(_Tok(kind or "", text))
    tokens.append(_Tok("end", ""))
    return tokens


def _parse_dt(text: str) -> datetime:
    fixed = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", text)
    try:
        return datetime.fromisoformat(fixed)
    except ValueError as exc:
        raise SoqlError("MALFORMED_QUERY", "invalid dateTime literal") from exc


def _unescape(raw: str, keep_like_escapes: bool = False) -> str:
    out = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if keep_like_escapes and nxt in "%_":
                out.append("\\" + nxt)
            else:
                out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _like_regex(raw: str) -> re.Pattern[str]:
    pattern = _unescape(raw, keep_like_escapes=True)
    parts = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


class Query(msgspec.Struct, frozen=True):
    count_only: bool
    fields: tuple[str, ...]
    conditions: tuple[Callable[[dict[str, Any]], bool], ...]
    order: tuple[tuple[str, bool, bool], ...]  # field, descending, nulls_first
    limit: int | None
    offset: int


class _Parser:
    def __init__(self, q: str) -> None:
        self.tokens = _tokenize(q)
        self.i = 0

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def next(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at_keyword(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind == "word" and tok.text.lower() in words

    def keyword(self, word: str) -> None:
        tok = self.next()
        if tok.kind != "word" or tok.text.lower() != word:
            raise SoqlError("MALFORMED_QUERY", f"expecting '{word.upper()}', found '{tok.text or 'end of query'}'")

    def field(self) -> str:
        tok = self.next()
        if tok.kind != "word" or tok.text.lower() in _KEYWORDS:
            raise SoqlError("MALFORMED_QUERY", f"expecting a field name, found '{tok.text or 'end of query'}'")
        name = _CANONICAL.get(tok.text.lower())
        if name is None:
            raise SoqlError("INVALID_FIELD", f"No such column '{tok.text}' on entity '{SOBJECT}'.")
        return name

    def integer(self) -> int:
        tok = self.next()
        if tok.kind != "number" or not tok.text.isdigit():
            raise SoqlError("MALFORMED_QUERY", f"expecting a non-negative integer, found '{tok.text}'")
        return int(tok.text)

    def parse(self) -> Query:
        self.keyword("select")
        count_only = False
        fields: list[str] = []
        if self.at_keyword("count") and self.tokens[self.i + 1].text == "(":
            self.next(), self.next()
            if self.next().text != ")":
                raise SoqlError("MALFORMED_QUERY", "only COUNT() is supported")
            count_only = True
        else:
            fields.append(self.field())
            while self.peek().text == ",":
                self.next()
                fields.append(self.field())
        self.keyword("from")
        obj = self.next()
        if obj.kind != "word" or obj.text.lower() in _KEYWORDS:
            raise SoqlError("MALFORMED_QUERY", "expecting an object name after FROM")
        if obj.text.lower() != SOBJECT.lower():
            raise SoqlError("INVALID_TYPE", f"sObject type '{obj.text}' is not supported.")
        conditions = []
        if self.at_keyword("where"):
            self.next()
            conditions.append(self.condition())
            while self.at_keyword("and"):
                self.next()
                conditions.append(self.condition())
            if self.at_keyword("or"):
                raise SoqlError("MALFORMED_QUERY", "unexpected token: 'OR' (the sandbox supports AND only)")
        order: list[tuple[str, bool, bool]] = []
        if self.at_keyword("order"):
            self.next()
            self.keyword("by")
            while True:
                name = self.field()
                desc = False
                if self.at_keyword("asc", "desc"):
                    desc = self.next().text.lower() == "desc"
                nulls_first = not desc
                if self.at_keyword("nulls"):
                    self.next()
                    if not self.at_keyword("first", "last"):
                        raise SoqlError("MALFORMED_QUERY", "expecting FIRST or LAST after NULLS")
                    nulls_first = self.next().text.lower() == "first"
                order.append((name, desc, nulls_first))
                if self.peek().text != ",":
                    break
                self.next()
        limit = None
        offset = 0
        if self.at_keyword("limit"):
            self.next()
            limit = self.integer()
        if self.at_keyword("offset"):
            self.next()
            offset = self.integer()
        tail = self.peek()
        if tail.kind != "end":
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{tail.text}'")
        if count_only and order:
            raise SoqlError("MALFORMED_QUERY", "ORDER BY is not allowed with COUNT()")
        return Query(count_only, tuple(fields), tuple(conditions), tuple(order), limit, offset)

    def literal(self) -> _Tok:
        tok = self.next()
        if tok.kind in ("str", "datetime", "date", "number"):
            return tok
        if tok.kind == "word" and tok.text.lower() in ("null", "true", "false"):
            return tok
        raise SoqlError("MALFORMED_QUERY", f"expecting a literal value, found '{tok.text or 'end of query'}'")

    def condition(self) -> Callable[[dict[str, Any]], bool]:
        name = self.field()
        ftype = FIELD_TYPES[name]
        negate = False
        if self.at_keyword("not"):
            self.next()
            negate = True
            if not self.at_keyword("in"):
                raise SoqlError("MALFORMED_QUERY", "expecting IN after NOT")
        if self.at_keyword("in"):
            self.next()
            if self.next().text != "(":
                raise SoqlError("MALFORMED_QUERY", "expecting '(' after IN")
            values = [self.literal()]
            while self.peek().text == ",":
                self.next()
                values.append(self.literal())
            if self.next().text != ")":
                raise SoqlError("MALFORMED_QUERY", "expecting ')'")
            tests = [_comparison(name, ftype, "=", v) for v in values]
            return lambda rec: any(t(rec) for t in tests) != negate
        if self.at_keyword("like"):
            self.next()
            tok = self.literal()
            if tok.kind != "str" or ftype == "datetime":
                raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", f"invalid operator on field '{name}'")
            regex = _like_regex(tok.value)
            return lambda rec: rec.get(name) is not None and regex.fullmatch(rec[name]) is not None
        op = self.next()
        if op.kind != "op":
            raise SoqlError("MALFORMED_QUERY", f"expecting an operator, found '{op.text or 'end of query'}'")
        return _comparison(name, ftype, op.text, self.literal())


def _comparison(name: str, ftype: str, op: str, tok: _Tok) -> Callable[[dict[str, Any]], bool]:
    if tok.kind == "word" and tok.text.lower() == "null":
        if op in ("=",):
            return lambda rec: rec.get(name) is None
        if op in ("!=", "<>"):
            return lambda rec: rec.get(name) is not None
        raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", f"invalid operator for null on field '{name}'")
    if ftype == "datetime":
        if tok.kind == "str":
            raise SoqlError(
                "INVALID_QUERY_FILTER_OPERATOR",
                f"value of filter criterion for field '{name}' must be of type dateTime and should not be enclosed in quotes",
            )
        if tok.kind != "datetime":
            raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", f"value of filter criterion for field '{name}' must be of type dateTime")
        wanted = tok.value
        return _ordered(name, op, wanted, lambda raw: _parse_dt(raw))
    if tok.kind != "str":
        raise SoqlError(
            "INVALID_QUERY_FILTER_OPERATOR",
            f"value of filter criterion for field '{name}' must be of type string and should be enclosed in quotes",
        )
    text = _unescape(tok.value)
    if ftype == "id":
        # Ids compare exactly; a 15-char literal matches the 18-char value it abbreviates.
        def id_key(raw: str) -> str:
            return raw[:15] if len(text) == 15 else raw

        return _ordered(name, op, text, id_key)
    return _ordered(name, op, text.lower(), lambda raw: raw.lower())


def _ordered(name: str, op: str, wanted: Any, key: Callable[[Any], Any]) -> Callable[[dict[str, Any]], bool]:
    compare: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<>": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    fn = compare[op]

    def test(rec: dict[str, Any]) -> bool:
        raw = rec.get(name)
        if raw is None:
            return op in ("!=", "<>")
        return fn(key(raw), wanted)

    return test


def parse(q: str) -> Query:
    return _Parser(q).parse()


def run(query: Query, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full records a parsed query matches, ordered, offset and limited; the caller projects."""
    matched = [r for r in records if all(c(r) for c in query.conditions)]
    for name, desc, nulls_first in reversed(query.order):
        present = [r for r in matched if r.get(name) is not None]
        absent = [r for r in matched if r.get(name) is None]
        if FIELD_TYPES[name] == "datetime":
            present.sort(key=lambda r: _parse_dt(r[name]), reverse=desc)
        else:
            present.sort(key=lambda r: str(r[name]).lower(), reverse=desc)
        matched = absent + present if nulls_first else present + absent
    matched = matched[query.offset :]
    return matched if query.limit is None else matched[: query.limit]
