"""The `instrument` command: one subcommand per module, each with configure(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError  # noqa: F401  (re-exported: commands raise instrument.cli.UserError)

COMMANDS = {
    "render": ("instrument.render", "render video headless to a file"),
    "check": ("instrument.bends.patch", "validate a patch file"),
    "play": ("instrument.stage.play", "play live: fullscreen window, MIDI and OSC"),
    "devices": ("instrument.control.devices", "list MIDI ports, screens and GPUs"),
    "bench": ("instrument.bench", "measure speed on this machine"),
}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instrument", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.configure(p)
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command not in modules:
        print(f"instrument: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as e:
        print(f"instrument {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
