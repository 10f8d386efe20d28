"""`instrument devices`: what this machine offers the instrument — MIDI ports, screens, GPUs.

Every section reports what it finds, or in one line why there is nothing (no ALSA sequencer,
no JACK server, no display, no CUDA); nothing here fails on a bare machine.
"""

from __future__ import annotations

import contextlib
import json
import os


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


@contextlib.contextmanager
def _quiet_stderr():
    """Hide what libasound/libjack print straight to fd 2 while probing; our line says it."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def midi_ports() -> dict:
    """{api: {"inputs": [...], "outputs": [...]} or {"error": why}} for ALSA and JACK."""
    import rtmidi

    from .midi import APIS, api_problem, list_ports

    out: dict = {}
    compiled = set(rtmidi.get_compiled_api())
    # libjack may try to start a server when none runs; a listing must not launch one.
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    for api, code in APIS.items():
        if code not in compiled:
            out[api] = {"error": f"this python-rtmidi build has no {api.upper()} support"}
            continue
        try:
            with _quiet_stderr():
                ins, outs = list_ports(api)
        except (rtmidi.RtMidiError, OSError) as e:
            out[api] = {"error": api_problem(api, e)}
            continue
        out[api] = {"inputs": ins, "outputs": outs}
    return out


def screens() -> dict:
    try:
        import pyglet

        display = pyglet.display.get_display()
        found = display.get_screens()
    except Exception as e:  # pyglet raises its own types per platform (NoSuchDisplayException)
        return {"error": f"no display ({type(e).__name__}: {e}); fullscreen needs one, "
                         "e.g. DISPLAY=:0 or Xvfb"}
    return {"screens": [{"index": i, "x": s.x, "y": s.y, "width": s.width,
                         "height": s.height} for i, s in enumerate(found)]}


def gpus() -> dict:
    try:
        import torch
    except Exception as e:
        return {"error": f"torch unavailable: {e}"}
    try:
        if not torch.cuda.is_available():
            return {"error": "no CUDA GPU (the instrument can render on CPU, slowly)"}
        found = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append({"index": i, "name": p.name,
                          "memory_gib": round(p.total_memory / 2**30, 1),
                          "capability": f"{p.major}.{p.minor}"})
        return {"gpus": found}
    except Exception as e:  # a broken driver reports here rather than crashing
        return {"error": f"CUDA present but unusable: {e}"}


def run(args) -> int:
    report = {"midi": midi_ports(), "screens": screens(), "gpus": gpus()}
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
        return 0
    print("MIDI")
    for api, info in report["midi"].items():
        if "error" in info:
            print(f"  {api}: unavailable: {info['error']}")
            continue
        print(f"  {api}:")
        for kind in ("inputs", "outputs"):
            names = info[kind]
            print(f"    {kind}: " + (", ".join(names) if names else "(none)"))
    print("Screens")
    sc = report["screens"]
    if "error" in sc:
        print(f"  none: {sc['error']}")
    for s in sc.get("screens", []):
        print(f"  {s['index']}: {s['width']}x{s['height']} at {s['x']},{s['y']}")
    print("GPUs")
    g = report["gpus"]
    if "error" in g:
        print(f"  none: {g['error']}")
    for d in g.get("gpus", []):
        print(f"  {d['index']}: {d['name']}, {d['memory_gib']} GiB, sm {d['capability']}")
    return 0
