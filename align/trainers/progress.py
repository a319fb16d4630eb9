"""A rich progress bar with reward and throughput (or loss and margin), or plain log lines."""

from __future__ import annotations

from collections.abc import Callable


class Progress:
    """A rich progress bar with reward and throughput, or plain log lines."""

    def __init__(self, total: int, start: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.log, self.bar, self.task = log, None, None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if "reward/total/mean" in metrics:
            info = (f"reward {metrics['reward/total/mean']:.3f}  "
                    f"{metrics.get('throughput/tokens_per_s', 0):.0f} tok/s")
        else:
            info = f"loss {metrics.get('loss', float('nan')):.4f}  margin {metrics.get('rewards/margin', 0):.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)  # type: ignore[arg-type]
        elif step % 10 == 0:
            self.log(f"step {step}: {info}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
