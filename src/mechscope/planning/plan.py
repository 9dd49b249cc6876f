"""The planner: what a harvest, a dictionary training run or a feature database will cost, before it runs.

Each ``plan_*`` function returns a :class:`~mechscope.planning.budget.Plan`: peak memory per rank, disk bytes
and wall time, each a sum of named terms with the formula that gave it (:mod:`mechscope.planning.budget`).
Every term follows what the run's code allocates and does (the count is in each term's formula); times are
counts (:mod:`mechscope.planning.costs`) over a :class:`~mechscope.planning.calibrate.DeviceProfile`'s measured
or assumed rates. ``world`` ranks split the token work; training's ``tp`` latent shards split each dictionary.

:meth:`Plan.check` refuses a plan over a :class:`Budget` (or over the device's memory) with every term's number
and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mechscope.core.errors import InputError
from mechscope.planning.budget import Budget, BudgetError, Plan, Term
from mechscope.planning.calibrate import DeviceProfile
from mechscope.planning.costs import (
    STEP_BATCH_TENSORS,
    ModelDims,
    dictionary_params,
    model_dims,
    selection_bytes_per_token,
    shard_state,
    train_flop_per_token,
)

__all__ = ["Budget", "BudgetError", "Plan", "Term", "plan_features", "plan_harvest", "plan_train"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_GB = 10**9
_PAGE = 4096
#: Size of the training-curves page: plotly's JavaScript is inlined (bytes, plotly 5/6).
CURVES_PAGE_BYTES = 4_830_000


# -- shared pieces --------------------------------------------------------------------------------------
def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be a positive int, got {v!r}.")


def _dtype_bytes(name: str, what: str) -> int:
    if name not in _DTYPE_BYTES:
        raise InputError(f"{what} must be one of {sorted(_DTYPE_BYTES)}, got {name!r}.")
    return _DTYPE_BYTES[name]


def _device(device: DeviceProfile | None, model, dtype: str) -> DeviceProfile:
    if device is not None:
        return device
    from mechscope.planning.calibrate import calibrate

    return calibrate(model, dtype=dtype)


def _nodes(world: int, dev: DeviceProfile) -> int:
    return max(1, math.ceil(world / dev.devices_per_node))


def _plan(kind: str, world: int, tp: int, dev: DeviceProfile, terms: list[Term], facts: dict) -> Plan:
    return Plan(kind, world, tp, dev.describe(), tuple(terms), facts, dev.notes,
                None if dev.measured else dev.memory_bytes, dev.host_is_device)


def _process_terms(dev: DeviceProfile, dims: ModelDims | None, mb: int) -> list[Term]:
    terms = [Term("memory", "runtime", dev.runtime_bytes, "the process (or CUDA context) before any model or data"
                  + (" (measured)" if dev.measured else " (assumed)"))]
    if dims is not None:
        terms += [Term("memory", "model weights", dims.n_params * mb, f"{dims.n_params:,} parameters x {mb} B",
                       "--dtype"),
                  Term("memory", "model extras", dev.model_extra_bytes, "tokenizer and modelling code beside the "
                       "weights (measured)" if dev.measured else "host side, not counted", host=True)]
    return terms


def _forward_time(dims: ModelDims, hooks: list[str], n_tokens: int, n_forwards: int, context_len: int, dtype: str,
                  dev: DeviceProfile) -> tuple[Term, dict]:
    """One rank's forwards: ``n_forwards`` batches totalling ``n_tokens``."""
    L = dims.layers_run(hooks)
    logit_pos = 1 / context_len if L == dims.n_layers and "ln_final.hook_normalized" in hooks else 0.0
    fpt = dims.forward_flop_per_token(L, context_len, logit_pos)
    rate = dev.forward_rate(dtype)
    fixed = dev.forward_fixed_s if dev.measured else 0.0
    form = (f"{n_tokens:,} tokens x {fpt / 1e9:,.4g} GFLOP/token (2 x {L} layers x {dims.layer_params:,} params + "
            f"attention 2 x {L} x {context_len} x {dims.n_heads * dims.d_head}"
            + (" + logits of one position per context" if logit_pos else "") + f") / {rate / 1e12:,.4g} TFLOP/s"
            + (f" + {n_forwards:,} forwards x {fixed * 1e3:,.1f} ms" if fixed else ""))
    facts = {"layers_run": L, "forward_flop_per_token": fpt, "forward_flop_per_s": rate,
             "tokens_per_s_per_rank": rate / fpt}
    return Term("time", "model forward", n_tokens * fpt / rate + n_forwards * fixed, form,
                "--tokens or the hooked layer"), facts


