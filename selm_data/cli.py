"""`selm-data`: build, inspect and check the preference data of each iteration.

An entry point: it parses arguments and calls the library; nothing imports it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from selm_data.builder.iteration import BuildReport, build
from selm_data.builder.ranks import (
    ShardRecord,
    build_rank,
    merge,
    run_rank,
    shard_for,
    shard_progress,
    wait_for_job,
    wait_for_ranks,
)
from selm_data.errors import SelmError
from selm_data.generation.launcher import Launch, bind_gpus, detect, without_local_rank
from selm_data.manifest import Manifest, SourceSpec, find_manifest, load_manifest
from selm_data.publish.snapshot import DEFAULT_LAYOUT, POLICY_RULE, Filters, export, readers
from selm_data.sources.dataset import LAYOUTS, load_source
from selm_data.store import maintenance
from selm_data.store.progress import quiet_libraries
from selm_data.store.schema import TABLES
from selm_data.store.store import RunInfo, Store, command_line, open_store
from selm_data.verify import verify

if TYPE_CHECKING:
    from selm_data.evaluate.answers import EvalPolicy, EvalReport

app = typer.Typer(
    help="Build, inspect and check the preference data of online iterative alignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
sources_app = typer.Typer(help="Inspect preference datasets before building from them.")
app.add_typer(sources_app, name="sources")

ManifestOpt = Annotated[
    Path | None,
    typer.Option(
        "--manifest",
        "-m",
        help="Manifest YAML. Default: $SELM_MANIFEST, else ./selm.yaml, else manifests/demo.yaml.",
    ),
]
StoreOpt = Annotated[  # str, not Path: Path("s3://b/x") is the local folder "s3:/b/x"
    str | None,
    typer.Option("--store", "-s", help="Store folder or URI (s3://bucket/path, gs://, az://). "
                 "Default: the manifest's `store`."),
]

class _Rate(ProgressColumn):
    """Items a second, for the bars of build and eval (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> str:
        return "" if task.speed is None else f"{task.speed:.2f}/s"


def _progress() -> Progress:
    """A bar with count, rate, elapsed time and ETA. rich draws it live on a terminal only;
    in a log it leaves the final state once."""
    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), _Rate(), TimeElapsedColumn(), "eta",
                    TimeRemainingColumn(), console=console)


def _resolve(store: str | None, manifest: Path | None) -> tuple[str, Manifest | None]:
    """The store to use, and the manifest when one was given or found."""
    if store is not None and manifest is None:
        return store, None
    loaded = load_manifest(find_manifest(manifest))
    return (store or loaded.store), loaded


def _run_info(manifest: Manifest | None) -> RunInfo:
    return RunInfo.new(command_line()) if manifest is None else manifest.run_info(command_line())


def _open(store: str | None, manifest: Path | None, *, create: bool = False) -> Store:
    path, loaded = _resolve(store, manifest)
    return open_store(path, create=create, run=_run_info(loaded))


@app.command()
def init(manifest: ManifestOpt = None, store: StoreOpt = None) -> None:
    """Create the store (or add tables a newer selm defines) and record this run's manifest."""
    s = _open(store, manifest, create=True)
    s.record_run()
    console.print(f"store ready at [bold]{s.uri}[/] (run {s.run.run_id})")


@app.command()
def status(manifest: ManifestOpt = None, store: StoreOpt = None) -> None:
    """What the store holds: tables and versions, work per iteration, snapshots, leases."""
    s = _open(store, manifest)
    tables = Table(title=f"store {s.uri}")
    for col in ("table", "version", "rows"):
        tables.add_column(col, justify="left" if col == "table" else "right")
    for name in TABLES:
        rows = s.scan(name).select(pl.len()).collect().item()
        tables.add_row(name, str(s.version(name)), str(rows))
    console.print(tables)
    console.print(_iterations_table(s))
    snapshots = (s.scan("snapshots").sort("created_at")
                 .select("name", "iteration", "row_count", "created_at").collect())
    if snapshots.height:
        listed = Table(title=f"snapshots (train on one: selm-train train --snapshot {s.uri}@NAME)")
        for col in ("name", "iteration", "pairs", "created"):
            listed.add_column(col)
        for name, it, rows, created in snapshots.iter_rows():
            listed.add_row(name, str(it), str(rows), created.strftime("%Y-%m-%d %H:%M:%S"))
        console.print(listed)
    shards = shard_progress(s)
    if shards.height:
        progress = Table(title="build shards (leases and progress)")
        for col in shards.columns:
            progress.add_column(col, justify="right" if shards[col].dtype.is_integer() else "left")
        for row in shards.iter_rows():  # None: the shard's source cannot be read here
            progress.add_row(*("?" if v is None else str(v) for v in row))
        console.print(progress)
    held = [(h, st) for h, st in s.leases() if not h.work.startswith("build/")]
    if held:
        leases = Table(title="leases")
        for col in ("work", "state", "holder"):
            leases.add_column(col)
        for holder, state in held:
            leases.add_row(holder.work, state, holder.describe())
        console.print(leases)


