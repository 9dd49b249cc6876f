"""Attribution graphs: the direct effects between the nodes of a prompt's local replacement model
(Ameisen et al. 2025, "Circuit Tracing"; the algorithm of circuit-tracer, on mechscope's hooks).

Each row of the adjacency (one target node) is one backward pass through the frozen, linear replacement model
(:func:`~mechscope.graphs.replacement.frozen_forward`) that injects the target's input vector where the target
reads the residual stream — a feature's encoder column at its layer's MLP input, a logit's demeaned unembedding
column at the final norm's output — and reads at every source ``gradient · (activation x decoder row)`` for a
feature, ``gradient · error`` for an error node, ``gradient · embedding`` for a token. ``batch_size`` rows share
one backward: the forward runs once on that many copies of the prompt and its graph is kept for every batch.

Rows are computed for the target logits first, then for features in order of their influence on the logits
(re-ranked from the rows so far every ``update_interval`` batches), up to ``max_feature_nodes``.

Devices: the forward, the backward passes and the edge products run where the model runs (the transcoders must
sit there too: :meth:`~mechscope.graphs.TranscoderSet.check_device`); each batch of rows comes back to the CPU,
where the rows, the ranking by influence and the graph are kept.

Shape key: B rows per backward, P positions, D d_model, L layers, n active features, C columns.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.graphs.graph import AttributionGraph
from mechscope.graphs.prune import normalize_rows
from mechscope.graphs.replacement import ReplacementState, frozen_forward, replacement_state
from mechscope.graphs.transcoders import TranscoderSet


def prompt_tokens(model, prompt: str | Tensor) -> Tensor:
    """Token ids ``[P]`` of a prompt (text gets the tokenizer's BOS in front, as the training contexts had).

    Raises:
        InputError: an empty prompt, more tokens than the model's context, ids outside the vocabulary.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty; give the text whose next token the graph should explain.")
        tokens = model.to_tokens(prompt, prepend_bos=True)[0]  # as the transcoders were trained: BOS first
    else:
        tokens = model._tokens(prompt, None)
        if tokens.shape[0] != 1:
            raise InputError(f"an attribution graph explains one prompt; got a batch of {tokens.shape[0]}.")
        tokens = tokens[0]
        if not len(tokens):
            raise InputError("the prompt has no tokens.")
    return tokens


def logit_targets(model, logits: Tensor, targets=None, *, max_n_logits: int = 10,
                  desired_logit_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities) of the target logits at the last position, both on the CPU.

    Default: the most likely tokens until their cumulative probability reaches ``desired_logit_prob``, at
    most ``max_n_logits``. ``targets``: token ids or strings (each must be one token) chosen by the user.

    Raises:
        InputError: a target outside the vocabulary, a string that is not exactly one token, bad limits.
    """
    probs = torch.softmax(logits[-1].double(), -1)
    V = probs.shape[0]
    if targets is None:
        if not isinstance(max_n_logits, int) or max_n_logits < 1:
            raise InputError(f"max_n_logits must be a positive int, got {max_n_logits!r}.")
        if not 0.0 < desired_logit_prob <= 1.0:
            raise InputError(f"desired_logit_prob must lie in (0, 1], got {desired_logit_prob}.")
        top_p, top_i = probs.topk(max_n_logits)
        cum = top_p.cumsum(0)
        n = int(torch.searchsorted(cum, torch.tensor(desired_logit_prob, dtype=cum.dtype, device=cum.device))) + 1
        n = min(n, max_n_logits)
        return top_i[:n].cpu(), top_p[:n].float().cpu()
    ids = []
    for t in ([targets] if isinstance(targets, (str, int)) else list(targets)):
        if isinstance(t, str):
            if model.tokenizer is None:
                raise InputError("string targets need a tokenizer; pass token ids.")
            enc = model.tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise InputError(f"target {t!r} is {len(enc)} tokens ({enc}); a target logit is one token (try "
                                 f"{model.tokenizer.decode(enc[:1])!r}, or pass a token id).")
            ids.append(enc[0])
        else:
            i = int(t)
            if not 0 <= i < V:
                raise InputError(f"target token id {i} is not in the vocabulary (0..{V - 1}).")
            ids.append(i)
    if not ids:
        raise InputError("targets is empty; pass None for the most likely tokens.")
    idx = torch.tensor(ids, dtype=torch.long)
    return idx, probs[idx.to(probs.device)].float().cpu()


class _LayerFeatures:
    """One layer's active features grouped by position, padded to the most any position has: ``pos [U]``,
    ``rows [U, K]`` (columns of the graph; -1 pads), the activations ``[U, K]`` (0 pads) and the decoder rows
    ``[U, K, D]`` when cached. A row's edges from this layer are then one batched matmul over the positions.
    Everything lives on the features' (the model's) device."""

    def __init__(self, features, layer: int, W_dec: Tensor, cache_decoders: bool):
        rows, fpos, fid = features.layer(layer)
        self.n = len(rows)
        if not self.n:
            return
        dev = fpos.device
        self.pos, counts = torch.unique_consecutive(fpos, return_counts=True)
        K = int(counts.max())
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(self.n, device=dev) - torch.repeat_interleave(start, counts)
        which = torch.repeat_interleave(torch.arange(len(self.pos), device=dev), counts)
        self.rows = torch.full((len(self.pos), K), -1, dtype=torch.long, device=dev)
        self.rows[which, slot] = rows
        self.fid = torch.zeros(len(self.pos), K, dtype=torch.long, device=dev)
        self.fid[which, slot] = fid
        self.vals = torch.zeros(len(self.pos), K, dtype=features.values.dtype, device=dev)
        self.vals[which, slot] = features.values[rows]
        self.valid = self.rows >= 0
        self.W_dec = W_dec
        self.dec = self.decoders() if cache_decoders else None

    def decoders(self) -> Tensor:
        return self.W_dec.detach()[self.fid]  # [U, K, D]

    def edges(self, g: Tensor) -> Tensor:
        """``[B, U, K]``: activation x (gradient at its position . decoder row) for every (padded) feature."""
        dec = self.dec if self.dec is not None else self.decoders()
        dots = torch.bmm(g[:, self.pos].transpose(0, 1), dec.to(g.dtype).transpose(1, 2))  # [U, B, K]
        return dots.transpose(0, 1) * self.vals.to(g.dtype)


class _Rows:
    """Computes adjacency rows by backward passes through one retained frozen forward."""

    def __init__(self, model, transcoders: TranscoderSet, state: ReplacementState, batch: int):
        self.model, self.ts, self.state, self.B = model, transcoders, state, batch
        self.n_feat = len(state.features)
        L, P = state.n_layers, state.n_pos
        self.n_cols = self.n_feat + L * P + P
        cache = self.n_feat * model.cfg.d_model * 4 <= 2**29  # the decoder rows, kept when under 512 MiB
        self.per_layer = [_LayerFeatures(state.features, layer, transcoders[layer].W_dec, cache) for layer in range(L)]
        self._ctx = frozen_forward(model, transcoders, state, batch, logits_to_keep=1)
        self.run = self._ctx.__enter__()

    def close(self):
        self._ctx.__exit__(None, None, None)
        self.run = None

    def compute(self, where: list[int | None], pos: Tensor, vectors: Tensor) -> Tensor:
        """Rows ``[b, C]`` float32 on the CPU for targets reading layer ``where[i]``'s MLP input (None: the final
        norm's output) at ``pos[i]`` along ``vectors[i]`` ``[b, D]`` (``pos`` and ``vectors`` on any device)."""
        st, run, b = self.state, self.run, len(where)
        L, P = st.n_layers, st.n_pos
        outs, grads = [], []
        for layer in sorted({w for w in where if w is not None}) + ([None] if None in where else []):
            t = run.final if layer is None else run.mlp_in[layer]
            g = torch.zeros_like(t)
            rows = torch.tensor([i for i, w in enumerate(where) if w == layer], dtype=torch.long, device=g.device)
            g[rows, pos.to(g.device)[rows]] = vectors.to(g.device)[rows].to(g.dtype)
            outs.append(t)
            grads.append(g)
        inputs = [run.embed] + run.mlp_leaf
        got = torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
        g_emb = got[0] if got[0] is not None else torch.zeros_like(run.embed)
        out = torch.zeros(self.B, self.n_cols, dtype=torch.float32, device=g_emb.device)
        e0 = self.n_feat
        for layer in range(L):
            g = got[1 + layer]
            if g is None:
                continue
            lf = self.per_layer[layer]
            if lf.n:
                out[:, lf.rows[lf.valid]] = lf.edges(g)[:, lf.valid].float()
            err = torch.einsum("bpd,pd->bp", g, st.errors[layer].to(g.dtype))
            out[:, e0 + layer * P: e0 + (layer + 1) * P] = err.float()
        out[:, e0 + L * P:] = torch.einsum("bpd,pd->bp", g_emb, st.embed.to(g_emb.dtype)).float()
        return out[:b].cpu()


