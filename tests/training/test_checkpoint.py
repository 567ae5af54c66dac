"""Checkpoints: round trips, bit-identical resume on CPU, corruption and mismatch errors."""

import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fmri2text.errors import UserError
from fmri2text.losses import MemoryBank
from fmri2text.training.checkpoint import (
    GracefulStop,
    _decode,
    _encode,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore,
    save_checkpoint,
    trainable_state_dict,
)

N_DATA, BATCH = 24, 4


class Tiny(nn.Module):
    """Frozen base layer + trainable head with dropout + a buffer (memory bank)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.base = nn.Linear(4, 4)
        with torch.no_grad():  # frozen "pretrained" weights: the same in every process
            g = torch.Generator().manual_seed(42)
            self.base.weight.copy_(torch.randn(4, 4, generator=g))
            self.base.bias.copy_(torch.randn(4, generator=g))
        self.base.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(4, hidden), nn.Dropout(0.3), nn.ReLU(), nn.Linear(hidden, 2))
        self.bank = MemoryBank(n_target=N_DATA, dim=2, momentum=0.5)

    def forward(self, x):  # (B, 4) → (B, 2)
        return self.head(self.base(x))


def _make(seed: int, hidden: int = 8):
    torch.manual_seed(seed)
    model = Tiny(hidden)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    return model, opt, sched


def _train(model, opt, sched, data, gen, start: int, stop: int) -> None:
    """Steps [start, stop): data order from a torch.Generator, noise from numpy, python and torch RNG."""
    x_all, y_all = data
    for step in range(start, stop):
        if step % (N_DATA // BATCH) == 0:
            gen_perm = torch.randperm(N_DATA, generator=gen)
            _train.perm = gen_perm
        pos = step % (N_DATA // BATCH)
        idx = _train.perm[pos * BATCH:(pos + 1) * BATCH]
        noise = torch.from_numpy(np.random.normal(size=(BATCH, 4)).astype(np.float32))
        scale = random.uniform(0.5, 1.5)
        out = model(x_all[idx] + 0.1 * noise * scale)  # dropout uses torch's global RNG
        loss = nn.functional.mse_loss(out, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        model.bank.update(out.detach(), idx)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_gives_identical_weights(tmp_path):
    g = torch.Generator().manual_seed(123)
    data = (torch.randn(N_DATA, 4, generator=g), torch.randn(N_DATA, 2, generator=g))

    # uninterrupted: 10 steps (the permutation at step 6 depends on the generator state)
    model, opt, sched = _make(0)
    _seed_all(7)
    gen = torch.Generator().manual_seed(99)
    _train(model, opt, sched, data, gen, 0, 10)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # interrupted: 5 steps, save, then fresh objects with other seeds, load, 5 more steps
    model, opt, sched = _make(0)
    _seed_all(7)
    gen = torch.Generator().manual_seed(99)
    _train(model, opt, sched, data, gen, 0, 5)
    save_checkpoint(tmp_path, 5, model_state=trainable_state_dict(model), optimizer=opt,
                    scheduler=sched, data_position={"step": 5, "generator": gen.get_state(),
                                                    "perm": _train.perm},
                    config={"seed": 0, "loss": {"alpha": 0.5}}, metrics={"loss": 0.1})
    del model, opt, sched, gen
    _train.perm = None

    model, opt, sched = _make(1)  # different init: only the restore can make it equal
    _seed_all(1000)
    state = load_checkpoint(latest_checkpoint(tmp_path))
    restore(model, opt, sched, state)
    gen = torch.Generator()
    gen.set_state(state.data_position["generator"])
    _train.perm = state.data_position["perm"]
    _train(model, opt, sched, data, gen, state.data_position["step"], 10)

    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert state.step == 5 and state.config == {"seed": 0, "loss": {"alpha": 0.5}}
    assert state.metrics == {"loss": 0.1}


def test_adamw_and_scheduler_round_trip(tmp_path):
    model, opt, sched = _make(0)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    path = save_checkpoint(tmp_path, 3, model_state=trainable_state_dict(model), optimizer=opt,
                           scheduler=sched)
    model2, opt2, sched2 = _make(5)
    restore(model2, opt2, sched2, load_checkpoint(path))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr, betas tuple, weight decay, initial_lr
    assert b["param_groups"][0]["betas"] == (0.9, 0.95)
    for pid, st in a["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["state"][pid][name]), (pid, name)
    assert sched2.state_dict() == sched.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_only_trainable_params_and_buffers_are_saved(tmp_path):
    model, opt, sched = _make(0)
    path = save_checkpoint(tmp_path, 1, model_state=trainable_state_dict(model))
    names = set(load_file(str(path / "model.safetensors")))
    assert "base.weight" not in names
    assert {"head.0.weight", "head.3.bias", "bank.features", "bank.filled"} <= names


def test_encode_decode_round_trip():
    tensors: dict = {}
    obj = {"inf": math.inf, "nan_free": -math.inf, "t": (1, 2.5, None), 3: torch.arange(3),
           "nested": [{"__tensor__": "user key"}, np.arange(4, dtype=np.uint32)], "b": True}
    back = _decode(_encode(obj, "x", tensors), tensors)
    assert back["inf"] == math.inf and back["nan_free"] == -math.inf
    assert back["t"] == (1, 2.5, None) and torch.equal(back[3], torch.arange(3))
    assert back["nested"][0] == {"__tensor__": "user key"}  # user dicts never mistaken for refs
    assert back["nested"][1].dtype == np.uint32 and back["nested"][1].tolist() == [0, 1, 2, 3]
    rng = capture_rng_state()
    back_rng = _decode(_encode(rng, "rng", tensors), tensors)
    assert back_rng["python"] == rng["python"]
    with pytest.raises(TypeError, match="object"):
        _encode({"bad": object()}, "m", {})


def test_corrupt_missing_and_incomplete_checkpoints(tmp_path):
    model, opt, sched = _make(0)
    path = save_checkpoint(tmp_path, 2, model_state=trainable_state_dict(model), optimizer=opt)
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # flip one byte of tensor data
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt") as err:
        load_checkpoint(path)
    assert "model.safetensors" in str(err.value) and "fix:" in str(err.value)

    path = save_checkpoint(tmp_path, 3, model_state=trainable_state_dict(model), optimizer=opt)
    (path / "state.json").unlink()
    with pytest.raises(UserError, match="missing") as err:
        load_checkpoint(path)
    assert "state.json" in str(err.value)

    (path / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_checkpoint_from_another_config_is_refused(tmp_path):
    model, opt, sched = _make(0, hidden=8)
    path = save_checkpoint(tmp_path, 1, model_state=trainable_state_dict(model), optimizer=opt,
                           scheduler=sched)
    other, opt2, sched2 = _make(0, hidden=6)
    with pytest.raises(UserError, match=r"'head.0.weight' has shape \(8, 4\) in the checkpoint "
                                        r"but \(6, 4\) in the model") as err:
        restore(other, opt2, sched2, load_checkpoint(path))
    assert "model.safetensors" in str(err.value)
    # same model, optimizer over fewer parameters: the optimizer state is refused
    model3, _, _ = _make(0)
    opt3 = torch.optim.AdamW([model3.head[0].weight], lr=1e-2)
    with pytest.raises(UserError, match="optimizer state does not match"):
        restore(model3, opt3, None, load_checkpoint(path))


def test_keep_last_latest_and_atomic_failure(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, _, _ = _make(0)
    state = trainable_state_dict(model)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-00000009-leftover").mkdir()  # a killed save
    for step in (1, 2, 10, 3):
        save_checkpoint(tmp_path, step, model_state=state, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003", "step-00000010"]
    # re-saving a step replaces it; a save that fails leaves nothing behind
    save_checkpoint(tmp_path, 10, model_state=state, metrics={"again": 1}, keep_last=2)
    assert load_checkpoint(latest_checkpoint(tmp_path)).metrics == {"again": 1}
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 11, model_state=state, metrics={"bad": object()})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003", "step-00000010"]


def test_graceful_stop_turns_signals_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)  # second Ctrl-C: stop now
            for _ in range(1000):  # give the interpreter a chance to run the handler
                pass
