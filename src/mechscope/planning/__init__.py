"""Planning a run before it runs: cost model, device profiles and calibration, and the planner.

- :mod:`.costs`: model dimensions from a config (no weights), FLOP per token, a dictionary's (sharded) state;
- :mod:`.probes`: the measurements of a calibration (each times or weighs one piece of a real run);
- :mod:`.calibrate`: this machine's measured rates (cached) or a named device profile (H100, H200);
- :mod:`.budget`: a plan's terms (resident or per phase, device or host), its totals and the budget check;
- :mod:`.plan`: ``plan_harvest`` / ``plan_train`` / ``plan_features`` -> a :class:`~.budget.Plan`
  (``mechscope plan``).
"""
