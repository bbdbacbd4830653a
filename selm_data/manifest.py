"""The manifest: the whole recipe of a run, validated whole before anything loads.

One YAML file says where the preference data comes from, how many iterations to run, which
policy generates, how it samples, which ranker judges, which rule pairs, how each iteration
trains, and where the store lives. Unknown keys are refused; combinations that make no sense
are refused with the field named. Defaults live here and nowhere else.

Relative paths (`store`, `source.path`) are relative to the working directory, as for
torchtune's and TRL's `output_dir`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from selm_data.errors import ManifestError
from selm_data.store.schema import canonical_json
from selm_data.store.store import RunInfo

BUNDLED_DATA = Path(__file__).parent / "data"
DEFAULT_MANIFESTS = ("selm.yaml", "manifests/demo.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Where a model runs (see generation/devices.py): auto (this process's GPU, its LOCAL_RANK's,
# else the CPU), cpu, cuda (the same GPU as auto) or cuda:N.
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$")]
DType = Literal["auto", "float32", "bfloat16", "float16"]  # auto: bf16 on a GPU, fp32 on CPU


class _Spec(BaseModel):
    # Numbers stay lax on purpose: PyYAML reads `5e-7` (no dot) as a string. Booleans are
    # strict (StrictBool): "yes" or "no" in quotes must not silently become True.
    model_config = ConfigDict(extra="forbid", frozen=True)


DataFiles = str | list[str] | dict[str, str | list[str]]


class SourceSpec(_Spec):
    """A preference dataset: a Hub id (or a local folder laid out as a Hub repo), a local
    file, folder or glob of jsonl/json/parquet files (jsonl/json may be .gz, .bz2, .xz or .zst),
    or a bundled file."""

    hub: str | None = None
    path: str | None = None  # a file, a folder of shards, or a glob ("shards/*.parquet")
    bundled: str | None = None  # a file name under selm_data/data
    split: str = "train"
    revision: str | None = None  # Hub commit or tag; pin it for reproducible lineage
    # As `datasets.load_dataset` takes them, for Hub sources only: the config name (`name=`),
    # a folder of the repo (HH-RLHF's `harmless-base`), or files of the repo (a pattern, a list,
    # or a {split: files} mapping).
    config: str | None = None
    data_dir: str | None = None
    data_files: DataFiles | None = None
    layout: Literal["auto", "ultrafeedback", "flat", "conversation", "sharegpt", "hh"] = "auto"
    limit: PositiveInt | None = None  # keep the first N rows (demos, smoke tests)

    @model_validator(mode="after")
    def _one_location(self) -> SourceSpec:
        given = [k for k in ("hub", "path", "bundled") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of hub, path, bundled (got {given or 'none'})"
            )
        shipped = sorted(p.name for p in BUNDLED_DATA.glob("*.jsonl"))
        if self.bundled is not None and self.bundled not in shipped:
            raise ValueError(f"no bundled dataset {self.bundled!r}; shipped: {shipped}")
        for key in ("revision", "config", "data_dir", "data_files"):
            if getattr(self, key) is not None and self.hub is None:
                raise ValueError(f"{key} applies to a Hub dataset (hub), not a local file; a "
                                 "local folder laid out as a Hub repo can be given as hub too")
        return self


class PortionSpec(_Spec):
    """How the dataset is cut into one portion per iteration (SELM trains on portion t)."""

    split: Literal["contiguous", "hash"] = "contiguous"  # contiguous: as the paper's code
    count: PositiveInt | None = None  # default: one portion per iteration


class PolicySpec(_Spec):
    model: str  # Hub id or local folder of the starting policy (iteration 1's reference)
    revision: str | None = None
    dtype: DType = "auto"  # the transformers backend's; vLLM's own auto is the checkpoint's
    trust_remote_code: StrictBool = False  # runs code from the model repo: only for repos you trust


class VllmSpec(_Spec):
    enforce_eager: StrictBool = False  # skips graph capture: ~2 s instead of ~30 s to load on CPU
    gpu_memory_utilization: Probability = 0.9
    tensor_parallel_size: PositiveInt = 1
    max_model_len: PositiveInt | None = None
    enable_chunked_prefill: StrictBool | None = None  # vLLM CPU needs False for seeded sampling
    cpu_kvcache_space_gib: PositiveInt | None = None  # VLLM_CPU_KVCACHE_SPACE


class ServerSpec(_Spec):
    """An OpenAI-compatible server (`vllm serve`, a judge endpoint)."""

    base_url: str
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    max_concurrency: PositiveInt = 16


class GenerationSpec(_Spec):
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    # The paper's code samples y_ref greedily: temperature 0, top_p 1, 1024 tokens, n 1.
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: int = -1  # -1: no top-k cut
    max_tokens: PositiveInt = 1024
    n: PositiveInt = 1
    seed: int | None = None  # per-request seeds derive from it when set
    batch_size: PositiveInt = 32
    # The transformers backend's device (its dtype is policy.dtype). vLLM places itself: narrow
    # its GPUs with CUDA_VISIBLE_DEVICES.
    device: Device = "auto"
    vllm: VllmSpec = VllmSpec()
    server: ServerSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerationSpec:
        if (self.backend == "openai") != (self.server is not None):
            raise ValueError("backend 'openai' needs a 'server', and only it uses one")
        if self.device != "auto" and self.backend != "transformers":
            raise ValueError(f"generation.device applies to backend 'transformers' only; "
                             f"backend {self.backend!r} places itself (vLLM: narrow its GPUs "
                             "with CUDA_VISIBLE_DEVICES): remove generation.device")
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError("n > 1 with temperature 0 gives n identical greedy samples")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("top_k is -1 (off) or a positive number")
        return self

    def gpus_per_rank(self) -> int:
        """A build rank's GPUs: the policy's tensor-parallel block under vLLM, else one."""
        return self.vllm.tensor_parallel_size if self.backend == "vllm" else 1


class RankerSpec(_Spec):
    # demo: the bundled offline ranker (a Bradley-Terry head over MiniLM sentence embeddings,
    # trained on bundled UltraFeedback pairs); it ignores `model`.
    kind: Literal["pairrm", "reward_model", "judge", "demo"] = "pairrm"
    model: str = "llm-blender/PairRM"
    revision: str | None = None
    batch_size: PositiveInt = 8
    server: ServerSpec | None = None  # for kind 'judge'
    # Where the ranker runs and in what precision (also for compare and winrates); a judge's
    # model runs on its server. PairRM's dtype auto is llm-blender's choice (fp16 on a GPU).
    device: Device = "auto"
    dtype: DType = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> RankerSpec:
        if (self.kind == "judge") != (self.server is not None):
            raise ValueError("ranker kind 'judge' needs a 'server', and only it uses one")
        if self.kind == "judge" and (self.device, self.dtype) != ("auto", "auto"):
            raise ValueError("ranker kind 'judge' runs on its server: remove ranker.device "
                             "and ranker.dtype")
        return self


class PairingSpec(_Spec):
    # best_worst: best and worst of {y_ref, y_w, y_l} (SELM's default); y_ref is sample 0 when
    # generation.n > 1. replace: compare y_w with y_ref and replace one side of the pair (SELM
    # Appendix C). sail: rank {y_0, y_1, y_w, y_l} (two seeded policy samples and the dataset's
    # pair) and keep both the dataset pair and the policy pair, so one snapshot serves every
    # route of SAIL (Ding et al. 2024): DPO and SAIL-DP read the dataset pair, SAIL-PR the
    # policy pair in the ranker's order, SAIL-PP the policy pair in sample order.
    rule: Literal["best_worst", "replace", "sail"] = "best_worst"
    ties: Literal["keep", "drop"] = "keep"  # keep: a tied pair is stored, flagged is_tie


Loss = Literal["dpo", "ipo", "selm", "sail"]
Coefficient = Annotated[float, Field(ge=0.0)]


class SailSpec(_Spec):
    """SAIL's routes (Ding et al. 2024; design.md §2), drawn per example with a seed: SAIL-DP
    with probability r, SAIL-PP with p, SAIL-PR with g, plain DPO otherwise. The reference
    recipes run one route beside DPO: SAIL-DP r 0.4, rho 0.2; SAIL-PP p 0.3, pi 0.2; SAIL-PR
    g 0.3, gamma 0.3 (all at beta 0.1). PP and PR train on the policy pair, which a build with
    `pairing.rule: sail` makes; DP needs only the dataset pair."""

    r: Probability = 0.0
    p: Probability = 0.0
    g: Probability = 0.0
    rho: Coefficient = 0.2  # DP's -(rho/2) l**2
    pi: Coefficient = 0.2  # PP's -(pi/2) l**2 and its extra gradient
    gamma: Coefficient = 0.3  # PR's extra gradient
    # score_function: -c * stopgrad(l) * logp added to the loss (default: see losses.sail_loss);
    # reference_hook: the reference code's backward hook, -c * l / logp on logp's gradient
    extra_gradient: Literal["score_function", "reference_hook"] = "score_function"

    @model_validator(mode="after")
    def _sums(self) -> SailSpec:
        if self.r + self.p + self.g > 1 + 1e-9:
            raise ValueError(f"r + p + g is {self.r + self.p + self.g}; the route "
                             "probabilities must sum to at most 1 (the rest is plain DPO)")
        return self


class LoraSpec(_Spec):
    """LoRA adapters (PEFT) on `target_modules` (module names, e.g. q_proj, or 'all-linear':
    every linear layer but the output layer). The checkpoint is the merged model plus the
    adapter; the reference is the base model (adapters off), never a second copy."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32  # the update is scaled by alpha / r
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] | Literal["all-linear"] = \
        "all-linear"


