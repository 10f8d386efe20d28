"""The parameter space: every live value of the instrument under a stable name.

Control (MIDI, OSC, patches, modulators) writes values here by name; the render loop reads a
snapshot once per chunk and copies it into the engine's preallocated device tensors. Names are
slash paths ("bend/melt/mix", "prompt/blend"); the OSC address of a parameter is "/" + its name.

Writers never raise on a performer's bad value: `set` clamps out-of-range values and refuses
non-finite ones with a `ParamError` whose message is fit to show on stage.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


class ParamError(ValueError):
    """A value or name the instrument refuses; the message is meant for the performer."""


class UnknownParam(ParamError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


def finite_value(name: str, value) -> float:
    """A performer's value as a float, or a ParamError saying why not (not a number, NaN, inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParamError(f"{name}: not a number: {value!r}") from None
    if not math.isfinite(v):
        raise ParamError(f"{name}: refused non-finite value {v}")
    return v


@dataclass(frozen=True)
class ParamSpec:
    name: str
    lo: float
    hi: float
    default: float
    unit: str = ""
    doc: str = ""
    integer: bool = False

    def clamp(self, value: float) -> float:
        v = min(max(float(value), self.lo), self.hi)
        return float(round(v)) if self.integer else v

    def normalise(self, value: float) -> float:
        """0..1 position of a value in the range (controllers and feedback work in this)."""
        span = self.hi - self.lo
        return 0.0 if span == 0 else (value - self.lo) / span


@dataclass
class _Slot:
    spec: ParamSpec
    value: float
    changed_at: float | None = None  # arrival time of the control event behind the last change


@dataclass
class ParamSpace:
    """A thread-safe table of named live values with their specs."""

    _slots: dict[str, _Slot] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _listeners: list = field(default_factory=list)
    version: int = 0

    # -- structure (between patches, never from a knob) --------------------------------------
    def declare(self, spec: ParamSpec, value: float | None = None) -> None:
        if not (math.isfinite(spec.lo) and math.isfinite(spec.hi) and spec.lo <= spec.hi):
            raise ParamError(f"{spec.name}: bad range [{spec.lo}, {spec.hi}]")
        with self._lock:
            old = self._slots.get(spec.name)
            start = spec.default if value is None else value
            if old is not None and value is None:
                start = old.value
            self._slots[spec.name] = _Slot(spec, spec.clamp(start))
            self.version += 1

    def remove_prefix(self, prefix: str) -> None:
        with self._lock:
            for name in [n for n in self._slots if n.startswith(prefix)]:
                del self._slots[name]
            self.version += 1

    # -- reading ------------------------------------------------------------------------------
    def specs(self, prefix: str = "") -> list[ParamSpec]:
        with self._lock:
            return [s.spec for n, s in sorted(self._slots.items()) if n.startswith(prefix)]

    def spec(self, name: str) -> ParamSpec:
        with self._lock:
            slot = self._slots.get(name)
        if slot is None:
            raise UnknownParam(f"unknown parameter '{name}'")
        return slot.spec

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def get(self, name: str) -> float:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                raise UnknownParam(f"unknown parameter '{name}'")
            return slot.value

    def values(self, prefix: str = "") -> dict[str, float]:
        with self._lock:
            return {n: s.value for n, s in self._slots.items() if n.startswith(prefix)}

    # -- writing ------------------------------------------------------------------------------
    def set(self, name: str, value, *, arrived: float | None = None, source: str = "") -> float:
        """Set a value (clamped to its range); returns what was stored.

        `arrived` is the monotonic time the control event reached the instrument: the render loop
        uses it to measure knob-to-photon latency.
        """
        v = finite_value(name, value)
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                raise UnknownParam(f"unknown parameter '{name}'")
            v = slot.spec.clamp(v)
            if v == slot.value:
                return v
            slot.value = v
            slot.changed_at = time.monotonic() if arrived is None else arrived
            listeners = list(self._listeners)
        for fn in listeners:
            fn(name, v, source)
        return v

    def take_arrivals(self) -> float | None:
        """Earliest arrival time among changes since the last call (None if nothing changed)."""
        with self._lock:
            stamps = [s.changed_at for s in self._slots.values() if s.changed_at is not None]
            for s in self._slots.values():
                s.changed_at = None
        return min(stamps) if stamps else None

    def on_change(self, fn) -> None:
        """fn(name, value, source) after every stored change, on the writer's thread."""
        with self._lock:
            self._listeners.append(fn)
