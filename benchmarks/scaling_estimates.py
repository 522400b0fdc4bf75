"""Computed (not measured) memory per GPU for training a safety patch on 1B-70B models, and the time of paper B's
run, for docs/scaling.md. No GPU was lent to this project when it was written: every number here is arithmetic
from the models' published configs and the formulas below, none of it checked against a measurement.

Per GPU, for a LoRA patch of rank r on `mlp.up` of the middle third of the layers, micro-batch b, length T:
- weights: every parameter in bf16 (2 bytes) or, with QLoRA, linear weights in NF4 (0.5 bytes + 1/64 for the
  double-quantized scales) and the rest in bf16; divided by N under FSDP / ZeRO-3 (plus one layer gathered);
- patch: its parameters x 16 bytes (fp32 weight, gradient, two Adam moments);
- activations: only layers from the first trained one up keep them (the layers below run once, without grad):
  per token and layer, bf16 copies of the tensors a Llama-style block saves for backward,
  6 d + 2 kv_dim + 4 d_ff elements; with gradient checkpointing only each layer's input (d) is kept, plus one
  layer's full set while it is recomputed; and fp32 logits on response tokens (vocab x 4 bytes, a third of T);
- plus 1.5 GB for the CUDA context and allocator slack.

    python benchmarks/scaling_estimates.py                          # the tables in docs/scaling.md
    python benchmarks/scaling_estimates.py --micro-batch 8 --length 512
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1024 ** 3
OVERHEAD_GB = 1.5


@dataclass
class Arch:
    name: str
    layers: int
    d: int
    d_ff: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.d // self.heads * self.kv_heads

    def linear_params(self) -> int:
        per_layer = self.d * self.d * 2 + 2 * self.d * self.kv_dim + 3 * self.d * self.d_ff
        return self.layers * per_layer

    def params(self) -> int:
        embed = self.vocab * self.d * (1 if self.tied else 2)
        return self.linear_params() + embed + self.layers * 2 * self.d + self.d


# published configs (config.json of each model on its hub page)
ARCHS = [
    Arch("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),
    Arch("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True),
    Arch("DeepSeek-R1-Distill-Qwen-7B", 28, 3584, 18944, 28, 4, 152064, False),
    Arch("Llama-2-13B", 40, 5120, 13824, 40, 40, 32000, False),
    Arch("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256, False),
]


def patch_params(a: Arch, rank: int) -> int:
    middle = a.layers - 2 * (a.layers // 3)
    return middle * rank * (a.d + a.d_ff)


def activation_bytes(a: Arch, tokens: int, checkpointing: bool, elem: int = 2) -> float:
    trained_from = a.layers // 3  # the middle third and everything above it keep activations
    kept = a.layers - trained_from
    per_layer = 6 * a.d + 2 * a.kv_dim + 4 * a.d_ff
    if checkpointing:
        saved = kept * a.d + per_layer
    else:
        saved = kept * per_layer
    logits = tokens / 3 * a.vocab * 4
    return tokens * saved * elem + logits


def memory_gb(a: Arch, gpus: int, engine: str, qlora: bool, micro_batch: int, length: int, checkpointing: bool,
              rank: int = 1) -> float:
    lin = a.linear_params()
    weights = (lin * (0.5 + 1 / 64) + (a.params() - lin) * 2) if qlora else a.params() * 2
    if engine == "zero3":
        weights = weights / gpus + weights / a.layers  # a shard, plus one layer gathered at a time
    state = patch_params(a, rank) * 16
    acts = activation_bytes(a, micro_batch * length, checkpointing)
    return (weights + state + acts) / GB + OVERHEAD_GB


def tables(micro_batch: int, length: int) -> None:
    print(f"GB per GPU; LoRA rank 1 on mlp.up, middle layers; micro-batch {micro_batch} per GPU x {length} tokens; "
          "bf16 weights unless QLoRA; computed, not measured")
    head = ["model", "params", "ddp", "ddp+ckpt", "qlora+ckpt", "zero3 x2+ckpt", "zero3 x8+ckpt"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for a in ARCHS[1:]:
        cells = [memory_gb(a, 1, "ddp", False, micro_batch, length, False),
                 memory_gb(a, 1, "ddp", False, micro_batch, length, True),
                 memory_gb(a, 1, "ddp", True, micro_batch, length, True),
                 memory_gb(a, 2, "zero3", False, micro_batch, length, True),
                 memory_gb(a, 8, "zero3", False, micro_batch, length, True)]
        print(" | ".join([a.name, f"{a.params() / 1e9:.1f} B", *(f"{c:.1f}" for c in cells)]))


def paper_b_time(examples: int, tokens_per_example: int, epochs: int, gpus: int, tflops: float, mfu: float) -> None:
    """LoRA training FLOPs: forward 2 P per token through every layer, backward 2 P per token through the layers
    from the first trained one up (input gradients only; the patch's own weight gradients are negligible)."""
    a = ARCHS[2]
    p = a.params()
    tokens = examples * tokens_per_example * epochs
    flops = tokens * (2 * p + 2 * p * (a.layers - a.layers // 3) / a.layers)
    seconds = flops / (gpus * tflops * 1e12 * mfu)
    print(f"\npaper B ({a.name}): {examples} examples x {tokens_per_example} tokens x {epochs} epochs = "
          f"{tokens / 1e6:.2f} M tokens, {flops / 1e15:.1f} PFLOP; on {gpus} GPU(s) at {tflops:.0f} TFLOP/s bf16 "
          f"and {mfu:.0%} utilisation: {seconds / 60:.1f} min of training (plus model load and evaluation)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args()
    tables(args.micro_batch, args.length)
    # examples/paper_b/recipe.yaml: the built-in refusal train split (~200 pairs of ~160 tokens), 3 epochs, one
    # H100 (989 dense bf16 TFLOP/s) at a modest 30 % utilisation for such short sequences
    paper_b_time(examples=200, tokens_per_example=160, epochs=3, gpus=1, tflops=989, mfu=0.3)
