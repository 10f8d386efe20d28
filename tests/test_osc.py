"""OSC in and out over real UDP sockets: python-osc and liblo's oscsend/oscdump as clients.

The helpers at the top (a small parameter space, a show that records what control asks of it,
a UDP peer) are shared with test_oscquery.py."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.udp_client import SimpleUDPClient

from instrument.control.events import ControlEvent
from instrument.control.osc import WARN_INTERVAL, OscServer, build_message
from instrument.params import ParamSpace, ParamSpec
from conftest import need_tool

SPECS = [
    ParamSpec("bend/melt/mix", 0.0, 1.0, 0.0, doc="how much of the melt bend"),
    ParamSpec("bend/melt/gain", 0.0, 4.0, 1.0, unit="x", doc="melt gain"),
    ParamSpec("bend/swirl/mix", 0.0, 1.0, 0.0),
    ParamSpec("bend/swirl/layer", 0, 29, 10, integer=True, doc="first layer"),
    ParamSpec("prompt/blend", 0.0, 1.0, 0.0),
]


def make_params() -> ParamSpace:
    params = ParamSpace()
    for spec in SPECS:
        params.declare(spec)
    return params


class RecordingShow:
    """The caller's side of the Show protocol: records every request, thread-safe."""

    def __init__(self, params: ParamSpace):
        self.params = params
        self.calls: list[tuple] = []
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def _record(self, *call) -> None:
        with self._lock:
            self.calls.append(call)

    def set_prompt(self, text: str, slot: int = 0) -> None:
        self._record("set_prompt", text, slot)

    def switch_patch(self, which) -> None:
        self._record("switch_patch", which)

    def save_patch(self, path=None) -> str:
        self._record("save_patch", path)
        return path or "/tmp/patches/saved-1.toml"

    def freeze(self, on=None) -> None:
        self._record("freeze", on)

    def panic(self) -> None:
        self._record("panic")

    def learn(self, param) -> None:
        self._record("learn", param)

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)


