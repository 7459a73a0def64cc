"""Windows, derived figures, ratios against the direct long-poll baseline,
and the tables (Markdown for docs, plain text for the terminal)."""

from __future__ import annotations

import math

MODE_TITLES = {
    "direct": "direct long-poll",
    "longpoll": "mxsse long-poll mode",
    "replication": "mxsse replication mode",
    "relay": "replication + presence relay (set_state)",
    "relay-keepalive": "replication + presence relay (keepalive /sync)",
}


def _window_figures(f: dict, tag: str, w: dict) -> None:
    """What every active window has: deliveries, latency, the homeserver's part."""
    f[f"{tag}_deliveries"] = w.get("deliveries", 0)
    f[f"{tag}_deliveries_expected"] = w.get("deliveries_expected", 0)
    f[f"{tag}_missing"] = w.get("deliveries_expected", 0) - w.get("deliveries", 0)
    f[f"{tag}_duplicates"] = w.get("duplicates", 0)
    lat = w.get("latency_ms", {})
    for p in ("p50", "p95", "p99", "max"):
        f[f"{tag}_latency_{p}_ms"] = lat.get(p)
    put = w.get("latency_from_put_ms", {})
    for p in ("p50", "p99"):
        f[f"{tag}_latency_from_put_{p}_ms"] = put.get(p)
    for part in ("send_wait", "send_answered", "send_published"):
        for p in ("p50", "p99"):
            f[f"{tag}_{part}_{p}_ms"] = w.get(f"{part}_ms", {}).get(p)


def _wake_means(f: dict, tag: str, mx: dict) -> None:
    """mxsse's wake queue and woken-fetch histogram means over a window."""
    if mx.get("wq_count"):
        f[f"{tag}_wake_queue_mean_ms"] = 1000 * mx["wq_sum"] / mx["wq_count"]
    if mx.get("wf_count"):
        f[f"{tag}_woken_fetch_mean_ms"] = 1000 * mx["wf_sum"] / mx["wf_count"]


def _delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)
            if isinstance(b.get(k, 0), (int, float)) and isinstance(a.get(k, 0), (int, float))}


