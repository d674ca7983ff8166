"""`steer app`: open the Streamlit explorer (`steer.apps`, the repository's apps/ folder) with `streamlit run`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from steer.cli import CLIError


def _explorer() -> Path:
    """explorer.py of the installed `steer.apps` (inside the wheel, or apps/ of a source checkout)."""
    spec = importlib.util.find_spec("steer.apps")
    folders = list(spec.submodule_search_locations or []) if spec else []
    return Path(folders[0] if folders else "steer/apps") / "explorer.py"


APP_FILE = _explorer()
MAX_UPLOAD_MB = 50

EXAMPLES = """\
examples:
  steer app                                  the embedded smollm2-moe (built and cached on first use)
  steer app --model smollm2                  a packaged model; or a checkpoint dir / .gguf file
  steer app --port 8600 --headless           serve without opening a browser
  steer app -- --server.address 0.0.0.0      anything after -- goes to `streamlit run`

Pages: Experts (fTRI profile, MoTE switching), Attention sinks (ACT), Probes (LYNX), Fingerprints
(DiFR), Intervention config. Needs the app extra: pip install 'steer[app]'.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "app", help="open the Streamlit explorer (experts, sinks, probes, fingerprints, config)",
        description="Run `streamlit run` on the explorer that ships with steer (steer/apps/explorer.py).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model preselected in the sidebar (default smollm2-moe)")
    p.add_argument("--port", type=int, help="server port (streamlit's default 8501)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.add_argument("streamlit_args", nargs=argparse.REMAINDER, help="extra `streamlit run` options after --")
    p.set_defaults(func=run)


def app_file() -> Path:
    if not APP_FILE.is_file():
        raise CLIError(
            f"the explorer is not at {APP_FILE}: this steer installation is incomplete (steer.apps ships "
            f"apps/explorer.py). Reinstall steer (pip install --force-reinstall 'steer[app]'), or run "
            f"`streamlit run path/to/apps/explorer.py` from a source checkout.")
    return APP_FILE


def run(args) -> int:
    path = app_file()
    if importlib.util.find_spec("streamlit") is None:
        raise CLIError("streamlit is not installed: pip install 'steer[app]' (or -e '.[app]' in a checkout)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(path), "--server.maxUploadSize", str(MAX_UPLOAD_MB)]
    if args.port:
        cmd += ["--server.port", str(args.port)]
    if args.headless:
        cmd += ["--server.headless", "true"]
    extra = [a for a in (args.streamlit_args or []) if a != "--"]
    env = dict(os.environ)
    if args.model:
        env["STEER_APP_MODEL"] = args.model
    return subprocess.call(cmd + extra, env=env)
