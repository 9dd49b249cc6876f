"""Auto-interpretation without a real model: deterministic fake backends implement the chat protocol; the
OpenAI-compatible backend talks to a loopback HTTP server started here (no external network)."""

from __future__ import annotations

import http.server
import json
import random
import re
import threading
import time
from datetime import datetime

import pytest
import torch

import mechscope
from mechscope.features.autointerp import (
    BackendError, ChatBackend, DetectionScore, Example, Explanation, LocalChatBackend, OpenAIChatBackend,
    Prediction, ScoredLabel, balanced_accuracy, explain, explain_and_score, format_example, parse_label,
    sample_detection_set, score_detection,
)
from tests.conftest import make_tiny, make_tokenizer

torch.set_num_threads(1)


def ex(text: str, acts=None) -> Example:
    toks = text.split(" ")
    toks = [toks[0]] + [" " + t for t in toks[1:]]
    return Example(toks, acts if acts is not None else [0.0] * len(toks))


def text_of(messages) -> str:
    return messages[-1]["content"].split("Text: ", 1)[-1]


class FakeExplainer:
    name = "fake-explainer"

    def __init__(self, reply: str):
        self.reply, self.seen = reply, []

    def complete(self, messages, *, max_new_tokens=32, temperature=0.0, seed=0):
        self.seen.append(messages)
        return self.reply


class KeywordScorer:
    """Says yes iff ``keyword`` is in the scored text (text replies only)."""

    name = "keyword"

    def __init__(self, keyword: str):
        self.keyword = keyword

    def complete(self, messages, *, max_new_tokens=32, temperature=0.0, seed=0):
        return "Yes." if self.keyword in text_of(messages) else "No"


class KeywordLogprobScorer(KeywordScorer):
    name = "keyword-logprobs"

    def logprobs(self, conversations, candidates):
        return [[-0.1, -3.0] if self.keyword in text_of(c) else [-3.0, -0.1] for c in conversations]


class ConstantScorer:
    name = "constant"

    def __init__(self, answer: str):
        self.answer = answer

    def complete(self, messages, *, max_new_tokens=32, temperature=0.0, seed=0):
        return self.answer


def label(text="cats") -> Explanation:
    return Explanation(text, "manual", "", "2024-01-01T00:00:00+00:00", 3, {})


POS = [ex(f"the cat number {i} sat", [0, 2.0 + i, 0, 0, 0]) for i in range(6)]
NEG = [ex(f"a dog number {i} ran") for i in range(4)]


# -- data and JSON ----------------------------------------------------------------------------------------
def test_example_validates_and_is_frozen():
    e = Example(["a", " b"], [0, 1])
    assert e.tokens == ("a", " b") and e.acts == (0.0, 1.0) and e.max_act == 1.0 and e.text == "a b"
    with pytest.raises(mechscope.InputError, match="one activation per token"):
        Example(["a"], [1, 2])
    with pytest.raises(mechscope.InputError, match="NaN"):
        Example(["a"], [float("nan")])
    with pytest.raises(Exception):
        e.tokens = ("c",)


def test_json_round_trips_and_unknown_keys_raise():
    e = Explanation("x", "fake", "[]", "2024-01-01T00:00:00+00:00", 7, {"reply": "x", "n": [1, 2]})
    assert Explanation.from_json(e.to_json()) == e
    s = score_detection(KeywordLogprobScorer("cat"), label(), POS, NEG)
    assert DetectionScore.from_json(s.to_json()) == s
    sl = ScoredLabel(e, s)
    assert ScoredLabel.from_json(sl.to_json()) == sl and sl.label == "x"
    assert Example.from_dict(POS[0].to_dict()) == POS[0]
    with pytest.raises(mechscope.InputError, match="unknown keys"):
        Explanation.from_dict({**e.to_dict(), "colour": 1})
    with pytest.raises(mechscope.InputError, match="JSON"):
        Explanation("x", "f", "", "", None, {"t": object()})


