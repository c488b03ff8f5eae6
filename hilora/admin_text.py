"""Human-readable text of ``hilora admin`` answers: short aligned lines and plain tables of the
coordinator's JSON (the same data ``--json`` prints). Pure functions of decoded JSON, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> list[str]:
    """Columns padded to their widest cell, two spaces apart; ``None`` cells show as ``-``."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    return [(indent + "  ".join(v.ljust(w) for v, w in zip(row, widths))).rstrip()
            for row in [list(headers), *cells]]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return compact(value)
    return str(value)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def when(iso: str | None) -> str:
    """``2026-01-01T12:00:00.123456Z`` -> ``2026-01-01 12:00:00Z``."""
    if not iso:
        return "-"
    text = iso.replace("T", " ")
    date, _, rest = text.partition(" ")
    if not rest:
        return text
    clock, zone = rest, ""
    for sign in ("Z", "+", "-"):
        at = rest.find(sign)
        if at > 0:
            clock, zone = rest[:at], rest[at:]
            break
    return f"{date} {clock.split('.')[0]}{'Z' if zone in ('Z', '+00:00') else zone}"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def fields(pairs: Sequence[tuple[str, Any]], indent: str = "") -> list[str]:
    """``label  value`` lines, the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{indent}{k.ljust(width)}  {cell(v)}".rstrip() for k, v in pairs]


def label(value: int | None) -> str:
    return "none" if value is None else str(value)


def labels(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) if values else "none"


# ---------------------------------------------------------------- federations

def created(body: dict) -> str:
    return "\n".join([f"federation {body['federation_id']} created: {body['name']}",
                      f"enrollment secret: {body['enrollment_secret']}"])


def federations(rows: list[dict]) -> str:
    if not rows:
        return "no federation yet"
    return "\n".join(table(
        ["ID", "NAME", "STATE", "CLIENTS", "K", "PAUSED"],
        [[f["federation_id"], f["name"], f["state"], f["clients_total"],
          (f.get("clustering") or {}).get("k"), "yes" if f.get("paused_at") else "no"] for f in rows]))


def _run_line(run: dict | None) -> str:
    if run is None:
        return "none yet"
    parts = [f"run {run['id']}", f"K={run['k']}", run.get("algorithm", "lsac"), f"features {run['features']}",
             f"{run['num_clients']} clients"]
    if run.get("contrast_ratio") is not None:
        parts.append(f"contrast {run['contrast_ratio']:.3g}")
    if run.get("trigger"):
        parts.append(f"by {run['trigger']}")
    return ", ".join(parts) + f" ({when(run.get('created_at'))})"


def _rounds(rounds: list[dict], last: int = 10) -> list[str]:
    shown = rounds[-last:]
    title = f"rounds (newest {len(shown)} of {len(rounds)})" if len(rounds) > len(shown) else "rounds"
    lines = [title]
    lines += table(["ID", "STAGE", "SCOPE", "NO", "STATUS", "DONE/TOTAL", "FAILED", "QUORUM", "DEADLINE"],
                   [[r["id"], r["stage"], r["scope"], r["number"], r["status"], f"{r['tasks_done']}/{r['tasks_total']}",
                     r["tasks_failed"], r.get("quorum"), when(r.get("deadline_at")) if r.get("deadline_at") else None]
                    for r in shown], indent="  ")
    lines += [f"  round {r['id']} failure: {r['failure']}" for r in shown if r.get("failure")]
    return lines


def status(s: dict) -> str:
    clients = f"{s['clients_total']} ({s['clients_training']} training, {s['onboarding_pending']} onboarding"
    clients += f", {s['unassigned']} unassigned)" if s.get("unassigned") else ")"
    root = "none" if s["root_version"] is None else f"v{s['root_version']}"
    if s.get("last_rho") is not None:
        root += f" (last rho {s['last_rho']:.4g})"
    state = s["state"] + (f" (cycle {s['cycle']})" if s.get("cycle") else "")
    if s.get("cycle_requested_at"):
        state += f", next cycle requested {when(s['cycle_requested_at'])}"
    pairs: list[tuple[str, Any]] = [("state", state), ("clients", clients), ("stage round", s["stage_round"]),
                                    ("root adapter", root), ("uploaded", size(s["uploaded_bytes"]))]
    if s.get("paused_at"):
        pairs.append(("paused", f"since {when(s['paused_at'])}: {s.get('paused_reason') or ''}".rstrip(": ")))
    if s.get("failure_count") or s.get("last_failure"):
        pairs.append(("failures", (f"{s.get('failure_count', 0)} in a row; last at "
                                   f"{when(s.get('last_failure_at'))}: {s.get('last_failure') or '-'}")))
    pairs.append(("clustering", _run_line(s.get("clustering"))))
    lines = [f"federation {s['federation_id']} {s['name']}", *fields(pairs, indent="  ")]
    if s["clusters"]:
        lines.append("clusters")
        lines += table(["LABEL", "ID", "VERSION", "PINNED", "SIZE", "MEMBERS"],
                       [[c["label"], c["id"], c.get("adapter_version"), c.get("pinned_version"), len(c["members"]),
                         ", ".join(c["members"])] for c in s["clusters"]], indent="  ")
    if s["rounds"]:
        lines += _rounds(s["rounds"])
    return "\n".join(lines)


def cycle_requested(s: dict) -> str:
    when_ = "starts at the next scheduler tick" if s["state"] == "serving" else f"starts once it serves (now {s['state']})"
    return f"federation {s['federation_id']} {s['name']}: cycle {s.get('cycle', 0) + 1} requested; it {when_}"


def federation_deleted(r: dict) -> str:
    return (f"federation {r['federation_id']} {r['name']} deleted: {r['clients']} clients, {r['rounds']} rounds, "
            f"{r['adapter_versions']} adapter versions; {r['blobs_deleted']} blobs ({size(r['bytes_freed'])}) freed")


def pinned(c: dict) -> str:
    if c.get("pinned_version") is None:
        return f"cluster {c['label']} serves its newest version (v{c['adapter_version']})"
    return f"cluster {c['label']} serves v{c['pinned_version']} (pinned; its newest is v{c['adapter_version']})"


def started(s: dict) -> str:
    return f"federation {s['federation_id']} {s['name']} started: {s['state']} ({s['clients_total']} clients)"


def paused(s: dict) -> str:
    reason = s.get("paused_reason")
    return f"federation {s['federation_id']} {s['name']} paused" + (f": {reason}" if reason else "")


def resumed(s: dict) -> str:
    return f"federation {s['federation_id']} {s['name']} resumed: {s['state']}"


def deadline(r: dict) -> str:
    return (f"round {r['id']} ({r['stage']} {r['scope']} #{r['number']}, {r['status']}): "
            f"deadline {when(r.get('deadline_at'))}")


def report(r: dict) -> str:
    lines = [f"federation {r['federation_id']} {r['name']}",
             *fields([("state", r["state"]), ("clustering", _run_line(r.get("clustering"))),
                      ("uploaded", size(r["uploaded_bytes"])), ("rounds", len(r["rounds"]))], indent="  ")]
    if not r["clients"]:
        return "\n".join([*lines, "no client yet"])
    accs = ("acc_root", "acc_cluster", "acc_leaf")
    lines.append("clients")
    lines += table(["ID", "NAME", "COHORT", "CLUSTER", "SAMPLES", "ZERO-SHOT", *[a.upper() for a in accs], "UPLOADED"],
                   [[c["client_id"], c["name"], c["cohort"], c.get("cluster_label"), c["num_samples"],
                     c.get("zero_shot"), *[c["metrics"].get(a) for a in accs], size(c["uploaded_bytes"])]
                    for c in r["clients"]], indent="  ")
    return "\n".join(lines)


def recluster(r: dict) -> str:
    lines = [f"clustering {_run_line(r['run'])}",
             f"clusters kept: {labels(r['clusters_kept'])}; created: {labels(r['clusters_created'])}"]
    moves = r["moves"]
    lines.append(f"moves: {len(moves)}" if moves else "moves: none")
    lines += table(["CLIENT", "ID", "FROM", "TO"],
                   [[m["name"], m["client_id"], label(m["from_label"]), label(m["to_label"])] for m in moves],
                   indent="  ") if moves else []
    lines.append(f"tasks cancelled: {r['tasks_cancelled']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- clients, secrets, audit

def revoked(r: dict, federation: int) -> str:
    return (f"client {r['client_id']} {r['name']} of federation {federation}: {r['status']} "
            f"({r['tasks_cancelled']} open tasks cancelled)")


def deleted(r: dict, federation: int) -> str:
    extra = "".join(f", {k.replace('_', ' ')} {r[k] if k != 'bytes_freed' else size(r[k])}"
                    for k in ("uploads_released", "blobs_deleted", "bytes_freed") if k in r)
    return f"client {r['client_id']} {r['name']} of federation {federation} deleted: {r['tasks_deleted']} tasks{extra}"


def secret(r: dict) -> str:
    return f"new enrollment secret of federation {r['federation_id']}: {r['enrollment_secret']}"


def audit(events: list[dict]) -> str:
    if not events:
        return "no admin action recorded"
    return "\n".join(table(["ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"],
                           [[e["id"], when(e["at"]), e["actor"], e["action"], e.get("target"),
                             compact(e["detail"]) if e.get("detail") else None] for e in events]))


# ---------------------------------------------------------------- invitations, schedule, models

def invitations_created(r: dict) -> str:
    return "\n".join(table(["ID", "CODE", "EXPIRES"],
                           [[i["id"], i["code"], when(i["expires_at"])] for i in r["invitations"]]))


def invitations(rows: list[dict]) -> str:
    if not rows:
        return "no invitation yet"
    return "\n".join(table(["ID", "STATE", "CLIENT", "CREATED", "EXPIRES", "NOTE"],
                           [[i["id"], i["state"], i.get("client_id"), when(i["created_at"]), when(i["expires_at"]),
                             i.get("note") or None] for i in rows]))


def invitation(i: dict) -> str:
    return f"invitation {i['id']}: {i['state']}"


def schedule(s: dict) -> str:
    return "\n".join(fields(sorted(s.items())))


def schedule_changed(r: dict) -> str:
    changes = r["changes"]
    lines = ["changed (from the next round):" if changes else "nothing changed: every value given was already set"]
    lines += [f"  {k}: {cell(before)} -> {cell(after)}" for k, (before, after) in sorted(changes.items())]
    lines.append("schedule now:")
    lines += fields(sorted(r["schedule"].items()), indent="  ")
    return "\n".join(lines)


def model_written(r: dict) -> str:
    return f"wrote {r['path']} ({size(r['bytes'])}, sha256 {r['sha256']})"
