"""Checkpoints are atomic and verified (issue 14): a save becomes the checkpoint only once every
rank has written it, whatever dies part-way; every file is checked against the manifest before a
weight is touched, and any damaged, truncated, missing, foreign or extra file raises
``moeflow.CheckpointError`` naming it, on every rank.

The model is tests/_train.py's (FSDP2 on a 1 x 2 mesh) with its AdamW, on 2 Gloo ranks. Crashes
are injected at fixed points (a rank calls ``os._exit`` inside the save), not by timing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed as dist

import moeflow
import moeflow.checkpoint as checkpoint
from moeflow import RankError, spawn
from moeflow.parallel.mesh import local_tensor

from _train import build, train

STEPS_A, STEPS_B = 2, 3  # checkpoint A after 2 training steps, B after 3
CRASH = 17  # exit code of a rank killed on purpose


def _weights(model, opt) -> dict:
    """This rank's part of every weight and optimizer state tensor, copied."""
    out = {f"model.{k}": local_tensor(v).detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        out.update({f"optim.{i}.{k}": local_tensor(v).detach().clone() for k, v in opt.state[p].items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained(steps: int):
    model, opt = build(1, 2)
    train(model, opt, range(steps))
    return model, opt


def _nth_call(n: int):
    calls = []
    return lambda *args: calls.append(1) or len(calls) == n


# Where a save dies: rank 1 in the middle of writing its shard (its 3rd tensor), rank 0 after the
# manifest but before the old checkpoint moves aside, rank 0 between moving the old checkpoint
# aside and renaming the new one into place. (module, function, rank, when: target -> hit(*args))
CRASHES = {
    "rank 1 dies writing its shard": (torch, "save", 1, lambda target: _nth_call(3)),
    "rank 0 dies before publishing": (os, "rename", 0, lambda target: lambda src, dst: src == target),
    "rank 0 dies between the renames": (os, "rename", 0, lambda target: lambda src, dst: dst == target),
}


def _crash_when(crash: str, target: str) -> None:
    """From now on, the crash's function kills this process (if it is the crash's rank) when hit."""
    module, name, rank, when = CRASHES[crash]
    real, hit = getattr(module, name), when(target)

    def crashing(*args, **kwargs):
        if dist.get_rank() == rank and hit(*args):
            os._exit(CRASH)
        return real(*args, **kwargs)

    setattr(module, name, crashing)


def _save(path: str, steps: int, crash: str | None = None) -> dict:
    model, opt = _trained(steps)
    if crash is not None:
        _crash_when(crash, path)
    checkpoint.save(model, path, optimizer=opt)
    return _weights(model, opt)


def _save_two(path_a: str, path_b: str) -> tuple[dict, dict]:
    model, opt = _trained(STEPS_A)
    checkpoint.save(model, path_a, optimizer=opt)
    a = _weights(model, opt)
    train(model, opt, range(STEPS_A, STEPS_B))
    checkpoint.save(model, path_b, optimizer=opt)
    return a, _weights(model, opt)


def _load(path: str) -> tuple[dict, list[str]]:
    model, opt = build(1, 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        checkpoint.load(model, path, optimizer=opt)
    return _weights(model, opt), [str(w.message) for w in seen if "moeflow" in str(w.message)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints A and B of one run (B: one step later), and the weights each holds, by rank."""
    root = tmp_path_factory.mktemp("saved")
    a, b = str(root / "a"), str(root / "b")
    out = spawn(_save_two, 2, a, b, timeout_s=120)
    return a, b, [o[0] for o in out], [o[1] for o in out]


def test_round_trip_gives_identical_weights_and_optimizer_state(saved):
    a, _, weights_a, weights_b = saved
    assert sorted(os.listdir(a)) == [".metadata", "__0_0.distcp", "__1_0.distcp", checkpoint.MANIFEST]
    assert not any(_same(wa, wb) for wa, wb in zip(weights_a, weights_b)), "A and B should differ"
    for rank, (got, _) in enumerate(spawn(_load, 2, a, timeout_s=120)):
        assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in got), "no optimizer state saved"
        assert _same(got, weights_a[rank]), f"rank {rank}: loaded weights differ from the saved ones"


def _load_into_wider(path: str) -> str:
    import _train
    _train.CFG = dataclasses.replace(_train.CFG, dim=_train.CFG.dim + 16)
    model, opt = build(1, 2)
    try:
        checkpoint.load(model, path, optimizer=opt)
    except moeflow.CheckpointError as e:
        return str(e)
    return "loaded"


def test_a_checkpoint_that_does_not_fit_the_model_raises_checkpoint_error_on_every_rank(saved):
    a, _, _, _ = saved
    for msg in spawn(_load_into_wider, 2, a, timeout_s=120):
        assert f"moeflow.checkpoint.load: {a} does not fit the model (ranks 0, 1: ValueError: Size mismatch" in msg, msg


# --------------------------------------------------------------------------- damaged checkpoints

def _flip(path: str, at: float = 0.5, n: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        data = f.read(n)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(x ^ 0xFF for x in data))


def _truncate(path: str, size: int | None = None) -> None:
    os.truncate(path, os.path.getsize(path) // 2 if size is None else size)


def _swap_in_b(d: str, b: str) -> None:
    shutil.copy(os.path.join(b, "__1_0.distcp"), os.path.join(d, "__1_0.distcp"))


def _damage_manifest(d: str, b: str) -> None:
    path = os.path.join(d, checkpoint.MANIFEST)
    text = open(path).read()
    open(path, "w").write(text.replace('"size": ', '"size": 1', 1))


# case -> (damage(dir, checkpoint B), file named, what the message says about it)
DAMAGE = {
    "bytes flipped in a data file": (lambda d, b: _flip(os.path.join(d, "__1_0.distcp")), "__1_0.distcp",
                                     "is damaged or from another save"),
    "bytes flipped in the other rank's data file": (lambda d, b: _flip(os.path.join(d, "__0_0.distcp"), 0.3),
                                                    "__0_0.distcp", "is damaged or from another save"),
    "data file truncated": (lambda d, b: _truncate(os.path.join(d, "__0_0.distcp")), "__0_0.distcp",
                            "is truncated"),
    "DCP metadata damaged": (lambda d, b: _flip(os.path.join(d, ".metadata")), ".metadata", "is damaged"),
    "DCP metadata truncated": (lambda d, b: _truncate(os.path.join(d, ".metadata"), 10), ".metadata",
                               "is truncated (10 of"),
    "data file missing": (lambda d, b: os.remove(os.path.join(d, "__1_0.distcp")), "__1_0.distcp", "is missing"),
    "stale shard of a save with more ranks": (
        lambda d, b: shutil.copy(os.path.join(d, "__1_0.distcp"), os.path.join(d, "__2_0.distcp")),
        "__2_0.distcp", "is not part of this checkpoint"),
    "a file of another save (mixed steps)": (_swap_in_b, "__1_0.distcp", "is damaged or from another save"),
    "manifest damaged": (_damage_manifest, checkpoint.MANIFEST, "is damaged"),
    "manifest missing (plain DCP)": (lambda d, b: os.remove(os.path.join(d, checkpoint.MANIFEST)),
                                     checkpoint.MANIFEST, "is missing"),
    "no checkpoint": (lambda d, b: shutil.rmtree(d), "", "does not exist"),
}


def _load_each(paths: list[str]) -> list[tuple]:
    """Try to load each path into one fresh model; per path: the error's type, message, problems,
    and whether the model's weights stayed as they were."""
    model, opt = build(1, 2)
    before = _weights(model, opt)
    out = []
    for path in paths:
        try:
            checkpoint.load(model, path, optimizer=opt)
            out.append(("loaded", "", [], False))
        except Exception as e:  # noqa: BLE001 - the test reads which
            out.append((type(e).__name__, str(e), getattr(e, "problems", None), _same(_weights(model, opt), before)))
    return out


@pytest.fixture(scope="module")
def damaged(saved, tmp_path_factory):
    """Every damage case applied to a copy of A, all loaded in one run: ``{case: [per rank]}``."""
    a, b, _, _ = saved
    root = tmp_path_factory.mktemp("damaged")
    paths = []
    for i, (damage, _, _) in enumerate(DAMAGE.values()):
        d = str(root / f"case{i}")
        shutil.copytree(a, d)
        damage(d, b)
        paths.append(d)
    out = spawn(_load_each, 2, paths, timeout_s=180)
    return {case: (path, [o[i] for o in out]) for i, (case, path) in enumerate(zip(DAMAGE, paths))}


@pytest.mark.faults
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file_on_every_rank(damaged, case):
    path, per_rank = damaged[case]
    _, file, what = DAMAGE[case]
    named = os.path.join(path, file) if file else path
    for rank, (kind, msg, problems, untouched) in enumerate(per_rank):
        assert kind == "CheckpointError", f"rank {rank}: {kind}: {msg}"
        assert f"{named} {what}" in msg, f"rank {rank}: {msg}"
        assert (file, what) in [(f, w[:len(what)]) for f, w in problems], problems
        assert untouched, f"rank {rank}: the failed load changed the model"
    assert per_rank[0][1] == per_rank[1][1], "the ranks reached different verdicts"
    assert issubclass(moeflow.CheckpointError, ValueError)


# --------------------------------------------------------------------------- saves that die

def _load_then_save(path: str) -> dict:
    """Load ``path``, train a step, save over it, and load that into a fresh model."""
    model, opt = build(1, 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        checkpoint.load(model, path, optimizer=opt)
    loaded = _weights(model, opt)
    train(model, opt, range(STEPS_A, STEPS_B))
    checkpoint.save(model, path, optimizer=opt)
    again, _ = _load(path)
    return dict(loaded=loaded, notes=[str(w.message) for w in seen if "moeflow" in str(w.message)],
                resaved=_weights(model, opt), reloaded=again)


@pytest.mark.faults
@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_save_that_dies_leaves_the_old_checkpoint_loadable(saved, tmp_path, crash):
    a, _, weights_a, _ = saved
    target = str(tmp_path / "ckpt")
    shutil.copytree(a, target)
    # the survivor fails too (its peer's connection closed): each rank's outcome in its slot
    died = spawn(_save, 2, target, 1, crash, timeout_s=120, collective_timeout_s=60, return_failures=True)
    lost = CRASHES[crash][2]
    dead, survivor = died[lost], died[1 - lost]
    assert isinstance(dead, RankError) and dead.exitcode == CRASH, dead
    # The save's collectives are watched: the survivor names the lost rank, whichever step it was in.
    assert isinstance(survivor, RankError) and "PeerFailureError" in survivor.traceback, survivor
    assert f"rank {lost} is dead or hung" in survivor.traceback, survivor.traceback
    left = sorted(os.listdir(tmp_path))
    between = crash == "rank 0 dies between the renames"
    assert any(".tmp-" in name for name in left), left  # the dead save's files
    # A moved aside and not yet replaced, or still in place
    assert ("ckpt" in left) != between and any(".old-" in name for name in left) == between, left
    out = spawn(_load_then_save, 2, target, timeout_s=120)
    for rank, o in enumerate(out):
        assert _same(o["loaded"], weights_a[rank]), f"rank {rank}: did not load checkpoint A whole"
        assert _same(o["reloaded"], o["resaved"]), f"rank {rank}: the next save did not load back"
    assert bool(out[0]["notes"]) == between, out[0]["notes"]  # loading the moved-aside A says so
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "the next save left files of the dead one"


# --------------------------------------------------------------------------- what a save replaces

def _save_over(target: str, other: str, not_a_checkpoint: str, a_file: str) -> dict:
    model, opt = _trained(STEPS_A)
    errors = {}
    for name, path in (("not a checkpoint", not_a_checkpoint), ("a file", a_file),
                       ("ranks disagree", target if dist.get_rank() == 0 else other)):
        try:
            checkpoint.save(model, path, optimizer=opt)
        except ValueError as e:
            errors[name] = str(e)
    checkpoint.save(model, target, optimizer=opt)
    files = sorted(os.listdir(target))
    got, _ = _load(target)
    return dict(errors=errors, files=files, same=_same(got, _weights(model, opt)))


@pytest.mark.faults
def test_save_replaces_a_checkpoint_whole_and_refuses_anything_else(saved, tmp_path):
    a, _, _, _ = saved
    target, other = str(tmp_path / "ckpt"), str(tmp_path / "other")
    shutil.copytree(a, target)
    for stale in ("__2_0.distcp", "__3_0.distcp"):  # as a save on 4 ranks leaves them
        shutil.copy(os.path.join(target, "__1_0.distcp"), os.path.join(target, stale))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    out = spawn(_save_over, 2, target, other, str(mine), str(a_file), timeout_s=120)
    for rank, o in enumerate(out):
        assert o["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", checkpoint.MANIFEST], o["files"]
        assert o["same"], f"rank {rank}: the checkpoint written over the old one did not load back"
        errors = o["errors"]
        assert f"`checkpoint_id` '{mine}' is a directory of 1 files that is not a checkpoint" in \
            errors["not a checkpoint"]
        assert f"`checkpoint_id` '{a_file}' is not a directory" in errors["a file"]
        assert f"ranks passed different `checkpoint_id`s: rank 0: '{target}', rank 1: '{other}'" in \
            errors["ranks disagree"]
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ckpt", "mine"]


# --------------------------------------------------------------------------- checksums by chunk

def test_chunked_checksums_are_split_over_ranks_and_name_the_damaged_bytes(tmp_path):
    """Large files carry one CRC-32 per chunk (64 MiB; 1000 bytes here): on load the ranks split
    the chunks, not the files, and a damaged chunk is named by its bytes. One process, no group."""
    d = str(tmp_path / "ckpt")
    os.mkdir(d)
    sizes = {"__0_0.distcp": 2500, "__1_0.distcp": 2000, ".metadata": 300, "empty": 0}
    for name, size in sizes.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())
    files = checkpoint._checksum(d, sorted(sizes), chunk=1000)
    assert {k: len(v["crc32"]) for k, v in files.items()} == {"__0_0.distcp": 3, "__1_0.distcp": 2,
                                                               ".metadata": 1, "empty": 1}
    checkpoint._write_manifest(d, "0" * 32, files, chunk=1000)
    assert checkpoint._verify(d, None) == d
    manifest = checkpoint._read_manifest(d)
    # two ranks: every chunk checked exactly once; 1000 + 1000 + 500 bytes on one, 1000 + 1000 + 300 on the other
    shares = checkpoint._share([(f, s, n) for f in files for s, n in checkpoint._chunks(sizes[f], 1000)], 2)
    units = [u for share in shares for u in share]
    assert len(units) == len(set(units)) == 7
    assert [sum(n for _, _, n in share) for share in shares] == [2500, 2300]
    _flip(os.path.join(d, "__0_0.distcp"), at=0.6, n=1)  # byte 1500
    found = [p for r in range(2) for p in checkpoint._check(d, manifest, r, 2)]
    assert found == [("__0_0.distcp", found[0][1])] and "(bytes 1000-2000: CRC-32" in found[0][1], found
    with pytest.raises(moeflow.CheckpointError, match=r"__0_0.distcp is damaged or from another save \(bytes 1000"):
        checkpoint._verify(d, None)
