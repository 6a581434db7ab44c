"""The evolver: task iterations, active phases and generations (paper Algorithm 1).

This is the stateful edge of the evolver. It reads the store, runs active phases over a
queue of tasks (the task with the fewest completed iterations first, then the oldest), and
at the end of each active phase keeps and publishes only the active task's best path.
Killed at any moment and started again, it continues from the last published state.
"""

from __future__ import annotations

import collections
import contextlib
import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from mu2net import components as C
from mu2net import datasets as D
from mu2net import hparams as H
from mu2net import paths as P
from mu2net.evolver import schedule as S
from mu2net.evolver.mutations import ChildSpec, mutate
from mu2net.evolver.ray_pool import RayChildren
from mu2net.evolver.sampling import sample_parent
from mu2net.evolver.scoring import accounted_params, make_scorer, reference_params
from mu2net.evolver.training import ChildTraining, Devices, TrainBudget, TrainResult, can_split, train_child
from mu2net.store import (ROOT_PATH_ID, ComponentRecord, ComponentsGone, Store, StoreError, TaskNotFound, TaskPinned,
                          TaskRecord, new_id, serialize_tree)

log = logging.getLogger("mu2net.evolver")
#: Active phases of one task in a row that may fail (raise, or kill the evolver process)
#: before the task ends ``failed``; between them it backs off BACKOFF_SECONDS * 2**(n-1).
MAX_PHASE_ATTEMPTS = 3
BACKOFF_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class EvolverConfig:
    """Budget and options of the evolver.

    Defaults make one task iteration on a small dataset take minutes on a 2-core CPU; the
    paper's values are :data:`PAPER_PRESET`.

    Attributes:
      generations: generations per active phase (paper: 4 in Section 4, more later).
      children: children per generation, trained in parallel across local devices (paper: 8).
      budget: train cycles per child, sample cap per cycle, batch size.
      scorer: "accuracy" (paper) or "size_penalty" (official code's ``ScorerDecay``: see
        :mod:`mu2net.evolver.scoring`).
      size_penalty_base: base of the size penalty scorer (the official configs' "Size
        scale" options use 0.98 to 0.02; 1.0 disables it).
      allow_insertion: enables the layer-insertion mutation (Section 4).
      max_blocks: most transformer blocks a path may grow to.
      seed: seeds parent sampling, mutations, initialisation and training.
      first_answer: a new task's active phase starts with a short *first-answer
        generation*: each child reuses an allowed path frozen with a new head (SMART-style
        reuse of existing modules), or, from a randomly initialised root, clones the root
        and inserts :attr:`first_answer_blocks` blocks where it has none; see
        :meth:`Evolver.first_answer_specs`. Each
        of its children is published as soon as it completes if it is the best so far and
        beats chance (with ``publish_on_improvement``), so a new task is served after its
        first child that beats chance, not after the whole generation.
      first_answer_cycles: train cycles of a first-answer child (the sample cap and batch
        size are :attr:`budget`'s).
      first_answer_epochs: when > 0, a randomly initialised root's first-answer child
        trains on one long schedule, like plain training of the same ViT: one warm-up and
        cosine decay over ``min(first_answer_epochs x training examples,
        first_answer_max_samples)`` examples, rounded up to whole cycles (at least
        :attr:`first_answer_cycles`), so the budget is sized from the task's training
        split. It is validated after every cycle and each cycle that strictly improves its
        best checkpoint is reported to the phase at once (and published: the first at once,
        then as :attr:`checkpoint_publish_seconds` allows), so it answers as early as a
        short child and improves while it trains. Of equal-score checkpoints it keeps the
        earliest, a deliberate deviation from Algorithm 1's latest-wins ``>=`` within one
        child (an equal score is not worth a publish); between children ``>=`` holds. The
        first-answer generation then holds one such child (the others reuse served paths).
        A new upload parks it (:attr:`preempt`); the task's next phase resumes it on the
        same schedule, optimizer state and data order. Random parameters hold no
        knowledge to evolve from: issue 16 measured that children restarting a
        12,800-example schedule reach 0.88-0.90 on MNIST-5k in 5 minutes where one
        4.5-minute schedule reaches 0.957. 0 (default): a short child, Algorithm 1's fixed
        budget.
      first_answer_max_samples: the cap on that long schedule's training examples
        (keeps a large upload's first child to minutes on a CPU).
      long_validation_ratio: when > 0, a long first child's cycle (the training between
        two of its validations) has about this many times as many examples as the
        task's validation split (where that is more than the budget's cycle), so its
        validations cost about ``1 / (3 x ratio)`` of its compute (a validation example is
        a forward pass, a training example a forward and a backward pass); the schedule's
        examples stay ``first_answer_epochs``'s, split evenly into the fewer cycles.
        Fashion-MNIST's 3,000 validation images after every 4,096-example cycle are about
        a fifth of the long child's time; at ratio 10 a cycle there is 30,000 examples.
        0 (default): the budget's cycle, min(1 epoch, sample cap), as every other child
        (Section 3.3).
      long_data_parallel: a long first child trains data-parallel over every local device
        (its batches split between them, gradients averaged;
        :func:`mu2net.evolver.training.placement`) instead of on one device, once the
        other children of its generation are done (they are short: a frozen reuse and a
        new head; they run first, one per device, and the first answer comes from them).
        Without it one device trains the task's lineage while the others idle: on this
        2-core CPU a 4-block child's step ran 1,381-1,542 images/s on one device and
        1,692-1,768 split over two (1.15-1.23x; ``benchmarks/data_parallel.py``).
        Off (default): one device, as every other child. With it, a later generation of a
        single child (:attr:`later_children` 1, or :attr:`children` 1) trains that child
        data-parallel too.
      first_answer_blocks: transformer blocks a first-answer child of a random root without
        blocks inserts before the head (the preliminary experiment's insertion mutation,
        Section 4, applied this many times at once; default 1). Plain training of a 4-block
        ViT reaches MNIST-5k 0.957 in 4.5 minutes where a 1-block one reaches 0.926
        (docs/results.md), so a long first child with more blocks starts like plain
        training of that depth.
      checkpoint_publish_seconds: a long-schedule child's checkpoints are published at
        most once per this many seconds after the task's first answer (it improves nearly
        every cycle; each publish is a store transaction, a test evaluation and a hot swap
        in the server); a held-back improvement goes out at a later cycle or at the
        generation's end. Short first-answer children are published as they complete.
      publish_on_improvement: publish the task's best path after every generation whose
        best path scores at least as high as the published one (Algorithm 1's ``>=``: a
        new path of equal score is published too, latest wins), not only at the end of the
        active phase. A mid-phase publish needs a validation accuracy above
        chance (the validation split's majority-class share).
      preempt: end a served task's active phase early, at a generation boundary, when a
        task that was never served is waiting (``mu2net serve``: a new upload comes
        first), or, after a first-answer generation, when another task's long first child
        is parked (it goes on next). The running children stop after their current train
        cycle (keeping their best checkpoint; a long first child is parked instead, see
        :attr:`first_answer_epochs`) and children not yet started are skipped (a long one
        is parked unstarted), so that boundary comes within one cycle of the upload; the
        preempted phase publishes what it has and is not counted as a task iteration. A
        task deleted during its phase (or replaced by an upload of the same name) stops
        its phase the same way, and nothing more is published or counted for it.
      patience: completed task iterations in a row without improvement after which
        continual evolution pauses a task (see :mod:`mu2net.evolver.schedule`).
      grow_when_stale: each completed task iteration without improvement doubles the train
        cycles of the task's next children (``budget.cycles * 2 ** min(stale_iterations,
        3)``, so at most 8x: one stale task does not hold the evolver for hours):
        once short children stop finding improvements, longer ones get the compute
        (``mu2net serve``; the paper's fixed budget when False).
      clone_random_root: a child always clones (trains) the components of a randomly
        initialised root model it uses, instead of sharing each frozen unless the
        layer-cloning mutation (probability mu) clones it: random parameters hold no
        knowledge, so sharing them frozen only constrains the child. A root loaded from a
        checkpoint (``metrics["pretrained"]``) is unaffected. Off: Section 3.2 as written.
      halving: reduction factor eta of successive halving inside a generation (Li et al.
        2018, "Hyperband", Section 3.1; 1 turns it off). A generation starts
        ``children * halving`` children and trains them in rungs ending at
        ``budget.cycles // halving**j`` cycles (for 4 cycles and eta 2: 1, 2, 4); after
        each rung only the best ``1/halving`` of the children (by best validation score so
        far, at least one per device) train on. The compute is the sum over rungs of
        (children training) x (cycles the rung adds): for 4 cycles, eta 2 and 4 children
        on up to 2 devices, 8 + 4 + 2x2 = 16 child-cycles, as 4 plain children; other
        settings differ (24 cycles, 2 children, 2 devices: 4 + 2x2 + 2x3 + 2x6 + 2x12 = 50
        against 48), so measurements report the samples trained. Every started child
        counts as a selection of its parent (Section 3.1), also one stopped after its
        first rung. A stopped child keeps its best checkpoint and goes through early
        pruning like any other (Algorithm 1); between rungs a child's state is parked on
        the host. The first-answer generation is not halved.
      identity_insertion: a block inserted by the layer-count mutation (or the first
        answer) starts as the identity (:func:`mu2net.components.identity_block`), so the
        child starts from its parent's function; off: a randomly initialised block.
      per_mutation_probabilities: every mutation (each hyperparameter, each position's
        layer cloning, the layer count) has its own probability, inherited and itself
        mutated (mu3Net, "mu2Net+"; :func:`mu2net.evolver.mutations.mutation_probability`);
        off: all use the path's mu (Section 3.2).
      lineage_children: in a phase of a task already served, this many of the
        ``children * halving`` children of each later generation take the population's
        best path as their parent (the served path, or a better child of this phase,
        whatever its parent) instead of Section 3.1's sampling, which picks the others (0:
        every child sampled, the paper's method). Each still counts as a selection of its
        parent. None in the first-answer generation. Measured by the share of a task's
        trained examples behind its served path (issue 16): the paper's sampling moves
        to other tasks' paths once the best one was selected a few times
        (0.5 ** #selections), and after a long first child those children are mostly
        discarded.
      later_children: children of each later generation in a phase of a task already
        served (0: :attr:`children`). With 1 and :attr:`lineage_children` 1, a served
        task's later generations train one child of its best path, data-parallel over
        every device with :attr:`long_data_parallel`: of two children of one parent at
        most one can end in the served lineage.
      lineage_lr_steps: a lineage child's learning rate moves this many values down Table
        1's sorted list (clipped at its lowest) after its mutations: its parent's schedule
        has annealed, and a restart at the parent's peak rate undoes what the annealing
        found (SGDR restarts at a lower peak; Loshchilov & Hutter 2017). 0: unchanged. The
        rate is the child's hyperparameter, inherited: along a lineage of lineage children
        it steps down each generation (a step decay) to Table 1's lowest, 0.0001, unless a
        learning-rate mutation moves it up (one value, probability mu).
      long_patience: a long-schedule child (:attr:`first_answer_epochs`) stops after this
        many validations in a row that do not strictly beat its best score, keeping its
        best checkpoint as at its schedule's end (early stopping with patience, Prechelt
        1998, "Early stopping - but when?"; Keras's ``EarlyStopping(patience=...)``
        counts the same way). A parked child counts on where it stopped. The examples it
        would have trained after its best checkpoint are the ones that never reach the
        served lineage: issue 16 measured MNIST-5k's long child at its best after
        760,000 of its 1.4M examples. 0 (default): the whole schedule.
      generation_patience: a task's active phase ends after this many later generations in
        a row whose children did not strictly beat the population's best score (a tie is
        still retained, Algorithm 1's >=, but does not count as progress), as a completed
        task iteration: with :attr:`patience`, a task that stopped improving pauses after
        a few short phases instead of several full ones. 0 (default): every phase runs
        :attr:`generations` generations (Algorithm 1).
    """

    generations: int = 4
    children: int = 4
    budget: TrainBudget = TrainBudget()
    scorer: str = "accuracy"
    size_penalty_base: float = 0.99
    allow_insertion: bool = True
    max_blocks: int = 12
    seed: int = 0
    first_answer: bool = True
    first_answer_cycles: int = 2
    first_answer_epochs: float = 0.0
    first_answer_max_samples: int = 400_000
    first_answer_blocks: int = 1
    long_validation_ratio: float = 0.0
    long_data_parallel: bool = False
    checkpoint_publish_seconds: float = 5.0
    publish_on_improvement: bool = True
    preempt: bool = False
    patience: int = 5
    grow_when_stale: bool = False
    clone_random_root: bool = False
    halving: int = 1
    identity_insertion: bool = False
    per_mutation_probabilities: bool = False
    lineage_children: int = 0
    lineage_lr_steps: int = 0
    later_children: int = 0
    long_patience: int = 0
    generation_patience: int = 0

    def __post_init__(self) -> None:
        for name in ("generations", "children", "first_answer_cycles", "patience", "halving"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.first_answer_epochs) and self.first_answer_epochs >= 0):
            raise ValueError(f"first_answer_epochs must be a finite number >= 0, got {self.first_answer_epochs}")
        if not (math.isfinite(self.checkpoint_publish_seconds) and self.checkpoint_publish_seconds >= 0):
            raise ValueError(f"checkpoint_publish_seconds must be a finite number >= 0, "
                             f"got {self.checkpoint_publish_seconds}")
        if not (math.isfinite(self.long_validation_ratio) and self.long_validation_ratio >= 0):
            raise ValueError(f"long_validation_ratio must be a finite number >= 0, got {self.long_validation_ratio}")
        if self.first_answer_max_samples < 1:
            raise ValueError(f"first_answer_max_samples must be >= 1, got {self.first_answer_max_samples}")
        if not 1 <= self.first_answer_blocks <= self.max_blocks:
            raise ValueError(f"first_answer_blocks must be in 1..max_blocks ({self.max_blocks}), "
                             f"got {self.first_answer_blocks}")
        b = self.budget
        if b.cycles < 1 or b.sample_cap < 1 or b.batch_size < 1 or b.min_samples < 0:
            raise ValueError(f"train budget values must be >= 1 (min_samples >= 0), got {b}")
        if self.later_children < 0:
            raise ValueError(f"later_children must be >= 0 (0: children), got {self.later_children}")
        later = (self.later_children or self.children) * self.halving
        if not 0 <= self.lineage_children <= later:
            raise ValueError(f"lineage_children must be in 0..(later_children or children)*halving ({later}), "
                             f"got {self.lineage_children}")
        for name in ("lineage_lr_steps", "long_patience", "generation_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")


