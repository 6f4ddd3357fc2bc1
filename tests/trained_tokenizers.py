"""Small RoBERTa- and XLM-R-style tokenizers, trained here with the ``tokenizers`` library.

No tokenizer can be downloaded in the tests, so these stand in for the real ones: the same
pipeline (byte-level BPE with ``RobertaProcessing``; Unigram with ``Metaspace`` and XLM-R's
``<s> $A </s>`` template), the same special tokens at the same ids (``<s>`` 0, ``<pad>`` 1, ``</s>``
2, ``<unk>`` 3, ``<mask>`` last), trained on a fixed built-in text so that every run gets the same
vocabulary. Each writes ``tokenizer.json`` and ``tokenizer_config.json`` into a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in RoBERTa and XLM-R; <mask> is last
MASK = "<mask>"
PAD_ID = 1

# Some English prose on the topics of the probe texts, a few other scripts (the Unigram tokenizer
# stands for a multilingual model), digits, punctuation and line breaks.
_TEXT = """\
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is.
Sparse retrieval with learned term weights runs on an inverted index; each document is a bag of
weighted tokens, and a query is scored by the dot product of its weights with the document's.
Elasticsearch stores the token weights in a sparse_vector field. Kafka consumers commit offsets
after the sink has acknowledged the documents. Vitamin D deficiency is associated with an
increased risk of respiratory infections in children and adults, according to several randomized
controlled trials. The mitochondria is the powerhouse of the cell: it produces ATP through
oxidative phosphorylation, which depends on the electron transport chain. Symptoms of type 2
diabetes include thirst and fatigue. In 1969 Apollo 11 landed on the Moon and Neil Armstrong
became the first person to walk on its surface. CRISPR-Cas9 enables targeted genome editing in a
wide range of organisms! Quantum entanglement does not allow faster-than-light communication.
A 42-year-old woman presented with fever, cough and shortness of breath for three days.
The central bank raised interest rates by 25 basis points to curb inflation.
How do I reset my router password? Python list comprehension vs generator expression memory.
The river flows through the quiet valley under a grey sky. Astronauts calibrated the
spectrometer aboard the orbiting telescope. Volcanic basalt and obsidian cooled near the glacier.
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt über den
faulen Hund. El zorro marrón salta sobre el perro perezoso. Быстрая коричневая лиса прыгает.
東京は日本の首都です。今日は良い天気ですね！ 北京是中国的首都。 café, naïve, résumé, Zürich.
Emoji 🙂 and symbols: € £ ¥ © ® ™ ± × ÷ → ← ≤ ≥ and quotes “like this” and ‘this’.
"""


def corpus() -> list[str]:
    """The training lines (the built-in text, a few times over so that merges have counts)."""
    return [line for line in _TEXT.splitlines() if line.strip()] * 20


def _add_mask_and_save(
    tok: Tokenizer, folder: Path, tokenizer_class: str, model_max_length: int
) -> Path:
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, special=True)])
    for i, token in enumerate(SPECIAL):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": MASK,
        "model_max_length": model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def train_roberta_tokenizer(
    folder: Path, vocab_size: int = 1200, model_max_length: int = 512
) -> Path:
    """Byte-level BPE as RoBERTa's: every byte a printable character (space ``Ġ``), GPT-2's
    pre-tokenizer regex, no prefix space, ``<s> A </s>`` with trimmed offsets."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return _add_mask_and_save(tok, folder, "RobertaTokenizer", model_max_length)


def train_xlmr_tokenizer(folder: Path, vocab_size: int = 1200, model_max_length: int = 512) -> Path:
    """SentencePiece Unigram as XLM-R's: NFKC and whitespace folded, ``Metaspace`` (a word
    start is ``▁``), and the ``<s> $A </s>`` template."""
    tok = Tokenizer(models.Unigram())
    # XLM-R's precompiled nmt_nfkc map turns line breaks and tabs into spaces, then runs of
    # spaces become one
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"[\n\r\t]"), " "),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return _add_mask_and_save(tok, folder, "XLMRobertaTokenizer", model_max_length)
