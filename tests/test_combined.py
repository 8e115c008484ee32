"""Several optimizers stepped as one (``selftune.Combined``, ``selftune.wrap([muon, adamw])``):
torch's Muon on the 2-D weights beside an AdamW on the rest, as Muon is meant to train.  One
guard rolls every part back together, one log replays the whole run to the bit, a checkpoint
resumes it, and what cannot be combined is refused by name before anything changes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import selftune
from selftune import Combined, ConfigError

STEPS = 80
SPIKE = 40  # the second of two steps whose Muon gradients are blown up: the guard holds the
# first one's update and, the same weights spiking again, rolls back at this one
TEACHER = torch.randn(8, 1, generator=torch.Generator().manual_seed(123))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )


def matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 2]


def make_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """Muon over the weight matrices, AdamW over the biases."""
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [torch.optim.Muon(matrices(model), lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=gen)
    return x, torch.tanh(x @ TEACHER)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    x, y = batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    if step in (SPIKE - 1, SPIKE):  # Muon's gradients alone: the other optimizer's look healthy
        for p in matrices(model):
            assert p.grad is not None
            p.grad.mul_(1e4)
    opt.step(loss=loss.detach()) if isinstance(opt, selftune.SelfTuned) else opt.step()
    return loss.item()


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_groups_and_state_are_the_optimizers_own() -> None:
    """A Combined holds its optimizers' group dicts and per-parameter state, not copies, and
    its state_dict is torch's format over all their parameters, which loads into a fresh one."""
    model = make_model()
    muon, adamw = make_optimizers(model)
    combined = Combined(muon, adamw)
    assert [id(g) for g in combined.param_groups] == [
        id(g) for g in muon.param_groups + adamw.param_groups
    ]
    for step in range(1, 4):
        train_step(model, combined, step)
    for p in model.parameters():
        owner = muon if p.ndim == 2 else adamw
        assert combined.state[p] is owner.state[p]
    assert len(combined.state) == len(list(model.parameters()))
    saved = combined.state_dict()
    assert sorted(saved["state"]) == list(range(len(list(model.parameters()))))
    assert [len(g["params"]) for g in saved["param_groups"]] == [3, 3]

    fresh = make_model()
    other = Combined(make_optimizers(fresh))
    other.load_state_dict(saved)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in combined.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.state[q][key])), key
    # the loaded groups went to the optimizers that step them
    other.param_groups[0]["lr"] = 0.5
    assert other.optimizers[0].param_groups[0]["lr"] == 0.5


def test_wrap_tunes_each_optimizer_from_its_own_signals() -> None:
    """wrap([muon, adamw]) tunes Muon's rate and AdamW's, each group with its own knobs, and
    the model trains."""
    model = make_model()
    opt = selftune.wrap(make_optimizers(model))
    assert isinstance(opt.optimizer, Combined)
    start = opt.hyperparams()
    assert set(start[0]) == {"lr", "momentum"}
    assert set(start[1]) == {"lr", "beta1", "beta2"}
    first = [train_step(model, opt, step) for step in range(1, 11)]
    last = [train_step(model, opt, step) for step in range(11, SPIKE)]
    assert sum(last[-10:]) < 0.5 * sum(first)
    now = opt.hyperparams()
    assert now[0]["lr"] != start[0]["lr"] and now[1]["lr"] != start[1]["lr"]


def test_a_rollback_takes_every_optimizer_back_together() -> None:
    """A spike in Muon's gradients alone rolls back AdamW's parameters and state too, to the
    same snapshot: wrapped one by one, AdamW's guard saw nothing and kept its half of the model
    where it stood, on top of the other half's older weights."""
    model = make_model()
    opt = selftune.wrap(make_optimizers(model))
    events: list[selftune.StepEvent] = []
    opt.add_listener(events.append)
    muon = opt.optimizer.optimizers[0]
    before: dict[int, tuple[list[torch.Tensor], list[Any]]] = {}
    for step in range(1, SPIKE + 1):
        before[step] = (weights(model), copy.deepcopy([muon.state[p] for p in matrices(model)]))
        train_step(model, opt, step)
    now = weights(model)
    back = [
        k
        for k, (w, _) in before.items()
        if all(torch.equal(a, b) for a, b in zip(w, now, strict=True))
    ]
    assert back and back[0] < SPIKE, "every parameter went back to one earlier step"
    buffers = before[back[0]][1]
    for p, then in zip(matrices(model), buffers, strict=True):
        for key, value in then.items():
            assert torch.equal(torch.as_tensor(muon.state[p][key]), torch.as_tensor(value))
    assert events[-1].guard is not None and events[-1].guard["event"] == "rollback"
    cuts = {d.group for d in events[-1].decisions if d.knob == "lr" and d.new < d.old}
    assert cuts == {0, 1}, "both optimizers' rates were cut"


