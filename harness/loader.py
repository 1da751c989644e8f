"""Model loading: zoo names, local `save_pretrained` folders and hub ids, through the real
transformers loaders (`AutoConfig` / `AutoModelForCausalLM.from_pretrained`).

Checks before weights are trusted: the path exists, the architecture is one we support, and
the checkpoint's weights match its config (missing, unexpected or mis-shaped tensors are an
error here, where transformers would only warn and leave random weights). `trust_remote_code`
is off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.family_names import FAMILY_OF_MODEL_TYPE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "qwen35-hybrid-retrieval-tiny"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: str
    name: str  # as the user gave it
    path: str  # resolved local folder or hub id
    digest: str  # identifies the weights (see weights_digest)
    device: str
    dtype: str


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise HarnessError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a slash is meant as a path
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve_source(name: str) -> tuple[str, bool]:
    """(local folder, came_from_hub). Zoo names map to the shipped weights."""
    from harness import zoo

    if name in zoo.list_models():
        path = zoo.default_path(name)
        if not (path / "config.json").exists():
            raise HarnessError(
                f"zoo model {name!r} has no weights at {path}; build them with `harness zoo build {name}`"
            )
        return str(path), False
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise HarnessError(
                f"{path} has no config.json; pass a save_pretrained folder or a zoo name ({', '.join(zoo.list_models())})"
            )
        return str(path), False
    if _looks_like_path(name):
        raise HarnessError(
            f"model path {name!r} does not exist; pass a save_pretrained folder, a hub id or a zoo name ({', '.join(zoo.list_models())})"
        )
    return _hub_snapshot(name), False


def _hub_snapshot(repo_id: str) -> str:
    """The local snapshot folder of a hub id: from the cache, or downloaded when online."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise HarnessError(
            f"model {repo_id!r} is not a local folder, a zoo name, or a hub id available "
            f"{'in the local cache (offline)' if offline else 'online'}: {type(exc).__name__}; "
            "pass a save_pretrained folder or download it first"
        ) from None


def weights_digest(folder: str) -> str:
    """sha256 over config.json and the weight files' bytes (files over 256 MiB: size + first and
    last 16 MiB, so that a multi-GB checkpoint is identified in seconds)."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        if path.name.startswith("tokenizer") or path.name == "zoo.json":
            continue
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as f:
            if size <= 256 << 20:
                h.update(f.read())
            else:
                h.update(f.read(16 << 20))
                f.seek(-(16 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def identify(name: str | None = None) -> tuple[str, str, str]:
    """(local folder, weights digest, harness family) of a model, from its files alone: what a run
    key needs, without loading the weights (a sweep driver keys cells of models it never loads)."""
    source, _from_hub = resolve_source(name or DEFAULT_MODEL)
    model_type = read_config(source, name)["model_type"]
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise HarnessError(
            f"unsupported architecture {model_type!r} in {name}; supported: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))}"
        )
    return source, weights_digest(source), family


def _register_fla() -> None:
    with warnings.catch_warnings():
        # fla warns on import that Triton has no GPU; the CPU references below are the answer
        warnings.filterwarnings("ignore", message="Triton is not supported")
        import fla.models  # noqa: F401  (registers DeltaNet / GatedDeltaNet with the Auto classes)

    from harness.kernels import fla_cpu

    fla_cpu.install()  # routes fla's Triton ops to torch references for CPU tensors


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (a library's multi-line message whole, not its first
    line cut mid-sentence), at most `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def read_config(source, name) -> dict:
    """A checkpoint's config.json as a dict with a model_type (anything else: a HarnessError)."""
    import json

    try:
        data = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise HarnessError(f"cannot read the config.json of {name} ({one_line(exc, 120)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise HarnessError(f"the config.json of {name} has no model_type: not a transformers model config")
    return data


def _has_auto_map(source) -> bool:
    try:
        return "auto_map" in read_config(source, "")
    except HarnessError:
        return False


def load_model(
    name: str | None = None, *, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness shows its own progress; tiny loads need none

    name = name or DEFAULT_MODEL
    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    source, _from_hub = resolve_source(name)
    local_files_only = True  # resolve_source already has every file on disk
    _register_fla()
    model_type = read_config(source, name)["model_type"]
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except (TypeError, KeyError, AttributeError) as exc:  # a known model type whose fields hold the wrong kinds
        raise HarnessError(
            f"the config.json of {name} is not a valid {model_type} config ({type(exc).__name__}: {one_line(exc, 160)})"
        ) from None
    except ValueError as exc:
        msg = one_line(exc)
        if "trust_remote_code" in msg or (_has_auto_map(source) and not trust_remote_code):
            raise HarnessError(
                f"{name} needs custom code (its config.json has an auto_map); rerun with "
                "--trust-remote-code if you trust its source"
            ) from None
        raise HarnessError(f"unsupported architecture in {name}: {msg}") from None
    except OSError as exc:
        raise HarnessError(f"cannot load {name!r}: {str(exc).splitlines()[0]}") from None
    family = FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise HarnessError(
            f"unsupported architecture {config.model_type!r} in {name}; supported: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                local_files_only=local_files_only,
                output_loading_info=True,
            )
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "size mismatch" in line), first[0] if first else type(exc).__name__)
        raise HarnessError(f"checkpoint {name} does not match its config: {detail.strip()}") from None
    except Exception as exc:  # safetensors' SafetensorError (a truncated or garbage file) is none of the above
        if "safetensor" not in type(exc).__name__.lower() and "safetensor" not in str(exc).lower():
            raise
        raise HarnessError(
            f"the weights of {name} are unreadable ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:120]}): the file is truncated or not a safetensors "
            "file; save or download it again"
        ) from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        kind, keys = next(iter(problems.items()))
        keys = sorted(map(str, keys))
        raise HarnessError(
            f"checkpoint {name} does not match its config: {len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]}); "
            "was config.json edited or the weights saved from another model?"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except (OSError, ValueError) as exc:
        raise HarnessError(f"no usable tokenizer in {name}: {one_line(exc)}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, family, name, source, weights_digest(source), device, dtype)