#: The paper's large-scale budget (Section 5.1: 4 generations of 8 children per task
#: iteration, one per TPU core; "each model training performs 4 validation cycles", each of
#: min(1 epoch, 128116 samples), 1/10 of an ImageNet epoch). The batch size (64) is the
#: official mu2Net notebook's large-scale configuration (``get_exp_config_large``:
#: ``batch_size = 64``, "TPUv4 megacore=64, TPUv3=32"); the paper does not state one. No
#: layer-count mutation: Section 4 adds it for the preliminary experiment only, and the
#: official large configuration has no layer-count range. No first-answer generation:
#: Algorithm 1's generations only.
PAPER_PRESET = EvolverConfig(generations=4, children=8,
                             budget=TrainBudget(cycles=4, sample_cap=128116, batch_size=64),
                             allow_insertion=False, first_answer=False)


@dataclasses.dataclass
class _Suspended:
    """A long-schedule child stopped by preemption, parked on the host, resumed by its
    task's next active phase (in memory only: a restarted evolver starts that task's next
    phase from its served path, as after any phase)."""

    seq: int  # the task's store sequence number (a deleted and re-uploaded task is a new one)
    spec: ChildSpec
    child: ChildTraining | None  # None: preempted before it started
    params: Sequence[Any]
    opts: Sequence[Any]
    recs: Sequence[ComponentRecord | None]
    seed: int
    scored: float
    last: tuple[ChildSpec, P.Path, list] | None  # its last reported checkpoint
    samples: int  # its examples counted into the task's samples_trained
    since: int = 0  # system version when the phase that started it began (a later rollback drops it)
    stale: int = 0  # its validations in a row without a strictly better score (EvolverConfig.long_patience)


class _PreemptCheck:
    """A throttled, sticky store check (:meth:`Evolver._new_task_waiting`): called, it says
    whether the running children should stop after their current cycle; :attr:`gone` says
    the active task itself was deleted or replaced, or rolled back by a user since the phase
    began (so it stops whether or not it is served)."""

    def __init__(self, gone: Callable[[], bool], waiting: Callable[[], bool], every: float) -> None:
        self._gone, self._waiting, self._every = gone, waiting, every
        self._last, self._seen, self.gone = -math.inf, False, False
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            if not self._seen and time.monotonic() - self._last >= self._every:
                self._last = time.monotonic()
                self.gone = self._gone()
                self._seen = self.gone or self._waiting()
            return self._seen


@dataclasses.dataclass
class _Pending:
    record: ComponentRecord
    params: Any
    opt_state: Any


def locked_components(paths: Sequence[P.Path], task: str) -> frozenset[str]:
    """Ids of the components that are locked while ``task`` is active.

    A component is locked when a retained model other than the active task's uses it: the
    root model or another task's best path (``paths`` is every retained path of the store).
    Children share locked components frozen unless the layer-cloning mutation clones them
    (probability mu, Section 3.2); every other component of a parent is the active task's
    own and keeps training (see :mod:`mu2net.evolver.mutations`).
    """
    return frozenset(c for p in paths if p.task != task for c in p.component_ids)