def _iterations_table(s: Store) -> Table:
    def per_iteration(table: str, *filters: pl.Expr, name: str) -> pl.LazyFrame:
        lf = s.scan(table)
        for f in filters:
            lf = lf.filter(f)
        return lf.group_by("iteration").agg(pl.len().alias(name))

    parts = [
        per_iteration("prompts", name="prompts"),
        per_iteration(
            "responses", pl.col("origin") == "policy", pl.col("status") == "ok", name="generated"
        ),
        per_iteration("responses", pl.col("status") == "failed", name="failed"),
        s.scan("judgments").group_by("iteration").agg(pl.col("ranking_id").n_unique()
                                                      .alias("rankings")),
        per_iteration("pairs", name="pairs"),
        per_iteration("pairs", pl.col("is_tie"), name="ties"),
    ]
    counts = parts[0]
    for part in parts[1:]:
        counts = counts.join(part, on="iteration", how="full", coalesce=True)
    df = counts.fill_null(0).sort("iteration").collect()
    table = Table(title="per iteration")
    for col in df.columns:
        table.add_column(col, justify="right")
    for row in df.iter_rows():
        table.add_row(*(str(v) for v in row))
    return table


@app.command()
def log(
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    table: Annotated[str | None, typer.Option(help="Only this table's commits.")] = None,
    limit: Annotated[int, typer.Option(help="Show this many commits, newest first.")] = 20,
) -> None:
    """The commit history of the store's tables, with each commit's run, command and manifest."""
    s = _open(store, manifest)
    names = [table] if table else list(TABLES)
    commits = sorted(
        (c for name in names for c in s.history(name, limit)),
        key=lambda c: (c.timestamp, c.version),
        reverse=True,
    )[:limit]
    out = Table(title=f"commits in {s.uri}")
    for col in ("time", "table", "version", "operation", "rows", "run", "manifest", "command"):
        out.add_column(col)
    for c in commits:
        out.add_row(
            c.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            c.table,
            str(c.version),
            c.operation,
            "" if c.rows_added is None else str(c.rows_added),
            c.run_id or "",
            c.manifest_hash or "",
            c.command or "",
        )
    console.print(out)


@app.command("verify")
def verify_cmd(manifest: ManifestOpt = None, store: StoreOpt = None) -> None:
    """Check schemas, unique ids, references and data files; exit 1 on any problem."""
    s = _open(store, manifest)
    problems = verify(s)
    if not problems:
        console.print(f"[green]ok[/]: {len(TABLES)} tables in {s.uri} are consistent")
        return
    out = Table(title=f"{len(problems)} problem(s) in {s.uri}")
    for col in ("table", "check", "detail"):
        out.add_column(col)
    for p in problems:
        out.add_row(p.table, p.check, p.detail)
    console.print(out)
    raise typer.Exit(1)


TablesOpt = Annotated[list[str] | None, typer.Option(
    "--table", help="Only this table (repeat for more). Default: every table.")]


@app.command("optimize")
def optimize_cmd(
    manifest: ManifestOpt = None, store: StoreOpt = None, table: TablesOpt = None,
    retention_hours: Annotated[int, typer.Option(
        help="Keep the log of every version of the last N hours (time travel within them "
        "keeps working); snapshots' versions are always kept.")
    ] = maintenance.DEFAULT_RETENTION_HOURS,
) -> None:
    """Compact each table's small files, write a checkpoint and drop log entries older than
    the retention window, so appends stay fast in a store used for months. Safe while
    builders write (each table under its append lock)."""
    s = _open(store, manifest)
    out = Table(title=f"optimize {s.uri} (retention {retention_hours} h)")
    for col in ("table", "files removed", "files added", "log entries removed", "version"):
        out.add_column(col)
    for r in maintenance.optimize(s, tables=table, retention_hours=retention_hours):
        out.add_row(r.table, str(r.files_removed), str(r.files_added),
                    str(r.log_entries_removed), str(r.version))
    console.print(out)