def window(s0: dict, s1: dict, n_clients: int) -> dict:
    """Differences between two snapshots."""
    w = {k: s1[k] - s0[k] for k in ("t", "hs_sync", "hs_requests", "hs_sync_servlet_cpu", "hs_set_state",
                                    "synapse_cpu", "postgres_cpu", "redis_cpu", "bench_cpu",
                                    "deliveries", "duplicates")}
    w["seconds"] = w.pop("t")
    w["client_hours"] = n_clients * w["seconds"] / 3600
    w["mxsse_cpu"] = s1.get("mxsse_cpu", 0) - s0.get("mxsse_cpu", 0)
    w["client"] = _delta(s0["client"], s1["client"])
    w["redis_rows"] = _delta(s0["redis_rows"], s1["redis_rows"])
    if "mx" in s1:
        w["mx"] = _delta(s0["mx"], s1["mx"])
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in w.items()}


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))], 1)

    return {"count": len(s), "p50": q(0.50), "p95": q(0.95), "p99": q(0.99),
            "max": round(s[-1], 1), "mean": round(sum(s) / len(s), 1)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares KB per stream between the checkpoints."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den, 2) if den else None


# --------------------------------------------------------------------------
# headline figures

def _figures(m: dict, floor: dict | None = None) -> dict:
    """The figures compared across modes, for one mode's result; `floor`,
    the window with no client, is subtracted from Synapse's idle CPU."""
    f: dict = {}
    idle, act = m["idle"], m["active"]
    ch = idle["client_hours"] or 1e-9
    mxi, mxa = idle.get("mx", {}), act.get("mx", {})
    ci, ca = idle["client"], act["client"]
    server_i = idle["synapse_cpu"] + idle["postgres_cpu"] + idle["redis_cpu"] + idle["mxsse_cpu"]
    server_a = act["synapse_cpu"] + act["postgres_cpu"] + act["redis_cpu"] + act["mxsse_cpu"]
    f["idle_sync_per_client_hour"] = idle["hs_sync"] / ch
    f["idle_other_hs_requests_per_client_hour"] = (idle["hs_requests"] - idle["hs_sync"]) / ch
    f["idle_empty_per_client_hour"] = (mxi.get("sync_empty", 0) if mxi else ci.get("empty", 0)) / ch
    f["idle_synapse_cpu_s_per_client_hour"] = idle["synapse_cpu"] / ch
    if floor and floor.get("seconds"):
        fl = floor["synapse_cpu"] / floor["seconds"] * idle["seconds"]
        f["idle_synapse_cpu_net_s_per_client_hour"] = max(0.0, idle["synapse_cpu"] - fl) / ch
    # the presence relay's work, per client-hour: presence_set_state calls
    # Synapse received, USER_SYNC lines on the channel, keepalive /syncs
    f["idle_set_state_per_client_hour"] = idle.get("hs_set_state", 0) / ch
    f["idle_user_sync_per_client_hour"] = idle["redis_rows"].get("USER_SYNC", 0) / ch
    f["idle_presence_sync_per_client_hour"] = mxi.get("sync_presence", 0) / ch if mxi else None
    f["idle_postgres_cpu_s_per_client_hour"] = idle["postgres_cpu"] / ch
    f["idle_mxsse_cpu_s_per_client_hour"] = idle["mxsse_cpu"] / ch
    f["idle_server_cpu_s_per_client_hour"] = server_i / ch
    f["idle_client_bytes_per_client_hour"] = (ci.get("bytes_in", 0) + ci.get("bytes_out", 0)) / ch
    f["idle_bench_cpu_s_per_client_hour"] = idle["bench_cpu"] / ch
    f["idle_presence_rows"] = idle["redis_rows"].get("RDATA presence", 0)
    f["idle_mx_reasons"] = _reasons(mxi)
    f["active_mx_reasons"] = _reasons(mxa)
    f["idle_presence_offline_rows"] = idle["redis_rows"].get("presence:offline", 0)

    d = m.get("deliveries", 0) or 1e-9
    f["active_messages"] = m.get("messages_sent", 0)
    _window_figures(f, "active", m)
    f["active_hs_sync"] = act["hs_sync"]
    f["active_sync_per_delivery"] = act["hs_sync"] / d
    f["active_empty"] = mxa.get("sync_empty", 0) if mxa else ca.get("empty", 0)
    f["active_synapse_cpu_s"] = act["synapse_cpu"]
    f["active_postgres_cpu_s"] = act["postgres_cpu"]
    f["active_mxsse_cpu_s"] = act["mxsse_cpu"]
    f["active_server_cpu_s"] = server_a
    f["active_server_cpu_ms_per_delivery"] = 1000 * server_a / d
    f["active_client_bytes_per_delivery"] = (ca.get("bytes_in", 0) + ca.get("bytes_out", 0)) / d
    f["active_client_bytes_in_per_delivery"] = ca.get("bytes_in", 0) / d
    f["active_client_bytes_out_per_delivery"] = ca.get("bytes_out", 0) / d
    f["active_bench_cpu_s"] = act["bench_cpu"]
    f["active_presence_rows"] = act["redis_rows"].get("RDATA presence", 0)
    if mxa.get("w2d_count"):
        f["active_wake_to_delivery_mean_ms"] = 1000 * mxa["w2d_sum"] / mxa["w2d_count"]
    _wake_means(f, "active", mxa)
    f["active_set_state"] = act.get("hs_set_state", 0)
    f["active_user_sync"] = act["redis_rows"].get("USER_SYNC", 0)
    for extra in m.get("more_rates", []):
        tag = f"at{extra['rate']:g}"
        _window_figures(f, tag, extra)
        f[f"{tag}_messages"] = extra["messages_sent"]
        ew = extra.get("window", {})
        f[f"{tag}_synapse_cpu_s"] = ew.get("synapse_cpu")
        _wake_means(f, tag, ew.get("mx", {}))
    if "rss_start_kb" in m:
        f["rss_start_kb"] = m["rss_start_kb"]
        f["rss_idle_kb"] = m.get("rss_idle_kb")
        f["rss_after_active_kb"] = m.get("rss_after_active_kb")
        f["rss_end_kb"] = m.get("rss_end_kb")
        f["replay_kb_after_active"] = m.get("replay_kb_after_active")
        f["replay_kb_end"] = m.get("replay_kb_end")
        n = max(1, m.get("streams_open_idle") or 1)
        f["rss_per_stream_kb"] = (m["rss_idle_kb"] - m["rss_start_kb"]) / n
    return f


def _reasons(mx: dict) -> str:
    """mxsse's upstream /sync count by reason, e.g. 'wake 2700, presence 3'."""
    parts = [(r, int(mx.get(f"sync_{r}", 0))) for r in
             ("initial", "longpoll", "wake", "presence", "safety_net", "retry")]
    return ", ".join(f"{r} {n}" for r, n in parts if n) or ("none" if mx else "–")


def summarise(results: dict) -> dict:
    modes = results["modes"]
    figs = {mode: _figures(m, results.get("floor")) for mode, m in modes.items()}
    base = figs.get("direct", {})
    ratios = {}
    for mode, f in figs.items():
        if mode == "direct":
            continue
        ratios[mode] = {k: (round(v / base[k], 3) if isinstance(v, (int, float)) and base.get(k) else None)
                        for k, v in f.items()}
    rounded = {mode: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in f.items()}
               for mode, f in figs.items()}
    return {"figures": rounded, "ratios_vs_direct": ratios}


