"""The scenario suite: every induced problem, its alert as an SRE wrote it, and the cause to find.

The one list both ``tests/scenarios/test_*.py`` and ``benchmarks/investigation.py`` run. Alerts are
written the way real rules are — named for the symptom someone noticed (orders slow, emails late,
dead tuples growing), with the PromQL they would write — and most of them match no playbook
pattern of the rules reasoner (``Scenario.matches_a_playbook``; ``test_catalogue.py`` keeps it so).
A few are the well-known community rules (``KubePodCrashLooping``, a blackbox ``probe_success``,
``PostgresTransactionTooLong``) because those are what many teams run.

``WORLDS`` is what a group of scenarios shares (a broker client, a service); it is entered once
per group, and every induction of the group runs inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from tests.scenarios import http_problems as http
from tests.scenarios import kubernetes_problems as k8s
from tests.scenarios import postgres_problems as pg
from tests.scenarios import rabbitmq_problems as mq
from tests.scenarios.harness import Rule, Scenario


@contextlib.asynccontextmanager
async def nothing_shared() -> AsyncIterator[None]:
    """Groups whose problems each bring their own servers (private PostgreSQL clusters, emulators)."""
    yield None


WORLDS: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Any]]] = {
    "postgres": nothing_shared,
    "kubernetes": nothing_shared,
    "rabbitmq": mq.shared_broker,
    "private_rabbitmq": mq.private_broker,
    "http": http.flaky_service,
}
GROUPS = tuple(WORLDS)

SCENARIOS: tuple[Scenario, ...] = (
    # ---------------------------------------------------------------- PostgreSQL
    Scenario(
        name="pg_lock_chain_behind_idle_batch",
        group="postgres",
        rule=Rule(alertname="CheckoutOrdersSlow",
                  expr='histogram_quantile(0.99, sum by (le) (rate(checkout_place_order_seconds_bucket'
                       '{service="checkout"}[5m]))) > 2',
                  labels={"severity": "critical", "service": "checkout", "datname": "orders"},
                  annotations={"summary": "placing an order takes over 2 s at p99",
                               "description": "customers wait for the order confirmation page"}),
        induce=pg.lock_chain,
        expected="lock_contention",
        evidence=("orders-batch", "$holder_pid"),
    ),
    Scenario(
        name="pg_transaction_too_long_during_lock_incident",
        group="postgres",
        rule=Rule(alertname="PostgresTransactionTooLong",
                  expr="pg_stat_activity_max_tx_duration > 15",
                  labels={"severity": "warning", "domain": "database", "server": "$server"},
                  annotations={"summary": "a transaction on $server has been open for more than 15 s"}),
        induce=pg.lock_chain,
        expected="lock_contention",
        evidence=("orders-batch", "$holder_pid"),
    ),
    Scenario(
        # The name says connections; what is wrong is a lock: sessions pile up behind one transaction.
        name="pg_connections_alert_over_a_lock_chain",
        group="postgres",
        rule=Rule(alertname="OrdersDatabaseConnectionsHigh",
                  expr='sum(pg_stat_activity_count{datname="orders", state="active"}) > 3',
                  labels={"severity": "warning", "datname": "orders", "server": "$server"},
                  annotations={"summary": "more than 3 active sessions on the orders database"}),
        induce=pg.lock_chain,
        expected="lock_contention",
        evidence=("orders-batch", "$holder_pid"),
    ),
    Scenario(
        name="pg_idle_in_transaction_holder",
        group="postgres",
        rule=Rule(alertname="BillingDeadTuplesGrowing",
                  expr='sum by (datname) (pg_stat_user_tables_n_dead_tup{datname="billing"}) > 100000',
                  labels={"severity": "warning", "datname": "billing", "team": "payments"},
                  annotations={"summary": "dead tuples in billing keep growing: autovacuum cannot clean up"}),
        induce=pg.idle_holder,
        expected="idle_in_transaction",
        evidence=("invoice-sync", "$holder_pid"),
    ),
    Scenario(
        name="pg_long_running_report_query",
        group="postgres",
        rule=Rule(alertname="AnalyticsDashboardsStale",
                  expr='time() - max(analytics_dashboard_refreshed_timestamp_seconds) > 600',
                  labels={"severity": "warning", "datname": "analytics", "team": "data"},
                  annotations={"summary": "revenue dashboards have not refreshed for 10 minutes"}),
        induce=pg.long_query,
        expected="slow_queries",
        evidence=("revenue-report",),
    ),
    Scenario(
        name="pg_second_database_by_datname_label",
        group="postgres",
        rule=Rule(alertname="LedgerPostingsDelayed",
                  expr='sum(rate(ledger_postings_committed_total[5m])) < 1',
                  labels={"severity": "critical", "datname": "ledger", "server": "$server"},
                  annotations={"summary": "ledger postings have almost stopped"}),
        induce=pg.second_database,
        expected="lock_contention",
        evidence=("ledger-close", "$holder_pid", 'database "ledger"'),
    ),
    Scenario(
        name="pg_connections_exhausted_agent_refused",
        group="postgres",
        rule=Rule(alertname="CheckoutDatabaseFull",
                  expr="sum by (server) (pg_stat_activity_count) / on (server) pg_settings_max_connections >= 0.9",
                  labels={"severity": "critical", "service": "checkout", "server": "$server"},
                  annotations={"summary": "checkout's PostgreSQL has no free slots left"}),
        induce=pg.connections_exhausted,
        expected="connection_exhaustion_idle_in_transaction",
        evidence=("prometheus",),
    ),
    Scenario(
        name="pg_replica_replay_paused",
        group="postgres",
        rule=Rule(alertname="RevenueReportsStale",
                  expr="time() - max(reports_last_refresh_timestamp_seconds) > 900",
                  labels={"severity": "warning", "team": "analytics", "server": "$server"},
                  annotations={"summary": "revenue reports show data older than 15 minutes"}),
        induce=pg.replica_replay_paused,
        expected="replication_lag",
        evidence=("replay is paused",),
    ),
    Scenario(
        name="pg_inactive_slot_retains_wal",
        group="postgres",
        rule=Rule(alertname="OrdersDbDiskWillFill",
                  expr='predict_linear(node_filesystem_avail_bytes{mountpoint="/var/lib/postgresql"}[6h], 86400) < 0',
                  labels={"severity": "warning", "service": "orders-db", "server": "$server"},
                  annotations={"summary": "the orders database's disk fills within a day at this rate"}),
        induce=pg.slot_retains_wal,
        expected="replication_slot_retains_wal",
        evidence=("backup_host_b", "inactive"),
    ),
    # ---------------------------------------------------------------- RabbitMQ
    Scenario(
        name="mq_backlog_without_consumer",
        group="rabbitmq",
        rule=Rule(alertname="OrderConfirmationEmailsLate",
                  expr="time() - max(shop_order_email_sent_timestamp_seconds) > 600",
                  labels={"severity": "warning", "team": "shop", "queue": "order-emails", "vhost": "$vhost"},
                  annotations={"summary": "no order confirmation e-mail sent for 10 minutes"}),
        induce=mq.backlog_without_consumer,
        expected="no_consumer",
        evidence=("order-emails",),
    ),
    Scenario(
        name="mq_stalled_consumer_full_prefetch",
        group="rabbitmq",
        rule=Rule(alertname="InvoicesNotRendered",
                  expr="sum(increase(invoice_rendered_total[15m])) == 0",
                  labels={"severity": "warning", "team": "billing", "vhost": "$vhost"},
                  annotations={"summary": "no invoice rendered in 15 minutes"}),
        induce=mq.stalled_consumer,
        expected="stalled_consumer",
        evidence=("invoice-render",),
    ),
    Scenario(
        name="mq_memory_alarm_blocks_publishers",
        group="private_rabbitmq",
        rule=Rule(alertname="CheckoutEventsMissing",
                  expr='sum(rate(checkout_events_published_total{service="checkout"}[5m])) == 0',
                  labels={"severity": "critical", "service": "checkout", "domain": "messaging"},
                  annotations={"summary": "checkout has published no order events for 5 minutes"}),
        induce=mq.memory_alarm,
        expected="broker_memory_alarm",
        evidence=("memory",),
    ),
    # ---------------------------------------------------------------- Kubernetes (API emulator)
    Scenario(
        name="k8s_crash_loop",
        group="kubernetes",
        rule=Rule(alertname="KubePodCrashLooping",
                  expr='max_over_time(kube_pod_container_status_waiting_reason{reason="CrashLoopBackOff",'
                       'namespace="payments"}[5m]) >= 1',
                  labels={"severity": "warning", "namespace": "$namespace", "pod": "$pod", "container": "app"},
                  annotations={"summary": "pod $namespace/$pod is crash looping"}),
        induce=k8s.crash_looping,
        expected="crash_loop",
        evidence=("crash-looping", "exit code 1"),
    ),
    Scenario(
        name="k8s_oom_killed_without_workload_label",
        group="kubernetes",
        rule=Rule(alertname="InventorySyncBehind",
                  expr="time() - max(inventory_sync_last_success_timestamp_seconds) > 900",
                  labels={"severity": "warning", "namespace": "$namespace", "team": "inventory"},
                  annotations={"summary": "stock levels have not synced for 15 minutes"}),
        induce=k8s.oom_killed,
        expected="oom_killed",
        evidence=("OOMKilled",),
    ),
    Scenario(
        name="k8s_bad_rollout",
        group="kubernetes",
        rule=Rule(alertname="StorefrontConversionDrop",
                  expr="sum(rate(storefront_orders_total[10m])) < 0.5 * sum(rate(storefront_orders_total[10m] "
                       "offset 1d))",
                  labels={"severity": "critical", "namespace": "$namespace", "app": "web-frontend"},
                  annotations={"summary": "orders are down by half compared with yesterday"}),
        induce=k8s.bad_rollout,
        expected="bad_rollout",
        evidence=("revision 2", "2.4.0"),
    ),
    Scenario(
        name="k8s_pods_pending",
        group="kubernetes",
        rule=Rule(alertname="SearchIndexStale",
                  expr="max(search_index_age_seconds) > 900",
                  labels={"severity": "warning", "namespace": "$namespace", "deployment": "search-indexer"},
                  annotations={"summary": "the search index is more than 15 minutes old"}),
        induce=k8s.pods_pending,
        expected="pods_pending",
        evidence=("Pending", "Insufficient memory"),
    ),
    # ---------------------------------------------------------------- HTTP endpoints
    Scenario(
        name="http_endpoint_refused",
        group="http",
        rule=Rule(alertname="BlackboxProbeFailed",
                  expr='probe_success{job="blackbox", instance="$url"} == 0',
                  labels={"severity": "critical", "job": "blackbox", "instance": "$url"},
                  annotations={"summary": "$url does not answer the blackbox probe"}),
        induce=http.refused,
        expected="endpoint_down",
        evidence=("refused",),
    ),
    Scenario(
        name="http_endpoint_5xx",
        group="http",
        rule=Rule(alertname="PaymentsCheckoutFailing",
                  expr='sum(rate(http_requests_total{job="payments",code=~"5.."}[5m])) / '
                       'sum(rate(http_requests_total{job="payments"}[5m])) > 0.05',
                  labels={"severity": "critical", "job": "payments", "instance": "$instance", "url": "$url"},
                  annotations={"summary": "more than 5% of payment requests fail",
                               "dashboard": "$url"}),
        induce=http.server_errors,
        expected="endpoint_errors",
        evidence=("503",),
    ),
    Scenario(
        name="http_endpoint_slow",
        group="http",
        rule=Rule(alertname="SearchFeelsSluggish",
                  expr='histogram_quantile(0.95, sum by (le) (rate(search_request_seconds_bucket[5m]))) > 1',
                  labels={"severity": "warning", "job": "search", "instance": "$instance", "url": "$url"},
                  annotations={"summary": "search answers take more than 1 s at p95"}),
        induce=http.slow_answers,
        expected="endpoint_slow",
        evidence=("2.",),
    ),
)


def of_group(group: str) -> tuple[Scenario, ...]:
    """The scenarios that share ``group``'s world, in catalogue order."""
    return tuple(s for s in SCENARIOS if s.group == group)
