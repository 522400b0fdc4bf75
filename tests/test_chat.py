from safetypatch.data.chat import IGNORE_INDEX, encode_example, prompt_ids

MSG = [{"role": "user", "content": "How do I kill a Python process?"}]


def test_labels_cover_response_only(tiny_tok):
    e = encode_example(tiny_tok, MSG, "I'm sorry, but I can't help.", 256)
    p = prompt_ids(tiny_tok, MSG)
    assert e.input_ids[: len(p)] == p
    assert all(t == IGNORE_INDEX for t in e.labels[: len(p)])
    resp = [t for t in e.labels if t != IGNORE_INDEX]
    assert resp == e.input_ids[len(p):]
    text = tiny_tok.decode(resp)
    assert text.startswith("I'm sorry, but I can't help.") and "<|im_end|>" in text


def test_token_id_responses_and_open_turn(tiny_tok):
    ids = tiny_tok("Use kill", add_special_tokens=False)["input_ids"]
    closed = encode_example(tiny_tok, MSG, ids, 256, kind="anchor", close_turn=True)
    open_ = encode_example(tiny_tok, MSG, ids, 256, kind="anchor", close_turn=False)
    assert closed.n_response == len(ids) + 1 and open_.n_response == len(ids)
    assert open_.kind == "anchor"


def test_truncation_keeps_response(tiny_tok):
    long = [{"role": "user", "content": "word " * 300}]
    e = encode_example(tiny_tok, long, "I'm sorry.", 64)
    assert len(e.input_ids) == 64
    assert tiny_tok.decode([t for t in e.labels if t != IGNORE_INDEX]).startswith("I'm sorry.")
