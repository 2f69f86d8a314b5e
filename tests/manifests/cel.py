"""A small, strict interpreter for the subset of CEL that k8s/ admission policies use.

No CEL library is in the lock, and the emulator (tests/support/k8s) does not evaluate
ValidatingAdmissionPolicies, so the manifest tests evaluate the policies' expressions with
this: ``||``, ``&&``, ``!``, ``? :``, ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``,
field selection, indexing, ``has(a.b)``, string/int/bool/null literals, list and map literals,
``size()``, ``startsWith``/``endsWith``/``contains``, and the macros ``all``, ``exists``,
``filter``, ``map`` (on a map they iterate its keys, as in CEL: ``m.filter(...)`` is a list).

Stricter than CEL where it differs, never more lenient: selecting an absent field or key is an
error (as in Kubernetes' CEL), ``&&``/``||`` short-circuit left to right only (CEL would also
absorb an error on the left when the right side decides; here that error is raised), and
anything outside the subset is a ``CelError`` at parse time. It does no type checking, so it
cannot prove that a kube-apiserver accepts an expression: it checks what the expressions mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<int>\d+)
  | (?P<op>\|\||&&|==|!=|<=|>=|[!<>?:.,()\[\]{}])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)
_KEYWORDS = {"true": True, "false": False, "null": None}
_MACROS = {"all", "exists", "filter", "map"}
_METHODS = {"startsWith", "endsWith", "contains", "size"}


class CelError(Exception):
    """The expression is outside the subset, or its evaluation failed (CEL: an error value)."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokens(src: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m:
            raise CelError(f"unexpected {src[pos:pos + 10]!r} at {pos}")
        if m.lastgroup != "ws":
            out.append(_Tok(m.lastgroup, m.group(), pos))
        pos = m.end()
    out.append(_Tok("end", "", pos))
    return out


Node = Callable[[dict[str, Any]], Any]


