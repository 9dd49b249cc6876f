"""Finding planted behaviours again with interpretability tools alone: trigger search and a generic defection
probe for backdoors, localisation and removal of the mechanism against random-component controls, and the
localisation and targeted removal of memorised secrets. Builds on :mod:`mechscope.diff` and
:mod:`mechscope.planted` (which makes the ground truth)."""

from mechscope.forensics.backdoor_removal import (
    BackdoorLocation,
    RemovalResult,
    locate_backdoor,
    mean_difference_directions,
    remove_backdoor,
)
from mechscope.forensics.defection import (
    DEFAULT_PAIRS,
    DefectionProbeResult,
    defection_direction,
    defection_probe,
    defection_probe_heldout,
)
from mechscope.forensics.memorisation import (
    GradientNormMap,
    TwinPatchResult,
    control_canaries,
    gradient_norm_map,
    pick_twin,
    twin_patching,
)
from mechscope.forensics.memorisation_edit import (
    EditReport,
    ablate_components,
    unlearn_secret,
)
from mechscope.forensics.scan import ScanResult, claims_from_scan, scan_models
from mechscope.forensics.trigger_search import (
    TriggerSearchResult,
    evaluate_candidates,
    search_triggers,
)

__all__ = ["DEFAULT_PAIRS", "BackdoorLocation", "DefectionProbeResult", "EditReport", "GradientNormMap", "RemovalResult",
           "ScanResult", "TriggerSearchResult", "TwinPatchResult", "ablate_components", "claims_from_scan", "control_canaries", "defection_direction",
           "defection_probe", "defection_probe_heldout", "evaluate_candidates", "gradient_norm_map", "locate_backdoor", "mean_difference_directions",
           "pick_twin", "remove_backdoor", "scan_models", "search_triggers", "twin_patching", "unlearn_secret"]
