"""`flowtracer trace`: look at what the flow finds in one response.

    flowtracer trace --prompt "What is 7 + 9?" --answer 16                # generates a response
    flowtracer trace --model path/to/model --prompt "..." --response "..." --out traces/

    flowtracer trace --model lightning_logs/sft_chains/merged --chains 0 --out traces/   # chain problem 0

Prints the tokens coloured by throughput (hubs = the tokens FlowCredit would up-weight, in bold
underline), and writes <out>/trace.html (self-contained: tokens coloured, hovering a token shows its
flow f, throughput tau and reachability h; the dominant question-to-answer paths drawn over them and
listed with their token text) and <out>/trace.png (the token graph: backbone edges as arcs, nodes
coloured by throughput). With `--chains N` (problem N of data/chains_test.jsonl, with its ground
truth) the page also shows, row by row, which tokens each credit arm would up-weight (its top 40% of
the response; in the question its top-k, k = the number of dependency tokens) next to the
ground truth: dependency vs distractor statements and the used intermediate results
(flowtracer.tools.attribution). `TraceCallback` writes the same page for a few rollouts every
N steps of a `fit` into <run>/traces/.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

from flowtracer.batch import RolloutBatch
from flowtracer.config import SamplingConfig
from flowtracer.credit import RolloutCallback
from flowtracer.credit.select import rank_in_response, select_mask
from flowtracer.data.chains import INSTRUCTION
from flowtracer.data.sources import load_rows
from flowtracer.errors import InputError
from flowtracer.flow import backbone_edges, dominant_paths, trace_flow
from flowtracer.generation import generate
from flowtracer.model.layers import check_layers
from flowtracer.model.policy import load_policy
from flowtracer.tools import shading
from flowtracer.tools.analysis import (
    DEFAULT_INSTRUCTION,
    Verifiers,
    format_prompts,
    given_responses,
    rollout_batch,
    teacher_force,
    tool_parser,
)
from flowtracer.tools.attribution import ground_truth, scorer_scores


@dataclass
class Trace:
    tokens: list[str]  # display text of every real token, prompt then response
    role: list[str]  # per token: prompt | question | response | answer
    tau: list[float]  # throughput per token
    hub: list[bool]  # response tokens FlowCredit selects (top `top_frac` by throughput)
    paths: list[tuple[list[int], float]]  # dominant source -> answer paths (token indices), flow
    edges: list[tuple[int, int, float]]  # backbone edges (i, k, flow), heaviest first
    reached: bool
    reward: float | None = None
    f: list[float] | None = None  # node flow per token
    h: list[float] | None = None  # reachability (Doob h) per token
    arms: dict[str, list[bool]] | None = None  # arm -> the tokens it marks (see the module docstring)
    truth: list[str] | None = None  # per token: dep | distractor | used | "" (chain ground truth)


def trace_row(tokenizer, rb: RolloutBatch, b: int, *, top_frac: float = 0.4, n_paths: int = 5,
              edge_frac: float = 0.1) -> Trace:
    """The Trace of row `b` of a RolloutBatch whose `attn` is filled. Traces to the answer span,
    or to the last response token when there is none (FlowCredit's fallback="last_token")."""
    one = RolloutBatch(**{k: (v[b:b + 1] if isinstance(v, torch.Tensor) and v.dim() else v)
                          for k, v in vars(rb).items() if k != "metrics"})
    valid = one.attention_mask.bool()
    resp = one.response_mask.bool() & valid
    ans = one.answer_mask.bool() & valid
    if not bool(ans.any()):  # no parsed answer: sink = the last response token
        last = resp.nonzero()[:, 1].max() if bool(resp.any()) else valid.nonzero()[:, 1].max()
        ans = torch.zeros_like(ans)
        ans[0, last] = True
    src = one.question_mask.bool() & valid
    res = trace_flow(one.attn, src, ans, valid_mask=valid)
    tau = res.throughput[0]
    hub = select_mask(tau.unsqueeze(0), resp, top_frac=top_frac)[0] & bool(res.reached[0])
    cols = valid[0].nonzero().squeeze(-1)
    index = {int(c): i for i, c in enumerate(cols.tolist())}  # sequence column -> token index
    paths = [([index[c] for c in p], float(f)) for p, f in dominant_paths(res, 0, n_paths)]
    edges = [(index[i], index[k], float(f)) for i, k, f in backbone_edges(res, 0, edge_frac)]
    ids = one.input_ids[0, cols].tolist()
    role = ["answer" if a else "response" if r else "question" if q else "prompt"
            for a, r, q in zip(ans[0, cols].tolist(), resp[0, cols].tolist(), src[0, cols].tolist())]
    return Trace(tokens=tokenizer.batch_decode([[i] for i in ids]), role=role, tau=tau[cols].tolist(),
                 hub=hub[cols].tolist(), paths=paths, edges=edges, reached=bool(res.reached[0]),
                 reward=float(rb.rewards[b]) if rb.rewards is not None else None,
                 f=res.inflow[0, cols].tolist(), h=res.reach[0, cols].tolist())


def add_arms_and_truth(trace: Trace, tokenizer, rb: RolloutBatch, b: int, row: dict, qspan, *,
                       top_frac: float = 0.4, seed: int = 0) -> Trace:
    """Fill trace.arms and trace.truth for row `b` of `rb` (attn filled), a chain problem `row`."""

    idx = torch.tensor([b])
    one = rb.inputs_of(idx)  # row b's inputs; then the outputs of the pass that scored it
    one.attn, one.entropies, one.old_logprobs = (None if t is None else t[idx] for t in (rb.attn, rb.entropies,
                                                                                         rb.old_logprobs))
    scores, _ = scorer_scores(one, seed)
    gt = ground_truth(tokenizer, one, [row], [qspan])
    cols = one.attention_mask[0].bool().nonzero().squeeze(-1)
    resp, q = one.response_mask.bool(), gt["q_dep"] | gt["q_dis"]
    k = gt["q_dep"].sum(-1).clamp(min=1)
    arms = {}
    for name, sc in scores.items():
        up = select_mask(sc, resp, top_frac=top_frac)  # what the arm up-weights in training
        in_q = q & (rank_in_response(sc, q, "top") < k.unsqueeze(-1))  # its top-k question tokens
        arms[name] = (up | in_q)[0, cols].tolist()
    truth = torch.where(gt["q_dep"], 1, torch.where(gt["q_dis"], 2, torch.where(gt["r_used"], 3, 0)))[0, cols]
    trace.arms = arms
    trace.truth = [("", "dep", "distractor", "used")[int(t)] for t in truth]
    return trace



# ------------------------------------------------------------------------------ building one trace
@torch.no_grad()
def build_trace(model, tokenizer, prompt: str, *, response: str | None = None, answer: str | None = None,
                verifier: str = "math", layers="middle", max_new_tokens: int = 64, temperature: float = 0.0,
                instruction: str | None = DEFAULT_INSTRUCTION, top_frac: float = 0.4,
                chain: dict | None = None) -> Trace:
    """The Trace of one response; `chain` = a chain problem row (its question is `prompt`): adds
    every arm's marks and the ground truth."""
    prompts, spans = format_prompts(tokenizer, [prompt], instruction=instruction)
    if response is None:
        sampling = SamplingConfig(num_generations=1, max_new_tokens=max_new_tokens, temperature=temperature)
        gen = generate(model, tokenizer, prompts, spans, sampling)
    else:
        gen = given_responses(tokenizer, prompts, spans, [response])
    row = chain or {"question": prompt, "answer": answer, "verifier": verifier}
    rb, _ = rollout_batch(tokenizer, Verifiers(), [row], gen, prompts)
    if row.get("answer") is None:
        rb.rewards = None  # no reference: the verifier's reward means nothing, its answer span still does
    teacher_force(model, rb, layers)
    trace = trace_row(tokenizer, rb, 0, top_frac=top_frac)
    if chain is not None:
        if rb.rewards is None:
            rb.rewards = torch.zeros(1)
        add_arms_and_truth(trace, tokenizer, rb, 0, chain, spans[0], top_frac=top_frac)
    return trace


# ------------------------------------------------------------------------------ views
def _norm(trace: Trace) -> list[float]:
    return shading.by_max(trace.tau)


def render_terminal(trace: Trace, console=None) -> None:
    """Tokens on a red background whose strength is the throughput; hubs bold underlined."""

    console = console or Console()
    text = Text()
    for tok, x, hub, role in zip(trace.tokens, _norm(trace), trace.hub, trace.role):
        shade = int(255 - 200 * x)
        style = f"on rgb(255,{shade},{shade})" + (" black" if x > 0.05 else "")
        if hub:
            style += " bold underline"
        if role == "answer":
            style += " italic"
        text.append(tok, style=style)
    console.print(text)
    console.print(f"[dim]background = throughput (max {max(trace.tau, default=0):.3f}); bold underline = hub "
                  f"(up-weighted by FlowCredit); italic = answer; flow reached the answer: {trace.reached}; "
                  f"{len(trace.paths)} dominant paths[/]")


_JS = """
const data = JSON.parse(document.getElementById('flow-data').textContent);
function draw() {
  const box = document.getElementById('text'), svg = document.getElementById('paths');
  const r0 = box.getBoundingClientRect();
  svg.setAttribute('width', box.scrollWidth); svg.setAttribute('height', box.scrollHeight);
  svg.innerHTML = '';
  const at = i => { const r = document.getElementById('t' + i).getBoundingClientRect();
                    return [r.left - r0.left + r.width / 2, r.top - r0.top + r.height / 2]; };
  const top = Math.max(...data.paths.map(p => p[1]), 1e-12);
  data.paths.forEach((p, n) => {
    const pts = p[0].map(at);
    let d = 'M' + pts[0].join(' ');
    for (let j = 1; j < pts.length; j++) {
      const [x0, y0] = pts[j - 1], [x1, y1] = pts[j];
      d += ` Q ${(x0 + x1) / 2} ${Math.min(y0, y1) - 18 - 6 * n} ${x1} ${y1}`;
    }
    const e = document.createElementNS('http://www.w3.org/2000/svg', 'path');
    e.setAttribute('d', d); e.setAttribute('class', 'path');
    e.setAttribute('stroke-width', 1 + 5 * p[1] / top);
    e.setAttribute('stroke', `hsl(${210 + 40 * n}, 70%, 45%)`);
    svg.appendChild(e);
  });
}
window.addEventListener('load', draw); window.addEventListener('resize', draw);
"""


def render_html(trace: Trace, title: str = "flowtracer trace") -> str:
    """A self-contained page: every token once, in order, as <span class="tok">; paths as SVG curves."""
    spans = []
    for i, (tok, x, hub, role) in enumerate(zip(trace.tokens, _norm(trace), trace.hub, trace.role)):
        cls = "tok " + role + (" hub" if hub else "")
        spans.append(f'<span class="{cls}" id="t{i}" title="{_hover(trace, i)}" '
                     f'style="background:{shading.background(x)}">{html.escape(tok)}</span>')
    data = json.dumps({"paths": trace.paths, "edges": trace.edges[:50]}).replace("</", "<\\/")
    paths = "".join(f"<li>flow {f:.3f}: " + " → ".join(
        f'<code title="token #{i}">{html.escape(shading.show(trace.tokens[i]))}</code>' for i in p) + "</li>"
        for p, f in trace.paths)
    reward = "" if trace.reward is None else f" Reward {trace.reward:g}."
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:60em}"
        "#wrap{position:relative}#text{font-family:monospace;white-space:pre-wrap;line-height:2.6;"
        "position:relative;z-index:1}#paths{position:absolute;left:0;top:0;pointer-events:none;z-index:2}"
        ".path{fill:none;opacity:.7}code{background:#f3f3f3;padding:0 2px}"
        ".arms td{font-family:monospace;white-space:pre-wrap;vertical-align:top;padding:4px 8px;"
        "border-top:1px solid #ddd}"
        ".arms th{text-align:left;padding-right:1em;white-space:nowrap}.up{background:#f4a340}.dep{background:#7fd18b}"
        ".distractor{background:#ccc;text-decoration:line-through}.used{background:#5aa0e6}"
        ".hub{outline:2px solid #222;font-weight:bold}.question{text-decoration:"
        "underline dotted}.answer{border-bottom:3px solid #1a7f37}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Background = throughput (flow through the token, max "
        f"{max(trace.tau, default=0):.3f}); boxed = hub (up-weighted); dotted = question (flow source); "
        f"green underline = answer (sink). Curves = the {len(trace.paths)} dominant question-to-answer paths, "
        f"width = flow. Flow reached the answer: {trace.reached}.{reward}</p>"
        f"<div id='wrap'><div id='text'>{''.join(spans)}</div><svg id='paths'></svg></div>"
        f"<h2>Dominant paths</h2><ol>{paths}</ol>{_arms_html(trace)}"
        f"<script type='application/json' id='flow-data'>{data}</script><script>{_JS}</script></body></html>"
    )


