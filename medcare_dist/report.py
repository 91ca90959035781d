"""report.json and report.md (with loss and expert-utilisation plots) for a finished run."""

import json
from pathlib import Path


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _plot_losses(stages: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.6), squeeze=False)
    for ax, (name, rec) in zip(axes[0], stages.items()):
        steps, losses = zip(*rec["result"]["losses"]) if rec["result"]["losses"] else ((), ())
        ax.plot(steps, losses, lw=1.2, label="training")
        val = rec["result"].get("val_losses") or []
        if val:
            ax.plot(*zip(*val), "o-", lw=1.2, ms=3, label="validation")
            best = rec["result"].get("best_step")
            if best is not None:
                ax.axvline(best, color="grey", ls=":", lw=1, label=f"best (step {best})")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("token cross-entropy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_experts(counts: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted(counts)
    mat = np.array([counts[n] for n in names], dtype=float)
    mat = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.5 * mat.shape[1]), 1.5 + 0.22 * len(names)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n.replace("model.layers.", "L").replace(".mlp.", " ") for n in names], fontsize=7)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xlabel("routed expert (Noise Aggregator)")
    ax.set_title("stage 1 expert utilisation (share of routed tokens)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The models along the pipeline, in order: (key, label). What each step gained and lost is read across them.
PIPELINE_MODELS = (("base", "base model"), ("stage1", "stage 1 (KA + NA)"), ("taia", "after TAIA (KA only)"),
                   ("final", "final (stage 2 merged)"))

# Columns of the side-by-side table: (demo task, field, heading).
DEMO_COLUMNS = (("desc_to_code", "score", "desc->code acc"), ("mcq", "score", "MCQ acc"),
                ("code_to_desc", "score", "code->desc ROUGE-L"), ("cdn", "score", "CDN code acc"),
                ("cdn", "parsed_rate", "CDN format"))

# Targets of the embedded demo (issue 12): knowledge after TAIA, kept by stage 2, alignment learned.
DEMO_TARGETS = {"taia_desc_to_code_min": 0.40, "final_keeps_min": 0.80, "cdn_accuracy_min": 0.25,
                "cdn_format_min": 0.95}


def pipeline_models(out: Path, stage1_dir: Path, base_path: Path | None, wanted=None) -> list:
    """(key, label, model_dir, adapters_dir or None) of each `wanted` model of the pipeline (default all) that
    exists on disk."""
    stage1_dir = Path(stage1_dir)
    candidates = {
        "base": (base_path, None),
        "stage1": (base_path, stage1_dir / "stage1" / "adapters"),
        "taia": (stage1_dir / "merged_base", stage1_dir / "merged_base" / "knowledge_adapters"),
        "final": (Path(out) / "final", None),
    }
    found = []
    for key, label in PIPELINE_MODELS:
        if wanted is not None and key not in wanted:
            continue
        model_dir, adapters = candidates[key]
        if model_dir is None or not (Path(model_dir) / "config.json").is_file():
            continue
        if adapters is not None and not (adapters / "adapter_config.json").is_file():
            continue
        found.append((key, label, Path(model_dir), adapters))
    return found


def evaluate_pipeline(models: list, demo_assets=None, reference: dict | None = None) -> dict:
    """{key: {label, model, adapters, demo: {task: ...}, general: {...}}}, each model loaded once (rank 0's GPU
    when there is one, in the checkpoint's dtype; else the CPU in float32)."""
    from medcare_dist.eval import harness as bench
    from medcare_dist.eval.retention import score_retention

    results = {}
    for key, label, model_dir, adapters in models:
        loaded = bench.load_model(model_dir, adapters=adapters)
        rec = {"label": label, "model": str(model_dir), "adapters": str(adapters) if adapters else None}
        if demo_assets is not None:
            from medcare_dist.demo.results import evaluate_demo

            rec["demo"] = evaluate_demo(model_dir, demo_assets, loaded=loaded)
        if reference is not None:
            rec["general"] = score_retention(loaded[0], loaded[1], reference, device=loaded[2])
        results[key] = rec
        del loaded
    return results


def demo_targets(pipeline: dict) -> dict | None:
    """Each demo target with its measured value and whether it is met (None without the TAIA and final rows)."""
    if "taia" not in pipeline or "final" not in pipeline or "demo" not in pipeline["final"]:
        return None
    taia = pipeline["taia"]["demo"]["desc_to_code"]["score"]
    final, cdn = pipeline["final"]["demo"]["desc_to_code"]["score"], pipeline["final"]["demo"]["cdn"]
    t = DEMO_TARGETS
    kept = final / taia if taia > 0 else 0.0
    return {
        "desc->code accuracy after TAIA": {"value": taia, "target": f">= {t['taia_desc_to_code_min']:.2f}",
                                           "met": taia >= t["taia_desc_to_code_min"]},
        "final keeps of it": {"value": kept, "target": f">= {t['final_keeps_min']:.2f}",
                              "met": taia > 0 and kept >= t["final_keeps_min"]},
        "CDN code accuracy (final)": {"value": cdn["score"], "target": f">= {t['cdn_accuracy_min']:.2f}",
                                      "met": cdn["score"] >= t["cdn_accuracy_min"]},
        "CDN answers in the required format": {"value": cdn["parsed_rate"], "target": f">= {t['cdn_format_min']:.2f}",
                                               "met": cdn["parsed_rate"] >= t["cdn_format_min"]},
    }


def _plot_pipeline(pipeline: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(pipeline)
    panels = []
    if all("demo" in pipeline[k] for k in keys):
        panels.append(("held-out demo splits (knowledge: desc->code, MCQ, code->desc; alignment: CDN)",
                       [h for _, _, h in DEMO_COLUMNS],
                       [[pipeline[k]["demo"].get(task, {}).get(f, 0.0) for task, f, _ in DEMO_COLUMNS] for k in keys]))
    if all("general" in pipeline[k] for k in keys):
        panels.append(("general prompts vs the base's own answers", ["answers close to the base's"],
                       [[pipeline[k]["general"]["close_fraction"]] for k in keys]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [len(p[1]) + 1 for p in panels]})
    for ax, (title, cols, vals) in zip(axes[0], panels):
        x = np.arange(len(cols))
        width = 0.8 / len(keys)
        for i, (k, row) in enumerate(zip(keys, vals)):
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, row, width, label=pipeline[k]["label"])
        ax.set_xticks(x)
        ax.set_xticklabels(cols, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(cfg, out: Path, stage1_dir: Path, wall_s: float, demo_assets=None, base_path: Path | None = None,
                 reference: dict | None = None) -> dict:
    stages = {}
    for name, root in (("stage1", stage1_dir), ("stage2", out)):
        rec = _read(Path(root) / name / "result.json")
        if rec is not None:
            stages[name] = rec
    total_tokens = sum(r["summary"]["tokens"] for r in stages.values())
    total_s = sum(r["summary"]["seconds"] for r in stages.values())
    s2 = stages.get("stage2", {}).get("summary", {})
    report = {
        "stages": {name: rec["summary"] for name, rec in stages.items()},
        "orthogonality": {
            "mode": cfg.adapters.orthogonality,
            "freeze_knowledge": cfg.adapters.freeze_knowledge,
            "residual_max": s2.get("orthogonality_residual"),
        },
        "throughput": {"tokens_per_s": total_tokens / total_s if total_s else None, "tokens": total_tokens,
                       "train_seconds": total_s},
        "final_model_dir": str(out / "final") if (out / "final" / "config.json").is_file() else None,
        "wall_seconds": wall_s,
        "config": cfg.to_dict(),
    }
    pipeline = evaluate_pipeline(pipeline_models(out, stage1_dir, base_path, cfg.evaluation.report_models),
                                 demo_assets, reference)
    if pipeline:
        report["pipeline"] = pipeline
        if "demo" in pipeline.get("final", {}):
            report["eval"] = pipeline["final"]["demo"]
        targets = demo_targets(pipeline) if demo_assets is not None else None
        if targets:
            report["demo_targets"] = targets
    plots = []
    if pipeline and _plot_pipeline(pipeline, out / "pipeline_eval.png"):
        plots.append(("Every model along the pipeline, plotted", "pipeline_eval.png"))
    if stages:
        _plot_losses(stages, out / "loss.png")
        plots.append(("Training loss", "loss.png"))
    counts = stages.get("stage1", {}).get("result", {}).get("expert_counts")
    if counts:
        _plot_experts(counts, out / "expert_utilisation.png")
        plots.append(("Expert utilisation", "expert_utilisation.png"))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, plots))
    return report


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _pipeline_markdown(report: dict) -> list:
    pipeline = report["pipeline"]
    demo = all("demo" in r for r in pipeline.values())
    general = all("general" in r for r in pipeline.values())
    heads = ["model"] + ([h for _, _, h in DEMO_COLUMNS] if demo else [])
    heads += ["general: loglik/token of the base's answers", "general: answers close to the base's"] if general else []
    lines = ["## Every model along the pipeline", "",
             "What each step gained and lost: knowledge (held-out phrasings of the facts stage 1 taught), "
             "alignment (stage 2's CDN task, held-out phrases) and general ability (prompts neither stage trains "
             "on, scored against the base model's own greedy answers).", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for rec in pipeline.values():
        row = [rec["label"]]
        if demo:
            row += [_fmt(rec["demo"].get(task, {}).get(f), ".3f") for task, f, _ in DEMO_COLUMNS]
        if general:
            row += [_fmt(rec["general"]["mean_token_loglik"], ".3f"), _fmt(rec["general"]["close_fraction"], ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "demo_targets" in report:
        lines += ["Targets of the embedded demo:", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
        for name, t in report["demo_targets"].items():
            lines.append(f"| {name} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return lines


def _data_markdown(report: dict) -> list:
    """What each stage trained on: rows read, bad, used after max_samples and weight, and tokenized."""
    rows = [(stage, name, c) for stage, s in report["stages"].items()
            for name, c in (s.get("data") or {}).get("files", {}).items()]
    if not rows:
        return []
    lines = ["## Data", "", "| stage | source | rows read | bad | weight | used | trained (after length checks) |",
             "|---|---|---|---|---|---|---|"]
    for stage, name, c in rows:
        lines.append(f"| {stage} | `{name}` | {c['read']} | {c['bad']} | {c.get('weight', 1.0):g} | {c['used']} | "
                     f"{c['rows']} |")
    return lines + [""]


def _markdown(report: dict, plots) -> str:
    lines = ["# medcare-dist run report", "",
             "| stage | steps | skipped (NaN/inf) | first loss | last loss | first 10% mean | last 10% mean | "
             "validation loss (last / best @ step) | validation token accuracy | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        val = "-" if s.get("val_loss_last") is None else (
            f"{_fmt(s['val_loss_last'])} / {_fmt(s['val_loss_best'])} @ {s['best_step']}"
            + (f", stopped early at {s['stopped_early_at']}" if s.get("stopped_early_at") else ""))
        lines.append(f"| {name} | {s['steps']} | {s.get('skipped_steps', 0)} | {_fmt(s['train_loss_first'])} | {_fmt(s['train_loss_last'])} | "
                     f"{_fmt(s['train_loss_first_10pct_mean'])} | {_fmt(s['train_loss_last_10pct_mean'])} | "
                     f"{val} | {_fmt(s.get('val_token_accuracy_last'), '.3f')} | {_fmt(s['tokens_per_s'], '.0f')} |")
    o = report["orthogonality"]
    lines += ["", f"Orthogonality: mode `{o['mode']}`, freeze_knowledge `{o['freeze_knowledge']}`, "
              f"max residual |A_a Q|/|A_a| = {_fmt(o['residual_max'], '.2e')}.", "",
              f"Throughput: {_fmt(report['throughput']['tokens_per_s'], '.0f')} tokens/s over "
              f"{report['throughput']['tokens']} tokens; wall time {report['wall_seconds']:.0f} s.", "",
              f"Final model: `{report['final_model_dir']}`", ""]
    lines += _data_markdown(report)
    if "pipeline" in report:
        lines += _pipeline_markdown(report)
    if "eval" in report:
        lines += ["## Held-out evaluation of the final model (embedded demo, greedy generation)", "",
                  "| task | metric | score | answers in the expected format | n |", "|---|---|---|---|---|"]
        for task, res in report["eval"].items():
            lines.append(f"| {task} | {res['metric']} | {_fmt(res['score'], '.3f')} | "
                         f"{_fmt(res['parsed_rate'], '.3f')} | {res['n']} |")
        lines.append("")
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    return "\n".join(lines)
