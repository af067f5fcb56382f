"""The training command line: ``fastcaps-train``, ``python -m fastcaps.train`` and
``python train_mnist.py`` run this same CLI (see ``--help``).

Several GPUs or nodes: ``torchrun --nproc_per_node N -m fastcaps.train ...`` (DDP; --batch-size
is per process). User errors print one line ``<prog>: error: ...`` and exit with status 2
(``FASTCAPS_DEBUG=1`` shows the traceback); SIGINT / SIGTERM save the run after the current step,
print the command that resumes it and exit with 130 / 143.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields

from fastcaps.backend import BACKENDS
from fastcaps.data import DATASETS, DatasetError
from fastcaps.runs import LAST, CheckpointError, RunFolderError
from fastcaps.training import (
    AMP_DTYPES,
    AUGMENTATIONS,
    MODEL_PRESETS,
    Interrupted,
    RunError,
    StopRequest,
    TrainConfig,
    run_folder,
    train,
)

USER_ERRORS = (RunError, CheckpointError, RunFolderError, DatasetError)
DEBUG_VAR = "FASTCAPS_DEBUG"


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(
        prog=prog,
        description="Train a CapsNet (Sabour et al. 2017) with dynamic routing, or "
        "Efficient-CapsNet (Mazzia et al. 2021) with self-attention routing. Defaults are each "
        "paper's recipe on full MNIST; the best epoch is chosen on a validation split held out of "
        "the training images and the test set is evaluated once, at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--dataset", choices=sorted(DATASETS), default=d.dataset, help="the data to train on")
    add("--data-dir", default=d.data_dir, help="the dataset's folder, or a root with one folder "
        "per dataset (mnist/, fashion-mnist/); files are downloaded when absent. None: "
        "$FASTCAPS_DATA, else ~/.cache/fastcaps/<dataset>")  # fmt: skip
    add("--output-dir", default=d.output_dir, help="the run folder: config.json, metrics.jsonl, "
        "summary.json, best.pt, last.pt, figures. None: runs/<dataset>")  # fmt: skip
    add("--overwrite", action="store_true", help="replace the run already in --output-dir")
    add("--resume", default=d.resume, help="continue the run in this folder (or from this "
        "checkpoint) exactly where it stopped, with all of its configuration")  # fmt: skip
    add("--model", choices=sorted(MODEL_PRESETS), default=d.model,
        help="paper: Sabour et al.'s CapsNet; small: a tiny one for smoke tests; efficient: "
        "Efficient-CapsNet (Mazzia et al. 2021), trained with the authors' recipe (--lr 5e-4 "
        "--lr-decay 0.97 --lr-min 5e-5 --batch-size 16 --augment efficient --epochs 150) "
        "unless those flags are given")  # fmt: skip
    add("--epochs", type=int, default=d.epochs, help="epochs in all (more extends a resumed run)")
    add("--batch-size", type=int, default=d.batch_size, help="images per step (per process)")
    add("--lr", type=float, default=d.lr, help="Adam learning rate, > 0")
    add("--lr-decay", type=float, default=d.lr_decay,
        help="learning rate factor after every epoch, in (0, 1]")  # fmt: skip
    add("--lr-min", type=float, default=d.lr_min, help="the decay stops at this learning rate")
    add("--iterations", type=int, default=d.iterations, help="routing iterations (CapsNet)")
    add("--recon-weight", type=float, default=d.recon_weight,
        help="weight of the reconstruction loss (sum of squared errors per image)")  # fmt: skip
    add("--augment", choices=AUGMENTATIONS, default=d.augment,
        help="shift: random shifts of up to --max-shift pixels; efficient: Efficient-CapsNet's "
        "rotate / shift / squish / erase; none")  # fmt: skip
    add("--max-shift", type=int, default=d.max_shift,
        help="random shift augmentation in pixels (0 disables it)")  # fmt: skip
    add("--val-size", type=int, default=d.val_size,
        help="training images held out for checkpoint selection")  # fmt: skip
    add("--train-limit", type=int, default=d.train_limit,
        help="use only this many training images (quick runs); None: all")  # fmt: skip
    add("--test-limit", type=int, default=d.test_limit,
        help="evaluate only the first this many test images (quick runs); None: all")  # fmt: skip
    add("--eval-batch-size", type=int, default=d.eval_batch_size,
        help="images per validation and test batch")  # fmt: skip
    add("--backend", choices=BACKENDS, default=d.backend,
        help="routing backend; None: $FASTCAPS_BACKEND, else auto")  # fmt: skip
    add("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    add("--amp", choices=sorted(AMP_DTYPES), default=d.amp,
        help="autocast dtype; fastcaps' ops still compute in float32, and on a CPU without "
        "native support convolutions and matmuls are emulated at float32 speed")  # fmt: skip
    add("--compile", action="store_true", help="torch.compile the model")
    add("--figures", action=argparse.BooleanOptionalAction, default=d.figures,
        help="draw curves.png, reconstructions.png and perturbation.png at the end")  # fmt: skip
    add("--log-every", type=int, default=d.log_every,
        help="steps between progress-bar updates (also refreshed every 2 s)")  # fmt: skip
    add("--seed", type=int, default=d.seed, help="seed of the model, shuffling and augmentation")
    add("--quiet", action="store_true",
        help="no progress bar or per-epoch lines; the final result is still printed")  # fmt: skip
    return p


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[TrainConfig, set[str]]:
    """The configuration the flags ask for, and the names of the fields given explicitly."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for action in parser._actions:  # a second pass that keeps only what was given
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    return config, given


def resume_command(prog: str, run_dir: os.PathLike | str) -> str:
    runner = f"python {prog}" if prog.endswith(".py") else prog
    return f"{runner} --resume {shlex.quote(str(run_dir))}"


def _install_stop_handlers(stop: StopRequest, prog: str) -> dict:
    """First SIGINT / SIGTERM: stop after the current step; a second one: stop at once."""

    def handler(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        print(
            f"\n{prog}: {signal.Signals(signum).name}: finishing the current step and saving "
            "the run (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    prog = prog or os.path.basename(sys.argv[0])
    config, given = parse_args(argv, prog)
    stop = StopRequest()
    single_process = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    previous = _install_stop_handlers(stop, prog) if single_process else {}
    try:
        train(config, stop=stop, given=given)
        return 0
    except Interrupted as stopped:
        print(
            f"{prog}: stopped by {signal.Signals(stopped.signum).name} {stopped.where}; the run "
            f"is saved in {stopped.checkpoint}\nresume with: "
            f"{resume_command(prog, stopped.checkpoint.parent)}",
            file=sys.stderr,
        )
        return 128 + stopped.signum
    except KeyboardInterrupt:
        signum = stop.signum or signal.SIGINT
        run_dir = run_folder(config)
        saved = (
            f"the steps since its last checkpoint are lost; resume with: "
            f"{resume_command(prog, run_dir)}"
            if (run_dir / LAST).is_file()
            else "no checkpoint was written"
        )
        print(f"{prog}: stopped at once by {signal.Signals(signum).name}; {saved}", file=sys.stderr)
        return 128 + signum
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_VAR) == "1":
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastcaps.train"))
