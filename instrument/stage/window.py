"""The stage window: frames full screen, letterboxed, with a HUD and a probe heat map on top.

Frames are [H, W, 3] uint8 RGB with row 0 at the top. They go to ONE texture, allocated once
per frame size and refilled with glTexSubImage2D straight from the array (positive pitch, no
copy); the image is flipped by texture coordinates, never by reordering rows in Python (pyglet
does that in Python for negative pitches: ~14 ms per 1080p frame).

The caller owns the loop: `pump()` dispatches window events, `step(frame)` dispatches events,
draws once and swaps; `draw()` + `read_pixels()` read the picture back (tests, screenshots).

Keys (performer):  F fullscreen  H HUD  A probe view  Esc quit  Space freeze  R record
                   Left/Right previous/next patch  L learn  S save patch  P panic
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import pyglet

from ..show import Show

_VERTEX = """#version 330 core
uniform vec4 rect;  // x0, y0, x1, y1 in normalised device coordinates
out vec2 uv;
void main() {
    // a triangle strip over the rect, no vertex buffer: corners (0,0) (1,0) (0,1) (1,1)
    vec2 corner = vec2(float(gl_VertexID & 1), float((gl_VertexID >> 1) & 1));
    uv = vec2(corner.x, 1.0 - corner.y);  // image row 0 is the top of the screen
    gl_Position = vec4(mix(rect.xy, rect.zw, corner), 0.0, 1.0);
}
"""

_VIDEO_FRAGMENT = """#version 330 core
uniform sampler2D image;
in vec2 uv;
out vec4 color;
void main() {
    color = vec4(texture(image, uv).rgb, 1.0);
}
"""

_PROBE_FRAGMENT = """#version 330 core
uniform sampler2D probe;
uniform float opacity;
in vec2 uv;
out vec4 color;
vec3 heat(float x) {  // black -> purple -> red -> yellow -> white
    vec3 c = mix(vec3(0.0), vec3(0.45, 0.0, 0.55), smoothstep(0.0, 0.25, x));
    c = mix(c, vec3(0.9, 0.1, 0.1), smoothstep(0.25, 0.5, x));
    c = mix(c, vec3(1.0, 0.85, 0.0), smoothstep(0.5, 0.8, x));
    return mix(c, vec3(1.0), smoothstep(0.8, 1.0, x));
}
void main() {
    float v = clamp(texture(probe, uv).r, 0.0, 1.0);
    color = vec4(heat(v), opacity * v);
}
"""


def configure(headless: bool | None = None) -> bool:
    """Choose pyglet's backend before the first window; returns whether headless.

    headless None: headless on Linux when there is no X or Wayland display. Headless uses EGL
    (an offscreen surface): the picture is only seen through recording and read-back.
    """
    if headless is None:
        headless = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if "pyglet.window" in sys.modules and bool(pyglet.options["headless"]) != headless:
        raise RuntimeError("pyglet's window backend is already chosen; call configure() first")
    pyglet.options["headless"] = headless
    return headless


def _display():
    mod = getattr(pyglet, "display", None) or pyglet.canvas  # pyglet 2.1 / 2.0
    return mod.get_display()


def fit_rect(frame_w: int, frame_h: int, area_w: int, area_h: int) -> tuple[int, int, int, int]:
    """The largest rect with the frame's aspect centred in the area: (x, y, w, h), GL pixels."""
    if frame_w <= 0 or frame_h <= 0 or area_w <= 0 or area_h <= 0:
        return 0, 0, max(area_w, 0), max(area_h, 0)
    scale = min(area_w / frame_w, area_h / frame_h)
    w = max(1, min(area_w, round(frame_w * scale)))
    h = max(1, min(area_h, round(frame_h * scale)))
    return (area_w - w) // 2, (area_h - h) // 2, w, h