def _run(log_dir: Path | None) -> tuple[torch.nn.Module, selftune.SelfTuned]:
    model = make_model()
    opt = selftune.wrap(make_optimizers(model), log_dir=log_dir, seed=0)
    for step in range(1, STEPS + 1):
        train_step(model, opt, step)
    return model, opt


def test_replay_of_a_combined_run_ends_on_the_same_weights(tmp_path: Path) -> None:
    model, opt = _run(tmp_path / "run")
    opt.close()
    assert selftune.verify(tmp_path / "run").guard_events >= 1
    again = make_model()
    replayed = selftune.replay(make_optimizers(again), tmp_path / "run")
    for step in range(1, STEPS + 1):
        train_step(again, replayed, step)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_from_a_checkpoint_ends_as_the_run_that_never_stopped(tmp_path: Path) -> None:
    model, opt = _run(None)
    ckpt = tmp_path / "c.pt"
    first = make_model()
    cut = selftune.wrap(make_optimizers(first))
    for step in range(1, 51):
        train_step(first, cut, step)
        if step == 30:
            selftune.save_checkpoint(ckpt, model=first, optimizer=cut, step=step)
    resumed_model = make_model()
    resumed = selftune.wrap(make_optimizers(resumed_model))
    start = selftune.load_checkpoint(ckpt, model=resumed_model, optimizer=resumed)["step"] + 1
    for step in range(start, STEPS + 1):
        train_step(resumed_model, resumed, step)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.hyperparams() == opt.hyperparams()


def test_the_closure_is_called_once_for_every_optimizer() -> None:
    model = make_model()
    combined = Combined(make_optimizers(model))
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        x, y = batch(1)
        combined.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = weights(model)
    loss = combined.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))


def test_an_optimizer_stepped_past_the_combination_is_refused() -> None:
    """A step of one of the optimizers alone is refused before it moves a weight, wrapped or
    not, after unwrap too; a copy of the Combined gates its own copies."""
    model = make_model()
    muon, adamw = make_optimizers(model)
    opt = selftune.wrap([muon, adamw])
    train_step(model, opt, 1)
    before = weights(model)
    with pytest.raises(ConfigError, match="one of a Combined\\(Muon, AdamW\\)'s optimizers"):
        muon.step()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    combined = opt.unwrap()
    assert isinstance(combined, Combined)
    with pytest.raises(ConfigError, match="stepped alone"):
        adamw.step()
    train_step(model, combined, 2)  # the Combined itself steps on
    twin = copy.deepcopy(combined)
    twin.step()
    with pytest.raises(ConfigError, match="stepped alone"):
        twin.optimizers[1].step()


def _shared() -> list[torch.optim.Optimizer]:
    model = make_model()
    return [torch.optim.SGD(model.parameters()), torch.optim.AdamW(model[0].parameters())]


