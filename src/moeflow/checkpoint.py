"""Checkpoints of MoE models (and their optimizer) with ``torch.distributed.checkpoint`` (DCP),
loadable on another number of ranks, another mesh and another placement.

Routed experts are saved as *logical* experts, one key per expert and weight
(``model.<layer>.experts.w1.<e>``, see :func:`expert_key`: ``[D, F]``; ``w2``: ``[F, D]``;
``w3``: ``[D, F]``), written by the
ranks that hold the expert's first replica (its lowest slot); the optimizer's per-slot state
(Adam's ``exp_avg``, ...) the same way, under the parameter's key. When FSDP2 shards the experts
(:func:`moeflow.parallelize`: dim 1, over the data-parallel ranks of the shard), each such rank
writes its part of the expert (a DTensor). Everything else (router, shared experts, dense
layers, their optimizer state and step counts) is saved as the model's and the optimizer's
state dicts hold it: replicated tensors once, FSDP2's DTensors shard by shard; DCP reshards
them on load. The layers' placement (``slots.phy2log``) is not part of the checkpoint.

Loading reads, on each rank, exactly the logical experts its slots hold under the loading
layer's placement and mesh, so a checkpoint loads into any number of ranks, any ``(dp, ep)``
mesh and any placement: saved on 2 dp x 2 ep and loaded on 1 x 4, 4 x 1 or 1 x 2, saved with
replicas and loaded without, or loaded straight into a placement planned for the ranks left
after a failure (``placements=``, e.g. from :func:`moeflow.balance.replan_after_loss`).

Every rank of the job calls :func:`save` / :func:`load` (they are collective).

Saves are atomic and verified. A save writes into a fresh sibling directory, ``<dir>.tmp-<id>``;
once every rank has written, each one checksums its own files (a CRC-32 per 64 MiB) while it
fsyncs them, and rank 0 writes a manifest (``moeflow-manifest.json``: every file's name, size
and CRC-32s, and the manifest's own CRC-32), then publishes: renames an existing ``<dir>`` to
``<dir>.old-<id>``, renames the new directory to ``<dir>`` and removes the old one. Each rename
is atomic, so ``<dir>`` is at any time the old checkpoint whole, the new one whole, or (a crash
between the two renames) absent, and :func:`load` then reads ``<dir>.old-<id>``: the last
checkpoint published. A save that dies earlier leaves ``<dir>`` untouched; the next save to
``<dir>`` removes what it left. Nothing of an earlier save (shards of a run with more ranks, say)
survives in the new directory.

:func:`load` checks the manifest before it touches a weight: every file it lists present with its
size and CRC-32s, no other file; the ranks split the checksumming. Any damaged, truncated,
missing, extra or foreign file raises :class:`CheckpointError` on every rank, naming the file and
what is wrong. One save to a directory at a time: concurrent saves to one ``<dir>`` are not supported.

Their collectives are watched (:class:`~moeflow.comm.health.Watchdog`): a rank lost during a save or
a load is a ``PeerFailureError`` naming it on the others within the process group's timeout (give
the group moeflow's, ``MOEFLOW_TIMEOUT_S``); a save cut short that way leaves ``<dir>`` as it was.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import shutil
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard

from .balance.replicas import check_phy2log
from .comm.health import Watchdog, resolve_timeout
from .layer import MoELayer
from .parallel.mesh import is_dtensor, local_tensor

__all__ = ["save", "load", "load_experts", "expert_key", "CheckpointError", "MANIFEST"]

_EXPERT_WEIGHTS = ("w1", "w2", "w3")
_NOT_SAVED = ("slots.phy2log",)  # the placement belongs to the run, not to the weights
MANIFEST = "moeflow-manifest.json"  # in every checkpoint directory; written last
_FORMAT = "moeflow.checkpoint/1"
_DCP_METADATA = ".metadata"  # DCP's own index, written by rank 0
# One CRC-32 per 64 MiB of a file: the unit that a rank's threads (save) and the ranks (load)
# split between them; a 10 GB shard has 150 of them in the manifest.
_CHUNK = 64 << 20
_READ = 8 << 20  # bytes read at a time


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it was saved (a file damaged, truncated, missing, left
    by another save, or no manifest) or does not fit the model, or a save that could not be
    written or published. Raised on every rank of the group with the same message.

    Attributes:
        path: the checkpoint directory.
        problems: ``[(file, what is wrong)]``, ``file`` relative to ``path`` (``""``: the directory).
    """

    def __init__(self, where: str, path: str, problems: list[tuple[str, str]]):
        shown = [f"{os.path.join(path, f) if f else path} {what}" for f, what in problems[:8]]
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        super().__init__(f"moeflow.checkpoint.{where}: " + "; ".join(shown) + more)
        self.path, self.problems = path, problems


