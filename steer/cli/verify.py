"""`steer verify`: check DiFR fingerprints against the reference model, or calibrate on benign runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.cli import EXIT_CHECK_FAILED, EXIT_OK, CLIError, print_json
from steer.cli.fingerprint import intervention_context, load_model
from steer.options import ATTN_IMPLEMENTATIONS, DEFAULT_STATISTIC, DTYPES, VERIFY_METHODS
from steer.options import VERIFY_STATISTICS as STATISTICS

# steer.difr.verify's TOKEN_CLIP, spelled out so the CLI starts without importing torch
# (tests/test_difr_cli.py checks they agree); the option sets come from the torch-free steer.options
TOKEN_CLIP = 0.5

EXAMPLES = """\
examples:
  steer verify --calibrate benign1.safetensors benign2.safetensors -o calib.safetensors
      honest runs under benign noise (other batch sizes, attention kernels, threads) -> a threshold
      split-conformal thresholds over disjoint benign n-token windows at the target false-positive
      rate (--target-fpr, default 0.01). A claim is decided per sequence (Bonferroni): each of its B
      sequences at FPR/B, each of a sequence's w windows of n tokens at FPR/(B*w), n the longest window
      with >= B*w/FPR benign windows; rejected if any window exceeds its threshold (the sequence is
      named). A sequence with no such n is "insufficient" (more benign runs, or a higher --target-fpr):
      at n = 1 a claim needs about (its tokens)/FPR benign tokens
  steer verify fp.safetensors --calibration calib.safetensors
  steer verify fp.safetensors --calibration calib.safetensors --report report.html --csv tokens.csv --json
  steer verify fp.safetensors --calibration token_calib.safetensors --method token
      Token-DiFR (needs a claim sampled with --temperature; calibrate with --method token)
  steer verify fp.safetensors --calibration calib.safetensors --config steering/
      verifiable steering: the reference runs the claimed intervention config

Exit codes: 0 verified, 1 rejected (or no --calibration, or too few calibration windows for the claim's
length: no decision is made then),
2 bad input (unreadable/corrupt file, another model, seed, k or intervention than claimed ...).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="verify DiFR fingerprints against the reference model (or --calibrate a threshold)",
        description="Teacher-force each claimed prompt + output through the reference model, recompute the "
                    "fingerprints, score every token and decide at the calibrated false-positive rate.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="fingerprint file to verify (or benign files with --calibrate)")
    p.add_argument("--model", default="smollm2", help="the reference model (default %(default)s)")
    p.add_argument("--calibration", type=Path, help="calibration file from `steer verify --calibrate`")
    p.add_argument("--calibrate", action="store_true", help="build a calibration from benign fingerprint files")
    p.add_argument("-o", "--out", type=Path, help="calibration output file (with --calibrate)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate to hold (default %(default)s)")
    p.add_argument("--method", choices=VERIFY_METHODS, help="default: the calibration's, else activation")
    p.add_argument("--statistic", choices=STATISTICS, default=DEFAULT_STATISTIC,
                   help="Activation-DiFR distance for --calibrate (default %(default)s: the paper's ||f - f'||_2; "
                        "ulp = per-component fp16 steps floored at the step of the fingerprint's RMS, thresholds "
                        "never below 0.5; ulp_unfloored = without the floor). Reports show l2 and ulp side by side")
    p.add_argument("--clip", type=float, default=TOKEN_CLIP,
                   help="Token-DiFR margin clip for --calibrate --method token (default %(default)s, the paper's code)")
    p.add_argument("--config", help="intervention config the claim says was applied (verifiable steering)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher-forcing batch size")
    p.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, help="attention implementation")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--report", type=Path, help="write the per-token figure (.html)")
    p.add_argument("--csv", type=Path, help="write per-token scores (.csv)")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from steer.difr import Fingerprints, intervention_digest

    claims = [Fingerprints.load(f) for f in args.files]  # bad files fail before the model loads
    digest = intervention_digest(args.config) if args.config else None
    if args.calibrate:
        return _calibrate(args, claims, digest)
    if len(claims) != 1:
        raise CLIError(f"verify one fingerprint file at a time ({len(claims)} given); use --calibrate for several")
    return _verify(args, claims[0], digest)


