"""Nothing silently wrong (issue 13): verified artefacts, one run per output_dir, finished steps reused only
when their inputs match, every input checked before compute, one-line errors for damaged input.

Single process, on the tiny assets; two short runs killed part-way are shared by the tests (copied).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, base_env, train_args
from helpers import run_train as run

from medcare_dist.training.checkpoint import verified_checkpoint
from medcare_dist.training import integrity
from medcare_dist.training.run_lock import LOCK_NAME, RunLock, RunLockedError


def flip_byte(path: Path, offset: int | None = None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def assert_refused(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


# ------------------------------------------------------------------------------------------ units

def test_manifest_names_a_flipped_truncated_or_missing_file(tmp_path):
    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 64)
    (d / "sub" / "b.json").write_text('{"x": 1}')
    manifest = integrity.write_manifest(d, inputs={"k": 1})
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"]
    assert integrity.verify_dir(d)["inputs"] == {"k": 1}
    flip_byte(d / "a.bin")
    with pytest.raises(integrity.ArtefactError, match=r"a\.bin: corrupted \(its sha256 differs"):
        integrity.verify_dir(d)
    (d / "a.bin").write_bytes(b"short")
    with pytest.raises(integrity.ArtefactError, match=r"a\.bin: corrupted \(5 bytes, 16384 when it was written\)"):
        integrity.verify_dir(d)
    (d / "a.bin").unlink()
    with pytest.raises(integrity.ArtefactError, match=r"a\.bin: missing"):
        integrity.verify_dir(d)
    # split between ranks, each checks its share: rank 1 of 2 holds sub/b.json only, which is intact
    assert integrity.verify_dir(d, share=(1, 2))
    (d / integrity.MANIFEST_NAME).write_bytes(b"\x00\xff" * 10)
    with pytest.raises(integrity.ArtefactError, match="MANIFEST.sha256.json: corrupted"):
        integrity.verify_dir(d)


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step-{step:07d}"
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    integrity.write_manifest(path)
    return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import logging

    log = logging.getLogger("test")
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("step-0000004")
    assert verified_checkpoint(tmp_path, 0, 1, log) == newest
    flip_byte(newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with caplog.at_level(logging.WARNING):
        assert verified_checkpoint(tmp_path, 0, 1, log).name == "step-0000002"
    assert "step-0000004 is damaged" in caplog.text and "optim_states.pt: corrupted" in caplog.text
    flip_byte(tmp_path / "step-0000002" / "trainer_state.json", 2)
    with pytest.raises(integrity.ArtefactError, match="every checkpoint under .* is damaged"):
        verified_checkpoint(tmp_path, 0, 1, log)


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"host {socket.gethostname()}, pid {os.getpid()}, since"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "pid_start": "1", "started": 0}))
    taken = RunLock(tmp_path).acquire()                               # a crashed run on this host: taken over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    taken.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(RunLockedError, match="host node-elsewhere, pid 1"):  # cannot be checked from here
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).release()                                       # never removes a lock it does not hold
    assert (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def killed_runs(tiny_assets, tmp_path_factory):
    """Two runs killed part-way (SIGKILL, as a crash): `stage1` after step 5 of 5 (checkpoints at steps 2 and
    4), `stage2` after stage-2 step 1 (stage 1 and the merge finished). Stage-1 data is a private copy."""
    root = tmp_path_factory.mktemp("killed")
    data = root / "stage1.jsonl"
    shutil.copy(tiny_assets["stage1"], data)
    assets = {**tiny_assets, "stage1": data}
    runs = {"stage1": (root / "stage1", {"stage": 1}, "stage1:5"), "stage2": (root / "stage2", {}, "stage2:1")}
    for out, overrides, fail in runs.values():
        proc = run(assets, out, {"MEDCARE_FAIL_AT": fail}, **overrides)
        assert proc.returncode == -9, proc.stderr[-3000:]
    assert (root / "stage2" / "merged_base" / integrity.MANIFEST_NAME).is_file()
    return {"assets": assets, **{k: v[0] for k, v in runs.items()}}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_one_before(killed_runs, tmp_path):
    out = copy_run(killed_runs["stage1"], tmp_path / "run")
    assert (out / LOCK_NAME).is_file()                       # left by the killed run
    flip_byte(out / "stage1" / "checkpoints" / "step-0000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = run(killed_runs["assets"], out, stage=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-0000004 is damaged" in proc.stderr and "optim_states.pt: corrupted" in proc.stderr
    record = json.loads((out / "stage1" / "result.json").read_text())
    assert record["summary"]["resumed_from"].endswith("step-0000002")
    assert not (out / LOCK_NAME).exists()                    # the dead run's lock was taken over, then released


def test_flipped_bytes_in_the_cache_or_merged_base_stop_naming_the_file(killed_runs, tmp_path):
    out = copy_run(killed_runs["stage2"], tmp_path / "cache")
    arrow = next((out / "stage1" / "tokenized").rglob("*.arrow"))
    flip_byte(arrow)
    assert_refused(run(killed_runs["assets"], out), f"{arrow}: corrupted", "tokenized cache")
    out = copy_run(killed_runs["stage2"], tmp_path / "merged")
    weights = out / "merged_base" / "model.safetensors"
    flip_byte(weights)
    assert_refused(run(killed_runs["assets"], out), f"{weights}: corrupted", "restart_from=merge")
    proc = run(killed_runs["assets"], out, restart_from="merge")    # the way out the message names
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert integrity.verify_dir(out / "merged_base") and integrity.verify_dir(out / "final")


def test_a_finished_step_is_reused_only_with_the_settings_and_data_it_was_made_from(killed_runs, tmp_path):
    out = copy_run(killed_runs["stage2"], tmp_path / "run")
    assets = killed_runs["assets"]
    assert_refused(run(assets, out, **{"adapters.attn_rank": 4, "stage1.lr": 1e-2}),
                   "stage1 in", "is finished, but was made with other settings or data",
                   "adapters.attn_rank: 8 then, 4 now", "stage1.lr: 0.003 then, 0.01 now", "restart_from=stage1")
    data = Path(assets["stage1"])
    original = data.read_bytes()
    try:
        data.write_bytes(original[: original.rindex(b"\n", 0, len(original) - 1) + 1])  # the same file, one row fewer
        assert_refused(run(assets, out), "data.stage1 (the tokenized rows)", "then,")
    finally:
        data.write_bytes(original)
    proc = run(assets, out, **{"stage2.lr": 1e-3, "restart_from": "stage2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage1: already complete" in proc.stderr and "stage2: redoing it from scratch" in proc.stderr
    record = json.loads((out / "stage2" / "result.json").read_text())
    assert record["inputs"]["settings"]["stage2.lr"] == 1e-3
    proc = run(assets, out, **{"stage2.lr": 1e-3})           # now finished with these: every step skipped
    assert proc.returncode == 0 and proc.stderr.count("already complete") == 4, proc.stderr[-3000:]


def test_every_input_is_checked_before_compute_and_before_writing(tiny_assets, tmp_path):
    bad = tmp_path / "stage2_bad.jsonl"
    bad.write_text(Path(tiny_assets["stage2"]).read_text().splitlines()[0] + "\n{\"messages\": 5}\n")
    out = tmp_path / "bad_stage2"
    assert_refused(run(tiny_assets, out, **{"data.stage2": f"[{bad}]"}), f"{bad}:2")
    assert not (out / "stage1" / "checkpoints").exists() and not (out / "stage1" / "result.json").exists()
    out = tmp_path / "big_batch"
    assert_refused(run(tiny_assets, out, **{"stage2.global_batch_size": 4096, "stage2.micro_batch_size": 4}),
                   "data.stage2: 723 training samples are fewer than one global batch (stage2.global_batch_size=4096)")
    assert not (out / "stage1" / "checkpoints").exists()
    out = tmp_path / "no_stage2_data"
    assert_refused(run(tiny_assets, out, **{"data.stage2": "[]", "data.demo": "false"}),
                   "data.stage2: no data files for stage2", "data.demo=true")
    assert not out.exists()                                   # nothing written at all


def test_a_second_launch_on_a_held_output_dir_stops_at_once_naming_the_holder(tiny_assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    RunLock(out).acquire()                                    # held by this (live) test process
    assert_refused(run(tiny_assets, out), "another run holds it", f"pid {os.getpid()}", socket.gethostname())
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ------------------------------------------------------------------------------------------ fuzz

NESTED = "[" * 50000 + "]" * 50000


def _regenerate_manifest(directory: Path):
    integrity.write_manifest(directory, inputs=integrity.manifest_inputs(directory))


def test_damaged_inputs_of_every_kind_exit_2_with_one_line_and_no_traceback(killed_runs, tiny_assets, tmp_path):
    good = Path(tiny_assets["stage1"]).read_text().splitlines(keepends=True)
    data = {"empty.jsonl": "", "truncated.jsonl": "".join(good[:2]) + good[2][: len(good[2]) // 2],
            "binary.jsonl": b"\x00\xff\xfe\x80" * 500, "nested.json": NESTED,
            "nested_row.jsonl": '{"messages": ' + NESTED + "}\n", "wrong_type.jsonl": '{"messages": 5}\n',
            "object.json": '{"a": 1}', "number.json": "5", "garbage.parquet": b"PAR1" + b"\x07" * 100 + b"PAR1"}
    recipes = {"empty.yaml": "", "binary.yaml": b"\x00\xff\xfe\x80" * 100, "truncated.yaml": "stage1:\n  lr: [1, 2",
               "nested.yaml": "seed: " + "[" * 20000, "wrong_type.yaml": "stage1: 5\n",
               "wrong_value.yaml": "seed: abc\n", "list.yaml": "- 1\n- 2\n"}
    ds = {"empty.json": "", "binary.json": b"\x00\xff" * 100, "nested.json": NESTED,
          "wrong_type.json": '{"zero_optimization": "x"}', "list.json": "[1, 2]",
          "stage.json": '{"zero_optimization": {"stage": "three"}}'}
    cases = []
    for group, files, key in (("data", data, "data.stage1"), ("recipe", recipes, None), ("ds", ds, "deepspeed.config")):
        for name, content in files.items():
            path = tmp_path / group / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            if key is None:
                argv = ["--recipe", str(path), f"output_dir={tmp_path / 'out' / group / name}"]
            else:
                value = f"[{path}]" if key == "data.stage1" else str(path)
                argv = train_args(tiny_assets, tmp_path / "out" / group / name, **{key: value, "stage": 1})
            cases.append({"name": f"{group}/{name}", "argv": argv, "names": str(path) if key else None})

    def damaged(name, src, change):
        out = copy_run(killed_runs[src], tmp_path / "ckpt" / name)
        target = change(out)
        cases.append({"name": f"checkpoint/{name}", "names": str(target),
                      "argv": train_args(killed_runs["assets"], out, **({"stage": 1} if src == "stage1" else {}))})

    def every_manifest(out):
        for m in (out / "stage1" / "checkpoints").glob("step-*/" + integrity.MANIFEST_NAME):
            m.write_bytes(b"\x00\xff" * 50)
        return out / "stage1" / "checkpoints"

    def trainer_state(out):
        for ck in (out / "stage1" / "checkpoints").glob("step-*"):
            (ck / "trainer_state.json").write_text('{"step": 4, "resu')
            _regenerate_manifest(ck)
        return "trainer_state.json"

    def adapter_header(out, name="adapters.safetensors"):
        d = out / "stage1" / "adapters"
        (d / name).write_bytes(b"\xff" * 8 + (d / name).read_bytes()[8:])
        _regenerate_manifest(d)
        shutil.rmtree(out / "merged_base")                  # the merge must read them again
        return d / name

    def adapter_config(out):
        d = out / "stage1" / "adapters"
        (d / "adapter_config.json").write_text(NESTED)
        _regenerate_manifest(d)
        shutil.rmtree(out / "merged_base")
        return d / "adapter_config.json"

    def merged_header(out):
        d = out / "merged_base"
        (d / "model.safetensors").write_bytes(b"\x10" * 8 + b"{not json" + (d / "model.safetensors").read_bytes()[17:])
        _regenerate_manifest(d)
        return d

    damaged("manifests", "stage1", every_manifest)
    damaged("trainer_state", "stage1", trainer_state)
    damaged("adapter_header", "stage2", adapter_header)
    damaged("adapter_config", "stage2", adapter_config)
    damaged("merged_header", "stage2", merged_header)

    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_inputs.py"), str(spec)], env=base_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    outcomes = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            outcomes[rec["name"]] = rec
    assert len(outcomes) == len(cases), proc.stderr[-3000:]
    failures = []
    for case in cases:
        rec = outcomes[case["name"]]
        errors = [ln for ln in rec["stderr"].splitlines() if ln.startswith("error: ")]
        if rec["exit"] != 2 or rec["traceback"] or "Traceback" in rec["stderr"] or len(errors) != 1:
            failures.append(f"{case['name']}: exit {rec['exit']}\n{rec['traceback'] or rec['stderr'][-1500:]}")
        elif case["names"] and case["names"] not in errors[0]:
            failures.append(f"{case['name']}: the error does not name {case['names']}: {errors[0]}")
    assert not failures, "\n\n".join(failures)


def test_a_full_disk_while_checkpointing_names_the_path_and_the_bytes(tmp_path):
    # torch.save reports a failed write as "enforce fail at inline_container.cc", naming no path.
    import torch

    from medcare_dist.training import checkpoint as ckpt
    from medcare_dist.errors import StorageError

    class Engine:
        module = torch.nn.Linear(1000, 1000)

        def save_checkpoint(self, *a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    with pytest.raises(StorageError) as e:
        ckpt.save_checkpoint(Engine(), tmp_path / "ckpts", 3, {}, rank=0, world=1, keep_last=2)
    msg = str(e.value)
    assert str(tmp_path / "ckpts" / ".tmp-step-0000003") in msg and "no space left on the device" in msg
    assert "GB free there, about 0.02 GB needed" in msg and "rerun the same command to resume" in msg


def test_a_persistence_threshold_that_partitions_adapters_is_named_before_compute(tiny_assets, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    proc = run(tiny_assets, tmp_path / "out", stage=1, **{"deepspeed.config": path, "stage1.global_batch_size": 4096,
                                                          "stage1.micro_batch_size": 4})
    assert_refused(proc, "fewer than one global batch")       # stops before compute, after the warning
    assert "zero_optimization.stage3_param_persistence_threshold=100" in proc.stderr
    assert "partitions adapter tensors" in proc.stderr


def test_model_dirs_generate_until_the_end_of_turn_and_their_files_are_group_readable(killed_runs, tiny_assets):
    merged = killed_runs["stage2"] / "merged_base"
    from transformers import AutoTokenizer

    for model_dir in (merged, tiny_assets["base"]):  # what the pipeline merges, and the demo base it builds
        tok = AutoTokenizer.from_pretrained(model_dir)
        gen = json.loads((model_dir / "generation_config.json").read_text())
        stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        assert tok.convert_tokens_to_ids("<|im_end|>") in stops, model_dir  # PeftModel.generate stops at the turn
        assert tok.eos_token_id in stops, model_dir
        assert json.loads((model_dir / "config.json").read_text())["use_cache"] is True, model_dir
    umask = os.umask(0)
    os.umask(umask)
    for path in [merged / "model.safetensors", merged / "knowledge_adapters" / "adapters.safetensors",
                 killed_runs["stage2"] / "stage1" / "adapters" / "adapters.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
