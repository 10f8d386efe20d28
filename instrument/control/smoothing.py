"""Pure value shaping for live control: curves, smoothers and takeover.

Everything here is plain arithmetic on floats with no clock of its own: callers pass the time
step, so the same knob gesture gives the same result at any render rate.

Control positions are normalised to 0..1; curves map a position into a parameter range and back
(the inverse is what takeover and relative encoders need to know where a parameter "is" on the
control).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CURVES = ("linear", "exponential", "logarithmic", "power")
TAKEOVERS = ("jump", "pickup", "scale")
SMOOTHERS = ("onepole", "slew", "euro")


# -- curves -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Maps a control position x in 0..1 to a value in lo..hi (and back with `inverse`).

    exponential: lo * (hi/lo)**x, equal ratios per equal knob travel (frequencies, scales);
    logarithmic: the mirror image (inverse function of the normalised exponential);
    power: lo + (hi - lo) * x**gamma.  exponential/logarithmic need lo and hi non-zero and of
    one sign; `check` says so before a curve is used.
    """

    kind: str = "linear"
    lo: float = 0.0
    hi: float = 1.0
    gamma: float = 2.0
    invert: bool = False

    def check(self) -> str | None:
        """A reason this curve cannot work, or None."""
        if self.kind not in CURVES:
            return f"unknown curve '{self.kind}' (use {', '.join(CURVES)})"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return "range must be finite"
        if self.kind in ("exponential", "logarithmic"):
            if self.lo == 0 or self.hi == 0 or (self.lo > 0) != (self.hi > 0):
                return (f"{self.kind} curve needs lo and hi non-zero and of one sign "
                        f"(got {self.lo}, {self.hi}); use 'power' for ranges through 0")
        if self.kind == "power" and not (math.isfinite(self.gamma) and self.gamma > 0):
            return f"power curve needs gamma > 0 (got {self.gamma})"
        return None

    def _shape(self, x: float) -> float:
        """Normalised 0..1 -> 0..1 shape of the curve."""
        if self.kind == "linear" or self.lo == self.hi:
            return x
        if self.kind == "power":
            return x**self.gamma
        r = self.hi / self.lo
        if self.kind == "exponential":
            return (r**x - 1.0) / (r - 1.0)
        return math.log1p(x * (r - 1.0)) / math.log(r)  # logarithmic

    def _unshape(self, u: float) -> float:
        if self.kind == "linear" or self.lo == self.hi:
            return u
        if self.kind == "power":
            return u ** (1.0 / self.gamma)
        r = self.hi / self.lo
        if self.kind == "exponential":
            return math.log1p(u * (r - 1.0)) / math.log(r)
        return (r**u - 1.0) / (r - 1.0)

    def apply(self, x: float) -> float:
        x = min(max(x, 0.0), 1.0)
        if self.invert:
            x = 1.0 - x
        if self.kind == "exponential":
            # The direct formula keeps the endpoints and ratios exact.
            return self.lo * (self.hi / self.lo) ** x
        return self.lo + (self.hi - self.lo) * self._shape(x)

    def inverse(self, value: float) -> float:
        """The control position (0..1) that gives `value`, clamped into the range first."""
        if self.lo == self.hi:
            return 0.0
        lo, hi = min(self.lo, self.hi), max(self.lo, self.hi)
        v = min(max(value, lo), hi)
        u = (v - self.lo) / (self.hi - self.lo)
        x = min(max(self._unshape(min(max(u, 0.0), 1.0)), 0.0), 1.0)
        return 1.0 - x if self.invert else x


# -- smoothers --------------------------------------------------------------------------------


class OnePole:
    """y += (1 - exp(-dt/tau)) (x - y): the same time constant at any tick rate."""

    def __init__(self, tau: float):
        self.tau = max(float(tau), 0.0)
        self.y: float | None = None

    def reset(self, y: float) -> None:
        self.y = y

    def step(self, x: float, dt: float) -> float:
        if self.y is None or self.tau == 0.0:
            self.y = x
        elif dt > 0:
            self.y += (1.0 - math.exp(-dt / self.tau)) * (x - self.y)
        return self.y


