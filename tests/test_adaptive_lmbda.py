"""--lmbda_schedule adaptive: DistiLLM's adaptive off-policy schedule, against its definition."""

import types

import pytest
import torch

from gkd.config import TrainConfig
from gkd.errors import GKDError
from gkd.data.order import lmbda_draw
from gkd.train import trainer as trainer_module
from gkd.train.metrics import read_metrics
from gkd.train.sources import DATA, FRESH, REPLAY, AdaptiveLmbda, choose
from gkd.train.trainer import Trainer


def _method(**kw):
    base = dict(seed=3, lmbda=0.0, adaptive_lmbda_step=0.1, adaptive_lmbda_eps=0.1, replay_capacity=4)
    return types.SimpleNamespace(**{**base, **kw})


def _reference(u, share, progress, buffered, capacity):
    """DistiLLM's finetune loop, transcribed: sample fresh when r < share x (1 - t/T) or (r < share and the
    buffer is not full); else replay when r < share; else the dataset's batch."""
    if u < share * (1 - progress) or (u < share and buffered < capacity):
        return FRESH
    if u < share:
        return REPLAY
    return DATA


def test_each_steps_choice_follows_distillms_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        u, share, progress = torch.rand(3, generator=g).tolist()
        buffered = int(torch.randint(0, 9, (), generator=g))
        assert choose(u, share, progress, buffered, 8) == _reference(u, share, progress, buffered, 8)


def test_the_share_rises_when_the_held_out_divergence_grows_by_eps():
    a = AdaptiveLmbda(_method(lmbda=0.2), global_batch=2)
    shares = []
    for div in (1.0, 1.2, 1.1, 1.35, 1.3, 1.44, 5.0, 9.0, 20.0, 40.0, 80.0, 160.0, 320.0):
        a.observe({"eval_divergence": div, "eval_top1_agreement": 0.5})
        shares.append(round(a.share, 9))
    # the reference moves only when the share rises: 1.0 -> 1.2 -> 1.35 -> 5.0 -> ...
    assert shares == [0.2, 0.3, 0.3, 0.4, 0.4, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]
    b = AdaptiveLmbda(_method(), global_batch=2)  # several teachers: their mean
    b.observe({"eval_a_divergence": 1.0, "eval_b_divergence": 3.0})
    b.observe({"eval_a_divergence": 1.0, "eval_b_divergence": 3.3})
    assert b.share == pytest.approx(0.1) and b.reference == pytest.approx(2.15)


def test_the_buffer_keeps_the_newest_rows_and_a_replay_draws_distinct_ones_by_the_step():
    a = AdaptiveLmbda(_method(replay_capacity=4), global_batch=2)
    a.record(0, [5, 6], [[1], [2]], 0)
    a.record(3, [7, 8], [[3], [4]], 3)
    a.record(4, [9, 1], [[5], [6]], 4)  # rows 5 and 6 leave
    assert [r for r, _, _ in a.buffer] == [7, 8, 9, 1]
    rows, completions, version = a.replay(10)
    assert len(set(rows)) == 2 and {tuple(c) for c in completions} <= {(3,), (4,), (5,), (6,)}
    assert version == min(v for r, _, v in a.buffer if r in rows)
    assert a.replay(10) == (rows, completions, version) and any(a.replay(s)[0] != rows for s in range(11, 20))
    restored = AdaptiveLmbda(_method(replay_capacity=4), global_batch=2)
    restored.load(a.state())
    assert restored.state() == a.state() and restored.replay(10) == a.replay(10)


def cfg_for(tiny, out, **kw):
    base = dict(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]], output_dir=str(out),
                max_completion_length=4, learning_rate=1e-3, progress_bar=False, max_steps=12, micro_batch_size=4,
                global_batch_size=4, split_dataset_ratio=0.25, eval_steps=2, lmbda=0.6, lmbda_schedule="adaptive",
                replay_capacity=4, seed=5)
    return TrainConfig(**{**base, **kw})


def test_a_run_samples_fills_the_buffer_replays_its_samples_and_follows_the_evaluations(tiny, tmp_path, monkeypatch):
    """Steps on student data sample while the buffer fills, then replay earlier samples (more as the run goes
    on); a replayed step trains on exactly the completions an earlier step sampled for those rows; evaluations
    that grow raise the logged share."""
    sampled, trained = {}, {}
    real_call = trainer_module.Completions.__call__

    def spy_completions(self, rows, step, first, inputs, teacher_inputs, sample):
        got = real_call(self, rows, step, first, inputs, teacher_inputs, sample)
        if sample:
            sampled[step] = {(tuple(r.prompt_ids), tuple(c)) for r, c in zip(rows, got[0])}
        return got

    real_collate = trainer_module.collate

    def spy_collate(prompts, completions, *a, **kw):
        trained.setdefault(len(trained), []).append(list(zip(map(tuple, prompts), map(tuple, completions))))
        return real_collate(prompts, completions, *a, **kw)

    held_out = iter([1.0, 1.3, 1.2, 1.45, 1.4, 1.0])

    def scripted_evaluate(self):
        return {"eval_divergence": next(held_out)}

    monkeypatch.setattr(trainer_module.Completions, "__call__", spy_completions)
    monkeypatch.setattr(trainer_module, "collate", spy_collate)
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", scripted_evaluate)
    t = Trainer(cfg_for(tiny, tmp_path / "o"), log=lambda *_: None)
    t.train()
    logged = read_metrics(t.out / "metrics.jsonl")
    steps = [m for m in logged if "loss" in m]
    shares = [m["student_data_share"] for m in logged if "student_data_share" in m]
    assert shares == pytest.approx([0.6, 0.7, 0.7, 0.8, 0.8, 0.8])
    replays = [m["step"] - 1 for m in steps if m.get("replay_share")]
    fresh = sorted(sampled)
    assert replays and fresh and min(replays) > min(fresh)
    for s in replays:  # the replayed rows' completions were sampled for those prompts at earlier steps
        earlier = set().union(*(sampled[f] for f in fresh if f < s))
        assert set(trained[s][0]) <= earlier and s not in sampled, s
    # every step on student data is one the schedule picks for its draw, at the share the evaluations left
    for m in steps:
        s = m["step"] - 1
        share = 0.6 if s // 2 == 0 else shares[s // 2 - 1]
        assert (m["on_policy_share"] > 0) == (lmbda_draw(5, s) < share), s


def test_bad_adaptive_settings_are_one_line(tiny, tmp_path):
    for kw, words in ((dict(eval_steps=0), "needs --eval_steps"),
                      (dict(replay_capacity=2), "--replay_capacity 2 must hold at least one batch"),
                      (dict(lmbda_schedule="fixed", replay_capacity=64), "--replay_capacity is for --lmbda_schedule adaptive")):
        with pytest.raises(GKDError) as e:
            cfg_for(tiny, tmp_path / "o", **kw).validate()
        assert words in str(e.value) and "\n" not in str(e.value)