def _hover(trace: Trace, i: int) -> str:
    """Tooltip: index, role, node flow f, throughput tau, reachability h."""
    parts = [f"#{i} {trace.role[i]}"]
    if trace.f is not None:
        parts.append(f"f={trace.f[i]:.4g}")
    parts.append(f"tau={trace.tau[i]:.4g}")
    if trace.h is not None:
        parts.append(f"h={trace.h[i]:.4g}")
    return html.escape(" ".join(parts), quote=True)


ARM_NOTE = ("Orange = what the arm marks: in the response its top 40% (the tokens it up-weights in training), "
            "in the question its top-k tokens (k = the number of dependency tokens). Ground truth: green = "
            "statements the answer depends on, grey struck = distractor statements, blue = intermediate "
            "results later steps use.")


def _arms_html(trace: Trace) -> str:
    """One row per arm plus the ground truth, each the question and response tokens with marks."""
    if not trace.arms or trace.truth is None:
        return ""
    keep = [i for i, r in enumerate(trace.role) if r != "prompt"]

    def row(name: str, cls_of) -> str:
        toks = "".join(("<br>" if j and trace.role[keep[j - 1]] == "question" != trace.role[i] else "")
                       + f'<span class="{cls_of(i)}" title="{_hover(trace, i)}">{html.escape(trace.tokens[i])}</span>'
                       for j, i in enumerate(keep))  # a line break between the question and the response
        return f"<tr><th>{html.escape(name)}</th><td>{toks}</td></tr>"

    rows = [row("ground truth", lambda i: trace.truth[i])]
    rows += [row(arm, lambda i, m=marks: "up" if m[i] else "") for arm, marks in trace.arms.items()]
    return f"<h2>What each arm up-weights</h2><p>{ARM_NOTE}</p><table class='arms'>{''.join(rows)}</table>"


