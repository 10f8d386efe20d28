"""OSC in and out: every parameter at "/" + its name, a few control addresses, value feedback.

One thread receives and handles every datagram in arrival order (python-osc's threading server
loses order) and applies bundles at once whatever their time tag (TouchDesigner time-tags its
bundles; honouring future tags would mean sleeping on the control path). python-osc parses and
builds the messages; the dispatch is ours so that OSC address patterns (* ? [] {}) expand over
the live parameter space, which changes with every patch.

Nothing a client sends may stop the server: each bad packet, unknown address, wrong type or
non-finite value becomes one rate-limited line through `show.warn` and the log, and is dropped.

Feedback: every stored change of a parameter goes out as "/name value" to the feedback
destination, coalesced per address (at most `feedback_rate` messages a second each, the last
value always sent) from a background thread, so a writer never waits on the network.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from ..params import ParamError, ParamSpace
from ..show import Show
from .events import ControlEvent

log = logging.getLogger(__name__)

DEFAULT_PORT = 9000
MAX_PACKET = 65536  # bytes; larger datagrams are refused whole
WARN_INTERVAL = 2.0  # seconds between two messages about the same kind of problem
WARN_BURST = 8  # messages of any kind a client can cause per WARN_INTERVAL

# Addresses that are not parameters. The OSCQuery tree publishes these too: (OSC type, what).
CONTROL_ADDRESSES: dict[str, tuple[str, str]] = {
    "/prompt": ("s", "prompt A text"),
    "/prompt/b": ("s", "prompt B text (the parameter prompt/blend mixes A and B)"),
    "/patch": ("s", "switch patch by name (or by index, as an int)"),
    "/patch/next": ("N", "next patch"),
    "/patch/prev": ("N", "previous patch"),
    "/patch/save": ("s", "save the current state as a new patch (optional path)"),
    "/freeze": ("i", "hold the picture: 1 on, 0 off, no argument toggles"),
    "/panic": ("N", "every bend's mix to 0"),
    "/learn": ("s", "arm MIDI learn for a parameter (no argument disarms)"),
    "/tempo": ("f", "tempo in BPM"),
    "/describe": ("N", "reply every parameter as /describe/param, then /describe/end"),
}

_WILDCARD = re.compile(r"[*?\[\]{}]")


class OscServer:
    """OSC over UDP for a ParamSpace and a Show.

    set_value(name, value, arrived, source) writes a parameter (default: params.set, clamped);
    on_event(ControlEvent) -> bool gets messages to addresses that are not parameters and
    returns whether it used them; on_tempo(bpm) gets /tempo.
    """

    def __init__(
        self,
        params: ParamSpace,
        show: Show,
        set_value: Callable[[str, float, float | None, str], object] | None = None,
        on_event: Callable[[ControlEvent], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        feedback: tuple[str, int] | None = None,
        feedback_rate: float = 30.0,
        on_tempo: Callable[[float], object] | None = None,
        max_packet: int = MAX_PACKET,
    ):
        if feedback_rate <= 0:
            raise ValueError("feedback_rate must be positive")
        self.params = params
        self.show = show
        self._set_value = set_value or (
            lambda name, value, arrived, source: params.set(name, value, arrived=arrived, source=source)
        )
        self._on_event = on_event
        self._on_tempo = on_tempo
        self._host = host
        self._port = port
        self._feedback = feedback
        self._feedback_addr = None
        self._interval = 1.0 / feedback_rate
        self._max_packet = max_packet
        self._sock: socket.socket | None = None
        self._running = False
        self._threads: list[threading.Thread] = []
        self._listening = False
        self._warnings = _Warnings(show)
        # feedback queue: address -> args, latest wins; last send time per address
        self._cond = threading.Condition()
        self._pending: dict[str, tuple] = {}
        self._last_sent: dict[str, float] = {}

    # -- life -----------------------------------------------------------------------------------
    def start(self) -> OscServer:
        if self._running:
            return self
        family, _, _, _, addr = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # a burst from a controller must wait in the kernel while one chunk of work runs
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(addr)
            if self._feedback is not None:
                fhost, fport = self._feedback
                self._feedback_addr = socket.getaddrinfo(fhost, fport, family, socket.SOCK_DGRAM)[0][4]
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"OSC: cannot listen on {self._host}:{self._port}: {e.strerror or e}") from None
        self._sock = sock
        # stop() writes here to wake the receive loop at once
        self._wake_r, self._wake_w = socket.socketpair()
        self._running = True
        if not self._listening:
            # ParamSpace has no way to remove a listener: this one stays and idles after stop()
            self.params.on_change(self._param_changed)
            self._listening = True
        self._threads = [threading.Thread(target=self._receive_loop, name="osc-in", daemon=True)]
        if self._feedback_addr is not None:
            self._threads.append(threading.Thread(target=self._feedback_loop, name="osc-out", daemon=True))
        for t in self._threads:
            t.start()
        log.info("OSC listening on %s:%d", *self.address[:2])
        return self

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        with self._cond:
            self._cond.notify_all()
        self._wake_w.send(b"x")
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads = []
        self._sock.close()
        self._sock = None
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> OscServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is known only after start()."""
        if self._sock is None:
            return (self._host, self._port)
        return self._sock.getsockname()[:2]

    # -- out ------------------------------------------------------------------------------------
    def send_status(self, values: dict[str, float | int | str]) -> None:
        """Send /status/<key> value for each item to the feedback destination (coalesced)."""
        if self._feedback_addr is None:
            return
        with self._cond:
            for key, value in values.items():
                self._pending["/status/" + str(key).strip("/")] = (value,)
            self._cond.notify()

    def _param_changed(self, name: str, value: float, source: str) -> None:
        if not self._running or self._feedback_addr is None:
            return
        with self._cond:
            self._pending["/" + name] = (float(value),)
            self._cond.notify()

    def _feedback_loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait()
                if not self._running:
                    return
                now = time.monotonic()
                due = [a for a in self._pending if self._last_sent.get(a, -math.inf) + self._interval <= now]
                if not due:
                    wake = min(self._last_sent[a] + self._interval for a in self._pending)
                    self._cond.wait(wake - now)
                    continue
                batch = [(a, self._pending.pop(a)) for a in due]
                for a in due:
                    self._last_sent[a] = now
            for address, args in batch:
                self._send(address, args, self._feedback_addr)

    def _send(self, address: str, args: Iterable, to) -> None:
        sock = self._sock
        if sock is None or to is None:
            return
        try:
            sock.sendto(build_message(address, *args), to)
        except (OSError, ValueError) as e:
            self._warnings.warn(("send", to), f"OSC: cannot send {address} to {to[0]}:{to[1]}: {e}")

    # -- in -------------------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        sock = self._sock
        while self._running:
            try:
                ready, _, _ = select.select([sock, self._wake_r], [], [])
                if sock not in ready:
                    continue  # woken by stop()
                data, _, flags, sender = sock.recvmsg(self._max_packet)
            except OSError as e:
                if not self._running:
                    return
                self._warnings.warn(("recv",), f"OSC: receive error: {e}")
                time.sleep(0.01)  # a persistent socket error must not spin a core
                continue
            arrived = time.monotonic()
            if flags & socket.MSG_TRUNC:
                self._warnings.warn(
                    ("oversized", sender[0]),
                    f"OSC: dropped a packet from {sender[0]} larger than {self._max_packet} bytes",
                )
                continue
            self.handle_datagram(data, sender, arrived)

    def handle_datagram(self, data: bytes, sender=None, arrived: float | None = None) -> None:
        """Handle one received datagram; never raises. Replies go to `sender` (host, port)."""
        if arrived is None:
            arrived = time.monotonic()
        peer = f"{sender[0]}:{sender[1]}" if sender else "local"
        if len(data) > self._max_packet:
            self._warnings.warn(
                ("oversized", peer), f"OSC: dropped a packet from {peer} larger than {self._max_packet} bytes"
            )
            return
        try:
            messages = [m.message for m in OscPacket(data).messages]
        except Exception as e:  # noqa: BLE001 - any garbage a client sends is one warning
            log.debug("OSC: unparsable packet from %s: %r", peer, e)
            # the first bytes usually tell what is sending to the wrong port
            self._warnings.warn(
                ("malformed", peer),
                f"OSC: dropped a malformed packet from {peer} ({len(data)} bytes: {data[:16]!r})",
            )
            return
        for msg in messages:
            try:
                self._dispatch(msg.address, list(msg.params), arrived, sender, peer)
            except Exception:  # noqa: BLE001 - a bug must cost one message, not the server
                log.exception("OSC: error handling %s from %s", msg.address, peer)
                self._warnings.warn(("error", msg.address), f"OSC: internal error handling {msg.address} (see log)")

    def _dispatch(self, address: str, args: list, arrived: float, sender, peer: str) -> None:
        if _WILDCARD.search(address):
            try:
                matcher = _pattern(address)
            except re.error:
                self._warnings.warn(("pattern", address), f"OSC: bad address pattern {address}")
                return
            names = [n for n in self.params.values() if matcher.fullmatch("/" + n)]
            if not names:
                self._warnings.warn(("unknown", address), f"OSC: no parameter matches {address}")
            for name in names:
                self._param(name, args, arrived, sender)
            return
        if address in CONTROL_ADDRESSES:
            self._control(address, args, sender)
            return
        name = address[1:]
        if name in self.params:
            self._param(name, args, arrived, sender)
            return
        if self._on_event is not None:
            value = 1.0 if not args else _number(args[0])  # no argument: a trigger
            if value is None or not math.isfinite(value):
                self._warnings.warn(("type", address), f"OSC: {address} expects a number, got {_describe(args)}")
                return
            event = ControlEvent(source="osc", kind="osc", value=value, arrived=arrived, port=peer, address=address)
            if self._on_event(event):
                return
        self._warnings.warn(("unknown", address), f"OSC: unknown address {address} (send /describe for the list)")

    def _param(self, name: str, args: list, arrived: float, sender) -> None:
        address = "/" + name
        try:
            spec = self.params.spec(name)
        except ParamError:  # removed by a patch switch between match and use
            self._warnings.warn(("unknown", address), f"OSC: unknown address {address}")
            return
        if not args:
            try:
                self._send(address, (float(self.params.get(name)),), sender)
            except ParamError:
                pass
            return
        arg = args[0]
        if isinstance(arg, bool):
            value = spec.hi if arg else spec.lo
        else:
            value = _number(arg)
        if value is None:
            self._warnings.warn(("type", address), f"OSC: {address} expects a number, got {_describe(args)}")
            return
        if not math.isfinite(value):
            self._warnings.warn(("nonfinite", address), f"OSC: {address} refused non-finite value {value}")
            return
        if value < spec.lo or value > spec.hi:
            self._warnings.warn(
                ("range", address),
                f"OSC: {address} {value:g} is outside [{spec.lo:g}, {spec.hi:g}], clamped",
            )
        try:
            self._set_value(name, value, arrived, "osc")
        except ParamError as e:
            self._warnings.warn(("param", address), f"OSC: {e}")

    def _control(self, address: str, args: list, sender) -> None:
        show = self.show
        if address in ("/prompt", "/prompt/b"):
            if not args:
                self._warnings.warn(("type", address), f"OSC: {address} needs the prompt text")
                return
            # Max's [udpsend] splits "/prompt a red fox" into one argument per word
            show.set_prompt(" ".join(_text(a) for a in args), 0 if address == "/prompt" else 1)
        elif address == "/patch":
            if not args:
                self._warnings.warn(("type", address), "OSC: /patch needs a patch name or index")
                return
            arg = args[0]
            if isinstance(arg, str):
                show.switch_patch(arg)
                return
            value = _number(arg)
            if value is None or not math.isfinite(value) or isinstance(arg, bool):
                self._warnings.warn(("type", address), f"OSC: /patch expects a name or index, got {_describe(args)}")
                return
            show.switch_patch(int(value))
        elif address == "/patch/next":
            show.switch_patch("+1")
        elif address == "/patch/prev":
            show.switch_patch("-1")
        elif address == "/patch/save":
            path = _text(args[0]) if args and args[0] is not None else None
            where = show.save_patch(path)
            if where:
                self._send("/patch/saved", (str(where),), sender)
        elif address == "/freeze":
            if not args or args[0] is None:
                show.freeze(None)
                return
            value = _number(args[0])
            if value is None or not math.isfinite(value):
                self._warnings.warn(("type", address), f"OSC: /freeze expects 0 or 1, got {_describe(args)}")
                return
            show.freeze(value >= 0.5)
        elif address == "/panic":
            show.panic()
        elif address == "/learn":
            if not args or args[0] is None:
                show.learn(None)
                return
            name = _text(args[0]).strip().lstrip("/")
            if name not in self.params:
                self._warnings.warn(("learn", name), f"OSC: /learn: unknown parameter '{name}'")
                return
            show.learn(name)
        elif address == "/tempo":
            value = _number(args[0]) if args else None
            if value is None or not math.isfinite(value) or value <= 0:
                self._warnings.warn(("type", address), f"OSC: /tempo expects BPM, got {_describe(args)}")
                return
            if self._on_tempo is None:
                self._warnings.warn(("tempo",), "OSC: /tempo ignored: nothing follows tempo in this show")
                return
            self._on_tempo(value)
        elif address == "/describe":
            self._describe(sender)

    def _describe(self, sender) -> None:
        specs = self.params.specs()
        values = self.params.values()
        sent = 0
        for spec in specs:
            if spec.name not in values:  # removed meanwhile
                continue
            args = ("/" + spec.name, float(spec.lo), float(spec.hi), float(spec.default), spec.unit)
            self._send("/describe/param", (*args, float(values[spec.name])), sender)
            sent += 1
        self._send("/describe/end", (sent,), sender)


