"""Dialog fine-tuning through the real launcher: a pre-trained run fine-tuned on a mixture of its
text and the demo's dialogs, killed with SIGKILL and requeued with the same command, ends where an
uninterrupted fine-tune ends; the result exports with its discriminators and the tools use them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port
from tests.test_e2e import DEEPSPEED, DS_TRAIN, ROOT, launch, read_metrics
from tests.test_resume import final_losses, last_step, layer_weights

pytestmark = pytest.mark.launch

STEPS = 8
FLAGS = ["--steps", str(STEPS), "--save-every", "2", "--eval-every", "4", "--eval-iters", "1", "--log-every", "1",
         "--sample-tokens", "0", "--resume", "auto"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A short pre-training run on the bundled corpus (its tokenizer has the dialog tokens) and a
    prepared dialog dir of the demo corpus, tokenized with it."""
    from lamda_pipe.data.dialog import read_dialogs
    from lamda_pipe.data.dialog_demo import write_dialogs
    from lamda_pipe.data.prepare_dialog import prepare_dialog_data

    root = tmp_path_factory.mktemp("finetune")
    launch(root / "pre", "--steps", "2", "--save-every", "2", "--sample-tokens", "0", direct=True)
    write_dialogs(root / "dialogs.jsonl", 120, seed=0)
    prepare_dialog_data(read_dialogs(root / "dialogs.jsonl"), root / "pre" / "data" / "tokenizer.json",
                        root / "dialogs", val_fraction=0.05, progress=False)
    write_dialogs(root / "heldout.jsonl", 6, seed=1)
    return root


def finetune_flags(root: Path) -> list[str]:
    return ["--init-from", str(root / "pre"), "--data", f"{root / 'pre' / 'data'}:0.5,{root / 'dialogs'}:0.5",
            *FLAGS]


def test_finetune_on_a_mixture_resumes_exactly_after_sigkill(pretrained, tmp_path):
    reference = tmp_path / "reference"
    proc = launch(reference, *finetune_flags(pretrained), direct=True)
    assert "initialised from" in proc.stdout
    assert "dialog examples packed into" in proc.stdout and "attention stays within each packed example" in proc.stdout
    record = json.loads((reference / "checkpoints" / f"global_step{STEPS}" / "lamda_run.json").read_text())
    assert record["dialog"] == {"attributes": ["interesting", "safe", "sensible", "specific"]}
    losses = final_losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), DS_TRAIN, "--run-dir", str(run_dir),
           *finetune_flags(pretrained)]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 180
    while last_step(run_dir) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed_at = last_step(run_dir)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert 3 <= killed_at < STEPS, killed_at
    # the requeued job runs the very same command: it resumes, --init-from is not applied again
    proc = launch(run_dir, *finetune_flags(pretrained), direct=True)
    assert "--init-from" in proc.stdout and "only starts a run whose --run-dir holds no checkpoint" in proc.stdout
    assert "initialised from" not in proc.stdout
    assert final_losses(run_dir) == losses
    final = layer_weights(run_dir / "checkpoints" / f"global_step{STEPS}")
    expected = layer_weights(reference / "checkpoints" / f"global_step{STEPS}")
    assert final.keys() == expected.keys()
    assert len({k.split(":")[0] for k in final}) == 1 + 4 + 1  # every layer file: embedding, 4 blocks, final norm
    for k in final:
        assert (final[k] == expected[k]).all(), k
    val = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert val and all(set(r["val_loss_by_source"]) == {"data", "dialogs"} for r in val)


def test_the_fine_tuned_model_exports_with_its_discriminators_and_the_tools_rank_with_them(pretrained, tmp_path):
    from lamda_pipe.export import export_checkpoint

    run_dir = tmp_path / "ft"
    launch(run_dir, "--init-from", str(pretrained / "pre"), "--data", str(pretrained / "dialogs"), "--steps", "2",
           "--sample-tokens", "0", direct=True)
    export = export_checkpoint(run_dir, tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert config["dialog"]["attributes"] == ["interesting", "safe", "sensible", "specific"]

    def tool(name, *args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    chat = tool("chat", "--model", str(export), "--prompt", "My name is Noah.", "--prompt", "What is my name?",
                "--num-candidates", "3", "--max-new-tokens", "8", "--seed", "0", "--show-candidates")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2  # one response per user turn
    shown = [line for line in chat.stderr.splitlines() if " candidate " in line]
    assert len(shown) == 2 * 3 and all("safe 0." in line or "safe 1." in line for line in shown)
    held_out = tool("eval_dialog", "--model", str(export), "--dialogs", str(pretrained / "heldout.jsonl"),
                    "--modes", "greedy,rank", "--num-candidates", "2", "--max-new-tokens", "8",
                    "--json", str(tmp_path / "eval.json"))
    assert held_out.returncode == 0, held_out.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["attributes"]) == {"interesting", "safe", "sensible", "specific"}
    assert all(r["rated"] > 0 and 0 <= r["accuracy"] <= 1 for r in result["attributes"].values())
    assert {m: r["total"] for m, r in result["exact_match"].items()} == {"greedy": 6, "rank": 6}