@app.command("vacuum")
def vacuum_cmd(
    manifest: ManifestOpt = None, store: StoreOpt = None, table: TablesOpt = None,
    retention_hours: Annotated[int, typer.Option(
        help="Keep every file a version of the last N hours names (time travel within "
        "them keeps working).")] = maintenance.DEFAULT_RETENTION_HOURS,
    apply: Annotated[bool, typer.Option(
        "--apply", help="Remove the files. Without it: a dry run that counts them.")] = False,
) -> None:
    """Remove data files no version within the retention window, no snapshot's versions and
    no running append needs. A dry run unless --apply."""
    s = _open(store, manifest)
    results = maintenance.vacuum(s, retention_hours=retention_hours, dry_run=not apply,
                                 tables=table)
    verb = "removed" if apply else "would remove"
    out = Table(title=f"vacuum {s.uri} (retention {retention_hours} h)")
    for col in ("table", f"files {verb}", "versions kept for snapshots"):
        out.add_column(col)
    for r in results:
        out.add_row(r.table, str(len(r.files)), ", ".join(map(str, r.kept_versions)) or "-")
    console.print(out)
    total = sum(len(r.files) for r in results)
    console.print(f"{verb} {total} file(s)" + ("" if apply else "; run with --apply to remove "
                                                "them"), highlight=False)


@app.command("export")
def export_cmd(
    iteration: Annotated[int, typer.Option("--iter", help="The iteration to export.")],
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    name: Annotated[str | None, typer.Option(
        help="Snapshot name (default: iterN-<hash>); never reused for other content.")] = None,
    drop_ties: Annotated[bool, typer.Option(help="Leave out tied pairs.")] = False,
    min_margin: Annotated[float | None, typer.Option(
        help="Keep pairs whose score margin is at least this.")] = None,
    layout: Annotated[str, typer.Option(
        help="trl (TRL's DPOTrainer reads it; the default) or ultrafeedback (the Hub's "
        "UltraFeedback-binarized columns, for alignment-handbook recipes). selm-train reads "
        "both.")] = DEFAULT_LAYOUT,
) -> None:
    """Freeze an iteration's pairs as an immutable snapshot that datasets, polars and
    selm-train read."""
    s = _open(store, manifest)
    snap = export(s, iteration, name=name, filters=Filters(drop_ties, min_margin),
                  layout=layout)  # type: ignore[arg-type]  # export checks it
    verb = "exported" if snap.created else "unchanged: already exported as"
    policy = " (each with SAIL's policy pair)" if snap.policy_pair else ""
    console.print(f"{verb} [bold]{snap.name}[/]: {snap.row_count} pairs{policy}, layout "
                  f"{snap.layout}, content hash {snap.content_hash[:12]}, {snap.path}",
                  highlight=False, soft_wrap=True)
    console.print("read it with:", highlight=False)
    for reader in readers(snap, s.uri):
        mark = "" if reader.reads else "[yellow]not this layout:[/] "
        console.print(f"  {reader.name:<20} {mark}{escape(reader.line)}", highlight=False,
                      soft_wrap=True)


@app.command("push")
def push_cmd(
    snapshot: Annotated[str, typer.Argument(help="The snapshot's name (see `selm-data export`).")],
    repo_id: Annotated[str | None, typer.Option(help="ORG/NAME of the dataset repo.")] = None,
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    public: Annotated[bool, typer.Option(help="Make a new repo public (default: private).")
                      ] = False,
    dry_run: Annotated[Path | None, typer.Option(
        help="Write the files that would be committed into this new folder; push nothing.")
    ] = None,
    license: Annotated[str | None, typer.Option(
        help="The dataset's license id (default: the source's, when selm knows it).")] = None,
) -> None:
    """Push a snapshot to the Hugging Face Hub: its shards, a dataset card and a lineage file in
    one commit. The token comes from HF_TOKEN or `hf auth login`, never from a flag."""
    from selm_data.publish import hub

    s = _open(store, manifest)
    if dry_run is not None:
        written = hub.dry_run(s, snapshot, dry_run, repo_id=repo_id, license=license)
        console.print(f"dry run: wrote {len(written)} files to {dry_run} (nothing pushed); "
                      f'check them: datasets.load_dataset("{dry_run}")', highlight=False,
                      soft_wrap=True)
        return
    if repo_id is None:
        raise SelmError("push needs --repo-id ORG/NAME (or --dry-run DIR to see the files)")
    r = hub.push(s, snapshot, repo_id, private=not public, license=license)
    visibility = "private" if r.private else "public"
    console.print(f"pushed {snapshot} to {r.repo_url} ({visibility}"
                  f"{', new repo' if r.created else ''}): {len(r.files)} files in commit "
                  f"{r.commit_oid[:12]} {r.commit_url}", highlight=False, soft_wrap=True)


