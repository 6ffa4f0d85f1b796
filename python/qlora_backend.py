"""Make an existing peft QLoRA model use ladder-kernels' NF4 matmul, with no other change.

    python python/qlora_backend.py                       # a small random Llama, 4 steps before/after
    python python/qlora_backend.py --model DIR --steps 8 # a local transformers checkpoint

One call, `patch_bnb_(model)`, routes every bitsandbytes nf4 Linear4bit through `nf4_matmul`
(Triton on GPU, C++ on CPU); parameters, state dict, LoRA adapters and the training loop stay as they are.
Prints the step time and peak memory before and after patching.
"""

import argparse
import statistics
import time

import torch

from ladder_kernels.nn import patch_bnb_
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


def time_steps(model, optimizer, ids, steps):
    """Median seconds per training step (forward, backward, optimizer step) and peak tracked bytes."""
    times = []
    with PeakMemoryTracker() as mem:
        for _ in range(steps):
            start = time.perf_counter()
            with torch.autocast(ids.device.type, dtype=torch.bfloat16):  # as Trainer(bf16=True) runs QLoRA
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times), mem.peak_bytes, loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="local transformers checkpoint folder (default: a small random Llama)"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = make_qlora_model(args.model or small_llama_config())
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    before = time_steps(model, optimizer, ids, args.steps)
    n = patch_bnb_(model)
    after = time_steps(model, optimizer, ids, args.steps)
    print(f"patched {n} bitsandbytes 4-bit layers")
    print(f"{'':22s}{'step (s)':>10s}{'peak (MiB)':>12s}{'loss':>9s}")
    for name, (sec, peak, loss) in (("bitsandbytes", before), ("ladder-kernels", after)):
        print(f"{name:22s}{sec:10.3f}{peak / 2**20:12.1f}{loss:9.4f}")
    print(f"speed-up {before[0] / after[0]:.2f}x, peak memory ratio {after[1] / before[1]:.2f}")


if __name__ == "__main__":
    main()
