"""Training and scoring of one child (paper Sections 3.3 and 3.5).

SGD with momentum (optionally Nesterov), cosine schedule with linear warm-up, no weight
decay, gradient clipping at global norm 1, Table 1 augmentations. Only the child's
trainable (cloned or new) components are updated: the frozen prefix below the lowest
trainable component runs outside the differentiated function (no gradient is computed
for it); frozen components above it keep their parameters bit for bit.

Train steps are jitted once per (architecture, lowest trainable position, Nesterov) and
cached, so a child with the same structure as an earlier child does not recompile; the
trainable mask above that position, learning rate, momentum, warm-up and augmentation
hyperparameters are traced arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mu2net import components as C
from mu2net import paths as P
from mu2net.evolver.augment import AUGMENT_HPARAMS, augment

TRACED_HPARAMS = ("learning_rate", "warmup_ratio", "momentum") + AUGMENT_HPARAMS


@dataclasses.dataclass(frozen=True)
class TrainBudget:
    """How much one child trains (Section 3.3: cycles of training then validation).

    Attributes:
      cycles: train/validation cycles per child.
      sample_cap: most training examples per cycle; a cycle is min(1 epoch, sample_cap).
      batch_size: examples per step.
      min_samples: fewest training examples per cycle (several epochs of a small training
        split): a cycle is ``min(sample_cap, max(1 epoch, min_samples))``. 0 (default) keeps
        the paper's min(1 epoch, sample_cap), under which a 40-image task trains one step
        per cycle while its validation and compilation cost the same.
    """

    cycles: int = 4
    sample_cap: int = 4096
    batch_size: int = 64
    min_samples: int = 0

    def samples_per_cycle(self, num_train: int) -> int:
        """Training examples per cycle for a training split of ``num_train`` examples."""
        return min(self.sample_cap, max(num_train, self.min_samples))

    def steps_per_cycle(self, num_train: int) -> int:
        return max(1, math.ceil(self.samples_per_cycle(num_train) / self.batch_size))


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Outcome of training a child.

    Attributes:
      params: best-checkpoint parameters of the trainable positions (numpy pytrees), keyed
        by position in the path.
      opt_state: momentum of the same positions at the best checkpoint.
      score: best score (Section 3.3).
      validation_accuracy: validation accuracy at the best checkpoint, in [0, 1].
      steps: training steps taken until the best checkpoint.
      history: validation accuracy after each cycle.
      images_per_second: training throughput (excluding validation).
      samples: training examples of every cycle run (also those after the best checkpoint).
    """

    params: Mapping[int, Any]
    opt_state: Mapping[int, Any]
    score: float
    validation_accuracy: float
    steps: int
    history: tuple[float, ...]
    images_per_second: float
    samples: int = 0


def cosine_with_warmup(step: jax.Array, total: jax.Array, peak: jax.Array,
                       warmup_ratio: jax.Array) -> jax.Array:
    """Learning rate at ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup_ratio * total`` steps to ``peak``, then cosine decay to 0 (Section 3.5)."""
    warm = jnp.maximum(1.0, warmup_ratio * total)
    s = step.astype(jnp.float32)
    progress = jnp.clip((s - warm) / jnp.maximum(1.0, total - warm), 0.0, 1.0)
    return jnp.where(s < warm, peak * (s + 1.0) / warm, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))


_STEP_CACHE: dict[tuple[P.Architecture, int, bool], Callable[..., Any]] = {}


