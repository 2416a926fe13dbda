"""A fork server for the end-to-end tests: it imports torch, torchvision, Hydra and this package once,
then forks one child per `python -m <module> args...` (or `python <script.py> args...`) that a test
asks for. Each child is a real process
with its own pid, exit status, signals, process group (on request) and stdout/stderr, and runs the
module exactly as `python -m` would (`runpy`, as `__main__`, then the interpreter's exit steps); only
the ~5 s of imports are skipped.

What a fork cannot reproduce: a CUDA context (none is made here: tests run on the CPU; a test that
needs one must use a true subprocess), state that a module computes at import from the environment
(the imports happen once, with the server's environment), and anything that depends on a fresh
interpreter's memory (a benchmark that measures a process's peak memory starts a true subprocess for
it). torchrun keeps true subprocesses.

Protocol (a SOCK_SEQPACKET socket pair, one JSON message each): a request carries the module, argv, cwd,
environment and whether to start a new session, with the child's stdout and stderr as file descriptors
(SCM_RIGHTS), and optionally a limit of open files; the server answers {"id", "pid"} when it has
forked, and {"pid", "status"} (the raw wait status) when that child has ended.
"""

import atexit
import json
import os
import runpy
import select
import socket
import sys
import threading
import traceback


def preload() -> None:
    import hydra  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import trainer.__main__  # noqa: F401
    import trainer.evaluate  # noqa: F401
    import trainer.predict  # noqa: F401
    import trainer.serve  # noqa: F401

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        pass


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the process `python -m <module> <argv>` would be, run, exit."""
    if request["new_session"]:
        os.setsid()
    if request.get("max_files"):
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (request["max_files"], request["max_files"]))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()  # as `python -m` has it (the server's is this file's folder)
    os.environ.clear()
    os.environ.update(request["env"])
    module = request["module"]
    if module.endswith(".py"):  # `python path/to/script.py`: the script's folder first on sys.path
        sys.path[0] = os.path.dirname(os.path.abspath(module))
    for name in (module, f"{module}.__main__"):  # else runpy warns that it is already imported
        sys.modules.pop(name, None)
    sys.argv = [module, *request["argv"]]
    code = 0
    try:
        if module.endswith(".py"):
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # what the interpreter does on its way out: wait for non-daemon threads, run atexit, flush
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def serve(sock: socket.socket) -> None:
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([sock], [], [], 0.02)
        if readable:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
            if not message:  # the test process has gone
                return
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                sock.close()
                run_child(request, fds)
            for fd in fds:
                os.close(fd)
            running.add(pid)
            sock.send(json.dumps({"id": request["id"], "pid": pid}).encode())
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            sock.send(json.dumps({"pid": pid, "status": status}).encode())


if __name__ == "__main__":
    connection = socket.socket(fileno=int(sys.argv[1]))
    preload()
    connection.send(b'{"ready": true}')
    serve(connection)
