"""CLI presentation: tables and colour in a terminal, plain lines when piped, ``--json`` the
same either way, help with examples for every command, no progress output when piped."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.cli import main, render_check, render_info  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402

COMMANDS = ["check", "info", "repair", "reembed", "serve", "demo"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("look")
    healthy = str(base / "h")
    cd.make_collection_dir(healthy, n=1200, space="cosine")
    damaged = str(base / "d")
    shutil.copytree(healthy, damaged)
    cd.corrupt(damaged, "entry_point_oob")
    return healthy, damaged


def run_in_pty(args: list[str]) -> tuple[int, str]:
    """Run ``python -m safechroma ARGS`` with stdout and stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "safechroma", *args], stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 120)
            if not ready:
                break
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        rc = proc.wait(timeout=120)
    return rc, b"".join(chunks).decode(errors="replace")


def run_piped(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safechroma", *args], capture_output=True, text=True, timeout=120
    )


def test_terminal_check_has_colour_and_a_table(dirs: tuple[str, str]) -> None:
    healthy, damaged = dirs
    rc, out = run_in_pty(["check", damaged])
    assert rc == 1
    assert "\x1b[" in out  # colour
    assert "DAMAGED" in out and "header_entry_point" in out
    assert "collection" in out and "records" in out and "1,200" in out  # the table
    rc, out = run_in_pty(["info", healthy])
    assert rc == 0 and "\x1b[" in out and "WAL covers all" in out and "cosine" in out


def test_piped_output_is_plain_and_has_no_progress(dirs: tuple[str, str]) -> None:
    healthy, damaged = dirs
    for args, rc in [(["check", damaged], 1), (["info", healthy], 0), (["check", healthy], 0)]:
        p = run_piped(args)
        assert p.returncode == rc, p.stderr
        assert "\x1b" not in p.stdout and "\x1b" not in p.stderr
        assert p.stderr == ""  # no progress bar, no spinner
    first = run_piped(["check", damaged]).stdout.splitlines()[0]
    assert first.startswith("DAMAGED  ") and damaged in first


def test_json_is_the_same_in_a_terminal_and_piped(dirs: tuple[str, str]) -> None:
    _, damaged = dirs

    def strip_times(doc: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in doc.items() if k != "elapsed_s"}

    rc, tty_out = run_in_pty(["check", damaged, "--json"])
    piped = run_piped(["check", damaged, "--json"])
    assert rc == piped.returncode == 1
    assert "\x1b" not in tty_out
    assert strip_times(json.loads(tty_out)) == strip_times(json.loads(piped.stdout))


def test_renderers_draw_tables(dirs: tuple[str, str]) -> None:
    healthy, damaged = dirs
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, color_system="standard")
    render_check(check_directory(damaged), console)
    render_info(check_directory(healthy, deep=False, wal_coverage=True), console)
    text = buf.getvalue()
    assert "\x1b[1;31mDAMAGED" in text  # bold red
    assert "header_entry_point" in text and "index elements" in text and "1,200" in text


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_examples(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    if command == "demo":  # demo passes its arguments on to the demo itself
        args = ["--help"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Examples" in out and "safechroma" in out
    if command is not None:
        assert command in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2
    assert "Missing argument" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main([]) in (0, 2)  # prints the help
