"""Compute an attribution graph with circuit-tracer on mechscope's transcoders, for the parity check.

Runs in circuit-tracer's own virtual environment (circuit-tracer 0.5.0 pins transformers<=4.57.3, which cannot
share an environment with mechscope's transformers 5.23); it imports nothing from mechscope. It reads a
mechscope transcoder-set folder (``transcoders.json`` + per-layer ``cfg.json`` / ``dictionary.safetensors``),
builds circuit-tracer's ``SingleLayerTranscoder``s from the same weights (its W_enc and W_skip are the
transposes of mechscope's; its TopK gets mechscope's ReLU), runs ``circuit_tracer.attribute`` with its nnsight
backend on the HF model folder, prunes with ``prune_graph`` and writes the results to a safetensors file that
``tests/parity`` compares.

Usage (see ``tests/parity/test_circuit_tracer.py``)::

    CT/bin/python scripts/circuit_tracer_graph.py MODEL_DIR TRANSCODERS_DIR TOKENS_JSON OUT.safetensors
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet


class ReluTopK(TopK):
    """mechscope's TopK: the k largest pre-activations, ReLU'd (Gao et al. 2024); circuit-tracer's TopK keeps negative
    values among the k, so the converted transcoders carry mechscope's activation function."""

    def forward(self, x: torch.Tensor):
        return torch.relu(super().forward(x))


def main(model_dir: str, tc_dir: str, tokens_json: str, out: str, max_feature_nodes: str = "none") -> None:
    torch.set_num_threads(1)
    tc = Path(tc_dir)
    manifest = json.loads((tc / "transcoders.json").read_text())
    layers = {}
    for key, sub in manifest["layers"].items():
        cfg = json.loads((tc / sub / "cfg.json").read_text())
        w = load_file(str(tc / sub / "dictionary.safetensors"))
        if cfg["architecture"] != "topk":
            raise SystemExit(f"only TopK transcoders are converted here, got {cfg['architecture']}")
        t = SingleLayerTranscoder(cfg["d_in"], cfg["d_sae"], ReluTopK(cfg["k"]), int(key), skip_connection=cfg["skip"],
                                  device=torch.device("cpu"), dtype=torch.float32)
        state = {"W_enc": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        if cfg["skip"]:
            state["W_skip"] = w["W_skip"].T.contiguous()
        t.load_state_dict(state)
        layers[int(key)] = t
    ts = TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
                       scan="mechscope")
    rm = ReplacementModel.from_pretrained_and_transcoders(model_dir, ts, backend="nnsight", device=torch.device("cpu"),
                                                          dtype=torch.float32)
    tokens = torch.tensor(json.loads(Path(tokens_json).read_text()), dtype=torch.long)
    t0 = time.perf_counter()
    g = attribute(tokens, rm, max_n_logits=10, desired_logit_prob=0.95, batch_size=64,
                  max_feature_nodes=None if max_feature_nodes == "none" else int(max_feature_nodes))
    seconds = time.perf_counter() - t0
    node_mask, edge_mask, _ = prune_graph(g, 0.8, 0.98)
    rep, comp = compute_graph_scores(g)
    tensors = {"adjacency": g.adjacency_matrix.float(), "active_features": g.active_features.long(),
               "selected": g.selected_features.long(), "activations": g.activation_values.float(),
               "logit_tokens": g.logit_token_ids.long(), "logit_probs": g.logit_probabilities.float(),
               "node_mask": node_mask, "edge_mask": edge_mask,
               "scores": torch.tensor([rep, comp], dtype=torch.float64),
               "seconds": torch.tensor([seconds], dtype=torch.float64)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