@app.command("inspect")
def inspect_cmd(
    iteration: Annotated[int | None, typer.Option("--iter", help="Only this iteration.")] = None,
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw the score distributions and win rates into this PNG.")
    ] = None,
) -> None:
    """Per iteration: counts, how often y_ref beat, tied or lost to the dataset's pair, score
    and margin distributions, response lengths, quarantine and failures; then the evaluation
    answers and comparisons (`selm-data eval`, `compare`, `winrates`)."""
    from selm_data.publish.plots import plot
    from selm_data.publish.stats import (
        eval_stats,
        iteration_stats,
        quarantine_stats,
        render_eval_stats,
        render_stats,
    )

    s = _open(store, manifest)
    answers, compared = eval_stats(s, iteration=iteration)
    try:
        console.print(render_stats(iteration_stats(s, iteration=iteration),
                                   quarantine=quarantine_stats(s)))
    except SelmError:
        if answers.height == 0:  # nothing built and nothing evaluated
            raise
    if answers.height:
        console.print(render_eval_stats(answers, compared))
    if plot_file is not None:
        written = plot(s, plot_file, iterations=None if iteration is None else [iteration])
        console.print(f"wrote {written}", highlight=False)


@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="An iteration number or a snapshot name.")],
    b: Annotated[str, typer.Argument(help="An iteration number or a snapshot name.")],
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
) -> None:
    """What changed between two iterations or two snapshots: prompts and pairs on each side,
    chosen and rejected texts that changed, margins, ties and win rates."""
    from selm_data.publish.diff import diff, render_diff

    console.print(render_diff(diff(_open(store, manifest), a, b)))


@app.command("lineage")
def lineage_cmd(
    row_id: Annotated[str, typer.Argument(
        metavar="ID", help="A prompt, response, judgment, ranking, pair, snapshot, "
        "checkpoint, evaluation answer or evaluation comparison id.")],
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a tree.")] = False,
) -> None:
    """Where a row came from (source row, policy and sampling, ranker, rule) and what was made
    from it (pairs, snapshots, checkpoints, the next iteration's responses, evaluations)."""
    from selm_data.publish.lineage import lineage, render

    node = lineage(_open(store, manifest), row_id)
    if as_json:
        print(json.dumps(node, indent=2, default=str))
    else:
        console.print(render(node))


@app.command("view")
def view_cmd(
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    host: Annotated[str, typer.Option(
        help="Address to bind. Anything but loopback serves the store to the network (warned).")
    ] = "127.0.0.1",
) -> None:
    """Browse the store in a local web page, read-only: iterations and their statistics, pairs
    with filters and search, each pair with its lineage, and diffs between iterations."""
    try:
        from selm_data.view.app import serve
    except ImportError as e:
        raise SelmError(f"the viewer needs its extra: pip install 'selm[view]' ({e})") from e
    serve(_open(store, manifest), host=host, port=port,
          say=lambda line: console.print(line, highlight=False, soft_wrap=True))


@app.command("build")
def build_cmd(
    iteration: Annotated[int, typer.Option("--iter", help="The iteration to build (1..T).")],
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
    shard: Annotated[str | None, typer.Option(
        help="i/k: build shard i of k (one process each). Under torchrun, deepspeed, srun or "
        "mpirun each rank builds its own shard (rank/world) without it.")] = None,
    policy: Annotated[
        str | None, typer.Option(help="Generate with this model instead (recorded).")
    ] = None,
) -> None:
    """Generate, rank and pair portion N of the dataset; rerun to resume after a crash."""
    loaded = load_manifest(find_manifest(manifest))  # build needs the recipe, even with --store
    launch = detect()
    mine = shard_for(shard, launch)
    bind_gpus(launch, loaded.generation.gpus_per_rank())
    path = store or loaded.store
    s = open_store(path, create=True, run=_run_info(loaded))

    def run(progress: Callable[[str, int, int], None]) -> BuildReport:
        return build(loaded, iteration, s, shard=mine, policy=policy, progress=progress,
                     generation_progress=progress)

    if not launch.launched or launch.world == 1:
        with _bar(f"iteration {iteration}") as progress:
            report = run(progress)
        _print_report(s, report)
        return
    say = _say(launch)
    if launch.rank == 0:  # only rank 0 draws a bar; the others write lines
        with _bar(f"{escape(launch.prefix())} iteration {iteration}") as progress:
            report = build_rank(s, iteration, mine, launch, lambda: run(progress))
    else:
        report = build_rank(s, iteration, mine, launch, lambda: run(_lines(say, iteration)))
    say(f"shard {report.shard} done: {report.prompts} prompts, {report.generated} generated, "
        f"{len(report.failed)} failed, {report.ranked} ranked, {report.pairs} pairs")
    if launch.rank != 0:
        return
    merged, failed = merge(wait_for_ranks(s, iteration, launch, say=say), iteration)
    _print_report(s, merged)
    if failed:
        raise SelmError("; ".join(f"shard {r.shard} (rank {r.rank}, host {r.host}): {r.error}"
                                  for r in failed)
                        + ". The other shards are built; rerun the same command to finish")


