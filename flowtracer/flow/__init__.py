"""Pure-torch FlowTracer flow engine (no Lightning, no transformers).

attention map -> token DAG -> reachability h -> Doob h-transform W' -> node flow f -> throughput tau,
plus the backbone (widest-path decomposition, heavy edges). See docs/method.md, sections "The graph",
"Answer conditioning" and "Flow, throughput, backbone".

    res = trace_flow(attn, source_mask, answer_mask, valid_mask=valid)
    res.throughput            # (B, T) tau, the credit score
    dominant_paths(res, 0, k=5)
"""

from .paths import backbone_edges, dominant_paths
from .trace import FlowResult, edge_flow, trace_flow

__all__ = ["trace_flow", "FlowResult", "edge_flow", "dominant_paths", "backbone_edges"]
