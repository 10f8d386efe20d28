"""Mapping files and the Router: parsing, round trips, fuzzing, decoding, takeover, learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instrument.control.events import ControlEvent
from instrument.control.mapping import (
    MAPPINGS_DIR, Binding, Mapping, MappingError, Router, Source, Target, resolve_name)
from instrument.control.smoothing import Smoothing
from instrument.params import ParamError, ParamSpace, ParamSpec


class Recorder:
    """A Show recording what control asked of it."""

    def __init__(self, params=None):
        self.params = params
        self.calls: list = []
        self.warnings: list[str] = []

    def switch_patch(self, which):
        self.calls.append(("switch_patch", which))

    def freeze(self, on=None):
        self.calls.append(("freeze", on))

    def panic(self):
        self.calls.append(("panic",))

    def save_patch(self, path=None):
        self.calls.append(("save_patch", path))
        return "x"

    def warn(self, message):
        self.warnings.append(message)


def patch_space(bends=("melt", "warp")) -> ParamSpace:
    ps = ParamSpace()
    for b in bends:
        ps.declare(ParamSpec(f"bend/{b}/mix", 0.0, 1.0, 0.0))
        ps.declare(ParamSpec(f"bend/{b}/gain", 0.25, 4.0, 1.0))
    ps.declare(ParamSpec("prompt/blend", 0.0, 1.0, 0.0))
    return ps


def cc(number, value, t=1.0, channel=0, port="nanoKONTROL2 MIDI 1"):
    return ControlEvent("midi", "cc", value, t, port, channel, number)


def router(text, ps=None, show=None):
    ps = ps or patch_space()
    return ps, Router(ps, show, Mapping.loads(text))


# -- files ------------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
smoothings = st.builds(Smoothing, kind=st.sampled_from(["onepole", "slew", "euro"]),
                       tau=st.floats(0, 10), rate=st.floats(0, 100),
                       mincutoff=st.floats(0.01, 10), beta=st.floats(0, 10),
                       dcutoff=st.floats(0.01, 10))
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789/#_- ", min_size=1, max_size=20)
targets = st.builds(Target, param=names, lo=st.none() | finite, hi=st.none() | finite,
                    curve=st.sampled_from(["linear", "power"]), gamma=st.floats(0.01, 100),
                    invert=st.booleans(), smooth=st.none() | smoothings,
                    takeover=st.sampled_from(["jump", "pickup", "scale"]))
sources = st.builds(
    Source, type=st.sampled_from(["cc", "cc14", "nrpn", "note", "relative", "pitchbend"]),
    numbers=st.lists(st.integers(0, 31), min_size=1, max_size=3).map(tuple),
    channel=st.integers(-1, 15), port=st.text(max_size=10),
    mode=st.sampled_from(["absolute", "gate", "toggle", "trigger"]),
    encoding=st.sampled_from(["twos", "offset", "signed-bit"]), step=st.floats(0, 1),
    bits=st.sampled_from([7, 14]))
osc_sources = st.builds(Source, type=st.just("osc"), address=names.map(lambda s: "/" + s),
                        range=st.tuples(finite, finite).filter(lambda r: r[0] != r[1]))
bindings = st.builds(Binding, source=sources | osc_sources,
                     targets=st.lists(targets, min_size=1, max_size=3).map(tuple),
                     action=st.sampled_from(["", "freeze", "panic", "patch_next"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(bindings, max_size=5), st.text(max_size=20), st.booleans(),
       st.dictionaries(names, smoothings, max_size=3))
def test_save_then_load_gives_equal_mapping(bs, name, program_change, smooth):
    m = Mapping(name=name, bindings=list(bs), program_change=program_change, smooth=smooth)
    back = Mapping.loads(m.dumps())
    assert back.bindings == m.bindings
    assert (back.name, back.program_change, back.smooth) == (name, program_change, smooth)


def test_round_trip_through_a_file_with_modulators(tmp_path):
    text = (MAPPINGS_DIR / "generic.toml").read_text()
    m = Mapping.loads(text)
    assert m.bindings and m.lfos
    path = m.save(tmp_path / "copy.toml")
    back = Mapping.load(path)
    assert (back.bindings, back.lfos, back.envelopes, back.smooth) == (
        m.bindings, m.lfos, m.envelopes, m.smooth)


@pytest.mark.parametrize("path", sorted(MAPPINGS_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_mappings_load_and_resolve(path):
    m = Mapping.load(path)
    assert m.bindings
    ps = patch_space([f"b{i}" for i in range(8)])
    r = Router(ps, Recorder(), m)
    # Every target names a bend slot, a bend parameter every bend has, or prompt/blend.
    assert r.unresolved == [], r.unresolved


def test_bare_name_loads_from_mappings_dir():
    assert Mapping.load("generic").path.endswith("mappings/generic.toml")


@pytest.mark.parametrize("text,line,words", [
    ('name = "x"\n\n[[binding]]\ntype = "cc"\nnumber = 7\nparam = "a"\ncurve = "expo"\n', 7,
     "curve"),
    ('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "a"\n\n[[binding]]\ntype = "cc"\n'
     'numbr = 3\n', 8, "did you mean 'number'"),
    ('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "a"\nlo = "low"\n', 5, "must be a number"),
    ('[[binding]]\ntype = "cc"\nnumber = 300\nparam = "a"\n', 3, "0..127"),
    ('[[binding]]\ntype = "cc"\nnumber = 1\nparam = "a"\ncurve = "exponential"\nlo = 0\nhi = 1\n',
     5, "use 'power'"),
    ('[[binding]]\ntype = "cc\nnumber = 1\n', 2, "not valid TOML"),
    ('[[binding]]\ntype = "cc"\nnumber = 1\n', 1, "binds nothing"),
    ('[[binding]]\ntype = "knob"\n', 2, "not one of"),
    ('[[lfo]]\nname = "a"\ntarget = "x"\nshape = "sine"\nrate = 400\n', 1, "LFO rate"),
])
def test_parse_errors_name_line_and_fix(text, line, words):
    with pytest.raises(MappingError) as e:
        Mapping.loads(text, path="m.toml")
    assert e.value.line == line, str(e.value)
    assert words in str(e.value) and str(e.value).startswith(f"m.toml:{line}:")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_text_only_raises_mapping_error(text):
    try:
        Mapping.loads(text)
    except MappingError:
        pass


keys = st.sampled_from(sorted({"type", "number", "channel", "port", "mode", "encoding", "step",
                               "bits", "address", "range", "action", "target", "param", "lo",
                               "hi", "curve", "gamma", "invert", "smooth", "takeover", "kind",
                               "tau", "name", "shape", "rate", "depth", "note", "sync",
                               "binding", "lfo", "envelope", "program_change", "attack"}))
values = st.recursive(
    st.none().map(lambda _: "any") | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["cc", "cc14", "nrpn", "osc", "note", "relative", "power", "/a",
                       "bend/#1/mix", "sine", "euro", "toggle"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=6))
def test_fuzz_structure_only_raises_mapping_error(doc):
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return  # not expressible as TOML
    try:
        m = Mapping.loads(text)
    except MappingError:
        return
    Router(patch_space(), Recorder(), m)  # whatever parses must also play


# -- routing ----------------------------------------------------------------------------------

def test_slot_names_follow_the_patch():
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "bend/#2/mix"\n')
    assert resolve_name("bend/#2/mix", ps) == "bend/warp/mix"
    assert resolve_name("bend/#3/mix", ps) is None
    r.handle(cc(7, 127))
    r.tick(1.0)
    assert ps.get("bend/warp/mix") == 1.0
    # A patch switch: the bends change, the same knob now moves the new second bend.
    ps.remove_prefix("bend/")
    for b in ("glow", "smear"):
        ps.declare(ParamSpec(f"bend/{b}/mix", 0.0, 1.0, 0.0))
    r.handle(cc(7, 64, t=2.0))
    r.tick(2.0)
    assert ps.get("bend/smear/mix") == pytest.approx(64 / 127)


def test_unknown_params_reported_not_fatal():
    show = Recorder()
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 1\nparam = "bend/nope/mix"\n'
                   '[[binding]]\ntype = "cc"\nnumber = 2\nparam = "prompt/blend"\n', show=show)
    assert r.unresolved == ["bend/nope/mix"]
    assert any("bend/nope/mix" in w for w in show.warnings)
    assert r.handle(cc(1, 10)) is False
    assert r.handle(cc(2, 127)) is True
    r.tick(1.0)
    assert ps.get("prompt/blend") == 1.0


def test_channel_and_port_filters():
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 7\nchannel = 2\nport = "nano"\n'
                   'param = "prompt/blend"\n')
    assert not r.handle(cc(7, 127, channel=0))
    assert not r.handle(cc(7, 127, channel=1, port="MIDImix"))
    assert r.handle(cc(7, 127, channel=1, port="nanoKONTROL2 SLIDER/KNOB"))


@pytest.mark.parametrize("order", ["msb_first", "lsb_first", "lsb_only"])
def test_14bit_cc_pairs(order):
    ps, r = router('[[binding]]\ntype = "cc14"\nnumber = 3\nparam = "prompt/blend"\n')
    value = 0x2A5C  # MSB 0x54, LSB 0x5C
    msb, lsb = value >> 7, value & 127
    if order == "msb_first":
        r.handle(cc(3, msb))
        r.handle(cc(35, lsb))
    elif order == "lsb_first":
        r.handle(cc(35, 5))  # an earlier pair
        r.handle(cc(3, 1))
        r.handle(cc(35, lsb))
        r.handle(cc(3, msb))
    else:  # MSB once, then only LSBs while it stays the same
        r.handle(cc(3, msb))
        r.handle(cc(35, lsb - 1))
        r.handle(cc(35, lsb))
    r.tick(1.0)
    assert ps.get("prompt/blend") == pytest.approx(value / 16383, abs=1e-15)


def test_14bit_state_is_per_channel():
    ps, r = router('[[binding]]\ntype = "cc14"\nnumber = 0\nchannel = 1\nparam = "bend/melt/mix"\n'
                   '[[binding]]\ntype = "cc14"\nnumber = 0\nchannel = 2\nparam = "bend/warp/mix"\n')
    r.handle(cc(0, 127, channel=0))
    r.handle(cc(0, 0, channel=1))
    r.handle(cc(32, 127, channel=1))
    r.handle(cc(32, 127, channel=0))
    r.tick(1.0)
    assert ps.get("bend/melt/mix") == 1.0
    assert ps.get("bend/warp/mix") == pytest.approx(127 / 16383)


def test_nrpn_14_and_7_bit():
    ps, r = router('[[binding]]\ntype = "nrpn"\nnumber = 1000\nparam = "bend/melt/mix"\n'
                   '[[binding]]\ntype = "nrpn"\nnumber = 5\nbits = 7\nparam = "bend/warp/mix"\n'
                   '[[binding]]\ntype = "cc"\nnumber = 6\nparam = "prompt/blend"\n')
    for n, v in ((99, 1000 >> 7), (98, 1000 & 127), (6, 90), (38, 17)):
        assert r.handle(cc(n, v))
    for n, v in ((99, 0), (98, 5), (6, 127)):
        r.handle(cc(n, v))
    r.tick(1.0)
    assert ps.get("bend/melt/mix") == pytest.approx((90 * 128 + 17) / 16383)
    assert ps.get("bend/warp/mix") == 1.0
    assert ps.get("prompt/blend") == 0.0  # data entry went to the NRPN, not to CC 6
    for n, v in ((101, 0), (100, 0), (6, 127)):  # an RPN deselects: CC 6 is plain again
        r.handle(cc(n, v))
    r.tick(2.0)
    assert ps.get("prompt/blend") == 1.0


@pytest.mark.parametrize("encoding,up,down", [("twos", 3, 125), ("offset", 67, 61),
                                              ("signed-bit", 3, 67)])
def test_relative_encoders(encoding, up, down):
    ps, r = router(f'[[binding]]\ntype = "relative"\nnumber = 16\nencoding = "{encoding}"\n'
                   'step = 0.01\nparam = "bend/melt/gain"\nlo = 0.0\nhi = 4.0\n')
    ps.set("bend/melt/gain", 1.0)
    r.handle(cc(16, up))  # +3 steps of 1% of 0..4
    r.tick(1.0)
    assert ps.get("bend/melt/gain") == pytest.approx(1.12)
    r.handle(cc(16, down))
    r.handle(cc(16, down))  # -3 steps twice
    r.tick(2.0)
    assert ps.get("bend/melt/gain") == pytest.approx(0.88)


def test_curves_ranges_and_macro():
    ps, r = router("""