def _say(launch: Launch) -> Callable[[str], None]:
    return lambda text: console.print(f"{launch.prefix()} {text}", highlight=False,
                                      soft_wrap=True, markup=False)


def _lines(say: Callable[[str], None], iteration: int) -> Callable[[str, int, int], None]:
    """Progress as log lines, one per commit (a rank without the bar)."""
    def progress(stage: str, done: int, total: int) -> None:
        phase = {"responses": "generating", "prompts": "ranking"}.get(stage, stage)
        say(f"iteration {iteration}: {phase} {done}/{total}")
    return progress


def _eval_summary(report: EvalReport) -> dict:
    """What a rank's eval record keeps: its counts and failures."""
    return {"questions": report.questions, "already": report.already,
            "generated": report.generated, "failed": report.failed,
            "complete": report.complete}


def _merged_eval(mine: EvalReport, records: list[ShardRecord], questions: int) -> EvalReport:
    """Every rank's counts in one report (the shards' questions are disjoint)."""
    parts = [r.report for r in records if r.report is not None]
    return replace(
        mine, questions=questions, already=sum(p["already"] for p in parts),
        generated=sum(p["generated"] for p in parts),
        failed=[tuple(f) for p in parts for f in p["failed"]],
        complete=sum(p["complete"] for p in parts))


@contextmanager
def _bar(title: str) -> Iterator[Callable[[str, int, int], None]]:
    with _progress() as bar:
        task = bar.add_task(title, total=None)

        def progress(stage: str, done: int, total: int) -> None:
            phase = {"responses": "generating", "prompts": "ranking"}.get(stage, stage)
            bar.update(task, completed=done, total=total,
                       description=f"{title}: {phase} ({stage})")

        yield progress


def _print_report(s: Store, report: BuildReport) -> None:
    table = Table(title=f"iteration {report.iteration}, shard {report.shard}: {report.policy}")
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in (
        ("source rows", report.source_rows), ("quarantined", report.quarantined),
        ("duplicate prompts", report.duplicates), ("prompts", report.prompts),
        ("responses generated", report.generated), ("generations failed", len(report.failed)),
        ("rankings", report.ranked), ("unranked (rerun to retry)", len(report.unranked)),
        ("pairs", report.pairs), ("ties", report.ties),
        ("ties dropped", report.dropped_ties), ("y_ref chosen", report.ref_won),
        *((("SAIL policy pairs", report.policy_pairs), ("policy pair ties", report.policy_ties))
          if report.policy_pairs else ()),
    ):
        table.add_row(label, str(value))
    console.print(table)
    for pid, reason in report.failed[:5]:
        console.print(f"  failed: prompt {pid}: {reason}", highlight=False)
    for pid, reason in report.unranked[:5]:
        console.print(f"  unranked: prompt {pid}: {reason}", highlight=False)
    _print_examples(s, report.iteration)
    pairs = s.table_uri("pairs")
    console.print(
        f'look at them: pl.scan_delta("{pairs}").filter(pl.col("iteration") == '
        f"{report.iteration}).collect()", highlight=False, soft_wrap=True,
    )


def _print_examples(s: Store, iteration: int, k: int = 2) -> None:
    """Margins of the iteration's pairs and `k` example pairs, text shortened (SAIL's policy
    pairs are counted in the report, not here)."""
    pairs = s.scan("pairs").filter((pl.col("iteration") == iteration)
                                   & (pl.col("rule") != POLICY_RULE))
    stats = pairs.select(
        pl.len().alias("n"), pl.col("margin").mean().alias("mean"),
        pl.col("margin").min().alias("min"), pl.col("margin").max().alias("max"),
    ).collect().row(0, named=True)
    if not stats["n"]:
        return
    if stats["mean"] is None:  # a dataset's own pairs without score columns (HH-RLHF, ...)
        console.print("margins: none (the pairs have no scores)", highlight=False)
    else:
        console.print(f"margins: mean {stats['mean']:.3f}, min {stats['min']:.3f}, "
                      f"max {stats['max']:.3f}", highlight=False)
    texts = s.scan("responses").select("response_id", "text")
    prompts = s.scan("prompts").select("prompt_id", "messages")
    examples = (
        pairs.sort("pair_id").head(k).join(prompts, on="prompt_id")
        .join(texts.rename({"response_id": "chosen_id", "text": "chosen"}), on="chosen_id")
        .join(texts.rename({"response_id": "rejected_id", "text": "rejected"}), on="rejected_id")
        .collect()
    )
    for row in examples.iter_rows(named=True):
        prompt = row["messages"][-1]["content"]
        console.print(f"\n[bold]prompt[/]: {_short(prompt)}")
        console.print(f"[green]chosen[/] ({row['chosen_origin']}, {_score(row['chosen_score'])}):"
                      f" {_short(row['chosen'])}", highlight=False)
        console.print(f"[red]rejected[/] ({row['rejected_origin']}, "
                      f"{_score(row['rejected_score'])}): {_short(row['rejected'])}",
                      highlight=False)


