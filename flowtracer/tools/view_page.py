"""The HTML of `flowtracer view` (flowtracer.tools.view reads the runs): curves as inline SVG, the
rollouts as JSON blocks drawn by a small inline script. Nothing is fetched: the page works offline.

Every text reaches the page escaped: Python's through html.escape, the data's as JSON with "<"
written as \\u003c (so no "</script>" can end a block early), and the script puts texts into the
page with textContent only (a response holding "<script>" shows as those characters).
"""

from __future__ import annotations

import html
import json
import math

from flowtracer.tools import shading

PER_PAGE = 20
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
CURVES = (("reward/mean", "reward (mean over the step's rollouts)"), ("val/pass@1", "validation pass@1"),
          ("credit/fallback_frac", "credit/fallback_frac (uniform-weighted responses)"),
          ("time/step", "seconds per step"))


def _json(obj) -> str:
    """JSON safe inside <script type="application/json">: no "<" at all; NaN/inf as null."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite reward or score: JSON has no NaN, the page shows it as blank
        text = json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c")


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ curves
def curve_points(run, key: str) -> list[tuple[float, float]]:
    if key == "val/pass@1":
        return [(float(s), float(v)) for s, v in run.val]
    return [(r["rl_step"], r[key]) for r in run.train if key in r and math.isfinite(r[key])]


def svg_chart(title: str, series: list[tuple[str, str, list[tuple[float, float]]]], w: int = 420, h: int = 220) -> str:
    """A line chart: series = (label, colour, [(x, y)]); empty series are left out."""
    series = [s for s in series if s[2]]
    if not series:
        return (f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
                '<p class="none">not in metrics.csv</p></figure>')
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 48, 10, 10, 28

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    parts = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" class="axis"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in (x0, x1):
        parts.append(f'<text x="{px(x):.1f}" y="{h - 8}" text-anchor="middle">{x:g}</text>')
    for label, colour, pts in series:
        pts = sorted(pts)
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        step = max(1, len(pts) // 200)  # markers (with their values on hover) for at most ~200 points
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"><title>'
                  f'{html.escape(label)}: step {x:g}, {y:.4g}</title></circle>' for x, y in pts[::step]]
    legend = "".join(f'<span style="color:{c}">&#9632;</span> {html.escape(lab)} ' for lab, c, _ in series)
    return (f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(parts)}</svg>'
            f'<div class="legend">{legend}</div></figure>')


def curves_html(runs) -> str:
    charts = [svg_chart(title, [(run.label, COLORS[i % len(COLORS)], curve_points(run, key))
                                for i, run in enumerate(runs)]) for key, title in CURVES]
    return f'<h2>Curves</h2><div class="charts">{"".join(charts)}</div>'


# ------------------------------------------------------------------------------ the page
def runs_table(runs) -> str:
    rows = []
    for i, run in enumerate(runs):
        notes = "; ".join([run.left_out] * bool(run.left_out) + run.notes) or ""
        rows.append(f'<tr><td><span style="color:{COLORS[i % len(COLORS)]}">&#9632;</span> '
                    f'{html.escape(run.label)}</td><td>{html.escape(run.arm or "?")}</td>'
                    f'<td>{len(run.rows)}</td><td>{run.total}</td><td>{len(run.train)}</td>'
                    f'<td class="note">{html.escape(notes)}</td></tr>')
    return ("<table class='runs'><tr><th>run</th><th>credit arm</th><th>rollouts shown</th><th>in rollouts.jsonl"
            f"</th><th>steps in metrics.csv</th><th>notes</th></tr>{''.join(rows)}</table>")


def render_page(title: str, runs, meta: dict, blocks: dict[str, list]) -> str:
    """The whole page: run table, curves, rollout browser (controls, legend, cards)."""
    options = "".join(f'<option value="{i}">{html.escape(r.label)}</option>' for i, r in enumerate(runs))
    data = "".join(f'<script type="application/json" id="{k}">{_json(v)}</script>' for k, v in blocks.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{runs_table(runs)}{curves_html(runs)}"
        "<h2>Rollouts</h2><div id='controls'>"
        f"<label>run <select id='a'>{options}</select></label> "
        f"<label>under it <select id='b'><option value='-1'>(none)</option>{options}</select></label> "
        "<label>step <select id='step'></select></label> "
        "<label>group <select id='group'></select></label> "
        "<label>reward &ge; <input id='rmin' size='4'></label> <label>&le; <input id='rmax' size='4'></label> "
        "<label><input type='checkbox' id='trunc'> truncated only</label> "
        "<label>shade by <select id='mode'><option value='weight'>weight</option>"
        "<option value='score'>score (the arm's)</option><option value='entropy'>entropy</option></select></label>"
        "</div><p id='legend'></p><div id='pager'></div><div id='cards'></div><div id='pager2'></div>"
        f"<script type='application/json' id='meta'>{_json(meta)}</script>{data}"
        f"<script>const PER_PAGE = {PER_PAGE};{shading.JS}{JS}</script></body></html>"
    )


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:75em}h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.2em}"
    "table.runs{border-collapse:collapse}table.runs td,table.runs th{border-bottom:1px solid #ddd;padding:2px 8px;"
    "text-align:left}.note{color:#a40;font-size:.9em}.charts{display:flex;flex-wrap:wrap;gap:12px}"
    ".chart{margin:0}.chart figcaption{font-size:.9em;font-weight:bold}.chart text{font-size:10px;fill:#444}"
    ".axis{stroke:#888}.legend{font-size:.8em}.none{color:#888;font-size:.9em}"
    "#controls label{margin-right:.6em;white-space:nowrap}#controls{line-height:2}"
    ".pair{border:1px solid #ccc;border-radius:4px;margin:.6em 0;padding:0 .4em}"
    ".card{padding:.4em 0}.pair .card+.card,.pair .card+.missing{border-top:1px dashed #bbb}"
    ".head{font-size:.85em;color:#333}.head b{font-weight:bold}.q{font-size:.9em;margin:.2em 0}"
    ".question{text-decoration:underline dotted;background:#eef}"
    "details{font-size:.8em;color:#555}details pre{white-space:pre-wrap;background:#f6f6f6;padding:.3em}"
    ".toks{font-family:monospace;white-space:pre-wrap;line-height:1.9;margin-top:.2em}"
    ".tok.hub{outline:1px solid #222}.tok.answer{border-bottom:3px solid #1a7f37}"
    ".missing{color:#888;font-size:.85em;padding:.4em 0}#pager,#pager2{font-size:.9em}button{margin:0 .3em}"
)

JS = r"""
const META = JSON.parse(document.getElementById('meta').textContent);
const cache = new Map();
const $ = id => document.getElementById(id);
function block(r, b) {
  const id = 'd' + r + '_' + b;
  if (!cache.has(id)) cache.set(id, JSON.parse($(id).textContent));
  return cache.get(id);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const fmt = x => (x === null || x === undefined) ? '–' : (Math.round(x * 1000) / 1000).toString();
const state = {a: 0, b: META.runs.length > 1 ? 1 : -1, step: 'all', group: 'all', rmin: '', rmax: '',
               trunc: false, mode: 'weight', page: 0};
for (const kv of location.hash.slice(1).split('&')) {  // a link can open a given view: #step=3&mode=score
  const [k, v] = kv.split('=');
  if (!(k in state) || v === undefined) continue;
  const t = typeof state[k];
  state[k] = t === 'number' ? Number(v) : t === 'boolean' ? v === '1' : decodeURIComponent(v);
}
if (!(state.a >= 0 && state.a < META.runs.length)) state.a = 0;
if (!(state.b >= -1 && state.b < META.runs.length)) state.b = -1;

let bIndex = null, bIndexOf = null;
function counterpart(i) {  // run B's response to the same prompt, at the same step, same position in its group
  if (state.b < 0) return -1;
  if (bIndexOf !== state.b) {
    const c = META.runs[state.b].rows;
    bIndex = new Map();
    for (let j = 0; j < c.step.length; j++) bIndex.set(c.step[j] + '|' + c.pid[j] + '|' + c.k[j], j);
    bIndexOf = state.b;
  }
  const c = META.runs[state.a].rows, j = bIndex.get(c.step[i] + '|' + c.pid[i] + '|' + c.k[i]);
  return j === undefined ? -1 : j;
}
function matches(c, i) {
  if (state.step !== 'all' && c.step[i] !== Number(state.step)) return false;
  if (state.group !== 'all' && c.group[i] !== Number(state.group)) return false;
  if (state.rmin !== '' && !(c.reward[i] >= Number(state.rmin))) return false;
  if (state.rmax !== '' && !(c.reward[i] <= Number(state.rmax))) return false;
  if (state.trunc && c.trunc[i] !== true) return false;
  return true;
}
function shadeOf(R, d) {
  const [texts, w, s, e] = d;
  if (state.mode === 'score') return s ? byMax(s) : texts.map(() => 0);
  if (state.mode === 'entropy') return e ? byRange(e, 0, R.emax) : texts.map(() => 0);
  return byRange(w || texts.map(() => 1), R.wlo, R.whi);
}
function card(ri, i) {
  const R = META.runs[ri], c = R.rows, d = block(ri, c.block[i])[c.off[i]];
  const [texts, w, s, e, ans] = d, p = META.prompts[c.pid[i]];
  const div = el('div', 'card');
  div.dataset.run = ri; div.dataset.step = c.step[i]; div.dataset.group = c.group[i]; div.dataset.k = c.k[i];
  div.dataset.mode = state.mode;
  const head = el('div', 'head');
  head.appendChild(el('b', '', R.label));
  head.appendChild(document.createTextNode(' · step ' + c.step[i] + ' · group ' + c.group[i] + ' · response ' +
    (c.k[i] + 1) + ' · reward ' + fmt(c.reward[i]) + ' · advantage ' + fmt(c.adv[i]) + ' · ' + c.n[i] +
    ' tokens' + (c.trunc[i] === true ? ' · truncated' : '')));
  div.appendChild(head);
  const q = el('div', 'q');
  q.appendChild(document.createTextNode('question: '));
  q.appendChild(el('span', 'question', p[1] === null ? '(not logged)' : p[1]));
  q.appendChild(document.createTextNode('  reference answer: ' + (p[2] === null ? '–' : p[2])));
  div.appendChild(q);
  const det = el('details'), pre = el('pre');
  det.appendChild(el('summary', '', 'prompt'));
  const at = p[1] ? p[0].indexOf(p[1]) : -1;
  if (at >= 0) {  // the question marked inside the prompt
    pre.appendChild(document.createTextNode(p[0].slice(0, at)));
    pre.appendChild(el('span', 'question', p[1]));
    pre.appendChild(document.createTextNode(p[0].slice(at + p[1].length)));
  } else pre.textContent = p[0];
  det.appendChild(pre); div.appendChild(det);
  const toks = el('div', 'toks'), x = shadeOf(R, d), inAns = new Set(ans || []);
  const up = R.whi > R.wlo;
  for (let j = 0; j < texts.length; j++) {
    const t = el('span', 'tok' + (inAns.has(j) ? ' answer' : '') + (up && w && w[j] > R.wlo ? ' hub' : ''), texts[j]);
    t.style.backgroundColor = shade(x[j]);
    t.title = '#' + j + (w ? ' weight ' + w[j] : '') + (s ? ' score ' + s[j] : '') + (e ? ' entropy ' + e[j] : '');
    toks.appendChild(t);
  }
  div.appendChild(toks);
  return div;
}
function fillSelect(sel, values, label) {
  const keep = sel.value;
  sel.textContent = '';
  const all = el('option', '', 'all'); all.value = 'all'; sel.appendChild(all);
  for (const v of values) { const o = el('option', '', label(v)); o.value = String(v); sel.appendChild(o); }
  sel.value = keep;
}
function legend() {
  const R = META.runs[state.a], B = state.b >= 0 ? META.runs[state.b] : null;
  let text = {
    weight: 'Background = the token\'s weight in the loss, from the run\'s lowest (' + fmt(R.wlo) +
            ', none) to its highest (' + fmt(R.whi) + ', full)' + (R.whi > R.wlo ? '' : ': all weights are equal'),
    score: 'Background = the credit arm\'s score of the token (' + (R.arm || 'arm') +
           ': e.g. flow throughput), divided by the response\'s highest score',
    entropy: 'Background = the entropy of the distribution that sampled the token, 0 to the run\'s highest (' +
             fmt(R.emax) + ')'}[state.mode];
  const lacks = r => r && ((state.mode === 'score' && !r.score) || (state.mode === 'entropy' && !r.entropy));
  const lacking = [R, B].filter(lacks);
  if (lacking.length) text += '. Not logged by ' + lacking.map(r => r.label).join(', ') +
                              ' (set model.log_token_scores: true): shown unshaded';
  $('legend').textContent = text + '. Outlined = up-weighted (weight above the run\'s lowest); green underline = ' +
                            'the answer span the verifier parsed; dotted = the question. Hover a token for its values.';
}
function render() {
  const R = META.runs[state.a], c = R.rows;
  fillSelect($('step'), R.steps, v => String(v));
  let groups = 0;
  for (let i = 0; i < c.group.length; i++) if (c.group[i] + 1 > groups) groups = c.group[i] + 1;
  fillSelect($('group'), Array.from({length: groups}, (_, g) => g), v => String(v));
  for (const k of ['a', 'b', 'step', 'group', 'rmin', 'rmax', 'mode']) $(k).value = String(state[k]);
  $('trunc').checked = state.trunc;
  legend();
  const hits = [];
  for (let i = 0; i < c.step.length; i++) if (matches(c, i)) hits.push(i);
  const pages = Math.max(1, Math.ceil(hits.length / PER_PAGE));
  state.page = Math.min(Math.max(0, state.page), pages - 1);
  const cards = $('cards');
  cards.textContent = '';
  for (const i of hits.slice(state.page * PER_PAGE, (state.page + 1) * PER_PAGE)) {
    const pair = el('div', 'pair');
    pair.appendChild(card(state.a, i));
    if (state.b >= 0) {
      const j = counterpart(i);
      pair.appendChild(j >= 0 ? card(state.b, j) : el('div', 'missing', META.runs[state.b].label +
        ': no response to this prompt at this step'));
    }
    cards.appendChild(pair);
  }
  for (const id of ['pager', 'pager2']) {
    const box = $(id);
    box.textContent = '';
    const prev = el('button', '', '← previous'), next = el('button', '', 'next →');
    prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    prev.onclick = () => { state.page--; update(); };
    next.onclick = () => { state.page++; update(); };
    box.appendChild(prev);
    box.appendChild(document.createTextNode('page ' + (state.page + 1) + ' of ' + pages + ' (' + hits.length +
      ' of ' + c.step.length + ' rollouts match)'));
    box.appendChild(next);
  }
}
function update() {
  history.replaceState(null, '', '#' + Object.entries(state).map(([k, v]) =>
    k + '=' + encodeURIComponent(typeof v === 'boolean' ? (v ? '1' : '0') : v)).join('&'));
  render();
}
for (const k of ['a', 'b', 'step', 'group', 'rmin', 'rmax', 'mode', 'trunc']) {
  $(k).addEventListener('change', () => {
    const v = $(k);
    state[k] = k === 'trunc' ? v.checked : (k === 'a' || k === 'b') ? Number(v.value) : v.value;
    if (k === 'a') { state.step = 'all'; state.group = 'all'; }
    state.page = 0;
    update();
  });
}
render();
document.documentElement.dataset.renderMs = performance.now().toFixed(0);
"""
