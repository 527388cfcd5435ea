"""Aggregate ablation rows (mean and spread over seeds), verdicts per claim, markdown, CSV, plots."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from experiments.ablation.config import AblationConfig
from experiments.ablation.runner import choose_lr

__all__ = ["Aggregate", "summarize", "verdicts", "write_report", "SUMMARY_COLUMNS", "PLOTS"]

Row = dict[str, Any]

SUMMARY_COLUMNS = ("section", "label", "kind", "rank", "lr", "params", "n_seeds", "fid_mean", "fid_sd",
                   "precision_mean", "precision_sd", "recall_mean", "alignment_mean", "alignment_sd",
                   "all_correct_mean", "s_per_step", "cpu_s_per_step",
                   "dir_change_pct", "norm_change_pct", "dir_norm_ratio", "svd_energy_30pct", "seeds")
PLOTS = ("ablation_adapters.png", "ablation_params_fid.png", "ablation_rank.png", "ablation_swaps.png",
         "ablation_lr_sweep.png")


def _finite(xs: Iterable[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]


def _mean(xs: Iterable[Any]) -> float:
    v = _finite(xs)
    return statistics.fmean(v) if v else math.nan


def _sd(xs: Iterable[Any]) -> float:
    v = _finite(xs)
    return statistics.stdev(v) if len(v) > 1 else math.nan  # sample sd (n - 1)


@dataclass
class Aggregate:
    """One configuration over its seeds."""

    section: str
    label: str
    rows: list[Row]

    def mean(self, key: str) -> float:
        return _mean(r.get(key) for r in self.rows)

    def sd(self, key: str) -> float:
        return _sd(r.get(key) for r in self.rows)

    def first(self, key: str) -> Any:
        return next((r[key] for r in self.rows if r.get(key) is not None), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section, "label": self.label, "kind": self.first("kind"), "rank": self.first("rank"),
            "lr": self.first("lr"), "params": self.first("params"), "n_seeds": len(self.rows),
            "fid_mean": self.mean("fid"), "fid_sd": self.sd("fid"), "precision_mean": self.mean("precision"),
            "precision_sd": self.sd("precision"), "recall_mean": self.mean("recall"),
            "alignment_mean": self.mean("alignment"),
            "alignment_sd": self.sd("alignment"), "all_correct_mean": self.mean("all_correct"),
            "s_per_step": self.mean("s_per_step"), "cpu_s_per_step": self.mean("cpu_s_per_step"),
            "dir_change_pct": self.mean("dir_change_pct"), "norm_change_pct": self.mean("norm_change_pct"),
            "dir_norm_ratio": self.mean("dir_norm_ratio"), "svd_energy_30pct": self.mean("svd_energy_30pct"),
            "seeds": " ".join(str(r["seed"]) for r in self.rows if "seed" in r),
        }


def _group(section: str, rows: list[Row], key) -> list[Aggregate]:
    groups: dict[Any, list[Row]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return [Aggregate(section, str(k), v) for k, v in groups.items()]


def summarize(rows: list[Row], cfg: AblationConfig) -> dict[str, list[Aggregate]]:
    """Sections ``baseline``, ``adapters``, ``rank``, ``swaps``, ``lr_sweep`` of aggregates."""
    steps = cfg.budget.steps
    test = [r for r in rows if r.get("evalset") == "test" and r.get("steps") == steps]
    students = [r for r in test if r["variant"] == "student"]
    adapters = [r for r in students if r["kind"] in cfg.kinds and (r["kind"] == "full" or r["rank"] == cfg.rank)]
    order = {k: i for i, k in enumerate(cfg.kinds)}
    out = {
        "baseline": _group("baseline", [r for r in rows if r["group"] == "baseline"], lambda r: r["kind"]),
        "adapters": sorted(_group("adapters", adapters, lambda r: r["kind"] if r["kind"] == "full"
                                  else f"{r['kind']} r{r['rank']}"), key=lambda a: order[a.first("kind")]),
        "rank": sorted(_group("rank", [r for r in students if r["kind"] == "lorad" and r["rank"] in cfg.ranks],
                              lambda r: f"lorad r{r['rank']}"), key=lambda a: a.first("rank")),
        "swaps": _group("swaps", [r for r in test if r["kind"] == "full"],
                        lambda r: {"student": "full fine-tune", "swap_norm": "teacher norms (swap-norm)",
                                   "swap_direction": "teacher directions (swap-direction)"}[r["variant"]]),
        "lr_sweep": sorted(_group("lr_sweep", [r for r in rows if r["group"] == "lr_sweep"],
                                  lambda r: f"{r['kind']} lr {r['lr']:.3g}"),
                           key=lambda a: (order.get(a.first("kind"), 99), a.first("lr"))),
    }
    return out


def _pm(m: float, s: float, digits: int = 2) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" if not math.isfinite(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def verdicts(summary: dict[str, list[Aggregate]]) -> list[tuple[str, str, str]]:
    """``(claim, verdict, evidence)`` from rules fixed before the numbers were seen (docs/ABLATION.md)."""
    out: list[tuple[str, str, str]] = []
    ad = {a.first("kind"): a for a in summary["adapters"]}
    base = {a.first("variant"): a for a in summary["baseline"]}
    # 1. LoRaD best at fewer parameters
    claim = "LoRaD distils best with fewer trainable parameters"
    if "lorad" in ad and len(ad) > 1 and math.isfinite(ad["lorad"].mean("fid")):
        lo = ad["lorad"]
        others = {k: a for k, a in ad.items() if k != "lorad"}
        fewer = all(lo.first("params") < a.first("params") for a in others.values())
        best_k = min(others, key=lambda k: others[k].mean("fid") if math.isfinite(others[k].mean("fid")) else math.inf)
        best = others[best_k]
        gap = best.mean("fid") - lo.mean("fid")  # > 0: LoRaD better
        # A difference counts when it exceeds both seed sds and 2 % of the FID (n = 2 seeds
        # underestimates the spread).
        spread = max(_finite([lo.sd("fid"), best.sd("fid"), 0.02 * lo.mean("fid")]))
        ev = (f"FID LoRaD {_pm(lo.mean('fid'), lo.sd('fid'))} ({lo.first('params'):,} params) vs best other "
              f"{best_k} {_pm(best.mean('fid'), best.sd('fid'))} ({best.first('params'):,} params); "
              f"fewer params than all others: {fewer}")
        if not fewer:
            verdict = "does not hold (LoRaD does not have the fewest parameters)"
        elif gap > spread:
            verdict = "holds"
        elif gap > 0:
            verdict = "not resolved: LoRaD has the lowest mean FID, but by less than the seed spread"
        elif -gap <= spread:
            verdict = "not resolved: another adapter has a lower mean FID, within the seed spread"
        else:
            verdict = f"does not hold: {best_k} is better by more than the seed spread"
        out.append((claim, verdict, ev))
    # 2. direction change >> norm change (full fine-tune)
    sw = {a.first("variant"): a for a in summary["swaps"]}
    claim = "Distillation changes weight directions much more than norms (full fine-tune vs teacher)"
    if "student" in sw and math.isfinite(sw["student"].mean("dir_change_pct")):
        s = sw["student"]
        ratio = s.mean("dir_change_pct") / s.mean("norm_change_pct") if s.mean("norm_change_pct") > 0 else math.inf
        ev = (f"direction {s.mean('dir_change_pct'):.3g}% vs norm {s.mean('norm_change_pct'):.3g}% "
              f"(ratio {ratio:.3g}x; paper ~22x); SVD energy kept by 30% rank: {s.mean('svd_energy_30pct'):.1%}")
        verdict = ("holds (ratio >= 5x)" if ratio >= 5 else
                   "partly: directions change more, but less than 5x" if ratio > 1 else "does not hold")
        out.append((claim, verdict, ev))
    # 3. teacher norms harmless, teacher directions destructive
    claim = "Teacher norms are harmless, teacher directions destructive (swap tests)"
    if {"student", "swap_norm", "swap_direction"} <= set(sw):
        f0 = sw["student"].mean("fid")
        spread = max(_finite([sw["student"].sd("fid"), 0.05 * f0]) or [0.0])
        d_norm = sw["swap_norm"].mean("fid") - f0
        d_dir = sw["swap_direction"].mean("fid") - f0
        ev = (f"FID full student {_pm(f0, sw['student'].sd('fid'))}; swap-norm {d_norm:+.2f}; "
              f"swap-direction {d_dir:+.2f} (paper: +0.7 / +241.3)")
        harmless = abs(d_norm) <= 2 * spread
        destructive = d_dir > 2 * spread and d_dir >= 5 * max(d_norm, 0.0)
        verdict = ("holds" if harmless and destructive else
                   "half holds: teacher norms harmless, teacher directions not clearly destructive" if harmless else
                   "half holds: directions destructive, but norms not harmless" if destructive else "does not hold")
        out.append((claim, verdict, ev))
    # 4. student close to or better than the teacher
    claim = "The one-step student is close to or better than the multi-step teacher"
    teach = next((a for k, a in base.items() if k and k.startswith("teacher_") and not k.startswith("teacher_1step")),
                 None)
    if "lorad" in ad and teach is not None and math.isfinite(ad["lorad"].mean("fid")):
        f_s, f_t = ad["lorad"].mean("fid"), teach.mean("fid")
        t1, t0 = base.get("teacher_1step"), base.get("teacher_1step_init")
        ev = (f"FID LoRaD student (1 step) {_pm(f_s, ad['lorad'].sd('fid'))} vs {teach.label} {f_t:.2f}"
              + (f" and teacher 1-step {t1.mean('fid'):.2f}" if t1 else "")
              + (f" (no CFG, the student's start: {t0.mean('fid'):.2f})" if t0 else "")
              + f"; precision {ad['lorad'].mean('precision'):.3f} vs {teach.mean('precision'):.3f}"
              + f"; alignment {ad['lorad'].mean('alignment'):.3f} vs {teach.mean('alignment'):.3f}")
        verdict = ("holds: better than the teacher" if f_s <= f_t else
                   "holds: close (FID within 1.25x of the teacher's)" if f_s <= 1.25 * f_t else
                   "does not hold (student FID > 1.25x the teacher's)")
        out.append((claim, verdict, ev))
    return out


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(rows)


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(summary: dict[str, list[Aggregate]], cfg: AblationConfig, rows: list[Row]) -> str:
    b = cfg.budget
    parts = ["# WaDi claims ablation on the embedded domain\n",
             f"Budget: {b.steps} VSD steps x batch {b.batch_size} per run (lr sweep: {b.sweep_steps} steps, "
             f"{b.sweep_eval_images} validation images); FID of {b.eval_images} 1-step images vs "
             f"{b.real_images} real renders (domain evaluator features); seeds {list(cfg.seeds)}; mean ± sd over "
             f"seeds. Student rank {cfg.rank} unless stated; fake score {cfg.vsd.fake.kind} r{cfg.vsd.fake.rank}.\n"]
    parts.append("## Baselines\n")
    parts.append(_table(["model", "FID", "precision", "recall", "alignment", "all attributes right"],
                        [[a.label, _fmt(a.mean("fid"), ".2f"), _fmt(a.mean("precision")), _fmt(a.mean("recall")),
                          _fmt(a.mean("alignment")), _fmt(a.mean("all_correct"))] for a in summary["baseline"]]))
    head = ["student adapter", "trainable params", "lr", "seeds", "FID", "precision", "recall", "alignment",
            "s/step", "CPU s/step", "dir. change %", "norm change %"]

    def line(a: Aggregate) -> list[str]:
        return [a.label, f"{a.first('params'):,}", _fmt(a.first("lr")), str(len(a.rows)),
                _pm(a.mean("fid"), a.sd("fid")), _pm(a.mean("precision"), a.sd("precision"), 3),
                _fmt(a.mean("recall")), _pm(a.mean("alignment"), a.sd("alignment"), 3),
                _fmt(a.mean("s_per_step"), ".2f"), _fmt(a.mean("cpu_s_per_step"), ".2f"),
                _fmt(a.mean("dir_change_pct")), _fmt(a.mean("norm_change_pct"))]

    parts.append("\n## Adapter comparison (same VSD recipe and step budget)\n")
    parts.append(_table(head, [line(a) for a in summary["adapters"]]))
    parts.append("\n## LoRaD rank sweep\n")
    parts.append(_table(head, [line(a) for a in summary["rank"]]))
    parts.append("\n## Full fine-tune: weight change and swap students\n")
    parts.append(_table(["student", "seeds", "FID", "precision", "alignment", "dir. change %", "norm change %",
                         "ratio", "SVD energy @30% rank"],
                        [[a.label, str(len(a.rows)), _pm(a.mean("fid"), a.sd("fid")),
                          _pm(a.mean("precision"), a.sd("precision"), 3),
                          _pm(a.mean("alignment"), a.sd("alignment"), 3), _fmt(a.mean("dir_change_pct")),
                          _fmt(a.mean("norm_change_pct")), _fmt(a.mean("dir_norm_ratio")),
                          _fmt(a.mean("svd_energy_30pct"), ".1%")] for a in summary["swaps"]]))
    parts.append("\n## Learning-rate sweep (validation prompts and noise, one seed)\n")

    chosen = {k: choose_lr(rows, k) for k in {a.first("kind") for a in summary["lr_sweep"]}}
    parts.append(_table(["run", "val FID", "val alignment", "diverged", "lowest val FID"],
                        [[a.label, _fmt(a.mean("fid"), ".2f"), _fmt(a.mean("alignment")),
                          _fmt(a.mean("diverged"), ".0f"), "yes" if chosen[a.first("kind")] == a.first("lr") else ""]
                         for a in summary["lr_sweep"]]))
    parts.append("\n## Claims\n")
    parts += [f"- **{c}**: {v}. {e}." for c, v, e in verdicts(summary)]
    done = sum(1 for r in rows if r.get("variant") == "student")
    parts.append(f"\n_{done} distillation runs in this table._\n")
    return "\n".join(parts)


def _figure(w: float = 6.0, h: float = 4.0):
    from matplotlib.figure import Figure  # noqa: PLC0415 -- matplotlib only for a figure (slow import)

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _teacher_line(ax, summary: dict[str, list[Aggregate]]) -> None:
    for a in summary["baseline"]:
        v = a.first("variant")
        if v and v.startswith("teacher") and math.isfinite(a.mean("fid")):
            ax.axhline(a.mean("fid"), ls="--" if v.startswith("teacher_1step") else "-", lw=0.9, color="gray")
            ax.annotate(a.label, (0.01, a.mean("fid")), xycoords=("axes fraction", "data"), fontsize=7,
                        va="bottom", color="gray")


def plot_all(summary: dict[str, list[Aggregate]], out: Path) -> list[Path]:
    """The PNGs of ``PLOTS`` (a plot with nothing to show is skipped)."""
    paths = []
    ads = summary["adapters"]
    if ads:
        fig = _figure(9, 3.8)
        ax1, ax2 = fig.subplots(1, 2)
        x = range(len(ads))
        labels = [f"{a.label}\n{a.first('params'):,}" for a in ads]
        ax1.bar(x, [a.mean("fid") for a in ads], yerr=[a.sd("fid") if math.isfinite(a.sd("fid")) else 0 for a in ads],
                color=["tab:orange" if a.first("kind") == "lorad" else "tab:blue" for a in ads], capsize=4)
        _teacher_line(ax1, summary)
        ax1.set_xticks(list(x), labels, fontsize=8)
        ax1.set_ylabel("domain FID (lower is better)")
        ax1.set_title("1-step students: FID (mean ± sd over seeds)")
        ax2.bar(x, [a.mean("alignment") for a in ads],
                yerr=[a.sd("alignment") if math.isfinite(a.sd("alignment")) else 0 for a in ads],
                color=["tab:orange" if a.first("kind") == "lorad" else "tab:blue" for a in ads], capsize=4)
        ax2.set_xticks(list(x), labels, fontsize=8)
        ax2.set_ylabel("prompt alignment")
        ax2.set_ylim(0, 1)
        ax2.set_title("attributes shown (mean ± sd)")
        fig.savefig(out / PLOTS[0])
        paths.append(out / PLOTS[0])
    pts = ads + [a for a in summary["rank"] if a.label not in {b.label for b in ads}]
    if pts:
        fig = _figure()
        ax = fig.add_subplot()
        for a in pts:
            kind = a.first("kind")
            ax.errorbar(a.first("params"), a.mean("fid"), yerr=a.sd("fid") if math.isfinite(a.sd("fid")) else None,
                        fmt="o", capsize=3, color={"lorad": "tab:orange", "lora": "tab:blue", "dora": "tab:green",
                                                   "full": "tab:red"}.get(kind, "k"))
            ax.annotate(a.label, (a.first("params"), a.mean("fid")), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        _teacher_line(ax, summary)
        ax.set_xscale("log")
        ax.set_xlabel("trainable student parameters")
        ax.set_ylabel("domain FID")
        ax.set_title("FID vs trainable parameters")
        fig.savefig(out / PLOTS[1])
        paths.append(out / PLOTS[1])
    rk = summary["rank"]
    if rk:
        fig = _figure()
        ax = fig.add_subplot()
        ax.errorbar([a.first("rank") for a in rk], [a.mean("fid") for a in rk],
                    yerr=[a.sd("fid") if math.isfinite(a.sd("fid")) else 0 for a in rk], fmt="o-", capsize=4,
                    color="tab:orange")
        _teacher_line(ax, summary)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRaD student rank")
        ax.set_ylabel("domain FID")
        ax.set_title("LoRaD rank sweep (mean ± sd over seeds)")
        fig.savefig(out / PLOTS[2])
        paths.append(out / PLOTS[2])
    sw = summary["swaps"]
    if sw:
        fig = _figure()
        ax = fig.add_subplot()
        bars = [(a.label, a.mean("fid"), a.sd("fid")) for a in summary["baseline"]
                if (a.first("variant") or "").startswith("teacher")]
        bars += [(a.label, a.mean("fid"), a.sd("fid")) for a in sw]
        ax.barh(range(len(bars)), [b[1] for b in bars], xerr=[b[2] if math.isfinite(b[2]) else 0 for b in bars],
                color="tab:purple", capsize=3)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_xlabel("domain FID")
        ax.set_title("swap tests on the full fine-tune")
        fig.savefig(out / PLOTS[3])
        paths.append(out / PLOTS[3])
    sweep = summary["lr_sweep"]
    if sweep:
        fig = _figure()
        ax = fig.add_subplot()
        kinds: dict[str, list[Aggregate]] = {}
        for a in sweep:
            kinds.setdefault(a.first("kind"), []).append(a)
        for kind, aggs in kinds.items():
            aggs = sorted(aggs, key=lambda a: a.first("lr"))
            ax.plot([a.first("lr") for a in aggs], [a.mean("fid") for a in aggs], "o-", label=kind)
        ax.set_xscale("log")
        ax.set_xlabel("student learning rate")
        ax.set_ylabel("validation FID")
        ax.set_title("learning-rate sweep (one seed)")
        ax.legend()
        fig.savefig(out / PLOTS[4])
        paths.append(out / PLOTS[4])
    return paths


def write_report(rows: list[Row], cfg: AblationConfig, out_dir: str | Path | None = None,
                 plots: bool = True) -> dict[str, Any]:
    """Write ``results.csv`` (one row per run), ``summary.csv`` (per configuration), ``ablation.md``
    and (with ``plots``) the PNGs into ``out_dir`` (default ``cfg.out_dir``); returns paths and verdicts."""
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, cfg)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for section in summary.values():
            writer.writerows(a.as_dict() for a in section)
    (out / "ablation.md").write_text(markdown(summary, cfg, rows))
    pngs = plot_all(summary, out) if plots else [out / p for p in PLOTS if (out / p).exists()]
    return {"results_csv": out / "results.csv", "summary_csv": out / "summary.csv", "markdown": out / "ablation.md",
            "plots": pngs, "verdicts": verdicts(summary)}
