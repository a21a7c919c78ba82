"""Where the fine-tuning stages train: this process's one device, every local device, or several machines.

`plan(kind, resolver, batch_size)` turns `--strategy` (`none`, `mirrored`, `multi_worker`) and
`--cluster_resolver` (`tf_config`, `slurm`) into a `Distribution`: the `tf.distribute.Strategy` (None for
`none`), how many replicas train in sync, and whether this process is the chief, the one task that writes the
run's artefacts. `from_strategy` wraps a strategy the caller built. Keras' `fit` takes `batch_size` as the
global batch: each replica trains on `batch_size / replicas` samples of every step, so one step of a run on
two workers sees what one step of a run on one machine sees, and the pruning schedule, counted in steps, ends
where it would on one machine.

The cluster comes from `TF_CONFIG` (what Kubernetes operators and `tf.distribute` set up) or from Slurm's
environment (`tf.distribute.cluster_resolver.SlurmClusterResolver`). Both are checked before TensorFlow
starts anything, so a worker that names itself outside the cluster fails with one line instead of waiting for
peers that never come. `MultiWorkerMirroredStrategy` must be created before the first TensorFlow op of the
process: build the plan before loading a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
from collections.abc import Mapping

from tfcompress.core._keras import tf
from tfcompress.core.errors import InputError, WorkerLostError

STRATEGIES = ("none", "mirrored", "multi_worker")
RESOLVERS = ("tf_config", "slurm")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How the fine-tunes run: the strategy (None: TensorFlow's default, one device), its replica and worker
    counts, and this process's task in the cluster."""

    kind: str  # one of STRATEGIES, or the class name of a strategy object from the API
    strategy: object | None
    replicas: int = 1
    workers: int = 1
    task_type: str | None = None
    task_id: int = 0
    is_chief: bool = True

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    def scope(self):
        """The strategy's scope: variables made in it (models, wrappers, optimizer slots) are mirrored."""
        return contextlib.nullcontext() if self.strategy is None else self.strategy.scope()

    @property
    def task(self) -> str:
        return "chief" if self.task_type is None else f"{self.task_type} {self.task_id}"

    def describe(self, batch_size: int) -> dict:
        """For report.json (`"distribution"`): the global batch is what `--batch_size` says."""
        return {"strategy": self.kind, "replicas": self.replicas, "workers": self.workers,
                "global_batch": batch_size, "per_replica_batch": batch_size // self.replicas,
                "written_by": self.task}


def check_cluster(kind: str, resolver: str, environ: Mapping[str, str] | None = None) -> None:
    """Checks the flags and the cluster description without starting TensorFlow.

    Raises:
        ValueError: an unknown strategy or resolver, or a resolver with a strategy that takes none.
        InputError: `multi_worker` without a cluster (no TF_CONFIG, not in a Slurm job), a TF_CONFIG that is
            not JSON or names this task outside its cluster.
    """
    environ = os.environ if environ is None else environ
    check_names(kind, resolver)
    if kind != "multi_worker":
        return
    if resolver == "slurm":
        if "SLURM_PROCID" not in environ or shutil.which("scontrol") is None:
            raise InputError("--cluster_resolver=slurm reads the cluster from a Slurm job step, and this process is "
                             "not in one (no SLURM_PROCID, or no scontrol on PATH): start it with srun, or describe "
                             "the cluster in TF_CONFIG and pass --cluster_resolver=tf_config.")
        return
    _check_tf_config(environ.get("TF_CONFIG"))


def check_names(kind: str, resolver: str) -> None:
    """Raises ValueError for an unknown strategy or resolver, or a resolver without `multi_worker`."""
    if kind not in STRATEGIES:
        raise ValueError(f"strategy is one of {', '.join(STRATEGIES)}. Received: strategy={kind!r}")
    if resolver not in RESOLVERS:
        raise ValueError(f"cluster_resolver is one of {', '.join(RESOLVERS)}. Received: cluster_resolver={resolver!r}")
    if resolver != "tf_config" and kind != "multi_worker":
        raise ValueError(f"cluster_resolver={resolver!r} describes a cluster of workers; it needs "
                         f"strategy='multi_worker'. Received: strategy={kind!r}")


def _check_tf_config(raw: str | None) -> None:
    if not raw:
        raise InputError("--strategy=multi_worker needs the cluster: set TF_CONFIG on every worker (its "
                         "'cluster' and this worker's 'task'), or pass --cluster_resolver=slurm inside a Slurm job.")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos}): set it to "
                         '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}.'
                         ) from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
        raise InputError("TF_CONFIG needs a 'cluster' (task type → list of host:port) and this worker's 'task' "
                         '({"type": "worker", "index": N}); fix TF_CONFIG on this worker.')
    task_type, index = task.get("type"), task.get("index", 0)
    members = cluster.get(task_type)
    if (not isinstance(members, list) or isinstance(index, bool) or not isinstance(index, int)
            or not 0 <= index < len(members)):
        listed = ", ".join(f"{name} ({len(hosts) if isinstance(hosts, list) else '?'})"
                           for name, hosts in cluster.items())
        raise InputError(f"TF_CONFIG names this task {task_type} {index}, which is not in its cluster ({listed}): "
                         "give each worker its own type and index within the cluster.")
    if task_type not in ("chief", "worker"):
        raise InputError(f"TF_CONFIG names this task a {task_type}; MultiWorkerMirroredStrategy trains on 'chief' "
                         "and 'worker' tasks only: start this process as one of them.")


