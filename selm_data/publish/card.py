"""The dataset card (README.md of a pushed snapshot): YAML metadata the Hub and `datasets` read,
then what the data is, how it was made, its lineage, the manifest and statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from selm_data.publish.provenance import (
    LINEAGE_FILE,
    POLICY_IDS,
    Lineage,
    PolicyPairStatistics,
)

CARD_FILE = "README.md"
SELM_PAPER = "https://arxiv.org/abs/2405.19332"
SAIL_PAPER = "https://arxiv.org/abs/2406.15567"

# The Hub's size_categories, by upper bound of the row count.
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
          (1_000_000_000, "100M<n<1B"))

COLUMNS = {
    "prompt": "the last user turn, as text",
    "prompt_id": "the prompt's id in the store",
    "chosen": "the conversation ending in the chosen response (messages)",
    "rejected": "the conversation ending in the rejected response",
    "messages": "same as `chosen` (the layout alignment-handbook recipes read)",
    "score_chosen": "the ranker's score of the chosen response",
    "score_rejected": "the ranker's score of the rejected response",
    "reference": "the conversation ending in the policy's own response y_ref (SELM's term)",
    "score_reference": "the ranker's score of y_ref",
    "margin": "score_chosen - score_rejected",
    "is_tie": "the ranker could not tell chosen from rejected",
    "iteration": "the SELM iteration",
    "rule": "the pairing rule that made the pair",
    "chosen_origin": "which candidate won: policy (y_ref), dataset_chosen or dataset_rejected",
    "rejected_origin": "which candidate lost",
    "pair_id": "the pair's id in the store",
    "ranking_id": "the ranking's id in the store",
    "chosen_id": "the chosen response's id in the store",
    "rejected_id": "the rejected response's id in the store",
    "ref_id": "y_ref's id in the store",
    # SAIL's policy pair (pairing rule `sail`): two seeded samples y_0, y_1 of the policy
    "policy_chosen": "the conversation ending in the policy sample the ranker scored higher "
                     "(y_0 on a tie); the same message format as `chosen`",
    "policy_rejected": "the conversation ending in the other policy sample",
    "score_policy_chosen": "the ranker's score of `policy_chosen`",
    "score_policy_rejected": "the ranker's score of `policy_rejected`",
    "policy_is_tie": "the ranker scored both samples equal (the order is then y_0, y_1)",
    "policy_swapped": "true when `policy_chosen` is sample y_1: swap the two back to get the "
                      "samples in their drawn order (y_0, y_1), unordered by the ranker",
    "policy_pair_id": "the policy pair's id in the store",
    "policy_chosen_id": "`policy_chosen`'s response id in the store",
    "policy_rejected_id": "`policy_rejected`'s response id in the store",
}
# What the message columns hold in the trl layout (TRL's explicit prompt), where they differ.
TRL_COLUMNS = {
    "prompt": "the prompt turns (messages), TRL's explicit prompt",
    "chosen": "the chosen response, one assistant message",
    "rejected": "the rejected response, one assistant message",
    "reference": "the policy's own response y_ref, one assistant message (SELM's term)",
    "policy_chosen": "the policy sample the ranker scored higher (y_0 on a tie), one assistant "
                     "message",
    "policy_rejected": "the other policy sample, one assistant message",
}
LAYOUT_TEXT = {
    "trl": "Layout `trl`: TRL's conversational format with an explicit prompt; TRL's "
           "`DPOTrainer(..., train_dataset=pairs)` reads it as it is.",
    "ultrafeedback": "Layout `ultrafeedback`: the columns of HuggingFaceH4/ultrafeedback_binarized,"
                     " which alignment-handbook recipes read. TRL's DPOTrainer does not (a text "
                     "`prompt` beside conversational answers): the `trl` layout is for it.",
}
# What the shared columns mean in a SAIL snapshot, where they differ from COLUMNS.
SAIL_COLUMNS = {
    "reference": "null: SAIL has no y_ref (SELM's term)",
    "score_reference": "null",
    "ref_id": "null",
    "iteration": "the iteration",
    "rule": "`sail_dataset`: the row's pair is the dataset's (its policy pair is `sail_policy`)",
    "chosen_origin": "dataset_chosen: the dataset's chosen response",
    "rejected_origin": "dataset_rejected: the dataset's rejected response",
    "margin": "score_chosen - score_rejected: negative where the ranker disagrees with the "
              "dataset's label",
}
# Which columns each route of SAIL's trainer reads (Ding et al. 2024; design.md section 2).
SAIL_ROUTES = (
    ("DPO", "`chosen`, `rejected`: the dataset's pair"),
    ("SAIL-DP", "`chosen`, `rejected`; the trainer relabels by the policy's own preference"),
    ("SAIL-PP", "`policy_chosen`, `policy_rejected` with `policy_swapped` undone (y_0, y_1); "
                "the trainer orders them by the policy's own preference"),
    ("SAIL-PR", "`policy_chosen`, `policy_rejected`: ordered by the ranker"),
)



def size_category(rows: int) -> str:
    for bound, label in _SIZES:
        if rows < bound:
            return label
    return "1B<n<10B"


def card_metadata(lineage: Lineage) -> dict[str, Any]:
    """The card's YAML front matter: what the Hub and `datasets` read."""
    sail = lineage.policy_pair is not None
    return {
        "pretty_name": f"{'SAIL' if sail else 'SELM'} iteration {lineage.iteration} "
                       f"preference pairs ({lineage.snapshot})",
        "license": lineage.license,
        "task_categories": ["text-generation"],
        "tags": ["preference", "dpo", "sail" if sail else "selm", "iterative-alignment",
                 "synthetic"],
        "size_categories": [size_category(lineage.statistics.rows)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*"}]}],
    }


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _margin_section(margin: dict[str, float | None]) -> list[str]:
    """The margins' quantiles; a dataset's own pairs without score columns have none."""
    if all(v is None for v in margin.values()):
        return ["Margin: none, the pairs have no scores (the source dataset has no score "
                "columns, so its pairs were kept as they are).\n"]
    return ["Margin (chosen minus rejected score):\n",
            _table(list(margin), [[_num(v) for v in margin.values()]]) + "\n"]


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render_card(lineage: Lineage, *, repo_id: str | None = None) -> str:
    """README.md: YAML metadata, then the data, how it was made, lineage, manifest, statistics."""
    s = lineage.statistics
    meta = yaml.safe_dump(card_metadata(lineage), sort_keys=False, allow_unicode=True)
    sources = ", ".join(f"`{u.source}`" for u in lineage.sources) or "—"
    load_id = repo_id or "ORG/NAME"
    sail = lineage.policy_pair is not None
    meanings = {**COLUMNS, **(TRL_COLUMNS if lineage.layout == "trl" else {}),
                **(SAIL_COLUMNS if sail else {})}
    y_ref_rows = [] if sail else [
        ("y_ref chosen", f"{s.ref_chosen} ({_share(s.ref_chosen, s.rows)})"),
        ("y_ref rejected", f"{s.ref_rejected} ({_share(s.ref_rejected, s.rows)})")]
    parts = [
        f"---\n{meta}---\n",
        *(_sail_intro(lineage, sources) if sail else [
            f"# SELM iteration {lineage.iteration} preference pairs: `{lineage.snapshot}`\n",
            f"{s.rows} preference pairs for iteration {lineage.iteration} of SELM "
            f"([Self-Exploring Language Models]({SELM_PAPER}), Zhang et al. 2024), built with "
            f"[selm](https://pypi.org/project/selm/) from {sources}. For each prompt the policy "
            "answered (y_ref), a ranker scored {y_ref, the dataset's chosen, the dataset's "
            "rejected}, and a pairing rule kept a chosen and a rejected response. The "
            "`reference` column keeps y_ref for SELM's optimism term.\n"]),
        "```python\nfrom datasets import load_dataset\n\n"
        f'pairs = load_dataset("{load_id}", split="train")\n```\n',
        "## Columns\n",
        LAYOUT_TEXT.get(lineage.layout, "") + "\n",
        _table(["column", "meaning"], [(f"`{c}`", meanings.get(c, "")) for c in lineage.columns])
        + "\n",
        "## How it was made\n",
        *_made(lineage),
        "## Statistics\n",
        _table(["", "value"], [
            ("pairs", s.rows), ("prompts", s.prompts), ("ties (`is_tie`)", s.ties),
            *y_ref_rows,
            *((f"chosen from {k}", n) for k, n in s.chosen_origins.items()),
            *((f"rejected from {k}", n) for k, n in s.rejected_origins.items()),
        ]) + "\n",
        *_margin_section(s.margin),
        *_policy_statistics_section(lineage.policy_pair),
        "## Lineage\n",
        *_lineage_section(lineage),
        "## Manifest\n",
        *_manifest_section(lineage),
        "## License\n",
        _license_text(lineage),
        "## Citation\n",
        *([SAIL_CITATION] if sail else []),
        "```bibtex\n@article{zhang2024selm,\n  title={Self-Exploring Language Models: Active "
        "Preference Elicitation for Online Alignment},\n  author={Zhang, Shenao and Yu, "
        "Donghan and Sharma, Hiteshi and Zhong, Han and Liu, Zhihan and Yang, Ziyi and Wang, "
        "Shuohang and Hassan, Hany and Wang, Zhaoran},\n  journal={arXiv preprint "
        "arXiv:2405.19332},\n  year={2024}\n}\n```\n",
    ]
    return "\n".join(parts)


SAIL_CITATION = (
    "```bibtex\n@article{ding2024sail,\n  title={SAIL: Self-Improving Efficient Online "
    "Alignment of Large Language Models},\n  author={Ding, Mucong and Chakraborty, Souradip "
    "and Agrawal, Vibhu and Che, Zora and Koppel, Alec and Wang, Mengdi and Bedi, Amrit and "
    "Huang, Furong},\n  journal={arXiv preprint arXiv:2406.15567},\n  year={2024}\n}\n```\n")


def _sail_intro(lineage: Lineage, sources: str) -> list[str]:
    """What a SAIL snapshot holds, and which columns each of SAIL's routes trains on."""
    return [
        f"# SAIL iteration {lineage.iteration} preference pairs: `{lineage.snapshot}`\n",
        f"{lineage.statistics.rows} prompts for iteration {lineage.iteration} of SAIL "
        f"([Self-Improving Efficient Online Alignment]({SAIL_PAPER}), Ding et al. 2024), built "
        f"with [selm](https://pypi.org/project/selm/) from {sources}. For each prompt the policy "
        "drew two seeded samples y_0 and y_1, and a ranker scored {y_0, y_1, the dataset's "
        "chosen, the dataset's rejected}. Each row holds two pairs: the dataset's pair as the "
        "dataset labelled it (`chosen`, `rejected`; the ranker's scores beside it, so its "
        "`margin` is negative where the ranker disagrees), and the policy pair "
        "(`policy_chosen`, `policy_rejected`) in the ranker's order. The export filters chose "
        "rows by the dataset pair; a tied policy pair is kept and flagged `policy_is_tie`. "
        "One snapshot serves every route of SAIL's trainer:\n",
        _table(["route", "reads"], SAIL_ROUTES) + "\n",
    ]


def _policy_statistics_section(stats: PolicyPairStatistics | None) -> list[str]:
    if stats is None:
        return []
    return [
        "SAIL's policy pairs (`policy_chosen` over `policy_rejected`):\n",
        _table(["", "value"], [
            ("policy pairs", stats.rows), ("ties (`policy_is_tie`)", stats.ties),
            ("ranker preferred y_1 (`policy_swapped`)",
             f"{stats.swapped} ({_share(stats.swapped, stats.rows)})"),
        ]) + "\n",
        "Policy pair margin (`score_policy_chosen - score_policy_rejected`):\n",
        _table(list(stats.margin), [[_num(v) for v in stats.margin.values()]]) + "\n",
    ]


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "—"


def _made(lineage: Lineage) -> list[str]:
    sail = lineage.policy_pair is not None
    policies = _table(
        ["policy", "fingerprint", "backend", "temperature", "top_p", "top_k", "max_tokens",
         "per-request seeds", "samples (y_0, y_1)" if sail else "y_ref responses"],
        [(f"`{p.policy}`", p.fingerprint, p.backend, p.temperature, p.top_p, p.top_k,
          p.max_tokens, "yes" if p.seeded else "no", p.responses) for p in lineage.policies])
    rankers = _table(["ranker", "version", "rankings"],
                     [(f"`{r.ranker}`", r.version, r.rankings) for r in lineage.rankers])
    if not lineage.policies:
        policies = "none: no pair holds a policy response (the dataset's own pairs)"
    if not lineage.rankers:
        rankers = "none recorded"
    filters = ", ".join(f"{k}={v}" for k, v in lineage.filters.items()) or "none"
    if sail:
        return [
            "**Policy** (drew the samples y_0, y_1):\n", policies + "\n",
            "**Ranker** (scored the four candidates of each prompt):\n", rankers + "\n",
            f"**Pairing rule**: {', '.join(f'`{r}`' for r in lineage.rules)} (`sail_dataset`: "
            "the dataset's chosen over its rejected; `sail_policy`: the higher-scored sample "
            f"over the other, y_0 on a tie). **Export filters**: {filters}.\n",
        ]
    return [
        "**Policy** (generated y_ref):\n", policies + "\n",
        "**Ranker** (scored the three candidates of each prompt):\n", rankers + "\n",
        f"**Pairing rule**: {', '.join(f'`{r}`' for r in lineage.rules)} (`best_worst`: the "
        "best and worst of the three by rank, ties broken so y_ref wins; `replace`: SELM "
        f"Appendix C). **Export filters**: {filters}.\n",
    ]


_POLICY_IDS_TEXT = ", " + ", ".join(f"`{c}`" for c in POLICY_IDS)


def _lineage_section(lineage: Lineage) -> list[str]:
    sources = _table(["source", "revision", "split", "prompts", "license"],
                     [(f"`{u.source}`", u.revision, u.split, u.prompts, u.license)
                      for u in lineage.sources])
    versions = _table(["table", "version"], sorted(lineage.table_versions.items()))
    runs = _table(["run", "command", "manifest", "selm"],
                  [(f"`{r.run_id}`", f"`{r.command}`", r.manifest_hash, r.selm_version)
                   for r in lineage.runs])
    return [
        f"Snapshot `{lineage.snapshot}` (id `{lineage.snapshot_id}`), content hash "
        f"`{lineage.content_hash}` (sha256 over the shards' names and sha256s), exported by "
        f"selm {lineage.exported_with} in run `{lineage.export_run_id}`. Every row keeps its "
        "store ids (`pair_id`, `prompt_id`, `ranking_id`, `chosen_id`, `rejected_id`, "
        f"`ref_id`{_POLICY_IDS_TEXT if lineage.policy_pair else ''}); `{LINEAGE_FILE}` holds "
        "this section machine-readable.\n",
        "**Source dataset**:\n", sources + "\n",
        "**Store table versions read**:\n", versions + "\n",
        "**Runs that wrote these rows**:\n", runs + "\n",
    ]


def _manifest_section(lineage: Lineage) -> list[str]:
    if not lineage.manifests:
        return ["No run that wrote these rows recorded a manifest (the store was written "
                "through the library, not a `selm-data` command).\n"]
    out = []
    for m in lineage.manifests:
        text = yaml.safe_dump(m.manifest, sort_keys=False, allow_unicode=True)
        out.append(f"Manifest `{m.manifest_hash}` (runs {', '.join(m.run_ids)}); secrets "
                   "are never stored, and anything shaped like one is masked:\n")
        out.append(f"```yaml\n{text}```\n")
    return out


def _license_text(lineage: Lineage) -> str:
    known = [u for u in lineage.sources if u.origin]
    lines = []
    if lineage.license == "unknown":
        lines.append("`unknown`: selm could not tell the license of the source dataset "
                     f"({', '.join(f'`{u.source}`' for u in lineage.sources) or 'none'}). "
                     "Check it, and set the card's `license` before sharing this data.")
    elif all(u.license == lineage.license for u in lineage.sources) and lineage.sources:
        lines.append(f"`{lineage.license}`, inherited from the source dataset.")
    else:
        lines.append(f"`{lineage.license}`, as given by the pusher.")
    lines += [f"The prompts and the dataset's responses are rows of {u.origin}, "
              f"{u.license} license." for u in known]
    samples = "y_0, y_1" if lineage.policy_pair else "y_ref"
    lines.append(f"The policy's responses ({samples}) were generated by the model(s) above; "
                 "their terms of use may apply to generated text.")
    return " ".join(lines) + "\n"