def _score(value: float | None) -> str:
    return "no score" if value is None else f"{value:.3f}"


def _short(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit] + "..."


PromptsOpt = Annotated[str, typer.Option(
    "--prompts", help="alpaca_eval (AlpacaEval's 805 instructions), mt_bench (MT-Bench's 80 "
    "two-turn questions), or a .jsonl/.json file in either layout.")]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first K questions of the set.")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    help="New tokens per answer (default: the manifest's generation.max_tokens); compare and "
    "winrates read the answers made with it.")]
ResamplesOpt = Annotated[int, typer.Option(help="Bootstrap resamples of the questions.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the bootstrap.")]


def _loaded(manifest: Path | None, store: str | None, *,
            create: bool = False) -> tuple[Manifest, Store]:
    """Evaluation needs the recipe (policy, generation, ranker) even with --store."""
    loaded = load_manifest(find_manifest(manifest))
    path = store or loaded.store
    return loaded, open_store(path, create=create, run=_run_info(loaded))


@app.command("eval")
def eval_cmd(
    iteration: Annotated[int | None, typer.Option(
        "--iter", help="Evaluate the policy iteration N trained (its registered checkpoint); "
        "0: the manifest's base policy.")] = None,
    policy: Annotated[str | None, typer.Option(
        help="Evaluate this model instead: a folder, Hub id or bundled:NAME.")] = None,
    prompts: PromptsOpt = "alpaca_eval",
    out: Annotated[Path | None, typer.Option(
        help="Folder of the answer files (default: <store>/evals).")] = None,
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    backend: Annotated[str | None, typer.Option(
        help="vllm, transformers or openai (default: the manifest's generation.backend).")
    ] = None,
    name: Annotated[str | None, typer.Option(
        help="The model's name in the files: AlpacaEval's `generator`, FastChat's `model_id` "
        "and file name (default: <manifest name>-base, -iterN, or the folder's name).")] = None,
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
) -> None:
    """Generate a policy's answers to AlpacaEval, MT-Bench or a prompt file (greedy), store
    them with their lineage, and write them as AlpacaEval's model_outputs.json or FastChat's
    answer jsonl for the official judges. Rerun to resume: stored answers are kept. Under a
    launcher (torchrun, srun, mpirun) each rank answers every k-th question on its GPU and
    rank 0 writes the files once every rank is done."""
    from selm_data.evaluate.answers import (
        check_name,
        default_name,
        eval_policy,
        eval_work,
        evaluate,
        load_prompt_set,
        write_answer_files,
    )

    launch = detect()
    loaded, s = _loaded(manifest, store, create=True)  # adds the eval tables to older stores
    bind_gpus(launch, loaded.generation.gpus_per_rank())
    prompt_set = load_prompt_set(prompts)
    target = eval_policy(s, loaded, iteration=iteration, policy=policy)
    name = name or default_name(loaded, target)
    check_name(name)
    mine = shard_for(None, launch)

    def run(progress: Callable[[str, int, int], None]) -> EvalReport:
        return evaluate(s, loaded, target, prompt_set, limit=limit, max_tokens=max_tokens,
                        backend=backend, progress=progress, shard=mine)

    title = f"{target.label} on {prompt_set.name}"
    if not launch.launched or launch.world == 1:
        with _bar(title) as progress:
            report = run(progress)
    else:
        say, job = _say(launch), eval_work(prompt_set, target)
        if launch.rank == 0:  # only rank 0 draws a bar; the others write lines
            with _bar(f"{escape(launch.prefix())} {title}") as progress:
                report = run_rank(s, job, mine, launch, lambda: run(progress), _eval_summary)
        else:
            report = run_rank(s, job, mine, launch, lambda: run(
                lambda stage, done, total: say(f"{title}: {stage} {done}/{total}")),
                _eval_summary)
        say(f"shard {mine} done: {report.questions} questions, {report.generated} answers "
            f"generated, {len(report.failed)} failed")
        if launch.rank != 0:
            return
        records = wait_for_job(s, job, launch, say=say)
        report = _merged_eval(report, records, len(prompt_set.questions[:limit]))
        if any(r.error is not None for r in records):
            raise SelmError("; ".join(f"shard {r.shard} (rank {r.rank}, host {r.host}): "
                                      f"{r.error}" for r in records if r.error is not None)
                            + ". The other shards' answers are stored; rerun the same command "
                            "to answer the rest and write the files")
    files = []
    if report.complete:
        # the judges read local files: beside a local store, else ./evals here
        default = s.root / "evals" if s.location.is_local else Path("evals")
        files = write_answer_files(s, prompt_set, target, report.sampling,
                                   out or default, name=name, limit=limit)
    table = Table(title=f"{target.label} on {prompt_set.name}")
    table.add_column("")
    table.add_column("", justify="left")
    for label, value in (
        ("policy", f"{target.model.reference} (fingerprint {target.model.fingerprint[:12]}"
                   + (f", checkpoint {target.checkpoint_id[:12]})" if target.checkpoint_id
                      else ")")),
        ("prompt set", f"{prompt_set.name} ({prompt_set.hash[:12]}), {report.questions} of "
                       f"{len(prompt_set.questions)} questions"),
        ("sampling", f"greedy, {report.sampling.max_tokens} new tokens"),
        ("answers stored before", str(report.already)),
        ("answers generated", str(report.generated)),
        ("generations failed", str(len(report.failed))),
        ("questions with every turn answered", f"{report.complete} of {report.questions}"),
    ):
        table.add_row(label, value)
    console.print(table)
    for question, turn, reason in report.failed[:5]:
        console.print(f"  failed: question {question}, turn {turn}: {reason}", highlight=False)
    if report.failed:
        console.print("  rerun the same command to retry the failed answers", highlight=False)
    if not files:
        console.print("[red]no question has every turn answered: no answer file written[/]")
    for path in files:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if files and prompt_set.layout == "alpaca_eval":
        console.print(f"judge it: alpaca_eval --model_outputs {files[0]}  (needs OPENAI_API_KEY)",
                      highlight=False, soft_wrap=True)
    elif files:
        console.print(f"judge it with FastChat (OPENAI_API_KEY): its gen_judgment.py reads "
                      f"data/mt_bench/model_answer/{files[0].name} relative to where it runs: "
                      "in a source checkout, copy the file into fastchat/llm_judge/data/"
                      "mt_bench/model_answer/ and run python gen_judgment.py --model-list "
                      f"{files[0].stem} there; with pip install 'fschat[llm_judge]', eval with "
                      "--out data and run python -m fastchat.llm_judge.gen_judgment "
                      f"--model-list {files[0].stem} beside data/ (it also needs FastChat's "
                      "data/judge_prompts.jsonl and data/mt_bench/question.jsonl and "
                      "reference_answer/gpt-4.jsonl: see docs/evaluation.md)",
                      highlight=False, soft_wrap=True)


