"""The RPC worker against careless and hostile peers: idle and empty connections must not
keep a real client waiting (vendor/patches/0016), and a thousand malformed messages must
neither kill the worker nor stop it from serving a model correctly afterwards."""
from __future__ import annotations

import random
import socket
import struct
import time

import pytest

from pyllama_mtp import Llama, build_info
from factories.rpc_local import LocalWorker, wait_listening
from test_rpc import _hello as hello, recv_exactly

pytestmark = pytest.mark.skipif(not build_info().get("rpc"), reason="this build has no RPC backend")

PROMPT = "the quick brown fox"
ALLOC_BUFFER, BUFFER_GET_BASE, SET_TENSOR, GRAPH_COMPUTE = 0, 3, 6, 10
GET_ROWS = 40                       # ggml_op
N_COMMANDS = 19


def generate(path, **kw):
    with Llama(path, threads=1, n_ctx=256, **kw) as llm:
        return llm.generate(PROMPT, max_tokens=24).tokens


def call(conn, cmd, payload, reply=True):
    conn.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    if reply:
        size, = struct.unpack("<Q", recv_exactly(conn, 8))
        return recv_exactly(conn, size)
    return None


def rpc_tensor(rng, buffer, data, *, tid=1, op=0, type_=0, ne=(4, 1, 1, 1), src=()):
    """The worker's packed tensor: id, type, buffer, ne[4], nb[4], op, op_params[16], flags,
    src[10], view_src, view_offs, data, name[64], use_count."""
    nb0 = 4
    nb = tuple(x & 0xFFFFFFFF for x in (nb0, nb0 * ne[0], nb0 * ne[0] * ne[1], nb0 * ne[0] * ne[1] * ne[2]))
    srcs = list(src) + [0] * (10 - len(src))
    return (struct.pack("<QIQ4I4II16iI10QQQQ", tid, type_, buffer, *ne, *nb, op,
                        *[rng.randrange(-2**31, 2**31) if rng.random() < 0.2 else 0 for _ in range(16)], 0,
                        *srcs, 0, 0, data) + bytes(64) + struct.pack("<i", 1))


def with_flags(tensor: bytes, flags: int) -> bytes:
    at = 8 + 4 + 8 + 16 + 16 + 4 + 64          # id, type, buffer, ne, nb, op, op_params
    return tensor[:at] + struct.pack("<i", flags) + tensor[at + 4:]


@pytest.fixture(scope="module")
def reference(step35_path):
    return generate(step35_path)


def test_idle_and_empty_connections_do_not_keep_a_client_waiting(step35_path, reference, tmp_path):
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        addr = ("127.0.0.1", worker.port)
        # a connection that never says hello is closed by the worker within about a second
        silent = socket.create_connection(addr)
        silent.settimeout(10)
        t0 = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - t0 < 3.0
        # connections that said hello and went idle, and some that said nothing yet
        idle = [socket.create_connection(addr) for _ in range(8)]
        for conn in idle[:4]:
            hello(conn)
        # 200 connect-then-close (a port scan, health probes): they used to take 79 s
        t0 = time.monotonic()
        for _ in range(200):
            socket.create_connection(addr).close()
        assert time.monotonic() - t0 < 10.0
        # a real client is served while all that is going on
        t0 = time.monotonic()
        assert generate(step35_path, rpc=[worker.endpoint], n_gpu_layers=2) == reference
        assert time.monotonic() - t0 < 60
        for conn in idle:
            conn.close()
        silent.close()
        assert worker.alive()


