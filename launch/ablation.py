"""Ablation of the method on the embedded data: stage 1 after TAIA vs stage-2 variants (plain sequential LoRA,
MedCare hard / soft, frozen Knowledge Aggregator, replay).

Reports, per variant and over seeds (mean and spread), knowledge-task results on
the stage-1 held-out split (held-out loss; accuracies; the share of the TAIA
model's description->code accuracy kept), alignment-task results on the stage-2
held-out split (loss, format rate, code accuracy) and general retention (the
final model against the base's own answers to general prompts, medcare_dist.eval.retention).
Usage: python launch/ablation.py --recipe launch/recipes/ablation.yaml
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METRICS = [("knowledge_loss", "knowledge held-out loss", "lower"), ("mcq_acc", "MCQ accuracy", "higher"),
           ("desc_to_code_acc", "description->code accuracy", "higher"),
           ("knowledge_kept", "share of the TAIA model's description->code accuracy kept", "higher"),
           ("alignment_loss", "alignment held-out loss", "lower"), ("cdn_format", "CDN format rate", "higher"),
           ("cdn_acc", "CDN code accuracy", "higher"),
           ("knowledge_response", "alignment adapter's response on knowledge inputs / on alignment inputs", "lower"),
           ("general_loglik", "general: loglik/token of the base's answers", "higher"),
           ("general_close", "general: answers close to the base's", "higher")]


def train(recipe: Path, args: list[str]):
    # The ablation evaluates every variant itself: the runs' reports evaluate no model.
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--recipe", str(recipe), *args,
           "logging.progress_bar=false", "logging.report_to=[]", "evaluation.report_models=[]"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def merged_stage1_model(stage1_dir: Path) -> Path:
    """(a): the stage-1 model after the TAIA merge with its Knowledge Aggregator folded in."""
    from medcare_dist.method.adapter_io import load_adapters
    from medcare_dist.method.injection import merge_all
    from medcare_dist.training.modeling import load_base_model

    out = stage1_dir / "stage1_merged"
    if not (out / "config.json").is_file():
        model = load_base_model(stage1_dir / "merged_base", "fp32", "sdpa")
        load_adapters(model, stage1_dir / "merged_base" / "knowledge_adapters")
        merge_all(model).save_pretrained(out)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(stage1_dir / "merged_base")).save_pretrained(out)
    return out


def knowledge_response(merged_base: Path, adapters: Path, assets) -> float:
    """medcare_dist.method.orthogonal.knowledge_input_response of the stage-2 model (adapters unmerged), on the
    held-out knowledge and alignment splits."""
    from medcare_dist.data.conversations import collate, load_stage_dataset
    from medcare_dist.eval.harness import load_model
    from medcare_dist.method.orthogonal import knowledge_input_response

    model, tok, _ = load_model(merged_base, adapters=adapters, dtype="fp32", device="cpu", merge=False)

    def batches(split):
        ds, _ = load_stage_dataset([{"path": str(assets.files[split]), "format": "auto", "max_samples": None}],
                                   tok, 128)
        for i in range(0, len(ds), 32):
            b = collate([ds[j] for j in range(i, min(i + 32, len(ds)))], tok.pad_token_id)
            yield {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    return knowledge_input_response(model, batches("stage1_eval"), batches("stage2_eval"))


def evaluate(model_dir: Path, assets, reference: dict, taia_desc_to_code: float | None,
             response: float = 0.0) -> dict:
    from medcare_dist.demo.results import evaluate_demo, heldout_loss
    from medcare_dist.eval.harness import load_model
    from medcare_dist.eval.retention import score_retention

    loaded = load_model(model_dir, dtype="fp32", device="cpu")
    acc = evaluate_demo(model_dir, assets, loaded=loaded)
    general = score_retention(loaded[0], loaded[1], reference, device=loaded[2])
    d2c = acc["desc_to_code"]["score"]
    return {"knowledge_loss": heldout_loss(model_dir, assets.files["stage1_eval"]),
            "alignment_loss": heldout_loss(model_dir, assets.files["stage2_eval"]),
            "mcq_acc": acc["mcq"]["score"], "desc_to_code_acc": d2c,
            "knowledge_kept": d2c / taia_desc_to_code if taia_desc_to_code else 0.0,
            "cdn_format": acc["cdn"]["parsed_rate"], "cdn_acc": acc["cdn"]["score"],
            "knowledge_response": response,
            "general_loglik": general["mean_token_loglik"], "general_close": general["close_fraction"]}


def summarise(results: dict) -> dict:
    out = {}
    for variant, per_seed in results.items():
        out[variant] = {}
        for key, _, _ in METRICS:
            vals = [r[key] for r in per_seed.values()]
            out[variant][key] = {"mean": statistics.fmean(vals),
                                 "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}
    return out


def write_markdown(summary: dict, spec: dict, path: Path, png: str):
    lines = ["# Ablation on the embedded ICD-10-CM data", "",
             f"Seeds {spec['seeds']}; base recipe `{spec['base_recipe']}`; overrides {spec.get('overrides') or []}. "
             "Mean ± standard deviation over seeds.", "",
             "| variant | " + " | ".join(f"{label} ({better} is better)" for _, label, better in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for variant, res in summary.items():
        cells = [f"{res[k]['mean']:.3f} ± {res[k]['std']:.3f}" for k, _, _ in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"![ablation]({png})", ""]
    path.write_text("\n".join(lines))


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, title) in zip(axes, [("knowledge_loss", "knowledge held-out loss (forgetting)"),
                                       ("alignment_loss", "alignment held-out loss")]):
        means = [summary[v][key]["mean"] for v in variants]
        stds = [summary[v][key]["std"] for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, capsize=4, color="#4c78a8")
        for i, v in enumerate(variants):
            ax.scatter([i] * len(summary[v][key]["values"]), summary[v][key]["values"], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", default=str(REPO / "launch" / "recipes" / "ablation.yaml"))
    p.add_argument("--seeds", type=int, nargs="*", help="override the recipe's seeds")
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.recipe).read_text())
    unknown = set(spec) - {"base_recipe", "output_dir", "seeds", "overrides", "variants"}
    if unknown:
        raise SystemExit(f"{args.recipe}: unknown keys {sorted(unknown)}")
    if args.seeds:
        spec["seeds"] = args.seeds
    base = REPO / spec["base_recipe"]
    out = Path(spec["output_dir"])
    common = list(spec.get("overrides") or [])
    results: dict = {v: {} for v in spec["variants"]}
    for seed in spec["seeds"]:
        s1 = (out / f"seed{seed}" / "stage1").resolve()
        train(base, [f"output_dir={s1}", "stage=1", f"seed={seed}", *common])
        from medcare_dist.demo.assets import prepare_demo
        from medcare_dist.eval.retention import read_reference

        assets = prepare_demo(s1 / "demo_assets")
        reference = read_reference(s1, s1 / "demo_assets" / "base_model")
        taia = None  # the first variant must be the stage-1 model after TAIA (extra: null)
        for variant, extra in spec["variants"].items():
            response = 0.0  # the TAIA model has no alignment adapter
            if extra is None:
                model_dir = merged_stage1_model(s1)
            else:
                run = (out / f"seed{seed}" / variant).resolve()
                train(base, [f"output_dir={run}", "stage=2", f"init_from={s1}", f"seed={seed}",
                             f"model.path={s1 / 'demo_assets' / 'base_model'}",
                             f"data.stage2=[{assets.files['stage2_train']}]", *common, *extra])
                model_dir = run / "final"
                response = knowledge_response(s1 / "merged_base", run / "stage2" / "adapters", assets)
            results[variant][seed] = evaluate(model_dir, assets, reference, taia, response)
            if extra is None:
                taia = results[variant][seed]["desc_to_code_acc"]
            print(variant, seed, json.dumps(results[variant][seed]), flush=True)
    summary = summarise(results)
    (out / "ablation.json").write_text(json.dumps({"spec": spec, "results": results, "summary": summary}, indent=1))
    plot(summary, out / "ablation.png")
    write_markdown(summary, spec, out / "ablation.md", "ablation.png")
    print((out / "ablation.md").read_text())


if __name__ == "__main__":
    main()