# -- explaining -------------------------------------------------------------------------------------------
def test_format_example_marks_peak_runs():
    e = Example(["<s>", " The", " cat", " sat", "\n", " on"], [0, 0, 3, 2.5, 0, 1])
    assert format_example(e) == "<s> The <<cat sat>>\\n on"
    assert format_example(e, mark_fraction=0.2) == "<s> The <<cat sat>>\\n <<on>>"
    long = Example([f" t{i}" for i in range(100)], [float(i == 90) for i in range(100)])
    s = format_example(long, context_tokens=8)
    assert "<<t90>>" in s and len(re.findall(r"t\d+", s)) == 8
    # a split character (empty spans, then the token that completes it) is marked as one, whole
    split = Example(["<s>", " I", " ", "", "😀", " it"], [0, 0, 0, 4.0, 0.5, 0])
    assert format_example(split) == "<s> I <<😀>> it"


@pytest.mark.parametrize("reply, want", [
    ('  "Label: Animals sitting."\nmore text', "Animals sitting"),
    ("1. **cats**", "cats"),
    ("- Answer: 'years'", "years"),
    ("\n\n  the word “of”.  ", "the word “of"),  # a closing quote is stripped with the period
    ("word " * 30, ("word " * 16).strip()),
    ("", ""),
])
def test_parse_label(reply, want):
    assert parse_label(reply) == want
    assert len(parse_label(reply)) <= 80


def test_explain_records_provenance_and_uses_top_examples():
    fake = FakeExplainer('"Cats sitting."\nExtra.')
    examples = POS + [ex("weak cat", [0, 0.5])]
    e = explain(fake, examples, latent=3, max_examples=3)
    assert e.label == "Cats sitting" and e.explainer == "fake-explainer" and e.latent == 3
    datetime.fromisoformat(e.date)
    sent = fake.seen[0]
    assert json.loads(e.prompt) == sent and e.extra["reply"] == fake.reply
    question = sent[-1]["content"]
    assert question.count("Example ") == 3 and "<<cat>>" in question and "activation 7.00" in question
    assert "number 5" in question and "number 2" not in question  # the 3 strongest only
    assert e.extra["example_fingerprints"] == [POS[i].fingerprint() for i in (5, 4, 3)]
    assert len(explain(fake, POS, few_shot=True).extra["example_fingerprints"]) == 6


def test_explain_errors():
    with pytest.raises(BackendError, match="no usable label"):
        explain(FakeExplainer(' "" \n'), POS)
    with pytest.raises(mechscope.InputError, match="examples"):
        explain(FakeExplainer("x"), POS, prompt_template="no placeholder")
    with pytest.raises(mechscope.InputError, match="active"):
        explain(FakeExplainer("x"), NEG)


# -- detection scoring ------------------------------------------------------------------------------------
def naive_balanced_accuracy(truth, pred):
    tp = fn = tn = fp = 0
    for t, p in zip(truth, pred):
        if t:
            tp, fn = tp + p, fn + (not p)
        else:
            tn, fp = tn + (not p), fp + p
    return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


def test_balanced_accuracy_matches_naive_formula():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        truth = [True, False] + [rng.random() < 0.3 for _ in range(n)]
        pred = [rng.random() < 0.5 for _ in truth]
        assert balanced_accuracy(truth, pred)[0] == pytest.approx(naive_balanced_accuracy(truth, pred))
    with pytest.raises(mechscope.InputError, match="positives and negatives"):
        balanced_accuracy([True, True], [True, False])


@pytest.mark.parametrize("scorer", [KeywordScorer("cat"), KeywordLogprobScorer("cat")])
def test_perfect_scorer_gets_one(scorer):
    s = score_detection(scorer, label(), POS, NEG)
    assert (s.balanced_accuracy, s.tpr, s.tnr, s.n_pos, s.n_neg) == (1.0, 1.0, 1.0, 6, 4)
    assert s.scorer == scorer.name and "{label}" in s.prompt and len(s.predictions) == 10
    assert [p.truth for p in s.predictions] == [True] * 6 + [False] * 4
    if isinstance(scorer, KeywordLogprobScorer):
        assert s.auroc == 1.0 and s.margin == 0.0 and s.predictions[0].evidence == pytest.approx(2.9)
    else:
        assert s.auroc is None and s.predictions[0].reply == "Yes."


@pytest.mark.parametrize("answer", ["Yes", "No", "maybe"])
def test_constant_scorer_gets_half(answer):
    s = score_detection(ConstantScorer(answer), label(), POS, NEG)
    assert s.balanced_accuracy == 0.5 and {s.tpr, s.tnr} == {0.0, 1.0}


