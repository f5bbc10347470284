"""``pyllama-mtp-rpc-worker``: serve this host's devices to a ``Llama(..., rpc=[...])`` on
another host, with the package's own llama.cpp build (ggml's RPC backend).

    pyllama-mtp-rpc-worker --host 127.0.0.1 --port 50052 --threads 8
    python -m pyllama_mtp.rpc_worker --port 50052

The RPC protocol has no authentication and no encryption, and a client can make the
worker read and write its memory: run workers only on a network you trust. The worker
binds to 127.0.0.1 unless ``--host`` names another address *and* ``--allow-remote`` is
given. Each connection is served on its own thread (requests that use the devices take
turns); a connection that does not complete the handshake within a second is closed.

The serving loop runs in a child process that this one starts again whenever it dies:
a client can send a graph whose data makes a compute kernel assert (a row index out of
range, say), which aborts the process that runs it. Its clients then lose their
connection (they get ``RpcError``); the port answers again within a second.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("pyllama_mtp.rpc_worker")

DEFAULT_PORT = 50052
SECURITY_WARNING = ("the RPC protocol has no authentication or encryption, and a client can read and "
                    "write this worker's memory: expose it only to hosts you trust")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyllama-mtp-rpc-worker",
        description="Serve this host's devices over llama.cpp's RPC protocol, so that a Llama on another "
                    "host can put model layers here (Llama(model, rpc=['this-host:PORT'])). "
                    + SECURITY_WARNING + ".")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address needs --allow-remote)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads for the computation (default: all cores)")
    p.add_argument("--device", action="append", default=[], metavar="NAME",
                   help="device to serve (repeatable; default: every GPU, else the CPU); see --list-devices")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="keep large tensors here by hash, so a second load of the same model sends only hashes")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow --host to be an address other hosts can reach (read the security warning)")
    p.add_argument("--list-devices", action="store_true", help="print this host's devices and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> str | None:
    """The message of the first problem with the arguments, or None."""
    if not 1 <= args.port <= 65535:
        return f"--port must be in 1..65535, got {args.port}"
    if args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    try:
        ipaddress.IPv4Address(args.host if args.host != "localhost" else "127.0.0.1")
    except ValueError:
        return f"--host must be an IPv4 address (the RPC transport listens on IPv4), got {args.host!r}"
    if not _is_loopback(args.host) and not args.allow_remote:
        return (f"--host {args.host} would let other hosts connect; {SECURITY_WARNING}. "
                "Add --allow-remote to do it anyway")
    return None


def _port_free(host: str, port: int) -> str | None:
    """Bind once ourselves: a clear message beats the backend's 'failed to create server socket'."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def serve(host: str, port: int, *, threads: int, devices=(), cache_dir: str | None = None) -> None:
    """Serve until the process gets SIGINT or SIGTERM (then exits with status 0).

    Raises RpcError if the worker cannot start. The serving loop lives in native code and
    cannot be interrupted, so a signal ends the process (its sockets close with it: the
    client sees a lost connection)."""
    from ._native import check, ffi, lib
    from .engine import rpc_protocol_version
    from .errors import RpcError

    version = rpc_protocol_version()
    if version is None:
        raise RpcError("this build has no RPC backend; rebuild with GGML_RPC=ON")
    problem = _port_free(host, port)
    if problem:
        raise RpcError(problem)
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    endpoint = f"{'127.0.0.1' if host == 'localhost' else host}:{port}"
    names = [ffi.new("char[]", d.encode()) for d in devices]
    name_array = ffi.new("const char *[]", names) if names else ffi.NULL
    cache = ffi.new("char[]", str(cache_dir).encode()) if cache_dir else ffi.NULL
    failure: list[BaseException] = []
    stop = threading.Event()

    def run():
        try:
            check(lib.pmtp_rpc_serve(endpoint.encode(), cache, threads, name_array, len(names)))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)
        finally:
            stop.set()

    def on_signal(signum, _frame):
        log.info("stopping the RPC worker on %s (%s)", endpoint, signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("RPC worker: protocol %s, listening on %s, %d threads, cache %s", version, endpoint, threads,
             cache_dir or "off")
    if not _is_loopback(host):
        log.warning("listening on %s: %s", host, SECURITY_WARNING)
    thread = threading.Thread(target=run, name="rpc-worker", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # The native loop is still blocked in accept() or serving a client: leave without waiting.
    os._exit(0)


def _die_with_parent() -> None:
    """In the serving child: end when the supervisor ends, however it ends (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def supervise(child_argv: list[str]) -> int:
    """Run the serving process and start it again when it dies; its exit status when it
    ends by itself (0 after SIGINT/SIGTERM reached it, 1 when it cannot start)."""
    stop = threading.Event()
    child: list[subprocess.Popen] = []

    def on_signal(signum, _frame):
        stop.set()
        if child and child[-1].poll() is None:
            child[-1].send_signal(signum)      # it logs and exits 0

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    deaths: list[float] = []
    try:
        while True:
            child.append(subprocess.Popen([sys.executable, "-m", "pyllama_mtp.rpc_worker", "--serve-child",
                                           *child_argv], preexec_fn=_die_with_parent))
            code = child[-1].wait()
            if stop.is_set() or code >= 0:
                return 0 if stop.is_set() else code
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            log.warning("the serving process died (%s), probably from a malformed request; starting it again", name)
            deaths = [t for t in deaths if time.monotonic() - t < 10] + [time.monotonic()]
            if len(deaths) > 5:                # dying over and over: do not spin
                time.sleep(1.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_child = "--serve-child" in argv
    if serve_child:
        argv.remove("--serve-child")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not args.quiet:
        logging.getLogger("pyllama_mtp.llama_cpp").setLevel(logging.INFO)
    from .errors import PmtpError
    if args.list_devices:
        from .engine import local_devices
        for d in local_devices():
            print(f"{d.name}\t{d.type}\t{d.memory_total // 2**20} MiB\t{d.description}")
        return 0
    problem = check_args(args)
    if problem:
        print(f"pyllama-mtp-rpc-worker: error: {problem}", file=sys.stderr)
        return 2
    if not serve_child:
        return supervise(argv)
    try:
        serve(args.host, args.port, threads=args.threads, devices=args.device, cache_dir=args.cache)
    except PmtpError as e:
        print(f"pyllama-mtp-rpc-worker: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
