"""``safechroma run`` and ``safechroma.patch()``: programs nobody rewrote (issue 20).

Every test runs a real program in a real child process, as a user would run it: the program
only knows ``chromadb.PersistentClient``. What it may learn about safechroma it reads from the
outside (the lock file names the worker's pid; ``/proc/<pid>/fd`` says who has
``chroma.sqlite3`` open).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from safechroma.launch.options import OPTIONS

README = Path(__file__).parent.parent / "README.md"

# Shared by the programs below: who has the directory's SQLite file open.
PRELUDE = """
import os, sys, json

def holds_sqlite(pid="self"):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("chroma.sqlite3"):
                return True
        except OSError:
            pass
    return False

def worker_pid(db):
    with open(os.path.join(db, ".safechroma.lock")) as f:
        return int(f.readline())
"""


def run(
    program: str,
    *args: str,
    flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    launcher: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m safechroma run [flags] -- python PROGRAM.py args`` (or without the launcher);
    the program is a file beside the directory ``args[0]`` (spawn children import it)."""
    script = Path(args[0]).parent / f"program_{len(list(Path(args[0]).parent.glob('*.py')))}.py"
    script.write_text(PRELUDE + textwrap.dedent(program))
    cmd = [sys.executable, str(script), *args]
    if launcher:
        cmd = [sys.executable, "-m", "safechroma", "run", *flags, "--", *cmd]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("SAFECHROMA_RUN", None)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=full_env)


def release(db: str) -> None:
    """Ask the worker the program left warm to go (the tests' leak check counts nothing of
    another process's, but the directory is tmp and should be free)."""
    subprocess.run(
        [sys.executable, "-m", "safechroma", "release", db], capture_output=True, timeout=60
    )


def test_every_python_process_of_the_program_gets_one_supervised_worker(db: str) -> None:
    """The main script, a spawn child, a forkserver child and a subprocess that strips
    PYTHONPATH each build chromadb.PersistentClient: all are SafeClients on one worker, and
    no process of the program ever opens chroma.sqlite3 (never two Chromas)."""
    out = run(
        """
        import multiprocessing as mp, subprocess
        import chromadb

        def child(db, q):
            c = chromadb.PersistentClient(db)
            col = c.get_collection("launched")
            col.add(ids=[f"child-{os.getpid()}"], embeddings=[[0.5, 0.5]])
            q.put((type(c).__name__, col.count(), holds_sqlite(), worker_pid(db)))

        if __name__ == "__main__":
            db = sys.argv[1]
            c = chromadb.PersistentClient(db)
            col = c.get_or_create_collection("launched", embedding_function=None)
            col.add(ids=["main"], embeddings=[[1.0, 0.0]])
            seen = {"main": (type(c).__name__, col.count(), holds_sqlite(), worker_pid(db))}
            for method in ("spawn", "forkserver"):
                ctx = mp.get_context(method)
                q = ctx.Queue()
                p = ctx.Process(target=child, args=(db, q))
                p.start()
                seen[method] = q.get(timeout=60)
                p.join(60)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            code = ("import chromadb, sys; c = chromadb.PersistentClient(sys.argv[1]); "
                    "print(type(c).__name__, c.get_collection('launched').count())")
            sub = subprocess.run([sys.executable, "-c", code, db], env=env,
                                 capture_output=True, text=True, timeout=60)
            seen["subprocess"] = sub.stdout.split() + [sub.stderr[-300:]]
            seen["main after"] = col.count()
            print(json.dumps(seen))
        """,
        db,
    )
    try:
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        seen = __import__("json").loads(out.stdout)
        kind, count, holds, wpid = seen["main"]
        assert (kind, count, holds) == ("SafeClient", 1, False)
        for method in ("spawn", "forkserver"):
            assert seen[method][0] == "SafeClient", seen
            assert seen[method][2] is False, f"{method} child opened chroma.sqlite3"
            assert seen[method][3] == wpid, "a second worker on the directory"
        assert seen["spawn"][1] == 2 and seen["forkserver"][1] == 3
        assert seen["subprocess"][:2] == ["SafeClient", "3"], seen["subprocess"]
        assert seen["main after"] == 3
    finally:
        release(db)


def test_stdout_stays_the_programs_and_a_death_is_one_line_on_stderr(db: str) -> None:
    """An MCP stdio server speaks on stdout: not one byte of it may come from safechroma.
    A worker death is a line on stderr by default; --quiet turns it off."""
    program = """
        import signal, time
        import chromadb
        db = sys.argv[1]
        sys.stdout.buffer.write(b"\\x00binary\\xffstart\\n")
        col = chromadb.PersistentClient(db).get_or_create_collection("out", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]])
        os.kill(worker_pid(db), signal.SIGKILL)
        time.sleep(0.2)
        sys.stdout.buffer.write(repr(col.get()["ids"]).encode() + b"\\n")
        """
    try:
        loud = run(program, db)
        assert loud.returncode == 0, loud.stderr.decode()[-3000:]
        assert loud.stdout == b"\x00binary\xffstart\n['a']\n"
        lines = [ln for ln in loud.stderr.decode().splitlines() if ln.startswith("safechroma:")]
        assert len(lines) == 1, loud.stderr.decode()
        assert "died (SIGKILL)" in lines[0] and db in lines[0]
        quiet = run(program, db, flags=("--quiet",))
        assert quiet.returncode == 0, quiet.stderr.decode()[-3000:]
        assert quiet.stdout == loud.stdout
        assert "safechroma:" not in quiet.stderr.decode()
    finally:
        release(db)


