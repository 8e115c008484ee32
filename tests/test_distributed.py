"""Under DDP every rank takes the same decisions, the guard acts on all ranks at once, and a
resumed 2-rank run is bit-identical to an uninterrupted one.

One ``torchrun --nproc_per_node=2`` job (gloo, CPU, ``tests/dist_worker.py``) runs every scenario
in one process group, because starting two processes that import torch costs more than all the
training together; the tests below read what each rank wrote.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_worker import (
    EVALUATE,
    FRAMEWORKS_WAY,
    OPTIMIZERS,
    assert_same_state,
    dropped_on_resume,
    log_body,
    metric,
)

from selftune import cli
from selftune.audit import read_log, verify
from selftune.errors import ConfigError
from selftune.report import read_run, render_html
from selftune.signals import RankState, RefusedStep

WORKER = Path(__file__).with_name("dist_worker.py")
WORLD_WORKER = WORKER.with_name("world_worker.py")
STEPS, NAN_STEP, CKPT_STEP, CRASH_STEP = 60, 40, 5, 30
TIMEOUT_S = 180  # the ranks' own gloo timeout is 30 s; this catches a hang anywhere else


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = TIMEOUT_S) -> str:
    """Run ``script`` under torchrun; kill the whole process group if it overruns."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (a hang?):\n{out[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(
        WORKER,
        f"--out={out}",
        f"--steps={STEPS}",
        f"--nan-step={NAN_STEP}",
        f"--ckpt-step={CKPT_STEP}",
        f"--crash-step={CRASH_STEP}",
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return out, ranks


def hyperparams_from_log(run_dir: Path, steps: int) -> list[list[dict[str, float]]]:
    """The knobs after every step as rank 0's log implies them: the start, then each ``new``."""
    run = read_log(run_dir)
    hp = [dict(group) for group in run.manifest["config"]["start"]]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in run.records:
        if r["kind"] == "decision":
            by_step.setdefault(r["step"], []).append(r)
    out = []
    for t in range(1, steps + 1):
        for r in by_step.get(t, []):
            hp[r["group"]][r["knob"]] = r["new"]
        out.append([dict(group) for group in hp])
    return out


RUNS = [f"ref-{name}" for name in OPTIMIZERS] + ["nan", "metric", "metric-rank0", "float-loss"]


@pytest.mark.parametrize("run", RUNS)
def test_every_rank_holds_the_hyperparameters_rank0_logged(
    ddp: tuple[Path, list[dict[str, Any]]], run: str
) -> None:
    out, ranks = ddp
    rank0, rank1 = (r[run]["hp"] for r in ranks)
    assert len(rank0) == STEPS
    assert rank0 == rank1  # the same floats, bit for bit, after every step
    assert rank0 == hyperparams_from_log(out / run, STEPS)
    trace = [json.loads(line) for line in (out / run / "trace.jsonl").read_text().splitlines()]
    assert [row["step"] for row in trace] == list(range(1, STEPS + 1))
    assert [row["hp"] for row in trace] == rank0
    # the knobs did move (per-rank losses differ, so agreement is not trivial) ...
    assert any(r["kind"] == "decision" for r in read_log(out / run).records)
    # ... and rank 1, which shares the folder, wrote nothing: two writers would break the chain
    assert verify(out / run).records == len(read_log(out / run).records)
    assert {p.name for p in (out / run).iterdir()} == {
        "manifest.json",
        "decisions.jsonl",
        "trace.jsonl",
        "writer.lock",
    }


@pytest.mark.parametrize("run", RUNS)
def test_ranks_end_with_identical_weights(ddp: tuple[Path, list[dict[str, Any]]], run: str) -> None:
    out, _ = ddp
    states = [torch.load(out / f"rank{r}-{run}.pt", weights_only=True) for r in range(2)]
    assert_same_state(states[0], states[1])


def test_a_nan_loss_on_one_rank_rolls_back_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, ranks = ddp
    assert [r["nan"]["guard_steps"] for r in ranks] == [[NAN_STEP], [NAN_STEP]]
    (event,) = [r for r in read_log(out / "nan").records if r["kind"] == "guard"]
    assert (event["step"], event["event"], event["signal"]) == (NAN_STEP, "rollback", "loss")
    assert event["value"] == "nan"  # the average over ranks is NaN although rank 0's loss was not
    before, after = (ranks[0]["nan"]["hp"][t - 1][0]["lr"] for t in (NAN_STEP - 1, NAN_STEP))
    assert after < before and math.isfinite(after)
    # up to the NaN the run is the reference run: the rollback is the only difference
    assert ranks[0]["nan"]["hp"][: NAN_STEP - 1] == ranks[0]["ref-sgd"]["hp"][: NAN_STEP - 1]


