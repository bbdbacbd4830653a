"""`selm-data eval`: a policy's answers to an evaluation prompt set, kept in the store with
lineage and written in the files the official judges read.

The SELM paper judges every iteration with AlpacaEval 2.0 and MT-Bench (its Table 1). Their
judges are GPT-4 behind an API, which selm never calls: it generates the answers with the build's
own generation backends, stores each in `eval_answers` (policy checkpoint, prompt set and its
hash, backend, sampling, status), and writes them in the formats the official tools read, so a
user runs those judges on exactly the answers the store holds:

- AlpacaEval (tatsu-lab/alpaca_eval): `<out>/<set>/<name>/model_outputs.json`, a JSON list of
  records `instruction`, `output`, `generator`, `dataset`, like its `example/outputs.json`.
  `alpaca_eval --model_outputs FILE` reads it with `pandas.read_json`
  (`utils.load_or_convert_to_dataframe`), takes the model's name from the one `generator` value
  (`utils.get_generator_name`) and inner-joins it to the reference outputs on `instruction`
  (`PairwiseAnnotator.annotate_head2head`): instructions are written exactly as the set has them.
- MT-Bench (lm-sys/FastChat, fastchat/llm_judge): `<out>/<set>/model_answer/<name>.jsonl`, one
  line per question with `question_id` (the question file's own value: an integer, which
  `common.check_data` compares by value), `answer_id`, `model_id`, `choices` =
  `[{"index": 0, "turns": [answer 1, answer 2]}]` and `tstamp`, as `gen_model_answer.py` writes
  it. `common.load_model_answers` names the model after the file and keys its answers by
  `question_id`; the judges read `choices[0]["turns"][0]` and `[1]`. The second turn is
  generated after the first, from [user 1, the policy's own answer 1, user 2], as
  `gen_model_answer.py` does.

Beside each answer file, `<out>/<set>/<name>.selm_eval.json` records the lineage (store, policy,
fingerprint, checkpoint, prompt set hash, sampling, backends, the answer id of every question).

Sampling is greedy with the manifest's `generation.max_tokens` (or `--max-tokens`): the paper's
setting for y_ref. (FastChat's own script samples writing and roleplay at temperature 0.7;
answers made here are greedy for every category.) Answers have content ids, so rerunning the same
command generates only what is missing or failed, adds no row twice, and rewrites the same files
byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import ValidationError

from selm_data.builder.iteration import Shard, checkpoint_path, train_hint
from selm_data.errors import SelmError
from selm_data.generation.backends import (
    GenerationRequest,
    Generator,
    Sampling,
    close_generator,
    make_generator,
    stream_results,
)
from selm_data.generation.devices import free_accelerator_memory
from selm_data.generation.models import ResolvedModel, resolve_policy
from selm_data.manifest import BUNDLED_DATA, GenerationSpec, Manifest
from selm_data.store.schema import EVAL_ANSWERS, content_id, row_ids
from selm_data.store.store import Store, package_version

Message = dict[str, str]
Layout = Literal["alpaca_eval", "mt_bench"]  # which official format the answers are written in
EVAL_DATA = BUNDLED_DATA / "eval"
BUNDLED_SETS = {"alpaca_eval": "alpaca_eval_prompts.jsonl", "mt_bench": "mt_bench_questions.jsonl"}
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --- prompt sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    id: int | str  # as the set gives it: FastChat matches answers to questions by this value
    turns: tuple[str, ...]  # the user turns
    category: str | None  # MT-Bench's category, AlpacaEval's `dataset`

    @property
    def key(self) -> str:
        """The id as stored (`eval_answers.question_id` is text)."""
        return str(self.id)


@dataclass(frozen=True)
class PromptSet:
    name: str
    layout: Layout
    hash: str  # content of every question (ids and turns), so a renamed copy is the same set
    source: str  # the file read
    questions: tuple[Question, ...]

    @property
    def max_turns(self) -> int:
        return max(len(q.turns) for q in self.questions)


def load_prompt_set(ref: str) -> PromptSet:
    """`alpaca_eval` (805 instructions), `mt_bench` (80 two-turn questions), both shipped in
    selm_data/data/eval, or a .jsonl/.json file in either layout: records with `instruction`
    (and optional `id`, `dataset`) as AlpacaEval's, or with `question_id` and `turns` (and
    optional `category`) as FastChat's question.jsonl.

    Raises:
        SelmError: a missing or unreadable file, mixed layouts, a record of neither layout,
            empty turns or repeated question ids.
    """
    if ref in BUNDLED_SETS:
        path, name = EVAL_DATA / BUNDLED_SETS[ref], ref
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise SelmError(f"--prompts {ref!r} is neither {' nor '.join(BUNDLED_SETS)} nor a "
                            "file; give a .jsonl/.json file of AlpacaEval or MT-Bench records")
        name = _UNSAFE_NAME.sub("-", path.stem)
    records = _read_records(path)
    layouts = {_layout(path, i, r) for i, r in enumerate(records)}
    if len(layouts) != 1:
        raise SelmError(f"{path}: mixes AlpacaEval records (`instruction`) and MT-Bench records "
                        "(`turns`); one file holds one layout")
    layout = layouts.pop()
    questions = tuple(_question(path, i, r, layout) for i, r in enumerate(records))
    seen: set[str] = set()
    for q in questions:
        if q.key in seen:
            raise SelmError(f"{path}: question id {q.id!r} occurs twice; ids must be unique")
        seen.add(q.key)
    digest = content_id("prompt_set", {"layout": layout,
                                       "questions": [[q.key, list(q.turns)] for q in questions]})
    return PromptSet(name, layout, digest, str(path), questions)


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelmError(f"cannot read prompts from {path}: {e}") from e
    if not isinstance(records, list) or not records:
        raise SelmError(f"{path} holds no prompt records (a .json file holds a list of them)")
    if not all(isinstance(r, dict) for r in records):
        raise SelmError(f"{path}: every prompt record must be a JSON object")
    return records


def _layout(path: Path, i: int, record: dict[str, Any]) -> Layout:
    if "turns" in record:
        return "mt_bench"
    if "instruction" in record:
        return "alpaca_eval"
    raise SelmError(f"{path}, record {i}: has neither `instruction` (AlpacaEval) nor `turns` "
                    f"(MT-Bench); its keys are {sorted(record)}")


def _question(path: Path, i: int, record: dict[str, Any], layout: Layout) -> Question:
    if layout == "mt_bench":
        turns, qid, category = record["turns"], record.get("question_id"), record.get("category")
        if qid is None:
            raise SelmError(f"{path}, record {i}: an MT-Bench record needs `question_id`")
    else:
        turns, qid, category = [record["instruction"]], record.get("id", i), record.get("dataset")
    if not isinstance(qid, int | str) or isinstance(qid, bool):
        raise SelmError(f"{path}, record {i}: the question id must be an integer or a string")
    if layout == "mt_bench" and not isinstance(turns, list):  # a string would be its letters
        raise SelmError(f"{path}, record {i}: `turns` must be a list of strings, not "
                        f"{type(turns).__name__}")
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise SelmError(f"{path}, record {i}: every turn must be a non-empty string")
    return Question(qid, tuple(turns), None if category is None else str(category))


# --- the evaluated policy -------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPolicy:
    label: str  # base, iter1, ... or the model reference
    model: ResolvedModel
    iteration: int | None  # 0: the manifest's base policy; None: a model outside the run
    checkpoint_id: str | None  # its row in `checkpoints`, when it is a registered checkpoint


def eval_policy(store: Store, manifest: Manifest, *, iteration: int | None = None,
                policy: str | None = None) -> EvalPolicy:
    """The policy iteration `iteration` trained (0: the manifest's base policy), or `policy`.

    Raises:
        SelmError: neither or both given, or no checkpoint registered for the iteration.
    """
    if (iteration is None) == (policy is None):
        raise SelmError("give exactly one of --iter N (0: the base policy) and --policy PATH")
    if iteration is not None and iteration < 0:
        raise SelmError(f"--iter is 0 (the base policy) or an iteration 1, 2, ...; not {iteration}")
    if iteration == 0:
        model = resolve_policy(manifest.policy.model, revision=manifest.policy.revision)
        return EvalPolicy("base", model, 0, None)
    if iteration is not None:
        path = checkpoint_path(store, iteration)
        if path is None:
            raise SelmError(
                f"the store has no checkpoint for iteration {iteration}: train it with "
                f"{train_hint(store, iteration)}, or evaluate a folder with --policy PATH")
        model = resolve_policy(path)
    else:
        assert policy is not None
        model = resolve_policy(policy)
    found = (store.scan("checkpoints").filter(pl.col("fingerprint") == model.fingerprint)
             .sort("created_at").collect())
    if iteration is not None and found.height == 0:
        raise SelmError(f"the checkpoint folder of iteration {iteration} ({model.path}) no longer "
                        "matches the fingerprint it was registered with: its files changed")
    if found.height == 0:
        return EvalPolicy(model.reference, model, None, None)
    row = found.row(-1, named=True)
    label = f"iter{row['iteration']}" if row["iteration"] is not None else model.reference
    return EvalPolicy(label, model, row["iteration"], row["checkpoint_id"])


def policy_from_text(store: Store, manifest: Manifest, text: str) -> EvalPolicy:
    """`base`, an iteration number or a model reference, as `compare` and `winrates` take it."""
    if text == "base":
        return eval_policy(store, manifest, iteration=0)
    if text.isdigit():
        return eval_policy(store, manifest, iteration=int(text))
    return eval_policy(store, manifest, policy=text)


def eval_sampling(manifest: Manifest, max_tokens: int | None = None) -> Sampling:
    """Greedy decoding (the paper's), `max_tokens` new tokens (default: the manifest's)."""
    if max_tokens is not None and max_tokens < 1:
        raise SelmError(f"--max-tokens must be at least 1, not {max_tokens}")
    return Sampling(0.0, 1.0, -1, max_tokens or manifest.generation.max_tokens, None)


def default_name(manifest: Manifest, policy: EvalPolicy) -> str:
    """The model's name in the files: `<run>-base`, `<run>-iterN`, or the model folder's name."""
    if policy.iteration is not None:
        raw = f"{manifest.name}-{policy.label}"
    else:
        raw = Path(policy.model.reference.rstrip("/")).name or policy.model.reference
    return _UNSAFE_NAME.sub("-", raw).strip("-") or "model"


# --- answers in the store -------------------------------------------------------------------


def answer_ids(prompt_set: PromptSet, policy: EvalPolicy, sampling: Sampling,
               items: Sequence[tuple[Question, int, list[Message]]],
               status: str = "ok") -> list[str]:
    """The ids the store gives the answers to (question, turn, messages) items, computed in
    one batch (typed by the schema, as on write)."""
    n = len(items)
    columns = {
        "prompt_set_hash": [prompt_set.hash] * n, "question_id": [q.key for q, _, _ in items],
        "turn": [turn for _, turn, _ in items], "messages": [m for _, _, m in items],
        "policy_fingerprint": [policy.model.fingerprint] * n,
        "sampling": [sampling.as_row()] * n, "status": [status] * n,
    }
    table = pa.table({name: pa.array(values, type=EVAL_ANSWERS.schema.field(name).type)
                      for name, values in columns.items()})
    return row_ids(EVAL_ANSWERS, table).to_pylist()


def conversation(question: Question, turn: int,
                 answers: dict[tuple[str, int], dict[str, Any]]) -> list[Message] | None:
    """What the policy is given for `turn`: the earlier user turns with its own answers, then
    the turn's question; None while an earlier turn has no answer."""
    messages: list[Message] = []
    for earlier in range(1, turn):
        previous = answers.get((question.key, earlier))
        if previous is None:
            return None
        messages += [{"role": "user", "content": question.turns[earlier - 1]},
                     {"role": "assistant", "content": previous["text"]}]
    return [*messages, {"role": "user", "content": question.turns[turn - 1]}]


def stored_answers(store: Store, prompt_set: PromptSet, policy: EvalPolicy, sampling: Sampling,
                   questions: Sequence[Question] | None = None
                   ) -> dict[tuple[str, int], dict[str, Any]]:
    """The ok answers the store holds, by (question key, turn), each turn following the stored
    answer of the turn before (its id covers the conversation it was given)."""
    rows = (store.scan("eval_answers")
            .filter((pl.col("prompt_set_hash") == prompt_set.hash)
                    & (pl.col("policy_fingerprint") == policy.model.fingerprint)
                    & (pl.col("status") == "ok"))
            .select("answer_id", "text", "backend", "created_at").collect())
    by_id = {row["answer_id"]: row for row in rows.iter_rows(named=True)}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    questions = prompt_set.questions if questions is None else questions
    for turn in range(1, prompt_set.max_turns + 1):
        if not by_id:
            break
        items = [(q, turn, messages) for q in questions if turn <= len(q.turns)
                 and (messages := conversation(q, turn, found)) is not None]
        for (q, _, _), aid in zip(items, answer_ids(prompt_set, policy, sampling, items),
                                  strict=True):
            if aid in by_id:
                found[(q.key, turn)] = by_id[aid]
    return found


@dataclass
class EvalReport:
    prompt_set: PromptSet
    policy: EvalPolicy
    sampling: Sampling
    questions: int  # of this run (after --limit)
    already: int = 0  # answers (turns) stored by an earlier run
    generated: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # (question, turn, reason)
    complete: int = 0  # questions with every turn answered
    files: list[Path] = field(default_factory=list)


def eval_work(prompt_set: PromptSet, policy: EvalPolicy) -> str:
    """The lease (and, under a launcher, the rank records' job) of one policy on one set."""
    return f"eval/{prompt_set.name}-{prompt_set.hash[:12]}/{policy.model.fingerprint[:12]}"


def evaluate(store: Store, manifest: Manifest, policy: EvalPolicy, prompt_set: PromptSet, *,
             limit: int | None = None, max_tokens: int | None = None,
             backend: str | None = None, generator: Generator | None = None,
             progress: Progress | None = None, shard: Shard | None = None) -> EvalReport:
    """Generate and store the answers of `policy` to the first `limit` questions of
    `prompt_set` that the store lacks, turn by turn: each turn of all questions is one stream
    of the engine (turn 2 needs turn 1's answers), `manifest.commit_every` answers a commit
    (the unit a crash can lose). `generator` defaults to the manifest's backend (or
    `backend`) loaded with the policy and freed at the end (engine shut down, GPU memory
    given back); one passed in is the caller's to reuse and close. `shard` i/k answers every
    k-th question from the i-th (a rank of k under a launcher), with both turns of each."""
    if limit is not None and limit < 1:
        raise SelmError(f"--limit must be at least 1, not {limit}")
    shard = shard or Shard(0, 1)
    questions = shard.take(prompt_set.questions[:limit])
    sampling = eval_sampling(manifest, max_tokens)
    spec = _generation(manifest, backend)
    report = EvalReport(prompt_set, policy, sampling, len(questions))
    progress = progress or (lambda *_: None)
    work = eval_work(prompt_set, policy)
    with store.claim(work if shard.count == 1 else f"{work}/shard={shard}"):
        answers = stored_answers(store, prompt_set, policy, sampling, questions)
        report.already = len(answers)
        owned = generator is None
        for turn in range(1, prompt_set.max_turns + 1):
            todo = [(q, messages) for q in questions
                    if turn <= len(q.turns) and (q.key, turn) not in answers
                    and (messages := conversation(q, turn, answers)) is not None]
            if not todo:
                continue
            generator = generator or make_generator(spec, manifest.policy, policy.model.path,
                                                    policy.model.revision, seed=manifest.seed)
            _generate(store, generator, prompt_set, policy, sampling, turn, todo, answers,
                      report, manifest.commit_every, progress)
        if owned and generator is not None:
            close_generator(generator)
            generator = None  # the last reference: collected now, with any cycles
            free_accelerator_memory()
    report.complete = sum(all((q.key, t) in answers for t in range(1, len(q.turns) + 1))
                          for q in questions)
    return report


def _generation(manifest: Manifest, backend: str | None) -> GenerationSpec:
    if backend is None:
        return manifest.generation
    try:
        return GenerationSpec.model_validate({**manifest.generation.model_dump(),
                                              "backend": backend})
    except ValidationError as e:
        reasons = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise SelmError(f"--backend {backend}: {reasons} (generation in the manifest)") from e


def _generate(store: Store, generator: Generator, prompt_set: PromptSet, policy: EvalPolicy,
              sampling: Sampling, turn: int, todo: list[tuple[Question, list[Message]]],
              answers: dict[tuple[str, int], dict[str, Any]], report: EvalReport,
              commit_every: int, progress: Progress) -> None:
    """One turn of every question in `todo` through one stream of the engine (it never drains
    between commits), answers committed every `commit_every` results."""
    requests = [GenerationRequest(f"{prompt_set.name}/{q.key}/{turn}", messages, 0, sampling)
                for q, messages in todo]
    rows = []
    finished = 0
    for i, result in stream_results(generator, requests):
        (q, messages), finished = todo[i], finished + 1
        row = {
            "prompt_set": prompt_set.name, "prompt_set_hash": prompt_set.hash,
            "question_id": q.key, "category": q.category, "turn": turn, "messages": messages,
            "iteration": policy.iteration, "policy": policy.model.reference,
            "policy_fingerprint": policy.model.fingerprint,
            "checkpoint_id": policy.checkpoint_id, "backend": generator.backend,
            "sampling": sampling.as_row(), "status": result.status, "error": result.error,
            "text": result.text, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
        }
        rows.append(row)
        if result.status == "ok":
            answers[(q.key, turn)] = row
            report.generated += 1
        else:
            report.failed.append((q.key, turn, result.error or "unknown error"))
        if len(rows) >= commit_every or finished == len(todo):
            store.append("eval_answers", rows)
            rows = []
            progress(f"turn {turn}", finished, len(todo))


# --- the official tools' files --------------------------------------------------------------


def write_answer_files(store: Store, prompt_set: PromptSet, policy: EvalPolicy,
                       sampling: Sampling, out: Path, *, name: str,
                       limit: int | None = None) -> list[Path]:
    """Write the stored answers of the first `limit` questions as the official tool reads them
    (see the module docstring), and the lineage file beside them. Only questions with every
    turn answered are written. Returns [answer file, lineage file].

    Raises:
        SelmError: `name` is not a safe file name, or no question has an answer yet.
    """
    check_name(name)
    questions = prompt_set.questions[:limit]
    answers = stored_answers(store, prompt_set, policy, sampling, questions)
    complete = [q for q in questions
                if all((q.key, t) in answers for t in range(1, len(q.turns) + 1))]
    written = {q.key for q in complete}
    if not complete:
        raise SelmError(f"no question of {prompt_set.name} has an answer of {policy.label} "
                        "yet: run `selm-data eval` first")
    folder = Path(out) / prompt_set.name
    if prompt_set.layout == "alpaca_eval":
        records = [{"instruction": q.turns[0], "output": answers[(q.key, 1)]["text"],
                    "generator": name, "dataset": q.category or prompt_set.name}
                   for q in complete]
        answer_file = folder / name / "model_outputs.json"
        _write(answer_file, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    else:
        lines = []
        for q in complete:
            last = answers[(q.key, len(q.turns))]
            lines.append(json.dumps({
                "question_id": q.id, "answer_id": last["answer_id"], "model_id": name,
                "choices": [{"index": 0, "turns": [answers[(q.key, t)]["text"]
                                                   for t in range(1, len(q.turns) + 1)]}],
                "tstamp": last["created_at"].timestamp(),
            }, ensure_ascii=False))
        answer_file = folder / "model_answer" / f"{name}.jsonl"
        _write(answer_file, "\n".join(lines) + "\n")
    lineage = {
        "answers": str(answer_file), "format": prompt_set.layout, "name": name,
        "store": store.uri, "prompt_set": prompt_set.name,
        "prompt_set_hash": prompt_set.hash, "prompt_source": prompt_set.source,
        "policy": policy.model.reference, "policy_fingerprint": policy.model.fingerprint,
        "iteration": policy.iteration, "checkpoint_id": policy.checkpoint_id,
        "sampling": sampling.as_row(),
        "backends": sorted({str(a["backend"]) for a in answers.values()}),
        "questions": len(questions), "written": len(complete),
        "missing": [q.key for q in questions if q.key not in written],
        "answer_ids": {q.key: [answers[(q.key, t)]["answer_id"]
                               for t in range(1, len(q.turns) + 1)] for q in complete},
        "selm_version": package_version(),
    }
    lineage_file = folder / f"{name}.selm_eval.json"
    _write(lineage_file, json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return [answer_file, lineage_file]


def check_name(name: str) -> None:
    """The model's name is also a file name (FastChat's model id is its answer file's name)."""
    if not name or _UNSAFE_NAME.search(name) or name.startswith("."):
        raise SelmError(f"--name {name!r}: the model's name is also a file name; use letters, "
                        "digits and . _ - only")


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise SelmError(f"cannot write {path}: {e}; pick another --out") from e


__all__ = [
    "BUNDLED_SETS", "EvalPolicy", "EvalReport", "PromptSet", "Question", "answer_ids",
    "check_name", "conversation", "default_name", "eval_policy", "eval_sampling", "evaluate",
    "load_prompt_set", "policy_from_text", "stored_answers", "write_answer_files",
]
