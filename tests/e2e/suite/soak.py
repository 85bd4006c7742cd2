"""`make soak`: rolling restarts under traffic, back to back, counting failed RPCs per rollout.

Not part of `make test` (nor of `make e2e`: pytest collects this file only when it is named, as
`make soak` does through `E2E_TESTS`). For each variant (SOAK_VARIANTS, default
`native,classic,abrupt-native`; the names of test_scenarios.ROLLOUT_VARIANTS) it installs the
release once and starts one Go client (100 RPC/s through the node's agent, `healthy=true`,
round_robin), then runs SOAK_ROLLOUTS (default 20) `kubectl rollout restart`s one after the other.
A rollout counts from the restart until every new pod's instance is passing and every old pod is
gone (its drain over), so the next one starts on a quiet release. The client runs through the
whole series; its report (every failure with its send time, tests/interop/go/README.md) is cut
into the rollouts' windows, and its progress lines (one a second) give the RPCs sent in each.

Prints one line per rollout and a summary per variant, `FIGURE soak_<variant>_…` lines, and writes
`soak-<variant>/` in the artifacts directory: the recorder's timeline and pod logs of the whole
series (timeline.py) and `rollouts.json` (each rollout's window, duration, RPCs sent and failed).
Fails when any rollout of a zero-failure variant lost an RPC, with the timeline of each such
rollout.

Environment: SOAK_ROLLOUTS, SOAK_VARIANTS, E2E_TRAFFIC_RATE (the client's rate, as for the e2e
rollouts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from conftest import deep_merge, figure, log, wait_for
from test_scenarios import (REPLICAS, ROLLOUT_LOG_LEVEL, ROLLOUT_VARIANTS, TRAFFIC_RATE, client_pod, client_report,
                            pod_names)
from timeline import RolloutRecorder

ROLLOUTS = int(os.environ.get("SOAK_ROLLOUTS", "20"))
VARIANTS = [v for v in os.environ.get("SOAK_VARIANTS", "native,classic,abrupt-native").split(",") if v]
CLIENT = "hello-client"
# Longer than any series: the client is stopped (SIGTERM) when the series ends.
CLIENT_SECONDS = 120 * ROLLOUTS + 300
PROGRESS = re.compile(r"unix=([\d.]+) t=[\d.]+s sent=(\d+)")


def sent_between(progress: list[tuple[float, int]], since: float, until: float) -> int:
    """RPCs sent between two times, from the client's cumulative progress lines (to 1 s)."""
    def at(t: float) -> int:
        before = [sent for stamp, sent in progress if stamp <= t]
        return before[-1] if before else 0

    return at(until) - at(since)


