"""pyllama-mtp: look into and fix up GGUF files with Multi-Token-Prediction layers.

    pyllama-mtp inspect model.gguf [--json]
    pyllama-mtp graft trunk.gguf mtp-only.gguf -o full.gguf
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import PmtpError
from .graft import graft
from .inspection import format_report, inspect_model

PROG = "pyllama-mtp"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Inspect and graft GGUF files with MTP layers.")
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
    return ap


def _inspect(args) -> None:
    report = inspect_model(args.file)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_report(report))


def _graft(args) -> None:
    r = graft(args.trunk, args.mtp, args.output, overwrite=args.force)
    print(f"wrote {r.path} ({r.file_size / 2**20:.1f} MiB): {r.n_trunk_tensors} trunk tensors + "
          f"{r.n_mtp_tensors} MTP tensors; load it with Llama({str(r.path)!r}, mtp=True)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (PmtpError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
