"""The stage window in a real GL context under Xvfb, and the HUD's text."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import need_tool, xvfb_display

from instrument.params import ParamSpace, ParamSpec
from instrument.stage.hud import Hud
from instrument.stage.window import fit_rect


# -- HUD text (no display) -----------------------------------------------------------------
class FakeClock:
    def __init__(self, t: float = 50.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_hud_text_from_stats():
    hud = Hud(clock=FakeClock())
    text = hud.text({"gen_fps": 17.23, "chunk_ms": 690.4, "shown_fps": 16.0, "queue": 12,
                     "queue_capacity": 24, "underruns": 3, "latency_p50_ms": 412.2,
                     "latency_p95_ms": 760.9, "patch": "melt-01", "frozen": True,
                     "recording": 75.5, "rec_dropped": 2, "learn": "bend/melt/mix"})
    lines = text.splitlines()
    assert lines[0] == "gen 17.2 fps  chunk 690 ms  shown 16.0 fps  queue 12/24  underruns 3"
    assert lines[1] == "knob->photon p50 412 ms  p95 761 ms"
    assert lines[2] == ("patch melt-01  FROZEN  REC 01:15 (2 dropped)  "
                        "LEARN bend/melt/mix: move a control")
    # unknown / missing values are left out rather than shown as garbage
    assert Hud(clock=FakeClock()).text({"gen_fps": None, "queue": 3}) == "queue 3"
    assert Hud(clock=FakeClock()).text({}) == ""


def test_hud_recent_moves_from_param_space():
    clock = FakeClock()
    params = ParamSpace()
    for i in range(8):
        params.declare(ParamSpec(f"bend/b{i}/mix", 0.0, 1.0, 0.0))
    hud = Hud(params, clock=clock, recent=3, move_ttl=5.0)
    params.set("bend/b0/mix", 0.25, source="midi")
    clock.t += 1
    params.set("bend/b1/mix", 0.5, source="osc")
    params.set("bend/b0/mix", 0.75, source="midi")  # moves b0 back to the top, no duplicate
    assert hud.last_moved() == "bend/b0/mix"
    assert hud.text().splitlines() == ["bend/b0/mix = 0.75  [midi]", "bend/b1/mix = 0.5  [osc]"]
    for i in range(2, 6):
        params.set(f"bend/b{i}/mix", 1.0)
    assert [m.name for m in hud.recent_moves()] == ["bend/b5/mix", "bend/b4/mix", "bend/b3/mix"]
    clock.t += 6
    assert hud.recent_moves() == []  # old moves fade from the HUD
    assert hud.last_moved() == "bend/b5/mix"  # but L still knows what was touched last


def test_hud_warnings_are_rate_limited_and_expire():
    clock = FakeClock()
    hud = Hud(clock=clock, warn_ttl=4.0, max_warnings=2)
    assert hud.warn("NaN in frames: chunk skipped")
    for _ in range(9):
        clock.t += 0.5
        assert not hud.warn("NaN in frames: chunk skipped")
    assert hud.warnings() == ["NaN in frames: chunk skipped (x10)"]
    assert hud.warn("MIDI port 'nanoKONTROL2' lost", key="midi-lost")
    assert hud.warn("3 OSC messages dropped")
    assert len(hud.warnings()) == 2  # oldest pushed out
    assert hud.warnings()[0] == "3 OSC messages dropped"
    assert hud.text().splitlines()[-1] == "! MIDI port 'nanoKONTROL2' lost"
    clock.t += 4.5
    assert hud.warnings() == []
    assert hud.warn("NaN in frames: chunk skipped")  # a new episode is a new line


def test_fit_rect_letterbox_and_pillarbox():
    assert fit_rect(832, 480, 832, 480) == (0, 0, 832, 480)
    assert fit_rect(832, 480, 1280, 720) == (16, 0, 1248, 720)  # pillarbox
    assert fit_rect(832, 480, 640, 640) == (0, 135, 640, 369)  # letterbox
    assert fit_rect(480, 832, 1920, 1080) == (648, 0, 623, 1080)  # portrait video


# -- a real window under Xvfb --------------------------------------------------------------
@pytest.fixture(scope="module")
def xdisplay():
    with xvfb_display() as display:
        old = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = display
        from instrument.stage import window as stage_window
        stage_window.configure(headless=False)
        yield display
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old


class RecordingShow:
    """A Show that records what the keys asked of it (the real one is `instrument play`)."""

    def __init__(self, fail_on: str | None = None):
        self.params = ParamSpace()
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if name == self.fail_on:
            raise RuntimeError(f"{name} broke")

    def set_prompt(self, text, slot=0):
        self._call("set_prompt", text, slot)

    def switch_patch(self, which):
        self._call("switch_patch", which)

    def save_patch(self, path=None):
        self._call("save_patch", path)
        return "patches/saved-1.toml"

    def freeze(self, on=None):
        self._call("freeze", on)

    def panic(self):
        self._call("panic")

    def learn(self, param):
        self._call("learn", param)

    def warn(self, message):
        self.calls.append(("warn", message))


def quadrant_frame(h: int = 480, w: int = 832) -> np.ndarray:
    """Red top-left, green top-right, white bottom-left, blue bottom-right."""
    f = np.empty((h, w, 3), np.uint8)
    f[: h // 2, : w // 2] = (255, 0, 0)
    f[: h // 2, w // 2:] = (0, 255, 0)
    f[h // 2:, : w // 2] = (255, 255, 255)
    f[h // 2:, w // 2:] = (0, 0, 255)
    return f


def rect_rows_cols(stage):
    """The video rect in read_pixels() coordinates (row 0 = top): (top, bottom, left, right)."""
    x, y, w, h = stage.video_rect()
    fb_h = stage.window.get_framebuffer_size()[1]
    return fb_h - (y + h), fb_h - y, x, x + w


def region_mean(img, top, bottom, left, right, frac=0.25):
    """Mean colour of the central part of a region (away from filtered edges)."""
    dh, dw = int((bottom - top) * frac), int((right - left) * frac)
    return img[top + dh:bottom - dh, left + dw:right - dw].reshape(-1, 3).mean(0)


@pytest.fixture
def stage(xdisplay):
    from instrument.stage.window import StageWindow
    show = RecordingShow()
    touched = []
    s = StageWindow(show, fullscreen=False, size=(832, 480), vsync=False,
                    learn_target=lambda: touched[-1] if touched else None)
    s.touched = touched
    s.pump()
    yield s
    s.close()


def settle(stage, size=None):
    """Let a resize land: X events in, then one swap (Mesa resizes its buffers on a swap)."""
    for _ in range(50):
        stage.step()
        if size is None or stage.window.get_framebuffer_size() == size:
            break
        time.sleep(0.02)
    stage.step()


def test_frame_pixels_exact_at_native_size(stage):
    rng = np.random.default_rng()
    # a smooth random field: exact 1:1 texels, so the read-back must equal what was sent
    frame = rng.integers(0, 256, (480, 832, 3), dtype=np.uint8)
    frame[:40, :40] = (255, 0, 0)  # red top-left
    frame[-40:, -40:] = (0, 0, 255)  # blue bottom-right
    stage.set_frame(frame)
    stage.draw()
    out = stage.read_pixels()
    assert stage.video_rect() == (0, 0, 832, 480)
    assert out.shape == frame.shape
    assert np.abs(out.astype(int) - frame.astype(int)).max() <= 1
    assert tuple(out[5, 5]) == (255, 0, 0) and tuple(out[-5, -5]) == (0, 0, 255)


def test_torch_frames_and_texture_reused(stage):
    frame = torch.from_numpy(quadrant_frame())
    stage.step(frame)
    tex = stage._frame_tex.id
    stage.step(frame.flip(0).contiguous())
    assert stage._frame_tex.id == tex and stage.frame_size == (832, 480)
    stage.draw()
    out = stage.read_pixels()
    assert tuple(out[10, 10]) == (255, 255, 255)  # flipped: white now top-left
    with pytest.raises(ValueError):
        stage.set_frame(np.zeros((4, 4), np.uint8))


def test_letterbox_bars_black_after_resize(stage):
    stage.window.set_size(640, 640)
    settle(stage, (640, 640))
    stage.set_frame(quadrant_frame())
    stage.draw()
    out = stage.read_pixels()
    assert out.shape == (640, 640, 3)
    top, bottom, left, right = rect_rows_cols(stage)
    assert (top, bottom, left, right) == (136, 505, 0, 640)
    assert out[:top].max() == 0 and out[bottom:].max() == 0, "letterbox bars not black"
    mid_r, mid_c = (top + bottom) // 2, (left + right) // 2
    np.testing.assert_allclose(region_mean(out, top, mid_r, left, mid_c), (255, 0, 0), atol=2)
    np.testing.assert_allclose(region_mean(out, top, mid_r, mid_c, right), (0, 255, 0), atol=2)
    np.testing.assert_allclose(region_mean(out, mid_r, bottom, left, mid_c), (255, 255, 255), atol=2)
    np.testing.assert_allclose(region_mean(out, mid_r, bottom, mid_c, right), (0, 0, 255), atol=2)


def test_fullscreen_key_pillarboxes_and_back(stage):
    from pyglet.window import key
    stage.set_frame(quadrant_frame())
    stage.window.dispatch_event("on_key_press", key.F, 0)
    settle(stage, (1280, 720))
    assert stage.window.fullscreen
    stage.draw()
    out = stage.read_pixels()
    assert out.shape == (720, 1280, 3)
    assert stage.video_rect() == (16, 0, 1248, 720)
    assert out[:, :16].max() == 0 and out[:, 1264:].max() == 0, "pillarbox bars not black"
    np.testing.assert_allclose(region_mean(out, 0, 360, 16, 640), (255, 0, 0), atol=2)
    np.testing.assert_allclose(region_mean(out, 360, 720, 640, 1264), (0, 0, 255), atol=2)
    stage.window.dispatch_event("on_key_press", key.F, 0)
    settle(stage, (832, 480))
    assert not stage.window.fullscreen


def test_keys_reach_the_show(stage):
    from pyglet.window import key
    show = stage.show
    recorded = []
    stage.on_record = lambda: recorded.append(True)
    probes = []
    stage.on_probe = probes.append
    events = []
    stage.on_key = events.append

    def press(symbol):
        stage.window.dispatch_event("on_key_press", symbol, 0)
        stage.pump()  # a window queues events until its loop dispatches them

    press(key.SPACE)
    press(key.LEFT)
    press(key.RIGHT)
    press(key.P)
    press(key.S)
    press(key.L)  # nothing touched yet: a hint, not a crash
    stage.touched.append("bend/melt/mix")
    press(key.L)
    assert show.calls[:5] == [("freeze", None), ("switch_patch", "-1"), ("switch_patch", "+1"),
                              ("panic",), ("save_patch", None)]
    assert show.calls[5] == ("warn", "saved patches/saved-1.toml")
    assert show.calls[6][0] == "warn" and "press L" in show.calls[6][1]
    assert show.calls[7] == ("learn", "bend/melt/mix")
    press(key.R)
    assert recorded == [True]
    press(key.A)
    press(key.A)
    assert probes == [True, False]
    assert stage.hud_visible
    press(key.H)
    assert not stage.hud_visible
    press(key.Q)  # unmapped keys go to the control layer as key events
    assert len(events) == 1 and events[0].source == "key" and events[0].address == "Q"
    assert stage.running
    press(key.ESCAPE)
    assert not stage.running and stage.window is not None  # quit asked; the caller closes
    assert not stage.step()


def test_key_failures_become_warnings(stage):
    from pyglet.window import key
    stage.show.fail_on = "panic"
    stage.window.dispatch_event("on_key_press", key.P, 0)
    stage.pump()
    assert stage.show.calls[-1] == ("warn", "RuntimeError: panic broke")
    assert stage.running


def test_window_close_button_requests_quit(stage):
    stage.window.dispatch_event("on_close")
    stage.pump()
    assert stage.quit_requested


def test_probe_overlay_scaled_to_video_rect(stage):
    stage.window.set_size(640, 640)
    settle(stage, (640, 640))
    grey = np.full((480, 832, 3), 100, np.uint8)
    stage.set_frame(grey)
    probe = np.zeros((30, 52), np.float32)
    probe[:, :26] = 1.0  # left half of the video hot
    probe[0, 0] = np.nan  # a NaN must not poison the overlay
    stage.set_probe(torch.from_numpy(probe))
    stage.draw()
    before = stage.read_pixels()
    stage.window.dispatch_event("on_key_press", __import__("pyglet").window.key.A, 0)
    stage.pump()
    stage.draw()
    out = stage.read_pixels()
    top, bottom, left, right = rect_rows_cols(stage)
    mid = (left + right) // 2
    assert np.array_equal(before[top:bottom, left:right], grey[:1].repeat(bottom - top, 0)[:, :right - left])
    hot = region_mean(out, top, bottom, left, mid)
    cold = region_mean(out, top, bottom, mid, right)
    np.testing.assert_allclose(cold, (100, 100, 100), atol=1)  # value 0: fully transparent
    # value 1: white heat at 60 % over grey 100 -> 0.6 * 255 + 0.4 * 100 = 193
    np.testing.assert_allclose(hot, (193, 193, 193), atol=2)
    assert out[:top].max() == 0 and out[bottom:].max() == 0, "probe drawn over the bars"
    stage.set_probe(None)
    stage.draw()
    assert np.array_equal(stage.read_pixels()[top:bottom], before[top:bottom])


def test_hud_drawn_and_hidden(stage):
    from pyglet.window import key
    stage.set_frame(np.zeros((480, 832, 3), np.uint8))
    stage.set_hud("gen 17.2 fps  shown 16.0 fps\nknob->photon p50 412 ms")
    stage.draw()
    out = stage.read_pixels()
    corner = out[:60, :300]
    assert corner.max() > 200, "no HUD text in the top-left corner"
    assert out[200:, :].max() == 0
    stage.window.dispatch_event("on_key_press", key.H, 0)
    stage.pump()
    stage.draw()
    assert stage.read_pixels().max() == 0


def test_real_x_key_presses_reach_the_show(stage):
    """Keys typed on the X server (XTEST via xdotool), through pyglet's own event loop."""
    need_tool("xdotool")  # Debian xdotool
    settle(stage)
    wid = str(stage.window._window)  # the X window id
    subprocess.run(["xdotool", "windowfocus", "--sync", wid], check=True, timeout=10)
    subprocess.run(["xdotool", "key", "--clearmodifiers", "space", "Left", "p", "Escape"],
                   check=True, timeout=10)
    deadline = time.monotonic() + 5
    while stage.pump() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stage.show.calls == [("freeze", None), ("switch_patch", "-1"), ("panic",)]
    assert stage.quit_requested


def test_headless_egl_without_a_display():
    """No X server at all: pyglet's headless EGL backend still draws and reads back."""
    import ctypes.util
    import sys
    if ctypes.util.find_library("EGL") is None and os.environ.get("CI") != "true":
        pytest.skip("no libEGL")
    script = (
        "import numpy as np\n"
        "from instrument.stage import window as w\n"
        "assert w.configure() is True\n"
        "s = w.StageWindow(fullscreen=False, size=(416, 240), vsync=False)\n"
        "f = np.zeros((480, 832, 3), np.uint8); f[:240] = (255, 0, 0); f[240:] = (0, 0, 255)\n"
        "s.set_frame(f); s.draw(); o = s.read_pixels(); s.close()\n"
        "print(*o.shape, *o[10, 10].tolist(), *o[230, 400].tolist())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    # red top, blue bottom: orientation holds on EGL too
    assert out.stdout.split() == "240 416 3 255 0 0 0 0 255".split()
