"""The learned parts of gcache: the graph policy (topology) and its REINFORCE loss."""

from gcache.policy.graph_policy import (
    TOPOLOGIES,
    DagSample,
    GraphPolicy,
    active_agents,
    deterministic_dag,
    edge_entropy,
    edge_probabilities,
    expected_edges,
    reinforce_loss,
    sample_dags,
    topological_waves,
    topology_mask,
)

__all__ = [
    "TOPOLOGIES",
    "DagSample",
    "GraphPolicy",
    "active_agents",
    "deterministic_dag",
    "edge_entropy",
    "edge_probabilities",
    "expected_edges",
    "reinforce_loss",
    "sample_dags",
    "topological_waves",
    "topology_mask",
]
