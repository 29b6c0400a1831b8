"""SOQL over the org's records, written from Salesforce's SOQL reference; the subset the gateway needs.

`SELECT items | COUNT() FROM sObject [WHERE expr] [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST], ...]
[LIMIT n] [OFFSET n]`, where
- an item is a field, the polymorphic `Rel.Type` / `Rel.Id` / `Rel.Name` (the `Name` object), or
  `TYPEOF Rel WHEN T THEN f, ... [ELSE f, ...] END` (API 46.0+);
- `expr` joins conditions with AND or with OR (mixing them without parentheses is MALFORMED_QUERY, as
  in SOQL), parentheses and NOT; a condition is `f op literal` (`= != <> < <= > >= LIKE`), `f [NOT] IN
  (literal, ...)` or a semi-/anti-join `f [NOT] IN (SELECT f FROM Obj [WHERE ...])`;
- literals: 'strings', `true`/`false` (boolean fields only), `null`, dates on date fields, dateTimes on
  dateTime fields, and `TODAY` on both (the day in UTC: the sandbox's integration user's time zone).

Strings compare without case; an id literal must have an id's shape. Anything outside this subset answers
MALFORMED_QUERY saying so, never a guess; messages name fields and objects, never a literal's value.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Protocol

import msgspec

from gateway.sandbox.schema import NAME_FIELDS, Field, SObject, sobject
from gateway.sandbox.values import ID_SHAPE, parse_date, parse_datetime

MAX_QUERY = 100_000  # characters, SOQL's documented default
MAX_SEMI_JOINS = 2
TYPEOF_VERSION = (46, 0)
_FIELD_HINT = ("If you are attempting to use a custom field, be sure to append the '__c' after the custom field "
               "name. Please reference your WSDL or the describe call for the appropriate names.")


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _malformed(message: str) -> SoqlError:
    return SoqlError("MALFORMED_QUERY", message)


def _filter_error(message: str) -> SoqlError:
    return SoqlError("INVALID_QUERY_FILTER_OPERATOR", message)


class Source(Protocol):
    """Where a query reads: every record of an sObject, and the record an id names."""

    def rows(self, sobject: str) -> list[dict[str, Any]]: ...

    def find(self, record_id: str) -> tuple[str, dict[str, Any]] | None: ...

    def queried(self, sobject: str) -> None: ...  # told of each query run, by its FROM


# tokens --------------------------------------------------------------------------------------------


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
    "select", "from", "where", "and", "or", "not", "like", "in", "order", "by", "asc", "desc", "nulls", "first",
    "last", "limit", "offset", "null", "true", "false", "count", "typeof", "when", "then", "else", "end", "today",
}  # fmt: skip


def _tokenize(q: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(q):
        m = _TOKEN.match(q, pos)
        if m is None:
            raise _malformed(f"unexpected character at position {pos}")
        pos = m.end()
        kind, text = m.lastgroup or "", m.group()
        if kind == "ws":
            continue
        if kind == "str":
            tokens.append(_Tok("str", text, _unescape(text[1:-1])))
        elif kind == "datetime":
            moment = parse_datetime(text)
            if moment is None:
                raise _malformed("invalid dateTime literal")
            tokens.append(_Tok("datetime", text, moment))
        elif kind == "date":
            day = parse_date(text)
            if day is None:
                raise _malformed("invalid date literal")
            tokens.append(_Tok("date", text, day))
        else:
            tokens.append(_Tok(kind, text))
    tokens.append(_Tok("end", ""))
    return tokens


def _unescape(raw: str) -> str:
    """SOQL's escapes; `\\%` and `\\_` stay escaped for LIKE, which reads them itself."""
    out, i = [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            out.append("\\" + nxt if nxt in "%_" else {"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _like_regex(pattern: str) -> re.Pattern[str]:
    parts, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _plain(text: str) -> str:
    """A string literal's value where no LIKE reads it: its LIKE escapes are plain characters."""
    return text.replace("\\%", "%").replace("\\_", "_")


# paths: what a field name in a query reads ----------------------------------------------------------


class Path(msgspec.Struct, frozen=True):
    """A field of the record (`ref` None), or a field of the `Name` object behind a polymorphic
    relationship (`ref` the reference field, `name` one of NAME_FIELDS)."""

    name: str
    type: str
    ref: Field | None = None

    @property
    def key(self) -> str:
        return f"{self.ref.relationship}.{self.name}" if self.ref else self.name

    def read(self, rec: dict[str, Any], source: Source) -> Any:
        if self.ref is None:
            return rec.get(self.name)
        parent = source.find(rec.get(self.ref.name) or "")
        if parent is None:
            return None
        return parent[0] if self.name == "Type" else parent[1].get(self.name)


def _no_column(name: str, obj: str) -> SoqlError:
    return SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{obj}'. {_FIELD_HINT}")


def _path(obj: SObject, text: str) -> Path:
    rel, dot, attr = text.partition(".")
    if not dot:
        field = obj.field(text)
        if field is None:
            raise _no_column(text, obj.name)
        return Path(field.name, field.type)
    ref = obj.relationship(rel)
    if ref is None:
        raise SoqlError("INVALID_FIELD", f"Didn't understand relationship '{rel}' in field path. {_FIELD_HINT}")
    if not ref.polymorphic or "." in attr:
        raise _malformed("relationship fields other than a polymorphic relationship's Id, Name and Type are "
                         "outside the sandbox's SOQL subset")
    name = next((n for n in NAME_FIELDS if n.lower() == attr.lower()), None)
    if name is None:
        raise _no_column(attr, "Name")
    return Path(name, "id" if name == "Id" else "string", ref)


# comparisons ---------------------------------------------------------------------------------------

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<>": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _is_word(tok: _Tok, *words: str) -> bool:
    return tok.kind == "word" and tok.text.lower() in words


def _type_error(path: Path, wanted: str) -> SoqlError:
    quotes = "be enclosed in quotes" if wanted == "string" else "not be enclosed in quotes"
    return _filter_error(f"value of filter criterion for field '{path.key}' must be of type {wanted} and should {quotes}")


def _key(path: Path, tok: _Tok, strict_ids: bool) -> tuple[Any, Callable[[Any], Any]]:
    """The literal as a comparable value, and how to read a stored value to compare with it."""
    kind = path.type
    if kind == "boolean":
        if not _is_word(tok, "true", "false"):
            raise _type_error(path, "boolean")
        return tok.text.lower() == "true", lambda raw: raw
    if kind == "date":
        if tok.kind == "date" or _is_word(tok, "today"):
            return (tok.value if tok.kind == "date" else _today()), lambda raw: parse_date(raw)
        raise _type_error(path, "date")
    if kind == "datetime":
        if tok.kind != "datetime":
            raise _type_error(path, "dateTime")
        return tok.value, lambda raw: parse_datetime(raw)
    if tok.kind != "str":
        raise _type_error(path, "string")
    if kind in ("id", "reference"):
        text = _plain(tok.value)
        if strict_ids and ID_SHAPE.fullmatch(text) is None:
            raise _filter_error(f"invalid ID field in the filter on '{path.key}'")  # Salesforce adds the value
        # a 15-character literal matches the 18-character value it begins
        return text, (lambda raw: raw[:15]) if len(text) == 15 else (lambda raw: raw)
    return _plain(tok.value).lower(), lambda raw: raw.lower()


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _today_range(op: str) -> Callable[[Any], bool]:
    """`TODAY` against a dateTime: the UTC day from its first to its last instant."""
    start = datetime.combine(_today(), datetime.min.time(), timezone.utc)
    end = start + timedelta(days=1)
    tests: dict[str, Callable[[datetime], bool]] = {
        "=": lambda t: start <= t < end, "!=": lambda t: not start <= t < end, "<>": lambda t: not start <= t < end,
        "<": lambda t: t < start, "<=": lambda t: t < end, ">": lambda t: t >= end, ">=": lambda t: t >= start,
    }
    test = tests[op]
    return lambda raw: raw is not None and test(parse_datetime(raw))  # type: ignore[arg-type]


def _comparison(path: Path, op: str, tok: _Tok, strict_ids: bool) -> Callable[[Any], bool]:
    """A test of one stored value against `op literal`."""
    if _is_word(tok, "null"):
        if op not in ("=", "!=", "<>"):
            raise _filter_error(f"invalid operator for null on field '{path.key}'")
        return (lambda raw: raw is None) if op == "=" else (lambda raw: raw is not None)
    if path.type == "boolean" and op not in ("=", "!=", "<>"):
        raise _filter_error(f"invalid operator on field '{path.key}'")
    if path.type == "datetime" and _is_word(tok, "today"):
        return _today_range(op)
    wanted, read = _key(path, tok, strict_ids)
    fn = _ORDER[op]
    # like SOQL, a null value is unequal to every literal and neither less nor greater than one
    return lambda raw: op in ("!=", "<>") if raw is None else fn(read(raw), wanted)


def _membership(path: Path, values: list[_Tok], strict_ids: bool, negate: bool) -> Callable[[Any], bool]:
    """`IN (…)` / `NOT IN (…)` over literals, as sets so a hundred values cost one look-up."""
    nulls = any(_is_word(v, "null") for v in values)
    keyed = [_key(path, v, strict_ids) for v in values if not _is_word(v, "null")]
    exact = {k for k, _ in keyed if not (path.type in ("id", "reference") and len(k) == 15)}
    short = {k for k, _ in keyed if path.type in ("id", "reference") and len(k) == 15}
    norm = keyed[0][1] if keyed and path.type not in ("id", "reference") else (lambda raw: raw)

    def test(raw: Any) -> bool:
        found = nulls if raw is None else (norm(raw) in exact or (bool(short) and raw[:15] in short))
        return found != negate

    return test


# the WHERE tree ------------------------------------------------------------------------------------


class _Env:
    """What matching needs besides the record: the source, and each semi-join's selected values."""

    def __init__(self, source: Source, semi: dict[int, set[str]]) -> None:
        self.source, self.semi = source, semi


class Node:
    def match(self, rec: dict[str, Any], env: _Env) -> bool:
        raise NotImplementedError

    def semi_joins(self) -> list[SemiJoin]:
        return []


class Cond(Node):
    def __init__(self, path: Path, test: Callable[[Any], bool]) -> None:
        self.path, self.test = path, test

    def match(self, rec: dict[str, Any], env: _Env) -> bool:
        return self.test(self.path.read(rec, env.source))


class Junction(Node):
    def __init__(self, kind: str, children: list[Node]) -> None:
        self.kind, self.children = kind, children

    def match(self, rec: dict[str, Any], env: _Env) -> bool:
        if self.kind == "and":
            return all(c.match(rec, env) for c in self.children)
        return any(c.match(rec, env) for c in self.children)

    def semi_joins(self) -> list[SemiJoin]:
        return [s for c in self.children for s in c.semi_joins()]


class Wrapped(Node):
    """`( expr )` or `NOT term`: kept as a node so a semi-join inside one is seen as nested."""

    def __init__(self, child: Node, negate: bool) -> None:
        self.child, self.negate = child, negate

    def match(self, rec: dict[str, Any], env: _Env) -> bool:
        return self.child.match(rec, env) != self.negate

    def semi_joins(self) -> list[SemiJoin]:
        return self.child.semi_joins()


class SemiJoin(Node):
    """`Field [NOT] IN (SELECT OneField FROM Obj WHERE …)`; the sub-select runs once per query."""

    def __init__(self, path: Path, negate: bool, sub: Query) -> None:
        self.path, self.negate, self.sub = path, negate, sub

    def match(self, rec: dict[str, Any], env: _Env) -> bool:
        raw = rec.get(self.path.name)
        # inference: a null left operand is in no sub-select's values (so NOT IN keeps it)
        return (raw is not None and raw[:15] in env.semi[id(self)]) != self.negate

    def semi_joins(self) -> list[SemiJoin]:
        return [self]


# items of the SELECT clause ------------------------------------------------------------------------


class TypeOf(msgspec.Struct, frozen=True):
    ref: Field
    whens: dict[str, tuple[str, ...]]  # sObject -> its fields
    otherwise: tuple[str, ...]  # ELSE: fields of the Name object


Item = Path | TypeOf


class Query(msgspec.Struct, frozen=True):
    sobject: SObject
    count_only: bool
    items: tuple[Item, ...]
    where: Node | None
    order: tuple[tuple[Path, bool, bool], ...]  # path, descending, nulls first
    limit: int | None
    offset: int


# the parser ----------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, q: str, version: tuple[int, int], lenient: frozenset[str]) -> None:
        if len(q) > MAX_QUERY:
            raise _malformed(f"SOQL statements cannot be longer than {MAX_QUERY} characters.")
        self.tokens, self.i = _tokenize(q), 0
        self.version, self.lenient = version, lenient

    def peek(self, ahead: int = 0) -> _Tok:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> _Tok:
        tok = self.peek()
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def at(self, *words: str) -> bool:
        return _is_word(self.peek(), *words)

    def expect(self, word: str) -> None:
        tok = self.next()
        if not _is_word(tok, word) and tok.text != word:
            raise _malformed(f"expecting '{word.upper()}', found '{tok.text or 'end of query'}'")

    def name(self, what: str = "a field name") -> str:
        tok = self.next()
        if tok.kind != "word" or tok.text.lower() in _KEYWORDS:
            raise _malformed(f"expecting {what}, found '{tok.text or 'end of query'}'")
        return tok.text

    def integer(self) -> int:
        tok = self.next()
        if tok.kind != "number" or not tok.text.isdigit():
            raise _malformed(f"expecting a non-negative integer, found '{tok.text or 'end of query'}'")
        return int(tok.text)

    def unexpected(self) -> SoqlError:
        return _malformed(f"unexpected token: '{self.peek().text or 'end of query'}'")

    # SELECT … FROM … ---------------------------------------------------------------------------
    def query(self, sub: bool = False) -> Query:
        self.expect("select")
        raw_items, count_only = self.select_list(sub)
        self.expect("from")
        obj = self.sobject()
        items = self.resolve_items(obj, raw_items)
        where = None
        if self.at("where"):
            self.next()
            where = self.expression(obj, sub)
        order, limit, offset = self.tail(obj, sub)
        if count_only and order:
            raise _malformed("ORDER BY is not allowed with COUNT()")
        query = Query(obj, count_only, items, where, order, limit, offset)
        if not sub:
            self.check_semi_joins(query)
            if self.peek().kind != "end":
                raise self.unexpected()
        return query

    def sobject(self) -> SObject:
        name = self.name("an object name after FROM")
        obj = sobject(name)
        if obj is None or self.version < obj.min_version:
            raise SoqlError("INVALID_TYPE", f"sObject type '{name}' is not supported. If you are attempting to use a "
                            "custom object, be sure to append the '__c' after the entity name. Please reference "
                            "your WSDL or the describe call for the appropriate names.")
        return obj

    def select_list(self, sub: bool) -> tuple[list[Any], bool]:
        if self.at("count") and self.peek(1).text == "(":
            if sub:
                raise _malformed("COUNT() is not supported in a semi join sub-select")
            self.next(), self.next()
            self.expect(")")
            return [], True
        items = [self.select_item(sub)]
        while self.peek().text == ",":
            self.next()
            items.append(self.select_item(sub))
        return items, False

    def select_item(self, sub: bool) -> Any:
        if not self.at("typeof"):
            return self.name()
        if sub:
            raise _malformed("TYPEOF is not supported in a semi join sub-select")
        if self.version < TYPEOF_VERSION:
            raise _malformed("TYPEOF is available in API version 46.0 and later")
        self.next()
        rel = self.name("a relationship name")
        whens: list[tuple[str, list[str]]] = []
        while self.at("when"):
            self.next()
            kind = self.name("an object name")
            self.expect("then")
            whens.append((kind, self.names()))
        if not whens:
            raise _malformed("TYPEOF needs at least one WHEN clause")
        otherwise = []
        if self.at("else"):
            self.next()
            otherwise = self.names()
        self.expect("end")
        return rel, whens, otherwise

    def names(self) -> list[str]:
        names = [self.name()]
        while self.peek().text == ",":
            self.next()
            names.append(self.name())
        return names

    def resolve_items(self, obj: SObject, raw_items: list[Any]) -> tuple[Item, ...]:
        items: list[Item] = []
        seen: set[str] = set()
        for raw in raw_items:
            item = _path(obj, raw) if isinstance(raw, str) else self.typeof(obj, *raw)
            shown = item.key if isinstance(item, Path) else f"TYPEOF {item.ref.relationship}"
            if shown.lower() in seen:
                raise _malformed(f"duplicate field selected: {shown}")
            seen.add(shown.lower())
            items.append(item)
        typed = {i.ref.name for i in items if isinstance(i, TypeOf)}
        if typed & {i.ref.name for i in items if isinstance(i, Path) and i.ref is not None}:
            # SOQL reference: a relationship used in TYPEOF can't also be selected as a field path
            raise _malformed("A TYPEOF expression can't be used with a relationship field that is also selected "
                             "elsewhere in the SELECT clause")
        return tuple(items)

    def typeof(self, obj: SObject, rel: str, whens: list[tuple[str, list[str]]], otherwise: list[str]) -> TypeOf:
        ref = obj.relationship(rel)
        if ref is None:
            raise SoqlError("INVALID_FIELD", f"Didn't understand relationship '{rel}' in field path. {_FIELD_HINT}")
        if not ref.polymorphic:
            raise _malformed("TYPEOF can be used only with a polymorphic relationship")
        fields: dict[str, tuple[str, ...]] = {}
        for kind, names in whens:
            target = sobject(kind)
            if target is None or target.name not in ref.targets:
                raise SoqlError("INVALID_TYPE", f"sObject type '{kind}' is not one that '{rel}' can name")
            if target.name in fields:
                raise _malformed(f"duplicate WHEN clause for '{target.name}'")
            fields[target.name] = tuple(self.plain_fields(target, names))
        others = []
        for name in otherwise:
            found = next((n for n in NAME_FIELDS if n.lower() == name.lower()), None)
            if found is None:
                raise _no_column(name, "Name")
            others.append(found)
        return TypeOf(ref, fields, tuple(others))

    @staticmethod
    def plain_fields(obj: SObject, names: list[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            field = obj.field(name)
            if "." in name:
                raise _malformed("relationship fields inside TYPEOF are outside the sandbox's SOQL subset")
            if field is None:
                raise _no_column(name, obj.name)
            if field.name in out:
                raise _malformed(f"duplicate field selected: {field.name}")
            out.append(field.name)
        return out

    # WHERE ---------------------------------------------------------------------------------------
    def expression(self, obj: SObject, sub: bool) -> Node:
        """Conditions joined by AND, or by OR: SOQL wants parentheses to mix them."""
        first = self.term(obj, sub)
        if not self.at("and", "or"):
            return first
        kind = self.peek().text.lower()
        children = [first]
        while self.at(kind):
            self.next()
            children.append(self.term(obj, sub))
        if self.at("and", "or"):
            raise self.unexpected()
        return Junction(kind, children)

    def term(self, obj: SObject, sub: bool) -> Node:
        if self.peek().text == "(":
            self.next()
            inner = self.expression(obj, sub)
            self.expect(")")
            return Wrapped(inner, negate=False)
        if self.at("not"):
            self.next()
            return Wrapped(self.term(obj, sub), negate=True)
        return self.condition(obj, sub)

    def literal(self) -> _Tok:
        tok = self.next()
        if tok.kind in ("str", "datetime", "date", "number") or _is_word(tok, "null", "true", "false", "today"):
            return tok
        raise _malformed(f"expecting a literal value, found '{tok.text or 'end of query'}' (date literals other "
                         "than TODAY are outside the sandbox's SOQL subset)")

    def condition(self, obj: SObject, sub: bool) -> Node:
        path = _path(obj, self.name())
        strict = obj.name not in self.lenient
        negate = False
        if self.at("not"):
            self.next()
            negate = True
            if not self.at("in"):
                raise _malformed("expecting IN after NOT")
        if self.at("in"):
            self.next()
            self.expect("(")
            if self.at("select"):
                return self.semi_join(obj, path, negate, sub)
            values = [self.literal()]
            while self.peek().text == ",":
                self.next()
                values.append(self.literal())
            self.expect(")")
            return Cond(path, _membership(path, values, strict, negate))
        if self.at("like"):
            self.next()
            tok = self.literal()
            if tok.kind != "str" or path.type != "string":
                raise _filter_error(f"invalid operator on field '{path.key}': LIKE takes a string field and a string")
            regex = _like_regex(tok.value)
            return Cond(path, lambda raw: raw is not None and regex.fullmatch(raw) is not None)
        op = self.next()
        if op.kind != "op":
            raise _malformed(f"expecting an operator, found '{op.text or 'end of query'}'")
        return Cond(path, _comparison(path, op.text, self.literal(), strict))

    def semi_join(self, obj: SObject, path: Path, negate: bool, sub: bool) -> Node:
        if sub:
            raise _malformed("Nesting of semi join sub-selects is not supported")
        if path.ref is not None or path.type not in ("id", "reference"):
            raise _malformed("The left operand of a semi join sub-select must be an Id or a reference field")
        inner = self.query(sub=True)
        self.expect(")")
        item = inner.items[0] if len(inner.items) == 1 else None
        if not isinstance(item, Path) or item.ref is not None or item.type not in ("id", "reference"):
            raise _malformed("A semi join sub-select must select exactly one Id or reference field")
        if inner.sobject.name == obj.name:
            raise _malformed("The inner and outer selects should not be on the same object type")
        return SemiJoin(path, negate, inner)

    @staticmethod
    def check_semi_joins(query: Query) -> None:
        """Semi-/anti-joins only as conjuncts of the outer WHERE itself, and at most two."""
        where = query.where
        if where is None:
            return
        top = where.children if isinstance(where, Junction) and where.kind == "and" else [where]
        joins = where.semi_joins()
        if any(j not in top for j in joins):
            raise _malformed("Semi join sub-selects are only allowed at the top level WHERE expressions and not "
                             "in nested WHERE expressions.")
        if len(joins) > MAX_SEMI_JOINS:
            # the code Salesforce answers (seen in client libraries); the message is the sandbox's
            raise SoqlError("EXCEEDED_MAX_SEMIJOIN_SUBSELECTS", "No more than two semi join or anti join sub-selects "
                            "are allowed in one WHERE clause.")

    # ORDER BY, LIMIT, OFFSET -----------------------------------------------------------------------
    def tail(self, obj: SObject, sub: bool) -> tuple[tuple[tuple[Path, bool, bool], ...], int | None, int]:
        if sub:
            if self.at("order", "limit", "offset"):
                raise _malformed("ORDER BY, LIMIT and OFFSET are not supported in a semi join sub-select")
            return (), None, 0
        order: list[tuple[Path, bool, bool]] = []
        if self.at("order"):
            self.next()
            self.expect("by")
            while True:
                path = _path(obj, self.name())
                if path.ref is not None:
                    raise _malformed("ORDER BY a relationship field is outside the sandbox's SOQL subset")
                desc = self.at("desc")
                if self.at("asc", "desc"):
                    self.next()
                nulls_first = not desc
                if self.at("nulls"):
                    self.next()
                    if not self.at("first", "last"):
                        raise _malformed("expecting FIRST or LAST after NULLS")
                    nulls_first = self.next().text.lower() == "first"
                order.append((path, desc, nulls_first))
                if self.peek().text != ",":
                    break
                self.next()
        limit = offset = None
        if self.at("limit"):
            self.next()
            limit = self.integer()
        if self.at("offset"):
            self.next()
            offset = self.integer()
        return tuple(order), limit, offset or 0


# running -------------------------------------------------------------------------------------------

_VERSION = re.compile(r"v?(\d+)\.(\d+)")


def api_version(text: str) -> tuple[int, int]:
    m = _VERSION.fullmatch(text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse(q: str, version: str = "v66.0", lenient: frozenset[str] = frozenset()) -> Query:
    """`lenient`: sObjects whose id filters take any string (the sandbox's bookings while they may
    hold EHR ids as references; see `SandboxConfig.require_records`)."""
    return _Parser(q, api_version(version), lenient).query()


def _sort_key(kind: str) -> Callable[[Any], Any]:
    if kind == "datetime":
        return lambda raw: parse_datetime(raw)
    if kind == "date":
        return lambda raw: parse_date(raw)
    if kind == "boolean":
        return lambda raw: bool(raw)
    return lambda raw: str(raw).lower()


def run(query: Query, source: Source) -> list[dict[str, Any]]:
    """The records a parsed query matches, ordered, offset and limited; `answer` projects them."""
    env = _Env(source, {})
    if query.where is not None:
        for join in query.where.semi_joins():
            column = join.sub.items[0].name  # type: ignore[union-attr]
            env.semi[id(join)] = {r[column][:15] for r in run(join.sub, source) if r.get(column)}
    matched = [r for r in source.rows(query.sobject.name) if query.where is None or query.where.match(r, env)]
    for path, desc, nulls_first in reversed(query.order):
        present = [r for r in matched if r.get(path.name) is not None]
        absent = [r for r in matched if r.get(path.name) is None]
        key = _sort_key(path.type)
        present.sort(key=lambda r: key(r[path.name]), reverse=desc)
        matched = absent + present if nulls_first else present + absent
    matched = matched[query.offset :]
    return matched if query.limit is None else matched[: query.limit]


def _url(version: str, kind: str, record_id: str) -> str:
    return f"/services/data/{version}/sobjects/{kind}/{record_id}"


def attributes(version: str, kind: str, record_id: str) -> dict[str, str]:
    return {"type": kind, "url": _url(version, kind, record_id)}


def _typeof(item: TypeOf, rec: dict[str, Any], source: Source, version: str) -> dict[str, Any] | None:
    parent = source.find(rec.get(item.ref.name) or "")
    if parent is None:
        return None
    kind, row = parent
    out: dict[str, Any] = {"attributes": attributes(version, kind, row["Id"])}
    if kind in item.whens:
        out.update((f, row.get(f)) for f in item.whens[kind])
    else:  # ELSE reads the Name object (inference: attributes keep the parent's own type)
        out.update((f, kind if f == "Type" else row.get(f)) for f in item.otherwise)
    return out


def project(query: Query, rec: dict[str, Any], source: Source, version: str) -> dict[str, Any]:
    """One record of the answer: `attributes`, then the selected items in their order; a polymorphic
    relationship is an object (`{"attributes": {"type": "Name", …}, "Type": "Contact"}`), null when
    its parent is gone."""
    kind = query.sobject.name
    out: dict[str, Any] = {"attributes": attributes(version, kind, rec["Id"])}
    for item in query.items:
        if isinstance(item, TypeOf):
            out[item.ref.relationship or ""] = _typeof(item, rec, source, version)
        elif item.ref is None:
            out[item.name] = rec.get(item.name)
        else:
            rel = item.ref.relationship or ""
            parent = source.find(rec.get(item.ref.name) or "")
            if parent is None:
                out[rel] = None
                continue
            holder = out.get(rel) or {"attributes": {"type": "Name", "url": _url(version, parent[0], parent[1]["Id"])}}
            holder[item.name] = item.read(rec, source)
            out[rel] = holder
    return out


def execute(q: str, source: Source, version: str, lenient: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The REST answer to `GET …/query?q=`; SoqlError for what Salesforce refuses."""
    query = parse(q, version, lenient)
    source.queried(query.sobject.name)
    matched = run(query, source)
    records = [] if query.count_only else [project(query, r, source, version) for r in matched]
    return {"totalSize": len(matched), "done": True, "records": records}