# --------------------------------------------------------------------------
# tables

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _ratio(v, b) -> str:
    if not isinstance(v, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "–"
    r = v / b
    return f"×{r:.2f}" if r < 10 else f"×{r:.1f}"


IDLE_ROWS = [
    ("homeserver /sync requests per client-hour", "idle_sync_per_client_hour", True),
    ("  mxsse's /sync requests in the window, by reason", "idle_mx_reasons", False),
    ("other homeserver requests per client-hour", "idle_other_hs_requests_per_client_hour", True),
    ("empty /sync answers per client-hour", "idle_empty_per_client_hour", True),
    ("Synapse CPU s per client-hour", "idle_synapse_cpu_s_per_client_hour", True),
    ("  less the bed's floor (no client)", "idle_synapse_cpu_net_s_per_client_hour", True),
    ("PostgreSQL CPU s per client-hour", "idle_postgres_cpu_s_per_client_hour", True),
    ("mxsse CPU s per client-hour", "idle_mxsse_cpu_s_per_client_hour", False),
    ("all server CPU s per client-hour (Synapse+PG+Redis+mxsse)", "idle_server_cpu_s_per_client_hour", True),
    ("client bytes per client-hour (sent+received)", "idle_client_bytes_per_client_hour", True),
    ("load-client CPU s per client-hour", "idle_bench_cpu_s_per_client_hour", True),
    ("presence rows on the replication feed (offline)", None, False),
    ("presence relay: presence_set_state calls per client-hour", "idle_set_state_per_client_hour", False),
    ("presence relay: USER_SYNC publishes per client-hour", "idle_user_sync_per_client_hour", False),
    ("mxsse presence/keepalive /syncs per client-hour", "idle_presence_sync_per_client_hour", False),
]

ACTIVE_ROWS = [
    ("deliveries received / expected", None, False),
    ("missing / duplicate deliveries", None, False),
    ("homeserver /sync requests", "active_hs_sync", True),
    ("homeserver /sync requests per delivery", "active_sync_per_delivery", True),
    ("  mxsse's /sync requests, by reason", "active_mx_reasons", False),
    ("empty /sync answers", "active_empty", True),
    ("Synapse CPU s", "active_synapse_cpu_s", True),
    ("PostgreSQL CPU s", "active_postgres_cpu_s", True),
    ("mxsse CPU s", "active_mxsse_cpu_s", False),
    ("all server CPU ms per delivery", "active_server_cpu_ms_per_delivery", True),
    ("latency p50 ms (message due → client)", "active_latency_p50_ms", True),
    ("latency p95 ms", "active_latency_p95_ms", True),
    ("latency p99 ms", "active_latency_p99_ms", True),
    ("latency max ms", "active_latency_max_ms", True),
    ("  from its PUT going out (closed-loop clock), p50 ms", "active_latency_from_put_p50_ms", True),
    ("  the same, p99 ms", "active_latency_from_put_p99_ms", True),
    ("  the sender's wait for a connection (due → PUT out), p99 ms", "active_send_wait_p99_ms", False),
    ("  homeserver's part: send → event persisted (PUT answered), p50 ms", "active_send_answered_p50_ms", False),
    ("  homeserver's part: send → its row on the replication channel, p50 ms", "active_send_published_p50_ms", False),
    ("  the same, p99 ms", "active_send_published_p99_ms", False),
    ("client bytes per delivery (sent+received)", "active_client_bytes_per_delivery", True),
    ("  of which sent by the client", "active_client_bytes_out_per_delivery", True),
    ("load-client CPU s", "active_bench_cpu_s", True),
    ("mxsse wake → batch sent to the client, mean ms (mxsse_wake_to_delivery_seconds)", "active_wake_to_delivery_mean_ms", False),
    ("  of which wake → woken /sync sent (mxsse_wake_queue_seconds)", "active_wake_queue_mean_ms", False),
    ("  woken /sync sent → answered (mxsse_woken_fetch_seconds)", "active_woken_fetch_mean_ms", False),
    ("presence_set_state calls / USER_SYNC publishes", None, False),
]

MEM_ROWS = [
    ("mxsse RSS at start, KB", "rss_start_kb"),
    ("mxsse RSS with N idle streams, KB", "rss_idle_kb"),
    ("per stream, KB ((RSS_N − RSS_0)/N)", "rss_per_stream_kb"),
    ("mxsse RSS after the active window, KB", "rss_after_active_kb"),
    ("mxsse RSS after the idle window, KB", "rss_end_kb"),
    ("  the replay store's batches then (mxsse_replay_memory_bytes), KB", "replay_kb_after_active"),
    ("  the same after the idle window, KB", "replay_kb_end"),
]


def _rows(results: dict) -> list[tuple[str, list[list[str]]]]:
    """Sections of rows: [label, direct, (value, ratio) per mxsse mode]."""
    figs = results["summary"]["figures"]
    modes = list(results["modes"])
    base = figs.get("direct", {})
    others = [m for m in modes if m != "direct"]
    p = results["params"]
    sections = []

    def row(label: str, key: str | None, ratio: bool, special=None) -> list[str]:
        r = [label]
        if "direct" in modes:
            r.append(special("direct") if special else _fmt(base.get(key)))
        for m in others:
            if special:
                r += [special(m), ""]
            else:
                v = figs[m].get(key)
                r += [_fmt(v), _ratio(v, base.get(key)) if ratio and "direct" in modes else "–"]
        return r

    def pair(label: str, tag: str, a: str, b: str) -> list[str]:
        """A "a / b" row of one window's figures (tag: active, at10...)."""
        return row(label, None, False, lambda m: f"{figs[m].get(f'{tag}_{a}')} / {figs[m].get(f'{tag}_{b}')}")

    n = results.get("devices", p["clients"])
    idle = []
    for label, key, ratio in IDLE_ROWS:
        if key is None:
            idle.append(row(label, None, False, lambda m: f"{figs[m]['idle_presence_rows']} "
                                                          f"({figs[m]['idle_presence_offline_rows']})"))
        else:
            idle.append(row(label, key, ratio))
    fl = results.get("floor")
    note = ""
    if fl:
        h = fl["seconds"] / 3600
        note = (f"Floor, the bed with no client at all ({fl['seconds']:.0f} s before the modes), per hour: "
                f"Synapse CPU {_fmt(fl['synapse_cpu'] / h)} s, PostgreSQL {_fmt(fl['postgres_cpu'] / h)} s, "
                f"Redis {_fmt(fl['redis_cpu'] / h)} s (per client-hour with {n} clients: Synapse "
                f"{_fmt(fl['synapse_cpu'] / h / n)} s, all {_fmt((fl['synapse_cpu'] + fl['postgres_cpu'] + fl['redis_cpu']) / h / n)} s).")
    sections.append((f"Idle: {n} clients connected, the {p['idle']:g} s after the active window", idle, note))
    act = []
    for label, key, ratio in ACTIVE_ROWS:
        if label.startswith("deliveries received"):
            act.append(pair(label, "active", "deliveries", "deliveries_expected"))
        elif label.startswith("missing"):
            act.append(pair(label, "active", "missing", "duplicates"))
        elif label.startswith("presence_set_state"):
            act.append(row(label, None, False, lambda m: f"{figs[m]['active_set_state']:g} / "
                                                         f"{figs[m]['active_user_sync']}"))
        else:
            act.append(row(label, key, ratio))
    msgs = figs[modes[0]]["active_messages"]
    sections.append((f"Active: {p['active_rate']:g} msg/s for {p['active']:g} s "
                     f"({msgs} messages into {results['rooms']} rooms)", act, ""))
    for rate in (p.get("active_rates") or [])[1:]:
        tag = f"at{rate:g}"
        more = []
        for label, key, ratio in (
            ("deliveries received / expected", None, False),
            ("missing / duplicate deliveries", None, False),
            ("latency p50 ms (message due → client)", f"{tag}_latency_p50_ms", True),
            ("latency p95 ms", f"{tag}_latency_p95_ms", True),
            ("latency p99 ms", f"{tag}_latency_p99_ms", True),
            ("latency max ms", f"{tag}_latency_max_ms", True),
            ("  from its PUT going out (closed-loop clock), p50 ms", f"{tag}_latency_from_put_p50_ms", True),
            ("  the same, p99 ms", f"{tag}_latency_from_put_p99_ms", True),
            ("  the sender's wait for a connection (due → PUT out), p99 ms", f"{tag}_send_wait_p99_ms", False),
            ("  send → event persisted (PUT answered), p50 ms", f"{tag}_send_answered_p50_ms", False),
            ("  send → its row on the replication channel, p50 ms", f"{tag}_send_published_p50_ms", False),
            ("  the same, p99 ms", f"{tag}_send_published_p99_ms", False),
            ("Synapse CPU s", f"{tag}_synapse_cpu_s", True),
            ("mxsse wake → woken /sync sent mean ms", f"{tag}_wake_queue_mean_ms", False),
            ("woken /sync sent → answered mean ms", f"{tag}_woken_fetch_mean_ms", False),
        ):
            if label.startswith("deliveries"):
                more.append(pair(label, tag, "deliveries", "deliveries_expected"))
            elif label.startswith("missing"):
                more.append(pair(label, tag, "missing", "duplicates"))
            else:
                more.append(row(label, key, ratio))
        secs = p.get("active_more") or p["active"]
        sections.append((f"Active at {rate:g} msg/s ({rate / p['active_rate']:g}x) for {secs:g} s "
                         f"({figs[modes[0]].get(tag + '_messages')} messages), right after the first "
                         f"active window", more, ""))
    targets = _targets(results)
    if targets:
        sections.append(targets)
    if others:
        mem = []
        for label, key in MEM_ROWS:
            r = [label]
            if "direct" in modes:
                r.append("–")
            for m in others:
                r += [_fmt(figs[m].get(key)), ""]
            mem.append(r)
        if results.get("memory"):
            by_mode = {mt["mode"]: mt for mt in results["memory"]}
            mt0 = results["memory"][0]
            for label, fn in (
                (f"{mt0['streams']} idle streams ({mt0['streams_per_user']:g} per user): RSS, KB",
                 lambda mt: f"{mt['rss_start_kb']:,} → {mt['rss_kb']:,}"),
                ("  per stream, KB ((RSS_M − RSS_0)/M)", lambda mt: _fmt(mt["per_stream_kb"])),
                ("  per stream, KB (slope across checkpoints)", lambda mt: _fmt(mt["slope_kb"])),
                ("  streams open / asked", lambda mt: f"{mt['streams_open']} / {mt['streams']}"),
            ):
                r = [label]
                if "direct" in modes:
                    r.append("–")
                for m in others:
                    r += [fn(by_mode[m]) if m in by_mode else "–", ""]
                mem.append(r)
        sections.append(("mxsse memory", mem, ""))
    return sections


# The targets, mxsse against direct in the same run (not asserted).
TARGETS = (
    ("idle homeserver /sync per client-hour", "idle_sync_per_client_hour", 0.02),
    ("idle Synapse CPU per client-hour, less the floor", "idle_synapse_cpu_net_s_per_client_hour", 0.2),
    ("active latency p50", "active_latency_p50_ms", 1.0),
    ("active latency p99", "active_latency_p99_ms", 1.1),
)


def _verdict(v, b, limit: float) -> str:
    if not isinstance(v, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "–"
    r = v / b
    return (f"×{r:.3f} met" if r <= limit else f"×{r:.3f} missed (×{r / limit:.2f} the target)")


def _targets(results: dict):
    """Section: each target with each mxsse mode's ratio, met or missed."""
    figs = results["summary"]["figures"]
    modes = list(results["modes"])
    if "direct" not in modes or len(modes) < 2:
        return None
    p = results["params"]
    rates = [f"at{r:g}" for r in (p.get("active_rates") or [])[1:]]
    rows = []
    items = list(TARGETS)
    for tag in rates:
        items += [(f"latency p50 at {tag[2:]} msg/s", f"{tag}_latency_p50_ms", 1.0),
                  (f"latency p99 at {tag[2:]} msg/s", f"{tag}_latency_p99_ms", 1.1)]
    for label, key, limit in items:
        r = [f"{label}: ≤ ×{limit:g}", _fmt(figs["direct"].get(key))]
        for m in modes:
            if m != "direct":
                r += [_fmt(figs[m].get(key)), _verdict(figs[m].get(key), figs["direct"].get(key), limit)]
        rows.append(r)
    once = ["every delivery exactly once (missing / duplicate)"]

    def md(m: str) -> str:
        miss = figs[m]["active_missing"] + sum(figs[m].get(t + "_missing") or 0 for t in rates)
        dup = figs[m]["active_duplicates"] + sum(figs[m].get(t + "_duplicates") or 0 for t in rates)
        return f"{miss} / {dup}"

    once.append(md("direct"))
    for m in modes:
        if m != "direct":
            miss, dup = md(m).split(" / ")
            once += [md(m), "met" if miss == "0" and dup == "0" else "missed"]
    rows.append(once)
    return ("Targets (the issue's, against direct in this run; printed, not asserted)", rows,
            "Synapse CPU uses the idle window less the floor window's Synapse CPU for the same length.")


def _header(results: dict) -> list[str]:
    modes = list(results["modes"])
    h = [""]
    if "direct" in modes:
        h.append(MODE_TITLES["direct"] + " (baseline)")
    for m in modes:
        if m != "direct":
            h += [MODE_TITLES[m], "× baseline"]
    return h


def markdown(results: dict) -> str:
    out = [f"# mxsse benchmark results\n",
           _preamble(results), ""]
    h = _header(results)
    for title, rows, note in _rows(results):
        out.append(f"## {title}\n")
        out.append("| " + " | ".join(h) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(h) - 1)) + "|")
        for r in rows:
            out.append("| " + " | ".join(r) + " |")
        out.append("")
        if note:
            out += [note, ""]
    out.append(_problems(results, md=True))
    return "\n".join(out) + "\n"


