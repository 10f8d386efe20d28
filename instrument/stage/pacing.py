"""Pacing: generated chunks in, one frame per tick out, at a steady playback rate.

The render thread pushes whole chunks (9-12 frames at a time, in bursts) into a small bounded
`FrameQueue`; the present loop asks a `Presenter` for the frame to show now. Design choices:

- The queue is small (two chunks: `queue_capacity`) and a full queue BLOCKS the producer rather than
  dropping the oldest frames. Dropping would throw away GPU work and make the picture jump;
  blocking keeps generation exactly as far ahead of the screen as the queue is deep, so what a
  knob does reaches the screen within about two chunks.
- The presenter runs on an absolute schedule (anchor + k / fps) so rounding never drifts.
- When generation is slower than playback, the queue runs dry: the presenter holds the last
  frame, counts an underrun for every tick it could not fill, and re-anchors the schedule on
  the next frame that arrives. It never shows frames back to back to "catch up".
- Freeze holds the current frame and stops popping: the queue fills, the producer blocks and
  generation pauses, so the stream resumes exactly where it stopped and the GPU idles meanwhile.
- Latency: the render loop should call `wait_room` before it reads the controls, then
  generate and `put`: the chunk then waits for the screen before it is computed, not after.
  Worst case a knob reaches the screen after about capacity/fps + one chunk's compute time.
- Just in time: room in the queue comes a whole chunk of frames before the screen needs the next
  chunk, and a generator faster than the screen would read the controls that early. So the render
  loop first waits (`Presenter.wait_for_lead`) until the frames still to show last no longer than
  `LeadTime`: the recent chunks' slowest compute time with a margin, plus one frame. The margin grows
  after an underrun, so a jittery machine trades some of the gain back for a steady picture.
- Knob-to-photon latency is recorded when the first frame of a chunk carrying `computed_with`
  is handed out for drawing (one swap before it is lit on screen).

Every time-dependent call takes `now` or uses the injected `clock`, so tests drive it with a
fake clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Clock = Callable[[], float]

DEFAULT_FPS = 16.0  # Wan is trained at 16 fps


def queue_capacity(chunk_frames: int) -> int:
    """Frames the queue holds for chunks of chunk_frames: two chunks, one shown while the next is made. Every
    frame more is 1/fps more knob-to-photon latency once generation outruns the screen (a floor of 24
    frames gave 1-frame chunks, made to answer quickly, 1.4 s of it: 24 frames queued at 16 fps)."""
    return 2 * chunk_frames


def as_frames(frames: Any) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB as a C-contiguous numpy array (a torch CPU tensor shares memory)."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    arr = np.ascontiguousarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


@dataclass(frozen=True)
class QueuedFrame:
    image: np.ndarray  # [H, W, 3] uint8, row 0 = top
    computed_with: float | None  # set on the first frame of a chunk that applied a control change
    chunk: int  # running chunk number


class FrameQueue:
    """A bounded frame queue between one producer (the render thread) and the presenter."""

    def __init__(self, capacity: int = 24, *, clock: Clock = time.monotonic, window: int = 8):
        if capacity < 1:
            raise ValueError("capacity must be at least 1 frame")
        self.capacity = capacity
        self._clock = clock
        self._frames: deque[QueuedFrame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._chunks = 0
        self._frames_in = 0
        # Engine time per chunk = from the moment the previous put returned (producer free)
        # to the next put call; time spent blocked on a full queue is not generation time.
        self._released_at: float | None = None
        self._chunk_times: deque[tuple[int, float]] = deque(maxlen=window)

    # -- producer ---------------------------------------------------------------------------
    def wait_room(self, n: int, *, timeout: float | None = None) -> bool:
        """Block until a chunk of n frames would fit (False on timeout or close).

        A render loop calls this BEFORE reading the controls and generating, so each chunk is
        computed with the freshest knob values instead of waiting, finished, in `put`.
        """
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or self._fits(n), timeout=timeout)
            self._released_at = self._clock()  # generation time starts now
            return bool(ok) and not self._closed

    def _fits(self, n: int) -> bool:
        return not self._frames or len(self._frames) + n <= self.capacity

    def put(self, frames: Any, computed_with: float | None = None, *, timeout: float | None = None,
            copy: bool = False) -> bool:
        """Queue a chunk of frames; blocks while the queue has no room for it.

        Returns False if `timeout` passed or the queue was closed (the chunk is not queued).
        A chunk larger than the whole queue is accepted once the queue is empty, so a producer
        can never deadlock on its own chunk size. The frames are kept by reference unless
        `copy`: the producer must not overwrite them afterwards.
        """
        arr = as_frames(frames)
        if copy:
            arr = arr.copy()
        called = self._clock()
        with self._cond:
            if self._released_at is not None:
                self._chunk_times.append((len(arr), max(called - self._released_at, 0.0)))
            if not self._cond.wait_for(lambda: self._closed or self._fits(len(arr)), timeout=timeout):
                self._released_at = self._clock()
                return False
            if self._closed:
                return False
            chunk = self._chunks
            self._chunks += 1
            for i, image in enumerate(arr):
                self._frames.append(QueuedFrame(image, computed_with if i == 0 else None, chunk))
            self._frames_in += len(arr)
            self._released_at = self._clock()
            self._cond.notify_all()
        return True

    def put_chunk(self, chunk: Any, *, timeout: float | None = None, copy: bool = False) -> bool:
        """Queue an engine chunk (`.frames` [n, H, W, 3] uint8, `.computed_with` or None)."""
        return self.put(chunk.frames, getattr(chunk, "computed_with", None), timeout=timeout, copy=copy)

    def close(self) -> None:
        """Release a blocked producer and refuse further chunks (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- consumer ---------------------------------------------------------------------------
    def pop(self) -> QueuedFrame | None:
        with self._cond:
            if not self._frames:
                return None
            item = self._frames.popleft()
            self._cond.notify_all()
            return item

    def clear(self) -> int:
        """Drop everything queued (e.g. on a patch switch that must show at once)."""
        with self._cond:
            n = len(self._frames)
            self._frames.clear()
            self._cond.notify_all()
            return n

    def __len__(self) -> int:
        return len(self._frames)

    # -- stats ------------------------------------------------------------------------------
    @property
    def frames_in(self) -> int:
        return self._frames_in

    def chunk_seconds(self) -> float | None:
        """Mean engine time per chunk over the recent window (None before two chunks)."""
        with self._cond:
            times = list(self._chunk_times)
        return sum(t for _, t in times) / len(times) if times else None

    def generated_fps(self) -> float | None:
        """Frames per second the engine can produce, blocked time excluded."""
        with self._cond:
            times = list(self._chunk_times)
        total = sum(t for _, t in times)
        return sum(n for n, _ in times) / total if times and total > 0 else None


class LeadTime:
    """How far ahead of the screen a chunk must start: margin x the slowest of the recent chunks' compute
    times, plus one frame period (the presenter polls on its own schedule). None until a chunk is timed,
    so the first chunks fill the queue as fast as they come (warm-up, compiles)."""

    CALM = 64  # chunks without an underrun before the margin steps back down

    def __init__(self, period: float, *, window: int = 8, margin: float = 1.25, max_margin: float = 3.0):
        self.period = period
        self.base_margin = self.margin = margin
        self.max_margin = max_margin
        self._recent: deque[float] = deque(maxlen=window)
        self._calm = 0

    def record(self, compute_s: float, underran: bool = False) -> None:
        """One chunk's compute time; underran: the screen ran dry meanwhile, so start earlier from now on. The
        margin steps back after CALM chunks without one: a one-off stall (a patch switch capturing its graph)
        must not cost latency for the rest of the show."""
        if underran and self._recent:
            self.margin = min(self.margin + 0.25, self.max_margin)
            self._calm = 0
        else:
            self._calm += 1
            if self._calm >= self.CALM and self.margin > self.base_margin:
                self.margin = max(self.margin - 0.25, self.base_margin)
                self._calm = 0
        if compute_s >= 0 and compute_s == compute_s:
            self._recent.append(compute_s)

    def seconds(self) -> float | None:
        if not self._recent:
            return None
        return self.margin * max(self._recent) + self.period


def _percentile(sorted_values: list[float], q: float) -> float:
    # linear interpolation between closest ranks, as numpy's default
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Presenter:
    """Hands out one frame per 1/fps tick from a FrameQueue, holding the last one when starved."""

    def __init__(self, queue: FrameQueue, fps: float = DEFAULT_FPS, *, clock: Clock = time.monotonic,
                 latency_window: int = 120, rate_window: float = 2.0):
        if not fps > 0:
            raise ValueError("fps must be positive")
        self.queue = queue
        self.period = 1.0 / fps
        self._clock = clock
        self._anchor: float | None = None  # schedule origin; None until the first frame
        self._k = 0  # ticks since the anchor
        self._starved = False
        self._frozen = False
        self.current: QueuedFrame | None = None
        self.shown = 0
        self.underruns = 0
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._shown_at: deque[float] = deque()
        self._rate_window = rate_window
        self._born = clock()

    @property
    def fps(self) -> float:
        return 1.0 / self.period

    def next_due(self) -> float:
        """When a new frame is due (now, if the schedule has not started)."""
        if self._anchor is None:
            return self._clock()
        return self._anchor + self._k * self.period

    def poll(self, now: float | None = None) -> np.ndarray | None:
        """The frame to show now if one is due and ready; None means keep showing the last one."""
        now = self._clock() if now is None else now
        if self._frozen:
            return None
        if self._anchor is None:  # first frame starts the schedule
            return self._show(now, anchor=now)
        due = self._anchor + self._k * self.period
        if now < due:
            return None
        if now - due >= self.period:
            # The loop itself was late by more than a tick (a stall, a GC, a dragged window):
            # start a fresh schedule at now instead of showing the missed ticks back to back.
            missed = int((now - due) / self.period)
            if self._starved:
                self.underruns += missed
            return self._show(now, anchor=now)
        return self._show(now, anchor=None)

    def _show(self, now: float, anchor: float | None) -> np.ndarray | None:
        item = self.queue.pop()
        if item is None:
            if self._anchor is not None:
                self.underruns += 1
                self._starved = True
                # keep ticking on the old grid while starved so each empty tick counts once
                if anchor is not None:
                    self._anchor, self._k = anchor, 1
                else:
                    self._k += 1
            return None
        if self._starved or anchor is not None:
            # re-anchor on the first frame after a stall: no burst of catch-up frames
            self._anchor, self._k = now, 1
            self._starved = False
        else:
            self._k += 1
        self.current = item
        self.shown += 1
        self._shown_at.append(now)
        while self._shown_at and self._shown_at[0] < now - self._rate_window:
            self._shown_at.popleft()
        if item.computed_with is not None:
            self._latencies.append(max(now - item.computed_with, 0.0))
        return item.image

    def seconds_ahead(self, now: float | None = None) -> float:
        """Seconds of video the screen has before it runs dry: what is left of the frame on screen and every
        queued frame. Infinite while frozen (nothing drains)."""
        if self._frozen:
            return math.inf
        now = self._clock() if now is None else now
        queued = len(self.queue) * self.period
        if self._anchor is None:
            return queued
        return max(self._anchor + self._k * self.period - now, 0.0) + queued

    def wait_for_lead(self, lead: float, stop: threading.Event | None = None, sleep=time.sleep) -> None:
        """Block the render loop while the screen has more than `lead` seconds of frames ahead of it (or until
        stop is set); the controls read right after are the freshest that can still make it in time."""
        while stop is None or not stop.is_set():
            ahead = self.seconds_ahead()
            if ahead <= lead:
                return
            sleep(min(ahead - lead, 0.1))  # the queue only drains meanwhile; 0.1 s: see stop and unfreezes

    def freeze(self, on: bool | None = None) -> bool:
        """Hold the current frame (None toggles); returns the new state."""
        on = (not self._frozen) if on is None else bool(on)
        if self._frozen and not on:
            self._anchor = None  # the first frame after a freeze restarts the schedule
            self._starved = False
        self._frozen = on
        return on

    @property
    def frozen(self) -> bool:
        return self._frozen

    # -- stats ------------------------------------------------------------------------------
    def shown_fps(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        span = min(self._rate_window, now - self._born)
        recent = sum(1 for t in self._shown_at if t > now - self._rate_window)
        return recent / span if span > 0 else 0.0

    def latency(self) -> tuple[float, float] | None:
        """(p50, p95) knob-to-photon latency in seconds over the recent window, or None."""
        if not self._latencies:
            return None
        values = sorted(self._latencies)
        return _percentile(values, 0.50), _percentile(values, 0.95)

    def stats(self, now: float | None = None) -> dict:
        """Everything the HUD shows about pacing (see instrument.stage.hud)."""
        lat = self.latency()
        chunk = self.queue.chunk_seconds()
        return {
            "shown_fps": self.shown_fps(now),
            "gen_fps": self.queue.generated_fps(),
            "chunk_ms": None if chunk is None else chunk * 1000.0,
            "queue": len(self.queue),
            "queue_capacity": self.queue.capacity,
            "underruns": self.underruns,
            "latency_p50_ms": None if lat is None else lat[0] * 1000.0,
            "latency_p95_ms": None if lat is None else lat[1] * 1000.0,
            "frozen": self._frozen,
        }
