"""Curves, smoothers and takeover against values worked by hand (float64 arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from instrument.control.smoothing import Curve, OneEuro, OnePole, Slew, Smoothing, Takeover

rng = np.random.default_rng()  # fresh inputs every run; failures print the values


def test_linear_and_power_worked_values():
    assert Curve("linear", -2.0, 6.0).apply(0.25) == 0.0
    assert Curve("power", 0.0, 10.0, gamma=2.0).apply(0.3) == pytest.approx(0.9, abs=1e-15)
    # invert reads the knob backwards: 0.3 -> 0.7 -> 10 * 0.49
    assert Curve("power", 0.0, 10.0, gamma=2.0, invert=True).apply(0.3) == pytest.approx(4.9)
    assert Curve("power", 0.0, 8.0, gamma=1 / 3).apply(0.125) == pytest.approx(4.0)


def test_exponential_worked_values():
    c = Curve("exponential", 20.0, 20000.0)
    assert c.apply(0.0) == 20.0 and c.apply(1.0) == pytest.approx(20000.0, rel=1e-15)
    assert c.apply(0.5) == pytest.approx(math.sqrt(20.0 * 20000.0), rel=1e-14)  # 632.455...
    assert c.apply(1 / 3) == pytest.approx(200.0, rel=1e-14)  # 20 * 1000**(1/3)
    neg = Curve("exponential", -0.1, -10.0)
    assert neg.apply(0.5) == pytest.approx(-1.0, rel=1e-14)


def test_logarithmic_is_the_mirror_of_exponential():
    lo, hi = 1.0, 100.0
    log = Curve("logarithmic", lo, hi)
    # u = log(1 + x (r - 1)) / log r with r = 100, x = 0.5: log(50.5) / log(100)
    assert log.apply(0.5) == pytest.approx(1 + 99 * (math.log(50.5) / math.log(100)), rel=1e-14)
    # Its normalised shape is the inverse function of the exponential's.
    exp = Curve("exponential", lo, hi)
    for x in rng.random(50):
        u = (log.apply(x) - lo) / (hi - lo)
        assert (exp.apply(u) - lo) / (hi - lo) == pytest.approx(x, abs=1e-12)


@pytest.mark.parametrize("kind,lo,hi", [("linear", -3.0, 5.0), ("power", 0.0, 2.0),
                                        ("exponential", 0.25, 4.0), ("logarithmic", 2.0, 50.0),
                                        ("linear", 1.0, 0.0)])
@pytest.mark.parametrize("invert", [False, True])
def test_inverse_round_trips(kind, lo, hi, invert):
    c = Curve(kind, lo, hi, gamma=float(rng.uniform(0.2, 5.0)), invert=invert)
    for x in rng.random(100):
        assert c.inverse(c.apply(x)) == pytest.approx(x, abs=1e-9), (c, x)
    assert c.inverse(max(lo, hi) + 10) in (0.0, 1.0)  # outside the range: clamped


def test_curve_checks():
    assert Curve("exponential", 0.0, 1.0).check() is not None  # needs non-zero ends
    assert Curve("logarithmic", -1.0, 1.0).check() is not None
    assert Curve("power", 0, 1, gamma=0).check() is not None
    assert Curve("wobbly").check().startswith("unknown curve")
    assert Curve("exponential", 0.25, 4).check() is None


def test_one_pole_worked_and_rate_independent():
    f = OnePole(0.1)
    f.reset(0.0)
    assert f.step(1.0, 0.05) == pytest.approx(1 - math.exp(-0.5), abs=1e-15)  # 0.393469...
    for tau in rng.uniform(0.01, 1.0, 5):
        coarse, fine = OnePole(tau), OnePole(tau)
        coarse.reset(0.0)
        fine.reset(0.0)
        target = float(rng.uniform(-5, 5))
        a = coarse.step(target, 0.1)
        for _ in range(10):
            b = fine.step(target, 0.01)
        assert b == pytest.approx(a, abs=1e-12)
        assert a == pytest.approx(target * (1 - math.exp(-0.1 / tau)), abs=1e-12)


def test_slew_limits_units_per_second():
    s = Slew(2.0)
    s.reset(0.0)
    assert [round(s.step(0.5, 0.1), 12) for _ in range(4)] == [0.2, 0.4, 0.5, 0.5]
    assert s.step(-1.0, 0.25) == pytest.approx(0.0)


def test_one_euro_worked_values():
    # beta = 0: a plain low-pass, alpha = 1 / (1 + tau/dt), tau = 1 / (2 pi fc)
    f = OneEuro(mincutoff=1.0, beta=0.0, dcutoff=1.0)
    f.step(0.0, 0.01)
    assert f.step(1.0, 0.01) == pytest.approx(1 / (1 + (1 / (2 * math.pi)) / 0.01), abs=1e-15)
    # beta = 1, dt = 0.1, a step 0 -> 1: speed 10, low-passed by alpha_d, raises the cutoff
    g = OneEuro(mincutoff=1.0, beta=1.0, dcutoff=1.0)
    g.step(0.0, 0.1)
    a_d = 1 / (1 + (1 / (2 * math.pi)) / 0.1)  # 0.38585...
    cutoff = 1.0 + 1.0 * abs(a_d * 10.0)  # 4.8585...
    alpha = 1 / (1 + (1 / (2 * math.pi * cutoff)) / 0.1)  # 0.7532...
    assert g.step(1.0, 0.1) == pytest.approx(alpha, abs=1e-15)
    assert 0.75 < alpha < 0.76


def test_smoothing_spec_makes_and_checks():
    assert isinstance(Smoothing("euro", beta=0.1).make(), OneEuro)
    assert isinstance(Smoothing("slew", rate=3).make(), Slew)
    assert Smoothing("slew", rate=-1).check() is not None
    assert Smoothing("euro", mincutoff=0).check() is not None


def test_takeover_jump():
    t = Takeover("jump")
    assert t.feed(0.1, 0.9) == 0.1


def test_takeover_pickup_waits_for_the_crossing():
    t = Takeover("pickup")
    assert t.feed(0.1, 0.5) is None  # far below
    assert t.feed(0.3, 0.5) is None
    assert t.feed(0.6, 0.5) == 0.6  # crossed 0.5: picked up
    assert t.feed(0.2, 0.5) == 0.2  # follows from now on
    t.release()  # something else moved the parameter to 0.4 while the knob was at 0.2
    assert t.feed(0.1, 0.4) is None  # moving away
    assert t.feed(0.3, 0.4) is None
    assert t.feed(0.4, 0.4) == 0.4  # reached exactly
    down = Takeover("pickup")
    assert down.feed(0.9, 0.3) is None
    assert down.feed(0.2, 0.3) == 0.2  # crossed from above


def test_takeover_value_scaling_converges():
    t = Takeover("scale")
    assert t.feed(0.2, 0.8) is None  # first position: nothing to scale yet
    assert t.feed(0.4, 0.8) == pytest.approx(0.8 + 0.2 * 0.2 / 0.8)  # 0.85
    assert t.feed(1.0, 0.85) == pytest.approx(1.0)  # meet at the end of travel
    assert t.caught and t.feed(0.5, 1.0) == 0.5
    d = Takeover("scale")
    d.feed(0.8, 0.2)
    assert d.feed(0.4, 0.2) == pytest.approx(0.2 - 0.2 * 0.4 / 0.8)  # 0.1
    with pytest.raises(ValueError):
        Takeover("sideways")
