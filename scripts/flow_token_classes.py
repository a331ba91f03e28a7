"""Token classes of the up-weighted (hub) tokens in a run's rollouts.jsonl.

    python scripts/flow_token_classes.py lightning_logs/quickstart/version_0/rollouts.jsonl --rollouts 50
"""

from __future__ import annotations

import argparse
import collections
import json

from transformers import AutoTokenizer

from flowtracer.credit.stats import token_class
from flowtracer.model.policy import bundled_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rollouts")
    p.add_argument("--rollouts", dest="n", type=int, default=50, help="first N rollouts of the file")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled demo model)")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or bundled_model_dir())
    records = [json.loads(line) for line in open(args.rollouts)][: args.n]
    hub, rest = collections.Counter(), collections.Counter()
    examples = collections.Counter()
    for rec in records:
        top = max(rec["weights"])
        for t, w in zip(rec["tokens"], rec["weights"]):
            text = tok.convert_tokens_to_string([t])
            cls = token_class(text)
            (hub if w == top and top > 1 else rest)[cls] += 1
            if w == top and top > 1:
                examples[repr(text)] += 1
    n_hub, n_rest = sum(hub.values()), sum(rest.values())
    print(f"{len(records)} rollouts, {n_hub} up-weighted tokens, {n_rest} others")
    print(f"{'class':<12} {'hub share':>10} {'other share':>12}")
    for cls in sorted(set(hub) | set(rest), key=lambda c: -hub[c]):
        print(f"{cls:<12} {hub[cls] / max(n_hub, 1):>10.1%} {rest[cls] / max(n_rest, 1):>12.1%}")
    print("most frequent hub tokens:", ", ".join(f"{t} x{c}" for t, c in examples.most_common(12)))


if __name__ == "__main__":
    main()
