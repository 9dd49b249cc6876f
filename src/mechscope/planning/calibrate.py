"""How fast a machine runs the pieces a plan is made of: a named device profile, or a measured calibration.

A :class:`DeviceProfile` gives the rates a plan divides by (LM forward, a dictionary-training step, memory,
disk and interconnect bandwidths, the feature-database passes) and the memory each rank holds before any work.
A named profile (:data:`PROFILES`: ``h100``, ``h200``) takes the vendor's peak times an assumed MFU and states
its other assumptions in ``notes``; :func:`calibrate` measures this machine instead with the actual model
(:mod:`mechscope.planning.probes`: forwards through 1 and 8 blocks, the trainer's own step for every
architecture at three sizes, disk and random-row reads, a synthetic feature database, the process's resident
bytes; about half a minute for the default model on 2 cores) and caches the result as JSON under
``cache_dir()/calibration/``, keyed by machine, model, dtype and threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from mechscope.core.errors import InputError
from mechscope.core.machine import cpu_model

_GIB = 2**30
#: Bumped when the calibration measures something new: older cached calibrations are measured again.
CALIBRATION_VERSION = 2


@dataclass(frozen=True)
class DeviceProfile:
    """The rates of one device (one rank) and its node.

    Attributes:
        name: shown in plans.
        bf16_flop_per_s / fp32_flop_per_s: dense matmul peak, FLOP/s (bf16 tensor cores; plain fp32).
        memory_bytes: memory of one device (bytes); the plan refuses a rank that needs more.
        memory_bytes_per_s: memory bandwidth (bytes/s): bounds Adam's and TopK's selection passes.
        mfu: fraction of the peak a real run reaches (model FLOPs utilisation), assumed.
        disk_write_bytes_per_s / disk_read_bytes_per_s: one node's disk, shared by its ranks.
        gather_bytes_per_s: reads of random rows from harvested shards (bytes/s; None: ``disk_read_bytes_per_s``).
        link_bytes_per_s: one rank's interconnect bandwidth per direction (collectives); link_latency_s: the
            fixed cost of one collective (seconds).
        devices_per_node: ranks that share one node's disk.
        host_is_device: the device is the host's CPU (a calibration of this machine): host-side memory (token
            ids, staging, the feature state) counts against the device; otherwise it is reported apart.
        runtime_bytes: memory each rank holds before any model or data (CUDA context, or the Python process
            with torch and mechscope imported).
        model_extra_bytes: what a loaded model holds beyond its weights (tokenizer, modelling code), bytes.
        train_workspace_bytes: what training steps leave resident beyond the dictionary state, bytes.
        optimizer_import_bytes / optimizer_import_s, curves_page_bytes / curves_page_s: fixed costs of a
            training run (the first optimizer imports ``torch._dynamo``; the curves page imports plotly).
        measured: rates below were measured (:func:`calibrate`), not assumed.
        forward_flop_per_s: measured LM forward FLOP/s by model dtype; forward_fixed_s: per forward batch.
        train_steps: measured ``{arch: {compute dtype: {"fixed_s", "flop_per_s", "s_per_param"}}}`` of the
            trainer's step (see :meth:`step_seconds`).
        step_overhead_s: a named profile's per-step, per-dictionary host overhead (kernel launches, the
            trainer's host syncs), assumed.
        matmul_flop_per_s: measured encoder-shaped matmul FLOP/s by dtype (feature passes).
        logit_s_per_latent: seconds per latent of the logit-effects pass (host CPU, fp32).
        stats: ``{"s_per_entry", "s_per_latent_context"}`` of the feature-statistics update (host CPU).
        db: ``{"s_per_row", "fixed_s", "bytes_per_row", "fixed_bytes", "memory_per_value", "memory_fixed"}`` of
            writing a feature database (:func:`~mechscope.planning.probes.db_probe`; named profiles: this
            machine's, rounded).
        notes: the assumptions, printed with every plan.
    """

    name: str
    bf16_flop_per_s: int | float
    fp32_flop_per_s: int | float
    memory_bytes: int
    memory_bytes_per_s: int | float
    mfu: float = 0.4
    disk_write_bytes_per_s: int | float = 2e9
    disk_read_bytes_per_s: int | float = 5e9
    gather_bytes_per_s: int | float | None = None
    link_bytes_per_s: int | float = 450e9
    link_latency_s: float = 20e-6
    devices_per_node: int = 8
    host_is_device: bool = False
    runtime_bytes: int = _GIB // 2
    model_extra_bytes: int = 0
    train_workspace_bytes: int = 0
    optimizer_import_bytes: int = 0
    optimizer_import_s: float = 0.0
    curves_page_bytes: int = 0
    curves_page_s: float = 0.0
    measured: bool = False
    forward_flop_per_s: dict = field(default_factory=dict)
    forward_fixed_s: float = 0.0
    train_steps: dict = field(default_factory=dict)
    step_overhead_s: float = 1e-3
    matmul_flop_per_s: dict = field(default_factory=dict)
    logit_s_per_latent: float | None = None
    stats: dict = field(default_factory=lambda: {"s_per_entry": 2e-8, "s_per_latent_context": 2e-9})
    db: dict = field(default_factory=lambda: {"s_per_row": 2e-5, "fixed_s": 1.0, "bytes_per_row": 75.0,
                                              "fixed_bytes": 2e6, "memory_per_value": 25.0, "memory_fixed": 1e8})
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise InputError(f"mfu must be in (0, 1] (a fraction of the peak), got {self.mfu}.")

    def peak(self, dtype: str) -> int | float:
        return self.bf16_flop_per_s if dtype in ("bfloat16", "float16") else self.fp32_flop_per_s

    def forward_rate(self, dtype: str) -> int | float:
        """LM forward FLOP/s at model ``dtype``."""
        return self.forward_flop_per_s.get(dtype) or self.peak(dtype) * self.mfu

    def matmul_rate(self, dtype: str) -> int | float:
        """Dense matmul FLOP/s at ``dtype`` (a feature pass's encoder)."""
        return self.matmul_flop_per_s.get(dtype) or self.peak(dtype) * self.mfu

    def train_rate(self, architecture: str, dtype: str) -> int | float:
        """Dictionary-training FLOP/s (by the counts of :mod:`mechscope.planning.costs`) at compute ``dtype``."""
        fit = self.train_steps.get(architecture, {}).get(dtype)
        return fit["flop_per_s"] if fit else self.peak(dtype) * self.mfu

    def step_seconds(self, architecture: str, dtype: str, flop: int | float, params: int) -> tuple[float, float, float]:
        """One rank's training step of one dictionary: ``(fixed, compute, parameter passes)`` seconds.

        Measured: ``fixed_s``, ``flop / flop_per_s`` and ``params * s_per_param`` of the trainer's step (TopK's
        selection and the ``[B, m]`` passes are in the FLOP rate). Named: :attr:`step_overhead_s`, ``flop`` at the
        peak times ``mfu``, and 32 B per parameter over memory bandwidth (Adam reads and writes the parameter,
        gradient and moments; the decoder's normalisation).
        """
        fit = self.train_steps.get(architecture, {}).get(dtype)
        if fit:
            return fit["fixed_s"], flop / fit["flop_per_s"], params * fit["s_per_param"]
        return self.step_overhead_s, flop / (self.peak(dtype) * self.mfu), 32 * params / self.memory_bytes_per_s

    def logit_seconds(self, n_latents: int, d_model: int, d_vocab: int) -> float:
        """The logit-effects pass over ``n_latents`` (host CPU, fp32; named profiles assume 1 TFLOP/s)."""
        if self.logit_s_per_latent is not None:
            return n_latents * self.logit_s_per_latent
        return n_latents * 2 * d_model * d_vocab / 1e12

    def describe(self) -> str:
        if self.measured:
            return f"{self.name} (measured)"
        return (f"{self.name}: bf16 peak {self.bf16_flop_per_s / 1e12:,.0f} TFLOP/s at {self.mfu:.0%} MFU (assumed), "
                f"{self.memory_bytes / 1e9:,.0f} GB at {self.memory_bytes_per_s / 1e12:.2f} TB/s")

    def to_dict(self) -> dict:
        return asdict(self)


_GPU_NOTES = ("disk: 2 GB/s write, 5 GB/s read per node of 8 GPUs (assumed NVMe)",
              "interconnect: NVLink 450 GB/s per GPU per direction, 20 us per collective (assumed)",
              "runtime: 0.5 GiB per rank for the CUDA context; 1 ms of host overhead per training step (assumed)",
              "feature statistics, logit effects and the database run on the host CPU (1 TFLOP/s fp32 assumed)")
#: Named device profiles: vendor peaks (dense, no sparsity), MFU assumed.
PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("H100 SXM", 989e12, 67e12, 80 * 10**9, 3.35e12, notes=_GPU_NOTES),
    "h200": DeviceProfile("H200", 989e12, 67e12, 141 * 10**9, 4.8e12, notes=_GPU_NOTES),
}


def device_profile(name: str, *, mfu: float | None = None) -> DeviceProfile:
    """A named profile (``h100``, ``h200``; case and ``-sxm`` ignored), optionally with another MFU.

    Raises:
        InputError: an unknown name (lists the known ones and ``this``).
    """
    key = name.lower().replace("-sxm", "").replace(" sxm", "")
    if key not in PROFILES:
        raise InputError(f"unknown device {name!r}; use one of {sorted(PROFILES)} (a named profile) or 'this' "
                         "(calibrate this machine with the actual model).")
    p = PROFILES[key]
    return p if mfu is None else replace(p, mfu=mfu)


# -- calibration ------------------------------------------------------------------------------------
def machine_id() -> str:
    """Host name, CPU model and core count: what a calibration is valid for."""
    cpu = cpu_model()
    return f"{platform.node()}|{cpu}|{os.cpu_count()} cores"


def calibration_path(model_name: str, dtype: str, threads: int):
    """Where the calibration of ``model_name`` at ``dtype`` with ``threads`` torch threads is cached."""
    from mechscope.models.loading import cache_dir

    key = json.dumps([CALIBRATION_VERSION, machine_id(), model_name, dtype, threads])
    return cache_dir() / "calibration" / (hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + ".json")


def calibrate(model="smollm2-135m", *, dtype: str = "bfloat16", refresh: bool = False,
              repeats: int = 5) -> DeviceProfile:
    """Measure this machine with the actual model (or read the cached measurement) and return its profile.

    A model given by name is measured in fresh processes (``python -m mechscope.planning.probes``), so the
    resident bytes it reports are a run's; a loaded HookedModel is measured in this process (its process-level
    numbers then include whatever this process already holds). Timings take the median CPU time of ``repeats``
    calls with one torch thread, and with more threads scale the compute by their measured speedup
    (:func:`~mechscope.planning.probes.thread_speedup`), so other processes barely move the result: the plan is
    for this machine when the run has its cores. Calibrate with the threads the runs will use (``--threads``),
    and again after the machine changes (``--recalibrate``).

    Args:
        model: a name for :func:`mechscope.load` or a loaded HookedModel (then ``dtype`` is its dtype).
        dtype: model dtype. refresh: measure again even if a cached result exists. repeats: timed calls per probe.

    Returns:
        a :class:`DeviceProfile` with ``measured=True``.

    Raises:
        ModelLoadError: the model cannot be loaded (plan with a named profile instead: ``--device h100``).
        RuntimeError: the calibration process failed (its stderr's tail is in the message).
    """
    import torch

    threads = torch.get_num_threads()
    loaded = hasattr(model, "hf")
    name = model.cfg.name if loaded else str(model)
    dtype = model.cfg.dtype if loaded else dtype
    path = calibration_path(name, dtype, threads)
    if path.is_file() and not refresh:
        try:
            d = json.loads(path.read_text())
            d["notes"] = tuple(d["notes"])
            return DeviceProfile(**d)
        except (OSError, ValueError, TypeError):
            pass  # unreadable or from another version: measure again
    path.parent.mkdir(parents=True, exist_ok=True)
    if loaded:
        from mechscope.planning.probes import measure

        meas = measure(model, dtype=dtype, folder=path.parent, repeats=repeats)
    else:
        from mechscope.planning.costs import model_dims

        d = model_dims(name).d_model
        proc = _child(["process", str(d), str(threads), str(path.parent)])
        meas = _child(["model", name, dtype, str(threads), str(path.parent)])
        meas["process"].update(proc)
    prof = _profile(meas, path)
    from mechscope.core.io import write_json_atomic

    write_json_atomic(prof.to_dict(), path)
    return prof


def _child(args: list[str]) -> dict:
    """Run ``python -m mechscope.planning.probes ARGS`` in a fresh process and parse its JSON.

    Raises:
        ModelLoadError: the model could not be loaded. RuntimeError: any other failure (stderr's tail quoted).
    """
    r = subprocess.run([sys.executable, "-m", "mechscope.planning.probes", *args], capture_output=True, text=True)
    if r.returncode:
        from mechscope.core.errors import ModelLoadError

        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "ModelLoadError" in last:
            raise ModelLoadError(last.split(": ", 1)[-1])
        raise RuntimeError(f"the calibration process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _profile(meas: dict, path) -> DeviceProfile:
    """A :class:`DeviceProfile` from :func:`mechscope.planning.probes.measure`'s result."""
    proc, fwd, disk, steps = meas["process"], meas["forward"], meas["disk"], meas["train"]
    dt, threads, sp = meas["dtype"], meas["threads"], meas.get("speedup", {"value": 1.0, "measured": True})
    peak = max(meas["matmul"].values())
    t = {a: {k: v["flop_per_s"] / 1e9 for k, v in by.items()} for a, by in steps.items()}
    fixed = {a: by["bfloat16"]["fixed_s"] * 1e3 for a, by in steps.items()}
    return DeviceProfile(
        name=f"this machine ({os.cpu_count()} cores, {threads} threads)", bf16_flop_per_s=meas["matmul"]["bfloat16"],
        fp32_flop_per_s=meas["matmul"]["float32"],
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        memory_bytes_per_s=meas["memory_bytes_per_s"], mfu=1.0, disk_write_bytes_per_s=disk["write_bytes_per_s"],
        disk_read_bytes_per_s=disk["read_bytes_per_s"], gather_bytes_per_s=disk["gather_bytes_per_s"],
        link_bytes_per_s=1.2e9, link_latency_s=1e-4, devices_per_node=10**6, host_is_device=True,
        runtime_bytes=proc["runtime_bytes"], model_extra_bytes=proc["model_extra_bytes"],
        train_workspace_bytes=proc["train_workspace_bytes"], optimizer_import_bytes=proc["optimizer_import_bytes"],
        optimizer_import_s=proc["optimizer_import_s"], curves_page_bytes=proc["curves_page_bytes"],
        curves_page_s=proc["curves_page_s"], measured=True, forward_flop_per_s={dt: fwd["flop_per_s"]},
        forward_fixed_s=fwd["fixed_s"], train_steps=steps, step_overhead_s=0.0, matmul_flop_per_s=meas["matmul"],
        logit_s_per_latent=meas["logit_s_per_latent"], stats=meas["stats"], db=meas["db"],
        notes=(f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {machine_id()} with {meas['name']} ({dt}, {threads} "
               f"threads): forward {fwd['flop_per_s'] / 1e9:,.1f} GFLOP/s + {fwd['fixed_s'] * 1e3:,.1f} ms per batch; "
               f"matmul {peak / 1e9:,.1f} GFLOP/s; training steps (bf16) "
               + ", ".join(f"{a} {t[a]['bfloat16']:,.0f} GFLOP/s + {fixed[a]:,.1f} ms" for a in t)
               + f"; disk {disk['write_bytes_per_s'] / 1e6:,.0f} MB/s write, "
               f"{disk['read_bytes_per_s'] / 1e6:,.0f} MB/s read, {disk['gather_bytes_per_s'] / 1e6:,.0f} MB/s "
               "random rows; memory copy "
               f"{meas['memory_bytes_per_s'] / 1e9:,.1f} GB/s; process {proc['runtime_bytes'] / 1e6:,.0f} MB",
               f"timed with one thread; {threads} threads: compute x {sp['value']:.2f} ("
               + ("measured on a matmul)" if sp["measured"] else "assumed 0.85 per thread: the cores were busy)"),
               "collectives: gloo over loopback, 1.2 GB/s (SCALE.md: 64 MiB all_reduce in 54 ms), 0.1 ms each "
               "(assumed)",
               f"cached in {path} (pass --recalibrate after changing the machine or its load)"))
