"""PairRM through llm-blender: the ranker of the SELM paper, with llm-blender's own scores.

The paper ranks {y_ref, y_w, y_l} with `Blender().loadranker("llm-blender/PairRM")` and
`blender.rank(prompts, candidates, return_scores=True, batch_size=8)`. `PairRMRanker` loads the
ranker through that same path (`Blender.loadranker` on a local folder) and returns the numbers
`Blender.rank(..., return_scores=True, batch_size=batch_size)` returns for the same requests in
the same order, so rankings, ties and margins are the paper's.

How a score is made (llm-blender, unchanged): requests are collated `batch_size` at a time by
llm-blender's collator, which truncates the prompt to `source_maxlength` tokens and each
candidate to `candidate_maxlength` plus half of what the longest prompt *of that batch* leaves
unused. Then every ordered pair (i, j) of a request's candidates is compared in one forward
(`_forward`: [prompt, candidate i, candidate j] through DeBERTa, a head on the three marker
tokens), and a candidate's score is the mean of its comparison logits against the others
(`get_scores_from_cmps`). Because of that batch-wide truncation, a response longer than about
412 + (1224 - longest prompt in its batch) / 2 tokens can score differently in another batch:
that is llm-blender's behaviour, kept, so scores match `Blender.rank` over the same list.

What is faster than `Blender.rank`: only the forwards are regrouped. `Blender.rank` runs each
pair (i, j) of a batch as its own forward, padded to the longest of its `batch_size` rows; here
all pair inputs of a `score` call are sorted by length and run through the same `_forward` in
forwards of similar lengths (at most `batch_size` x the longest input's tokens, so memory stays
within `Blender.rank`'s, and at most PAD_SHARE of them padding), and identical inputs run once.
Scores equal its scores to float rounding: other shapes round float32 sums differently (in
float64 they are bitwise equal, tested). Identical inputs get one logit, so exact ties stay
exact; rankings can differ only where two scores lie within float rounding of each other.

Prompt rendering: PairRM takes one instruction string. A prompt that is a single user turn is
that turn's text, verbatim: the paper passes UltraFeedback's `prompt` column, which is exactly
that. Any other prompt (a system turn, earlier turns) is a transcript, one `ROLE: text` line per
turn with llm-blender's own conversation labels (`USER`, `Assistant`, from `get_pair_from_conv`),
so earlier turns stay visible. PairRM keeps the first 1224 tokens of the prompt: a very long
transcript loses its end.

Pickles: llm-blender loads the ranker checkpoint with `torch.load` (no `weights_only`) when the
folder has `pytorch_model.bin`, even next to `model.safetensors`, and with
`safetensors.torch.load_model` (strict: missing or unexpected keys fail) otherwise. So a folder
must have `model.safetensors` and no `pytorch_model.bin`, and Hub downloads skip pickle files
(PairRM's repo holds `training_args.bin`): llm-blender's `torch.load` is never reached (its
weights-only default in torch >= 2.6 can be switched off by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
trust_remote_code stays off: llm-blender turns it on for a backbone whose name contains "phi",
so such names are refused (as are the other names its tokenizer loader special-cases).

The backbone: the ranker's `config.json` is llm-blender's RankerConfig, whose `model_name` names
the DeBERTa backbone that llm-blender builds the model and tokenizer from (its weights are then
overwritten by the checkpoint). For `llm-blender/PairRM` that is the Hub id
`microsoft/deberta-v3-large`, which llm-blender has transformers download (config, tokenizer
and its unused weights) at the current revision, into the Hub cache. Its config and tokenizer
shape the scores, so to pin them, point `model_name` at a local backbone folder: a local backbone
folder is fingerprinted with the ranker.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

from selm_data.errors import SelmError
from selm_data.generation.devices import resolve_device, resolve_dtype
from selm_data.generation.models import fingerprint_folder
from selm_data.rankers.base import Message, RankRequest

DEFAULT_MODEL = "llm-blender/PairRM"
INSTALL = "pip install 'selm[pairrm]'"
# Never downloaded: pickled files. PairRM's weights are model.safetensors; its repo also holds
# training_args.bin (and config.bin at old revisions), which nothing here reads.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
# Substrings of a backbone name on which llm-blender's `build_tokenizer` changes behaviour:
# "phi" loads the tokenizer with trust_remote_code=True, "alpaca"/"llama" pad on the left (which
# the pair ranker's `cat_ids` does not expect), "starling-rm" loads another model's tokenizer.
_SPECIAL_BACKBONE_NAMES = ("phi", "alpaca", "llama", "starling-rm")
# A forward pads at most this share of its tokens: small calls, whose few inputs differ much in
# length, then run several short forwards rather than one padded to the longest. (Large calls
# have neighbours of near-equal length and fill the token budget first.)
PAD_SHARE = 0.1
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# llm-blender's labels for conversation turns (`blender_utils.get_pair_from_conv`).
_ROLE_LABELS = {"user": "USER", "assistant": "Assistant", "system": "System"}


# --- the compatibility bridge: llm-blender 0.0.2 on transformers 5 --------------------------

def import_llm_blender() -> Any:
    """`llm_blender`, imported so that version 0.0.2 works with transformers 5.

    Two things llm-blender 0.0.2 uses are gone in transformers 5 (measured on 5.19 and 5.23):
    1. `from transformers.utils.hub import TRANSFORMERS_CACHE` (in `blender.py` and
       `blender_utils.py`, at import). The name is put on `transformers.utils.hub` only for the
       duration of the import, with the value it had in transformers 4 (the Hub cache), then
       removed: transformers is left as it was for everyone else. llm-blender uses it only as
       the default `cache_dir` of `loadranker`.
    2. `tokenizer.batch_encode_plus` (in `pair_ranker.collator.encode_texts`). That one
       llm-blender function is replaced by `_encode_texts`, which calls the tokenizer itself,
       as `batch_encode_plus` did for a list of texts. Tokenizers are not touched.
    Under transformers 4 neither shim is applied.

    Raises:
        SelmError: llm-blender or one of its dependencies is not installed.
    """
    from transformers import PreTrainedTokenizerBase
    from transformers.utils import hub

    shim_cache = not hasattr(hub, "TRANSFORMERS_CACHE")
    if shim_cache:
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE  # type: ignore[attr-defined]
    try:
        llm_blender = importlib.import_module("llm_blender")
    except ModuleNotFoundError as e:
        raise SelmError(f"ranker kind 'pairrm' needs llm-blender, and {e.name or 'a module'} "
                        f"is not installed: {INSTALL}") from e
    except ImportError as e:  # something else this bridge does not cover
        import transformers

        raise SelmError(f"llm-blender does not import with transformers "
                        f"{transformers.__version__} ({e}); selm bridges llm-blender 0.0.2 to "
                        "transformers 4 and 5 (tested 5.19, 5.23): install one of those") from e
    finally:
        if shim_cache:
            del hub.TRANSFORMERS_CACHE  # type: ignore[attr-defined]
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        collator = importlib.import_module("llm_blender.pair_ranker.collator")
        collator.encode_texts = _encode_texts  # type: ignore[attr-defined]
    return llm_blender


def _encode_texts(texts: list[str], tokenizer: Any, max_length: int | None = None) -> Any:
    """llm-blender's `collator.encode_texts` with `tokenizer(...)` for the removed
    `tokenizer.batch_encode_plus(...)`: same arguments, same result."""
    p = tokenizer(texts, max_length=max_length, padding="max_length", return_tensors="pt",
                  truncation=True)
    return p["input_ids"], p["attention_mask"]


# --- the ranker ------------------------------------------------------------------------------

def render_prompt(messages: list[Message]) -> str:
    """The instruction PairRM sees: a lone user turn verbatim (the paper's `prompt`), else a
    transcript with llm-blender's turn labels, one `LABEL: text` line per turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{_ROLE_LABELS.get(m['role'], m['role'])}: {m['content']}"
                     for m in messages)


