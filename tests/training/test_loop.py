"""The shared training loop's validation: the best step kept, early stopping, a given first score."""

import torch
from torch import nn

from fmri2text.training import loop


def _train(stage_dir, scores, *, patience, steps=10, resume=False, first_score=None):
    """Train a 2-weight model for ``steps``, validating every 2 steps with ``scores`` in turn;
    return the loop's summary, the validation calls and the weights after every step."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = loop.LoopSettings(steps=steps, lr=0.1, weight_decay=0.0, warmup_steps=0,
                                 grad_clip=0.0, checkpoint_every=2, keep_last=2, log_every=1,
                                 val_every=2, val_patience=patience)
    queue, calls, weights = list(scores), [], {}

    def validate() -> float:
        calls.append(len(weights))
        return queue.pop(0)

    def step_fn(step: int) -> dict:
        x = torch.tensor([[1.0, -2.0]])
        return {"total": (model(x) - 3.0).pow(2).sum()}

    def after_step(step: int) -> None:
        weights[step + 1] = model.weight.detach().clone()

    out = loop.train_loop(accelerator=loop.make_accelerator(), module=model, optimizer=opt,
                          settings=settings, step_fn=step_fn, stage_dir=stage_dir, config={},
                          resume=resume, log=lambda _: None, name="t", progress=False,
                          after_step=after_step, validate=validate, first_score=first_score)
    return out, calls, weights, model.weight.detach().clone()


def test_training_stops_after_patience_passes_without_a_better_score(tmp_path):
    # passes at steps 0, 2, 4, 6: best at 2, then two worse ones -> stop after step 6
    out, calls, weights, final = _train(tmp_path / "a", [1.0, 0.5, 0.7, 0.8, 0.1, 0.1],
                                        patience=2)
    assert out["steps_done"] == 6 and out["stopped"] is None
    assert out["validation"]["best_step"] == 2 and len(calls) == 4
    assert torch.equal(final, weights[2])  # the best step's weights are kept
    # without patience every step runs and the later, better pass wins
    out, calls, weights, final = _train(tmp_path / "b", [1.0, 0.5, 0.7, 0.8, 0.1, 0.2],
                                        patience=0)
    assert out["steps_done"] == 10 and out["validation"]["best_step"] == 8
    assert torch.equal(final, weights[8])


def test_a_resumed_run_that_stopped_early_trains_no_further(tmp_path):
    _train(tmp_path, [1.0, 0.5, 0.7, 0.8], patience=2)
    out, calls, _, final = _train(tmp_path, [0.0, 0.0], patience=2, resume=True)
    assert out["start_step"] == 6 and out["steps_done"] == 6 and calls == []
    assert out["validation"]["best_step"] == 2


def test_a_given_first_score_replaces_the_first_validation_pass(tmp_path):
    out, calls, _, _ = _train(tmp_path, [0.9, 0.8, 0.7, 0.6, 0.5], patience=0,
                              first_score=1.25)
    assert out["validation"]["scores"][0] == [0, 1.25]
    assert calls == [2, 4, 6, 8, 10]  # no pass before the first step
