"""WorldTokenizer must give exactly the ids of the reference TRIE_TOKENIZER in the `rwkv` package."""

from __future__ import annotations

import importlib.util
import random

import pytest

from rwkv_train import tokenizer as tokenizer_module
from rwkv_train.errors import DataError
from rwkv_train.tokenizer import WorldTokenizer, vocab_path

rwkv_tokenizer = pytest.importorskip(
    "rwkv.rwkv_tokenizer", reason="the reference tokenizer ships in `pip install rwkv`"
)

MIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def forward(self, x):\n    return self.head(self.ln_out(x))  # (B, T, V)\n",
    "RWKV 是一种结合了 RNN 和 Transformer 优点的语言模型。",
    "東京は日本の首都です。ひらがなとカタカナ、漢字。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇯🇵 skin 👍🏽",
    "tabs\t\tand    spaces" + " " * 300 + "end",
    "\n\n\nnewlines\r\n\r\nwindows\n" + "\n" * 70,
    "#" * 200 + "-" * 90 + "=" * 33,
    "",
    "a",
    "\x00\x01\x7f control bytes",
    "User: hi\n\nAssistant: Hello! How can I help?\n\n",
]

# Code point ranges for random text: ASCII, Latin, Cyrillic, Arabic, CJK, kana, Hangul, emoji, whitespace.
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x600, 0x6FF), (0x4E00, 0x9FFF),
          (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x9, 0xA)]


@pytest.fixture(scope="module")
def ours() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def reference():
    return rwkv_tokenizer.TRIE_TOKENIZER(str(vocab_path()))


def random_text(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(0, 200)):
        if rng.random() < 0.1:  # any code point except surrogates, which UTF-8 cannot encode
            cp = rng.randint(0, 0x10FFFF)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randint(0, 0x10FFFF)
        else:
            lo, hi = rng.choice(RANGES)
            cp = rng.randint(lo, hi)
        chars.append(chr(cp) * (rng.randint(1, 20) if rng.random() < 0.05 else 1))
    return "".join(chars)


@pytest.mark.parametrize("text", MIXED)
def test_mixed_text_matches_reference(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


def test_whole_mixed_sample_matches_reference(ours, reference):
    text = "\n".join(MIXED) * 3
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == text


def test_random_unicode_matches_reference(ours, reference):
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng)
        ids = ours.encode(text)
        assert ids == reference.encode(text), repr(text)
        assert ours.decode(ids) == text


def test_random_bytes_match_reference(ours, reference):
    rng = random.Random(99)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 100)))
        ids = ours.encode_bytes(data)
        assert ids == reference.encodeBytes(data)
        assert ours.decode_bytes(ids) == data


def test_encode_never_produces_eod(ours):
    rng = random.Random(7)
    text = "".join(MIXED) + "".join(random_text(rng) for _ in range(50))
    ids = ours.encode(text)
    assert ours.eod_id == 0
    assert 0 not in ids
    assert all(1 <= i <= 65529 for i in ids)


def test_properties(ours):
    assert ours.vocab_size == 65536
    assert ours.eod_id == 0
    assert ours.encode("") == []


def test_decode_eod_and_errors(ours):
    ids = ours.encode("ab")
    assert ours.decode(ids + [0] + ids) == "abab"  # end-of-document carries no bytes
    with pytest.raises(DataError, match="not in the World vocabulary"):
        ours.decode([65535])
    with pytest.raises(DataError):
        ours.decode([-1])


def test_decode_cut_character_is_replaced(ours):
    ids = ours.encode_bytes("é".encode("utf-8")[:1])
    assert ours.decode(ids) == "\ufffd"


def test_vocabulary_is_cached():
    tokenizer_module._load_vocab.cache_clear()
    WorldTokenizer()
    WorldTokenizer()
    info = tokenizer_module._load_vocab.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_missing_rwkv_package_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "rwkv" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install rwkv"):
        WorldTokenizer()
