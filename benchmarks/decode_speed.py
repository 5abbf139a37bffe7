"""Decoding speed of IAV against the base model alone, side by side in one run.

Greedy decoding with KV cache, batch 4, 64 new tokens, on a Llama of hidden 512 / 8 layers / vocab 32000 (random
weights: speed does not depend on them). Variants are timed back to back in each round;
speed is the median over rounds of the per-round ratio:

- `base`: the model alone;
- `iav alpha=1`: the default alignment head (hidden-space offset read out through the frozen unembedding);
- `iav per-row alpha`: the same with alphas [0, 0.5, 1, 2] in one batch;
- `own-vocab head`: the design we did not choose, a head of the same size plus its own `d x V` projection.

Usage: OMP_NUM_THREADS=2 python -m benchmarks.decode_speed [--rounds 10] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from iav_trl import AlignmentHeadConfig, get_iav_model
from iav_trl.evaluation.timing import summarize_times, time_rounds


class OwnVocabHead(nn.Module):
    """The alternative design: `a_t = W_a g(h)` with its own `(V x d)` readout, added after the model's logits."""

    def __init__(self, model, config: AlignmentHeadConfig):
        super().__init__()
        hidden, vocab = model.config.hidden_size, model.config.vocab_size
        iav = get_iav_model(model, config)  # reuse the same head body, then read out through our own projection
        self.body = iav.alignment_heads["default"]
        self.readout = nn.Linear(hidden, vocab, bias=False)
        self.model = iav.get_base_model()
        self._hidden = None
        self.model.get_output_embeddings().register_forward_pre_hook(self._capture)
        self.model.register_forward_hook(self._add)

    def _capture(self, module, args):
        self._hidden = args[0]

    def _add(self, module, args, output):
        output.logits = output.logits + self.readout(self.body(self._hidden))
        return output

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8
    )
    torch.manual_seed(0)
    models = {}
    base = LlamaForCausalLM(config).eval().to(args.device)
    iav = get_iav_model(LlamaForCausalLM(config).eval().to(args.device), AlignmentHeadConfig())
    with torch.no_grad():  # a non-zero head, as after training
        for p in iav.alignment_heads.parameters():
            p.normal_(0, 0.02)
    own = OwnVocabHead(LlamaForCausalLM(config).eval().to(args.device), AlignmentHeadConfig()).to(args.device)
    ids = torch.randint(10, 32000, (args.batch, args.prompt_tokens), device=args.device)
    common = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    per_row = [0.0, 0.5, 1.0, 2.0][: args.batch] + [1.0] * max(0, args.batch - 4)
    models = {
        "base": lambda: base.generate(**common),
        "iav alpha=1": lambda: iav.generate(**common, alpha=1.0),
        "iav per-row alpha": lambda: iav.generate(**common, alpha=per_row),
        "own-vocab head": lambda: own.generate(**common),
    }
    with torch.no_grad():
        seconds = time_rounds(models, args.rounds, warmup=1, device=args.device)
    summary = summarize_times(seconds, work=args.batch * args.new_tokens)
    results = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "variants": {
            name: {
                "median_s": row["median_s"],
                "tokens_per_s": row["per_s"],
                # Median of per-round ratios: each round times every variant back to back, so load on this shared
                # machine that drifts between rounds cancels out.
                "speed_vs_base": row["speed_vs"].get("base", 1.0),
            }
            for name, row in summary.items()
        },
    }
    print(f"| variant | tokens/s | speed vs base |  ({args.device}, {torch.get_num_threads()} threads)")
    print("| --- | --- | --- |")
    for name, row in results["variants"].items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['speed_vs_base']:.3f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
