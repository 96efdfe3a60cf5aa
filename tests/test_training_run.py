"""TrainingRun on resume and on devices: optimiser state after prepare, the fp16 loss scale, backends."""

from __future__ import annotations

import json

import torch

from decorr.checkpoint import load_checkpoint
from decorr.training.loop import Built, Task, fit
from decorr.training.run import TrainingRun


class _TinyTask(Task):
    """Adam on a linear model for a few steps: enough optimiser state to resume."""

    def __init__(self, epochs: int, seen: dict) -> None:
        self.epochs, self.seen = epochs, seen

    def build(self, run):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        return Built({"model": model}, torch.optim.Adam(model.parameters(), lr=0.1))

    def start(self, models, optimizer, start_epoch):
        super().start(models, optimizer, start_epoch)
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.seen["state_at_start"] = {k: {name: value.clone() if torch.is_tensor(value) else value
                                            for name, value in v.items()} for k, v in inner.state.items()}

    def batches(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        return [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(3)]

    def loss(self, batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.models["model"](x), y)
        return loss, {"loss": loss.detach()}

    def end_epoch(self, epoch, terms, seconds):
        return {"train/loss": terms["loss"]}


def _run(tmp_path, epochs, resume, **kwargs):
    config = {"kind": "test", "models": {"model": {"arch": "linear", "kwargs": {}, "feature_layer": None}},
              "hyperparameters": {"epochs": epochs}}
    return TrainingRun(tmp_path / "run", config, resume=resume, cpu=True, log=False, **kwargs)


def test_resume_restores_the_optimizer_after_prepare_with_step_counters_where_adam_wants_them(tmp_path, monkeypatch):
    fit(_run(tmp_path, 1, False), _TinyTask(1, {}))
    run = _run(tmp_path, 2, True)
    states_at_prepare = []
    original_prepare = run.prepare

    def spy(*objects):
        states_at_prepare.append(len(objects[-1].state))
        return original_prepare(*objects)

    monkeypatch.setattr(run, "prepare", spy)
    seen: dict = {}
    fit(run, _TinyTask(2, seen))
    assert states_at_prepare == [0], "the optimiser state was loaded before prepare (accelerate would move it)"
    state = seen["state_at_start"]
    assert state, "the optimiser state was not restored"
    for per_param in state.values():
        # torch.optim.Adam (not capturable, not fused) keeps step on the host, as a float32 scalar tensor.
        assert per_param["step"].device.type == "cpu" and per_param["step"].dtype == torch.float32
        assert float(per_param["step"]) == 3.0  # three steps in the first epoch
        assert per_param["exp_avg"].device == run.device


def test_fp16_grad_scaler_state_is_saved_and_restored(tmp_path):
    run = _run(tmp_path, 1, False)
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    run.accelerator.scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    run.accelerator.scaler.update(new_scale=128.0)
    fit(run, _TinyTask(1, {}))
    saved = load_checkpoint(tmp_path / "run", load_weights=False).config["grad_scaler"]
    assert saved["scale"] == 128.0
    resumed = _run(tmp_path, 2, True)
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    fit(resumed, _TinyTask(2, {}))
    assert resumed.accelerator.scaler.get_scale() == 128.0


def test_deterministic_switch_is_applied_and_recorded(tmp_path):
    try:
        run = _run(tmp_path, 1, False, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        fit(run, _TinyTask(1, {}))
        assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)
    run = _run(tmp_path / "other", 1, False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    run.release()


def test_place_keeps_cpu_data_and_moves_small_splits_to_the_gpu(tmp_path, mnist):
    run = _run(tmp_path, 1, False)
    small = mnist.subset(train=100, test=50)
    assert run.place(small) is small  # CPU: nothing to do
    run.release()
    if not torch.cuda.is_available():
        return
    gpu = TrainingRun(tmp_path / "gpu", {"kind": "test", "models": {}}, log=False)
    placed = gpu.place(small)
    assert placed.train.images.is_cuda and torch.equal(placed.train.images.cpu(), small.train.images)
    gpu.gpu_data_budget_mb = 0
    assert gpu.place(small).train.images.is_pinned()
    gpu.release()
