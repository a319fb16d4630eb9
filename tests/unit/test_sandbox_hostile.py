"""A hostile program in the sandbox, run by a trainer as root and by a trainer as an ordinary user.

Each snippet tries one way out (the trainer's secrets, its process, the host's files, the network, a process that
outlives the sandbox), with the in-process guards on and off: the kernel's confinement must hold without them. The
"trainer" is a driver process (so a successful kill shows as a dead driver, not a dead pytest) that runs every
snippet through :func:`rewards.sandbox.run_python` and reports; the test then looks for what got out.
As root, the non-root trainer runs as a user created for the test (``useradd``), from a copy of the sandbox module.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST_USER = "align-sbx-test"
pytestmark = pytest.mark.slow

# {d}: a host directory owned by the trainer's user; {secret_file}: a file only that user can read;
# {port}: a listener on the host's loopback; {tag}: a unique number for the orphan's command line
HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(60)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "flood_stdout": "while True:\n    print('x' * 10000)",
    "write_host_dir": "open({d!r} + '/escaped', 'w').write('escaped')",
    "write_host_tmp": "open('/tmp/align-escaped-{tag}', 'w').write('escaped')",
    "delete_host_file": "import os\nos.remove({d!r} + '/victim')",
    "mkfifo_outside": "import os\nos.mkfifo({d!r} + '/fifo')",
    "sqlite_outside": "import sqlite3\nsqlite3.connect({d!r} + '/db.sqlite').execute('create table t (x)')",
    "read_secret_file": "print(open({secret_file!r}).read())",
    "read_ssh_dirs": "import glob\nfor p in glob.glob('/root/.ssh/*') + glob.glob('/home/*/.ssh/*'):\n"
                     "    print(p, open(p).read())",
    "env_of_other_processes": "import glob\nfor p in glob.glob('/proc/*/environ'):\n"
                              "    try:\n        print(open(p, 'rb').read().decode(errors='replace'))\n"
                              "    except OSError:\n        pass",
    "parent_kill_pidfd": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
    "kill_every_process": "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
                          "        try:\n            os.kill(int(p), 9)\n        except OSError:\n            pass",
    "socket_loopback": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'escaped')",
    "socket_external": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "ctypes_libc": "import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.kill(os.getppid(), 9)\n"
                   "libc.system(b'echo escaped > {d}/ctypes')",
    "guard_tampering": "import sys\nfor m in list(sys.modules.values()):\n"
                       "    getattr(m, '_REFUSED', {{}}).clear() if isinstance(getattr(m, '_REFUSED', None), dict) "
                       "else None\n"
                       "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                       "open({d!r} + '/tampered', 'w').write('escaped')",
    "orphan": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        os.execv('/bin/sleep', ['sleep', '{tag}'])\n    os._exit(0)\ntime.sleep(0.5)",
    "remount_and_chroot": "import os\nos.mkdir('x')\nos.chroot('x')\nos.chdir('../../..')\nos.chroot('.')\n"
                          "print(open({secret_file!r}).read())",
}

DRIVER = """
import json, os, sys, time
from rewards.sandbox import SandboxLimits, run_python
cases = json.load(open(sys.argv[1]))
limits = SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=256 * 2**20, max_processes=16)
out = []
for name, code, guards in cases:
    start = time.monotonic()
    r = run_python(code, limits=limits, python_guards=guards)
    out.append({"name": name, "guards": guards, "ok": r.ok, "returncode": r.returncode, "timed_out": r.timed_out,
                "output": r.stdout[-4000:] + r.stderr[-4000:], "isolation": r.isolation,
                "wall": time.monotonic() - start})
print(json.dumps(out))
"""


def _copy_sandbox_package(target: Path) -> Path:
    """The sandbox module and its one dependency, importable by a user who cannot read the project or the venv."""
    for package, names in (("rewards", ("sandbox.py", "_sandbox_guard.py")), ("align", ("errors.py",))):
        (target / package).mkdir(parents=True)
        (target / package / "__init__.py").write_text("")
        for name in names:
            shutil.copy(ROOT / package / name, target / package / name)
    (target / "driver.py").write_text(DRIVER)
    return target


class Loopback:
    """A listener on the host's 127.0.0.1 that records every connection it accepts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


def _ensure_test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(TEST_USER)