def train_step_fn(arch: P.Architecture, first: int, nesterov: bool) -> Callable[..., Any]:
    """The cached, jitted train step of an architecture whose lowest trainable position is ``first``.

    Components ``0..first-1`` (the frozen prefix) run outside the differentiated function:
    no gradient is computed for them. Components ``first..`` are differentiated; which of
    them are trainable is a traced boolean mask, so children that differ only in which
    upper components they cloned share one compiled step. Gradients of frozen positions
    are zeroed before global-norm clipping, and their parameters and momentum are kept
    bit for bit (``jnp.where``), so the update equals one specialised to the mask.

    The returned function maps ``(suffix params, suffix momentum, prefix params, suffix
    mask, images [B,H,W,C] uint8, labels [B] int32, step, total_steps, hp, rng)`` to
    ``(suffix params, suffix momentum, loss)``; the first two are donated.

    Raises:
      ValueError: if ``first`` is not a position of ``arch``.
    """
    if not 0 <= first < len(arch.kinds):
        raise ValueError(f"first trainable position {first} outside 0..{len(arch.kinds) - 1}")
    key = (arch, first, nesterov)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    tx = lambda momentum: optax.chain(  # noqa: E731
        optax.clip_by_global_norm(1.0), optax.trace(decay=momentum, nesterov=nesterov))

    def keep_frozen(new: Sequence[Any], old: Sequence[Any], mask: Sequence[jax.Array]) -> list[Any]:
        return [jax.tree_util.tree_map(lambda a, b: jnp.where(m, a, b), n, o) for n, o, m in zip(new, old, mask)]

    def step_fn(suffix, momentum, prefix, mask, images, labels, step, total, hp, rng):
        P.TRACES.hit("train_step")
        x = P.preprocess(images, arch.config.image_size)
        x = augment(x, hp, rng)
        h = jax.lax.stop_gradient(P.forward_prefix(arch, prefix, x, first))

        def loss_fn(params):
            logits = P.forward(arch, params, h, start=first)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(suffix)
        grads = keep_frozen(grads, jax.tree_util.tree_map(jnp.zeros_like, grads), mask)
        opt = tx(hp["momentum"])
        updates, new_state = opt.update(grads, (optax.EmptyState(), optax.TraceState(trace=momentum)))
        lr = cosine_with_warmup(step, total, hp["learning_rate"], hp["warmup_ratio"])
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        new_params = keep_frozen(optax.apply_updates(suffix, updates), suffix, mask)
        new_momentum = keep_frozen(new_state[1].trace, momentum, mask)
        return new_params, new_momentum, loss

    fn = jax.jit(step_fn, donate_argnums=(0, 1))
    _STEP_CACHE[key] = fn
    return fn


