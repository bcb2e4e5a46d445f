"""The server's strategy: CLAIR (or any engine aggregator) over Flower's Message API.

Each round it samples the config's ``clients_per_round`` (the clients ``clair fit`` samples in
that round), finds which online SuperNode holds which partition (asking only nodes it has not
met), sends every sampled client the adapter refined for it, checks each reply, aggregates with the
same ``aggregate_round`` as the Lightning callback, fits each refined update to the client's
adapter rank on the server with the callback's ``fit_refined``, then collects every client's
validation metrics and records the round in ``summary.json`` and W&B.

Faults never hang or crash a round: an error reply, a reply missing at the round timeout or a
malformed one (missing records, unknown modules, wrong shapes, non-finite values) leaves that
client out with a logged reason naming its partition; the round aggregates the rest if at least
``min_clients`` answered, otherwise the run stops with a ``FederationError``. Waiting for nodes
is bounded by ``node_wait`` seconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import wandb
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..core import ClientUpdate
from ..federation.adapters import fit_refined
from ..jsonio import write_json
from ..rounds import (
    SUMMARY,
    TABLE_COLUMNS,
    aggregate_round,
    by_client,
    client_rows,
    round_record,
    round_scalars,
    run_summary,
)
from .experiment import Experiment
from .messages import (
    CONFIG,
    NUM_PARTITIONS,
    PARTITION_ID,
    SENT_ADAPTER,
    MalformedReply,
    encode_update,
    evaluate_reply,
    reply_error,
    shapes_of,
    train_reply,
)
from .server_state import ServerState, save_state

log = logging.getLogger("flwr.clair_lightning")
NO_TRUTH = "not available: a real deployment has no ground truth, so no detection metrics"


class FederationError(RuntimeError):
    """Too few clients to go on (too few online, or too few valid replies in a round)."""


class ClairStrategy(Strategy):
    """Per-client refined adapters, aggregated by ``experiment``'s aggregator every round."""

    def __init__(
        self,
        experiment: Experiment,
        initial_adapter: ClientUpdate,
        run_dir: Path,
        resumed: ServerState | None = None,
    ):
        self.experiment = experiment
        self.settings = experiment.settings
        self.datamodule = experiment.datamodule  # its truth mask is used only in simulation
        self.num_clients = self.datamodule.num_clients
        sampled = self.datamodule.clients_per_round  # the config's client sampling, as in clair fit
        self.min_clients = self.settings.min_clients or max(2, sampled // 2 + 1)
        if not 2 <= self.min_clients <= sampled:
            raise ValueError(
                f"min-clients must be in [2, {sampled}] (clients sampled per round), "
                f"got {self.min_clients}"
            )
        self.run_dir = run_dir
        self.shapes = shapes_of(initial_adapter)
        self.adapters = {k: initial_adapter for k in range(self.num_clients)}
        self.nodes: dict[int, int] = {}  # node id -> partition
        self.train_sizes: dict[int, float] = {}
        self.truth: dict[int, bool] = {}
        self.records: list[dict] = []
        self.generator = torch.Generator().manual_seed(experiment.aggregation.seed)
        self.started = time.perf_counter()
        self.wandb_run = None
        self.completed_rounds = 0  # rounds of earlier sessions: Flower counts this session's
        self.sessions = [{"after_round": 0, "pid": os.getpid()}]
        self.earlier_seconds = 0.0
        if resumed is not None:
            self._restore(resumed)
        self._sent: list[tuple[Message, int]] = []
        self._trained: dict[int, ClientUpdate] = {}
        self._missing: dict[int, str] = {}
        self._pending: dict = {}
        self._phase_started = time.perf_counter()
        self._identify_seconds = 0.0

    # --- training -------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.completed_rounds
        self._missing = {}
        started = time.perf_counter()
        online = self._identify(grid, self._wait_for_nodes(grid, server_round), server_round)
        self._phase_started = time.perf_counter()
        self._identify_seconds = self._phase_started - started
        sampled = set(self.datamodule.participants(server_round))
        for partition in range(self.num_clients):
            if partition not in sampled:
                self._missing[partition] = "not sampled this round"
            elif partition not in online:
                self._leave_out(partition, server_round, "no SuperNode online holds it")
        online = {p: node for p, node in online.items() if p in sampled}
        self._require(len(online), server_round, "sampled clients online")
        self._sent = [
            (self._message(MessageType.TRAIN, node, partition, server_round), partition)
            for partition, node in sorted(online.items())
        ]
        return [message for message, _ in self._sent]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.completed_rounds
        trained, weights = {}, {}
        for partition, reply in self._replies(replies, server_round):
            try:
                update, examples, contaminated = train_reply(
                    reply, self.shapes, self.settings.simulation
                )
            except MalformedReply as reason:
                self._leave_out(partition, server_round, str(reason))
                continue
            trained[partition], weights[partition] = update, examples
            self.train_sizes[partition] = examples
            if contaminated is not None:
                self.truth[partition] = contaminated
        self._require(len(trained), server_round, "valid train replies")
        self._trained = trained
        answered = sorted(trained)
        if server_round % self.experiment.aggregation.period:
            self._pending = {"round": server_round, "aggregated": False}
            self.adapters.update(trained)
        else:
            self._pending = self._aggregate(server_round, answered, weights)
        self._pending["train_seconds"] = time.perf_counter() - self._phase_started
        self._pending["identify_seconds"] = self._identify_seconds  # waiting for and asking nodes
        return None, MetricRecord({"clients": len(answered)})

    def _aggregate(self, server_round: int, answered: list[int], weights: dict) -> dict:
        uploads = [self._trained[k] for k in answered]
        truth = [self.truth[k] for k in answered] if self.settings.simulation else None
        if self.settings.simulation:
            # Update-level contamination is a simulation device, applied as the callback does.
            uploads = self.datamodule.contaminate_updates(uploads, server_round, clients=answered)
        result, fields = aggregate_round(
            self.experiment.aggregation.name,
            self.experiment.aggregation_options,
            uploads,
            [weights[k] for k in answered],
            truth,
        )
        adapters = {k: dict(self._trained[k]) for k in answered}

        def current(index: int, module: str):
            return adapters[answered[index]][module]

        def write(index: int, module: str, b: torch.Tensor, a: torch.Tensor) -> None:
            adapters[answered[index]][module] = (b, a)

        started = time.perf_counter()
        errors = fit_refined(result.refined, uploads, current, write, self.generator)
        fields["write_back_seconds"] = time.perf_counter() - started
        self.adapters.update(adapters)
        truncation = {
            answered[i]: max(module_errors.values()) for i, module_errors in errors.items()
        }
        return {
            "round": server_round,
            **by_client(fields, answered, self.num_clients),
            "truncation_error": truncation,
            "participants": answered,
        }

    # --- evaluation -----------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.completed_rounds
        self._phase_started = time.perf_counter()
        nodes = {partition: node for node, partition in self.nodes.items()}
        self._sent = [
            (self._message(MessageType.EVALUATE, nodes[p], p, server_round), p)
            for p in sorted(self._trained)
            if p in nodes
        ]
        return [message for message, _ in self._sent]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.completed_rounds
        client_metrics: list[dict] = [{} for _ in range(self.num_clients)]
        for partition, reply in self._replies(replies, server_round):
            try:
                client_metrics[partition] = evaluate_reply(reply)
            except MalformedReply as reason:
                self._leave_out(partition, server_round, f"evaluation: {reason}")
        truth = (
            [self.truth.get(k) for k in range(self.num_clients)]
            if self.settings.simulation
            else None
        )
        self._pending["evaluate_seconds"] = time.perf_counter() - self._phase_started
        record = round_record(self._pending, truth, client_metrics, self._missing)
        record["session"] = len(self.sessions) - 1
        self.records.append(record)
        self._log_round(record)
        self.write_summary()
        self.save_state(server_round)
        return MetricRecord({"clients": sum(bool(m) for m in client_metrics)})

    def summary(self) -> None:
        log.info(
            "CLAIR strategy: aggregator %s, %d clients, at least %d per round, round timeout "
            "%.0f s, %s",
            self.experiment.aggregation.name,
            self.num_clients,
            self.min_clients,
            self.settings.round_timeout,
            "simulation (ground truth reported)" if self.settings.simulation else "deployment",
        )

    # --- nodes and replies ------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Online node ids: all partitions' worth in round 1 (or until ``node_wait`` passes),
        at least ``min_clients`` later; never an unbounded wait."""
        first = server_round == self.completed_rounds + 1  # this session's first round
        wanted = self.num_clients if first else self.min_clients
        deadline = time.monotonic() + self.settings.node_wait
        while True:
            online = list(grid.get_node_ids())
            if len(online) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(1)
        if len(online) < self.min_clients:
            raise FederationError(
                f"round {server_round}: {len(online)} SuperNode(s) online after "
                f"{self.settings.node_wait:.0f} s, fewer than min-clients={self.min_clients}"
            )
        return online

    def _identify(self, grid: Grid, online: list[int], server_round: int) -> dict[int, int]:
        """partition -> node for the online nodes; nodes not met before are asked once."""
        self.nodes = {node: p for node, p in self.nodes.items() if node in online}
        unknown = [node for node in online if node not in self.nodes]
        if unknown:
            queries = [
                Message(
                    RecordDict({CONFIG: ConfigRecord({"round": server_round})}),
                    dst_node_id=node,
                    message_type=MessageType.QUERY,
                    group_id=str(server_round),
                )
                for node in unknown
            ]
            replies = grid.send_and_receive(queries, timeout=self.settings.round_timeout)
            by_id = {reply.metadata.reply_to_message_id: reply for reply in replies}
            for query, node in zip(queries, unknown, strict=True):
                reply = by_id.get(query.metadata.message_id)
                partition, reason = self._partition_of(reply)
                if reason:
                    log.warning("SuperNode %d did not identify itself: %s", node, reason)
                    continue
                for other in [n for n, p in self.nodes.items() if p == partition]:
                    del self.nodes[other]  # a restarted node replaces its old id
                self.nodes[node] = partition
        return {partition: node for node, partition in self.nodes.items()}

    def _partition_of(self, reply: Message | None) -> tuple[int, str | None]:
        if reply is None:
            return -1, "no reply before the timeout"
        if error := reply_error(reply):
            return -1, error
        try:
            record = reply.content[CONFIG]
            partition, partitions = int(record[PARTITION_ID]), int(record[NUM_PARTITIONS])
        except (KeyError, TypeError, ValueError):
            return -1, "its reply has no partition-id / num-partitions"
        if partitions != self.num_clients or not 0 <= partition < partitions:
            return -1, (
                f"partition-id={partition} num-partitions={partitions} does not fit the "
                f"config's {self.num_clients} clients"
            )
        return partition, None

    def _replies(self, replies: Iterable[Message], server_round: int):
        """``(partition, reply)`` for every message sent; a missing reply leaves it out."""
        by_id = {reply.metadata.reply_to_message_id: reply for reply in replies}
        for message, partition in self._sent:
            reply = by_id.get(message.metadata.message_id)
            if reply is None:
                self._leave_out(
                    partition,
                    server_round,
                    f"no reply before the round timeout ({self.settings.round_timeout:.0f} s)",
                )
                continue
            yield partition, reply

    def _message(self, kind: str, node: int, partition: int, server_round: int) -> Message:
        content = RecordDict(
            {
                SENT_ADAPTER: encode_update(self.adapters[partition]),
                CONFIG: ConfigRecord({"round": server_round, PARTITION_ID: partition}),
            }
        )
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(server_round))

    def _leave_out(self, partition: int, server_round: int, reason: str) -> None:
        log.warning("round %d: client %d left out: %s", server_round, partition, reason)
        self._missing.setdefault(partition, reason)

    def _require(self, count: int, server_round: int, what: str) -> None:
        if count < self.min_clients:
            reasons = "; ".join(f"client {k}: {why}" for k, why in sorted(self._missing.items()))
            raise FederationError(
                f"round {server_round}: only {count} {what}, fewer than "
                f"min-clients={self.min_clients} ({reasons})"
            )

    # --- records ----------------------------------------------------------------------------------

    def _log_round(self, record: dict) -> None:
        flagged = [c["client"] for c in record["clients"] if c["flag"]]
        missing = sorted(record.get("missing", {}))
        log.info(
            "round %d: flagged %s, missing %s, detection F1 %s",
            record["round"],
            flagged,
            missing,
            record["detection"].get("f1"),
        )
        if self.wandb_run is not None:
            self.wandb_run.log(
                {
                    **round_scalars(record),
                    "clients": wandb.Table(columns=TABLE_COLUMNS, data=client_rows(record)),
                },
                step=record["round"],
            )

    def write_summary(self) -> None:
        datamodule = self.datamodule
        simulation = self.settings.simulation
        sizes = [self.train_sizes.get(k) for k in range(self.num_clients)]
        data = {
            "recipe": type(datamodule).__module__,
            "num_clients": self.num_clients,
            "contamination": datamodule.contamination,
            "contaminated": [self.truth.get(k) for k in range(self.num_clients)]
            if simulation
            else None,
            "seed": datamodule.seed,
            "local_steps": datamodule.local_steps,
            "train_sizes": sizes,
        }
        engine = {
            "name": "flower",
            "mode": "simulation" if simulation else "deployment",
            "ground_truth": "reported by the simulated clients" if simulation else NO_TRUTH,
            "min_clients": self.min_clients,
            "round_timeout": self.settings.round_timeout,
            "missing": {r["round"]: r["missing"] for r in self.records if r.get("missing")},
        }
        aggregation = self.experiment.aggregation
        summary = run_summary(
            {
                "name": aggregation.name,
                "period": aggregation.period,
                "options": self.experiment.aggregation_options,
            },
            data,
            self.earlier_seconds + time.perf_counter() - self.started,
            self.records,
            task_metric=datamodule.TASK_METRIC,
            sessions=self.sessions,
            engine=engine,
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / SUMMARY, summary)

    # --- resume -----------------------------------------------------------------------------------

    def save_state(self, server_round: int) -> None:
        save_state(
            self.run_dir,
            ServerState(
                config_yaml=self.settings.config_yaml,
                overrides=tuple(self.settings.overrides),
                completed_rounds=server_round,
                adapters=self.adapters,
                records=self.records,
                truth=self.truth,
                train_sizes=self.train_sizes,
                generator=self.generator.get_state(),
                sessions=self.sessions,
                elapsed_seconds=self.earlier_seconds + time.perf_counter() - self.started,
            ),
        )

    def _restore(self, state: ServerState) -> None:
        """Continue after ``state.completed_rounds``: the same adapters, records and generator."""
        self.completed_rounds = state.completed_rounds
        self.adapters = dict(state.adapters)
        self.records = list(state.records)
        self.truth = dict(state.truth)
        self.train_sizes = dict(state.train_sizes)
        self.generator.set_state(state.generator)
        self.sessions = [
            *state.sessions,
            {"after_round": state.completed_rounds, "pid": os.getpid()},
        ]
        self.earlier_seconds = state.elapsed_seconds
