"""Is the fast engine's inverse-CDF draw (sampling.draw: auto) an exact sample of the real model's
softmax? Chi-square of 100,000 draws per context against the model's own probabilities at T = 0.8,
on the highest-entropy positions of a quickstart-style response and on its last position (where EOS
dominates). Tokens expected fewer than 5 times are pooled into one cell. z = (chi2 - dof) / sqrt(2 dof)
is about N(0, 1) for an exact sampler; EOS frequency is shown beside its probability. Prints a table.

    python scripts/draw_exactness.py [--draws 100000] [--out results/draw_exactness.md]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100_000)
    ap.add_argument("--contexts", type=int, default=6, help="highest-entropy positions (plus the last one)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from flowtracer.generation.precision import describe_cpu
    from flowtracer.generation.sampler import inverse_cdf_draw
    from flowtracer.model.policy import load_policy
    from flowtracer.runs.csvlog import print_and_write

    model, tok = load_policy("smollm2-135m-instruct")[:2]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5? Put the final answer in <answer></answer> tags."}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(prompt + "To find the sum of 7 and 5, we add them together: 7 + 5 = 12. <answer>12</answer>",
              return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0].float() / args.temperature
    logp = logits.double().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    contexts = entropy.argsort(descending=True)[:args.contexts].tolist() + [ids.shape[1] - 1]
    torch.manual_seed(0)
    batch = 1000
    lines = [f"# Inverse-CDF draw vs the model's softmax: {describe_cpu()}", "",
             f"SmolLM2-135M-Instruct, T = {args.temperature}, {args.draws:,} draws per context.",
             f"Command: `python scripts/draw_exactness.py {' '.join(sys.argv[1:])}`", "",
             "| position | entropy (nats) | chi2 | dof | z | EOS frequency | EOS probability |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in contexts:
        counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
        for _ in range(args.draws // batch):
            picks = inverse_cdf_draw(logits[c:c + 1].expand(batch, -1))
            counts += torch.bincount(picks, minlength=logits.shape[-1]).double()
        n = counts.sum()
        expected = logp[c].exp() * n
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp_ = torch.cat([expected[big], expected[~big].sum()[None]])
        chi2, dof = float(((obs - exp_) ** 2 / exp_).sum()), obs.numel() - 1
        eos = tok.eos_token_id
        lines.append(f"| {c} | {float(entropy[c]):.2f} | {chi2:.1f} | {dof} | {(chi2 - dof) / (2 * dof) ** 0.5:+.2f} | "
                     f"{float(counts[eos] / n):.4f} | {float(logp[c, eos].exp()):.4f} |")
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
