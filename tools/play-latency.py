"""Knob-to-photon latency of `instrument play`, measured through its real OSC port and its --stats report.

    python tools/play-latency.py --chunk 1 --seconds 25 [--settle 60] [-- more play options, e.g. --fp8]

Starts `instrument play --headless` (frames paced at the playback rate, no window), sends `/prompt/blend`
to random values at random intervals of 0.2-0.6 s over OSC while it plays, and prints play's summary line
and the latency it measured (from a control message's arrival to the first frame computed with it being
handed to the screen), with the generated and shown frame rates. On a GPU play compiles and captures
before its first frame (its warm-up), so a few seconds of --settle are enough; with `-- --warm-up off` the
first chunks compile while play plays, and --settle must outlast that. Headless, the frame is "shown"
when the presenter hands it out; a window adds one buffer swap.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pythonosc.udp_client import SimpleUDPClient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", default="3", choices=("1", "3"))
    parser.add_argument("--seconds", type=float, default=25.0, help="seconds of knob moves")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of play before the first move")
    parser.add_argument("--json", default=None, help="write play's --stats report here too")
    parser.add_argument("play_args", nargs="*", help="more `instrument play` options (after --)")
    args = parser.parse_args(argv)
    stats = Path(args.json or tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, "-m", "instrument.cli", "play", "--headless", "--duration", f"{args.settle + args.seconds:g}",
           "--chunk", args.chunk, "--osc-port", "0", "--oscquery-port", "0", "--no-midi", "--stats", str(stats),
           *args.play_args]
    play = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    for line in play.stdout:
        print(line, end="", flush=True)
        m = re.search(r"OSC listening on 127\.0\.0\.1:(\d+)", line)
        port = int(m[1]) if m else port
        if "playing" in line and "headless" in line:
            break
    if port is None:
        print("play did not start listening for OSC", file=sys.stderr)
        play.kill()
        return 1
    osc = SimpleUDPClient("127.0.0.1", port)

    def move():
        time.sleep(args.settle)
        end = time.monotonic() + args.seconds - 3  # stop before the end: the last moves must reach the screen
        while time.monotonic() < end and play.poll() is None:
            osc.send_message("/prompt/blend", random.random())
            time.sleep(random.uniform(0.2, 0.6))

    threading.Thread(target=move, daemon=True).start()
    rest = play.stdout.read()
    if play.wait() != 0:
        print(rest, file=sys.stderr)
        return 1
    print(rest.strip().splitlines()[-1])
    s = json.loads(stats.read_text())
    print(json.dumps({k: s.get(k) for k in ("latency_p50_ms", "latency_p95_ms", "generated_fps", "shown_fps",
                                            "chunks", "underruns")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
