"""lm-evaluation-harness on a lamda-pipe model: the model as the harness' `LM`, and the tasks the
project ships (offline, from the bundled corpus). Imported by `lamda-eval` only: lm-eval is the
optional `hf` extra, and nothing the trainer imports needs it.

The harness asks three things of a model, each answered by the plain model (lamda_pipe.model):
* loglikelihood(context, continuation): the summed log-probability of the continuation's tokens
  and whether greedy decoding would produce them. The pair is tokenized as the harness' own
  models do it: the whole text once, the continuation being what follows the context's tokens,
  so a word split across the boundary is scored as the tokenizer splits it in running text.
* loglikelihood_rolling(text): a whole document's log-probability, scored in windows of the
  model's context length with the harness' rolling windows (every token predicted once, with
  as much context as fits), starting from <|endoftext|> as training documents do.
* generate_until(context, until): greedy decoding until a stop string or max_gen_toks.

Tasks (`demo_tasks`): the bundled corpus' held-out chapters (the documents the demo's prepare
puts in val.bin), as perplexity, and a multiple-choice set written from them: which of four
sentences follows a sentence of a held-out chapter (the others follow sentences of other
held-out chapters).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .data.loader import bundled_corpus
from .data.prepare import is_val_document
from .data.text_sources import iter_documents

DEMO_VAL_FRACTION = 0.05  # as loader.prepare_bundled prepares the demo corpus
CHOICES = 4


class LamdaLM(LM):
    """A plain LaMDA model and its tokenizer as lm-evaluation-harness' LM (fp32 scores)."""

    def __init__(self, model, tokenizer, eot_id: int, device, batch_size: int = 8):
        super().__init__()
        self.model, self.tok, self.eot = model.eval(), tokenizer, eot_id
        self.max_len = model.config.max_seq_len  # longer inputs keep their last max_len tokens
        self.where, self.batch_size = device, batch_size  # (LM.device is a read-only property)

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())  # a trailing space belongs to the next word
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._ids(context + continuation), self._ids(context)
        if not ctx:
            return [self.eot], whole
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), greedy) per pair, in batches of right-padded rows: a
        causal model's positions before the padding do not see it."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_len + 1):] for i in batch]
            width = max(len(r) for r in rows) - 1
            inputs = torch.full((len(rows), width), self.eot, dtype=torch.long)
            for j, r in enumerate(rows):
                inputs[j, :len(r) - 1] = torch.tensor(r[:-1])
            logp = self.model(inputs.to(self.where)).float().log_softmax(-1).cpu()  # (B, T, V)
            for j, (i, r) in enumerate(zip(batch, rows)):
                n = min(len(pairs[i][1]), len(r) - 1)  # a continuation longer than the window: its last max_len
                target = torch.tensor(r[-n:])
                tail = logp[j, len(r) - 1 - n:len(r) - 1]  # (n, V): the positions that predict the continuation
                out[i] = (float(tail.gather(1, target[:, None]).sum()), bool((tail.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._ids(r.args[0]), prefix_token=self.eot, max_seq_len=self.max_len, context_len=1)]
            results.append(sum(ll for ll, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        from .generation import AutoregressiveWrapper

        wrapper = AutoregressiveWrapper(self.model, self.max_len)
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = (self._ids(context) or [self.eot])[-self.max_len:]
            new = wrapper.generate(torch.tensor(prompt, device=self.where), int(kwargs.get("max_gen_toks", 64)),
                                   top_k=1, eos_token=self.eot)
            text = self.tok.decode([t for t in new.tolist() if t != self.eot])
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out


def heldout_chapters() -> list[str]:
    """The bundled corpus' documents that the demo's prepare puts in its validation split."""
    docs = list(iter_documents(inputs=[str(p) for p in bundled_corpus()]))
    return [d for i, d in enumerate(docs) if is_val_document(i, DEMO_VAL_FRACTION)]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;:?!])\s+", text) if len(s.strip().split()) >= 4]


def write_demo_tasks(out_dir: Path, items: int = 100, seed: int = 0) -> list[dict]:
    """The held-out chapters as JSON lines, the multiple-choice set written from them, and the
    harness' task configs that read both (no network)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chapters = heldout_chapters()
    (out_dir / "heldout.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in chapters))
    per = [sentences(c) for c in chapters]
    rng = random.Random(seed)
    lines = []
    for _ in range(items):
        c = rng.choice([i for i, s in enumerate(per) if len(s) >= 2])
        k = rng.randrange(len(per[c]) - 1)
        others = [i for i, s in enumerate(per) if i != c and len(s) >= 2]
        wrong = [per[o][rng.randrange(1, len(per[o]))] for o in rng.sample(others, CHOICES - 1)]
        answer = rng.randrange(CHOICES)
        choices = wrong[:answer] + [per[c][k + 1]] + wrong[answer:]
        lines.append(json.dumps({"sentence": per[c][k], "choices": [" " + x for x in choices], "answer": answer}))
    (out_dir / "next_sentence.jsonl").write_text("\n".join(lines) + "\n")

    def local(name, path, **kw):
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test", **kw}

    return [
        local("lamda_demo_heldout", out_dir / "heldout.jsonl", output_type="loglikelihood_rolling",
              doc_to_text="", doc_to_target="{{text}}",
              metric_list=[{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                  ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                  ("bits_per_byte", "bits_per_byte"))]),
        local("lamda_demo_next_sentence", out_dir / "next_sentence.jsonl", output_type="multiple_choice",
              doc_to_text="{{sentence}}", doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
              metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]),
    ]
