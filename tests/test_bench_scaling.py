"""launch/bench_scaling.py's pure parts: the sweep's points, the samples read again for long lengths, the
calibrated rates as plan() takes them, and the report's tables and plots (no launches, no timings)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from medcare_dist.cluster import plan_measure, planner
from medcare_dist.cluster.model_shape import load_model_shape

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_scaling = _load("bench_scaling")
bench_peer = sys.modules["bench_peer"]  # the module bench_scaling imported


def test_sweep_points_runs_the_shared_point_once_in_sweep_order():
    points = bench_scaling.sweep_points([512, 1024, 2048, 4096], [256, 512, 768], fixed_width=256,
                                        fixed_length=1024)
    assert [(p["hidden"], p["max_length"]) for p in points] == [
        (256, 512), (256, 1024), (256, 2048), (256, 4096), (512, 1024), (768, 1024)]
    assert [p["sweeps"] for p in points] == [["seq"], ["seq", "width"], ["seq"], ["seq"], ["width"], ["width"]]
    # a width sweep away from the length sweep's width shares nothing
    points = bench_scaling.sweep_points([512], [128, 192], fixed_width=256, fixed_length=512)
    assert [(p["hidden"], p["sweeps"]) for p in points] == [(256, ["seq"]), (128, ["width"]), (192, ["width"])]


@pytest.mark.parametrize("widths,lengths", [([300], [512]), ([0], [512]), ([256], [0])])
def test_sweep_points_refuses_shapes_the_model_builder_cannot_make(widths, lengths):
    with pytest.raises(ValueError):
        bench_scaling.sweep_points(lengths, widths, fixed_width=256, fixed_length=512)


class WordTokenizer:
    """One token per whitespace-separated word; the chat template joins the turns' contents."""

    def apply_chat_template(self, messages, tokenize=False):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def _rows(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):  # row i: a question of 5 + i % 7 words and a one-word reply "r<i>"
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(["w"] * (5 + i % 7))},
                                             {"role": "assistant", "content": f"r{i}"}]}) + "\n")
    return path


def _conversations(path: Path) -> list:
    return [json.loads(line)["messages"] for line in open(path)]


def test_multi_turn_samples_reads_rows_again_only_when_one_pass_is_short(tmp_path):
    tok, source = WordTokenizer(), _rows(tmp_path / "rows.jsonl", 30)
    one_pass = _conversations(bench_peer.multi_turn_samples(source, tok, 40, tmp_path / "a.jsonl"))
    assert 3 < len(one_pass) < 30
    # enough from one pass: the same file whatever min_samples asks (the default lengths' samples unchanged)
    enough = bench_peer.multi_turn_samples(source, tok, 40, tmp_path / "b.jsonl", min_samples=len(one_pass))
    assert (tmp_path / "a.jsonl").read_bytes() == enough.read_bytes()
    # too few: exactly min_samples conversations, the rows in file order, wrapping around, none lost or repeated
    # before the wrap; the first pass's conversations are those of one pass but the last (not closed yet)
    want = len(one_pass) + 5
    more = _conversations(bench_peer.multi_turn_samples(source, tok, 40, tmp_path / "c.jsonl", min_samples=want))
    assert len(more) == want
    assert more[:len(one_pass) - 1] == one_pass[:-1]
    replies = [m["content"] for conv in more for m in conv if m["role"] == "assistant"]
    assert replies == [f"r{i % 30}" for i in range(len(replies))] and len(replies) > 30
    for conv in more:  # every conversation stays within 90 % of max_length (rows here are shorter than 40 %)
        assert sum(len(m["content"].split()) for m in conv) <= 0.9 * 40
    again = bench_peer.multi_turn_samples(source, tok, 40, tmp_path / "d.jsonl", min_samples=want)
    assert again.read_bytes() == (tmp_path / "c.jsonl").read_bytes()  # deterministic


def test_bus_rate_is_the_inverse_of_the_planners_ring_time():
    for world, payload, seconds in ((2, 32 * 2**20, 0.15), (8, 10**9, 2.0)):
        gbs = plan_measure.bus_gbs(payload, world, seconds)
        assert planner._ring_seconds(payload, world, gbs) == pytest.approx(seconds)
    assert plan_measure.bus_gbs(1000, 1, 1.0) == float("inf")  # one rank moves nothing


def _args(*argv):
    return planner._parser().parse_args(["--measure", *argv])


