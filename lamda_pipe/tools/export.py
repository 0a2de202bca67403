"""lamda-export: a training checkpoint as one safetensors file + config.json + tokenizer.json.

    lamda-export runs/demo --out exported/demo                 # the run's latest checkpoint, fp32
    lamda-export runs/demo/checkpoints/global_step100 --out exported/demo-100 --dtype bf16
    lamda-export runs/demo --format hf --out exported/demo-hf   # also loads in transformers

Load the result with LaMDA.from_pretrained(DIR) or lamda-generate --model DIR; a --format hf dir
also with transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.text_sources import DataError
from . import ArgumentParser, run_cli


def parse_args(argv):
    from ..export import DTYPES, FORMATS  # the exporter's own tables (imports torch, as exporting does anyway)

    p = ArgumentParser(prog="lamda-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, metavar="RUN_OR_CHECKPOINT_DIR",
                   help="a run dir (its latest checkpoint), RUN/checkpoints, one checkpoint dir, or an export dir")
    p.add_argument("--out", type=Path, required=True, help="directory to write (must not exist, unless --force)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights' dtype (default fp32)")
    p.add_argument("--format", default="lamda", choices=list(FORMATS),
                   help="lamda (default): safetensors + config.json + tokenizer.json; hf: the same dir, also "
                        "loadable by Hugging Face transformers (trust_remote_code=True), with its modeling code")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier export")
    return p.parse_args(argv)


def _run(argv) -> int:
    from ..export import export_checkpoint
    from ..run_format import EXPORT_CONFIG, EXPORT_WEIGHTS

    args = parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, force=args.force, dtype=args.dtype,
                                fmt=args.format)
    except OSError as e:  # e.g. no permission or no space where --out goes; the temp dir is already removed
        raise DataError(f"could not write --out {args.out}: {e}; choose another --out") from None
    config = json.loads((out / EXPORT_CONFIG).read_text())
    files = ", ".join(p.name for p in sorted(out.iterdir()))
    size = (out / EXPORT_WEIGHTS).stat().st_size
    print(f"wrote {out}: {files} ({size / 1e6:,.2f} MB of {args.dtype} weights) from "
          f"{config['source_checkpoint']} (step {config['source_step']})")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
