"""Safety uses of interpretability: probes, monitors, claims and their audit.

The top of the pipeline: it reads activations (collected with :mod:`mechscope.hooks`, stored by
:mod:`mechscope.data`) and uses :mod:`mechscope.analysis` and :mod:`mechscope.features`; no stage below
imports it.

- :func:`fit_probe` / :class:`Probe`: linear probes on per-example activations, five methods
  (:data:`METHODS`: logistic regression, difference of means, covariance-adjusted difference of means,
  RepE/LAT, CCS), saved as ``cfg.json`` + ``probe.safetensors``;
- :func:`auroc`, :func:`balanced_accuracy`, :func:`threshold_at_fpr`, :func:`recall_at_fpr`,
  :func:`evaluate_probe` -> :class:`ProbeEvaluation`: metrics with stratified bootstrap intervals and the
  random-direction and shuffled-label baselines;
- :func:`probe_sweep` -> :class:`SweepResult`: every method at every site; :func:`ensemble` across sites;
- :func:`collect_features`: a model's activations of labelled examples at many sites from one pass,
  aggregated over each example's scored tokens; :func:`train_probe` -> :class:`ProbeRun`: the whole
  workflow on a model and a labelled dataset (split by group, control-set threshold, transfer);
- :func:`causal_check` -> :class:`CausalCheck`: steer along a probe's direction (add, or ablate by
  projection) and measure the behavioural effect on twin continuations beside random directions, with the
  KL on control text; a direction without an effect beyond the random ones is reported as correlational;
  :func:`refusal_pairs` turns requests into twins of a refusal and a compliance prefix for it;
- :class:`Monitor`: a probe (or SAE latents, :class:`LatentScorer`) read at every generated token (tokens
  exactly those of plain generation), an alarm rule (EMA or rolling-window max), actions (record, flag, stop,
  a callback), a JSONL alarm log, and calibration to an item-level FPR on control text with drift reports for
  new checkpoints;
- :class:`Claim` (JSON, :func:`read_claims` / :func:`write_claims`): a behaviour, the mechanism proposed, the
  tests run with their intervals and controls, the data and model, what was not tested; made from probe runs,
  causal checks, monitors, steering and circuits (``claim_from_*``); :func:`audit` / :func:`grade` grade them
  on the published rubric (:data:`RUBRIC`, ``docs/safety/audit-rubric.md``);
- the refusal direction (Arditi et al. 2024): :func:`candidate_directions`, :func:`select_direction` ->
  :class:`Selection`, :func:`refusal_effects` -> :class:`RefusalEffects`; the interventions
  :func:`directional_ablation`, :func:`orthogonalize_weights`, :func:`activation_addition`; :func:`is_refusal` /
  :func:`refusal_rate`; :func:`direction_cosine`, :func:`transfer_direction`.
"""

from mechscope.safety.activations import Features, collect_features
from mechscope.safety.audit import (
                                          GRADES,
                                          RUBRIC,
                                          Audit,
                                          Grade,
                                          audit,
                                          audit_html,
                                          grade,
)
from mechscope.safety.causal import CausalCheck, causal_check
from mechscope.safety.claim import Claim, Control, DataRef, Mechanism, ModelRef, Test
from mechscope.safety.claim_io import read_claims, write_claims
from mechscope.safety.claims_from import (
                                          claim_from_causal_check,
                                          claim_from_circuit,
                                          claim_from_monitor,
                                          claim_from_probe_run,
                                          claim_from_steering,
)
from mechscope.safety.latent_scorer import LatentScorer
from mechscope.safety.metrics import (
                                          ProbeEvaluation,
                                          auroc,
                                          auroc_ci,
                                          balanced_accuracy,
                                          evaluate_probe,
                                          recall_at_fpr,
                                          threshold_at_fpr,
)
from mechscope.safety.monitor import Monitor
from mechscope.safety.monitor_rules import (
                                          Alarm,
                                          Calibration,
                                          Drift,
                                          MonitoredGeneration,
                                          rule_values,
)
from mechscope.safety.probes import AGGREGATIONS, METHODS, Probe, fit_probe
from mechscope.safety.refusal import refusal_pairs
from mechscope.safety.refusal_direction import (
                                          Candidates,
                                          RefusalEffects,
                                          RefusalScorer,
                                          Selection,
                                          candidate_directions,
                                          refusal_effects,
                                          select_direction,
                                          select_from_scores,
)
from mechscope.safety.refusal_interventions import (
                                          activation_addition,
                                          direction_cosine,
                                          directional_ablation,
                                          is_refusal,
                                          orthogonalize_weights,
                                          refusal_rate,
                                          transfer_direction,
)
from mechscope.safety.sweep import SweepResult, ensemble, probe_sweep
from mechscope.safety.train import ProbeRun, group_pairs, train_probe

__all__ = [
    "AGGREGATIONS",
    "GRADES",
    "METHODS",
    "RUBRIC",
    "Alarm",
    "Audit",
    "Calibration",
    "Candidates",
    "CausalCheck",
    "Claim",
    "Control",
    "DataRef",
    "Drift",
    "Features",
    "Grade",
    "LatentScorer",
    "Mechanism",
    "ModelRef",
    "Monitor",
    "MonitoredGeneration",
    "Probe",
    "ProbeEvaluation",
    "ProbeRun",
    "RefusalEffects",
    "RefusalScorer",
    "Selection",
    "SweepResult",
    "Test",
    "activation_addition",
    "audit",
    "audit_html",
    "auroc",
    "auroc_ci",
    "balanced_accuracy",
    "candidate_directions",
    "causal_check",
    "claim_from_causal_check",
    "claim_from_circuit",
    "claim_from_monitor",
    "claim_from_probe_run",
    "claim_from_steering",
    "collect_features",
    "direction_cosine",
    "directional_ablation",
    "ensemble",
    "evaluate_probe",
    "fit_probe",
    "grade",
    "group_pairs",
    "is_refusal",
    "orthogonalize_weights",
    "probe_sweep",
    "read_claims",
    "recall_at_fpr",
    "refusal_effects",
    "refusal_pairs",
    "refusal_rate",
    "rule_values",
    "select_direction",
    "select_from_scores",
    "threshold_at_fpr",
    "train_probe",
    "transfer_direction",
    "write_claims",
]
