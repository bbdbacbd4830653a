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


def table(results: dict) -> str:
    """Markdown: the reward table (Table 1's analogue), the paired differences against
    iterative DPO, the data each iteration made (y_ref wins), and the runs' health."""
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
    lines += ["", "Training: loss of the first and last step of each iteration (mean over "
              "seeds), distinct greedy answers (of the held-out prompts) and their mean length "
              "at the last iteration:", "",
              "| method | " + " | ".join(f"iter {t} loss" for t in range(1, T + 1))
              + " | distinct answers | length |", "|---|" + "---|" * (T + 2)]
    for m in methods:
        runs = [results["runs"][m][s]["iterations"] for s in seeds]
        cells = []
        for t in range(T):
            loss_first = statistics.fmean(r[t]["history"][0]["loss"] for r in runs)
            loss_last = statistics.fmean(r[t]["history"][-1]["loss"] for r in runs)
            cells.append(f"{loss_first:.3f} → {loss_last:.3f}")
        distinct = statistics.fmean(r[-1]["greedy_distinct_answers"] for r in runs)
        length = statistics.fmean(statistics.fmean(r[-1]["greedy_lengths"]) for r in runs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {distinct:.0f} | {length:.1f} |")
    return "\n".join(lines) + "\n"


# --- figures ------------------------------------------------------------------------------------


def figures(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return [_rewards_by_iteration(results, out / "reward_by_iteration.png"),
            _reward_distributions(results, out / "reward_distributions.png"),
            _implicit_rewards(results, out / "implicit_rewards.png"),
            _yref_wins(results, out / "yref_wins.png")]


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
    ax.set_title("True reward by iteration (95% CI over seeds; dotted: best possible)")
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
    fig.suptitle("Distribution of true rewards (held-out prompts, seeds pooled)")
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


def implicit_difference(results: dict, method: str, t: int, key: str) -> list[list[float]]:
    """Per seed, per training step of iteration t: `key` (rewards/chosen or rewards/rejected,
    beta * (log pi_theta - log pi_ref) averaged over the step's batch, before its update) of
    `method` minus iterative DPO's, at the same step."""
    out = []
    for s in results["seeds"]:
        mine = results["runs"][method][s]["iterations"][t - 1]["history"]
        dpo = results["runs"]["dpo"][s]["iterations"][t - 1]["history"]
        out.append([a[key] - b[key] for a, b in zip(mine, dpo, strict=True)])
    return out


def _implicit_rewards(results: dict, path: Path) -> Path:
    """Figure 4's analogue: implicit reward of chosen and rejected, SELM minus DPO, over the
    training steps of each iteration (mean over seeds, 95% band)."""
    import matplotlib.pyplot as plt

    T = results["settings"]["iterations"]
    shown = [m for m in results["methods"] if m.startswith("selm")]
    fig, axes = plt.subplots(2, T, figsize=(3.6 * T, 5.6), sharex=True, squeeze=False)
    for row, key in enumerate(("rewards/chosen", "rewards/rejected")):
        for t in range(1, T + 1):
            ax = axes[row][t - 1]
            if "dpo" in results["methods"]:
                for m in shown:
                    diffs = implicit_difference(results, m, t, key)
                    steps = range(1, len(diffs[0]) + 1)
                    stats = [ci([d[k] for d in diffs]) for k in range(len(diffs[0]))]
                    mean = [s[0] for s in stats]
                    half = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
                    ax.plot(steps, mean, label=m, color=color(results, m))
                    ax.fill_between(steps, [a - b for a, b in zip(mean, half, strict=True)],
                                    [a + b for a, b in zip(mean, half, strict=True)], alpha=0.2,
                                    color=color(results, m))
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_title(f"iteration {t}: {key.split('/')[1]}")
            if row == 1:
                ax.set_xlabel("training step")
        axes[row][0].set_ylabel("SELM − DPO implicit reward")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("β(log πθ − log πref) of the training pairs, SELM minus iterative DPO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _yref_wins(results: dict, path: Path) -> Path:
    """How often the policy's own answer was ranked first, per iteration (95% CI)."""
    import matplotlib.pyplot as plt

    T, seeds = results["settings"]["iterations"], results["seeds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in results["methods"]:
        if results["runs"][m][seeds[0]]["iterations"][0]["data"]["policy_reward_mean"] is None:
            continue  # offline: no policy answers
        data = [[results["runs"][m][s]["iterations"][t]["data"]["policy_ranked_first"]
                 for s in seeds] for t in range(T)]
        stats = [ci(d) for d in data]
        ax.errorbar(range(1, T + 1), [s[0] for s in stats],
                    yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], marker="o",
                    capsize=3, label=m, color=color(results, m))
    ax.set_xticks(range(1, T + 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("policy answer ranked first")
    ax.set_title("y_ref (SAIL: y_0 or y_1) ranked first by r*")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