def wait_until(predicate, timeout: float = 2.0, interval: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Peer:
    """A UDP socket on 127.0.0.1 that sends OSC to a server and reads what comes back."""

    def __init__(self, target: tuple[str, int] | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.target = target

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def send(self, address: str, *args) -> None:
        self.sock.sendto(build_message(address, *args), self.target)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def receive(self, timeout: float = 1.0) -> OscMessage | None:
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        return OscMessage(data)

    def receive_all(self, quiet: float = 0.3) -> list[OscMessage]:
        """Everything that arrives until nothing has for `quiet` seconds."""
        out = []
        while (m := self.receive(quiet)) is not None:
            out.append(m)
        return out

    def close(self) -> None:
        self.sock.close()


# -- fixtures ---------------------------------------------------------------------------------


class Recorder:
    """set_value / on_event / on_tempo callables that remember their calls in order."""

    def __init__(self, params: ParamSpace | None = None, handled: bool = True):
        self.params = params
        self.handled = handled
        self.values: list[tuple] = []
        self.events: list[ControlEvent] = []
        self.tempi: list[float] = []

    def set_value(self, name, value, arrived, source):
        self.values.append((name, value, arrived, source))
        if self.params is not None:
            self.params.set(name, value, arrived=arrived, source=source)

    def on_event(self, event: ControlEvent) -> bool:
        self.events.append(event)
        return self.handled

    def on_tempo(self, bpm: float) -> None:
        self.tempi.append(bpm)


@pytest.fixture
def params():
    return make_params()


@pytest.fixture
def show(params):
    return RecordingShow(params)


@pytest.fixture
def server(params, show):
    with OscServer(params, show, port=0) as s:
        yield s


@pytest.fixture
def peer(server):
    p = Peer(server.address)
    yield p
    p.close()


def landed(params, name, value, timeout=2.0) -> bool:
    return wait_until(lambda: params.get(name) == pytest.approx(value, abs=1e-6), timeout)


# -- parameters in ----------------------------------------------------------------------------
def test_python_osc_client_sets_parameters(server, params):
    client = SimpleUDPClient(*server.address)
    client.send_message("/bend/melt/mix", 0.5)
    assert landed(params, "bend/melt/mix", 0.5)
    client.send_message("/bend/swirl/layer", 7)  # int
    assert landed(params, "bend/swirl/layer", 7)
    client.send_message("/bend/swirl/layer", 12.6)  # float for an integer parameter: rounded
    assert landed(params, "bend/swirl/layer", 13)
    client.send_message("/bend/melt/gain", True)  # T: top of the range
    assert landed(params, "bend/melt/gain", 4.0)
    client.send_message("/bend/melt/gain", False)  # F: bottom
    assert landed(params, "bend/melt/gain", 0.0)
    client.send_message("/prompt/blend", 0.75)  # a parameter, though it sits under /prompt
    assert landed(params, "prompt/blend", 0.75)


def test_oscsend_float_and_int(server, params):
    oscsend = need_tool("oscsend")
    port = str(server.address[1])
    subprocess.run([oscsend, "localhost", port, "/bend/melt/mix", "f", "0.25"], check=True, timeout=5)
    assert landed(params, "bend/melt/mix", 0.25)
    subprocess.run([oscsend, "127.0.0.1", port, "/bend/swirl/layer", "i", "21"], check=True, timeout=5)
    assert landed(params, "bend/swirl/layer", 21)
    subprocess.run([oscsend, "localhost", port, "/bend/swirl/mix", "i", "1"], check=True, timeout=5)
    assert landed(params, "bend/swirl/mix", 1.0)
    subprocess.run([oscsend, "localhost", port, "/bend/melt/gain", "d", "2.5"], check=True, timeout=5)
    assert landed(params, "bend/melt/gain", 2.5)


def test_set_value_gets_arrival_time_and_source(params, show):
    rec = Recorder()
    with OscServer(params, show, set_value=rec.set_value, port=0) as server:
        peer = Peer(server.address)
        try:
            before = time.monotonic()
            peer.send("/bend/melt/mix", 0.3)
            assert wait_until(lambda: rec.values)
            after = time.monotonic()
        finally:
            peer.close()
    name, value, arrived, source = rec.values[0]
    assert (name, source) == ("bend/melt/mix", "osc")
    assert value == pytest.approx(0.3)
    assert before <= arrived <= after
    assert params.get("bend/melt/mix") == 0.0  # the callable, not the ParamSpace, took the value


def test_out_of_range_is_clamped_and_reported(server, params, show, peer):
    peer.send("/bend/melt/gain", 9.0)
    assert landed(params, "bend/melt/gain", 4.0)
    assert wait_until(lambda: any("outside [0, 4], clamped" in w for w in show.warnings))
    peer.send("/bend/melt/mix", -3)
    assert landed(params, "bend/melt/mix", 0.0)


def test_bundle_with_future_time_tag_applies_at_once(server, params, peer):
    # TouchDesigner time-tags its bundles; a server honouring the tag would hold this for 10 s
    bundle = OscBundleBuilder(time.time() + 10.0)
    for address, value in (("/bend/melt/mix", 0.4), ("/bend/swirl/mix", 0.6)):
        msg = OscMessageBuilder(address)
        msg.add_arg(value, "f")
        bundle.add_content(msg.build())
    sent = time.monotonic()
    peer.send_raw(bundle.build().dgram)
    assert landed(params, "bend/swirl/mix", 0.6, timeout=1.0)
    assert time.monotonic() - sent < 0.05
    assert params.get("bend/melt/mix") == pytest.approx(0.4)


def test_nested_bundles_keep_message_order(params, show):
    rec = Recorder(params)
    with OscServer(params, show, set_value=rec.set_value, port=0) as server:
        peer = Peer(server.address)
        inner = OscBundleBuilder(0)  # 0 is not IMMEDIATELY (1): a tag in the past
        for v in (0.1, 0.2):
            m = OscMessageBuilder("/bend/melt/mix")
            m.add_arg(v, "f")
            inner.add_content(m.build())
        outer = OscBundleBuilder(1)
        outer.add_content(inner.build())
        m = OscMessageBuilder("/bend/melt/mix")
        m.add_arg(0.3, "f")
        outer.add_content(m.build())
        peer.send_raw(outer.build().dgram)
        assert wait_until(lambda: len(rec.values) == 3)
        peer.close()
    assert [round(v[1], 3) for v in rec.values] == [0.1, 0.2, 0.3]
    assert len({v[2] for v in rec.values}) == 1  # one datagram, one arrival time


@pytest.mark.parametrize(
    "address, changed",
    [
        ("/bend/*/mix", {"bend/melt/mix", "bend/swirl/mix"}),
        ("/bend/?elt/*", {"bend/melt/mix", "bend/melt/gain"}),
        ("/bend/{melt,swirl}/mix", {"bend/melt/mix", "bend/swirl/mix"}),
        ("/bend/[m-n]elt/mix", {"bend/melt/mix"}),
        ("/bend/[!m]*/mix", {"bend/swirl/mix"}),
        ("/*/blend", {"prompt/blend"}),
    ],
)
def test_wildcards_expand_over_the_parameter_space(params, show, address, changed):
    rec = Recorder(params)
    with OscServer(params, show, set_value=rec.set_value, port=0) as server:
        peer = Peer(server.address)
        peer.send(address, 1.0)
        peer.send("/bend/melt/gain", 3.0)  # a sentinel: once it lands, the pattern was handled
        assert wait_until(lambda: params.get("bend/melt/gain") == 3.0)
        peer.close()
    assert {v[0] for v in rec.values[:-1]} == changed
    assert len(rec.values) == len(changed) + 1


def test_wildcard_matching_nothing_is_reported(server, params, show, peer):
    peer.send("/bend/*/nothing", 1.0)
    peer.send("/bend/[oops/mix", 1.0)
    peer.send("/bend/melt/mix", 0.5)
    assert landed(params, "bend/melt/mix", 0.5)
    assert wait_until(lambda: any("no parameter matches /bend/*/nothing" in w for w in show.warnings))
    assert wait_until(lambda: any("bad address pattern /bend/[oops/mix" in w for w in show.warnings))


def test_address_without_arguments_replies_its_value(server, params, peer):
    params.set("bend/melt/gain", 2.25)
    params.set("bend/swirl/layer", 17)
    peer.send("/bend/melt/gain")
    reply = peer.receive()
    assert reply is not None
    assert reply.address == "/bend/melt/gain"
    assert reply.params == [pytest.approx(2.25)]
    peer.send("/bend/swirl/layer")
    reply = peer.receive()
    assert (reply.address, reply.params) == ("/bend/swirl/layer", [17.0])
    assert params.get("bend/melt/gain") == 2.25  # a query changes nothing


def test_describe_lists_every_parameter(server, params, peer):
    params.set("bend/melt/mix", 0.125)
    peer.send("/describe")
    replies = peer.receive_all(quiet=0.5)
    assert [m.address for m in replies] == ["/describe/param"] * len(SPECS) + ["/describe/end"]
    assert replies[-1].params == [len(SPECS)]
    described = {m.params[0]: m.params[1:] for m in replies[:-1]}
    assert set(described) == {"/" + s.name for s in SPECS}
    for spec in SPECS:
        lo, hi, default, unit, value = described["/" + spec.name]
        assert (lo, hi, default, unit) == (
            pytest.approx(spec.lo), pytest.approx(spec.hi), pytest.approx(spec.default), spec.unit)
        assert value == pytest.approx(params.get(spec.name))
    assert described["/bend/melt/mix"][4] == pytest.approx(0.125)


# -- control addresses ------------------------------------------------------------------------
def test_control_addresses_reach_the_show(params, show):
    rec = Recorder()
    with OscServer(params, show, on_tempo=rec.on_tempo, port=0) as server:
        peer = Peer(server.address)
        peer.send("/prompt", "a red fox in snow")
        peer.send("/prompt/b", "a", "blue", "whale")  # Max sends one argument per word
        peer.send("/patch", "storm")
        peer.send("/patch", 3)
        peer.send("/patch/next")
        peer.send("/patch/prev")
        peer.send("/patch/save")
        assert peer.receive().params == ["/tmp/patches/saved-1.toml"]
        peer.send("/patch/save", "/tmp/mine.toml")
        saved = peer.receive()
        assert (saved.address, saved.params) == ("/patch/saved", ["/tmp/mine.toml"])
        peer.send("/freeze")
        peer.send("/freeze", 1)
        peer.send("/freeze", 0.0)
        peer.send("/panic")
        peer.send("/learn", "bend/melt/mix")
        peer.send("/learn", "/bend/swirl/mix")
        peer.send("/learn")
        peer.send("/tempo", 128.0)
        assert wait_until(lambda: rec.tempi == [128.0])
        peer.close()
    assert show.calls == [
        ("set_prompt", "a red fox in snow", 0),
        ("set_prompt", "a blue whale", 1),
        ("switch_patch", "storm"),
        ("switch_patch", 3),
        ("switch_patch", "+1"),
        ("switch_patch", "-1"),
        ("save_patch", None),
        ("save_patch", "/tmp/mine.toml"),
        ("freeze", None),
        ("freeze", True),
        ("freeze", False),
        ("panic",),
        ("learn", "bend/melt/mix"),
        ("learn", "bend/swirl/mix"),
        ("learn", None),
    ]
    assert show.warnings == []


def test_bad_control_requests_are_reported(server, params, show, peer):
    peer.send("/learn", "bend/nope")
    peer.send("/prompt")
    peer.send("/patch", float("nan"))
    peer.send("/tempo", 120.0)  # this show follows no tempo
    peer.send("/bend/melt/mix", 0.9)
    assert landed(params, "bend/melt/mix", 0.9)
    assert wait_until(lambda: len(show.warnings) == 4)
    text = "\n".join(show.warnings)
    for part in ("unknown parameter 'bend/nope'", "/prompt needs the prompt text",
                 "/patch expects a name or index", "/tempo ignored"):
        assert part in text
    assert show.calls == []


def test_unknown_addresses_go_to_on_event(params, show):
    rec = Recorder(handled=True)
    with OscServer(params, show, on_event=rec.on_event, port=0) as server:
        peer = Peer(server.address)
        before = time.monotonic()
        peer.send("/fader/3", 0.7)
        peer.send("/button/1")  # no argument: a trigger
        peer.send("/fader/3", "loud")  # not a number: reported, not passed on
        peer.send("/bend/melt/mix", 0.5)  # a parameter: never passed on
        assert landed(params, "bend/melt/mix", 0.5)
        rec.handled = False
        peer.send("/fader/9", 0.1)
        assert wait_until(lambda: len(rec.events) == 3)
        assert wait_until(lambda: any("unknown address /fader/9" in w for w in show.warnings))
        port = peer.port
        peer.close()
    fader, button, _ = rec.events
    assert (fader.source, fader.kind, fader.address) == ("osc", "osc", "/fader/3")
    assert fader.value == pytest.approx(0.7)
    assert fader.port == f"127.0.0.1:{port}"
    assert before <= fader.arrived <= time.monotonic()
    assert (button.address, button.value) == ("/button/1", 1.0)
    assert any("/fader/3 expects a number, got string 'loud'" in w for w in show.warnings)


# -- bad input --------------------------------------------------------------------------------
def _msg(address, *typed):
    b = OscMessageBuilder(address)
    for value, tag in typed:
        b.add_arg(value, tag)
    return b.build().dgram


BAD = {
    "garbage": (b"\x00\xff\x13garbage\x99" * 3, "malformed packet"),
    "empty": (b"", "malformed packet"),
    "no address slash": (b"bend\x00\x00\x00\x00,f\x00\x00\x00\x00\x00\x00", "malformed packet"),
    "truncated": (_msg("/bend/melt/mix", (0.5, "f"))[:18], "malformed packet"),
    "bad type tag": (b"/bend/melt/mix\x00\x00f\x00\x00\x00\x00\x00\x00\x00", "malformed packet"),
    "bad bundle": (b"#bundle\x00" + b"\x00" * 8 + b"\x00\x00\x01\x00/x", "malformed packet"),
    "largest udp garbage": (b"\x01" * 65507, "malformed packet"),
    "nan": (_msg("/bend/melt/mix", (float("nan"), "f")), "refused non-finite value nan"),
    "inf": (_msg("/bend/melt/mix", (float("inf"), "d")), "refused non-finite value inf"),
    "string": (_msg("/bend/melt/mix", ("half", "s")), "expects a number, got string 'half'"),
    "blob": (_msg("/bend/melt/mix", (b"\x01\x02", "b")), "expects a number, got blob"),
    "nil": (_msg("/bend/melt/mix", (None, "N")), "expects a number, got nil"),
    "unknown address": (_msg("/bend/nope/mix", (0.5, "f")), "unknown address /bend/nope/mix"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_packet_is_reported_and_server_keeps_serving(server, params, show, peer, case, caplog):
    data, expected = BAD[case]
    with caplog.at_level("WARNING", logger="instrument.control.osc"):
        peer.send_raw(data)
        peer.send("/bend/melt/gain", 3.5)
        assert landed(params, "bend/melt/gain", 3.5)
        assert wait_until(lambda: len(show.warnings) == 1)
    assert expected in show.warnings[0]
    assert [r.getMessage() for r in caplog.records] == show.warnings
    assert params.get("bend/melt/mix") == 0.0
    assert "internal error" not in show.warnings[0]


def test_oversized_packet_is_dropped(params, show):
    with OscServer(params, show, port=0, max_packet=1024) as server:
        peer = Peer(server.address)
        peer.send_raw(_msg("/bend/melt/mix", ("x" * 2000, "s")))
        peer.send_raw(_msg("/bend/melt/mix", (0.5, "f"), ("x" * 2000, "s")))
        peer.send("/bend/melt/gain", 3.5)
        assert landed(params, "bend/melt/gain", 3.5)
        peer.close()
    assert len(show.warnings) == 1
    assert "larger than 1024 bytes" in show.warnings[0]
    assert params.get("bend/melt/mix") == 0.0


def test_warnings_are_rate_limited(server, params, show, peer):
    for i in range(50):
        peer.send("/no/such/thing", float(i))
    peer.send("/bend/melt/gain", 2.0)
    assert landed(params, "bend/melt/gain", 2.0)
    assert len(show.warnings) == 1
    for i in range(50):  # many different problems: a flood is capped too
        peer.send(f"/no/such/{i}", 1.0)
    peer.send("/bend/melt/gain", 3.0)
    assert landed(params, "bend/melt/gain", 3.0)
    assert 2 <= len(show.warnings) <= 10
    time.sleep(WARN_INTERVAL + 0.05)
    peer.send("/no/such/thing", 1.0)
    assert wait_until(lambda: any("(and 49 more like it)" in w for w in show.warnings))


# -- order and timing -------------------------------------------------------------------------
def test_burst_of_500_keeps_order(params, show):
    rec = Recorder(params)
    with OscServer(params, show, set_value=rec.set_value, port=0) as server:
        client = SimpleUDPClient(*server.address)
        for i in range(500):
            if i % 2:
                client.send_message("/bend/melt/gain", i / 250)
            else:
                client.send_message("/bend/swirl/layer", float(i % 30))
        assert wait_until(lambda: len(rec.values) == 500, timeout=5.0)
    gains = [v for n, v, _, _ in rec.values if n == "bend/melt/gain"]
    assert gains == [pytest.approx(i / 250) for i in range(1, 500, 2)]
    layers = [v for n, v, _, _ in rec.values if n == "bend/swirl/layer"]
    assert layers == [float(i % 30) for i in range(0, 500, 2)]
    arrivals = [a for _, _, a, _ in rec.values]
    assert arrivals == sorted(arrivals)
    assert params.get("bend/melt/gain") == pytest.approx(499 / 250)


# -- feedback ---------------------------------------------------------------------------------
def test_feedback_is_rate_limited_and_ends_on_the_last_value(params, show):
    receiver = Peer()
    rate = 30.0
    with OscServer(params, show, port=0, feedback=("127.0.0.1", receiver.port), feedback_rate=rate):
        slowest = 0.0
        start = time.monotonic()
        for i in range(1000):
            t = time.monotonic()
            params.set("bend/melt/gain", (i + 1) / 250)  # the writer: a modulator, the render loop
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.0005)
        duration = time.monotonic() - start
        got = receiver.receive_all(quiet=0.4)
    receiver.close()
    values = [m.params[0] for m in got if m.address == "/bend/melt/gain"]
    assert len(values) == len(got)
    assert 2 <= len(values) <= rate * duration + 3
    assert values[-1] == pytest.approx(4.0)
    assert values == sorted(values)
    assert slowest < 0.02  # feedback never makes the writer wait (a 30/s sender would sleep 33 ms)


def test_feedback_addresses_are_limited_separately(params, show):
    receiver = Peer()
    with OscServer(params, show, port=0, feedback=("127.0.0.1", receiver.port), feedback_rate=5.0):
        params.set("bend/melt/mix", 0.5)
        params.set("bend/swirl/mix", 0.25)
        params.set("bend/swirl/layer", 3)
        got = receiver.receive_all(quiet=0.3)
    receiver.close()
    assert {(m.address, round(m.params[0], 6)) for m in got} == {
        ("/bend/melt/mix", 0.5), ("/bend/swirl/mix", 0.25), ("/bend/swirl/layer", 3.0)}


def test_feedback_includes_values_set_over_osc_and_status(params, show):
    receiver = Peer()
    with OscServer(params, show, port=0, feedback=("127.0.0.1", receiver.port)) as server:
        peer = Peer(server.address)
        peer.send("/bend/melt/gain", 7.0)  # clamped: the client learns the stored value
        first = receiver.receive()
        server.send_status({"fps": 24.5, "patch": "storm", "latency_ms": 80})
        rest = receiver.receive_all(quiet=0.3)
        peer.close()
    receiver.close()
    assert (first.address, first.params) == ("/bend/melt/gain", [4.0])
    assert {m.address: m.params[0] for m in rest} == {
        "/status/fps": pytest.approx(24.5), "/status/patch": "storm", "/status/latency_ms": 80}


def test_oscdump_receives_feedback(params, show):
    oscdump = need_tool("oscdump")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen([oscdump, "-L", str(port)], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        with OscServer(params, show, port=0, feedback=("127.0.0.1", port)):
            # oscdump gives no sign of being ready: keep changing the value until it shows up
            for i in range(100):
                assert proc.poll() is None, "oscdump exited"
                params.set("bend/melt/mix", (i % 2) * 0.5 + 0.25)
                if wait_until(lambda: any("/bend/melt/mix" in ln for ln in lines), timeout=0.05):
                    break
            assert wait_until(lambda: any("/bend/melt/mix" in ln for ln in lines))
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    line = next(ln for ln in lines if "/bend/melt/mix" in ln)
    address, types, value = line.split()[-3:]
    assert (address, types) == ("/bend/melt/mix", "f")
    assert float(value) in (0.25, 0.75)


# -- life -------------------------------------------------------------------------------------
def test_stop_frees_the_port_and_restart_works(params, show):
    server = OscServer(params, show, port=0).start()
    port = server.address[1]
    server.stop()
    again = OscServer(params, show, port=port).start()
    try:
        peer = Peer(again.address)
        peer.send("/bend/melt/mix", 0.5)
        assert landed(params, "bend/melt/mix", 0.5)
        peer.close()
    finally:
        again.stop()


def test_port_in_use_is_a_clear_error(server, params, show):
    with pytest.raises(OSError, match=f"OSC: cannot listen on 127.0.0.1:{server.address[1]}"):
        OscServer(params, show, port=server.address[1]).start()


# -- fuzz -------------------------------------------------------------------------------------
_NAMES = [s.name for s in SPECS] + ["prompt", "patch", "patch/next", "patch/save", "freeze", "learn",
                                     "panic", "tempo", "describe", "bend/*/mix", "x/[a-", "{a,b}"]
_ARG = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda f: (f, "f")),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: (f, "d")),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: (i, "i")),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: (i, "h")),
    st.text(max_size=20).map(lambda s: (s, "s")),
    st.binary(min_size=1, max_size=20).map(lambda b: (b, "b")),
    st.booleans().map(lambda b: (b, "T" if b else "F")),
    st.just((None, "N")),
)
_ADDRESS = st.one_of(
    st.sampled_from(_NAMES).map(lambda n: "/" + n),
    st.text(alphabet="/abcdelmixz*?[]{}!,-", min_size=1, max_size=24).map(lambda s: "/" + s),
)


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_server():
    params = make_params()
    show = RecordingShow(params)
    # the server's safety net logs any exception that reaches it: the fuzz must cause none
    errors = _Errors()
    logger = logging.getLogger("instrument.control.osc")
    logger.addHandler(errors)
    try:
        with OscServer(params, show, port=0) as server:
            yield server, params, errors
    finally:
        logger.removeHandler(errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_never_raise(fuzz_server, data):
    server, params, errors = fuzz_server
    server.handle_datagram(data, ("127.0.0.1", 9))
    server.handle_datagram(b"/" + data, ("127.0.0.1", 9))
    server.handle_datagram(b"#bundle\x00" + data, ("127.0.0.1", 9))
    _check_sane(params, errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(address=_ADDRESS, args=st.lists(_ARG, max_size=4), in_bundle=st.booleans(),
       tag=st.integers(0, 2**64 - 1))
def test_fuzz_valid_looking_messages_never_raise(fuzz_server, address, args, in_bundle, tag):
    server, params, errors = fuzz_server
    try:
        msg = OscMessageBuilder(address)
        for value, t in args:
            msg.add_arg(value, t)
        built = msg.build()
    except Exception:  # noqa: BLE001 - python-osc cannot encode some of these: nothing to send
        return
    data = built.dgram
    if in_bundle:
        data = b"#bundle\x00" + tag.to_bytes(8, "big") + len(data).to_bytes(4, "big") + data
    server.handle_datagram(data, ("127.0.0.1", 9))
    _check_sane(params, errors)


def _check_sane(params, errors):
    for spec in SPECS:
        v = params.get(spec.name)
        assert math.isfinite(v) and spec.lo <= v <= spec.hi
    assert not errors.records, errors.records[0].getMessage()
