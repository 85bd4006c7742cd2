"""What happened during a rollout under traffic, kept so that a failed one explains itself.

`RolloutRecorder` follows a release while the Go client sends, each source on its own thread:

- **Consul's view of the service**: a blocking query on `/v1/health/service/<service>` (through a
  port-forward of its own); every change of an instance (added, removed, its checks' statuses and
  outputs, the node's `serfHealth`) and of the *passing set* (instances whose checks all pass:
  what the client's `healthy=true` resolver gets) becomes an event.
- **The agents' serf health**: a blocking query on every node's `serfHealth` check: a node agent
  that the servers see failed makes every instance on it critical at once.
- **The pods**: `kubectl get pods --watch` of the release: phase, IP, Ready, deletion, each
  container's state.
- **The pods' logs**: `kubectl logs -f --timestamps` of the sidecar and the app of every pod of the
  release (they die during the rollout, so they are collected while they run); sidecar lines that
  matter (drains, heals, verdicts, registrations, signals) become events.
- **The suite's own stalls**: a thread that wakes every 50 ms and notes when it woke 250 ms late or
  more (the machine was too busy to run it); the client reports its own the same way.

`write(report)` merges all that with the Go client's report (its resolver updates, channel states
and failures, see tests/interop/go/README.md) into `timeline.txt` in the recorder's directory,
beside the raw answers (`consul.jsonl`, `pods.jsonl`), the logs (`logs/`) and `client-report.json`.
`explain(report)` is the text printed when RPCs failed: the window around the failures, the
passing set's and serf health's changes, and the sidecar log lines that matter.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

# Sidecar log lines that make events (the rest stays in the log files).
SIDECAR_EVENTS = re.compile(
    r"drain healed|health port is closed|back and serving|holding a new one|drain requested|draining|drained|"
    r"signal received|health verdict changed|registered instance|Consul check updated|could not|failed|"
    r"in step again|is back in Consul|WARN|ERROR")
STALL_AT = 0.25  # a recorder thread late by this much (seconds) is a stall worth noting


@dataclass(order=True)
class Event:
    at: float  # unix seconds
    source: str = field(compare=False)
    text: str = field(compare=False)

    def line(self, zero: float) -> str:
        stamp = datetime.fromtimestamp(self.at).strftime("%H:%M:%S.%f")[:-3]
        return f"{stamp} {self.at - zero:+9.3f}s  {self.source:<8} {self.text}"


def kubelet_time(stamp: str) -> float | None:
    """`kubectl logs --timestamps`' RFC 3339 time (nanoseconds, `Z`) as unix seconds."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    if not match:
        return None
    whole, frac, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(whole + zone).timestamp() + float(frac or 0)


