"""The mapping layer: which control moves which parameter, and how.

A `Mapping` is data (a TOML file in mappings/): bindings from a MIDI or OSC source to one or
more parameter targets, each with its own range, curve, smoothing and takeover; plus LFOs and
envelopes. A `Router` plays a mapping live: control threads call `handle(event)`, the render
loop calls `tick(now)` once per tick and the Router writes the parameter space.

Parameter names in a mapping may name a bend by its position in the loaded patch:
"bend/#1/mix" is the mix of the patch's first bend, "bend/#2/gain" the second bend's gain. The
position is the order in which the bend engine declared its bends (the patch order); the Router
resolves these names again whenever the parameter space changes (a patch switch).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from ..params import ParamSpace, ParamSpec, UnknownParam, finite_value
from .events import ControlEvent
from .modulators import Envelope, EnvelopeSpec, LFO, LFOSpec, SHAPES, Tempo
from .smoothing import CURVES, SMOOTHERS, TAKEOVERS, Curve, Smoothing, Takeover

SOURCE_TYPES = ("cc", "cc14", "nrpn", "note", "pitchbend", "program", "relative", "osc")
ENCODINGS = ("twos", "offset", "signed-bit")
MODES = ("absolute", "gate", "toggle", "trigger")
ACTIONS = ("freeze", "panic", "patch_next", "patch_prev", "save_patch")
MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"


class MappingError(ValueError):
    """A mapping file the instrument cannot use; the message names the file line and a fix."""

    def __init__(self, message: str, line: int | None = None, path: str | None = None):
        self.line, self.path, self.reason = line, path, message
        where = path or "mapping"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {message}")


class Notices:
    """Rate-limited one-line messages: each kind of problem at most once per `interval` s."""

    def __init__(self, sink=None, interval: float = 5.0):
        self.sink = sink or (lambda msg: print(f"instrument: {msg}", file=sys.stderr))
        self.interval = interval
        self._last: dict[str, float] = {}
        self._muted: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.interval:
                self._muted[key] = self._muted.get(key, 0) + 1
                return
            self._last[key] = now
            muted = self._muted.pop(key, 0)
        if muted:
            message += f" (and {muted} more like it)"
        try:
            self.sink(message)
        except Exception:  # a broken HUD must not take control down with it
            pass


# -- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a binding listens. channel 0-15 (-1 any); numbers () means any number."""

    type: str
    numbers: tuple[int, ...] = ()
    channel: int = -1
    port: str = ""  # substring of the MIDI port name, case-insensitive; "" any
    mode: str = "absolute"  # cc / note: absolute | gate | toggle | trigger
    encoding: str = "twos"  # relative: twos | offset | signed-bit
    step: float = 1.0 / 128  # relative: control travel (0..1) per encoder step
    bits: int = 14  # nrpn: 14, or 7 for devices that send data entry MSB only
    address: str = ""  # osc
    range: tuple[float, float] = (0.0, 1.0)  # osc: input values that span the target range

    def describe(self) -> str:
        if self.type == "osc":
            return f"OSC {self.address}"
        nums = ",".join(map(str, self.numbers)) if self.numbers else "any"
        ch = "any channel" if self.channel < 0 else f"ch {self.channel + 1}"
        port = f" on '{self.port}'" if self.port else ""
        return f"{self.type} {nums} {ch}{port}"


@dataclass(frozen=True)
class Target:
    """One parameter a binding moves. lo/hi None: the parameter's own range."""

    param: str
    lo: float | None = None
    hi: float | None = None
    curve: str = "linear"
    gamma: float = 2.0
    invert: bool = False
    smooth: Smoothing | None = None
    takeover: str = "jump"


@dataclass(frozen=True)
class Binding:
    source: Source
    targets: tuple[Target, ...] = ()
    action: str = ""  # a show action instead of (or besides) parameter targets


@dataclass
class Mapping:
    name: str = ""
    bindings: list[Binding] = field(default_factory=list)
    lfos: list[LFOSpec] = field(default_factory=list)
    envelopes: list[EnvelopeSpec] = field(default_factory=list)
    smooth: dict[str, Smoothing] = field(default_factory=dict)  # per-param, for direct sets
    program_change: bool = True  # program change messages switch patches
    path: str | None = None

    # -- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Mapping:
        """Load a mapping file; a bare name ("generic") looks in mappings/."""
        p = Path(path)
        if not p.exists() and p.suffix == "" and (MAPPINGS_DIR / f"{p}.toml").exists():
            p = MAPPINGS_DIR / f"{p}.toml"
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MappingError(f"cannot read: {e}", path=str(p)) from None
        m = cls.loads(text, path=str(p))
        return m

    @classmethod
    def loads(cls, text: str, path: str | None = None) -> Mapping:
        return _Parser(text, path).parse()

    def dumps(self) -> str:
        return tomli_w.dumps(_to_toml(self))

    def save(self, path: str | Path | None = None) -> str:
        p = Path(path or self.path or MAPPINGS_DIR / f"{self.name or 'learned'}.toml")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        tmp.replace(p)  # never leave a half-written mapping behind
        self.path = str(p)
        return str(p)

    def params(self) -> list[ParamSpec]:
        """The modulators' own live parameters."""
        return [s for lfo in self.lfos for s in LFO(lfo).params()] + [
            s for env in self.envelopes for s in Envelope(env).params()]


