"""Duplicate groups from pairs: connected components, a guard against chaining, keepers, sweeps.

Pairs (image_id_a, image_id_b, distance) come from the index; grouping is cheap and runs
again whenever the threshold changes.

- ``single`` linkage: plain connected components of the pairs under the threshold (VDC's
  behaviour). Chains can join images far apart: a-b and b-c close, a-c not.
- ``representative`` linkage (default): inside each component, the best image by the
  keeper policy becomes a keeper and takes every image within the threshold *of it*; the
  best image left becomes the next keeper, and so on. Every removed image is then within
  the threshold of its own keeper: no chained mega-groups.

Both are vectorised with polars (rounds of "pick keepers, take their neighbours"), so
millions of pairs group in seconds; the number of rounds is the largest number of
sub-groups in one component.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components

from curation_assets.core.dedup.keepers import KEEPER_EXPLANATION, KeeperPolicy, order_for_keeping

Linkage = Literal["representative", "single"]

GROUPS_SCHEMA: dict[str, pl.DataType] = {
    "group_id": pl.String(),  # the keeper's image_id
    "image_id": pl.String(),
    "is_keeper": pl.Boolean(),
    "keeper_id": pl.String(),
    "distance": pl.Float32(),  # to the keeper (null: single linkage, joined through a chain)
    "linked_to": pl.String(),  # the closest group member it is paired with
    "link_distance": pl.Float32(),
    "group_size": pl.Int64(),
    "reason": pl.String(),
}


def connected_components(n: int, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes given undirected edges (scipy's sparse graph)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows_a), dtype=np.int8), (rows_a, rows_b)), shape=(n, n))
    _, labels = _scipy_components(graph, directed=False)
    return labels.astype(np.int64)


def _node_table(pairs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(nodes with a dense index and component, edges as node indices) of the pairs."""
    ids = pl.concat([pairs["image_id_a"], pairs["image_id_b"]]).unique().sort()
    nodes = pl.DataFrame({"image_id": ids, "node": np.arange(len(ids), dtype=np.int64)})
    edges = (
        pairs.join(nodes.rename({"image_id": "image_id_a", "node": "a"}), on="image_id_a")
        .join(nodes.rename({"image_id": "image_id_b", "node": "b"}), on="image_id_b")
        .select("a", "b", "distance")
    )
    labels = connected_components(len(nodes), edges["a"].to_numpy(), edges["b"].to_numpy())
    return nodes.with_columns(component=pl.Series(labels)), edges


def _both_directions(edges: pl.DataFrame) -> pl.DataFrame:
    return pl.concat([edges, edges.select(a="b", b="a", distance="distance")])


