"""``moeflow demo --elastic``: the demo's model trained with :class:`moeflow.elastic.ElasticRun`,
with a rank killed mid-run and, optionally, a rank added back.

The first ``--ranks`` processes are the job's members (:meth:`Membership.start`); with
``--add-rank-at-step`` one more process starts with them, idle, and asks to join
(:meth:`Membership.join`) so that it enters after that step, as a restarted process would
(it knows only the job's store). Rank ``--kill-rank`` kills itself (SIGKILL, no word to anyone)
at the start of step ``--at-step``; the survivors recover in the same processes and run that
step again. The dense weights are replicated by DDP (a shard would be lost with its rank); the
experts have the slots ``--replicas`` gives (default: two per expert, so any one rank may be
lost with no checkpoint read).

Every rank returns the report of :func:`moeflow.demo.train`'s shape, with ``history["ranks"]``
(group size per step) and ``elastic`` (the faults asked for, the timeout that detects a loss,
and one entry per recovery or join: what moved, what was read from a checkpoint, how long each
part took, and for a loss the time from the kill to the next completed step).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm.health import PeerFailureError
from .demo import DemoConfig, TinyMoELM, _evaluate, _is_expert_param, _max_over_mean, load_corpus, write_report
from .elastic import ElasticRun, Membership

__all__ = ["Faults", "train_elastic"]

_KILLED_AT = "moeflow/demo/killed_at"
_JOIN_NOW = "moeflow/demo/join_now"


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What happens to the job: ``kill_rank`` dies at the start of ``at_step``; a process joins
    after step ``add_rank_at_step`` (>= 2); a checkpoint every ``checkpoint_every`` steps
    (0: none) for experts that lose every replica."""

    kill_rank: Optional[int] = None
    at_step: Optional[int] = None
    add_rank_at_step: Optional[int] = None
    checkpoint_every: int = 0


