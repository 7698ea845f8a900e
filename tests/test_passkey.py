"""Pass-key retrieval: exact sample lengths, needle depth, determinism, the scoring criterion (against fake models
and against `generate`), errors per length, argument checks, and the table and plots."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from conftest import build
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer, PreTrainedTokenizerFast

from hf_posenc.workflow import data, passkey
from hf_posenc.workflow.passkey import (
    ANSWER,
    NEEDLE,
    QUESTION,
    build_sample,
    build_samples,
    markdown,
    passkey_accuracy,
    plot,
    plot_by_scheme,
    sample_plan,
    score,
    template_length,
)

WORDS = (
    "the a river stone green blue sky grass tree house runs walks over under quietly bright small large old new city "
    "road light water field morning evening sun rain hill path"
).split()


def _filler(words: int = 1500, seed: int = 0) -> str:
    """Held-out-like text without the words of the template: a random sequence of plain words, full stops between."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))


FILLER = _filler()


def _bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained here (no download): multi-byte tokens, and keys of varying token counts."""
    rng = random.Random(1)
    numbers = " ".join(str(rng.randint(10, 99)) for _ in range(3000))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([FILLER, numbers, NEEDLE + QUESTION], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


BYT5 = ByT5Tokenizer()
BPE = _bpe()
TOKENIZERS = {"byt5": BYT5, "bpe": BPE}
if hasattr(data, "byte_tokenizer"):  # the project's own byte tokenizer, once it exists
    TOKENIZERS["bytes"] = data.byte_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _find(sequence: list[int], part: list[int]) -> list[int]:
    """Every index where `part` occurs in `sequence`."""
    return [i for i in range(len(sequence) - len(part) + 1) if sequence[i : i + len(part)] == part]


@pytest.fixture(params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]


# ---------------------------------------------------------------------------------------------------------- samples


def test_samples_have_the_exact_length_and_pieces(tokenizer):
    filler_ids = _ids(tokenizer, FILLER)
    for key in ("71432", "10000", "7", "98765432"):
        shortest = template_length(tokenizer, key)
        for length in (shortest, shortest + 1, 150, 257):
            for depth in (0.0, 0.3, 1.0):
                prompt, answer = build_sample(tokenizer, FILLER, length, depth, key, offset=17)
                assert len(prompt) + len(answer) == length
                assert answer == _ids(tokenizer, ANSWER.format(key=key))
                question = _ids(tokenizer, QUESTION)
                assert prompt[-len(question) :] == question
                needle = _ids(tokenizer, NEEDLE.format(key=key))
                (at,) = _find(prompt, needle)
                # removing the needle and the question leaves the filler window, contiguous and from the offset
                rest = prompt[:at] + prompt[at + len(needle) : -len(question)]
                assert rest == filler_ids[17 : 17 + len(rest)]
                assert len(rest) == length - shortest
                # ids given instead of text: the same sample
                assert build_sample(tokenizer, filler_ids, length, depth, key, offset=17) == (prompt, answer)
    # the BOS token counts in the length
    bos_prompt, bos_answer = build_sample(BPE, FILLER, 120, 0.5, "71432", add_bos=True)
    assert bos_prompt[0] == BPE.bos_token_id and len(bos_prompt) + len(bos_answer) == 120
    assert template_length(BPE, "71432", add_bos=True) == template_length(BPE, "71432") + 1


def test_build_samples_keeps_lengths_with_keys_of_different_token_counts():
    built = build_samples(BPE, FILLER, 160, depths=(0.0, 1.0), samples=12, digits=5, seed=0)
    assert len({len(s["answer_ids"]) for s in built}) > 1  # the BPE splits some keys into fewer tokens
    assert all(len(s["prompt_ids"]) + len(s["answer_ids"]) == 160 for s in built)


def test_needle_moves_with_depth(tokenizer):
    key, length = "71432", 300
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    depths = [i / 10 for i in range(11)]
    starts = []
    for depth in depths:
        prompt, _ = build_sample(tokenizer, FILLER, length, depth, key, offset=5)
        (at,) = _find(prompt, needle)
        starts.append(at)
        filler_tokens = length - template_length(tokenizer, key)
        assert abs(at - depth * filler_tokens) <= 0.5  # the fraction of the filler before the needle is the depth
    assert starts == sorted(starts) and starts[0] < starts[-1]
    assert starts[0] == 0  # depth 0: before all the filler
    prompt, _ = build_sample(tokenizer, FILLER, length, 1.0, key, offset=5)
    assert prompt[-len(needle) - len(question) :] == needle + question  # depth 1: after all of it


def test_same_seed_same_prompts_other_seed_other_keys(tokenizer):
    first = build_samples(tokenizer, FILLER, 200, samples=4, digits=5, seed=3)
    again = build_samples(tokenizer, FILLER, 200, samples=4, digits=5, seed=3)
    other = build_samples(tokenizer, FILLER, 200, samples=4, digits=5, seed=4)
    assert first == again
    assert {s["key"] for s in first}.isdisjoint({s["key"] for s in other})
    keys = [s["key"] for s in first if s["depth"] == 0.0]
    assert len(set(keys)) == 4 and all(len(k) == 5 and k[0] != "0" and k.isdigit() for k in keys)
    # a sample keeps its key and filler window at every depth; different samples read different filler
    for depth in passkey.DEPTHS:
        row = [s for s in first if s["depth"] == depth]
        assert [s["key"] for s in row] == keys
    offsets = [s["offset"] for s in first if s["depth"] == 0.0]
    assert len(set(offsets)) == 4
    windows = {tuple(s["prompt_ids"][len(_ids(tokenizer, NEEDLE.format(key=s["key"]))) :]) for s in first[:4]}
    assert len(windows) == 4
    # the plan is the seed's alone: the same keys at every length and with every tokenizer
    assert [k for k, _ in sample_plan(4, 5, 3)] == keys
    assert [s["key"] for s in build_samples(BYT5, FILLER, 300, samples=4, seed=3)][:4] == keys
    assert all(len(k) == 1 and k != "0" for k, _ in sample_plan(50, 1, 0))


def test_too_short_lengths_and_fillers_raise_with_the_minimum():
    shortest = template_length(BYT5, "71432")
    with pytest.raises(ValueError, match=f"at least {shortest} tokens"):
        build_sample(BYT5, FILLER, shortest - 1, 0.5, "71432")
    with pytest.raises(ValueError, match="filler text is too short"):
        build_sample(BYT5, "short filler", 200, 0.5, "71432")
    with pytest.raises(ValueError, match="depth must be in"):
        build_sample(BYT5, FILLER, 200, 1.5, "71432")


# ---------------------------------------------------------------------------------------------------------- scoring


class _Fake(torch.nn.Module):
    """A stand-in causal LM: `.logits` (B, T, V) from a rule over the ids; one dummy parameter for the device."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def predict(self, ids: list[int], t: int) -> int:
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        batch, length = input_ids.shape
        self.calls.append((batch, length, keep))
        logits = torch.zeros(batch, length, self.vocab)
        for row in range(batch):
            ids = input_ids[row].tolist()
            for t in range(length - keep, length):  # only the positions scoring reads; the rest predict token 0
                logits[row, t, self.predict(ids, t)] = 1.0
        return logits