def traced_hparams(hparams: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The hyperparameters passed to the train step as float32 scalars."""
    return {k: jnp.asarray(float(hparams[k]), jnp.float32) for k in TRACED_HPARAMS}


def zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), tree)


class ChildTraining:
    """A child being trained, resumable cycle by cycle (Section 3.3's train/validate cycles).

    :func:`train_child` runs all of a budget's cycles at once; the evolver's successive
    halving (:attr:`mu2net.evolver.EvolverConfig.halving`) runs a few cycles of many
    children, stops the worst, and resumes the rest with :meth:`run`. The learning-rate
    schedule spans the whole ``budget.cycles`` from the start, so a resumed child trains
    exactly as one that was never paused (same steps, batches and augmentation).

    Args: as :func:`train_child`.

    Raises:
      ValueError: if ``mask`` does not cover the architecture or its head is not trainable.
    """

    def __init__(self, arch: P.Architecture, params: Sequence[Any], opt_state: Sequence[Any | None],
                 mask: tuple[bool, ...], hparams: Mapping[str, Any],
                 train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                 budget: TrainBudget, scorer: Callable[[float, float], float], seed: int,
                 device: Devices = None, scored_params: float | None = None) -> None:
        if len(mask) != len(arch.kinds) or not mask[-1]:
            raise ValueError(f"trainable mask {mask} must cover {len(arch.kinds)} components with a trainable head")
        self._put, self._put_batch = placement(device, budget.batch_size)
        put = self._put
        self.arch, self.budget, self.scorer = arch, budget, scorer
        self.train, self.validation = train, validation
        self.first = first = mask.index(True)
        self.prefix = put(list(params[:first]))
        # own copies of the suffix: the step donates (and overwrites) them
        self.suffix = put(jax.tree_util.tree_map(jnp.array, list(params[first:])))
        self.momentum = put([jax.tree_util.tree_map(jnp.array, o) if (o is not None and m) else zeros_like_tree(p)
                             for o, p, m in zip(opt_state[first:], params[first:], mask[first:])])
        self.suffix_mask = put([jnp.asarray(m) for m in mask[first:]])
        self.step_fn = train_step_fn(arch, first, bool(hparams["nesterov"]))
        self.hp = put(traced_hparams(hparams))
        self.steps_per_cycle = budget.steps_per_cycle(len(train[0]))
        self.total = put(jnp.asarray(self.steps_per_cycle * budget.cycles, jnp.float32))
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.PRNGKey(seed)
        self.order, self.cursor = self.rng.permutation(len(train[0])), 0
        self.positions = [i for i, m in enumerate(mask) if m]
        self.activated = sum(C.num_params(p) for p in params) if scored_params is None else scored_params
        self.best: TrainResult | None = None
        self._val_activations: list[jax.Array] | None = None
        self._parked = False
        self.history: list[float] = []
        self.step, self.images, self.seconds = 0, 0, 0.0

    @property
    def cycles_done(self) -> int:
        return len(self.history)

    @property
    def score(self) -> float:
        """Best score so far (-inf before the first cycle)."""
        return self.best.score if self.best is not None else -math.inf

    def run(self, cycles: int, on_cycle: Callable[[int, float], None] | None = None,
            interrupt: Callable[[], bool] | None = None) -> "ChildTraining":
        """Trains up to ``cycles`` more cycles (never past ``budget.cycles``), validating after
        each and keeping the best checkpoint; ``on_cycle`` and ``interrupt`` as in
        :func:`train_child` (``interrupt`` is not asked after the budget's last cycle)."""
        if self._parked:
            raise RuntimeError("a parked child must be placed on a device before it trains")
        x_train, y_train = self.train
        n, b, put = len(x_train), self.budget.batch_size, self._put
        for _ in range(min(cycles, self.budget.cycles - self.cycles_done)):
            t0 = time.perf_counter()
            for _ in range(self.steps_per_cycle):
                if self.cursor + b > n:
                    self.order, self.cursor = self.rng.permutation(n), 0
                idx = self.order[self.cursor:self.cursor + b] if n >= b else self.rng.integers(0, n, b)
                self.cursor += b
                self.key, sub = jax.random.split(self.key)
                self.suffix, self.momentum, _ = self.step_fn(
                    self.suffix, self.momentum, self.prefix, self.suffix_mask,
                    self._put_batch(x_train[idx]), self._put_batch(y_train[idx]),
                    put(jnp.asarray(self.step, jnp.int32)), self.total, self.hp, sub)
                self.step += 1
                self.images += b
            jax.block_until_ready(self.suffix)
            self.seconds += time.perf_counter() - t0
            acc = self._validate()
            self.history.append(acc)
            if on_cycle is not None:
                on_cycle(len(self.history), acc)
            score = self.scorer(acc, self.activated)
            if self.best is None or score >= self.best.score:  # a tie keeps the later checkpoint (Algorithm 1's >=)
                first = self.first
                host_p, host_m = jax.device_get(([self.suffix[i - first] for i in self.positions],
                                                 [self.momentum[i - first] for i in self.positions]))
                self.best = TrainResult(params=dict(zip(self.positions, host_p)),
                                        opt_state=dict(zip(self.positions, host_m)), score=score,
                                        validation_accuracy=acc, steps=self.step, history=(),
                                        images_per_second=0.0)
            if interrupt is not None and len(self.history) < self.budget.cycles and interrupt():
                break
        return self

    def _validate(self) -> float:
        """Validation accuracy of the current parameters. A frozen prefix does not change, so
        its validation activations are computed at the first validation and kept (when
        they fit in :data:`VALIDATION_CACHE_BYTES`); later validations run the suffix only."""
        x_val, y_val = self.validation
        if len(y_val) == 0:
            raise ValueError("cannot compute accuracy on an empty split")
        params, start = self.suffix, self.first
        tokens = self.arch.config.num_patches + (1 if self.first >= 2 else 0)
        if self.first > 0 and self._val_activations is None \
                and len(x_val) * tokens * self.arch.config.width * 4 > VALIDATION_CACHE_BYTES:
            params, start = list(self.prefix) + list(self.suffix), 0  # too big to keep: the whole path
        if start == 0:  # the images go in as they are (the function preprocesses them)
            batches: Any = (self._put_batch(b) for b in _padded_batches(x_val, VALIDATION_BATCH))
        elif self._val_activations is not None:
            batches = self._val_activations
        else:
            prefix_fn = _prefix_fn(self.arch, self.first)
            batches = self._val_activations = [prefix_fn(self.prefix, self._put_batch(batch))
                                               for batch in _padded_batches(x_val, VALIDATION_BATCH)]
        suffix_fn = _suffix_fn(self.arch, start)
        correct = 0
        for i, h in enumerate(batches):
            labels = y_val[i * VALIDATION_BATCH:(i + 1) * VALIDATION_BATCH]
            pred = np.asarray(suffix_fn(params, h))[:len(labels)]
            correct += int(np.sum(pred == labels))
        return correct / len(y_val)

    def result(self) -> TrainResult:
        """The best checkpoint so far, with the validation history and throughput.

        Raises:
          RuntimeError: before the first cycle.
        """
        if self.best is None:
            raise RuntimeError("the child has not trained a cycle yet")
        return dataclasses.replace(self.best, history=tuple(self.history),
                                   images_per_second=self.images / self.seconds if self.seconds else 0.0,
                                   samples=self.images)

    def park(self) -> None:
        """Moves the child's state to the host and drops its cached validation activations,
        so a child waiting for its next rung holds no device memory; :meth:`run` (after
        :meth:`place`) puts it back."""
        self.prefix, self.suffix, self.momentum = jax.device_get((self.prefix, self.suffix, self.momentum))
        self._val_activations = None
        self._parked = True

    def place(self, device: Devices) -> None:
        """Puts a parked (or placed) child's state on ``device`` (one device, or several to
        train data-parallel: :func:`placement`), where its next cycles run."""
        self._put, self._put_batch = placement(device, self.budget.batch_size)
        put = self._put
        self.prefix, self.suffix, self.momentum = put(self.prefix), put(self.suffix), put(self.momentum)
        self.suffix_mask, self.hp, self.total = put(self.suffix_mask), put(self.hp), put(self.total)
        self._val_activations = None
        self._parked = False

    def release(self) -> None:
        """Drops the device arrays (a stopped child keeps only its best checkpoint on the host)."""
        self.prefix = self.suffix = self.momentum = []
        self._val_activations = None


#: Where a child trains: one device, several (data-parallel, :func:`placement`), or None
#: (JAX's default device).
Devices = jax.Device | Sequence[jax.Device] | None


def placement(device: Devices, batch_size: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """How a child's arrays are put on its device(s): ``(put, put_batch)``.

    One device (or None: JAX's first device): both put there. Several devices whose count
    divides ``batch_size`` (and :data:`VALIDATION_BATCH`): data parallelism through
    ``jax.sharding`` (GSPMD): ``put`` replicates parameters, optimizer state and scalars
    on a one-axis mesh of the devices, ``put_batch`` splits a batch's leading (example)
    axis between them, and the jitted train step then computes each device's share of
    the batch and averages the gradients across devices (an all-reduce), the same update
    as one device up to floating-point summation order. Otherwise the first device alone.
    """
    devices = [jax.devices()[0]] if device is None else (
        [device] if isinstance(device, jax.Device) else list(device))
    n = len(devices)
    if not can_split(n, batch_size):
        put = functools.partial(jax.device_put, device=devices[0])
        return put, put
    mesh = Mesh(np.asarray(devices), ("batch",))
    return (functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec())),
            functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec("batch"))))


