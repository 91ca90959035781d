"""What verified checkpoints cost: write and read times with and without digests + fsync, side by side.

    python launch/bench_checkpoint.py [--gb 1.0] [--files 4] [--dir /path/on/the/checkpoint/filesystem]

Writes `--files` torch.save files of `--gb` in all (a rank's optimizer-state shards stand-in), then
times, in one run: torch.save (what DeepSpeed does), the digests and fsync added before publishing,
torch.load, and the verification added before resuming. Run it on the file system output_dir lives on.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medcare_dist.training import integrity


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        numel = int(args.gb * 1e9 / 4 / args.files)
        tensors = [torch.randn(numel) for _ in range(args.files)]
        t0 = time.perf_counter()
        for i, t in enumerate(tensors):
            torch.save({"fp32_flat_groups": [t]}, root / f"zero_pp_rank_{i}_optim_states.pt")
        write = time.perf_counter() - t0
        t0 = time.perf_counter()
        integrity.write_manifest(root)  # sha256 of every file, fsync of every file and the directory
        digest = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.files):
            torch.load(root / f"zero_pp_rank_{i}_optim_states.pt", weights_only=True)
        read = time.perf_counter() - t0
        t0 = time.perf_counter()
        integrity.verify_dir(root)
        verify = time.perf_counter() - t0
        gb = sum(f.stat().st_size for f in root.iterdir()) / 1e9
        print(f"checkpoint of {gb:.2f} GB in {args.files} files under {root.parent}")
        print(f"| step | plain (s) | added (s) | with / without |")
        print(f"|---|---|---|---|")
        print(f"| write: torch.save vs + digests and fsync | {write:.2f} | {digest:.2f} | {(write + digest) / write:.2f}x |")
        print(f"| read: torch.load vs + verification | {read:.2f} | {verify:.2f} | {(read + verify) / read:.2f}x |")
        print(f"sha256 throughput: {gb / verify:.2f} GB/s on one core (ranks hash their share in parallel)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