def _calibrate(args, benign, digest: str | None) -> int:
    """--calibrate: conformal thresholds from benign fingerprint files, written to --out."""
    from steer.difr import calibrate

    if args.out is None:
        raise CLIError("--calibrate needs -o/--out for the calibration file")
    lm = load_model(args)
    with intervention_context(args.config, lm.model):
        cal = calibrate(lm.model, benign, target_fpr=args.target_fpr, method=args.method or "activation",
                        batch_size=args.batch_size, model_id=lm.name, statistic=args.statistic,
                        intervention=digest, clip=args.clip)
    cal.save(args.out)
    _print_calibration(args, cal)
    return EXIT_OK


def _print_calibration(args, cal) -> None:
    longest = cal.max_tokens()
    if args.json:
        print_json({"file": str(args.out), "method": cal.method, "statistic": cal.statistic,
                    "target_fpr": cal.target_fpr, "benign_sequences": cal.n_benign,
                    "benign_tokens": int(cal.benign.numel()), "threshold_1_token": cal.threshold(1),
                    "max_tokens_calibrated": longest,
                    f"threshold_{longest}_tokens": cal.threshold(longest) if longest else None,
                    "windows_needed": cal.min_units, "clip": cal.clip})
    elif longest == 0:
        print(f"wrote {args.out}: {cal.benign.numel()} benign tokens are fewer than the {cal.min_units} "
              f"windows a threshold at FPR {cal.target_fpr:g} needs: every decision will be 'insufficient'; "
              f"calibrate on more benign runs or raise --target-fpr")
    else:
        print(f"wrote {args.out}: {cal.method}-DiFR ({cal.statistic}) conformal threshold at FPR {cal.target_fpr:g} "
              f"from {cal.n_benign} benign sequences ({cal.benign.numel()} tokens): {cal.threshold(1):.4g} for 1 "
              f"token, {cal.threshold(longest):.4g} for the mean of {longest}. Claims are decided per sequence "
              f"(Bonferroni over sequences and windows): up to about {int(cal.benign.numel() * cal.target_fpr)} "
              f"claim tokens in all (B sequences of L tokens need B*L/FPR benign tokens at 1-token windows)")


def _verify(args, claim, digest: str | None) -> int:
    """Teacher-force one claim through the reference model and decide at the calibration's threshold."""
    from steer.difr import Calibration, verify

    calibration = Calibration.load(args.calibration) if args.calibration else None
    lm = load_model(args)
    with intervention_context(args.config, lm.model):
        report = verify(lm.model, claim, calibration, method=args.method, model_id=lm.name,
                        batch_size=args.batch_size, statistic=args.statistic, intervention=digest)
    if args.report:
        report.figure().write_html(args.report, include_plotlyjs="cdn")
    if args.csv:
        report.to_dataframe().to_csv(args.csv, index=False)
    _print_report(args, report)
    return EXIT_OK if report.verified else EXIT_CHECK_FAILED


def _print_report(args, report) -> None:
    s = report.summary()
    if args.json:
        print_json(s)
    elif report.decision == "uncalibrated":
        print(f"UNCALIBRATED: mean {report.method} score {s['score']:.4g} over {s['n_tokens']} tokens; no decision "
              f"without --calibration (see `steer verify --calibrate`)")
    else:
        print(report.headline())
    if report.decision == "uncalibrated":
        print("steer verify: no --calibration given, so nothing was verified", file=sys.stderr)
    if report.decision == "insufficient":
        print("steer verify: too few calibration windows for this claim's sequences, so nothing was verified",
              file=sys.stderr)
