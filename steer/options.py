"""The option sets of steer's methods, each written once.

The methods validate their settings against these tuples, the CLI offers them as `choices` and the
Streamlit app as select boxes, so a new score, mode or target is added here and nowhere else. This
module imports nothing, so the CLI can build its parser without importing torch.
"""

from __future__ import annotations

# steer.ftri: how an expert is scored, which tokens are counted, which engine counts them
PROFILE_SCORES = ("mote", "risk_diff", "npmi")
PROFILE_TOKENS = ("prompt", "response", "both")
PROFILE_ENGINES = ("hf", "vllm")

# steer.mote: what a switch does to its experts; the weight of a forced-on expert
SWITCH_MODES = ("off_mask", "off_zero", "on")
FORCE_WEIGHTS = ("gate", "max")

# steer.difr: the fingerprint projection; how a fingerprint is verified and its per-token distance
PROJECTIONS = ("gaussian", "orthonormal")
VERIFY_METHODS = ("activation", "token")
VERIFY_STATISTICS = ("l2", "ulp", "ulp_unfloored")
DEFAULT_STATISTIC = "l2"

# steer.export: where an intervention config can be exported to
EXPORT_TARGETS = ("steer", "vllm", "easysteer", "sglang")

# steer.probes: problem splits and answer checkers
PROBE_SPLITS = ("train", "calibration", "test")
CHECKERS = ("numeric", "boxed", "choice")

# model loading from the CLI: weight dtypes and attention implementations offered
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
