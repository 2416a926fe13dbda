"""The test side of forkserver.py: `launch()` starts `python -m <module> args...` (or, for a module
ending in .py, `python <script> args...`) as a child of this
pytest worker's fork server and returns a Popen-like handle (pid, poll, wait, communicate,
send_signal, kill, stdout/stderr pipes). One fork server per pytest worker, started on first use."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent


class ForkServer:
    def __init__(self) -> None:
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py"), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            cwd=HERE.parent,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        assert json.loads(self.socket.recv(1024)) == {"ready": True}
        self.changed = threading.Condition()
        self.pids: dict[int, int] = {}  # request id -> pid
        self.statuses: dict[int, int] = {}  # pid -> raw wait status
        self.next_id = 0
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while message := self.socket.recv(65536):
            answer = json.loads(message)
            with self.changed:
                if "status" in answer:
                    self.statuses[answer["pid"]] = answer["status"]
                else:
                    self.pids[answer["id"]] = answer["pid"]
                self.changed.notify_all()

    def spawn(
        self,
        module: str,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        new_session: bool,
        stdout_fd: int,
        stderr_fd: int,
        max_files: int | None = None,
    ) -> int:
        with self.changed:
            request_id = self.next_id = self.next_id + 1
        request = {
            "id": request_id,
            "module": module,
            "argv": argv,
            "cwd": str(cwd),
            "env": env,
            "new_session": new_session,
            "max_files": max_files,
        }
        socket.send_fds(self.socket, [json.dumps(request).encode()], [stdout_fd, stderr_fd])
        with self.changed:
            self.changed.wait_for(lambda: request_id in self.pids, timeout=60)
            return self.pids[request_id]

    def status(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.statuses, timeout=timeout)
            return self.statuses.get(pid)


_server: ForkServer | None = None


def server() -> ForkServer:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = ForkServer()
    return _server


class Forked:
    """What subprocess.Popen offers that the tests use, for a child of the fork server."""

    def __init__(
        self,
        module: str,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        new_session: bool,
        stdout: Any,
        stderr: Any,
        max_files: int | None = None,
    ) -> None:
        self.args = [sys.executable, "-m", module, *argv]
        self.returncode: int | None = None
        ends = [self._end(kind) for kind in (stdout, stderr)]
        self.stdout: IO[str] | None = ends[0][0]
        self.stderr: IO[str] | None = ends[1][0]
        self.pid = server().spawn(module, argv, cwd, env, new_session, ends[0][1], ends[1][1], max_files)
        for _, write_end in ends:
            os.close(write_end)

    @staticmethod
    def _end(kind: Any) -> tuple[IO[str] | None, int]:
        if kind == subprocess.PIPE:
            read_end, write_end = os.pipe()
            return os.fdopen(read_end, "r"), write_end
        return None, os.open(os.devnull, os.O_WRONLY)

    def poll(self) -> int | None:
        if self.returncode is None:
            status = server().status(self.pid, timeout=0)
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, like Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        status = server().status(self.pid, timeout=timeout)
        if status is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        output: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda n=name, f=f: output.__setitem__(n, f.read()), daemon=True)
            for name, f in (("out", self.stdout), ("err", self.stderr))
            if f is not None
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(deadline - time.monotonic(), 0))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return output.get("out"), output.get("err")

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def launch(
    module: str,
    *argv: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    max_files: int | None = None,
) -> Forked:
    """`max_files`: the child's limit of open files (RLIMIT_NOFILE), as a preexec_fn would set it."""
    return Forked(
        module,
        list(argv),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        new_session=new_session,
        stdout=stdout,
        stderr=stderr,
        max_files=max_files,
    )


def run(
    module: str, *argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    child = launch(module, *argv, cwd=cwd, env=env)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)