def expert_key(layer_name: str, weight: str, expert: int) -> str:
    """Checkpoint key (as DCP stores it) of logical ``expert``'s ``weight`` (``"w1"``, ``"w2"``,
    ``"w3"``) in a layer; its optimizer state lies under ``optim.state.<key without model.>.<name>.<e>``."""
    return f"model.{layer_name}.experts.{weight}.{expert}" if layer_name else f"model.experts.{weight}.{expert}"


def _moe_layers(model: nn.Module, where: str) -> dict[str, MoELayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moeflow.checkpoint.{where}: `model` must be an nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError(f"moeflow.checkpoint.{where}: `model` ({type(model).__name__}) holds no MoELayer")
    return layers


def _expert_params(layers: Mapping[str, MoELayer]) -> dict[str, tuple[MoELayer, str]]:
    """``{parameter key: (layer, weight name)}`` of every routed expert weight."""
    return {(f"{name}." if name else "") + f"experts.{w}": (layer, w) for name, layer in layers.items()
            for w in _EXPERT_WEIGHTS}


def _row(t: torch.Tensor, slot: int) -> torch.Tensor:
    """Row ``slot`` of a per-slot tensor ``[L, ...]`` as this rank saves or loads it: a tensor,
    or, when FSDP2 splits ``t`` along dim 1, this rank's part of a DTensor of the whole row."""
    row = local_tensor(t)[slot]
    if not is_dtensor(t):
        return row
    (placement,) = t.placements
    if placement != Shard(1) or t.device_mesh.ndim != 1:
        raise TypeError(f"moeflow.checkpoint: expert tensors sharded as {t.placements} over a {t.device_mesh.ndim}-D "
                        "mesh are not supported; moeflow.parallelize shards them Shard(1) over one dim")
    shape = t.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(row, t.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _written_slots(layer: MoELayer) -> dict[int, int]:
    """``{local slot: logical expert}`` for the experts whose first replica (lowest slot) lives here."""
    L, rank = layer.slots.num_local_experts, layer.buffer.rank
    first = layer.slots.log2phy[:, 0].tolist()  # host sync: one int per expert
    return {slot % L: e for e, slot in enumerate(first) if slot // L == rank}


def _per_expert(t: torch.Tensor, slots: Mapping[int, int], fresh: bool) -> dict[str, torch.Tensor]:
    """``{str(e): row}`` of per-slot tensor ``t`` for ``slots`` ``{local slot: logical expert}``;
    ``fresh`` gives empty rows of the right shape to load into, else copies to save (a row view
    would drag the whole ``[L, ...]`` storage into the file)."""
    out = {}
    for slot, e in slots.items():
        row = _row(t, slot)
        out[str(e)] = torch.empty_like(row) if fresh else row.detach().clone()
    return out


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layers: Mapping[str, MoELayer],
           for_load: bool) -> tuple[dict, list[tuple[dict, str, torch.Tensor, MoELayer]]]:
    """The dict DCP saves or loads into, and where its per-expert entries stand in for per-slot
    tensors: ``(container, key, tensor, layer)`` with ``container[key] = {str(e): row}``."""
    experts = _expert_params(layers)
    skipped = {(f"{n}." if n else "") + k for n in layers for k in _NOT_SAVED}
    state = {"model": {k: v for k, v in model.state_dict().items() if k not in skipped}}
    stand_ins = [(state["model"], key, getattr(layer.experts, w), layer) for key, (layer, w) in experts.items()]
    if optimizer is not None:
        # FQN-keyed; on load it also creates the state of an optimizer that never stepped
        optim = get_optimizer_state_dict(model, optimizer)
        # its per-parameter dicts may be the optimizer's own: copies, so the stand-ins go there only
        state["optim"] = dict(optim, state={k: dict(v) for k, v in optim["state"].items()})
        for key, (layer, _) in experts.items():
            held = state["optim"]["state"].get(key, {})
            # per-slot state (like the weight); scalars (Adam's step) stay as they are
            stand_ins += [(held, name, v, layer) for name, v in held.items()
                          if isinstance(v, torch.Tensor) and v.dim() > 0]
    for container, key, tensor, layer in stand_ins:
        slots = dict(enumerate(layer.slots.local_experts())) if for_load else _written_slots(layer)
        container[key] = _per_expert(tensor, slots, fresh=for_load)
    return state, stand_ins


# --------------------------------------------------------------------------- files on disk

def _path(checkpoint_id, where: str) -> str:
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        raise TypeError(f"moeflow.checkpoint.{where}: `checkpoint_id` must be a directory path, got "
                        f"{type(checkpoint_id).__name__}")
    return os.path.normpath(os.fspath(checkpoint_id))


def _group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _gather(obj, group: Optional[dist.ProcessGroup]) -> list:
    """Every rank's ``obj`` (small, picklable), on every rank: how the ranks reach one verdict."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _watched(group: Optional[dist.ProcessGroup], what: str) -> contextlib.AbstractContextManager:
    """The collectives of one save or load under a :class:`~moeflow.comm.health.Watchdog` guard: a
    rank lost in the middle (killed while writing, say) is a ``PeerFailureError`` naming it on the
    others, within the process group's timeout, instead of a Gloo/NCCL error naming a socket or a
    hang. Every rank calls save/load in the same order, so a watchdog per call lines up."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return contextlib.nullcontext()
    return Watchdog(group, resolve_timeout(None), name="checkpoint").guard(what)


def _chunks(size: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, length)]`` covering ``size`` bytes (one empty chunk for an empty file)."""
    return [(start, min(chunk, size - start)) for start in range(0, size, chunk)] or [(0, 0)]


def _crc_of(path: str, start: int, length: int) -> str:
    crc, done = 0, 0
    buf = memoryview(bytearray(min(_READ, length) or 1))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while done < length and (n := f.readinto(buf[:min(_READ, length - done)])):
            crc = zlib.crc32(buf[:n], crc)
            done += n
    return f"{crc:08x}"


def _num_threads() -> int:
    """Threads one rank checksums with: its share of the machine's cores (zlib releases the GIL),
    at most 8. While a checkpoint is written or read the cores have little else to do."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if cpus == os.cpu_count():  # not pinned to this rank's share: take it
        cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cpus))


