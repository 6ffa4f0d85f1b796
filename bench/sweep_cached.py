"""Ladder side-network sweeps on cached backbone features: many variants in the time of a few real runs.

The backbone is frozen, so its hidden states for a fixed set of training batches do not depend on the side
network. This script computes them once (the embeddings, every backbone layer's output and the final normed
hidden state, for the `--steps` batches that `ladder-kernels finetune --seed S` draws, and for the held-out
prompts), then trains each variant's side network on them exactly as `finetune` does (AdamW, warm-up +
cosine, gradient clipping 1.0, loss on the label token through the frozen lm_head) and reports held-out
accuracy. Each variant is trained in `--orders` data orders: order 0 is finetune's, order k > 0 permutes the
same examples within each class, so every batch keeps its class mix; the spread over orders is the run-to-run
noise that a single real run hides.

    .venv/bin/python bench/sweep_cached.py [--variants default,head_dim16] [--orders 4] [--steps 100]
        [--eval-samples 1000] [--out bench/results/ladder_sweep_sentiment]

Memory: (the layers the variants read + 1) x tokens x hidden_size values in --dtype (about 5 GB for SmolLM2-135M in
float32, side blocks on every 3rd layer, 100 steps of 32 tweets plus 1000 held-out ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ladder_kernels.defaults import DEFAULT_LR_RULE, DEFAULT_STEPS, default_lr, default_warmup
from ladder_kernels.io import write_text_atomic
from ladder_kernels.nn.ladder import LadderModel, positions_from_mask  # noqa: E402
from ladder_kernels.nn.side import BRANCH, side_wiring
from ladder_kernels.nn.step_sizes import tensor_lrs
from ladder_kernels.planning.bench import command_line
from ladder_kernels.train import warmup_cosine
from ladder_kernels.train.backbones import load_backbone, load_tokenizer, resolve_model
from ladder_kernels.train.config import FinetuneConfig, ladder_config
from ladder_kernels.train.data import BatchStream, encode_example, encode_prompts, label_first_tokens, load_dataset


@dataclasses.dataclass(frozen=True)
class Variant:
    """A change from finetune's Ladder defaults: LadderConfig fields, finetune's --ladder-every, the peak lr and
    warm-up, lr multipliers for side parameters whose name contains a key, passes over the same batches, and
    optimizer steps per batch in a row (passes x repeat x --steps optimizer steps: more training without more data
    or backbone passes)."""

    config: dict = dataclasses.field(default_factory=dict)
    ladder_every: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    lr_scale: dict = dataclasses.field(default_factory=dict)
    passes: int = 1
    repeat: int = 1
    batches: Optional[int] = None  # train on the first N of the --steps batches only (then x passes x repeat)
    lr_rule: str = DEFAULT_LR_RULE  # nn/step_sizes.py: "relative" makes lr each tensor's relative step


VARIANTS = {
    "default": Variant(),
    "lr3e-3": Variant(lr_rule="uniform", lr=3e-3),
    "lr1.2e-2": Variant(lr_rule="uniform", lr=1.2e-2),
    "warmup25": Variant(warmup_steps=25),
    "head_dim16": Variant(config={"side_head_dim": 16}),
    "head_dim64": Variant(config={"side_head_dim": 64}),
    "r4": Variant(config={"reduction_factor": 4}),
    "every2": Variant(ladder_every=2),
    "gate_vector": Variant(config={"gate": "vector"}),
    "gate_temperature1": Variant(config={"gate_temperature": 1.0}),
    "output_side_only": Variant(config={"output_mix": "side_only"}),
    "up_proj_lr0.3": Variant(lr_scale={"up_proj": 0.3}),
    "mix_weight_lr0.1": Variant(lr_scale={"mix_weight": 0.1}),
    "3_passes": Variant(passes=3),
    "50_batches_4_passes": Variant(batches=50, passes=4),
    "50_batches_6_passes": Variant(batches=50, passes=6),
    "100_batches_2_passes": Variant(passes=2),
    "3_passes_warmup30": Variant(passes=3, warmup_steps=30),
    "3_passes_warmup60": Variant(passes=3, warmup_steps=60),
    "3_passes_relative0.01": Variant(passes=3, lr_rule="relative", lr=0.01),
    "3_steps_per_batch": Variant(repeat=3),
    "lr1e-3": Variant(lr_rule="uniform", lr=1e-3),
    "relative0.01": Variant(lr_rule="relative", lr=0.01),
    "relative0.02": Variant(lr_rule="relative", lr=0.02),
    "relative0.04": Variant(lr_rule="relative", lr=0.04),
    "relative0.02_rms": Variant(lr_rule="relative", lr=0.02, config={"ladder_norm": "rms"}),
}


# --- features --------------------------------------------------------------------------------------------
@torch.no_grad()
def backbone_features(
    model: LadderModel,
    rows: Sequence[list[int]],
    pad_id: int,
    layers: Sequence[int],
    batch_size: int = 32,
    desc: str = "features",
) -> list[torch.Tensor]:
    """Per row, [len(layers) + 1, T, D] in the backbone's dtype: for each entry of `layers` the output of that
    backbone layer (-1: the input of layer 0), then the final normed hidden state (what LadderModel's hooks see)."""
    inner, blocks = model.backbone.model, model.backbone.model.layers
    out: list = [None] * len(rows)
    by_length = sorted(range(len(rows)), key=lambda j: len(rows[j]))  # little padding (as the state cache runs)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        members = by_length[start : start + batch_size]
        chunk = [rows[j] for j in members]
        ids, mask = _pad(chunk, pad_id)
        seen: dict[int, torch.Tensor] = {}
        keep = lambda m, a, o, i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o)  # noqa: E731
        hooks = [blocks[i].register_forward_hook(lambda m, a, o, i=i: keep(m, a, o, i)) for i in layers if i >= 0]
        hooks.append(
            blocks[0].register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__(-1, a[0] if a else kw["hidden_states"]), with_kwargs=True
            )
        )
        try:
            final = inner(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids), use_cache=False
            )[0]
        finally:
            for hook in hooks:
                hook.remove()
        stack = torch.stack([seen[i] for i in layers] + [final])
        for j, (member, r) in enumerate(zip(members, chunk)):
            out[member] = stack[:, j, : len(r)].clone()
    return out


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
    return ids, mask


