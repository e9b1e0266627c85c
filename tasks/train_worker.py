"""fine_tune on several processes (training.processes > 1): data-parallel under torchrun.

The launcher runs `python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.train_worker
SETTINGS_JSON TRAIN VALID OUT RESULT_DIR`; each rank joins the process group (nccl on CUDA, gloo on CPU)
and runs tasks.train.fine_tune, and rank 0 writes the TrainResult to RESULT_DIR for the launcher to read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tasks.config import Settings, load_settings
from tasks.intervals import Interval
from tasks.train import TrainResult, fine_tune

# ranks wait here while rank 0 validates and saves (NCCL's default is 10 minutes)
COLLECTIVE_TIMEOUT = timedelta(hours=1)
GAINS = ("text_gain", "match_gain")  # TrainResult fields holding {metric: Interval}
ARRAYS = ("valid_pctr", "valid_logits")  # TrainResult fields holding (valid pairs,) arrays: saved as .npy
RESULT_FILE = "result.json"  # rank 0 writes it last: training finished on every rank


def train_model(settings: Settings, train_path: Path, valid_path: Path, out_dir: Path) -> TrainResult:
    """fine_tune in this process (training.processes 1) or on training.processes ranks under torchrun."""
    if settings.training.processes == 1:
        return fine_tune(settings, train_path, valid_path, out_dir)
    return launch_fine_tune(settings, train_path, valid_path, out_dir)


def launch_fine_tune(settings: Settings, train_path: Path, valid_path: Path, out_dir: Path) -> TrainResult:
    """Run fine_tune on training.processes ranks of this machine; rank 0's result. Output is relayed line by
    line (rank 0 prints; the other ranks are silent), so a Prefect task logs it."""
    # secrets are not dumped (masked): the ranks read them from the environment they inherit
    settings_json = settings.model_dump_json(exclude={"ranking": {"user_id_salt"}})
    with tempfile.TemporaryDirectory(prefix="adrank-train-") as result_dir:
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            f"--nproc-per-node={settings.training.processes}",
            *("-m", "tasks.train_worker", settings_json, str(train_path), str(valid_path), str(out_dir), result_dir),
        ]
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        with subprocess.Popen(command, env=rank_environment(), **output) as process:
            for line in process.stdout:
                print(line, end="")
        done = Path(result_dir) / RESULT_FILE
        if process.returncode != 0 and not done.exists():
            raise RuntimeError(f"distributed fine-tuning failed (torchrun exit code {process.returncode})")
        if process.returncode != 0:  # rank 0 wrote its result last, after every step had run on every rank
            print(f"warning: torchrun exited {process.returncode} while the ranks shut down; training finished")
        return read_result(Path(result_dir))


def rank_environment() -> dict[str, str]:
    """This environment, with the folder this code is imported from first on the ranks' import path."""
    code_root = str(Path(__file__).resolve().parents[1])
    paths = [code_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


@contextmanager
def process_group() -> Iterator[int]:
    """Join torchrun's process group (nccl on CUDA, one GPU per local rank; gloo on CPU); yields the rank."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def write_result(result: TrainResult, folder: Path) -> None:
    """<array>.npy for each ARRAYS field, then RESULT_FILE (the rest), renamed into place last: its presence
    says training finished."""
    for name in ARRAYS:
        if getattr(result, name) is not None:
            np.save(folder / f"{name}.npy", getattr(result, name))
    scalars = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ARRAYS}
    for name in GAINS:
        scalars[name] = {metric: asdict(gain) for metric, gain in getattr(result, name).items()}
    (folder / "result.tmp").write_text(json.dumps(scalars | {"checkpoint": str(result.checkpoint)}))
    os.replace(folder / "result.tmp", folder / RESULT_FILE)


def read_result(folder: Path) -> TrainResult:
    scalars = json.loads((folder / RESULT_FILE).read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in ARRAYS if (folder / f"{name}.npy").exists()}
    gains = {name: {metric: Interval(**gain) for metric, gain in scalars.get(name, {}).items()} for name in GAINS}
    return TrainResult(**scalars | {"checkpoint": Path(scalars["checkpoint"])} | gains | arrays)


def main(argv: list[str]) -> None:
    settings_json, train_path, valid_path, out_dir, result_dir = argv
    settings = load_settings(json.loads(settings_json))
    with process_group() as rank, open(os.devnull, "w") as devnull:
        with redirect_stdout(devnull) if rank > 0 else nullcontext():  # one rank's progress and validation lines
            result = fine_tune(settings, Path(train_path), Path(valid_path), Path(out_dir))
        if rank == 0:
            write_result(result, Path(result_dir))
        # leave together: a rank that tears gloo down while another still works can abort that one
        # ("terminate called without an active exception", seen once under load)
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
