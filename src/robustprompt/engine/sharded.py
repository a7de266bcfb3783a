"""The per-image loop shared by `eval` and `tta`: exact sharding across processes, one record per
image appended after every batch, a progress bar, and resume from whatever was recorded."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.base import Split
from . import runlog
from .rundir import RunDir
from .runlog import progress_bar

log = logging.getLogger("robustprompt")


def aa_chunk(threats: Iterable) -> Optional[int]:
    """The chunk size the per-image loop must keep whole when an AutoAttack is among `threats`
    (ThreatModels), else None. Two AutoAttacks with different chunk sizes cannot both be aligned."""
    sizes = {t.aa_chunk for t in threats if t.attack == "autoattack" and not t.is_clean}
    if len(sizes) > 1:
        from ..errors import ConfigError

        raise ConfigError(f"AutoAttacks with different aa_chunk ({sorted(sizes)}) in one run; use one chunk size")
    return sizes.pop() if sizes else None


BatchFn = Callable[[torch.Tensor, torch.Tensor, list[int]], list[dict]]
PREFETCH_BATCHES = 4   # batches each worker decodes ahead: the next batch is ready when a step ends


def loader_options(device: torch.device, workers: int) -> dict:
    """DataLoader options that keep an accelerator fed: decoding in `workers` processes that stay
    alive across epochs and read PREFETCH_BATCHES ahead, and pinned (page-locked) host batches on
    CUDA so the copy to the GPU can be asynchronous (`.to(device, non_blocking=True)`). Pinning
    on a CPU-only run would only cost a copy; prefetch and persistence need workers."""
    opts: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return opts


class IndexedImages(Dataset):
    """Images of `split` at the given global indices → (image 3×H×W in [0,1], label, index)."""

    def __init__(self, split: Split, indices: Sequence[int], transform: Callable) -> None:
        self.split, self.indices, self.transform = split, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        return self.transform(self.split.load(idx)), self.split.labels[idx], idx


def run_per_image(
    run: RunDir,
    state,  # accelerate.PartialState
    split: Split,
    indices: Sequence[int],
    transform: Callable,
    process_batch: BatchFn,
    *,
    batch_size: int,
    workers: int = 0,
    desc: str = "",
    progress: bool = True,
    chunk: Optional[int] = None,
) -> Optional[dict[int, dict]]:
    """Run `process_batch` over every index not yet recorded in `run`, this process's share only.

    Shards are contiguous slices of the remaining indices (accelerate's
    `split_between_processes`, no padding, no repeats). A kept record must name the image the
    split now has at its index (`id`); one that does not is redone, with a warning. Returns all
    records on the main process once every process is done (None elsewhere).

    chunk: work in fixed chunks of this many consecutive images of `indices` instead (for an
    attack whose example depends on the images it is run with, AutoAttack): each batch is one
    whole chunk, chunks are resumed and sharded whole, and the records of a chunk that was only
    partly recorded (a kill mid-write) are discarded and the chunk redone, so every image is
    attacked with the same neighbours whatever the batch size, resume point or process count.
    """
    done = run.load_records(ids=split.ids)
    wanted = set(indices)
    stale = [i for i in run.mismatched if i in wanted]
    if stale and state.is_main_process:
        log.warning(f"warning: {len(stale)} recorded images of {run.path} no longer match the images at "
                    f"their indices (first: index {stale[0]}); redoing them")   # stderr and log.txt
    if chunk is None:
        remaining = [i for i in indices if i not in done]
        units: list[list[int]] = [[i] for i in remaining]
    else:
        chunks = [list(indices[s:s + chunk]) for s in range(0, len(indices), chunk)]
        units = [c for c in chunks if any(i not in done for i in c)]
        partial = {i for c in units for i in c if i in done}
        if partial and state.is_main_process:   # keep only whole chunks' records, then redo the rest
            run.rewrite_records({i: r for i, r in done.items() if i not in partial})
        remaining = [i for c in units for i in c]
    # every process must shard the same list: nobody writes before everybody has read
    state.wait_for_everyone()
    with state.split_between_processes(units) as mine_units:
        mine_units = list(mine_units)
    mine = [i for u in mine_units for i in u]
    if chunk is None:
        batches = [list(range(s, min(s + batch_size, len(mine)))) for s in range(0, len(mine), batch_size)]
    else:
        starts = [0]
        for u in mine_units:
            starts.append(starts[-1] + len(u))
        batches = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    device = state.device
    loader = DataLoader(IndexedImages(split, mine, transform), batch_sampler=batches,
                        **loader_options(torch.device(device), workers))
    if state.num_processes > 1:
        desc = f"{desc} [process {state.process_index + 1}/{state.num_processes}]"
    if len(remaining) < len(indices) and state.is_main_process and progress:
        # a log record (stderr, and the run's log.txt), before the bar starts
        log.info("resuming: %d of %d images already done", len(indices) - len(remaining), len(indices))
    bar = progress_bar(len(mine), desc, "img", disable=not (progress and state.is_main_process))
    scalars = runlog.active()   # eval progress into scalars.csv / TensorBoard (main process only)
    seen = {"n": 0, "clean": 0, "adv": 0}
    for x, y, idx in loader:
        t0 = time.perf_counter()
        idx_list = [int(i) for i in idx]
        # asynchronous copies from pinned memory (CUDA); the step that follows waits on them on
        # the GPU's stream, not on the host. Labels for the records come from the host copy.
        records = process_batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx_list)
        sec = (time.perf_counter() - t0) / max(1, len(idx_list))
        records = [{"index": i, "id": split.ids[i], "label": int(label), **rec, "sec": round(sec, 5)}
                   for rec, i, label in zip(records, idx_list, y.tolist())]
        run.append_records(state.process_index, records)
        bar.update(len(idx_list))
        if scalars is not None:
            _log_progress(scalars, seen, records, len(indices) - len(remaining))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = run.load_records(ids=split.ids)
    missing = [i for i in indices if i not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no record after the run (first: {missing[:5]})")
    return {i: records[i] for i in indices}


def _log_progress(scalars: "runlog.RunLog", seen: dict[str, int], records: list[dict], already: int) -> None:
    """Running accuracies of this session's images (this process's shard), stepped by images done."""
    seen["n"] += len(records)
    seen["clean"] += sum(r.get("clean_pred") == r["label"] for r in records)
    seen["adv"] += sum(r.get("adv_pred") == r["label"] for r in records)
    step = already + seen["n"]
    scalars.add("eval/images_done", step, step)
    if any("clean_pred" in r for r in records):
        scalars.add("eval/clean_acc_so_far", 100.0 * seen["clean"] / seen["n"], step)
    if any("adv_pred" in r for r in records):
        scalars.add("eval/robust_acc_so_far", 100.0 * seen["adv"] / seen["n"], step)
