"""`iav_trl.inference.serving` on localhost, through the official `openai` client: per-request alpha and head mixes."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from testing_utils import CORPUS, randomize_heads

from iav_trl import AlignmentHeadConfig, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm, train_tokenizer

serving = pytest.importorskip(
    "iav_trl.inference.serving", reason="serving needs fastapi and uvicorn (`pip install .[serving]`)"
)
openai = pytest.importorskip("openai", reason="the tests talk to the server with the `openai` client")

NEW_TOKENS = 8
PROMPTS = [
    "Human: How do I bake bread? Assistant:",
    "Human: Tell me a joke. Assistant:",
    "The quick brown fox",
    "I am sorry, but",
]
MIX = {"harmless": 1.0, "helpful": 0.5}


@pytest.fixture(scope="module")
def served():
    """A server on a free localhost port with two heads (`harmless` active, `helpful` loaded), and a client."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CORPUS, vocab_size=400)
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400).eval(), AlignmentHeadConfig(4, 16), "harmless")
    model.add_adapter("helpful", AlignmentHeadConfig(4, 16, default_alpha=0.5))
    randomize_heads(model, std=0.3)
    config = serving.ContinuousBatchingConfig(num_blocks=64, page_size=16, max_batch_tokens=256)
    app = serving.build_app(model, tokenizer, "tiny", cb_config=config)
    server, thread, base_url = serving.serve_in_thread(app)
    url = base_url.removesuffix("/v1")
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
    yield model, tokenizer, client, url
    server.should_exit = True
    thread.join(10)
    app.state.generation_state.shutdown()


def offline(model, tokenizer, text: str, alpha) -> str:
    """`IAVModel.generate`'s greedy completion of `text` (the reference every response must equal)."""
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, alpha=alpha, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def post(url: str, body: str | dict, method: str = "POST") -> tuple[int, str]:
    """A raw HTTP request (status, text), for bodies the `openai` client would not send."""
    data = None if method == "GET" else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def complete(client, prompt: str, **extra):
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body=extra or None
    )
    return response.choices[0].text


def test_greedy_responses_equal_offline_generate_at_each_alpha_and_head_mix(served):
    model, tokenizer, client, _ = served
    prompt = PROMPTS[0]
    references = {alpha: offline(model, tokenizer, prompt, alpha) for alpha in (0.0, 1.0, 2.0)}
    mixed = offline(model, tokenizer, prompt, MIX)
    assert len(set(references.values()) | {mixed}) >= 3, "the strengths hardly change the output"
    for alpha, reference in references.items():
        assert complete(client, prompt, alpha=alpha) == reference, alpha
    assert complete(client, prompt, alpha=1.0, adapter_weights={"harmless": 1.0, "helpful": 0.5}) == mixed
    # No `alpha`: each head's default_alpha times its weight; the active adapter `harmless` alone by default.
    assert complete(client, prompt) == offline(model, tokenizer, prompt, None)
    assert complete(client, prompt, adapter_weights={"helpful": 1.0}) == offline(
        model, tokenizer, prompt, {"helpful": 0.5}
    )


def test_chat_completions_apply_the_chat_template_like_offline_generate(served):
    model, tokenizer, client, _ = served
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for alpha in (0.0, 1.5):
        response = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body={"alpha": alpha}
        )
        assert response.choices[0].message.content == offline(model, tokenizer, text, alpha), alpha


def test_sixteen_concurrent_requests_with_four_alphas_share_batches_and_all_come_back_right(served):
    model, tokenizer, client, _ = served
    alphas = (0.0, 0.5, 1.0, 2.0)
    jobs = [(prompt, alpha) for prompt in PROMPTS for alpha in alphas]
    references = {job: offline(model, tokenizer, *job) for job in jobs}
    batches = []
    prepare = serving.StrengthCarrier.prepare_tensor_args

    def record(carrier, requests):  # the strengths of each engine forward, one per scored row
        values = prepare(carrier, requests)
        if carrier.head == "harmless":
            batches.append(values.view(torch.float32).tolist())
        return values

    serving.StrengthCarrier.prepare_tensor_args = record
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda job: complete(client, job[0], alpha=job[1]), jobs))
    finally:
        serving.StrengthCarrier.prepare_tensor_args = prepare
    assert answers == [references[job] for job in jobs]
    assert any(len(set(batch)) >= 2 for batch in batches), "requests with different alphas never shared a batch"