def _run_as_trainer(tmp_path: Path, user: pwd.struct_passwd | None) -> dict:
    """Run every snippet (guards on and off) from a driver process as ``user`` (None: this process's user);
    returns what the host looks like afterwards."""
    tag = f"31.{secrets.randbelow(10**6):06d}"
    secret = "s3cr3t-" + secrets.token_hex(8)
    host_dir = tmp_path / "trainer-home"
    host_dir.mkdir()
    (host_dir / "victim").write_text("must survive")
    secret_file = host_dir / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    package = _copy_sandbox_package(tmp_path / "pkg")
    listener = Loopback()
    fields = {"d": str(host_dir), "secret_file": str(secret_file), "port": listener.port, "tag": tag}
    cases = [[name, code.format(**fields), guards]
             for name, code in sorted(HOSTILE.items()) for guards in (True, False)]
    (package / "cases.json").write_text(json.dumps(cases))
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(package), "ALIGN_SANDBOX_SECRET": secret}
    python = [sys.executable] if user is None else ["/usr/bin/python3"]
    drop: list[str] = []
    if user is not None:
        for path in (tmp_path, host_dir, package, *package.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
        tmp_path.chmod(0o755)
        drop = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        env["HOME"] = str(host_dir)
    try:
        driver = subprocess.run([*drop, *python, str(package / "driver.py"), str(package / "cases.json")],
                                capture_output=True, text=True, env=env, cwd=str(host_dir), timeout=600)
    finally:
        listener.close()
    time.sleep(0.3)
    orphans = subprocess.run(["pgrep", "-f", f"sleep {tag}"], capture_output=True, text=True).stdout.split()
    for pid in orphans:
        subprocess.run(["kill", "-9", pid], check=False)
    return {"driver": driver, "secret": secret, "host_dir": host_dir, "tag": tag, "listener": listener,
            "orphans": orphans}


def _assert_nothing_got_out(seen: dict) -> None:
    driver = seen["driver"]
    assert driver.returncode == 0, f"the trainer died or failed: {driver.returncode} {driver.stderr[-2000:]}"
    results = json.loads(driver.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(HOSTILE)  # the trainer lived through every snippet
    for r in results:
        label = f"{r['name']} (guards {'on' if r['guards'] else 'off'})"
        assert seen["secret"] not in r["output"], f"{label} read a secret"
        assert r["wall"] < 3.0 + 3, f"{label} ran {r['wall']:.1f}s"
        assert {"netns", "mountns", "pidns", "private_root", "no_caps"} <= set(r["isolation"]), label
    host_dir = seen["host_dir"]
    assert (host_dir / "victim").read_text() == "must survive"
    assert sorted(p.name for p in host_dir.iterdir()) == ["secret", "victim"], "a file was created on the host"
    assert not Path(f"/tmp/align-escaped-{seen['tag']}").exists()
    assert seen["listener"].accepted == 0, "a snippet reached the host's loopback"
    assert not seen["orphans"], "a process outlived its sandbox"
    by_case = {(r["name"], r["guards"]): r for r in results}
    for name in ("infinite_loop", "sleep_forever", "memory_bomb", "fork_bomb", "flood_stdout", "read_secret_file",
                 "socket_loopback", "socket_external", "delete_host_file", "write_host_dir"):
        for guards in (True, False):
            assert not by_case[name, guards]["ok"], f"{name} (guards {guards}) finished normally"


@pytest.fixture(scope="module")
def confined() -> None:
    from rewards.sandbox import confinement

    state = confinement()
    if not state.namespaces:
        pytest.skip(f"no namespaces here ({state.reason}): code_tests refuses to run (tested in test_sandbox.py)")


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A fresh directory under /tmp (pytest's own tmp_path is not reachable by another user)."""
    path = Path(tempfile.mkdtemp(prefix="align-hostile-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_hostile_program_gets_nothing_from_a_trainer_running_as_this_user(workspace: Path, confined: None) -> None:
    _assert_nothing_got_out(_run_as_trainer(workspace, None))


@pytest.mark.skipif(os.geteuid() != 0, reason="the test above already runs the trainer as a non-root user")
def test_a_hostile_program_gets_nothing_from_a_trainer_running_as_an_ordinary_user(workspace: Path,
                                                                                  confined: None) -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the ordinary user's trainer needs a system /usr/bin/python3")
    _assert_nothing_got_out(_run_as_trainer(workspace, _ensure_test_user()))