class Peek(_Fake):
    """Looks one token ahead: right everywhere (except, with `miss_last`, at the last position that predicts)."""

    def __init__(self, vocab: int, miss_last: bool = False):
        super().__init__(vocab)
        self.miss_last = miss_last

    def predict(self, ids, t):
        if t + 1 >= len(ids):
            return 0
        if self.miss_last and t == len(ids) - 2:
            return (ids[t + 1] + 1) % self.vocab
        return ids[t + 1]

    def forward(self, input_ids):  # no logits_to_keep: returns every position (scoring must cope)
        return type("Output", (), {"logits": self.logits(input_ids, keep=16)})()


class Constant(Peek):
    def predict(self, ids, t):
        return 0


class Induction(_Fake):
    """A causal copier (an induction head): predicts the token that followed the longest earlier match of the current
    suffix, the most recent among equals, looking back at most `window` tokens. It never sees the answer before
    predicting it, so it retrieves the key iff the needle lies within its window."""

    def __init__(self, vocab: int, window: int | None = None):
        super().__init__(vocab)
        self.window = window

    def predict(self, ids, t):
        best, best_len = None, 0
        lowest = 0 if self.window is None else max(0, t - self.window)
        for j in range(t - 1, lowest - 1, -1):
            matched = 0
            while matched <= j and ids[j - matched] == ids[t - matched]:
                matched += 1
            if matched > best_len:
                best, best_len = j, matched
        return 0 if best is None else ids[best + 1]

    def forward(self, input_ids, logits_to_keep: int = 0):
        keep = logits_to_keep or input_ids.shape[1]
        return type("Output", (), {"logits": self.logits(input_ids, keep=keep)[:, -keep:]})()


