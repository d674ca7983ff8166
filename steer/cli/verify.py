"""`steer verify`: check DiFR fingerprints against the reference model, or calibrate on benign runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.cli import EXIT_CHECK_FAILED, EXIT_OK, CLIError, print_json
from steer.cli.fingerprint import intervention_context, load_model

EXAMPLES = """\
examples:
  steer verify --calibrate benign1.safetensors benign2.safetensors -o calib.safetensors
      honest runs under benign noise (other batch sizes, attention kernels, threads) -> a threshold
      holding the target false-positive rate (--target-fpr, default 0.01) for any number of tokens
  steer verify fp.safetensors --calibration calib.safetensors
  steer verify fp.safetensors --calibration calib.safetensors --report report.html --csv tokens.csv --json
  steer verify fp.safetensors --calibration token_calib.safetensors --method token
      Token-DiFR (needs a claim sampled with --temperature; calibrate with --method token)
  steer verify fp.safetensors --calibration calib.safetensors --config steering/
      verifiable steering: the reference runs the claimed intervention config

Exit codes: 0 verified, 1 rejected (or no --calibration: no decision is made without one),
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
    p.add_argument("--method", choices=("activation", "token"), help="default: the calibration's, else activation")
    p.add_argument("--statistic", choices=("ulp", "l2", "ulp_unfloored"), default="ulp",
                   help="Activation-DiFR distance for --calibrate (default %(default)s: per-component fp16 steps, "
                        "floored at the step of the fingerprint's RMS; l2 = the paper's; ulp_unfloored = without the floor)")
    p.add_argument("--config", help="intervention config the claim says was applied (verifiable steering)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher-forcing batch size")
    p.add_argument("--attn", choices=("sdpa", "eager"), help="attention implementation")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--report", type=Path, help="write the per-token figure (.html)")
    p.add_argument("--csv", type=Path, help="write per-token scores (.csv)")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from steer.difr import Calibration, Fingerprints, calibrate, intervention_digest, verify

    claims = [Fingerprints.load(f) for f in args.files]  # bad files fail before the model loads
    digest = intervention_digest(args.config) if args.config else None
    if args.calibrate:
        if args.out is None:
            raise CLIError("--calibrate needs -o/--out for the calibration file")
        lm = load_model(args)
        with intervention_context(args.config, lm.model):
            cal = calibrate(lm.model, claims, target_fpr=args.target_fpr, method=args.method or "activation",
                            batch_size=args.batch_size, model_id=lm.name, statistic=args.statistic,
                            intervention=digest)
        cal.save(args.out)
        summary = {"file": str(args.out), "method": cal.method, "target_fpr": cal.target_fpr,
                   "benign_sequences": cal.n_benign, "benign_tokens": int(cal.benign.numel()),
                   "threshold_1_token": cal.threshold(1), "threshold_32_tokens": cal.threshold(32), "clip": cal.clip}
        if args.json:
            print_json(summary)
        else:
            print(f"wrote {args.out}: {cal.method}-DiFR threshold at FPR {cal.target_fpr:g} from {cal.n_benign} benign "
                  f"sequences ({cal.benign.numel()} tokens): {cal.threshold(1):.4g} for 1 token, "
                  f"{cal.threshold(32):.4g} for the mean of 32")
        return EXIT_OK
    if len(claims) != 1:
        raise CLIError(f"verify one fingerprint file at a time ({len(claims)} given); use --calibrate for several")
    calibration = Calibration.load(args.calibration) if args.calibration else None
    lm = load_model(args)
    with intervention_context(args.config, lm.model):
        report = verify(lm.model, claims[0], calibration, method=args.method, model_id=lm.name,
                        batch_size=args.batch_size, statistic=args.statistic, intervention=digest)
    if args.report:
        report.figure().write_html(args.report, include_plotlyjs="cdn")
    if args.csv:
        report.to_dataframe().to_csv(args.csv, index=False)
    if args.json:
        print_json(report.summary())
    else:
        s = report.summary()
        if report.decision == "uncalibrated":
            print(f"UNCALIBRATED: mean {report.method} score {s['score']:.4g} over {s['n_tokens']} tokens; no decision "
                  f"without --calibration (see `steer verify --calibrate`)")
        else:
            print(f"{report.decision.upper()}: mean {report.method} score {s['score']:.4g} over {s['n_tokens']} tokens, "
                  f"threshold {s['threshold']:.4g} at FPR {s['target_fpr']:g}, p = {s['p_value']:.3g}")
    if report.decision == "uncalibrated":
        print("steer verify: no --calibration given, so nothing was verified", file=sys.stderr)
    return EXIT_OK if report.verified else EXIT_CHECK_FAILED
