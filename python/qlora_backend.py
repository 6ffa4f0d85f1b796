"""Make an existing peft QLoRA model use ladder-kernels' NF4 matmul, with no other change.

    python python/qlora_backend.py                        # a small random Llama
    python python/qlora_backend.py --model DIR --steps 6  # a local transformers checkpoint

One call, `patch_bnb_(model)`, routes every bitsandbytes nf4 Linear4bit through `nf4_matmul`
(Triton on GPU, C++ on CPU); parameters, state dict, LoRA adapters and the training loop stay as they are.

Prints the training step time with bitsandbytes' own 4-bit matmul and with ladder-kernels', on the same model,
optimizer and batch: the two take turns step by step (the patch is switched on and off between steps), so a
busy machine slows them alike; the first step of each is a warm-up. Then one step of each under the tensor
memory tracker (not timed: the tracker slows every op) for the peak memory.
"""

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from ladder_kernels.defaults import dtype_from_name
from ladder_kernels.nn import patch_bnb_
from ladder_kernels.nn.nf4_linear import bnb_linear4bit_class
from ladder_kernels.planning.memory import PeakMemoryTracker
from ladder_kernels.planning.methods import make_qlora_model


def small_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )


class Switch:
    """Turns a patched model's bitsandbytes layers back to their own forward and on again (patch_bnb_ sets an
    instance `forward`; without it the class's, bitsandbytes', runs)."""

    def __init__(self, model):
        linear4bit = bnb_linear4bit_class()
        self.patched = {m: m.forward for m in model.modules() if isinstance(m, linear4bit) and "forward" in vars(m)}

    def use(self, name: str) -> None:
        for module, forward in self.patched.items():
            if name == "ladder-kernels":
                module.forward = forward
            else:
                vars(module).pop("forward", None)


def train_step(model, optimizer, ids, dtype) -> float:
    # as Trainer(bf16=True) runs QLoRA; fp32 runs without autocast
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="local transformers checkpoint folder (default: a small random Llama)"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each, after one warm-up step of each")
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="compute dtype (bf16: under autocast, as Trainer(bf16=True); fp32: much faster on CPUs without AVX-512 "
        "BF16)",
    )
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1:
        ap.error(
            f"--steps and --batch-size must be >= 1 and --seq-len >= 2, got {args.steps}, {args.batch_size} and "
            f"{args.seq_len}"
        )

    torch.manual_seed(0)
    dtype = dtype_from_name(args.dtype)
    model = make_qlora_model(args.model or small_llama_config(), compute_dtype=dtype)
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    n = patch_bnb_(model)
    switch = Switch(model)
    names = ("bitsandbytes", "ladder-kernels")
    times, losses = {k: [] for k in names}, {}
    for step in tqdm(range(1 + args.steps), desc="rounds (one step of each)", unit="round"):
        for name in names[step % 2 :] + names[: step % 2]:  # the first of a round alternates
            switch.use(name)
            start = time.perf_counter()
            losses[name] = train_step(model, optimizer, ids, dtype)
            if step:
                times[name].append(time.perf_counter() - start)
    peaks = {}
    for name in names:
        switch.use(name)
        with PeakMemoryTracker() as mem:
            mem.track(model, optimizer)
            train_step(model, optimizer, ids, dtype)
        peaks[name] = mem.peak_bytes
    print(f"patched {n} bitsandbytes 4-bit layers; {args.steps} timed steps of each, taken in turns, {args.dtype}")
    print(f"{'':22s}{'step (s)':>10s}{'min-max':>14s}{'peak (MiB)':>12s}{'loss':>9s}")
    for name in names:
        t = times[name]
        spread = f"{min(t):.2f}-{max(t):.2f}"
        print(f"{name:22s}{statistics.median(t):10.3f}{spread:>14s}{peaks[name] / 2**20:12.1f}{losses[name]:9.4f}")
    ratio = statistics.median(times["bitsandbytes"]) / statistics.median(times["ladder-kernels"])
    print(f"speed-up {ratio:.2f}x, peak memory ratio {peaks['ladder-kernels'] / peaks['bitsandbytes']:.2f}")


if __name__ == "__main__":
    main()
