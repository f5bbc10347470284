"""pyllama-mtp-bench: throughput sweeps with MTP draft lengths (see cli.py)."""
