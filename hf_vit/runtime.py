"""Process concerns shared by the commands: logging, the Accelerator and its trackers, the main process going first,
DeepSpeed's missing settings, and the preemption signals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from .errors import UserError, install_secret_filter

logger = logging.getLogger("hf_vit")

# Libraries whose INFO lines drown the run's own.
NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "fsspec", "accelerate")


def is_main_process_env() -> bool:
    """Whether this is rank 0 of a launch, known before any Accelerator exists (from the launcher's RANK)."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    """INFO on the main process, warnings and errors on the others; quiet HTTP and file-lock chatter."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if is_main_process_env() else logging.WARNING)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_secret_filter()  # no log line may carry a token, misspelt flag or not


def cpu_only_distributed() -> bool:
    """True for a multi-process launch on a machine without GPUs: accelerate then needs ``cpu=True`` to pick
    MULTI_CPU (gloo); without it each process would silently train alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def trackers(report_to: str) -> list[str] | str | None:
    """accelerate's ``log_with`` for ``report_to`` (a comma list, all, none or auto = tensorboard if installed)."""
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return ["tensorboard"]
    if report_to == "all":
        return "all"
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    # accelerate silently drops a tracker whose package is missing; a run asked to log somewhere must not.
    names = [r.strip() for r in report_to.split(",") if r.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"report_to {name!r} is not a tracker; choose from {sorted(LOGGER_TYPE_TO_CLASS)}, "
                            "all, none or auto")
        if name not in available:
            raise UserError(f"report_to {name!r} needs the {name} package, which is not installed; install it or "
                            "pass --report_to none")
    return names


def build_accelerator(mixed_precision: str | None, report_to: str = "none", project_dir: str | None = None,
                      gradient_accumulation_steps: int = 1) -> Accelerator:
    """The Accelerator of a command: the launcher's topology, ``mixed_precision`` (None: the launcher's setting)."""
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=trackers(report_to),
        project_dir=project_dir,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Batches are sharded by our own rule (hf_vit.data.loader); accelerate never re-shards or dispatches them.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        step_scheduler_with_optimizer=False,
        cpu=cpu_only_distributed(),
    )


def on_main_process(state, fn):
    """Run ``fn()`` on the main process only and return its result there (None elsewhere); a UserError it raises is
    raised on every process, with the same one line, so that no rank waits for a main process that gave up."""
    message, result = None, None
    if state.is_main_process:
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message is not None:
        raise UserError(message)
    return result


@contextlib.contextmanager
def main_process_first(state):
    """The main process runs the block first (e.g. builds the datasets cache), the others then reuse its work.

    Unlike accelerate's ``main_process_first``, the main process reaches the barrier even when the block fails, so
    the other processes meet the same one-line error instead of a broken connection.
    """
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_main_process:
            state.wait_for_everyone()


def fresh_accelerate_state():
    """Forget the previous run's Accelerator settings before the next run in this process builds its own; returns
    the ``PartialState`` (which process this is, and the process group), kept across runs, with the same ``cpu``
    choice as every Accelerator here (:func:`cpu_only_distributed`).

    ``AcceleratorState`` and ``GradientState`` are process-wide singletons that keep the first run's mixed precision,
    plugins and accumulation; a second run in the same process (a study's next run, perhaps bf16 after fp32) must
    start from neither.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return PartialState(cpu=cpu_only_distributed())


def deepspeed_steps_at_accumulation_boundaries() -> bool:
    """Whether the installed accelerate steps the DeepSpeed engine only when ``sync_gradients`` is true (accelerate
    1.16: ``DeepSpeedEngineWrapper.backward(loss, sync_gradients)`` sets the engine's accumulation boundary from it and
    steps only there), so that the loop's ``accelerator.accumulate`` windows decide when the engine steps."""
    import inspect

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    return "sync_gradients" in inspect.signature(DeepSpeedEngineWrapper.backward).parameters


def configure_deepspeed(ds_config: dict, train_args) -> None:
    """Fill in what DeepSpeed cannot learn from this loop (in place; docs/scaling.md, "DeepSpeed ZeRO-2").

    The loop hands accelerate no dataloader (it shards batches itself), so the micro-batch cannot stay "auto".
    Accumulation: the loop runs each optimizer step as ``gradient_accumulation_steps`` micro-batches inside
    ``accelerator.accumulate``, whose ``sync_gradients`` is true on the last one only; accelerate (1.16) hands that
    flag to the engine as its accumulation boundary and steps it there, and the engine divides the loss by its own
    ``gradient_accumulation_steps`` — so the config gets the run's. An accelerate whose wrapper steps the engine on
    every micro-batch (:func:`deepspeed_steps_at_accumulation_boundaries` false) is refused accumulation. Clipping is
    the engine's, so it gets ``max_grad_norm`` (0 turns it off in DeepSpeed).
    """
    accumulation = train_args.gradient_accumulation_steps
    if accumulation != 1 and not deepspeed_steps_at_accumulation_boundaries():
        raise UserError(
            f"gradient_accumulation_steps={accumulation} cannot be used under DeepSpeed with this accelerate (its "
            "engine would step on every micro-batch); install accelerate>=1.16, keep it at 1 so that "
            "total_train_batch_size is split over the processes alone, or launch with DDP or FSDP"
        )
    ds_config["train_micro_batch_size_per_gpu"] = train_args.per_device_train_batch_size
    ds_config["gradient_accumulation_steps"] = accumulation
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = float(train_args.max_grad_norm or 0.0)


# SIGHUP: the terminal that started the run was closed (an ssh session dropped): like a scheduler's SIGTERM.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Preemption:
    """SIGTERM, SIGINT and SIGHUP set a flag; the loop finishes the current step, saves a checkpoint, releases the
    run lock and exits 0. A forked child (a loader worker) that inherits the handler ignores the signal: the main
    process decides when to stop."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._pid = os.getpid()

    def __enter__(self):
        self._pid = os.getpid()
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return
        self.requested = True
        logger.warning("Received %s: finishing this step, then saving a checkpoint.", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