def test_options_reach_every_client_from_flags_and_environment(db: str) -> None:
    out = run(
        """
        import chromadb
        c = chromadb.PersistentClient(sys.argv[1])
        opts = c._sup.options
        print(json.dumps([c._replay_writes, c._timeout, c._read_retries, opts.validator,
                          opts.max_requests, opts.keep_warm, opts.breaker.max_deaths]))
        """,
        db,
        flags=("--replay-writes", "1", "--timeout", "7.5", "--breaker", "max_deaths=9"),
        env={
            "SAFECHROMA_READ_RETRIES": "0",
            "SAFECHROMA_VALIDATOR": "none",
            "SAFECHROMA_MAX_REQUESTS": "1000",
            "SAFECHROMA_KEEP_WARM": "0",
        },
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert __import__("json").loads(out.stdout) == [True, 7.5, 0, None, 1000, 0.0, 9]


def test_a_bad_option_is_refused_before_the_program_starts(db: str) -> None:
    out = run("print('ran')", db, env={"SAFECHROMA_TIMEOUT": "soon"})
    assert out.returncode == 2
    assert out.stdout == b""
    assert "SAFECHROMA_TIMEOUT='soon'" in out.stderr.decode()
    out = run("print('ran')", db, flags=("--validator", "no_colon"))
    assert out.returncode == 2 and b"module:function" in out.stderr


def test_safechromas_own_processes_are_never_patched(db: str) -> None:
    """The worker opens Chroma itself: patched, it would wait for itself (a 120 s hang)."""
    out = run(
        """
        import chromadb
        c = chromadb.PersistentClient(sys.argv[1])
        print(json.dumps(c.run_in_worker(
            lambda client: [type(client).__name__, os.environ.get("SAFECHROMA_RUN")])))
        c.close()
        """,
        db,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert __import__("json").loads(out.stdout) == ["Client", None]


@pytest.mark.slow
def test_what_cannot_be_protected_says_so(db: str) -> None:
    """Chroma's native bindings opened directly, and Chroma's own server: a clear message
    naming what to do, never a second Chroma on the directory."""
    direct = run(
        """
        from chromadb.api.client import Client
        from chromadb.config import Settings
        Client(settings=Settings(is_persistent=True, persist_directory=sys.argv[1]))
        """,
        db,
    )
    assert direct.returncode != 0
    assert "not through chromadb.PersistentClient" in direct.stderr.decode()
    assert not os.path.exists(os.path.join(db, "chroma.sqlite3"))
    server = subprocess.run(
        [
            sys.executable,
            "-m",
            "safechroma",
            "run",
            "--",
            sys.executable,
            "-c",
            "import sys; from chromadb.cli.cli import app; sys.argv = ['chroma', 'run', '--path', "
            f"{db!r}]; app()",
        ],
        capture_output=True,
        timeout=120,
    )
    assert server.returncode == 2
    assert "safechroma serve" in server.stderr.decode()
    assert not os.path.exists(os.path.join(db, "chroma.sqlite3"))


def test_the_users_own_sitecustomize_still_runs(db: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys; sys.stderr.write('USER-SITE\\n')\n")
    out = run(
        "import chromadb; print(type(chromadb.PersistentClient(sys.argv[1])).__name__)",
        db,
        env={"PYTHONPATH": str(site)},
    )
    try:
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        assert out.stdout == b"SafeClient\n"
        assert "USER-SITE" in out.stderr.decode()
    finally:
        release(db)


def test_patch_and_unpatch_from_one_line_of_code(db: str) -> None:
    out = run(
        """
        import subprocess
        import chromadb, safechroma
        original = chromadb.PersistentClient
        safechroma.patch(replay_writes=True, keep_warm=0)
        c = chromadb.PersistentClient(sys.argv[1])
        code = ("import chromadb, sys; c = chromadb.PersistentClient(sys.argv[1]); "
                "print(type(c).__name__, c._replay_writes)")
        child = subprocess.run([sys.executable, "-c", code, sys.argv[1]],
                               capture_output=True, text=True, timeout=60)
        first = [type(c).__name__, c._replay_writes, child.stdout.strip(), holds_sqlite()]
        c.close()
        safechroma.unpatch()
        print(json.dumps(first + [chromadb.PersistentClient is original,
                                  "SAFECHROMA_RUN" in os.environ]))
        """,
        db,
        launcher=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert __import__("json").loads(out.stdout) == [
        "SafeClient",
        True,
        "SafeClient True",
        False,
        True,
        False,
    ]


def test_the_readme_lists_every_option_of_the_launcher() -> None:
    text = README.read_text()
    rows = set(re.findall(r"^\| `(SAFECHROMA_[A-Z_]+)` \| `(--[a-z-]+)` \|", text, re.M))
    assert {(s.env, s.flag) for s in OPTIONS} <= rows
    assert {env for env, _ in rows} == {s.env for s in OPTIONS} | {"SAFECHROMA_EVENTS"}


@pytest.mark.parametrize("argv", [["run"], ["run", "--"]])
def test_run_without_a_command_is_a_usage_error(argv: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "safechroma", *argv], capture_output=True, timeout=60
    )
    assert out.returncode == 2
    assert b"no COMMAND" in out.stderr