class _SparseRows:
    """Rows kept as their ``k`` largest |entries| (for ranking features by influence on long prompts)."""

    def __init__(self, n_rows: int, n_cols: int, k: int):
        self.k = min(k, n_cols)
        self.idx = torch.zeros(n_rows, self.k, dtype=torch.long)
        self.val = torch.zeros(n_rows, self.k, dtype=torch.float32)
        self.l1 = torch.zeros(n_rows, dtype=torch.float64)
        self.n_cols = n_cols

    def put(self, r: int, rows: Tensor) -> None:
        a = rows.abs()
        self.l1[r:r + len(rows)] = a.sum(-1, dtype=torch.float64)
        top = a.topk(self.k, dim=-1).indices
        self.idx[r:r + len(rows)] = top
        self.val[r:r + len(rows)] = rows.gather(1, top)

    def step(self, prod_rows: Tensor, n: int) -> Tensor:
        """``prod_rows @ normalize_rows(rows[:n])`` with each row's true L1 norm."""
        w = (self.val[:n].abs().double() / self.l1[:n, None].clamp_min(1e-30)) * prod_rows.double()[:, None]
        return torch.zeros(self.n_cols, dtype=torch.float64).index_add_(0, self.idx[:n].flatten(), w.flatten()).float()


def _plan(model, st: ReplacementState, n_rows: int, batch_size: int, memory_budget: int) -> tuple[int, bool]:
    """(rows per backward, whether every row fits dense in memory)."""
    P, H = st.n_pos, model.cfg.n_heads
    n_cols = len(st.features) + (st.n_layers + 1) * P
    # per row: the forward's transient scores and softmax ([H, P, P] each), the row itself, the gradients at
    # every MLP output and the embeddings; the frozen patterns are shared by the rows (stored once in the state)
    per_row = 2 * H * P * P * 4 + n_cols * 4 + 2 * (st.n_layers + 1) * P * model.cfg.d_model * 4
    B = max(1, min(batch_size, n_rows, int(memory_budget // 4 // per_row)))
    return B, n_rows * n_cols * 4 <= memory_budget // 2


def attribute(model, transcoders: TranscoderSet, prompt: str | Tensor, *, targets=None, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, max_feature_nodes: int | None = 7500, batch_size: int = 64,
              update_interval: int = 4, zero_first: bool = True, memory_budget_gb: float = 4.0,
              ranking_entries: int = 8192, progress: bool = True) -> AttributionGraph:
    """The attribution graph of one prompt.

    Args:
        model: a :class:`~mechscope.HookedModel`.
        transcoders: one transcoder per layer of ``model`` (:func:`~mechscope.graphs.load_transcoders`), on the
            model's device (the graph is computed there).
        prompt: text (BOS put in front, as the training contexts had) or token ids ``[P]`` (used as given).
        targets: target logits (token ids or one-token strings); None: the most likely tokens until
            ``desired_logit_prob``, at most ``max_n_logits``.
        max_feature_nodes: feature nodes kept (those of most influence on the logits); None: every active one.
        batch_size: rows per backward pass at most (fewer on long prompts, to fit ``memory_budget_gb``).
        update_interval: batches between re-rankings of the features by influence.
        zero_first: see :func:`~mechscope.graphs.replacement.replacement_state`.
        memory_budget_gb: the rows of every target over every active feature are kept dense when they fit in
            half of this; otherwise (long prompts) the ranking pass keeps each row's ``ranking_entries``
            largest entries (and its exact L1 norm) and a second pass recomputes the chosen rows exactly, keeping
            only the selected features' columns. Either way the edges are exact; only the greedy order of the
            features may differ.
        ranking_entries: entries per row kept by the ranking pass of a long prompt.

    Returns:
        :class:`AttributionGraph` (unpruned; see :func:`~mechscope.graphs.prune.prune`), its tensors on the CPU.
        ``info`` records the rows per backward, the passes, the seconds taken and the device.

    Raises:
        InputError: an empty prompt, one longer than the context, targets not in the vocabulary, transcoders of
            another model, with a missing layer or on another device, bad limits.
    """
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes < 0):
        raise InputError(f"max_feature_nodes must be None or an int >= 0, got {max_feature_nodes!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not memory_budget_gb > 0:
        raise InputError(f"memory_budget_gb must be > 0, got {memory_budget_gb}.")
    t0 = time.perf_counter()
    tokens = prompt_tokens(model, prompt)
    transcoders.check_model(model)
    st = replacement_state(model, transcoders, tokens, zero_first=zero_first)  # its real forward gives the logits
    logit_ids, logit_p = logit_targets(model, st.logits[-1:], targets, max_n_logits=max_n_logits,
                                       desired_logit_prob=desired_logit_prob)
    n_feat, L, P = len(st.features), st.n_layers, st.n_pos
    index = st.features.index.cpu()  # (layer, pos, feature) of each active feature, for the CPU bookkeeping
    n_logit = len(logit_ids)
    n_keep = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    n_cols = n_feat + L * P + P
    W_U = model.W_U.detach()
    demeaned = (W_U[:, logit_ids.to(W_U.device)] - W_U.mean(1, keepdim=True)).T  # [n_logit, D]

    def enc(idx: Tensor) -> Tensor:  # the encoder columns of some active features, [k, D]
        lf = index[idx][:, [0, 2]].tolist()
        return torch.stack([transcoders[la].W_enc[:, f].detach() for la, f in lf])

    B, dense = _plan(model, st, n_logit + n_keep, batch_size, int(memory_budget_gb * 2**30))
    two_pass = not dense and n_keep < n_feat
    store = (torch.zeros(n_logit + n_keep, n_cols, dtype=torch.float32) if not two_pass
             else _SparseRows(n_logit + n_keep, n_cols, ranking_entries))
    row_node = torch.zeros(n_logit + n_keep, dtype=torch.long)  # node id of each row (logits after the columns)
    engine = _Rows(model, transcoders, st, B)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(n_logit + n_keep) * (2 if two_pass else 1), desc="attribution rows", unit="row")

    def put(r: int, rows: Tensor) -> None:
        if two_pass:
            store.put(r, rows)
        else:
            store[r:r + len(rows)] = rows

    try:
        done = 0
        for i in range(0, n_logit, B):
            j = min(i + B, n_logit)
            put(i, engine.compute([None] * (j - i), torch.full((j - i,), P - 1), demeaned[i:j]))
            row_node[i:j] = torch.arange(n_cols + i, n_cols + j)
            done = j
            if bar:
                bar.update(j - i)
        visited = torch.zeros(n_feat, dtype=torch.bool)
        weights = torch.zeros(n_cols + n_logit)
        weights[n_cols:] = logit_p
        while done < n_logit + n_keep:
            if n_keep == n_feat:
                pending = (~visited).nonzero().flatten()
            else:
                An = None if two_pass else normalize_rows(store[:done])
                prod, infl = weights.clone(), torch.zeros(n_cols)
                for _ in range(4 * L + 8):  # a path visits each layer once: at most L + 1 feature hops
                    p_rows = prod[row_node[:done]]
                    step = store.step(p_rows, done) if two_pass else p_rows @ An
                    if not bool(step.any()):
                        break
                    infl += step
                    prod = torch.cat([step, torch.zeros(n_logit)])
                rank = infl[:n_feat].argsort(descending=True)
                pending = rank[~visited[rank]][:min(update_interval * B, n_logit + n_keep - done)]
            for c in range(0, len(pending), B):
                idx = pending[c:c + B]
                k = len(idx)
                put(done, engine.compute(index[idx, 0].tolist(), index[idx, 1], enc(idx)))
                row_node[done:done + k] = idx
                visited[idx] = True
                done += k
                if bar:
                    bar.update(k)
        selected = visited.nonzero().flatten()
        cols = torch.cat([selected, torch.arange(n_feat, n_cols)])  # [selected features | errors | tokens]
        order = row_node[n_logit:].argsort()
        if not two_pass:
            E = torch.cat([store[n_logit:][order][:, cols], store[:n_logit][:, cols]])
        else:  # the exact pass: the chosen rows again, keeping only the graph's columns
            del store
            E = torch.zeros(len(selected) + n_logit, len(cols), dtype=torch.float32)
            for c in range(0, len(selected), B):
                idx = selected[c:c + B]
                E[c:c + len(idx)] = engine.compute(index[idx, 0].tolist(), index[idx, 1], enc(idx))[:, cols]
                if bar:
                    bar.update(len(idx))
            for i in range(0, n_logit, B):
                j = min(i + B, n_logit)
                E[len(selected) + i:len(selected) + j] = engine.compute([None] * (j - i), torch.full((j - i,), P - 1),
                                                                        demeaned[i:j])[:, cols]
                if bar:
                    bar.update(j - i)
    finally:
        engine.close()
        if bar:
            bar.close()
    tok = model.tokenizer
    ids, lids = tokens.tolist(), logit_ids.tolist()
    strs = [tok.decode([i]) for i in ids] if tok is not None else [str(i) for i in ids]
    lstrs = [tok.decode([i]) for i in lids] if tok is not None else [str(i) for i in lids]
    return AttributionGraph(
        prompt=prompt if isinstance(prompt, str) else "", tokens=tokens.cpu(), str_tokens=strs,
        active_features=index, activations=st.features.values.float().cpu(), selected=selected,
        edges=E, logit_tokens=logit_ids, logit_probs=logit_p, logit_strs=lstrs, n_layers=L,
        model_name=model.cfg.name, transcoders=transcoders.source or "",
        info={"max_feature_nodes": max_feature_nodes, "n_active_features": n_feat, "batch_size": B,
              "passes": 2 if two_pass else 1, "first_zeroed": st.first_zeroed,
              "seconds": round(time.perf_counter() - t0, 3), "device": str(st.mlp_out.device),
              "model_dtype": str(st.mlp_out.dtype).replace("torch.", "")})
