"""lamda-generate: sample text from an exported model or a training checkpoint.

    lamda-generate --model exported/demo --prompt "And God said"
    lamda-generate --model runs/demo --prompt "And God said" --num-candidates 16     # sample-and-rank

Top-k sampling (k = 40 by default, as in the LaMDA paper) with a KV cache, stopping at the
tokenizer's end-of-text. Only the generated text (the continuation, without the prompt) goes to
stdout, so it is the last line; everything else goes to stderr.

With --num-candidates N > 1 a model fine-tuned with discriminators (its run record's or
config.json's dialog attributes, export.dialog_at) ranks its candidates itself: P(safe) below
--safety-threshold is filtered, the rest ordered by 3 P(sensible) + P(specific) +
P(interesting) (ranking.py; a model with a subset ranks by what it has). The prompt is taken
as the context the candidate answers, as it is: lamda-chat writes the dialog layout around the
user's words. Any other model ranks by mean log-likelihood per token, and says so.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

from typing import NamedTuple

from ..data.text_sources import DataError
from . import ArgumentParser, run_cli

NO_DISCRIMINATORS = ("ranking by mean log-likelihood per token: the model was not fine-tuned with discriminators "
                     "(no dialog attributes in its run record or config.json)")


def add_model_args(p, attention_note: str = "") -> None:
    """The flags open_source and open_model read: --model, --tokenizer, --device, --attention."""
    from ..attention_kernels import ATTENTION_CHOICES  # imports torch, which this module defers

    p.add_argument("--model", type=Path, required=True, metavar="EXPORT_OR_CHECKPOINT_DIR",
                   help="an export dir (lamda-export), or a run dir / RUN/checkpoints / one checkpoint dir")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to use (default: the one beside the model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", metavar="KERNEL",
                   help=f"attention kernel, one of {', '.join(ATTENTION_CHOICES)} (default auto){attention_note}")


def parse_args(argv):
    p = ArgumentParser(prog="lamda-generate", description=__doc__.split("\n\n")[0])
    add_model_args(p, "; the same text for the same seed, only speed differs (lamda_pipe/attention.py)")
    p.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default 40, "
                                                         "as in the paper; 1 = greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--num-candidates", type=int, default=1,
                   help="sample-and-rank: sample N candidates (the paper uses 16) and print the best: by the "
                        "model's own SSI and safety scores if it was fine-tuned with discriminators, else by "
                        "mean log-likelihood per token")
    add_safety_threshold(p)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context for every token instead of using the KV cache (slow)")
    return p.parse_args(argv)


def add_safety_threshold(p) -> None:
    from ..ranking import SAFETY_THRESHOLD
    p.add_argument("--safety-threshold", type=float, default=SAFETY_THRESHOLD, metavar="P",
                   help=f"candidates whose P(safe) is below P are dropped before ranking (default "
                        f"{SAFETY_THRESHOLD}: the discriminator's yes/no boundary); models with a safe discriminator")


def continuation_text(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoded alone they would lose the space that a
    '▁word' token starts with (the decoder strips one leading space), so the prompt is decoded
    with them and its own text cut off."""
    before, full = tok.decode(prompt_ids), tok.decode(prompt_ids + new_ids)
    return full[len(before):] if full.startswith(before) else tok.decode(new_ids)


def candidate_texts(tok, prompt_ids: list[int], d, eot: int) -> list[str]:
    """The text of every decoded row (Decoded d), up to its end-of-text."""
    texts = []
    for i in range(d.tokens.shape[0]):
        row = d.tokens[i, :int(d.lengths[i])].tolist()
        texts.append(continuation_text(tok, prompt_ids, row[:row.index(eot)] if eot in row else row))
    return texts


def _check_args(args) -> None:
    for flag, value, ok, need in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                  ("--top-k", args.top_k, args.top_k >= 1, ">= 1 (1 is greedy)"),
                                  ("--temperature", args.temperature, args.temperature > 0,
                                   "> 0 (for greedy decoding use --top-k 1)"),
                                  ("--num-candidates", args.num_candidates, args.num_candidates >= 1, ">= 1"),
                                  ("--safety-threshold", args.safety_threshold, 0 <= args.safety_threshold <= 1,
                                   "between 0 and 1")):
        if not ok:
            raise DataError(f"{flag} must be {need}, got {value}")


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # cheap probe: is that device present here?
    except (RuntimeError, AssertionError) as e:
        raise DataError(f"--device {name} cannot be used here ({str(e).splitlines()[0][:200]}); "
                        f"use --device cpu") from None
    return device


class Source(NamedTuple):
    """A model path resolved and checked, before any weights are read."""
    source: object  # run_format.ModelPath
    cfg: object  # ModelConfig
    step: int | None
    tok: object  # tokenizers.Tokenizer
    device: object  # torch.device


def open_source(args) -> Source:
    """--model, --tokenizer and --device checked (lamda-generate and lamda-chat): one line and
    exit 2 for a path without a model or a tokenizer that cannot be the model's."""
    from ..data.tokenizer import load_tokenizer, vocab_size
    from ..export import CheckpointError, model_config_at
    from ..run_format import resolve_model

    device = _device(args.device)
    try:
        source = resolve_model(args.model)
        cfg, step = model_config_at(source)
    except CheckpointError as e:
        raise DataError(f"--model {e}") from None
    tok_path = args.tokenizer or source.tokenizer
    if tok_path is None:
        raise DataError(f"--model {args.model}: no tokenizer.json beside {source.path}; pass --tokenizer FILE "
                        f"(the tokenizer the model was trained with)")
    tok = load_tokenizer(tok_path)
    if vocab_size(tok) > cfg.vocab_size:
        which = f"--tokenizer {tok_path}" if args.tokenizer else f"the tokenizer beside the model ({tok_path})"
        raise DataError(f"{which} has {vocab_size(tok)} tokens but the model only {cfg.vocab_size}; "
                        f"use the tokenizer the model was trained with")
    return Source(source, cfg, step, tok, device)


