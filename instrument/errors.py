"""Errors a user can fix: printed as one line by the command line, never as a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file, bad option); the message names it and the fix."""


def module_main(prog: str, doc: str, configure, run, argv=None) -> int:
    """`python -m` entry point of a module with configure(parser) / run(args): a UserError is one line, exit 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