def test_measured_cluster_takes_the_calibrated_rates_and_plan_uses_them():
    calibration = {"gemm": {"tflops": 0.125}, "all_gather": {"bus_gbs": 0.4}}
    cluster = plan_measure.measured_cluster(_args("--overlap", "0.5"), 1, 2, calibration)
    assert (cluster.gpu_tflops, cluster.intra_node_gbs, cluster.inter_node_gbs, cluster.world,
            cluster.overlap) == (0.125, 0.4, 0.4, 2, 0.5)
    # without calibration: the command line's rates (the planner's defaults unless given)
    plain = plan_measure.measured_cluster(_args("--gpu-tflops", "300"), 2, 4, None)
    assert (plain.gpu_tflops, plain.intra_node_gbs, plain.inter_node_gbs, plain.world) == (300, 150.0, 25.0, 8)
    # the predicted step: compute at the calibrated rate, communication over the calibrated link
    shape = load_model_shape("qwen1.5-1.8b")
    work = planner.Workload(stage=1, seq_len=1024, micro_batch=2, global_batch=4, dtype="fp32",
                            gradient_checkpointing=False)
    p = planner.plan(shape, cluster, work, planner.zero_settings(planner.repo_ds_config(3, False)))
    t, c = p["time"], p["communication"]
    assert t["compute_s"] == pytest.approx(2 * 1024 * t["flops_per_token"] / 0.125e12)
    assert t["communication_s"] == pytest.approx((c["all_gather_bytes"] + c["reduce_scatter_bytes"]) / 2 / 0.4e9)
    assert t["step_s"] == pytest.approx(t["compute_s"] + t["communication_s"] - 0.5 * t["communication_s"])


def test_collective_calls_count_every_size_and_skip_the_barriers():
    log = {"all_gather_into_tensor": {"1024": {"count": 3}, "4096": {"count": 2}},
           "reduce_scatter_tensor | bucket": {"8": {"count": 1}}, "log_summary_barrier": {"0": {"count": 1}}}
    assert bench_scaling.collective_calls(log) == {"all_gather_into_tensor": 5, "reduce_scatter_tensor": 1}


def _report():
    def run(tps, peaks):
        return {"tokens_per_s": tps, "peak_rss_bytes": {"0": peaks[0], "1": peaks[1]},
                "peak_rss_max_bytes": max(peaks)}

    points = []
    for hidden, length, sweeps in ((128, 256, ["seq"]), (128, 512, ["seq", "width"]), (192, 512, ["width"])):
        runs = {"peer": run(100.0, (2 * 2**30, 2**30)), "stage1": run(150.0, (2**30, 2**30)),
                "stage2": run(200.0, (2**29, 2**30))}
        ratios = {v: {"tokens_per_s": runs[v]["tokens_per_s"] / 100.0,
                      "peak_rss": runs[v]["peak_rss_max_bytes"] / (2 * 2**30)} for v in ("stage1", "stage2")}
        planner_row = {"calibration": {"gemm": {"tflops": 0.1}, "all_gather": {"bus_gbs": 0.3}},
                       "step_time": {"predicted_s": 0.2, "predicted_compute_s": 0.15, "predicted_communication_s": 0.1,
                                     "measured_s": 1.0, "ratio": 5.0},
                       "communication": {"all_gather": {"predicted": 3e7, "measured": 3e7},
                                         "reduce_scatter": {"predicted": 6e5, "measured": 6e5}}}
        points.append({"hidden": hidden, "max_length": length, "sweeps": sweeps, "parameters": 8.6e6, "runs": runs,
                       "ratios_vs_peer": ratios, "planner": planner_row})
    return {"started": "2026-12-01 00:00 UTC", "settings": {"layers": 2, "vocab": 32000, "global": 4, "steps": 2},
            "points": points}


def test_tables_have_one_row_per_point_with_the_ratios(tmp_path):
    text = bench_scaling.tables(_report())
    variant_rows = [ln for ln in text.splitlines() if ln.startswith("| 1")]
    assert len(variant_rows) == 6  # 3 points in each of the two tables
    assert "| 128 | 256 | 8.6M | 100 | 200 (2.00) | 150 (1.50) | 2.00 / 1.00 GiB | 0.50 / 1.00 GiB (0.50) |" \
        in text
    assert "| 0.200 (0.150 + 0.100) | 1.000 | 5.00 | 30.00 / 30.00 | 0.600 / 0.600 |" in text


def test_plots_are_written_per_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    for sweep in bench_scaling.SWEEPS:
        bench_scaling.plot(_report(), sweep, tmp_path / f"scaling_{sweep}.png")
        assert (tmp_path / f"scaling_{sweep}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

