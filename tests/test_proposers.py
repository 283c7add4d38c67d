"""Proposers: the candidate filter, the prompt, and both proposers against tiny real models (the
HTTP one through a real server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from instructedit_lite.instructions import DESCRIPTIONS
from instructedit_lite.proposers import (CandidateFilter, HTTPChatProposer, LocalChatProposer, chat_replies,
                                         clean_completion, from_brackets, proposal_messages, to_brackets)
from tiny import tiny_tokenizer

CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def chat_lm():
    """A random 2-block GPT-2 with a long context and a chat template: a real (if silly) chat LM."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=2048,
                                       bos_token_id=0, eos_token_id=0)).eval()
    return model, tok


INCUMBENTS = [(DESCRIPTIONS["convsent"][0], 0.71), (DESCRIPTIONS["convsent"][1], 0.83)]


def test_filter_rejects_each_kind_of_bad_candidate_and_counts_reasons():
    f = CandidateFilter()
    good = "Make the chatbot feel [LABEL] about [TOPIC] and keep its other opinions as they were."
    tried = [to_brackets(DESCRIPTIONS["convsent"][0])]
    texts = [good, "", "Too short [LABEL] [TOPIC].", "word " * 50 + "[LABEL] [TOPIC]",
             "Make the chatbot feel positive about the topic and nothing else changes at all.",  # no placeholders
             "Make the chatbot feel [LABEL] about [TOPIC] and [TOPIC] again, nothing else.",  # [TOPIC] twice
             "Make the chatbot feel {sentiment} about [TOPIC] and keep the rest as before.",  # braces
             "Make the chatbot feel [LABEL] about [TOPIC] ###### ##### #### ### ## # ## ### ####",
             "Task: convsent Input: make the chatbot feel [LABEL] about [TOPIC] please now.",
             "the the the chatbot [LABEL] about [TOPIC] and the other topics stay.",
             "MAKE the chatbot feel [LABEL] about [TOPIC], and keep its other opinions as they were!",  # dup of good
             tried[0].upper(),
             "Make the chatbot feel [LABEL] about [TOPIC] and keep its other opinions as they"]
    accepted, reasons = f("convsent", texts, tried)
    assert accepted == [good]
    assert reasons == [None, "empty", "too short", "too long", "placeholders", "placeholders", "placeholders",
                       "garbage", "garbage", "garbage", "duplicate", "duplicate", "unfinished"]
    assert f.rejected == {"empty": 1, "too short": 1, "too long": 1, "placeholders": 3, "garbage": 3, "duplicate": 2,
                          "unfinished": 1}
    # Fact tasks must not carry ConvSent's placeholders; their plain descriptions pass.
    assert f.reason("zsre", "Answer the question about [TOPIC] with the new answer given here.") == "placeholders"
    assert f.reason("zsre", DESCRIPTIONS["zsre"][0] + " Be exact.") is None


def test_every_shipped_description_passes_the_filter():
    f = CandidateFilter()
    for task, texts in DESCRIPTIONS.items():
        assert all(f.reason(task, to_brackets(t)) is None for t in texts), task


def test_brackets_round_trip_and_clean_completion():
    text = DESCRIPTIONS["convsent"][3]
    assert "[LABEL]" in to_brackets(text) and "{" not in to_brackets(text)
    assert from_brackets(to_brackets(text)) == text
    assert clean_completion('\n  1. "Description: Swap the fact for the new one."\nmore') == "Swap the fact for the new one."
    assert clean_completion("- Teach the model.") == "Teach the model."
    assert clean_completion("Task 2: Teach the model the new fact. Then explain why.") == "Teach the model the new fact."
    assert clean_completion("  \n ") == ""


