"""Which sites take part: their data checks, read from the identity replies and decided in one place.

Before round 1 the ServerApp asks every connected node who it is (:func:`server_app.census.node_census`);
a site (a node with its own ``data-dir``) answers with its data check as well (the
``"site-check"`` record, :func:`fedprime_core.runtime.site_check`): its folder, layout, class
list, labels and rows, read as training will read them. :func:`site_verdicts` turns the
answers into one :class:`SiteVerdict` per node: a site with a problem, made with another
class list or another frozen backbone, or whose query failed with a config or data error, is
**refused** with its reasons and never sampled in this run; every other node takes part.
:func:`refusal_stops_run` says whether those that remain are enough to start
(``min-train-nodes``); fewer than ``min-available-nodes`` only warns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedprime_core.config import RunConfig
from fedprime_core.failures import PERMANENT_KINDS, one_line
from fedprime_protocol.messages import parse_site_check

#: How many of a site's problems the one-line reason names (the others are counted).
SHOWN_PROBLEMS = 3


@dataclasses.dataclass(frozen=True)
class SiteVerdict:
    """What the server decided about one node before it was first sampled.

    Attributes:
        node: the Flower node id.
        client: its client id (``node-<id>`` when its reply named none).
        refused: it is left out of every round of this run.
        problems: why, one line each (empty when not refused).
        check: the site's data check as it arrived (counts, ``summary``, ``warnings``); empty
            for a partitioned node.
    """

    node: int
    client: str
    refused: bool = False
    problems: tuple[str, ...] = ()
    check: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_site(self) -> bool:
        return bool(self.check) or self.refused

    @property
    def reason(self) -> str:
        """The problems in one line (the first :data:`SHOWN_PROBLEMS`, then how many more)."""
        shown = "; ".join(self.problems[:SHOWN_PROBLEMS])
        more = len(self.problems) - SHOWN_PROBLEMS
        return shown + (f"; and {more} more problem(s)" if more > 0 else "")

    def describe(self) -> str:
        """One log line: the site's data, or why it is refused."""
        who = f"site {self.client} (node {self.node})"
        if self.refused:
            return f"{who}: REFUSED, not sampled in this run: {self.reason}"
        summary = str(self.check.get("summary", "")) or "data checked"
        present, total = self.check.get("num-classes-present"), self.check.get("num-classes")
        classes = f"; {present} of {total} classes" if present is not None and total else ""
        return f"{who}: ready: {summary}{classes}"

    def record(self) -> dict[str, Any]:
        """Its entry in ``clients.json`` before it trains (``state``: ``refused`` with ``reason``, or ``checked``)."""
        fields = {
            k: v for k, v in self.check.items() if k not in ("ok", "problems", "warnings", "summary", "client-id")
        }
        out: dict[str, Any] = {"client-id": self.client, "data": "site", **fields, "node-id": self.node}
        if self.refused:
            out.update({"state": "refused", "reason": self.reason, "problems": list(self.problems)})
        else:
            out["state"] = "checked"
        return out


def reply_site_check(reply: Message) -> dict[str, Any] | None:
    """The data check a site sent with its identity reply, typed (``None``: the node is no site).

    A check that does not fit the schema (:func:`fedprime_protocol.messages.parse_site_check`)
    becomes a failed check with the reason, so :func:`site_verdicts` refuses that site.
    """
    check, problem = parse_site_check(reply)
    if problem:
        return {"ok": False, "problems": [f"its data check reply is malformed: {one_line(problem)}"]}
    return check