def can_split(num_devices: int, batch_size: int) -> bool:
    """Whether :func:`placement` trains data-parallel on ``num_devices`` devices: more
    than one, dividing both ``batch_size`` and :data:`VALIDATION_BATCH`."""
    return num_devices > 1 and batch_size % num_devices == 0 and VALIDATION_BATCH % num_devices == 0


#: Largest frozen-prefix validation activations a child keeps on its device (bytes); above
#: it the prefix runs again at every validation.
VALIDATION_CACHE_BYTES = 256 * 2 ** 20
#: Validation batch size (the last batch is padded, so one compiled shape).
VALIDATION_BATCH = 256


def _padded_batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    out = []
    for i in range(0, len(images), size):
        batch = images[i:i + size]
        if len(batch) < size:
            batch = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])
        out.append(batch)
    return out


@functools.lru_cache(maxsize=256)
def _prefix_fn(arch: P.Architecture, stop: int) -> Callable[[Sequence[Any], jax.Array], jax.Array]:
    """Jitted ``(prefix params, images uint8) -> activations entering position stop``."""
    return jax.jit(lambda params, images: P.forward_prefix(arch, params, P.preprocess(images, arch.config.image_size),
                                                           stop))


@functools.lru_cache(maxsize=256)
def _suffix_fn(arch: P.Architecture, start: int) -> Callable[[Sequence[Any], jax.Array], jax.Array]:
    """Jitted ``(suffix params, activations entering position start) -> predicted class [B]
    int32``; for ``start`` 0 the input is the images, ``[B,H,W,C] uint8``, preprocessed as
    :func:`mu2net.paths.predict_fn` does."""

    def predict(params: Sequence[Any], h: jax.Array) -> jax.Array:
        P.TRACES.hit("predict")  # counted with the other evaluation traces
        if start == 0:
            h = P.preprocess(h, arch.config.image_size)
        return jnp.argmax(P.forward(arch, params, h, start=start), axis=-1)

    return jax.jit(predict)


