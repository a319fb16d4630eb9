"""Run untrusted Python (model-generated code) in a separate, confined process.

The confinement is made by the kernel, never by the untrusted process itself. ``SandboxResult.isolation`` lists the
layers that were active:

* ``netns``, ``mountns``, ``pidns`` and ``private_root``: the code runs in new network, mount and PID namespaces.
  Its root filesystem is a fresh tmpfs holding only read-only binds of the system directories (``/usr``, ``/lib*``,
  ``/bin``, ``/sbin``), ``/dev/null|zero|random|urandom``, its own ``/proc`` and size-capped tmpfs ``/work`` (a copy
  of the given files, the working directory) and ``/tmp``; the host's root is detached (``pivot_root``), so no home
  directory, project file, socket file or other process is reachable, nothing it writes reaches the host, it has no
  network interface but a downed loopback, and the whole process tree dies with it (PID namespace).
* As root: ``uid``, the code runs as ``nobody`` (65534). As any other user: ``userns``, the namespaces come from an
  unprivileged user namespace (``unshare --user``, the mechanism bubblewrap uses), where the code is a root with no
  capabilities and no power over anything outside.
* ``no_caps`` (with namespaces): every capability dropped (bounding set included) and ``no_new_privs``.
* ``rlimits`` (always): CPU time, address space, file size, open files, process count, no core dumps; plus a
  wall-clock timeout that kills the process group.
* ``clean_env`` (always): an empty environment (no secrets), ``python -I -B``: no user site, no PYTHON* variables.
* ``python_guards`` (on by default): audit hooks refusing sockets, subprocesses, forks and ``ctypes``. Defence in
  depth only: the code can disable them from inside (it owns its interpreter), so nothing depends on them.

Where the kernel gives no namespaces (a container that forbids ``unshare``), :func:`run_python` refuses with a
one-line reason unless the caller opts in with ``allow_unconfined=True``; the code then runs on the host filesystem
in a temporary directory with only rlimits, a clean environment, a new session, ``PR_SET_PDEATHSIG`` and the Python
guards, which a hostile program can defeat. The interpreter is the system ``/usr/bin/python3`` when it exists (the
standard library only), else ``sys.executable`` (whose installation is bound read-only into the private root).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
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
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_DEVICES = ("null", "zero", "random", "urandom")
_RESERVED = ("main.py", "_entry.py", "_sandbox_guard.py")


class SandboxUnavailable(InputError):
    """The kernel gives no namespaces here and the caller did not opt into running code unconfined."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20  # address space
    max_processes: int = 32  # per user: as a non-root user this counts the caller's own processes and threads too
    max_file_bytes: int = 2**20  # per file, stdout and stderr included
    max_open_files: int = 64
    scratch_bytes: int = 16 * 2**20  # each tmpfs (/work, /tmp) when namespaces are available

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


@dataclass(frozen=True)
class Confinement:
    """What this machine's kernel allows: ``namespaces`` is False when the probe failed, with the reason."""

    namespaces: bool
    reason: str


@functools.lru_cache(maxsize=1)
def _interpreter() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def _extra_binds() -> tuple[str, ...]:
    """Host directories the interpreter needs beyond the system ones (a Python installed outside /usr)."""
    python = Path(_interpreter()).resolve()
    if python.parts[1:2] and python.parts[1] in _SYSTEM_DIRS:
        return ()
    return (str(Path(sys.base_prefix).resolve()),)


def _setup_script(limits: SandboxLimits, as_root: bool) -> str:
    """The shell run as PID 1 of the new namespaces: build the private root in ``$0/root``, copy ``$0/work`` into
    it, detach the host's root, then exec the rest of the command line (the limits, the privilege drop, python)."""
    size = limits.scratch_bytes
    lines = [
        "set -eu",
        'R="$0/root"',
        "mount --make-rprivate /",
        'mount -t tmpfs -o size=4m,mode=0755 tmpfs "$R"',
        "for d in " + " ".join(_SYSTEM_DIRS) + "; do",
        '  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d";',
        '  elif [ -d "/$d" ]; then mkdir "$R/$d"; mount --rbind -o ro "/$d" "$R/$d"; fi',
        "done",
    ]
    for extra in _extra_binds():
        q = shlex.quote(extra)
        lines.append(f'mkdir -p "$R"{q}; mount --rbind -o ro {q} "$R"{q}')
    lines += [
        'mkdir "$R/etc" "$R/work" "$R/tmp" "$R/proc" "$R/dev" "$R/.old"',
        # the dynamic loader's cache only: /etc may hold secrets readable by the caller
        'if [ -f /etc/ld.so.cache ]; then touch "$R/etc/ld.so.cache"; '
        'mount --bind -o ro /etc/ld.so.cache "$R/etc/ld.so.cache"; fi',
        f'mount -t tmpfs -o size={size},mode=0777 tmpfs "$R/work"',
        f'mount -t tmpfs -o size={size},mode=1777 tmpfs "$R/tmp"',
        'cp -R "$0/work/." "$R/work/"',
        *([f'chown -R {NOBODY}:{NOBODY} "$R/work"'] if as_root else []),
        "for f in " + " ".join(_DEVICES) + '; do touch "$R/dev/$f"; mount --bind "/dev/$f" "$R/dev/$f"; done',
        'mount -t proc -o nosuid,nodev,noexec proc "$R/proc"',
        'mount -o remount,ro,bind "$R"',
        'cd "$R"',
        "pivot_root . .old",
        "umount -l /.old",
        "cd /work",
        'exec "$@"',
    ]
    return "\n".join(lines)


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


