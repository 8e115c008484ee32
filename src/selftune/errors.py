"""Errors that selftune raises on purpose, each naming the bad value and what to do about it."""

from __future__ import annotations


class SelfTuneError(ValueError):
    """Base class: a problem with what the caller passed or with the state of a run."""


class ConfigError(SelfTuneError):
    """An argument to :func:`selftune.wrap` (or a policy, or a controller) is out of range."""


class ControllerError(ConfigError):
    """A controller's ``propose`` (or ``take_restart``) raised, or returned what the wrapper
    refuses (a negative rate, a group there is not): raised by ``step`` once the step has been
    taken at the knobs in force, without the controller's proposals, and recorded so.  The run
    is whole and goes on from the next step; the controller's own exception, or the wrapper's
    refusal, is the ``__cause__``.  Raised too where its ``before_rollback``,
    ``load_state_dict`` or ``on_backoff`` raised at the guard's rollback (its
    ``load_state_dict`` at a relevel, or a trial gone forward), once the guard's step has been
    taken as the guard made it; and where its ``state_dict`` raised as the guard took a
    snapshot (the step is taken without that snapshot, the guard keeping its older one), as
    ``opt.state_dict()`` saved (no state is returned; the run steps on), or as
    ``opt.add_param_group`` took the guard's snapshot of the run with the group (no group is
    added; the run steps on as it was).  Under
    ``torch.distributed`` every rank raises where the controller failed on any, having taken
    the step alike; a rank whose own did not fail names the rank whose did, and has no
    ``__cause__``.  So too, on every rank, where a controller of one's own proposed otherwise
    on some rank than on rank 0, naming those ranks: the step is taken without the proposals.
    """


class RateFloorWarning(UserWarning):
    """A param group's learning rate was cut to the lowest its bounds allow (by default a
    thousandth of its start): no cut can take it further, and at such a rate the run may train
    little more.  Warned once per group and run (in one warning for the groups one step took
    there), and noted in the run's log.  About half the misses of ``auto``'s runs on the benchmark
    ended there (``bench-results/pilots/floor_runs.py``), cut on a slow descent or a saddle that
    read as a noise floor; where the cuts are meant (noisy labels, whose memorising they stop),
    filter it: ``warnings.filterwarnings("ignore", category=RateFloorWarning)``.
    """


class GuardError(RuntimeError):
    """The guard saw trouble repeat after rolling back and backing off; the run cannot go on.

    The message names the step, the signal and its value.  The run folder (if any) holds the log of
    every guard event up to this point.
    """
