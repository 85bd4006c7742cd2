"""Prints what Consul's catalog holds for one service, one line per instance:
`<instance id> <status> <address>`, where the status is the worst of the instance's checks (as
Consul's own `?passing` filter sees it). Exits 1 if Consul does not answer.

    python3 consul_instances.py http://127.0.0.1:18500 hello
"""

import json
import sys
import urllib.request

RANK = {"passing": 0, "warning": 1, "critical": 2}


def main() -> int:
    url, service = sys.argv[1], sys.argv[2]
    try:
        with urllib.request.urlopen(f"{url}/v1/health/service/{service}", timeout=5) as response:
            entries = json.load(response)
    except OSError as e:
        print(f"consul_instances: {url}: {e}", file=sys.stderr)
        return 1
    for entry in entries:
        statuses = [c["Status"] for c in entry["Checks"]] or ["passing"]
        worst = max(statuses, key=lambda s: RANK.get(s, 3))
        print(entry["Service"]["ID"], worst, entry["Service"]["Address"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
