"""Capacity planner: `python launch/plan.py --model qwen1.5-14b --nodes 2 --gpus-per-node 8 --zero 3 --seq-len 3072
--micro-batch 4` prints per-GPU memory, bytes communicated per step, predicted step time and tokens/s, and a
recommended DeepSpeed config (--json for scripts). Exit status: 0 fits, 3 does not fit as asked, 2 bad input.

Check the communication figure against DeepSpeed's comms logger on a real run (any launcher):
    deepspeed --num_gpus 2 launch/plan.py --measure --recipe launch/recipes/demo.yaml --model DIR --seq-len 64
--measure --calibrate also times a GEMM and an all-gather on the ranks first and predicts the step time with those
rates, beside the measured one (launch/bench_scaling.py runs it at every point of its sweep).
"""

import sys

from medcare_dist.cluster.planner import main

if __name__ == "__main__":
    sys.exit(main())
