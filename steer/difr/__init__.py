"""DiFR inference verification: Activation-DiFR fingerprints, Token-DiFR, and a TOPLOC baseline.

Provider: `generate(model, ids, mask, config=DiFRConfig(k=8, seed=0), sampling=SamplingParams())`
returns `Fingerprints` (save with `.save(path)`). Verifier: `calibrate(model, benign_fingerprints)`
gives a `Calibration`; `verify(model, fingerprints, calibration)` gives a `VerificationReport`.
"""

from steer.difr.fingerprint import (
    DiFRConfig,
    FingerprintRecorder,
    Fingerprints,
    encode_prompts,
    fingerprint_prompts,
    generate,
    intervention_digest,
    project,
    projection_matrix,
)
from steer.difr.perturb import quantize_dequantize, quantize_rtn
from steer.difr.sampling import GumbelSampler, SamplingParams, gumbel_noise, token_margins
from steer.difr.verify import (
    Calibration,
    Reference,
    SequenceDecision,
    VerificationReport,
    activation_distances,
    calibrate,
    teacher_force,
    verify,
    window_means,
)

__all__ = [
    "DiFRConfig", "FingerprintRecorder", "Fingerprints", "encode_prompts", "fingerprint_prompts", "generate", "intervention_digest", "project",
    "projection_matrix", "quantize_dequantize", "quantize_rtn", "GumbelSampler", "SamplingParams",
    "gumbel_noise", "token_margins", "Calibration", "Reference", "SequenceDecision", "VerificationReport",
    "activation_distances", "calibrate", "teacher_force", "verify", "window_means",
]
