"""Membership of an elastic job: who is in it, agreed through the job's store; one process group
per generation, formed again in the same processes when members are lost or join.

A *generation* is an ordered list of member names (member i is group rank i) and torch's default
process group over them, initialised on a ``PrefixStore`` of the job's store named after the
generation (torchft's way of reconfiguring a group, but as the default group, so that every
``torch.distributed`` call, DDP and DCP work on the new group unchanged). The store is the one
the job already runs: ``moeflow.spawn``'s or torchrun's rendezvous store (the default group's),
or any ``torch.distributed.Store`` every process can reach; it must outlive the members it
serves, as the rendezvous store does.

- :meth:`Membership.start`: generation 0 over the job's first ``num_members`` ranks.
- :meth:`Membership.after_failure`: on every survivor of a failure (a
  :class:`~moeflow.comm.health.PeerFailureError`): leave the broken group at once (so that a peer
  still blocked on this rank fails now, not at its timeout), report whom the error named dead,
  wait until every member has reported or been named dead, or its heartbeat stopped (or the
  timeout passed), agree on the survivors (the first proposal written wins: ``compare_set``),
  form the next group.
- :meth:`Membership.join` (a new or restarted process) asks to join; the members check for such
  requests at each step boundary (:meth:`Membership.at_boundary`: one store read per rank, two on
  rank 0) and take the joiners in after the next step, every member at the same step.

Store keys, under ``moeflow/elastic/``: ``g<n>/members`` (generation n: its members, the
previous generation's, join requests taken so far), ``g<n>/report/<name>`` (a survivor's
account of a failure in generation n), ``g<n>/next`` (the agreed survivors), ``g<n>/admit``
(joiners and the step they enter after), ``g<n>/pg/...`` (the process group's rendezvous and the
heartbeats of :mod:`moeflow.comm.health`), ``joiners`` and ``join/<k>`` (join requests),
``admitted/<name>`` (the generation a joiner entered).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .agree import set_construction_checks
from .health import PeerFailureError, read_heartbeat, resolve_timeout
from .transport import ProcessGroupTransport

__all__ = ["Membership", "Transition", "LeftOutError"]

_ROOT = "moeflow/elastic/"


class LeftOutError(RuntimeError):
    """This process is not in the next generation: the others agreed without it (they named it
    dead, or it reported after they decided). It should exit, or join again as a new member."""


@dataclass(frozen=True)
class Transition:
    """A change of generation, as every member of the new one sees it.

    Attributes:
        generation: the new generation's number.
        members: its member names (member i is group rank i).
        previous: the previous generation's member names.
        reports: after a loss, each survivor's ``info`` (what it passed to
            :meth:`Membership.after_failure`); empty after a join.
    """

    generation: int
    members: list[str]
    previous: list[str]
    reports: dict[str, dict] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        return [m for m in self.previous if m not in self.members]

    @property
    def joined(self) -> list[str]:
        return [m for m in self.members if m not in self.previous]

    def old_ranks(self) -> list[int]:
        """Per new rank, its rank in the previous generation, or -1 for a joiner."""
        return [self.previous.index(m) if m in self.previous else -1 for m in self.members]


class Membership:
    """This process's view of an elastic job (build it with :meth:`start` or :meth:`join`).

    Attributes:
        name: this member's name.  generation: the current generation's number.
        members: its member names.  rank, num_ranks: this member's group rank and the group size.
        timeout_s: how long a member may take to report after a failure, and the process group's
            timeout (default: env ``MOEFLOW_TIMEOUT_S``, else 30).
    """

    def __init__(self, kv: dist.Store, name: str, backend: str, timeout_s: float) -> None:
        self._kv, self.name, self.backend, self.timeout_s = kv, name, backend, timeout_s
        self.generation, self.members, self.previous, self._joined = -1, [], [], 0
        self._admit: Optional[dict] = None
        self._admit_posted = False
        # after a failure, how long a member named dead by one report may still arrive with its
        # own; also the heartbeat interval (health.Watchdog's), three of which make a stopped beat
        self.settle_s = min(1.0, timeout_s / 10)

    # ------------------------------------------------------------------------------- entry points
    @classmethod
    def start(cls, num_members: Optional[int] = None, *, store: Optional[dist.Store] = None,
              backend: Optional[str] = None, timeout_s: Optional[float] = None) -> "Membership":
        """Generation 0 over ranks ``0 .. num_members - 1`` of the job's current default group.

        Called by those ranks (inside an initialised default group, e.g. ``moeflow.spawn``'s or
        torchrun's); the job's other ranks, if any, may :meth:`join` later. Replaces the default
        group by generation 0's (member names ``"rank<r>"``).

        Args:
            num_members: default: every rank of the job.
            store: default: the default group's store.
            backend: default: the default group's.
            timeout_s: see the class docstring.
        """
        if not dist.is_initialized():
            raise RuntimeError("Membership.start: torch.distributed is not initialised; call it on the ranks of "
                               "a job (moeflow.spawn, torchrun)")
        rank, world = dist.get_rank(), dist.get_world_size()
        n = world if num_members is None else num_members
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= world:
            raise ValueError(f"Membership.start: num_members must be an int in [1, {world}] (rank {rank}), "
                             f"got {num_members!r}")
        if rank >= n:
            raise ValueError(f"Membership.start: rank {rank} is not among the first num_members={n} ranks; "
                             "it joins with Membership.join")
        m = cls(_elastic_store(store), f"rank{rank}", backend or dist.get_backend(), resolve_timeout(timeout_s))
        m._leave_group()
        m._enter(Transition(0, [f"rank{r}" for r in range(n)], []), joined=0)
        return m

    @classmethod
    def join(cls, name: Optional[str] = None, *, store: Optional[dist.Store] = None,
             backend: Optional[str] = None, timeout_s: Optional[float] = None,
             wait_s: float = 3600.0) -> tuple["Membership", Transition]:
        """Ask to join the job and wait until the members take this process in (after a step).

        Args:
            name: this member's name, unique in the job (default: host, pid and a random tag).
            store: the job's store (default: this process's default group's, e.g. a standby
                rank of ``moeflow.spawn``; a restarted process passes a client of the job's
                store, e.g. ``TCPStore(host, port)``).
            backend: default: the default group's, else NCCL when CUDA is available, else Gloo.
            timeout_s: see the class docstring.
            wait_s: how long to wait to be taken in.

        Returns:
            ``(membership, transition)``: the new generation, of which this process is a member.
        """
        kv = _elastic_store(store)
        if backend is None:
            backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
        name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        m = cls(kv, name, backend, resolve_timeout(timeout_s))
        m._leave_group()
        ticket = kv.add("joiners", 1) - 1
        kv.set(f"join/{ticket}", name)
        kv.wait([f"admitted/{name}"], datetime.timedelta(seconds=wait_s))
        generation = int(kv.get(f"admitted/{name}"))
        record = json.loads(kv.get(f"g{generation}/members"))
        transition = Transition(generation, record["members"], record["previous"])
        m._enter(transition, joined=record["joined"])
        # the model this process builds next is built while the members build nothing: its
        # construction-time agreement checks would wait for peers that never come (ElasticRun
        # turns them on again before it rebuilds the Buffers on every rank)
        set_construction_checks(False)
        return m, transition

    # ------------------------------------------------------------------------------- changes
    def after_failure(self, dead_ranks: Sequence[int], info: Optional[dict] = None) -> Transition:
        """Agree with the other survivors of a failure on who is left, and form their group.

        Call on every survivor, with the group ranks the error named dead (a
        :class:`~moeflow.comm.health.PeerFailureError`'s ``dead_ranks``). The broken group is
        left first. A member is waited for until it reports, or until some report names it dead
        or its heartbeat stood still for three intervals (and ``settle_s`` passed), or until
        ``timeout_s`` passed; the members that reported form the next generation, in their old
        order.

        Args:
            dead_ranks: group ranks of this generation named dead.
            info: this member's account (JSON-serialisable), handed to every survivor in
                :attr:`Transition.reports` (e.g. the steps it completed).

        Raises:
            LeftOutError: the others agreed on a group without this process.
        """
        n = self.generation
        # the broken group's store holds the members' heartbeats (its rank r is member r)
        beats = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        self._leave_group()
        dead = [self.members[r] for r in dead_ranks if 0 <= r < len(self.members)]
        self._kv.set(f"g{n}/report/{self.name}", json.dumps({"dead": dead, "info": info or {}}))
        decision = self._agree(n, time.monotonic(), beats)
        if self.name not in decision["members"]:
            raise LeftOutError(f"Membership: {self.name} (rank {self.rank} of generation {n}) was left out of "
                               f"generation {n + 1}, which the others formed as {decision['members']}")
        transition = Transition(n + 1, decision["members"], list(self.members), decision["reports"])
        self._enter(transition, joined=self._joined)
        return transition

    def at_boundary(self, step: int) -> Optional[Transition]:
        """Take in the processes waiting to :meth:`join`, at a step boundary.

        Call on every member after each step, with the number of steps completed. Rank 0 posts
        the waiting joiners with ``step + 1``; every member takes them in when it reaches that
        boundary (it has seen the post by then: the step between holds a collective over the
        group, which every rank completes only after rank 0 posted). Returns the new
        generation's :class:`Transition` at that boundary, else None (one store read per rank;
        rank 0 reads the join counter too).
        """
        n, kv = self.generation, self._kv
        if self.rank == 0 and not self._admit_posted:
            waiting = int(kv.add("joiners", 0))
            if waiting > self._joined:
                # a joiner writes its name right after taking its ticket
                kv.wait([f"join/{k}" for k in range(self._joined, waiting)], datetime.timedelta(seconds=self.timeout_s))
                names = [kv.get(f"join/{k}").decode() for k in range(self._joined, waiting)]
                kv.compare_set(f"g{n}/admit", "", json.dumps({"at_step": step + 1, "joiners": names}))
                self._admit_posted = True
        if self._admit is None:
            if not kv.check([f"g{n}/admit"]):
                return None
            self._admit = json.loads(kv.get(f"g{n}/admit"))
        if step < self._admit["at_step"]:
            return None
        if step > self._admit["at_step"]:
            raise RuntimeError(f"Membership.at_boundary: joiners were due after step {self._admit['at_step']}, this "
                               f"member ({self.name}) is at step {step}: it skipped at_boundary calls")
        joiners = self._admit["joiners"]
        transition = Transition(n + 1, self.members + joiners, list(self.members))
        self._barrier()  # every member is here: nothing of the old group is still in flight
        self._leave_group()
        self._enter(transition, joined=self._joined + len(joiners))
        return transition

    # ------------------------------------------------------------------------------- internals
    @property
    def rank(self) -> int:
        return self.members.index(self.name)

    @property
    def num_ranks(self) -> int:
        return len(self.members)

    def waiting_joiners(self) -> int:
        """Processes that asked to :meth:`join` and were not taken in yet (one store read)."""
        return int(self._kv.add("joiners", 0)) - self._joined

    @property
    def store(self) -> dist.Store:
        """The job's store under ``moeflow/elastic/``: for the small records of a hand-over."""
        return self._kv

    def _agree(self, n: int, since: float, beats: Optional[dist.Store]) -> dict:
        """The agreed next generation ``{"members": [...], "reports": {...}}`` after a failure in
        ``n``. A member that has not reported counts as dead once a report names it, or once its
        heartbeat in ``beats`` stood still for three intervals (a process its launcher stopped
        after the failure, say: no survivor's error named it)."""
        kv = self._kv
        moved: dict[str, tuple] = {}  # member -> (its last beat seen, when that beat was first seen)
        while True:
            if kv.check([f"g{n}/next"]):
                return json.loads(kv.get(f"g{n}/next"))
            reports = {m: json.loads(kv.get(f"g{n}/report/{m}")) for m in self.members
                       if kv.check([f"g{n}/report/{m}"])}
            now = time.monotonic()
            waiting = [m for m in self.members if m not in reports]
            for m in waiting:
                beat = (read_heartbeat(beats, self.members.index(m)) or {}).get("beat") if beats is not None else None
                if m not in moved or moved[m][0] != beat:
                    moved[m] = (beat, now)
            dead = {d for r in reports.values() for d in r["dead"]}
            dead |= {m for m in waiting if now - moved[m][1] >= 3 * self.settle_s}
            waited = now - since
            if (not waiting or (set(waiting) <= dead and waited >= self.settle_s)
                    or waited >= self.timeout_s):
                proposal = {"members": [m for m in self.members if m in reports],
                            "reports": {m: r["info"] for m, r in reports.items()}}
                # the first proposal written is everyone's decision
                return json.loads(kv.compare_set(f"g{n}/next", "", json.dumps(proposal)))
            time.sleep(0.02)

    def _barrier(self) -> None:
        if self.num_ranks > 1:
            ProcessGroupTransport(None, timeout_s=self.timeout_s).barrier(kind="membership")

    def _leave_group(self) -> None:
        """Tear down this process's default group (and its subgroups): its connections close, so
        a peer blocked on this rank fails at once. NCCL's communicators are aborted (a destroy
        would wait for a collective that never ends)."""
        if not dist.is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()

    def _enter(self, transition: Transition, joined: int) -> None:
        """Become a member of ``transition``'s generation: record it (rank 0), tell the joiners,
        initialise the default group over its members."""
        n, kv = transition.generation, self._kv
        self.generation, self.members, self.previous = n, list(transition.members), list(transition.previous)
        self._joined, self._admit, self._admit_posted = joined, None, False
        if self.rank == 0:
            kv.set(f"g{n}/members", json.dumps({"members": self.members, "previous": self.previous,
                                                "joined": joined}))
            for name in transition.joined:
                kv.set(f"admitted/{name}", str(n))
        options = {}
        if self.backend == "nccl":
            options["device_id"] = torch.device("cuda", torch.cuda.current_device())
        try:
            dist.init_process_group(self.backend, store=dist.PrefixStore(f"g{n}/pg", kv), rank=self.rank,
                                    world_size=self.num_ranks, timeout=datetime.timedelta(seconds=self.timeout_s),
                                    **options)
        except RuntimeError as cause:  # a member never came (it died after the agreement)
            raise PeerFailureError(f"Membership: generation {n} ({self.members}) did not form within "
                                   f"{self.timeout_s:g} s on {self.name}: a member did not come", self.rank, 0,
                                   "membership", [], []) from cause


def _elastic_store(store: Optional[dist.Store]) -> dist.Store:
    """The job's store under the elastic prefix (kept: it outlives every group formed on it)."""
    if store is None:
        if not dist.is_initialized():
            raise RuntimeError("moeflow Membership: no store given and no default group to take it from")
        store = dist.distributed_c10d._get_default_store()  # the rendezvous store (spawn's, torchrun's)
    return dist.PrefixStore(_ROOT, store)
