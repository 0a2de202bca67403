"""lamda-chat: talk to a dialog model, which ranks its own candidate responses.

    lamda-chat --model exports/dialog                                  # interactive: /reset, /quit
    lamda-chat --model runs/dialog --prompt "Hi!" --prompt "What can you do?" --show-candidates

Each turn: the conversation so far is the context (data/dialog.py's layout, the oldest turns
dropped to leave --max-new-tokens of room in the model's window), --num-candidates responses are
sampled with top-k, and the model ranks them (ranking.py: P(safe) below --safety-threshold is
filtered, then 3 P(sensible) + P(specific) + P(interesting); a model without discriminators
ranks by mean log-likelihood and says so). The chosen response goes to stdout, one line per
turn (a line break inside it is printed as a space; the context keeps it); everything else to
stderr. With --prompt the turns are scripted and the tool exits after the
last; otherwise it reads one user turn per line from stdin until EOF or /quit.
"""

from __future__ import annotations

import secrets
import sys

from ..data.text_sources import DataError
from . import ArgumentParser, run_cli
from .generate import NO_DISCRIMINATORS, _check_args, add_model_args, add_safety_threshold, describe_candidates, \
    open_dialog, open_model, open_source

QUIT, RESET = "/quit", "/reset"


def parse_args(argv):
    p = ArgumentParser(prog="lamda-chat", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a user turn; repeat for a scripted conversation (default: read turns from stdin)")
    p.add_argument("--num-candidates", type=int, default=16, help="responses sampled per turn (default 16, "
                                                                   "as in the paper)")
    p.add_argument("--show-candidates", action="store_true",
                   help="print every candidate with its attribute probabilities and score (stderr)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response at most (default 64)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default 40)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    add_safety_threshold(p)
    p.add_argument("--user-name", default="User", help="the user's speaker name in the context (default User)")
    p.add_argument("--bot-name", default="Bot", help="the model's speaker name in the context (default Bot)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    args = p.parse_args(argv)
    for flag, name in (("--user-name", args.user_name), ("--bot-name", args.bot_name)):
        if not name.strip() or "\n" in name:
            raise DataError(f"{flag} must be a non-empty name on one line, got {name!r}")
    return args


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Context tokens that leave room for a response: its tokens, the <|endoftext|> added to a
    cut one, and the attribute token it is scored at, all inside the model's window."""
    return max_seq_len - max_new_tokens - 2


def one_line(text: str) -> str:
    """A response as one line of output, so that a script reads one line per turn."""
    return " ".join(text.splitlines())


class Chat:
    """The conversation and one call per user turn; what the tool and the tests drive."""

    def __init__(self, wrapper, tok, dialog, args, generator, log=None):
        self.wrapper, self.tok, self.dialog, self.args, self.generator = wrapper, tok, dialog, args, generator
        self.log = log or sys.stderr  # looked up now: sys.stderr may have been replaced since import
        self.turns: list[tuple[str, str]] = []
        self.budget = prompt_budget(wrapper.max_seq_len, args.max_new_tokens)

    def respond(self, text: str) -> str:
        import torch

        from ..data.dialog import fit_prompt
        from ..ranking import generate_and_rank
        from .generate import candidate_texts

        a, d = self.args, self.dialog
        self.turns.append((a.user_name, text))
        prompt_ids = fit_prompt(self.turns, self.tok, d.tokens, self.budget)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.generator.device)
        judged = generate_and_rank(self.wrapper, prompt, a.max_new_tokens, a.num_candidates, d.tokens, d.attributes,
                                   a.top_k, a.temperature, a.safety_threshold, generator=self.generator)
        texts = candidate_texts(self.tok, [], judged.candidates, d.tokens.eot)
        if a.show_candidates:
            describe_candidates(judged, texts, self.log)
        elif judged.note:
            print(f"note: {judged.note}", file=self.log)
        self.turns.append((a.bot_name, texts[judged.best]))
        return texts[judged.best]

    def reset(self) -> None:
        self.turns.clear()


def _user_turns(args):
    if args.prompt is not None:
        yield from args.prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(f"{args.user_name}: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():  # an empty line is not a turn
            yield line.rstrip("\r\n")


def _run(argv) -> int:
    import torch

    from ..generation import AutoregressiveWrapper

    args = parse_args(argv)
    _check_args(args)
    src = open_source(args)
    dialog = open_dialog(src)
    if dialog is None:
        raise DataError(f"--model {args.model}: its tokenizer has no dialog tokens (<|turn|>, <|response|>, ...), "
                        f"so it cannot hold a conversation; use a model trained with a tokenizer from "
                        f"lamda-train-tokenizer, fine-tuned on dialogs")
    budget = prompt_budget(src.cfg.max_seq_len, args.max_new_tokens)
    if budget < 2:
        raise DataError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the "
                        f"model's {src.cfg.max_seq_len}-token window; use at most {src.cfg.max_seq_len - 4}")
    model = open_model(src, args.attention)
    seed = secrets.randbits(31) if args.seed is None else args.seed
    generator = torch.Generator(device=src.device).manual_seed(seed)
    wrapper = AutoregressiveWrapper(model, max_seq_len=src.cfg.max_seq_len, pad_value=dialog.tokens.eot)
    print(f"model: {src.source.kind} {src.source.path} (step {src.step}) on {src.device}; seed {seed}; "
          f"discriminators: {', '.join(dialog.attributes) or 'none'}; {args.num_candidates} candidates per turn, "
          f"context up to {budget} tokens", file=sys.stderr)
    if not dialog.attributes and args.num_candidates > 1:
        print(NO_DISCRIMINATORS, file=sys.stderr)
    chat = Chat(wrapper, src.tok, dialog, args, generator)
    for text in _user_turns(args):
        if text.strip() == QUIT:
            break
        if text.strip() == RESET:
            chat.reset()
            print("(context cleared)", file=sys.stderr)
            continue
        print(one_line(chat.respond(text)), flush=True)
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
