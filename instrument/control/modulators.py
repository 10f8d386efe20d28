"""Modulators: LFOs, note-triggered envelopes and the tempo they follow.

A modulator's output is an offset in the *normalised* range of its target (0..1 spans the whole
parameter range), added by the Router to the value the controls set. Each modulator's own
settings are live parameters ("mod/<name>/rate", "mod/<name>/depth", ...) so a knob or an OSC
message can play them like anything else.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from ..params import ParamSpace, ParamSpec

SHAPES = ("sine", "triangle", "saw", "square", "sh")
PPQN = 24  # MIDI clock pulses per quarter note


class Tempo:
    """Beats per minute and a running beat position; MIDI clock or a set value drives it.

    With clock running, the beat position is the pulse count / 24 (exactly locked to the sender)
    and bpm is measured over the last beat of pulses. Otherwise the position advances at `bpm`.
    """

    def __init__(self, bpm: float = 120.0):
        self.bpm = float(bpm)
        self.beat = 0.0
        self.running = True  # free-running until a clock says otherwise
        self._pulses: deque[float] = deque(maxlen=PPQN + 1)
        self._pulse_count = 0
        self._clock_beat: float | None = None  # beat position at the last pulse
        self._last_pulse = -math.inf

    def set_bpm(self, bpm: float) -> None:
        if math.isfinite(bpm) and 1.0 <= bpm <= 999.0:
            self.bpm = float(bpm)

    def clock(self, t: float) -> None:
        """One 0xF8 pulse that arrived at time t."""
        self._pulses.append(t)
        self._last_pulse = t
        if len(self._pulses) >= 2:
            span = self._pulses[-1] - self._pulses[0]
            if span > 0:
                self.set_bpm(60.0 * (len(self._pulses) - 1) / (PPQN * span))
        if self.running:
            self._pulse_count += 1
            self._clock_beat = self._pulse_count / PPQN

    def start(self, t: float) -> None:
        # The first pulse after Start is beat 0.
        self._pulse_count = -1
        self._clock_beat = 0.0
        self.beat = 0.0
        self.running = True

    def cont(self, t: float) -> None:
        self.running = True

    def stop(self, t: float) -> None:
        self.running = False

    def advance(self, now: float, dt: float) -> float:
        """Move the beat position to `now`; returns it."""
        clocked = now - self._last_pulse < 0.5
        if clocked and self._clock_beat is not None:
            self.beat = self._clock_beat
            if self.running:
                # Interpolate within the pulse so synced LFOs move smoothly between pulses.
                since = max(now - self._last_pulse, 0.0)
                self.beat += min(since * self.bpm / 60.0, 1.0 / PPQN)
        elif self.running:
            self.beat += dt * self.bpm / 60.0
        return self.beat


def wave(shape: str, phase: float, held: float = 0.0) -> float:
    """Bipolar (-1..1) waveform at `phase` cycles; all shapes rise through 0 at phase 0
    like a sine (square is +1 for the first half cycle). `held` is the sample-and-hold value."""
    p = phase - math.floor(phase)
    if shape == "sine":
        return math.sin(2.0 * math.pi * p)
    if shape == "triangle":
        q = p - 0.25
        return 4.0 * abs(q - math.floor(q) - 0.5) - 1.0
    if shape == "saw":
        q = p + 0.5
        return 2.0 * (q - math.floor(q)) - 1.0
    if shape == "square":
        return 1.0 if p < 0.5 else -1.0
    return held


@dataclass
class LFOSpec:
    name: str
    target: str
    shape: str = "sine"
    rate: float = 1.0  # Hz, or cycle length in beats when sync
    sync: bool = False
    depth: float = 0.25  # normalised range units, peak
    offset: float = 0.0  # normalised range units
    phase: float = 0.0  # cycles

    def check(self) -> str | None:
        if self.shape not in SHAPES:
            return f"unknown LFO shape '{self.shape}' (use {', '.join(SHAPES)})"
        lo, hi = self.rate_range()
        if not (math.isfinite(self.rate) and lo <= self.rate <= hi):
            unit = "beats" if self.sync else "Hz"
            return f"LFO rate must be in {lo}..{hi} {unit} (got {self.rate})"
        for k in ("depth", "offset", "phase"):
            if not math.isfinite(getattr(self, k)):
                return f"LFO {k} must be a finite number"
        return None

    def rate_range(self) -> tuple[float, float]:
        return (1.0 / 16, 256.0) if self.sync else (0.0, 40.0)


@dataclass
class EnvelopeSpec:
    name: str
    target: str
    attack: float = 0.01  # seconds
    decay: float = 0.2
    sustain: float = 0.5  # level 0..1
    release: float = 0.5
    depth: float = 0.5  # normalised range units at full level
    velocity: bool = True  # scale the peak by note velocity
    port: str = ""  # trigger notes: port substring ("" any)
    channel: int = -1  # 0-15, -1 any
    notes: tuple[int, ...] = ()  # () any note

    def check(self) -> str | None:
        for k in ("attack", "decay", "release"):
            v = getattr(self, k)
            if not (math.isfinite(v) and 0 <= v <= 60):
                return f"envelope {k} must be 0..60 s (got {v})"
        if not (math.isfinite(self.sustain) and 0 <= self.sustain <= 1):
            return f"envelope sustain must be 0..1 (got {self.sustain})"
        if not math.isfinite(self.depth):
            return "envelope depth must be a finite number"
        return None


class LFO:
    def __init__(self, spec: LFOSpec, seed: int | None = None):
        self.spec = spec
        self.phase = spec.phase
        self._rng = random.Random(seed)
        self._cycle: int | None = None
        self._held = 0.0

    def params(self) -> list[ParamSpec]:
        lo, hi = self.spec.rate_range()
        unit = "beats" if self.spec.sync else "Hz"
        base = f"mod/{self.spec.name}"
        return [
            ParamSpec(f"{base}/rate", lo, hi, self.spec.rate, unit, "LFO rate"),
            ParamSpec(f"{base}/depth", -1.0, 1.0, self.spec.depth, "", "LFO depth (of range)"),
            ParamSpec(f"{base}/offset", -1.0, 1.0, self.spec.offset, "", "LFO offset (of range)"),
        ]

    def value(self, params: ParamSpace, dt: float, beat: float) -> float:
        base = f"mod/{self.spec.name}"
        rate = params.get(f"{base}/rate")
        if self.spec.sync:
            # Locked to the beat position so every synced LFO stays in phase with the music.
            self.phase = (beat / rate if rate > 0 else 0.0) + self.spec.phase
        else:
            self.phase += rate * dt
        cycle = math.floor(self.phase)
        if self.spec.shape == "sh" and cycle != self._cycle:
            self._cycle = cycle
            self._held = self._rng.uniform(-1.0, 1.0)
        w = wave(self.spec.shape, self.phase, self._held)
        return params.get(f"{base}/offset") + params.get(f"{base}/depth") * w


class Envelope:
    """Linear ADSR; a new note restarts the attack from the current level (no click)."""

    def __init__(self, spec: EnvelopeSpec):
        self.spec = spec
        self.level = 0.0
        self.stage = "idle"  # idle | attack | decay | sustain | release
        self.peak = 1.0
        self._start = 0.0
        self._held: set[tuple[str, int, int]] = set()

    def params(self) -> list[ParamSpec]:
        s, base = self.spec, f"mod/{self.spec.name}"
        return [
            ParamSpec(f"{base}/depth", -1.0, 1.0, s.depth, "", "envelope depth (of range)"),
            ParamSpec(f"{base}/attack", 0.0, 60.0, s.attack, "s", "attack time"),
            ParamSpec(f"{base}/decay", 0.0, 60.0, s.decay, "s", "decay time"),
            ParamSpec(f"{base}/sustain", 0.0, 1.0, s.sustain, "", "sustain level"),
            ParamSpec(f"{base}/release", 0.0, 60.0, s.release, "s", "release time"),
        ]

    def matches(self, port: str, channel: int, note: int) -> bool:
        s = self.spec
        return ((not s.port or s.port.lower() in port.lower())
                and (s.channel < 0 or s.channel == channel)
                and (not s.notes or note in s.notes))

    def note_on(self, key: tuple[str, int, int], velocity: float) -> None:
        self._held.add(key)
        self.peak = velocity / 127.0 if self.spec.velocity else 1.0
        self.stage = "attack"

    def note_off(self, key: tuple[str, int, int]) -> None:
        self._held.discard(key)
        if not self._held and self.stage != "idle":
            self.stage = "release"
            self._start = self.level

    def value(self, params: ParamSpace, dt: float) -> float:
        base = f"mod/{self.spec.name}"
        a, d = params.get(f"{base}/attack"), params.get(f"{base}/decay")
        s, r = params.get(f"{base}/sustain") * self.peak, params.get(f"{base}/release")
        if self.stage == "attack":
            self.level = self.level + dt * self.peak / a if a > 0 else self.peak
            if self.level >= self.peak:
                self.level, self.stage = self.peak, "decay"
        elif self.stage == "decay":
            self.level = self.level - dt * (self.peak - s) / d if d > 0 else s
            if self.level <= s:
                self.level, self.stage = s, "sustain"
        elif self.stage == "sustain":
            self.level = s
        elif self.stage == "release":
            self.level = self.level - dt * self._start / r if r > 0 and self._start > 0 else 0.0
            if self.level <= 0.0:
                self.level, self.stage = 0.0, "idle"
        return params.get(f"{base}/depth") * self.level
