"""Shared fixtures: a tiny random Llama for fast tests, the real default model for a few."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernel tests run in Triton's interpreter. It is chosen when
    # triton.language is first imported, and transformers imports triton: set it before that.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def smol():
    """The real default model (fetched into the user cache on first use)."""
    from baklava.model_zoo import load_model

    return load_model("smollm2-135m", progress=False)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to and in is for that with as on be or by it this are from an".split()
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a local Hugging Face directory (model + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


SMOL_FAST = ["--samples", "1", "--seq-len", "256", "--no-search", "--no-plot"]


def export_smol(out, budget: str, *extra: str):
    """Export the default model at ``budget`` with quick profiling (no search, no plot)."""
    from baklava.cli import export_main

    try:
        export_main(["--budget", budget, "--out", str(out), *SMOL_FAST, *extra])
    except SystemExit as e:  # the one-line error is in the captured stderr
        pytest.fail(f"baklava-export failed with exit status {e.code}")
    return out
