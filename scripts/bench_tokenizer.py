"""Encoding throughput of the World tokenizers, MB/s of UTF-8 input on one core.

    python scripts/bench_tokenizer.py                 # 4 MB of each text
    python scripts/bench_tokenizer.py --sample-mb 1

Rows: ours compiled ("c"), ours pure Python, the reference trie from the `rwkv`
package, and `pyrwkv_tokenizer` when it is installed; each on (a) English prose
and code (this Python's standard-library sources, docstrings included) and (b)
mixed-language text (fixed paragraphs in a dozen scripts, shuffled and varied by
a seeded RNG). Both texts are built here, deterministically. Every call is a
single-threaded `encode(str)`; the best of several runs is reported, so other
jobs on the machine disturb the figures less. The slow tokenizers are timed on a
prefix of the text (`sample_mb` says how much), and every tokenizer's ids on
that prefix are compared with the reference's (`matches_reference`).

`tokenizer_table(sample_mb)` returns the rows for other reports to reuse.
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.tokenizer import WorldTokenizer, compiled_available, vocab_path

# The slow tokenizers (about 3 MB/s) are timed on at most this much text.
SLOW_SAMPLE_MB = 0.5

# Written for this benchmark; "{n}" becomes a number that varies between copies.
PARAGRAPHS = [
    "The river rose {n} centimetres overnight, and by morning the old bridge was closed to traffic.",
    "天气预报说明天会下雨，所以我们把去公园的计划改到了下周{n}号。图书馆周末开放到晚上九点。",
    "駅の近くに新しいパン屋ができました。朝{n}時から開いていて、いつも行列ができています。",
    "오늘 회의는 오후 {n}시에 시작합니다. 자료는 미리 읽어 오시고, 질문은 끝나고 받겠습니다.",
    "Поезд отправляется в {n} часов с третьего пути. Не забудьте взять билеты и паспорт.",
    "يبدأ العام الدراسي الجديد في الأسبوع {n}، وقد وصلت الكتب إلى المدرسة قبل موعدها.",
    "कल शाम {n} बजे बाज़ार में बहुत भीड़ थी, इसलिए हम जल्दी घर लौट आए।",
    "Die Bibliothek bleibt am Montag geschlossen; die Rückgabe ist bis zum {n}. März möglich.",
    "Le marché ouvre à {n} heures le samedi. On y trouve des fromages, du pain et des fleurs.",
    "El equipo ganó {n} partidos seguidos y la ciudad celebró hasta muy tarde en la plaza mayor.",
    "Hôm nay trời nắng đẹp, chúng tôi đi dạo quanh hồ và uống {n} ly cà phê sữa đá.",
    "วันนี้อากาศดีมาก เราไปเดินเล่นที่สวนสาธารณะประมาณ {n} นาที",
    "Το πλοίο φεύγει στις {n} το πρωί· τα εισιτήρια πωλούνται στο λιμάνι.",
    "Status: ✅ {n} tests passed 🎉 — ⚠️ 2 skipped, see the log 📄 for details.",
    "def total(items):\n    return sum(item.price * item.count for item in items)  # {n} rows\n",
]


def english_and_code(num_bytes: int) -> str:
    """This Python's standard-library sources in sorted order, cut to about `num_bytes` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= num_bytes:
            break
    return _cut("".join(parts), num_bytes)


def mixed_language(num_bytes: int, seed: int = 0) -> str:
    """The paragraphs above, shuffled, numbered and separated differently in every copy."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < num_bytes:
        order = PARAGRAPHS[:]
        rng.shuffle(order)
        for paragraph in order:
            piece = paragraph.replace("{n}", str(rng.randint(1, 10**rng.randint(1, 4))))
            piece += rng.choice(["\n\n", "\n", " ", "  "])
            parts.append(piece)
            size += len(piece.encode("utf-8"))
    return _cut("".join(parts), num_bytes)


def _cut(text: str, num_bytes: int) -> str:
    """`text` cut to at most `num_bytes` UTF-8 bytes, at a character boundary."""
    return text.encode("utf-8")[:num_bytes].decode("utf-8", errors="ignore")


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _encoders() -> list[tuple[str, Callable[[str], list[int]], bool]]:
    """(name, encode, is_slow) for every tokenizer available here."""
    encoders = []
    if compiled_available():
        encoders.append(("ours (C)", WorldTokenizer(backend="c").encode, False))
    encoders.append(("ours (pure Python)", WorldTokenizer(backend="python").encode, True))
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        encoders.append(("reference TRIE_TOKENIZER", TRIE_TOKENIZER(str(vocab_path())).encode, True))
    except ImportError:
        pass
    try:
        import pyrwkv_tokenizer

        encoders.append(("pyrwkv_tokenizer", pyrwkv_tokenizer.RWKVTokenizer().encode, False))
    except ImportError:
        pass
    return encoders


def tokenizer_table(sample_mb: float) -> list[dict]:
    """One row per (text, tokenizer): MB/s of `encode(str)` on one core, best of several runs.

    Keys: text, tokenizer, mb_per_s, sample_mb (the text it was timed on), bytes_per_token,
    matches_reference (ids equal to the reference trie's on the slow prefix; None without it).
    """
    num_bytes = int(sample_mb * 1e6)
    texts = {"english+code": english_and_code(num_bytes), "mixed-language": mixed_language(num_bytes)}
    encoders = _encoders()
    reference = next((enc for name, enc, _ in encoders if name.startswith("reference")), None)
    rows = []
    for text_name, text in texts.items():
        prefix = _cut(text, int(min(sample_mb, SLOW_SAMPLE_MB) * 1e6))
        expected = reference(prefix) if reference is not None else None
        for name, encode, slow in encoders:
            sample = prefix if slow else text
            size = len(sample.encode("utf-8"))
            seconds = _best_seconds(lambda encode=encode, sample=sample: encode(sample), repeats=2 if slow else 5)
            num_tokens = len(encode(sample))
            rows.append({
                "text": text_name,
                "tokenizer": name,
                "mb_per_s": size / seconds / 1e6,
                "sample_mb": size / 1e6,
                "bytes_per_token": size / max(num_tokens, 1),
                "matches_reference": None if expected is None else encode(prefix) == expected,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'text':<16} {'tokenizer':<26} {'MB/s':>8} {'sample MB':>10} {'bytes/token':>12} {'= reference':>12}"]
    for row in rows:
        match = {True: "yes", False: "NO", None: "-"}[row["matches_reference"]]
        lines.append(
            f"{row['text']:<16} {row['tokenizer']:<26} {row['mb_per_s']:>8.1f} {row['sample_mb']:>10.2f} "
            f"{row['bytes_per_token']:>12.2f} {match:>12}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample-mb", type=float, default=4.0, help="MB of each text for the fast tokenizers")
    args = parser.parse_args()
    if not compiled_available():
        print("note: the compiled tokenizer is not built; run `make setup` or `pip install -e .`")
    print(format_table(tokenizer_table(args.sample_mb)))


if __name__ == "__main__":
    main()
