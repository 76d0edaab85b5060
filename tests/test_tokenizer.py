"""The tokenizer against the real Emu3.5 tokenizer files (docs/design.md §2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.tokenizer import Emu35Tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "emu35-tokenizer"

pytestmark = pytest.mark.skipif(
    not (TOKENIZER_DIR / "emu3.tiktoken").is_file(),
    reason=f"real Emu3.5 tokenizer files not found at {TOKENIZER_DIR} (test data beside the repository)",
)


@pytest.fixture(scope="session")
def tok(real_tokenizer) -> Emu35Tokenizer:
    return real_tokenizer


def test_vocabulary_size(tok):
    assert tok.vocab_size == 282_926
    assert tok.num_bpe_tokens == 151_643
    assert tok.ids.num_visual == 131_072


def test_role_ids(tok):
    ids = tok.ids
    assert (ids.bos, ids.eos, ids.img, ids.boi, ids.eoi, ids.eol) == (151849, 151850, 151851, 151852, 151853, 151846)
    assert (ids.pad, ids.eof, ids.tms) == (151643, 151847, 151848)
    assert (ids.bss, ids.ess) == (151746, 151747)
    assert (ids.bog, ids.eog) == (151706, 151707)
    assert (ids.boc, ids.eoc) == (151696, 151697)
    assert ids.first_visual == 151854
    assert ids.last_visual == 282925 == tok.vocab_size - 1


def test_role_ids_match_token_names(tok):
    for role, name in [("bos", "<|extra_203|>"), ("eos", "<|extra_204|>"), ("pad", "<|endoftext|>"),
                       ("eol", "<|extra_200|>"), ("img", "<|image token|>"), ("boi", "<|image start|>"),
                       ("eoi", "<|image end|>"), ("bss", "<|extra_100|>"), ("bog", "<|extra_60|>"),
                       ("boc", "<|extra_50|>")]:
        assert tok.token_id(name) == getattr(tok.ids, role)
        assert tok.decode([getattr(tok.ids, role)]) == name
    assert tok.token_id("<|visual token 000000|>") == 151854
    assert tok.token_id("<|visual token 131071|>") == 282925


def test_digits_and_star(tok):
    assert tok.digit_ids == tuple(range(15, 25))
    assert tok.star_id == 9
    assert tok.encode("55*73") == [20, 20, 9, 22, 18]
    assert tok.encode_number(55) + [tok.star_id] + tok.encode_number(73) == [20, 20, 9, 22, 18]
    assert [tok.digit_value(i) for i in range(15, 25)] == list(range(10))
    assert tok.digit_value(9) is None
    with pytest.raises(ValueError):
        tok.encode_number(-1)


def test_t2i_prompts(tok):
    cond = tok.encode("<|extra_203|>You are a helpful assistant for t2i task. USER: a cat ASSISTANT: <|extra_100|>")
    assert cond == [151849, 2610, 525, 264, 10950, 17847, 369, 259, 17, 72, 3383, 13, 13872, 25, 264, 8251,
                    35560, 3846, 2821, 25, 220, 151746]
    uncond = tok.encode("<|extra_203|>You are a helpful assistant. USER:  ASSISTANT: <|extra_100|>")
    assert uncond == [151849, 2610, 525, 264, 10950, 17847, 13, 13872, 25, 220, 35560, 3846, 2821, 25, 220, 151746]


def test_round_trip_with_visual_tokens(tok):
    text = ("<|extra_203|>héllo wörld 中文 🙂<|image start|>2*3<|image token|>"
            "<|visual token 000000|><|visual token 131071|><|visual token 000042|><|extra_200|>"
            "<|visual token 000007|><|visual token 000008|><|visual token 000009|><|image end|>tail<|extra_204|>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    fv = tok.ids.first_visual
    assert [i - fv for i in ids if tok.is_visual(i)] == [0, 131071, 42, 7, 8, 9]
    assert ids.count(tok.ids.eol) == 1 and ids[-1] == tok.ids.eos


def test_out_of_range_visual_name_stays_text(tok):
    ids = tok.encode("<|visual token 131072|>")
    assert not any(tok.is_visual(i) for i in ids)
    assert tok.decode(ids) == "<|visual token 131072|>"


def test_encode_without_special_is_plain_text(tok):
    text = "<|extra_203|><|image start|><|visual token 000001|>"
    ids = tok.encode(text, allow_special=False)
    assert all(i < tok.num_bpe_tokens for i in ids)
    assert tok.decode(ids) == text


def test_decode_bytes(tok):
    assert tok.decode_bytes(tok.encode("🙂 é", allow_special=False)) == "🙂 é".encode()
    # '🫠' is three tokens whose bytes are not valid UTF-8 on their own
    ids = tok.encode("🫠", allow_special=False)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert len(pieces) == 3 and b"".join(pieces) == "🫠".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")
    assert tok.decode_bytes([tok.ids.bos]) == b"<|extra_203|>"
    with pytest.raises(ValueError):
        tok.decode_bytes([tok.ids.first_visual])
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_codes_ids_vectorised(tok):
    codes = np.array([[0, 1], [131071, 5]])
    ids = tok.codes_to_ids(codes)
    assert ids.tolist() == [[151854, 151855], [282925, 151859]]
    assert np.array_equal(tok.ids_to_codes(ids), codes)
    with pytest.raises(ValueError):
        tok.codes_to_ids(np.array([131072]))
    with pytest.raises(ValueError):
        tok.ids_to_codes(np.array([tok.ids.eoi]))


def test_text_is_nfc_normalised_before_bpe(real_tokenizer):
    """The release normalises to NFC: a decomposed accent gives the precomposed form's ids."""
    tok = real_tokenizer
    for allow_special in (True, False):
        decomposed = tok.encode("Cafe\u0301 au lait", allow_special=allow_special)
        assert decomposed == tok.encode("Caf\u00e9 au lait", allow_special=allow_special)
    assert tok.decode(tok.encode("Cafe\u0301")) == "Caf\u00e9"
