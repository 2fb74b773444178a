"""MetaSchedule tuning of a Relax module for a TVM bundle.

The steps of ``relax.pipeline.static_shape_tuning_pipeline`` with kompakt's candidate build,
then one step of kompakt's own before the best schedules are applied: the best
``REMEASURE_TOP`` records of each task in the database are built again and measured side by
side, ``REMEASURE_ROUNDS`` rounds of ``REMEASURE_REPEATS`` repeats each, and the schedule
with the lowest median wins. During the search a candidate is measured once, so on a busy
machine one lucky measurement could crown a schedule several times slower than the best
(seen on the pruned CNN at batch 1: 1.49x slower after one more trial per task). The
re-measured times are kept apart from the database, which stays as MetaSchedule wrote it.

Candidates are measured with TVM's worker threads set as the runtime sets them
(:func:`kompakt.runtime.tvm.usable_cores` unless ``TVM_NUM_THREADS`` says otherwise): left to
itself, a measuring process starts a different thread pool from the one the bundle will run
with, and its times (slower and erratic on a 2-core machine) rank schedules for the wrong
setting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
from pathlib import Path

from kompakt.runtime.tvm import usable_cores

REMEASURE_TOP = 5  # records per task measured again before the best is applied
REMEASURE_ROUNDS = 3  # rounds over all of them, so drift hits every candidate alike
REMEASURE_REPEATS = 5  # repeats per round; each at least 50 ms of runs
# the re-measured records all built and ran during tuning, so a timeout there means a loaded
# machine, not a bad schedule: wait longer than MetaSchedule's 30 s before dropping one
REMEASURE_TIMEOUT_S = 120


def candidate_build(mod, target, _params):
    """MetaSchedule's build of one tuning candidate, without importing TVM's tensor
    intrinsics: parsing them takes about 30 s on 2 cores, the whole default build timeout, in
    every fresh build worker, so every candidate failed. kompakt's models use none of them."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


@contextlib.contextmanager
def _runtime_threads():
    """``TVM_NUM_THREADS`` as the bundle's runtime will have it, for the measuring workers
    this process starts; restored afterwards."""
    before = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = before or str(usable_cores())
    try:
        yield
    finally:
        if before is None:
            del os.environ["TVM_NUM_THREADS"]


@contextlib.contextmanager
def _unnamed_handlers_aside():
    """MetaSchedule rebuilds its loggers' configuration from their handlers' names and fails
    on a handler without one (pytest's capture handlers, a user's own): such handlers are
    taken off its logger while it tunes, and put back."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    aside = [h for h in logger.handlers if h.get_name() is None]
    for handler in aside:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in aside:
            logger.addHandler(handler)


def tuning_module(mod):
    """``mod`` lowered as far as tuning takes it, under the current target."""
    from tvm import relax, transform

    return transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
        ]
    )(mod)


def tuned(mod, target, trials: int, tune_dir: Path):
    """``mod`` with MetaSchedule's schedules: ``trials`` new trials per task (fused operator)
    recorded in ``tune_dir``'s database, then the best records re-measured (module doc)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    with target, _runtime_threads(), _unnamed_handlers_aside():
        mod = tuning_module(mod)
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _scheduled(t)]
        if tasks:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, str(tune_dir)
            )
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(tune_dir),
                max_trials_global=trials * 10_000,  # only a cap: ``trials`` for every task
                max_trials_per_task=trials,
                builder=ms.builder.LocalBuilder(f_build=candidate_build),
            )
        database = ms.database.JSONDatabase(work_dir=str(tune_dir))
        with remeasured(mod, target, database):
            return relax.transform.MetaScheduleApplyDatabase()(mod)


def _scheduled(task) -> bool:
    """Whether ``task`` is a kernel scheduled by hand (kompakt's fused codebook kernels):
    left out of the search. MetaSchedule's own check reads the attribute from the task's
    module, where TVM 0.27 does not put it, and its FLOPs estimate fails on their vector code."""
    func = task.dispatched[0]["main"]
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def remeasured(mod, target, database):
    """A memory database with, for each task of ``mod`` that ``database`` has records for,
    its best ``REMEASURE_TOP`` records, their times measured again (module doc). A record
    that no longer builds or runs is left out."""
    from tvm.s_tir import meta_schedule as ms

    chosen = []  # (task's module, record)
    for task in ms.relax_integration.extract_tasks(mod, target):
        task_mod = task.dispatched[0]
        if database.has_workload(task_mod):
            workload = database.commit_workload(task_mod)
            chosen += [(task_mod, r) for r in database.get_top_k(workload, REMEASURE_TOP)]
    candidates = [record.as_measure_candidate() for _, record in chosen]
    builds = ms.builder.LocalBuilder(
        f_build=candidate_build, timeout_sec=REMEASURE_TIMEOUT_S
    ).build([ms.builder.BuilderInput(c.sch.mod, target) for c in candidates])
    runner = ms.runner.LocalRunner(
        timeout_sec=REMEASURE_TIMEOUT_S,
        evaluator_config=ms.runner.EvaluatorConfig(
            number=1, repeat=REMEASURE_REPEATS, min_repeat_ms=50
        ),
    )
    measurable = [  # (task's module, record, runner input) of the candidates that built
        (task_mod, record, ms.runner.RunnerInput(b.artifact_path, "cpu", c.args_info))
        for (task_mod, record), c, b in zip(chosen, candidates, builds, strict=True)
        if b.error_msg is None
    ]
    times: list[list[float]] = [[] for _ in measurable]
    for _ in range(REMEASURE_ROUNDS):
        futures = runner.run([runner_input for _, _, runner_input in measurable])
        for seconds, future in zip(times, futures, strict=True):
            result = future.result()
            if result.error_msg is None:
                seconds += [float(s) for s in result.run_secs]
    memory = ms.database.MemoryDatabase()
    for (task_mod, record, _), seconds in zip(measurable, times, strict=True):
        if len(seconds) == REMEASURE_ROUNDS * REMEASURE_REPEATS:
            memory.commit_tuning_record(
                ms.database.TuningRecord(
                    record.trace,
                    memory.commit_workload(task_mod),
                    [statistics.median(seconds)],
                    target,
                    record.args_info,
                )
            )
    return memory
