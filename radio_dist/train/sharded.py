"""Sharded checkpoints of FSDP2 students, by ``torch.distributed.checkpoint`` (DCP), read without running code.

A sharded student's checkpoint is a DCP directory: every worker writes its own shards of the weights, the
EMA and the optimizer state (``__RANK_0.distcp``) and rank 0 the index (``.metadata``); nothing is gathered
on one worker. Ray Train merges the workers' directories into one checkpoint. DCP re-shards on load, so the
directory loads into any number of workers, and into a plain (unsharded) module when a job is relaunched on
one worker. The optimizer's hyper-parameters (``param_groups``) are not tensors and travel in rank 0's small
``NAME.pt`` beside it.

Loading never unpickles arbitrary objects, as ``torch.load(weights_only=True)`` does not for ``.pt`` files:
DCP itself reads its ``.metadata`` with plain ``pickle`` and its non-tensor entries with
``torch.load(weights_only=False)``, so ``load_sharded`` checks the metadata with an unpickler that admits
only DCP's own record classes, dtypes, sizes and paths, and refuses non-tensor entries (radio-dist writes
none).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

DCP_PACKAGE = "torch.distributed.checkpoint"
METADATA_FILE = ".metadata"  # DCP's index, written by the coordinator (rank 0)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class CheckpointContentError(ValueError):
    """A checkpoint holds something other than what radio-dist writes (it is refused, not run)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's record classes (defined in ``torch.distributed.checkpoint``), torch dtypes and the few
    plain classes above; anything else (a function to call, a dotted name to reach one) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module == DCP_PACKAGE or module.startswith(DCP_PACKAGE + "."):
                obj = super().find_class(module, name)
                if isinstance(obj, type) and obj.__module__ == module:
                    return obj
        raise CheckpointContentError(f"{module}.{name}")


class _CheckedReader(FileSystemReader):
    """DCP's file reader, after the metadata passed the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as f:
                _MetadataUnpickler(f).load()
        except CheckpointContentError as e:
            raise CheckpointContentError(
                f"{path}: the checkpoint's index names {e}, which a radio-dist checkpoint never holds — it was "
                "not written by radio-dist (or was tampered with); it is not loaded. Start a new run "
                "directory (--out) or restore the checkpoint from a copy you trust"
            ) from None
        return super().read_metadata(*args, **kwargs)


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, refusing non-tensor entries (DCP would ``torch.load`` them with code allowed)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointContentError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor: a radio-dist checkpoint holds "
            "only tensors there; it is not loaded"
        )


def _alone() -> bool:
    """No process group: one process reads or writes the whole checkpoint."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet_alone() -> Iterator[None]:
    """DCP warns that it assumes one process even when told so (``no_dist``); the warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def sharded_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, ema: torch.nn.Module | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(tensors, param_groups): this worker's shards of the weights, EMA and optimizer state (keyed by
    parameter names, so they re-shard), and the optimizer's hyper-parameters. An optimizer that has not
    stepped yet gets its state created first (DCP needs every entry it loads to exist)."""
    tensors: dict[str, Any] = {"model": get_model_state_dict(model)}
    if ema is not None:
        tensors["ema"] = get_model_state_dict(ema)
    optim: dict[str, Any] = dict(get_optimizer_state_dict(model, opt))
    tensors["opt"] = optim["state"]
    return tensors, list(optim["param_groups"])


def save_sharded(tensors: dict[str, Any], directory: str | Path) -> None:
    """Write this worker's shards (and, on rank 0, the index) under ``directory``; every worker calls it."""
    import torch.distributed.checkpoint as dcp

    with _quiet_alone():
        dcp.save(tensors, storage_writer=FileSystemWriter(str(directory)), no_dist=_alone())


def load_sharded(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    directory: str | Path,
    param_groups: list[dict[str, Any]],
) -> None:
    """Load a sharded checkpoint into ``model`` / ``opt`` / ``ema`` — sharded over any number of workers, or
    plain — each worker reading the pieces of its own shards. Every worker calls it."""
    import torch.distributed.checkpoint as dcp

    # the index is checked here, before DCP reads it again inside its collectives (which would bury a refusal)
    index = _CheckedReader(str(directory)).read_metadata()
    saved_ema = any(k.startswith("ema.") for k in index.state_dict_metadata)  # MESA may be on only now
    with_ema = ema if ema is not None and saved_ema else None
    tensors, _ = sharded_state(model, opt, with_ema)
    with _quiet_alone():
        dcp.load(
            tensors,
            storage_reader=_CheckedReader(str(directory)),
            planner=_TensorsOnlyPlanner(),
            no_dist=_alone(),
        )
    set_model_state_dict(model, tensors["model"])
    if with_ema is not None:
        set_model_state_dict(with_ema, tensors["ema"])
    set_optimizer_state_dict(model, opt, {"state": tensors["opt"], "param_groups": param_groups})
