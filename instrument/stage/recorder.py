"""Recording the shown frames to a video file through an ffmpeg subprocess.

`write` never blocks the present loop: frames go into a bounded queue that a background thread
feeds to ffmpeg's stdin (raw RGB24). If the encoder falls behind, new frames are dropped and
counted (`dropped`), and the HUD says so. The take contains the frames in the order they were
shown, at the playback rate: holds while generation stalled are not in the file.

Each `start` opens a new file: the given path if it is free, else path-2.mp4, path-3.mp4, ...
`stop` closes ffmpeg's input and waits for it to finish the file.
"""

from __future__ import annotations

import functools
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .pacing import DEFAULT_FPS


class RecorderError(RuntimeError):
    """Recording cannot start (no ffmpeg, unwritable path); the message is for the performer."""


@functools.lru_cache(maxsize=None)
def _encoders(ffmpeg: str) -> frozenset[str]:
    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] == "V":
            names.add(parts[1])
    return frozenset(names)


def encoder_args(ffmpeg: str = "ffmpeg") -> list[str]:
    """Output codec arguments for the best encoder this ffmpeg has."""
    have = _encoders(ffmpeg)
    if "libx264" in have:
        # veryfast keeps up with 480p x 16 fps on one core with room to spare; crf 18 is
        # visually lossless for a record of the show
        return ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"]
    if "mpeg4" in have:
        return ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"]
    raise RecorderError("ffmpeg has neither libx264 nor mpeg4: cannot record")


def free_path(path: str | Path) -> Path:
    """path if nothing is there, else the first free path-N with the same suffix (N >= 2)."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


class Recorder:
    """Records frames ([H, W, 3] uint8 RGB, row 0 = top) to numbered video files."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float = DEFAULT_FPS, *,
                 queue_frames: int = 48, ffmpeg: str = "ffmpeg"):
        self.base = Path(path)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self._ffmpeg = ffmpeg
        self._queue_frames = queue_frames
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self.path: Path | None = None  # the file being (or last) written
        self.written = 0  # frames handed to ffmpeg in the current / last take
        self.dropped = 0  # frames dropped in the current / last take (encoder behind, bad size)
        self.error: str | None = None  # why the last take failed, for the HUD

    @property
    def recording(self) -> bool:
        return self._proc is not None

    def seconds(self) -> float | None:
        """Seconds of video in the current take (None when not recording)."""
        return self.written / self.fps if self.recording else None

    def start(self) -> Path:
        with self._lock:
            if self._proc is not None:
                return self.path
            exe = shutil.which(self._ffmpeg)
            if exe is None:
                raise RecorderError(f"cannot record: '{self._ffmpeg}' not found")
            target = free_path(self.base)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RecorderError(f"cannot record to {target}: {e.strerror or e}") from None
            w, h = self.width, self.height
            cmd = [exe, "-hide_banner", "-loglevel", "error", "-nostdin",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{self.fps:g}",
                   "-i", "pipe:0"]
            if w % 2 or h % 2:  # yuv420p needs even sizes: pad one black row/column
                cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
            cmd += encoder_args(exe) + ["-movflags", "+faststart", "-y", str(target)]
            try:
                # stderr to a file, not a pipe: nobody reads it while recording, and a full
                # pipe would stall ffmpeg and with it the take
                log = open(target.with_name(target.name + ".log"), "w+b")
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            except OSError as e:
                raise RecorderError(f"cannot start ffmpeg: {e}") from None
            self._log = log
            self.path = target
            self.written = 0
            self.dropped = 0
            self.error = None
            self._queue = queue.Queue(maxsize=self._queue_frames)
            self._proc = proc
            self._thread = threading.Thread(target=self._feed, args=(proc, self._queue),
                                            name="recorder", daemon=True)
            self._thread.start()
            return target

    def write(self, frame: Any) -> bool:
        """Queue one frame for the take; never blocks. False if dropped or not recording."""
        q = self._queue
        if q is None or self._proc is None:
            return False
        if hasattr(frame, "detach"):
            frame = frame.detach().cpu().numpy()
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            self.dropped += 1
            self.error = f"frame {list(frame.shape)} is not {self.height}x{self.width}x3 uint8"
            return False
        try:
            q.put_nowait(frame)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _feed(self, proc: subprocess.Popen, q: queue.Queue) -> None:
        while True:
            frame = q.get()
            if frame is None:
                break
            try:
                proc.stdin.write(np.ascontiguousarray(frame).data)
                self.written += 1
            except (BrokenPipeError, OSError, ValueError):
                self.error = "ffmpeg stopped: recording lost"
                # keep draining so write() stays non-blocking until stop()
                while q.get() is not None:
                    pass
                break

    def stop(self, timeout: float = 30.0) -> Path | None:
        """Finish the take: flush the queue, close ffmpeg's input and wait for the file."""
        with self._lock:
            proc, q, thread = self._proc, self._queue, self._thread
            if proc is None:
                return None
            self._proc = None
            self._queue = None  # write() refuses from here on
            q.put(None)  # blocks at most until the feeder makes room
            thread.join(timeout)
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            self._log.seek(0)
            detail = self._log.read().decode(errors="replace").strip().splitlines()
            self._log.close()
            log_path = Path(self._log.name)
            if rc == 0 and self.error is None:
                log_path.unlink(missing_ok=True)
            elif self.error is None:
                self.error = f"ffmpeg failed ({rc}): {detail[-1] if detail else 'no message'}"
            return self.path

    def toggle(self) -> bool:
        """Start or stop (the R key); returns whether recording now."""
        if self.recording:
            self.stop()
        else:
            self.start()
        return self.recording

    close = stop

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
