"""Edge patching with 0/1 masks at a cost that follows the circuit, not the graph.

A patched receiver reads ``x + Σ_s M[r, s] d_s`` (``d_s`` = a source's ablated minus current output). The
general path (:class:`~mechscope.circuits.engine._Patched` with float masks) computes this as one
``[R', S] x [S, B*P*D]`` product per layer, reading every upstream source's row: O(n_layers²) rows per
forward, whatever the mask. For 0/1 masks this mixin sums, per receiver and variant, whichever side is
smaller:

- the patched sources' rows; or
- the running sum of every recorded row (a prefix sum kept as the forward runs) minus the kept rows.

So the all-patched m(∅), a small circuit (most edges patched) and a large one (few patched) cost a few rows
each; a mid-sized mask (both sides large) falls back to one product over all upstream rows for that
variant. Receivers with everything patched share one input (``x + total``), normalised and projected once;
receivers with nothing patched keep the model's own projection output, bit for bit. A layer's head rows
are computed from its z difference only when a receiver first needs them (the running sum takes the heads'
sum as one product with W_O).

The mixin expects the attributes :class:`~mechscope.circuits.engine._Patched` sets: ``V``, ``masks [V, R, S]``
bool, ``D [S, V*B, P, D]`` (rows filled as recorded), ``in_D`` / ``ready`` bool ``[S]``, ``dz`` (layer -> z
difference), ``prefix`` (``(sources summed, sum)`` pairs), ``need_receiver``, ``graph``, ``lay``, ``model``.

Shape key: V variants, B prompts, P positions, D d_model, S sources, R' receivers of one layer group, U
distinct inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BinaryMasks:
    """The 0/1-mask path of edge patching (see the module docstring)."""

    def _rows(self, idx: Tensor | int, rows: slice) -> Tensor:
        """``D[idx, rows]`` (an int ``idx``: ``D[:idx, rows]``, a view), first filling in head rows not computed
        yet; rows of sources never recorded (nothing patches them) read as zeros."""
        if isinstance(idx, int):
            self._rows(torch.arange(idx, device=self.ready.device)[~self.ready[:idx]], rows)
            return self.D[:idx, rows]
        never = idx[~self.ready[idx] & ~self.in_D[idx]]
        if never.numel():
            self.D[never] = 0
            self.ready[never] = True
        missing = idx[~self.ready[idx]]
        if missing.numel():
            H = self.graph.n_heads
            layer, head = (missing - 1) // (H + 1), (missing - 1) % (H + 1)  # only head rows are filled late
            for L in layer.unique().tolist():
                hs = head[layer == L]
                W_O = self.model.W_O(L)[hs]
                self.D[missing[layer == L]] = torch.einsum("bphd,hdm->hbpm", self.dz[L][:, :, hs], W_O.to(self.D.dtype))
            self.ready[missing] = True
        return self.D[idx, rows]

    def _plan(self, recv: list[int], S: int) -> tuple[Tensor, list, list, list[bool]]:
        """(masks ``[V, R', S]``, patched and kept counts ``[V][R']``, per variant whether one product over all
        ``S`` rows is cheaper than gathering: gathering k rows costs about 3k row passes, the product S)."""
        M = self.masks[:, recv, :S]
        n_patched = M.sum(-1).tolist()
        n_kept = (~M & self.in_D[:S]).sum(-1).tolist()
        dense = [3 * sum(min(a, b) for a, b in zip(p, k)) > S for p, k in zip(n_patched, n_kept)]
        return M, n_patched, n_kept, dense

    def distinct_inputs(self, recv: list[int], S: int, x: Tensor, plan=None) -> tuple[Tensor, Tensor]:
        """The distinct patched inputs ``[U, B, P, D]`` of receivers ``recv`` (all reading the first ``S``
        sources) and, per receiver and variant, which one it reads (``[R', V]`` int64 on the CPU; -1: nothing
        patched, it reads the clean ``x``)."""
        while len(self.prefix) > 1 and self.prefix[1][0] <= S:  # receivers read in non-decreasing S
            self.prefix.pop(0)
        total = self.prefix[0][1] if self.prefix and self.prefix[0][0] <= S else None  # Σ recorded rows < S
        stored = self.in_D[:S]
        M, n_patched, n_kept, dense_v = plan or self._plan(recv, S)
        B = x.shape[0] // self.V
        uniq: list[Tensor] = []
        index = torch.full((len(recv), self.V), -1, dtype=torch.long)
        for v in range(self.V):
            rows = slice(v * B, (v + 1) * B)
            everything = -1
            dense = M[v].to(x.dtype) @ self._rows(S, rows).flatten(1) if dense_v[v] else None
            for i in range(len(recv)):
                if n_patched[v][i] == 0:
                    continue
                if dense is not None:
                    index[i, v] = len(uniq)
                    uniq.append(x[rows] + dense[i].view_as(x[rows]))
                elif n_kept[v][i] == 0:
                    if everything < 0:
                        everything = len(uniq)
                        uniq.append(x[rows] + total[rows])
                    index[i, v] = everything
                else:
                    if n_kept[v][i] < n_patched[v][i]:
                        kept = (~M[v, i] & stored).nonzero().flatten()
                        delta = total[rows] - self._rows(kept, rows).sum(0)
                    else:
                        delta = self._rows(M[v, i].nonzero().flatten(), rows).sum(0)
                    index[i, v] = len(uniq)
                    uniq.append(x[rows] + delta)
        return (torch.stack(uniq) if uniq else x[:0]), index

    def binary_inputs(self, recv: list[int], S: int, x: Tensor) -> Tensor:
        """Every receiver's input ``[R', V*B, P, D]``."""
        uniq, index = self.distinct_inputs(recv, S, x)
        out = x.unsqueeze(0).repeat(len(recv), *([1] * x.dim()))
        B = x.shape[0] // self.V
        for (i, v), u in zip((index >= 0).nonzero().tolist(), index[index >= 0].tolist()):
            out[i, v * B:(v + 1) * B] = uniq[u]
        return out

    def binary_normed_inputs(self, recv: list[int], S: int, x: Tensor, norm) -> tuple[Tensor, Tensor] | Tensor:
        """(``norm`` of each distinct input ``[U, B, P, D]``, which one each receiver reads ``[R', V]``); or, when
        every variant takes the product over all rows (mid-sized masks), ``norm`` of every receiver's input
        ``[R', V*B, P, D]``, for the general batched projection."""
        plan = self._plan(recv, S)
        M, _, _, dense = plan
        if all(dense):
            B = x.shape[0] // self.V
            out = x.unsqueeze(0).repeat(len(recv), *([1] * x.dim()))
            for v in range(self.V):
                rows = slice(v * B, (v + 1) * B)
                delta = M[v].to(x.dtype) @ self._rows(S, rows).flatten(1)  # [R', B*P*D]
                out[:, rows] += delta.view(len(recv), *x[rows].shape)
            return norm(out)
        uniq, index = self.distinct_inputs(recv, S, x, plan)
        return (norm(uniq) if len(uniq) else uniq), index

    def binary_project(self, L: int, m: int, mine: list[tuple[int, int]], normed: tuple[Tensor, Tensor],
                       t: Tensor) -> Tensor:
        """Projection module ``m``'s output ``t [V*B, P, n_cols]`` with its receivers' columns recomputed: one
        matmul per distinct input, for every receiver of the module that reads it; receivers that read
        their clean input keep the module's own output."""
        uniq, index = normed
        W, b, cols = self.lay.stack[L][m]
        readers: dict[int, list[int]] = {}  # distinct input -> rows of the weight stack that read it
        where: dict[int, int] = {}  # distinct input -> its variant
        for i, j in mine:
            for v, u in enumerate(index[i].tolist()):
                if u >= 0:
                    readers.setdefault(u, []).append(j)
                    where[u] = v
        if not readers:
            return t
        new = t.clone()
        B, P, D = uniq.shape[1:]
        for u, js in readers.items():
            rows = torch.tensor(js, device=W.device)
            w = W[rows].to(uniq.dtype).permute(1, 0, 2).reshape(D, -1)  # [D, n * d_head]
            vals = uniq[u].reshape(B * P, D) @ w
            if b is not None:
                vals = vals + b[rows].to(uniq.dtype).flatten()
            new[where[u] * B:(where[u] + 1) * B, :, cols[rows].flatten()] = vals.view(B, P, -1)
        return new