class _Parser:
    def __init__(self, src: str) -> None:
        self.src, self.toks, self.i = src, _tokens(src), 0

    def peek(self, text: str | None = None, kind: str | None = None) -> bool:
        t = self.toks[self.i]
        return (text is None or t.text == text) and (kind is None or t.kind == kind)

    def take(self, text: str | None = None, kind: str | None = None) -> _Tok:
        t = self.toks[self.i]
        if not self.peek(text, kind):
            raise CelError(f"expected {text or kind!r}, got {t.text!r} at {t.pos} in {self.src!r}")
        self.i += 1
        return t

    def parse(self) -> Node:
        node = self.expr()
        self.take(kind="end")
        return node

    def expr(self) -> Node:
        cond = self.or_()
        if self.peek("?"):
            self.take("?")
            yes = self.expr()
            self.take(":")
            no = self.expr()
            return lambda env: yes(env) if _bool(cond(env)) else no(env)
        return cond

    def or_(self) -> Node:
        left = self.and_()
        while self.peek("||"):
            self.take("||")
            left = (lambda a, b: lambda env: True if _bool(a(env)) else _bool(b(env)))(left, self.and_())
        return left

    def and_(self) -> Node:
        left = self.rel()
        while self.peek("&&"):
            self.take("&&")
            left = (lambda a, b: lambda env: _bool(b(env)) if _bool(a(env)) else False)(left, self.rel())
        return left

    def rel(self) -> Node:
        left = self.unary()
        ops = {"==": _eq, "!=": lambda a, b: not _eq(a, b), "<": lambda a, b: a < b,
               "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "in": _in}
        t = self.toks[self.i]
        if t.text in ops and t.kind in ("op", "ident"):
            self.i += 1
            right, op = self.unary(), ops[t.text]
            return lambda env: op(left(env), right(env))
        return left

    def unary(self) -> Node:
        if self.peek("!"):
            self.take("!")
            inner = self.unary()
            return lambda env: not _bool(inner(env))
        return self.member()

    def member(self, presence: bool = False) -> Any:
        """A primary and its selections; with ``presence``: (operand, field) of the last selection."""
        node, last = self.primary(), None
        while True:
            if self.peek("."):
                self.take(".")
                name = self.take(kind="ident").text
                if self.peek("("):
                    node, last = self.call(node, name), None
                else:
                    last = (node, name)
                    node = (lambda n, f: lambda env: _select(n(env), f))(node, name)
            elif self.peek("["):
                self.take("[")
                index = self.expr()
                self.take("]")
                node, last = (lambda n, x: lambda env: _index(n(env), x(env)))(node, index), None
            elif presence:
                if last is None:
                    raise CelError("has() takes a field selection, e.g. has(a.b)")
                return last
            else:
                return node

    def call(self, target: Node, name: str) -> Node:
        self.take("(")
        if name in _MACROS:
            var = self.take(kind="ident").text
            self.take(",")
            body = self.expr()
            self.take(")")
            return lambda env: _macro(name, target(env), var, body, env)
        if name not in _METHODS:
            raise CelError(f"function {name!r} is not in this subset")
        args = self.args()
        return lambda env: _method(name, target(env), [a(env) for a in args])

    def args(self) -> list[Node]:
        out = []
        while not self.peek(")"):
            out.append(self.expr())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return out

    def primary(self) -> Node:
        t = self.toks[self.i]
        if t.kind == "str":
            self.i += 1
            value = _unquote(t.text)
            return lambda env: value
        if t.kind == "int":
            self.i += 1
            return lambda env: int(t.text)
        if t.text == "(":
            self.take("(")
            inner = self.expr()
            self.take(")")
            return inner
        if t.text == "[":
            self.take("[")
            items = []
            while not self.peek("]"):
                items.append(self.expr())
                if not self.peek("]"):
                    self.take(",")
            self.take("]")
            return lambda env: [x(env) for x in items]
        if t.text == "{":
            self.take("{")
            pairs = []
            while not self.peek("}"):
                k = self.expr()
                self.take(":")
                pairs.append((k, self.expr()))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
            return lambda env: {k(env): v(env) for k, v in pairs}
        if t.kind == "ident":
            self.i += 1
            if t.text in _KEYWORDS:
                value = _KEYWORDS[t.text]
                return lambda env: value
            if t.text == "has":
                return self.has()
            if t.text == "size" and self.peek("("):
                self.take("(")
                (arg,) = self.args()
                return lambda env: _method("size", arg(env), [])
            if self.peek("("):
                raise CelError(f"function {t.text!r} is not in this subset")
            name = t.text
            return lambda env: _variable(env, name)
        raise CelError(f"unexpected {t.text!r} at {t.pos} in {self.src!r}")

    def has(self) -> Node:
        # has(e.f): true when e (a map or object) has the field/key f (CEL's presence test).
        self.take("(")
        operand, field = self.member(presence=True)
        self.take(")")
        return lambda env: _has(operand(env), field)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise CelError(f"no such overload: expected bool, got {type(value).__name__}")
    return value


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _in(item: Any, container: Any) -> bool:
    if isinstance(container, (dict, list)):
        return item in container
    raise CelError(f"no such overload: in {type(container).__name__}")


def _variable(env: dict[str, Any], name: str) -> Any:
    if name not in env:
        raise CelError(f"undeclared reference to {name!r}")
    return env[name]


def _select(value: Any, field: str) -> Any:
    if not isinstance(value, dict):
        raise CelError(f"no such field {field!r} on {type(value).__name__}")
    if field not in value:
        raise CelError(f"no such key: {field}")
    return value[field]


def _index(value: Any, key: Any) -> Any:
    if isinstance(value, dict):
        if key not in value:
            raise CelError(f"no such key: {key}")
        return value[key]
    if isinstance(value, list) and isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(value):
            raise CelError(f"index out of bounds: {key}")
        return value[key]
    raise CelError(f"no such overload: index {type(value).__name__}")


def _has(value: Any, field: str) -> bool:
    if not isinstance(value, dict):
        raise CelError(f"has() on {type(value).__name__}")
    return field in value and value[field] is not None


def _macro(name: str, target: Any, var: str, body: Node, env: dict[str, Any]) -> Any:
    if isinstance(target, dict):
        items = list(target)  # a map's macros range over its keys
    elif isinstance(target, list):
        items = list(target)
    else:
        raise CelError(f"{name}() on {type(target).__name__}")
    results = [body({**env, var: item}) for item in items]
    if name == "all":
        return all(_bool(r) for r in results)
    if name == "exists":
        return any(_bool(r) for r in results)
    if name == "filter":
        return [item for item, r in zip(items, results) if _bool(r)]
    return results


def _method(name: str, target: Any, args: list[Any]) -> Any:
    if name == "size":
        if args or not isinstance(target, (str, list, dict)):
            raise CelError("no such overload: size")
        return len(target)
    if not isinstance(target, str) or len(args) != 1 or not isinstance(args[0], str):
        raise CelError(f"no such overload: {name}")
    return {"startsWith": target.startswith, "endsWith": target.endswith,
            "contains": target.__contains__}[name](args[0])


def compile(src: str) -> Callable[..., Any]:  # noqa: A001 - CEL's own word
    """Parse ``src``; the result evaluates it with keyword variables (``object=..., oldObject=...``)."""
    node = _Parser(src).parse()
    return lambda **env: node(env)


def evaluate(src: str, **env: Any) -> Any:
    return compile(src)(**env)