def _digest(tree: Any) -> str:
    return hashlib.sha256(serialize_tree(tree)).hexdigest()


class Evolver:
    """Runs the mu2Net method over the tasks of a store.

    Args:
      store: the store (root model must be initialised, see :func:`mu2net.root.init_root`).
      config: budget and options.
      progress: show a progress bar per generation.
      devices: devices to train children on (default: all local JAX devices).
    """

    def __init__(self, store: Store, config: EvolverConfig = EvolverConfig(), *, progress: bool = True,
                 devices: Sequence[jax.Device] | None = None, ray: RayChildren | None = None) -> None:
        self.store = store
        self.config = config
        #: trains the children of later generations and a new task's short first-answer
        #: children on a Ray cluster (``--ray-address``); None: on :attr:`devices`
        self.ray = ray
        self.progress = progress
        self.devices = list(devices or jax.local_devices())
        self.active_task: str | None = None  # the task of the running active phase
        self._phase_since = 0  # system version when the running active phase began
        #: task name -> its long first child stopped by preemption, resumed by its next phase
        self._suspended: dict[str, _Suspended] = {}
        root = store.root_path()
        if root is None:
            raise StoreError(f"store {store.data_dir} has no root model; initialise it first")
        self.root = root
        block = C.init_component(C.TRANSFORMER_BLOCK, root.architecture.config, jax.random.PRNGKey(0))
        self.reference_params = reference_params(int(root.metrics["activated_params"]), C.num_params(block),
                                                 root.architecture.num_blocks)
        self._scorer_spec = (config.scorer, self.reference_params, config.size_penalty_base)
        self.scorer = make_scorer(*self._scorer_spec)
        self.stats: dict[str, Any] = {"children": 0, "phases": 0, "preempted": 0, "requeued": 0,
                                      "long_stopped_early": 0, "phases_ended_stale": 0, "images_per_second": []}
        self._requeues: dict[str, int] = {}  # task -> phases in a row dropped for ComponentsGone

    # ---- queue --------------------------------------------------------------------------

    def next_task(self, iterations: int, continual: bool = False) -> TaskRecord | None:
        """The next active task (order in :mod:`mu2net.evolver.schedule`); wakes a paused
        task that a related task's publish woke."""
        tasks = self.store.list_tasks()
        versions = self.store.served_versions()
        task = S.next_task(tasks, versions, iterations, continual)
        if self.config.preempt and task is not None and task.name in versions:
            # no new task waits: a parked long first child goes on before anything else
            parked = self._suspended.get(task.name)
            if parked is None or parked.seq != task.seq:
                task = self._parked_task(task) or task
        if task is not None and task.paused_version is not None:
            log.info("task %s wakes: a related task published after it paused", task.name)
            self.store.set_evolution(task.name, stale_iterations=0, paused_version=None)
        return task

    def run(self, iterations: int, stop: Callable[[], bool] | None = None, *, continual: bool = False) -> int:
        """Runs active phases until every task has ``iterations`` task iterations; with
        ``continual``, goes on while any task is awake (see :mod:`mu2net.evolver.schedule`).

        Returns:
          Number of active phases run.
        """
        phases = 0
        while True:
            task = self.next_task(iterations, continual)
            if task is None:
                if not self._backing_off(iterations, continual) or (stop is not None and stop()):
                    break
                time.sleep(1.0)  # a task backs off after a crashed phase: wait for it (new tasks still come first)
                continue
            if stop is not None and stop():
                break
            self.active_task = task.name  # before the attempt is counted: a SIGTERM uncounts it
            try:
                attempt = self.store.begin_attempt(task.name)
            except TaskNotFound:  # deleted since it was chosen
                self.active_task = None
                continue
            if attempt > MAX_PHASE_ATTEMPTS:  # its last phases killed the evolver process itself
                log.error("task %s failed: %d active phases in a row did not end", task.name, attempt - 1)
                self.store.set_task_state(task.name, "failed", f"{attempt - 1} active phases in a row crashed the "
                                          f"evolver (last error: {task.error or 'the process died'})")
                self.active_task = None
                continue
            try:
                self.active_phase(task.name)
                self.store.end_attempt(task.name)
                self._requeues.pop(task.name, None)
            except ComponentsGone as e:
                # a path the phase used went with a deleted task: the deletion wins, the phase is
                # dropped uncounted (not a failure, no back-off) and the task is requeued: its next
                # phase starts from the store as it is now
                self._requeues[task.name] = self._requeues.get(task.name, 0) + 1
                if self._requeues[task.name] > MAX_PHASE_ATTEMPTS:
                    # phase after phase loses components: not a delete racing it but a damaged store
                    # (a retained path naming a missing component); back off and end failed as any fault
                    self._phase_raised(task, attempt, e)
                elif self._exists(task.name, task.seq):
                    log.warning("task %s: its active phase lost components to a deleted task (%s); requeued",
                                task.name, e)
                    self.store.cancel_attempt(task.name)
                    self.stats["requeued"] += 1
                else:
                    log.warning("task %s was deleted during its active phase", task.name)
            except TaskPinned:  # a user rolled it back meanwhile: its phase ends, uncounted, nothing published
                log.info("task %s was rolled back by a user during its active phase; phase ended", task.name)
                self._suspended.pop(task.name, None)  # a long child it parked continues the lineage left
                self.store.cancel_attempt(task.name)
            except D.DatasetError as e:
                log.error("task %s failed: %s", task.name, e)
                with contextlib.suppress(TaskNotFound):  # deleted meanwhile
                    self.store.set_task_state(task.name, "failed", str(e))
            except StoreError as e:
                if self._exists(task.name, task.seq):
                    # e.g. a missing or corrupt array file: backs off, retried, failed after K tries
                    self._phase_raised(task, attempt, e)
                else:  # deleted during its active phase
                    log.warning("task %s was deleted during its active phase", task.name)
            except Exception as e:  # a bug or a fault: back off, other tasks go on
                self._phase_raised(task, attempt, e)
            finally:
                self.active_task = None
                if self.ray is not None:
                    self.ray.release()  # the phase's data and parents leave the cluster's object store
            phases += 1
        self._status("idle")
        return phases

    def _exists(self, name: str, seq: int | None = None) -> bool:
        """Whether the task is still in the store (not deleted meanwhile; with ``seq``, not
        deleted and uploaded again under the same name either: that is another task)."""
        try:
            return seq is None or self.store.get_task(name).seq == seq
        except TaskNotFound:
            return False

    def _backing_off(self, iterations: int, continual: bool) -> bool:
        """Whether a task that still has work is only waiting out a back-off (so ``run`` waits
        for it instead of returning with the task neither done nor failed)."""
        now, served = time.time(), self.store.served_versions()
        return any(t.state != "failed" and t.retry_after is not None and t.retry_after > now
                   and (continual or t.name not in served or t.iterations_done < iterations)
                   for t in self.store.list_tasks())

    def _phase_raised(self, task: TaskRecord, attempt: int, error: Exception) -> None:
        """A phase raised: the task backs off (BACKOFF_SECONDS * 2**(attempt-1)) while other
        tasks go on, and ends ``failed`` after MAX_PHASE_ATTEMPTS such phases in a row."""
        log.error("task %s: active phase (attempt %d of %d) raised", task.name, attempt, MAX_PHASE_ATTEMPTS,
                  exc_info=error)
        reason = f"{type(error).__name__}: {error}"
        with contextlib.suppress(TaskNotFound):  # deleted during the phase
            if attempt >= MAX_PHASE_ATTEMPTS:
                self.store.set_task_state(task.name, "failed",
                                          f"{attempt} active phases in a row raised; last: {reason}")
            else:
                self.store.end_attempt(task.name, completed=False,
                                       retry_after=time.time() + BACKOFF_SECONDS * 2 ** (attempt - 1), error=reason)

    def _status(self, state: str, task: TaskRecord | None = None, **fields: Any) -> None:
        """Writes what the evolver is doing now to the store (read by the server's status)."""
        now = time.time()
        status = {"state": state, "task": task.name if task else None, "phase": fields.pop("phase", state),
                  "updated": now, "pid": os.getpid(), **fields}
        try:
            self.store.set_evolver_status(status)
        except Exception as e:  # status is informative only: never stop evolving for it
            log.warning("could not record the evolver status: %s", e)

    #: Seconds between the store reads of a running generation's new-task check.
    preempt_check_seconds = 2.0

    def _new_task_waiting(self, task: TaskRecord) -> _PreemptCheck:
        """A check, for the children of ``task``'s generation, of whether a never-served task
        is waiting, or ``task`` itself was deleted (or replaced by an upload of the same name),
        or rolled back by a user (:attr:`_PreemptCheck.gone`); store read at most every
        :attr:`preempt_check_seconds`, True stays True. The children then stop after their current cycle, so the generation
        boundary where the phase is preempted comes within one cycle of the upload."""
        since = self._phase_since

        def gone() -> bool:  # deleted, replaced, or rolled back by a user (pinned, or woken since)
            try:
                now = self.store.get_task(task.name)
            except TaskNotFound:
                return True
            return now.seq != task.seq or now.pinned or (now.rolled_back_version or -1) > since

        return _PreemptCheck(gone, lambda: self._waiting_new_task(task) is not None, self.preempt_check_seconds)

    def _parked_task(self, task: TaskRecord) -> TaskRecord | None:
        """The oldest other live task whose long first child is parked (:attr:`_suspended`):
        it goes on right after the new task's first answer, before anyone's later generations."""
        now = time.time()
        live = [t for t in self.store.list_tasks() if t.name != task.name and t.name in self._suspended
                and t.seq == self._suspended[t.name].seq and S.is_live(t, now)]
        return min(live, key=lambda t: t.seq) if live else None

    def _waiting_new_task(self, task: TaskRecord) -> TaskRecord | None:
        """A never-served task other than ``task`` (preemption, :attr:`EvolverConfig.preempt`)."""
        waiting = S.next_task([t for t in self.store.list_tasks() if t.name != task.name],
                              self.store.served_versions(), iterations=0, continual=False)
        return waiting  # with 0 iterations, only a never-served task is next

    # ---- components ---------------------------------------------------------------------

    def _allowed(self, task: TaskRecord, path: P.Path) -> bool:
        """Privacy (Section 3.4): a path is usable by ``task`` only if no component of it
        was trained on data private to another ACL group."""
        comps = self.store.get_components(path.component_ids)
        return all(c.acl_group is None or c.acl_group == task.acl_group for c in comps)

    def _component(self, cid: str, pending: Mapping[str, _Pending]) -> tuple[ComponentRecord, Any, Any]:
        if cid in pending:
            p = pending[cid]
            return p.record, p.params, p.opt_state
        rec = self.store.get_components([cid])[0]
        params = self.store.get_arrays(rec.params_digest)
        opt = self.store.get_arrays(rec.opt_digest) if rec.opt_digest else None
        return rec, params, opt

    def _materialize(self, spec: ChildSpec, task: TaskRecord, pending: Mapping[str, _Pending],
                     rng: np.random.Generator) -> tuple[list[Any], list[Any], list[ComponentRecord | None]]:
        params, opts, recs = [], [], []
        for i, (kind, src) in enumerate(zip(spec.architecture.kinds, spec.sources)):
            if src is None:
                key = jax.random.PRNGKey(int(rng.integers(2 ** 31)))
                new = C.init_component(kind, spec.architecture.config, key, spec.architecture.num_classes)
                # an inserted block preserves the parent's function; a first-answer child of a
                # random root has no function to preserve
                if kind == C.TRANSFORMER_BLOCK and self.config.identity_insertion and "clone_all" not in spec.mutations:
                    new = C.identity_block(new)
                params.append(jax.device_get(new))
                opts.append(None)
                recs.append(None)
            else:
                rec, p, o = self._component(src, pending)
                params.append(p)
                opts.append(o if spec.trainable[i] else None)
                recs.append(rec)
        return params, opts, recs

    # ---- one active phase ---------------------------------------------------------------

    def first_answer_specs(self, task: TaskRecord, others: Sequence[P.Path],
                           num_train: int | None = None, num_validation: int = 0) -> list[ChildSpec]:
        """The children of a new task's first-answer generation (:attr:`EvolverConfig.first_answer`).

        Each child reuses one allowed path with every component frozen and trains only a
        new head: the cheapest child that can transfer what the system knows (SMART's
        reuse of existing modules). Candidates are the other tasks' served paths, deepest
        first, then the root model: :attr:`EvolverConfig.children` children, one per
        candidate in turn (repeated when there are fewer candidates; each repeat draws its
        own new components and batch order). A
        randomly initialised root holds no knowledge, so its child clones (trains) every
        component, and inserts :attr:`EvolverConfig.first_answer_blocks` transformer blocks
        if the root has none (a ViT without blocks reads only the class token): on a fresh server that is the cheapest child
        that can beat chance. Hyperparameters are the candidate's, unmutated.

        With :attr:`EvolverConfig.first_answer_epochs` > 0 and ``num_train`` (the task's
        training examples) given, the first child of a random root trains on one long
        schedule (:attr:`ChildSpec.cycles`, sized from ``num_train``) and is the
        generation's only child of that root; with 2 or more children it is always among
        them (the served paths fill the other places, deepest first), however many paths
        are served, so every new task also trains like plain training from its first phase.
        With :attr:`EvolverConfig.long_validation_ratio` R > 0 and R x ``num_validation``
        more than the budget's cycle, the schedule is split evenly into
        ``ceil(schedule examples / (R x num_validation))`` cycles (at least
        :attr:`EvolverConfig.first_answer_cycles`; :attr:`ChildSpec.cycle_samples`), so the
        schedule's examples stay the same (up to rounding) and the child validates less often.
        """
        cfg = self.config
        root = [p for p in others if p.id == ROOT_PATH_ID]
        trained = sorted((p for p in others if p.id != ROOT_PATH_ID),
                         key=lambda p: (-p.architecture.num_blocks, -(p.score or 0.0)))
        long_cycles = cycle_samples = None
        if cfg.first_answer_epochs > 0 and num_train:
            samples = min(cfg.first_answer_epochs * num_train, cfg.first_answer_max_samples)
            per_cycle = cfg.budget.samples_per_cycle(num_train)
            long_cycles = max(cfg.first_answer_cycles, math.ceil(samples / per_cycle))
            sparse = math.ceil(cfg.long_validation_ratio * num_validation)
            if sparse > per_cycle:  # fewer, longer cycles splitting the same schedule evenly
                cycles = max(cfg.first_answer_cycles, math.ceil(samples / sparse))
                even = math.ceil(samples / cycles)
                if even > per_cycle:
                    long_cycles, cycle_samples = cycles, even
        random_roots = [p for p in root if not p.metrics.get("pretrained", False)]
        if long_cycles is not None and random_roots and cfg.children >= 2:
            # the random root's long child always runs beside the reuse children: it trains
            # as plain training does, so a task that transfers poorly from the served paths is
            # not left on a frozen path until its next phase (measured: the main job's third task)
            candidates = trained[: cfg.children - 1] + random_roots
        else:
            candidates = (trained + root)[: cfg.children]
        specs = []
        for i in range(self.config.children):  # not fewer on more devices: the same children anywhere
            parent = candidates[i % len(candidates)]
            kinds = list(parent.architecture.kinds)
            sources: list[str | None] = list(parent.component_ids[:-1]) + [None]
            random_root = parent.id == ROOT_PATH_ID and not parent.metrics.get("pretrained", False)
            if random_root and long_cycles is not None and any(s.cycles is not None for s in specs):
                continue  # one long child of a random root; its repeats would only split the machine
            trainable = [random_root] * (len(kinds) - 1) + [True]
            applied = ["clone_all" if random_root else "reuse_frozen", "new_head"]
            if random_root and parent.architecture.num_blocks == 0 and self.config.allow_insertion:
                for _ in range(cfg.first_answer_blocks):
                    kinds.insert(len(kinds) - 1, C.TRANSFORMER_BLOCK)
                    sources.insert(len(sources) - 1, None)
                    trainable.insert(len(trainable) - 1, True)
                    applied.append(f"insert_block:{len(kinds) - 2}")
            arch = P.Architecture(parent.architecture.config, tuple(kinds), task.num_classes)
            cycles = long_cycles if random_root else None
            if cycles is not None:
                applied.append(f"long_schedule:{cycles}" + (f"x{cycle_samples}" if cycle_samples else ""))
            specs.append(ChildSpec(parent=parent, task=task.name, architecture=arch, sources=tuple(sources),
                                   trainable=tuple(trainable), hparams=dict(parent.hparams),
                                   mutations=tuple(applied), cycles=cycles,
                                   cycle_samples=cycle_samples if cycles is not None else None))
        return specs

    def active_phase(self, task_name: str) -> P.Path:
        """One task iteration of Algorithm 1 for ``task_name``; returns the task's best path.

        A task that was never served starts with the first-answer generation
        (:meth:`first_answer_specs`), whose children are published as they complete. After
        each later generation the best path is published if
        it improves on the served one (:attr:`EvolverConfig.publish_on_improvement`); with
        :attr:`EvolverConfig.preempt` a waiting new task ends the phase early.
        """
        cfg = self.config
        # one snapshot: a rollback after it refuses this phase's publishes (Store.publish's
        # since_version), one before it is in the task and served path the phase starts from
        with self.store.read_transaction():
            self._phase_since = self.store.system_version()
            task = self.store.get_task(task_name)
            best_stored = self.store.best_path(task.name)
        self.store.set_task_state(task.name, "training" if best_stored is None else "serving")
        train = D.read_split(task.dataset_dir, task.splits["train"])
        validation = D.read_split(task.dataset_dir, task.splits["validation"])
        chance = float(np.bincount(validation[1]).max() / len(validation[1])) if len(validation[1]) else 1.0
        rng = np.random.default_rng([cfg.seed, task.seq, task.iterations_done])
        population: list[P.Path] = [best_stored] if best_stored is not None else []
        retained = self.store.list_paths()
        others = [p for p in retained if p.task != task.name and self._allowed(task, p)]
        selections = dict(self.store.selections(task.name))
        locked = locked_components(retained, task.name)
        always_clone = frozenset(c for p in retained if p.id == ROOT_PATH_ID and not p.metrics.get("pretrained", False)
                                 for c in p.component_ids) if cfg.clone_random_root else frozenset()
        sharers = collections.Counter(c for p in retained if p.task not in (None, task.name)
                                      for c in set(p.component_ids))
        pending: dict[str, _Pending] = {}
        published = best_stored
        test_split: list[tuple[np.ndarray, np.ndarray]] = []  # read at the first publish
        child_index = 0
        started = time.time()
        preempted_by: TaskRecord | None = None

        # a long-schedule child (ChildSpec.cycles) is reported at each improving checkpoint,
        # then at its end (its last checkpoint's path id again, its examples counted to the
        # end): per such spec, the examples already counted and its checkpoint in the population
        long_state: list[tuple[ChildSpec, int, P.Path | None]] = []
        resumed = self._suspended.pop(task.name, None)
        for name, parked in list(self._suspended.items()):
            try:
                live: TaskRecord | None = self.store.get_task(name)
            except TaskNotFound:
                live = None
            if live is None or live.seq != parked.seq or live.state == "failed" or live.pinned:
                # a deleted, replaced or failed task's parked child is dropped, and a pinned one's
                # (the user rolled the task back from the lineage it continues)
                del self._suspended[name]
        if resumed is not None and (resumed.seq != task.seq or best_stored is None):
            resumed = None  # a deleted and re-uploaded task is a new one
        elif resumed is not None and task.rolled_back_version is not None and task.rolled_back_version > resumed.since:
            # a user rolled the task back (and woke it) after the child began: it continues the
            # lineage the user left
            log.info("task %s: its parked long child is dropped (the task was rolled back since)", task.name)
            resumed = None
        if resumed is not None:  # its last checkpoint is in the population if it is the served path
            long_state.append((resumed.spec, resumed.samples,
                               best_stored if best_stored is not None and resumed.last is not None
                               and best_stored.id == resumed.last[1].id else None))
        first = 0 if (best_stored is None and cfg.first_answer) or resumed is not None else 1

        def accept(result: tuple[ChildSpec, P.Path, list]) -> None:
            spec, child, new = result
            samples = int(child.metrics.get("samples_trained", 0))
            k = next((i for i, (sp, _, _) in enumerate(long_state) if sp is spec), None)
            if spec.cycles is not None and k is None:
                long_state.append((spec, 0, None))
                k = len(long_state) - 1
            self.store.add_samples_trained(task.name, samples - (long_state[k][1] if k is not None else 0),
                                           seq=task.seq)
            old = long_state[k][2] if k is not None else None
            if (old is None and resumed is not None and spec is resumed.spec and resumed.last is not None
                    and child.id == resumed.last[1].id):
                # the end of a resumed child that never beat its checkpoint from before it was
                # parked: that checkpoint was not retained by the last phase (another path won);
                # it does not come back (Algorithm 1 keeps only retained models)
                long_state[k] = (spec, samples, None)  # type: ignore[index]
                return
            parent_score = spec.parent.score if spec.parent.task == task.name and spec.parent.score is not None \
                else -math.inf
            # early pruning (Section 3.3); a tie is kept (Algorithm 1's >=)
            if child.score is None or child.score < parent_score:
                if k is not None:
                    long_state[k] = (spec, samples, old)
                return
            if old is not None and old.id == child.id:
                # the child's end: its best checkpoint is in the population already; its
                # in-memory metrics count the cycles after that checkpoint too (a record
                # already published keeps its checkpoint-time metrics in the store)
                merged = {**old.metrics, "samples_trained": child.metrics["samples_trained"],
                          "history": child.metrics["history"]}
                population[:] = [dataclasses.replace(p, metrics=merged) if p.id == old.id else p for p in population]
                long_state[k] = (spec, samples, old)  # type: ignore[index]
                return
            if k is not None:
                long_state[k] = (spec, samples, child)
            if old is not None:  # superseded by a later checkpoint of the same child
                population[:] = [p for p in population if p.id != old.id]
                for cid in set(old.component_ids) - set(child.component_ids):
                    pending.pop(cid, None)  # a published one is in the store (read back if needed)
            population.append(child)
            for rec, p, o in new:
                pending[rec.id] = _Pending(rec, p, o)

        def publish_if_better(strict: bool = False) -> None:
            nonlocal published
            best = best_of(population)
            better = (lambda a, b: a > b) if strict else (lambda a, b: a >= b)
            if (cfg.publish_on_improvement and best is not None
                    and (published is None or (best.id != published.id and better(_score(best), _score(published))))
                    and best.metrics["validation_accuracy"] > chance):
                published = self._publish(task, best, published, pending, selections, test_split,
                                          keep_replaced=any(p.id == published.id for p in population)
                                          if published is not None else False)
                # the population holds the published record (with its test accuracy): the same
                # path is not published again by a later generation that finds nothing better
                population[:] = [published if p.id == published.id else p for p in population]

        last_publish = [-math.inf]

        def accept_and_publish(result: tuple[ChildSpec, P.Path, list] | None) -> None:
            # the first answer at once, then at most one publish per checkpoint_publish_seconds
            # (a long-schedule child improves nearly every cycle); None is a long child's cycle
            # without a new checkpoint, when a held-back improvement is published; the
            # generation's end publishes what is left
            if result is not None:
                accept(result)
            long_report = result is None or result[0].cycles is not None
            if (published is None or not long_report
                    or time.monotonic() - last_publish[0] >= cfg.checkpoint_publish_seconds):
                before = published
                publish_if_better()
                if published is not before:
                    last_publish[0] = time.monotonic()

        stale_generations = 0  # later generations in a row that did not beat the population's best
        for gen in range(first, cfg.generations + 1):
            before_gen = _score(best_of(population)) if population else -math.inf
            if gen == 0 and resumed is not None:  # a preempted long child goes on where it stopped
                specs = [resumed.spec]
                budget = dataclasses.replace(cfg.budget, cycles=cfg.first_answer_cycles)
            elif gen == 0:
                specs = self.first_answer_specs(task, others, num_train=len(train[0]),
                                                num_validation=len(validation[0]))
                budget = dataclasses.replace(cfg.budget, cycles=cfg.first_answer_cycles)
            else:
                specs = []
                lineage = best_of(population) if best_stored is not None else None
                count = (cfg.later_children or cfg.children) if best_stored is not None else cfg.children
                for j in range(count * cfg.halving):
                    is_lineage = lineage is not None and j < cfg.lineage_children
                    if is_lineage:
                        parent = lineage  # continues the served lineage (EvolverConfig.lineage_children)
                    else:
                        parent, _rule = sample_parent(population, others, selections, rng)
                    selections[parent.id] = selections.get(parent.id, 0) + 1
                    spec = mutate(parent, task.name, task.num_classes, rng, locked=locked,
                                  allow_insertion=cfg.allow_insertion, max_blocks=cfg.max_blocks,
                                  always_clone=always_clone, per_mutation=cfg.per_mutation_probabilities)
                    if is_lineage and cfg.lineage_lr_steps:
                        spec = lower_learning_rate(spec, cfg.lineage_lr_steps)
                    specs.append(spec)
                budget = cfg.budget
                if cfg.grow_when_stale and task.stale_iterations:
                    budget = dataclasses.replace(budget, cycles=budget.cycles * 2 ** min(task.stale_iterations, 3))
            phase = "first answer" if gen == 0 else "evolving"
            self._status("training", task, phase=phase, iteration=task.iterations_done + 1, generation=gen,
                         generations=cfg.generations, children_running=len(specs), started=started,
                         cycles=max([s.cycles or budget.cycles for s in specs], default=budget.cycles))
            label = "first answer" if gen == 0 else f"gen {gen}/{cfg.generations}"
            bar = tqdm(total=len(specs), desc=f"{task.name} it{task.iterations_done + 1} {label}",
                       disable=not self.progress, leave=False)
            waiting = self._new_task_waiting(task) if cfg.preempt else None
            # a served task yields to a new one; published is read at each check, so a first-answer
            # generation that has published a child yields too; a deleted (or replaced) or rolled
            # back task stops
            interrupt = ((lambda: waiting() and (published is not None or waiting.gone))
                         if waiting is not None else None)
            # the first-answer generation publishes each child as it completes (a new task is
            # served as soon as one child beats chance); later generations at their end
            on_done = accept_and_publish if gen == 0 else None
            children, skipped = self._train_generation(specs, task, pending, train, validation, rng, budget, bar,
                                                       sharers, interrupt, halving=cfg.halving if gen > 0 else 1,
                                                       on_done=on_done, resume=resumed if gen == 0 else None)
            for spec in skipped:  # never trained: its parent was not used (Section 3.1's #selections)
                if gen > 0:
                    selections[spec.parent.id] -= 1
            child_index += len(specs)
            if on_done is None:
                for result in children:
                    accept(result)
            else:  # this generation's children in job order, whatever order they completed in
                ids = {child.id for _, child, _ in children}
                kept = {p.id: p for p in population if p.id in ids}
                population[:] = ([p for p in population if p.id not in ids]
                                 + [kept[child.id] for _, child, _ in children if child.id in kept])
            best = best_of(population)
            best_now = best.score if best is not None and best.score is not None else float("nan")
            bar.set_postfix(best=f"{best_now:.4f}")
            bar.close()
            if self.progress:
                tqdm.write(f"[{task.name}] iteration {task.iterations_done + 1} {label}: "
                           f"best score {best_now:.4f}, population {len(population)}")
            # the first-answer generation published its children as they completed (latest of
            # equal scores in completion order): at its end only a strictly better path is
            # published, so job order cannot publish an equal-score path again
            if waiting is not None and waiting.gone:
                break  # deleted, replaced or pinned meanwhile: the phase's end refuses it (run() ends it)
            publish_if_better(strict=on_done is not None)
            if gen > 0 and cfg.generation_patience:
                stale_generations = 0 if best is not None and _score(best) > before_gen else stale_generations + 1
                if stale_generations >= cfg.generation_patience and gen < cfg.generations:
                    log.info("task %s: ending its active phase after %s: %d generation(s) in a row without a "
                             "better score", task.name, label, stale_generations)
                    self.stats["phases_ended_stale"] += 1
                    break
            if cfg.preempt and published is not None and gen < cfg.generations:
                preempted_by = self._waiting_new_task(task) or self._parked_task(task)
                if preempted_by is not None:
                    log.info("task %s: ending its active phase after %s for task %s (new, or its long first "
                             "child parked)", task.name, label, preempted_by.name)
                    break
        self.stats["phases"] += 1
        if preempted_by is not None:
            self.stats["preempted"] += 1
        return self._finish_phase(task, population, published, best_stored, pending, selections, test_split,
                                  completed=preempted_by is None)

    def _train_generation(self, specs: Sequence[ChildSpec], task: TaskRecord, pending: Mapping[str, _Pending],
                          train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                          rng: np.random.Generator, budget: TrainBudget, bar: Any,
                          sharers: Mapping[str, int],
                          interrupt: Callable[[], bool] | None = None, halving: int = 1,
                          on_done: Callable[[tuple[ChildSpec, P.Path, list] | None], Any] | None = None,
                          resume: _Suspended | None = None
                          ) -> tuple[list[tuple[ChildSpec, P.Path, list]], list[ChildSpec]]:
        """Trains a generation's children, one per device at a time; returns the trained
        ones as (spec, child path, new components) and the specs of children skipped
        because ``interrupt`` said a new task is waiting. ``halving`` > 1 trains them by
        successive halving (:attr:`EvolverConfig.halving`). ``on_done`` is called in this
        thread with each trained child as it completes (not with halving), and, for a
        child with its own :attr:`ChildSpec.cycles` (a long schedule), also with each
        checkpoint that strictly improved its best score, as it trains (the same child's
        later reports supersede it; its final report repeats its last checkpoint's path
        id), and with None after each of its cycles that did not. A long child stopped by
        ``interrupt`` is parked in :attr:`_suspended` for the task's next phase, which
        passes it back as ``resume`` (its spec is then in ``specs``). If ``on_done``
        raises, running children stop after their current cycle and the error propagates."""
        jobs = []
        for i, spec in enumerate(specs):
            if resume is not None and spec is resume.spec:
                jobs.append((spec, resume.params, resume.opts, resume.recs, resume.seed,
                             self.devices[i % len(self.devices)], resume.scored))
                continue
            params, opts, recs = self._materialize(spec, task, pending, rng)
            seed = int(rng.integers(2 ** 31))
            # size penalty (official code): a frozen component shared with k other tasks counts 1/(k+1)
            scored = accounted_params([C.num_params(p) for p in params],
                                      [0 if t else sharers.get(src or "", 0)
                                       for t, src in zip(spec.trainable, spec.sources)])
            jobs.append((spec, params, opts, recs, seed, self.devices[i % len(self.devices)], scored))
        if halving > 1:
            return self._train_halving(jobs, task, train, validation, budget, bar, interrupt, halving)
        if self.ray is not None and on_done is None:
            return self._train_on_ray(jobs, task, train, validation, budget, bar, interrupt)
        # with Ray, a first-answer generation's short children train on the cluster, reported
        # here as they complete; its long child stays on this host's devices (ray_pool's docstring)
        on_cluster = [i for i, j in enumerate(jobs) if j[0].cycles is None] if self.ray is not None else []

        done: list[tuple[ChildSpec, P.Path, list] | None] = [None] * len(jobs)
        # completed job indices, checkpoints of long-schedule children (or None for a cycle
        # without one), and -1 per device at its end
        finished: queue.Queue[int | tuple[ChildSpec, P.Path, list] | None] = queue.Queue()
        failed = threading.Event()  # the main thread or a worker raised: every child stops

        def stop() -> bool:
            return failed.is_set() or (interrupt is not None and interrupt())

        def run(job: tuple) -> tuple[ChildSpec, P.Path, list] | None:
            spec, params, opts, recs, seed, device, scored = job
            if failed.is_set():
                return None  # the phase is raising: children not yet started never start
            if interrupt is not None and interrupt():
                if resume is not None and spec is resume.spec:
                    self._suspended[task.name] = resume  # still waiting for its turn
                elif spec.cycles is not None and on_done is not None:  # a long child waits for the next phase
                    self._suspended[task.name] = _Suspended(task.seq, spec, None, params, opts, recs, seed, scored,
                                                            None, 0, self._phase_since)
                bar.update(1)
                return None  # a new task is waiting: children not yet started are skipped
            if spec.cycles is not None and on_done is not None:
                if data_parallel:
                    device = self.devices  # its batches split between every device, its siblings done
                out = self._train_long(spec, task, params, opts, recs, seed, device, scored, train, validation,
                                       spec.budget(budget), interrupt, finished.put,
                                       failed.is_set,
                                       resume if resume is not None and spec is resume.spec else None)
            else:
                child_budget = spec.budget(budget)
                if lone_parallel:
                    device = self.devices  # the generation's only child: its batches split between every device
                result = train_child(spec.architecture, params, opts, spec.trainable, spec.hparams, train, validation,
                                     child_budget, self.scorer, seed, device, scored_params=scored,
                                     interrupt=stop)
                out = self._child_path(spec, task, params, recs, result, budget.batch_size)
            bar.update(1)
            return out

        # a long child trains data-parallel over every device (EvolverConfig.long_data_parallel)
        # only once its siblings are done: a collective of its step waits for every device,
        # and on a CPU host one device's thread blocked there while another device's is busy
        # with a sibling stalls XLA's shared thread pool (measured: the rendezvous aborted);
        # the test-split evaluation of a publish of its checkpoints (seconds, on one device)
        # still runs beside it and only delays its steps
        n = len(self.devices)
        data_parallel = (on_done is not None and self.config.long_data_parallel and can_split(n, budget.batch_size)
                         and any(j[0].cycles is not None for j in jobs))

        def cluster_children() -> None:  # the short children on the Ray cluster, in a thread of its own
            assert self.ray is not None

            def reported(k: int, result: Any) -> None:
                i = on_cluster[k]
                spec, params, _opts, recs, *_ = jobs[i]
                if result is not None:
                    done[i] = self._child_path(spec, task, params, recs, result, budget.batch_size)
                bar.update(1)
                finished.put(i)

            try:
                self.ray.train([jobs[i] for i in on_cluster], (task.name, task.seq, self.stats["phases"]), train,
                               validation, budget, self._scorer_spec, stop, on_done=reported)
            except BaseException:
                failed.set()  # the long child on this host stops after its current cycle
                raise  # (re-raised by its future's result() below)
            finally:
                finished.put(-1)
        lone_parallel = (on_done is None and len(jobs) == 1 and self.config.long_data_parallel
                         and can_split(n, budget.batch_size))
        queue_done = [threading.Event() for _ in range(n)]

        def device_queue(d: int, indices: list[int]) -> None:
            try:
                for i in indices:  # one child at a time per device
                    if data_parallel and jobs[i][0].cycles is not None:
                        for e in queue_done[:d] + queue_done[d + 1:]:
                            e.wait()
                    done[i] = run(jobs[i])
                    finished.put(i)
            except BaseException:
                failed.set()  # the other devices' children stop after their current cycle
                raise
            finally:
                queue_done[d].set()
                finished.put(-1)  # this device's queue is done (or raised)

        # one queue per device, the jobs not on the cluster dealt round-robin; a data-parallel
        # long child last on the first device, after every sibling
        local = [i for i in range(len(jobs)) if i not in on_cluster]
        queues = [local[d::n] for d in range(n)]
        for d, q in enumerate(queues):  # (without Ray: job i on device i % n, as placed above)
            for i in q:
                jobs[i] = (*jobs[i][:5], self.devices[d], *jobs[i][6:])
        if data_parallel:
            long_jobs = [i for i, j in enumerate(jobs) if j[0].cycles is not None]
            queues = [[i for i in q if i not in long_jobs] for q in queues]
            queues[0] += long_jobs
        if on_done is None:
            self._each_device(device_queue, queues)
        else:  # each child is reported in this thread as it completes
            with concurrent.futures.ThreadPoolExecutor(len(self.devices) + 1) as pool:
                futures = [pool.submit(device_queue, d, q) for d, q in enumerate(queues)]
                if on_cluster:
                    futures.append(pool.submit(cluster_children))
                running = len(futures)
                try:
                    while running:
                        i = finished.get()
                        if i is None or isinstance(i, tuple):
                            on_done(i)  # a long-schedule child's improving checkpoint, or a cycle without one
                        elif i < 0:
                            running -= 1
                        elif done[i] is not None:
                            on_done(done[i])  # type: ignore[arg-type]
                except BaseException:
                    failed.set()  # the workers stop after their current cycle; the pool waits for them
                    raise
                for f in futures:
                    f.result()  # re-raises a worker's error, or one of a child on the cluster
        results = [r for r in done if r is not None]
        skipped = [j[0] for j, r in zip(jobs, done) if r is None]
        self.stats["children"] += len(results)
        return results, skipped

    def _train_long(self, spec: ChildSpec, task: TaskRecord, params: Sequence[Any], opts: Sequence[Any],
                    recs: Sequence[ComponentRecord | None], seed: int, device: Devices, scored: float,
                    train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                    budget: TrainBudget, interrupt: Callable[[], bool] | None,
                    report: Callable[[tuple[ChildSpec, P.Path, list] | None], Any],
                    failed: Callable[[], bool], resume: _Suspended | None = None
                    ) -> tuple[ChildSpec, P.Path, list] | None:
        """Trains a long-schedule child (:attr:`EvolverConfig.first_answer_epochs`) cycle by
        cycle on one schedule of ``budget.cycles`` cycles, calling ``report`` with a child
        path of each checkpoint that strictly improves its best score (an equal score is
        not worth a publish; the path keeps the reported checkpoint), and with None after
        every other cycle.

        Stops after a cycle when ``failed`` says the caller raised, or when ``interrupt``
        says a new task waits: then the child is parked on the host in
        :attr:`_suspended` and the task's next phase resumes it (``resume``) on the same
        schedule. Returns the last reported path (same id), its examples and validation
        history counted to the end (None if ``failed`` stopped it before its first cycle)."""
        if resume is not None and resume.child is not None:
            child, last = resume.child, resume.last
            child.place(device)
        else:
            child = ChildTraining(spec.architecture, params, opts, spec.trainable, spec.hparams, train, validation,
                                  budget, self.scorer, seed, device, scored_params=scored)
            last = None
        reported = last[1].score if last is not None and last[1].score is not None else -math.inf
        parked = False
        stale = resume.stale if resume is not None else 0
        patience = self.config.long_patience
        try:
            while child.cycles_done < budget.cycles and not failed():
                if patience and last is not None and stale >= patience:  # before parking: it is done
                    log.info("task %s: its long child stops early after %d/%d cycles (%d validations without a "
                             "better score)", task.name, child.cycles_done, budget.cycles, stale)
                    self.stats["long_stopped_early"] += 1
                    break
                if last is not None and interrupt is not None and interrupt():
                    child.park()
                    parked = True
                    break
                child.run(1)
                if child.score > reported:
                    reported, stale = child.score, 0
                    last = self._child_path(spec, task, params, recs, child.result(), budget.batch_size,
                                            record_speed=False)
                    report(last)
                else:
                    stale += 1
                    report(None)
        finally:
            if not parked:
                child.release()
        if last is None:  # stopped by ``failed`` before its first cycle: the phase is raising
            return None
        result = child.result()
        _, path, new = last
        metrics = {**path.metrics, "samples_trained": result.samples, "history": list(result.history)}
        if parked:
            self._suspended[task.name] = _Suspended(task.seq, spec, child, params, opts, recs, seed, scored, last,
                                                    result.samples,
                                                    resume.since if resume is not None else self._phase_since,
                                                    stale)
        else:
            self.stats["images_per_second"].append(result.images_per_second)
        return spec, dataclasses.replace(path, metrics=metrics), new

    def _train_halving(self, jobs: Sequence[tuple], task: TaskRecord, train: tuple[np.ndarray, np.ndarray],
                       validation: tuple[np.ndarray, np.ndarray], budget: TrainBudget, bar: Any,
                       interrupt: Callable[[], bool] | None, eta: int
                       ) -> tuple[list[tuple[ChildSpec, P.Path, list]], list[ChildSpec]]:
        """Successive halving of one generation's children (:attr:`EvolverConfig.halving`).

        Returns what :meth:`_train_generation` returns; a child stopped at a rung is a trained
        child (with its best checkpoint), a child never started is skipped."""
        rungs = halving_rungs(budget.cycles, eta)
        floor = min(len(self.devices), len(jobs))  # at least one child per device trains on
        children: list[ChildTraining | None] = [None] * len(jobs)
        alive = list(range(len(jobs)))

        def run(i: int, milestone: int, device: jax.Device) -> None:
            spec, params, opts, _recs, seed, _device, scored = jobs[i]
            child = children[i]
            if child is None:
                if interrupt is not None and interrupt():
                    return  # a new task is waiting: children not yet started are skipped
                child = children[i] = ChildTraining(spec.architecture, params, opts, spec.trainable, spec.hparams,
                                                    train, validation, budget, self.scorer, seed, device,
                                                    scored_params=scored)
            else:
                child.place(device)
            child.run(milestone - child.cycles_done, interrupt=interrupt)
            child.park()  # between rungs a child holds no device memory

        for r, milestone in enumerate(rungs):
            if r > 0:
                if interrupt is not None and interrupt():
                    break
                # the best 1/eta by best score so far train on (a tie keeps the earlier child)
                ranked = sorted(alive, key=lambda i: -children[i].score)  # type: ignore[union-attr]
                for i in ranked[max(floor, math.ceil(len(alive) / eta)):]:
                    children[i].release()  # type: ignore[union-attr]
                    bar.update(1)
                alive = sorted(ranked[:max(floor, math.ceil(len(alive) / eta))])
            # each rung spreads its children over the devices, one queue per device
            queues = [[i for k, i in enumerate(alive) if k % len(self.devices) == d] for d in range(len(self.devices))]
            self._each_device(lambda d, queue: [run(i, milestone, self.devices[d]) for i in queue], queues)
            alive = [i for i in alive if children[i] is not None]
        results, skipped = [], []
        for i, job in enumerate(jobs):
            child = children[i]
            if i in alive or child is None:
                bar.update(1)
            if child is None:
                skipped.append(job[0])
                continue
            results.append(self._child_path(job[0], task, job[1], job[3], child.result(), budget.batch_size))
            child.release()
        self.stats["children"] += len(results)
        return results, skipped

    def _train_on_ray(self, jobs: Sequence[tuple], task: TaskRecord, train: tuple[np.ndarray, np.ndarray],
                      validation: tuple[np.ndarray, np.ndarray], budget: TrainBudget, bar: Any,
                      interrupt: Callable[[], bool] | None) -> tuple[list[tuple[ChildSpec, P.Path, list]],
                                                                      list[ChildSpec]]:
        """:meth:`_train_generation` on the Ray cluster (:mod:`mu2net.evolver.ray_pool`): every
        child a Ray task; one that failed after its retries, or was cancelled for a waiting
        new task, is returned as skipped."""
        assert self.ray is not None
        # the phase's data and parents go to the object store once per active phase
        results = self.ray.train(jobs, (task.name, task.seq, self.stats["phases"]), train, validation, budget,
                                 self._scorer_spec, interrupt, on_done=lambda i, _result: bar.update(1))
        done, skipped = [], []
        for (spec, params, _opts, recs, *_), result in zip(jobs, results):
            if result is None:
                skipped.append(spec)
            else:
                done.append(self._child_path(spec, task, params, recs, result, budget.batch_size))
        self.stats["children"] += len(done)
        return done, skipped

    def _each_device(self, work: Callable[[int, Any], Any], queues: Sequence[Any]) -> None:
        """Runs ``work(d, queues[d])`` for every device d, in parallel when there are several."""
        if len(self.devices) == 1:
            work(0, queues[0])
            return
        with concurrent.futures.ThreadPoolExecutor(len(self.devices)) as pool:
            for f in [pool.submit(work, d, q) for d, q in enumerate(queues)]:
                f.result()

    def _child_path(self, spec: ChildSpec, task: TaskRecord, params: Sequence[Any],
                    recs: Sequence[ComponentRecord | None], result: TrainResult,
                    batch_size: int, record_speed: bool = True) -> tuple[ChildSpec, P.Path, list]:
        ids, new = [], []
        for i, kind in enumerate(spec.architecture.kinds):
            if not spec.trainable[i]:
                ids.append(spec.sources[i])
                continue
            p, o = result.params[i], result.opt_state[i]
            src = recs[i]
            steps = dict(src.steps) if src is not None else {}
            steps[task.name] = steps.get(task.name, 0) + result.steps
            acl = task.acl_group if task.private else (src.acl_group if src is not None else None)
            rec = ComponentRecord(id=_digest(p), kind=kind, params_digest="", opt_digest="",
                                  parent_id=spec.sources[i], task=task.name, acl_group=acl, steps=steps,
                                  num_params=C.num_params(p),
                                  num_classes=spec.architecture.num_classes if kind == C.HEAD else 0)
            ids.append(rec.id)
            new.append((rec, p, o))
        activated = sum(C.num_params(p) for p in params)
        if record_speed:
            self.stats["images_per_second"].append(result.images_per_second)
        path = P.Path(id=new_id(), task=task.name, component_ids=tuple(ids), architecture=spec.architecture,
                      hparams=dict(spec.hparams), score=result.score, parent_id=spec.parent.id,
                      metrics={"validation_accuracy": result.validation_accuracy, "train_steps": result.steps,
                               "history": list(result.history), "mutations": list(spec.mutations),
                               "parent_task": spec.parent.task, "activated_params": activated,
                               # examples this child trained (all cycles), and those behind its best
                               # checkpoint over its whole lineage on the task (its head's provenance)
                               "samples_trained": result.samples,
                               "lineage_samples": new[-1][0].steps.get(task.name, 0) * batch_size})
        return spec, path, new

    def _publish(self, task: TaskRecord, best: P.Path, published: P.Path | None, pending: dict[str, _Pending],
                 selections: Mapping[str, int], test_split: list[tuple[np.ndarray, np.ndarray]],
                 iteration_done: bool = False, keep_replaced: bool = True) -> P.Path:
        """Publishes ``best`` as the task's served path (one store transaction); returns it
        with its test accuracy and trainable parameters in ``metrics``.

        The publish garbage-collects the components that only the replaced path used
        (its task's own, or another task's that no retained path uses any more); with
        ``keep_replaced`` they are read into ``pending`` first, so the active population
        can still use that path as a parent (False: it has left the population, e.g. a
        superseded checkpoint of a long-schedule child).
        """
        if published is not None and keep_replaced:
            retained = {c for p in self.store.list_paths() if p.task != task.name for c in p.component_ids}
            for cid in set(published.component_ids) - set(best.component_ids) - retained - set(pending):
                pending[cid] = _Pending(*self._component(cid, pending))
        records = []
        for cid in best.component_ids:
            if cid in pending:
                pend = pending[cid]
                pd, od = self.store.write_component_files(pend.params, pend.opt_state)
                if pd != cid:
                    raise StoreError(f"component {cid} changed while pending (digest {pd})")
                records.append(dataclasses.replace(pend.record, params_digest=pd, opt_digest=od))
        params = [pending[c].params if c in pending else None for c in best.component_ids]
        missing = [i for i, p in enumerate(params) if p is None]
        if missing:
            loaded = self.store.load_params([best.component_ids[i] for i in missing])
            for i, p in zip(missing, loaded):
                params[i] = p
        if not test_split:
            test_split.append(D.read_split(task.dataset_dir, task.splits["test"]))
        test_acc = P.accuracy(best.architecture, params, *test_split[0])
        comps = {r.id: r for r in records}
        comps.update({c.id: c for c in self.store.get_components([c for c in best.component_ids if c not in comps])})
        trainable = sum(comps[c].num_params for c in best.component_ids if comps[c].task == task.name)
        metrics = {**best.metrics, "test_accuracy": test_acc, "trainable_params": trainable}
        best = dataclasses.replace(best, metrics=metrics)
        version = self.store.publish(best, records, task=task.name, iteration_done=iteration_done,
                                     selections=selections, task_seq=task.seq, since_version=self._phase_since)
        if self.progress:
            tqdm.write(f"[{task.name}] published path {best.id[:8]} as system version {version}: "
                       f"validation {best.metrics['validation_accuracy']:.4f}, test {test_acc:.4f}")
        return best

    def _finish_phase(self, task: TaskRecord, population: Sequence[P.Path], published: P.Path | None,
                      best_stored: P.Path | None, pending: dict[str, _Pending], selections: Mapping[str, int],
                      test_split: list[tuple[np.ndarray, np.ndarray]], completed: bool) -> P.Path:
        """End of the active phase: keeps only the task's best path (published if it is not
        yet), records the iteration and the task's continual-evolution state."""
        best = best_of(population)
        assert best is not None  # every generation adds children or the phase began with a path
        if published is not None and (best.id == published.id or _score(best) < _score(published)):
            self.store.publish(None, [], task=task.name, iteration_done=completed, selections=selections,
                               task_seq=task.seq, since_version=self._phase_since)
            final = published
        else:
            final = self._publish(task, best, published, pending, selections, test_split, iteration_done=completed)
        if completed:
            # a tie (a new path of equal score, published as Algorithm 1's latest) is not an
            # improvement: only a higher score keeps the task awake
            if best_stored is not None and _score(final) <= _score(best_stored):
                t = self.store.count_stale_iteration(task.name, self.config.patience)
                if t.stale_iterations == self.config.patience:  # paused by this iteration
                    log.info("task %s: no improvement in %d task iterations; paused until a related task "
                             "publishes or a user asks", task.name, t.stale_iterations)
        return final