def render_png(trace: Trace, path: str | Path) -> Path:
    """The token graph: nodes along a line coloured by throughput, backbone edges as arcs (width =
    flow), the dominant paths' edges in blue."""
    import matplotlib  # heavy: imported for plots only, and the backend is set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: plots only
    from matplotlib.patches import Arc  # heavy: plots only

    n = len(trace.tokens)
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * n), 4.5), dpi=110)
    top = max((f for _, _, f in trace.edges), default=1.0) or 1.0
    on_path = {(p[j], p[j + 1]) for p, _ in trace.paths for j in range(len(p) - 1)}
    for i, k, f in trace.edges:
        ax.add_patch(Arc(((i + k) / 2, 0), k - i, (k - i) * 0.8, theta1=0, theta2=180,
                         lw=0.5 + 3 * f / top, color="tab:blue" if (i, k) in on_path else "0.6", alpha=0.8))
    x = list(range(n))
    sc = ax.scatter(x, [0] * n, c=_norm(trace), cmap="Reds", vmin=0, vmax=1, s=[60 if h else 20 for h in trace.hub],
                    edgecolors=["k" if h else "none" for h in trace.hub], zorder=3)
    ax.set_xticks(x)
    labels = [t.encode("unicode_escape").decode("ascii") for t in trace.tokens]  # \n, \t visible
    ax.set_xticklabels(labels, rotation=90, fontsize=6, family="monospace")
    for lab, role in zip(ax.get_xticklabels(), trace.role):
        lab.set_color({"question": "tab:purple", "answer": "tab:green"}.get(role, "black"))
    ax.set_yticks([])
    ax.set_xlim(-1, n)
    ax.set_ylim(-0.5, max(n * 0.45, 1))
    fig.colorbar(sc, ax=ax, label="throughput / max", fraction=0.02)
    ax.set_title("token graph: backbone edges (blue = dominant paths), nodes by throughput, hubs outlined")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_trace(trace: Trace, out_dir: str | Path, stem: str = "trace", title: str = "flowtracer trace") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.html").write_text(render_html(trace, title))
    return {"html": out / f"{stem}.html", "png": render_png(trace, out / f"{stem}.png")}