# -- harvest ------------------------------------------------------------------------------------------------
def plan_harvest(model, hooks: str | Sequence[str], n_tokens: int, *, context_len: int = 128,
                 forward_batch_contexts: int = 8, shard_tokens: int = 2**18, store_dtype: str = "bfloat16",
                 dtype: str = "bfloat16", skip_positions: int = 1, world: int = 1,
                 device: DeviceProfile | None = None) -> Plan:
    """Plan :func:`mechscope.data.harvesting.harvest` (``mechscope sae harvest``).

    Args:
        model: anything :func:`~mechscope.planning.costs.model_dims` takes (a name, folder, config or HookedModel).
        hooks: concrete hook names. n_tokens: tokens of text (rounded down to whole contexts, as the CLI does).
        context_len, forward_batch_contexts, shard_tokens, skip_positions: as the harvest's.
        store_dtype: dtype on disk. dtype: model dtype. world: ranks (shard ``s`` to rank ``s % world``).
        device: a :class:`DeviceProfile` (None: :func:`~mechscope.planning.calibrate.calibrate` this machine).

    Returns:
        a :class:`Plan`: memory per rank = runtime + weights + token ids + a forward's intermediates and hooked
        values (:func:`~mechscope.data.store.plan_memory`; the allocator keeps their blocks for the next forward)
        + a shard's write (its rows, safetensors' copy and the serialized bytes); disk = every row's values and
        index columns plus shard headers; time = the rank's forwards (FLOP / rate + a fixed cost per batch) +
        its shards' bytes / the node's write bandwidth (serialise, sha256, fsync).

    Raises:
        InputError: a bad argument (named); HookNameError for a bad hook; ModelLoadError for an unknown model.
    """
    from mechscope.data.store import plan_memory

    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    for name, v in (("n_tokens", n_tokens), ("context_len", context_len), ("world", world),
                    ("forward_batch_contexts", forward_batch_contexts), ("shard_tokens", shard_tokens)):
        _positive(name, v)
    dims = model_dims(model)
    sb, mb = _dtype_bytes(store_dtype, "store_dtype"), _dtype_bytes(dtype, "dtype")
    dev = _device(device, model, dtype)
    n_ctx = max(1, n_tokens // context_len)
    rows = context_len - skip_positions
    cps = max(1, shard_tokens // rows)
    n_shards = -(-n_ctx // cps)
    import torch

    mp = plan_memory(_DimsModel(dims, mb), hooks, context_len=context_len,
                     forward_batch_contexts=forward_batch_contexts, dtype={4: torch.float32, 2: torch.bfloat16}[sb],
                     skip_positions=skip_positions,
                     shard_tokens=shard_tokens, n_contexts=n_ctx)
    got = {t.name: t for t in mp.terms}
    widths = {h: dims.hook_width(h) for h in hooks}
    D = sum(widths.values())
    shard_rows = min(cps, n_ctx) * rows
    terms = _process_terms(dev, dims, mb)
    terms += [Term("memory", "token ids", 8 * n_ctx * context_len, f"{n_ctx:,} contexts x {context_len} x 8 B (int64)",
                   "--tokens", host=True),
              Term("memory", "forward", got["forward"].n_bytes, got["forward"].what, "--batch-contexts"),
              Term("memory", "hooked values", got["cache"].n_bytes, got["cache"].what, "--batch-contexts", host=True),
              Term("memory", "shard staging", got["staging"].n_bytes, f"3 x {shard_rows:,} rows x ({D} x {sb} B + 16 B "
                   "index): " + got["staging"].what, "--shard-tokens", phase="write", host=True)]
    header = n_shards * (200 + 90 * (len(hooks) + 3))  # safetensors JSON header: ~90 B per tensor + metadata
    terms += [Term("disk", "activations", mp.disk_bytes, f"{n_ctx:,} contexts x {rows} rows x ({D} values x {sb} B "
                   "+ 16 B of context/position/token index)", "--tokens, --hook or --store-dtype"),
              Term("disk", "shard headers", header, f"{n_shards:,} shards x ~{200 + 90 * (len(hooks) + 3)} B")]
    # shard s goes to rank s % world; the slowest rank holds the most contexts
    last = n_ctx - (n_shards - 1) * cps  # contexts of the last shard
    per_rank, fwds = [], []
    for r in range(world):
        k = len(range(r, n_shards, world))
        short = k and (n_shards - 1) % world == r
        per_rank.append(k * cps - (cps - last if short else 0))
        fwds.append(k * -(-cps // forward_batch_contexts) - ((-(-cps // forward_batch_contexts))
                                                             - (-(-last // forward_batch_contexts)) if short else 0))
    r = max(range(world), key=per_rank.__getitem__)
    fwd, facts = _forward_time(dims, hooks, per_rank[r] * context_len, fwds[r], context_len, dtype, dev)
    nodes = _nodes(world, dev)
    bw = dev.disk_write_bytes_per_s
    node_bytes = (mp.disk_bytes + header) / nodes
    rank_bytes = (mp.disk_bytes + header) * per_rank[r] / n_ctx
    # a rank writes each shard after computing it; the ranks of a node share its disk, so while one writes another
    # computes, until the disk is the bottleneck
    write = max(rank_bytes / bw, node_bytes / bw - fwd.value)
    terms += [fwd, Term("time", "write", write, f"max({rank_bytes / _GB:,.3f} GB of this rank's shards, "
                        f"{node_bytes / _GB:,.3f} GB of the node's - what the disk writes while this rank computes) / "
                        f"{bw / 1e6:,.0f} MB/s (serialise, sha256, fsync; one disk per node)", "--store-dtype")]
    facts.update(model=dims.name, hooks=widths, n_contexts=n_ctx, n_tokens=n_ctx * context_len, rows=n_ctx * rows,
                 n_shards=n_shards, contexts_per_rank=per_rank[r], forwards_per_rank=fwds[r])
    return _plan("harvest", world, 1, dev, terms, facts)


class _DimsModel:
    """Enough of a HookedModel for :func:`mechscope.data.store.plan_memory`, from dimensions only."""

    def __init__(self, dims: ModelDims, dtype_bytes: int):
        import torch

        self.cfg = dims
        self.dtype = {4: torch.float32, 2: torch.bfloat16}[dtype_bytes]

    def resolve(self, hooks) -> list[str]:
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        for h in hooks:
            if any(c in h for c in "*?["):
                raise InputError(f"the planner needs concrete hook names, got the pattern {h!r}.")
            self.cfg.hook_width(h)
        return hooks

    def hook_names(self):  # pragma: no cover - plan_memory uses resolve only
        return {}


# -- training -------------------------------------------------------------------------------------------------
def plan_train(d_in: int, widths: int | Sequence[int], n_tokens: int, *, architecture: str = "topk",
               k: int | Sequence[int] | None = 32, batch_tokens: int = 4096, compute_dtype: str = "float32",
               d_out: int | None = None, skip: bool = False, checkpoint_every_steps: int = 0,
               keep_checkpoints: int = 2, activation_bytes: int = 2, data_rows: int | None = None,
               norm_estimation_batches: int = 8, log_every_steps: int = 10, world: int = 1, tp: int = 1,
               device: DeviceProfile | None = None, model="smollm2-135m", model_dtype: str = "bfloat16") -> Plan:
    """Plan :class:`mechscope.training.Trainer` on harvested shards: every width x k trains from one pass.

    Args:
        d_in: input width (``d_model`` for a residual hook). widths: ``d_sae`` of each dictionary.
        n_tokens: training tokens (rounded down to whole steps, as :class:`~mechscope.training.TrainConfig`).
        architecture: relu, topk, batchtopk or jumprelu. k: latents per token (topk, batchtopk; one per run).
        batch_tokens: tokens per optimiser step (global). compute_dtype: float32 or bfloat16 (autocast).
        d_out, skip: transcoders. checkpoint_every_steps / keep_checkpoints / norm_estimation_batches /
            log_every_steps: as TrainConfig.
        activation_bytes: bytes per value in the shards read (2: bfloat16).
        data_rows: rows in the harvested store (default ``n_tokens``: one epoch); its pages are mapped.
        world: ranks, a ``world / tp`` (data parallel) x ``tp`` (latent shards) grid (:mod:`mechscope.training.
            parallel`). device: a profile (None: calibrate ``model``). model, model_dtype: for that calibration.

    Returns:
        a :class:`Plan`. Memory per rank: runtime, the optimizer's and curves page's imports, each dictionary's
        shard of fp32 parameters, gradients and Adam moments (``W_enc``, ``b_enc``, ``W_dec``, JumpReLU's
        threshold split ``tp`` ways; ``b_dec``, ``W_skip`` replicated; BatchTopK's threshold a buffer), the
        epoch's row permutation, the mapped shard pages (reclaimable), a step's temporaries (its rows' batch,
        :data:`~mechscope.planning.costs.STEP_BATCH_TENSORS` fp32 ``[rows, d_sae / tp]`` tensors and one
        parameter-sized temporary, all parameters' on a GPU: Adam's multi-tensor step; the allocator keeps their
        blocks for the next step) and the curves page.
        Disk: at most ``keep + 1`` checkpoints at once (a new one is written before the oldest goes), the
        dictionaries, the curves page. Time: per step and dictionary, the device's step time
        (:meth:`DeviceProfile.step_seconds`: fixed + FLOP of the rank's rows and latents + passes over its
        parameters), reading the rank's rows from the shards, checkpoints, start-up and finish, and the collectives:
        data parallel, one ring all-reduce of every gradient in a flat fp32 buffer ``2 (dp-1)/dp x 4 B x params``
        per step; latent sharding, all-gathers of ``[rows, k]`` values (4 B) and indices (8 B) from every shard and
        ring all-reduces of ``[rows, d_out]`` partial reconstructions (forward) and ``[rows, d_in]`` input gradients
        (backward).

    Raises:
        InputError: a bad argument (named), e.g. ``tp`` not dividing ``world`` or a width.
    """
    from mechscope.training import TrainConfig

    widths = [widths] if isinstance(widths, int) else list(widths)
    ks = [k] if k is None or isinstance(k, int) else list(k)
    ks = ks if architecture in ("topk", "batchtopk") else [None]
    if architecture not in STEP_BATCH_TENSORS:
        raise InputError(f"architecture must be one of {sorted(STEP_BATCH_TENSORS)}, got {architecture!r}.")
    for name, v in (("d_in", d_in), ("n_tokens", n_tokens), ("batch_tokens", batch_tokens), ("world", world),
                    ("tp", tp), *(("width", w) for w in widths), *(("k", kk) for kk in ks if kk is not None)):
        _positive(name, v)
    vb = _dtype_bytes(compute_dtype, "compute_dtype")
    if world % tp:
        raise InputError(f"tp={tp} must divide world={world} (the ranks form world/tp data-parallel groups of tp "
                         "latent shards).")
    d_out = d_out or d_in
    dp = world // tp
    cfg = TrainConfig(n_tokens=n_tokens, batch_tokens=batch_tokens, dtype=compute_dtype,
                      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints)
    dicts = [(f"{architecture}_w{w}" + (f"_k{kk}" if kk else ""), w, kk) for w in widths for kk in ks]
    shards = {n: shard_state(d_in, w, architecture, d_out, skip=skip, tp=tp) for n, w, _ in dicts}
    whole = {n: shard_state(d_in, w, architecture, d_out, skip=skip) for n, w, _ in dicts}
    dev = _device(device, model, model_dtype)
    rows = -(-batch_tokens // dp)  # the largest replica's rows
    steps, N = cfg.n_steps, cfg.n_tokens_trained
    R = data_rows or N
    # -- memory
    terms = _process_terms(dev, None, 0)
    terms += [Term("memory", "optimizer import", dev.optimizer_import_bytes, "torch._dynamo, imported by the first "
                   "torch.optim.Adam (measured)" if dev.measured else "host side", host=True),
              Term("memory", "step workspace", dev.train_workspace_bytes, "autograd, kernel workspaces and allocator "
                   "slack left by the steps (measured)" if dev.measured else "not modelled on this device")]
    for n, w, _ in dicts:
        s = shards[n]
        terms.append(Term("memory", f"{n}: weights, grads, Adam (fp32)", s.state_bytes,
                          f"16 B x {s.params:,} parameters"
                          + (f" (latents / tp {tp}, b_dec replicated)" if tp > 1 else "")
                          + (f" + {s.buffer_bytes:,} B threshold buffer" if s.buffer_bytes else ""),
                          "--width, or shard the latents (--tp)"))
    touched = R * d_in * activation_bytes * (1 - math.exp(-(steps + norm_estimation_batches) * rows / R
                                                          * max(1.0, _PAGE / (d_in * activation_bytes))))
    if dev.host_is_device:  # the kernel keeps no more file pages than the machine has memory
        touched = min(touched, dev.memory_bytes)
    terms += [Term("memory", "epoch permutation", 8 * R, f"{R:,} rows x 8 B (int64)", host=True),
              Term("memory", "mapped shard pages", touched,
                   f"{R:,} rows x {d_in} x {activation_bytes} B x the fraction of {_PAGE} B pages that "
                   f"{steps + norm_estimation_batches:,} batches of {rows:,} random rows touch",
                   host=True, reclaimable=True)]
    big = max(dicts, key=lambda x: x[1])
    a, m_loc = STEP_BATCH_TENSORS[architecture], shards[big[0]].d_sae
    terms += [Term("memory", "input batch", rows * d_in * (activation_bytes + 4), f"{rows:,} rows x {d_in} x "
                   f"({activation_bytes} B read + 4 B fp32)", "--batch-tokens"),
              Term("memory", "batch activations", a * 4 * rows * m_loc, f"{a} x 4 B x {rows:,} rows x {m_loc:,} latents"
                   " (the widest dictionary; dictionaries step one at a time)", "--batch-tokens or --width"),
              Term("memory", "optimizer temporary",
                   4 * d_in * m_loc if dev.host_is_device else 4 * shards[big[0]].params,
                   f"4 B x {d_in} x {m_loc:,} (Adam one tensor at a time on a CPU)" if dev.host_is_device else
                   f"4 B x {shards[big[0]].params:,} parameters (Adam's multi-tensor step on a GPU)"),
              Term("memory", "curves page", dev.curves_page_bytes, "plotly and the training-curves HTML (measured)"
                   if dev.measured else "host side", phase="finish", host=True)]
    if tp > 1 and big[2]:
        terms.append(Term("memory", "top-k exchange", tp * rows * big[2] * 12, f"{tp} shards x {rows:,} rows x "
                          f"{big[2]} x (4 B value + 8 B index)"))
    # -- disk: checkpoints every `every` steps before the last and one at the end; keep + 1 exist at the peak
    written = ((steps - 1) // checkpoint_every_steps if checkpoint_every_steps else 0) + 1
    n_ckpt = min(keep_checkpoints + 1, written)
    for n, w, _ in dicts:
        s = whole[n]
        terms += [Term("disk", f"{n}: checkpoints", n_ckpt * s.checkpoint_bytes, f"{n_ckpt} x (params + Adam moments, "
                       f"12 B x {s.params:,}, + {s.buffer_bytes + 8 * s.d_sae:,} B buffers and counters)",
                       "--checkpoint-every or --width"),
                  Term("disk", f"{n}: dictionary", 4 * s.params + s.buffer_bytes, f"4 B x {s.params:,} parameters")]
    lines = len(dicts) * (steps // log_every_steps + 1)
    terms.append(Term("disk", "curves page and metrics", CURVES_PAGE_BYTES + 250 * lines,
                      "plotly inlined, ~250 B per metrics line"))
    # -- time (one rank)
    step_parts = [0.0, 0.0, 0.0]
    flop_tok = 0.0
    for n, w, kk in dicts:
        s = shards[n]
        f = train_flop_per_token(d_in, s.d_sae, architecture, -(-kk // tp) if kk else kk)
        flop_tok += f
        for i, v in enumerate(dev.step_seconds(architecture, compute_dtype, rows * f, s.params)):
            step_parts[i] += v
    fixed, comp, par = step_parts
    rate = dev.train_rate(architecture, compute_dtype)
    terms += [Term("time", "dictionary training", steps * comp,
                   f"{steps:,} steps x {rows:,} rows x {flop_tok / 1e9:,.4g} GFLOP/row ("
                   + ("4dm + 8dk" if architecture == "topk" else "12dm") + ", per rank) / "
                   f"{rate / 1e12:,.4g} TFLOP/s", "--tokens or --width"),
              Term("time", "parameter passes", steps * par, f"{steps:,} steps x Adam, decoder norms over "
                   f"{sum(s.params for s in shards.values()):,} parameters"),
              Term("time", "step overhead", steps * fixed, f"{steps:,} steps x {fixed * 1e3:,.2f} ms")]
    sel = sum(selection_bytes_per_token(shards[n].d_sae, architecture, vb) for n, _, _ in dicts)
    if sel and not dev.measured:  # a calibration's step rate already includes these passes
        terms.append(Term("time", "TopK selection (memory-bound)", steps * rows * sel / dev.memory_bytes_per_s,
                          f"{steps:,} x {rows:,} rows x {sel:,.0f} B / {dev.memory_bytes_per_s / 1e12:,.2f} TB/s"))
    # the ranks of a tp group read the same rows (the page cache serves all but one): a node reads its replicas' rows
    nodes = _nodes(world, dev)
    dp_node = max(1, -(-dp // nodes))
    row_bytes = rows * d_in * activation_bytes
    batches = steps + norm_estimation_batches
    if dev.gather_bytes_per_s:
        read, form = batches * row_bytes / dev.gather_bytes_per_s, f"/ {dev.gather_bytes_per_s / 1e6:,.0f} MB/s"
    else:
        read = batches * dp_node * row_bytes / dev.disk_read_bytes_per_s
        form = (f"x {dp_node} replicas per node / {dev.disk_read_bytes_per_s / 1e6:,.0f} MB/s per node (streaming "
                "rate assumed: rows read by page faults one at a time would be slower)")
    terms.append(Term("time", "read shards", read,
                      f"{batches:,} batches x {rows:,} rows x {d_in} x {activation_bytes} B " + form))
    ck = sum(s.checkpoint_bytes for s in whole.values()) / (tp if tp > 1 else 1)
    terms.append(Term("time", "checkpoints", written * ck / dev.disk_write_bytes_per_s,
                      f"{written} x {ck / _GB:,.4f} GB / {dev.disk_write_bytes_per_s / 1e6:,.0f} MB/s",
                      "--checkpoint-every"))
    terms.append(Term("time", "start-up and finish", dev.optimizer_import_s + dev.curves_page_s,
                      f"optimizer import {dev.optimizer_import_s:,.2f} s + curves page {dev.curves_page_s:,.2f} s"))
    terms += _collective_terms(architecture, dicts, shards, d_in, d_out, rows, steps, dp, tp, world, batch_tokens, dev)
    facts = {"n_steps": steps, "n_tokens_trained": N, "rows_per_rank": rows, "dp": dp,
             "dictionaries": {n: dictionary_params(d_in, w, d_out, skip=skip, threshold=architecture == "jumprelu")
                              for n, w, _ in dicts},
             "train_flop_per_token": flop_tok, "train_flop_per_s": rate,
             "state_bytes": {n: s.state_bytes for n, s in shards.items()}, "checkpoints_written": written}
    return _plan("train", world, tp, dev, terms, facts)


def _collective_terms(arch, dicts, shards, d_in, d_out, rows, steps, dp, tp, world, B, dev) -> list[Term]:
    """Per-step collectives of :mod:`mechscope.training.parallel` and :mod:`~mechscope.training.tensor_parallel`."""
    link, lat = dev.link_bytes_per_s, dev.link_latency_s
    terms = []
    if dp > 1:
        P = sum(s.params for s in shards.values())
        per = 2 * (dp - 1) / dp * 4 * P + sum(s.d_sae for s in shards.values())  # + the fired mask (uint8)
        n_calls = 7 * len(dicts)  # presence, gradients, loss, fired, 3 metrics
        terms.append(Term("time", "gradient all-reduce", steps * (per / link + n_calls * lat),
                          f"{steps:,} steps x ({per / _GB:,.4f} GB: ring, fp32, one flat buffer / "
                          f"{link / 1e9:,.1f} GB/s + {n_calls} collectives x {lat * 1e6:,.0f} us)",
                          "use latent sharding (--tp)"))
    if tp > 1:
        per, n_calls = 0.0, 0
        for n, w, kk in dicts:
            per += 2 * (tp - 1) / tp * rows * (d_out + d_in) * 4  # recons forward, input gradient backward
            n_calls += 5
            if arch == "topk":
                per += (tp - 1) * rows * kk * 12
            elif arch == "batchtopk":
                per += world * kk * B * 4  # every rank's top k*B values
        terms.append(Term("time", "latent-shard exchange", steps * (per / link + n_calls * lat),
                          f"{steps:,} steps x ({per / _GB:,.4f} GB: [rows, k] values and indices gathered, [rows, d] "
                          f"all-reduced twice / {link / 1e9:,.1f} GB/s + {n_calls} collectives x {lat * 1e6:,.0f} us);"
                          " AuxK adds a gather of k_aux candidates once latents die"))
    return terms


# -- feature databases ---------------------------------------------------------------------------------------
def plan_features(model, hook: str, n_latents: int, n_tokens: int, *, context_len: int = 128,
                  batch_contexts: int = 8, top_k: int = 20, sample_size: int = 40, n_quantile_examples: int = 20,
                  coact_max_latents: int = 16384, encode: str = "dictionary", l0: int | None = None,
                  dtype: str = "bfloat16", encode_dtype: str = "bfloat16", world: int = 1,
                  device: DeviceProfile | None = None) -> Plan:
    """Plan :func:`mechscope.features.build_feature_db` (``mechscope features build``).

    Args:
        model: as :func:`plan_harvest`. hook: the dictionary's input hook (or ``blocks.L.mlp.hook_post``).
        n_latents: the dictionary's width (or d_mlp for neurons). n_tokens: tokens of text.
        top_k, sample_size, coact_max_latents: as :class:`~mechscope.features.StatsConfig`;
            n_quantile_examples: its ``n_quantile_bins * per_bin``.
        encode: "dictionary" (an encoder matmul per token) or "neurons" (none).
        l0: latents firing per token (default: 32 for a dictionary, half the neurons).
        dtype / encode_dtype: model and encoder dtypes. world: ranks. device: as :func:`plan_harvest`.

    Returns:
        a :class:`Plan`. Memory per rank: runtime, weights, token ids, the dictionary (fp32 and its bf16 encoder),
        the running state (example buffers ``4 n (top_k + sample) P``, co-activation counts ``4 n^2``, both
        doubled when ranks merge), a forward and a batch's dense activations (their blocks stay with the
        allocator), then the larger of the logit effects (``W_U`` in fp32 and a ``[256, d_vocab]`` chunk, beside the
        sorted examples) and the database write (the sorted examples and the writer's tables, measured bytes per
        stored value). Disk: the DuckDB file (measured bytes per example row). Time: forwards, encoder matmuls and
        the statistics update (per firing entry, per latent and context) split over ranks, then on rank 0 the logit
        effects and the database write.

    Raises:
        InputError: a bad argument (named).
    """
    for name, v in (("n_latents", n_latents), ("n_tokens", n_tokens), ("context_len", context_len), ("world", world),
                    ("batch_contexts", batch_contexts), ("top_k", top_k)):
        _positive(name, v)
    if encode not in ("dictionary", "neurons"):
        raise InputError(f"encode must be 'dictionary' or 'neurons', got {encode!r}.")
    dims = model_dims(model)
    mb = _dtype_bytes(dtype, "dtype")
    dev = _device(device, model, dtype)
    d_in = dims.hook_width(hook)
    n, P, B = n_latents, context_len, batch_contexts
    K, S, Q = top_k, sample_size, n_quantile_examples
    n_ctx = max(1, n_tokens // P)
    l0 = l0 or (min(32, n) if encode == "dictionary" else max(1, n // 2))
    merge = 2 if world > 1 else 1
    db = dev.db
    buffers = 4 * n * (K + S) * P
    coact = 4 * n * n if n <= coact_max_latents else 0
    counters = n * (8 * 70 + 8 + 8 + 4) + n * (K + S) * 20  # hist, fired, sums, max; keys, contexts, positions
    terms = _process_terms(dev, dims, mb)
    terms.append(Term("memory", "token ids", 8 * n_ctx * P, f"{n_ctx:,} contexts x {P} x 8 B", "--tokens", host=True))
    if encode == "dictionary":
        p = dictionary_params(d_in, n)
        terms.append(Term("memory", "dictionary", 4 * p + (2 * d_in * n if encode_dtype == "bfloat16" else 0),
                          f"4 B x {p:,}"
                          + (f" + bf16 encoder 2 B x {d_in} x {n:,}" if encode_dtype == "bfloat16" else "")))
    terms += [Term("memory", "example buffers", merge * buffers, f"4 B x {n:,} latents x ({K} + {S}) contexts x {P}"
                   + (" x 2 (merge)" if merge > 1 else ""), "--top-k or --context-len", host=True),
              Term("memory", "co-activation", merge * coact, f"4 B x {n:,}^2" if coact else
                   f"skipped: {n:,} > {coact_max_latents:,} latents", "the width", host=True),
              Term("memory", "counters", counters, f"{n:,} latents x (70-bin histogram, sums, slot keys)", host=True),
              Term("memory", "forward",
                   B * P * (6 * dims.d_model + 3 * dims.d_mlp) * mb + B * dims.n_heads * P * P * mb,
                   f"{B} x {P} tokens of one block's intermediates", "--batch-contexts"),
              Term("memory", "batch activations", 3 * 4 * B * P * n, f"3 x 4 B x {B} x {P} x {n:,} (pre-activations, "
                   "activations, firing entries)", "--batch-contexts", host=True)]
    sorted_ex = 4 * n * P * (K + Q + 1)
    rows = n * (min(K, n_ctx) + min(Q, n_ctx))
    terms += [Term("memory", "sorted examples", sorted_ex, f"4 B x {n:,} x {P} x ({K} top + {Q} + 1 quantile slots)",
                   phase="logit effects", host=True),
              Term("memory", "W_U and logits", 4 * dims.d_model * dims.d_vocab + 8 * 256 * dims.d_vocab,
                   f"4 B x {dims.d_model} x {dims.d_vocab:,} + 2 x 4 B x 256 x {dims.d_vocab:,}", phase="logit effects",
                   host=True),
              Term("memory", "sorted examples kept", sorted_ex, "as above", phase="write", host=True),
              Term("memory", "database tables", db["memory_fixed"] + db["memory_per_value"] * rows * P,
                   f"{db['memory_fixed'] / 1e6:,.0f} MB + {rows:,} example rows x {P} values x "
                   f"{db['memory_per_value']:,.1f} B (numpy, arrow and DuckDB's buffers; measured)",
                   "--top-k or --context-len", phase="write", host=True)]
    terms.append(Term("disk", "feature database", db["fixed_bytes"] + rows * db["bytes_per_row"],
                      f"{db['fixed_bytes'] / 1e6:,.1f} MB + {rows:,} example rows (at most {K} top + {Q} quantile per "
                      f"latent) x {db['bytes_per_row']:,.0f} B (DuckDB, compressed; per-latent and context rows "
                      "included; measured on a synthetic database)", "--top-k or --context-len"))
    ctx_rank = -(-n_ctx // world)
    batches = -(-ctx_rank // B)
    tokens = ctx_rank * P
    fwd, facts = _forward_time(dims, [hook], tokens, batches, P, dtype, dev)
    terms.append(fwd)
    if encode == "dictionary":
        rate = dev.matmul_rate(encode_dtype)
        terms.append(Term("time", "encode", tokens * 2 * d_in * n / rate, f"{tokens:,} tokens x 2 x {d_in} x {n:,} / "
                          f"{rate / 1e12:,.4g} TFLOP/s", "--tokens"))
    st = dev.stats
    terms += [Term("time", "statistics update",
                   tokens * l0 * st["s_per_entry"] + ctx_rank * n * st["s_per_latent_context"],
                   f"{tokens * l0:,} firing entries ({l0} per token) x {st['s_per_entry'] * 1e9:,.1f} ns + "
                   f"{ctx_rank:,} contexts x {n:,} latents x {st['s_per_latent_context'] * 1e9:,.2f} ns"),
              Term("time", "logit effects", dev.logit_seconds(n, dims.d_model, dims.d_vocab),
                   f"{n:,} latents x 2 x {dims.d_model} x {dims.d_vocab:,} (fp32, host)"),
              Term("time", "database write", db["fixed_s"] + rows * db["s_per_row"],
                   f"{db['fixed_s']:,.2f} s + {rows:,} rows x {db['s_per_row'] * 1e6:,.1f} us (measured)")]
    facts.update(n_contexts=n_ctx, n_tokens=n_ctx * P, n_latents=n, example_rows=rows, l0=l0)
    return _plan("features", world, 1, dev, terms, facts)
