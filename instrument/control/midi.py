"""MIDI input: hardware and software ports in, ControlEvents out.

    midi = MidiInput(router.handle, ports=["nanoKONTROL"], api="alsa")
    midi.start()
    ...
    midi.close()

Each message is stamped with time.monotonic() in the rtmidi callback (mido drops rtmidi's own
timestamps), decoded with mido and handed to `on_event` on rtmidi's thread. A background thread
looks at the port list about once a second: controllers plugged in later are opened, unplugged
ones are dropped, with one line each. A machine without MIDI (no /dev/snd/seq, no JACK server)
gets one clear message and the instrument plays on without MIDI.
"""

from __future__ import annotations

import threading
import time

import mido
import rtmidi

from .events import ControlEvent
from .mapping import Notices

APIS = {"alsa": rtmidi.API_LINUX_ALSA, "jack": rtmidi.API_UNIX_JACK}
# Clients that must never be opened as inputs: our own ports and the ALSA system announcer.
_SKIP = ("RtMidi", "System:Timer", "System:Announce")


def api_problem(api: str, err: BaseException) -> str:
    """Why an API cannot be used, in one line for the performer."""
    if api == "jack":
        return "no JACK server running (start jackd, or use the ALSA API)"
    return ("no ALSA sequencer (/dev/snd/seq is missing: load the snd-seq module, "
            "or use the JACK API with a running JACK server)")


def to_event(msg: mido.Message, port: str, arrived: float) -> ControlEvent | None:
    """A mido message as a ControlEvent (None for messages the instrument has no use for)."""
    t = msg.type
    ch = getattr(msg, "channel", -1)
    if t == "control_change":
        return ControlEvent("midi", "cc", msg.value, arrived, port, ch, msg.control)
    if t == "note_on":
        kind = "note_on" if msg.velocity > 0 else "note_off"
        return ControlEvent("midi", kind, msg.velocity, arrived, port, ch, msg.note)
    if t == "note_off":
        return ControlEvent("midi", "note_off", msg.velocity, arrived, port, ch, msg.note)
    if t == "pitchwheel":
        return ControlEvent("midi", "pitchwheel", msg.pitch, arrived, port, ch)
    if t == "program_change":
        return ControlEvent("midi", "program", msg.program, arrived, port, ch, msg.program)
    if t in ("clock", "start", "stop", "continue"):
        return ControlEvent("midi", t, 0.0, arrived, port)
    return None


class _Port:
    """One open input port (rtmidi opens one port per client object)."""

    def __init__(self, owner: MidiInput, name: str, rt: rtmidi.MidiIn):
        self.owner, self.name, self.rt = owner, name, rt

    def callback(self, message, _data) -> None:
        arrived = time.monotonic()  # first thing: the latency clock starts here
        self.owner._receive(self.name, message[0], arrived)

    def close(self) -> None:
        try:
            self.rt.cancel_callback()
            self.rt.close_port()
            self.rt.delete()
        except Exception:  # a vanished device may already be half gone
            pass


