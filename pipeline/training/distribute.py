"""`--strategy` resolution over tf.distribute (never a home-made distribution).

Strategies (`--strategy`):

* `default`: one device (`tf.distribute.get_strategy()`).
* `mirrored`: `MirroredStrategy` over this machine's GPUs (its CPUs when there
  is no GPU; see `LOGICAL_CPUS_ENV` to test that on a CPU-only machine).
* `multi_worker`: `MultiWorkerMirroredStrategy` over the cluster that
  `TF_CONFIG` describes (every task runs the same command).
* `tpu`: `TPUStrategy` on the Cloud TPU named by `--tpu`.
* `auto` (`choose_strategy`): tpu when `--tpu` is given, else multi_worker
  when `TF_CONFIG` names more than one chief/worker task, else mirrored when
  more than one GPU is visible, else default.

`--batch_size` is always the global batch: tf.distribute splits it evenly
over `strategy.num_replicas_in_sync` replicas (`per_replica_batch`).

Order matters: a `MultiWorkerMirroredStrategy` and logical devices can only
be set up before TensorFlow runs its first op ("Collective ops must be
configured at program startup"), so `training.train` resolves the strategy
before anything else, and strategies are cached per process (a tuner calling
`train` once per trial gets the same strategy object back).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
CHOICES = ("auto",) + STRATEGIES

# Testing/debug aid: split the CPU into this many logical devices at startup,
# so `--strategy=mirrored` runs over several replicas on a CPU-only machine.
LOGICAL_CPUS_ENV = "PIPELINE_LOGICAL_CPUS"

_WORKER_TASK_TYPES = ("chief", "worker")
_cache: dict = {}


# ----------------------------------------------------------------------------- pure rules


def tf_config(environ=None) -> dict:
    """The parsed `TF_CONFIG` environment variable ({} when unset)."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError("TF_CONFIG must be a JSON object with `cluster` and `task`.")
    return value


def num_workers(config: dict) -> int:
    """Chief and worker tasks in a TF_CONFIG cluster (parameter servers and evaluators don't train)."""
    cluster = config.get("cluster") or {}
    return sum(len(cluster.get(kind) or []) for kind in _WORKER_TASK_TYPES)


def is_chief(task_type: Optional[str], task_id: int, cluster: dict) -> bool:
    """The task that writes: `chief`, else worker 0 of a cluster without a chief; a lone process."""
    if task_type in (None, "", "chief"):
        return True
    return task_type == "worker" and int(task_id) == 0 and not (cluster or {}).get("chief")


def choose_strategy(requested: str, *, num_gpus: int, num_workers: int = 1,
                    tpu: Optional[str] = None) -> str:
    """Pure rule behind `--strategy=auto` (see the module docstring); other names pass through."""
    if requested not in CHOICES:
        raise ValueError(f"Unknown strategy {requested!r}; choose from {', '.join(CHOICES)}.")
    if requested != "auto":
        return requested
    if tpu:
        return "tpu"
    if num_workers > 1:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "default"


def per_replica_batch(global_batch: int, replicas: int) -> int:
    """`--batch_size` split over the replicas; it must divide evenly."""
    if global_batch % replicas:
        raise ValueError(
            f"--batch_size={global_batch} is the global batch and must be a multiple of the "
            f"{replicas} replicas in sync (e.g. --batch_size={max(1, global_batch // replicas) * replicas}).")
    return global_batch // replicas


def lr_scale(rule: str, replicas: int) -> float:
    """Factor on every learning rate: `linear` -> the number of replicas, `none` -> 1."""
    if rule == "none":
        return 1.0
    if rule == "linear":
        return float(replicas)
    raise ValueError(f"Unknown --lr_scaling {rule!r}; choose from linear, none.")


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Where this process sits in the cluster (a lone process is the chief of one)."""

    task_type: Optional[str] = None
    task_id: int = 0
    num_workers: int = 1
    is_chief: bool = True


# ----------------------------------------------------------------------------- machine


def configure_logical_cpus(count: Optional[int] = None) -> int:
    """Split the first CPU into `count` logical devices (default: $PIPELINE_LOGICAL_CPUS).

    A testing/debug aid for `--strategy=mirrored` without GPUs. Must run
    before TensorFlow initializes its devices; returns the logical CPU count
    set (0 when nothing was asked for).

    Raises:
      ValueError: TensorFlow already initialized with another device layout.
    """
    if count is None:
        text = os.environ.get(LOGICAL_CPUS_ENV, "").strip()
        try:
            count = int(text) if text else 0
        except ValueError:
            raise ValueError(f"{LOGICAL_CPUS_ENV} must be an integer, got {text!r}.") from None
    if count <= 1:
        return 0
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == count:
        return count
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as e:
        raise ValueError(f"{LOGICAL_CPUS_ENV}={count} came too late: TensorFlow had already "
                         f"initialized its devices ({e}).") from None
    return count


def _default():
    return tf.distribute.get_strategy()


def _mirrored(tpu=None):
    del tpu
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def _multi_worker(tpu=None):
    del tpu
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as e:
        if "program startup" in str(e):
            raise ValueError("--strategy=multi_worker must be set up before TensorFlow runs any op: "
                             "call training.train (or distribute.resolve_strategy) first in the "
                             "process.") from None
        raise


def _tpu(tpu=None):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":  # a TPU VM's own chips need no connection
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


_BUILDERS = {"mirrored": _mirrored, "multi_worker": _multi_worker, "tpu": _tpu}


def resolve_strategy(requested: str, *, tpu: Optional[str] = None):
    """(strategy object, its name) for this machine and `TF_CONFIG`; cached per process."""
    configure_logical_cpus()
    name = choose_strategy(requested, num_gpus=len(tf.config.list_physical_devices("GPU")),
                           num_workers=num_workers(tf_config()), tpu=tpu)
    if name == "default":
        return _default(), name
    key = (name, tpu if name == "tpu" else None)
    if key not in _cache:
        _cache[key] = _BUILDERS[name](tpu)
    return _cache[key], name


def worker_role(strategy) -> WorkerRole:
    """This process's task under `strategy` (only multi-worker strategies have non-chiefs)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole()
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    cluster = resolver.cluster_spec().as_dict() if task_type else {}
    return WorkerRole(task_type=task_type, task_id=task_id,
                      num_workers=max(1, num_workers({"cluster": cluster})),
                      is_chief=is_chief(task_type, task_id, cluster))
