"""What a control surface hands to the mapping layer: one event, stamped on arrival."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControlEvent:
    source: str  # "midi", "osc" or "key"
    kind: str  # midi: "cc", "note_on", "note_off", "pitchwheel", "program", "clock", "start", "stop",
    #            "nrpn", "cc14"; osc: "osc"; key: "key"
    value: float  # raw value as received (0-127 CC, -8192..8191 pitch bend, OSC float, ...)
    arrived: float  # time.monotonic() when the message reached the instrument
    port: str = ""  # MIDI port name, or OSC sender "host:port"
    channel: int = -1  # MIDI channel 0-15
    number: int = -1  # CC, note, NRPN or program number
    address: str = ""  # OSC address
