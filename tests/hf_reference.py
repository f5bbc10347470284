"""The independent reference for parity tests: Hugging Face transformers' step3p7 model
(float32, CPU) on a tiny checkpoint from tests/factories/hf_checkpoint.py, with its MTP layers.

transformers' generic MtpModel cannot load a Step-3.5/3.7 checkpoint's MTP blocks by
itself (the per-block ``transformer.shared_head.norm`` never reaches its ``post_norm``),
so the MTP weights are mapped here by name. Two MTP conventions are computed:

* ``"transformers"``: what ``generate(use_mtp=True)`` does: the first block reads the
  trunk's last hidden state as transformers reports it, each block's normed output feeds
  the next, and every block's logits come from the main ``lm_head``.
* ``"stepfun"``: training's rows with the conventions of the inference code StepFun
  publishes for these checkpoints (and of llama.cpp's step35 graph): block 0 reads the
  trunk's hidden state before the final norm, block k reads block k - 1's outputs before
  their shared-head norm at every position, and block k's logits come from its own
  ``shared_head`` (norm, then output).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

torch = None       # imported lazily: the module is collected without torch installed


def _torch():
    global torch
    if torch is None:
        import torch as t
        torch = t
    return torch


class Reference:
    def __init__(self, ckpt_dir):
        t = _torch()
        from transformers import Step3p7ForConditionalGeneration
        from transformers.modeling_layers import MtpModel
        from safetensors.numpy import load_file

        ckpt_dir = Path(ckpt_dir)
        self.model = Step3p7ForConditionalGeneration.from_pretrained(str(ckpt_dir), dtype=t.float32).eval()
        text = self.model.config.get_text_config()
        self.n_layer, self.n_mtp = text.num_hidden_layers, text.num_nextn_predict_layers
        self.mtp = MtpModel(self.model, self.n_mtp).eval()
        weights = {}
        for shard in sorted(ckpt_dir.glob("*.safetensors")):
            weights |= load_file(shard)
        self.heads = self._load_mtp(weights)
        self._pre_norm = None
        self.model.model.language_model.norm.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._pre_norm = args[0].detach()

    def _load_mtp(self, weights) -> list:
        """Checkpoint model.layers.{n_layer + k}.* -> MtpModel layers.k.*; returns the
        per-block output heads [n_vocab, n_embd], which MtpModel has no place for."""
        t = _torch()
        state, heads = {}, []
        for k in range(self.n_mtp):
            p = f"model.layers.{self.n_layer + k}."
            for name, value in weights.items():
                if not name.startswith(p):
                    continue
                rest = name[len(p):]
                if rest == "transformer.shared_head.output.weight":
                    continue
                if rest == "transformer.shared_head.norm.weight":
                    target = "post_norm.weight"
                elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                    target = rest
                else:
                    target = "mtp_block." + rest
                state[f"layers.{k}.{target}"] = t.from_numpy(np.array(value, dtype=np.float32))
            heads.append(t.from_numpy(np.array(weights[p + "transformer.shared_head.output.weight"],
                                               dtype=np.float32)))
        expected = {n for n in self.mtp.state_dict() if n.startswith("layers.")}
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise AssertionError(f"MTP weights do not map: missing {sorted(missing)}, unmapped {sorted(extra)}")
        self.mtp.load_state_dict(state, strict=False)
        return heads

    def trunk(self, ids) -> tuple[np.ndarray, object, object]:
        """(logits [n, n_vocab], hidden after the final norm, hidden before it)."""
        t = _torch()
        with t.no_grad():
            out = self.model(input_ids=t.tensor(np.asarray(ids))[None], output_hidden_states=True)
        return out.logits[0].numpy(), out.hidden_states[-1], self._pre_norm

    def drafts(self, ids, convention: str) -> np.ndarray:
        """Logits [n_mtp, n_vocab] of each MTP block's draft after the prompt ids, with
        greedy drafts feeding the next block."""
        t = _torch()
        logits, h_normed, h_pre = self.trunk(ids)
        n = len(ids)
        tokens = list(np.asarray(ids)[1:]) + [int(np.argmax(logits[-1]))]
        h = h_pre if convention == "stepfun" else h_normed
        out = []
        with t.no_grad():
            for k in range(self.n_mtp):
                layer = self.mtp.layers[k]
                layer.use_post_norm = convention != "stepfun"
                pos = t.arange(k + 1, k + 1 + n)[None]
                hs = self.mtp.forward_layer(k, h, pos, None, input_ids=t.tensor(tokens[k:k + n])[None])
                if convention == "stepfun":
                    row = t.nn.functional.linear(layer.post_norm(hs[:, -1]), self.heads[k])
                else:
                    row = self.mtp.shared_head(hs[:, -1])
                out.append(row[0].numpy())
                tokens.append(int(row[0].argmax()))
                h = hs
        return np.array(out)
