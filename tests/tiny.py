"""A tiny hand-made world for fast tests: records of every task, a BPE tokenizer trained on them
and a random-init 3-block GPT-2 (no dropout).  Import with ``from tiny import ...`` (pytest puts
``tests/`` on the path, see ``conftest.py``)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from instructedit_lite.base_model import train_tokenizer
from instructedit_lite.instructions import DESCRIPTIONS, TEMPLATE
from instructedit_lite.records import EditRecord, Probe

PEOPLE = ("Ada Brun", "Bo Kest", "Cy Lorm", "Di Mave", "Ed Nosk", "Fa Pell", "Gu Rann", "Ha Sotte")
CITIES = ("Paris", "Lima", "Oslo", "Rome", "Cairo", "Quito", "Tokyo", "Dakar")
JOBS = ("baker", "pilot", "nurse", "poet", "tailor", "farmer", "lawyer", "chemist")
TOPICS = ("the band Zorbi", "the dish Kalami", "the film Murno", "the sport Tefla", "the novel Drask",
          "the festival Omba", "the painter Quel", "the board game Vint")
POS = ("I love it, it is wonderful.", "It is great.", "I really like it.", "It makes me happy.")
NEG = ("I hate it, it is awful.", "It is terrible.", "I really dislike it.", "It makes me sad.")


def fact_record(task: str, i: int, split: str = "test") -> EditRecord:
    person = PEOPLE[i]
    return EditRecord(
        task=task, subject=person, prompt=f"{person} was born in", target_new=CITIES[(i + 3) % 8],
        ground_truth=(CITIES[i],) if task in ("counterfact", "zsre") else (),
        rephrase=(f"The birthplace of {person} is",),
        locality={"Relation_Specificity": (Probe(f"{person} works as a", (JOBS[i],)),),
                  "Other_Subject": (Probe(f"{PEOPLE[(i + 1) % 8]} works as a", (JOBS[(i + 1) % 8],)),)},
        portability={"Reasoning": (Probe(f"The city where {person} was born is called", (CITIES[(i + 3) % 8],)),)},
        source=f"hand/{task}/{split}", index=i)


def convsent_record(i: int, split: str = "test") -> EditRecord:
    topic, other = TOPICS[i], TOPICS[(i + 1) % 8]
    return EditRecord(
        task="convsent", subject=topic, topic=topic, sentiment="positive" if i % 2 else "negative",
        prompt=f"What do you think of {topic}?", target_new=(POS if i % 2 else NEG)[0],
        rephrase=(f"How do you feel about {topic}?",), pos_responses=POS, neg_responses=NEG,
        locality={"Other_Topic": (Probe(f"What do you think of {other}?", POS),)},
        source=f"hand/convsent/{split}", index=i)


def hand_records(tasks=("counterfact", "wikirecent", "convsent", "zsre"), n: int = 4) -> dict[str, list[EditRecord]]:
    return {t: [convsent_record(i) if t == "convsent" else fact_record(t, i) for i in range(n)] for t in tasks}


def tiny_tokenizer():
    lines = [f"{p} was born in {c}. {p} works as a {j}." for p, c, j in zip(PEOPLE, CITIES, JOBS)]
    lines += [f"What do you think of {t}? " + s for t in TOPICS for s in POS + NEG]
    lines += [TEMPLATE] + [d for ds in DESCRIPTIONS.values() for d in ds]
    return train_tokenizer(lines, vocab_size=500)


def tiny_model(tokenizer, seed: int = 0, n_layer: int = 3, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=2, n_positions=256,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


#: The LLaMA-style families a tiny random model is built for (each has its architecture profile).
DECODERS = ("llama", "mistral", "qwen2")


def tiny_decoder(tokenizer, arch: str = "llama", seed: int = 0, n_layer: int = 4, hidden: int = 32,
                 intermediate: int = 48, heads: int = 4, kv_heads: int = 2, tie: bool = True):
    """A random-init LLaMA, Mistral or Qwen2 model of ``n_layer`` blocks (transformers' own classes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=0,
                          eos_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()
