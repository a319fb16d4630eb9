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
}


def _is_write(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event, args):
    if event in _REFUSED:
        raise PermissionError(f"sandbox: {_REFUSED[event]} is not allowed ({event})")
    if event == "open" and args and isinstance(args[0], (str, bytes)) and _is_write(args[1], args[2]):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path != _ROOT and not path.startswith(_ROOT + os.sep):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({path})")


def install(allow_forks=False):
    if allow_forks:
        for event in ("os.fork", "os.forkpty"):
            _REFUSED.pop(event, None)
    sys.addaudithook(_hook)
