"""The ``pyllama-mtp`` command line tools for GGUF files with MTP layers.

* ``pyllama-mtp inspect FILE.gguf [--json]`` - what a file holds (trunk and MTP blocks,
  tensor types, SWA, tokenizer) and what is wrong with it, from the header alone.
* ``pyllama-mtp graft TRUNK.gguf MTP.gguf -o FULL.gguf`` - one file from a trunk-only file
  and the matching MTP-only file.
* ``pyllama-mtp quantize IN.gguf OUT.gguf TYPE`` - llama.cpp's quantizer with the MTP blocks
  kept at Q8_0 (or F16/BF16), needing no importance data for them.
* ``pyllama-mtp extract-mtp HF_DIR -o MTP.gguf --trunk TRUNK.gguf`` - the MTP-only GGUF of a
  Step-3.5/3.7 checkpoint, read from its MTP shards alone.
"""