def _policies(s: Store, loaded: Manifest, iters: str | None,
              policy: list[str] | None) -> list[EvalPolicy]:
    """--iters (default: base and every trained iteration), then each --policy."""
    from selm_data.evaluate.answers import eval_policy, policy_from_text

    if iters is None:
        trained = (s.scan("checkpoints").select("iteration").drop_nulls().unique()
                   .collect()["iteration"].sort().to_list())
        numbers = [0, *trained]
    else:
        try:
            numbers = [int(x) for x in iters.split(",") if x.strip()]
        except ValueError:
            raise SelmError(f"--iters takes iterations separated by commas (0: the base "
                            f"policy), e.g. 0,1,2; not {iters!r}") from None
    return ([eval_policy(s, loaded, iteration=n) for n in numbers]
            + [policy_from_text(s, loaded, p) for p in policy or []])


@app.command("compare")
def compare_cmd(
    a: Annotated[str, typer.Argument(help="base, an iteration number, or a model reference.")],
    b: Annotated[str, typer.Argument(help="base, an iteration number, or a model reference.")],
    prompts: PromptsOpt = "alpaca_eval",
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    resamples: ResamplesOpt = 2000,
    seed: SeedOpt = 0,
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
) -> None:
    """Compare two policies' stored answers with the manifest's ranker, in both orders: win
    rate of A over B and its length-controlled variant, with bootstrap intervals."""
    from selm_data.evaluate.answers import eval_sampling, load_prompt_set, policy_from_text
    from selm_data.evaluate.winrates import compare_policies, render_pair, win_rate
    from selm_data.rankers.factory import make_ranker

    loaded, s = _loaded(manifest, store)
    prompt_set = load_prompt_set(prompts)
    first, second = policy_from_text(s, loaded, a), policy_from_text(s, loaded, b)
    ranker = make_ranker(loaded.ranker)
    c = compare_policies(s, ranker, prompt_set, first, second,
                         eval_sampling(loaded, max_tokens), limit=limit)
    console.print(render_pair(first.label, second.label,
                              win_rate(c.outcomes, resamples=resamples, seed=seed)))
    console.print(f"ranker {ranker.name} ({ranker.version}); {c.scored} comparisons scored now, "
                  f"{c.outcomes.win.size - c.scored} read from the store", highlight=False,
                  soft_wrap=True)
    if c.unscored or c.only_one:
        console.print(f"{len(c.unscored)} questions unscored (rerun to retry), {c.only_one} "
                      "answered by one policy only", highlight=False)