def train_child(arch: P.Architecture, params: Sequence[Any], opt_state: Sequence[Any | None],
                mask: tuple[bool, ...], hparams: Mapping[str, Any],
                train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                budget: TrainBudget, scorer: Callable[[float, float], float], seed: int,
                device: Devices = None,
                on_cycle: Callable[[int, float], None] | None = None,
                scored_params: float | None = None,
                interrupt: Callable[[], bool] | None = None) -> TrainResult:
    """Trains a child's trainable components and keeps its best checkpoint (Section 3.3).

    Args:
      arch: the child's architecture.
      params: parameters of every position (numpy or jax pytrees); frozen ones are never
        modified (they are only read).
      opt_state: momentum per position (None = zeros, for new components).
      mask: True where the position is trainable (cloned, new or head).
      hparams: the child's Table 1 hyperparameters.
      train / validation: (images ``[N,H,W,C] uint8``, labels ``[N] int32``).
      budget: cycles, sample cap and batch size.
      scorer: ``(validation accuracy, scored params) -> score``.
      seed: seeds batch order and augmentation.
      device: device to train on (default: JAX's default device), or several devices to
        train on data-parallel (:func:`placement`).
      on_cycle: called after each cycle's validation with (cycles done, validation
        accuracy), e.g. to advance a progress bar.
      scored_params: the parameter count the scorer sees (the evolver passes the path's
        accounted parameters, :func:`mu2net.evolver.scoring.accounted_params`); default
        the path's activated parameters.
      interrupt: checked after each cycle's validation; when it returns True the child
        stops there and returns its best checkpoint so far (the evolver ends a
        generation early this way when a new task is waiting).

    Returns:
      The :class:`TrainResult` of the best-scoring cycle (the latest of equal scores).

    Raises:
      ValueError: if ``mask`` does not cover the architecture or its head is not trainable.
    """
    child = ChildTraining(arch, params, opt_state, mask, hparams, train, validation, budget, scorer, seed,
                          device, scored_params)
    return child.run(budget.cycles, on_cycle, interrupt).result()
