"""Recorder: real ffmpeg, decoded back with ffprobe / ffmpeg."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import need_tool

from instrument.stage.recorder import Recorder, RecorderError, free_path



@pytest.fixture(autouse=True)
def _tools():
    need_tool("ffmpeg")
    need_tool("ffprobe")

W, H = 208, 120


def frame_count(path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_frames,width,height,codec_name",
                          "-of", "default=nw=1", str(path)], capture_output=True, text=True, check=True)
    info = dict(line.split("=", 1) for line in out.stdout.split())
    return int(info["nb_read_frames"]), int(info["width"]), int(info["height"]), info["codec_name"]


def decode(path, w, h) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def test_records_frames_in_order_with_colours_and_orientation(tmp_path):
    rng = np.random.default_rng()
    colours = rng.integers(30, 226, (20, 2, 3))
    frames = []
    for top, bottom in colours:
        f = np.empty((H, W, 3), np.uint8)
        f[: H // 2] = top  # top half one colour, bottom half another: orientation shows
        f[H // 2:] = bottom
        frames.append(f)
    rec = Recorder(tmp_path / "take.mp4", W, H, fps=16)
    assert not rec.recording and rec.seconds() is None
    path = rec.start()
    assert rec.recording
    for i, f in enumerate(frames):
        # torch frames too (what the engine hands over)
        assert rec.write(torch.from_numpy(f) if i % 2 else f)
    assert rec.stop() == path == tmp_path / "take.mp4"
    assert not rec.recording and rec.error is None and rec.dropped == 0 and rec.written == 20
    assert not (tmp_path / "take.mp4.log").exists()
    n, w, h, codec = frame_count(path)
    assert (n, w, h) == (20, W, H)
    assert codec in ("h264", "mpeg4")
    got = decode(path, W, H)
    assert len(got) == 20
    for f_in, f_out in zip(frames, got):
        # compression and yuv420p chroma: compare region means away from the seam
        for rows in (slice(8, H // 2 - 8), slice(H // 2 + 8, H - 8)):
            np.testing.assert_allclose(f_out[rows].reshape(-1, 3).mean(0),
                                       f_in[rows].reshape(-1, 3).mean(0), atol=6)


def test_numbered_takes_and_toggle(tmp_path):
    base = tmp_path / "show" / "take.mp4"
    rec = Recorder(base, 64, 48)
    frame = np.full((48, 64, 3), 128, np.uint8)
    paths = []
    for _ in range(3):
        assert rec.toggle() is True
        rec.write(frame)
        rec.write(frame)
        assert rec.seconds() is not None
        assert rec.toggle() is False
        paths.append(rec.path)
    assert paths == [base, base.with_name("take-2.mp4"), base.with_name("take-3.mp4")]
    for p in paths:
        assert frame_count(p)[0] == 2
    assert free_path(base) == base.with_name("take-4.mp4")
    assert rec.stop() is None  # stopping when stopped is harmless


def test_write_never_blocks_when_encoder_stalls(tmp_path):
    w, h = 832, 480  # 1.2 MB a frame: a stopped ffmpeg fills the pipe after the first one
    rec = Recorder(tmp_path / "stall.mp4", w, h, queue_frames=4)
    rec.start()
    proc = rec._proc
    os.kill(proc.pid, signal.SIGSTOP)  # a real encoder falling behind, as far as it can
    try:
        frame = np.full((h, w, 3), 77, np.uint8)
        worst = 0.0
        accepted = 0
        for _ in range(40):
            t = time.perf_counter()
            accepted += rec.write(frame)
            worst = max(worst, time.perf_counter() - t)
        assert worst < 0.02, f"write blocked for {worst * 1000:.1f} ms"
        assert accepted <= 4 + 2  # the queue plus what the feeder holds / pushed into the pipe
        assert rec.dropped == 40 - accepted > 0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    rec.stop()
    assert rec.error is None
    assert frame_count(rec.path)[0] == accepted == rec.written


def test_bad_frames_and_odd_sizes(tmp_path):
    rec = Recorder(tmp_path / "odd.mp4", 33, 17)
    rec.start()
    assert not rec.write(np.zeros((17, 32, 3), np.uint8))
    assert not rec.write(np.zeros((17, 33, 3), np.float32))
    assert rec.dropped == 2 and "17x33x3" in rec.error
    for v in (10, 240):
        assert rec.write(np.full((17, 33, 3), v, np.uint8))
    rec.stop()
    n, w, h, _ = frame_count(rec.path)
    assert n == 2 and (w, h) == (34, 18)  # padded to even for yuv420p
    got = decode(rec.path, 34, 18)
    assert abs(got[1, :17, :33].mean() - 240) < 6


def test_not_recording_and_missing_ffmpeg(tmp_path):
    rec = Recorder(tmp_path / "x.mp4", 16, 16)
    assert not rec.write(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(RecorderError, match="not found"):
        Recorder(tmp_path / "y.mp4", 16, 16, ffmpeg="no-such-ffmpeg-here").start()
    assert not (tmp_path / "y.mp4").exists()


def test_ffmpeg_dying_mid_take_is_reported_not_raised(tmp_path):
    rec = Recorder(tmp_path / "dead.mp4", 64, 48)
    rec.start()
    frame = np.zeros((48, 64, 3), np.uint8)
    rec.write(frame)
    rec._proc.kill()
    rec._proc.wait()
    for _ in range(200):  # keeps accepting or dropping; never raises, never blocks
        rec.write(frame)
        time.sleep(0.001)
    rec.stop()
    assert rec.error is not None
