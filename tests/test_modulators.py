"""LFOs, envelopes and tempo: worked values, directly and through the Router."""

from __future__ import annotations

import math

import pytest

from instrument.control.events import ControlEvent
from instrument.control.mapping import Mapping, Router
from instrument.control.modulators import Tempo, wave
from instrument.params import ParamSpace, ParamSpec


@pytest.mark.parametrize("shape,values", [
    ("sine", [0.0, 1.0, 0.0, -1.0]),
    ("triangle", [0.0, 1.0, 0.0, -1.0]),
    ("saw", [0.0, 0.5, -1.0, -0.5]),
    ("square", [1.0, 1.0, -1.0, -1.0]),
])
def test_wave_shapes_at_quarter_cycles(shape, values):
    got = [wave(shape, p) for p in (0.0, 0.25, 0.5, 0.75)]
    assert got == pytest.approx(values, abs=1e-12)
    assert wave(shape, 3.25) == pytest.approx(values[1], abs=1e-12)  # periodic


def space():
    ps = ParamSpace()
    ps.declare(ParamSpec("bend/melt/mix", 0.0, 10.0, 5.0))
    return ps


def cc(number, value, t=0.0, channel=0, port="p"):
    return ControlEvent("midi", "cc", value, t, port, channel, number)


def test_lfo_in_hz_moves_its_target_by_depth_of_range():
    ps = space()
    r = Router(ps, mapping=Mapping.loads(
        '[[lfo]]\nname = "wob"\ntarget = "bend/#1/mix"\nrate = 1.0\ndepth = 0.1\n'))
    r.tick(10.0)
    r.tick(10.25)  # a quarter cycle: sine at its peak
    assert ps.get("bend/melt/mix") == pytest.approx(5.0 + 0.1 * 10.0, abs=1e-9)
    r.tick(10.75)  # three quarters: trough
    assert ps.get("bend/melt/mix") == pytest.approx(4.0, abs=1e-9)


def test_modulator_settings_are_mappable_parameters():
    ps = space()
    m = Mapping.loads("""
[[lfo]]
name = "wob"
target = "bend/melt/mix"
shape = "square"
rate = 2.0
depth = 0.1
[[binding]]
type = "cc"
number = 1
param = "mod/wob/depth"
lo = 0.0
hi = 0.5
""")
    r = Router(ps, mapping=m)
    assert {"mod/wob/rate", "mod/wob/depth", "mod/wob/offset"} <= set(ps.values("mod/"))
    assert ps.spec("mod/wob/rate").unit == "Hz"
    r.handle(cc(1, 127))
    r.tick(0.0)
    r.tick(0.1)  # square, first half cycle: +depth
    assert ps.get("mod/wob/depth") == 0.5
    assert ps.get("bend/melt/mix") == 10.0  # 5 + 0.5 of the range 0..10
    r.set_target("mod/wob/rate", 4.0)
    r.tick(0.3)
    assert ps.get("mod/wob/rate") == 4.0


def test_synced_lfo_follows_tempo_set_over_osc():
    ps = space()
    r = Router(ps, mapping=Mapping.loads(
        '[[lfo]]\nname = "s"\ntarget = "bend/melt/mix"\nsync = true\nrate = 2.0\ndepth = 0.2\n'))
    assert ps.spec("mod/s/rate").unit == "beats"
    r.set_tempo(120.0)
    r.tick(0.0)
    r.tick(0.25)  # 0.5 beat of a 2-beat cycle = quarter cycle: peak
    assert ps.get("bend/melt/mix") == pytest.approx(5.0 + 2.0, abs=1e-9)


def test_midi_clock_measures_tempo_and_start_resets_the_beat():
    t = Tempo()
    t.start(0.0)
    for i in range(25):
        t.clock(1.0 + i / 48)  # 48 pulses per second = 2 beats per second
    assert t.bpm == pytest.approx(120.0, rel=1e-9)
    assert t.advance(1.0 + 24 / 48, 0.0) == pytest.approx(1.0)  # first pulse after start = 0
    t.stop(2.0)
    t.clock(1.0 + 25 / 48)
    assert t.advance(1.0 + 25 / 48, 0.01) == pytest.approx(1.0)  # stopped: no advance
    # Clock through the Router: events from a MIDI port.
    ps = space()
    r = Router(ps)
    r.handle(ControlEvent("midi", "start", 0, 5.0))
    for i in range(49):
        r.handle(ControlEvent("midi", "clock", 0, 5.0 + i / 36))  # 90 bpm
    assert r.tempo.bpm == pytest.approx(90.0, rel=1e-9)


def test_adsr_envelope_from_notes():
    ps = ParamSpace()
    ps.declare(ParamSpec("bend/melt/mix", 0.0, 1.0, 0.0))
    r = Router(ps, mapping=Mapping.loads("""
[[envelope]]
name = "hit"
target = "bend/melt/mix"
attack = 0.1
decay = 0.1
sustain = 0.5
release = 0.2
depth = 1.0
note = [36, 38]
"""))
    r.tick(0.0)
    r.handle(ControlEvent("midi", "note_on", 127, 0.0, "p", 0, 37))  # not a trigger note
    r.tick(0.05)
    assert ps.get("bend/melt/mix") == 0.0
    r.handle(ControlEvent("midi", "note_on", 127, 0.05, "p", 0, 36))
    got = []
    for i in range(2, 7):
        r.tick(0.05 * i)
        got.append(ps.get("bend/melt/mix"))
    assert got == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.5], abs=1e-9)
    r.handle(ControlEvent("midi", "note_on", 0, 0.3, "p", 0, 36))  # velocity 0 = note off
    got = []
    for i in range(7, 12):
        r.tick(0.05 * i)
        got.append(ps.get("bend/melt/mix"))
    assert got == pytest.approx([0.375, 0.25, 0.125, 0.0, 0.0], abs=1e-9)
    # Velocity scales the peak.
    r.handle(ControlEvent("midi", "note_on", 64, 0.6, "p", 0, 38))
    for i in range(13, 17):
        r.tick(0.05 * i)
    assert ps.get("bend/melt/mix") == pytest.approx(0.5 * 64 / 127, abs=1e-9)
    assert all(math.isfinite(v) for v in ps.values().values())
