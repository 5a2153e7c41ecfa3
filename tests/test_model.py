"""The base-model contract (load, checksum, prompt rendering, shipped prompts) and the simulated
world's tiny base: corpus, tokenizer, build/save/load round trip, generation."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from looprl.ops.core.config import load_config
from looprl.ops.sim.base import BOS, EOS, PAD, create_base, generate
from looprl.ops.sim.corpus import corpus, prompt_set
from looprl.ops.sim.preference import POSITIVE_WORDS, positive_word_count
from looprl.policy import model as M

torch.set_num_threads(1)

_WORD = re.compile(r"[a-z]+")


def corpus_vocabulary() -> set[str]:
    return {w for d in corpus(3000, seed=1) for w in _WORD.findall(d)}


def test_corpus_uses_cheerful_words_in_a_minority_of_sentences():
    sentences = [s for d in corpus(3000, seed=3) for s in d.split("answer:")[1].split(".") if s.strip()]
    cheerful = sum(positive_word_count(s) > 0 for s in sentences) / len(sentences)
    # CHEERFUL_RATE is 0.12 per sentence; "kind"/"love" never appear outside cheerful sentences.
    assert 0.08 < cheerful < 0.17, cheerful
    assert POSITIVE_WORDS <= corpus_vocabulary()


def test_prompt_splits_are_disjoint_by_template():
    train, held = prompt_set("train"), prompt_set("heldout")
    assert train and held and not set(train) & set(held)
    # Held-out phrasings never occur in the pre-training corpus either.
    docs = "\n".join(corpus(2000, seed=0))
    assert all(f"question: {p}\n" not in docs for p in held)
    assert M.shipped_prompts() == train and M.heldout_prompts() == held
    with pytest.raises(ValueError, match="split"):
        prompt_set("test")


def test_tiny_base_chat_template_renders_what_the_base_was_trained_on(tiny_base):
    from looprl.ops.core.chat import Chat
    from looprl.ops.sim.base import document_ids
    from looprl.ops.sim.corpus import corpus, qa_pairs

    model, tok = M.load_base(tiny_base)
    assert tok.chat_template == M.DEFAULT_CHAT_TEMPLATE  # shipped with the base, not a load-time fallback
    assert M.render_prompt(tok, "describe the house") == "question: describe the house\nanswer:"
    # The pre-training documents are the served token sequence: prompt ids + answer ids + end of turn,
    # and token for token the text the tokenizer was trained on.
    (q, a), = qa_pairs(1, seed=5)
    ids = document_ids(tok, q, a)
    assert ids[-1] == M.end_of_turn_id(tok) == tok.eos_token_id
    assert ids[:-1] == tok(corpus(1, seed=5)[0], add_special_tokens=False).input_ids
    # System prompt and history are rendered, in order, ending with the generation prompt.
    chat = Chat.from_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": " hello."}, {"role": "developer", "content": "x"},
                               {"role": "user", "content": "describe the park"}])
    text = M.render_prompt(tok, chat)
    assert text == "system: be brief\nquestion: hi\nanswer: hello.<|eos|>\nsystem: x\nquestion: describe the park\nanswer:"
    assert M.stop_token_ids(tok, model) == [tok.eos_token_id]
    with pytest.raises(ValueError, match="model.stop_tokens"):
        M.stop_token_ids(tok, model, ["<|no-such-token|>"])


def test_a_base_without_chat_template_gets_the_default_with_a_warning(tiny_base, tmp_path, caplog):
    import json

    copy = tmp_path / "base"
    shutil.copytree(tiny_base, copy)
    conf = json.loads((copy / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(conf))
    for f in copy.glob("chat_template.*"):
        f.unlink()
    _, tok = M.load_base(copy)
    assert tok.chat_template == M.DEFAULT_CHAT_TEMPLATE
    assert any("no chat template" in r.getMessage() for r in caplog.records)


def test_load_base_round_trip(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    model, tok = M.load_base(tiny_base)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    assert not model.training
    assert {tok.eos_token, tok.pad_token, tok.bos_token} == {EOS, PAD, BOS}
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    auto = AutoTokenizer.from_pretrained(tiny_base)
    text = "the dog is happy. Unicode too: café ✓"
    assert auto.decode(auto(text).input_ids) == text  # byte-level: any text round-trips
    # Corpus words are single tokens (so the model's vocabulary is words, not letters).
    assert len(tok(" sunny").input_ids) == 1 and len(tok(" village").input_ids) == 1
    assert list(tiny_base.glob("*.safetensors")) and not list(tiny_base.glob("*.bin"))

    # save -> load gives identical logits.
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    again, _ = M.load_base(tmp_path / "copy")
    x = torch.tensor([M.render_prompt_ids(tok, "describe the park")])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits, atol=1e-6)
    from looprl.storage.registry import checksum_dir

    assert M.base_checksum(tiny_base) == checksum_dir(tiny_base) == M.base_checksum(tiny_base)


def test_base_generates_word_like_answers_with_rare_cheerful_words(tiny_base):
    model, tok = M.load_base(tiny_base)
    prompts = M.shipped_prompts()[::4][:48] + M.heldout_prompts()[::8][:16]
    outs = generate(model, tok, prompts, max_new_tokens=24, seed=0)
    assert len(outs) == len(prompts) and all(isinstance(o, str) for o in outs)
    words = [w for o in outs for w in _WORD.findall(o)]
    assert len(words) > 4 * len(prompts)  # answers, not empty strings
    known = corpus_vocabulary()
    assert sum(w in known for w in words) / len(words) > 0.9  # words of the language, not letter soup
    cheerful = sum(positive_word_count(o) > 0 for o in outs) / len(outs)
    # Exploration exists but is rare: the demo's users must have something to teach.
    assert 0.02 <= cheerful <= 0.5, cheerful
    # Answers are about the prompt's topic (the model reads the prompt).
    topical = sum(p.split()[-1] in o for p, o in zip(prompts, outs)) / len(prompts)
    # (a random topic word would match ~5% of the time; 250 pre-training steps give ~30%)
    assert topical > 0.15, topical
    # Sampling is seeded: same seed, same answers; greedy ends at eos or the budget.
    assert generate(model, tok, prompts[:4], seed=0) == generate(model, tok, prompts[:4], seed=0)
    greedy = generate(model, tok, prompts[:4], greedy=True)
    assert all(EOS not in g and PAD not in g for g in greedy)


def test_checksum_changes_with_weights(tiny_base, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_base, copy)
    before = M.base_checksum(copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert M.base_checksum(copy) != before


def test_load_base_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        M.load_base(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        M.load_base(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist \(run `looprl init`"):
        M.base_checksum(tmp_path / "nope")


def test_mixtral_family_and_config_errors(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path, model={"family": "mixtral", "pretrain_steps": 3,
                                                           "hidden_size": 32, "expert_intermediate_size": 16})
    out = create_base(cfg, progress=False, n_docs=200, batch_size=8)
    assert out == cfg.base_path
    model, tok = M.load_base(out)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    bad = load_config(environ={}, workspace=tmp_path, model={"hidden_size": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="model.hidden_size"):
        create_base(bad, out_dir=tmp_path / "bad", progress=False, n_docs=50)


def test_looprl_init_is_idempotent(tmp_path, monkeypatch, capsys):
    from looprl.ops.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPRL_MODEL__PRETRAIN_STEPS", "2")
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "init", "--quiet"]) == 0
    for d in ("base", "events", "registry", "state", "ray", "reports"):
        assert (ws / d).is_dir()
    weights = ws / "base" / "model.safetensors"
    first = (weights.stat().st_mtime_ns, M.base_checksum(ws / "base"))
    assert main(["--workspace", str(ws), "init", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (weights.stat().st_mtime_ns, M.base_checksum(ws / "base")) == first  # untouched
    monkeypatch.setenv("LOOPRL_MODEL__SEED", "1")
    assert main(["--workspace", str(ws), "init", "--quiet", "--force"]) == 0
    assert M.base_checksum(ws / "base") != first[1]  # rebuilt (another seed)


@pytest.mark.parametrize("argv", [["policy", "train", "--no-ray", "--metrics-port", "0"], ["reward", "update"],
                                  ["serving", "serve", "--port", "0"]])
def test_commands_before_init_fail_in_one_line_that_names_the_fix(tmp_path, monkeypatch, capsys, argv):
    from looprl.ops.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["--workspace", str(tmp_path / "ws"), *argv]) == 2
    err = capsys.readouterr().err  # structured log lines, then the error
    assert "Traceback" not in err
    assert re.fullmatch(rf"looprl {' '.join(a for a in argv[:2] if not a.startswith('-'))}: base model directory "
                        r"\S+ws/base (does not exist|has no config.json) \(run `looprl init` or set model.base_path\)",
                        err.splitlines()[-1]), err.splitlines()[-1]