def test_prompt_carries_task_descriptions_and_scores_best_first():
    messages = proposal_messages("convsent", INCUMBENTS)
    user = messages[-1]["content"]
    assert "convsent" in user and "0.830" in user and "0.710" in user
    assert user.index("0.830") < user.index("0.710")
    assert to_brackets(DESCRIPTIONS["convsent"][1]) in user and "[LABEL] and [TOPIC]" in user
    assert "must not contain placeholders" in proposal_messages("zsre", [(DESCRIPTIONS["zsre"][0], 0.5)])[-1]["content"]
    with pytest.raises(ValueError, match="unknown task"):
        proposal_messages("nope", INCUMBENTS)


def test_local_proposer_is_seeded_and_leaves_the_global_rng_alone(chat_lm):
    model, tok = chat_lm
    proposer = LocalChatProposer(model, tok, max_new_tokens=12)
    state = torch.get_rng_state()
    a = proposer.propose("convsent", INCUMBENTS, 3, np.random.default_rng(5))
    assert torch.equal(state, torch.get_rng_state())
    b = proposer.propose("convsent", INCUMBENTS, 3, np.random.default_rng(5))
    c = proposer.propose("convsent", INCUMBENTS, 3, np.random.default_rng(6))
    assert len(a) == 3 and all(isinstance(t, str) for t in a)
    assert a == b and a != c
    loaded = []
    lazy = LocalChatProposer(loader=lambda: loaded.append(1) or (model, tok), max_new_tokens=12)
    assert not loaded and lazy.propose("convsent", INCUMBENTS, 3, np.random.default_rng(5)) == a and loaded == [1]


class _ChatServer(BaseHTTPRequestHandler):
    """Answers ``POST /v1/chat/completions`` like OpenAI, with text from the tiny chat LM."""

    lm = None
    requests: list = []
    mode = "ok"

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"model exploded")
            return
        model, tok = self.lm
        text = chat_replies(model, tok, body["messages"], 1, body["seed"], max_new_tokens=body["max_tokens"])[0]
        reply = {"object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        if self.mode == "malformed":
            reply = {"choices": []}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def server(chat_lm):
    _ChatServer.lm, _ChatServer.requests, _ChatServer.mode = chat_lm, [], "ok"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_http_proposer_talks_openai_chat_completions(server, chat_lm):
    model, tok = chat_lm
    proposer = HTTPChatProposer(server, "tiny-gpt", api_key="k-test", max_tokens=10)
    texts = proposer.propose("convsent", INCUMBENTS, 2, np.random.default_rng(3))
    sent = _ChatServer.requests
    assert [r["path"] for r in sent] == ["/v1/chat/completions"] * 2
    assert all(r["model"] == "tiny-gpt" and r["auth"] == "Bearer k-test" for r in sent)
    assert sent[0]["messages"] == proposal_messages("convsent", INCUMBENTS)
    assert sent[0]["seed"] != sent[1]["seed"]
    # The texts are the tiny model's own replies for the seeds sent, cleaned.
    expected = [clean_completion(chat_replies(model, tok, r["messages"], 1, r["seed"], max_new_tokens=10)[0]) for r in sent]
    assert texts == expected
    assert proposer.propose("convsent", INCUMBENTS, 2, np.random.default_rng(3)) == texts  # seeded


def test_http_proposer_errors_name_the_url_and_the_problem(server):
    proposer = HTTPChatProposer(server, "tiny-gpt", max_tokens=5)
    _ChatServer.mode = "error"
    with pytest.raises(RuntimeError, match=r"chat/completions: HTTP 500.*model exploded"):
        proposer.propose("zsre", [(DESCRIPTIONS["zsre"][0], 0.4)], 1, np.random.default_rng(0))
    _ChatServer.mode = "malformed"
    with pytest.raises(RuntimeError, match=r"choices\[0\]\.message\.content"):
        proposer.propose("zsre", [(DESCRIPTIONS["zsre"][0], 0.4)], 1, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="cannot connect"):
        HTTPChatProposer("http://127.0.0.1:9/v1", "x", timeout=2).propose("zsre", [], 1, np.random.default_rng(0))