@dataclass(frozen=True)
class _Pair:
    """One comparison's input as collated token ids without padding: the prompt, the left
    candidate, the right candidate (their attention masks are all ones)."""

    source: Any
    left: Any
    right: Any

    def __len__(self) -> int:
        return len(self.source) + len(self.left) + len(self.right)

    def key(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.tolist()) for t in (self.source, self.left, self.right))


class PairRMRanker:
    """A loaded PairRM-style ranker (llm-blender's `pairranker`); see the module docstring.

    `name` is `pairrm:<Hub id or folder>`, `version` a fingerprint of the ranker folder (and of
    the backbone folder, when it is local)."""

    def __init__(self, blender: Any, *, name: str, version: str, batch_size: int) -> None:
        self.blender = blender
        self.name, self.version, self.batch_size = name, version, batch_size
        self.device = blender.ranker_config.device

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        """`Blender.rank([render_prompt(r.messages) ...], [r.candidates ...],
        return_scores=True, batch_size=self.batch_size)`, as lists of floats."""
        import numpy as np
        import torch
        from llm_blender.gpt_eval.utils import get_scores_from_cmps

        if not requests:
            return []
        n = len(requests[0].candidates)
        if n == 0 or any(len(r.candidates) != n for r in requests):
            raise ValueError("PairRM ranks the same number (>= 1) of candidates per request")
        index, pairs = self._pairs(requests)
        logits = np.zeros(len(pairs), dtype=np.float32)
        with torch.inference_mode():
            for chunk in self._chunks(pairs):
                logits[chunk] = self._compare([pairs[k] for k in chunk])
        cmps = np.zeros(index.shape, dtype=np.float32)  # diagonal 0, as in `_full_predict`
        cmps[index >= 0] = logits[index[index >= 0]]
        return [[float(x) for x in s] for s in get_scores_from_cmps(cmps)]

    def _pairs(self, requests: Sequence[RankRequest]) -> tuple[Any, list[_Pair]]:
        """Collate as `Blender.rank` does (its dataset, its collator, `batch_size` requests a
        batch, in order), then cut each batch into one unpadded input per ordered pair (i, j).

        Returns `index[request, i, j]` (-1 where i == j) into the distinct inputs. Identical
        inputs (a candidate repeated, or truncated to the same tokens) are run once, so they
        get identical logits and a tie stays an exact tie, as in `Blender.rank`."""
        import numpy as np
        import torch
        from llm_blender.blender.blender_utils import RankerDataset

        config = self.blender.ranker_config
        collate = copy.copy(self.blender.ranker_collator)
        collate.source_maxlength = config.source_maxlength
        collate.candidate_maxlength = config.candidate_maxlength
        dataset = RankerDataset([render_prompt(r.messages) for r in requests],
                                [list(r.candidates) for r in requests])
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size,
                                             shuffle=False, collate_fn=collate)
        n = len(requests[0].candidates)
        index = np.full((len(requests), n, n), -1, dtype=np.int64)
        seen: dict[tuple[tuple[int, ...], ...], int] = {}
        pairs: list[_Pair] = []
        for start, batch in zip(range(0, len(requests), self.batch_size), loader, strict=True):
            src_len = batch["source_attention_mask"].sum(-1).tolist()
            cand_len = batch["candidate_attention_mask"].sum(-1).tolist()
            for b in range(batch["source_ids"].shape[0]):
                source = batch["source_ids"][b, :src_len[b]]
                cands = [batch["candidate_ids"][b, k, :cand_len[b][k]] for k in range(n)]
                self._check_markers(start + b, source, cands)
                for i, j in permutations(range(n), 2):
                    pair = _Pair(source, cands[i], cands[j])
                    k = seen.setdefault(pair.key(), len(pairs))
                    if k == len(pairs):
                        pairs.append(pair)
                    index[start + b, i, j] = k
        return index, pairs

    def _chunks(self, pairs: list[_Pair]) -> list[list[int]]:
        """Indices of `pairs`, longest first, in forwards of at most `batch_size` x (longest
        input) tokens, so that no forward holds more than `Blender.rank`'s largest could, and
        at most PAD_SHARE of whose tokens are padding."""
        if not pairs:
            return []
        order = sorted(range(len(pairs)), key=lambda k: len(pairs[k]), reverse=True)
        budget = self.batch_size * len(pairs[order[0]])
        chunks: list[list[int]] = []
        real = 0  # tokens without padding in the last chunk
        for k in order:
            padded = (len(chunks[-1]) + 1) * len(pairs[chunks[-1][0]]) if chunks else 0
            if chunks and padded <= budget and padded - real - len(pairs[k]) <= PAD_SHARE * padded:
                chunks[-1].append(k)
                real += len(pairs[k])
            else:
                chunks.append([k])
                real = len(pairs[k])
        return chunks

    def _compare(self, chunk: list[_Pair]) -> list[float]:
        """The ranker's own `_forward` on the inputs, re-padded: each one's comparison logit."""
        import torch

        pad_id = self.blender.ranker_tokenizer.pad_token_id

        def padded(seqs: list[Any]) -> tuple[Any, Any]:
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs],
                                                   batch_first=True, padding_value=0)
            return ids.to(self.device), mask.to(self.device)

        out = self.blender.ranker._forward(*padded([p.source for p in chunk]),
                                           *padded([p.left for p in chunk]),
                                           *padded([p.right for p in chunk]))
        return out["logits"].float().cpu().tolist()

    def _check_markers(self, request: int, source: Any, candidates: list[Any]) -> None:
        """PairRM reads its head's inputs at marker tokens, one of each a row; text that spells
        a marker would add one and make `_forward` fail. Say so with the request named."""
        tok = self.blender.ranker_tokenizer
        markers = [tok.source_prefix_id, tok.cand_prefix_id, tok.cand1_prefix_id,
                   tok.cand2_prefix_id]
        expected = [([1, 0, 0, 0], source)] + [([0, 1, 0, 0], c) for c in candidates]
        for counts, ids in expected:
            if [int((ids == m).sum()) for m in markers] != counts:
                raise SelmError(
                    f"request {request}: its prompt or a response contains one of PairRM's "
                    f"marker texts ({', '.join(tok.convert_ids_to_tokens(markers))}), which "
                    "PairRM cannot rank; remove that text from the prompt or response")


