"""Label and field selectors with apiserver semantics (equality- and set-based).

Parsed once per request; a parse error is a 400 like the real server's. The
same `LabelSelector` type also evaluates `metav1.LabelSelector` dicts
(matchLabels / matchExpressions) used by Job specs and quotas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class SelectorError(ValueError):
    """The selector string does not parse; carries apiserver's message."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!"


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _check_key(key: str, raw: str) -> str:
    if not _KEY.match(key) or len(key.split("/")[-1]) > 63:
        raise SelectorError(f"unable to parse requirement: invalid label key \"{key}\" in \"{raw}\"")
    return key


def _check_value(value: str, raw: str) -> str:
    if not _VALUE.match(value) or len(value) > 63:
        raise SelectorError(
            f"unable to parse requirement: invalid label value: \"{value}\" in \"{raw}\""
        )
    return value


_SET = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse `a=b,c!=d,e in (f,g),!h` into a selector; raises SelectorError."""
    if not text or not text.strip():
        return LabelSelector()
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        if not part:
            raise SelectorError(f"unable to parse requirement: found '', expected: identifier in \"{text}\"")
        if m := _SET.match(part):
            values = tuple(sorted({_check_value(v.strip(), text)
                                   for v in m["values"].split(",") if v.strip()}))
            if not values:
                raise SelectorError(
                    f"unable to parse requirement: for 'in', 'notin' operators, values set "
                    f"can't be empty in \"{text}\""
                )
            reqs.append(Requirement(_check_key(m["key"], text), m["op"], values))
        elif m := _EQ.match(part):
            op = "!=" if m["op"] == "!=" else "="
            reqs.append(Requirement(_check_key(m["key"], text), op,
                                    (_check_value(m["value"], text),)))
        elif part.startswith("!"):
            reqs.append(Requirement(_check_key(part[1:].strip(), text), "!"))
        elif " " not in part and "=" not in part and "(" not in part:
            reqs.append(Requirement(_check_key(part, text), "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: couldn't parse \"{part}\" in \"{text}\"")
    return LabelSelector(tuple(reqs))


def from_label_selector_dict(sel: dict[str, Any] | None) -> LabelSelector:
    """Convert a metav1.LabelSelector dict (matchLabels, matchExpressions)."""
    if not sel:
        return LabelSelector()
    reqs = [Requirement(k, "=", (v,)) for k, v in (sel.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in sel.get("matchExpressions") or []:
        reqs.append(Requirement(expr["key"], ops[expr["operator"]],
                                tuple(expr.get("values") or ())))
    return LabelSelector(tuple(reqs))


# Field selectors: apiserver supports only a few fields per resource.
_COMMON_FIELDS = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
_FIELDS: dict[str, dict[str, Callable[[dict], str]]] = {
    "pods": {
        "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": lambda o: o.get("spec", {}).get("serviceAccountName", ""),
        "spec.restartPolicy": lambda o: o.get("spec", {}).get("restartPolicy", ""),
        "status.phase": lambda o: o.get("status", {}).get("phase", ""),
        "status.podIP": lambda o: o.get("status", {}).get("podIP", ""),
    },
    "jobs": {
        "status.successful": lambda o: str(o.get("status", {}).get("succeeded", 0)),
    },
    "secrets": {"type": lambda o: o.get("type", "")},
    "events": {
        "involvedObject.kind": lambda o: o.get("involvedObject", {}).get("kind", ""),
        "involvedObject.namespace": lambda o: o.get("involvedObject", {}).get("namespace", ""),
        "involvedObject.name": lambda o: o.get("involvedObject", {}).get("name", ""),
        "involvedObject.uid": lambda o: o.get("involvedObject", {}).get("uid", ""),
        "involvedObject.apiVersion": lambda o: o.get("involvedObject", {}).get("apiVersion", ""),
        "involvedObject.resourceVersion":
            lambda o: o.get("involvedObject", {}).get("resourceVersion", ""),
        "involvedObject.fieldPath": lambda o: o.get("involvedObject", {}).get("fieldPath", ""),
        "reason": lambda o: o.get("reason", ""),
        "reportingComponent": lambda o: o.get("reportingComponent", ""),
        "source": lambda o: o.get("source", {}).get("component", ""),
        "type": lambda o: o.get("type", ""),
    },
    "namespaces": {"status.phase": lambda o: o.get("status", {}).get("phase", "")},
}


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[Callable[[dict], str], bool, str], ...] = ()

    def matches(self, obj: dict) -> bool:
        return all((get(obj) == value) == equal for get, equal, value in self.terms)


def parse_field_selector(text: str | None, resource: str) -> FieldSelector:
    """Parse `metadata.name=x,status.phase!=Running` for `resource`; raises SelectorError."""
    if not text or not text.strip():
        return FieldSelector()
    fields = {**_COMMON_FIELDS, **_FIELDS.get(resource, {})}
    terms = []
    for part in (p.strip() for p in text.split(",")):
        m = re.match(r"^([^=!]+)(==|=|!=)(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        name, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
        if name not in fields:
            raise SelectorError(f'field label not supported: {name}')
        terms.append((fields[name], op != "!=", value))
    return FieldSelector(tuple(terms))


def labels_of(obj: dict) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def all_match(objs: Iterable[dict], labels: LabelSelector, fields: FieldSelector) -> list[dict]:
    return [o for o in objs if labels.matches(labels_of(o)) and fields.matches(o)]
