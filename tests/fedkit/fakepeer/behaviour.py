"""Misbehaviour rules applied to incoming federation requests."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

ACTIONS = (
    "delay",
    "error",
    "hang",
    "drop",
    "bad_signature",
    "omit",
    "hold",
    "trickle",
    "truncate",
    "malformed",
)
#: ``malformed``: what is wrong with the answer (see :mod:`.badanswers`).
MALFORMED_MODES = ("invalid_json", "wrong_shape")


class BehaviourError(ValueError):
    """Invalid behaviour specification."""


@dataclass
class Behaviour:
    """One rule: on ``server`` (or ``*``), requests whose path matches ``path_regex``."""

    id: str
    server: str
    path_regex: str
    action: str
    seconds: float = 0.0
    status: int = 500
    count: int | None = None
    #: ``omit``: member events to leave out of the answer's ``pdus``
    omit: int = 0
    #: ``malformed``: one of :data:`MALFORMED_MODES`
    mode: str = ""
    #: Matching requests let through untouched before the rule applies (the
    #: first ones are not counted as hits)
    skip: int = 0
    hits: int = 0
    skipped: int = 0
    #: False once the rule is removed (a ``trickle`` in progress then speeds up)
    active: bool = True
    _rx: re.Pattern[str] = field(default=re.compile(""), repr=False)
    #: ``hold``: requests waiting for the rule's removal
    _held: list[defer.Deferred[None]] = field(default_factory=list, repr=False)

    def held(self) -> defer.Deferred[None]:
        """``hold``: fires when the rule is removed (see :meth:`release`)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._held.append(d)
        return d

    def release(self) -> None:
        """The rule is removed: let every request it holds go on, and every
        answer it trickles finish at once."""
        self.active = False
        held, self._held = self._held, []
        for d in held:
            if not d.called:
                d.callback(None)

    def to_json(self) -> dict[str, Any]:
        """Control API representation."""
        return {
            "id": self.id,
            "server": self.server,
            "path_regex": self.path_regex,
            "action": self.action,
            "seconds": self.seconds,
            "status": self.status,
            "count": self.count,
            "omit": self.omit,
            "mode": self.mode,
            "skip": self.skip,
            "skipped": self.skipped,
            "hits": self.hits,
        }


class BehaviourTable:
    """The active rules; the first matching rule with budget left applies."""

    def __init__(self) -> None:
        self._rules: list[Behaviour] = []
        self._ids = itertools.count(1)

    def add(self, body: dict[str, Any]) -> Behaviour:
        """Add a rule from a control API body."""
        action = body.get("action")
        if action not in ACTIONS:
            raise BehaviourError(f"action must be one of {ACTIONS}")
        path_regex = body.get("path_regex", "")
        try:
            rx = re.compile(path_regex)
        except re.error as e:
            raise BehaviourError(f"bad path_regex: {e}") from e
        count = body.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise BehaviourError("count must be null or a non-negative integer")
        omit = body.get("omit") or 0
        if not isinstance(omit, int) or isinstance(omit, bool) or omit < 0:
            raise BehaviourError("omit must be a non-negative integer")
        if action == "omit" and omit == 0:
            raise BehaviourError("action omit needs omit >= 1")
        skip = body.get("skip") or 0
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
            raise BehaviourError("skip must be a non-negative integer")
        mode = body.get("mode") or ""
        if action == "malformed":
            mode = mode or MALFORMED_MODES[0]
            if mode not in MALFORMED_MODES:
                raise BehaviourError(f"mode must be one of {MALFORMED_MODES}")
        elif mode:
            raise BehaviourError("mode is only for action malformed")
        rule = Behaviour(
            id=str(next(self._ids)),
            server=str(body.get("server") or "*"),
            path_regex=path_regex,
            action=action,
            seconds=float(body.get("seconds") or 0.0),
            status=int(body.get("status") or 500),
            count=count,
            omit=omit,
            mode=mode,
            skip=skip,
            _rx=rx,
        )
        self._rules.append(rule)
        return rule

    def clear(self) -> int:
        """Remove all rules; returns how many there were."""
        n = len(self._rules)
        rules, self._rules = self._rules, []
        for rule in rules:
            rule.release()
        return n

    def remove(self, rule_id: str) -> bool:
        """Remove one rule by id."""
        gone = [r for r in self._rules if r.id == rule_id]
        self._rules = [r for r in self._rules if r.id != rule_id]
        for rule in gone:
            rule.release()
        return bool(gone)

    def list(self) -> list[dict[str, Any]]:
        """All rules, as JSON."""
        return [r.to_json() for r in self._rules]

    def match(self, server: str, paths: tuple[str, ...]) -> Behaviour | None:
        """The rule applying to a request (consumes one use of its count, or
        one of the requests it lets through first)."""
        for rule in self._rules:
            if rule.server not in ("*", server):
                continue
            if rule.count is not None and rule.hits >= rule.count:
                continue
            if any(rule._rx.search(p) for p in paths):
                if rule.skipped < rule.skip:
                    rule.skipped += 1
                    continue
                rule.hits += 1
                return rule
        return None
