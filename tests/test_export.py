"""Export of a real 2-stage DeepSpeed pipeline checkpoint (gloo, CPU, fp32) to safetensors, and
loading it back with LaMDA.from_pretrained: the oracle is the pipeline engine's own eval output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lamda_pipe.config import ModelConfig
from lamda_pipe.export import CheckpointError, export_checkpoint
from lamda_pipe.run_format import resolve_model as resolve
from lamda_pipe.model import LaMDA
from lamda_pipe.data.tokenizer import load_tokenizer, vocab_size
from tests.dist_utils import run_ranks
from tests.helpers import TINY_PIPE, train_tiny_tokenizer, write_run_info

SEQ, MBS, GAS, STEPS = 16, 2, 2, 2


def cfg_for(vocab: int) -> ModelConfig:
    return TINY_PIPE.replace(vocab_size=vocab)


def batches(vocab: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
        yield x[:, :-1], x[:, 1:]  # (inputs, labels): the pipeline's batch protocol


def train_save_eval(rank, cfg, ckpt_dir):
    """2 training steps on 2 stages, save, then the pipeline's logits and loss on a fresh batch."""
    import deepspeed

    from lamda_pipe.distributed import init_distributed
    from lamda_pipe.pipeline import build_pipeline, stage_bounds

    init_distributed()
    net = build_pipeline(cfg, stage_bounds(cfg, 2), seed=42)
    ds = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": GAS, "steps_per_print": 10 ** 6,
          "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=ds)
    it = batches(cfg.vocab_size, STEPS * GAS, seed=1)
    for _ in range(STEPS):
        engine.train_batch(it)
    engine.save_checkpoint(ckpt_dir, tag=f"global_step{engine.global_steps}")
    loss, logits = engine.eval_batch(batches(cfg.vocab_size, 1, seed=2), return_logits=True, num_micro_batches=1)
    return {"stage": engine.stage_id, "loss": loss.item(),
            "logits": logits.detach().clone() if engine.is_last_stage() else None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir as ds_train.py leaves it: RUN/checkpoints/{latest, global_step2/...}."""
    root = tmp_path_factory.mktemp("export")
    tok = train_tiny_tokenizer(root / "tok.json")
    cfg = cfg_for(vocab_size(load_tokenizer(tok)))
    run_dir = root / "run"
    ckpt = run_dir / "checkpoints"
    results = run_ranks(train_save_eval, 2, cfg, str(ckpt))
    tag = ckpt / f"global_step{STEPS}"
    write_run_info(tag, cfg, STEPS, tok)
    last = next(r for r in results if r["logits"] is not None)
    return {"dir": run_dir, "tag": tag, "cfg": cfg, "results": results, "logits": last["logits"],
            "loss": last["loss"], "root": root}


@pytest.fixture(scope="module")
def exported(run):
    return export_checkpoint(run["dir"], run["root"] / "exported")


def eval_inputs(cfg):
    return next(batches(cfg.vocab_size, 1, seed=2))


@pytest.mark.distributed
def test_exported_logits_equal_the_pipeline_checkpoints(run, exported):
    """Independent oracle: the 2-stage DeepSpeed engine's eval logits on the same tokens."""
    assert sorted(r["stage"] for r in run["results"]) == [0, 1]
    model = LaMDA.from_pretrained(exported)
    assert not model.training
    inputs, labels = eval_inputs(run["cfg"])
    with torch.no_grad():
        logits = model(inputs)
    assert logits.shape == run["logits"].shape == (MBS, SEQ, run["cfg"].vocab_size)
    torch.testing.assert_close(logits, run["logits"], rtol=0, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    for r in run["results"]:  # every stage got the broadcast loss
        assert loss == pytest.approx(r["loss"], abs=1e-5)


@pytest.mark.distributed
def test_hf_export_logits_equal_the_pipeline_checkpoints(run, tmp_path):
    """The same oracle through transformers: lamda-export --format hf of the 2-stage checkpoint,
    loaded by AutoModelForCausalLM with the modeling code the export carries."""
    from transformers import AutoModelForCausalLM

    hf = export_checkpoint(run["dir"], tmp_path / "hf", fmt="hf")
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    inputs, labels = eval_inputs(run["cfg"])
    with torch.no_grad():
        logits = model(inputs).logits
    torch.testing.assert_close(logits, run["logits"], rtol=0, atol=1e-5)
    with torch.no_grad():
        loss = model(torch.cat([inputs, labels[:, -1:]], dim=1), labels=torch.cat([inputs, labels[:, -1:]], dim=1)).loss
    assert loss.item() == pytest.approx(run["results"][0]["loss"], abs=1e-5)


@pytest.mark.distributed
def test_export_dir_contents_and_config(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "lamda-pipe-export/2"
    assert config["source_step"] == STEPS and config["dtype"] == "fp32"
    assert Path(config["source_checkpoint"]) == run["tag"].resolve()
    assert ModelConfig.from_dict({k: v for k, v in config.items() if k in run["cfg"].to_dict()}) == run["cfg"]
    assert (exported / "tokenizer.json").read_bytes() == (run["tag"] / "tokenizer.json").read_bytes()
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith(".")] == []  # no temp dir left


@pytest.mark.distributed
def test_safetensors_without_pickle_and_tied_weight_once(run, exported, monkeypatch):
    from safetensors.torch import load_file

    state = load_file(exported / "model.safetensors")  # safetensors' own reader: no pickle involved
    assert set(state) == set(LaMDA(config=run["cfg"]).state_dict())
    cfg = run["cfg"]
    assert [k for k, v in state.items() if v.shape == (cfg.vocab_size, cfg.dim)] == ["embed.weight"]
    assert all(v.dtype == torch.float32 for v in state.values())

    def no_pickle(*a, **k):
        raise AssertionError("from_pretrained must not call torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = LaMDA.from_pretrained(exported)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.distributed
def test_bf16_export_halves_the_file_and_loads(run, exported, tmp_path):
    bf16 = export_checkpoint(run["tag"], tmp_path / "bf16", dtype="bf16")
    size32, size16 = ((d / "model.safetensors").stat().st_size for d in (exported, bf16))
    assert 0.45 < size16 / size32 < 0.55
    model = LaMDA.from_pretrained(bf16)
    ref = LaMDA.from_pretrained(exported).state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ref[k].to(torch.bfloat16))  # round-to-nearest of the fp32 weights
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bf16"
    up = LaMDA.from_pretrained(bf16, dtype=torch.float32)
    assert next(up.parameters()).dtype == torch.float32


@pytest.mark.distributed
def test_resolver_accepts_run_checkpoints_tag_and_export_dirs(run, exported, tmp_path):
    tag = run["tag"]
    for path in (run["dir"], run["dir"] / "checkpoints", tag):
        assert resolve(path).kind == "checkpoint" and resolve(path).path == tag
    assert resolve(exported).kind == "export" and resolve(exported).path == exported
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no model"):
        resolve(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(tmp_path / "missing")
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="names checkpoint 'global_step9'"):
        resolve(bad.parent)


@pytest.mark.distributed
def test_missing_layer_file_is_named(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run["tag"], broken)
    (broken / "layer_03-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: layer_03-model_states.pt is missing"):
        export_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no temp dir left behind


@pytest.mark.distributed
def test_cli_refuses_existing_out_and_force_replaces_only_an_export(run, exported, tmp_path, capsys):
    from lamda_pipe.tools.export import main

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main([str(run["dir"]), "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "Traceback" not in err
    assert main([str(run["dir"]), "--out", str(user), "--force"]) == 2  # --force never deletes other files
    assert "is not a lamda-pipe export" in capsys.readouterr().err
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "keep me"

    out = tmp_path / "exp"
    assert main([str(run["tag"]), "--out", str(out), "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([str(run["tag"]), "--out", str(out), "--force"]) == 0  # an earlier export is replaced
    assert json.loads((out / "config.json").read_text())["dtype"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "mine"]


@pytest.mark.distributed
def test_cli_missing_layer_file_exit_2(run, tmp_path, capsys):
    from lamda_pipe.tools.export import main

    broken = tmp_path / "broken"
    shutil.copytree(run["tag"], broken)
    (broken / "layer_00-model_states.pt").unlink()
    assert main([str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "layer_00-model_states.pt is missing" in err and "\n" not in err


@pytest.mark.unit
def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing config.json and model.safetensors"):
        LaMDA.from_pretrained(tmp_path)


@pytest.mark.distributed
def test_generate_from_checkpoint_equals_generate_from_export(run, exported, capsys):
    """lamda-generate loads either kind of --model (a run dir goes through load_plain_model)."""
    from lamda_pipe.tools.generate import main

    lines = []
    for model in (run["dir"], exported):
        assert main(["--model", str(model), "--prompt", "In the beginning", "--max-new-tokens", "8",
                     "--top-k", "1", "--device", "cpu"]) == 0
        lines.append(capsys.readouterr().out.splitlines()[-1])
    assert lines[0] == lines[1]
