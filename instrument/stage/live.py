"""The running instrument as a Show: what MIDI, OSC and the keys can ask of it besides knobs.

Three threads meet here. Control threads (OSC, MIDI, the window's keys) call the Show methods;
they only validate and queue, never touch the stream. The render thread calls `apply_pending()`
between chunks, where prompts, patch switches and morphs take effect (the stream is not
thread-safe). The present loop calls `tick(now)` once per tick: the Router's smoothers and
modulators, the morph, and the requests that belong to the present loop (freeze).

Patches come from a `PatchList`: the --patch files in order, then every *.toml in the patches
folder (read again on each switch, so a patch edited in a text editor plays as edited). A patch
that does not load or arm is refused with one line and the show goes on with the one it had.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import tomli_w

from ..bends.morph import MORPH, Morph, current_patch, morph, save_patch_file
from ..bends.patch import Patch, apply_patch, load_patch
from ..control.mapping import Mapping, MappingError, resolve_name
from ..errors import UserError
from ..params import ParamError


class PatchList:
    """The patches a show switches between: files given one by one, then a folder's *.toml.

    The order is fixed when the show starts; patches that appear later (saved on stage, copied in)
    join at the end, so patch N stays patch N for a program change all night.
    """

    def __init__(self, files=(), folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._order: list[Path] = []
        self._seen: set[Path] = set()
        for p in files:
            self.add(p)
        self.paths()

    def paths(self) -> list[Path]:
        if self.folder is not None and self.folder.is_dir():
            for p in sorted(self.folder.glob("*.toml")):
                self.add(p)
        return [p for p in self._order if p.is_file()]

    def add(self, path: str | Path) -> None:
        path = Path(path)
        key = path.resolve()
        if key not in self._seen:
            self._seen.add(key)
            self._order.append(path)

    def find(self, which, current: int) -> int:
        """Index of `which`: an index, '+N' / '-N' from `current` (wrapping), or a patch name."""
        paths = self.paths()
        if not paths:
            raise UserError("no patches to switch to (give --patch FILE or --patches DIR)")
        if isinstance(which, bool) or not isinstance(which, (int, str)):
            raise UserError(f"patch {which!r}: give a name, an index or +1 / -1")
        if isinstance(which, int):
            if not 0 <= which < len(paths):
                raise UserError(f"no patch {which} (there are {len(paths)}: 0-{len(paths) - 1})")
            return which
        text = which.strip()
        if re.fullmatch(r"[+-]\d+", text):
            return (max(current, 0) + int(text)) % len(paths) if current >= 0 else (
                0 if int(text) > 0 else len(paths) - 1)
        if text.isdigit():
            return self.find(int(text), current)
        low = text.lower()
        for i, p in enumerate(paths):
            if p.stem.lower() == low or str(p) == text:
                return i
        for i, p in enumerate(paths):  # the name inside the file, when it differs from the file's
            try:
                if load_patch(p).name.lower() == low:
                    return i
            except UserError:
                continue
        names = ", ".join(p.stem for p in paths[:12]) + (" ..." if len(paths) > 12 else "")
        raise UserError(f"no patch named '{text}' (have: {names})")


def patch_mapping(patch: Patch) -> Mapping | None:
    """The control tables a patch carries, as one Mapping (None without any).

    mapping = "name" or ["a", "b"]: mapping files (bare names from mappings/, paths relative to the
    patch); [[binding]] as in a mapping file; [[modulator]]: an LFO, or an envelope with
    type = "envelope", with the keys of a mapping file's [[lfo]] / [[envelope]].
    """
    extra = patch.extra
    if not extra:
        return None
    where = str(patch.path or patch.name)
    parts: list[Mapping] = []
    names = extra.get("mapping", [])
    for name in [names] if isinstance(names, str) else names:
        if not isinstance(name, str):
            raise MappingError(f"mapping = {name!r}: give mapping file names", path=where)
        p = Path(name)
        if patch.path is not None and not p.is_absolute() and (Path(patch.path).parent / p).exists():
            p = Path(patch.path).parent / p
        parts.append(Mapping.load(p))
    doc: dict = {}
    if "binding" in extra:
        doc["binding"] = extra["binding"]
    for i, m in enumerate(_tables(extra.get("modulator", []))):
        m = dict(m)
        kind = m.pop("type", "lfo")
        if kind not in ("lfo", "envelope"):
            raise MappingError(f"modulator {i + 1}: type = {kind!r}: use \"lfo\" or \"envelope\"", path=where)
        doc.setdefault(kind, []).append(m)
    if doc:
        try:
            parts.append(Mapping.loads(tomli_w.dumps(doc), path=f"{where} (control tables)"))
        except (TypeError, ValueError) as e:
            raise MappingError(str(e), path=where) from None
    return merge_mappings(parts, name=patch.name)


def _tables(v) -> list:
    return [v] if isinstance(v, dict) else list(v) if isinstance(v, list) else []


def merge_mappings(mappings: list[Mapping], name: str = "") -> Mapping:
    """Several mappings played at once (later ones add bindings; a modulator name plays once)."""
    out = Mapping(name=name or "+".join(m.name for m in mappings if m.name))
    names: set[str] = set()
    for m in mappings:
        out.bindings.extend(m.bindings)
        for spec in m.lfos:
            if spec.name not in names:
                names.add(spec.name)
                out.lfos.append(spec)
        for spec in m.envelopes:
            if spec.name not in names:
                names.add(spec.name)
                out.envelopes.append(spec)
        out.smooth.update(m.smooth)
        out.program_change = out.program_change and m.program_change
    return out


class LiveShow:
    """The Show of `instrument play`: engine, stream, router and presenter behind one protocol."""

    def __init__(self, engine, stream, *, patches: PatchList, save_dir: str | Path, hud=None,
                 mappings: list[Mapping] = (), log=None, patch: Patch | None = None, index: int = -1):
        self.engine = engine
        self.params = engine.params
        self.stream = stream
        self.patches = patches
        self.save_dir = Path(save_dir)
        self.hud = hud
        self.router = None  # set by the caller once the Router exists (it needs the show)
        self.presenter = None  # set by the present loop
        self._present_thread: threading.Thread | None = None
        self.base_mappings = list(mappings)
        self.learned: list = []  # MIDI-learned bindings survive patch switches
        self.log = log or (lambda line: print(f"instrument: {line}", file=sys.stderr, flush=True))
        self.patch = patch
        self.index = index  # position of the playing patch in the list (-1: none)
        self._wanted = index  # where +1 / -1 count from: the last requested switch
        self.morph: Morph | None = None
        self._lock = threading.Lock()  # render-side changes vs. saves and the morph tick
        self._pending: dict[str, tuple] = {}  # key -> request; a newer request of a kind wins
        self._pending_lock = threading.Lock()  # held for a dict operation only: control never waits
        self._main: list = []  # calls for the present loop (freeze)
        self._main_lock = threading.Lock()
        self.changes: Counter = Counter()  # parameter changes by source
        self.applied: Counter = Counter()  # show actions applied (prompt, patch, morph, save, panic)
        self.warnings = 0
        self.probe = None  # the armed cross-attention probe of the probe view (A), if any
        self.probe_word = 0  # which word of prompt A it shows
        self._probes: dict = {}
        self.params.on_change(self._count)

    def _count(self, name: str, value: float, source: str) -> None:
        self.changes[source or "patch"] += 1

    # -- the Show protocol (control threads) ----------------------------------------------------
    def set_prompt(self, text: str, slot: int = 0) -> None:
        text = " ".join(str(text).split())
        if not text:
            self.warn("empty prompt ignored")
            return
        if slot not in (0, 1):
            self.warn(f"prompt slot {slot!r}: use 0 (A) or 1 (B)")
            return
        self._queue(f"prompt{slot}", ("prompt", text, slot))

    def switch_patch(self, which) -> None:
        try:
            i = self.patches.find(which, self._wanted)
            path = self.patches.paths()[i]
            patch = load_patch(path, self.engine.dims)
        except UserError as e:  # PatchError included: the message names the line and the fix
            self.warn(f"patch refused: {e}; still playing '{self.patch_name}'")
            return
        self._wanted = i
        self._queue("patch", ("patch", patch, i))

    def morph_to(self, which) -> None:
        """Arm a morph from what plays now (patch/morph 0) to another patch (patch/morph 1)."""
        try:
            i = self.patches.find(which, self._wanted)
            target = load_patch(self.patches.paths()[i], self.engine.dims)
        except UserError as e:
            self.warn(f"morph refused: {e}")
            return
        self._wanted = i
        self._queue("patch", ("morph", target, i))

    def save_patch(self, path: str | None = None) -> str:
        # Values sent just before the save are written by the next present tick: save after it.
        if self.presenter is None or threading.current_thread() is self._present_thread:
            return self._save(path)
        done, claim = threading.Event(), threading.Lock()
        result: list[str] = []

        def job():
            if claim.acquire(blocking=False):  # whoever claims it saves: never two files
                result.append(self._save(path))
                done.set()

        self._call_main(job)
        if done.wait(0.5):
            return result[0]
        if claim.acquire(blocking=False):  # the present loop is stalled: save from here
            return self._save(path)
        done.wait()  # the present loop took it meanwhile and is writing now
        return result[0]

    def _save(self, path: str | None) -> str:
        folder, name = self.save_dir, None
        if path:
            p = Path(str(path))
            if p.suffix == ".toml" or len(p.parts) > 1:
                folder, name = (p.parent if p.suffix == ".toml" else p), (p.stem if p.suffix == ".toml" else None)
            else:
                name = str(path)
        try:
            with self._lock:
                state = current_patch(self.engine, self.stream, name or self.patch_name or "untitled")
            where = save_patch_file(state, folder)
        except (OSError, ValueError, TypeError) as e:
            self.warn(f"cannot save the patch: {e}")
            return ""
        self.patches.add(where)
        self.applied["save"] += 1
        self.log(f"saved patch '{state.name}' to {where}")
        return str(where)

    def freeze(self, on: bool | None = None) -> None:
        def do():
            if self.presenter is not None:
                state = self.presenter.freeze(on)
                self.log("frozen" if state else "unfrozen")
        self._call_main(do)

    def panic(self) -> None:
        """Every bend's mix to 0 now, straight into the parameters (no smoothing delays it)."""
        now = time.monotonic()
        n = 0
        for name in list(self.params.values("bend/")):
            if name.endswith("/mix"):
                try:
                    self.params.set(name, 0.0, arrived=now, source="panic")
                    n += 1
                except ParamError:
                    pass
        # an LFO or envelope on a mix would bring the bend straight back
        router = self.router
        if router is not None:
            for spec in [*router.mapping.lfos, *router.mapping.envelopes]:
                target = resolve_name(spec.target, self.params)
                if target is not None and target.startswith("bend/") and target.endswith("/mix"):
                    try:
                        self.params.set(f"mod/{spec.name}/depth", 0.0, arrived=now, source="panic")
                    except ParamError:
                        pass
        self.applied["panic"] += 1
        self.warn(f"PANIC: {n} bend mixes to 0")

    def learn(self, param: str | None) -> None:
        if self.router is None:
            return
        try:
            self.router.learn(param)
        except ParamError as e:
            self.warn(f"learn: {e}")

    def warn(self, message: str) -> None:
        self.warnings += 1
        new = self.hud.warn(message) if self.hud is not None else True
        if new:
            self.log(str(message))

    # -- the probe view ---------------------------------------------------------------------------
    def set_probe_view(self, on: bool, word: int | None = None) -> None:
        """Show (or hide) a word's cross-attention map over the picture; armed between chunks."""
        self._queue("probe", ("probe", bool(on), self.probe_word if word is None else int(word)))

    def _apply_probe(self, on: bool, word: int) -> None:
        from ..bends.probe import Probe

        words = [w for w, _ in self.stream.prompt.words]
        self.probe_word = word % len(words) if words else 0
        if not on or not words:
            self.probe = None
            self.engine.set_probes([])
            return
        word = words[self.probe_word]
        if word not in self._probes:  # one probe per word: on the GPU, showing it again replays its graph
            self._probes[word] = Probe("cross.map", self.engine.dims, self.engine.device, tokens=word)
        self.probe = self._probes[word]
        self.probe.result()  # start from an empty summary
        self.engine.set_probes([self.probe])
        self.warn(f"probe view: cross-attention of '{words[self.probe_word]}'")

    def probe_map(self):
        """The probe view's map [H, W] in 0..1 after a chunk (render thread), or None when off."""
        if self.probe is None:
            return None
        m = self.probe.result().mean(dim=0)
        return m / m.max().clamp_min(1e-12)

    # -- more control: OSC addresses and keys the Show protocol has no method for -------------
    def handle_event(self, event) -> bool:
        """OSC /patch/morph/to <index>, /patch/morph/next, /patch/morph/prev, /probe 0|1, /probe/word N;
        keys M, 1-9, 0, '.' (next word in the probe view)."""
        if event.source == "osc":
            addr = event.address
            if addr in ("/probe", "/probe/word"):
                if not math.isfinite(event.value):
                    return False
                if addr == "/probe":
                    self.set_probe_view(event.value >= 0.5)
                else:
                    self.set_probe_view(True, int(event.value))
                return True
            if addr == "/patch/morph/to":
                if not math.isfinite(event.value):
                    return False
                self.morph_to(int(event.value))
                return True
            if addr in ("/patch/morph/next", "/patch/morph/prev"):
                self.morph_to("+1" if addr.endswith("next") else "-1")
                return True
            if addr == "/" + MORPH:
                self.warn("no morph armed: send /patch/morph/to <index> (or press M) first")
                return True
            return False
        if event.source == "key":
            key = event.address.lstrip("_")
            if key == "M":
                self.morph_to("+1")
                return True
            if key == "PERIOD" and self.probe is not None:
                self.set_probe_view(True, self.probe_word + 1)
                return True
            if key.isdigit():  # 1-9 the first nine patches, 0 the tenth
                self.switch_patch((int(key) - 1) % 10)
                return True
        return False

    def on_learned(self, binding) -> None:
        self.learned.append(binding)

    # -- the render thread, between chunks ------------------------------------------------------
    def _queue(self, key: str, request: tuple) -> None:
        with self._pending_lock:
            self._pending.pop(key, None)
            self._pending[key] = request

    @property
    def patch_name(self) -> str:
        return self.patch.name if self.patch is not None else ""

    def apply_pending(self) -> None:
        """Apply queued prompts, switches and morphs (call on the render thread between chunks)."""
        with self._pending_lock:
            requests = list(self._pending.values())
            self._pending.clear()
        if not requests:
            return
        with self._lock:
            for req in requests:
                try:
                    if req[0] == "prompt":
                        self._apply_prompt(req[1], req[2])
                    elif req[0] == "patch":
                        self._apply_patch(req[1], req[2])
                    elif req[0] == "morph":
                        self._apply_morph(req[1], req[2])
                    elif req[0] == "probe":
                        self._apply_probe(req[1], req[2])
                except UserError as e:
                    self.warn(f"{req[0]} refused: {e}; still playing '{self.patch_name}'")
                    self._wanted = self.index

    def _apply_prompt(self, text: str, slot: int) -> None:
        self.stream.set_prompt(text, slot)
        self.applied["prompt"] += 1
        self.log(f"prompt {'AB'[slot]}: {text}")

    def _end_morph(self) -> None:
        self.morph = None
        self.params.remove_prefix(MORPH)

    def _apply_patch(self, patch: Patch, index: int) -> None:
        took = self._arm(lambda: apply_patch(self.engine, patch), patch)
        self._end_morph()
        self._take_stage(patch, index)
        if patch.seed is not None and patch.seed != self.stream.seed:
            self.stream.reset(patch.seed)
        self.applied["patch"] += 1
        self._announce(f"patch '{patch.name}'", index, len(patch.bends), took)

    def _apply_morph(self, target: Patch, index: int) -> None:
        here = current_patch(self.engine, self.stream, self.patch_name or "here")
        holder = {}
        took = self._arm(lambda: holder.setdefault("m", morph(self.engine, here, target)), target)
        m = holder["m"]
        if m.prompts is not None:
            self.stream.set_prompt(m.prompts[0], 0)
            self.stream.set_prompt(m.prompts[1], 1)
        self.morph = m
        self.patch, self.index = m.union, index
        self.applied["morph"] += 1
        self._announce(f"morph '{here.name}' > '{target.name}' (patch/morph 0..1)", index,
                       len(m.union.bends), took)

    def _arm(self, arm, patch: Patch) -> float:
        """Arm bends; a patch whose bends do not build is refused whole (the old ones stay)."""
        control = None
        try:
            control = patch_mapping(patch)
        except (MappingError, UserError, OSError) as e:
            self.warn(f"patch '{patch.name}': control tables ignored: {e}")
        t0 = time.perf_counter()
        arm()
        took = time.perf_counter() - t0
        self.load_control(control)
        for name, v in patch.params.items():  # modulator settings exist only once loaded
            if name.startswith("mod/"):
                try:
                    self.params.set(name, v)
                except (ParamError, TypeError) as e:
                    self.warn(f"patch '{patch.name}': {e}")
        return took

    def _take_stage(self, patch: Patch, index: int) -> None:
        if patch.prompt is not None and patch.prompt != self.stream.prompt.text:
            self.stream.set_prompt(patch.prompt, 0)
        if patch.prompt_b is not None:
            self.stream.set_prompt(patch.prompt_b, 1)
        self.patch = patch
        self.index = self._wanted = index

    def _announce(self, what: str, index: int, bends: int, took: float) -> None:
        n = len(self.patches.paths())
        pos = f" ({index + 1}/{n})" if index >= 0 else ""
        self.warn(f"{what}{pos}: {bends} bends armed in {took * 1000:.0f} ms")

    def load_control(self, patch_control: Mapping | None) -> None:
        """Play the --mapping files, the patch's own control tables and the learned bindings."""
        if self.router is None:
            return
        merged = merge_mappings([*self.base_mappings, *([patch_control] if patch_control else [])])
        merged.bindings.extend(copy.copy(self.learned))
        self.router.load(merged)

    # -- the present loop ---------------------------------------------------------------------
    def _call_main(self, fn) -> None:
        with self._main_lock:
            self._main.append(fn)

    def tick(self, now: float) -> None:
        """Once per present tick: router (smoothing, modulators), the morph, queued calls."""
        self._present_thread = threading.current_thread()
        if self.router is not None:
            self.router.tick(now)
        m = self.morph
        if m is not None and self._lock.acquire(blocking=False):  # never wait on a prompt encode
            try:
                if self.morph is m and not m.tick():
                    self.morph = None
            finally:
                self._lock.release()
        with self._main_lock:
            calls, self._main = self._main, []
        for fn in calls:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a request must not stop the show
                self.warn(f"{type(e).__name__}: {e}")