class Slew:
    """Moves at most `rate` units per second towards the target."""

    def __init__(self, rate: float):
        self.rate = max(float(rate), 0.0)
        self.y: float | None = None

    def reset(self, y: float) -> None:
        self.y = y

    def step(self, x: float, dt: float) -> float:
        if self.y is None or self.rate == 0.0:
            self.y = x
        elif dt > 0:
            limit = self.rate * dt
            self.y += min(max(x - self.y, -limit), limit)
        return self.y


class OneEuro:
    """One Euro filter (Casiez, Roussel, Vogel 2012): low jitter at rest, low lag in motion.

    The cutoff rises with the (itself low-passed) speed: fc = mincutoff + beta * |dx/dt|.
    """

    def __init__(self, mincutoff: float = 1.0, beta: float = 0.0, dcutoff: float = 1.0):
        self.mincutoff = float(mincutoff)
        self.beta = float(beta)
        self.dcutoff = float(dcutoff)
        self.y: float | None = None
        self.dx = 0.0

    @staticmethod
    def alpha(cutoff: float, dt: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def reset(self, y: float) -> None:
        self.y = y
        self.dx = 0.0

    def step(self, x: float, dt: float) -> float:
        if self.y is None:
            self.y = x
            self.dx = 0.0
            return x
        if dt <= 0:
            return self.y
        a_d = self.alpha(self.dcutoff, dt)
        self.dx += a_d * ((x - self.y) / dt - self.dx)
        cutoff = self.mincutoff + self.beta * abs(self.dx)
        self.y += self.alpha(cutoff, dt) * (x - self.y)
        return self.y


@dataclass(frozen=True)
class Smoothing:
    """A smoother's description as it appears in a mapping file."""

    kind: str = "onepole"  # onepole | slew | euro
    tau: float = 0.05  # onepole: seconds
    rate: float = 1.0  # slew: parameter units per second
    mincutoff: float = 1.0  # euro: Hz
    beta: float = 0.0  # euro
    dcutoff: float = 1.0  # euro: Hz

    def check(self) -> str | None:
        if self.kind not in SMOOTHERS:
            return f"unknown smoothing '{self.kind}' (use {', '.join(SMOOTHERS)})"
        for name in ("tau", "rate", "beta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                return f"smoothing {name} must be >= 0 (got {v})"
        for name in ("mincutoff", "dcutoff"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                return f"smoothing {name} must be > 0 (got {v})"
        return None

    def make(self):
        if self.kind == "slew":
            return Slew(self.rate)
        if self.kind == "euro":
            return OneEuro(self.mincutoff, self.beta, self.dcutoff)
        return OnePole(self.tau)


# -- takeover ---------------------------------------------------------------------------------


class Takeover:
    """What a physical control does when it disagrees with the parameter (Ableton's modes).

    Positions are in control space (0..1). `feed(control, param)` returns the new parameter
    position, or None to leave the parameter alone.

    jump:   the parameter follows the control at once.
    pickup: nothing happens until the control reaches or crosses the parameter's position;
            from then on it follows.
    scale:  each movement moves the parameter a proportional part of the way it has left in
            that direction, so control and parameter meet at the end of the travel (or as soon
            as they touch), then follow.
    `release()` forgets the hold (call it when something else moved the parameter).
    """

    CATCH = 0.5 / 127  # half a 7-bit step: "the same position"

    def __init__(self, mode: str = "jump"):
        if mode not in TAKEOVERS:
            raise ValueError(f"unknown takeover '{mode}' (use {', '.join(TAKEOVERS)})")
        self.mode = mode
        self.last: float | None = None  # previous control position
        self.caught = mode == "jump"

    def release(self) -> None:
        self.caught = self.mode == "jump"

    def feed(self, control: float, param: float) -> float | None:
        prev, self.last = self.last, control
        if self.caught or abs(control - param) <= self.CATCH:
            self.caught = True
            return control
        if prev is None:
            return None
        if self.mode == "pickup":
            if (prev - param) * (control - param) <= 0:  # reached or crossed
                self.caught = True
                return control
            return None
        # scale
        if control > prev and param < 1.0 and prev < 1.0:
            new = param + (1.0 - param) * (control - prev) / (1.0 - prev)
        elif control < prev and param > 0.0 and prev > 0.0:
            new = param - param * (prev - control) / prev
        else:
            return None
        if abs(new - control) <= self.CATCH:
            self.caught = True
            return control
        return min(max(new, 0.0), 1.0)
