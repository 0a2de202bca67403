"""Parity of a `lamda-export --format hf` dir in transformers with lamda_pipe's LaMDA, in figures.

For each preset: a randomly initialised model (relative-bias tables drawn from N(0, 0.5^2), so
positions matter) is written as a checkpoint with a tokenizer, exported with --format hf, and
loaded twice: LaMDA from the checkpoint's layer files, LaMDAForCausalLM through
AutoModelForCausalLM (trust_remote_code). Printed, in fp32 on CPU:
* max |diff| of the logits of a full forward (B=2, T=max_seq_len), and that over max |logit|;
* the same for decoding one token at a time through the transformers cache (prefill of 8);
* whether greedy generate(do_sample=False) and AutoregressiveWrapper.generate(top_k=1) make the
  same tokens.
--pipeline adds the figure of tests/test_export.py: a 2-stage DeepSpeed checkpoint (gloo ranks)
exported with --format hf, against the pipeline engine's own eval logits.

    .venv/bin/python bench/hf_parity.py --presets debug readme --seq-len 512 --pipeline
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lamda_pipe.config import get_preset  # noqa: E402
from lamda_pipe.data.tokenizer import EOT, load_tokenizer, vocab_size  # noqa: E402
from lamda_pipe.export import export_checkpoint, load_model  # noqa: E402
from lamda_pipe.generation import AutoregressiveWrapper  # noqa: E402
from lamda_pipe.run_format import resolve_model  # noqa: E402
from tests.helpers import tiny_model, train_tiny_tokenizer, write_layer_files, write_run_info  # noqa: E402


def figures(ours, theirs, cfg, eot: int, new_tokens: int, seq_len: int) -> dict:
    x = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
        full = theirs(x).logits
        out = theirs(x[:, :8], use_cache=True)
        steps = [out.logits]
        for i in range(8, x.shape[1]):
            out = theirs(x[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        step = torch.cat(steps, dim=1)
    scale = want.abs().max().item()
    prompt = x[0, :8]
    hf_new = theirs.generate(prompt[None], max_new_tokens=new_tokens, do_sample=False)[0, 8:]
    our_new = AutoregressiveWrapper(ours, cfg.max_seq_len).generate(prompt, new_tokens, top_k=1, eos_token=eot)
    return {"full_abs": (full - want).abs().max().item(), "full_rel": (full - want).abs().max().item() / scale,
            "step_abs": (step - want).abs().max().item(), "step_rel": (step - want).abs().max().item() / scale,
            "max_logit": scale, "greedy_equal": hf_new.tolist() == our_new.tolist(), "greedy_tokens": len(hf_new)}


def preset_row(name: str, root: Path, tok: Path, new_tokens: int, seq_len: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = get_preset(name).replace(vocab_size=vocab_size(load_tokenizer(tok)))
    tag = root / name / "checkpoints" / "global_step1"
    write_layer_files(tiny_model(cfg, seed=0, bias_std=0.5), tag)
    write_run_info(tag, cfg, 1, tok)
    (tag.parent / "latest").write_text(tag.name)
    t0 = time.perf_counter()
    hf = export_checkpoint(root / name, root / f"{name}-hf", fmt="hf")
    export_s = time.perf_counter() - t0
    ours = load_model(resolve_model(root / name), cfg)
    theirs = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    t = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    return {"preset": name, "T": t, "export_s": export_s,
            **figures(ours, theirs, cfg, load_tokenizer(tok).token_to_id(EOT), new_tokens, t)}


def pipeline_row(root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from tests.dist_utils import run_ranks
    from tests.test_export import STEPS, cfg_for, eval_inputs, train_save_eval

    tok = train_tiny_tokenizer(root / "pipe-tok.json")
    cfg = cfg_for(vocab_size(load_tokenizer(tok)))
    run_dir = root / "pipe"
    results = run_ranks(train_save_eval, 2, cfg, str(run_dir / "checkpoints"))
    write_run_info(run_dir / "checkpoints" / f"global_step{STEPS}", cfg, STEPS, tok)
    want = next(r["logits"] for r in results if r["logits"] is not None)
    hf = export_checkpoint(run_dir, root / "pipe-hf", fmt="hf")
    theirs = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    with torch.no_grad():
        got = theirs(eval_inputs(cfg)[0]).logits
    diff = (got - want).abs().max().item()
    return {"preset": "2-stage pipeline (TINY_PIPE)", "full_abs": diff, "full_rel": diff / want.abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["debug"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default and at most: max_seq_len)")
    p.add_argument("--pipeline", action="store_true", help="also the 2-stage DeepSpeed checkpoint (2 gloo ranks)")
    args = p.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok = train_tiny_tokenizer(root / "tok.json", vocab=2048)
        rows = [preset_row(name, root, tok, args.new_tokens, args.seq_len) for name in args.presets]
        if args.pipeline:
            rows.append(pipeline_row(root))
    for r in rows:
        line = f"{r['preset']}: full forward max|diff| {r['full_abs']:.2e} (relative {r['full_rel']:.2e})"
        if "step_abs" in r:
            line += (f"; cached decoding {r['step_abs']:.2e} ({r['step_rel']:.2e}); max|logit| {r['max_logit']:.1f}; "
                     f"T={r['T']}; greedy {r['greedy_tokens']} tokens equal: {r['greedy_equal']}; "
                     f"export {r['export_s']:.1f}s")
        print(line)


if __name__ == "__main__":
    main()