def group_duplicates(
    pairs: pl.DataFrame,
    threshold: float,
    linkage: Linkage = "representative",
    keeper: KeeperPolicy = "quality",
    attributes: pl.DataFrame | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Duplicate groups of the pairs with ``distance < threshold`` (strictly, as VDC), one keeper each.

    ``attributes`` (image_id plus any of n_findings, pixels, size_bytes, quality_score)
    feed the keeper policy. Returns one row per member of every group of two or more.
    """
    close = pairs.filter(pl.col("distance") < threshold)
    if close.is_empty():
        return pl.DataFrame(schema=GROUPS_SCHEMA)
    nodes, edges = _node_table(close)
    if attributes is not None:
        nodes = nodes.join(attributes, on="image_id", how="left")
    ranked = order_for_keeping(nodes, keeper, seed).with_columns(rank=pl.int_range(pl.len(), dtype=pl.Int64))
    ranked = ranked.select("image_id", "node", "component", "rank")
    directed = _both_directions(edges)
    if linkage == "single":
        assignment = _single(ranked, directed)
    elif linkage == "representative":
        assignment = _representative(ranked, directed)
    else:
        raise ValueError(f"unknown linkage {linkage!r}; allowed: representative, single")
    return _finish(assignment, ranked, directed, keeper)


def _single(ranked: pl.DataFrame, directed: pl.DataFrame) -> pl.DataFrame:
    """Keeper = the best node of each component; distance only where a direct pair exists."""
    keepers = ranked.sort("rank").group_by("component", maintain_order=True).first()
    assignment = ranked.join(keepers.select("component", keeper_node="node"), on="component")
    direct = directed.rename({"a": "node", "b": "keeper_node"})
    return assignment.join(direct, on=["node", "keeper_node"], how="left").select(
        "node", "keeper_node", "distance"
    )


def _representative(ranked: pl.DataFrame, directed: pl.DataFrame) -> pl.DataFrame:
    """Rounds: each component's best unassigned node keeps its unassigned neighbours."""
    open_nodes = ranked
    assigned: list[pl.DataFrame] = []
    while not open_nodes.is_empty():
        keepers = (
            open_nodes.sort("rank")
            .group_by("component", maintain_order=True)
            .first()
            .select(keeper_node="node")
        )
        taken = (
            directed.join(keepers, left_on="a", right_on="keeper_node")
            .join(open_nodes.select("node"), left_on="b", right_on="node")
            .group_by("b")
            .agg(pl.col("a").first().alias("keeper_node"), pl.col("distance").min())
            .rename({"b": "node"})
        )
        # A node adjacent to two keepers of one round cannot happen: one keeper per component per round.
        round_rows = pl.concat(
            [
                keepers.select(
                    node="keeper_node", keeper_node="keeper_node", distance=pl.lit(0.0, pl.Float32)
                ),
                taken.select("node", "keeper_node", pl.col("distance").cast(pl.Float32)),
            ]
        )
        assigned.append(round_rows)
        open_nodes = open_nodes.join(round_rows.select("node"), on="node", how="anti")
    return pl.concat(assigned)


def _finish(
    assignment: pl.DataFrame, ranked: pl.DataFrame, directed: pl.DataFrame, keeper: str
) -> pl.DataFrame:
    ids = ranked.select("node", "image_id")
    frame = (
        assignment.with_columns(pl.col("distance").cast(pl.Float32))
        .join(ids, on="node")
        .join(ids.rename({"node": "keeper_node", "image_id": "keeper_id"}), on="keeper_node")
        .with_columns(group_size=pl.len().over("keeper_node").cast(pl.Int64))
        .filter(pl.col("group_size") > 1)
    )
    # the closest member of the same group each image is directly paired with (explains chains)
    nearest = (
        directed.join(frame.select(a="node", group="keeper_node"), on="a")
        .join(frame.select(b="node", group_b="keeper_node"), on="b")
        .filter(pl.col("group") == pl.col("group_b"))
        .sort("distance")
        .group_by("a", maintain_order=True)
        .first()
        .join(ids.rename({"node": "b", "image_id": "linked_to"}), on="b")
        .select(node="a", linked_to="linked_to", link_distance=pl.col("distance").cast(pl.Float32))
    )
    why_kept = f"kept: {KEEPER_EXPLANATION[keeper]}"
    return (
        frame.join(nearest, on="node", how="left")
        .with_columns(is_keeper=pl.col("node") == pl.col("keeper_node"), group_id=pl.col("keeper_id"))
        .with_columns(
            reason=pl.when(pl.col("is_keeper"))
            .then(pl.lit(why_kept))
            .when(pl.col("distance").is_not_null())
            .then(pl.format("near duplicate of {} at distance {}", "keeper_id", pl.col("distance").round(4)))
            .otherwise(
                pl.format(
                    "near duplicate of {} through {} (distance {})",
                    "keeper_id",
                    "linked_to",
                    pl.col("link_distance").round(4),
                )
            )
        )
        .select(list(GROUPS_SCHEMA))
        .sort("group_id", "is_keeper", "image_id", descending=[False, True, False])
    )


def threshold_sweep(
    pairs: pl.DataFrame,
    thresholds: list[float],
    linkage: Linkage = "representative",
    keeper: KeeperPolicy = "quality",
    attributes: pl.DataFrame | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Groups and removals at each threshold: the numbers a user picks a threshold from."""
    rows = []
    for threshold in thresholds:
        groups = group_duplicates(pairs, threshold, linkage, keeper, attributes, seed)
        rows.append(
            {
                "threshold": round(threshold, 4),
                "pairs": int((pairs["distance"] < threshold).sum()),
                "groups": groups["group_id"].n_unique() if len(groups) else 0,
                "removed": int((~groups["is_keeper"]).sum()) if len(groups) else 0,
                "largest_group": int(groups["group_size"].max()) if len(groups) else 0,
            }
        )
    return pl.DataFrame(rows)


def sweep_thresholds(report_threshold: float, start: float = 0.02, step: float = 0.02) -> list[float]:
    """0.02, 0.04, ... up to the report threshold (which is always included)."""
    values = [round(v, 4) for v in np.arange(start, report_threshold + 1e-9, step)]
    return (
        values
        if values and values[-1] == round(report_threshold, 4)
        else [*values, round(report_threshold, 4)]
    )