class _Texture:
    """One GL texture refilled in place; reallocated only when the size changes."""

    def __init__(self, internal: int, fmt: int, gltype: int, channels: int):
        gl = pyglet.gl
        tid = gl.GLuint()
        gl.glGenTextures(1, ctypes.byref(tid))
        self.id = tid.value
        self.size: tuple[int, int] | None = None
        self._internal, self._fmt, self._type, self._channels = internal, fmt, gltype, channels
        gl.glBindTexture(gl.GL_TEXTURE_2D, self.id)
        for name, value in ((gl.GL_TEXTURE_MIN_FILTER, gl.GL_LINEAR), (gl.GL_TEXTURE_MAG_FILTER, gl.GL_LINEAR),
                            (gl.GL_TEXTURE_WRAP_S, gl.GL_CLAMP_TO_EDGE), (gl.GL_TEXTURE_WRAP_T, gl.GL_CLAMP_TO_EDGE)):
            gl.glTexParameteri(gl.GL_TEXTURE_2D, name, value)

    def upload(self, array: np.ndarray) -> None:
        gl = pyglet.gl
        h, w = array.shape[:2]
        gl.glActiveTexture(gl.GL_TEXTURE0)
        gl.glBindTexture(gl.GL_TEXTURE_2D, self.id)
        gl.glPixelStorei(gl.GL_UNPACK_ALIGNMENT, 1)  # rows of w*3 bytes are not 4-aligned in general
        if self.size != (w, h):
            gl.glTexImage2D(gl.GL_TEXTURE_2D, 0, self._internal, w, h, 0, self._fmt, self._type, None)
            self.size = (w, h)
        gl.glTexSubImage2D(gl.GL_TEXTURE_2D, 0, 0, 0, w, h, self._fmt, self._type,
                           ctypes.c_void_p(array.ctypes.data))
        gl.glPixelStorei(gl.GL_UNPACK_ALIGNMENT, 4)

    def delete(self) -> None:
        gl = pyglet.gl
        gl.glDeleteTextures(1, ctypes.byref(gl.GLuint(self.id)))