def _twice() -> list[torch.optim.Optimizer]:
    sgd = torch.optim.SGD(make_model().parameters())
    return [sgd, sgd]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (lambda: [], "at least one optimizer"),
        (_shared, "trained by optimizers 0 and 1"),
        (_twice, "given twice"),
        (lambda: [selftune.wrap(torch.optim.SGD(make_model().parameters()))], "selftune wrapper"),
        (lambda: [torch.optim.LBFGS(make_model().parameters())], "LBFGS"),
        (lambda: [make_model()], "not a torch.optim.Optimizer"),
    ],
)
def test_what_cannot_be_combined_is_refused_by_name(given: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Combined(*given())


def test_wrap_refuses_what_it_could_not_tune_in_a_combination() -> None:
    model = make_model()
    muon, adamw = make_optimizers(model)
    combined = Combined(muon, adamw)
    with pytest.raises(ConfigError, match="one of a Combined's optimizers"):
        selftune.wrap(muon)
    with pytest.raises(ConfigError, match="Rprop"):
        other = make_model()
        selftune.wrap(
            [torch.optim.Rprop(other[0].parameters()), torch.optim.SGD(other[2].parameters())]
        )
    opt = selftune.wrap(combined)
    train_step(model, opt, 1)
    with pytest.raises(ConfigError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 2
    train_step(model, opt, 2)  # the run steps on as it was
    assert opt.step_count == 2


def test_joint_groups_keep_the_optimizers_rates_in_their_ratio() -> None:
    model = make_model()
    opt = selftune.wrap(make_optimizers(model), groups="joint")
    for step in range(1, 31):
        train_step(model, opt, step)
    rates = [k["lr"] for k in opt.hyperparams()]
    assert rates[0] != 0.02
    assert rates[0] / rates[1] == pytest.approx(0.02 / 1e-3)


def test_a_sparse_embedding_under_sparse_adam_beside_a_dense_optimizer() -> None:
    """The other pairing a model needs two optimizers for: SparseAdam's sparse gradients are
    read and tuned beside the dense part's."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8, sparse=True)
    head = torch.nn.Linear(8, 1)
    opt = selftune.wrap(
        [torch.optim.SparseAdam(embedding.parameters()), torch.optim.AdamW(head.parameters())]
    )
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(50, generator=gen)
    losses = []
    for _ in range(60):
        ids = torch.randint(0, 50, (16,), generator=gen)
        loss = torch.nn.functional.mse_loss(head(embedding(ids)).squeeze(1), target[ids])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10])
    assert opt.hyperparams()[0]["lr"] != 1e-3


def test_a_combination_that_already_stepped_keeps_its_state_when_wrapped() -> None:
    """The optimizers' momentum and moments survive the wrap, as a single optimizer's do."""
    model = make_model()
    combined = Combined(make_optimizers(model))
    for step in range(1, 4):
        train_step(model, combined, step)
    held = {id(p): dict(combined.state[p]) for p in model.parameters()}
    opt = selftune.wrap(combined)
    for p in model.parameters():
        assert opt.state[p].keys() == held[id(p)].keys()
        for key, value in held[id(p)].items():
            assert opt.state[p][key] is value
    train_step(model, opt, 4)


def test_lightning_steps_a_combination_as_its_one_optimizer(tmp_path: Path) -> None:
    """Lightning steps one optimizer in automatic optimization: ``configure_optimizers``
    returns the Combined, and the callback wraps it as one."""
    pl = pytest.importorskip("lightning.pytorch")
    from selftune.integrations.lightning import SelfTuneCallback

    class Module(pl.LightningModule):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Combined:
            return Combined(make_optimizers(self.net))

    x, y = batch(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[SelfTuneCallback(log_dir=tmp_path / "run")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), data)
    (opt,) = trainer.optimizers
    assert isinstance(opt, selftune.SelfTuned) and isinstance(opt.optimizer, Combined)
    assert opt.step_count == 20
    assert selftune.verify(tmp_path / "run").records > 0


def test_replay_refuses_an_optimizer_of_the_combination_built_otherwise(tmp_path: Path) -> None:
    """Each group's own optimizer's settings are recorded (Muon's nesterov among them, which
    AdamW has not): a replay through a Muon built without it is refused before any step."""
    model = make_model()
    opt = selftune.wrap(make_optimizers(model), log_dir=tmp_path / "run")
    train_step(model, opt, 1)
    opt.close()
    again = make_model()
    muon, adamw = make_optimizers(again)
    muon.param_groups[0]["nesterov"] = False
    with pytest.raises(selftune.SelfTuneError, match="nesterov"):
        selftune.replay([muon, adamw], tmp_path / "run")


def test_the_hugging_face_trainer_steps_a_combination_it_was_given(tmp_path: Path) -> None:
    """``Trainer(optimizers=(Combined(muon, adamw), None))``: its scheduler drives both
    optimizers' rates, and ``wrap_trainer_optimizer`` wraps the combination as one."""
    pytest.importorskip("transformers")
    from test_integrations import _hf_trainer

    from selftune.integrations.huggingface import find_selftuned, wrap_trainer_optimizer

    def muon_and_adamw(model: torch.nn.Module) -> tuple[Combined, None]:
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n]
        rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
        return Combined(torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest)), None

    trainer = _hf_trainer(tmp_path / "out", 12, save_strategy="no", optimizers=muon_and_adamw)
    wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    trainer.train()
    opt = find_selftuned(trainer.optimizer)
    assert isinstance(opt.optimizer, Combined) and opt.step_count == 12
    assert selftune.verify(tmp_path / "run").records > 0