# --- loading ---------------------------------------------------------------------------------

def load_pairrm(model: str, revision: str | None, batch_size: int, *,
                device: str = "auto", dtype: str = "auto") -> PairRMRanker:
    """The PairRM-style ranker `model` names, loaded through `Blender().loadranker(folder)`.

    `model` is a Hub id (downloaded with `snapshot_download(model, revision=revision)`, pickle
    files skipped; offline, set HF_HUB_OFFLINE=1 to use the Hub cache) or a local folder holding
    llm-blender's RankerConfig as `config.json` and the ranker as `model.safetensors`.
    `batch_size` is `Blender.rank`'s: how many requests are collated together. `device` is
    resolved by `generation.devices.resolve_device` (auto: this process's GPU, LOCAL_RANK's, else
    the CPU); `dtype` auto keeps llm-blender's own choice (fp16 on a GPU where PairRM's config
    asks for it, fp32 on CPU), any other value casts the ranker to it.

    Raises:
        SelmError: llm-blender missing, a download failing, a folder that is not a PairRM-style
            ranker or that has pickled weights, or llm-blender failing to load it.
    """
    llm_blender = import_llm_blender()
    folder, name = _ranker_folder(model, revision)
    config = _check_folder(folder)
    version = _fingerprint(folder, config["model_name"])
    device = str(resolve_device(device))
    blender = llm_blender.Blender(llm_blender.BlenderConfig(device=device, use_tqdm=False))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # loadranker prints; keep stdout clean
            blender.loadranker(str(folder), device=device)
    except Exception as e:
        raise SelmError(f"llm-blender could not load the ranker in {folder}: {e}; check that "
                        "config.json, model.safetensors and the backbone "
                        f"{config['model_name']!r} belong together") from e
    if dtype != "auto":
        blender.ranker.to(resolve_dtype(dtype, resolve_device(device)))
    return PairRMRanker(blender, name=name, version=version, batch_size=batch_size)