class StageWindow:
    """The performer's window.

    `show` receives the performance keys (Space, Left/Right, S, P, L). Callbacks take the rest:
    on_record() for R, on_probe(visible) for A (so the engine computes probes only when seen),
    on_key(ControlEvent) for keys not mapped here. L calls on_learn() if given, else arms
    show.learn(learn_target()) - pass Hud.last_moved as learn_target for "the last-touched
    parameter". Exceptions from any of them become show.warn lines, never a crash.
    """

    def __init__(self, show: Show | None = None, *, screen: int = 0, fullscreen: bool = True,
                 size: tuple[int, int] = (1280, 720), vsync: bool = True, caption: str = "instrument",
                 on_record: Callable[[], Any] | None = None,
                 on_learn: Callable[[], Any] | None = None,
                 on_probe: Callable[[bool], Any] | None = None,
                 learn_target: Callable[[], str | None] | None = None,
                 on_key: Callable[[Any], Any] | None = None,
                 probe_opacity: float = 0.6):
        self.show = show
        self.on_record = on_record
        self.on_learn = on_learn
        self.on_probe = on_probe
        self.learn_target = learn_target
        self.on_key = on_key
        self.probe_opacity = probe_opacity
        self.hud_visible = True
        self.probe_visible = False
        self.quit_requested = False
        self._closed = False

        screens = _display().get_screens()
        if not 0 <= screen < len(screens):
            from ..errors import UserError
            have = "; ".join(f"{i}: {s.width}x{s.height}" for i, s in enumerate(screens))
            raise UserError(f"no screen {screen} (screens: {have}; see `instrument devices`)")
        self.screen = screens[screen]
        kwargs = dict(screen=self.screen, vsync=vsync, caption=caption, resizable=True)
        if fullscreen:
            self.window = pyglet.window.Window(fullscreen=True, **kwargs)
        else:
            self.window = pyglet.window.Window(int(size[0]), int(size[1]), **kwargs)
        self.window.set_mouse_visible(not fullscreen)
        self.window.push_handlers(on_key_press=self._on_key_press, on_close=self._on_close,
                                  on_resize=self._on_resize)

        gl = pyglet.gl
        from pyglet.graphics.shader import Shader, ShaderProgram
        self.window.switch_to()
        self._video = ShaderProgram(Shader(_VERTEX, "vertex"), Shader(_VIDEO_FRAGMENT, "fragment"))
        self._probe_prog = ShaderProgram(Shader(_VERTEX, "vertex"), Shader(_PROBE_FRAGMENT, "fragment"))
        vao = gl.GLuint()
        gl.glGenVertexArrays(1, ctypes.byref(vao))  # core profile draws need a bound VAO
        self._vao = vao.value
        self._frame_tex = _Texture(gl.GL_RGB8, gl.GL_RGB, gl.GL_UNSIGNED_BYTE, 3)
        self._probe_tex = _Texture(gl.GL_R32F, gl.GL_RED, gl.GL_FLOAT, 1)
        self._pending_frame: np.ndarray | None = None
        self._pending_probe: np.ndarray | None = None
        self._has_frame = False
        self._has_probe = False

        self._batch = pyglet.graphics.Batch()
        self._hud_bg = pyglet.shapes.Rectangle(0, 0, 1, 1, color=(0, 0, 0, 150), batch=self._batch)
        self._hud_label = pyglet.text.Label("", font_name=("DejaVu Sans Mono", "Menlo", "Consolas", "monospace"),
                                            multiline=True, width=10_000, anchor_x="left", anchor_y="top",
                                            color=(255, 255, 255, 255), batch=self._batch)
        self._hud_text = ""
        self._layout_hud()

    # -- content ----------------------------------------------------------------------------
    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(width, height) of the frames shown, once one was shown."""
        return self._frame_tex.size

    def set_frame(self, frame: Any) -> None:
        """The next frame to show ([H, W, 3] uint8 RGB, row 0 = top); uploaded at the next draw."""
        if hasattr(frame, "detach"):
            frame = frame.detach().cpu().numpy()
        frame = np.ascontiguousarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
        self._pending_frame = frame

    def set_probe(self, probe: Any | None) -> None:
        """A [h, w] map in 0..1 (row 0 = top) shown as a heat map over the video; None clears."""
        if probe is None:
            self._pending_probe = None
            self._has_probe = False
            return
        if hasattr(probe, "detach"):
            probe = probe.detach().float().cpu().numpy()
        probe = np.asarray(probe, dtype=np.float32)
        if probe.ndim != 2 or probe.size == 0:
            raise ValueError(f"probe must be a non-empty [h, w] map, got {list(probe.shape)}")
        self._pending_probe = np.ascontiguousarray(np.clip(np.nan_to_num(probe, nan=0.0), 0.0, 1.0))

    def set_hud(self, text: str) -> None:
        if text != self._hud_text:  # re-laying out text is the expensive part of the HUD
            self._hud_text = text
            self._hud_label.text = text
            self._layout_hud()

    # -- loop -------------------------------------------------------------------------------
    def pump(self) -> bool:
        """Dispatch pending window events; False once the window should close."""
        if not self._closed:
            self.window.switch_to()
            self.window.dispatch_events()
        return self.running

    def step(self, frame: Any | None = None) -> bool:
        """Dispatch events, draw once (with `frame` if given) and swap; False once closing."""
        if frame is not None:
            self.set_frame(frame)
        if not self.pump():
            return False
        self.draw()
        self.window.flip()
        return self.running

    @property
    def running(self) -> bool:
        return not (self._closed or self.quit_requested)

    def video_rect(self) -> tuple[int, int, int, int]:
        """Where the video lands in the framebuffer: (x, y, w, h), GL pixels from bottom-left."""
        fb_w, fb_h = self.window.get_framebuffer_size()
        if self._frame_tex.size is None:
            return 0, 0, fb_w, fb_h
        return fit_rect(*self._frame_tex.size, fb_w, fb_h)

    def draw(self) -> None:
        """Render the current picture into the back buffer (no swap)."""
        gl = pyglet.gl
        self.window.switch_to()
        if self._pending_frame is not None:
            self._frame_tex.upload(self._pending_frame)
            self._pending_frame = None
            self._has_frame = True
        if self._pending_probe is not None:
            self._probe_tex.upload(self._pending_probe)
            self._pending_probe = None
            self._has_probe = True
        fb_w, fb_h = self.window.get_framebuffer_size()
        gl.glViewport(0, 0, max(fb_w, 1), max(fb_h, 1))
        gl.glClearColor(0.0, 0.0, 0.0, 1.0)  # the letterbox bars
        gl.glClear(gl.GL_COLOR_BUFFER_BIT)
        if self._has_frame:
            x, y, w, h = self.video_rect()
            rect = (2 * x / fb_w - 1, 2 * y / fb_h - 1, 2 * (x + w) / fb_w - 1, 2 * (y + h) / fb_h - 1)
            gl.glBindVertexArray(self._vao)
            gl.glActiveTexture(gl.GL_TEXTURE0)
            self._video.use()
            self._video["rect"] = rect
            self._video["image"] = 0
            gl.glBindTexture(gl.GL_TEXTURE_2D, self._frame_tex.id)
            gl.glDrawArrays(gl.GL_TRIANGLE_STRIP, 0, 4)
            if self.probe_visible and self._has_probe:
                gl.glEnable(gl.GL_BLEND)
                gl.glBlendFunc(gl.GL_SRC_ALPHA, gl.GL_ONE_MINUS_SRC_ALPHA)
                self._probe_prog.use()
                self._probe_prog["rect"] = rect
                self._probe_prog["probe"] = 0
                self._probe_prog["opacity"] = float(self.probe_opacity)
                gl.glBindTexture(gl.GL_TEXTURE_2D, self._probe_tex.id)
                gl.glDrawArrays(gl.GL_TRIANGLE_STRIP, 0, 4)
                gl.glDisable(gl.GL_BLEND)
            self._video.stop()
            gl.glBindVertexArray(0)
        if self.hud_visible and self._hud_text:
            self._batch.draw()

    def read_pixels(self) -> np.ndarray:
        """The back buffer as [H, W, 3] uint8 RGB with row 0 = top (call after draw())."""
        gl = pyglet.gl
        self.window.switch_to()
        fb_w, fb_h = self.window.get_framebuffer_size()
        out = np.empty((fb_h, fb_w, 3), dtype=np.uint8)
        gl.glReadBuffer(gl.GL_BACK)
        gl.glPixelStorei(gl.GL_PACK_ALIGNMENT, 1)
        gl.glReadPixels(0, 0, fb_w, fb_h, gl.GL_RGB, gl.GL_UNSIGNED_BYTE, ctypes.c_void_p(out.ctypes.data))
        return out[::-1].copy()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.window.switch_to()
        self._frame_tex.delete()
        self._probe_tex.delete()
        pyglet.gl.glDeleteVertexArrays(1, ctypes.byref(pyglet.gl.GLuint(self._vao)))
        self.window.close()

    def __enter__(self) -> "StageWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- window actions ---------------------------------------------------------------------
    def toggle_fullscreen(self) -> None:
        full = not self.window.fullscreen
        self.window.set_fullscreen(full, screen=self.screen)
        self.window.set_mouse_visible(not full)

    def toggle_probe(self) -> None:
        self.probe_visible = not self.probe_visible
        if self.on_probe is not None:
            self.on_probe(self.probe_visible)

    def learn(self) -> None:
        """Arm MIDI learn for the last-touched (or selected) parameter."""
        if self.on_learn is not None:
            self.on_learn()
            return
        target = self.learn_target() if self.learn_target is not None else None
        if target is None:
            self._warn("learn: move a parameter first (OSC or screen), then press L")
            return
        self.show.learn(target)

    # -- events -----------------------------------------------------------------------------
    def _actions(self) -> dict[int, Callable[[], Any]]:
        k = pyglet.window.key
        show = self.show
        actions = {
            k.F: self.toggle_fullscreen,
            k.H: lambda: setattr(self, "hud_visible", not self.hud_visible),
            k.A: self.toggle_probe,
            k.ESCAPE: lambda: setattr(self, "quit_requested", True),
        }
        if self.on_record is not None:
            actions[k.R] = self.on_record
        if show is not None:
            actions.update({
                k.SPACE: lambda: show.freeze(None),
                k.LEFT: lambda: show.switch_patch("-1"),
                k.RIGHT: lambda: show.switch_patch("+1"),
                k.L: self.learn,
                k.S: self._save,
                k.P: show.panic,
            })
        return actions

    def _save(self) -> None:
        where = self.show.save_patch()
        self._warn(f"saved {where}")

    def _on_key_press(self, symbol: int, modifiers: int):
        action = self._actions().get(symbol)
        if action is None:
            if self.on_key is not None:
                from ..control.events import ControlEvent
                self._guard(lambda: self.on_key(ControlEvent(
                    source="key", kind="key", value=1.0, arrived=time.monotonic(), number=int(symbol),
                    address=pyglet.window.key.symbol_string(symbol))))
            return None
        self._guard(action)
        return pyglet.event.EVENT_HANDLED  # Esc must not reach pyglet's default close

    def _guard(self, action: Callable[[], Any]) -> None:
        # a key must never take the show down: failures become one line for the performer
        try:
            action()
        except Exception as e:  # noqa: BLE001 - anything a callback raises goes to the HUD
            self._warn(f"{type(e).__name__}: {e}")

    def _warn(self, message: str) -> None:
        if self.show is not None:
            try:
                self.show.warn(message)
                return
            except Exception:  # noqa: BLE001
                pass
        print(f"instrument: {message}", file=sys.stderr)

    def _on_close(self):
        self.quit_requested = True
        return pyglet.event.EVENT_HANDLED  # the caller closes, after its own cleanup

    def _on_resize(self, width: int, height: int):
        self._layout_hud()
        return None  # let pyglet's default handler set the projection the HUD text uses

    def _layout_hud(self) -> None:
        w, h = self.window.get_size()
        size = max(9, round(h / 64))
        pad = size // 2 + 2
        if self._hud_label.font_size != size:
            self._hud_label.font_size = size
        self._hud_label.position = (pad, h - pad, 0)
        cw = self._hud_label.content_width if self._hud_text else 0
        ch = self._hud_label.content_height if self._hud_text else 0
        self._hud_bg.position = (0, h - ch - 2 * pad)
        self._hud_bg.width = cw + 2 * pad
        self._hud_bg.height = ch + 2 * pad
