"""What the least-squares *linear* guess of the noise scores on `swissroll-diffusion`'s metric.

Its expected squared error is ``ᾱ_t`` (``DenoiseTask.linear_guess``): the level a denoiser must
get below to have learnt anything of the roll's shape.  Prints that score and the mean ``ᾱ_t``
over the test points' steps.

    SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/held-out-choice/diffusion_linear.py
"""

from __future__ import annotations

import torch

from selftune.bench.workloads import WORKLOADS, DenoiseTask


class LinearGuess(torch.nn.Module):
    """The task's linear guess as a model the task can evaluate."""

    def __init__(self, task: DenoiseTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, noised: torch.Tensor) -> torch.Tensor:
        return self.task.linear_guess(noised)


def main() -> None:
    task = WORKLOADS["swissroll-diffusion"].task()
    assert isinstance(task, DenoiseTask)
    kept = task.signal[task.test[0][:, -1].long()] ** 2
    with torch.no_grad():
        score = task.evaluate(LinearGuess(task))
    print(f"linear guess: test denoising MSE {score:.4f}; mean ᾱ_t over the test steps", end=" ")
    print(f"{kept.mean():.4f}")


if __name__ == "__main__":
    main()
