"""`instrument play`: the live instrument — window (or headless), MIDI, OSC, patches, recording.

Two loops. The render thread generates: it waits for room in the frame queue, applies what
control queued (prompts, patch switches, morphs), reads the knobs through the stream and puts
the chunk. The present loop (main thread, which owns the window) ticks the Router, hands one
frame per 1/fps to the screen and the recorder, and redraws the HUD a few times a second.

Start-up problems (missing file, busy OSC port, no display) stop with one line; anything that
happens on stage afterwards is a warning on the HUD and in the log, and the show goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..progress import Progress
from ..render import add_engine_arguments, engine_from_args, prompt_and_seed

HUD_PERIOD = 0.25  # seconds between HUD redraws: text layout is the expensive part
TICK = 0.01  # longest sleep of the present loop: the Router's smoothers want ~100 ticks a second
RENDER_FAILURES = 5  # consecutive engine errors (bends already disarmed) before the show stops


def configure(p) -> None:
    add_engine_arguments(p)
    # play switches between several patches: --patch takes a list here (render takes one)
    patches = p.add_argument_group("patches", conflict_handler="resolve")
    patches.add_argument("--patch", nargs="+", action="extend", default=[], metavar="FILE",
                   help="patch files to play, in order (the first starts); Left/Right switch")
    patches.add_argument("--patches", metavar="DIR", help="a folder of patches (*.toml) to switch between; "
                   "saved patches go here (default: the first --patch's folder, else ./patches)")
    p.add_argument("--mapping", nargs="+", action="extend", default=[], metavar="FILE",
                   help="mapping files or names from mappings/ (e.g. generic, touchdesigner)")
    p.add_argument("--screen", type=int, default=0, metavar="N", help="screen for the window (instrument devices)")
    p.add_argument("--windowed", action="store_true", help="a window instead of full screen")
    p.add_argument("--fps", type=float, default=16.0, help="playback frames per second (default 16)")
    p.add_argument("--record", metavar="FILE", help="record the shown frames from the start (R toggles)")
    p.add_argument("--headless", action="store_true", help="no window: frames are paced, counted and recorded")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of playing")
    p.add_argument("--stats", metavar="FILE", help="write a JSON summary at the end")
    p.add_argument("--pacing", choices=("latency", "smooth"), default="latency",
                   help="latency (default): start each chunk just in time for the screen, with the freshest "
                        "controls; smooth: keep the queue full (a chunk more of knob-to-photon latency, more "
                        "slack for an uneven machine)")
    p.add_argument("--warm-up", choices=("auto", "on", "off"), default="auto",
                   help="stream until the compiled, graph-captured chunk runs before the show starts, and play on "
                        "from there (auto: when the engine compiles, i.e. on a GPU)")
    p.add_argument("--osc-host", default="127.0.0.1", help="address OSC listens on (0.0.0.0: every network)")
    p.add_argument("--osc-port", type=int, default=9000, help="UDP port for OSC in (default 9000)")
    p.add_argument("--osc-feedback", metavar="HOST:PORT", type=_host_port,
                   help="send parameter values and /status/* here (e.g. TouchDesigner's OSC In)")
    p.add_argument("--oscquery-port", type=int, default=9001, help="TCP port for OSCQuery (0: off)")
    p.add_argument("--no-osc", action="store_true", help="no OSC and no OSCQuery")
    p.add_argument("--midi", nargs="+", action="extend", metavar="PORT",
                   help="MIDI input ports (names or parts of names; default: all)")
    p.add_argument("--no-midi", action="store_true", help="no MIDI input")
    p.add_argument("--midi-api", choices=("alsa", "jack"), default="alsa", help="MIDI system (default alsa)")
    p.add_argument("--midi-virtual", metavar="NAME", help="also create a MIDI input port other software can use")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text}: expected HOST:PORT, e.g. 127.0.0.1:9002")
    return host, int(port)


_ALSA_HANDLER = None


def _quiet_alsa() -> None:
    """Stop libasound printing its own line on every MIDI port scan (once a second) when there is
    no sequencer: MidiInput already says so once, in words a performer can act on."""
    global _ALSA_HANDLER
    if _ALSA_HANDLER is not None:
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("asound")
    if name is None:
        return
    try:
        lib = ctypes.CDLL(name)
        # snd_lib_error_handler_t is variadic; a handler that reads only the fixed arguments is safe
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
        _ALSA_HANDLER = proto(lambda *_: None)  # kept referenced for as long as the process lives
        lib.snd_lib_error_set_handler(_ALSA_HANDLER)
    except (OSError, AttributeError):
        pass


def _check_args(args) -> None:
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise UserError("--duration must be a positive number of seconds")
    if not (math.isfinite(args.fps) and 0 < args.fps <= 240):
        raise UserError("--fps must be between 0 and 240")
    for f in args.patch:
        if not Path(f).is_file():
            raise UserError(f"--patch {f}: no such file")
    if args.patches and not Path(args.patches).is_dir():
        raise UserError(f"--patches {args.patches}: no such folder")
    for port in (args.osc_port, args.oscquery_port):
        if not 0 <= port < 65536:
            raise UserError(f"port {port} is not a port number (0-65535)")
    if args.stats and not Path(args.stats).resolve().parent.is_dir():
        raise UserError(f"--stats {args.stats}: folder does not exist")
    if args.record and not Path(args.record).resolve().parent.is_dir():
        raise UserError(f"--record {args.record}: folder does not exist")


def run(args) -> int:
    _check_args(args)
    _log_errors_only()
    return Play(args).run()


def _log_errors_only() -> None:
    """The control layer's warnings reach the log through show.warn (rate-limited, on the HUD
    too); Python logging keeps only errors with their tracebacks, so nothing is said twice."""
    logger = logging.getLogger("instrument")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("instrument: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.ERROR)


@contextlib.contextmanager
def _ending_on_signals(stop: threading.Event):
    """Ctrl-C and SIGTERM end the show like --duration does: frames flushed, take closed, summary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class Play:
    """One performance: everything `run` sets up, plays and tears down."""

    def __init__(self, args):
        self.args = args
        self.stage = None
        self.osc = self.oscquery = self.midi = self.recorder = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.chunks = 0
        self.frames_generated = 0
        self.compute_s = 0.0
        self.chunk_warnings = 0
        self.first_shown: float | None = None
        self.latest_probe = None
        self.warmup_s: float | None = None  # None: no warm-up before the show
        self.warmup_chunks = 0

    # -- set up ---------------------------------------------------------------------------
    def _open_window(self) -> None:
        from . import window

        window.configure(headless=False)
        try:
            self.stage = window.StageWindow(
                None, screen=self.args.screen, fullscreen=not self.args.windowed,
                size=(1280, 720), vsync=True, on_record=self.toggle_record)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - pyglet raises many kinds for "no display"
            raise UserError(f"cannot open a window ({type(e).__name__}: {e}); "
                            "check DISPLAY, or play with --headless") from None
        self.stage.set_hud("instrument: loading")
        self.stage.step()

    def _loading_line(self, line: str) -> None:
        if self.stage is not None:
            try:
                self.stage.set_hud(line)
                self.stage.step()
            except Exception:  # noqa: BLE001 - the loading screen is a courtesy, not a requirement
                pass

    def _setup(self, progress) -> None:
        from ..bends.patch import apply_patch, load_patch
        from ..control.mapping import Mapping, MappingError, Router
        from .hud import Hud
        from .live import LiveShow, PatchList

        args = self.args
        engine = engine_from_args(argparse.Namespace(**{**vars(args), "patch": None}), progress)
        patches = PatchList(args.patch, args.patches)
        save_dir = Path(args.patches) if args.patches else (
            Path(args.patch[0]).parent if args.patch else Path("patches"))
        first, index = None, -1
        if patches.paths():
            first, index = load_patch(patches.paths()[0], engine.dims), 0
        engine.patch = first
        prompt, seed = prompt_and_seed(args, engine)
        stream = engine.stream(prompt, seed=seed, size=args.size, chunk=args.chunk, sink=args.sink,
                               window=args.window, overlap_decode=args.overlap_decode)
        mappings = []
        for m in args.mapping:
            try:
                mappings.append(Mapping.load(m))
            except MappingError as e:
                raise UserError(str(e)) from None
        hud = Hud(engine.params)
        show = LiveShow(engine, stream, patches=patches, save_dir=save_dir, hud=hud, mappings=mappings)
        router = Router(engine.params, show, warn=show.warn)
        router.on_learn = show.on_learned
        show.router = router
        if first is not None:
            show._arm(lambda: apply_patch(engine, first, progress), first)
            show._take_stage(first, index)
        else:
            show.load_control(None)
        self.engine, self.stream, self.show, self.hud, self.router = engine, stream, show, hud, router
        self._warm_up(progress)

    def _warm_up(self, progress) -> None:
        """Compiling and capturing take tens of seconds on the first chunks; done live, the audience would watch
        a frozen frame. So play streams until the steady chunk replays before the first frame is due, and the show
        plays on from there. It does not start over from frame 0: until the KV cache is full again the passes run
        eager (their shapes change every chunk), and with 1-frame chunks on an H200 that was 2.5 fps slower than
        the screen for the show's first 4 s (36 underruns)."""
        runner = self.engine.runner
        if self.args.warm_up == "off" or (self.args.warm_up == "auto" and not (runner.compile or runner.graphs)):
            return
        progress("warming up: compiling and capturing the steady chunk before the show starts")
        t0 = time.monotonic()
        self.warmup_chunks = self.stream.warm_up(progress)
        self.warmup_s = time.monotonic() - t0
        progress(f"warm in {self.warmup_s:.1f} s; the show plays on from chunk {self.warmup_chunks + 1}")

    def _start_control(self, progress) -> None:
        args, show, router = self.args, self.show, self.router
        if not args.no_osc:
            from ..control.osc import OscServer

            def on_event(ev):
                return router.handle(ev) or show.handle_event(ev)

            self.osc = OscServer(self.engine.params, show, set_value=router.set_target, on_event=on_event,
                                 host=args.osc_host, port=args.osc_port, feedback=args.osc_feedback,
                                 on_tempo=router.set_tempo)
            try:
                self.osc.start()
            except OSError as e:
                raise UserError(f"{e.strerror or e} (choose another --osc-port, or --no-osc)") from None
            host, port = self.osc.address
            progress(f"OSC listening on {host}:{port}" + (
                f", feedback to {args.osc_feedback[0]}:{args.osc_feedback[1]}" if args.osc_feedback else ""))
            if args.oscquery_port:
                from ..control.oscquery import OscQueryServer

                try:
                    self.oscquery = OscQueryServer(self.engine.params, osc_port=port, host=args.osc_host,
                                                   port=args.oscquery_port).start()
                    progress(f"OSCQuery at {self.oscquery.url}")
                except OSError as e:  # the OSC itself works: describe-less is not a reason to stop
                    self.oscquery = None
                    show.warn(f"OSCQuery off: port {args.oscquery_port}: {e.strerror or e}")
        if not args.no_midi:
            from ..control.midi import MidiInput

            os.environ.setdefault("JACK_NO_START_SERVER", "1")  # never launch a JACK server behind the back
            _quiet_alsa()
            ports = None if not args.midi or args.midi == ["all"] else args.midi
            self.midi = MidiInput(router.handle, ports=ports, api=args.midi_api, virtual=args.midi_virtual,
                                  warn=show.warn).start()

    def toggle_record(self) -> None:
        from .recorder import Recorder, RecorderError

        if self.recorder is None:
            path = self.args.record or time.strftime("instrument-%Y%m%d-%H%M%S.mp4")
            s = self.stream.settings
            self.recorder = Recorder(path, s.width, s.height, self.args.fps)
        try:
            on = self.recorder.toggle()
        except RecorderError as e:
            self.show.warn(str(e))
            return
        if on:
            self.show.log(f"recording to {self.recorder.path}")
        else:
            self._report_take()

    def _report_take(self) -> None:
        r = self.recorder
        if r.error:
            self.show.warn(f"recording {r.path}: {r.error}")
        self.show.log(f"recorded {r.written} frames to {r.path}" + (f" ({r.dropped} dropped)" if r.dropped else ""))

    # -- the render thread ----------------------------------------------------------------
    def _render(self, queue, pres) -> None:
        from ..bends.sites import BendSites
        from .pacing import LeadTime

        room = 4 * self.stream.settings.chunk  # frames of a full chunk (the first one is shorter)
        lead = LeadTime(pres.period) if self.args.pacing == "latency" else None
        failures = 0
        while not self.stop.is_set():
            ahead = None if lead is None else lead.seconds()
            if ahead is not None:
                pres.wait_for_lead(ahead, self.stop)
            if not queue.wait_room(room) or self.stop.is_set():
                break
            self.show.apply_pending()
            t0 = time.perf_counter()
            underruns = pres.underruns
            try:
                chunk = self.stream.next()
            except Exception as e:  # noqa: BLE001 - keep playing if at all possible
                failures += 1
                self.show.warn(f"engine error: {type(e).__name__}: {e}")
                if failures == 2 and self.engine.dit.bends.bends:
                    self.engine.set_bends(BendSites((), self.engine.dit.bends.probes))
                    self.show.warn("bends disarmed after repeated engine errors")
                if failures >= RENDER_FAILURES:
                    self.error = e
                    self.stop.set()
                    return
                time.sleep(0.2)
                continue
            failures = 0
            took = time.perf_counter() - t0
            self.compute_s += took
            if lead is not None:
                lead.record(took, underran=pres.underruns > underruns)
            self.chunks += 1
            self.frames_generated += int(chunk.frames.shape[0])
            for w in chunk.warnings:
                self.chunk_warnings += 1
                self.show.warn(w)
            probe = self.show.probe_map()
            if probe is not None:
                self.latest_probe = probe  # the present loop hands it to the window
            if not queue.put_chunk(chunk):
                return

    # -- the present loop -----------------------------------------------------------------
    def run(self) -> int:
        from .pacing import FrameQueue, Presenter, queue_capacity

        args = self.args
        if not args.headless:
            self._open_window()
        progress = Progress(listener=self._loading_line)
        try:
            self._setup(progress)
            self._start_control(progress)
            if self.stage is not None:
                self.stage.show = self.show
                self.stage.on_probe = self.show.set_probe_view
                self.stage.learn_target = self.hud.last_moved
                self.stage.on_key = self.show.handle_event
            if args.record:
                self.toggle_record()
            room = 4 * self.stream.settings.chunk
            queue = FrameQueue(capacity=queue_capacity(room))
            pres = Presenter(queue, args.fps, latency_window=1 << 16)
            self.show.presenter = pres
            s = self.stream.settings
            progress(f"playing {s.width}x{s.height} at {args.fps:g} fps"
                     + (f" for {args.duration:g} s" if args.duration else "") + (" (headless)" if args.headless else ""))
            renderer = threading.Thread(target=self._render, args=(queue, pres), name="render", daemon=True)
            started = time.monotonic()
            renderer.start()
            try:
                with _ending_on_signals(self.stop):
                    self._present(pres, started)
            finally:
                self.stop.set()
                queue.close()
                renderer.join(timeout=60)
            played = time.monotonic() - started
            if self.recorder is not None and self.recorder.recording:
                self.recorder.stop()
                self._report_take()
            self._summary(pres, played)
        finally:
            self._shutdown()
        if self.error is not None:
            print(f"instrument play: stopped after repeated engine errors: {self.error}", file=sys.stderr)
            return 1
        return 0

    def _present(self, pres, started: float) -> None:
        end = started + self.args.duration if self.args.duration else math.inf
        next_hud = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            self.show.tick(now)
            frame = pres.poll(now)
            if frame is not None:
                if self.first_shown is None:
                    self.first_shown = now
                if self.stage is not None:
                    self.stage.set_frame(frame)
                if self.recorder is not None and self.recorder.recording:
                    self.recorder.write(frame)
            probe, self.latest_probe = self.latest_probe, None
            if probe is not None and self.stage is not None:
                self.stage.set_probe(probe)
            if now >= next_hud:
                next_hud = now + HUD_PERIOD
                self._hud(pres, now)
            if self.stage is not None:
                if not self.stage.step():
                    break
            now = time.monotonic()
            due = pres.next_due()
            if due <= now:  # due but nothing came (or no schedule yet): the queue is empty
                due = now + TICK
            delay = min(due, now + TICK, end) - now
            if delay > 0:
                time.sleep(delay)

    def _stats(self, pres, now=None) -> dict:
        stats = pres.stats(now)
        stats["patch"] = self.show.patch_name or None
        r = self.recorder
        if r is not None and r.recording:
            stats["recording"] = r.seconds()
            stats["rec_dropped"] = r.dropped
        if self.router is not None:
            stats["learn"] = self.router.learning
        return stats

    def _hud(self, pres, now: float) -> None:
        stats = self._stats(pres, now)
        if self.stage is not None:
            self.stage.set_hud(self.hud.text(stats))
        if self.osc is not None:
            self.osc.send_status({k: v for k, v in (
                ("fps", stats["shown_fps"]), ("gen_fps", stats["gen_fps"]), ("latency_ms", stats["latency_p50_ms"]),
                ("patch", stats["patch"]), ("frozen", int(stats["frozen"]))) if v is not None})

    # -- the end ----------------------------------------------------------------------------
    def _summary(self, pres, played: float) -> None:
        lat = pres.latency()
        gen = self.frames_generated / self.compute_s if self.compute_s > 0 else None
        # from the first frame on: loading and the first chunk's compute are not playback
        span = time.monotonic() - self.first_shown if self.first_shown is not None else 0.0
        shown = pres.shown / span if span > 0 else 0.0
        show = self.show
        summary = {
            "seconds": round(played, 3),
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 1),
            "warmup_chunks": self.warmup_chunks,
            "chunks": self.chunks,
            "frames_generated": self.frames_generated,
            "frames_shown": pres.shown,
            "generated_fps": gen,
            "shown_fps": shown,
            "underruns": pres.underruns,
            "latency_p50_ms": None if lat is None else lat[0] * 1000.0,
            "latency_p95_ms": None if lat is None else lat[1] * 1000.0,
            "warnings": show.warnings,
            "nan_guard_reports": self.chunk_warnings,
            "controls_applied": sum(n for src, n in show.changes.items() if src not in ("patch", "morph")),
            "changes_by_source": dict(show.changes),
            "actions": dict(show.applied),
            "patch": show.patch_name or None,
            "prompts": [p.text if p is not None else None for p in self.stream.prompts],
            "seed": self.stream.seed,
            "params": self.engine.params.values(),
        }
        if self.recorder is not None:
            summary["recording"] = str(self.recorder.path) if self.recorder.path else None
            summary["recorded_frames"] = self.recorder.written
        self.summary = summary
        lat_text = "no control changes measured" if lat is None else (
            f"latency p50 {lat[0] * 1000:.0f} ms, p95 {lat[1] * 1000:.0f} ms")
        print(f"played {played:.1f} s: {self.chunks} chunks, generated {gen or 0:.1f} fps, shown {shown:.1f} fps, "
              f"{lat_text}, {pres.underruns} underruns, {show.warnings} warnings, "
              f"{summary['controls_applied']} control changes", flush=True)
        if self.args.stats:
            Path(self.args.stats).write_text(json.dumps(summary, indent=2, default=str) + "\n")

    def _shutdown(self) -> None:
        for part in (self.midi, self.osc, self.oscquery):
            if part is None:
                continue
            try:
                (part.close if part is self.midi else part.stop)()
            except Exception as e:  # noqa: BLE001 - finish tearing the rest down
                print(f"instrument: shutdown: {e}", file=sys.stderr)
        if self.recorder is not None and self.recorder.recording:
            self.recorder.stop()
            self._report_take()
        if self.stage is not None:
            self.stage.close()
