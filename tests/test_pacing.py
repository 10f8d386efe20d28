"""Pacing: FrameQueue + Presenter driven by a fake clock (and a real producer thread)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from instrument.stage.pacing import FrameQueue, LeadTime, Presenter, queue_capacity

FPS = 16.0
PERIOD = 1.0 / FPS
VSYNC = 1.0 / 60.0


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def chunk(first: int, n: int = 12, h: int = 4, w: int = 6) -> np.ndarray:
    """n frames whose pixels all hold their running frame number (mod 256)."""
    return np.stack([np.full((h, w, 3), (first + i) % 256, np.uint8) for i in range(n)])


def simulate(gen_seconds_per_chunk, seconds: float, *, n: int = 12, capacity: int = 24,
             knob_every: int | None = None, lead: LeadTime | None = None):
    """A render loop (wait for room, read the knobs, generate for gen_seconds_per_chunk, put)
    and a vsync-driven present loop, on one fake clock. gen_seconds_per_chunk: seconds, or a function of the
    chunk number. lead: start each chunk just in time, as play does by default.

    Returns (shown [(time, frame number)], presenter, expected latencies [shown - knob time]).
    """
    clock = FakeClock()
    q = FrameQueue(capacity, clock=clock)
    p = Presenter(q, FPS, clock=clock)
    compute = gen_seconds_per_chunk if callable(gen_seconds_per_chunk) else lambda _: gen_seconds_per_chunk
    t_end = clock.t + seconds
    generating_since = None
    produced = 0
    chunks = 0
    shown = []
    expected_latency = []
    knob_of_frame = {}
    while clock.t < t_end:
        early = lead is not None and lead.seconds() is not None and p.seconds_ahead() > lead.seconds()
        if generating_since is None and not early and q.wait_room(n, timeout=0):
            generating_since = clock.t  # controls are read now
            underruns = p.underruns
        if generating_since is not None and clock.t >= generating_since + compute(chunks):
            if lead is not None:
                lead.record(clock.t - generating_since, underran=p.underruns > underruns)
            computed_with = None
            if knob_every and chunks % knob_every == 0:
                computed_with = generating_since  # a knob moved just as this chunk began
                knob_of_frame[produced] = computed_with
            assert q.put(chunk(produced, n), computed_with, timeout=0)
            produced += n
            chunks += 1
            generating_since = None
        frame = p.poll()
        if frame is not None:
            index = len(shown)
            assert int(frame[0, 0, 0]) == index % 256
            shown.append((clock.t, index))
            if index in knob_of_frame:
                expected_latency.append(clock.t - knob_of_frame[index])
        assert len(q) <= capacity
        clock.t += VSYNC
    return shown, p, expected_latency


def test_steady_state_absolute_schedule_without_drift():
    shown, p, _ = simulate(gen_seconds_per_chunk=0.4, seconds=20.0)  # 30 fps capable: never starves
    t0 = shown[0][0]
    for k, (t, _) in enumerate(shown):
        # absolute schedule: frame k appears at the first vsync at or after t0 + k/fps
        assert t0 + k * PERIOD - 1e-9 <= t < t0 + k * PERIOD + VSYNC + 1e-9
    assert len(shown) == pytest.approx(20.0 * FPS - 0.4 * FPS, abs=2)
    assert p.underruns == 0
    assert p.shown_fps() == pytest.approx(FPS, rel=0.05)


def test_slow_producer_holds_and_never_bursts():
    # 12 frames per second generated, 16 shown: each chunk plays in 0.75 s then holds 0.25 s
    shown, p, _ = simulate(gen_seconds_per_chunk=1.0, seconds=10.0)
    times = [t for t, _ in shown]
    gaps = np.diff(times)
    assert gaps.min() >= PERIOD - VSYNC - 1e-9, "catch-up burst: two frames closer than a tick"
    assert len(shown) == pytest.approx(9 * 12, abs=12)
    # every hold is at least one underrun tick, about 4 per 1 s chunk (0.25 s / 62.5 ms)
    assert 3 * 8 <= p.underruns <= 5 * 10
    # after a hold the chunk's first frame shows at once (re-anchored), not at the old grid
    long = gaps > PERIOD + VSYNC + 1e-9
    assert long.sum() >= 8


def test_fast_producer_is_bounded_and_blocks():
    q = FrameQueue(capacity=24)
    assert q.put(chunk(0), timeout=0)
    assert q.put(chunk(12), timeout=0)
    t = time.monotonic()
    assert not q.put(chunk(24), timeout=0.05), "queue accepted beyond capacity"
    assert time.monotonic() - t >= 0.04
    assert len(q) == 24

    done = threading.Event()

    def producer():
        q.put(chunk(24))  # blocks until the consumer has made room for the whole chunk
        done.set()

    th = threading.Thread(target=producer)
    th.start()
    for _ in range(11):
        assert q.pop() is not None
    assert not done.wait(0.1), "producer ran ahead while the queue had no room for the chunk"
    q.pop()
    assert done.wait(2.0)
    th.join()
    assert len(q) == 24
    assert [int(q.pop().image[0, 0, 0]) for _ in range(24)] == list(range(12, 36))


def test_close_releases_a_blocked_producer():
    q = FrameQueue(capacity=12)
    q.put(chunk(0))
    result = []
    th = threading.Thread(target=lambda: result.append(q.put(chunk(12))))
    th.start()
    time.sleep(0.05)
    q.close()
    th.join(2.0)
    assert result == [False]


def test_oversized_chunk_accepted_when_empty():
    q = FrameQueue(capacity=8)
    assert q.put(chunk(0, n=12), timeout=0)
    assert len(q) == 12


def test_late_loop_reanchors_instead_of_bursting():
    clock = FakeClock()
    q = FrameQueue(48, clock=clock)
    p = Presenter(q, FPS, clock=clock)
    q.put(chunk(0, 24))
    q.put(chunk(24, 24), timeout=0)
    assert p.poll() is not None
    clock.t += 1.0  # the present loop stalled for a second with a full queue
    assert p.poll() is not None
    assert p.poll() is None, "second frame in the same instant: catch-up burst"
    clock.t += PERIOD * 0.99
    assert p.poll() is None
    clock.t += PERIOD * 0.02
    assert p.poll() is not None
    assert p.underruns == 0


def test_latency_percentiles_match_numpy():
    rng = np.random.default_rng()
    clock = FakeClock()
    q = FrameQueue(1000, clock=clock)
    p = Presenter(q, FPS, clock=clock, latency_window=50)
    expected = []
    for i in range(80):
        lat = float(rng.uniform(0.05, 1.5))
        q.put(chunk(i * 3, n=3), clock.t - lat)  # the knob moved `lat` seconds ago
        for j in range(3):
            frame = p.poll()
            assert frame is not None
            if j == 0:
                expected.append(lat)
            clock.t += PERIOD
    window = np.array(expected[-50:], dtype=np.float64)
    p50, p95 = p.latency()
    assert p50 == pytest.approx(np.percentile(window, 50), abs=1e-9)
    assert p95 == pytest.approx(np.percentile(window, 95), abs=1e-9)
    stats = p.stats()
    assert stats["latency_p95_ms"] == pytest.approx(p95 * 1000)


def test_latency_counts_first_frame_of_chunk_only_and_uses_show_time():
    shown, p, expected = simulate(gen_seconds_per_chunk=0.5, seconds=8.0, knob_every=2)
    assert len(expected) >= 4, "too few knob chunks shown"
    p50, p95 = p.latency()
    assert p50 == pytest.approx(np.percentile(expected, 50), abs=1e-9)
    assert p95 == pytest.approx(np.percentile(expected, 95), abs=1e-9)
    # reading the knobs only once there is room bounds the latency by the compute time plus
    # what is left in the queue: (capacity - chunk) frames at most
    assert p95 <= 0.5 + (24 - 12) * PERIOD + VSYNC


def test_one_frame_chunks_queue_two_chunks_so_a_knob_answers_within_them():
    """1-frame chunks (4 video frames) exist to answer quickly: with a generator faster than the screen, the
    queue of two chunks (8 frames) bounds knob-to-photon by one chunk's compute time plus one chunk of
    frames still queued, with no underrun; a 24-frame queue, as play had, held the same knob for 20 frames
    more."""
    assert queue_capacity(4) == 8 and queue_capacity(12) == 24
    compute = 0.13  # s per 1-frame chunk, faster than its 0.25 s of frames at 16 fps
    shown, p, expected = simulate(compute, 8.0, n=4, capacity=queue_capacity(4), knob_every=1)
    assert len(expected) > 20 and p.underruns == 0
    p50, p95 = p.latency()
    assert p95 <= compute + 4 * PERIOD + VSYNC
    _, deep, _ = simulate(compute, 8.0, n=4, capacity=24, knob_every=1)
    assert deep.latency()[0] > p95 + 15 * PERIOD


@pytest.mark.parametrize("n, compute", [(12, 0.30), (4, 0.13)], ids=["3-frame chunks", "1-frame chunks"])
def test_just_in_time_chunks_answer_a_knob_sooner_without_underruns(n, compute):
    """Play's default pacing: a chunk starts when the frames left to show last its compute time with a margin,
    not as soon as the queue has room. With the H200's chunk times (0.30 s for 12 frames, 0.13 s for 4) the
    knob reaches the screen sooner (3-frame chunks: by most of the queued chunk's 0.75 s), and the screen
    never runs dry."""
    capacity = queue_capacity(n)
    _, full, _ = simulate(compute, 20.0, n=n, capacity=capacity, knob_every=1)
    _, jit, _ = simulate(compute, 20.0, n=n, capacity=capacity, knob_every=1, lead=LeadTime(PERIOD))
    assert full.underruns == 0 and jit.underruns == 0
    (full50, full95), (jit50, jit95) = full.latency(), jit.latency()
    assert jit95 <= 1.25 * compute + PERIOD + compute + 2 * VSYNC  # the lead, then the chunk's own compute
    assert jit50 < full50 - (0.3 if n == 12 else 0.01) and jit95 < full95


def test_just_in_time_pacing_starts_earlier_after_an_underrun():
    """A machine where one chunk in 12 takes 0.5 s instead of 0.28, rarer than the 8 chunks LeadTime remembers:
    the first slow chunks let the screen run dry, the margin grows, and then it runs dry no more (60 s: 3
    underruns against 14 at a fixed margin)."""
    slow = lambda i: 0.5 if i % 12 == 5 else 0.28  # noqa: E731
    lead = LeadTime(PERIOD)
    _, jit, _ = simulate(slow, 60.0, n=12, capacity=24, knob_every=1, lead=lead)
    assert lead.margin > 1.25
    fixed = LeadTime(PERIOD, max_margin=1.25)
    _, stuck, _ = simulate(slow, 60.0, n=12, capacity=24, knob_every=1, lead=fixed)
    assert jit.underruns * 3 < stuck.underruns
    _, full, _ = simulate(slow, 60.0, n=12, capacity=24, knob_every=1)
    assert full.underruns == 0  # a full queue absorbs it all: play --pacing smooth


def test_the_margin_steps_back_after_a_calm_stretch():
    """A one-off stall (a patch switch capturing its graph) raises the margin; 64 calm chunks take it back."""
    lead = LeadTime(PERIOD)
    lead.record(0.3)
    lead.record(2.0, underran=True)
    lead.record(0.3, underran=True)
    assert lead.margin == 1.75
    for _ in range(LeadTime.CALM - 1):
        lead.record(0.3)
    assert lead.margin == 1.75
    lead.record(0.3)
    assert lead.margin == 1.5
    for _ in range(10 * LeadTime.CALM):
        lead.record(0.3)
    assert lead.margin == 1.25 and lead.seconds() == pytest.approx(1.25 * 0.3 + PERIOD)


def test_seconds_ahead_counts_the_frame_on_screen_and_the_queue_and_is_infinite_when_frozen():
    clock = FakeClock()
    q = FrameQueue(24, clock=clock)
    p = Presenter(q, FPS, clock=clock)
    assert p.seconds_ahead() == 0.0
    q.put(chunk(0, 4))
    assert p.seconds_ahead() == pytest.approx(4 * PERIOD)
    p.poll()  # frame 0 on screen until its tick ends, 3 queued
    clock.t += 0.25 * PERIOD
    assert p.seconds_ahead() == pytest.approx(0.75 * PERIOD + 3 * PERIOD)
    p.freeze(True)
    assert p.seconds_ahead() == float("inf")
    p.freeze(False)
    assert p.seconds_ahead() == pytest.approx(3 * PERIOD)
    waited = []
    p.wait_for_lead(PERIOD, sleep=lambda s: (waited.append(s), setattr(clock, "t", clock.t + s), q.pop()))
    assert waited and p.seconds_ahead() <= PERIOD


def test_wait_room_blocks_until_a_chunk_fits():
    q = FrameQueue(capacity=24)
    q.put(chunk(0))
    assert q.wait_room(12, timeout=0)
    q.put(chunk(12))
    assert not q.wait_room(12, timeout=0.02)
    ready = threading.Event()
    th = threading.Thread(target=lambda: q.wait_room(12) and ready.set())
    th.start()
    assert not ready.wait(0.05)
    q.pop()
    assert not ready.wait(0.05), "room for 1 frame is not room for a chunk"
    for _ in range(11):
        q.pop()
    assert ready.wait(2.0)
    th.join()


def test_freeze_holds_pauses_producer_and_resumes_in_order():
    clock = FakeClock()
    q = FrameQueue(24, clock=clock)
    p = Presenter(q, FPS, clock=clock)
    q.put(chunk(0))
    first = p.poll()
    assert int(first[0, 0, 0]) == 0
    p.freeze(True)
    q.put(chunk(12), timeout=0)
    for _ in range(40):
        clock.t += PERIOD
        assert p.poll() is None
    assert not q.put(chunk(24), timeout=0), "producer kept running while frozen"
    assert p.underruns == 0
    p.freeze(None)  # toggles off
    assert not p.frozen
    got = [int(p.poll()[0, 0, 0])]
    for _ in range(5):
        clock.t += PERIOD
        got.append(int(p.poll()[0, 0, 0]))
    assert got == [1, 2, 3, 4, 5, 6]


def test_generated_fps_from_engine_time_per_chunk():
    clock = FakeClock()
    q = FrameQueue(24, clock=clock)
    assert q.generated_fps() is None
    for i in range(6):
        clock.t += 0.5  # engine time for this chunk
        assert q.put(chunk(i * 12), timeout=0)
        q.clear()
    assert q.generated_fps() == pytest.approx(24.0)
    assert q.chunk_seconds() == pytest.approx(0.5)


def test_generated_fps_with_real_thread_blocked_on_full_queue():
    q = FrameQueue(12)
    stop = threading.Event()

    def producer():
        i = 0
        while not stop.is_set():
            time.sleep(0.02)  # "engine": 12 frames in 20 ms = 600 fps
            if not q.put(chunk(i), timeout=1.0):
                return
            i += 12

    th = threading.Thread(target=producer)
    th.start()
    for _ in range(8):
        time.sleep(0.1)  # slow consumer: the producer spends most time blocked
        q.clear()
    stop.set()
    q.close()
    th.join(2.0)
    assert 200 < q.generated_fps() < 620  # not the ~120 fps the consumer allowed


def test_torch_chunks_and_engine_chunk_objects():
    clock = FakeClock()
    q = FrameQueue(24, clock=clock)
    p = Presenter(q, FPS, clock=clock)

    class Chunk:  # the engine's chunk shape: .frames [n, H, W, 3] uint8, .computed_with
        def __init__(self, frames, computed_with):
            self.frames, self.computed_with = frames, computed_with

    frames = torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1).expand(9, 2, 3, 3).contiguous()
    assert q.put_chunk(Chunk(frames, clock.t - 0.25))
    out = p.poll()
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3) and out.flags["C_CONTIGUOUS"]
    assert p.latency() == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError):
        q.put(np.zeros((2, 4, 4, 3), np.float32))
