"""flowtracer: RL with verifiable rewards on LLMs, with FlowTracer token-level credit assignment.

FlowTracer (arXiv 2606.10646) builds a graph over a response's tokens from middle-layer attention,
conditions it on the answer, pushes flow from the question and up-weights the high-throughput "hub"
tokens in the GRPO update. See docs/method.md for the algorithm.
"""

__version__ = "0.1.0"