def malformed_messages(rng: random.Random, remote_ptr: int, base: int, size: int):
    """Messages a broken or hostile client might send after a valid handshake and one
    valid buffer: wrong lengths, unknown commands, out-of-range devices and buffers,
    tensors pointing outside their buffer, unknown types and ops, graphs whose sizes or
    node ids do not add up."""
    kind = rng.randrange(8)
    if kind == 0:                                          # any command, random payload
        cmd = rng.randrange(0, 256)
        payload = rng.randbytes(rng.choice([0, 1, 7, 8, 16, 300, 2000]))
        return cmd, payload
    if kind == 1:                                          # a length that does not match
        return rng.randrange(N_COMMANDS), rng.randbytes(rng.randrange(0, 40))
    if kind == 2:                                          # allocations: huge, zero, bad device
        return ALLOC_BUFFER, struct.pack("<IQ", rng.choice([0, 1, 7, 2**31]), rng.choice([0, 2**62, 2**64 - 1]))
    if kind == 3:                                          # a buffer that does not exist
        return BUFFER_GET_BASE, struct.pack("<Q", rng.randrange(2**64))
    if kind == 4:                                          # SET_TENSOR outside the buffer / bad fields
        data = rng.choice([base + size - 8, base - 64, 0, rng.randrange(2**64), base])
        t = rpc_tensor(rng, rng.choice([remote_ptr, 0, rng.randrange(2**64)]), data,
                       type_=rng.choice([0, 1, 39, 1000, 2**32 - 1]), ne=(rng.choice([4, 2**31, 0]), 1, 1, 1))
        return SET_TENSOR, t + struct.pack("<Q", rng.choice([0, 8, 2**63])) + rng.randbytes(16)
    # graphs
    n_nodes = rng.choice([0, 1, 2, 3, 2**20, 2**32 - 1])
    tensors = []
    for i in range(rng.randrange(0, 4)):
        tensors.append(rpc_tensor(rng, rng.choice([remote_ptr, 0]), rng.choice([0, base, base + size]),
                                  tid=rng.choice([1, 2, 3, 2**64 - 1]), op=rng.choice([0, 1, 2, 300, 2**31]),
                                  type_=rng.choice([0, 1, 1000]), src=[rng.choice([0, 1, 2, 3, 99])]))
    nodes = [rng.choice([0, 1, 2, 3, 77]) for _ in range(min(n_nodes, 4))]
    body = struct.pack("<II", rng.choice([0, 1, 2**31]), n_nodes) + b"".join(struct.pack("<Q", n) for n in nodes)
    body += struct.pack("<I", rng.choice([len(tensors), len(tensors) + 1, 2**31])) + b"".join(tensors)
    if kind == 7:
        body = body[:rng.randrange(len(body) + 1)]             # truncated
    return GRAPH_COMPUTE, body


def test_a_thousand_malformed_messages_leave_the_worker_serving(step35_path, reference, tmp_path):
    rng = random.Random(2026)
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        addr = ("127.0.0.1", worker.port)
        sent = 0
        while sent < 1000:
            with socket.create_connection(addr) as conn:
                conn.settimeout(0.5)
                hello(conn)
                remote_ptr, size = struct.unpack("<QQ", call(conn, ALLOC_BUFFER, struct.pack("<IQ", 0, 4096)))
                base, = struct.unpack("<Q", call(conn, BUFFER_GET_BASE, struct.pack("<Q", remote_ptr)))
                # a few messages per connection: the worker closes one that sent something bad
                for _ in range(rng.randrange(1, 4)):
                    cmd, payload = malformed_messages(rng, remote_ptr, base, size)
                    sent += 1
                    try:
                        conn.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
                        conn.recv(64)
                    except (ConnectionError, socket.timeout, OSError):
                        break
            assert worker.alive(), f"the worker died after message {sent}: {worker.log_text()[-2000:]}"
        assert generate(step35_path, rpc=[worker.endpoint], n_gpu_layers=2) == reference


def test_a_request_that_makes_a_kernel_assert_costs_a_restart_not_the_worker(step35_path, reference, tmp_path):
    """GET_ROWS with a row index past the end asserts inside the CPU kernel, which can
    only abort the process running it: the worker's serving process dies, the worker
    starts it again, and the port serves a model correctly a moment later."""
    rng = random.Random(7)
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        with socket.create_connection(("127.0.0.1", worker.port)) as conn:
            conn.settimeout(10)
            hello(conn)
            remote_ptr, size = struct.unpack("<QQ", call(conn, ALLOC_BUFFER, struct.pack("<IQ", 0, 4096)))
            base, = struct.unpack("<Q", call(conn, BUFFER_GET_BASE, struct.pack("<Q", remote_ptr)))
            compute = 16                                       # GGML_TENSOR_FLAG_COMPUTE
            rows = rpc_tensor(rng, remote_ptr, base, tid=1, ne=(4, 2, 1, 1))
            ids = rpc_tensor(rng, remote_ptr, base + 64, tid=2, type_=26, ne=(1, 1, 1, 1))   # I32
            out = with_flags(rpc_tensor(rng, remote_ptr, base + 128, tid=3, op=GET_ROWS, ne=(4, 1, 1, 1),
                                        src=[1, 2]), compute)
            call(conn, SET_TENSOR, ids + b"\x00" + struct.pack("<Q", 0) + struct.pack("<i", 1000), reply=False)
            graph = struct.pack("<IIQI", 0, 1, 3, 3) + rows + ids + out
            call(conn, GRAPH_COMPUTE, graph, reply=False)
            assert conn.recv(1) == b""                         # the serving process is gone
        assert worker.alive()
        deadline = time.monotonic() + 20
        while "starting it again" not in worker.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "SIGABRT" in worker.log_text() and "starting it again" in worker.log_text()
        wait_listening(worker.port, timeout=20)
        assert generate(step35_path, rpc=[worker.endpoint], n_gpu_layers=2) == reference