class TrainSpec(_Spec):
    """Training settings of every iteration, unless an iteration overrides them."""

    loss: Loss = "selm"
    beta: Annotated[float, Field(gt=0.0)] = 0.01
    # SELM's optimism coefficient in the public code's convention: the loss adds
    # alpha * beta * (log pi(y_ref) - log pi_ref(y_ref)), so the paper's coefficient is alpha*beta.
    alpha: Annotated[float, Field(ge=0.0)] = 0.0
    learning_rate: Annotated[float, Field(gt=0.0)] = 5e-7
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    epochs: PositiveInt = 1
    global_batch_size: PositiveInt = 128
    micro_batch_size: PositiveInt = 1
    max_length: PositiveInt = 1024
    max_prompt_length: PositiveInt = 512
    gradient_checkpointing: StrictBool = False
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 42
    sail: SailSpec = SailSpec()  # loss 'sail' only
    lora: LoraSpec | None = None  # None: full fine-tuning
    # ZeRO offload to CPU memory: the optimizer state (stages 1-3), and the parameters too
    # (stage 3). Slower steps, much less GPU memory.
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    # How `selm-train loop` starts training: one process per GPU under this launcher, on
    # `gpus` GPUs (None: every GPU of the machine; one process on a machine without).
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    gpus: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload 'optimizer' needs zero_stage 1, 2 or 3 (ZeRO partitions "
                             "what it offloads); set train.zero_stage")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("offload 'optimizer+params' needs zero_stage 3 (parameters are "
                             "partitioned only at stage 3); set train.zero_stage: 3")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")
        if self.alpha > 0 and self.loss != "selm":
            raise ValueError(f"alpha applies to loss 'selm' only (loss is {self.loss!r})")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        return self