def test_scoring_against_fake_models(tokenizer):
    vocab = max(len(tokenizer), 384)
    lengths = [120, 200]
    kwargs = dict(lengths=lengths, depths=(0.0, 0.5, 1.0), samples=3, progress=False)
    for model, expected in ((Peek(vocab), 1.0), (Induction(vocab), 1.0), (Constant(vocab), 0.0)):
        results = passkey_accuracy(model, tokenizer, FILLER, **kwargs)
        for length in lengths:
            assert results["lengths"][length]["accuracy"] == expected, type(model).__name__
            assert set(results["lengths"][length]["by_depth"].values()) == {expected}
    assert all(results["lengths"][n]["token_accuracy"] == 0.0 for n in lengths)  # the constant model's
    # one wrong answer token is a miss, even the last one; partial credit counts the others
    results = passkey_accuracy(Peek(vocab, miss_last=True), tokenizer, FILLER, **kwargs)
    answer_tokens = len(_ids(tokenizer, " 71432"))  # keys of 5 digits: the same number of tokens with these tokenizers
    assert all(results["lengths"][n]["accuracy"] == 0.0 for n in lengths)
    for n in lengths:
        assert results["lengths"][n]["token_accuracy"] == pytest.approx((answer_tokens - 1) / answer_tokens, abs=0.1)


def test_scoring_by_depth_with_a_short_memory():
    """A copier that looks back only 130 byte-tokens finds the key when it sits next to the question, not far back."""
    model = Induction(384, window=130)
    results = passkey_accuracy(model, BYT5, FILLER, [400], samples=2, batch_size=4, progress=False)
    by_depth = results["lengths"][400]["by_depth"]
    assert by_depth == {0.0: 0.0, 0.25: 0.0, 0.5: 0.0, 0.75: 0.0, 1.0: 1.0}
    assert results["lengths"][400]["accuracy"] == pytest.approx(0.2)
    # batched by batch_size, and only the answer positions' logits asked for (keep = answer + 1)
    assert [batch for batch, _, _ in model.calls] == [4, 4, 2]
    assert {(length, keep) for _, length, keep in model.calls} == {(400, len(_ids(BYT5, " 71432")) + 1)}


def test_teacher_forced_argmax_agrees_with_generate():
    """On real tiny models: the key is scored retrieved iff greedy `generate` produces exactly the answer ids."""
    for arch, posenc in (("llama", "alibi"), ("gpt_neox", "rope")):
        model = build(arch, posenc, config_overrides={"vocab_size": 384})
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        built = build_samples(BYT5, FILLER, 110, depths=(0.0, 1.0), samples=2, seed=0)
        pairs = [(s["prompt_ids"], s["answer_ids"]) for s in built]
        greedy = []
        for prompt, answer in pairs:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=len(answer), min_length=0
            )
            greedy.append(out[0, len(prompt) :].tolist())
        assert score(model, pairs, batch_size=3) == [g == answer for g, (_, answer) in zip(greedy, pairs)]
        # the greedy continuation itself is retrieved; changing any one of its tokens is not
        as_answers = [(prompt, g) for (prompt, _), g in zip(pairs, greedy)]
        assert score(model, as_answers, batch_size=4) == [True] * len(pairs)
        for position in (0, -1):
            changed = []
            for prompt, g in as_answers:
                g = list(g)
                g[position] = (g[position] + 1) % 384
                changed.append((prompt, g))
            assert score(model, changed) == [False] * len(pairs)


# ------------------------------------------------------------------------------------------------ errors and checks


def test_a_too_short_length_is_an_error_for_that_length_only():
    shortest = template_length(BYT5, "12345")
    results = passkey_accuracy(Peek(384), BYT5, FILLER, [40, 160, 100_000], samples=2, progress=False)
    assert f"at least {shortest} tokens" in results["lengths"][40]["error"]
    assert "filler text is too short" in results["lengths"][100_000]["error"]
    assert results["lengths"][160]["accuracy"] == 1.0
    json.dumps(results)  # serialisable