def streamed(text: str) -> str:
    """
    `text` as transformers' streamer sends it: the tiny model's byte-level tokens can stop in the middle of a UTF-8
    character, whose bytes the streamer holds back and, at the end of the stream, never sends (decoded at once, they
    are U+FFFD).
    """
    return text.removesuffix("\ufffd")


def test_streaming_delivers_the_same_text(served):
    model, tokenizer, client, _ = served
    prompt = PROMPTS[1]
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True, extra_body={"alpha": 1.5}
    )
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(chunks) >= 2 and "".join(chunks) == streamed(offline(model, tokenizer, prompt, 1.5))
    messages = [{"role": "user", "content": "Tell me a joke."}]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True, extra_body={"alpha": 2.0}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == streamed(offline(model, tokenizer, expected, 2.0))


@pytest.mark.parametrize(
    "fields, param",
    [
        ('"alpha": NaN', "alpha"),
        ('"alpha": Infinity', "alpha"),
        ('"alpha": "strong"', "alpha"),
        ('"alpha": true', "alpha"),
        ('"alpha": 1e9', "alpha"),
        ('"adapter_weights": {"unknown": 1.0}', "adapter_weights"),
        ('"adapter_weights": {"helpful": "half"}', "adapter_weights.helpful"),
        ('"adapter_weights": [1.0]', "adapter_weights"),
    ],
)
def test_bad_strengths_get_a_400_naming_the_field_and_the_server_keeps_serving(served, fields, param):
    model, tokenizer, client, url = served
    body = f'{{"model": "tiny", "prompt": "{PROMPTS[2]}", "max_tokens": 2, "temperature": 0, {fields}}}'
    for route in ("/v1/completions", "/v1/chat/completions"):
        if route.endswith("chat/completions"):
            body = body.replace(f'"prompt": "{PROMPTS[2]}"', '"messages": [{"role": "user", "content": "Hi"}]')
        status, text = post(url + route, body)
        assert status == 400, (route, text)
        error = json.loads(text)["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert complete(client, PROMPTS[2], alpha=1.0) == offline(model, tokenizer, PROMPTS[2], 1.0)


def test_clients_reach_the_served_model_only_and_the_model_list_shows_the_heads(served, tmp_path):
    _, _, client, url = served
    listed = client.models.list().data
    assert [entry.id for entry in listed] == ["tiny"]
    assert listed[0].model_extra["alignment_heads"] == {
        "harmless": {"default_alpha": 1.0, "weight": 1.0},
        "helpful": {"default_alpha": 0.5, "weight": 0.0},
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in (str(tmp_path), "gpt2"):
        status, text = post(url + "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 1})
        assert status == 400 and "tiny" in text, (status, text)
    for route in ("/load_model", "/reset", "/v1/responses"):
        assert post(url + route, {"model": str(tmp_path)})[0] == 404, route
    assert post(url + "/health", {}, method="GET") == (200, '{"status":"ok"}')


def test_throughput_benchmark_runs_every_server_and_reports_both_ratios(tmp_path):
    """`benchmarks/serving_throughput.py` end to end on the tiny model and the fixture's prompts."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "serving.json"
    command = [sys.executable, "-m", "benchmarks.serving_throughput", "--model", "tiny"]  # as the Makefile runs it
    command += ["--data", os.path.join(root, "tests", "fixtures", "hh-rlhf-harmless-base-test-40.jsonl")]
    command += ["--requests", "6", "--clients", "3", "--max-tokens", "4", "--rounds", "1", "--json", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rounds"]
    assert set(row) == {"base", "iav one alpha", "iav mixed alphas"}
    assert all(r["tokens"] > 0 and r["tokens"] <= 6 * 4 for r in row.values())
    assert report["ratios"]["iav_vs_base"] == row["iav one alpha"]["tokens_per_s"] / row["base"]["tokens_per_s"]


def test_stopping_the_engine_removes_its_hooks_from_the_model():
    """A second app on the same model (or the model used on its own afterwards) meets no hook of the first."""
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400).eval(), AlignmentHeadConfig(4, 16))
    base = model.get_base_model()
    before = (dict(base._forward_pre_hooks), dict(base._forward_hooks))
    app = serving.build_app(model, train_tokenizer(CORPUS, vocab_size=400), "tiny")
    server, thread, base_url = serving.serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
        complete(client, PROMPTS[0], alpha=1.0)  # the engine starts, and hooks the model, on its first request
        assert len(base._forward_pre_hooks) == len(before[0]) + 1 and len(base._forward_hooks) == len(before[1]) + 1
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.generation_state.shutdown()
    assert (dict(base._forward_pre_hooks), dict(base._forward_hooks)) == before