def test_a_loss_given_as_a_number_is_averaged_over_the_ranks_as_a_tensor_is(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """``step(loss=loss.item())``: a number stayed out of the ranks' average, so each rank read
    its own loss and decided differently (or one rank's guard rolled back alone and the ranks'
    next collectives no longer matched: a hang)."""
    _, ranks = ddp
    assert ranks[0]["float-loss"]["hp"] == ranks[0]["ref-sgd"]["hp"]


def test_a_writer_every_rank_adds_writes_on_rank_0_only(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Every rank holds the same knobs and decisions: two writers wrote the run twice."""
    out, _ = ddp
    (events,) = list((out / "float-loss-tb").iterdir())
    assert events.name.startswith("events.out.tfevents") and events.stat().st_size > 1000


def test_writers_built_before_the_process_group_write_on_rank_0_only(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Built before ``init_process_group`` (a Lightning callback's writers), each writer took
    its process for rank 0: two TensorBoard event files, two MLflow runs of the whole run; and
    on a new MLflow store every rank's client set it up at once, which failed."""
    out, _ = ddp
    (events,) = list((out / "early-tb").iterdir())
    assert events.name.startswith("events.out.tfevents") and events.stat().st_size > 1000
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs(experiment_ids=["0"])
    history = client.get_metric_history(run.info.run_id, "selftune/group0/lr")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert run.info.status == "FINISHED"  # ended by the writer's close, which started it


def test_every_rank_reads_the_mean_of_the_ranks_metrics(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, ranks = ddp
    trace = [json.loads(line) for line in (out / "metric" / "trace.jsonl").read_text().splitlines()]
    observed = [(row["step"], row["metric"]) for row in trace if "metric" in row]
    evaluated = range(EVALUATE, STEPS, EVALUATE)
    assert observed == [(t + 1, (metric(t, 0) + metric(t, 1)) / 2) for t in evaluated]
    cuts = [
        r
        for r in read_log(out / "metric").records
        if r["kind"] == "decision" and r["reason"].startswith("metric plateau")
    ]
    # the mean stands at 1.2 from the third evaluation; the range test still ran at the fourth
    # (step 20), which did not count, so the cut comes after the eighth, the fourth that does
    assert [(r["step"], r["signals"]["metric"]) for r in cuts] == [(41, 1.2)]
    assert ranks[0]["metric"]["hp"] == ranks[1]["metric"]["hp"]


def test_ranks_wrapped_differently_or_stepped_with_a_loss_on_one_are_refused_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A guard on rank 0 alone let the ranks' weights drift apart with no error (and a log
    that verified); a loss given on one rank only made the ranks' all-reduce differ in size
    (gloo aborts, NCCL waits out its timeout); a metric given as "max" on one rank and "min" on
    the other was judged each rank's way; a float64 loss on one rank, of a float32 model, made
    the ranks' stacks differ in dtype (gloo aborted).  Every rank now raises, naming the
    difference, or reads the loss alike."""
    _, ranks = ddp
    settings = [r["refusals"]["settings"] for r in ranks]
    assert all(
        s is not None and "rank 1 wrapped its optimizer with other settings" in s for s in settings
    ), settings
    assert "guard" in settings[0] and settings[0] == settings[1]
    losses = [r["refusals"]["loss"] for r in ranks]
    assert all(s is not None and "given on some ranks and not on others" in s for s in losses)
    modes = [r["refusals"]["modes"] for r in ranks]
    assert all(s is not None and 'mode="max" on some ranks' in s for s in modes), modes
    assert [r["refusals"]["modes-then"] for r in ranks] == [None, None]  # that metric dropped
    # a float64 loss on one rank, the model float32: refused alike (gloo aborted both), and
    # given on both ranks, one float64, read alike
    loss64 = [r["refusals"]["loss64"] for r in ranks]
    assert all(s is not None and "given on some ranks and not on others" in s for s in loss64)
    mixed = [r["refusals"]["mixed"] for r in ranks]
    assert mixed[0] == mixed[1] and mixed[0].startswith("2 "), mixed
    # a loss given as a number keeps its digits (it was rounded to float32 alone)
    assert [r["refusals"]["digits"] for r in ranks] == [repr(1.0000000123456789)] * 2
    # the refused loss changed nothing: the same optimizer steps on (it was taken for broken)
    assert [r["refusals"]["retried"] for r in ranks] == [None, None]
    # a step that raised part-way on rank 1 alone: the next is refused on every rank alike (it
    # was refused on rank 1 before the collective, which the other rank's then paired wrongly)
    assert [r["refusals"]["part_way"] for r in ranks] == [None, "lost"]
    after = [r["refusals"]["after"] for r in ranks]
    assert all(s is not None and "part-way on rank 1" in s for s in after), after


def test_join_for_uneven_inputs_is_refused_by_name_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """``Join([model, opt])`` raised an AttributeError (no ``join_hook``); a rank that ran out
    of inputs would leave the others waiting in the step's collective."""
    _, ranks = ddp
    for r in ranks:
        said = r["refusals"]["join"]
        assert said.startswith("ConfigError: selftune cannot step under torch.distributed"), said
        assert "DistributedSampler(drop_last=True)" in said


def test_a_metric_observed_on_rank_0_alone_is_every_ranks(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A loop that evaluates on rank 0 alone and calls ``observe`` there: the metric was
    averaged in a collective of its own, which met the other rank's step (gloo aborted both
    processes).  It now travels in the step's collective, and every rank reads rank 0's."""
    out, _ = ddp
    trace = (out / "metric-rank0" / "trace.jsonl").read_text().splitlines()
    observed = [(row["step"], row["metric"]) for row in map(json.loads, trace) if "metric" in row]
    assert observed == [(t + 1, metric(t, 0)) for t in range(EVALUATE, STEPS, EVALUATE)]
    cuts = [
        r["step"]
        for r in read_log(out / "metric-rank0").records
        if r["kind"] == "decision" and r["reason"].startswith("metric plateau")
    ]
    assert cuts  # rank 0's metric is flat: it drove a cut, on both ranks alike (see RUNS)


def test_what_rank_0_alone_sees_of_its_folder_refuses_the_step_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Rank 0 alone gives a ``log_dir``: its folder taken over by a wrapper since, holding
    steps of a run not resumed, or closed refused the step on rank 0 before the collective,
    which rank 1's step then paired with rank 0's next one (gloo aborted both); a folder
    holding another run's log refused the wrap on rank 0 alone, and rank 1 then failed with a
    closed connection; a state of another run folder, which rank 0 alone tells from its log,
    was refused on rank 0 and loaded on rank 1, whose weights and rates then went their own
    way with no word; and a load into an optimizer closed on rank 0 alone, which rank 0 refused
    before the ranks' check of the state, where rank 1 waited; and a checkpoint rank 1 cannot
    read (saved on rank 0's node), which rank 1 refused alone while rank 0 waited in the
    check of the state, or that is another file there (each node's own, rank 1's newer), which
    each rank loaded.  Each is refused on every rank, and the run goes on whole; a file each
    rank saved itself, with its own generators' states, loads."""
    _, ranks = ddp
    said = [r["folder-refusals"] for r in ranks]
    unrefused = ("after-foreign", "after-unshared", "after-older", "own-checkpoint", "after-own")
    for key in ("second", "third", "after", *unrefused):
        assert [s[key] for s in said] == [None, None], key
    for key, words in [
        ("taken", "was taken over"),
        ("unresumed", "already holds steps of this run"),
        ("closed", "was closed after step 1"),
    ]:
        assert words in said[0][key], said[0][key]
        assert "rank 0 cannot take it" in said[1][key], said[1][key]
    assert (
        said[0]["other-run"].startswith("LogError: ")
        and "log of another run" in said[0]["other-run"]
    )
    assert said[1]["other-run"].startswith("LogError: rank 0 could not open its run folder")
    # inside an integration's wrap every rank hears the framework's advice, not the plain
    # loop's: rank 1 heard the plain loop's, which rank 0's refusal had dropped
    for told in (s["other-run-told"] for s in said):
        assert told.startswith("LogError: ") and "log of another run" in told, told
        assert told.endswith(f": {FRAMEWORKS_WAY}") and "before loading any" not in told, told
    assert said[1]["other-run-told"].startswith("LogError: rank 0 could not open its run folder")
    assert said[0]["closed-load"].startswith("ConfigError: this selftune optimizer's run folder")
    assert said[1]["closed-load"].startswith("ConfigError: rank 0 could not load this state")
    assert said[0]["foreign-state"].startswith("LogError: the checkpoint does not match")
    refused = "ConfigError: rank 0 could not load this state (LogError: the checkpoint does not"
    assert said[1]["foreign-state"].startswith(refused)
    assert said[1]["unshared-checkpoint"].startswith("CheckpointError: no checkpoint at")
    assert said[0]["unshared-checkpoint"].startswith("CheckpointError: rank 1 could not load")
    for says in said:
        older = says["older-checkpoint"]
        assert older.startswith("CheckpointError: rank 1 loads another checkpoint than rank 0")
        assert "rank 1's saved at step 10, its optimizer's at 10; rank 0's at step 9" in older


def test_a_folder_given_on_a_rank_but_rank_0_is_refused_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Rank 0 alone writes the run folder: one given on rank 1 alone was never written, and the
    run went on with no log and no word."""
    out, ranks = ddp
    for r in ranks:
        said = r["folder-refusals"]["rank1-folder"]
        assert said.startswith("ConfigError: log_dir was given on rank 1 but not on rank 0"), said
    assert not (out / "rank1-only").exists()


def test_a_checkpoint_one_rank_cannot_read_is_refused_on_every_rank_with_a_plain_optimizer(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A DDP model with a plain optimizer: a checkpoint rank 1 cannot read (saved on rank 0's
    node) was refused on rank 1 alone, and rank 0 loaded it and went on to DDP's next
    all-reduce, where it waited (a load of a selftune optimizer was already refused on every
    rank).  Refused on every rank now; and rank 0 alone still loads into the module DDP wraps,
    as an evaluation does, with no collective that the other rank would miss."""
    _, ranks = ddp
    said = [r["plain-loads"] for r in ranks]
    assert said[1]["unshared"].startswith("CheckpointError: no checkpoint at"), said[1]
    assert str(said[0]["unshared"]).startswith("CheckpointError: rank 1 could not load"), said[0]
    assert said[0]["alone"] is None and "alone" not in said[1]


def test_a_plain_module_s_load_given_every_rank_is_refused_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A plain module with a plain optimizer (no DDP: gradients synced by hand, tuning off):
    its load is the calling rank's alone, and a checkpoint rank 1 could not read was refused
    on rank 1 while rank 0 resumed from it (a loop that starts afresh where none loads trained
    on from two steps), with nothing to say that the other rank went on.  The refusal names
    ``every_rank=True`` now, with which every rank refuses what one refuses."""
    _, ranks = ddp
    said = [r["plain-loads"] for r in ranks]
    assert said[0]["module-alone"] is None  # rank 0 alone may load: an evaluation's load
    assert said[1]["module-alone"].startswith("CheckpointError: no checkpoint at")
    assert "no other rank was told: where every rank loads, pass every_rank=True" in str(
        said[1]["module-alone"]
    )
    assert said[1]["module-every"].startswith("CheckpointError: no checkpoint at")
    assert said[0]["module-every"].startswith("CheckpointError: rank 1 could not load")


def test_a_state_saved_before_the_ranks_shared_their_metrics_warns_where_it_differs(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """A state saved on rank 0 between ``observe`` and the next step holds rank 0's metric: a
    resume from it reads that where the run read the ranks' mean.  The step that shares the
    metric says so where the two differ, and only there."""
    _, ranks = ddp
    said = [r["saved-before-shared"] for r in ranks]
    assert [s["alone"] for s in said] == [[], []]  # rank 0's metric is the ranks'
    (warned,) = said[0]["own"]
    assert "observed (1.0)" in warned and "mean that the run read is 1.5" in warned, warned
    assert said[1]["own"] == []  # rank 1 saved nothing
    assert [s["undefined"] for s in said] == [[], []]  # NaN, as every rank observed it


def tail(value: float | None, high: bool = False, at_average: bool = False) -> list[float]:
    """What a rank that observed ``value`` (None: nothing) brings to the step's collective."""
    return RankState(metric=value, high=high, at_average=at_average).tail()


def test_the_ranks_share_a_value_they_hold_alike_to_the_bit() -> None:
    """The ranks' metric is the mean over the ranks that observed one.  With three ranks, a
    sum over them divided by their number moved rank 0's 0.123, observed alone, to
    0.12300000000000001, and three ranks' 0.1 to 0.10000000000000002: a resume from rank 0's
    file then read another metric than the run did, and the step warned of a difference where
    there was none."""
    ranks = RankState()
    ranks.agree([tail(0.123), tail(None), tail(None)])
    assert ranks.shared == (0.123, False, False)
    ranks.agree([tail(0.1)] * 3)
    assert ranks.shared == (0.1, False, False)
    ranks.agree([tail(1.0, at_average=True), tail(2.0, at_average=True), tail(None)])
    assert ranks.shared == (1.5, True, False)
    ranks.agree([tail(1.0, at_average=True), tail(2.0), tail(None)])
    assert ranks.shared == (1.5, False, False)  # not every observer measured the average
    ranks.agree([tail(None)] * 3)
    assert ranks.shared is None


def test_the_ranks_refuse_by_rank_and_drop_a_metric_of_two_modes() -> None:
    rank1_closed = [tail(None), RankState(refusal=ConfigError("closed")).tail()]
    with pytest.raises(RefusedStep, match="rank 1 cannot take it"):
        RankState().agree(rank1_closed)
    mixed = RankState(metric=0.5, saved=0.5)  # a state was saved with it: no warning is due
    with pytest.raises(RefusedStep, match='mode="max" on some ranks'):
        mixed.agree([tail(0.5), tail(0.5, high=True)])
    assert (mixed.metric, mixed.saved, mixed.shared) == (None, None, None)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_resumed_ddp_run_is_bit_identical(
    ddp: tuple[Path, list[dict[str, Any]]], name: str
) -> None:
    out, ranks = ddp
    for rank in range(2):
        ref = torch.load(out / f"rank{rank}-ref-{name}.pt", weights_only=True)
        res = torch.load(out / f"rank{rank}-res-{name}.pt", weights_only=True)
        assert_same_state(ref, res, f"rank {rank}")
        assert ranks[rank][f"res-{name}"]["hp"] == ranks[rank][f"ref-{name}"]["hp"]
    ref_dir, res_dir = out / f"ref-{name}", out / f"res-{name}"
    (dropped,) = dropped_on_resume(res_dir)
    assert dropped > 0, "no decisions between checkpoint and crash: the test lost its power"
    assert log_body(res_dir) == log_body(ref_dir)
    assert (res_dir / "trace.jsonl").read_bytes() == (ref_dir / "trace.jsonl").read_bytes()


def test_the_shakespeare_example_trains_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's own code, in one process (its torchrun launch is what the worker above
    covers, and two more interpreters importing torch would double this file's time)."""
    from selftune.bench import data

    if not (
        data.cache_dir() / "shakespeare" / f"shakespeare-{data.SHAKESPEARE_VERSION}.tar.gz"
    ).exists():
        pytest.skip("the Shakespeare text is not cached (the example would download it)")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    example = Path(__file__).parents[1] / "examples" / "ddp_shakespeare.py"
    tiny = ["--max-chars=20000", "--width=16", "--layers=1", "--batch=4", "--eval-every=2"]
    for steps in (2, 4):
        argv = [str(example), f"--run-dir={tmp_path}", f"--steps={steps}", *tiny]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 3" in out
    evaluated = [line.split()[1] for line in out.splitlines() if line.startswith("step")]
    assert evaluated == ["2", "4"]
    assert verify(tmp_path).records == len(read_log(tmp_path).records)
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [row["step"] for row in trace] == [1, 2, 3, 4]
    # the validation loss at step 2, measured at the average, reached the step after it
    (read,) = [row for row in trace if "metric" in row]
    assert read["step"] == 3 and f"val loss {read['metric']:.3f}" in out


def test_fsdp2_trains_rolls_back_averages_and_replays_alike_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """FSDP2's parameters are DTensors, whose fused ops selftune now runs on each rank's local
    shard (the first step failed inside a collective): every rank takes the same decisions, a
    NaN on one rank rolls every shard back, the weight average is kept per shard, the log
    replays to the same shards, and a checkpoint (one file of rank 0's shard) is refused, as a
    load into the shards of a whole model's checkpoint is (whose check of fit gathered the
    whole model on every rank)."""
    _, ranks = ddp
    zero, one = ranks[0]["fully-sharded"], ranks[1]["fully-sharded"]
    assert zero["hp"] == one["hp"] and len(zero["hp"]) == STEPS
    assert len(set(zero["hp"])) > 1  # auto moved the rate
    assert zero["hp"][NAN_STEP - 1] < zero["hp"][NAN_STEP - 2]  # the rollback's cut
    for rank in (zero, one):
        assert rank["finite"] and rank["replayed"] and rank["average_differs"]
        save, load = rank["save"].split(" / ")
        assert (
            "sharded by FSDP" in save
            and "file from rank 0, which holds only its shard: save" in save
        )
        assert "sharded by FSDP" in load and "only its shard: load the model" in load
        # the log's hash is the whole model's: a replay onto other weights of rank 1's shard
        # is refused on every rank (it hashed rank 0's shard, and rank 1's went unchecked)
        assert "initial_params_sha256" in (rank["other_start"] or ""), rank["other_start"]


def test_a_combination_of_optimizers_takes_the_same_decisions_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Muon beside AdamW, wrapped as one under DDP: every rank tunes both groups alike, a NaN
    on one rank rolls both optimizers back on every rank, and the ranks end on one model."""
    _, ranks = ddp
    zero, one = ranks[0]["combined"], ranks[1]["combined"]
    assert zero["hp"] == one["hp"] and len(zero["hp"]) == STEPS
    assert len({rates[0] for rates in zero["hp"]}) > 1  # auto moved Muon's rate
    before, after = zero["hp"][NAN_STEP - 2], zero["hp"][NAN_STEP - 1]
    assert after[0] < before[0] and after[1] < before[1]  # the rollback cut both
    assert zero["weights"] == one["weights"]
    assert all(math.isfinite(v) for w in zero["weights"] for v in w)


def test_fsdp_with_empty_shards_takes_the_same_decisions_on_every_rank(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """FullyShardedDataParallel leaves rank 0 parameters with no elements and no gradient: the
    ranks' scalars are reduced as per-group sums, so the all-reduce matches (it aborted the
    process), every rank reads the same alignments and sets the same rate, and a NaN on one
    rank rolls every shard back at once; a checkpoint, one file of rank 0's shard, is refused
    by name."""
    _, ranks = ddp
    zero, one = ranks[0]["fsdp"], ranks[1]["fsdp"]
    assert any(zero["empty"]) and not any(one["empty"])  # the shards differ in kind
    assert zero["hp"] == one["hp"] and len(zero["hp"]) == STEPS
    assert len(set(zero["hp"])) > 1  # auto moved the rate
    # the rollback at the NaN halves the rate on both ranks
    assert zero["hp"][NAN_STEP - 1] < zero["hp"][NAN_STEP - 2]
    assert zero["finite"] and one["finite"]
    assert zero["cos"] == one["cos"]
    for rank in ranks:
        save, load = rank["fsdp"]["save"].split(" / ")
        assert "sharded by FSDP" in save and "sharded by FSDP" in load, rank["fsdp"]["save"]


def test_fsdp2_resumed_through_torch_distributed_checkpoint_ends_as_a_run_never_stopped(
    ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The guide's way for a sharded model, untested before: the model and the wrapped
    optimizer's own state by ``torch.distributed.checkpoint``, selftune's part in a file of each
    rank, loaded into a wrapper built over the run's folder after a crash five steps past the
    checkpoint: every rate and every shard as a run never stopped, and a log that verifies."""
    _, ranks = ddp
    for rank in ranks:
        dcp = rank["dcp"]
        assert dcp["hp"] == dcp["ref_hp"] and len(dcp["hp"]) == STEPS
        assert len(set(dcp["hp"])) > 1  # auto moved the rate
        assert dcp["same"] and dcp["verified"] is None, dcp["verified"]


@pytest.fixture(scope="module")
def lightning_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The Lightning scenarios of ``tests/lightning_ddp_worker.py``, run once under torchrun."""
    pytest.importorskip("lightning.pytorch")
    out = tmp_path_factory.mktemp("lightning-ddp")
    torchrun(WORKER.with_name("lightning_ddp_worker.py"), f"--out={out}")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_lightning_s_checkpoint_under_ddp_holds_the_metric_the_run_read(
    lightning_ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Under Lightning's DDP each rank logs its own ``val_loss`` (without ``sync_dist``), and
    ``ModelCheckpoint`` saves after the validation, before the step that shares the metric: the
    checkpoint held rank 0's own value, which a resume read in place of the ranks' mean that the
    run read, and every rank warned of it at every validation with a plain loop's advice.  The
    callback now gives every rank the ranks' mean, the one the run reads."""
    out, ranks = lightning_ddp
    assert [rank["metric"]["warnings"] for rank in ranks] == [[], []]
    trace = [json.loads(line) for line in (out / "metric" / "run" / "trace.jsonl").open()]
    read = [row["metric"] for row in trace if "metric" in row]  # the first epoch's, at step 5
    saved = [rank["metric"]["saved"] for rank in ranks]
    assert len(read) == 1 and saved[0] == saved[1] and len(saved[0]) == 2
    assert saved[0][0]["value"] == read[0]


def test_lightning_resumes_under_ddp_a_folder_given_on_rank_0_alone(
    lightning_ddp: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The callback wraps at the run's initial weights where its folder holds a run, which
    rank 0 alone could see (its folder given there alone, or on its node alone): rank 1 wrapped
    at the checkpoint's, the wrap's hash of every rank's weights was another run's, and the
    resume was refused on every rank."""
    out, ranks = lightning_ddp
    assert [rank["rank0-folder"].get("steps") for rank in ranks] == [8, 8], ranks
    trace = [json.loads(line) for line in (out / "rank0-folder" / "run" / "trace.jsonl").open()]
    assert [row["step"] for row in trace] == list(range(1, 9))
    assert verify(out / "rank0-folder" / "run").records == len(
        read_log(out / "rank0-folder" / "run").records
    )


@pytest.fixture(scope="module")
def zero(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("zero")
    torchrun(WORKER.with_name("zero_worker.py"), f"--out={out}", timeout=120)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero_redundancy_optimizer_resumes_from_its_consolidated_state(
    zero: list[dict[str, Any]],
) -> None:
    """Its load leaves None for the state of another rank's parameters, which the load's check
    of the saved scalars' dtypes read as a dict (AttributeError on every rank)."""
    for said in zero:
        assert said["load"] is None
        assert said["ref"][0]["lr"] != 1e-2, "no decision: the test lost its power"
        assert said["same"] and said["res"] == said["ref"]


def test_zero_redundancy_optimizer_under_the_guard_is_refused_by_name(
    zero: list[dict[str, Any]],
) -> None:
    """The guard's snapshot needs its state_dict, which it refuses before consolidation: the
    first step raised torch's RuntimeError after its update, on every rank."""
    for said in zero:
        assert said["guard"].startswith("ConfigError: the guard cannot snapshot a Zero")
        assert "guard=False" in said["guard"] and "consolidate_state_dict" in said["guard"]


def test_zero_redundancy_optimizer_stepping_inside_ddp_s_hook_is_refused_by_name(
    zero: list[dict[str, Any]],
) -> None:
    """Built with ``overlap_with_ddp=True`` it steps inside DDP's communication hook, on its
    shard's own optimizer, past any wrapper; its param groups are empty until that hook builds
    them, and the wrap refused it as a group with no rate, which said nothing of why."""
    for said in zero:
        assert said["overlap"].startswith("ConfigError: a ZeroRedundancyOptimizer built with")
        assert "overlap_with_ddp=False" in said["overlap"]


def test_zero_redundancy_optimizer_state_consolidated_before_a_step_is_refused(
    zero: list[dict[str, Any]],
) -> None:
    """Its state_dict() returns what the last consolidation gathered: a checkpoint saved steps
    later held those steps' older moments beside newer weights, and resumed to another run."""
    said = zero[0]["stale"]
    assert said.startswith("ConfigError: the ZeroRedundancyOptimizer's state_dict() is the"), said
    assert "consolidate_state_dict(to=0) on every rank again" in said


@pytest.fixture(scope="module")
def reranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An SGD run saved by a single process at step 4, resumed on 2 ranks to step 8 and by a
    single process again to step 12 (run folder ``ddp``); and a ``ZeroRedundancyOptimizer``
    run consolidated and saved on 2 ranks at step 4, resumed on 1 rank to step 8 (``zero``).
    Returns the folder and what each segment said (``<run>@<ranks>``, rank 0's)."""
    from world_worker import segment

    out = tmp_path_factory.mktemp("reranked")
    said = {"ddp@1": segment(out / "ddp", load=None, save=out / "c4.pt", steps=range(1, 5))}

    def on_ranks(nproc: int, plan: dict[str, dict[str, Any]]) -> None:
        torchrun(WORLD_WORKER, f"--out={out}", f"--plan={json.dumps(plan)}", nproc=nproc)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
        for run in plan:
            assert all(r[run] == ranks[0][run] for r in ranks), f"the ranks of {run} differ"
            said[f"{run}@{nproc}"] = ranks[0][run]

    def seg(load: str | None, save: str, first: int, zero: bool) -> dict[str, Any]:
        return {"load": load, "save": save, "first": first, "last": first + 3, "zero": zero}

    ckpt = {name: str(out / name) for name in ("c4.pt", "c8.pt", "z4.pt", "z8.pt")}
    on_ranks(
        2,
        {
            "ddp": seg(ckpt["c4.pt"], ckpt["c8.pt"], 5, False),
            "zero": seg(None, ckpt["z4.pt"], 1, True),
        },
    )
    on_ranks(1, {"zero": seg(ckpt["z4.pt"], ckpt["z8.pt"], 5, True)})
    said["ddp@1 again"] = segment(
        out / "ddp", load=out / "c8.pt", save=out / "c12.pt", steps=range(9, 13)
    )
    return out, said


def _rank_notes(run_dir: Path) -> list[tuple[int, int | None, int | None]]:
    """The log's notes of a resume on another number of ranks: (step, saved on, resumed on)."""
    return [
        (r["step"], r.get("saved_world_size"), r.get("world_size"))
        for r in read_log(run_dir).records
        if r["kind"] == "note" and "ranks" in r["reason"]
    ]


def test_a_run_resumed_on_another_number_of_ranks_says_so_in_its_log(
    reranked: tuple[Path, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log read as one run, the effective batch size changed twice with no word; the
    report and the watch list the notes."""
    out, said = reranked
    assert [s["load"] for s in said.values()] == [None] * 5
    assert _rank_notes(out / "ddp") == [(5, 1, 2), (9, 2, 1)]
    notes = [r["reason"] for r in read_log(out / "ddp").records if r["kind"] == "note"]
    assert notes[0].startswith("resumed on 2 ranks from a checkpoint saved on 1 (a single process)")
    assert "effective batch size" in notes[0]
    assert read_log(out / "ddp").manifest["world_size"] == 1  # the run's start
    assert verify(out / "ddp").records == len(read_log(out / "ddp").records)
    shown = "resumed on 1 rank (a single process) from a checkpoint saved on 2"
    assert shown in render_html(read_run(out / "ddp"), [])
    monkeypatch.setenv("COLUMNS", "400")  # (rich folds a row to the terminal's width)
    assert cli.main(["watch", str(out / "ddp"), "--once"]) == 0
    assert shown in capsys.readouterr().out


def test_zero_redundancy_optimizer_s_consolidated_state_resumes_on_another_number_of_ranks(
    reranked: tuple[Path, dict[str, Any]],
) -> None:
    """Its load gives each rank the moments of the parameters it owns in the new partition:
    the state consolidated on 2 ranks loads whole on 1, and the log says so."""
    out, said = reranked
    assert said["zero@1"]["load"] is None and said["zero@1"]["same_moments"] is True
    assert said["zero@1"]["hp"] != said["zero@2"]["hp"], "no decision: the test lost its power"
    assert _rank_notes(out / "zero") == [(5, 2, 1)]
    assert verify(out / "zero").records == len(read_log(out / "zero").records)


CONTROLLER_WORKER = WORKER.with_name("controller_worker.py")


@pytest.fixture(scope="module")
def raised_on_one_rank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("controller")
    torchrun(CONTROLLER_WORKER, f"--out={out}")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    ("stage", "taken"), [("propose", "was taken at"), ("on_backoff", "took the guard's")]
)
def test_a_controller_that_raises_on_one_rank_fails_its_step_alike_on_every_rank(
    raised_on_one_rank: tuple[Path, list[Any]], stage: str, taken: str
) -> None:
    """A controller of one's own that raised on rank 1 alone had that rank take the step
    without its proposals while rank 0 applied them, and the knobs and weights drifted apart
    with no word (in ``propose``), or left rank 1's step broken part-way, which every rank
    then refused, until a load (in ``on_backoff``, at a rollback).  Every rank now takes the
    step alike, without the controller's proposals (the rollback as the guard made it), and
    raises ControllerError: rank 1 with its controller's error, rank 0 naming rank 1."""
    out, ranks = raised_on_one_rank
    at = 3
    mine, theirs = ranks[1][stage]["said"][at - 1], ranks[0][stage]["said"][at - 1]
    assert mine.startswith("ControllerError") and f"{stage}() raised ZeroDivisionError" in mine
    assert theirs.startswith("ControllerError") and "on rank 1" in theirs
    assert f"Step {at} {taken}" in theirs and "on every rank" in theirs
    for rank in ranks:
        said = rank[stage]["said"]
        assert said[: at - 1] == [None] * (at - 1) and said[at:] == [None] * (len(said) - at)
        assert rank[stage]["step"] == len(said)
    assert ranks[0][stage]["knobs"] == ranks[1][stage]["knobs"]
    assert ranks[0][stage]["weights"] == ranks[1][stage]["weights"]
    if stage == "propose":  # lowered by a tenth at every step but the third
        lrs = [k[0]["lr"] for k in ranks[0][stage]["knobs"]]
        assert lrs[at - 1] == lrs[at - 2] and lrs[at] == pytest.approx(lrs[at - 1] * 0.9)
    verify(out / stage)
    notes = [r for r in read_log(out / stage).records if r["kind"] == "note"]
    assert [n["step"] for n in notes if "rank 1" in n["reason"]] == [at]


def test_a_controller_whose_state_its_error_left_apart_on_one_rank_fails_every_step_after(
    raised_on_one_rank: tuple[Path, list[Any]],
) -> None:
    """A controller of one's own that changed its state and then raised on rank 1 alone (at
    step 3) proposed other knobs there from then on (the rate halved on rank 1, lowered by a
    tenth on rank 0), and the ranks' knobs and weights drifted apart with no word.  The ranks'
    proposals are now compared in the gather that shares its failures: every later step is
    taken alike on every rank, at the knobs in force, and raises ControllerError naming
    rank 1 and the fix, and the log notes each."""
    out, ranks = raised_on_one_rank
    at = 3
    for rank in ranks:
        said = rank["drifts"]["said"]
        assert said[: at - 1] == [None] * (at - 1) and rank["drifts"]["step"] == len(said)
        for later in said[at:]:
            assert later is not None and later.startswith("ControllerError")
            assert "proposed other knobs on rank 1 than on rank 0" in later
            assert "on every rank" in later and "load one checkpoint on every rank" in later
    assert ranks[0]["drifts"]["knobs"] == ranks[1]["drifts"]["knobs"]
    assert ranks[0]["drifts"]["weights"] == ranks[1]["drifts"]["weights"]
    lrs = [k[0]["lr"] for k in ranks[0]["drifts"]["knobs"]]
    assert lrs[at - 1 :] == [lrs[at - 2]] * (len(lrs) - at + 1)  # no proposal applied since
    verify(out / "drifts")
    notes = [r for r in read_log(out / "drifts").records if r["kind"] == "note"]
    steps = [n["step"] for n in notes if "proposed other knobs on rank 1" in n["reason"]]
    assert steps == list(range(at + 1, len(lrs) + 1))


def test_a_restart_asked_at_the_first_snapshot_is_taken_alike_with_ranks_and_alone(
    raised_on_one_rank: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    """Under torch.distributed a controller of one's own has its step's snapshot kept once its
    proposals are made (where no rank failed), and its restart asked at step 1, where no
    snapshot was held before that step's, was ignored, where alone (and with the controllers
    selftune ships, whose snapshot is kept before) it restarts from that snapshot.  Both now
    restart there alike, and the replay on the ranks follows the run to the bit."""
    from controller_worker import RestartsAtFirst
    from dist_worker import make_inner, make_model, train_step

    import selftune

    out, ranks = raised_on_one_rank
    restarts = [r for r in read_log(out / "restart").records if r["kind"] == "guard"]
    assert [(r["step"], r["event"], r["restored_step"]) for r in restarts] == [(1, "restart", 1)]
    verify(out / "restart")
    for rank in ranks:
        said = rank["restart"]
        assert said["said"] == [None] * len(said["said"])
        assert said["replay"] == {"knobs": said["knobs"], "weights": said["weights"]}
    assert ranks[0]["restart"]["weights"] == ranks[1]["restart"]["weights"]
    model = make_model()
    opt = selftune.wrap(make_inner("sgd", model), controller=RestartsAtFirst(), log_dir=tmp_path)
    train_step(model, opt, 1, 0)
    train_step(model, opt, 2, 0)
    opt.close()
    alone = [r for r in read_log(tmp_path).records if r["kind"] == "guard"]
    assert [(r["step"], r["event"], r["restored_step"]) for r in alone] == [(1, "restart", 1)]


def test_a_controller_whose_state_dict_raises_on_one_rank_keeps_no_snapshot_on_any(
    raised_on_one_rank: tuple[Path, list[Any]],
) -> None:
    """A controller's state_dict that raised on rank 1 alone at step 1's snapshot broke that
    rank's step off, rank 0 keeping the snapshot.  Every rank now takes the step without it
    and raises ControllerError; each takes its snapshot at step 2 instead, and the rollback
    at step 3 goes back there on both, to the same knobs and weights."""
    out, ranks = raised_on_one_rank
    mine, theirs = ranks[1]["state_dict"]["said"][0], ranks[0]["state_dict"]["said"][0]
    assert mine.startswith("ControllerError") and "state_dict() raised ZeroDivisionError" in mine
    assert theirs.startswith("ControllerError") and "on rank 1" in theirs
    for rank in ranks:
        assert rank["state_dict"]["said"][1:] == [None] * 5 and rank["state_dict"]["step"] == 6
    assert ranks[0]["state_dict"]["knobs"] == ranks[1]["state_dict"]["knobs"]
    assert ranks[0]["state_dict"]["weights"] == ranks[1]["state_dict"]["weights"]
    verify(out / "state_dict")
    records = read_log(out / "state_dict").records
    assert [r.get("unkept") for r in records if r["kind"] == "note"][-1] == 1
    (rollback,) = [r for r in records if r["kind"] == "guard"]
    assert rollback["step"] == 3 and rollback["restored_step"] == 2


def test_a_step_under_a_controller_of_selftunes_own_makes_one_collective(
    raised_on_one_rank: tuple[Path, list[Any]],
) -> None:
    """Its proposals are a function of what every rank holds alike (the shared signals, the
    knobs, its state), so no gather asks whether it failed on another rank."""
    _, ranks = raised_on_one_rank
    assert all(rank["builtin"]["collectives"] == [1] * 6 for rank in ranks)


def test_ranks_wrapped_with_controllers_of_two_classes_under_one_name_are_refused(
    raised_on_one_rank: tuple[Path, list[Any]],
) -> None:
    """Only the one of its own would have shared its failures, in a gather the other rank
    never made, and the two would have proposed apart."""
    _, ranks = raised_on_one_rank
    for rank in ranks:
        said = rank["two-classes"]["wrap"]
        assert said is not None and "rank 1 wrapped its optimizer with other settings" in said
        assert "controller_class: 'selftune.controllers.off.OffController'" in said


def test_a_controller_whose_state_dict_raises_on_one_rank_adds_a_group_on_none(
    raised_on_one_rank: tuple[Path, list[Any]],
) -> None:
    """add_param_group asks the controller's state_dict for the guard's snapshot before
    anything changes, and refuses the group where it raises: where it raised on rank 1 alone,
    rank 1 refused the group while rank 0 added it, and the ranks' groups differed from then
    on.  Every rank now adds no group and raises ControllerError (rank 1 with its controller's
    error, rank 0 naming rank 1), in one gather that a controller of selftune's own never
    makes; the run steps on alike, and the group added again joins on both."""
    out, ranks = raised_on_one_rank
    mine, theirs = ranks[1]["add_group"]["added"], ranks[0]["add_group"]["added"]
    assert mine["error"].startswith("ControllerError") and mine["cause"] == "ZeroDivisionError"
    assert "state_dict() raised ZeroDivisionError" in mine["error"]
    assert theirs["error"].startswith("ControllerError") and theirs["cause"] is None
    assert "raised on rank 1" in theirs["error"]
    for said in (mine["error"], theirs["error"]):
        assert "param group was not added" in said and "on every rank" in said
    for rank in ranks:
        group = rank["add_group"]
        assert group["groups"] == [1, 1, 2]
        assert group["said"] == [None] * len(group["said"])
        assert group["gathers"] == 1 and group["builtin_gathers"] == 0
    assert ranks[0]["add_group"]["knobs"] == ranks[1]["add_group"]["knobs"]
    assert ranks[0]["add_group"]["weights"] == ranks[1]["add_group"]["weights"]
    lrs = [k[0]["lr"] for k in ranks[0]["add_group"]["knobs"]]
    assert lrs[-1] < lrs[0], "no decision: the test lost its power"
    verify(out / "add_group")
    records = read_log(out / "add_group").records
    assert [r["step"] for r in records if r["kind"] == "group"] == [6]