# ------------------------------------------------------------------------------ the callback
class TraceCallback(RolloutCallback):
    """Writes the trace page (HTML + PNG) of `num_rollouts` rollouts every `every_n_steps` RL steps
    into <run folder>/traces/step_<s>_<i>.{html,png}. Rollouts with a parsed answer come first.

    It asks the module for the attention map only on the steps it writes (a uniform-credit run pays
    the capture there and nowhere else). Use the same `layers` as the credit arm.

    Args:
        every_n_steps (int, default 10): write at RL steps 0, N, 2N, ...
        num_rollouts (int, default 2): rollouts per written step.
        layers (str | list[int], default "middle"): attention layers of the map.
    """

    needs_attention = False

    def __init__(self, every_n_steps: int = 10, num_rollouts: int = 2, layers: str | list[int] = "middle"):
        if every_n_steps < 1 or num_rollouts < 1:
            raise InputError("TraceCallback: every_n_steps and num_rollouts must be >= 1")
        self.every_n_steps, self.num_rollouts = every_n_steps, num_rollouts
        self.capture_layers = check_layers(layers)
        self._step = 0
        self._written = -1  # the step whose pages exist: it runs once per micro-batch, writes once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Read by the module's old-policy pass of this step: capture only on steps we write.
        self._step = getattr(pl_module, "rl_step", 0)
        self.needs_attention = self._step % self.every_n_steps == 0

    def on_rollout_batch(self, trainer, pl_module, rollouts: RolloutBatch) -> None:
        if not self.needs_attention or rollouts.attn is None or self._written == self._step:
            return
        self._written = self._step
        order = sorted(range(rollouts.batch_size), key=lambda b: not bool(rollouts.answer_mask[b].any()))
        out = Path(trainer.log_dir or ".") / "traces"
        for i, b in enumerate(order[: self.num_rollouts]):
            trace = trace_row(pl_module.tokenizer, rollouts, b)
            write_trace(trace, out, f"step_{self._step}_{i}", title=f"step {self._step}, rollout {b}")


