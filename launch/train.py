"""Entry point: `deepspeed launch/train.py --recipe launch/recipes/demo.yaml [key=value ...]`.

Also runs under `torchrun`, `mpirun -n N python launch/train.py ...` and as a
single process (`python launch/train.py ...`).
"""

from medcare_dist.cli import main

if __name__ == "__main__":
    main()