def text(results: dict) -> str:
    h = _header(results)
    lines = [_preamble(results), ""]
    for title, rows, note in _rows(results):
        widths = [max(len(r[i]) for r in rows + [h]) for i in range(len(h))]
        lines.append(title)
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(h)))
        for r in rows:
            lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                   for i, c in enumerate(r)))
        if note:
            lines.append(note)
        lines.append("")
    lines.append(_problems(results, md=False))
    return "\n".join(lines)


def _preamble(results: dict) -> str:
    p, mach, mx = results["params"], results["machine"], results["mxsse"]
    users = results.get("users", p["clients"])
    devices = results.get("devices", users)
    rates = ", ".join(f"{r:g}" for r in (p.get("active_rates") or [p["active_rate"]]))
    return (f"{users} users, {devices} sync clients (devices), {results['rooms']} rooms "
            f"({min(results['room_members'])}-{max(results['room_members'])} members), "
            f"connect stagger {p['stagger']:g} s; active rate(s) {rates} msg/s; "
            f"world {'from the cache' if (results.get('world') or {}).get('cached') else 'built in this run'}"
            f"{'; set_presence=' + p['set_presence'] if p.get('set_presence') else ''}"
            f"{'; mxsse ' + ' '.join(p['mxsse_arg']) if p.get('mxsse_arg') else ''}; "
            f"{mach['cpus']} CPUs ({mach['cpu_model']}); "
            f"Synapse {results.get('synapse_version')}; {mx['version']} "
            f"(git {mx['git_head']}{' + local changes' if mx['git_dirty'] else ''}); "
            f"run took {results['duration_s']:g} s. Ratios are against the direct long-poll "
            f"baseline measured in the same run.")


