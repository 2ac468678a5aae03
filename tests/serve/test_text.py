"""Incremental detokenization (serve.text): what streams out adds up to the whole decode, never
sends a partial character it would have to take back, and stops exactly where a stop string starts
— on a byte-level BPE tokenizer (the project's) and a SentencePiece-style one (Metaspace)."""

from __future__ import annotations

import random

import pytest

from foundation.models import build_tokenizer
from serve.text import TextTracker

CORPUS = "\n".join(
    [
        "Grüß dich, wie geht's? 👋 Très bien, merci ! 東京は晴れです。",
        "the quick brown fox jumps",
        "over the lazy dog; résumé naïve café 🙂🙃",
        "hello world hello there general kenobi",
    ]
    * 20
)


def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    # Llama's decoder: ▁ back to spaces, byte tokens to bytes, and the first space dropped.
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(
        CORPUS.splitlines(),
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>", *bytes_], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request, tmp_path_factory):
    if request.param == "metaspace":
        return metaspace_tokenizer()
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400, corpus=CORPUS)


def sequences(tokenizer, n: int = 60):
    """Real text cut at random token counts, and random token soup (partial characters galore)."""
    rng = random.Random(0)
    lines = CORPUS.splitlines()
    for _ in range(n):
        yield tokenizer.encode(" ".join(rng.sample(lines, 2)), add_special_tokens=False)[: rng.randint(1, 60)]
        yield [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]


def stream(tokenizer, tokens: list[int], stop: list[str]) -> tuple[list[str], TextTracker, bool]:
    tracker, pieces, hit = TextTracker(tokenizer, stop), [], False
    for end in range(1, len(tokens) + 1):
        delta, hit = tracker.push(tokens[:end])
        pieces.append(delta)
        if hit:
            break
    pieces.append(tracker.flush())
    return pieces, tracker, hit


def test_the_streamed_pieces_add_up_to_the_whole_decode(tokenizer):
    for tokens in sequences(tokenizer):
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        pieces, tracker, _ = stream(tokenizer, tokens, [])
        assert "".join(pieces) == tracker.text == whole, tokens
        # Nothing sent is ever taken back: every prefix of the stream is a prefix of the answer,
        # and a partial character (U+FFFD) goes out only if the sequence ends in it.
        sent = ""
        for piece in pieces[:-1]:
            sent += piece
            assert whole.startswith(sent)
            assert not piece.endswith("\ufffd") or whole.endswith(sent)


def test_a_stop_string_ends_the_text_where_it_starts(tokenizer):
    rng = random.Random(1)
    for tokens in sequences(tokenizer, 30):
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(whole) < 6:
            continue
        at = rng.randrange(1, len(whole) - 3)
        stop = whole[at : at + rng.randint(1, 3)]
        pieces, tracker, hit = stream(tokenizer, tokens, ["never there", stop])
        expected = whole[: whole.find(stop)]
        assert hit and "".join(pieces) == tracker.text == expected, (tokens, stop)


def test_the_caller_may_append_past_what_it_pushed(tokenizer):
    tokens = tokenizer.encode("hello world", add_special_tokens=False)
    tracker = TextTracker(tokenizer, [])
    sent = "".join(tracker.push(tokens[:end])[0] for end in range(1, len(tokens) + 1))
    tokens.append(tokenizer.convert_tokens_to_ids(tokenizer.eos_token))  # the engine's list gains an EOS
    assert sent + tracker.flush() == "hello world"
