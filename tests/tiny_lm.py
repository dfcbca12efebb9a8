"""Tiny random HF models and an offline word-level tokenizer for checkpoint and serving tests."""

import torch

WORDS = [f"w{i}" for i in range(120)]


def tokenizer():
    """A fast tokenizer over ``<unk> <s> </s> w0..w119`` with a one-line chat template (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()  # joins words with spaces, so text re-tokenizes to the same ids
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def llama(context: int = 96, tie: bool = False, **overrides):
    """A 2-block random ``LlamaForCausalLM`` whose vocabulary is :func:`tokenizer`'s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(WORDS) + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def bert():
    """A 2-layer random ``BertModel`` (an encoder, loaded back with ``AutoModel``)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return BertModel(cfg).eval()


def ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, len(WORDS) + 3, (batch, length))
