"""What `lamda-export --format hf` adds to an export dir, so that transformers loads it:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR)

* config.json gains transformers' keys (model_type, architectures, auto_map, the special token
  ids) and "dtype" in torch's spelling ("float32"); its format is lamda-pipe-export/3, so that
  lamda_pipe's own reader, which reads the ModelConfig fields and ignores transformers' keys,
  knows to expect them (and a reader of format 2 says "re-export" rather than choke on them);
* configuration_lamda.py and modeling_lamda.py, copied from this package (self-contained);
* tokenizer_config.json and generation_config.json: PreTrainedTokenizerFast over tokenizer.json
  with its special tokens; greedy or sampled decoding stops at the end-of-text token.
The weights file is the same model.safetensors as format 2, with transformers' "pt" metadata.
Nothing here imports transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..data.tokenizer import DIALOG_TOKENS, EOT, PAD, UNK

HF_FORMAT = "lamda-pipe-export/3"
CODE_FILES = ("configuration_lamda.py", "modeling_lamda.py")
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
AUTO_MAP = {"AutoConfig": "configuration_lamda.LaMDAConfig",
            "AutoModelForCausalLM": "modeling_lamda.LaMDAForCausalLM"}


def hf_config(config: dict, dtype: str, tok) -> dict:
    """config (format 2's config.json) with transformers' keys; tok: the tokenizers.Tokenizer."""
    out = {**config, "format": HF_FORMAT, "dtype": TORCH_DTYPE_NAMES[dtype], "model_type": "lamda",
           "architectures": ["LaMDAForCausalLM"], "auto_map": dict(AUTO_MAP)}
    out.update(special_token_ids(tok))
    return out


def special_token_ids(tok) -> dict:
    """eos (end of text) and pad ids; no bos: documents are separated by the end-of-text token
    alone. A token the tokenizer lacks is left out."""
    ids = {"eos_token_id": tok.token_to_id(EOT), "pad_token_id": tok.token_to_id(PAD)}
    return {k: v for k, v in ids.items() if v is not None}


def write_hf_files(out: Path, tok, max_seq_len: int) -> None:
    """The modeling code, tokenizer_config.json and generation_config.json, into out (which
    already holds config.json, model.safetensors and tokenizer.json)."""
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, out / name)
    have = set(tok.get_vocab(with_added_tokens=True))
    tokens = {"eos_token": EOT, "pad_token": PAD, "unk_token": UNK}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        **{k: v for k, v in tokens.items() if v in have},
                        "additional_special_tokens": [t for t in DIALOG_TOKENS if t in have],
                        "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1) + "\n")
    generation_config = special_token_ids(tok)
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=1) + "\n")
