"""lamda-export --format hf: a dir that Hugging Face transformers loads (trust_remote_code), held
to lamda_pipe's model by parity on the same weights and tokens.

The two sides are independent implementations: lamda_pipe.model.LaMDA (attention.py and its
kernels) and the self-contained lamda_pipe/hf/modeling_lamda.py that the export carries. Logits
are compared in fp32 by maximum absolute difference, atol 1e-5 (docs/benchmarks.md has the
figures). The 2-stage pipeline's own oracle is in tests/test_export.py."""

from __future__ import annotations

import ast
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (the `hf` extra, in `test` too: these tests run wherever the suite does)

from lamda_pipe.data.tokenizer import DIALOG_TOKENS, EOT, PAD, UNK, load_tokenizer, vocab_size
from lamda_pipe.errors import CheckpointError
from lamda_pipe.export import export_checkpoint, load_model, read_export_config
from lamda_pipe.generation import AutoregressiveWrapper
from lamda_pipe.model import LaMDA
from lamda_pipe.run_format import resolve_model
from tests.helpers import TINY_FEW_BUCKETS, tiny_model, train_tiny_tokenizer, write_layer_files, write_run_info
from tests.test_preflight import launch_env  # noqa: F401  (a fixture)


ATOL = 1e-5
HF_DIR = Path(__file__).resolve().parent.parent / "lamda_pipe" / "hf"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run dir with one checkpoint (layer files, run record, tokenizer.json) of a tiny model
    whose bias tables are not zero, and with few buckets, so 40 tokens reach every kind of bucket."""
    root = tmp_path_factory.mktemp("hf")
    tok = train_tiny_tokenizer(root / "tok.json")
    cfg = TINY_FEW_BUCKETS.replace(vocab_size=vocab_size(load_tokenizer(tok)))
    tag = root / "run" / "checkpoints" / "global_step3"
    write_layer_files(tiny_model(cfg, seed=3, bias_std=2.0), tag)
    write_run_info(tag, cfg, 3, tok)
    (tag.parent / "latest").write_text(tag.name)
    return {"run": root / "run", "tag": tag, "cfg": cfg, "tok": tok, "root": root}


@pytest.fixture(scope="module")
def hf_dir(source):
    return export_checkpoint(source["run"], source["root"] / "hf", fmt="hf")


@pytest.fixture(scope="module")
def ours(source):
    """Our model, read from the checkpoint's layer files (not from the export)."""
    src = resolve_model(source["run"])
    return load_model(src, source["cfg"])


@pytest.fixture(scope="module")
def theirs(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)


def tokens(cfg, b=2, t=40, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.unit
def test_hf_dir_holds_what_transformers_and_lamda_pipe_read(source, hf_dir):
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json", "configuration_lamda.py", "generation_config.json", "model.safetensors", "modeling_lamda.py",
        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "lamda" and config["architectures"] == ["LaMDAForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lamda.LaMDAForCausalLM"
    assert config["format"] == "lamda-pipe-export/3" and config["dtype"] == "float32"
    tok = load_tokenizer(source["tok"])
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.token_to_id(EOT), tok.token_to_id(PAD))
    assert read_export_config(hf_dir) == source["cfg"]
    assert (hf_dir / "modeling_lamda.py").read_bytes() == (HF_DIR / "modeling_lamda.py").read_bytes()


@pytest.mark.unit
def test_hf_logits_equal_ours(source, ours, theirs):
    assert not theirs.training and next(theirs.parameters()).dtype == torch.float32
    x = tokens(source["cfg"])
    with torch.no_grad():
        want, got = ours(x), theirs(x).logits
    assert got.shape == want.shape == (2, 40, source["cfg"].vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # The test can fail: the relative-bias tables alone move these logits by far more than ATOL.
    flat = copy.deepcopy(theirs)
    for block in flat.blocks:
        block.attn.rel_bias.weight.data.zero_()
    with torch.no_grad():
        assert (flat(x).logits - want).abs().max() > 100 * ATOL


@pytest.mark.unit
def test_hf_incremental_decoding_equals_the_full_forward(source, ours, theirs):
    """Prefill 5 tokens, then one token at a time through the returned cache."""
    x = tokens(source["cfg"], seed=1)
    with torch.no_grad():
        full = theirs(x, use_cache=False).logits
        out = theirs(x[:, :5], use_cache=True)
        steps = [out.logits]
        for i in range(5, x.shape[1]):
            out = theirs(x[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        want = ours(x)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)
    torch.testing.assert_close(full, want, rtol=0, atol=ATOL)


@pytest.mark.unit
def test_hf_left_padding_leaves_the_real_tokens_logits(source, theirs):
    """Relative positions: padding on the left, masked, changes nothing of the tokens after it."""
    x = tokens(source["cfg"], b=1, t=20, seed=2)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(padded, attention_mask=mask).logits[:, 7:], theirs(x).logits,
                                   rtol=0, atol=ATOL)


@pytest.mark.unit
def test_hf_greedy_generate_equals_lamda_generate_top_k_1(source, hf_dir, ours, theirs, capsys):
    from transformers import AutoTokenizer

    from lamda_pipe.tools.generate import continuation_text, main

    tok = load_tokenizer(source["tok"])
    prompt = "In the beginning God created"
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)  # no prompt asking to trust it
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt).ids
    assert ids.shape[1] + 12 <= source["cfg"].max_seq_len  # beyond it lamda-generate recomputes a window
    out = theirs.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    want = AutoregressiveWrapper(ours, source["cfg"].max_seq_len).generate(ids[0], 12, top_k=1,
                                                                           eos_token=tok.token_to_id(EOT))
    assert out.tolist() == want.tolist()
    assert len(set(out.tolist())) >= 3, out  # a path through several tokens, not one repeated
    assert main(["--model", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "12", "--top-k", "1",
                 "--device", "cpu"]) == 0
    new = out.tolist()
    new = new[:new.index(tok.token_to_id(EOT))] if tok.token_to_id(EOT) in new else new  # as lamda-generate prints
    assert capsys.readouterr().out.splitlines()[-1] == continuation_text(tok, ids[0].tolist(), new)