# -- TOML <-> data ----------------------------------------------------------------------------

_BINDING_KEYS = {"type", "number", "channel", "port", "mode", "encoding", "step", "bits",
                 "address", "range", "action", "target"}
_TARGET_KEYS = {"param", "lo", "hi", "curve", "gamma", "invert", "smooth", "takeover"}
_SMOOTH_KEYS = {"kind", "tau", "rate", "mincutoff", "beta", "dcutoff"}
_LFO_KEYS = {f.name for f in fields(LFOSpec)}
_ENV_KEYS = {f.name for f in fields(EnvelopeSpec)} - {"notes"} | {"note"}
_TOP_KEYS = {"name", "program_change", "smooth", "binding", "lfo", "envelope"}


def _hint(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(allowed))})"


class _Parser:
    def __init__(self, text: str, path: str | None):
        self.text, self.path = text, path
        self.lines = text.splitlines()

    def fail(self, msg: str, line: int | None = None):
        raise MappingError(msg, line, self.path)

    # Line numbers: tomllib gives none for values, so find the table header and key by scanning.
    def header_line(self, table: str, index: int) -> int | None:
        pat = re.compile(r"^\s*\[\[\s*" + re.escape(table) + r"\s*\]\]")
        hits = [i + 1 for i, ln in enumerate(self.lines) if pat.match(ln)]
        return hits[index] if index < len(hits) else None

    def key_line(self, start: int | None, key: str) -> int | None:
        """Line of `key = ...` in the table whose header is on line `start` (None: anywhere)."""
        k = re.escape(key)
        pat = re.compile(r"^\s*[\"']?" + k + r"[\"']?\s*=|[{,]\s*" + k + r"\s*=")
        first = 0 if start is None else start  # the line after the header (0-based)
        for i in range(first, len(self.lines)):
            ln = self.lines[i].lstrip()
            if start is not None and ln.startswith("[") and not ln.startswith("[[binding.target"):
                break
            if pat.search(self.lines[i]):
                return i + 1
        return start

    def parse(self) -> Mapping:
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            line = int(m.group(1)) if m else None
            if line is None and "end of document" in str(e):
                line = max(len(self.lines), 1)
            reason = re.sub(r"\s*\(at line.*\)", "", str(e)) if m else str(e)
            self.fail(f"not valid TOML: {reason} (check quotes, '=' and [[binding]] headers)",
                      line)
        except (ValueError, RecursionError) as e:
            self.fail(f"not valid TOML: {e}")
        for key in doc:
            if key not in _TOP_KEYS:
                self.fail(f"unknown top-level key '{key}'{_hint(key, _TOP_KEYS)}",
                          self.key_line(None, key))
        m = Mapping(path=self.path)
        m.name = self.string(doc, "name", "", None)
        m.program_change = self.boolean(doc, "program_change", True, None)
        smooth = doc.get("smooth", {})
        if not isinstance(smooth, dict):
            self.fail("'smooth' must be a table of parameter = smoothing",
                      self.key_line(None, "smooth"))
        for param, spec in smooth.items():
            m.smooth[param] = self.smoothing(spec, self.key_line(None, param), param)
        for i, b in enumerate(self.table_list(doc, "binding")):
            m.bindings.append(self.binding(b, self.header_line("binding", i), i + 1))
        for i, d in enumerate(self.table_list(doc, "lfo")):
            m.lfos.append(self.lfo(d, self.header_line("lfo", i)))
        for i, d in enumerate(self.table_list(doc, "envelope")):
            m.envelopes.append(self.envelope(d, self.header_line("envelope", i)))
        names = [x.name for x in m.lfos] + [x.name for x in m.envelopes]
        for n in names:
            if names.count(n) > 1:
                self.fail(f"two modulators are named '{n}': names must be unique")
        return m

    def table_list(self, doc: dict, key: str) -> list[dict]:
        v = doc.get(key, [])
        if isinstance(v, dict):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            self.fail(f"'{key}' must be written as [[{key}]] tables", self.key_line(None, key))
        return v

    # -- typed getters ------------------------------------------------------------------------
    def number(self, d, key, default, line, lo=-math.inf, hi=math.inf):
        if key not in d:
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"'{key}' must be a number, not {v!r}", self.key_line(line, key))
        if not math.isfinite(v) or not lo <= v <= hi:
            self.fail(f"'{key}' = {v} is out of range {lo}..{hi}", self.key_line(line, key))
        return float(v)

    def integer(self, v, key, line, lo, hi):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(f"'{key}' must be a whole number {lo}..{hi}, not {v!r}",
                      self.key_line(line, key))
        return v

    def string(self, d, key, default, line, choices=None):
        if key not in d:
            return default
        v = d[key]
        if not isinstance(v, str):
            self.fail(f"'{key}' must be a string, not {v!r}", self.key_line(line, key))
        if choices is not None and v not in choices:
            self.fail(f"'{key}' = '{v}' is not one of {', '.join(choices)}{_hint(v, choices)}",
                      self.key_line(line, key))
        return v

    def boolean(self, d, key, default, line):
        if key not in d:
            return default
        if not isinstance(d[key], bool):
            self.fail(f"'{key}' must be true or false", self.key_line(line, key))
        return d[key]

    def unknown(self, d, allowed, line, what):
        for k in d:
            if k not in allowed:
                self.fail(f"unknown key '{k}' in {what}{_hint(k, allowed)}", self.key_line(line, k))

    # -- sections -----------------------------------------------------------------------------
    def smoothing(self, v, line, what) -> Smoothing:
        if isinstance(v, bool) or v is None:
            self.fail(f"smoothing for {what}: give seconds (one-pole tau) or a table", line)
        if isinstance(v, (int, float)):
            if not (math.isfinite(v) and v >= 0):
                self.fail(f"smoothing for {what} must be >= 0 seconds (got {v})", line)
            return Smoothing("onepole", tau=float(v))
        if not isinstance(v, dict):
            self.fail(f"smoothing for {what} must be seconds or a table like "
                      "{ kind = \"slew\", rate = 2.0 }", line)
        self.unknown(v, _SMOOTH_KEYS, line, "smoothing")
        base = Smoothing()
        s = Smoothing(
            kind=self.string(v, "kind", "onepole", line, SMOOTHERS),
            **{k: self.number(v, k, getattr(base, k), line) for k in _SMOOTH_KEYS - {"kind"}})
        err = s.check()
        if err:
            self.fail(err, line)
        return s

    def target(self, t: dict, line, where: str) -> Target:
        if "param" not in t:
            self.fail(f"{where}: needs param = \"<parameter name>\" (or target tables)", line)
        param = self.string(t, "param", "", line)
        if not param:
            self.fail(f"{where}: param is empty", self.key_line(line, "param"))
        tg = Target(
            param=param,
            lo=self.number(t, "lo", None, line),
            hi=self.number(t, "hi", None, line),
            curve=self.string(t, "curve", "linear", line, CURVES),
            gamma=self.number(t, "gamma", 2.0, line, 1e-3, 1e3),
            invert=self.boolean(t, "invert", False, line),
            smooth=self.smoothing(t["smooth"], self.key_line(line, "smooth"), param)
            if "smooth" in t else None,
            takeover=self.string(t, "takeover", "jump", line, TAKEOVERS),
        )
        if tg.lo is not None and tg.hi is not None:
            err = Curve(tg.curve, tg.lo, tg.hi, tg.gamma).check()
            if err:
                self.fail(f"{where}: {err}", self.key_line(line, "curve"))
        return tg

    def binding(self, b: dict, line, n: int) -> Binding:
        where = f"binding {n}"
        self.unknown(b, _BINDING_KEYS | _TARGET_KEYS, line, where)
        typ = self.string(b, "type", "osc" if "address" in b else None, line, SOURCE_TYPES)
        if typ is None:
            self.fail(f"{where}: needs type = \"cc\" (or {', '.join(SOURCE_TYPES[1:])}) "
                      "or address = \"/osc/address\"", line)
        limit = {"nrpn": 16383, "cc14": 31}.get(typ, 127)
        numbers: tuple[int, ...] = ()
        raw = b.get("number", "any")
        if raw != "any":
            items = raw if isinstance(raw, list) else [raw]
            numbers = tuple(self.integer(x, "number", line, 0, limit) for x in items)
        if typ in ("cc", "cc14", "nrpn", "relative") and not numbers:
            self.fail(f"{where}: {typ} needs number = 0..{limit}", line)
        ch = b.get("channel", "any")
        channel = -1 if ch == "any" else self.integer(ch, "channel", line, 1, 16) - 1
        address = self.string(b, "address", "", line)
        if typ == "osc" and not address.startswith("/"):
            self.fail(f"{where}: OSC bindings need address = \"/...\"", line)
        rng = (0.0, 1.0)
        if "range" in b:
            r = b["range"]
            if not (isinstance(r, list) and len(r) == 2
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                            and math.isfinite(x) for x in r) and r[0] != r[1]):
                self.fail(f"{where}: range must be [low, high] (two different numbers)",
                          self.key_line(line, "range"))
            rng = (float(r[0]), float(r[1]))
        src = Source(
            type=typ, numbers=numbers, channel=channel,
            port=self.string(b, "port", "", line),
            mode=self.string(b, "mode", "absolute", line, MODES),
            encoding=self.string(b, "encoding", "twos", line, ENCODINGS),
            step=self.number(b, "step", 1.0 / 128, line, 0.0, 1.0),
            bits=int(self.number(b, "bits", 14, line, 7, 14)),
            address=address, range=rng)
        if src.bits not in (7, 14):
            self.fail(f"{where}: bits must be 7 or 14", self.key_line(line, "bits"))
        action = self.string(b, "action", "", line, ACTIONS + ("",))
        targets = []
        if "param" in b:
            if "target" in b:
                self.fail(f"{where}: give either param = ... or [[binding.target]] tables, "
                          "not both", line)
            targets.append(self.target(b, line, where))
        else:
            for k in _TARGET_KEYS & set(b):
                self.fail(f"{where}: '{k}' without param = ...", self.key_line(line, k))
            tl = b.get("target", [])
            if isinstance(tl, dict):
                tl = [tl]
            if not isinstance(tl, list) or not all(isinstance(x, dict) for x in tl):
                self.fail(f"{where}: targets must be [[binding.target]] tables", line)
            for j, t in enumerate(tl):
                self.unknown(t, _TARGET_KEYS, line, f"{where} target {j + 1}")
                targets.append(self.target(t, line, f"{where} target {j + 1}"))
        if not targets and not action:
            self.fail(f"{where}: binds nothing: add param = \"...\" or action = "
                      f"\"{ACTIONS[0]}\"", line)
        return Binding(src, tuple(targets), action)

    def lfo(self, d: dict, line) -> LFOSpec:
        self.unknown(d, _LFO_KEYS, line, "lfo")
        for k in ("name", "target"):
            if not self.string(d, k, "", line):
                self.fail(f"lfo needs {k} = \"...\"", line)
        base = LFOSpec("", "")
        spec = LFOSpec(
            name=d["name"], target=d["target"],
            shape=self.string(d, "shape", base.shape, line, SHAPES),
            sync=self.boolean(d, "sync", False, line),
            **{k: self.number(d, k, getattr(base, k), line)
               for k in ("rate", "depth", "offset", "phase")})
        err = spec.check()
        if err:
            self.fail(err, line)
        if "/" in spec.name:
            self.fail(f"lfo name '{spec.name}' must not contain '/'", line)
        return spec

    def envelope(self, d: dict, line) -> EnvelopeSpec:
        self.unknown(d, _ENV_KEYS, line, "envelope")
        for k in ("name", "target"):
            if not self.string(d, k, "", line):
                self.fail(f"envelope needs {k} = \"...\"", line)
        base = EnvelopeSpec("", "")
        raw = d.get("note", "any")
        notes = () if raw == "any" else tuple(
            self.integer(x, "note", line, 0, 127) for x in (raw if isinstance(raw, list) else [raw]))
        ch = d.get("channel", "any")
        spec = EnvelopeSpec(
            name=d["name"], target=d["target"],
            velocity=self.boolean(d, "velocity", True, line),
            port=self.string(d, "port", "", line),
            channel=-1 if ch == "any" else self.integer(ch, "channel", line, 1, 16) - 1,
            notes=notes,
            **{k: self.number(d, k, getattr(base, k), line)
               for k in ("attack", "decay", "sustain", "release", "depth")})
        err = spec.check()
        if err:
            self.fail(err, line)
        if "/" in spec.name:
            self.fail(f"envelope name '{spec.name}' must not contain '/'", line)
        return spec


