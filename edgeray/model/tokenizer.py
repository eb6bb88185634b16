"""A byte-level BPE tokenizer trained offline, deterministically, on text that ships with Python.

The corpus is the standard library's ``pydoc_data.topics`` (the reference text behind ``help()``: ~465 KB in
79 topics), so nothing is downloaded. Training takes well under a second and gives the same vocabulary
every time for the same vocab size.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|bos|>' + message['role'] + '\\n' + message['content'] + '<|eos|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|bos|>assistant\\n' }}{% endif %}"
)


def corpus_documents() -> dict[str, str]:
    """Topic name -> text, from ``pydoc_data.topics`` (sorted by name)."""
    from pydoc_data.topics import topics

    return {name: topics[name].strip() for name in sorted(topics)}


def train_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the corpus; returns a transformers fast tokenizer with pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_documents().values(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast
