"""WorldTokenizer must give exactly the ids of the reference TRIE_TOKENIZER in the `rwkv` package.

Every parity test runs on both backends: the compiled one ("c", skipped when the
extension is not built) and the pure-Python fallback.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from rwkv_train import tokenizer as tokenizer_module
from rwkv_train.errors import DataError
from rwkv_train.tokenizer import WorldTokenizer, compiled_available, vocab_path

rwkv_tokenizer = pytest.importorskip(
    "rwkv.rwkv_tokenizer", reason="the reference tokenizer ships in `pip install rwkv`"
)

needs_compiled = pytest.mark.skipif(
    not compiled_available(), reason="the compiled tokenizer is not built (run `make setup` or `pip install -e .`)"
)
BACKENDS = [pytest.param("c", marks=needs_compiled), "python"]
PACKAGE = Path(tokenizer_module.__file__).resolve().parent

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


@pytest.fixture(scope="module", params=BACKENDS)
def ours(request) -> WorldTokenizer:
    return WorldTokenizer(backend=request.param)


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
    ids = ours.encode_bytes("é".encode()[:1])
    assert ours.decode(ids) == "\ufffd"


def test_vocabulary_is_cached():
    tokenizer_module._load_vocab.cache_clear()
    WorldTokenizer()
    WorldTokenizer()
    info = tokenizer_module._load_vocab.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_missing_rwkv_package_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "rwkv" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install rwkv"):
        WorldTokenizer()


# --- larger parity samples -------------------------------------------------------------------


def mixed_corpus(num_bytes: int, seed: int = 0) -> str:
    """About `num_bytes` of mixed-language text, random text and this package's own source code."""
    rng = random.Random(seed)
    sources = [p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))]
    parts, size = [], 0
    while size < num_bytes:
        kind = rng.random()
        if kind < 0.4:
            piece = rng.choice(MIXED) * rng.randint(1, 3)
        elif kind < 0.7:
            piece = random_text(rng)
        else:
            source = rng.choice(sources)
            start = rng.randrange(max(len(source) - 2000, 1))
            piece = source[start:start + rng.randint(100, 2000)]
        piece += rng.choice(["\n", "\n\n", " ", ""])
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)


def token_soup(rng: random.Random, tokens: list[bytes]) -> bytes:
    """Vocabulary tokens glued together, then cut and corrupted: walks that stop at every depth."""
    data = bytearray(b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 12))))
    for _ in range(rng.randint(0, 3)):
        if not data:
            break
        i = rng.randrange(len(data))
        action = rng.random()
        if action < 0.4:
            data[i] = rng.randrange(256)  # often makes invalid UTF-8
        elif action < 0.7:
            del data[i]
        else:
            del data[i:]
    return bytes(data)


def test_few_hundred_kb_mixed_text_matches_reference(ours, reference):
    text = mixed_corpus(300_000)
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == text


def test_long_random_unicode_matches_reference(ours, reference):
    rng = random.Random(4321)
    text = "".join(random_text(rng) for _ in range(400))
    assert ours.encode(text) == reference.encode(text)


def test_token_soup_matches_reference(ours, reference):
    rng = random.Random(5)
    long_first = sorted(reference.idx2token.values(), key=len, reverse=True)
    tokens = long_first[:5000] + rng.sample(long_first, 5000)
    for _ in range(1500):
        data = token_soup(rng, tokens)
        ids = ours.encode_bytes(data)
        assert ids == reference.encodeBytes(data), data
        assert ours.decode_bytes(ids) == data


def test_every_byte_is_a_token(ours, reference):
    singles = {token[0] for token in reference.idx2token.values() if len(token) == 1}
    assert singles == set(range(256))
    for byte in range(256):
        data = bytes([byte])
        assert ours.encode_bytes(data) == reference.encodeBytes(data) == [reference.token2idx[data]]
    everything = bytes(range(256)) * 3 + bytes(range(255, -1, -1))
    assert ours.encode_bytes(everything) == reference.encodeBytes(everything)


def test_every_token_encodes_like_the_reference(ours, reference):
    # Greedy longest match always takes a whole token when the input is that token, so the
    # reference gives [id] for each; check both facts rather than assume the second.
    for token_id, token in reference.idx2token.items():
        expected = reference.encodeBytes(token)
        assert expected == [token_id]
        assert ours.encode_bytes(token) == expected, (token_id, token)
        assert ours.decode_bytes(expected) == token


def test_invalid_utf8_bytes_match_reference(ours, reference):
    cases = [b"\xff", b"\xc3", b"\xc3(", b"\xe2\x82", b"\xf0\x9f\x8e", b"\xed\xa0\x80", b"\xc0\xaf",
             b"\xf8\x88\x80\x80\x80", b"abc\x80def", "é".encode()[:1] * 10, b"\xfe\xff" * 50]
    for data in cases:
        assert ours.encode_bytes(data) == reference.encodeBytes(data), data


def test_bytes_like_inputs(ours):
    data = "naïve café — 東京\n".encode() * 5
    ids = ours.encode_bytes(data)
    assert ours.encode_bytes(bytearray(data)) == ids
    assert ours.encode_bytes(memoryview(data)) == ids


def test_lone_surrogate_is_refused_like_str_encode(ours):
    with pytest.raises(UnicodeEncodeError):
        ours.encode("ab\ud800cd")


def test_encode_batch_is_a_list_of_encode(ours):
    rng = random.Random(11)
    texts = MIXED + [random_text(rng) for _ in range(50)] + [mixed_corpus(40_000, seed=1)]
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
    assert ours.encode_batch([]) == []


def test_encode_to_array(ours):
    text = mixed_corpus(20_000, seed=2)
    array = ours.encode_to_array(text)
    assert array.dtype == np.uint16 and array.flags.writeable
    assert array.tolist() == ours.encode(text)
    assert ours.encode_to_array(text.encode()).tolist() == ours.encode(text)
    assert ours.encode_to_array("").tolist() == []


def test_decode_accepts_arrays_and_iterators(ours):
    text = mixed_corpus(5_000, seed=3)
    ids = ours.encode(text)
    for dtype in (np.uint16, np.int32, np.int64, np.uint64):
        assert ours.decode(np.array(ids, dtype=dtype)) == text
    assert ours.decode(iter(ids)) == text
    assert ours.decode(i for i in ids) == text
    assert ours.decode(tuple(ids)) == text
    assert ours.decode(np.array([], dtype=np.uint16)) == ""


@pytest.mark.parametrize("bad", [[65530], [2**40], [-5], np.array([1, 65535], dtype=np.uint16),
                                 np.array([-1], dtype=np.int64)])
def test_decode_refuses_ids_outside_the_vocabulary(ours, bad):
    with pytest.raises(DataError, match="not in the World vocabulary"):
        ours.decode(bad)


def test_backend_property(ours):
    assert ours.backend in ("c", "python")
    assert ours.backend in repr(ours)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        WorldTokenizer(backend="rust")


def test_malformed_vocabularies_are_refused(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    cases = {
        "same token": (lines + ["257 'ab' 2", "258 b'ab' 2"], "ids 257 and 258 are the same token"),
        "missing byte": (lines[:-1], "single-byte tokens missing for 1 byte"),
        "id 0": (lines + ["0 'x' 1"], "ids must lie in 1..65535"),
        "bad length": (lines + ["257 'abc' 2"], "stated length 2"),
        "bad literal": (lines + ["257 'ab' + 'c' 3"], "malformed vocabulary line"),
    }
    for name, (vocab_lines, message) in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=message):
            WorldTokenizer(path, backend="python")


def test_small_custom_vocabulary(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 2", "258 \"a'b\" 3", "259 b'\\xffa' 2"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    backends = ["python"] + (["c"] if compiled_available() else [])
    for backend in backends:
        tokenizer = WorldTokenizer(path, backend=backend)
        assert tokenizer.encode("aba'bb") == [257, 258, 99]
        assert tokenizer.encode_bytes(b"\xffab") == [259, 99]
        assert tokenizer.decode([257, 258]) == "aba'b"


def test_vocabulary_parse_matches_reference(reference):
    vocab = tokenizer_module._load_vocab(str(vocab_path().resolve()))
    assert {i: t for i, t in enumerate(vocab.id_to_bytes) if t} == reference.idx2token


# --- the compiled backend --------------------------------------------------------------------


@needs_compiled
def test_auto_backend_is_compiled_when_built():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert WorldTokenizer().backend == "c"


@needs_compiled
def test_backends_agree_on_a_large_random_sample():
    compiled, python = WorldTokenizer(backend="c"), WorldTokenizer(backend="python")
    rng = random.Random(21)
    data = bytes(rng.randrange(256) for _ in range(100_000)) + mixed_corpus(400_000, seed=4).encode()
    assert compiled.encode_bytes(data) == python.encode_bytes(data)


@needs_compiled
def test_threads_encode_long_inputs_at_once():
    # Long inputs are encoded with the GIL released; results must not depend on interleaving.
    tokenizer = WorldTokenizer(backend="c")
    texts = [mixed_corpus(200_000, seed=s) for s in range(4)]
    expected = [tokenizer.encode(t) for t in texts]
    results: list = [None] * len(texts)

    def work(k: int) -> None:
        for _ in range(3):
            results[k] = tokenizer.encode(texts[k]) if k % 2 else tokenizer.encode_batch([texts[k]])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


@needs_compiled
def test_compiled_trie_checks_its_vocabulary():
    from rwkv_train._world_tokenizer import Trie

    singles = [b""] + [bytes([b]) for b in range(256)]
    trie = Trie(singles + [b"ab", b"abc"])
    assert trie.encode_bytes(b"abcab") == [257 + 1, 257]
    assert trie.max_id == 258 and trie.max_token_len == 3
    with pytest.raises(ValueError, match="single-byte token for byte 7"):
        Trie([b""] + [bytes([b]) for b in range(256) if b != 7])
    with pytest.raises(ValueError, match="id 0"):
        Trie([b"x"] + singles[1:])
    with pytest.raises(ValueError, match="uint16"):
        Trie(singles + [b""] * 65536)
    with pytest.raises(TypeError, match="expected bytes"):
        Trie(singles + ["text"])


@needs_compiled
def test_compiled_trie_on_a_deep_vocabulary():
    # Long tokens sharing long prefixes, unlike the World vocabulary: the walk must fall back
    # to the last token it passed, several bytes back.
    from rwkv_train._world_tokenizer import Trie

    tokens = [b""] + [bytes([b]) for b in range(256)] + [b"a" * n for n in (3, 7, 40, 300)] + [b"ab" * 20]
    trie = Trie(tokens)
    python = tokenizer_module._PythonEncoder(_dict_trie(tokens))
    rng = random.Random(8)
    for _ in range(200):
        data = bytes(rng.choice(b"aab") for _ in range(rng.randint(0, 700)))
        assert trie.encode_bytes(data) == python.encode_bytes(data)


def _dict_trie(tokens: list[bytes]) -> dict:
    root: dict = {}
    for token_id, token in enumerate(tokens):
        if token:
            node = root
            for byte in token:
                node = node.setdefault(byte, {})
            node[tokenizer_module._ID] = token_id
    return root


# --- the fallback when the extension is not built -------------------------------------------


@pytest.fixture
def without_compiled(monkeypatch):
    """Make `import rwkv_train._world_tokenizer` fail, as on a machine without a C compiler."""
    monkeypatch.setitem(sys.modules, tokenizer_module.COMPILED_MODULE, None)
    monkeypatch.setattr(tokenizer_module, "_fallback_warned", False)
    tokenizer_module._compiled.cache_clear()
    yield
    tokenizer_module._compiled.cache_clear()


def test_fallback_warns_once_and_still_works(without_compiled, reference):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # a second warning would be recorded, not filtered
        first = WorldTokenizer()
        second = WorldTokenizer()
    assert [w.category for w in record] == [RuntimeWarning]
    message = str(record[0].message)
    assert "compiled World tokenizer is unavailable" in message
    assert "make setup" in message and "pip install -e ." in message
    assert first.backend == second.backend == "python"
    text = "\n".join(MIXED)
    assert first.encode(text) == reference.encode(text)
    assert first.encode_batch(MIXED) == [reference.encode(t) for t in MIXED]
    assert first.encode_to_array(text).tolist() == reference.encode(text)


def test_fallback_refuses_an_explicit_compiled_backend(without_compiled):
    with pytest.raises(ImportError, match="make setup"):
        WorldTokenizer(backend="c")
    assert not compiled_available()


def test_explicit_python_backend_does_not_warn(without_compiled):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WorldTokenizer(backend="python").backend == "python"