def open_dialog(src: Source):
    """The model's ModelDialog (export.dialog_at) or None; a damaged entry is one line, exit 2."""
    from ..export import CheckpointError, dialog_at

    try:
        return dialog_at(src.source, src.tok)
    except CheckpointError as e:
        raise DataError(f"--model {e}") from None


def open_model(src: Source, attention: str):
    from ..export import CheckpointError, load_model

    try:
        return load_model(src.source, src.cfg, device=src.device, attention=attention)
    except CheckpointError as e:
        raise DataError(f"--model {e}") from None


def describe_candidates(judged, texts: list[str], file) -> None:
    """One line per candidate: * for the chosen one, its score, every attribute's P, its text."""
    for i, text in enumerate(texts):
        probs = " ".join(f"{a} {float(judged.probs[i, k]):.3f}" for k, a in enumerate(judged.attributes))
        flag = "" if judged.passed[i] else " (below the safety threshold)"
        print(f"{'*' if i == judged.best else ' '} candidate {i}: score {float(judged.scores[i]):.4f}{flag}; "
              f"{probs}; mean log-prob {float(judged.mean_logprobs[i]):.4f} over "
              f"{int(judged.candidates.lengths[i])} tokens: {json.dumps(text)}", file=file)
    if judged.note:
        print(f"note: {judged.note}", file=file)


def _run(argv) -> int:
    import torch

    from ..config import param_count
    from ..generation import AutoregressiveWrapper
    from ..ranking import generate_and_rank
    from ..data.tokenizer import special_ids

    args = parse_args(argv)
    _check_args(args)
    src = open_source(args)
    source, cfg, step, tok, device = src
    dialog = open_dialog(src) if args.num_candidates > 1 else None
    ranks = dialog is not None and bool(dialog.attributes)
    ids = special_ids(tok)
    eot = ids["eot"]
    prompt_ids = tok.encode(args.prompt).ids
    if not prompt_ids:
        if eot is None:
            raise DataError("--prompt is empty and the tokenizer has no end-of-text token to start a document "
                            "with; give a prompt")
        prompt_ids = [eot]  # in the training data a document starts after an end-of-text

    seed = secrets.randbits(31) if args.seed is None else args.seed
    model = open_model(src, args.attention)
    wrapper = AutoregressiveWrapper(model, max_seq_len=cfg.max_seq_len, pad_value=ids["pad"] or 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    sampling = dict(top_k=args.top_k, temperature=args.temperature, eos_token=eot, use_cache=not args.no_cache,
                    generator=generator)
    start = time.perf_counter()
    if args.num_candidates == 1:
        new = wrapper.generate(prompt, args.max_new_tokens, **sampling)
        steps = new.numel()
    elif ranks:
        sampling.pop("eos_token")  # the dialog's own end-of-text
        ranked = generate_and_rank(wrapper, prompt, args.max_new_tokens, args.num_candidates, dialog.tokens,
                                   dialog.attributes, safety_threshold=args.safety_threshold, **sampling)
        new, steps = ranked.tokens, ranked.candidates.tokens.shape[1]
    else:
        ranked = wrapper.sample_and_rank(prompt, args.max_new_tokens, args.num_candidates, **sampling)
        new, steps = ranked.tokens, ranked.candidates.tokens.shape[1]
    seconds = time.perf_counter() - start
    new_ids = new.tolist()
    stopped = eot is not None and eot in new_ids
    if stopped:
        new_ids = new_ids[:new_ids.index(eot)]  # the end-of-text itself is not text

    log = sys.stderr
    print(f"model: {source.kind} {source.path} (step {step}), {param_count(cfg) / 1e6:.2f}M parameters, "
          f"{next(model.parameters()).dtype} on {device}; seed {seed}; prompt {len(prompt_ids)} tokens", file=log)
    if ranks:
        describe_candidates(ranked, candidate_texts(tok, prompt_ids, ranked.candidates, eot), log)
    elif args.num_candidates > 1:
        print(NO_DISCRIMINATORS, file=log)
        c = ranked.candidates
        for i in range(args.num_candidates):
            row = c.tokens[i, :int(c.lengths[i])].tolist()
            row = row[:row.index(eot)] if eot in row else row
            mark = "*" if i == ranked.best else " "
            print(f"{mark} candidate {i}: mean log-prob {float(ranked.scores[i]):.4f} over {int(c.lengths[i])} "
                  f"tokens: {json.dumps(continuation_text(tok, prompt_ids, row))}", file=log)
    print(f"{args.num_candidates} x {steps} decoding steps in {seconds:.2f}s "
          f"({args.num_candidates * steps / seconds:,.1f} tokens/s{', KV cache' if not args.no_cache else ''})"
          f"{'; stopped at end-of-text' if stopped else ''}", file=log)
    print(continuation_text(tok, prompt_ids, new_ids), flush=True)
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
