"""RPC workers and a latency proxy on this host, for tests and benchmarks.

``LocalWorker`` runs ``python -m pyllama_mtp.rpc_worker`` as a subprocess on 127.0.0.1.
``DelayProxy`` sits between a client and a worker and delays every chunk of bytes by a
fixed one-way latency (a timestamped queue per direction), so a loopback benchmark can
show what a real network's round trips cost. It also counts round trips: each time the
worker answers after the client has sent something.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process meant to listen on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class LocalWorker:
    """An RPC worker subprocess on 127.0.0.1 (stopped on exit of the with-block)."""

    def __init__(self, *, threads: int = 1, port: int | None = None, cache_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, env: dict | None = None, preexec_fn=None):
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "pyllama_mtp.rpc_worker", "--port", str(self.port), "--threads", str(threads)]
        if cache_dir is not None:
            args += ["--cache", os.fspath(cache_dir)]
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        # its own process group: the worker supervises a serving child, and kill/pause/resume
        # reach both
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            wait_listening(self.port, proc=self.proc)
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.alive():
            self._signal_group(signal.SIGKILL)
        self.proc.wait()
        self._close_log()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status (the worker exits 0 when it stops cleanly)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._close_log()

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _close_log(self) -> None:
        if self._log not in (subprocess.DEVNULL, None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.alive():
            self.resume()
            self.kill()
        else:
            self._close_log()


class DelayProxy:
    """TCP proxy on 127.0.0.1 adding ``one_way_s`` seconds to each direction (RTT = 2x).

    Bytes are forwarded in the order they arrived, each chunk no earlier than its arrival
    time plus the delay. Without ``bytes_per_s`` the bandwidth stays that of loopback and
    only latency is added; with it, each direction is also paced to that rate."""

    def __init__(self, target_port: int, one_way_s: float, port: int | None = None,
                 bytes_per_s: float | None = None):
        self.target_port = target_port
        self.one_way_s = float(one_way_s)
        self.bytes_per_s = bytes_per_s
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.round_trips = 0
        self._last_dir = None
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="delay-proxy").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream, "up")
            self._pipe(upstream, client, "down")

    def _note(self, direction: str) -> None:
        with self._lock:
            if direction == "down" and self._last_dir == "up":
                self.round_trips += 1
            self._last_dir = direction

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        queue: collections.deque = collections.deque()
        ready = threading.Condition()
        line_free = [0.0]   # when the paced link has sent everything queued so far

        def due_time(n_bytes: int) -> float:
            now = time.monotonic()
            if not self.bytes_per_s:
                return now + self.one_way_s
            line_free[0] = max(line_free[0], now) + n_bytes / self.bytes_per_s
            return line_free[0] + self.one_way_s

        def reader():
            try:
                while True:
                    data = src.recv(1 << 20)
                    if not data:
                        break
                    self._note(direction)
                    with ready:
                        queue.append((due_time(len(data)), data))
                        ready.notify()
            except OSError:
                pass
            with ready:
                queue.append((time.monotonic() + self.one_way_s, None))
                ready.notify()

        def writer():
            try:
                while True:
                    with ready:
                        while not queue:
                            ready.wait()
                        due, data = queue.popleft()
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    if data is None:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def reset_count(self) -> None:
        with self._lock:
            self.round_trips = 0
            self._last_dir = None

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
