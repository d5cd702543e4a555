"""Weights & Biases, offline (``wandb``): the training figures as an offline run in ``RUN/wandb``.

```yaml
train:
  loggers: [wandb]              # or: cortex build m.yaml --log wandb
```

Needs the optional extra: ``pip install 'cortex[wandb]'``. Nothing is sent while training:
the run is written to ``RUN/wandb/offline-run-*``, and ``wandb sync RUN/wandb/offline-run-*``
uploads it later, from any machine with network access and a W&B login. Every number of
every ``metrics.jsonl`` line is logged under its key at its step; texts (sample generations,
one at every evaluation, and rollback reasons) are logged under the event's name. A resumed
run is a new offline run.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import Logger, Settings

INSTALL = "pip install 'cortex[wandb]'"


class WandB(Logger):
    """Writes ``metrics.jsonl``'s lines to an offline Weights & Biases run in ``RUN/wandb``."""

    name = "wandb"

    class Settings(Settings):
        project: str = Field("cortex", min_length=1, description="W&B project the run is synced into.")
        run_name: str | None = Field(None, description="Name of the W&B run (default: the run directory's).")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        try:
            self._wandb = importlib.import_module("wandb")
        except ImportError:
            raise CortexError(f"the wandb logger needs the `wandb` package, which is not installed — "
                              f"{INSTALL}") from None
        if context.run_dir is None:
            raise CortexError("the wandb logger writes into a run directory; none was given")
        self.run_dir = context.run_dir
        self.run: Any = None

    def log(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        if self.run is None:  # started at the first step written, so a failed start leaves nothing
            wandb = self._wandb
            self.run = wandb.init(
                project=self.settings.project, name=self.settings.run_name or self.run_dir.name,
                dir=str(self.run_dir), mode="offline",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
        self.run.log({**values, **texts}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


@hookimpl
def cortex_register_components(register):
    register(WandB)
