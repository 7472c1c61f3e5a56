"""Benchmark the indicator store: load, memory, lookups and reload at scale.

Generates a CSV feed of `--indicators` indicators (by default one million: IPv4
addresses, CIDR ranges, host names, URLs and MD5, SHA-1 and SHA-256 hashes), loads
it through `IntelIndex`, and measures:

- load time, and the memory the loaded store takes: the growth of the resident set
  after a collection, an upper bound since the allocator may keep memory the parser
  freed, and the peak resident set,
- lookups per second in one thread: of a mixed stream (a quarter each IP, host, URL
  and hash, about one in ten drawn from the listed values, one in five URLs spelled
  non-canonically), of each kind alone, and of URLs that all need parsing,
- the time `reload_if_changed` takes to read the feed again after its modification
  time changed.

Run: .venv/bin/python bench/intel_lookup.py [--indicators N] [--lookups N]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from autopull.connectors.intel import FeedSettings
from autopull.connectors.intel.index import IntelIndex
from autopull.connectors.intel.indicators import IntelHit

TLDS = ["com", "net", "org", "info", "ru", "co.uk", "com.br", "de", "xyz", "top"]
WORDS = ["mail", "secure", "login", "update", "cdn", "files", "portal", "account"]
# Passes over the mixed lookups; the spread shows how much other load disturbed them.
ROUNDS = 5
# Prefix lengths of generated ranges, /24 the most common as in published block lists.
CIDR_PREFIXES = [16, 18, 20, 21, 22, 23, 24, 24, 24, 24, 25, 26, 27, 28, 29, 30]
# Share of each kind among the generated indicators.
MIX = {"ip": 0.25, "cidr": 0.05, "host": 0.25, "url": 0.20, "hash": 0.25}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--indicators", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    _print_machine(args)
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="intel-bench-"))
    try:
        _run(folder, args.indicators, args.lookups, rng)
    finally:
        shutil.rmtree(folder)


def _run(folder: Path, indicators: int, lookups: int, rng: random.Random) -> None:
    feed = folder / "feed.csv"
    listed = _write_feed(feed, indicators, rng)
    print(f"feed: {indicators} indicators, {feed.stat().st_size / 2**20:.0f} MiB CSV")

    gc.collect()
    rss_before = _rss_bytes()
    index = IntelIndex([FeedSettings(path=feed, source="bench")])
    started = time.perf_counter()
    report = index.load()[0]
    load_seconds = time.perf_counter() - started
    gc.collect()
    rss_growth = _rss_bytes() - rss_before
    print(
        f"load: {load_seconds:.2f} s, accepted {report.accepted_total}, "
        f"rejected {report.rejected}, counts {index.store.counts()}"
    )
    per_million = rss_growth / 2**20 * 1_000_000 / report.accepted_total
    print(
        f"memory: RSS grew {rss_growth / 2**20:.0f} MiB ({per_million:.0f} MiB per "
        f"million indicators); peak RSS {_peak_rss_bytes() / 2**20:.0f} MiB"
    )

    queries = _queries(listed, lookups, rng)
    _measure_lookups(index, queries)

    os.utime(feed, None)
    started = time.perf_counter()
    reloaded = index.reload_if_changed()
    print(f"reload: {time.perf_counter() - started:.2f} s (reloaded={reloaded})")


def _measure_lookups(index: IntelIndex, queries: list[tuple[str, str]]) -> None:
    methods: dict[str, Callable[[str], list[IntelHit]]] = {
        "ip": index.lookup_ip,
        "host": index.lookup_host,
        "url": index.lookup_url,
        "hash": index.lookup_hash,
    }
    calls = [(methods[kind], value) for kind, value in queries]
    rates = []
    for _ in range(ROUNDS):
        gc.collect()
        started = time.perf_counter()
        hits = 0
        for method, value in calls:
            if method(value):
                hits += 1
        rates.append(len(calls) / (time.perf_counter() - started))
    print(
        f"mixed lookups: median {statistics.median(rates):,.0f}/s, best "
        f"{max(rates):,.0f}/s, worst {min(rates):,.0f}/s over {ROUNDS} rounds of "
        f"{len(calls)} lookups ({hits} hits a round)"
    )

    for kind, method in methods.items():
        values = [value for query_kind, value in queries if query_kind == kind]
        _print_rate(f"{kind} lookups", method, values)

    # URLs that miss the normalized-form shortcut and go through yarl.
    urls = [value for kind, value in queries if kind == "url"]
    upper = [url.replace("http://", "HTTP://", 1) for url in urls]
    _print_rate("url lookups, all spelled non-canonically", index.lookup_url, upper)


def _print_rate(
    label: str, method: Callable[[str], list[IntelHit]], values: list[str]
) -> None:
    started = time.perf_counter()
    for value in values:
        method(value)
    seconds = time.perf_counter() - started
    print(f"  {label}: {len(values) / seconds:,.0f}/s")


def _write_feed(path: Path, count: int, rng: random.Random) -> dict[str, list[str]]:
    listed: dict[str, list[str]] = {kind: [] for kind in MIX}
    with path.open("w", encoding="utf-8") as out:
        out.write("type,value,source,confidence,expires\n")
        for kind, share in MIX.items():
            for _ in range(int(count * share)):
                value = _make(kind, rng)
                listed[kind].append(value)
                out.write(f"{'ip' if kind == 'cidr' else kind},{value},,80,\n")
    return listed


def _make(kind: str, rng: random.Random) -> str:
    if kind == "ip":
        return _ipv4(rng)
    if kind == "cidr":
        prefix = rng.choice(CIDR_PREFIXES)
        return f"{_ipv4(rng)}/{prefix}"
    if kind == "host":
        return _host(rng)
    if kind == "url":
        return f"http://{_host(rng)}/{rng.choice(WORDS)}/{rng.getrandbits(40):x}.php"
    bits = rng.choice([128, 160, 256])
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def _host(rng: random.Random) -> str:
    name = f"{rng.choice(WORDS)}-{rng.getrandbits(32):x}"
    return f"{name}.{rng.choice(TLDS)}"


def _queries(
    listed: dict[str, list[str]], count: int, rng: random.Random
) -> list[tuple[str, str]]:
    queries = []
    for number in range(count):
        kind = ("ip", "host", "url", "hash")[number % 4]
        hit = rng.random() < 0.1
        queries.append((kind, _query(kind, hit, listed, rng)))
    rng.shuffle(queries)
    return queries


def _query(
    kind: str, hit: bool, listed: dict[str, list[str]], rng: random.Random
) -> str:
    if kind == "ip":
        return rng.choice(listed["ip"]) if hit else _ipv4(rng)
    if kind == "host":
        host = rng.choice(listed["host"]) if hit else _host(rng)
        return f"{rng.choice(WORDS)}.{host}"
    if kind == "url":
        url = rng.choice(listed["url"]) if hit else _make("url", rng)
        if rng.random() < 0.2:
            # Non-canonical spelling: upper-case host and an encoded unreserved byte.
            scheme, _, rest = url.partition("://")
            host, _, path = rest.partition("/")
            url = f"{scheme}://{host.upper()}/{path.replace('.php', '%2Ephp')}"
        return url
    value = rng.choice(listed["hash"]) if hit else _make("hash", rng)
    return value.upper() if rng.random() < 0.5 else value


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _print_machine(args: argparse.Namespace) -> None:
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("python:", platform.python_version())
    model, cores = "unknown", "unknown"
    if shutil.which("lscpu"):
        output = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout
        fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        cores = fields.get("CPU(s)", cores).strip()
    print(f"machine: {model}, {cores} CPUs; lookups run in one thread")


if __name__ == "__main__":
    main()
