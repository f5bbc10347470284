"""One model over several hosts: RPC workers on 127.0.0.1 (real subprocesses running the
package's own worker), the client in this process. Lossless splits with and without MTP,
and every fault (unreachable, wrong protocol, killed, hung, out of memory, hostile client)
is a typed error while the caller lives on."""
from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import first_diff, start_server
from pyllama_mtp import InvalidArgumentError, Llama, ModelLoadError, RpcError, build_info

import factories as testing
from factories.rpc_local import LocalWorker, free_port

pytestmark = pytest.mark.skipif(not build_info().get("rpc"), reason="this build has no RPC backend")

PROMPT = "the quick brown fox"
N_TOKENS = 48


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("rpc-logs")
    with LocalWorker(log_path=logs / "w1.log") as w1, LocalWorker(log_path=logs / "w2.log") as w2:
        yield w1, w2


def generate(path, **kw):
    with Llama(path, threads=1, n_ctx=512, **kw) as llm:
        return llm.generate(PROMPT, max_tokens=N_TOKENS).tokens


@pytest.fixture(scope="module")
def step35_reference(step35_path):
    return generate(step35_path)


def test_build_reports_rpc():
    info = build_info()
    assert info["rpc"] is True
    assert info["rpc_protocol"].count(".") == 2


@pytest.mark.parametrize("draft", [0, 1, 2, 3])
def test_split_over_two_workers_is_lossless(step35_path, step35_reference, workers, draft):
    # 4 trunk layers: 0-1 on this CPU, 2 and 3 on the two workers, MTP layers + output here
    out = generate(step35_path, rpc=[w.endpoint for w in workers], n_gpu_layers=2,
                   mtp=draft > 0, draft=max(draft, 1))
    assert out == step35_reference, f"first difference at token {first_diff(out, step35_reference)}"


@pytest.mark.parametrize("draft", [1, 3])
def test_mtp_layers_placed_by_the_split_are_lossless(step35_path, step35_reference, workers, draft):
    out = generate(step35_path, rpc=[w.endpoint for w in workers], mtp=True, draft=draft, mtp_placement="split")
    assert out == step35_reference, f"first difference at token {first_diff(out, step35_reference)}"


def test_plain_and_mtp_over_workers_place_the_output_layer_alike(step35_path, workers):
    """Tokens equal across devices only by luck of wide logit margins (the tests above); the
    bits must be equal between a plain and an MTP Llama of one placement. The output layer
    stays on this host for both (mtp_placement="local"): before, a plain Llama left it on the
    last worker, whose plain-layout kernel sums it in another order than this host's."""
    remote = dict(rpc=[w.endpoint for w in workers], n_gpu_layers=99)
    outputs = []
    for kw in ({}, dict(mtp=True, draft=3)):
        with Llama(step35_path, threads=1, n_ctx=512, **remote, **kw) as llm:
            r = llm.generate(PROMPT, max_tokens=N_TOKENS, logprobs=5)
            outputs.append((r.tokens, r.logprobs, r.top_logprobs))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("draft", [0, 3])
def test_pair_split_over_workers_is_lossless(step35_pair, workers, draft):
    trunk, mtp = step35_pair
    reference = generate(trunk)
    out = generate(trunk, rpc=[w.endpoint for w in workers], n_gpu_layers=3,
                   mtp=mtp if draft else False, draft=max(draft, 1))
    assert out == reference, f"first difference at token {first_diff(out, reference)}"


@pytest.mark.parametrize("moe", [False, True])
def test_recurrent_model_over_a_worker_is_lossless(tmp_path, workers, moe):
    """qwen35/qwen35moe: recurrent state on the worker, rolled back after each verify."""
    path = testing.write_qwen35(tmp_path / "q35.gguf", seed=1, moe=moe)
    reference = generate(path)
    for draft in (0, 3):
        out = generate(path, rpc=[workers[0].endpoint], n_gpu_layers=2, mtp=draft > 0, draft=max(draft, 1))
        assert out == reference, f"draft {draft}: first difference at token {first_diff(out, reference)}"


def test_devices_lists_local_and_remote(step35_path, workers):
    with Llama(step35_path, threads=1, n_ctx=256, rpc=[w.endpoint for w in workers], mtp=True) as llm:
        devices = llm.devices
    assert devices[0].type == "cpu" and devices[0].endpoint is None
    remote = [d for d in devices if d.endpoint]
    assert [d.endpoint for d in remote] == [w.endpoint for w in workers]
    assert all(d.memory_total > 0 and 0 < d.memory_free <= d.memory_total for d in devices)


