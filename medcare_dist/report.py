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
        ax.plot(steps, losses, lw=1.2)
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


def write_report(cfg, out: Path, stage1_dir: Path, wall_s: float, demo_assets=None) -> dict:
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
    if demo_assets is not None and report["final_model_dir"]:
        from .demo_eval import evaluate_demo

        report["eval"] = evaluate_demo(Path(report["final_model_dir"]), demo_assets)
    plots = []
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


def _markdown(report: dict, plots) -> str:
    lines = ["# medcare-dist run report", "",
             "| stage | steps | skipped (NaN/inf) | first loss | last loss | first 10% mean | last 10% mean | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['steps']} | {s.get('skipped_steps', 0)} | {_fmt(s['train_loss_first'])} | {_fmt(s['train_loss_last'])} | "
                     f"{_fmt(s['train_loss_first_10pct_mean'])} | {_fmt(s['train_loss_last_10pct_mean'])} | "
                     f"{_fmt(s['tokens_per_s'], '.0f')} |")
    o = report["orthogonality"]
    lines += ["", f"Orthogonality: mode `{o['mode']}`, freeze_knowledge `{o['freeze_knowledge']}`, "
              f"max residual |A_a Q|/|A_a| = {_fmt(o['residual_max'], '.2e')}.", "",
              f"Throughput: {_fmt(report['throughput']['tokens_per_s'], '.0f')} tokens/s over "
              f"{report['throughput']['tokens']} tokens; wall time {report['wall_seconds']:.0f} s.", "",
              f"Final model: `{report['final_model_dir']}`", ""]
    if "eval" in report:
        lines += ["## Held-out evaluation (embedded demo, greedy generation)", "",
                  "| task | metric | score | answers in the expected format | n |", "|---|---|---|---|---|"]
        for task, res in report["eval"].items():
            lines.append(f"| {task} | {res['metric']} | {_fmt(res['score'], '.3f')} | "
                         f"{_fmt(res['parsed_rate'], '.3f')} | {res['n']} |")
        lines.append("")
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    return "\n".join(lines)
