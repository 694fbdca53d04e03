from __future__ import annotations

from trainer.evaluate import track_best
from trainer.loop import TrainerState


def test_best_step_and_early_stopping_with_patience():
    s = TrainerState()
    for step, acc in [(10, 0.70), (20, 0.80), (30, 0.79), (40, 0.80)]:
        track_best(s, acc, step, "max", patience=3)
    assert (s.best_metric, s.best_step, s.bad_evals, s.stopped_early) == (0.80, 20, 2, False)
    track_best(s, 0.78, 50, "max", patience=3)
    assert s.stopped_early and s.best_step == 20


def test_min_mode_and_final_eval_never_counts_against():
    s = TrainerState()
    track_best(s, 1.0, 5, "min", patience=1)
    track_best(s, 1.2, 10, "min", patience=1, final=True)
    assert not s.stopped_early and s.best_step == 5
    track_best(s, 0.5, 15, "min", patience=1)
    assert s.best_metric == 0.5 and s.best_step == 15


def test_trainer_state_round_trips_through_json():
    import json

    s = TrainerState(
        step=7, samples_seen=448, best_metric=0.9, best_step=5, acc_loss=1.25, acc_steps=2
    )
    d = json.loads(json.dumps(s.as_dict(epoch=0, world=2, global_batch=64)))
    assert TrainerState.from_dict(d) == s


def test_a_target_is_reached_at_or_past_it_in_the_metrics_direction():
    from trainer.evaluate import reaches

    assert reaches(0.84, 0.84, "max") and reaches(0.85, 0.84, "max")
    assert not reaches(0.8399, 0.84, "max")
    assert reaches(0.30, 0.30, "min") and not reaches(0.31, 0.30, "min")