def _drop_privileges(as_root: bool) -> list[str]:
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_root else []
    return ["setpriv", *user, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]


def _confined_command(root: Path, entry: str, limits: SandboxLimits) -> tuple[list[str], tuple[str, ...]]:
    """(argv, isolation layers) running ``entry`` inside fresh namespaces; ``root`` holds ``work/`` and an empty
    ``root/`` to become the private root."""
    as_root = os.geteuid() == 0
    user = [] if as_root else ["--user", "--map-root-user"]
    # the limits apply inside, after the namespaces are set up: as a non-root user the process count covers the
    # caller's own threads, which must not stop unshare's fork
    inner = [*_prlimit(limits), *_drop_privileges(as_root), _interpreter(), "-I", "-B", entry]
    argv = ["unshare", *user, "--net", "--mount", "--pid", "--fork", "--kill-child",
            "sh", "-c", _setup_script(limits, as_root), str(root), *inner]
    layers = ("netns", "mountns", "pidns", "private_root", "uid" if as_root else "userns", "no_caps", "rlimits",
              "clean_env")
    return argv, layers


def _unconfined_command(workdir: Path, entry: str, limits: SandboxLimits) -> tuple[list[str], tuple[str, ...]]:
    as_root = os.geteuid() == 0
    if as_root:
        os.chown(workdir, NOBODY, NOBODY)
        for child in workdir.iterdir():
            os.chown(child, NOBODY, NOBODY)
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all"] if as_root else ["setpriv", "--no-new-privs"]
    argv = [*_prlimit(limits), *drop, "--pdeathsig", "KILL", _interpreter(), "-I", "-B", entry]
    return argv, ("rlimits", "clean_env", *(("uid",) if as_root else ()), "pdeathsig")


@functools.lru_cache(maxsize=1)
def confinement() -> Confinement:
    """Whether untrusted code can be confined by namespaces here: probed once per process by running the real
    confined command on an empty program."""
    missing = [tool for tool in ("unshare", "setpriv", "prlimit", "pivot_root") if not shutil.which(tool)]
    if missing:
        return Confinement(False, f"{missing[0]} is not installed (util-linux)")
    try:
        result = _run("pass", {}, "", SandboxLimits(cpu_seconds=5, wall_seconds=20.0), python_guards=False,
                      confined=True)
    except OSError as err:
        return Confinement(False, str(err))
    if result.ok:
        return Confinement(True, "")
    detail = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
    return Confinement(False, f"creating namespaces failed: {detail[:200]}")


def namespaces_available() -> bool:
    """Whether the kernel lets this user create the sandbox's namespaces (see :func:`confinement`)."""
    return confinement().namespaces


def require_confinement() -> None:
    """Raise :class:`SandboxUnavailable` (one line: why, and the fixes) when namespaces cannot be created here."""
    state = confinement()
    if not state.namespaces:
        raise SandboxUnavailable(
            f"untrusted code cannot be confined on this machine ({state.reason}); enable unprivileged user "
            "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, or a container "
            "run with --security-opt seccomp=unconfined) or opt in to weaker isolation with allow_unconfined: true")


def run_python(
    code: str,
    *,
    files: Mapping[str, str] | None = None,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    python_guards: bool = True,
    allow_unconfined: bool = False,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a confined process; ``files`` are written next to it.

    Never raises because of what the code does: a crash, a limit or a timeout shows in the result. Raises
    :class:`SandboxUnavailable` when the machine cannot confine it and ``allow_unconfined`` is False.
    """
    limits = limits or SandboxLimits()
    files = dict(files or {})
    for name in files:
        if "/" in name or "\0" in name or name.startswith(".") or name in _RESERVED:
            raise InputError(f"sandbox file names must be plain and not reserved, got {name!r}")
    confined = namespaces_available()
    if not confined and not allow_unconfined:
        require_confinement()
    return _run(code, files, stdin, limits, python_guards=python_guards, confined=confined)


def _run(code: str, files: Mapping[str, str], stdin: str, limits: SandboxLimits, *, python_guards: bool,
         confined: bool) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="align-sbx-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the user namespace's root (the caller, or nobody) must reach work/ and root/
        workdir = root / "work"
        workdir.mkdir(mode=0o777)
        (root / "root").mkdir(mode=0o755)
        (workdir / "main.py").write_text(code)
        for name, text in files.items():
            (workdir / name).write_text(text)
        shutil.copy(_GUARD, workdir / "_sandbox_guard.py")
        guard = "import _sandbox_guard; _sandbox_guard.install(); del _sandbox_guard\n" if python_guards else ""
        (workdir / "_entry.py").write_text(
            "import sys, runpy\nsys.path.insert(0, '')\n" + guard
            + "sys.argv = ['main.py']\nrunpy.run_path('main.py', run_name='__main__')\n"
        )
        if confined:
            argv, layers = _confined_command(root, "_entry.py", limits)
            cwd = "/"
        else:
            argv, layers = _unconfined_command(workdir, "_entry.py", limits)
            cwd = str(workdir)
        if python_guards:
            layers = (*layers, "python_guards")
        out_path, err_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
                                    start_new_session=True)
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # whatever the code left behind in its session goes too
        wall = time.monotonic() - start
        cap = limits.max_file_bytes
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=_read_capped(out_path, cap),
            stderr=_read_capped(err_path, cap),
            timed_out=timed_out,
            wall_seconds=wall,
            isolation=layers,
        )


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode(errors="replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
