"""Hyper-parameter search with Optuna: seeded TPE, a median pruner fed by train()'s evaluations, and a
storage (default sqlite:///<out_dir>/study.db) so re-running continues the study. Each extra GPU or
machine joins with one command on the tuning.json tune() writes, sharing a PostgreSQL database
(pip install 'labutils[postgres]') or a journal file on a shared disk (journal:/shared/study.journal):

    python -m labutils.tuning --config results/04_tuning/tuning.json --storage postgresql://user@host/db --n-trials 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy
from optuna.storages._heartbeat import is_heartbeat_enabled

from . import hardware, processes
from .config import RunConfig
from .data import PreparedData, as_prepared
from .files import atomic_write_json, atomic_write_text, display_path, repo_path
from .guards import completed_summary
from .studies import Study, StudyResult, parse_devices, run_study, shared_budget
from .tracking import CLI_HELP as TRACKING_HELP
from .tracking import use as use_trackers
from .training import train
from .validation import ConfigBase, ConfigError, TrainingError, choice, require

PARAM_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}


# --------------------------------------------------------------------------- search space


def _check_param(name: str, spec: Any) -> dict[str, Any]:
    field = f"search_space[{name!r}]"
    require(
        isinstance(spec, dict),
        field,
        f"expected a mapping such as {{'type': 'float', 'low': 1e-4, 'high': 3e-3, 'log': True}}, got {spec!r}",
    )
    kind = spec.get("type")
    choice(kind, f"{field}.type", list(PARAM_KEYS))
    allowed = PARAM_KEYS[kind] | {"type", "target"}
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{field}: unknown key {key!r} for type {kind!r}.{hint} Valid keys: {sorted(allowed)}")
    out = {"type": kind, "target": spec.get("target", name)}
    if kind == "categorical":
        choices = spec.get("choices")
        require(
            isinstance(choices, list) and len(choices) >= 1,
            f"{field}.choices",
            f"give a non-empty list, got {choices!r}",
        )
        for c in choices:
            require(
                c is None or isinstance(c, (bool, int, float, str)),
                f"{field}.choices",
                f"Optuna stores only None, bool, int, float or str choices, got {c!r}",
            )
        return {**out, "choices": choices}
    number = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        value = spec.get(key)
        require(
            isinstance(value, number) and not isinstance(value, bool),
            f"{field}.{key}",
            f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}",
        )
    require(spec["low"] < spec["high"], field, f"low ({spec['low']}) must be below high ({spec['high']})")
    log, step = bool(spec.get("log", False)), spec.get("step")
    require(not log or spec["low"] > 0, f"{field}.low", f"a log scale needs low > 0, got {spec['low']}")
    require(
        not (log and step is not None), field, "give either log or step, not both (Optuna samples one or the other)"
    )
    return {**out, "low": spec["low"], "high": spec["high"], "log": log, **({"step": step} if step is not None else {})}


def validate_search_space(search_space: dict[str, Any], base: RunConfig) -> dict[str, dict]:
    """The search space with defaults filled in; ConfigError for a bad spec or target.

    Each entry is name -> {"type": "float"|"int"|"categorical", "low", "high", "log", "step",
    "choices", "target": dotted key (default: the name)}. Every bound and choice is applied to `base`,
    so a value the configs refuse (dropout 1.0) fails here, not in trial 17.
    """
    require(isinstance(search_space, dict) and bool(search_space), "search_space", "give at least one parameter")
    space = {name: _check_param(name, spec) for name, spec in search_space.items()}
    targets = [p["target"] for p in space.values()]
    require(len(set(targets)) == len(targets), "search_space", f"two parameters set the same key: {targets}")
    for name, param in space.items():
        for value in param.get("choices") or (param["low"], param["high"]):
            try:
                base.override({param["target"]: value})
            except ConfigError as exc:
                raise ConfigError(f"search_space[{name!r}] value {value!r}: {exc}") from None
    return space


def suggest(trial: optuna.Trial, name: str, param: dict[str, Any]) -> Any:
    if param["type"] == "categorical":
        return trial.suggest_categorical(name, param["choices"])
    kwargs = {"log": param["log"], **({"step": param["step"]} if "step" in param else {})}
    if param["type"] == "int":
        return trial.suggest_int(name, param["low"], param["high"], **kwargs)
    return trial.suggest_float(name, param["low"], param["high"], **kwargs)


# --------------------------------------------------------------------------- what a search is


@dataclass
class TuningConfig(ConfigBase):
    """One search: what every trial trains and how trials are drawn, pruned and stored. `tuning.json`,
    the file each extra worker joins with, is its `to_dict()` (with a storage password masked).

    Every trial trains `base` with overrides drawn from `search_space` (see `validate_search_space`)
    at one shared budget ('tokens' by default, as in `Study`), and is ranked on `metric`. `storage`:
    a database URL, journal:<path>, or None for SQLite under out_dir (see open_storage; `heartbeat_s`
    too). `seed` seeds the sampler per trial number (None: random); its first `sampler_startup_trials`
    draws are random. With `prune`, a trial worse than the median of earlier ones at the same token
    count stops, from trial `pruner_startup_trials` on and past the tokens of `pruner_warmup_steps`
    steps of the base (None: a quarter of the budget, so warm-up noise prunes nothing).
    `history_lag`: trial n is drawn and judged on trials 0 … n-1-lag only, and waits until they have finished
    (`StudyBefore`), so which worker finished first never changes a draw or a pruning decision: executions with
    the same inputs and workers repeat. None: 2 x (workers - 1), so parallel workers rarely wait (0 with one).
    """

    base: RunConfig
    search_space: dict
    data: str  # the prepared folder, as display_path writes it
    out_dir: str
    study_name: str = "tuning"
    storage: str | None = None
    seed: int | None = 0
    budget: Literal["tokens", "time"] = "tokens"
    metric: Literal["val_loss", "best_val_loss"] = "val_loss"
    prune: bool = True
    pruner_startup_trials: int = 3
    pruner_warmup_steps: int | None = None
    sampler_startup_trials: int = 5
    decision_resolution: float = 1e-3  # nats: see `decision_value`
    heartbeat_s: int = 60
    history_lag: int | None = None

    def validate(self) -> None:
        self.search_space = validate_search_space(self.search_space, self.base)  # with its defaults filled in
        require(bool(self.study_name.strip()), "study_name", "give the study a name")
        for name in ("pruner_startup_trials", "sampler_startup_trials"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(
            self.history_lag is None or (isinstance(self.history_lag, int) and self.history_lag >= 0),
            "history_lag",
            f"expected a whole number of trials >= 0, or None (2 x (workers - 1)); got {self.history_lag!r}",
        )
        require(
            self.pruner_warmup_steps is None or self.pruner_warmup_steps >= 0,
            "pruner_warmup_steps",
            f"must be >= 0 or None (a quarter of the budget), got {self.pruner_warmup_steps}",
        )
        require(
            0 <= self.decision_resolution <= 0.01,
            "decision_resolution",
            "give the loss difference (nats) below which the tuner treats two trials as tied: 0 (none) to 0.01, "
            f"well under the seed-to-seed noise (about 0.014 on the cpu profile); got {self.decision_resolution!r}",
        )
        require(self.heartbeat_s >= 1, "heartbeat_s", f"expected whole seconds >= 1, got {self.heartbeat_s!r}")
        shared_budget(self.base, self.budget)  # a base without a budget fails now, not in the first trial

    @classmethod
    def build(
        cls,
        base: RunConfig | dict,
        search_space: dict[str, Any],
        data: PreparedData | str | Path,
        out_dir: str | Path,
        **settings: Any,
    ) -> TuningConfig:
        """From the spellings callers have: a RunConfig or its dict, PreparedData or its folder, any path."""
        base = base if isinstance(base, RunConfig) else RunConfig.from_dict(base)
        folder = data.dir if isinstance(data, PreparedData) else data
        return cls(base, search_space, display_path(repo_path(folder)), display_path(repo_path(out_dir)), **settings)

    @property
    def out_path(self) -> Path:
        return repo_path(self.out_dir)

    def trial_base(self) -> RunConfig:
        """The base at the shared budget and evaluation set: what a trial's overrides apply to."""
        return self.base.override({f"train.{k}": v for k, v in shared_budget(self.base, self.budget).items()})

    def warmup_tokens(self) -> int:
        """Tokens before the pruner may stop a trial: pruner_warmup_steps of the base, else a quarter of the budget."""
        fixed = self.trial_base()
        tokens_per_step = fixed.train.batch_size * fixed.train.grad_accum_steps * fixed.model.block_size
        steps = self.pruner_warmup_steps
        if steps is None:
            steps = math.ceil(fixed.train.max_tokens / tokens_per_step) // 4 if fixed.train.max_tokens else 0
        return steps * tokens_per_step

    def save(self, path: Path) -> Path:
        """tuning.json: this config with the storage URL's password masked (a worker brings it with --storage)."""
        return atomic_write_json(path, {**self.to_dict(), "storage": public_url(self.storage)})


