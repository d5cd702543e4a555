"""TensorBoard (``tensorboard``): the training figures as event files in ``RUN/tensorboard``.

```yaml
train:
  loggers: [tensorboard]        # or: cortex build m.yaml --log tensorboard
```

Needs the optional extra: ``pip install 'cortex[tensorboard]'``. Every number of every
``metrics.jsonl`` line is a scalar under its key at its step (``loss``, ``val_loss``,
``lr``, ``tokens_per_s``, plugin figures such as ``plasticity.0.hebbian.delta``); texts
(sample generations, one at every evaluation, and rollback reasons) are text under the
event's name. Watch them with ``tensorboard --logdir RUN/tensorboard``. A resumed run
drops the events after the step it resumes from, as ``metrics.jsonl`` drops its lines.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import Logger, Settings

INSTALL = "pip install 'cortex[tensorboard]'"
FOLDER = "tensorboard"


class TensorBoard(Logger):
    """Writes ``metrics.jsonl``'s lines to TensorBoard event files in ``RUN/tensorboard``."""

    name = "tensorboard"

    class Settings(Settings):
        flush_secs: int = Field(30, gt=0, description="Seconds between two writes of the event file to disk.")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CortexError(f"the tensorboard logger needs the `tensorboard` package, which is not "
                              f"installed — {INSTALL}") from None
        if context.run_dir is None:
            raise CortexError("the tensorboard logger writes into a run directory; none was given")
        self.folder = context.run_dir / FOLDER
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def log(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        if self.writer is None:  # at the first step written: a resumed run drops what follows it
            self.writer = self._writer_class(str(self.folder), purge_step=step,
                                             flush_secs=self.settings.flush_secs)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        for key, text in texts.items():
            self.writer.add_text(key, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@hookimpl
def cortex_register_components(register):
    register(TensorBoard)
