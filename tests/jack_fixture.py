"""A private JACK server (dummy driver) and a MIDI sender in another process, for MIDI tests.

In a test module:  pytest_plugins = ["jack_fixture"] (the jack_server fixture), from jack_fixture import MidiSender
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import need_tool

# The sender: a separate process with its own JACK client, driven line by line on stdin:
#   open <client> <port>   create a virtual output port
#   connect <client> <name-substring>   open an output connected to an existing input port
#   send <byte> <byte> ... send one raw MIDI message
#   close                  close the port (it vanishes from the graph)
# It answers "ok" (or "err <why>") after each line.
SENDER = r"""
import sys, rtmidi
out = None
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "open":
            out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name=words[1])
            out.open_virtual_port(words[2])
        elif words[0] == "connect":
            out = rtmidi.MidiOut(rtapi=rtmidi.API_UNIX_JACK, name=words[1])
            names = out.get_ports()
            out.open_port([i for i, n in enumerate(names) if words[2] in n][0])
        elif words[0] == "send":
            out.send_message([int(w) for w in words[1:]])
        elif words[0] == "close":
            out.close_port(); out.delete(); out = None
        print("ok", flush=True)
    except Exception as e:
        print("err", e, flush=True)
"""


@pytest.fixture(scope="session")
def jack_server():
    """Start `jackd -d dummy` under a unique server name; yields the name."""
    jackd = need_tool("jackd")
    name = f"instr-test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, JACK_DEFAULT_SERVER=name, JACK_NO_AUDIO_RESERVATION="1",
               JACK_NO_START_SERVER="1")
    # -S (synchronous): the server waits for every client each cycle. In JACK2's default asynchronous mode a
    # client late for its cycle (a loaded CI machine, no realtime scheduling) has that cycle's MIDI dropped:
    # 1 to 5 clock pulses were lost in 6 of 7 runs of 300-600 with the cores busy, none with -S (3,000 of 3,000).
    proc = subprocess.Popen([jackd, "--no-realtime", "-S", "-d", "dummy", "-r", "48000", "-p", "128"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    saved = {k: os.environ.get(k) for k in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    os.environ["JACK_DEFAULT_SERVER"] = name
    os.environ["JACK_NO_START_SERVER"] = "1"
    try:
        import rtmidi

        deadline = time.monotonic() + 15
        while True:  # ready when a client can connect
            if proc.poll() is not None:
                pytest.fail(f"jackd exited: {proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                probe = rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK, name="probe")
                probe.delete()
                break
            except rtmidi.SystemError:
                if time.monotonic() > deadline:
                    pytest.fail("jackd did not come up within 15 s")
                time.sleep(0.1)
        yield name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MidiSender:
    """Drives the SENDER process; each method waits for its answer."""

    def __init__(self, server: str):
        env = dict(os.environ, JACK_DEFAULT_SERVER=server, JACK_NO_START_SERVER="1")
        self.proc = subprocess.Popen([sys.executable, "-c", SENDER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def _do(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"sender: {line!r} -> {answer!r}")

    def open(self, client: str, port: str) -> None:
        self._do(f"open {client} {port}")

    def connect(self, client: str, port_substring: str) -> None:
        self._do(f"connect {client} {port_substring}")

    def send(self, *data: int) -> None:
        self._do("send " + " ".join(str(b) for b in data))

    def close_port(self) -> None:
        self._do("close")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
