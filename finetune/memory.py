"""Peak-memory measurement that means the same thing in metrics, tests and benchmarks.

On CUDA it is the peak of torch's allocator; on CPU it is the process's resident set size, sampled by a
background thread (ru_maxrss can't be reset, so it can't measure a phase such as loading).

What users see: metrics.json's `peak_memory` is the absolute peak during training, i.e. the whole process at its
worst, which is what must fit in the machine (on CPU it equals `time -v`'s maxrss when training is the peak). Next
to it, `train_memory_added` (the training phase's `.delta`) is the part that grows with the recipe: on the tiny
recipe the process holds ~0.6 GB of libraries, tokenizer and model before the first step.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch


def current_rss() -> int:
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager: `.peak` is the highest memory seen inside the block, `.start` the level on entry.

    `.delta` = peak - start is what the block added at its worst moment.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self.end = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int:
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = current_rss()
            self.peak = self.start
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.end = torch.cuda.memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.end = current_rss()
            self.peak = max(self.peak, self.end)