def _problems(results: dict, md: bool) -> str:
    notes = []
    for mode, m in results["modes"].items():
        if m.get("not_ready"):
            notes.append(f"{mode}: {m['not_ready']} clients got no first batch within 60 s")
        miss = m.get("deliveries_expected", 0) - m.get("deliveries", 0)
        if miss:
            notes.append(f"{mode}: {miss} of {m['deliveries_expected']} deliveries missing")
        if m.get("duplicates"):
            ex = (m.get("duplicate_examples") or [{}])[0]
            notes.append(f"{mode}: {m['duplicates']} duplicate deliveries (e.g. {ex}; "
                         f"all examples in results.json)")
        if m.get("clients_still_running"):
            notes.append(f"{mode}: load clients {m['clients_still_running']} did not stop")
        for extra in m.get("more_rates", []):
            miss = extra["deliveries_expected"] - extra["deliveries"]
            if miss or extra["duplicates"]:
                notes.append(f"{mode} at {extra['rate']:g} msg/s: {miss} of {extra['deliveries_expected']} "
                             f"deliveries missing, {extra['duplicates']} duplicates")
        if m.get("send_failures"):
            notes.append(f"{mode}: {m['send_failures']} sends failed")
        errs = m["idle"]["client"].get("errors", 0) + m["active"]["client"].get("errors", 0)
        if errs:
            notes.append(f"{mode}: {errs} client errors (non-200, broken streams, error events)")
        ex = m.get("mxsse_exit")
        if ex and ex.get("exit_code") not in (0, None):
            notes.append(f"{mode}: mxsse exited with {ex['exit_code']}")
        if ex and ex.get("warn_or_error_lines"):
            notes.append(f"{mode}: {ex['warn_or_error_lines']} warning/error lines in {ex['log']}")
    for mt in results.get("memory", []):
        if mt["streams_open"] != mt["streams"]:
            notes.append(f"memory {mt['mode']}: {mt['streams_open']} of {mt['streams']} streams open")
        ex = mt.get("mxsse_exit") or {}
        if ex.get("exit_code") not in (0, None):
            notes.append(f"memory {mt['mode']}: mxsse exited with {ex['exit_code']}")
        if ex.get("warn_or_error_lines"):
            notes.append(f"memory {mt['mode']}: {ex['warn_or_error_lines']} warning/error lines in {ex['log']}")
    if not notes:
        return "No problems seen: every expected delivery arrived once, no client errors, mxsse exited 0."
    head = "Problems seen:" if not md else "**Problems seen:**\n"
    return head + "\n" + "\n".join(("- " if md else "  - ") + n for n in notes)