def train_elastic(cfg: DemoConfig, faults: Faults, out_dir: Optional[str] = None, show_progress: bool = True) -> dict:
    """Run on every process of the job (``--ranks``, plus one with ``add_rank_at_step``); returns
    the report on each process that is a member at the end."""
    job_store = dist.distributed_c10d._get_default_store()  # the launcher's: demo keys and the membership
    world_rank, world = dist.get_rank(), dist.get_world_size()
    num_members = world - (1 if faults.add_rank_at_step else 0)
    if world_rank < num_members:
        membership, transition = Membership.start(num_members, store=job_store), None
    else:  # the process that joins later: idle until the members are near the step
        job_store.wait([_JOIN_NOW], _forever())
        membership, transition = Membership.join(name=f"rank{world_rank}", store=job_store)
    slots_per_rank = (cfg.num_slots or cfg.num_experts) // num_members
    os.environ["LOCAL_WORLD_SIZE"] = str(membership.num_ranks)  # the layers' Buffers: one node
    torch.manual_seed(cfg.seed)  # the same dense weights everywhere (a joiner's are replaced)
    model = TinyMoELM(replace(cfg, num_slots=slots_per_rank * membership.num_ranks))
    gates = [p for n, p in model.named_parameters() if n.endswith("router.gate.weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("router.gate.weight")]
    opt = torch.optim.AdamW([dict(params=rest, lr_scale=1.0), dict(params=gates, lr_scale=cfg.gate_lr_scale)],
                            lr=cfg.lr, weight_decay=0.0, fused=True)
    ckpt_dir = os.path.join(out_dir or tempfile.mkdtemp(prefix="moeflow-demo-"), "checkpoints")
    run = ElasticRun(model, opt, membership, transition=transition, checkpoint_dir=ckpt_dir,
                     checkpoint_every=faults.checkpoint_every)
    return _Loop(cfg, faults, run, job_store, out_dir, show_progress).train()


class _Loop:
    """The training loop of one process (its state between steps)."""

    def __init__(self, cfg: DemoConfig, faults: Faults, run: ElasticRun, job_store, out_dir, show_progress):
        self.cfg, self.faults, self.run, self.job_store, self.out_dir = cfg, faults, run, job_store, out_dir
        corpus = torch.frombuffer(bytearray(load_corpus(cfg.corpus_bytes)), dtype=torch.uint8).long()
        split = int(len(corpus) * 0.9)
        self.train_data, self.val_data = corpus[:split], corpus[split:]
        unigram = torch.bincount(self.train_data, minlength=256).float() + 1
        self.unigram_loss = float(-(unigram / unigram.sum()).log().mul(
            torch.bincount(self.val_data, minlength=256).float() / len(self.val_data)).sum())
        self.member = int(run.membership.name[4:])  # "rank<r>": its batches follow it through regroups
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.member)
        self.history = dict(step=[], loss=[], ranks=[], val_step=[], val_loss=[], tokens_per_s=[], expert_load=[],
                            expert_load_per_layer=[], max_over_mean_expert=[], max_over_mean_rank=[],
                            bytes_per_step=[], rebalance=[])
        self.events: list[dict] = [dict(e, step_done_s=None) for e in run.events]  # a joiner's own entry
        self.bar = None
        if show_progress and run.membership.rank == 0 and not run.events:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=cfg.steps, desc="training", dynamic_ncols=True, initial=run.step)
            except ImportError:
                pass

    def batch(self, data, g):
        cfg = self.cfg
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
        chunk = torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    def train(self) -> dict:
        cfg, run, faults = self.cfg, self.run, self.faults
        t_start, batch_step = time.perf_counter(), -1
        x = y = None
        while run.step < cfg.steps:
            step = run.step
            if run.membership.name == f"rank{faults.kill_rank}" and step == faults.at_step:
                self.job_store.set(_KILLED_AT, repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)  # a lost GPU: gone without a word
            if batch_step != step:  # a step that runs again after a recovery keeps its batch
                x, y = self.batch(self.train_data, self.gen)
                batch_step = step
            try:
                self._step(step, x, y)
                if faults.add_rank_at_step and step + 2 == faults.add_rank_at_step and run.membership.rank == 0:
                    self._call_joiner()
                event = run.commit()
                if event is not None:
                    self.events.append(dict(event, step_done_s=None))
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    with run.guard():
                        val = _evaluate(run.module, self.val_data, cfg, self.batch, torch.device("cpu"), None)
                    self.history["val_step"].append(step)
                    self.history["val_loss"].append(val)
            except PeerFailureError as e:
                t_failed = time.time()
                event = run.recover(e)
                killed_at = float(self.job_store.get(_KILLED_AT)) if self.job_store.check([_KILLED_AT]) else None
                self.events.append(dict(event, killed_at=killed_at, detect_s=None if killed_at is None
                                        else t_failed - killed_at, step_done_s=None))
        if self.bar is not None:
            self.bar.close()
        return self._report(time.perf_counter() - t_start)

    def _step(self, step: int, x, y) -> None:
        cfg, run = self.cfg, self.run
        R = run.membership.num_ranks
        t0 = time.perf_counter()
        layers = list(run.layers.values())
        for layer in layers:
            layer.buffer.counters.reset()
        lr = cfg.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in run.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        for layer in layers:
            layer.router.bias_update_rate = cfg.bias_update_rate * (lr / cfg.lr if cfg.bias_decay else 1.0)
        with run.guard():  # every collective of the step (DDP's too) before the optimizer step
            logits = run.model(x)
            loss = F.cross_entropy(logits.view(-1, 256), y.reshape(-1))
            aux = sum(layer.last_router_output.loss for layer in layers)
            run.optimizer.zero_grad(set_to_none=True)
            (loss + aux).backward()
            loads = run.sync()
            loss_avg = loss.detach().reshape(1)
            dist.all_reduce(loss_avg)  # for the report only
        run.optimizer.step()
        dt = time.perf_counter() - t0
        load = torch.stack(loads).float()  # [layers, E], the group's counts this step
        per_rank = torch.stack([layer.slots.rank_load(lo) for layer, lo in zip(layers, loads)])
        per_layer = load.max(1).values / load.mean(1).clamp(min=1e-9)
        h = self.history
        h["step"].append(step)
        h["loss"].append(loss_avg.item() / R)
        h["ranks"].append(R)
        h["tokens_per_s"].append(cfg.batch_size * cfg.seq_len * R / dt)
        h["expert_load"].append(load.sum(0).tolist())
        h["expert_load_per_layer"].append(load.tolist())
        h["max_over_mean_expert"].append(float(per_layer.mean()))
        h["max_over_mean_rank"].append(float((per_rank.max(1).values / per_rank.mean(1)).mean()))
        h["bytes_per_step"].append(sum(layer.buffer.counters.wire_bytes() for layer in layers))
        for e in self.events:  # the first step completed after a change
            if e["step_done_s"] is None and e["kind"] == "loss" and e.get("killed_at") is not None:
                e["step_done_s"] = time.time() - e["killed_at"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{h['loss'][-1]:.3f}", ranks=R, tok_s=f"{h['tokens_per_s'][-1]:,.0f}")
            self.bar.update(1)

    def _call_joiner(self) -> None:
        """Rank 0, two steps before the join: wake the idle process and wait for its request, so
        that it is taken in after exactly ``add_rank_at_step`` (see Membership.at_boundary)."""
        self.job_store.set(_JOIN_NOW, "1")
        deadline = time.monotonic() + self.run.membership.timeout_s
        while self.run.membership.waiting_joiners() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    def _report(self, seconds: float) -> dict:
        cfg, h, run = self.cfg, self.history, self.run
        tail = max(1, len(h["step"]) // 10)
        events = [{k: v for k, v in e.items() if k != "killed_at"} for e in self.events]
        report = dict(
            config=asdict(cfg), ranks=h["ranks"][0] if h["ranks"] else run.membership.num_ranks,
            rank=run.membership.rank, seconds=seconds, unigram_val_loss=self.unigram_loss,
            final_val_loss=h["val_loss"][-1] if h["val_loss"] else float("nan"),
            final_train_loss=sum(h["loss"][-tail:]) / tail, tokens_per_s=sum(h["tokens_per_s"][-tail:]) / tail,
            max_over_mean_expert_last=sum(h["max_over_mean_expert"][-tail:]) / tail,
            max_over_mean_rank_last=sum(h["max_over_mean_rank"][-tail:]) / tail,
            max_over_mean_expert_window=_max_over_mean(torch.tensor(h["expert_load_per_layer"][-tail:]).sum(0)),
            bytes_per_step=sum(h["bytes_per_step"][-tail:]) / tail, rebalance=[],
            num_params=sum(p.numel() for n, p in run.module.named_parameters() if not _is_expert_param(n))
            + len(run.layers) * cfg.num_experts * 3 * cfg.dim * cfg.ffn_hidden,
            history=h,
            elastic=dict(asdict(self.faults), timeout_s=run.membership.timeout_s, events=events,
                         final_ranks=run.membership.num_ranks, member=run.membership.name),
        )
        if run.membership.rank == 0 and self.out_dir:
            write_report(report, self.out_dir)
        return report


def _forever():
    import datetime

    return datetime.timedelta(days=1)