@app.command("winrates")
def winrates_cmd(
    iters: Annotated[str | None, typer.Option(
        help="Iterations, comma-separated (0: the base policy). Default: the base policy and "
        "every iteration with a registered checkpoint.")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        help="Also this model (a folder, Hub id or bundled:NAME); repeatable.")] = None,
    prompts: PromptsOpt = "alpaca_eval",
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = None,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw the matrix as a heat-map into this PNG.")] = None,
    resamples: ResamplesOpt = 2000,
    seed: SeedOpt = 0,
    manifest: ManifestOpt = None,
    store: StoreOpt = None,
) -> None:
    """The pairwise win-rate matrix across iterations (as the SELM paper's Figure 2): every
    pair compared by the manifest's ranker in both orders, length-controlled and raw, with
    bootstrap intervals. Evaluate each policy first with `selm-data eval`."""
    from selm_data.evaluate.answers import eval_sampling, load_prompt_set
    from selm_data.evaluate.winrates import plot_matrix, render_matrix, win_matrix
    from selm_data.rankers.factory import make_ranker

    loaded, s = _loaded(manifest, store)
    prompt_set = load_prompt_set(prompts)
    policies = _policies(s, loaded, iters, policy)
    if len(policies) < 2:
        raise SelmError("the matrix needs two policies or more: train an iteration, or name "
                        "them with --iters 0,1 and/or --policy PATH")
    matrix = win_matrix(s, make_ranker(loaded.ranker), prompt_set, policies,
                        eval_sampling(loaded, max_tokens), limit=limit, resamples=resamples,
                        seed=seed)
    console.print(render_matrix(matrix))
    if plot_file is not None:
        console.print(f"wrote {plot_matrix(matrix, plot_file)}", highlight=False)


@sources_app.command("check")
def sources_check(
    source: Annotated[str, typer.Argument(help="A local file, folder or glob of jsonl/json/"
                                          "parquet files (jsonl/json also .gz, .bz2, .xz, "
                                          ".zst), or a Hub id.")],
    split: Annotated[str, typer.Option(help="Split to read.")] = "train",
    revision: Annotated[str | None, typer.Option(help="Hub revision (commit or tag).")] = None,
    config: Annotated[str | None, typer.Option(help="Hub config name (as source.config).")
                      ] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="A folder of the Hub repo, e.g. harmless-base (as source.data_dir).")] = None,
    data_files: Annotated[list[str] | None, typer.Option(
        help="Files of the Hub repo, a pattern (as source.data_files); repeatable.")] = None,
    layout: Annotated[
        str, typer.Option(help=f"auto, or one of {', '.join(LAYOUTS)}.")
    ] = "auto",
    limit: Annotated[int | None, typer.Option(help="Read only the first N rows.")] = None,
) -> None:
    """Detect a dataset's layout; count usable, duplicate and quarantined rows. Builds nothing.
    SOURCE is read as source.path when it names local files and no Hub option is given, else
    as source.hub (a local folder laid out as a Hub repo works too)."""
    hub_options = {"revision": revision, "config": config, "data_dir": data_dir,
                   "data_files": data_files}
    local = Path(source).exists() or any(ch in source for ch in "*?[")
    if local and not any(v is not None for v in hub_options.values()):
        where: dict[str, object] = {"path": source}
    else:
        where = {"hub": source, **hub_options}
    try:
        # model_validate: `layout` is the user's text, checked against the Literal here
        spec = SourceSpec.model_validate(
            {**where, "split": split, "layout": layout, "limit": limit})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise SelmError(f"invalid source options: {e}") from e
    loaded = load_source(spec)
    table = Table(title=f"{loaded.source} ({loaded.split})")
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("layout", loaded.layout)
    table.add_row("rows read", str(loaded.rows_read))
    table.add_row("usable examples", str(len(loaded.examples)))
    table.add_row("duplicate prompts", str(loaded.duplicates))
    for reason, count in sorted(loaded.reason_counts().items()):
        table.add_row(f"quarantined: {reason}", str(count))
    console.print(table)
    for q in loaded.quarantined[:5]:
        console.print(f"  row {q.source_row}: {q.reason}: {q.detail}", highlight=False)


def main() -> None:
    quiet_libraries()  # before anything imports huggingface_hub
    sys.argv[1:] = without_local_rank(sys.argv[1:])
    try:
        app()
    except SelmError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # torchrun -m selm_data.cli, python -m selm_data.cli
    main()