def _ranker_folder(model: str, revision: str | None) -> tuple[Path, str]:
    """(local folder, ranker name): a folder as given, or a Hub snapshot at `revision`."""
    local = Path(model).expanduser()
    if local.exists():
        if revision is not None:
            raise SelmError(f"ranker {model!r} is a local folder: revision applies to Hub ids "
                            "only; remove it")
        if not local.is_dir():
            raise SelmError(f"ranker {model!r} is a file; give the PairRM folder")
        folder = local.resolve()
        return folder, f"pairrm:{folder}"
    if not _HUB_ID.fullmatch(model):
        raise SelmError(f"ranker {model!r} is neither an existing folder nor a Hub id "
                        "(org/name)")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(model, revision=revision, ignore_patterns=PICKLE_PATTERNS)
    except Exception as e:
        raise SelmError(f"cannot download ranker {model!r} (revision {revision or 'main'}) "
                        f"from the Hub: {e}. Check the id, revision and network; offline, "
                        "fill the Hub cache first and set HF_HUB_OFFLINE=1, or give a local "
                        "folder") from e
    return Path(path), f"pairrm:{model}"


def _check_folder(folder: Path) -> dict[str, Any]:
    """The folder's RankerConfig, once it is known to load safely as a pair ranker."""
    what = ("a PairRM folder holds llm-blender's RankerConfig as config.json and the ranker "
            "as model.safetensors")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as e:
        raise SelmError(f"{folder} has no config.json; {what}") from e
    except (OSError, ValueError) as e:
        raise SelmError(f"{folder}/config.json cannot be read as JSON ({e}); {what}") from e
    if not isinstance(config, dict) or config.get("ranker_type") != "pairranker":
        kind = config.get("ranker_type") if isinstance(config, dict) else None
        raise SelmError(f"{folder} is not a PairRM-style ranker (config.json ranker_type "
                        f"{kind!r}, expected 'pairranker'; {what}); for a "
                        "sequence-classification reward model use `kind: reward_model`")
    if not (folder / "model.safetensors").is_file():
        raise SelmError(f"{folder} has no model.safetensors; selm never loads pickled weights: "
                        "save the ranker with safetensors.torch.save_model(ranker, ...)")
    if (folder / "pytorch_model.bin").exists():
        raise SelmError(f"{folder} has pytorch_model.bin next to model.safetensors, and "
                        "llm-blender would unpickle it first; remove pytorch_model.bin")
    backbone = config.get("model_name")
    if not isinstance(backbone, str) or not backbone:
        raise SelmError(f"{folder}/config.json names no backbone (model_name); PairRM's is "
                        "'microsoft/deberta-v3-large'")
    special = [s for s in _SPECIAL_BACKBONE_NAMES if s in backbone.lower()]
    if special or str(config.get("model_type", "")).startswith("phi"):
        raise SelmError(f"backbone {backbone!r} (model_name in {folder}/config.json) contains "
                        f"{special or 'phi'}, on which llm-blender changes how it loads the "
                        "tokenizer (with 'phi': trust_remote_code=True); selm refuses it. Move "
                        "or link the backbone to a path without those words")
    return config


def _fingerprint(folder: Path, backbone: str) -> str:
    """The ranker folder's fingerprint; with a local backbone folder, of both folders. (A Hub
    backbone is named in config.json, which the folder's fingerprint covers.)"""
    ranker = fingerprint_folder(folder)
    if not Path(backbone).is_dir():
        return ranker
    both = f"selm-pairrm-v1\n{ranker}\n{fingerprint_folder(Path(backbone))}"
    return hashlib.sha256(both.encode()).hexdigest()[:32]