[[binding]]
type = "cc"
number = 1
[[binding.target]]
param = "bend/melt/gain"
curve = "exponential"
[[binding.target]]
param = "bend/warp/mix"
lo = 0.2
hi = 0.6
invert = true
[[binding.target]]
param = "prompt/blend"
curve = "power"
gamma = 3
""")
    r.handle(cc(1, 127 // 2 + 1))  # 64/127
    r.tick(1.0)
    x = 64 / 127
    assert ps.get("bend/melt/gain") == pytest.approx(0.25 * 16 ** x)
    assert ps.get("bend/warp/mix") == pytest.approx(0.2 + 0.4 * (1 - x))
    assert ps.get("prompt/blend") == pytest.approx(x**3)


def test_pickup_after_a_patch_moved_the_parameter():
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "prompt/blend"\n'
                   'takeover = "pickup"\n')
    ps.set("prompt/blend", 0.5)  # the patch put it here; the fader is at the bottom
    r.handle(cc(7, 10))
    r.tick(1.0)
    assert ps.get("prompt/blend") == 0.5
    r.handle(cc(7, 70))  # crossed 0.5
    r.tick(1.1)
    assert ps.get("prompt/blend") == pytest.approx(70 / 127)
    ps.set("prompt/blend", 0.1, source="patch")  # someone else moves it again
    r.handle(cc(7, 80))
    r.tick(1.2)
    assert ps.get("prompt/blend") == 0.1  # the fader must come back down to 0.1 first
    r.handle(cc(7, 12))
    r.tick(1.3)
    assert ps.get("prompt/blend") == pytest.approx(12 / 127)


def test_smoothing_and_arrival_stamps():
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "prompt/blend"\nsmooth = 0.1\n')
    r.tick(10.0)
    r.handle(cc(7, 127, t=10.01))
    r.handle(cc(7, 127, t=10.02))
    r.tick(10.05)
    assert ps.get("prompt/blend") == pytest.approx(1 - __import__("math").exp(-0.5))
    assert ps.take_arrivals() == 10.01  # the earliest event behind the change
    r.tick(10.15)
    assert ps.get("prompt/blend") == pytest.approx(1 - __import__("math").exp(-1.5))
    assert ps.take_arrivals() == 10.15  # the smoothing tail: stamped at the tick


def test_set_target_direct_with_per_param_smoothing():
    ps, r = router('[smooth]\n"prompt/blend" = { kind = "slew", rate = 2.0 }\n')
    r.tick(0.0)
    assert r.set_target("prompt/blend", 5.0, arrived=0.0, source="osc") == 1.0  # clamped
    r.tick(0.25)
    assert ps.get("prompt/blend") == pytest.approx(0.5)
    r.tick(0.5)
    assert ps.get("prompt/blend") == pytest.approx(1.0)
    r.set_target("bend/melt/mix", 0.3)  # no smoothing for this one
    r.tick(0.6)
    assert ps.get("bend/melt/mix") == 0.3
    with pytest.raises(ParamError):
        r.set_target("bend/melt/mix", float("nan"))
    with pytest.raises(ParamError):
        r.set_target("no/such", 1.0)


def test_osc_binding_with_input_range():
    ps, r = router('[[binding]]\naddress = "/max/knob1"\nrange = [0, 127]\n'
                   'param = "bend/#1/mix"\n')
    assert r.handle(ControlEvent("osc", "osc", 63.5, 1.0, "127.0.0.1:5555", address="/max/knob1"))
    assert not r.handle(ControlEvent("osc", "osc", 1.0, 1.0, address="/other"))
    assert not r.handle(ControlEvent("osc", "osc", float("nan"), 1.0, address="/max/knob1"))
    r.tick(1.0)
    assert ps.get("bend/melt/mix") == pytest.approx(0.5)


def test_note_modes():
    ps, r = router("""
