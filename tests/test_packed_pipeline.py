"""Packed dialog rows through the real pipeline (gloo ranks, fp32): the step's loss is the mean
over every target token of the global batch with each example seen alone, whatever the stage
count, data parallelism or activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamda_pipe.data.batches import BatchFormat
from lamda_pipe.data.loader import DialogSplit, MicroBatchStream, TextSplit
from tests.dist_utils import run_ranks
from tests.helpers import TINY_PIPE

pytestmark = pytest.mark.distributed

CFG = TINY_PIPE.replace(dropout=0.0)
FMT = BatchFormat(document_mask=True, loss_weights=True)
SEQ, MBS, ROWS_PER_STEP, STEPS = 24, 2, 8, 3
PAD = 0


def examples():
    """Short examples with their targets at the end (as dialog examples), of very different
    target counts, so a mean of micro-batch means would differ from the global mean."""
    rng = np.random.default_rng(11)
    ids, mask, offsets = [], [], [0]
    for _ in range(90):
        n = int(rng.integers(4, 20))
        t = int(rng.integers(1, n))
        ids.append(rng.integers(1, CFG.vocab_size, size=n))
        mask.append(np.r_[np.zeros(n - t, np.uint8), np.ones(t, np.uint8)])
        offsets.append(offsets[-1] + n)
    return np.concatenate(ids), np.concatenate(mask), np.asarray(offsets)


EOT = 1
TEXT_FMT = BatchFormat(document_mask=True)  # plain text with --document-mask


def text_tokens():
    """Documents of 3 to 20 tokens, each ended by EOT, so most rows hold several."""
    rng = np.random.default_rng(5)
    docs = [np.r_[rng.integers(2, CFG.vocab_size, size=int(rng.integers(2, 19))), EOT] for _ in range(120)]
    return np.concatenate(docs)


def stream(dp_rank, dp_size, accum, text=False):
    if text:
        return MicroBatchStream([TextSplit(text_tokens(), EOT)], SEQ, MBS, dp_rank, dp_size, seed=3, fmt=TEXT_FMT)
    return MicroBatchStream([DialogSplit(*examples(), PAD)], SEQ, MBS, dp_rank, dp_size, seed=3, fmt=FMT,
                            accum=accum)


def train(rank, stages, ckpt_dir=None, activation_checkpoints=False, text=False):
    import deepspeed
    import torch.distributed as dist

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    init_distributed()
    dp = dist.get_world_size() // stages
    accum = ROWS_PER_STEP // (MBS * dp)  # the same global batch in every layout
    net = build_pipeline(CFG, stage_bounds(CFG, stages, SEQ), seed=42, fmt=TEXT_FMT if text else FMT,
                         activation_checkpoint_interval=1 if activation_checkpoints else 0)
    config = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": accum,
              "steps_per_print": 10 ** 6, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}}}
    if activation_checkpoints:
        config["pipeline"] = {"use_reentrant": False}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    if ckpt_dir is not None:
        engine.save_checkpoint(ckpt_dir, tag="init")  # the weights the first step's loss is computed with
    it = stream(engine.grid.get_data_parallel_rank(), dp, accum, text).iterate()
    return [engine.train_batch(it).item() for _ in range(STEPS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("init")
    return {"1 stage": run_ranks(train, 1, 1, str(ckpt))[0],
            "2 stages": run_ranks(train, 2, 2)[0],
            "2 data parallel": run_ranks(train, 2, 1)[0],
            "2 stages, activation checkpoints": run_ranks(train, 2, 2, None, True)[0]}, ckpt


def oracle_first_loss(ckpt, step: int = 0) -> tuple[float, float]:
    """(global mean, mean of micro-batch means) of a step's rows (the first by default) under the
    initial weights of the plain model, each example run alone, without packing or document masks."""
    from lamda_pipe.weights import load_plain_model

    model = load_plain_model(ckpt / "init", CFG).eval()
    tokens, mask, offsets = examples()
    s = stream(0, 1, ROWS_PER_STEP // MBS)
    packed = s.sources[0]
    nll_sum, count, per_micro = 0.0, 0, []
    for m in range(step * ROWS_PER_STEP // MBS, (step + 1) * ROWS_PER_STEP // MBS):
        micro_sum, micro_count = 0.0, 0
        for slot in range(m * MBS, (m + 1) * MBS):
            for e in packed.rows[packed.order.index(slot)]:
                ids = torch.from_numpy(tokens[offsets[e]:offsets[e + 1]].astype(np.int64))
                target = torch.from_numpy(mask[offsets[e] + 1:offsets[e + 1]].astype(bool))
                with torch.no_grad():
                    logits = model(ids[None, :-1])[0]
                nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")[target]
                micro_sum, micro_count = micro_sum + float(nll.double().sum()), micro_count + int(target.sum())
        nll_sum, count = nll_sum + micro_sum, count + micro_count
        per_micro.append(micro_sum / micro_count)
    return nll_sum / count, float(np.mean(per_micro))


def test_first_step_loss_is_the_global_mean_over_targets_of_examples_run_alone(runs):
    results, ckpt = runs
    want, mean_of_means = oracle_first_loss(ckpt)
    assert abs(want - mean_of_means) > 1e-3  # the data tells the two apart, far beyond the tolerance below
    for name, losses in results.items():
        assert losses[0] == pytest.approx(want, abs=2e-5), name


def test_every_layout_trains_the_same(runs):
    """Equal losses mean equal updates: the first update moved the second step's loss (on the
    same rows, under the initial weights it would be another number)."""
    results, ckpt = runs
    base = results["1 stage"]
    assert abs(base[1] - oracle_first_loss(ckpt, step=1)[0]) > 1e-3
    for name, losses in results.items():
        np.testing.assert_allclose(losses, base, rtol=0, atol=2e-5, err_msg=name)


def test_document_masks_on_plain_text_give_each_document_its_own_context(tmp_path):
    """--document-mask on text: the first step's loss (the plain mean over every position) equals
    each document run alone, every position predicting the row's next token (the end-of-text
    position predicts the next document's first token from its own document only)."""
    from lamda_pipe.weights import load_plain_model

    losses = run_ranks(train, 2, 2, str(tmp_path), False, True)[0]
    model = load_plain_model(tmp_path / "init", CFG).eval()
    s = stream(0, 1, 1, text=True)
    nll = []
    for slot in range(ROWS_PER_STEP):
        row = s.slot_row(slot)
        inputs, labels, doc = (torch.from_numpy(a) for a in (row.tokens[:-1], row.tokens[1:], row.doc[:-1]))
        for d in doc.unique():
            at = doc == d
            with torch.no_grad():
                logits = model(inputs[at][None])[0]
            nll.append(torch.nn.functional.cross_entropy(logits, labels[at], reduction="none"))
    nll = torch.cat(nll)
    assert len(nll) == ROWS_PER_STEP * SEQ
    with torch.no_grad():  # the same rows with attention across documents: what the flag changes
        rows = torch.from_numpy(np.stack([s.slot_row(k).tokens for k in range(ROWS_PER_STEP)]))
        across = torch.nn.functional.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    assert abs(float(across) - float(nll.mean())) > 1e-3
    assert losses[0] == pytest.approx(float(nll.mean()), abs=2e-5)