def test_wrong_label_scores_below_chance_and_margin_moves_threshold():
    assert score_detection(KeywordScorer("dog"), label(), POS, NEG).balanced_accuracy == 0.0
    s = score_detection(KeywordLogprobScorer("cat"), label(), POS, NEG, margin=5.0)  # nobody clears 5 nats
    assert s.tpr == 0.0 and s.tnr == 1.0 and s.auroc == 1.0


def test_scoring_refuses_the_explained_examples_and_bad_input():
    e = explain(FakeExplainer("cats"), POS[:3])
    with pytest.raises(mechscope.InputError, match="among the examples"):
        score_detection(KeywordScorer("cat"), e, POS, NEG)
    assert score_detection(KeywordScorer("cat"), e, POS[3:], NEG).balanced_accuracy == 1.0
    with pytest.raises(mechscope.InputError, match="positives and negatives"):
        score_detection(KeywordScorer("cat"), e, [], NEG)
    with pytest.raises(mechscope.InputError, match="label"):
        score_detection(KeywordScorer("cat"), e, POS[3:], NEG, prompt_template="{text}")


# -- sampling ---------------------------------------------------------------------------------------------
def synthetic(n_ctx=120, ctx_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_ctx, ctx_len, generator=g) * 10
    acts[torch.rand(n_ctx, ctx_len, generator=g) < 0.9] = 0  # sparse
    acts[::3] = 0  # a third never active
    toks = [[f" c{i}t{j}" for j in range(ctx_len)] for i in range(n_ctx)]
    return acts, toks


def test_detection_set_is_disjoint_deterministic_and_spread_over_quantiles():
    acts, toks = synthetic()
    a = sample_detection_set(acts, toks, n_train=10, n_pos=20, n_neg=20, seed=1)
    assert a == sample_detection_set(acts, toks, n_train=10, n_pos=20, n_neg=20, seed=1)
    assert a != sample_detection_set(acts, toks, n_train=10, n_pos=20, n_neg=20, seed=2)
    tr, po, ne = set(a.train_idx), set(a.pos_idx), set(a.neg_idx)
    assert len(tr) == 10 and len(po) == 20 and len(ne) == 20 and not (tr & po or tr & ne or po & ne)
    peak = acts.max(1).values
    assert all(float(peak[i]) > 0 for i in po) and all(float(acts[i].abs().max()) == 0 for i in ne)
    rest = sorted((float(peak[i]) for i in range(len(peak)) if peak[i] > 0 and i not in tr))
    assert min(peak[i] for i in tr) >= max(rest)  # train = the top contexts
    low, high = rest[len(rest) // 5], rest[4 * len(rest) // 5]
    assert sum(float(peak[i]) <= low for i in po) >= 3 and sum(float(peak[i]) >= high for i in po) >= 3
    assert [e.acts for e in a.positives] == [tuple(acts[i].tolist()) for i in a.pos_idx]
    # and the scorer accepts them against an explanation of the train set
    e = explain(FakeExplainer("x"), a.train)
    score_detection(KeywordScorer("t3"), e, a.positives, a.negatives)


def test_detection_set_skips_repeated_texts_and_reports_shortage():
    acts, toks = synthetic()
    toks[1] = list(toks[2])  # the same text twice: only the first occurrence may be used
    d = sample_detection_set(acts, toks, n_train=5, n_pos=5, n_neg=5)
    assert 2 not in (*d.train_idx, *d.pos_idx, *d.neg_idx) or 1 not in (*d.train_idx, *d.pos_idx, *d.neg_idx)
    with pytest.raises(mechscope.InputError, match="lower n_train"):
        sample_detection_set(acts, toks, n_train=10, n_pos=500)
    with pytest.raises(mechscope.InputError, match=r"\[n_ctx, ctx_len\]"):
        sample_detection_set(acts[0], toks)


def test_explain_and_score_wires_train_and_held_out():
    acts, toks = synthetic()
    d = sample_detection_set(acts, toks, n_train=5, n_pos=10, n_neg=10)
    sl = explain_and_score(FakeExplainer("c"), ConstantScorer("Yes"), d, latent=4)
    assert sl.explanation.latent == 4 and sl.score.balanced_accuracy == 0.5 and sl.score.n_pos == 10


# -- local backend on a tiny random model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
                         "{% if add_generation_prompt %}w3{% endif %}")
    return LocalChatBackend(mechscope.HookedModel(make_tiny("llama"), tok, name="tiny"), batch_size=3)


