"""What a training run prints for its user: the run at start-up, a sample at the end."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig, param_count
from .data.order import CURRENT
from .run_format import resolve_model

SAMPLE_MAX_PARAMS = 2_000_000_000  # above this, gathering the model on rank 0 for a sample is skipped


def describe_run(plan, sources, evaluator, train_stream) -> None:
    """What the run is about to do, on rank 0: model, layout, batch, data (and how dialogs pack)."""
    run, cfg, batch = plan.run, plan.model, plan.batch
    mix = ", ".join(f"{s.directory} ({s.weight:.3g}: {len(s.tokens('train')):,} train / "
                    f"{len(s.tokens('val')):,} val tokens)" for s in sources)
    print(f"model {run.model}: {param_count(cfg) / 1e6:.2f}M parameters | {run.pipe_stages} stages x "
          f"{batch.data_parallel} data parallel | micro batch {batch.micro_batch_size} x {batch.grad_accum_steps} "
          f"micro-batches x seq {run.seq_len} = {batch.global_batch_size * run.seq_len} tokens/step\n"
          f"data: {mix}", flush=True)
    for s, samples in zip(sources, train_stream.sources):
        if s.kind == "dialog":
            cut = f"; {samples.clipped} longer than a row lose their oldest tokens" if samples.clipped else ""
            print(f"{s.directory}: {samples.examples:,} dialog examples packed into {samples.num_samples:,} rows "
                  f"of {run.seq_len + 1} tokens ({samples.fill:.1%} example tokens, the rest padding){cut}",
                  flush=True)
    kinds = [k for k, on in (("document", run.document_mask), ("packed example", plan.fmt.loss_weights)) if on]
    if kinds:
        print(f"attention stays within each {' and each '.join(kinds)}", flush=True)
    if sources[0].vocab_size < cfg.vocab_size:
        print(f"note: the data's tokenizer has {sources[0].vocab_size} tokens, the model {cfg.vocab_size}: "
              f"the extra embedding rows are never used", flush=True)
    if plan.data_order != CURRENT:
        print(f"data order: version {plan.data_order}, the one this run started with (new runs use version "
              f"{CURRENT}; lamda_pipe/data/order.py)", flush=True)
    if not evaluator.streams:
        print("no validation: no data dir has a val split longer than --seq-len", flush=True)


def print_sample(ckpt_dir: Path, cfg: ModelConfig, source, run) -> None:
    """Rebuilds the plain model from the checkpoint just written and samples from it."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from tokenizers import Tokenizer

    from .generation import AutoregressiveWrapper
    from .weights import load_plain_model

    if param_count(cfg) > SAMPLE_MAX_PARAMS:
        print("sample skipped: the model is too large to gather on one process", flush=True)
        return
    device = torch.device(get_accelerator().current_device_name())
    model = load_plain_model(resolve_model(ckpt_dir).path, cfg).to(device)
    tok = Tokenizer.from_file(str(source.tokenizer_path))
    prompt = torch.tensor(tok.encode(run.sample_prompt).ids, dtype=torch.long, device=device)
    torch.manual_seed(run.seed)
    new = AutoregressiveWrapper(model, max_seq_len=cfg.max_seq_len).generate(
        prompt, run.sample_tokens, top_k=40, eos_token=source.meta["eot_id"])
    print(f"sample: {run.sample_prompt}{tok.decode(new.cpu().tolist())}", flush=True)
