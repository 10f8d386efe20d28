"""MIDI input through a real JACK server (dummy driver) with a sender in another process."""

from __future__ import annotations

import os
import threading
import time

import pytest

from instrument.control.mapping import Mapping, Router
from instrument.control.midi import MidiInput
from instrument.params import ParamSpace, ParamSpec
from jack_fixture import MidiSender

# the jack_server fixture, registered as a plugin rather than imported (an import the tests only name as an
# argument reads as unused)
pytest_plugins = ["jack_fixture"]

pytestmark = pytest.mark.jack

MAP = """
[[binding]]
type = "cc"
number = 7
param = "a"

[[binding]]
type = "cc14"
number = 1
param = "b"

[[binding]]
type = "nrpn"
number = 300
param = "c"

[[binding]]
type = "note"
number = 36
mode = "gate"
param = "d"
"""


class Recorder:
    """A Show that keeps what it was asked (the control side of the real protocol)."""

    def __init__(self, params):
        self.params = params
        self.patches: list = []
        self.warnings: list[str] = []

    def switch_patch(self, which):
        self.patches.append(which)

    def warn(self, message):
        self.warnings.append(message)


def wait_for(cond, timeout=10.0):  # generous: a loaded machine delays JACK
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# A CC no map here binds: the tests send it until one arrives, then start counting.
PROBE = (0xBF, 119, 0)  # channel 16, CC 119


def is_probe(ev) -> bool:
    return ev.kind == "cc" and ev.channel == PROBE[0] & 0x0F and ev.number == PROBE[1]


def until_connected(sender, probes: list, timeout=10.0) -> bool:
    """Sends PROBE until one comes through; True when the connection carries messages.

    JACK2 puts a new connection into its next graph, which the server switches to at a later
    cycle start (later still on a loaded machine), so a message sent right after a port opens
    can fall in a cycle without the connection. A fresh-clone CI run lost the first CC after a
    hot-plug that way; nothing in the instrument can see or wait for that switch."""
    probes.clear()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.send(*PROBE)
        if wait_for(lambda: probes, timeout=0.05):
            return True
    return False


@pytest.fixture
def rig(jack_server):  # noqa: F811
    params = ParamSpace()
    for n in "abcd":
        params.declare(ParamSpec(n, 0.0, 1.0, 0.0))
    show = Recorder(params)
    router = Router(params, show, Mapping.loads(MAP))
    events, warnings, probes = [], [], []
    lock = threading.Lock()

    def on_event(ev):
        if is_probe(ev):
            probes.append(ev)
            return
        with lock:
            events.append(ev)
        router.handle(ev)

    midi = MidiInput(on_event, ports=["ctl-"], api="jack", poll=0.1,
                     client_name=f"instr{os.getpid()}", warn=warnings.append)
    sender = MidiSender(jack_server)
    connected = lambda: until_connected(sender, probes)  # noqa: E731
    yield params, show, router, midi, sender, events, warnings, connected
    sender.stop()
    midi.close()


def test_cc_14bit_nrpn_notes_program_clock(rig):
    params, show, router, midi, sender, events, warnings, connected = rig
    sender.open("ctl-a", "out")
    midi.start()
    assert wait_for(lambda: any("ctl-a" in p for p in midi.open_ports)), midi.open_ports
    assert connected()
    sent_at = time.monotonic()
    sender.send(0xB0, 7, 100)  # CC 7 = 100
    sender.send(0xB0, 1, 64)  # 14-bit CC 1: MSB 64, LSB 32 -> 8224
    sender.send(0xB0, 33, 32)
    for cc, v in ((99, 2), (98, 44), (6, 100), (38, 5)):  # NRPN 2*128+44 = 300 = 100*128+5
        sender.send(0xB0, cc, v)
    sender.send(0x90, 36, 127)  # note on, velocity 127
    sender.send(0xC0, 5)  # program change 5
    assert wait_for(lambda: len(events) >= 9), events
    router.tick(time.monotonic())
    assert params.get("a") == pytest.approx(100 / 127, abs=1e-12)
    assert params.get("b") == pytest.approx(8224 / 16383, abs=1e-12)
    assert params.get("c") == pytest.approx((100 * 128 + 5) / 16383, abs=1e-12)
    assert params.get("d") == 1.0
    assert show.patches == [5]
    # Arrival stamps come from the callback: after the send, never later than now; the
    # parameter space reports the earliest one behind this tick's changes.
    stamps = [e.arrived for e in events]
    assert all(sent_at <= t <= time.monotonic() for t in stamps)
    assert params.take_arrivals() == min(stamps)
    assert [e.channel for e in events if e.kind == "cc"] == [0] * 7

    sender.send(0x80, 36, 0)  # note off
    sender.send(0x90, 36, 0)  # note on with velocity 0 = note off too
    assert wait_for(lambda: len(events) >= 11)
    assert [e.kind for e in events[-2:]] == ["note_off", "note_off"]
    router.tick(time.monotonic())
    assert params.get("d") == 0.0

    # MIDI clock at 24 pulses per beat, 150 bpm: one pulse every 1/60 s.
    sender.send(0xFA)
    start = time.monotonic()
    for i in range(49):
        sender.send(0xF8)
        # to deadlines, not fixed sleeps: on a loaded machine late wake-ups would add up to a slower tempo
        time.sleep(max(0.0, start + (i + 1) / 60 - time.monotonic()))
    assert wait_for(lambda: sum(e.kind == "clock" for e in events) >= 49)
    assert [e.kind for e in events if e.kind == "start"] == ["start"]
    assert router.tempo.bpm == pytest.approx(150, rel=0.05)
    router.tick(time.monotonic())
    assert router.tempo.beat == pytest.approx(2.0, abs=0.05)
    assert not [w for w in warnings if "failed" in w]