[[binding]]
type = "note"
number = 36
mode = "gate"
param = "bend/melt/mix"
[[binding]]
type = "note"
number = 37
mode = "toggle"
param = "bend/warp/mix"
[[binding]]
type = "note"
number = 38
mode = "trigger"
param = "prompt/blend"
""")

    def note(n, vel, on=True):
        r.handle(ControlEvent("midi", "note_on" if on else "note_off", vel, 1.0, "p", 0, n))
        r.tick(1.0)

    note(36, 100)
    assert ps.get("bend/melt/mix") == pytest.approx(100 / 127)
    note(36, 0, on=False)
    assert ps.get("bend/melt/mix") == 0.0
    note(37, 127)
    note(37, 0, on=False)
    assert ps.get("bend/warp/mix") == 1.0
    note(37, 127)
    assert ps.get("bend/warp/mix") == 0.0
    note(38, 64)
    note(38, 0, on=False)
    assert ps.get("prompt/blend") == pytest.approx(64 / 127)  # trigger: stays


def test_button_actions_and_program_change():
    show = Recorder()
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 59\nmode = "trigger"\n'
                   'action = "patch_next"\n'
                   '[[binding]]\ntype = "note"\nnumber = 1\naction = "panic"\n', show=show)
    r.handle(cc(59, 127))
    r.handle(cc(59, 0))
    r.handle(ControlEvent("midi", "note_on", 100, 1.0, "p", 0, 1))
    r.handle(ControlEvent("midi", "program", 12, 1.0, "p", 0, 12))
    assert show.calls == [("switch_patch", "+1"), ("panic",), ("switch_patch", 12)]
    r.load(Mapping.loads("program_change = false\n"))
    assert not r.handle(ControlEvent("midi", "program", 3, 1.0, "p", 0, 3))


def test_bad_events_never_raise():
    ps, r = router('[[binding]]\ntype = "cc"\nnumber = 7\nparam = "prompt/blend"\n')
    for ev in (ControlEvent("midi", "cc", float("inf"), 1.0, number=7),
               ControlEvent("midi", "weird", 1.0, 1.0),
               ControlEvent("osc", "osc", 1.0, 1.0)):
        assert r.handle(ev) is False


# -- learn ------------------------------------------------------------------------------------

def test_learn_detects_a_14bit_pair_and_saves(tmp_path):
    show = Recorder()
    ps, r = router("", show=show)
    learned = []
    r.on_learn = learned.append
    r.learn("bend/melt/gain")
    assert r.learning == "bend/melt/gain"
    for i, (m, l_) in enumerate(((10, 5), (11, 90), (12, 3))):
        r.handle(cc(4, m, t=1.0 + i * 0.01, channel=2))
        r.handle(cc(36, l_, t=1.005 + i * 0.01, channel=2))
    assert r.learning is None
    (b,) = learned
    assert (b.source.type, b.source.numbers, b.source.channel) == ("cc14", (4,), 2)
    assert b.targets[0].param == "bend/melt/gain"
    # The new binding plays at once, at 14-bit resolution.
    r.handle(cc(4, 127, t=2.0, channel=2))
    r.handle(cc(36, 127, t=2.0, channel=2))
    r.tick(2.0)
    assert ps.get("bend/melt/gain") == 4.0
    back = Mapping.load(r.mapping.save(tmp_path / "learned.toml"))
    assert back.bindings == r.mapping.bindings


@pytest.mark.parametrize("values,encoding", [([1, 1, 2, 1], "twos"), ([127, 127, 126], "twos"),
                                             ([65, 65, 66, 65], "offset"),
                                             ([63, 63, 62], "offset")])
def test_learn_detects_relative_encoders(values, encoding):
    ps, r = router("")
    r.learn("prompt/blend")
    for i, v in enumerate(values):
        r.handle(cc(21, v, t=1.0 + i * 0.02))
    r.tick(1.0 + 0.5)  # the learn window closes
    (b,) = r.mapping.bindings
    assert (b.source.type, b.source.numbers, b.source.encoding) == ("relative", (21,), encoding)


def test_learn_absolute_cc_and_note():
    ps, r = router("")
    r.learn("bend/melt/mix")
    for i, v in enumerate((3, 4, 6, 9)):  # a fader moving up from the bottom
        r.handle(cc(7, v, t=1.0 + i * 0.01))
    r.learn("bend/warp/mix")
    r.handle(ControlEvent("midi", "note_on", 99, 2.0, "pads", 9, 40))
    a, b = r.mapping.bindings
    assert (a.source.type, a.source.numbers) == ("cc", (7,))
    assert (b.source.type, b.source.numbers, b.source.channel, b.source.mode) == (
        "note", (40,), 9, "toggle")
    with pytest.raises(ParamError):
        r.learn("no/such/param")


def test_learn_ignores_other_ports_while_deciding():
    ps, r = router("")
    r.learn("prompt/blend")
    r.handle(cc(7, 1, t=1.0, port="A"))
    r.handle(cc(9, 50, t=1.01, port="B"))  # another device chattering
    r.tick(1.5)
    (b,) = r.mapping.bindings
    assert b.source.port == "A" and b.source.numbers == (7,)


def test_mappings_dir_is_the_repository_folder():
    assert MAPPINGS_DIR == Path(__file__).resolve().parents[1] / "mappings"
