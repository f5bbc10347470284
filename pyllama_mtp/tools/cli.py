"""pyllama-mtp: look into and fix up GGUF files with Multi-Token-Prediction layers.

    pyllama-mtp inspect model.gguf [--json]
    pyllama-mtp graft trunk.gguf mtp-only.gguf -o full.gguf
    pyllama-mtp quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M [--mtp-type q8_0]
    pyllama-mtp extract-mtp HF_DIR -o mtp.gguf --trunk trunk.gguf [--type bf16]
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import PmtpError
from .extract_mtp import extract_mtp
from .graft import graft
from .inspection import format_report, inspect_model
from .quantize import FILE_TYPES, MTP_TYPES, quantize

PROG = "pyllama-mtp"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Inspect, graft, quantize and extract GGUF files with MTP layers.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="what a GGUF file holds and what is wrong with it (reads the header only)",
                       description="Show a GGUF file's architecture, trunk and MTP layers, tensor types, SWA, "
                                   "tokenizer and warnings, from its header alone.")
    p.add_argument("file", metavar="FILE.gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("graft", help="merge a trunk-only file and its MTP-only file into one GGUF",
                       description="Write one GGUF with the trunk's metadata and tensors plus the MTP-only "
                                   "file's MTP blocks, after checking that the two belong together.")
    p.add_argument("trunk", metavar="TRUNK.gguf", help="the trunk-only file (declares the MTP layers, lacks them)")
    p.add_argument("mtp", metavar="MTP.gguf", help="the MTP-only file of the same model")
    p.add_argument("-o", "--output", required=True, metavar="FULL.gguf", help="the file to write")
    p.add_argument("-f", "--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(run=_graft)

    p = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp, keeping the MTP blocks at Q8_0",
                       description="Quantize with llama.cpp's quantizer; every tensor of the MTP blocks gets "
                                   "--mtp-type and needs no importance-matrix entry.")
    p.add_argument("input", metavar="IN.gguf", help="the F32/F16/BF16 model")
    p.add_argument("output", metavar="OUT.gguf", help="the file to write")
    p.add_argument("type", metavar="TYPE", help="file type: " + ", ".join(FILE_TYPES))
    p.add_argument("--mtp-type", choices=list(MTP_TYPES), default=None, type=str.lower,
                   help="type of the MTP blocks (default: q8_0; for F32/F16/BF16 the file type); "
                        "'same' lets llama.cpp choose as for the trunk")
    p.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="threads (default: all cores)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix from llama-imatrix (GGUF or .dat)")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already quantized input")
    p.add_argument("-f", "--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("extract-mtp", help="the MTP-only GGUF of a Step-3.5/3.7 Hugging Face checkpoint",
                       description="Read only the MTP layers (and the shared embeddings/output) of a Step-3.5/3.7 "
                                   "checkpoint directory and write the MTP-only GGUF that the pinned converter's "
                                   "--mtp would write; load it next to the trunk with Llama(trunk, mtp=OUT).")
    p.add_argument("src", metavar="HF_DIR", help="checkpoint directory: config.json, safetensors shards, index")
    p.add_argument("-o", "--output", required=True, metavar="MTP.gguf", help="the file to write")
    p.add_argument("--trunk", required=True, metavar="TRUNK.gguf",
                   help="a GGUF of the same model (trunk-only or full): the tokenizer comes from it")
    p.add_argument("--type", dest="out_type", choices=["bf16", "f16", "q8_0", "f32"], default="bf16",
                   help="type of the 2-D weights (norms stay F32; default bf16)")
    p.add_argument("-f", "--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(run=_extract_mtp)
    return ap


def _inspect(args) -> None:
    report = inspect_model(args.file)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_report(report))


def _graft(args) -> None:
    r = graft(args.trunk, args.mtp, args.output, overwrite=args.force)
    print(f"wrote {r.path} ({r.file_size / 2**20:.1f} MiB): {r.n_trunk_tensors} trunk tensors + "
          f"{r.n_mtp_tensors} MTP tensors; load it with Llama({str(r.path)!r}, mtp=True)")


def _quantize(args) -> None:
    r = quantize(args.input, args.output, args.type, mtp_type=args.mtp_type, threads=args.threads,
                 imatrix=args.imatrix, allow_requantize=args.allow_requantize, overwrite=args.force)
    mtp = ", ".join(f"{name} x{n}" for name, n in r.mtp_types.items()) or "none in this file"
    print(f"wrote {r.path} ({r.file_size / 2**20:.1f} MiB): {r.file_type}; MTP tensors: {mtp}")


def _extract_mtp(args) -> None:
    r = extract_mtp(args.src, args.output, trunk=args.trunk, out_type=args.out_type, overwrite=args.force)
    print(f"wrote {r.path} ({r.file_size / 2**20:.1f} MiB): {r.n_tensors} tensors, {r.n_mtp_layers} MTP layers, "
          f"from {len(r.shards_read)} shard(s); load it with Llama({args.trunk!r}, mtp={str(r.path)!r})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (PmtpError, OSError, NotImplementedError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