class IterationSpec(_Spec):
    """One iteration: which pairs it trains on, and what it changes of `train`."""

    # ranked: build new pairs (generate, rank, pair); original: train on the dataset's own
    # pairs, as the paper's Zephyr run does in its first (plain DPO) iteration.
    pairs: Literal["ranked", "original"] = "ranked"
    loss: Loss | None = None
    learning_rate: Annotated[float, Field(gt=0.0)] | None = None
    beta: Annotated[float, Field(gt=0.0)] | None = None
    alpha: Annotated[float, Field(ge=0.0)] | None = None


class Manifest(_Spec):
    name: Annotated[str, Field(min_length=1)]
    store: Annotated[str, Field(min_length=1)]  # folder of the store
    seed: int = 42
    source: SourceSpec
    portions: PortionSpec = PortionSpec()
    policy: PolicySpec
    generation: GenerationSpec = GenerationSpec()
    ranker: RankerSpec = RankerSpec()
    pairing: PairingSpec = PairingSpec()
    train: TrainSpec = TrainSpec()
    iterations: list[IterationSpec] = Field(min_length=1)
    # Prompts a build generates, ranks and commits at once: the unit of resume. Large, because
    # every Delta commit costs more as a table gathers files (see builder/iteration.py).
    commit_every: PositiveInt = 256

    @model_validator(mode="before")
    @classmethod
    def _iterations_shorthand(cls, data: Any) -> Any:
        # `iterations: 3` means three iterations with the train defaults.
        count = data.get("iterations") if isinstance(data, dict) else None
        if isinstance(count, int) and not isinstance(count, bool):
            if data["iterations"] < 1:
                raise ValueError("iterations must be at least 1")
            data = {**data, "iterations": [{} for _ in range(data["iterations"])]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.portions.count is not None and self.portions.count < len(self.iterations):
            raise ValueError(
                f"portions.count ({self.portions.count}) is below the number of iterations "
                f"({len(self.iterations)}): iteration t trains on portion t"
            )
        if self.source.limit is not None and self.source.limit < self.num_portions:
            raise ValueError(
                f"source.limit ({self.source.limit}) leaves some of the {self.num_portions} "
                "portions empty"
            )
        if self.pairing.rule == "sail":
            self._sail_generation()
        for t in range(1, len(self.iterations) + 1):
            try:
                spec = self.train_for(t)  # every iteration's resolved settings must validate too
            except ValidationError as e:
                reasons = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                raise ValueError(f"iteration {t} (iterations.{t - 1}) with train: {reasons}") from e
            policy_routes = spec.loss == "sail" and (spec.sail.p > 0 or spec.sail.g > 0)
            if policy_routes and (self.pairing.rule != "sail"
                                  or self.iteration(t).pairs == "original"):
                raise ValueError(
                    f"iteration {t} trains SAIL-PP or SAIL-PR (train.sail.p or .g above 0) on "
                    "the policy pair, which only a ranked build with pairing.rule 'sail' makes: "
                    "set pairing.rule to sail, or train SAIL-DP alone (sail.r)")
        return self

    def _sail_generation(self) -> None:
        g = self.generation
        if g.n != 2:
            raise ValueError(f"pairing.rule 'sail' pairs two policy samples per prompt: set "
                             f"generation.n to 2 (it is {g.n})")
        if g.temperature == 0.0:
            raise ValueError("pairing.rule 'sail' needs two different samples: set "
                             "generation.temperature above 0 (greedy samples are identical)")
        if g.seed is None:
            # Unseeded, the transformers backend samples every request under seed 0, so the
            # two samples of a prompt would be the same text; seeds also make them repeatable.
            raise ValueError("pairing.rule 'sail' needs seeded samples: set generation.seed "
                             "(each (prompt, sample) then gets its own seed)")
        if self.pairing.ties == "drop":
            raise ValueError("pairing.rule 'sail' keeps ties (flagged is_tie): SAIL-PP does "
                             "not use the ranker's order, so a tied policy pair is still data; "
                             "set pairing.ties to keep")

    @property
    def num_portions(self) -> int:
        return self.portions.count or len(self.iterations)

    def iteration(self, t: int) -> IterationSpec:
        if not 1 <= t <= len(self.iterations):
            raise ManifestError(
                f"manifest {self.name!r} has iterations 1..{len(self.iterations)}, not {t}"
            )
        return self.iterations[t - 1]

    def train_for(self, t: int) -> TrainSpec:
        """`train` with iteration t's overrides applied, validated again as a whole."""
        overrides = self.iteration(t).model_dump(exclude={"pairs"}, exclude_none=True)
        return TrainSpec.model_validate({**self.train.model_dump(), **overrides})

    def hash(self) -> str:
        """Identity of the recipe: sha256 of its canonical JSON (formatting does not count)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()[:16]

    def run_info(self, command: str) -> RunInfo:
        """Who writes under this manifest: the command, with the manifest's hash and text."""
        return RunInfo.new(command, manifest_hash=self.hash(), manifest_json=self.canonical_json())

    def canonical_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))


# --- loading ----------------------------------------------------------------------------------


def find_manifest(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The manifest to use: the one given, else $SELM_MANIFEST, else ./selm.yaml, else the demo."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("SELM_MANIFEST"):
        return Path(os.environ["SELM_MANIFEST"])
    for candidate in DEFAULT_MANIFESTS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise ManifestError(
        "no manifest given: pass --manifest FILE, set SELM_MANIFEST, or run where "
        f"one of {list(DEFAULT_MANIFESTS)} exists"
    )


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest; errors name the file, the field and what is allowed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ManifestError(f"{path}: not valid YAML{where}: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a mapping of fields, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(f"{path}: invalid manifest:\n{_explain(e)}") from e


def _explain(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(err["loc"][:-1])
            msg = f"unknown field; allowed here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _allowed_fields(parent: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found at `parent` inside a Manifest."""
    model: type[BaseModel] = Manifest
    for part in parent:
        if isinstance(part, int):
            continue  # an index into a list: same item model
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation) or model
    return sorted(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