def main(argv: list[str]) -> int:

    p = tool_parser("flowtracer trace", __doc__)
    p.add_argument("--prompt", help="the question (or --chains)")
    p.add_argument("--chains", type=int, metavar="N",
                   help="trace chain problem N of --chains-data with its ground truth and every arm's marks")
    p.add_argument("--chains-data", default="data/chains_test.jsonl")
    p.add_argument("--response", help="the response to trace (default: generate one)")
    p.add_argument("--answer", help="reference answer (for the reward; the answer span is parsed either way)")
    p.add_argument("--verifier", default="math")
    p.add_argument("--instruction", default=None, help="appended to the question (default: the quickstart's)")
    p.add_argument("--layers", default="middle")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default="traces", help="folder for trace.html and trace.png")
    args = p.parse_args(argv)
    chain = None
    if args.chains is not None:

        rows = load_rows(args.chains_data)
        if not 0 <= args.chains < len(rows):
            raise InputError(f"--chains {args.chains}: {args.chains_data} has problems 0..{len(rows) - 1}")
        chain = rows[args.chains]
        args.prompt, args.instruction = chain["question"], args.instruction or INSTRUCTION
    if not args.prompt:
        raise InputError("give --prompt \"<question>\" or --chains N")
    model, tokenizer = load_policy(os.path.expanduser(args.model), lora=None)
    model.eval()
    kw = {"instruction": args.instruction} if args.instruction else {}
    trace = build_trace(model, tokenizer, args.prompt, response=args.response, answer=args.answer,
                        verifier=args.verifier, layers=args.layers, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, chain=chain, **kw)
    render_terminal(trace)
    paths = write_trace(trace, args.out, title=args.prompt)
    print(f"wrote {paths['html']} and {paths['png']}")
    return 0