def _crcs(jobs: list[tuple[str, int, int]]) -> list[str]:
    """CRC-32 of each ``(path, start, length)``, on :func:`_num_threads` threads. CRC-32, not a
    cryptographic hash: it guards against damage, not forgery, and is the fastest the standard
    library has (benchmarks/bench_checkpoint.py prints the rates: ~2.2 GB/s a core here, sha256
    1.1-1.5, blake2b 0.5-0.7)."""
    threads = min(len(jobs), _num_threads())
    if threads <= 1:
        return [_crc_of(*job) for job in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: _crc_of(*job), jobs))


def _checksum(directory: str, names: list[str], chunk: int = _CHUNK) -> dict[str, dict]:
    """``{name: {"size": bytes, "crc32": [hex per chunk]}}`` of files in ``directory``."""
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in names}
    jobs = [(name, start, length) for name in names for start, length in _chunks(sizes[name], chunk)]
    crcs = _crcs([(os.path.join(directory, name), start, length) for name, start, length in jobs])
    out = {name: {"size": sizes[name], "crc32": []} for name in names}
    for (name, _, _), crc in zip(jobs, crcs):
        out[name]["crc32"].append(crc)
    return out


def _fsync(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (new files, renames) durable; a no-op where unsupported."""
    try:
        _fsync([path])
    except OSError:
        pass


def _siblings(target: str) -> list[tuple[str, str, str]]:
    """``[(kind, save id, path)]`` of ``<target>.tmp-<id>`` (a save in progress or dead) and
    ``<target>.old-<id>`` (a checkpoint being replaced) beside ``target``."""
    parent, name = os.path.split(target)
    pattern = re.compile(re.escape(name) + r"\.(tmp|old)-([0-9a-f]{32})")
    try:
        entries = sorted(os.listdir(parent or "."))
    except OSError:
        return []
    return [(m[1], m[2], os.path.join(parent, e)) for e in entries if (m := pattern.fullmatch(e))]


def _replaceable(target: str) -> Optional[str]:
    """Why a save must not replace ``target``, or None: absent, empty or a checkpoint."""
    try:
        if not os.path.lexists(target):
            return None
        if not os.path.isdir(target):
            return "is not a directory"
        entries = os.listdir(target)
    except OSError as e:
        return f"cannot be read ({e})"
    if entries and MANIFEST not in entries and _DCP_METADATA not in entries:
        return (f"is a directory of {len(entries)} files that is not a checkpoint (no {MANIFEST} or "
                f"{_DCP_METADATA}); the save would replace it, so it refuses")
    return None


def _manifest_crc(body: dict) -> str:
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def _write_manifest(directory: str, save_id: str, files: dict[str, dict], chunk: int = _CHUNK) -> None:
    body = {"format": _FORMAT, "save_id": save_id, "chunk_bytes": chunk, "files": files}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"manifest_crc32": _manifest_crc(body), **body}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)  # every file's directory entry, before the directory is published


class _Bad(Exception):
    """One problem with one file of a checkpoint (``file`` relative to it, ``""``: the directory)."""

    def __init__(self, file: str, what: str):
        super().__init__(file, what)
        self.file, self.what = file, what


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise _Bad(MANIFEST, "is missing: the directory was not written by moeflow.checkpoint.save, or its save "
                             "did not finish")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode())
        crc = doc.pop("manifest_crc32")
    except (ValueError, KeyError, AttributeError, TypeError):  # bad UTF-8 or JSON, not a dict, no CRC
        raise _Bad(MANIFEST, "is damaged (not the JSON a save writes)") from None
    if crc != _manifest_crc(doc):
        raise _Bad(MANIFEST, "is damaged (its CRC-32 does not match its contents)")
    if doc.get("format") != _FORMAT:
        raise _Bad(MANIFEST, f"has format {doc.get('format')!r}; this moeflow reads {_FORMAT!r}")
    return doc


def _share(units: list[tuple[str, int, int]], num_ranks: int) -> list[list[tuple[str, int, int]]]:
    """The ``(file, start, length)`` chunks each rank checksums on load: longest first, each to the
    rank with the fewest bytes so far (every rank computes the same split from the same manifest)."""
    heap = [(0, r) for r in range(num_ranks)]
    out: list[list[tuple[str, int, int]]] = [[] for _ in range(num_ranks)]
    for unit in sorted(units, key=lambda u: (-u[2], u)):
        load, r = heapq.heappop(heap)
        out[r].append(unit)
        heapq.heappush(heap, (load + unit[2], r))
    return out


def _check(directory: str, manifest: dict, rank: int, num_ranks: int) -> list[tuple[str, str]]:
    """This rank's findings: files missing, extra or of the wrong size (every rank looks), and
    chunks whose CRC-32 differs (among this rank's share)."""
    files, chunk = manifest["files"], manifest["chunk_bytes"]
    present = set(os.listdir(directory)) - {MANIFEST}
    problems = [(f, "is missing") for f in sorted(files.keys() - present)]
    problems += [(f, "is not part of this checkpoint (left by another save?)") for f in sorted(present - files.keys())]
    units = []
    for f in sorted(files.keys() & present):
        size, want = os.path.getsize(os.path.join(directory, f)), files[f]["size"]
        if size < want:
            problems.append((f, f"is truncated ({size} of {want} bytes)"))
        elif size > want:
            problems.append((f, f"has {size} bytes, the manifest says {want}"))
        else:
            units += [(f, start, length) for start, length in _chunks(size, chunk)]
    mine = _share(units, num_ranks)[rank]
    for (f, start, length), got in zip(mine, _crcs([(os.path.join(directory, f), s, n) for f, s, n in mine])):
        want = files[f]["crc32"][start // chunk]
        if got != want:
            problems.append((f, f"is damaged or from another save (bytes {start}-{start + length}: CRC-32 {got}, "
                                f"the manifest says {want})"))
    return problems


def _resolve(target: str) -> tuple[str, Optional[str]]:
    """The directory holding the checkpoint ``target`` names, and a note when it is not ``target``:
    a save that died between its two renames left no ``target``, and the checkpoint it was
    replacing, whole, at ``<target>.old-<id>``."""
    if os.path.isdir(target):
        return target, None
    if os.path.lexists(target):
        raise _Bad("", "is not a directory")
    # whole ones only (a removal deletes the manifest first); the one whose save died publishing
    # has its .tmp- sibling, of the same id, still there
    siblings = _siblings(target)
    old = [(i, p) for kind, i, p in siblings if kind == "old" and os.path.exists(os.path.join(p, MANIFEST))]
    if not old:
        raise _Bad("", "does not exist")
    unpublished = {i for kind, i, _ in siblings if kind == "tmp"}
    _, found = max(old, key=lambda ip: (ip[0] in unpublished, os.path.getmtime(ip[1])))
    return found, (f"moeflow.checkpoint.load: {target} is missing: a save died while replacing it; loading the "
                   f"checkpoint it was replacing, {found}")


def _verify(target: str, group: Optional[dist.ProcessGroup]) -> str:
    """Check the checkpoint ``target`` against its manifest on every rank of ``group``, each rank
    checksumming its share of the files; returns the directory to read. Raises
    :class:`CheckpointError` on every rank if any rank found a problem."""
    rank = _group_rank(group)
    num_ranks = dist.get_world_size(group) if dist.is_initialized() else 1
    directory, save_id, note, problems = target, None, None, []
    try:
        directory, note = _resolve(target)
        manifest = _read_manifest(directory)
        save_id = manifest["save_id"]
        problems += _check(directory, manifest, rank, num_ranks)
    except _Bad as e:
        problems.append((e.file, e.what))
    except OSError as e:
        inside = e.filename is not None and os.path.dirname(os.fspath(e.filename)) == directory
        problems.append((os.path.basename(e.filename) if inside else "", f"cannot be read ({e.strerror or e})"))
    # One collective: every rank sees every rank's findings and reaches the same verdict.
    views = _gather((directory, save_id, problems), group)
    found = sorted({p for _, _, ps in views for p in ps})
    if len({(d, s) for d, s, _ in views}) > 1:
        found.append(("", "was read differently by the ranks: " +
                      ", ".join(f"rank {r}: {d} (save {s})" for r, (d, s, _) in enumerate(views))))
    if found:
        raise CheckpointError("load", directory, found)
    if note and rank == 0:
        warnings.warn(note, stacklevel=3)
    return directory


def _begin_save(target: str, group: Optional[dist.ProcessGroup]) -> tuple[str, str]:
    """Agree on the save's id across ranks and check ``target`` may be replaced; returns
    ``(temporary directory, save id)``."""
    # One collective: rank 0's id for all; every rank sees what every rank was asked to write.
    views = _gather((target, uuid.uuid4().hex, _replaceable(target)), group)
    if len({t for t, _, _ in views}) > 1:
        raise ValueError("moeflow.checkpoint.save: the ranks passed different `checkpoint_id`s: " +
                         ", ".join(f"rank {r}: {t!r}" for r, (t, _, _) in enumerate(views)))
    refusals = [(r, why) for r, (_, _, why) in enumerate(views) if why]
    if refusals:
        r, why = refusals[0]
        raise ValueError(f"moeflow.checkpoint.save: `checkpoint_id` {target!r} {why} (rank {r})")
    save_id = views[0][1]
    return f"{target}.tmp-{save_id}", save_id


_WRITER = re.compile(r"__(\d+)_")  # DCP names the files rank r writes "__<r>_<n>.distcp"


def _finish_save(target: str, tmp: str, save_id: str, metadata, group: Optional[dist.ProcessGroup]) -> None:
    """Checksum, write the manifest and publish (see the module docstring); every rank returns
    once rank 0 has published, or raises :class:`CheckpointError`."""
    rank = _group_rank(group)
    num_ranks = dist.get_world_size(group) if dist.is_initialized() else 1

    def writer(name: str) -> int:
        m = _WRITER.match(name)
        return int(m[1]) if m and int(m[1]) < num_ranks else 0  # anything else (.metadata): rank 0

    # Each rank checksums the files it wrote (its page cache, its share of the time) while
    # another thread makes them durable: the CRCs take CPU, the fsyncs wait on the disk.
    mine, problem = {}, None
    try:
        names = [name for name in sorted(os.listdir(tmp)) if writer(name) == rank]
        with ThreadPoolExecutor(1) as pool:
            synced = pool.submit(_fsync, [os.path.join(tmp, name) for name in names])
            mine = _checksum(tmp, names)
            synced.result()
    except OSError as e:
        problem = (os.path.basename(e.filename or ""), f"cannot be checksummed by rank {rank} ({e.strerror or e})")
    # Collective: rank 0 gets every rank's checksums; every rank has finished writing.
    views = _gather((mine, problem), group)
    problems = [p for _, p in views if p]
    if rank == 0 and not problems:
        files = {name: d for m, _ in views for name, d in m.items()}
        written = {info.relative_path for info in metadata.storage_data.values()} | {_DCP_METADATA}
        problems = [(f, "was not written") for f in sorted(written - files.keys())]
        if not problems:
            try:
                _write_manifest(tmp, save_id, files)
                _publish(tmp, target, save_id)
            except OSError as e:
                problems = [("", f"could not be published as {target} ({e})")]
    # Collective: nobody returns before the checkpoint is published (or the save failed).
    problems = _gather(problems, group)[0]
    if problems:
        if rank == 0:
            _remove(tmp)
        raise CheckpointError("save", tmp, problems)


def _publish(tmp: str, target: str, save_id: str) -> None:
    """Rank 0: make ``tmp`` the checkpoint ``target`` (two atomic renames), then remove the old one."""
    old = None
    if os.path.lexists(target):
        old = f"{target}.old-{save_id}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)  # the old checkpoint back where it was
        raise
    _fsync_dir(os.path.dirname(target) or ".")
    # the replaced checkpoint, and whatever earlier saves that died left beside it
    for _, _, path in _siblings(target):
        _remove(path)


def _remove(directory: str) -> None:
    """Delete a checkpoint directory if it can, its manifest first: a removal cut short leaves no
    checkpoint. A link (to a checkpoint the user keeps elsewhere) goes, not what it names."""
    try:
        os.remove(directory if os.path.islink(directory) else os.path.join(directory, MANIFEST))
    except OSError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- save / load

def save(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         optimizer: Optional[torch.optim.Optimizer] = None,
         process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Save ``model`` (an :class:`MoELayer` or a module holding some) and, if given, ``optimizer``
    to the directory ``checkpoint_id``, atomically (see the module docstring).

    Args:
        model: the module (FSDP2-sharded by :func:`moeflow.parallelize` or not).
        checkpoint_id: a directory: absent, empty, or a checkpoint (replaced whole once every rank
            has written the new one). Every rank passes the same path.
        optimizer: its state is saved too (per-parameter tensors and step counts; the
            hyperparameters of its param groups as well).
        process_group: the group whose ranks write (default: the world); every rank of it calls.

    Raises:
        ValueError: the ranks passed different paths, or ``checkpoint_id`` is a file or a
            directory that is not a checkpoint (nothing is written).
        CheckpointError: on every rank: the files could not be written, checksummed or published
            (``checkpoint_id`` is left as it was).
        PeerFailureError: a rank of the group was lost during the save (on the others, naming
            it; ``checkpoint_id`` is left as it was).
    """
    layers = _moe_layers(model, "save")
    target = _path(checkpoint_id, "save")
    with _watched(process_group, "save"):
        tmp, save_id = _begin_save(target, process_group)
        try:
            metadata = _write(model, optimizer, layers, tmp, process_group, sync_files=False)  # fsynced below
        except CheckpointException as e:
            if _group_rank(process_group) == 0:  # DCP raises on every rank, once every rank stopped writing
                _remove(tmp)
            raise CheckpointError("save", tmp, [("", f"could not be written ({_summary(e)})")]) from e
        _finish_save(target, tmp, save_id, metadata, process_group)


def _write(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layers: Mapping[str, MoELayer],
           directory: str, process_group: Optional[dist.ProcessGroup], sync_files: bool = True):
    """What :func:`save` writes, into ``directory`` as it is; returns DCP's metadata."""
    state, _ = _state(model, optimizer, layers, for_load=False)
    writer = dcp.FileSystemWriter(directory, sync_files=sync_files)
    return dcp.save(state, storage_writer=writer, process_group=process_group)


def load(model: nn.Module, checkpoint_id: Union[str, os.PathLike], *,
         optimizer: Optional[torch.optim.Optimizer] = None,
         process_group: Optional[dist.ProcessGroup] = None,
         placements: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), in place,
    after checking every file of it against its manifest (nothing is touched if one fails).

    Args:
        model: built like the saved one (same sizes and expert counts); the number of ranks, the
            mesh, FSDP2 and the placement may differ.
        checkpoint_id: the directory :func:`save` wrote.
        optimizer: built over ``model``'s parameters like the saved one (it may never have
            stepped); needs a checkpoint saved with its optimizer.
        process_group: the group whose ranks read (default: the world); every rank of it calls.
        placements: optional ``{layer name: phy2log [S] int64}`` ("" for a bare MoELayer): the
            layer takes this placement before its experts are read (S must be the layer's
            ``num_slots``), so a re-planned placement is applied with no weight transfer.

    Raises:
        CheckpointError: on every rank: the checkpoint does not exist, a file of it is damaged,
            truncated, missing, or not its own (see :attr:`CheckpointError.problems`; nothing
            was touched), or it lacks keys or shapes of ``model`` (DCP's error, summarised).
        ValueError / TypeError: no MoELayer in ``model``, a placement for an unknown layer or
            of the wrong size (before any collective).
        PeerFailureError: a rank of the group was lost during the load (on the others, naming it).
    """
    layers = _moe_layers(model, "load")
    target = _path(checkpoint_id, "load")
    for name, phy2log in (placements or {}).items():
        if name not in layers:
            raise ValueError(f"moeflow.checkpoint.load: `placements` names layer {name!r}, but the model's "
                             f"MoELayers are {sorted(layers)}")
        layer = layers[name]
        if not isinstance(phy2log, torch.Tensor) or tuple(phy2log.shape) != (layer.slots.num_slots,):
            raise ValueError(f"moeflow.checkpoint.load: `placements[{name!r}]` must be a [{layer.slots.num_slots}] "
                             f"tensor (the layer's num_slots), got {phy2log!r}")
        check_phy2log(phy2log, layer.num_experts, layer.slots.num_slots,
                      f"moeflow.checkpoint.load: `placements[{name!r}]`", layer.buffer.rank)
    with _watched(process_group, "load"):
        directory = _verify(target, process_group)
        try:
            _read(model, optimizer, layers, directory, process_group, placements)
        except CheckpointException as e:  # DCP raises it on every rank
            raise CheckpointError("load", directory, [("", f"does not fit the model ({_summary(e)})")]) from e


def _summary(e: CheckpointException) -> str:
    """The first line of each rank's error in DCP's exception, ranks with the same one together."""
    ranks: dict[str, list[int]] = {}
    for r, (cause, _) in sorted(e.failures.items()):
        lines = str(cause).strip().splitlines()
        ranks.setdefault(f"{type(cause).__name__}: {lines[0] if lines else ''}", []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {what}"
                     for what, rs in ranks.items())


@torch.no_grad()
def _read(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layers: Mapping[str, MoELayer],
          directory: str, process_group: Optional[dist.ProcessGroup],
          placements: Optional[Mapping[str, torch.Tensor]]) -> None:
    """:func:`load` once the files are verified: the placements, then the weights."""
    for name, phy2log in (placements or {}).items():
        # through load_state_dict: the slots check the placement and re-derive their tables
        layers[name].slots.load_state_dict({"phy2log": phy2log.to(layers[name].slots.phy2log)})
    state, stand_ins = _state(model, optimizer, layers, for_load=True)
    dcp.load(state, checkpoint_id=directory, process_group=process_group)
    # the other tensors were loaded in place; each expert row goes back into its slots
    for container, key, tensor, layer in stand_ins:
        rows = container[key]
        for slot, e in enumerate(layer.slots.local_experts()):
            local_tensor(tensor)[slot].copy_(local_tensor(rows[str(e)]))
        container[key] = tensor
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


@torch.no_grad()
def load_experts(model: nn.Module, checkpoint_id: Union[str, os.PathLike], experts: Mapping[str, list[int]], *,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Load only some logical experts from a checkpoint written by :func:`save`, in place.

    Each rank fills its slots that hold one of ``experts`` (the weights, and with ``optimizer``
    their per-slot state, e.g. Adam's moments; per-tensor scalars such as Adam's ``step`` stay);
    everything else in ``model`` and ``optimizer`` is left as it is. For experts whose every
    replica was lost with a rank (:mod:`moeflow.elastic`): the rest of the model keeps its newer
    weights.

    Args:
        model: as for :func:`load` (not FSDP2-sharded experts).
        checkpoint_id: the directory :func:`save` wrote.
        experts: ``{layer name: [logical expert, ...]}`` ("" for a bare MoELayer).
        optimizer: its per-slot state of those experts is loaded too (the checkpoint must hold it).
        process_group: the group whose ranks read (default: the world); every rank of it calls,
            with the same ``experts``.

    Raises:
        CheckpointError: as :func:`load` (the files are verified against the manifest first).
    """
    layers = _moe_layers(model, "load_experts")
    unknown = sorted(set(experts) - set(layers))
    if unknown:
        raise ValueError(f"moeflow.checkpoint.load_experts: `experts` names layers {unknown}; the model's MoELayers "
                         f"are {sorted(layers)}")
    state: dict = {"model": {}, "optim": {"state": {}}}
    targets = []  # (container, key, tensor whose rows the slots are)
    for key, (layer, w) in _expert_params({n: layers[n] for n in experts}).items():
        name = key[:-len(f"experts.{w}")].rstrip(".")
        wanted = set(experts[name])
        slots = {slot: e for slot, e in enumerate(layer.slots.local_experts()) if e in wanted}
        param = getattr(layer.experts, w)
        tensors = [(state["model"], key, param)]
        if optimizer is not None:
            held = optimizer.state.get(param, {})
            per_slot = {k: v for k, v in held.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            container = state["optim"]["state"].setdefault(key, {})
            tensors += [(container, k, v) for k, v in per_slot.items()]
        for container, k, t in tensors:
            container[k] = _per_expert(t, slots, fresh=True)
            targets.append((container, k, t, slots))
    with _watched(process_group, "load_experts"):
        directory = _verify(_path(checkpoint_id, "load_experts"), process_group)  # nothing read from a bad one
        try:
            dcp.load(state, checkpoint_id=directory, process_group=process_group)
        except CheckpointException as e:  # DCP raises it on every rank
            raise CheckpointError("load_experts", directory,
                                  [("", f"does not fit the model ({_summary(e)})")]) from e
    for container, k, t, slots in targets:
        for slot, e in slots.items():
            local_tensor(t)[slot].copy_(local_tensor(container[k][str(e)]))
