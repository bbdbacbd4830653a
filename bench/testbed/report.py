"""Tables and figures from the runs' measurements: the miniature's Table 1, Figures 3 and 4,
and how often y_ref won. Confidence intervals are 95% Student-t intervals over seeds (seeds
are the independent replicates: each has its own base policy, dataset and training order).
Differences against iterative DPO are paired by seed (same base policy and dataset)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    mean, half = ci(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def greedy_mean(results: dict, method: str, seed: str, t: int) -> float:
    rewards = (results["base"][seed]["greedy_rewards"] if t == 0 else
               results["runs"][method][seed]["iterations"][t - 1]["greedy_rewards"])
    return statistics.fmean(rewards)


def view(results: dict, regime: str) -> dict:
    """The results of one regime, shaped as one run of the testbed (`runs[method][seed]`)."""
    return {**results, "regime": regime, "runs": results["regimes"][regime]["runs"]}


def table(results: dict) -> str:
    """Markdown: both regimes side by side at the last iteration, then each regime's tables."""
    T, seeds, methods = results["settings"]["iterations"], results["seeds"], results["methods"]
    regimes = list(results["regimes"])
    lines = [f"# Testbed results: {len(regimes)} regimes x {len(methods)} methods x "
             f"{len(seeds)} seeds x {T} iterations", "",
             "Regimes (where the initial preference dataset's answers come from):", ""]
    lines += [f"- `{r}`: {results['regimes'][r]['description']}" for r in regimes]
    base = fmt([statistics.fmean(results["base"][s]["greedy_rewards"]) for s in seeds])
    lines += ["", f"Mean r* of greedy answers to the held-out prompts at iteration {T} (base "
              f"policy: {base}), and the paired difference from iterative DPO; mean ± 95% "
              "t-interval over seeds:", "",
              "| method | " + " | ".join(f"{r}: iter {T} | {r}: − dpo" for r in regimes) + " |",
              "|---|" + "---|---|" * len(regimes)]
    for m in methods:
        cells = []
        for r in regimes:
            v = view(results, r)
            cells.append(fmt([greedy_mean(v, m, s, T) for s in seeds]))
            cells.append("" if m == "dpo" or "dpo" not in methods else
                         fmt([greedy_mean(v, m, s, T) - greedy_mean(v, "dpo", s, T)
                              for s in seeds]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for r in regimes:
        lines += ["", f"## Regime `{r}`", "", regime_table(view(results, r))]
    return "\n".join(lines)


def regime_table(results: dict) -> str:
    """Markdown: the reward table (Table 1's analogue), the paired differences against
    iterative DPO, the data each iteration made (y_ref wins), Figure 4's implicit rewards,
    the optimism term against the DPO term, and the runs' health."""
    T, seeds, methods = results["settings"]["iterations"], results["seeds"], results["methods"]
    best = results["eval_best_mean"]
    lines = [
        f"Mean true reward r* of greedy answers to {results['settings']['eval_prompts']} "
        f"held-out prompts (the best possible answers average {best:.2f}); mean ± 95% t-interval "
        f"over {len(seeds)} seeds. Iteration 0 is the base policy.", "",
        "| method | " + " | ".join(f"iter {t}" for t in range(T + 1))
        + f" | sampled r* (iter {T}) |",
        "|---|" + "---|" * (T + 2),
    ]
    for m in methods:
        cells = [fmt([greedy_mean(results, m, s, t) for s in seeds]) for t in range(T + 1)]
        sampled = fmt([results["runs"][m][s]["iterations"][-1]["sampled_reward_mean"]
                       for s in seeds])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sampled} |")
    if "dpo" in methods:
        lines += ["", "Difference from iterative DPO in the same seed (paired), greedy r*:", "",
                  "| method | " + " | ".join(f"iter {t}" for t in range(1, T + 1)) + " |",
                  "|---|" + "---|" * T]
        for m in methods:
            if m == "dpo":
                continue
            cells = [fmt([greedy_mean(results, m, s, t) - greedy_mean(results, "dpo", s, t)
                          for s in seeds]) for t in range(1, T + 1)]
            lines.append(f"| {m} − dpo | " + " | ".join(cells) + " |")
    lines += ["", "What each iteration's build made (read from the store): how often the "
              "policy's own answer was ranked first of the candidates (y_ref of (y_ref, y_w, "
              "y_l); for SAIL either sample of (y_0, y_1, y_w, y_l)), and the mean r* of the "
              "policy's answers on that iteration's training prompts:", "",
              "| method | " + " | ".join(f"iter {t}: first / r*" for t in range(1, T + 1))
              + " |", "|---|" + "---|" * T]
    for m in methods:
        cells = []
        for t in range(T):
            data = [results["runs"][m][s]["iterations"][t]["data"] for s in seeds]
            if data[0]["policy_reward_mean"] is None:
                cells.append("(dataset pairs)")
                continue
            first = fmt([d["policy_ranked_first"] for d in data])
            reward = fmt([d["policy_reward_mean"] for d in data])
            cells.append(f"{first} / {reward}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += shares_tables(results)
    lines += implicit_table(results)
    lines += optimism_table(results)
    lines += ["", "Training: loss of the first and last step of each iteration (mean over "
              "seeds), distinct greedy answers (of the held-out prompts) at the last "
              "iteration, and the mean length in words of the greedy answers by iteration:",
              "", "| method | " + " | ".join(f"iter {t} loss" for t in range(1, T + 1))
              + " | distinct answers | length by iteration |", "|---|" + "---|" * (T + 2)]
    base_length = statistics.fmean(statistics.fmean(results["base"][s]["greedy_lengths"])
                                   for s in seeds)
    for m in methods:
        runs = [results["runs"][m][s]["iterations"] for s in seeds]
        cells = []
        for t in range(T):
            loss_first = statistics.fmean(r[t]["history"][0]["loss"] for r in runs)
            loss_last = statistics.fmean(r[t]["history"][-1]["loss"] for r in runs)
            cells.append(f"{loss_first:.3f} → {loss_last:.3f}")
        distinct = statistics.fmean(r[-1]["greedy_distinct_answers"] for r in runs)
        lengths = [statistics.fmean(statistics.fmean(r[t]["greedy_lengths"]) for r in runs)
                   for t in range(T)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {distinct:.0f} | "
                     + " → ".join(f"{x:.1f}" for x in [base_length, *lengths]) + " |")
    return "\n".join(lines) + "\n"


def ranked_pairs(results: dict, method: str) -> bool:
    """Whether `method` pairs its policy's y_ref with the dataset's answers (dpo, selm)."""
    spec = results["method_specs"][method]
    return spec["rule"] == "best_worst" and spec["pairs"] == "ranked"


def shares_tables(results: dict) -> list[str]:
    """The paper's Figure 3 shares: how often y_ref is the chosen answer of the new pair and
    how often it beats the dataset's chosen y_w, per iteration (over seeds), and per seed for
    iterative DPO."""
    T, seeds = results["settings"]["iterations"], results["seeds"]
    shown = [m for m in results["methods"] if ranked_pairs(results, m)]
    if not shown:
        return []
    lines = ["", "y_ref in the iteration's rankings (read from the store): the share of pairs "
             "whose chosen answer is y_ref, and the share of rankings where r*(y_ref) > "
             "r*(y_w), the dataset's chosen answer:", "",
             "| method | " + " | ".join(f"iter {t}: chosen / beats y_w"
                                      for t in range(1, T + 1)) + " |", "|---|" + "---|" * T]
    for m in shown:
        data = [[results["runs"][m][s]["iterations"][t]["data"] for s in seeds]
                for t in range(T)]
        lines.append(f"| {m} | " + " | ".join(
            f"{fmt([d['chosen_is_policy'] for d in it])} / "
            f"{fmt([d['policy_beats_chosen'] for d in it])}" for it in data) + " |")
    m = shown[0]
    lines += ["", f"The same per seed for {m} (chosen / beats y_w):", "",
              "| seed | " + " | ".join(f"iter {t}" for t in range(1, T + 1)) + " |",
              "|---|" + "---|" * T]
    for s in seeds:
        its = results["runs"][m][s]["iterations"]
        lines.append(f"| {s} | " + " | ".join(
            f"{it['data']['chosen_is_policy']:.2f} / {it['data']['policy_beats_chosen']:.2f}"
            for it in its) + " |")
    return lines


def last_step(results: dict, method: str, seed: str, t: int, key: str) -> float:
    return results["runs"][method][seed]["iterations"][t - 1]["history"][-1][key]


def implicit_table(results: dict) -> list[str]:
    """Figure 4's numbers: implicit rewards beta*(log pi_theta - log pi_ref) of chosen,
    rejected and y_ref at the last step of each iteration (pi_ref: the iteration's starting
    policy), for iterative DPO and each SELM alpha."""
    T, seeds = results["settings"]["iterations"], results["seeds"]
    shown = [m for m in results["methods"] if results["method_specs"][m]["loss"] == "selm"]
    if not shown:
        return []
    lines = ["", "Implicit rewards β(log πθ − log πref) at the last training step of each "
             "iteration (chosen / rejected / y_ref; whole curves in the implicit_rewards "
             "figure):", "", "| method | " + " | ".join(f"iter {t}" for t in range(1, T + 1))
             + " |", "|---|" + "---|" * T]
    for m in shown:
        cells = []
        for t in range(1, T + 1):
            cells.append(" / ".join(
                fmt([last_step(results, m, s, t, f"rewards/{k}") for s in seeds])
                for k in ("chosen", "rejected", "ref_response")))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def optimism_terms(results: dict, method: str, seed: str, t: int) -> list[tuple[float, float]]:
    """Per training step of iteration t: (DPO term, optimism term) of SELM's loss, batch
    means: the optimism term is alpha * beta * (log pi - log pi_ref)(y_ref) = alpha *
    rewards/ref_response, the DPO term the rest of the loss."""
    alpha = results["method_specs"][method]["alpha"]
    rows = results["runs"][method][seed]["iterations"][t - 1]["history"]
    return [(row["loss"] - alpha * row["rewards/ref_response"],
             alpha * row["rewards/ref_response"]) for row in rows]


def optimism_table(results: dict) -> list[str]:
    """Where SELM's optimism term overtakes its DPO term: per alpha and iteration, both terms
    at the last step (mean over seeds) and the share of steps where |optimism| > DPO term."""
    T, seeds = results["settings"]["iterations"], results["seeds"]
    shown = [m for m in results["methods"] if results["method_specs"][m]["loss"] == "selm"
             and results["method_specs"][m]["alpha"] > 0]
    if not shown:
        return []
    lines = ["", "SELM's loss split into its DPO term −log σ(β h) and its optimism term "
             "α·β·(log π − log πref)(y_ref), batch means at the last step of each iteration "
             "(mean over seeds), and the share of all steps where the optimism term's "
             "absolute value exceeds the DPO term:", "",
             "| method | " + " | ".join(f"iter {t}: DPO / optimism" for t in range(1, T + 1))
             + " | steps where abs(optimism) > DPO |", "|---|" + "---|" * (T + 1)]
    for m in shown:
        cells, over, total = [], 0, 0
        for t in range(1, T + 1):
            terms = [optimism_terms(results, m, s, t) for s in seeds]
            cells.append(f"{statistics.fmean(x[-1][0] for x in terms):.3f} / "
                         f"{statistics.fmean(x[-1][1] for x in terms):+.3f}")
            over += sum(abs(o) > d for x in terms for d, o in x)
            total += sum(len(x) for x in terms)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {over / total:.2f} |")
    return lines


# --- figures ------------------------------------------------------------------------------------


def figures(results: dict, out: Path) -> list[Path]:
    """Each regime's four figures, named `{regime}-{figure}.png`."""
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for regime in results["regimes"]:
        v = view(results, regime)
        paths += [_rewards_by_iteration(v, out / f"{regime}-reward_by_iteration.png"),
                  _reward_distributions(v, out / f"{regime}-reward_distributions.png"),
                  _implicit_rewards(v, out / f"{regime}-implicit_rewards.png"),
                  _yref_wins(v, out / f"{regime}-yref_wins.png")]
    return paths


def _rewards_by_iteration(results: dict, path: Path) -> Path:
    """Table 1 as a plot: mean greedy r* per iteration, 95% CI bars over seeds."""
    import matplotlib.pyplot as plt

    T, seeds = results["settings"]["iterations"], results["seeds"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, m in enumerate(results["methods"]):
        stats = [ci([greedy_mean(results, m, s, t) for s in seeds]) for t in range(T + 1)]
        xs = [t + (k - len(results["methods"]) / 2) * 0.03 for t in range(T + 1)]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else s[1]
                                                     for s in stats],
                    marker="o", capsize=3, label=m, color=color(results, m),
                    linestyle="--" if m == "dpo" else "-")
    ax.axhline(results["eval_best_mean"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(T + 1))
    ax.set_xlabel("iteration (0 = base policy)")
    ax.set_ylabel("mean r* of greedy answers (held-out)")
    ax.set_title(f"{results['regime']}: true reward by iteration (95% CI; dotted: best)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _reward_distributions(results: dict, path: Path) -> Path:
    """Figure 3's analogue: the distribution of r* of greedy answers to the held-out prompts
    (all seeds pooled), per iteration, for iterative DPO and each SELM alpha, as empirical
    CDFs (a curve further right is better); the base policy's, dashed, in every panel."""
    import matplotlib.pyplot as plt

    T, seeds = results["settings"]["iterations"], results["seeds"]
    shown = [m for m in results["methods"] if m == "dpo" or m.startswith("selm")]
    base = [r for s in seeds for r in results["base"][s]["greedy_rewards"]]
    fig, axes = plt.subplots(1, T, figsize=(3.6 * T, 3.6), sharey=True, squeeze=False)
    for t, ax in enumerate(axes[0], start=1):
        _ecdf(ax, base, label="base", color="black", linestyle="--")
        for m in shown:
            _ecdf(ax, [r for s in seeds for r in
                       results["runs"][m][s]["iterations"][t - 1]["greedy_rewards"]],
                  label=m, color=color(results, m))
        ax.set_title(f"iteration {t}")
        ax.set_xlabel("r* of the greedy answer")
    axes[0][0].set_ylabel("fraction of held-out prompts with r* <= x")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['regime']}: distribution of true rewards (held-out prompts, "
                 "seeds pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ecdf(ax, values: Sequence[float], **style) -> None:
    xs = sorted(values)
    ax.step(xs, [(k + 1) / len(xs) for k in range(len(xs))], where="post", linewidth=1.3,
            **style)


def color(results: dict, method: str) -> str:
    """One colour per method in every figure."""
    return f"C{results['methods'].index(method) % 10}"


def _implicit_rewards(results: dict, path: Path) -> Path:
    """Figure 4's analogue: implicit rewards beta*(log pi_theta - log pi_ref) of chosen,
    rejected and y_ref over the training steps of each iteration (batch means before each
    update; mean over seeds, 95% band), iterative DPO and each SELM alpha."""
    import matplotlib.pyplot as plt

    T, seeds = results["settings"]["iterations"], results["seeds"]
    shown = [m for m in results["methods"] if results["method_specs"][m]["loss"] == "selm"]
    keys = ("chosen", "rejected", "ref_response")
    fig, axes = plt.subplots(len(keys), T, figsize=(3.6 * T, 8), sharex=True, squeeze=False)
    for row, key in enumerate(keys):
        for t in range(1, T + 1):
            ax = axes[row][t - 1]
            for m in shown:
                curves = [[h[f"rewards/{key}"] for h in
                           results["runs"][m][s]["iterations"][t - 1]["history"]] for s in seeds]
                steps = range(1, len(curves[0]) + 1)
                stats = [ci([c[k] for c in curves]) for k in range(len(curves[0]))]
                mean = [x[0] for x in stats]
                half = [0.0 if math.isnan(x[1]) else x[1] for x in stats]
                ax.plot(steps, mean, label=m, color=color(results, m),
                        linestyle="--" if m == "dpo" else "-")
                ax.fill_between(steps, [a - b for a, b in zip(mean, half, strict=True)],
                                [a + b for a, b in zip(mean, half, strict=True)], alpha=0.15,
                                color=color(results, m))
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_title(f"iteration {t}: {'y_ref' if key == 'ref_response' else key}")
            if row == len(keys) - 1:
                ax.set_xlabel("training step")
        axes[row][0].set_ylabel("implicit reward")
    if shown:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['regime']}: β(log πθ − log πref) of chosen, rejected and y_ref")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _yref_wins(results: dict, path: Path) -> Path:
    """How often the policy's own answer was ranked first, and how often it beat the
    dataset's chosen answer, per iteration (95% CI)."""
    import matplotlib.pyplot as plt

    T, seeds = results["settings"]["iterations"], results["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "policy_ranked_first", "ranked first"),
                           (axes[1], "policy_beats_chosen", "r* above the dataset's y_w")):
        for m in results["methods"]:
            if results["runs"][m][seeds[0]]["iterations"][0]["data"]["policy_reward_mean"] is None:
                continue  # no policy answers: the dataset's pairs only
            stats = [ci([results["runs"][m][s]["iterations"][t]["data"][key] for s in seeds])
                     for t in range(T)]
            ax.errorbar(range(1, T + 1), [x[0] for x in stats],
                        yerr=[0 if math.isnan(x[1]) else x[1] for x in stats], marker="o",
                        capsize=3, label=m, color=color(results, m))
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(0, 1)
        ax.set_xlabel("iteration")
        ax.set_title(f"policy answer {title}")
    axes[0].set_ylabel("share of rankings")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{results['regime']}: y_ref (SAIL: the better of y_0, y_1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
