"""Training: ``train(config)`` (``loop.py``) over ``train_step`` (``step.py``).

- ``loop.py``      the run: setup, the step loop, evaluation / checkpoints / interruption on schedule
- ``step.py``      one optimizer step (``TrainState``, ``train_step``) and its instrumentation
- ``evaluate.py``  held-out loss, accuracy / macro-F1, exact match by greedy decoding
- ``optim.py``     AdamW and the learning-rate schedule

The loss itself is ``dynamics.loss`` (evaluation and curvature use it too).
"""

from dynamics.training.loop import train
from dynamics.training.step import StepResult, TrainState, train_step

__all__ = ["StepResult", "TrainState", "train", "train_step"]
