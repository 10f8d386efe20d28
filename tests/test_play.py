"""`instrument play` as a performer meets it: the real command, real OSC over UDP, real files.

Each test starts the command in a subprocess on the embedded default model (CPU, 64x64), plays
it over OSC (python-osc, and liblo's oscsend as an independent client) or with keys in a real
window under Xvfb, and reads what happened from its log, its JSON summary and its recording.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import need_tool, xvfb_display
from pythonosc.udp_client import SimpleUDPClient

from instrument.bends.patch import load_patch

ONE = """
name = "one"
prompt = "a red circle moving over a blue background"
seed = 1

[[bend]]
name = "a"
op = "ffn.gain"
gain = 2.0
mix = 0.5
"""

TWO = """
name = "two"
prompt = "two green squares spinning"
seed = 2

[[bend]]
name = "a"
op = "ffn.gain"
gain = -1.0
mix = 0.8

[[bend]]
name = "b"
op = "self.temperature"
layers = "1-2"
temperature = 2.0
mix = 1.0
"""

BROKEN = """
name = "broken"
[[bend]]
name = "x"
op = "ffn.gian"
"""


@pytest.fixture
def patch_dir(tmp_path):
    d = tmp_path / "patches"
    d.mkdir()
    (d / "one.toml").write_text(ONE)
    (d / "two.toml").write_text(TWO)
    (d / "zz-broken.toml").write_text(BROKEN)  # sorted last: never the starting patch
    return d


class Played:
    """A running `instrument play` whose stderr is read line by line as it comes."""

    def __init__(self, args: list[str], env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "instrument.cli", "play", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        pytest.fail(f"no log line matching {pattern!r}; log so far:\n" + "\n".join(self.log))

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return self.proc.returncode, out


def frame_count(path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_play_headless_over_osc(patch_dir, tmp_path):
    need_tool("ffprobe")
    need_tool("oscsend")
    feedback = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    feedback.bind(("127.0.0.1", 0))
    feedback.settimeout(0.2)
    stats, take = tmp_path / "stats.json", tmp_path / "take.mp4"
    play = Played(["--headless", "--duration", "7", "--size", "64x64", "--patches", str(patch_dir),
                   "--osc-port", "0", "--oscquery-port", "0", "--no-midi", "--stats", str(stats),
                   "--record", str(take), "--osc-feedback", f"127.0.0.1:{feedback.getsockname()[1]}",
                   "--warm-up", "on"])  # on a GPU by default; here it must not disturb anything after it
    try:
        port = int(play.wait_for(r"OSC listening on 127\.0\.0\.1:(\d+)")[1])
        play.wait_for(r"playing 64x64 at 16 fps for 7 s \(headless\)")
        osc = SimpleUDPClient("127.0.0.1", port)
        osc.send_message("/prompt/blend", 0.7)
        osc.send_message("/bend/a/mix", 0.3)
        # performers' mistakes: each one line, none of them stops the show
        osc.send_message("/prompt/blend", float("nan"))
        osc.send_message("/no/such/thing", 1.0)
        osc._sock.sendto(b"\x00garbage\xff", ("127.0.0.1", port))
        osc.send_message("/patch", "zz-broken")
        play.wait_for(r"patch refused: .*unknown op 'ffn.gian'.*still playing 'one'")
        # an independent client: liblo's oscsend, with a string argument
        subprocess.run(["oscsend", "127.0.0.1", str(port), "/prompt/b", "s", "two blue stars"], check=True)
        play.wait_for(r"prompt B: two blue stars")
        osc.send_message("/patch/next", [])
        play.wait_for(r"patch 'two' \(2/3\): 2 bends armed")
        osc.send_message("/bend/b/mix", 0.25)
        osc.send_message("/patch/save", "live")
        saved = play.wait_for(r"saved patch 'live' to (.+)$")[1]
        # morph from what plays now back to patch one, all the way
        osc.send_message("/patch/morph/to", 0)
        play.wait_for(r"morph 'two' > 'one' \(patch/morph 0..1\) \(1/4\): 2 bends armed")
        osc.send_message("/patch/morph", 1.0)
        rc, out = play.finish()
    finally:
        if play.proc.poll() is None:
            play.proc.kill()
    got_feedback = []
    try:
        while True:
            got_feedback.append(feedback.recv(65536))
    except TimeoutError:
        pass
    feedback.close()

    assert rc == 0, "\n".join(play.log)
    assert re.search(r"played 7\.\d s: \d+ chunks, generated [\d.]+ fps, shown [\d.]+ fps, latency p50 \d+ ms, "
                     r"p95 \d+ ms", out), out
    s = json.loads(stats.read_text())
    assert s["patch"] == "two > one" and s["seed"] == 2
    assert s["warmup_chunks"] >= 2 and s["warmup_s"] > 0
    assert any(re.search(r"warm in [\d.]+ s; the show plays on from chunk \d+", line) for line in play.log)
    # at patch/morph 1: exactly patch one's bend, two's own bend faded out, prompt B = one's prompt
    assert s["prompts"] == ["two green squares spinning", "a red circle moving over a blue background"]
    assert s["params"]["patch/morph"] == 1.0 and s["params"]["prompt/blend"] == 1.0
    assert (s["params"]["bend/a/mix"], s["params"]["bend/a/gain"], s["params"]["bend/b/mix"]) == (0.5, 2.0, 0.0)
    assert s["changes_by_source"]["osc"] >= 4
    assert s["actions"] == {"prompt": 1, "patch": 1, "save": 1, "morph": 1}
    assert s["chunks"] >= 5 and s["frames_shown"] > 40
    assert 13.0 < s["shown_fps"] <= 16.5
    assert s["latency_p50_ms"] is not None and 0 < s["latency_p50_ms"] < s["latency_p95_ms"] + 1e-9 < 5000
    assert s["warnings"] >= 4  # NaN, unknown address, garbage packet, broken patch
    log = "\n".join(play.log)
    assert "refused non-finite value" in log and "unknown address /no/such/thing" in log
    assert "malformed packet" in log
    # the take holds exactly the frames handed to the encoder, at the playback size
    assert s["recorded_frames"] > 40 and frame_count(take) == s["recorded_frames"]
    # feedback went out to the OSC client: a parameter it set, and the show's status
    assert any(b"/bend/a/mix" in d for d in got_feedback) and any(b"/status/fps" in d for d in got_feedback)
    # the saved patch is the live state of patch two
    live = load_patch(saved)
    assert saved.endswith("patches/live.toml") and live.name == "live"
    assert (live.prompt, live.prompt_b, live.seed) == ("two green squares spinning", "two blue stars", 2)
    assert live.blend == float(np.float32(0.7))  # OSC floats are 32-bit; the NaN after it was refused
    assert [(b["name"], b["op"], b["mix"]) for b in live.bends] == [("a", "ffn.gain", 0.8),
                                                                    ("b", "self.temperature", 0.25)]
    assert live.bends[1]["layers"] == "1-2"


@pytest.fixture(scope="module")
def xdisplay():
    need_tool("xdotool")
    with xvfb_display() as display:
        yield display


def test_play_in_a_window_with_keys(patch_dir, tmp_path, xdisplay):
    env = {**os.environ, "DISPLAY": xdisplay}
    stats = tmp_path / "stats.json"
    play = Played(["--windowed", "--duration", "60", "--size", "64x64", "--patches", str(patch_dir),
                   "--osc-port", "0", "--oscquery-port", "0", "--no-midi", "--stats", str(stats)], env=env)
    try:
        play.wait_for(r"playing 64x64 at 16 fps for 60 s")
        win = subprocess.run(["xdotool", "search", "--sync", "--name", "^instrument$"], env=env,
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", win], env=env, check=True, timeout=10)

        def key(name):
            subprocess.run(["xdotool", "key", "--window", win, name], env=env, check=True, timeout=10)

        key("Right")  # next patch
        play.wait_for(r"patch 'two' \(2/3\)")
        key("p")  # panic: every mix to 0
        play.wait_for(r"PANIC: 2 bend mixes to 0")
        key("space")
        play.wait_for(r"^instrument: frozen$")
        key("space")
        play.wait_for(r"^instrument: unfrozen$")
        key("m")  # morph from here to the next patch: the broken one, refused
        play.wait_for(r"morph refused: .*unknown op 'ffn.gian'")
        key("1")  # the first patch
        play.wait_for(r"patch 'one' \(1/3\)")
        play.proc.send_signal(signal.SIGINT)  # Ctrl-C ends the show with its summary
        rc, out = play.finish()
    finally:
        if play.proc.poll() is None:
            play.proc.kill()
    assert rc == 0, "\n".join(play.log)
    assert out.startswith("played ")
    s = json.loads(stats.read_text())
    assert s["actions"] == {"patch": 2, "panic": 1} and s["patch"] == "one"
    assert s["params"]["bend/a/mix"] == 0.5  # patch one as written: the panic was on patch two
    assert s["frames_shown"] > 0


def test_probe_view_shows_a_words_cross_attention(tmp_path):
    from instrument.control.events import ControlEvent
    from instrument.engine.stream import Engine
    from instrument.stage.live import LiveShow, PatchList

    engine = Engine.load(device="cpu")
    stream = engine.stream("a red fox in the snow", seed=1, size=(64, 64))
    show = LiveShow(engine, stream, patches=PatchList(), save_dir=tmp_path, log=lambda line: None)
    assert show.probe_map() is None
    show.handle_event(ControlEvent("osc", "osc", 2.0, 0.0, address="/probe/word"))  # the third word
    show.apply_pending()
    stream.next()
    m = show.probe_map()
    assert m.shape == (stream.grid.height, stream.grid.width) and float(m.max()) == 1.0 and float(m.min()) >= 0
    assert show.probe.token_w.nonzero().flatten().tolist() == stream.prompt.positions("fox")
    show.handle_event(ControlEvent("osc", "osc", 0.0, 0.0, address="/probe"))
    show.apply_pending()
    assert show.probe_map() is None and not engine.dit.bends.probes
