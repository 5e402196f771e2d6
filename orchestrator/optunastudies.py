"""Optuna's side of a tuning: the sampler and pruner a spec names, and one Optuna study per arm,
opened or continued (a continuing driver reseeds its sampler past what earlier drivers drew, and
refuses a study whose comparable parts changed)."""
from __future__ import annotations

from typing import Any

from .errors import SpecError
from .tunespec import Arm, TuneSpec, default_params


def make_sampler(spec: TuneSpec, resumed_after: int = 0):
    """The spec's sampler. A driver that continues a study gets a seed derived from the spec's and
    ``resumed_after`` (:func:`drawn`; the same seed again would sample earlier values once more)."""
    import optuna

    s = spec.sampler
    seed = s.get("seed")
    if seed is not None and resumed_after:
        seed = (int(seed) * 1_000_003 + resumed_after) % 2**31
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        return optuna.samplers.GridSampler({p.path: p.grid() for p in spec.params}, seed=seed)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=int(s.get("startup_trials", 10)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(s.get("startup_trials", 10)))


def make_pruner(spec: TuneSpec):
    import optuna

    p = spec.pruner
    startup, warmup = int(p.get("startup_trials", 5)), int(p.get("warmup_epochs", 0))
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(float(p.get("percentile", 25.0)), n_startup_trials=startup,
                                               n_warmup_steps=warmup)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(p.get("min_epochs", 1)), max_resource=spec.base.epochs,
                                              reduction_factor=int(p.get("reduction_factor", 3)))
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(p.get("min_epochs", 1)),
                                                      reduction_factor=int(p.get("reduction_factor", 4)))
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.get("lower"), upper=p.get("upper"), n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def open_studies(spec: TuneSpec, storage) -> tuple[dict[str, Any], list[tuple[Arm, Any]]]:
    """Create or load one Optuna study per arm; enqueue the default trial in new ones. Returns the
    studies and the trials a previous driver left RUNNING (to resume)."""
    import optuna
    from optuna.trial import TrialState

    studies, orphans = {}, []
    for arm in spec.arms:
        name = spec.optuna_study(arm.name)
        study = optuna.create_study(study_name=name, storage=storage, sampler=make_sampler(spec),
                                    pruner=make_pruner(spec), direction=spec.objective.direction, load_if_exists=True)
        if "bnnctl.space_hash" not in study.user_attrs:
            study.set_user_attr("bnnctl.space_hash", spec.space_hash)
            study.set_user_attr("bnnctl.metric", spec.objective.metric)
            study.set_user_attr("bnnctl.arm", arm.name)
            if spec.default_trial and not study.trials:
                defaults = default_params(spec, arm)
                if spec.sampler.name != "grid" or all(defaults[p.path] in p.grid() for p in spec.params):
                    study.enqueue_trial(defaults, user_attrs={"bnnctl.default": True})
        if study.metric_names is None:  # optuna-dashboard's axes name the objective, not "Objective 0"
            _name_objective(study, spec.objective.metric)
        if study.trials:  # continued: not the seed's first values again
            study.sampler = make_sampler(spec, drawn(study.trials))
        studies[arm.name] = study
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # Optuna has no public way to reopen a running trial by id; Trial(study, id) is its constructor
            orphans.append((arm, optuna.Trial(study, t._trial_id)))
    return studies, orphans


def _name_objective(study, metric: str) -> None:
    import warnings

    with warnings.catch_warnings():  # set_metric_names is marked experimental (it has been since Optuna 3.2)
        warnings.simplefilter("ignore")
        study.set_metric_names([metric])


def drawn(trials) -> int:
    """How far a study's sampling has gone: its trials plus the values stored in them. Every draw
    a driver keeps raises it (a new trial, or a value for a trial a killed driver left unsampled),
    so a driver continuing the study never replays a seed stream an earlier driver drew from.
    (The trial count alone does not: a driver that only sampled such a trial, then was killed,
    left the count as it found it, and the next driver repeated its values in a new trial.)"""
    return len(trials) + sum(len(t.params) for t in trials)


def check_compatible(spec: TuneSpec, storage) -> None:
    """Refuse, before anything is written, to continue a tuning whose comparable parts changed."""
    import optuna

    existing = set(optuna.study.get_all_study_names(storage))
    for arm in spec.arms:
        name = spec.optuna_study(arm.name)
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        if study.user_attrs.get("bnnctl.space_hash", spec.space_hash) != spec.space_hash:
            raise SpecError(spec.file, "search", f"the tuning {spec.name!r} was started with a different base, arms, "
                            "search space, objective or seed; its trials would not be comparable. Give the changed "
                            "spec a new name (only `trials`, `execution`, `sampler`, `pruner` and `description` may "
                            "change between runs)")
        if study.direction.name.lower() != spec.objective.direction:
            raise SpecError(spec.file, "objective.direction", f"the Optuna study {name!r} exists with direction "
                            f"{study.direction.name.lower()}")