def _changed(obj, default) -> dict:
    """Fields of a dataclass that differ from `default` (a save writes only those)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)
            if getattr(obj, f.name) != getattr(default, f.name)}


def _smooth_toml(s: Smoothing) -> dict:
    return {"kind": s.kind, **_changed(s, Smoothing())}


def _to_toml(m: Mapping) -> dict:
    doc: dict = {}
    if m.name:
        doc["name"] = m.name
    doc["program_change"] = m.program_change
    if m.smooth:
        doc["smooth"] = {k: _smooth_toml(v) for k, v in m.smooth.items()}
    out = []
    for b in m.bindings:
        s = b.source
        d = {"type": s.type, **_changed(s, Source(s.type))}
        if "numbers" in d:
            nums = d.pop("numbers")
            d["number"] = nums[0] if len(nums) == 1 else list(nums)
        if "channel" in d:
            d["channel"] = s.channel + 1
        if "range" in d:
            d["range"] = list(s.range)
        if b.action:
            d["action"] = b.action
        ts = []
        for t in b.targets:
            td = {"param": t.param, **_changed(t, Target(t.param))}
            if t.smooth is not None:
                td["smooth"] = _smooth_toml(t.smooth)
            ts.append(td)
        if ts:
            d["target"] = ts
        out.append(d)
    if out:
        doc["binding"] = out
    if m.lfos:
        doc["lfo"] = [{f.name: getattr(x, f.name) for f in fields(LFOSpec)} for x in m.lfos]
    envs = []
    for e in m.envelopes:
        d = {f.name: getattr(e, f.name) for f in fields(EnvelopeSpec) if f.name != "notes"}
        d["channel"] = "any" if e.channel < 0 else e.channel + 1
        d["note"] = list(e.notes) if e.notes else "any"
        envs.append(d)
    if envs:
        doc["envelope"] = envs
    return doc


# -- name resolution --------------------------------------------------------------------------


def bend_order(params: ParamSpace) -> list[str]:
    """Bend names in the order the bend engine declared them (the patch order)."""
    order: list[str] = []
    for name in params.values("bend/"):  # dict order is declaration order
        parts = name.split("/")
        if len(parts) >= 3 and parts[1] not in order:
            order.append(parts[1])
    return order


def resolve_name(name: str, params: ParamSpace, bends: list[str] | None = None) -> str | None:
    """A mapping's parameter name as a ParamSpace name ("bend/#2/mix" -> "bend/<2nd>/mix")."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[0] == "bend" and parts[1].startswith("#"):
        try:
            i = int(parts[1][1:]) - 1
        except ValueError:
            return None
        bends = bend_order(params) if bends is None else bends
        if not 0 <= i < len(bends):
            return None
        name = "/".join(["bend", bends[i], *parts[2:]])
    return name if name in params else None