def test_the_log_names_the_combination_and_a_replay_in_another_order_is_refused(
    tmp_path: Path,
) -> None:
    model = make_model()
    opt = selftune.wrap(make_optimizers(model), log_dir=tmp_path / "run")
    assert repr(opt) == "SelfTuned(Combined(Muon, AdamW), controller='auto')"
    train_step(model, opt, 1)
    opt.close()
    again = make_model()
    muon, adamw = make_optimizers(again)
    with pytest.raises(selftune.SelfTuneError, match="param group 0 does not match the log"):
        selftune.replay([adamw, muon], tmp_path / "run")
    # the same groups and knobs under another optimizer: refused by the combination's name
    sgd = torch.optim.SGD(matrices(again), lr=0.02, momentum=0.95)
    with pytest.raises(
        selftune.SelfTuneError,
        match=r"stepped a Combined\(Muon, AdamW\), .* Combined\(SGD, AdamW\)",
    ):
        selftune.replay([sgd, adamw], tmp_path / "run")


def test_a_refused_wrap_of_a_list_leaves_its_optimizers_free() -> None:
    """wrap builds the Combined before its other checks: refused, it takes it apart again, so
    the list given again, mended, is wrapped (it was refused as already combined)."""
    model = make_model()
    muon, adamw = make_optimizers(model)
    with pytest.raises(ConfigError, match="groups="):
        selftune.wrap([muon, adamw], groups="some")
    muon.step()  # no gate left: it steps alone, as before the wrap
    opt = selftune.wrap([muon, adamw])
    train_step(model, opt, 1)
    assert opt.step_count == 1


def test_global_step_hooks_run_once_a_step_of_the_combination() -> None:
    """torch's hooks for every optimizer run around the Combined's step, not again around each
    optimizer's (a profiler's step counter counted three steps a call); an optimizer's own
    hooks still run at its update."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = make_model()
    muon, adamw = make_optimizers(model)
    combined = Combined(muon, adamw)
    seen: list[str] = []
    own: list[str] = []
    handle = register_optimizer_step_post_hook(lambda opt, *_: seen.append(type(opt).__name__))
    adamw.register_step_post_hook(lambda opt, *_: own.append(type(opt).__name__))
    try:
        train_step(model, combined, 1)
        train_step(model, selftune.wrap(combined), 2)
    finally:
        handle.remove()
    assert seen == ["Combined", "SelfTuned"]
    assert own == ["AdamW", "AdamW"]


def test_wrapped_one_by_one_only_the_spiking_optimizers_guard_rolls_back() -> None:
    """Why the combination: the same spike in Muon's gradients with each optimizer wrapped on
    its own rolls back Muon's half of the model alone, AdamW's guard seeing nothing there."""
    model = make_model()
    wrapped = [selftune.wrap(o) for o in make_optimizers(model)]
    heard: list[list[tuple[int, str]]] = [[], []]
    for opt, events in zip(wrapped, heard, strict=True):
        opt.add_listener(lambda e, got=events: e.guard and got.append((e.step, e.guard["event"])))
    for step in range(1, SPIKE + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        for opt in wrapped:
            opt.zero_grad()
        loss.backward()
        if step in (SPIKE - 1, SPIKE):
            for p in matrices(model):
                assert p.grad is not None
                p.grad.mul_(1e4)
        for opt in wrapped:
            opt.step(loss=loss.detach())
    assert heard[0][-2:] == [(SPIKE - 1, "hold"), (SPIKE, "rollback")]
    assert all(at < SPIKE - 1 for at, _ in heard[1])