def test_unreachable_worker_is_an_error_naming_it(step35_path):
    endpoint = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RpcError, match=endpoint):
        Llama(step35_path, threads=1, n_ctx=256, rpc=[endpoint])
    assert time.monotonic() - start < 10
    # the process is fine: a model without workers still loads
    assert generate(step35_path, mtp=True)


@pytest.mark.parametrize("rpc", ["nohost", "host:", ":50052", "host:port", "host:70000", ["a:1", "a:1"], [5]])
def test_bad_endpoints_are_rejected(step35_path, rpc):
    with pytest.raises(InvalidArgumentError):
        Llama(step35_path, rpc=rpc)


def test_bad_placement_and_timeout_are_rejected(step35_path):
    with pytest.raises(InvalidArgumentError, match="mtp_placement"):
        Llama(step35_path, rpc=["127.0.0.1:1"], mtp_placement="remote")
    with pytest.raises(InvalidArgumentError, match="rpc_timeout"):
        Llama(step35_path, rpc=["127.0.0.1:1"], rpc_timeout=-1)


class FakeServer:
    """Accepts connections and answers each with ``reply(conn)``."""

    def __init__(self, reply):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.reply(conn)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def recv_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def test_wrong_protocol_version_is_an_error(step35_path):
    def old_worker(conn):
        cmd, size = struct.unpack("<BQ", recv_exactly(conn, 9))
        recv_exactly(conn, size)
        # HELLO reply of a worker that speaks protocol 6.1.0
        payload = bytes([6, 1, 0, 0]) + bytes(24)
        conn.sendall(struct.pack("<Q", len(payload)) + payload)
        time.sleep(0.2)

    server = FakeServer(old_worker)
    try:
        with pytest.raises(RpcError, match=r"protocol 6\.1\.0"):
            Llama(step35_path, threads=1, n_ctx=256, rpc=[server.endpoint])
    finally:
        server.close()


