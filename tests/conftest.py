import contextlib
import os
import shutil
import subprocess

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# test_midi imports MidiSender from jack_fixture and registers the module as a plugin for its fixture: its
# asserts are rewritten only if pytest knows it before that first import
pytest.register_assert_rewrite("jack_fixture")


def need_tool(name: str) -> str:
    """A tool's path. Skip when it is missing on a developer's machine; in CI (CI set) that is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but not installed (.ci/run installs it)")
        pytest.skip(f"{name} not installed")
    return path


@contextlib.contextmanager
def xvfb_display():
    """A private Xvfb server (Debian xvfb) for the real-window tests; yields its display name (":N")."""
    need_tool("Xvfb")
    read_fd, write_fd = os.pipe()
    # -displayfd picks a free display number and writes it back: no races with other servers
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x720x24",
                             "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        number = f.readline().strip()
    if not number:
        proc.kill()
        pytest.fail("Xvfb did not start")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def default_folder(tmp_path_factory):
    """The embedded default saved as a diffusers-format Wan folder (exercises the real loader)."""
    from instrument.engine.default import save_folder

    return save_folder(tmp_path_factory.mktemp("wan") / "Wan-tiny")


@pytest.fixture
def main_here(capsys):
    """A command's main(argv) run in this process, as (returncode, stderr): the command line without a fresh
    interpreter's seconds of imports. Each command so run also runs as a real subprocess in its test file."""
    from types import SimpleNamespace

    def run(main, *args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    return run
