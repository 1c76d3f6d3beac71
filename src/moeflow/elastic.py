"""Elastic expert parallelism: training that loses ranks and takes new ones, in the same processes.

:class:`ElasticRun` wraps a model of :class:`~moeflow.MoELayer`\\s (over the default group, no
mesh) and its optimizer. The training loop marks each step's collectives (:meth:`ElasticRun.guard`,
:meth:`ElasticRun.sync`) and its end (:meth:`ElasticRun.commit`); on a
:class:`~moeflow.PeerFailureError` it calls :meth:`ElasticRun.recover` and runs the step again::

    membership = Membership.start()                 # every rank; a new process: Membership.join()
    model, opt = build()                            # MoELayers over the default group
    run = ElasticRun(model, opt, membership)        # a joiner passes transition=
    while run.step < steps:
        x, y = batch(run.step)                      # the same batch when a step runs again
        try:
            with run.guard():                       # every collective of the step in here
                loss = loss_fn(run.model(x), y)     # run.model: DDP over the dense weights
                opt.zero_grad(); loss.backward()
                run.sync()                          # replica grads, router load sums
            opt.step()
            run.commit()                            # step + 1; checkpoint; take in joiners
        except PeerFailureError as e:
            run.recover(e)                          # regroup; run.step says where to go on

What a recovery does (every survivor): leave the broken group, agree through the store on who is
left (:mod:`moeflow.comm.membership`), form the next group, re-plan each layer's placement over
the survivors (:func:`~moeflow.balance.replan_after_loss`, loads from the routers), move every
slot's weights and optimizer state from a replica a survivor holds (one all-to-all per layer),
read the experts no survivor holds from the latest checkpoint (:func:`moeflow.checkpoint.load_experts`;
the rest of the model keeps its weights), give the layers new Buffers and the dense weights a
new DDP, and go on from the step that failed.

What is recomputed or lost: the failed step runs again on the survivors with their own batches
(the lost ranks' share of that step's batch, and of every later step, is not trained on); its
partial forward and backward are discarded (weights change only in ``optimizer.step()``, after
every collective of the step, so a survivor that raised has not changed its weights; the routers'
counts of the failed attempt are cleared). An expert restored from the checkpoint of step c
loses its updates of steps c .. s-1 (reported as ``steps_lost``); with a replica on a survivor
nothing is lost. If a lost rank died inside the step's last collective after contributing to
it, some survivors may have finished the step: the others then finish it too (their gradients
are complete: they had entered that collective) and take the dense state of one that finished.

Dense (non-expert) weights must be replicated on every rank, as DDP keeps them: a shard (FSDP)
would be lost with its rank. The layers' Buffers are rebuilt as one node (node-limited routing is
refused), and layers built on a mesh cannot regroup (their dims would change shape).
docs/elastic.md has what survives what, timings and torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
import traceback
from typing import Optional

import torch
from torch import nn

from . import checkpoint
from .balance import Placement, replan_after_join, replan_after_loss
from .comm.agree import set_construction_checks
from .comm.buffer import Buffer
from .comm.health import PeerFailureError, Watchdog
from .comm.membership import LeftOutError, Membership, Transition
from .comm.rows import broadcast_tensors
from .comm.transport import ProcessGroupTransport
from .layer import MoELayer

__all__ = ["ElasticRun", "Membership", "Transition", "LeftOutError"]

_MAX_ROUNDS = 3  # a failure during a recovery starts another round, at most this many


class ElasticRun:
    """A training run over the members of an elastic job (see the module docstring).

    Args:
        model: a module holding :class:`~moeflow.MoELayer`\\s built over the default group (the
            current generation's); not FSDP-sharded.
        optimizer: over ``model``'s parameters (the same on every rank, built the same way).
        membership: this process's :class:`~moeflow.comm.membership.Membership`.
        transition: on a process that joined (:meth:`Membership.join`), the transition it
            joined in: the constructor then takes over the members' state (a collective with
            the members' :meth:`commit` at that boundary).
        checkpoint_dir, checkpoint_every: save a DCP checkpoint (:func:`moeflow.checkpoint.save`)
            to ``checkpoint_dir/step<N>`` every ``checkpoint_every`` steps (0: never); the two
            latest are kept. Experts that lose every replica are read back from it.
        ddp: wrap the dense weights in ``DistributedDataParallel`` (rebuilt over each new group);
            False when the loop keeps them in sync itself.

    Attributes:
        model: what the loop calls (the DDP wrapper, rebuilt after each change; else ``module``).
        module: the model itself. optimizer, membership.
        step: steps completed (the next step to run).
        events: one dict per recovery or join (see :meth:`recover`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, membership: Membership, *,
                 transition: Optional[Transition] = None, checkpoint_dir: Optional[str] = None,
                 checkpoint_every: int = 0, ddp: bool = True) -> None:
        set_construction_checks(True)  # off since Membership.join in a joining process
        self.module, self.optimizer, self.membership = model, optimizer, membership
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
        if not self.layers:
            raise ValueError(f"ElasticRun: `model` ({type(model).__name__}) holds no MoELayer")
        if checkpoint_every and not checkpoint_dir:
            raise ValueError("ElasticRun: checkpoint_every needs a checkpoint_dir")
        self.checkpoint_dir, self.checkpoint_every, self.ddp = checkpoint_dir, checkpoint_every, ddp
        self.step = 0
        self.events: list[dict] = []
        self._checkpoints: list[int] = []  # steps of the completed checkpoints, oldest first
        self.model: nn.Module = model
        if transition is None:
            if membership.num_ranks > 1:  # one source for the dense weights (and any optimizer state) from the start
                transport = ProcessGroupTransport(None, timeout_s=membership.timeout_s)
                broadcast_tensors(transport, self._dense_state(), 0, device=next(model.parameters()).device)
            self._wire()
        else:
            if membership.name not in transition.joined:
                raise ValueError(f"ElasticRun: `transition` is for a process that joined; {membership.name} did not")
            self.events.append(self._handover(transition, source=0, time_start=time.monotonic()))

    # --------------------------------------------------------------------------------- the loop
    def guard(self) -> contextlib.AbstractContextManager:
        """The block holding every collective of a step (forward, backward, :meth:`sync`): a lost
        peer inside it, also in collectives moeflow does not issue itself (DDP's), raises
        :class:`~moeflow.PeerFailureError` naming it."""
        return self._watchdog.guard("training step") if self._watchdog is not None else contextlib.nullcontext()

    def sync(self) -> list[torch.Tensor]:
        """After backward, before ``optimizer.step()``, inside :meth:`guard`: per MoE layer, scale
        the expert gradients to the mean over ranks (DDP averages the dense ones), sum the
        replicas' gradients (:meth:`ExpertSlots.sync_replica_grads`) and update the router
        (:meth:`Router.update_bias`). Returns each layer's summed load ``[E]``."""
        R = self.membership.num_ranks
        loads = []
        for layer in self.layers.values():
            if R > 1:
                for p in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
                    if p.grad is not None:
                        p.grad.div_(R)  # each expert's gradient sums every rank's mean loss
            layer.slots.sync_replica_grads()
        for layer in self.layers.values():  # the step's last collectives: dense state only (see recover)
            loads.append(layer.router.update_bias())
        return loads

    def commit(self) -> Optional[dict]:
        """After ``optimizer.step()``: the step is done. Saves a checkpoint when one is due, then
        takes in the processes waiting to join (the group changes here: returns the event)."""
        self.step += 1
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self._save_checkpoint()
        transition = self.membership.at_boundary(self.step)
        if transition is None:
            return None
        event = self._handover(transition, source=0, time_start=time.monotonic())
        self.events.append(event)
        return event

    def recover(self, error: PeerFailureError) -> dict:
        """Go on without the ranks ``error`` names, from the step that failed (see the module
        docstring). Call on every survivor.

        Returns:
            The event (also appended to :attr:`events`): ``kind`` "loss", ``step`` (where to go
            on), ``generation``, ``members``, ``lost``, ``moves`` (slots whose expert changed:
            copied from a surviving replica or read back), ``restored`` (``{layer: experts}``
            read from the checkpoint of step ``checkpoint_step``, each losing ``steps_lost``
            steps), ``rolled_forward`` (this rank finished the failed step from its gradients),
            ``agree_s`` and ``handover_s``.

        Raises:
            LeftOutError: the others went on without this process.
            RuntimeError: an expert lost every replica and no checkpoint holds it.
        """
        t0 = time.monotonic()
        dead = list(error.dead_ranks)
        _drop_frames(error)
        rolled = False
        for _ in range(_MAX_ROUNDS):
            self._release()
            try:
                transition = self.membership.after_failure(dead, {"committed": self.step,
                                                                  "checkpoints": self._checkpoints})
                t_agreed = time.monotonic()
                done = [r["committed"] for r in transition.reports.values()]
                if self.step < max(done):
                    # a survivor finished the failed step, so every survivor had entered its last
                    # collective: this one's gradients are complete; it finishes the step too
                    self.optimizer.step()
                    self.step, rolled = self.step + 1, True
                source = transition.members.index(next(m for m in transition.members
                                                       if transition.reports[m]["committed"] == max(done)))
                self._checkpoints = sorted(set.intersection(*(set(r["checkpoints"])
                                                              for r in transition.reports.values())))
                event = self._handover(transition, source, t_agreed)
            except PeerFailureError as again:  # another loss during the recovery: one more round
                dead = list(again.dead_ranks)
                _drop_frames(again)
                continue
            event.update(agree_s=t_agreed - t0, rolled_forward=rolled)
            self.events.append(event)
            return event
        raise RuntimeError(f"ElasticRun.recover: ranks kept failing through {_MAX_ROUNDS} recoveries")

    # --------------------------------------------------------------------------------- internals
    def _handover(self, transition: Transition, source: int, time_start: float) -> dict:
        """On every member of ``transition``'s generation: the same state everywhere, placements
        over the new group, Buffers, DDP."""
        m = self.membership
        ckpt = self._handover_header(transition, source)
        orphans = self._orphans(transition)
        if orphans and ckpt is None:  # known alike on every member: all raise here, before any collective
            raise RuntimeError(f"ElasticRun: experts {orphans} lost every replica with {transition.lost} and no "
                               f"checkpoint holds them (give checkpoint_dir and checkpoint_every, or spare replicas)")
        transport = ProcessGroupTransport(None, timeout_s=m.timeout_s)
        watchdog = Watchdog(None, m.timeout_s, name="hand-over") if m.num_ranks > 1 else None
        with watchdog.guard("handover") if watchdog is not None else contextlib.nullcontext():
            if m.name in transition.joined:
                _init_optimizer_state(self.optimizer)
            device = next(self.module.parameters()).device  # the backend's (Adam's step counts live on the CPU)
            broadcast_tensors(transport, self._dense_state(), source, device=device)
            moves = self._regroup_layers(transition)
            if orphans:
                checkpoint.load_experts(self.module, self._checkpoint_path(ckpt), orphans, optimizer=self.optimizer)
            self._wire()
        return dict(kind="loss" if transition.lost else "join", step=self.step, generation=transition.generation,
                    members=transition.members, lost=transition.lost, joined=transition.joined, moves=moves,
                    restored=orphans, checkpoint_step=ckpt if orphans else None,
                    steps_lost=self.step - ckpt if orphans else 0, handover_s=time.monotonic() - time_start)

    def _handover_header(self, transition: Transition, source: int) -> Optional[int]:
        """What the source rank knows and a joiner does not, through the store; returns the
        checkpoint step to restore from (None: none)."""
        m = self.membership
        key = f"handover/g{transition.generation}"
        if m.rank == source:
            header = dict(step=self.step, checkpoints=self._checkpoints,
                          phy2log={n: layer.slots.phy2log.tolist() for n, layer in self.layers.items()},
                          num_load_updates={n: layer.router.num_load_updates for n, layer in self.layers.items()})
            m.store.set(key, json.dumps(header))
        header = json.loads(_wait_get(m, key, source))
        self.step, self._checkpoints = header["step"], header["checkpoints"]
        self._previous = {n: torch.tensor(p, dtype=torch.int64) for n, p in header["phy2log"].items()}
        for n, layer in self.layers.items():
            layer.router.num_load_updates = header["num_load_updates"][n]
        return self._checkpoints[-1] if self._checkpoints else None

    def _orphans(self, transition: Transition) -> dict[str, list[int]]:
        """``{layer: experts}`` that had every replica on the ranks ``transition`` lost."""
        R_old, out = len(transition.previous), {}
        kept = [r for r, name in enumerate(transition.previous) if name in transition.members]
        for name, layer in self.layers.items():
            old = self._previous[name]
            L = old.numel() // R_old
            held = set(torch.cat([old[r * L:(r + 1) * L] for r in kept]).tolist())
            lost = [e for e in range(layer.num_experts) if e not in held]
            if lost:
                out[name] = lost
        return out

    def _regroup_layers(self, transition: Transition) -> int:
        """Plan each layer over the new group and move its slots; the slots whose expert changed."""
        m = self.membership
        R_old, R = len(transition.previous), m.num_ranks
        old_ranks, lost = transition.old_ranks(), [transition.previous.index(x) for x in transition.lost]
        buffers: dict[int, Buffer] = {}
        moves = 0
        for name, layer in self.layers.items():
            old = self._previous[name]
            E, S = layer.num_experts, old.numel() // R_old
            loads = layer.router.expert_load()[None] if layer.router.num_load_updates else None
            placement = Placement.from_phy2log(old[None], E, R_old)
            if lost:
                slots = max(S, -(-E // (R_old - len(lost))))  # more per survivor when fewer cannot hold every expert
                placement = replan_after_loss(placement, lost, loads, num_slots_per_gpu=slots).placement
            if transition.joined:
                placement = replan_after_join(placement, len(transition.joined), loads)
            new = placement.phy2log[0]
            old_buffer = layer.buffer
            if id(old_buffer) not in buffers:  # layers that shared a Buffer share the new one
                buffers[id(old_buffer)] = Buffer(None, ranks_per_node=R, timeout_s=old_buffer.timeout_s)
            layer.regroup(buffers[id(old_buffer)], new, previous=old, old_ranks=old_ranks, old_num_ranks=R_old,
                          optimizer=self.optimizer)
            moves += placement.moves
        return moves

    def _dense_state(self) -> list[torch.Tensor]:
        """Every tensor of the model and optimizer that is the same on every rank, in one order
        on every rank: the dense parameters and buffers (the routers' included), the dense
        parameters' optimizer state, and the scalar state (Adam's ``step``) of the expert weights."""
        experts = self._expert_ids()
        slot_buffers = {id(b) for layer in self.layers.values() for b in layer.slots.buffers()}
        out = [p.data for p in self.module.parameters() if id(p) not in experts]
        out += [b for b in self.module.buffers() if id(b) not in slot_buffers]
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for key in sorted(state):
                    v = state[key]
                    if isinstance(v, torch.Tensor) and (id(p) not in experts or v.dim() == 0):
                        out.append(v)
        return out

    def _expert_ids(self) -> set[int]:
        return {id(p) for layer in self.layers.values() for p in (layer.experts.w1, layer.experts.w2, layer.experts.w3)}

    def _wire(self) -> None:
        """Per generation: zero the routers' per-step counts, the step's watchdog, DDP."""
        for layer in self.layers.values():
            layer.router.num_tokens_per_expert_since_update.zero_()  # a failed attempt's counts
            layer.router.global_counts_since_update.zero_()
        R = self.membership.num_ranks
        self._watchdog = Watchdog(None, self.membership.timeout_s, name="training loop") if R > 1 else None
        self.model = self.module
        if self.ddp and R > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            experts = self._expert_ids()
            # the experts are split over the ranks, not replicated: DDP leaves them alone; and the
            # buffers (routers: equal by construction, slot tables: per layer), which it would broadcast
            ignore = [n for n, p in self.module.named_parameters() if id(p) in experts]
            ignore += [n for n, _ in self.module.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.module, ignore)
            device = next(self.module.parameters()).device
            # init_sync=False: the start or the hand-over has made the dense weights equal already
            self.model = DDP(self.module, device_ids=[device] if device.type == "cuda" else None, init_sync=False)

    def _release(self) -> None:
        """Drop what holds the broken group (the DDP wrapper) before it is torn down."""
        self.model, self._watchdog = self.module, None

    def _checkpoint_path(self, step: int) -> str:
        return os.path.join(self.checkpoint_dir, f"step{step}")

    def _save_checkpoint(self) -> None:
        with self.guard():
            checkpoint.save(self.module, self._checkpoint_path(self.step), optimizer=self.optimizer)
        self._checkpoints = (self._checkpoints + [self.step])[-2:]
        if self.membership.rank == 0:  # keep the two latest: a survivor may not have finished the newest
            for name in os.listdir(self.checkpoint_dir):
                if name.startswith("step") and name[4:].isdigit() and int(name[4:]) < self._checkpoints[0]:
                    shutil.rmtree(os.path.join(self.checkpoint_dir, name), ignore_errors=True)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that never stepped its state tensors (zeros, to be overwritten): torch's
    own zero-gradient step with the learning rate at 0, as DCP does before loading state."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


def _wait_get(m: Membership, key: str, writer: int) -> bytes:
    """``m.store``'s value at ``key``, waiting at most the timeout for rank ``writer`` to write it."""
    try:
        m.store.wait([key], datetime.timedelta(seconds=m.timeout_s))
    except RuntimeError as cause:  # the store's timeout (DistStoreError)
        raise PeerFailureError(f"ElasticRun: rank {writer} did not hand its state over within {m.timeout_s:g} s "
                               f"(rank {m.rank})", m.rank, 0, "handover", [], [writer]) from cause
    return m.store.get(key)


def _drop_frames(error: BaseException) -> None:
    """Clear the locals of the frames an error's traceback holds (and its causes'): they hold the
    failed step's DDP wrapper and tensors, which would keep the broken group's connections open."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
