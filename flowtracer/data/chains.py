"""Variable chains: multi-step arithmetic whose dependencies are known by construction.

    Let b = 5. Let e = 4. Let a = 7. Let c = a + 3. Let d = b - 2. What is c + d?
    solution:  c = 7 + 3 = 10\\nd = 5 - 2 = 3\\nc + d = 10 + 3 = 13\\n<answer>13</answer>

Construction (`make_problem`, pure: same (seed, knobs) -> same problem). A problem of `depth` k has
k solution steps: k - 1 intermediate steps and the final question. The final question combines two
operands; each is the top of a chain that starts at a fresh base variable ("Let a = 7.") and applies
`len` steps "Let c = a + 3." (the k - 1 steps split at random between the two chains). Distractors
are base variables nothing uses, and `distractor_steps` derived variables built on them. Base
statements come first (shuffled), then derived statements (chains interleaved at random, chain order
kept). Results stay within [0, ...) unless `allow_negative` (a "-" that would go below 0 becomes "+").

Ground truth (character spans, [start, end), so they map onto any tokenizer through offsets):
  question (spans into `question`):
    dep_spans         the content "a = 7" / "c = a + 3" of every statement the answer depends on
    distractor_spans  the content of every statement it does not depend on
    query_span        the final "c + d" of "What is c + d?"
  solution (spans into `solution`):
    result_spans      where each intermediate result is written ("10" of "c = 7 + 3 = 10")
    use_spans         where a later step uses it ("10" of "c + d = 10 + 3 = 13")
    answer_span       the content of <answer>...</answer>
The statement content excludes "Let " and the final ".", which dependency and distractor statements
share word for word. `parse_steps` re-derives the same solution ground truth from any response
text (the model's own), see its docstring.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import asdict, dataclass, field

from flowtracer.config import ChainSpec

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
INSTRUCTION = ("Solve it step by step, one line per step, then give the final answer inside "
               "<answer></answer>.")




@dataclass
class Problem:
    question: str
    solution: str
    answer: str
    depth: int
    dep_spans: list = field(default_factory=list)
    distractor_spans: list = field(default_factory=list)
    query_span: tuple = (0, 0)
    result_spans: list = field(default_factory=list)
    use_spans: list = field(default_factory=list)
    answer_span: tuple = (0, 0)

    def row(self) -> dict:
        """A data row (flowtracer.data.sources layout); ground truth under meta."""
        meta = asdict(self)
        return {"question": meta.pop("question"), "answer": meta.pop("answer"), "verifier": "math",
                "meta": {"task": "chains", **meta}}


def _pick(v, rng):
    return rng.choice(v) if isinstance(v, tuple) else v


def _apply(rng: random.Random, spec: ChainSpec, x: int, y: int | None = None) -> tuple[str, int, int]:
    """(op, second operand, result) for x op (y or a fresh constant), kept >= 0 unless allowed."""
    op = rng.choice(spec.ops)
    y = rng.randint(spec.low, spec.high) if y is None else y
    if op == "-" and x - y < 0 and not spec.allow_negative:
        op = "+"
    return op, y, OPS[op](x, y)


def make_problem(seed: int, spec: ChainSpec = ChainSpec()) -> Problem:
    """One problem, a pure function of (seed, spec)."""
    rng = random.Random(seed)
    depth, n_dis = _pick(spec.depth, rng), _pick(spec.distractors, rng)
    names = iter(rng.sample(string.ascii_lowercase, 26))
    value = {}  # variable -> value
    base = []  # (name, is_dependency)
    chains = [[], []]  # per final operand: derived (name, src, op, const)
    split = rng.randint(0, depth - 1)
    for c, length in enumerate((split, depth - 1 - split)):
        top = next(names)
        value[top] = rng.randint(spec.low, spec.high)
        base.append((top, True))
        for _ in range(length):
            op, k, v = _apply(rng, spec, value[top])
            new = next(names)
            chains[c].append((new, top, op, k))
            value[new], top = v, new
    tops = [ch[-1][0] if ch else base[i][0] for i, ch in enumerate(chains)]
    dis = []
    for _ in range(n_dis):
        n = next(names)
        value[n] = rng.randint(spec.low, spec.high)
        base.append((n, False))
        dis.append(n)
    dis_steps = []
    for _ in range(spec.distractor_steps):
        src = rng.choice(dis)
        op, k, v = _apply(rng, spec, value[src])
        new = next(names)
        dis_steps.append((new, src, op, k))
        value[new] = v
        dis.append(new)
    rng.shuffle(base)
    lists = [list(chains[0]), list(chains[1]), dis_steps]
    derived = []  # (step, is_dependency): interleave, keeping each list's order
    while any(lists):
        i = rng.choice([j for j, lst in enumerate(lists) if lst])
        derived.append((lists[i].pop(0), i < 2))
    fop, _, answer = _apply(rng, spec, value[tops[0]], value[tops[1]])
    return _render(base, derived, tops, fop, value, answer, depth)


def _render(base, derived, tops, fop, value, answer, depth) -> Problem:
    q, p = "", Problem("", "", str(answer), depth)

    def add(text: str, content: str, dep: bool | None):
        nonlocal q
        start = len(q) + text.index(content)
        q += text
        if dep is not None:
            (p.dep_spans if dep else p.distractor_spans).append((start, start + len(content)))

    for name, dep in base:
        add(f"Let {name} = {value[name]}. ", f"{name} = {value[name]}", dep)
    for (name, src, op, k), dep in derived:
        add(f"Let {name} = {src} {op} {k}. ", f"{name} = {src} {op} {k}", dep)
    query = f"{tops[0]} {fop} {tops[1]}"
    add("What is ", "What is ", None)
    p.query_span = (len(q), len(q) + len(query))
    q += query + "?"
    p.question = q
    # solution: the dependency steps in question order, then the final step
    lines, written = [], {}  # written: variable -> its result's span in the solution
    pos = 0
    for (name, src, op, k), dep in derived:
        if not dep:
            continue
        line, shown = _step_line(name, src, op, k, value, written, pos, p)
        written[name] = (pos + len(line) - len(str(value[name])), pos + len(line))
        p.result_spans.append(written[name])
        lines.append(line)
        pos += len(line) + 1
    final, _ = _step_line(query, tops[0], fop, value[tops[1]], value, written, pos, p, rhs=tops[1],
                          result=answer)
    lines.append(final)
    pos += len(final) + 1
    tag = f"<answer>{answer}</answer>"
    p.answer_span = (pos + len("<answer>"), pos + len("<answer>") + len(str(answer)))
    p.solution = "\n".join(lines + [tag])
    return p


def _step_line(lhs, src, op, k, value, written, pos, p, rhs=None, result=None):
    """'lhs = <value of src> op <k or value of rhs> = result'; records where written results are used."""
    left = f"{lhs} = "
    a = str(value[src])
    if src in written:
        p.use_spans.append((pos + len(left), pos + len(left) + len(a)))
    b = str(k)
    if rhs is not None and rhs in written:
        at = pos + len(left) + len(a) + len(f" {op} ")
        p.use_spans.append((at, at + len(b)))
    res = value[lhs] if result is None else result
    return f"{left}{a} {op} {b} = {res}", res


# ----------------------------------------------------------------------------- responses
_STEP = re.compile(r"^[ \t]*(?P<lhs>[a-z](?:[ \t]*[-+*][ \t]*[a-z])?)[ \t]*=[ \t]*(?P<sub>[^=\n]+?)"
                   r"[ \t]*=[ \t]*(?P<res>-?\d+)[ \t.]*$", re.MULTILINE)


_DEF = re.compile(r"Let ([a-z]) = ([a-z]) [-+*] -?\d+\.")


def parse_steps(text: str, question: str) -> list[dict]:
    """The steps a response writes, and which of their results later steps use.

    A step is a line ``<lhs> = <expression> = <integer>`` whose <lhs> is one variable ("c") or two
    joined by an operator ("c + d", the final query). Which variables a step reads comes from the
    question: a one-variable step "e = ..." reads the variable of e's definition ("Let e = c + 4."
    reads c, as operand 0), the query step reads its own variables (operand i = i-th variable). A
    step for v is *used* when a later step reads v. Its *result span* is its written integer; its
    *use spans* are the operands of the reading steps' expressions at v's position, when that
    expression has exactly two numbers ("10 + 4"). Returns [{"var", "result_span", "used",
    "use_spans"}] in text order; lines that are not steps are ignored, so a malformed response
    simply has fewer steps. Each step also carries its "line_span": the whole line, with the
    newline that ends it when there is one.
    """
    defs = dict(_DEF.findall(question))  # derived variable -> the variable it reads
    steps = []
    for m in _STEP.finditer(text):
        lhs = re.findall(r"[a-z]", m["lhs"])
        reads = lhs if len(lhs) == 2 else [defs[lhs[0]]] if lhs[0] in defs else []
        steps.append((m, lhs[0] if len(lhs) == 1 else None, reads))
    out = []
    for i, (m, var, _) in enumerate(steps):
        uses = []
        for later, _, reads in steps[i + 1:]:
            if var is None or var not in reads:
                continue
            operands = list(re.finditer(r"-?\d+", later["sub"]))
            if len(operands) == 2:
                o = operands[reads.index(var)]
                uses.append((later.start("sub") + o.start(), later.start("sub") + o.end()))
            else:
                uses.append(None)
        end = m.end() + (text[m.end():m.end() + 1] == "\n")
        out.append({"var": var, "result_span": (m.start("res"), m.end("res")), "used": bool(uses),
                    "use_spans": [u for u in uses if u is not None], "line_span": (m.start(), end)})
    return out


def used_result_spans(text: str, question: str) -> list[tuple[int, int]]:
    """Result spans of the steps of `text` that later steps read (the response ground truth)."""
    return [s["result_span"] for s in parse_steps(text, question) if s["used"]]


def make_rows(size: int, seed: int = 0, **knobs) -> list[dict]:
    """`size` data rows; problem i comes from seed (seed, i), so prefixes are stable."""
    spec = ChainSpec(**knobs)
    return [make_problem(seed * 1_000_003 + i, spec).row() for i in range(size)]
