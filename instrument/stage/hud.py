"""What the HUD says: pure text from a stats dict, recent control moves and warnings.

Drawing lives in instrument.stage.window; this module only decides the words, so it is tested
without a display. Warnings are rate-limited and expire: a performer twisting a broken knob gets
one line with a repeat count, not a scrolling wall.

Stats keys understood (any may be missing or None; missing ones are left out):
    gen_fps, chunk_ms, shown_fps, queue, queue_capacity, underruns, latency_p50_ms,
    latency_p95_ms, patch, frozen, recording (seconds recorded, or None), rec_dropped,
    learn (parameter armed for MIDI learn), dropped_messages
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..params import ParamSpace


@dataclass
class _Warning:
    text: str
    first: float
    last: float
    count: int = 1


@dataclass(frozen=True)
class Move:
    name: str
    value: float
    source: str
    at: float


class Hud:
    """HUD state: recent parameter moves and live warnings; `text(stats)` renders it."""

    def __init__(self, params: ParamSpace | None = None, *, clock: Callable[[], float] = time.monotonic,
                 recent: int = 6, move_ttl: float = 10.0, warn_ttl: float = 8.0, max_warnings: int = 4):
        self._clock = clock
        self._lock = threading.Lock()
        self._moves: OrderedDict[str, Move] = OrderedDict()  # newest last
        self._recent = recent
        self.move_ttl = move_ttl
        self.warn_ttl = warn_ttl
        self._max_warnings = max_warnings
        self._warnings: OrderedDict[str, _Warning] = OrderedDict()
        self.params = params
        if params is not None:
            params.on_change(self.moved)

    # -- inputs (any thread) ----------------------------------------------------------------
    def moved(self, name: str, value: float, source: str = "") -> None:
        """A parameter changed (ParamSpace.on_change signature)."""
        with self._lock:
            self._moves.pop(name, None)
            self._moves[name] = Move(name, float(value), source, self._clock())
            while len(self._moves) > self._recent:
                self._moves.popitem(last=False)

    def warn(self, message: str, key: str | None = None) -> bool:
        """Show a warning; repeats of the same key (default: the message) within its lifetime
        only bump a counter. Returns True if this is a new line (worth logging)."""
        message = " ".join(str(message).split()) or "warning"
        key = key or message
        now = self._clock()
        with self._lock:
            self._expire(now)
            w = self._warnings.pop(key, None)
            if w is not None:
                w.count += 1
                w.last = now
                w.text = message
                self._warnings[key] = w
                return False
            self._warnings[key] = _Warning(message, now, now)
            while len(self._warnings) > self._max_warnings:
                self._warnings.popitem(last=False)
            return True

    def _expire(self, now: float) -> None:
        for key in [k for k, w in self._warnings.items() if now - w.last > self.warn_ttl]:
            del self._warnings[key]

    # -- queries ----------------------------------------------------------------------------
    def last_moved(self) -> str | None:
        """The parameter touched last (what L arms for MIDI learn)."""
        with self._lock:
            return next(reversed(self._moves), None) if self._moves else None

    def recent_moves(self) -> list[Move]:
        now = self._clock()
        with self._lock:
            return [m for m in reversed(self._moves.values()) if now - m.at <= self.move_ttl]

    def warnings(self) -> list[str]:
        now = self._clock()
        with self._lock:
            self._expire(now)
            return [w.text if w.count == 1 else f"{w.text} (x{w.count})" for w in reversed(self._warnings.values())]

    # -- rendering --------------------------------------------------------------------------
    def text(self, stats: dict | None = None) -> str:
        stats = stats or {}
        lines = []
        perf = _join(
            _fmt(stats, "gen_fps", "gen {:.1f} fps"),
            _fmt(stats, "chunk_ms", "chunk {:.0f} ms"),
            _fmt(stats, "shown_fps", "shown {:.1f} fps"),
            _queue(stats),
            _fmt(stats, "underruns", "underruns {:d}", int),
        )
        if perf:
            lines.append(perf)
        lat = _join(_fmt(stats, "latency_p50_ms", "knob->photon p50 {:.0f} ms"),
                    _fmt(stats, "latency_p95_ms", "p95 {:.0f} ms"))
        if lat:
            lines.append(lat)
        state = []
        if stats.get("patch"):
            state.append(f"patch {stats['patch']}")
        if stats.get("frozen"):
            state.append("FROZEN")
        if stats.get("recording") is not None:
            secs = int(stats["recording"])
            rec = f"REC {secs // 60:02d}:{secs % 60:02d}"
            if stats.get("rec_dropped"):
                rec += f" ({int(stats['rec_dropped'])} dropped)"
            state.append(rec)
        if stats.get("learn"):
            state.append(f"LEARN {stats['learn']}: move a control")
        if stats.get("dropped_messages"):
            state.append(f"{int(stats['dropped_messages'])} messages dropped")
        if state:
            lines.append("  ".join(state))
        for m in self.recent_moves():
            src = f"  [{m.source}]" if m.source else ""
            lines.append(f"{m.name} = {_value(m.value)}{src}")
        for w in self.warnings():
            lines.append(f"! {w}")
        return "\n".join(lines)


def _fmt(stats: dict, key: str, pattern: str, cast=float) -> str:
    v = stats.get(key)
    if v is None:
        return ""
    try:
        return pattern.format(cast(v))
    except (TypeError, ValueError):
        return ""


def _queue(stats: dict) -> str:
    q = stats.get("queue")
    if q is None:
        return ""
    cap = stats.get("queue_capacity")
    return f"queue {int(q)}/{int(cap)}" if cap else f"queue {int(q)}"


def _value(v: float) -> str:
    return f"{v:.0f}" if v == int(v) and abs(v) >= 10 else f"{v:.3g}"


def _join(*parts: str) -> str:
    return "  ".join(p for p in parts if p)