def site_verdicts(
    census: Mapping[int, Mapping[str, Any]],
    failed: Mapping[int, tuple[str | None, str]] | None = None,
    *,
    labels_fingerprint: str | None = None,
    backbone_fingerprint: str | None = None,
) -> dict[int, SiteVerdict]:
    """One verdict per node that answered the identity query, or failed it with a config or data error.

    Args:
        census: node id -> its identity record, with its ``"site-check"`` record (a mapping)
            when it is a site.
        failed: node id -> ``(kind, one-line reason)`` of an error reply to the query. A
            ``config`` or ``data`` error recurs until someone fixes the site: refused. Any
            other failure may not recur: no verdict (the rounds account for the node).
        labels_fingerprint, backbone_fingerprint: the server's, when it has them; a site
            whose check names another is refused (it would train another task, or another model).
    """
    verdicts: dict[int, SiteVerdict] = {}
    for node, info in census.items():
        client = str(info.get("client-id") or f"node-{node}")
        check = info.get("site-check")
        if not isinstance(check, Mapping):
            verdicts[node] = SiteVerdict(node, client)  # a partition of the run's data: the server checks that
            continue
        problems = [one_line(str(p)) for p in _strings(check.get("problems"))]
        if not check.get("ok") and not problems:
            problems = ["its data check failed without saying why"]
        if check.get("ok"):
            problems += _mismatch(check, "labels-fingerprint", labels_fingerprint, "class list")
            problems += _mismatch(check, "backbone-fingerprint", backbone_fingerprint, "frozen backbone")
        verdicts[node] = SiteVerdict(node, client, bool(problems), tuple(problems), dict(check))
    for node, (kind, text) in (failed or {}).items():
        if node not in verdicts and kind in PERMANENT_KINDS:
            verdicts[node] = SiteVerdict(node, f"node-{node}", True, (f"{kind} error: {one_line(text)}",))
    return verdicts


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return []


def _mismatch(check: Mapping[str, Any], key: str, reference: str | None, what: str) -> list[str]:
    theirs = check.get(key)
    if not reference or not theirs or str(theirs) == reference:
        return []
    fix = (
        "give every site and the server the same class list (run config 'classes' or the same classes.txt)"
        if key == "labels-fingerprint"
        else "give every site the same model weights as the server"
    )
    return [f"its {what} (fingerprint {theirs}) differs from the server's ({reference}): {fix}"]


def refusal_stops_run(
    verdicts: Mapping[int, SiteVerdict], connected: Iterable[int], min_train: int, min_available: int
) -> tuple[str | None, str | None]:
    """``(why the run cannot start, a warning)``: each ``None`` when there is nothing to say.

    The run cannot start when fewer than ``min_train`` connected nodes are left once the
    refused sites are set aside; with fewer than ``min_available`` it goes on and warns.
    """
    refused = [v for v in verdicts.values() if v.refused]
    if not refused:
        return None, None
    usable = [n for n in connected if not (n in verdicts and verdicts[n].refused)]
    listed = "; ".join(f"{v.client}: {v.reason}" for v in sorted(refused, key=lambda v: v.client))
    if len(usable) < min_train:
        return (
            f"{len(refused)} site(s) refused before round 1 ({listed}); {len(usable)} node(s) can train and "
            f"min-train-nodes is {min_train}. Fix the sites' data (or their node config) and start the run "
            "again, or lower min-train-nodes.",
            None,
        )
    if len(usable) < min_available:
        return None, (
            f"going on without {len(refused)} refused site(s) ({listed}): {len(usable)} node(s) can train, "
            f"fewer than min-available-nodes = {min_available}"
        )
    return None, f"going on without {len(refused)} refused site(s): {listed}"


def setting_label(cfg: RunConfig, sites: bool = False) -> str:
    """The missing-modality setting that applies, for titles: ``site data`` when the sites' own rows
    are used as they are, else the simulated setting (its eta only where eta plays a part)."""
    if cfg.missing_table:
        simulated = f"missing-table {Path(cfg.missing_table).name}"
    elif cfg.missing_setting == "none":
        simulated = "" if sites else "none"
    else:
        simulated = f"{cfg.missing_setting}, eta={cfg.eta:g}"
    if not sites:
        return simulated
    return "site data" + (f" + simulated {simulated}" if simulated else "")


__all__ = ["SiteVerdict", "refusal_stops_run", "setting_label", "site_verdicts"]