def plan(kind: str = "none", resolver: str = "tf_config", batch_size: int | None = None,
         strategy: object | None = None) -> Distribution:
    """Builds the strategy (or wraps `strategy`, which wins over `kind`) and checks the batch against it.

    With a TF_CONFIG cluster the batch is checked before the strategy is built: building it waits until every
    worker has joined.

    Raises:
        InputError: see `check_cluster`; or `batch_size` does not divide by the replica count.
    """
    if strategy is not None:
        distribution = from_strategy(strategy)
        _check_batch(batch_size, distribution.replicas, distribution.kind)
        return distribution
    check_cluster(kind, resolver)
    if kind == "none":
        return Distribution("none", None)
    if kind == "mirrored":
        built = tf.distribute.MirroredStrategy()
    else:
        if resolver == "tf_config":
            cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
            local = max(1, len(tf.config.list_physical_devices("GPU")))  # MirroredStrategy's devices per worker
            _check_batch(batch_size, local * sum(len(cluster.get(name, ())) for name in ("chief", "worker")), kind)
        cluster = (tf.distribute.cluster_resolver.SlurmClusterResolver() if resolver == "slurm" else
                   tf.distribute.cluster_resolver.TFConfigClusterResolver())
        # Gradients all-reduced in packs of up to 32 MiB instead of one collective per tensor: the QAT epoch of
        # benchmark_distribute took 12.6 s instead of 18.9 s on two workers (prune: unchanged).
        packed = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=32 << 20)
        built = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster, communication_options=packed)
    distribution = dataclasses.replace(from_strategy(built), kind=kind)
    _check_batch(batch_size, distribution.replicas, kind)
    return distribution


def _check_batch(batch_size: int | None, replicas: int, kind: str) -> None:
    if batch_size is None or batch_size % replicas == 0:
        return
    nearest = batch_size - batch_size % replicas or replicas
    raise InputError(
        f"--batch_size={batch_size} is the global batch, split evenly over the {replicas} replicas of "
        f"--strategy={kind}, and does not divide by {replicas}: pass a multiple of {replicas} (e.g. {nearest})."
    )


def from_strategy(strategy) -> Distribution:
    """A `Distribution` for a strategy the caller built (any `tf.distribute.Strategy`)."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(f"strategy must be a tf.distribute.Strategy or one of {', '.join(STRATEGIES)}. "
                         f"Received: strategy={type(strategy).__name__}")
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type, task_id, workers, spec = None, 0, 1, {}
    if resolver is not None and resolver.task_type is not None:
        spec = resolver.cluster_spec().as_dict()
        task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
        workers = sum(len(spec.get(name, ())) for name in ("chief", "worker"))
    # TensorFlow's convention: the chief task, or worker 0 in a cluster without one.
    is_chief = task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and "chief" not in spec)
    return Distribution(type(strategy).__name__, strategy, replicas=int(strategy.num_replicas_in_sync),
                        workers=max(workers, 1), task_type=task_type, task_id=task_id, is_chief=is_chief)


def loopback_tf_configs(count: int) -> list[str]:
    """TF_CONFIG values for `count` workers of one cluster on free loopback ports: several workers on one machine
    (the tests, `benchmark_distribute`, trying a cluster out). The ports are free when chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        hosts = [f"127.0.0.1:{each.getsockname()[1]}" for each in sockets]
    finally:
        for each in sockets:
            each.close()
    return [json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
            for index in range(count)]


def agreed_count(distribution: Distribution, count: int, most: int) -> int:
    """The smallest `count` over every worker (`0 <= count <= most`): how far all of them got.

    Used to resume: a worker killed between two stages restarts with one stage fewer done than its peers, and
    every worker must start from the same stage for their collectives to meet.
    """
    if distribution.workers == 1:
        return count
    strategy = distribution.strategy
    reached = tf.constant([1.0 if count >= step else 0.0 for step in range(most + 1)])

    @tf.function  # in a graph: run eagerly, collectives warn of their overhead
    def total():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(reached)), axis=None)

    with peers_lost_reported(distribution, "the start (agreeing where to resume)"):
        summed = total().numpy()
    everywhere = [step for step, n in enumerate(summed) if round(float(n)) == distribution.replicas]
    return max(everywhere)


# What TensorFlow's collectives raise when a peer is gone: reset connections (UNAVAILABLE), aborted or cancelled
# collectives, a peer that stopped answering.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def peers_lost_reported(distribution: Distribution, during: str, backup_dir: str | None = None):
    """On several workers: a peer lost during the block becomes one `WorkerLostError` line saying what to do."""
    if distribution.workers == 1:
        yield
        return
    try:
        yield
    except _PEER_ERRORS as e:
        lines = [line.strip() for line in str(getattr(e, "message", e)).splitlines() if line.strip()]
        cause = next((line for line in lines if "aborted by" in line or "peer" in line), lines[0] if lines else "")
        resume = (f"the fine-tune resumes at the last epoch it completed (checkpoints in {backup_dir})" if backup_dir
                  else "the run resumes after the last stage every worker completed")
        raise WorkerLostError(
            f"{distribution.task} lost the other workers during {during} ({type(e).__name__}: {cause[:200]}): "
            f"restart every worker with the same command; {resume}."
        ) from None