def test_local_backend_is_deterministic_and_batches_exactly(tiny_chat):
    assert isinstance(tiny_chat, ChatBackend) and tiny_chat.name == "local:tiny"
    convs = [[{"role": "user", "content": " ".join(f"w{5 + (i * j) % 90}" for j in range(n))}]
             for i, n in enumerate([3, 9, 1, 6, 12, 4, 7])]
    first = tiny_chat.complete(convs[0], max_new_tokens=5)
    assert first == tiny_chat.complete(convs[0], max_new_tokens=5) and len(first.split()) <= 5
    assert tiny_chat.complete(convs[0], max_new_tokens=5, temperature=1.0, seed=3) == \
        tiny_chat.complete(convs[0], max_new_tokens=5, temperature=1.0, seed=3)
    batched = torch.tensor(tiny_chat.logprobs(convs, ["w10", "w11"]))
    single = torch.tensor([tiny_chat.logprobs([c], ["w10", "w11"])[0] for c in convs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert (batched < 0).all()
    with pytest.raises(mechscope.InputError, match="single-token"):
        tiny_chat.logprobs(convs, ["w10 w11", "w12"])


def test_local_backend_needs_a_chat_template():
    with pytest.raises(mechscope.InputError, match="chat template"):
        LocalChatBackend(mechscope.HookedModel(make_tiny("llama"), make_tokenizer()))


# -- OpenAI-compatible backend on a loopback server ------------------------------------------------------
class Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    requests: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        mode = type(self).mode
        if mode == "slow":
            time.sleep(1.0)
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "model exploded"}')
            return
        text = self.server_reply(body) if mode == "ok" else "not json at all"
        payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                   if mode == "ok" else text).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    @staticmethod
    def server_reply(body):
        return "Yes" if "cat" in text_of(body["messages"]) else "No"


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out: expected in these tests
        pass


@pytest.fixture
def server():
    srv = Quiet(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    Handler.mode, Handler.requests = "ok", []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


def test_openai_backend_round_trip_and_scoring(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    be = OpenAIChatBackend(server, "m1", api_key_env="MY_KEY", timeout_s=5)
    assert be.complete([{"role": "user", "content": "Text: a cat"}], max_new_tokens=7) == "Yes"
    path, headers, body = Handler.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "m1" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    s = score_detection(be, label(), POS, NEG)  # no logprobs: the text reply decides
    assert s.balanced_accuracy == 1.0 and s.scorer == be.name and s.auroc is None
    monkeypatch.delenv("MY_KEY")
    be.complete([{"role": "user", "content": "x"}])
    assert "Authorization" not in Handler.requests[-1][1]


def test_openai_backend_errors_are_clear_and_bounded(server):
    be = OpenAIChatBackend(server, "m1", timeout_s=0.3)
    msg = [{"role": "user", "content": "x"}]
    Handler.mode = "500"
    with pytest.raises(BackendError, match=r"HTTP 500.*model exploded") as e:
        be.complete(msg)
    assert be.url in str(e.value)
    Handler.mode = "garbage"
    with pytest.raises(BackendError, match="OpenAI chat completion"):
        be.complete(msg)
    Handler.mode = "slow"
    t = time.perf_counter()
    with pytest.raises(BackendError, match="cannot reach .*timeout 0.3 s"):
        be.complete(msg)
    assert time.perf_counter() - t < 0.9


def test_openai_backend_connection_refused_and_bad_url():
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2)
    with pytest.raises(BackendError, match=f"cannot reach http://127.0.0.1:{port}/v1/chat/completions.*start the server"):
        be.complete([{"role": "user", "content": "x"}])
    with pytest.raises(mechscope.InputError, match="http://"):
        OpenAIChatBackend("127.0.0.1:8000", "m")
    with pytest.raises(mechscope.InputError, match="timeout_s"):
        OpenAIChatBackend("http://x/v1", "m", timeout_s=0)


def test_prediction_record():
    assert Prediction(True, False, 0.5).evidence == 0.5