def stack_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [L + 2, B, T, D] and the attention mask [B, T]."""
    width = max(f.shape[1] for f in feats)
    H = feats[0].new_zeros(feats[0].shape[0], len(feats), width, feats[0].shape[2])
    mask = torch.zeros(len(feats), width, dtype=torch.long)
    for j, f in enumerate(feats):
        H[:, j, : f.shape[1]], mask[j, : f.shape[1]] = f, 1
    return H, mask


def replay_states(model: LadderModel, H: torch.Tensor, slots: dict[int, int]) -> dict:
    """The cached features as LadderModel.forward's backbone_states: what it replays instead of the backbone.
    slots: backbone layer (-1: the embeddings) -> its index in H; H[-1] is the final normed hidden state."""
    side = model.side
    return {
        BRANCH: H[slots[side.branch_source]],
        **{k: H[slots[src]] for k, src in enumerate(side.ladder_sources)},
        "final": H[-1],
    }


def side_from_features(model: LadderModel, H: torch.Tensor, mask: torch.Tensor, slots: dict[int, int]):
    """LadderModel's (side stream s, final normed hidden state) from cached features."""
    ids = torch.zeros_like(mask)  # only its shape matters: the replay skips the backbone
    return model.stream(ids, mask, positions_from_mask(mask, ids), backbone_states=replay_states(model, H, slots))


def loss_from_features(
    model: LadderModel, H: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, slots: dict[int, int]
) -> torch.Tensor:
    """LadderModel.forward's loss from cached features."""
    ids = torch.zeros_like(mask)  # only its shape matters: the replay skips the backbone
    states = replay_states(model, H, slots)
    return model(input_ids=ids, attention_mask=mask, labels=labels, backbone_states=states).loss


