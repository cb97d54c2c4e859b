"""Stop training at the first non-finite loss or gradient, before it reaches the weights.

ignite's ``TerminateOnNan`` runs after the optimizer step (the weights are already NaN) and ends the run
quietly through ``COMPLETED``, where MONAI's ``CheckpointSaver(save_final=True)`` then writes those NaN weights
as the final model. :class:`NonFiniteLossGuard` instead checks the loss as soon as MONAI's trainer has computed
it (``IterationEvents.LOSS_COMPLETED``), the gradients right after the backward pass
(``IterationEvents.BACKWARD_COMPLETED``, without AMP, whose scaler handles overflowing gradients itself) and
the learning rates before the optimizer step (an overflowing one would make the step non-finite, or make the
optimizer fail with an overflow of its own), and raises :class:`NonFiniteLossError`: the step is never taken,
every checkpoint on disk stays as it was (the best and the resume checkpoints of finished epochs), the process
exits with an error that says where it happened and which images the batch held.
"""

from __future__ import annotations

import logging
import math

import torch
from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.utils import CommonKeys

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the weights were not updated with it."""


class NonFiniteLossGuard:
    """Raise :class:`NonFiniteLossError` on a non-finite loss (or gradient) of a MONAI ``SupervisedTrainer``.

    Args:
        check_gradients: also check the gradients after backward (skipped under AMP).
        max_files: how many image files of the offending batch the message names.
    """

    def __init__(self, check_gradients: bool = True, max_files: int = 8) -> None:
        self.check_gradients = check_gradients
        self.max_files = max_files

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_learning_rate)
        if self.check_gradients:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_grads)

    def _where(self, engine: Engine) -> str:
        state = engine.state
        where = f"epoch {state.epoch}, iteration {state.iteration}"
        batch = state.batch if isinstance(state.batch, dict) else {}
        files = batch.get("filename")
        if isinstance(files, (list, tuple)) and files:
            shown = ", ".join(map(str, files[: self.max_files])) + (", ..." if len(files) > self.max_files else "")
            where += f" (batch images: {shown})"
        return where

    def _stop(self, engine: Engine, what: str) -> None:
        lr = [group["lr"] for group in engine.optimizer.param_groups] if getattr(engine, "optimizer", None) else []
        message = (
            f"training stopped: {what} at {self._where(engine)}. The weights were not updated with it; the "
            "checkpoints already on disk (best model, resume checkpoint of the last finished epoch) are intact. "
            f"Usual causes: a learning rate too high (now {lr}), damaged or extreme input images, AMP overflow."
        )
        logger.error(message)
        raise NonFiniteLossError(message)

    def check_loss(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(CommonKeys.LOSS) if isinstance(output, dict) else None
        if loss is None:
            return
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(loss)
        if not torch.isfinite(value).all():
            shown = value.item() if value.numel() == 1 else value.flatten()[:4].tolist()
            self._stop(engine, f"the loss is {shown}")

    def check_learning_rate(self, engine: Engine) -> None:
        """Stop before a step whose size overflows the parameters' dtype (or is not finite)."""
        optimizer = getattr(engine, "optimizer", None)
        for group in optimizer.param_groups if optimizer is not None else ():
            lr, params = group.get("lr"), [p for p in group["params"] if p.is_floating_point()]
            if not isinstance(lr, (int, float)) or not params:
                continue
            # Adam-like optimizers divide the rate by the first moment's bias correction, >= 1 - beta1
            betas = group.get("betas")
            step = float(lr) / (1.0 - float(betas[0])) if betas and float(betas[0]) < 1 else float(lr)
            dtype = params[0].dtype
            if not math.isfinite(step) or abs(step) > torch.finfo(dtype).max:
                self._stop(engine, f"the learning rate {lr} makes the optimizer step overflow {dtype}")

    def check_grads(self, engine: Engine) -> None:
        if getattr(engine, "amp", False):
            return
        state = engine.state
        if getattr(state, "grad_norm_iteration", None) == state.iteration and math.isfinite(state.grad_norm):
            return  # this backward's global norm (GradientNormClipping) is finite, so is every gradient
        grads = [p.grad for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # largest magnitude per tensor: NaN and inf propagate, finite values cannot overflow (unlike a norm)
        largest = float(torch.stack([g.detach().abs().amax().float() for g in grads]).amax())
        if not math.isfinite(largest):
            self._stop(engine, f"a gradient is {largest}")
