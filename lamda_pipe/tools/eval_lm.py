"""lamda-eval: lm-evaluation-harness on a model (an export, a run dir or one checkpoint).

    lamda-eval --model runs/demo                                   # the shipped demo tasks, offline
    lamda-eval --model exports/2b --tasks hellaswag,lambada_openai --limit 500    # harness tasks (the Hub)
    lamda-eval --model runs/demo --include-path my_tasks/ --tasks my_task --json eval.json

`demo` stands for the project's own tasks (lamda_pipe/harness.py): perplexity on the held-out
chapters of the bundled corpus, and which of four sentences follows a held-out sentence. Other
names are the harness' tasks, or tasks of YAML files under --include-path (e.g. a JSON-lines
dataset on local disk). The model runs as lamda_pipe.harness.LamdaLM (our plain model); an
export written with `lamda-export --format hf` runs in the harness' own `hf` model as well.
Needs the `hf` extra: pip install 'lamda-pipe[hf]'.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ..data.text_sources import DataError
from . import ArgumentParser, run_cli
from .generate import add_model_args, open_model, open_source


def parse_args(argv):
    p = ArgumentParser(prog="lamda-eval", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tasks", default="demo", help="comma-separated task names; demo: the project's own (default)")
    p.add_argument("--include-path", type=Path, default=None, metavar="DIR", help="a dir of task YAML files")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task only")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in the prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise DataError("--tasks is empty; name harness tasks, or demo for the project's own")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise DataError(f"--include-path {args.include_path}: no such directory of task YAML files")
    return args


def check_task_names(names: list[str], include_path: Path | None):
    """The harness' task index (with --include-path's tasks): unknown names are refused before
    any model is read."""
    from lm_eval.tasks import TaskManager

    # Indexing the harness' own tasks takes seconds: only when a name may be one of them.
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=any(n != "demo" for n in names))
    unknown = [n for n in names if n != "demo" and n not in manager.all_tasks]
    if unknown:
        raise DataError(f"--tasks {','.join(unknown)}: no such lm-evaluation-harness task; see `lm_eval ls tasks`, "
                        f"or give a dir of task YAML files with --include-path")
    return manager


def _run(argv) -> int:
    args = parse_args(argv)
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise DataError("lamda-eval needs lm-evaluation-harness: pip install 'lamda-pipe[hf]' (or lm-eval)") from None
    from ..data.tokenizer import EOT
    from ..harness import LamdaLM, write_demo_tasks

    manager = check_task_names(args.tasks, args.include_path)
    src = open_source(args)
    model = open_model(src, args.attention)
    lm = LamdaLM(model, src.tok, src.tok.token_to_id(EOT), src.device, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="lamda-eval-") as tmp:
        tasks = [t for name in args.tasks
                 for t in (write_demo_tasks(Path(tmp)) if name == "demo" else [name])]
        out = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                              task_manager=manager, log_samples=False, bootstrap_iters=1000)
    results = {"model": str(src.source.path), "step": src.step, "results": out["results"]}
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    return run_cli(_run, sys.argv[1:] if argv is None else argv, prog="lamda-eval")


if __name__ == "__main__":
    sys.exit(main())