# --- one variant -----------------------------------------------------------------------------------------
class Sweep:
    """Cached features of a finetune configuration's training batches and held-out prompts."""

    def __init__(self, cfg: FinetuneConfig, eval_samples: int, variants: Sequence[str] = ("default",)):
        self.cfg = cfg
        self.model_dir = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.dataset = load_dataset(cfg.task, cfg.data)
        if not self.dataset.is_classification:
            raise SystemExit("sweep_cached: --task must be a classification task (accuracy by label scores)")
        self.label_ids = torch.tensor(label_first_tokens(self.tokenizer, self.dataset.labels))
        stream = BatchStream(self.dataset, cfg.batch_size, cfg.seed, cfg.balance)
        self.order = [stream.indices(s) for s in range(cfg.steps)]
        used = sorted({i for batch in self.order for i in batch})
        encoded = {
            i: encode_example(self.tokenizer, self.dataset.train[i], cfg.seq_len, add_eos=False)[:2] for i in used
        }
        model = self.build(Variant())
        # only the layers some variant's side network reads are kept
        wiring = [self.wiring(VARIANTS[v], model.config.num_hidden_layers) for v in variants]
        layers = sorted({layer for branch, sources in wiring for layer in (branch, *sources)})
        self.slots = {layer: k for k, layer in enumerate(layers)}
        pad = self.tokenizer.pad_token_id
        feats = backbone_features(model, [encoded[i][0] for i in used], pad, layers, desc="training features")
        self.train = {i: (torch.tensor(encoded[i][1]), f) for i, f in zip(used, feats)}
        held = self.dataset.heldout[:eval_samples]
        self.heldout_labels = [self.dataset.labels.index(self.dataset.label_of(ex)) for ex in held]
        self.heldout = backbone_features(
            model,
            encode_prompts(self.tokenizer, [ex.prompt for ex in held], cfg.seq_len),
            pad,
            layers,
            desc="held-out features",
        )

    def ladder_config(self, variant: Variant, num_layers: int):
        cfg = dataclasses.replace(self.cfg, ladder_every=variant.ladder_every or self.cfg.ladder_every)
        return dataclasses.replace(ladder_config(cfg, num_layers), **variant.config)

    def wiring(self, variant: Variant, num_layers: int) -> tuple[int, list[int]]:
        branch, sources, _ = side_wiring(num_layers, self.ladder_config(variant, num_layers))
        return branch, sources

    def build(self, variant: Variant) -> LadderModel:
        torch.manual_seed(self.cfg.seed)
        backbone = load_backbone(self.model_dir, self.cfg.torch_dtype)
        return LadderModel(backbone, self.ladder_config(variant, backbone.config.num_hidden_layers))

    def loss(self, model: LadderModel, H: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_from_features(model, H, mask, labels, self.slots)

    def data_order(self, order: int) -> list[list[int]]:
        """Order 0: finetune's batches; order k: the same examples permuted within each class (same class mix)."""
        if order == 0:
            return self.order
        flat = [i for batch in self.order for i in batch]
        by_class: dict[int, list[int]] = {}
        label_of = lambda i: int(self.train[i][0][-1])  # noqa: E731  (the label token ends the labels)
        for i in flat:
            by_class.setdefault(label_of(i), []).append(i)
        for label, members in by_class.items():
            random.Random(f"{order}:{label}").shuffle(members)
        flat = [by_class[label_of(i)].pop() for i in flat]
        size = self.cfg.batch_size
        return [flat[k : k + size] for k in range(0, len(flat), size)]

    def epochs(self, order: int, variant: Variant) -> list[list[int]]:
        """The first `variant.batches` batches of data order `order`, then each later pass over the same examples
        shuffled into new batches (as `finetune --epochs` replays its cache)."""
        first = self.data_order(order)[: variant.batches]
        out = list(first)
        flat = [i for batch in first for i in batch]
        size = self.cfg.batch_size
        for p in range(1, variant.passes):
            shuffled = random.Random(f"pass{p}:{order}").sample(flat, len(flat))
            out += [shuffled[k : k + size] for k in range(0, len(shuffled), size)]
        return out

    def run(self, variant: Variant, order: int) -> dict:
        start = time.perf_counter()
        model = self.build(variant)
        lr = variant.lr or default_lr("ladder", variant.lr_rule)
        rates = tensor_lrs(model, lr, variant.lr_rule)
        named = dict(model.named_parameters())
        params = [named[n] for n in rates]
        scale = lambda n: next((v for k, v in variant.lr_scale.items() if k in n), 1.0)  # noqa: E731
        optimizer = torch.optim.AdamW(
            [{"params": [named[n]], "lr": rate * scale(n)} for n, rate in rates.items()], lr=lr, weight_decay=0.0
        )
        batches = [b for b in self.epochs(order, variant) for _ in range(variant.repeat)]
        warmup = default_warmup(len(batches)) if variant.warmup_steps is None else variant.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, len(batches)))
        model.train()
        history = []
        for batch in batches:
            H, mask = stack_features([self.train[i][1] for i in batch])
            labels = torch.full(mask.shape, -100, dtype=torch.long)
            for j, i in enumerate(batch):
                labels[j, : len(self.train[i][0])] = self.train[i][0]
            loss = self.loss(model, H, mask, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            history.append(loss.item())
        return {
            "accuracy": self.accuracy(model),
            "final_loss": statistics.fmean(history[-20:]),
            "largest_spike": largest_spike(history),
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def accuracy(self, model: LadderModel, batch_size: int = 64) -> float:
        model.eval()
        label_rows = model.backbone.lm_head.weight[self.label_ids].float()
        correct = 0
        for start in range(0, len(self.heldout), batch_size):
            H, mask = stack_features(self.heldout[start : start + batch_size])
            s, h_final = side_from_features(model, H, mask, self.slots)
            rows, last = torch.arange(mask.shape[0]), mask.sum(1) - 1
            predicted = (model.side.mix(s[rows, last], h_final[rows, last]).float() @ label_rows.T).argmax(-1)
            correct += sum(int(p) == y for p, y in zip(predicted, self.heldout_labels[start : start + batch_size]))
        return correct / len(self.heldout)


def largest_spike(history: Sequence[float], first: int = 5) -> float:
    """The highest loss after the first `first` steps over their mean (the side-network issue's stability bar:
    at most 1.5)."""
    if len(history) <= first:
        return 0.0
    return max(history[first:]) / statistics.fmean(history[:first])


# --- report ----------------------------------------------------------------------------------------------
def report(results: dict[str, list[dict]], cfg: FinetuneConfig, n_eval: int, command: str, seconds: float) -> str:
    lines = [
        f"# Ladder variants on cached backbone features ({cfg.task}, {cfg.steps} steps x {cfg.batch_size})",
        "",
        f"Command: `{command}`",
        "",
        f"Held-out accuracy on {n_eval} examples after {cfg.steps} steps (x passes x repeat); order 0 is `finetune "
        f"--seed {cfg.seed}`'s "
        "data order, the others permute the same examples within each class. Largest spike: the highest training "
        "loss after the first 5 steps over their mean, the worst order. Sweep wall time "
        f"{seconds / 60:.1f} min, torch threads: {torch.get_num_threads()}.",
        "",
        "| variant | change | accuracy mean ± sd | min | max | per order | final loss (mean) | largest spike (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        accs = [r["accuracy"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        change = {k: v for k, v in dataclasses.asdict(VARIANTS[name]).items() if v != getattr(Variant(), k)} or "-"
        lines.append(
            f"| {name} | `{json.dumps(change) if change != '-' else '-'}` | {statistics.fmean(accs):.1%} ± {sd:.1%} | "
            f"{min(accs):.1%} | {max(accs):.1%} | {', '.join(f'{a:.1%}' for a in accs)} | "
            f"{statistics.fmean(r['final_loss'] for r in runs):.3f} | "
            f"{max(r.get('largest_spike', 0.0) for r in runs):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--orders", type=int, default=4, help="data orders per variant (>= 1)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="held-out examples (>= 1)")
    parser.add_argument("--out", default="bench/results/ladder_sweep_sentiment", help="writes OUT.md and OUT.json")
    # the batches every variant draws from: QLoRA's default run's (a variant may take the first N, `batches`)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS["qlora"], help="batches of one pass (>= 1)")
    for name in ("model", "data", "batch_size", "seq_len", "seed", "dtype"):
        f = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == name)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(f.default), default=f.default, help=f.metadata["help"]
        )
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    if args.orders < 1 or args.eval_samples < 1 or args.steps < 1:
        parser.error("--orders, --eval-samples and --steps must be >= 1")
    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        dtype=args.dtype,
    )
    cfg.validate()
    start = time.perf_counter()
    sweep = Sweep(cfg, args.eval_samples, names)
    results: dict[str, list[dict]] = {}
    with tqdm(total=len(names) * args.orders, desc="variants x orders", unit="run") as bar:
        for name in names:
            results[name] = []
            for order in range(args.orders):
                results[name].append(sweep.run(VARIANTS[name], order))
                bar.update(1)
                bar.set_postfix(variant=name, acc=f"{results[name][-1]['accuracy']:.3f}")
    command = command_line() if argv is None else shlex.join(["bench/sweep_cached.py", *argv])
    text = report(results, cfg, len(sweep.heldout), command, time.perf_counter() - start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".md"), text)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"command": command, "results": results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
