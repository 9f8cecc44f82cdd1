"""Which HTTP requests a filtered steal takes: header, path and method filters and their
all-of / any-of combinations, with mirrord's semantics (its `http_filter`).

Owns: the filter language and its matching; pure functions over a request's head, no I/O.

- header: a regex searched (re.search) in each header as `Name: value`, case-insensitively
  (the name as the client spelled it, one space after the colon, the value without OWS);
- path: a regex searched in the request's path and in its path with the query
  (`/a/b?x=1`); either matching is a match. Case-sensitive unless it starts with `(?i)`
  (`--http-path-filter-ignore-case` adds it);
- method: the request method, compared case-insensitively (`GET`, `post`);
- all_of: a list of single filters (`header=RE`, `path=RE`, `method=M`), every one must match;
- any_of: the same, at least one must match.
A request is taken when every kind given matches; a filter with nothing given takes none
(the protocol refuses one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

KINDS = ("header", "path", "method")
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")


class Request(Protocol):
    method: str
    path: str  # without the query
    path_query: str
    headers: list[tuple[str, str]]


@dataclass(frozen=True)
class HttpFilter:
    header: re.Pattern[str] | None = None
    path: re.Pattern[str] | None = None
    method: str | None = None  # upper case
    all_of: tuple["HttpFilter", ...] = ()
    any_of: tuple["HttpFilter", ...] = ()

    def matches(self, head: Request) -> bool:
        if self.method is not None and head.method.upper() != self.method:
            return False
        if self.path is not None and not (self.path.search(head.path) or self.path.search(head.path_query)):
            return False
        if self.header is not None and not self._header_matches(head.headers):
            return False
        if not all(f.matches(head) for f in self.all_of):
            return False
        return not self.any_of or any(f.matches(head) for f in self.any_of)

    def _header_matches(self, headers: list[tuple[str, str]]) -> bool:
        search = self.header.search  # type: ignore[union-attr]
        for name, value in headers:  # a loop, not any(genexpr): this runs per request
            if search(f"{name}: {value}"):
                return True
        return False

    @classmethod
    def compile(cls, header: str | None = None, path: str | None = None, method: str | None = None,
                all_of: tuple[tuple[str, str], ...] = (), any_of: tuple[tuple[str, str], ...] = ()) -> "HttpFilter":
        """From the patterns as given (all_of/any_of: (kind, pattern) pairs); ValueError, one line, if bad."""
        return cls(_compile("--http-header-filter", header, re.IGNORECASE), _compile("--http-path-filter", path, 0),
                   _method("--http-method-filter", method),
                   tuple(_single("--http-filter-all-of", k, v) for k, v in all_of),
                   tuple(_single("--http-filter-any-of", k, v) for k, v in any_of))


def parse_single(option: str, spec: str) -> tuple[str, str]:
    """`header=RE`, `path=RE` or `method=M` as (kind, pattern), checked; ValueError, one line, if bad."""
    kind, eq, pattern = spec.partition("=")
    if not eq or kind.strip().lower() not in KINDS:
        raise ValueError(f"{option} {spec!r}: expected header=REGEX, path=REGEX or method=METHOD")
    _single(option, kind.strip().lower(), pattern)
    return kind.strip().lower(), pattern


def _single(option: str, kind: str, pattern: str) -> HttpFilter:
    if kind == "header":
        return HttpFilter(header=_compile(option, pattern, re.IGNORECASE))
    if kind == "path":
        return HttpFilter(path=_compile(option, pattern, 0))
    if kind == "method":
        return HttpFilter(method=_method(option, pattern))
    raise ValueError(f"{option}: unknown filter kind {kind!r} (header, path or method)")


def _method(option: str, method: str | None) -> str | None:
    if method is None:
        return None
    if not _METHOD.fullmatch(method):
        raise ValueError(f"{option} {method!r} is not an HTTP method")
    return method.upper()


def _compile(option: str, pattern: str | None, flags: int) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, flags)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999} overflows
        raise ValueError(f"{option} {pattern!r} is not a valid regex: {e}".replace("\n", " ")) from None