class MidiInput:
    """Listens on MIDI input ports and hands ControlEvents to `on_event`.

    ports: None or "all" for every port; a list of names or case-insensitive substrings; []
    for none (with `virtual`, only the virtual port). virtual: the name of an input port the
    instrument creates for other software to connect to. api: "alsa" or "jack".
    """

    def __init__(self, on_event, ports=None, api: str = "alsa", virtual: str | None = None,
                 client_name: str = "instrument", poll: float = 1.0, warn=None):
        if api not in APIS:
            raise ValueError(f"unknown MIDI API '{api}' (use {', '.join(APIS)})")
        self.on_event = on_event
        self.wanted = None if ports in (None, "all") else [p.lower() for p in
                                                           ([ports] if isinstance(ports, str)
                                                            else ports)]
        self.api, self.virtual, self.client_name, self.poll = api, virtual, client_name, poll
        self.notices = Notices(warn)
        self.available = False
        self._ports: dict[str, _Port] = {}
        self._virtual: _Port | None = None
        self._scanner: rtmidi.MidiIn | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said_unavailable = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> MidiInput:
        self.scan()
        self._thread = threading.Thread(target=self._watch, name="midi-ports", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._close_ports()
            if self._scanner is not None:
                try:
                    self._scanner.delete()
                except Exception:
                    pass
                self._scanner = None

    def __enter__(self) -> MidiInput:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def open_ports(self) -> list[str]:
        with self._lock:
            return sorted(self._ports)

    # -- ports --------------------------------------------------------------------------------
    def _wants(self, name: str) -> bool:
        if any(s in name for s in _SKIP) or name.startswith(self.client_name + "-"):
            return False
        if self.wanted is None:
            return True
        low = name.lower()
        return any(w == low or w in low for w in self.wanted)

    def _new_client(self, suffix: str) -> rtmidi.MidiIn:
        rt = rtmidi.MidiIn(rtapi=APIS[self.api], name=f"{self.client_name}-{suffix}")
        rt.ignore_types(sysex=False, timing=False, active_sense=True)  # see SysEx to report it
        return rt

    def scan(self) -> None:
        """Open new matching ports, drop vanished ones (the watcher calls this every `poll` s)."""
        with self._lock:
            if self._stop.is_set():
                return
            try:
                if self._scanner is None:
                    self._scanner = self._new_client("scan")
                    self.available = True
                    if self._said_unavailable:
                        self.notices("midi-back", f"MIDI ({self.api}) is back")
                    self._said_unavailable = False
                    if self.virtual and self._virtual is None:
                        rt = self._new_client("virtual")
                        port = _Port(self, self.virtual, rt)
                        rt.open_virtual_port(self.virtual)
                        rt.set_callback(port.callback)
                        self._virtual = port
                names = self._scanner.get_ports()
            except rtmidi.SystemError as e:
                self._unavailable(e)
                return
            except (rtmidi.RtMidiError, OSError) as e:
                self.notices("scan", f"MIDI port scan failed: {e}")
                return
            for name in [n for n in self._ports if n not in names]:
                self._ports.pop(name).close()
                self.notices(f"gone:{name}", f"MIDI port gone: {name}")
            for name in names:
                if name in self._ports or not self._wants(name):
                    continue
                try:
                    rt = self._new_client("in")
                    port = _Port(self, name, rt)
                    current = rt.get_ports()  # indices are per client: look the name up again
                    if name not in current:
                        rt.delete()
                        continue
                    rt.open_port(current.index(name), "in")
                    rt.set_callback(port.callback)
                except (rtmidi.RtMidiError, OSError) as e:
                    self.notices(f"open:{name}", f"cannot open MIDI port {name}: {e}")
                    continue
                self._ports[name] = port
                self.notices(f"open:{name}", f"MIDI in: {name}")

    def _close_ports(self) -> None:
        for p in self._ports.values():
            p.close()
        self._ports.clear()
        if self._virtual is not None:
            self._virtual.close()
            self._virtual = None

    def _unavailable(self, err: BaseException) -> None:
        self.available = False
        self._close_ports()
        self._scanner = None
        if not self._said_unavailable:
            self._said_unavailable = True
            self.notices.sink(f"MIDI off: {api_problem(self.api, err)}; playing on without "
                              "MIDI")

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.scan()
            except Exception as e:  # the watcher must outlive any one bad scan
                self.notices("watch", f"MIDI port watcher: {e}")

    # -- messages -----------------------------------------------------------------------------
    def _receive(self, port: str, data: list[int], arrived: float) -> None:
        if data and data[0] == 0xF0:
            self.notices(f"sysex:{port}", f"ignored SysEx from {port}")
            return
        try:
            msg = mido.Message.from_bytes(data)
        except (ValueError, TypeError):
            shown = " ".join(f"{b:02X}" for b in data[:8])
            self.notices(f"garbage:{port}", f"ignored malformed MIDI from {port}: {shown}")
            return
        event = to_event(msg, port, arrived)
        if event is None:
            return
        try:
            self.on_event(event)
        except Exception as e:  # never let a handler kill rtmidi's thread
            self.notices(f"handler:{type(e).__name__}", f"MIDI event {event.kind} failed: {e}")


def list_ports(api: str = "alsa") -> tuple[list[str], list[str]]:
    """(inputs, outputs) of one API; raises rtmidi.SystemError when the API is unavailable."""
    mi = rtmidi.MidiIn(rtapi=APIS[api], name="instrument-list")
    try:
        mo = rtmidi.MidiOut(rtapi=APIS[api], name="instrument-list")
        try:
            return mi.get_ports(), mo.get_ports()
        finally:
            mo.delete()
    finally:
        mi.delete()