# -- the live router --------------------------------------------------------------------------


class _Live:
    """What the Router knows about one parameter it drives."""

    __slots__ = ("name", "spec", "target", "base", "smoother", "written", "arrived", "source",
                 "takeovers")

    def __init__(self, name: str, spec: ParamSpec, value: float):
        self.name, self.spec = name, spec
        self.target = self.base = value
        self.smoother = None
        self.written = value  # what the parameter space holds as far as the Router knows
        self.arrived: float | None = None
        self.source = ""
        self.takeovers: list[Takeover] = []


@dataclass
class _RTarget:
    param: str
    curve: Curve
    takeover: Takeover
    smooth: Smoothing | None


@dataclass
class _RBinding:
    binding: Binding
    targets: list[_RTarget]
    on: bool = False  # toggle state
    held: bool = False  # button down (for edges)


class _Learn:
    WINDOW = 0.3  # seconds after the first message
    ENOUGH = 4  # this many messages from one control (or 6 in all: pairs) decide sooner

    def __init__(self, param: str):
        self.param = param
        self.events: list[ControlEvent] = []


class Router:
    """Plays a Mapping: control events in (any thread), parameter values out (in `tick`)."""

    def __init__(self, params: ParamSpace, show=None, mapping: Mapping | None = None,
                 warn=None):
        self.params = params
        self.show = show
        self.tempo = Tempo()
        self.notices = Notices(warn or (show.warn if show is not None else None))
        self.unresolved: list[str] = []
        self.on_learn = None  # fn(binding) after MIDI learn bound a control
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._rb: list[_RBinding] = []
        self._lfos: list[LFO] = []
        self._envs: list[Envelope] = []
        self._mod_targets: dict[int, str | None] = {}
        self._smooth: dict[str, Smoothing] = {}
        self._version = -1
        self._last_tick: float | None = None
        self._cc14: dict[tuple, list] = {}  # (port, ch, n) -> [msb, lsb, lsb since msb]
        self._nrpn: dict[tuple, list] = {}  # (port, ch) -> [sel msb, sel lsb, data msb, lsb fresh]
        self._learn: _Learn | None = None
        self.mapping = Mapping()
        self.load(mapping or Mapping())

    # -- configuration ------------------------------------------------------------------------
    def load(self, mapping: Mapping) -> list[str]:
        """Play `mapping` from now on; returns the names it binds that do not exist (yet)."""
        with self._lock:
            old = self.mapping
            for spec in old.lfos + old.envelopes:
                self.params.remove_prefix(f"mod/{spec.name}/")
            self.mapping = mapping
            for spec in mapping.params():
                self.params.declare(spec)
            self._lfos = [LFO(s) for s in mapping.lfos]
            self._envs = [Envelope(s) for s in mapping.envelopes]
            self._smooth = dict(mapping.smooth)
            self._version = -1
            self._resolve()
            return list(self.unresolved)

    def smooth(self, name: str, smoothing: Smoothing | None) -> None:
        """Smoothing for direct sets of one parameter (None: none)."""
        with self._lock:
            if smoothing is None:
                self._smooth.pop(name, None)
            else:
                self._smooth[name] = smoothing
            live = self._live.get(name)
            if live is not None:
                live.smoother = None

    def _resolve(self) -> None:
        """Bind names to the parameter space as it is now (again after every patch switch)."""
        if self._version == self.params.version:
            return
        self._version = self.params.version
        bends = bend_order(self.params)
        missing: list[str] = []
        rbs = []
        old_state = {id(rb.binding): rb for rb in self._rb}
        for b in self.mapping.bindings:
            rts = []
            for t in b.targets:
                name = resolve_name(t.param, self.params, bends)
                if name is None:
                    missing.append(t.param)
                    continue
                spec = self.params.spec(name)
                lo = spec.lo if t.lo is None else t.lo
                hi = spec.hi if t.hi is None else t.hi
                curve = Curve(t.curve, lo, hi, t.gamma, t.invert)
                err = curve.check()
                if err:
                    self.notices(f"curve:{t.param}", f"mapping: {t.param}: {err}; target skipped")
                    continue
                rts.append(_RTarget(name, curve, Takeover(t.takeover), t.smooth))
            if rts or b.action:
                prev = old_state.get(id(b))
                rbs.append(_RBinding(b, rts, prev.on if prev else False,
                                     prev.held if prev else False))
        self._rb = rbs
        self._mod_targets = {}
        for m in self._lfos + self._envs:
            name = resolve_name(m.spec.target, self.params, bends)
            self._mod_targets[id(m)] = name
            if name is None:
                missing.append(m.spec.target)
        for name in [n for n in self._live if n not in self.params]:
            del self._live[name]
        for live in self._live.values():
            live.takeovers = []
            live.spec = self.params.spec(live.name)
        for rb in self._rb:
            for rt in rb.targets:
                self._get_live(rt.param).takeovers.append(rt.takeover)
        if missing and missing != self.unresolved:
            self.notices("unresolved", "mapping: no such parameter(s) in this patch: "
                         + ", ".join(sorted(set(missing))))
        self.unresolved = missing

    def _get_live(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            live = _Live(name, self.params.spec(name), self.params.get(name))
            self._live[name] = live
        return live

    def _sync(self, live: _Live) -> None:
        """Notice a value someone else stored (a patch, a direct set elsewhere) and adopt it."""
        try:
            now = self.params.get(live.name)
        except UnknownParam:
            return
        if now != live.written:
            live.target = live.base = now
            live.written = now
            if live.smoother is not None:
                live.smoother.reset(now)
            for tk in live.takeovers:
                tk.release()

    def _aim(self, live: _Live, value: float, arrived: float | None, source: str,
             smooth: Smoothing | None) -> None:
        live.target = live.spec.clamp(value)
        if smooth is not None and live.smoother is None:
            live.smoother = smooth.make()
            live.smoother.reset(live.base)
        elif smooth is None and live.smoother is not None:
            live.smoother = None
        if arrived is not None and (live.arrived is None or arrived < live.arrived):
            live.arrived = arrived
        live.source = source

    # -- direct sets --------------------------------------------------------------------------
    def set_target(self, name: str, value, arrived: float | None = None, source: str = "") -> float:
        """Aim a parameter at `value` (its units); written on the next tick, smoothed if the
        mapping asks for it. Raises ParamError (UnknownParam) like ParamSpace.set."""
        v = finite_value(name, value)
        with self._lock:
            self._resolve()
            spec = self.params.spec(name)  # raises UnknownParam
            live = self._get_live(name)
            self._sync(live)
            self._aim(live, v, arrived, source, self._smooth.get(name))
            for tk in live.takeovers:  # the knob no longer agrees with the parameter
                tk.release()
            return spec.clamp(v)

    def set_tempo(self, bpm: float) -> None:
        with self._lock:
            self.tempo.set_bpm(float(bpm))

    # -- learn --------------------------------------------------------------------------------
    def learn(self, param: str | None) -> None:
        """Arm MIDI learn: the next control that moves is bound to `param` (None disarms)."""
        with self._lock:
            if param is None:
                self._learn = None
                return
            self._resolve()
            if param not in self.params:
                raise UnknownParam(f"unknown parameter '{param}'")
            self._learn = _Learn(param)

    @property
    def learning(self) -> str | None:
        learn = self._learn
        return learn.param if learn else None

    def _learn_feed(self, ev: ControlEvent) -> None:
        lr = self._learn
        if ev.kind in ("note_on", "pitchwheel"):
            if not lr.events:
                lr.events.append(ev)
                self._learn_decide()
            return
        if ev.kind != "cc":
            return
        first = lr.events[0] if lr.events else None
        if first is not None and (first.kind != "cc" or (ev.port, ev.channel) !=
                                  (first.port, first.channel)):
            return
        lr.events.append(ev)
        same = [e for e in lr.events if e.number == lr.events[0].number]
        if len(same) >= _Learn.ENOUGH or len(lr.events) >= 2 * _Learn.ENOUGH - 2:
            self._learn_decide()

    def _learn_decide(self) -> None:
        lr, self._learn = self._learn, None
        ev = lr.events[0]
        if ev.kind == "note_on":
            src = Source("note", (ev.number,), ev.channel, ev.port, mode="toggle")
        elif ev.kind == "pitchwheel":
            src = Source("pitchbend", (), ev.channel, ev.port)
        else:
            src = _detect_cc(lr.events)
            src = replace(src, channel=ev.channel, port=ev.port)
        binding = Binding(src, (Target(lr.param),))
        self.mapping.bindings.append(binding)
        self._version = -1
        self._resolve()
        self.notices(f"learn:{lr.param}", f"learned {src.describe()} -> {lr.param}")
        if self.on_learn is not None:
            try:
                self.on_learn(binding)
            except Exception as e:
                self.notices("on_learn", f"learn callback failed: {e}")

    # -- events -------------------------------------------------------------------------------
    def handle(self, event: ControlEvent) -> bool:
        """Route one control event; True if something used it. Never raises on bad input."""
        try:
            with self._lock:
                return self._handle(event)
        except Exception as e:  # a performer's event must never take the instrument down
            self.notices(f"handle:{type(e).__name__}", f"control event {event.kind} ignored: {e}")
            return False

    def _handle(self, ev: ControlEvent) -> bool:
        if not math.isfinite(ev.value):
            self.notices("nan", f"ignored non-finite value from {ev.source} {ev.address or ev.kind}")
            return False
        self._resolve()
        kind = ev.kind
        if kind == "clock":
            self.tempo.clock(ev.arrived)
            return True
        if kind in ("start", "stop", "continue"):
            {"start": self.tempo.start, "stop": self.tempo.stop,
             "continue": self.tempo.cont}[kind](ev.arrived)
            return True
        if self._learn is not None and ev.source == "midi" and kind != "program":
            self._learn_feed(ev)
            return True
        if kind in ("note_on", "note_off"):
            if kind == "note_on" and ev.value == 0:
                ev = replace(ev, kind="note_off")
            used = self._envelopes(ev)
            return self._match(ev, "note", ev.number) or used
        if kind == "cc":
            return self._cc(ev)
        if kind == "pitchwheel":
            return self._match(ev, "pitchbend", -1)
        if kind == "program":
            if self._match(ev, "program", ev.number):
                return True
            if self.mapping.program_change and self.show is not None:
                self.show.switch_patch(int(ev.number))
                return True
            return False
        if kind in ("cc14", "nrpn"):
            return self._match(ev, kind, ev.number)
        if kind == "osc":
            return self._match(ev, "osc", -1)
        return False

    def _cc(self, ev: ControlEvent) -> bool:
        n, v = ev.number, int(ev.value)
        used = False
        key = (ev.port, ev.channel)
        st = self._nrpn.get(key)
        if n in (99, 98, 101, 100):
            st = self._nrpn.setdefault(key, [None, None, 0, False])
            if n == 99:
                st[0] = v
            elif n == 98:
                st[1] = v
            else:  # an RPN selection deselects the NRPN
                st[0] = st[1] = None
            used = self._has("nrpn")
        elif n in (6, 38) and st is not None and st[0] is not None and st[1] is not None:
            number = st[0] << 7 | st[1]
            if n == 6:
                st[2], lsb = v, 0
                st[3] = False
            else:
                lsb, st[3] = v, True
            value = st[2] << 7 | lsb
            used = self._match(replace(ev, kind="nrpn", number=number, value=value,
                                       ), "nrpn", number, data_msb_only=(n == 6)) or used
            if used:
                return True
        if n < 64 and self._has("cc14"):
            base = n if n < 32 else n - 32
            if self._has("cc14", base):
                st14 = self._cc14.setdefault((ev.port, ev.channel, base), [0, 0, False])
                if n < 32:
                    # MSB: pair it with an LSB that came first (LSB-first devices), else 0.
                    st14[0] = v
                    lsb = st14[1] if st14[2] else 0
                    st14[1], st14[2] = lsb, False
                else:
                    st14[1], st14[2] = v, True
                value = st14[0] << 7 | st14[1]
                if self._match(replace(ev, kind="cc14", number=base, value=value), "cc14",
                               base):
                    return True
        return self._match(ev, "cc", n) or self._match(ev, "relative", n) or used

    def _has(self, typ: str, number: int | None = None) -> bool:
        return any(rb.binding.source.type == typ and (
            number is None or not rb.binding.source.numbers or number in rb.binding.source.numbers)
            for rb in self._rb)

    def _matches(self, s: Source, ev: ControlEvent, number: int) -> bool:
        if s.type == "osc":
            return ev.source == "osc" and ev.address == s.address
        if ev.source == "osc":
            return False
        return ((number < 0 or not s.numbers or number in s.numbers)
                and (s.channel < 0 or s.channel == ev.channel)
                and (not s.port or s.port.lower() in ev.port.lower()))

    def _match(self, ev: ControlEvent, typ: str, number: int, data_msb_only=False) -> bool:
        used = False
        for rb in self._rb:
            s = rb.binding.source
            if s.type != typ or not self._matches(s, ev, number):
                continue
            if typ == "nrpn":
                if s.bits == 7 and not data_msb_only:
                    continue  # 7-bit NRPN listens to data entry MSB only
                if s.bits == 7:
                    ev = replace(ev, value=float(int(ev.value) >> 7))
            used = True
            self._fire(rb, ev)
        return used

    def _position(self, s: Source, ev: ControlEvent) -> float | None:
        """The event's control position in 0..1 (None for relative sources)."""
        t = s.type
        if t in ("cc", "note", "program"):
            return ev.value / 127.0
        if t in ("cc14",):
            return ev.value / 16383.0
        if t == "nrpn":
            return ev.value / (127.0 if s.bits == 7 else 16383.0)
        if t == "pitchbend":
            return (ev.value + 8192.0) / 16383.0
        if t == "osc":
            lo, hi = s.range
            return (ev.value - lo) / (hi - lo)
        return None

    def _fire(self, rb: _RBinding, ev: ControlEvent) -> None:
        s = rb.binding.source
        if s.type == "relative":
            delta = _relative_delta(int(ev.value), s.encoding) * s.step
            for rt in rb.targets:
                live = self._get_live(rt.param)
                self._sync(live)
                x = rt.curve.inverse(live.target) + delta
                self._aim(live, rt.curve.apply(x), ev.arrived, ev.source, rt.smooth)
            return
        x = self._position(s, ev)
        if x is None:
            return
        x = min(max(x, 0.0), 1.0)
        if s.mode == "absolute" and s.type != "note":
            self._drive(rb, x, ev.arrived, ev.source)
            return
        # Buttons: notes (velocity is the value), or CCs in a button mode (pressed >= 64).
        pressed = ev.kind == "note_on" if s.type == "note" else x >= 0.5
        mode = "gate" if s.mode == "absolute" else s.mode  # notes default to gate
        was, rb.held = rb.held, pressed
        if mode == "toggle":
            if pressed and not was:
                rb.on = not rb.on
                self._button(rb, x if rb.on else 0.0, ev)
        elif mode == "gate":
            if pressed or was:
                self._button(rb, x if pressed else 0.0, ev)
        elif pressed and not was:  # trigger
            self._button(rb, x, ev)

    def _button(self, rb: _RBinding, x: float, ev: ControlEvent) -> None:
        if rb.binding.action and x > 0:
            self._action(rb.binding.action)
        for rt in rb.targets:
            live = self._get_live(rt.param)
            self._sync(live)
            self._aim(live, rt.curve.apply(x), ev.arrived, ev.source, rt.smooth)

    def _action(self, action: str) -> None:
        show = self.show
        if show is None:
            self.notices(f"action:{action}", f"'{action}' needs a running show")
            return
        if action == "freeze":
            show.freeze(None)
        elif action == "panic":
            show.panic()
        elif action == "patch_next":
            show.switch_patch("+1")
        elif action == "patch_prev":
            show.switch_patch("-1")
        elif action == "save_patch":
            show.save_patch(None)

    def _drive(self, rb: _RBinding, x: float, arrived: float | None, source: str) -> None:
        if rb.binding.action and x >= 0.5:
            self._action(rb.binding.action)
        for rt in rb.targets:
            live = self._get_live(rt.param)
            self._sync(live)
            pos = rt.takeover.feed(x, rt.curve.inverse(live.target))
            if pos is not None:
                self._aim(live, rt.curve.apply(pos), arrived, source, rt.smooth)

    def _envelopes(self, ev: ControlEvent) -> bool:
        used = False
        key = (ev.port, ev.channel, ev.number)
        for env in self._envs:
            if env.matches(ev.port, ev.channel, ev.number):
                used = True
                if ev.kind == "note_on":
                    env.note_on(key, ev.value)
                else:
                    env.note_off(key)
        return used

    # -- the render tick ----------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Advance smoothers, tempo and modulators to `now` (time.monotonic()) and write the
        parameter space. Call once per render tick, before the engine reads the parameters."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dt = 0.0 if self._last_tick is None else max(now - self._last_tick, 0.0)
            self._last_tick = now
            try:
                self._tick(now, dt)
            except Exception as e:  # keep the show running; say what broke
                self.notices(f"tick:{type(e).__name__}", f"mapping tick failed: {e}")

    def _tick(self, now: float, dt: float) -> None:
        self._resolve()
        if self._learn is not None and self._learn.events and \
                now - self._learn.events[0].arrived >= _Learn.WINDOW:
            self._learn_decide()
        beat = self.tempo.advance(now, dt)
        mods: dict[str, float] = {}
        for lfo in self._lfos:
            name = self._mod_targets.get(id(lfo))
            value = lfo.value(self.params, dt, beat)
            if name is not None:
                mods[name] = mods.get(name, 0.0) + value
        for env in self._envs:
            name = self._mod_targets.get(id(env))
            value = env.value(self.params, dt)
            if name is not None:
                mods[name] = mods.get(name, 0.0) + value
        for name in mods:
            self._get_live(name)
        for name, live in list(self._live.items()):
            self._sync(live)
            if live.smoother is not None:
                live.base = live.smoother.step(live.target, dt)
            else:
                live.base = live.target
            value = live.base + mods.get(name, 0.0) * (live.spec.hi - live.spec.lo)
            value = live.spec.clamp(value)
            if value == live.written:
                live.arrived = None
                continue
            try:
                live.written = self.params.set(
                    name, value, arrived=live.arrived if live.arrived is not None else now,
                    source=live.source or "mapping")
            except UnknownParam:
                del self._live[name]
                continue
            live.arrived = None


def _relative_delta(v: int, encoding: str) -> int:
    """Encoder steps in one relative CC value."""
    if encoding == "offset":  # 64 = no move
        return v - 64
    if encoding == "signed-bit":  # bit 6 is the sign, bits 0-5 the size
        return -(v & 63) if v & 64 else v & 63
    return v - 128 if v >= 64 else v  # twos complement


def _detect_cc(events: list[ControlEvent]) -> Source:
    """Guess what kind of control sent these first few CCs (MIDI learn)."""
    nums = [e.number for e in events]
    if 99 in nums and 98 in nums:
        msb = [e.value for e in events if e.number == 99][-1]
        lsb = [e.value for e in events if e.number == 98][-1]
        return Source("nrpn", (int(msb) << 7 | int(lsb),),
                      bits=14 if 38 in nums else 7)
    first = nums[0]
    if first < 64:
        base = first if first < 32 else first - 32
        if base in nums and base + 32 in nums:
            return Source("cc14", (base,))
    vals = [int(e.value) for e in events if e.number == first]
    twos = set(range(1, 16)) | set(range(113, 128))
    offset = set(range(49, 80)) - {64}
    repeated = any(a == b for a, b in zip(vals, vals[1:]))
    monotone = all(a < b for a, b in zip(vals, vals[1:])) or \
        all(a > b for a, b in zip(vals, vals[1:]))
    if len(vals) >= 2 and (repeated or not monotone):
        vs = set(vals)
        if vs <= twos and (vs & set(range(113, 128)) or vs <= set(range(1, 16))):
            return Source("relative", (first,), encoding="twos")
        if vs <= offset:
            return Source("relative", (first,), encoding="offset")
        if vs <= set(range(1, 16)) | set(range(65, 80)):
            return Source("relative", (first,), encoding="signed-bit")
    return Source("cc", (first,))
