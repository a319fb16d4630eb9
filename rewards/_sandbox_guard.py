"""Python-level guards installed in the sandboxed interpreter before untrusted code runs (defence in depth).

This file is copied into the sandbox and executed by the system interpreter with ``-I``; it must use only the
standard library. Audit hooks cannot be removed once added; they refuse network sockets, subprocesses, forks,
``ctypes`` and writes outside the working directory. Native code could bypass them, which is why the OS layers
(namespaces, user switch, rlimits) come first; on machines without namespaces these guards are the network fence.
"""

import os
import sys

_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_REFUSED = {
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
}
_PATH_EVENTS = {  # event -> (path arguments that must stay inside the working directory, dir_fd arguments)
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)),
    "os.symlink": ((0, 1), (2,)), "os.link": ((0, 1), (2, 3)), "shutil.rmtree": ((0,), ()),
    "shutil.copyfile": ((1,), ()), "shutil.move": ((0, 1), ()),
}
_NO_DIR_FD = (None, -1, -100)  # what CPython reports when no dir_fd was given
_NATIVE_MODULES = {"_posixsubprocess", "ctypes", "_ctypes", "posix._exit"}


def _is_write(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _inside(value):
    if isinstance(value, int):  # a file descriptor: resolving it is not possible here, refuse
        return False
    path = os.path.realpath(os.fsdecode(value))
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def _hook(event, args):
    if event in _REFUSED:
        raise PermissionError(f"sandbox: {_REFUSED[event]} is not allowed ({event})")
    if event == "import" and args and args[0] in _NATIVE_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and args and _is_write(args[1], args[2]) and (
            not isinstance(args[0], (str, bytes)) or not _inside(args[0])):
        raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({args[0]!r})")
    if event in _PATH_EVENTS:
        paths, dir_fds = _PATH_EVENTS[event]
        for position in dir_fds:  # a dir_fd would resolve relative paths against another directory
            if position < len(args) and args[position] not in _NO_DIR_FD:
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
        for position in paths:
            if position < len(args) and args[position] is not None and not _inside(args[position]):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")


def _guarded_open(path, flags, mode=0o777, *, dir_fd=None, _open=os.open):
    if dir_fd is not None:
        raise PermissionError("sandbox: os.open with dir_fd is not allowed")
    return _open(path, flags, mode)


def install(allow_forks=False):
    if allow_forks:
        for event in ("os.fork", "os.forkpty"):
            _REFUSED.pop(event, None)
    os.open = _guarded_open  # the "open" audit event does not carry dir_fd
    sys.addaudithook(_hook)
