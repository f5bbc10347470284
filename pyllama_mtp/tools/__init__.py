"""The ``pyllama-mtp`` command line tools for GGUF files with MTP layers.

* ``pyllama-mtp inspect FILE.gguf [--json]`` - what a file holds (trunk and MTP blocks,
  tensor types, SWA, tokenizer) and what is wrong with it, from the header alone.
* ``pyllama-mtp graft TRUNK.gguf MTP.gguf -o FULL.gguf`` - one file from a trunk-only file
  and the matching MTP-only file.
"""
