import io

from support import build_tiny_model
from safetypatch.config import GenerationConfig, PatchShape
from safetypatch.jobs.chat import chat, side_by_side
from safetypatch.patches import attach_new_patch


def test_side_by_side_columns():
    text = side_by_side("short", "a much longer answer that wraps", 12)
    lines = text.splitlines()
    assert lines[0].startswith("base") and "| patched" in lines[0]
    assert all(line[12:15] == " | " for line in lines if "|" in line and not line.startswith("-"))


def test_chat_shows_base_and_patched_and_stops_at_empty_line(tiny_tok):
    import torch

    model = attach_new_patch(build_tiny_model(tiny_tok), PatchShape(rank=2, target_modules=["up_proj"], layers="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 2.0)
    out = io.StringIO()
    n = chat(model, tiny_tok, ["first question\n", "second\n", "\n", "never asked\n"], out,
             GenerationConfig(max_new_tokens=4), patched=True, width=30)
    assert n == 2 and out.getvalue().count("| patched") == 2