@pytest.mark.parametrize("variant", VARIANTS)
def test_soak_rollouts_under_traffic(demo, kube, artifacts, variant):
    if variant not in ROLLOUT_VARIANTS:
        pytest.fail(f"SOAK_VARIANTS names {variant!r}; known: {', '.join(ROLLOUT_VARIANTS)}")
    values, zero_failures = ROLLOUT_VARIANTS[variant]
    d = demo(deep_merge(json.loads(json.dumps(values)), ROLLOUT_LOG_LEVEL),
             suffix="-soak-" + "".join(w[0] for w in variant.split("-")))
    wait_for("all passing", lambda: d.all_passing(REPLICAS), 120)

    directory = artifacts / f"soak-{variant}"
    recorder = RolloutRecorder(kube, d.consul, d.namespace, d.service, d.selector, directory)
    recorder.start()
    client_log = directory / "client.log"
    follower = None
    rollouts: list[dict] = []
    report = None
    try:
        kube.apply(client_pod(d.service, name=CLIENT, seconds=CLIENT_SECONDS,
                              extra_args=("-report-every", "1s", "-keep-failures", "1000000")), d.namespace)
        wait_for("the Go client sending (a first successful RPC through Consul)",
                 lambda: "sending" in kube.logs(d.namespace, CLIENT, CLIENT), 60, 0.5)
        # The client's whole output, its final report included, followed until it exits.
        with open(client_log, "w") as out:
            follower = subprocess.Popen([kube.bin, "-n", d.namespace, "logs", "-f", "--timestamps", CLIENT, "-c",
                                         CLIENT], stdout=out, stderr=subprocess.STDOUT)
        began = time.monotonic()
        for n in range(1, ROLLOUTS + 1):
            before = set(pod_names(d))
            since = time.time()
            recorder.mark(f"rollout {n}: kubectl rollout restart")
            kube.run("-n", d.namespace, "rollout", "restart", d.deployment)
            kube.run("-n", d.namespace, "rollout", "status", d.deployment, "--timeout=180s", timeout=200)
            wait_for(f"rollout {n}: the new pods all passing",
                     lambda: d.all_passing(REPLICAS) and not (set(pod_names(d)) & before), 120, 0.25)
            passing_at = time.time()
            wait_for(f"rollout {n}: the old pods gone", lambda: not ({
                p["metadata"]["name"] for p in kube.json("-n", d.namespace, "get", "pods", "-l", d.selector)["items"]
            } & before), 120, 0.5)
            until = time.time()
            recorder.mark(f"rollout {n}: done (new pods passing, old pods gone)")
            rollouts.append({"rollout": n, "since": since, "until": until,
                             "to_all_passing_s": round(passing_at - since, 2), "duration_s": round(until - since, 2)})
            log(f"soak {variant}: rollout {n}/{ROLLOUTS} done in {until - since:.1f} s")
        series_seconds = time.monotonic() - began

        assert container_running(kube, d.namespace), \
            f"the Go client stopped before the series ended (it sends for {CLIENT_SECONDS} s)"
        recorder.mark("series done: stopping the client (SIGTERM)")
        kube.run("-n", d.namespace, "delete", "pod", CLIENT, "--wait=false")
        follower.wait(timeout=60)
        recorder.client_log(client_log.read_text())
        report = client_report(client_log.read_text())
    finally:
        if follower and follower.poll() is None:
            follower.terminate()
            follower.wait()
        recorder.stop()
        recorder.write(report)

    progress = [(float(m.group(1)), int(m.group(2))) for m in PROGRESS.finditer(client_log.read_text())]
    failures = report["failures"]
    assert report["failures_dropped"] == 0, report["failures_dropped"]
    for r in rollouts:
        mine = [f for f in failures if r["since"] <= f["sent_at"] < r["until"]]
        r["rpcs_sent"] = sent_between(progress, r["since"], r["until"])
        r["rpcs_failed"] = len(mine)
        r["errors"] = {code: sum(1 for f in mine if f["code"] == code) for code in sorted({f["code"] for f in mine})}
        r["first_error"] = mine[0] if mine else None
    outside = [f for f in failures if not any(r["since"] <= f["sent_at"] < r["until"] for r in rollouts)]
    (directory / "rollouts.json").write_text(json.dumps(rollouts, indent=1) + "\n")

    for r in rollouts:
        log(f"soak {variant}: rollout {r['rollout']:>2}: {r['rpcs_failed']:>4} failed of {r['rpcs_sent']:>5} RPCs "
            f"{r['errors'] or ''} (all passing after {r['to_all_passing_s']:.1f} s, old pods gone after "
            f"{r['duration_s']:.1f} s)")
    failed_rollouts = [r for r in rollouts if r["rpcs_failed"]]
    name = variant.replace("-", "_")
    durations = sorted(r["duration_s"] for r in rollouts)
    figure(f"soak_{name}_rollouts", len(rollouts), "rollouts")
    figure(f"soak_{name}_rollouts_with_failed_rpcs", len(failed_rollouts), "rollouts")
    figure(f"soak_{name}_rpcs_sent", report["sent"], "RPCs")
    figure(f"soak_{name}_rpcs_failed", report["failed"], "RPCs")
    figure(f"soak_{name}_rpcs_failed_between_rollouts", len(outside), "RPCs")
    figure(f"soak_{name}_most_failed_in_one_rollout", max((r["rpcs_failed"] for r in rollouts), default=0), "RPCs")
    figure(f"soak_{name}_rollout_duration_median", durations[len(durations) // 2], "s")
    figure(f"soak_{name}_rollout_duration_max", durations[-1], "s")
    figure(f"soak_{name}_series_duration", series_seconds, "s")
    figure(f"soak_{name}_rate", TRAFFIC_RATE, "RPC/s")
    for line in recorder.summary(report):
        log(f"soak {variant}: {line}")
    log(f"soak {variant}: timeline, pod logs and rollouts.json in {directory}")
    if zero_failures and report["failed"]:
        for r in failed_rollouts:
            print(f"--- rollout {r['rollout']} lost {r['rpcs_failed']} RPCs", flush=True)
            print(recorder.explain({**report, "failures": [f for f in failures if r["since"] <= f["sent_at"] < r["until"]]}),
                  flush=True)
        if outside:
            print(recorder.explain({**report, "failures": outside}), flush=True)
        pytest.fail(f"soak {variant}: {report['failed']} failed RPCs in {len(failed_rollouts)} of {len(rollouts)} "
                    f"rollouts ({len(outside)} between rollouts): {report['errors']}")


def container_running(kube, namespace: str) -> bool:
    pod = kube.pod(namespace, CLIENT) or {}
    return any("running" in (c.get("state") or {}) for c in pod.get("status", {}).get("containerStatuses", []))
