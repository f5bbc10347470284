"""pyllama-mtp-server: OpenAI-compatible HTTP server with MTP speculative decoding.

    pyllama-mtp-server --model step35.gguf --mtp --draft 3 --port 8080
    pyllama-mtp-server --model trunk.gguf --mtp-model mtp-only.gguf
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("pyllama_mtp.server")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyllama-mtp-server", description=__doc__.splitlines()[0])
    ap.add_argument("--model", "-m", required=True, help="GGUF model path")
    ap.add_argument("--mtp", action="store_true", help="use the MTP layers inside the model file")
    ap.add_argument("--mtp-model", help="MTP-only GGUF to use with a trunk-only --model (implies MTP)")
    ap.add_argument("--draft", default=None,
                    help="MTP draft length, or 'auto' to pick it every step from measured costs and acceptance "
                         "(default: auto for a model on this CPU, 3 with layers on a GPU or RPC workers); "
                         "requests may ask for another")
    ap.add_argument("--no-check-exact", dest="check_exact", action="store_false",
                    help="skip the start-up check that a verify batch computes what one-token decoding computes "
                         "on these devices (without it, a device or RPC worker that fails it is refused)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    ap.add_argument("--n-batch", type=int, default=512, help="prompt batch size (default 512)")
    ap.add_argument("--parallel", "-np", type=int, default=1,
                    help="sequences decoded together with continuous batching (default 1); each gets --n-ctx "
                         "tokens of context, further requests wait in a queue")
    ap.add_argument("--prefill-chunk", type=int, default=128,
                    help="with --parallel: a new prompt goes in this many tokens at a time while other requests "
                         "generate, so they pause for one chunk, not the whole prompt (default 128)")
    ap.add_argument("--api-key", default=os.environ.get("PYLLAMA_MTP_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $PYLLAMA_MTP_API_KEY)")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1, help="layers to offload (-1 = all)")
    ap.add_argument("--tensor-split", "-ts", default=None,
                    help="proportions of the offloaded layers per device, comma-separated (e.g. 3,1)")
    ap.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                    help="RPC workers (pyllama-mtp-rpc-worker) whose devices take part of the layers")
    ap.add_argument("--mtp-placement", choices=["local", "split"], default="local",
                    help="with --rpc: keep the MTP layers and the output layer on this host (local, default) "
                         "or place them by the layer split")
    ap.add_argument("--rpc-timeout", type=float, default=120.0,
                    help="seconds without an answer before an RPC worker counts as lost (default 120)")
    ap.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: up to 8)")
    ap.add_argument("--alias", help="model name clients use (default: the file name)")
    ap.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted")
    ap.add_argument("--max-queue", type=int, default=256,
                    help="requests that may wait for a slot; beyond it the server answers 503 with Retry-After")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds a request may take in all, waiting included (0: no limit; default 600)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="on SIGTERM/SIGINT: seconds running requests get to finish before they are cut "
                         "(queued ones are refused at once; default 10)")
    ap.add_argument("--verbose", action="store_true", help="log llama.cpp's messages")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.prefill_chunk < 1:
        print(f"pyllama-mtp-server: --prefill-chunk {args.prefill_chunk}: give an int >= 1", file=sys.stderr)
        return 2
    if args.parallel < 1:
        print(f"pyllama-mtp-server: --parallel {args.parallel}: give an int >= 1", file=sys.stderr)
        return 2
    for name in ("max_queue", "request_timeout", "shutdown_timeout"):
        if getattr(args, name) < 0:
            print(f"pyllama-mtp-server: --{name.replace('_', '-')} {getattr(args, name)}: give a number >= 0",
                  file=sys.stderr)
            return 2
    try:
        draft = args.draft if args.draft in ("auto", None) else int(args.draft)
    except ValueError:
        print(f"pyllama-mtp-server: --draft {args.draft!r}: give an int or 'auto'", file=sys.stderr)
        return 2
    import uvicorn

    from ..llama import Llama
    from .app import ServerSettings, create_app

    from ..errors import PmtpError

    mtp = args.mtp_model or args.mtp
    try:
        split = [float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None
    except ValueError:
        print(f"pyllama-mtp-server: --tensor-split {args.tensor_split!r}: give comma-separated numbers", file=sys.stderr)
        return 2
    try:
        llm = Llama(args.model, mtp=mtp, draft=draft, n_ctx=args.n_ctx, n_batch=args.n_batch,
                    n_gpu_layers=args.n_gpu_layers, tensor_split=split, threads=args.threads,
                    rpc=args.rpc, mtp_placement=args.mtp_placement, rpc_timeout=args.rpc_timeout,
                    parallel=args.parallel, check_exact=args.check_exact, verbose=args.verbose)
    except PmtpError as e:
        print(f"pyllama-mtp-server: error: {e}", file=sys.stderr)
        return 1
    name = args.alias or os.path.basename(args.model)
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                              prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                              request_timeout=args.request_timeout or None)
    log.info("serving %s (MTP %s, %d parallel) on http://%s:%d", name, f"draft {llm.draft}" if mtp else "off",
             args.parallel, args.host, args.port)
    app = create_app(llm, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    # running requests end themselves (503 / an error event) a little before uvicorn would cut them
    grace = max(0.0, args.shutdown_timeout - 0.5)
    _serve(config, on_signal=lambda: app.state.worker.drain(grace))
    llm.close()
    log.info("stopped")
    return 0


def _serve(config, on_signal) -> None:
    """uvicorn's server, with the worker's drain first on SIGTERM/SIGINT: requests still
    queued are refused (503) at once, the running ones get --shutdown-timeout to finish,
    then uvicorn cuts them (which cancels their jobs) and the process exits 0."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            on_signal()
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals once it has served, so the process would die
            # of SIGTERM; a drained shutdown is a normal end: exit 0
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    DrainingServer(config).run()


if __name__ == "__main__":
    sys.exit(main())
