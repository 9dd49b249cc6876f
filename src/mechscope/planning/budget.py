"""A plan's numbers and the budget they must fit: :class:`Term`, :class:`Plan`, :class:`Budget`, :class:`BudgetError`.

A plan is a list of named terms, each with the formula that gave it. Memory terms are per rank and either
*resident* (held for the whole run: the process, weights, state) or belong to one *phase* of the run (a step's
temporaries, writing a shard, writing the database); the peak is the resident terms plus the largest phase.
On a GPU, terms the host holds (token ids, shard staging, the feature statistics) are summed apart from the
device's; on a CPU the two are one memory. A term may be *reclaimable* (file pages the kernel drops under
pressure, e.g. mapped shards): on a CPU it counts in the resident set a run shows, but never against a budget
(nor in a GPU run's host total).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechscope.core.errors import InputError

_GB = 10**9


class BudgetError(InputError):
    """A plan's memory, disk or time exceeds the budget (or the device's memory); nothing was run."""


@dataclass(frozen=True)
class Term:
    """One term of a plan.

    Attributes:
        kind: "memory" (bytes, per rank), "disk" (bytes, in all, at the peak) or "time" (seconds, wall clock).
        name: short name. value: bytes or seconds. formula: how it was computed, with the numbers.
        lower: the option that lowers it (for the refusal's fix).
        phase: memory only: "" (resident for the whole run) or the phase of the run that holds it.
        host: memory only: held in host memory (on a GPU run), not on the device.
        reclaimable: memory only: file pages the kernel may drop; shown, but not checked against a budget.
    """

    kind: str
    name: str
    value: int | float
    formula: str
    lower: str = ""
    phase: str = ""
    host: bool = False
    reclaimable: bool = False


@dataclass(frozen=True)
class Budget:
    """Limits a plan must fit: ``memory_bytes`` per rank, ``disk_bytes`` in all, ``seconds`` of wall time
    (None: no limit)."""

    memory_bytes: int | float | None = None
    disk_bytes: int | float | None = None
    seconds: int | float | None = None

    @classmethod
    def of(cls, memory_gb: int | float | None = None, disk_gb: int | float | None = None,
           hours: int | float | None = None) -> "Budget":
        """From GB (10^9 bytes) and hours."""
        return cls(None if memory_gb is None else memory_gb * _GB, None if disk_gb is None else disk_gb * _GB,
                   None if hours is None else hours * 3600)


def fmt(kind: str, v: int | float) -> str:
    """A value in its unit: seconds/minutes/hours for time, GB/TB for bytes."""
    if kind == "time":
        return f"{v:,.1f} s" if v < 120 else (f"{v / 60:,.1f} min" if v < 7200 else f"{v / 3600:,.2f} h")
    return f"{v / _GB:,.3f} GB" if v < 10**12 else f"{v / 10**12:,.2f} TB"


@dataclass(frozen=True)
class Plan:
    """What a run will cost.

    Attributes:
        kind: "harvest", "train" or "features". world: ranks. tp: latent shards (train).
        device: the profile's description. terms: every :class:`Term`. facts: derived numbers (tokens,
            FLOP per token, throughput, ...). notes: assumptions.
        device_memory_bytes: one device's memory (a rank needing more is refused by :meth:`check`).
        host_is_device: the device is the host's CPU: host terms count in :attr:`memory_bytes`.
    """

    kind: str
    world: int
    tp: int
    device: str
    terms: tuple[Term, ...]
    facts: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    device_memory_bytes: int | float | None = None
    host_is_device: bool = True

    def _peak(self, host: bool, checked: bool = False) -> tuple[int, str]:
        mine = [t for t in self.terms if t.kind == "memory" and (self.host_is_device or t.host == host)
                and not ((checked or not self.host_is_device) and t.reclaimable)]
        phases: dict[str, float] = {}
        for t in mine:
            if t.phase:
                phases[t.phase] = phases.get(t.phase, 0) + t.value
        top = max(phases, key=phases.get) if phases else ""
        return int(sum(t.value for t in mine if not t.phase) + phases.get(top, 0)), top

    @property
    def memory_bytes(self) -> int:
        """Peak memory of one rank, bytes: resident terms plus the largest phase (the device's terms only on a
        GPU; everything where the device is the host's CPU); reclaimable file pages included."""
        return self._peak(False)[0]

    @property
    def host_memory_bytes(self) -> int:
        """Peak host memory of one rank on a GPU run without reclaimable file pages, bytes (equal to
        :attr:`memory_bytes` on a CPU)."""
        return self._peak(True)[0]

    @property
    def peak_phase(self) -> str:
        """The phase that sets :attr:`memory_bytes` ("" when there are no phases)."""
        return self._peak(False)[1]

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk at the peak, every rank together."""
        return int(sum(t.value for t in self.terms if t.kind == "disk"))

    @property
    def seconds(self) -> int | float:
        """Wall time, seconds."""
        return sum(t.value for t in self.terms if t.kind == "time")

    def term(self, name: str) -> Term:
        """The term called ``name``.

        Raises:
            KeyError: no such term (lists the names).
        """
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no term {name!r}; terms: {[t.name for t in self.terms]}")

    def lines(self, kind: str) -> str:
        """One line per term of ``kind``: name (phase, host, reclaimable), value, formula."""
        def label(t: Term) -> str:
            tags = [t.phase and f"during {t.phase}", t.host and not self.host_is_device and "host",
                    t.reclaimable and "reclaimable"]
            return t.name + (f" [{', '.join(x for x in tags if x)}]" if any(tags) else "")

        return "\n".join(f"    {label(t)}: {fmt(kind, t.value)} = {t.formula}" for t in self.terms if t.kind == kind)

    def check(self, budget: Budget | None = None) -> "Plan":
        """Raise if the plan exceeds ``budget`` or one device's memory; return the plan otherwise. Memory is
        checked without reclaimable file pages.

        Raises:
            BudgetError: listing each exceeded quantity with its terms (numbers and formulas) and the fix.
        """
        budget = budget or Budget()
        problems = []
        mem = self._peak(False, checked=True)[0]
        for kind, total, limit, what in (
                ("memory", mem, budget.memory_bytes, "memory per rank (--memory-gb)"),
                ("memory", mem, self.device_memory_bytes, f"the memory of one device ({self.device})"),
                ("disk", self.disk_bytes, budget.disk_bytes, "disk (--disk-gb)"),
                ("time", self.seconds, budget.seconds, "time (--hours)")):
            if limit is None or total <= limit:
                continue
            terms = [t for t in self.terms if t.kind == kind and not t.reclaimable
                     and (kind != "memory" or self.host_is_device or not t.host)]
            big = max([t for t in terms if t.lower] or terms, key=lambda t: t.value)  # the largest one can lower
            fix = f"lower {big.lower}" if big.lower else "change the run"
            if kind == "time":
                fix += ", or use more ranks (--nproc)"
            elif self.kind == "train":
                fix += ", or shard the latents over more ranks (--nproc with --tp)"
            problems.append(f"{what}: the plan needs {fmt(kind, total)}, the limit is {fmt(kind, limit)}:\n"
                            f"{self.lines(kind)}\n  the largest term an option lowers is {big.name!r}: {fix}.")
        if problems:
            raise BudgetError(f"refusing this {self.kind} (world {self.world}"
                              + (f", tp {self.tp}" if self.tp > 1 else "") + f", {self.device}):\n"
                              + "\n".join(problems))
        return self

    def to_dict(self) -> dict:
        """JSON-ready: totals, every term, facts and notes."""
        return {"kind": self.kind, "world": self.world, "tp": self.tp, "device": self.device,
                "memory_bytes_per_rank": self.memory_bytes, "host_memory_bytes_per_rank": self.host_memory_bytes,
                "peak_phase": self.peak_phase, "disk_bytes": self.disk_bytes, "seconds": self.seconds,
                "device_memory_bytes": self.device_memory_bytes, "host_is_device": self.host_is_device,
                "facts": dict(self.facts), "notes": list(self.notes),
                "terms": [dict(kind=t.kind, name=t.name, value=t.value, formula=t.formula, lower=t.lower, phase=t.phase,
                               host=t.host, reclaimable=t.reclaimable) for t in self.terms]}
