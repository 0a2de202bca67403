"""LaMDAConfig for Hugging Face transformers: the configuration half of a `lamda-export --format hf`
directory, loaded with trust_remote_code.

Self-contained on purpose (transformers and the standard library only): the export dir carries
this file, and whoever loads it has no lamda_pipe installed. The fields and their defaults are
those of lamda_pipe.config.ModelConfig, under the same names, so that config.json is one file
that both LaMDA.from_pretrained and AutoConfig read; the usual transformers names
(hidden_size, num_hidden_layers, ...) are aliases of them.
"""

from transformers import PretrainedConfig


class LaMDAConfig(PretrainedConfig):
    model_type = "lamda"
    _auto_class = "AutoConfig"  # save_pretrained copies this file beside the config
    keys_to_ignore_at_inference = ["past_key_values"]
    # The names generic tools look for (e.g. an evaluator's context length), mapped to ours.
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
        "head_dim": "dim_head",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, vocab_size=20000, dim=512, depth=12, heads=8, dim_head=64, ff_mult=4, max_seq_len=512,
                 num_buckets=32, max_distance=128, dropout=0.0, norm_eps=1e-6, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.ff_mult = ff_mult
        self.max_seq_len = max_seq_len
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.dropout = dropout
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        # The head multiplies by the embedding matrix itself (no separate output layer to tie).
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
