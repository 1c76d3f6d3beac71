"""DCP checkpoints across meshes: a model and its AdamW saved mid-training on 2 dp x 2 ep with
FSDP2 load on 1 x 4, 4 x 1 and 1 x 2, and training goes on with the losses it would have had."""

from __future__ import annotations

import pytest

import moeflow.checkpoint as checkpoint
from moeflow import spawn

from _train import build, eval_loss, train

SAVE_AT, STEPS = 3, 6


def _save_run(path):
    model, opt = build(2, 2)
    train(model, opt, range(SAVE_AT))
    checkpoint.save(model, path, optimizer=opt)
    saved = eval_loss(model, SAVE_AT)
    return dict(saved_eval=saved, losses=train(model, opt, range(SAVE_AT, STEPS)))


def _load_run(path, dp, ep):
    model, opt = build(dp, ep)
    fresh = eval_loss(model, SAVE_AT)
    checkpoint.load(model, path, optimizer=opt)
    loaded = eval_loss(model, SAVE_AT)
    return dict(fresh_eval=fresh, loaded_eval=loaded, losses=train(model, opt, range(SAVE_AT, STEPS)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "step3")
    return path, spawn(_save_run, 4, path, timeout_s=180)[0]


@pytest.mark.parametrize("dp,ep", [(1, 4), (4, 1), (1, 2)])
def test_training_continues_on_another_mesh(saved, dp, ep):
    path, ref = saved
    out = spawn(_load_run, dp * ep, path, dp, ep, timeout_s=180)[0]
    assert abs(out["fresh_eval"] - ref["saved_eval"]) > 1e-3, "a fresh model already matched: the test proves nothing"
    assert abs(out["loaded_eval"] - ref["saved_eval"]) <= 1e-5 * ref["saved_eval"]
    for step, (got, want) in enumerate(zip(out["losses"], ref["losses"]), SAVE_AT):
        assert abs(got - want) <= 1e-5 * want, (step, got, want)