def test_ports_appear_and_vanish_while_running(rig, jack_server):  # noqa: F811
    params, show, router, midi, sender, events, warnings, connected = rig
    midi.start()
    assert midi.open_ports == []
    sender.open("ctl-late", "out")  # plugged in after start
    assert wait_for(lambda: any("ctl-late" in p for p in midi.open_ports))
    assert connected()
    sender.send(0xB0, 7, 10)
    assert wait_for(lambda: len(events) == 1)
    sender.close_port()  # unplugged
    assert wait_for(lambda: midi.open_ports == [])
    assert any("gone" in w and "ctl-late" in w for w in warnings), warnings
    other = MidiSender(jack_server)
    try:
        other.open("unrelated", "out")  # does not match the "ctl-" filter
        sender.open("ctl-late", "out")  # plugged in again
        assert wait_for(lambda: any("ctl-late" in p for p in midi.open_ports))
        time.sleep(0.3)
        assert not any("unrelated" in p for p in midi.open_ports)
        assert connected()
        sender.send(0xB0, 7, 127)
        assert wait_for(lambda: len(events) == 2)
        router.tick(time.monotonic())
        assert params.get("a") == 1.0
    finally:
        other.stop()


def test_sysex_and_garbage_are_reported_and_ignored(rig):
    params, show, router, midi, sender, events, warnings, connected = rig
    sender.open("ctl-noisy", "out")
    midi.start()
    assert wait_for(lambda: midi.open_ports)
    assert connected()
    sender.send(0xF0, 0x7E, 0x7F, 0x06, 0x01, 0xF7)
    sender.send(0x45, 0x33)  # data bytes without a status byte
    sender.send(0xF0, 0x01, 0xF7)  # a second SysEx within the limit: not shown again
    sender.send(0xB0, 7, 127)
    assert wait_for(lambda: len(events) == 1)
    assert sum("SysEx" in w for w in warnings) == 1
    assert sum("malformed" in w and "45 33" in w for w in warnings) == 1
    router.tick(time.monotonic())
    assert params.get("a") == 1.0


def test_virtual_input_port(jack_server):  # noqa: F811
    got, probes = [], []
    name = f"virt{os.getpid()}"

    def on_event(ev):
        (probes if is_probe(ev) else got).append(ev)

    with MidiInput(on_event, ports=[], api="jack", virtual=name, poll=0.1,
                   client_name=f"instr{os.getpid()}v", warn=lambda m: None) as midi:
        assert midi.available
        sender = MidiSender(jack_server)
        try:
            sender.connect("feeder", name)
            assert until_connected(sender, probes)
            sender.send(0xB3, 20, 99)
            assert wait_for(lambda: got)
            assert (got[0].kind, got[0].channel, got[0].number, got[0].value) == ("cc", 3, 20, 99)
            assert got[0].port == name
        finally:
            sender.stop()


def test_no_jack_server_gives_one_message(monkeypatch):
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "no-such-server-here")
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    said = []
    midi = MidiInput(lambda ev: None, api="jack", poll=0.05, warn=said.append)
    midi.start()
    time.sleep(0.3)  # several rescans
    midi.close()
    assert not midi.available
    assert len(said) == 1 and "MIDI off" in said[0] and "JACK" in said[0]


@pytest.mark.skipif(os.path.exists("/dev/snd/seq"), reason="this machine has an ALSA sequencer")
def test_no_alsa_sequencer_gives_one_message():
    said = []
    midi = MidiInput(lambda ev: None, api="alsa", poll=0.05, warn=said.append)
    midi.start()  # must not raise
    time.sleep(0.2)
    midi.close()
    assert not midi.available
    assert len(said) == 1 and "/dev/snd/seq" in said[0]