def test_something_else_listening_is_an_error(step35_path):
    server = FakeServer(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    try:
        with pytest.raises(RpcError, match="handshake"):
            Llama(step35_path, threads=1, n_ctx=256, rpc=[server.endpoint])
    finally:
        server.close()


def test_killed_worker_mid_stream_raises_and_caller_survives(step35_path, tmp_path):
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        llm = Llama(step35_path, threads=1, n_ctx=512, rpc=[worker.endpoint], mtp=True, draft=3)
        stream = llm.stream(PROMPT, max_tokens=200)
        next(stream)
        worker.kill()
        start = time.monotonic()
        with pytest.raises(RpcError, match=worker.endpoint):
            for _ in stream:
                pass
        assert time.monotonic() - start < 10
        with pytest.raises(RpcError, match="load it again"):
            llm.generate(PROMPT, max_tokens=4)
        llm.close()
    # a new model with a live worker works again in the same process
    with LocalWorker() as fresh:
        assert generate(step35_path, rpc=[fresh.endpoint], mtp=True) == generate(step35_path)


def test_hung_worker_times_out(step35_path, tmp_path):
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        llm = Llama(step35_path, threads=1, n_ctx=512, rpc=[worker.endpoint], rpc_timeout=1.0)
        stream = llm.stream(PROMPT, max_tokens=200)
        next(stream)
        worker.pause()
        start = time.monotonic()
        with pytest.raises(RpcError, match="did not answer in time"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 10
        llm.close()


def test_worker_out_of_memory_is_an_error(tmp_path):
    # ~200 MB on the worker, which may map only 64 MB more than the probe had (at ~100 MB
    # the check was flaky: the serving process maps thread stacks of several MB each as it
    # starts, and a probe read after them left room enough for the model)
    path = testing.write_llama(tmp_path / "big.gguf", n_embd=256, n_layer=2, n_ff=32768)
    with LocalWorker(log_path=tmp_path / "w.log") as probe:
        # the process that serves is the worker's child (the worker supervises it)
        pid = probe.proc.pid
        serving = open(f"/proc/{pid}/task/{pid}/children").read().split()[0]
        with open(f"/proc/{serving}/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + 64 * 2**20

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with LocalWorker(log_path=tmp_path / "w-oom.log", preexec_fn=cap_memory) as worker:
        with pytest.raises((RpcError, ModelLoadError), match=worker.endpoint):
            Llama(path, threads=1, n_ctx=256, rpc=[worker.endpoint])
        assert worker.alive()


def test_garbage_connection_does_not_crash_the_worker(step35_path, step35_reference, tmp_path):
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        for payload in (os.urandom(4096), bytes([14]) + struct.pack("<Q", 2**62), b"\x0e" + b"\xff" * 64):
            with socket.create_connection(("127.0.0.1", worker.port)) as s:
                s.sendall(payload)
            time.sleep(0.1)
        assert worker.alive()
        assert generate(step35_path, rpc=[worker.endpoint], n_gpu_layers=2) == step35_reference


def _hello(conn):
    conn.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
    size, = struct.unpack("<Q", recv_exactly(conn, 8))
    return recv_exactly(conn, size)


def _call(conn, cmd, payload, reply_size=None):
    conn.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    if reply_size is None:
        return None
    size, = struct.unpack("<Q", recv_exactly(conn, 8))
    assert size == reply_size
    return recv_exactly(conn, size)


def _rpc_tensor(buffer, data, ne0):
    # id, type (F32), buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src,
    # view_offs, data, name[64], use_count: the worker's packed wire format
    return (struct.pack("<QIQ4I4II16iI10QQQQ", 1, 0, buffer, ne0, 1, 1, 1, 4, 4 * ne0, 4 * ne0, 4 * ne0,
                        0, *([0] * 16), 0, *([0] * 10), 0, 0, data) + bytes(64) + struct.pack("<i", 0))


def test_tensor_outside_its_buffer_does_not_crash_the_worker(tmp_path):
    """A request whose tensor points past the end of its buffer aborted the worker
    (GGML_ASSERT in deserialize_tensor) until vendor/patches/0005."""
    assert len(_rpc_tensor(0, 0, 1)) == 296
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        with socket.create_connection(("127.0.0.1", worker.port)) as conn:
            _hello(conn)
            remote_ptr, _size = struct.unpack("<QQ", _call(conn, 0, struct.pack("<IQ", 0, 1024), 16))   # ALLOC_BUFFER
            base, = struct.unpack("<Q", _call(conn, 3, struct.pack("<Q", remote_ptr), 8))             # BUFFER_GET_BASE
            tensor = _rpc_tensor(remote_ptr, base + 1024 - 16, 64)  # 256 bytes from 16 before the end
            _call(conn, 6, tensor + b"\x00" + struct.pack("<Q", 0) + bytes(16))                        # SET_TENSOR
            time.sleep(0.3)
        assert worker.alive(), worker.log_text()
        assert "out of buffer bounds" in worker.log_text()


def run_worker_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "pyllama_mtp.rpc_worker", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_worker_refuses_a_public_address_without_the_flag():
    r = run_worker_cli("--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2
    assert "--allow-remote" in r.stderr and "no authentication" in r.stderr


def test_worker_reports_an_unknown_device_and_a_busy_port():
    r = run_worker_cli("--port", str(free_port()), "--device", "NoSuchGPU")
    assert r.returncode == 1 and "NoSuchGPU" in r.stderr and "CPU" in r.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:
        r = run_worker_cli("--port", str(busy.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen" in r.stderr


def test_worker_stops_cleanly_on_sigterm(tmp_path):
    worker = LocalWorker(log_path=tmp_path / "w.log")
    assert worker.stop() == 0
    log = worker.log_text()
    assert "protocol" in log and "stopping the RPC worker" in log and "SIGTERM" in log


def test_worker_lists_devices():
    r = run_worker_cli("--list-devices")
    assert r.returncode == 0 and r.stdout.startswith("CPU")


def test_server_over_a_worker_then_losing_it(step35_path, step35_reference, tmp_path):
    """The OpenAI server with --rpc answers like the library; once its worker is gone a
    request gets a 503 error object (not a dead server) and /health says why."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    with LocalWorker(log_path=tmp_path / "w.log") as worker:
        proc, base = start_server(step35_path, "--mtp", "--draft", "2", "--rpc", worker.endpoint, "-ngl", "2")
        try:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
            with Llama(step35_path, threads=1, n_ctx=512) as ref:
                expected = ref.generate(PROMPT, max_tokens=24).text
            got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
            assert got.choices[0].text == expected
            worker.kill()
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model="tiny", prompt=PROMPT + " again", max_tokens=24, temperature=0)
            assert err.value.status_code == 503 and worker.endpoint in err.value.message
            health = httpx.get(f"{base}/health")
            assert health.status_code == 503 and worker.endpoint in health.json()["reason"]
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=20)