class RolloutRecorder:
    """Records a release's rollout; see the module's comment. `start()`, then `stop()` and
    `write(report)`; `mark(text)` adds the suite's own steps to the timeline."""

    def __init__(self, kube, consul, namespace: str, service: str, selector: str, directory: Path) -> None:
        from conftest import Consul  # the suite's port-forwarded Consul client

        self.kube = kube
        # Each watch gets a port-forward of its own (blocking queries must not hold up the test's
        # reads, nor each other).
        self.new_consul = lambda: Consul(kube, service=consul.service, namespace=consul.namespace)
        self.consul_namespace = consul.namespace
        self.namespace = namespace
        self.service = service
        self.selector = selector
        self.dir = directory
        self.logs_dir = directory / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen] = []
        self.followed: set[tuple[str, str]] = set()
        self.followers: list[threading.Thread] = []
        self.pod_ips: dict[str, str] = {}  # pod IP → pod name, for the client's addresses
        self.heal_lines: list[str] = []
        self.stalls: list[float] = []
        self.port_closed_after_drain = 0
        self.started_at = time.time()

    # ---- recording --------------------------------------------------------------------------

    def add(self, at: float, source: str, text: str) -> None:
        with self.lock:
            self.events.append(Event(at, source, text))

    def mark(self, text: str) -> None:
        self.add(time.time(), "suite", text)

    def start(self) -> None:
        self.started_at = time.time()
        self.mark(f"recording {self.namespace}: service {self.service}, pods {self.selector}")
        for target in (self._watch_service, self._watch_serf, self._watch_pods, self._watch_stalls):
            t = threading.Thread(target=target, name=f"record-{target.__name__}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        """Stops every watch; log followers of pods still running are stopped too (the logs so
        far are kept)."""
        self.mark("recording stopped")
        self.stopping.set()
        self._end_processes()
        with self.lock:
            threads = self.threads + self.followers
        for t in threads:
            t.join(timeout=15)
        self._end_processes()  # any a thread started while it was being stopped
        self._scan_logs()
        self._consul_logs()

    def _end_processes(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @staticmethod
    def _blocking(consul, path: str, index: int) -> tuple[object, int]:
        """One blocking query (`index`, 2 s wait so that stop() is prompt); (answer, new index)."""
        if consul.proc is None or consul.proc.poll() is not None:
            consul._forward()
        sep = "&" if "?" in path else "?"
        url = f"{consul.url}{path}{sep}index={index}&wait=2s"
        with urllib.request.urlopen(url, timeout=10) as response:
            new_index = int(response.headers.get("X-Consul-Index") or 0)
            return json.load(response), new_index

    def _watch(self, path: str, raw_name: str, on_answer) -> None:
        consul = self.new_consul()
        try:
            self._watch_with(consul, path, raw_name, on_answer)
        finally:
            consul.close()

    def _watch_with(self, consul, path: str, raw_name: str, on_answer) -> None:
        index = 0
        failures = 0
        with open(self.dir / raw_name, "a") as raw:
            while not self.stopping.is_set():
                try:
                    answer, new_index = self._blocking(consul, path, index)
                except (OSError, ValueError) as e:
                    failures += 1
                    if failures in (1, 10, 100):
                        self.add(time.time(), "consul", f"query {path} failed ({failures}×): {e}")
                    consul.close()
                    time.sleep(0.2)
                    continue
                at = time.time()
                # An index that went backwards (a Consul restart) starts over, as Consul advises.
                index = new_index if new_index >= index else 0
                raw.write(json.dumps({"at": at, "index": new_index, "answer": answer}) + "\n")
                on_answer(at, answer)

    def _watch_service(self) -> None:
        previous: dict[str, dict] = {}
        previous_passing: list[str] | None = None

        def on_answer(at: float, entries) -> None:
            nonlocal previous, previous_passing
            now: dict[str, dict] = {}
            for entry in entries:
                svc = entry["Service"]
                checks = {c["CheckID"]: (c["Status"], (c.get("Output") or "").strip().splitlines()[:1])
                          for c in entry["Checks"]}
                meta = svc.get("Meta") or {}
                now[svc["ID"]] = {
                    "pod": meta.get("pod-name", "?"), "address": f"{svc['Address']}:{svc['Port']}",
                    "node": entry["Node"]["Node"], "checks": checks,
                    "passing": all(s == "passing" for s, _ in checks.values()),
                }
            for iid in sorted(set(previous) | set(now)):
                old, new = previous.get(iid), now.get(iid)
                if old == new:
                    continue
                who = (new or old)["pod"] + " " + (new or old)["address"]
                if new is None:
                    self.add(at, "consul", f"{who}: deregistered")
                    continue
                changed = [f"{cid}={s}" + (f" ({out[0][:80]})" if out and s != "passing" else "")
                           for cid, (s, out) in sorted(new["checks"].items())
                           if old is None or old["checks"].get(cid, (None,))[0] != s]
                verb = "registered" if old is None else "checks"
                if changed or old is None:
                    self.add(at, "consul", f"{who}: {verb} {', '.join(changed)} on node {new['node']}")
            passing = sorted(f"{v['pod']}@{v['address']}" for v in now.values() if v["passing"])
            if passing != previous_passing:
                self.add(at, "passing", f"{len(passing)} passing: {' '.join(passing) or '(none)'}")
            previous, previous_passing = now, passing

        self._watch(f"/v1/health/service/{urllib.parse.quote(self.service)}", "consul.jsonl", on_answer)

    def _watch_serf(self) -> None:
        previous: dict[str, str] = {}

        def on_answer(at: float, checks) -> None:
            nonlocal previous
            now = {c["Node"]: c["Status"] for c in checks}
            for node in sorted(set(previous) | set(now)):
                if previous.get(node) != now.get(node):
                    output = next(((c.get("Output") or "").strip() for c in checks if c["Node"] == node), "")
                    detail = f" ({output[:80]})" if now.get(node) not in ("passing", None) else ""
                    self.add(at, "serf", f"serfHealth of node {node}: {previous.get(node, 'new')} → "
                                         f"{now.get(node, 'gone')}{detail}")
            previous = now

        query = urllib.parse.quote('CheckID == "serfHealth"')
        self._watch(f"/v1/health/state/any?filter={query}", "serf.jsonl", on_answer)

    def _watch_pods(self) -> None:
        """`kubectl get pods --watch` of the release; starts the log followers of each new pod."""
        previous: dict[str, str] = {}
        while not self.stopping.is_set():
            proc = subprocess.Popen(
                [self.kube.bin, "-n", self.namespace, "get", "pods", "-l", self.selector, "--watch",
                 "--output-watch-events", "-o", "json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            with self.lock:
                self.procs.append(proc)
            decoder = json.JSONDecoder()
            buffer = ""
            assert proc.stdout is not None
            with open(self.dir / "pods.jsonl", "a") as raw:
                for chunk in iter(lambda: proc.stdout.readline(), ""):
                    buffer += chunk
                    while True:
                        stripped = buffer.lstrip()
                        try:
                            event, end = decoder.raw_decode(stripped)
                        except ValueError:
                            break
                        buffer = stripped[end:]
                        at = time.time()
                        raw.write(json.dumps({"at": at, "event": event}) + "\n")
                        self._on_pod(at, event, previous)
            proc.wait()
            if not self.stopping.is_set():
                time.sleep(0.5)  # the watch ended (API server's timeout): watch again

    def _on_pod(self, at: float, event: dict, previous: dict[str, str]) -> None:
        pod = event.get("object") or {}
        name = pod.get("metadata", {}).get("name")
        if not name:
            return
        status = pod.get("status", {})
        if status.get("podIP"):
            self.pod_ips[status["podIP"]] = name
        if event.get("type") == "DELETED":
            summary = "deleted (the pod object is gone)"
        else:
            ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), "?")
            containers = []
            for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
                state = next(iter(c.get("state") or {"unknown": {}}))
                detail = (c.get("state") or {}).get(state, {})
                code = f" exit {detail['exitCode']}" if "exitCode" in detail else ""
                reason = f" {detail['reason']}" if detail.get("reason") and state != "running" else ""
                containers.append(f"{c['name']}={state}{code}{reason}{' ready' if c.get('ready') else ''}")
            deleting = " deleting" if pod["metadata"].get("deletionTimestamp") else ""
            summary = (f"{status.get('phase', '?')} ip={status.get('podIP', '-')} ready={ready}{deleting} "
                       f"[{' '.join(containers)}]")
        if previous.get(name) != summary:
            previous[name] = summary
            self.add(at, "pod", f"{name}: {summary}")
        if event.get("type") != "DELETED":
            # Followed once the container has started (no kubectl run spent on one not there yet).
            started = {c["name"] for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", [])
                       if {"running", "terminated"} & set(c.get("state") or {})}
            for container in ("consul-registrar", "app"):
                if container in started and (name, container) not in self.followed:
                    self.followed.add((name, container))
                    t = threading.Thread(target=self._follow_logs, args=(name, container), daemon=True)
                    t.start()
                    with self.lock:
                        self.followers.append(t)

    def _follow_logs(self, pod: str, container: str) -> None:
        """`kubectl logs -f --timestamps` of one started container into logs/<pod>.<container>.log
        (retried a few times if kubectl cannot yet); ends when the container ends (or at stop())."""
        path = self.logs_dir / f"{pod}.{container}.log"
        for _ in range(10):
            if self.stopping.is_set():
                return
            with open(path, "w") as out:
                proc = subprocess.Popen(
                    [self.kube.bin, "-n", self.namespace, "logs", "-f", "--timestamps", pod, "-c", container],
                    stdout=out, stderr=subprocess.PIPE, text=True)
                with self.lock:
                    self.procs.append(proc)
                _, err = proc.communicate()
            if proc.returncode == 0 or path.stat().st_size > 0:
                return
            if "not found" in (err or "") and "pods" in (err or ""):
                return  # the pod is gone before its container ever ran
            time.sleep(1)

    def _watch_stalls(self) -> None:
        step = 0.05
        last = time.monotonic()
        while not self.stopping.is_set():
            time.sleep(step)
            now = time.monotonic()
            late = now - last - step
            if late >= STALL_AT:
                self.stalls.append(late)
                self.add(time.time(), "stall", f"the suite's recorder woke {late:.2f} s late (a busy machine)")
            last = now

    def _scan_logs(self) -> None:
        """Sidecar log lines that matter become events (at the kubelet's timestamp). The heal
        watch's lines are sorted out: `drain healed` in a rollout is always suspect (no deleted pod
        comes back), and so is `health port is closed` before the drain ended (the app went away,
        or seemed to, while its preStop was still waiting); after the drain it is the app stopping
        as it should."""
        self.heal_lines = []
        self.port_closed_after_drain = 0
        for path in sorted(self.logs_dir.glob("*.log")):
            pod, container = path.name[:-len(".log")].rsplit(".", 1)
            drained_at = None
            closed: list[tuple[float, str]] = []
            for line in path.read_text(errors="replace").splitlines():
                stamp, _, text = line.partition(" ")
                at = kubelet_time(stamp)
                if at is None:
                    continue
                text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
                if container == "consul-registrar" and SIDECAR_EVENTS.search(text):
                    self.add(at, "sidecar", f"{pod}: {text[:300]}")
                    if "drained: every instance" in text and drained_at is None:
                        drained_at = at
                    if "drain healed" in text:
                        self.heal_lines.append(f"{pod}: {text}")
                    if "health port is closed" in text:
                        closed.append((at, text))
                elif container == "app" and re.search(r"signal|shut|stop|listen", text, re.I):
                    self.add(at, "app", f"{pod}: {text[:300]}")
            self.heal_lines += [f"{pod} (before its drain ended): {text}" for at, text in closed
                                if drained_at is None or at < drained_at]
            self.port_closed_after_drain += sum(
                1 for at, _ in closed if drained_at is not None and at >= drained_at)

    def _consul_logs(self) -> None:
        """The Consul pods' logs (servers and node agents) of the recording's time, kept in
        logs/consul.<pod>.log; their warnings and errors (a failed subscription of the agent's
        streaming view, a member suspected by serf...) become events."""
        since = datetime.fromtimestamp(self.started_at).astimezone().isoformat()
        try:
            pods = self.kube.json("-n", self.consul_namespace, "get", "pods")["items"]
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            self.add(time.time(), "consul", f"could not list the Consul pods for their logs: {e}")
            return
        for pod in pods:
            name = pod["metadata"]["name"]
            text = self.kube.run("-n", self.consul_namespace, "logs", name, "--timestamps", f"--since-time={since}",
                                 "--all-containers", check=False)
            (self.logs_dir / f"consul.{name}.log").write_text(text)
            for line in text.splitlines():
                stamp, _, rest = line.partition(" ")
                at = kubelet_time(stamp)
                # (An agent's 404 for an instance not registered yet is the sidecar's first read.)
                if at is not None and re.search(r"\[(WARN|ERROR)\]|suspect|failed|serf", rest) \
                        and "unknown service ID" not in rest:
                    self.add(at, "consul", f"{name}: {rest.strip()[:300]}")

    def client_log(self, text: str) -> None:
        """The Go client's output (`kubectl logs --timestamps`), kept as client.log; its resolver's
        and gRPC's own error lines (a failed Consul query, an address list it could not apply)
        become events."""
        (self.dir / "client.log").write_text(text)
        for line in text.splitlines():
            stamp, _, rest = line.partition(" ")
            at = kubelet_time(stamp)
            if at is not None and re.search(r"Consul resolver|ERROR|WARNING", rest):
                self.add(at, "client", rest.strip()[:300])

    # ---- the client's report ----------------------------------------------------------------

    def _pod_of(self, address: str) -> str:
        ip = address.rsplit(":", 1)[0]
        return f"{self.pod_ips.get(ip, '?')}@{address}"

    def _client_events(self, report: dict) -> list[Event]:
        events = [Event(u["at"], "client", "resolver: " + (" ".join(self._pod_of(a) for a in u["addresses"])
                                                           or "(no address)"))
                  for u in report.get("resolver_updates", [])]
        events += [Event(s["at"], "client", f"channel {s['state']}") for s in report.get("channel_states", [])]
        events += [Event(s["at"], "client", f"the client's process woke {s['seconds']:.2f} s late (starved)")
                   for s in report.get("stalls", [])]
        if report.get("started_at"):
            events.append(Event(report["started_at"], "client", "counting starts"))
        # Failures in runs: same code and peer, each run one event at its first failure's send.
        run: list[dict] = []

        def flush() -> None:
            if run:
                first, last = run[0], run[-1]
                peer = self._pod_of(first["peer"]) if first["peer"] else "no connection picked"
                events.append(Event(first["sent_at"], "client",
                                    f"{len(run)} × {first['code']} via {peer}, sent "
                                    f"{datetime.fromtimestamp(first['sent_at']).strftime('%H:%M:%S.%f')[:-3]}–"
                                    f"{datetime.fromtimestamp(last['sent_at']).strftime('%H:%M:%S.%f')[:-3]}, "
                                    f"ended by {datetime.fromtimestamp(last['at']).strftime('%H:%M:%S.%f')[:-3]}: "
                                    f"{first['error'][:160]}"))
                run.clear()

        for f in sorted(report.get("failures", []), key=lambda f: f["sent_at"]):
            if run and (f["code"], f["peer"]) != (run[0]["code"], run[0]["peer"]):
                flush()
            run.append(f)
        flush()
        return events

    # ---- output -----------------------------------------------------------------------------

    def timeline(self, report: dict | None) -> list[Event]:
        with self.lock:
            events = list(self.events)
        if report:
            events += self._client_events(report)
        return sorted(events)

    def write(self, report: dict | None) -> Path:
        """Writes timeline.txt (and client-report.json); returns the timeline's path."""
        if report is not None:
            (self.dir / "client-report.json").write_text(json.dumps(report, indent=1) + "\n")
        path = self.dir / "timeline.txt"
        events = self.timeline(report)
        with open(path, "w") as out:
            out.write(f"# {self.namespace}: times are the host's clock; +s from the recording's start\n")
            for line in self.summary(report):
                out.write(f"# {line}\n")
            for e in events:
                out.write(e.line(self.started_at) + "\n")
        return path

    def serf_failures(self) -> list[Event]:
        """Every serfHealth change away from passing (a node its servers declared failed)."""
        with self.lock:
            return [e for e in self.events
                    if e.source == "serf" and "→ passing" not in e.text and "new →" not in e.text]

    def summary(self, report: dict | None) -> list[str]:
        with self.lock:
            events = list(self.events)
        lines = []
        if report:
            first_at = report.get("first_error_at")
            first_at = datetime.fromtimestamp(first_at).strftime("%H:%M:%S.%f")[:-3] if first_at else "-"
            peer = report.get("first_error_peer")
            lines.append(f"client: sent {report.get('sent')}, failed {report.get('failed')} {report.get('errors')}; "
                         f"first error at {first_at} via {self._pod_of(peer) if peer else 'no connection picked'}: "
                         f"{report.get('first_error') or '-'}")
        lines.append(f"serfHealth changes away from passing: {len(self.serf_failures())}")
        empty = [e for e in events if e.source == "passing" and e.text.startswith("0 passing")]
        lines.append(f"moments with no passing instance: {len(empty)}")
        lines.append(f"suite stalls ≥ {STALL_AT} s: {len(self.stalls)}"
                     + (f" (longest {max(self.stalls):.2f} s)" if self.stalls else ""))
        client_stalls = [s["seconds"] for s in (report or {}).get("stalls", [])]
        lines.append(f"client stalls ≥ {STALL_AT} s: {len(client_stalls)}"
                     + (f" (longest {max(client_stalls):.2f} s)" if client_stalls else ""))
        lines.append(f"sidecar lines 'drain healed', or 'health port is closed' before the drain ended: "
                     f"{len(self.heal_lines)} (after the drain ended, as the app stops: {self.port_closed_after_drain})")
        lines.extend(f"  {line}" for line in self.heal_lines[:20])
        return lines

    def explain(self, report: dict, before: float = 8.0, after: float = 3.0) -> str:
        """The text printed when RPCs failed: the summary, and every event from `before` s ahead
        of the first failure's send to `after` s after the last failure."""
        failures = report.get("failures") or []
        events = self.timeline(report)
        if failures:
            since = min(f["sent_at"] for f in failures) - before
            until = max(f["at"] for f in failures) + after
        else:
            since, until = self.started_at, float("inf")
        window = [e.line(self.started_at) for e in events if since <= e.at <= until]
        return "\n".join(["--- what happened (full timeline: " + str(self.dir / "timeline.txt") + ")",
                          *self.summary(report), *window, "---"])