# --------------------------------------------------------------------------- the study


# Which extra installs the driver a database URL needs (SQLAlchemy 2.1 reads postgresql:// with psycopg 3).
DRIVER_EXTRAS = {"psycopg": "postgres", "psycopg2": "postgres"}
JOURNAL_PREFIX = "journal:"


def open_storage(storage: str | optuna.storages.BaseStorage | None, out_dir: Path, heartbeat_s: int = 60):
    """The study's storage: SQLite under out_dir by default, any SQLAlchemy URL (postgresql://...), or
    journal:<path>, Optuna's journal file for clusters with a shared disk and no database.

    Database storages get heartbeats: a trial whose worker died (killed, preempted) is marked failed
    3 x `heartbeat_s` after its last beat, by the next worker to start a trial, and queued once more
    with the same parameters. The journal file has no heartbeat: such a trial stays 'running'.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = storage or sqlite_url(out_dir)
    if url.startswith(JOURNAL_PREFIX):
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    require(
        "://" in url,
        "storage",
        "expected a database URL such as sqlite:///path/study.db or postgresql://user@host/db, "
        f"or journal:<path> for a journal file on a shared disk; got {url!r}",
    )
    require(
        isinstance(heartbeat_s, int) and heartbeat_s >= 1,
        "heartbeat_s",
        f"expected whole seconds >= 1, got {heartbeat_s!r}",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # SQLite serialises writers: with worker processes on one file, a writer waits its turn instead of failing
            # at once
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except ImportError as exc:
        module = getattr(exc.__cause__, "name", None) or "the database driver"
        extra = DRIVER_EXTRAS.get(module)
        fix = (
            f"install the extra: pip install 'labutils[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
            if extra
            else "install the driver SQLAlchemy names for this URL"
        )
        raise ConfigError(
            f"storage {public_url(url)}: {module} is not installed, so the database cannot be opened; {fix}"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(
            f"storage {public_url(url)}: cannot open the database ({reason}). Check that the server runs, "
            "that the URL names its host, port and database, and that the user may create tables there"
        ) from None


def journal_path(url: str) -> Path:
    """journal:/shared/study.journal, journal:///shared/study.journal or journal:results/x.journal (from the
    repository)."""
    rest = url[len(JOURNAL_PREFIX) :]
    rest = rest[2:] if rest.startswith("///") else rest
    require(
        bool(rest.strip("/")),
        "storage",
        f"journal storage needs a file, e.g. journal:/shared/disk/study.journal; got {url!r}",
    )
    return repo_path(rest)


def public_url(url: str | None) -> str | None:
    """The URL with its password masked, fit for files and messages (tuning.json, reports)."""
    if url and url.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + display_path(journal_path(url))
    if not url or "://" not in url:
        return url
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


class StudyBefore:
    """The study as trial `number` may know it: the trials numbered below `number - lag`, whatever else has
    finished meanwhile. With workers in parallel, the trials a draw or a pruning decision sees would otherwise
    depend on which worker finished first (issue 48: two executions of 04 on the same inputs drew different trials
    and reached opposite verdicts). Everything but the trial lists is the study's own."""

    def __init__(self, study: optuna.Study, number: int, lag: int):
        self._study, self.cutoff = study, number - lag

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.number < self.cutoff]

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        # TPE reads the study through this private twin of get_trials (optuna 4-5); the cache is the study's own
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.number < self.cutoff]

    @property
    def trials(self) -> list:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def wait_for_history(
    study: optuna.Study, number: int, lag: int, poll_s: float = 0.2, presumed_dead_s: float = 600.0
) -> list[int]:
    """Blocks until every trial that trial `number` draws from (`StudyBefore`) has finished; returns those it waited
    for. With lag >= workers - 1 at most the slowest trial is awaited. A worker that died holding one is failed by
    the storage's heartbeat (database storages), and its retry takes a new number, so the wait ends. One the
    heartbeat cannot expose (a journal file, or a worker killed before its first beat) is left out of the draw once
    it has run 3 x the longest finished trial and at least `presumed_dead_s`, with a warning: only then may a repeat
    draw differently."""
    waited: list[int] = []
    presumed_dead: set[int] = set()
    cutoff = number - lag
    while True:
        trials = study.get_trials(deepcopy=False)
        finished = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.state.is_finished() and t.datetime_start and t.datetime_complete
        ]
        patience = max(3 * max(finished, default=0.0), presumed_dead_s)
        now = datetime.datetime.now()
        open_ones = []
        for t in trials:
            if t.number >= cutoff or t.state != TrialState.RUNNING:
                continue
            age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            if age <= patience:
                open_ones.append(t)
                continue
            if t.number in presumed_dead:
                continue
            presumed_dead.add(t.number)
            warnings.warn(
                f"trial {number} draws without trial {t.number}, running for {age:.0f} s (3 x the longest finished "
                f"trial, and over {presumed_dead_s:.0f} s): its worker seems to have died. A repeat of this search "
                "may draw differently from here on.",
                stacklevel=2,
            )
        if not open_ones:
            return waited
        waited = sorted(set(waited) | {t.number for t in open_ones})
        if is_heartbeat_enabled(study._storage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        time.sleep(poll_s)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose draw of parameter p in trial n comes from its own stream, seeded by (seed, n, p), from the trials
    numbered below n - lag (`StudyBefore`): what trial n samples depends only on the seed and those trials. A
    search cut off and continued samples what an uninterrupted one would, even when the kill fell between two of a
    trial's parameters (the continued trial draws the rest as if the first had never been drawn in this process),
    workers sharing a study never draw from the same random stream, and which of them finished first changes
    nothing."""

    def __init__(self, seed: int, n_startup_trials: int, lag: int = 0):
        self.seed, self.n_startup_trials, self.lag = seed, n_startup_trials, lag
        self._samplers: dict[int, optuna.samplers.TPESampler] = {}

    def _for(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = optuna.samplers.TPESampler(
                seed=self.seed + trial.number, n_startup_trials=self.n_startup_trials
            )
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(StudyBefore(study, trial.number, self.lag), trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(StudyBefore(study, trial.number, self.lag), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # One stream per parameter, not one per trial: a trial's stream would hand a continued trial the draw
        # its first parameter took, and every parameter after a cut would shift.
        own = hashlib.sha256(f"{self.seed}/{trial.number}/{param_name}".encode()).digest()
        sampler = optuna.samplers.TPESampler(
            seed=int.from_bytes(own[:4], "little"), n_startup_trials=self.n_startup_trials
        )
        return sampler.sample_independent(
            StudyBefore(study, trial.number, self.lag), trial, param_name, param_distribution
        )

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        del self._samplers[trial.number]


class PrunerBefore(optuna.pruners.BasePruner):
    """`pruner` judging trial n against the trials numbered below n - lag only (`StudyBefore`), as the sampler
    draws it."""

    def __init__(self, pruner: optuna.pruners.BasePruner, lag: int):
        self.pruner, self.lag = pruner, lag

    def prune(self, study, trial) -> bool:
        return self.pruner.prune(StudyBefore(study, trial.number, self.lag), trial)


TrialState = optuna.trial.TrialState


def exact_loss(trial) -> float | None:
    """A trial's objective as its run scored it (its value as the tuner saw it is rounded: `decision_value`)."""
    return trial.user_attrs.get("loss", trial.value)


def decision_value(loss: float, resolution: float) -> float:
    """The loss the tuner decides on: rounded to `resolution` nats (0: as it is). TPE's ranking and the median
    pruner's comparison then cannot hinge on a difference far below the seed noise: two executions whose losses
    differ in the 8th digit (issue 48: 03's hand-off had moved by 1e-8, and 04 sampled another trial 13 and reached
    another verdict) see the same values, unless one straddles a rounding boundary (a chance of about the difference
    over the resolution, 1e-5 here). The exact loss stays in the trial's user attributes and in the reports."""
    if not resolution or not math.isfinite(loss):
        return loss
    return round(round(loss / resolution) * resolution, 12)


def counted_trials(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count toward a total: finished (complete, pruned, failed) or running, less failed ones
    whose parameters were queued again after their worker died (the retry counts instead) and surplus ones
    (`SurplusTrial`); with `before`, only those numbered below it."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}  # what RetryFailedTrialCallback records
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sum(
        1
        for t in trials
        if t.state in states
        and t.number not in retried
        and not t.user_attrs.get("surplus")
        and (before is None or t.number < before)
    )


class SurplusTrial(Exception):
    """A trial a worker created after the others had filled the shared total: failed at once, never trained."""


@dataclass
class Search:
    """What one trial trains: the base at the shared budget with the sampled overrides, into out_dir/trials/<n>/.
    Plain data, so worker processes can take it."""

    fixed: RunConfig
    space: dict[str, dict]
    data_dir: str
    out_dir: Path
    metric: str
    device: str | None = None
    resolution: float = 0.0  # `decision_value`
    history_lag: int = 0  # `StudyBefore`

    def objective(self, trial: optuna.Trial, resume: bool = False) -> float:
        if not resume:  # a continued trial has its parameters; the trials its pruner reads had finished before it
            wait_for_history(trial.study, trial.number, self.history_lag)
        overrides = {p["target"]: suggest(trial, name, p) for name, p in self.space.items()}
        trial.set_user_attr("overrides", overrides)
        config = self.fixed.override(
            {**overrides, **({"train.device": self.device} if self.device else {})}, context=f"trial {trial.number}: "
        )
        train_cfg = config.train
        run_dir = self.out_dir / "trials" / str(trial.number)
        trial.set_user_attr("run_dir", display_path(run_dir))
        trial.set_user_attr("seed", train_cfg.seed)  # a confirmation must train with other seeds

        def on_eval(step: int, metrics: dict[str, Any]) -> None:
            tokens = int(metrics["tokens"])
            trial.report(decision_value(float(metrics["val_loss"]), self.resolution), tokens)
            budget_done = (train_cfg.max_tokens is not None and tokens >= train_cfg.max_tokens) or (
                train_cfg.max_steps is not None and step >= train_cfg.max_steps
            )
            if not budget_done and trial.should_prune():
                raise optuna.TrialPruned(
                    f"val_loss {metrics['val_loss']:.4f} after {tokens:,} tokens is worse than the median "
                    "of earlier trials there"
                )

        # Trial numbers never repeat within a study, so a new trial's existing folder is stale: start it over.
        # A trial cut off mid-way (resume) continues from its last checkpoint; one cut off after its run had
        # completed, before the storage heard of it, is told what the run found, without training again.
        summary = completed_summary(run_dir, config) if resume else None
        if summary is None:
            summary = train(
                config, as_prepared(self.data_dir), run_dir, resume=resume, progress=False, on_eval=on_eval
            ).summary
        for key in ("num_params", "elapsed_s", "steps", "tokens", "best_val_loss", "val_loss", "val_bpb"):
            trial.set_user_attr(key, summary.get(key))  # exact: the reports read these
        trial.set_user_attr("loss", float(summary[self.metric]))  # the objective, exact (`exact_loss`)
        return decision_value(float(summary[self.metric]), self.resolution)


def finish_interrupted_trials(study: optuna.Study, search: Search) -> list[int]:
    """Trials left running by a search that was cut off (in the stage's own storage, where no other worker
    runs) are trained on from their last checkpoint and told, under their own numbers; returns them."""
    resumed = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = optuna.trial.Trial(
            study, frozen._trial_id
        )  # the same trial: its sampled parameters come back as they were
        try:
            study.tell(frozen.number, search.objective(trial, resume=True))
        except optuna.TrialPruned:
            study.tell(frozen.number, state=TrialState.PRUNED)
        except (ConfigError, TrainingError) as exc:
            warnings.warn(f"trial {frozen.number} failed when continued: {exc}", stacklevel=2)
            study.tell(frozen.number, state=TrialState.FAIL)
        resumed.append(frozen.number)
    if resumed:
        save_trials_table(study, search.out_dir)
    return resumed


def trials_table(study: optuna.Study):
    """One row per trial: number, state, value, the tokens it trained and whether it finished its budget (completed,
    not pruned or failed)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "number": t.number,
                "state": t.state.name,
                "value": exact_loss(t) if t.state == optuna.trial.TrialState.COMPLETE else t.value,
                "tokens": t.user_attrs.get("tokens"),
                "finished_budget": t.state == optuna.trial.TrialState.COMPLETE,
            }
            for t in study.trials
        ],
        columns=["number", "state", "value", "tokens", "finished_budget"],
    )


def save_trials_table(study: optuna.Study, out_dir: Path) -> None:
    atomic_write_text(out_dir / "trials.csv", study.trials_dataframe().to_csv(index=False))


def tune(
    config: TuningConfig,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    total: bool = False,
    device: str | None = None,
    devices=None,
    progress: bool = True,
) -> optuna.Study:
    """Run `n_trials` more trials (and/or until `timeout` seconds) of the study `config` defines, creating or
    continuing it.

    With `total=True` (notebook 04), `n_trials` and `timeout` count the whole study: a re-run after a
    cut continues up to the same totals instead of adding more, and with the default SQLite storage a
    trial the cut left running continues from its checkpoint under its own number. Sampling is
    seeded per trial number (`TrialSeededSampler`), so the continued search is the uninterrupted one.
    `device` overrides the base's; `devices` (e.g. "cuda:0*4", or "cpu*2") runs that many worker
    processes on the study at once.

    Each trial trains into out_dir/trials/<n>/ and reports each evaluation's val_loss to the pruner
    against the tokens seen so far (not the optimiser step: with batch_size searched, step 50 of a
    batch-16 trial has seen half the tokens of a batch-32 one). The evaluation at the end of the
    budget is reported but never prunes: a trial that trained its whole budget is COMPLETE. A trial
    whose config is invalid or whose training fails (diverged, out of memory) is recorded as failed
    and the search goes on.
    """
    if not isinstance(config, TuningConfig):
        raise ConfigError(
            f"tune: expected a TuningConfig, got {type(config).__name__}; build one with TuningConfig.build("
            "base, search_space, data, out_dir, **settings), or read a tuning.json with TuningConfig.from_json"
        )
    require(
        n_trials is not None or timeout is not None, "n_trials", "give n_trials or timeout, or the search never ends"
    )
    workers = parse_devices(devices) or [device]
    if config.history_lag is None:
        config = dataclasses.replace(config, history_lag=2 * (len(workers) - 1))
    if total and config.storage is None:
        # its RUNNING trials are continued below as cut ones: none may belong to a worker of a stopped run still alive
        processes.refuse_if_in_use(config.out_path)
    config.out_path.mkdir(parents=True, exist_ok=True)
    study = open_study(config)
    check_same_search(study, config)
    study.set_user_attr("history_lag", config.history_lag)  # the reports say what each draw could see
    config.save(config.out_path / "tuning.json")
    search = Search(
        config.trial_base(),
        config.search_space,
        config.data,
        config.out_path,
        config.metric,
        workers[0],
        config.decision_resolution,
        config.history_lag,
    )
    if (
        hardware.headless()
    ):  # trials.csv and the notebook's trials table say the same; per-trial log lines would only fill the saved report
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if total and config.storage is None:
        finish_interrupted_trials(study, search)
    limits = _limits(study, n_trials, timeout, total)
    if limits is None:
        return study
    if len(workers) == 1:
        _optimize(study, search, *limits, progress=progress and n_trials is not None and not hardware.headless())
        return study
    run_workers(config, search, workers, limits, progress)
    return open_study(config)


def open_study(config: TuningConfig) -> optuna.Study:
    """The study in its storage (created on first use), with the seeded sampler and the pruner the config asks for."""
    storage = open_storage(config.storage, config.out_path, config.heartbeat_s)
    study = optuna.create_study(
        storage=storage, study_name=config.study_name, direction="minimize", load_if_exists=True
    )
    lag = config.history_lag or 0  # tune() resolves None before any worker opens the study
    study.sampler = (
        optuna.samplers.TPESampler(n_startup_trials=config.sampler_startup_trials)
        if config.seed is None
        else TrialSeededSampler(config.seed, config.sampler_startup_trials, lag)
    )
    study.pruner = (
        PrunerBefore(
            optuna.pruners.MedianPruner(
                n_startup_trials=config.pruner_startup_trials, n_warmup_steps=config.warmup_tokens()
            ),
            lag,
        )
        if config.prune
        else optuna.pruners.NopPruner()
    )
    return study


def check_same_search(study: optuna.Study, config: TuningConfig) -> None:
    """A study continues only the search it was started with; its definition is stored with it on first use."""
    definition = {
        "base": config.base.to_dict(),
        "search_space": config.search_space,
        "metric": config.metric,
        "budget": config.budget,
    }
    for key, value in definition.items():
        if key in study.user_attrs and not _same(study.user_attrs[key], value):
            raise ConfigError(
                f"study {config.study_name!r} was started with another {key}; give a new study_name (or out_dir) "
                f"for a new search. Stored: {json.dumps(study.user_attrs[key], default=str)[:300]}"
            )
        study.set_user_attr(key, value)


def run_workers(config: TuningConfig, search: Search, workers: list[str], limits: tuple, progress: bool) -> None:
    """One process per device on the same study, each opening the storage itself; the workers end with this process
    (`processes.worker_pool`), a trial they leave RUNNING continues from its checkpoint when the search does."""
    jobs = [(dataclasses.replace(search, device=d), workers.count(d), config, *limits) for d in workers]
    with processes.worker_pool(len(workers), config.out_path) as pool:
        for done in hardware.progress_bar(
            processes.as_completed_waking([pool.submit(_worker, *job) for job in jobs]),
            total=len(jobs),
            desc="tuning workers",
            disable=not progress,
        ):
            done.result()


def sqlite_url(out_dir: Path) -> str:
    return f"sqlite:///{out_dir / 'study.db'}"


def _limits(study: optuna.Study, n_trials: int | None, timeout: float | None, total: bool) -> tuple | None:
    """(trials to run here, seconds left, the total to stop at) for optimize; None when the totals are reached."""
    spent = float(study.user_attrs.get("search_s", 0.0))
    if not total:
        return n_trials, timeout, None, spent
    left = None if n_trials is None else n_trials - counted_trials(study)
    seconds = None if timeout is None else timeout - spent
    if (left is not None and left <= 0) or (seconds is not None and seconds <= 0):
        return None
    return left, seconds, n_trials, spent


def _optimize(
    study: optuna.Study,
    search: Search,
    n_trials: int | None,
    timeout: float | None,
    stop_at: int | None,
    spent_before: float,
    progress: bool = False,
) -> None:
    """study.optimize with the trials table saved after every trial, the search time recorded, and, with
    `stop_at`, a stop once the study holds that many trials (so parallel workers share one total)."""
    if stop_at is not None:
        # A worker that starts late (spawned processes import for seconds) must not add a trial past the
        # total the others have already reached; it runs at most what is left now, then checks after each trial.
        left = stop_at - counted_trials(study)
        if left <= 0:
            return
        n_trials = left if n_trials is None else min(n_trials, left)
    started = time.monotonic()

    def objective(trial: optuna.Trial) -> float:
        # Checking the total before a trial and creating it are two steps, so two workers can both pass the
        # check for the last slot. Trial numbers are handed out one by one by the storage: the trial that
        # finds the total already filled by lower numbers is the surplus one, whichever worker asked first.
        if stop_at is not None and counted_trials(study, before=trial.number) >= stop_at:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(
                f"trial {trial.number} is past the {stop_at} trials the workers share (another worker took the "
                "last one): not trained, and not counted"
            )
        return search.objective(trial)

    def after_trial(study: optuna.Study, _trial) -> None:
        save_trials_table(study, search.out_dir)
        study.set_user_attr("search_s", spent_before + time.monotonic() - started)
        if stop_at is not None and counted_trials(study) >= stop_at:
            study.stop()

    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=timeout,
        catch=(ConfigError, TrainingError, SurplusTrial),
        callbacks=[after_trial],
        show_progress_bar=progress,
    )


def _worker(search: Search, sharing: int, config: TuningConfig, n_trials, timeout, stop_at, spent_before) -> None:
    """One of tune()'s worker processes: the same study, its own device (shared with `sharing - 1` others)."""
    if hardware.headless():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if search.device:
        hardware.pin_worker(search.device, sharing)
    _optimize(open_study(config), search, n_trials, timeout, stop_at, spent_before)


def study_name_for(base: RunConfig, search_space: dict, prefix: str = "tuning") -> str:
    """A study name tied to what is searched and to the code that trains and scores it: the same base, space and
    training code continue one study; a change to any starts another, so trials trained and scored by older
    training code (another evaluation set, another loss) never mix with new ones. A change to reports only
    (plots, findings) continues the study: its finished trials are reused."""
    from .freshness import training_fingerprint

    key = json.dumps(
        {"base": base.to_dict(), "search_space": search_space, "training_code": training_fingerprint()},
        sort_keys=True,
        default=str,
    )
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def trials_of_other_studies(study: optuna.Study) -> int:
    """Trials kept in the same storage by other studies (older code or settings): left out, and worth reporting."""
    return sum(s.n_trials for s in optuna.get_all_study_summaries(study._storage) if s.study_name != study.study_name)


def best_overrides(study: optuna.Study) -> dict[str, Any]:
    """The dotted-key overrides of the best completed trial."""
    completed = [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    require(
        bool(completed),
        "study",
        f"study {study.study_name!r} has no completed trial yet; run more trials or lower the pruning",
    )
    return dict(study.best_trial.user_attrs["overrides"])


CONFIRM_FIRST_SEED = 1000  # confirmation seeds start here: far from the seeds studies and trials train with


def rerun_best(
    study: optuna.Study,
    data,
    out_dir: str | Path,
    *,
    n_seeds: int = 3,
    base: RunConfig | None = None,
    devices=None,
    progress: bool = True,
    first_seed: int = CONFIRM_FIRST_SEED,
) -> StudyResult:
    """Confirm the best trial: re-run the untuned base ('baseline'), the untuned base at the tuned LR alone
    ('lr_only', when the search tuned the LR) and the tuned config ('tuned') over `n_seeds` seeds the search never
    trained with, scored on the confirmation half of val, which the search never saw (trials choose on the selection
    half). The best trial's own value is an optimistic pick: chosen on the same seed and tokens that scored it; this
    comparison is not, and 'lr_only' splits the gain into what the LR alone buys and what the rest adds.
    """
    base = base if base is not None else RunConfig.from_dict(study.user_attrs["base"])
    searched = {t.user_attrs.get("seed") for t in study.trials} - {None}
    seeds = set(range(first_seed, first_seed + n_seeds))
    require(
        not seeds & searched,
        "first_seed",
        f"confirmation seeds {sorted(seeds)} overlap the seeds trials trained with "
        f"{sorted(searched)}; give first_seed beyond them",
    )
    tuned = best_overrides(study)
    lr_only = {"lr_only": {"train.lr": tuned["train.lr"]}} if "train.lr" in tuned else {}
    rerun = Study(
        name=f"{study.study_name}-rerun",
        base=base,
        variants={"baseline": {}, **lr_only, "tuned": tuned},
        n_seeds=n_seeds,
        first_seed=first_seed,
        budget=study.user_attrs.get("budget", "tokens"),
        metric="confirm_loss",
        confirm_split="confirmation",
    )
    return run_study(rerun, data, out_dir, devices=devices, progress=progress)


def confirmation_gains(runs, metric: str = "confirm_loss") -> dict[str, dict[str, float]]:
    """What tuning bought on the confirmation, seed by seed: 'total' (tuned - untuned), and with an 'lr_only' arm
    'lr' (lr_only - untuned) and 'rest' (tuned - lr_only); each a paired mean difference with its 95% interval."""
    from .stats import paired_difference

    pairs = {"total": ("tuned", "baseline"), "lr": ("lr_only", "baseline"), "rest": ("tuned", "lr_only")}
    present = set(runs["variant"])
    return {name: paired_difference(runs, a, b, metric) for name, (a, b) in pairs.items() if {a, b} <= present}


def optimism(study: optuna.Study, rerun_runs, metric: str = "val_loss") -> dict[str, float]:
    """The optimism of choosing, measured on the windows that chose: the best trial's selection value against the
    same config on new seeds scored on the same selection windows (the confirmation runs' last evaluation)."""
    tuned = rerun_runs.loc[rerun_runs["variant"] == "tuned", metric].dropna()
    best = exact_loss(study.best_trial)
    return {
        "best_trial_value": float(best),
        "same_config_new_seeds": float(tuned.mean()),
        "n": int(len(tuned)),
        "optimism": float(tuned.mean() - best),
    }


EDGE_SHARE = 0.05  # a best value this close to an end of its range (a share of the range, log-scaled where it is)


def edge_flags(study: optuna.Study, space: dict[str, dict], share: float = EDGE_SHARE) -> list[dict[str, Any]]:
    """The numeric parameters whose best value lies within `share` of an end of its range (on the log scale where the
    range is log), with the wider range to search next: that end moved out by half the range's width."""
    flags = []
    for name, p in space.items():
        if p["type"] == "categorical" or name not in study.best_params:
            continue
        value, low, high, log = study.best_params[name], p["low"], p["high"], p.get("log", False)
        where = (math.log(value / low) / math.log(high / low)) if log else (value - low) / (high - low)
        if where > share and where < 1 - share:
            continue
        side = "low" if where <= share else "high"
        if log:
            factor = math.sqrt(high / low)
            wider = (low / factor, high) if side == "low" else (low, high * factor)
        else:
            half = (high - low) / 2
            wider = (low - half, high) if side == "low" else (low, high + half)
        flags.append(
            {
                "name": name,
                "value": value,
                "low": low,
                "high": high,
                "side": side,
                "position": where,
                "next_low": wider[0],
                "next_high": wider[1],
            }
        )
    return flags


# --------------------------------------------------------------------------- workers


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(
        prog="python -m labutils.tuning", description="Join (or start) an Optuna study as one worker."
    )
    parser.add_argument(
        "--config", required=True, help="tuning.json written by tune() (a TuningConfig: base, search_space, data, ...)"
    )
    parser.add_argument(
        "--storage", help="database URL shared by all workers (default: the config's, else sqlite under out_dir)"
    )
    parser.add_argument("--study-name", help="default: the config's study_name")
    parser.add_argument("--n-trials", type=int, help="trials this worker runs")
    parser.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    parser.add_argument("--device", help="e.g. cuda:1 (default: the base config's device)")
    parser.add_argument(
        "--seed",
        type=int,
        help="sampler seed (default: the config's; trials are seeded by their number, "
        "so workers sharing one seed still draw apart)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=int,
        help="seconds between a trial's heartbeats; a trial silent for 3 of them is "
        "failed and retried (default: the config's)",
    )
    parser.add_argument("--tracking", help=TRACKING_HELP)
    args = parser.parse_args(argv)
    use_trackers(args.tracking)
    config = TuningConfig.from_json(args.config)
    if args.storage is None and "***" in str(config.storage):
        raise ConfigError(
            f"{args.config} keeps the storage URL without its password ({config.storage}): give it with --storage, "
            "or leave the password out of the URL and let the driver read PGPASSWORD or ~/.pgpass"
        )
    changes = {
        "storage": args.storage,
        "study_name": args.study_name,
        "seed": args.seed,
        "heartbeat_s": args.heartbeat_s,
    }
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    return tune(config, n_trials=args.n_trials, timeout=args.timeout, device=args.device)


if __name__ == "__main__":
    main()
