"""Python-level guards installed in the sandboxed interpreter before untrusted code runs (defence in depth only).

This file is copied into the sandbox and executed by the system interpreter with ``-I``; it must use only the
standard library. Audit hooks cannot be removed once added; they refuse network sockets, subprocesses, forks,
``ctypes`` and writes outside the working directory. The tables are frozen and captured by the hook, and the module
leaves ``sys.modules`` once installed, so clearing them takes more than one line; but code that owns the interpreter
can always get around in-process checks, which is why the confinement comes from the kernel (namespaces, user
switch, rlimits: :mod:`rewards.sandbox`) and nothing depends on these guards.
"""

import os
import sys
from types import MappingProxyType

_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_REFUSED = MappingProxyType({
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "subprocess.Popen": "starting processes",
    "os.system": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes",
    "os.fork": "forking",
    "os.forkpty": "forking",
    "ctypes.dlopen": "loading native code",
    "os.kill": "signalling other processes",
    "os.killpg": "signalling other processes",
})
# event -> (path arguments that must stay inside the working directory, dir_fd arguments)
_PATH_EVENTS = MappingProxyType({
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)),
    "os.symlink": ((0, 1), (2,)), "os.link": ((0, 1), (2, 3)), "shutil.rmtree": ((0,), ()),
    "shutil.copyfile": ((1,), ()), "shutil.move": ((0, 1), ()),
})
_NO_DIR_FD = (None, -1, -100)  # what CPython reports when no dir_fd was given
_NATIVE_MODULES = frozenset({"_posixsubprocess", "ctypes", "_ctypes", "posix._exit"})


def _is_write(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _inside(value):
    if isinstance(value, int):  # a file descriptor: resolving it is not possible here, refuse
        return False
    path = os.path.realpath(os.fsdecode(value))
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def _guarded_open(path, flags, mode=0o777, *, dir_fd=None, _open=os.open):
    if dir_fd is not None:
        raise PermissionError("sandbox: os.open with dir_fd is not allowed")
    return _open(path, flags, mode)


def _make_hook(refused, path_events, native_modules, is_write, inside, no_dir_fd):
    # every table is bound here, not looked up in module globals: rebinding the module's names changes nothing
    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {refused[event]} is not allowed ({event})")
        if event == "import" and args and args[0] in native_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and args and is_write(args[1], args[2]) and (
                not isinstance(args[0], (str, bytes)) or not inside(args[0])):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({args[0]!r})")
        if event in path_events:
            paths, dir_fds = path_events[event]
            for position in dir_fds:  # a dir_fd would resolve relative paths against another directory
                if position < len(args) and args[position] not in no_dir_fd:
                    raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for position in paths:
                if position < len(args) and args[position] is not None and not inside(args[position]):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    return hook


def install(allow_forks=False):
    refused = MappingProxyType({k: v for k, v in _REFUSED.items()
                                if not (allow_forks and k in ("os.fork", "os.forkpty"))})
    os.open = _guarded_open  # the "open" audit event does not carry dir_fd
    sys.addaudithook(_make_hook(refused, _PATH_EVENTS, _NATIVE_MODULES, _is_write, _inside, _NO_DIR_FD))
    sys.modules.pop(__name__, None)