def test_a_position_table_that_ends_is_an_error_for_that_length_only():
    stock = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=128, vocab_size=384)
    )
    results = passkey_accuracy(stock, BYT5, FILLER, [110, 200], samples=1, depths=(0.5,), progress=False)
    assert "past the model's position table (128 positions)" in results["lengths"][200]["error"]
    assert "accuracy" in results["lengths"][110]
    learned = build("llama", "learned", config_overrides={"vocab_size": 384, "max_position_embeddings": 128})
    results = passkey_accuracy(learned, BYT5, FILLER, [110, 200], samples=1, depths=(0.5,), progress=False)
    assert "position table" in results["lengths"][200]["error"] and "accuracy" in results["lengths"][110]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lengths=[]), "lengths must be a non-empty"),
        (dict(lengths=[0]), "lengths must be ints >= 1"),
        (dict(lengths=[128, 128]), "lengths must be distinct"),
        (dict(depths=(0.0, 1.5)), r"depths must be numbers in \[0, 1\].*1.5"),
        (dict(depths=(-0.1,)), r"depths must be numbers in \[0, 1\]"),
        (dict(depths=(float("nan"),)), r"depths must be numbers in \[0, 1\]"),
        (dict(depths=()), "depths must be a non-empty"),
        (dict(digits=0), "digits must be an int >= 1, got 0"),
        (dict(samples=0), "samples must be an int >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(needle=" The pass key is here. "), "needle must contain '{key}'"),
    ],
)
def test_bad_arguments_raise_clearly(kwargs, message):
    arguments = dict(lengths=[128], progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        passkey_accuracy(Peek(384), BYT5, FILLER, **arguments)


def test_numpy_arguments_give_plain_json():
    import numpy as np

    lengths, depths = np.array([128, 160]), np.linspace(0.0, 1.0, 3)
    results = passkey_accuracy(Peek(384), BYT5, FILLER, list(lengths), depths=depths, samples=1, progress=False)
    assert json.loads(json.dumps(results))["depths"] == [0.0, 0.5, 1.0]
    assert list(results["lengths"]) == [128, 160] and all(type(n) is int for n in results["lengths"])


def test_quiet_library(capsys, caplog):
    with caplog.at_level(logging.INFO, logger=passkey.__name__):
        passkey_accuracy(Peek(384), BYT5, FILLER, [40, 128], samples=1, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # logs, never prints; no bar when progress=False
    assert any("40" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------- outputs


def _results() -> dict:
    model = Induction(384, window=130)
    return passkey_accuracy(model, BYT5, FILLER, [40, 128, 256], depths=(0.0, 0.5, 1.0), samples=2, progress=False)


def test_markdown_table():
    results = _results()
    table = markdown(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| length | depth 0 | depth 0.5 | depth 1 | overall | key tokens right |"
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 40 | n/a | n/a | n/a | n/a: length 40 is too short")
    by_depth = results["lengths"][128]["by_depth"]
    at_128 = results["lengths"][128]
    assert lines[3] == f"| 128 | {by_depth[0.0]:.2f} | {by_depth[0.5]:.2f} | {by_depth[1.0]:.2f} | " + (
        f"{at_128['accuracy']:.2f} | {at_128['token_accuracy']:.2f} |"
    )
    assert lines[4].endswith(f"| 0.00 | 0.00 | 1.00 | 0.33 | {results['lengths'][256]['token_accuracy']:.2f} |")
    assert markdown(json.loads(json.dumps(results))) == table  # the same from the saved JSON


def test_plots_are_written(tmp_path):
    results = _results()
    reloaded = json.loads(json.dumps(results))
    for name, source in (("heat.png", results), ("heat_json.png", reloaded)):
        path = plot(source, tmp_path / name)
        assert path.exists() and path.stat().st_size > 1000
    same = {"alibi": results, "rope": reloaded, "nope": results}  # identical series must all be drawn
    path = plot_by_scheme(same, tmp_path / "by_scheme" / "lines.png")
    assert path.exists() and path.stat().st_size > 1000