@pytest.mark.unit
def test_hf_tokenizer_has_the_special_tokens(source, hf_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    tok = load_tokenizer(source["tok"])
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == (EOT, PAD, UNK)
    assert hf_tok.eos_token_id == tok.token_to_id(EOT) and hf_tok.pad_token_id == tok.token_to_id(PAD)
    assert set(DIALOG_TOKENS) <= set(hf_tok.all_special_tokens)
    text = f"Hello there{EOT}<|turn|>How are you?<|response|>Fine."
    assert hf_tok(text).input_ids == tok.encode(text).ids
    assert hf_tok.decode(hf_tok(text).input_ids) == tok.decode(tok.encode(text).ids, skip_special_tokens=False)


@pytest.mark.unit
def test_save_pretrained_round_trips_into_both_loaders(source, hf_dir, theirs, ours, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = tmp_path / "saved"
    theirs.save_pretrained(saved)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(saved)
    again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    x = tokens(source["cfg"], seed=3)
    with torch.no_grad():
        want = theirs(x).logits
        assert torch.equal(again(x).logits, want)
        torch.testing.assert_close(LaMDA.from_pretrained(saved)(x), ours(x), rtol=0, atol=0)  # the same weights
    assert read_export_config(saved) == source["cfg"]
    assert AutoTokenizer.from_pretrained(saved)("And God said").input_ids == \
        load_tokenizer(source["tok"]).encode("And God said").ids


@pytest.mark.unit
def test_a_sharded_save_pretrained_dir_loads_and_inits_a_run(source, theirs, ours, tmp_path):
    """transformers shards a large model (model.safetensors.index.json + model-0000N-of-...): read
    here too, by LaMDA.from_pretrained and --init-from. Tiny shards stand in for 5 GB ones."""
    from lamda_pipe.train import check_init_source
    from lamda_pipe.weights import read_plain_state

    saved = tmp_path / "sharded"
    theirs.save_pretrained(saved, max_shard_size="100KB")
    assert not (saved / "model.safetensors").exists() and len(list(saved.glob("model-*.safetensors"))) > 1
    x = tokens(source["cfg"], seed=4)
    with torch.no_grad():
        torch.testing.assert_close(LaMDA.from_pretrained(saved)(x), ours(x), rtol=0, atol=0)
    src = check_init_source(saved, source["cfg"])
    assert src.kind == "export"
    state = read_plain_state(src, source["cfg"])
    want = ours.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], v) for k, v in want.items())
    next(saved.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors is not a readable safetensors file"):
        LaMDA.from_pretrained(saved)


@pytest.mark.unit
def test_hf_dir_re_exports_and_inits_a_run(source, hf_dir, tmp_path):
    """An hf dir is an export: lamda-export reads it (to either format), --init-from takes it."""
    from lamda_pipe.train import check_init_source
    from lamda_pipe.weights import read_plain_state

    plain = export_checkpoint(hf_dir, tmp_path / "plain")
    assert json.loads((plain / "config.json").read_text())["format"] == "lamda-pipe-export/2"
    again = export_checkpoint(plain, tmp_path / "hf-again", fmt="hf")
    for d in (plain, again):
        a, b = read_plain_state(resolve_model(d), source["cfg"]), read_plain_state(resolve_model(hf_dir), source["cfg"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src = check_init_source(hf_dir, source["cfg"])
    assert (src.kind, src.path) == ("export", hf_dir)
    from lamda_pipe.errors import ConfigError
    with pytest.raises(ConfigError, match="holds a different model"):
        check_init_source(hf_dir, source["cfg"].replace(depth=3))


@pytest.mark.unit
def test_hf_export_refusals_are_one_line_and_write_nothing(source, hf_dir, tmp_path, capsys):
    from lamda_pipe.tools.export import main

    no_tok = tmp_path / "no-tok"
    shutil.copytree(source["tag"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert main([str(no_tok), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format hf needs the model's tokenizer" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([str(source["run"]), "--format", "hf", "--out", str(mine)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "no-tok"]
    earlier = tmp_path / "earlier"
    shutil.copytree(hf_dir, earlier)
    assert main([str(source["run"]), "--out", str(earlier), "--force"]) == 0  # an earlier hf export is replaced
    assert json.loads((earlier / "config.json").read_text())["format"] == "lamda-pipe-export/2"
    assert not (earlier / "modeling_lamda.py").exists()
    with pytest.raises(CheckpointError, match=r"--format onnx: choose one of lamda, hf"):
        export_checkpoint(source["run"], tmp_path / "x", fmt="onnx")


@pytest.mark.unit
def test_the_modeling_files_import_only_torch_transformers_and_each_other():
    """They travel alone in the export dir: no lamda_pipe (nor anything else) on the other side."""
    allowed = {"math", "torch", "transformers"}
    for name in ("configuration_lamda.py", "modeling_lamda.py"):
        tree = ast.parse((HF_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling file that travels with it
                    assert node.module == "configuration_lamda", (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


@pytest.mark.unit
def test_no_other_module_of_lamda_pipe_imports_transformers():
    """The trainer and tools must work without transformers: only the two files above name it."""
    package = HF_DIR.parent
    for path in package.rglob("*.py"):
        if path.parent == HF_DIR and path.name in ("configuration_lamda.py", "modeling_lamda.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "transformers" for n in names), path


IMPORT_ALL = """
import importlib, pkgutil, sys
import lamda_pipe
skip = {"lamda_pipe.hf.configuration_lamda", "lamda_pipe.hf.modeling_lamda"}
for m in pkgutil.walk_packages(lamda_pipe.__path__, "lamda_pipe."):
    if m.name not in skip:
        importlib.import_module(m.name)
import deepspeed.runtime.pipe.engine
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""


@pytest.mark.launch
def test_importing_lamda_pipe_does_not_import_transformers():
    """Every module of the package (and DeepSpeed's pipeline engine), in a fresh interpreter
    where transformers is installed: none of them loads it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.unit
def test_ds_train_init_from_takes_an_hf_dir(source, tmp_path, launch_env):
    """--init-from: the trainer's preflight resolves an hf dir as an export of its model."""
    from lamda_pipe.config import get_preset
    from lamda_pipe.errors import ConfigError
    from tests.test_preflight import plan

    cfg = get_preset("debug")
    tag = tmp_path / "pre" / "checkpoints" / "global_step1"
    write_layer_files(tiny_model(cfg, seed=5), tag)
    write_run_info(tag, cfg, 1, source["tok"])
    (tag.parent / "latest").write_text(tag.name)
    hf = export_checkpoint(tmp_path / "pre", tmp_path / "pre-hf", fmt="hf")
    got = plan(tmp_path / "finetune", "--init-from", str(hf)).init_from
    assert (got.kind, got.path) == ("export", hf)
    with pytest.raises(ConfigError, match=r"--init-from .*pre-hf holds a different model"):
        plan(tmp_path / "other", "--model", "readme", "--init-from", str(hf))