def build_message(address: str, *args) -> bytes:
    """One OSC message as bytes: floats as f, ints as i, strings as s, bools as T/F."""
    b = OscMessageBuilder(address=address)
    for a in args:
        if isinstance(a, bool):
            b.add_arg(a, "T" if a else "F")
        elif isinstance(a, int):
            b.add_arg(a, "i")
        elif isinstance(a, float):
            b.add_arg(a, "f")
        else:
            b.add_arg(str(a), "s")
    return b.build().dgram


@functools.lru_cache(maxsize=512)
def _pattern(address: str) -> re.Pattern:
    """An OSC 1.0 address pattern as a regular expression (raises re.error if malformed)."""
    out = []
    i, n = 0, len(address)
    while i < n:
        c = address[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = address.find("]", i + 1)
            if end < 0:
                raise re.error(f"unclosed [ in {address}")
            body = address[i + 1 : end]
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            if not body or "/" in body:
                raise re.error(f"bad [] in {address}")
            # a '-' between two characters is a range, anywhere else a literal
            chars = "".join("-" if ch == "-" and 0 < k < len(body) - 1 else re.escape(ch) for k, ch in enumerate(body))
            out.append(f"[^/{chars}]" if negate else f"[{chars}]")
            i = end
        elif c == "{":
            end = address.find("}", i + 1)
            if end < 0:
                raise re.error(f"unclosed {{ in {address}")
            alternatives = address[i + 1 : end].split(",")
            if any("/" in a for a in alternatives):
                raise re.error(f"bad {{}} in {address}")
            out.append("(?:" + "|".join(re.escape(a) for a in alternatives) + ")")
            i = end
        elif c in "]}":
            raise re.error(f"unmatched {c} in {address}")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _number(arg) -> float | None:
    """A numeric OSC argument as float; None for anything else (strings are not numbers)."""
    if isinstance(arg, bool):
        return 1.0 if arg else 0.0
    if isinstance(arg, (int, float)):
        try:
            return float(arg)
        except OverflowError:  # an int64 beyond float range
            return math.inf
    return None


def _text(arg) -> str:
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    if isinstance(arg, float) and arg.is_integer():
        return str(int(arg))
    return str(arg)


def _describe(args: list) -> str:
    if not args:
        return "no argument"
    a = args[0]
    if a is None:
        return "nil"
    if isinstance(a, str):
        return f"string '{a[:40]}'"
    if isinstance(a, (bytes, bytearray)):
        return f"blob ({len(a)} bytes)"
    if isinstance(a, list):
        return "an array"
    return f"{type(a).__name__} {a!r}"[:60]


class _Warnings:
    """One line per kind of problem per interval, and a cap over all kinds, so a client
    spraying garbage cannot flood the performer's HUD or the log."""

    def __init__(self, show: Show, interval: float = WARN_INTERVAL, burst: int = WARN_BURST):
        self._show = show
        self._interval = interval
        self._burst = burst
        self._lock = threading.Lock()
        self._last: dict[tuple, float] = {}
        self._suppressed: dict[tuple, int] = {}
        self._window_start = -math.inf
        self._window_count = 0

    def warn(self, key: tuple, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            if now - self._window_start >= self._interval:
                self._window_start, self._window_count = now, 0
            if self._window_count >= self._burst:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._window_count += 1
            if len(self._last) > 4096:  # random addresses must not grow this forever
                self._last.clear()
                self._suppressed.clear()
            self._last[key] = now
            more = self._suppressed.pop(key, 0)
        if more:
            message += f" (and {more} more like it)"
        log.warning("%s", message)
        try:
            self._show.warn(message)
        except Exception:  # noqa: BLE001 - the show's HUD failing must not stop OSC
            log.exception("show.warn failed")
