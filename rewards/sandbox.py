"""Run untrusted Python (model-generated code) in a separate, confined process.

Layers, strongest first (``SandboxResult.isolation`` lists the ones that were active):

* ``netns``, ``mountns``, ``pidns`` (where the kernel lets ``unshare`` create namespaces, e.g. as root): no network
  interface but loopback-less isolation; the root filesystem is remounted read-only, /tmp, /var/tmp and /dev/shm are
  fresh size-capped tmpfs, and the working directory is a tmpfs holding a copy of the given files, so nothing the
  code writes reaches the host; the whole process tree dies with the sandbox.
* ``uid``: when started as root, the code runs as ``nobody`` (65534) with no capabilities and no new privileges,
  which also makes the process-count limit effective (the kernel exempts root from it).
* ``rlimits`` (always): CPU time, address space, file size, open files, process count, no core dumps; plus a
  wall-clock timeout that kills the process group.
* ``clean_env`` (always): an empty environment (no secrets), ``python -I -B``: no user site, no PYTHON* variables.
* ``python_guards`` (on by default): audit hooks refusing sockets, subprocesses, forks, ctypes and writes outside the
  working directory. Without namespaces this is the only network fence: native code could bypass it.

Fallback without namespaces: the code runs in a fresh temporary directory on the host filesystem, confined by the
user switch (root only), rlimits and the Python guards. The interpreter is the system ``/usr/bin/python3`` when it
exists (reachable by ``nobody``), else ``sys.executable``; only the standard library is available to the code.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from align.errors import InputError

NOBODY = 65534
_GUARD = Path(__file__).with_name("_sandbox_guard.py")
_SCRATCH_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20  # address space
    max_processes: int = 32
    max_file_bytes: int = 2**20  # per file, stdout and stderr included
    max_open_files: int = 64
    scratch_bytes: int = 16 * 2**20  # each tmpfs (working directory, /tmp, ...) when namespaces are available

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise InputError(f"sandbox limit {name} must be > 0, got {value}")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed for the wall-clock limit; negative for a signal
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    isolation: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def _interpreter() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether ``unshare`` can create network, mount and PID namespaces here (probed once per process)."""
    if not shutil.which("unshare"):
        return False
    try:
        probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "true"],
                               capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _mount_point() -> str:
    for candidate in ("/mnt", "/srv", "/media"):
        if os.path.isdir(candidate):
            return candidate
    raise InputError("the sandbox needs an existing empty directory to mount its workspace on (/mnt, /srv or /media)")


def _prlimit(limits: SandboxLimits) -> list[str]:
    return [
        "prlimit",
        f"--cpu={limits.cpu_seconds}",
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.max_file_bytes}",
        f"--nofile={limits.max_open_files}",
        f"--nproc={limits.max_processes}",
        "--core=0",
        "--",
    ]


def _drop_privileges() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all"]


def _command(workdir: Path, entry: str, limits: SandboxLimits) -> tuple[list[str], str, tuple[str, ...]]:
    """(argv, cwd, isolation layers) for running ``entry`` from ``workdir``."""
    as_root = os.geteuid() == 0
    python = [_interpreter(), "-I", "-B", entry]
    layers = ["rlimits", "clean_env"] + (["uid"] if as_root else [])
    run = _drop_privileges() + python if as_root else python
    if namespaces_available() and as_root:
        target = _mount_point()
        size = limits.scratch_bytes
        scratch = " && ".join(
            f"{{ [ ! -d {m} ] || mount -t tmpfs -o size={size},mode=1777 tmpfs {m}; }}" for m in _SCRATCH_MOUNTS)
        setup = (
            "set -e; mount --make-rprivate /; "
            f"mount -t tmpfs -o size={size},mode=0777 tmpfs {target}; cp -a \"$0\"/. {target}/; "
            f"chown -R {NOBODY}:{NOBODY} {target}; {scratch}; mount -o remount,bind,ro /; cd {target}; exec \"$@\""
        )
        argv = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                "sh", "-c", setup, str(workdir), *run]
        return _prlimit(limits) + argv, "/", ("netns", "mountns", "pidns", *layers)
    if as_root:
        os.chown(workdir, NOBODY, NOBODY)
        for child in workdir.iterdir():
            os.chown(child, NOBODY, NOBODY)
    return _prlimit(limits) + run, str(workdir), tuple(layers)


def run_python(
    code: str,
    *,
    files: Mapping[str, str] | None = None,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    python_guards: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a confined process; ``files`` are written next to it.

    Never raises because of what the code does: a crash, a limit or a timeout shows in the result.
    """
    limits = limits or SandboxLimits()
    files = dict(files or {})
    for name in files:
        if "/" in name or name.startswith(".") or name in ("main.py", "_entry.py", "_sandbox_guard.py"):
            raise InputError(f"sandbox file names must be plain and not reserved, got {name!r}")
    with tempfile.TemporaryDirectory(prefix="align-sbx-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o711)  # nobody must traverse it to reach work/ (no listing)
        workdir = root / "work"
        workdir.mkdir(mode=0o777)
        (workdir / "main.py").write_text(code)
        for name, text in files.items():
            (workdir / name).write_text(text)
        shutil.copy(_GUARD, workdir / "_sandbox_guard.py")
        guard = "import _sandbox_guard; _sandbox_guard.install(); del _sandbox_guard\n" if python_guards else ""
        (workdir / "_entry.py").write_text(
            "import sys, runpy\nsys.path.insert(0, '')\n" + guard
            + "sys.argv = ['main.py']\nrunpy.run_path('main.py', run_name='__main__')\n"
        )
        argv, cwd, layers = _command(workdir, "_entry.py", limits)
        if python_guards:
            layers = (*layers, "python_guards")
        out_path, err_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        wall = time.monotonic() - start
        cap = limits.max_file_bytes
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=out_path.read_bytes()[:cap].decode(errors="replace"),
            stderr=err_path.read_bytes()[:cap].decode(errors="replace"),
            timed_out=timed_out,
            wall_seconds=wall,
            isolation=layers,
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
