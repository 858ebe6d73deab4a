"""Training: ``train(config)`` (``loop.py``) over ``train_step`` (``step.py``).

- ``loop.py``      ``train()``: the step loop, evaluation / sharpness / checkpoints / interruption on schedule
- ``setup.py``     before the first step: threads, model, task and device, LoRA-GA's gradient estimate
- ``handshake.py`` process 0's plan and claim of the run folder, heard by every process
- ``data_order.py`` which examples each step trains on: a pure function of (seed, epoch)
- ``progress.py``  the loop's counters, the summary, checkpoints and the restore from one
- ``interrupt.py`` SIGINT / SIGTERM: checkpoint after this step and stop
- ``step.py``      one optimizer step (``TrainState``, ``train_step``) and its instrumentation
- ``evaluate.py``  held-out loss, accuracy / macro-F1, exact match by greedy decoding
- ``optim.py``     AdamW and the learning-rate schedule

The loss itself is ``dynamics.loss`` (evaluation and curvature use it too).
"""

from dynamics.training.loop import train
from dynamics.training.step import StepResult, TrainState, train_step

__all__ = ["StepResult", "TrainState", "train", "train_step"]