def lower_learning_rate(spec: ChildSpec, steps: int) -> ChildSpec:
    """``spec`` with its learning rate ``steps`` values down Table 1's sorted list (clipped at
    the lowest; :attr:`EvolverConfig.lineage_lr_steps`), recorded among its mutations."""
    values = H.SEARCH_SPACE["learning_rate"]
    old = spec.hparams["learning_rate"]
    at = min(range(len(values)), key=lambda k: abs(values[k] - float(old)))  # a value off the list: its nearest
    new = values[max(0, at - steps)]
    if new == old:
        return spec
    return dataclasses.replace(spec, hparams={**spec.hparams, "learning_rate": new},
                               mutations=(*spec.mutations, f"lineage_lr:{old}->{new}"))


def halving_rungs(cycles: int, eta: int) -> list[int]:
    """Cycle counts at which successive halving ranks its children: ``cycles // eta**j``
    for j = 0, 1, ... (at least 1), ascending; e.g. 4 cycles, eta 2 -> [1, 2, 4]; 24, 2 ->
    [1, 3, 6, 12, 24] (Li et al. 2018, Hyperband's successive halving with the budget
    counted in train cycles).

    Raises:
      ValueError: for ``cycles`` < 1 or ``eta`` < 2.
    """
    if cycles < 1 or eta < 2:
        raise ValueError(f"successive halving needs cycles >= 1 and eta >= 2, got cycles={cycles}, eta={eta}")
    return sorted({max(1, cycles // eta ** j) for j in range(cycles.bit_length() + 1)})


def _score(path: P.Path) -> float:
    return path.score if path.score is not None else -math.inf


def best_of(population: Sequence[P.Path]) -> P.Path | None:
    """The best-scoring path; on a tie the latest (Algorithm 1 keeps a child whose score is
    ``>=`` the best; the official code's "most recent path achieving max score")."""
    best = None
    for p in population:
        if best is None or _score(p) >= _score(best):
            best = p
    return best
