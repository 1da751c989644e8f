"""How fast does a zoo-sized Llama learn to copy from its context? (docs/results.md, issue 19)

Every long-context score needs an induction circuit: a head that finds where the current token
occurred before and copies what followed. This probe trains llama-tiny's shape (hidden 128,
4 heads of 32, MLP 512, vocabulary 2048) from random weights on that skill alone and prints, every
50 steps, the copy loss and accuracy on the repeated tokens of the step's batch.

Each row of a step is `length` random token ids (from `vocab` ids) in which a span of n tokens
(4 <= n <= length / 2, at a random place, drawn per row) is repeated right after itself; the loss
is the mean next-token cross-entropy over the whole row, the copy columns count only the second
span's predictable tokens. With `--fixed-offset`, every row is one span of length / 2 repeated
once: one attention offset then solves every row, which a head can learn from positions alone,
without matching content (a positional shortcut, not induction).

`--zoo NAME` trains another zoo entry's shape instead (random weights; e.g. deltanet-tiny or
qwen35-hybrid-tiny, whose short convolutions hand each position its predecessors).

Options that change the start: `--tie` (tied input and output embeddings: a copy is then
e_x . e_x); `--prev-head` (layer 0's head 0 built as a previous-token head: every embedding gets
a constant first coordinate, and that head's query and key read only it, with the query's rotary
phase shifted by one position, so its scores peak at the previous token); `--induction-init` (with
`--tie`: the whole circuit written in, both heads, see harness.zoo.circuits).

    python docs/scripts/induction_probe.py --vocab 2000 --steps 1000 [--tie] [--prev-head] [--lr 1e-3]

Runs on the CPU with 2 threads, seed 0 (the same options give the same printout on one machine).
Run from outside the repository root (see README).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from harness.zoo.circuits import build_previous_token_head, write_induction_circuit
from harness.zoo.models import HEAD_DIM, HIDDEN, MAX_POSITIONS, MLP_WIDTH
from harness.zoo.tokenizer import VOCAB_SIZE

FIRST_ID = 4  # ids below are the zoo tokenizer's special tokens


def llama_config(hidden: int = HIDDEN, layers: int = 4, tie: bool = False) -> LlamaConfig:
    """llama-tiny's shape at width `hidden` (heads of HEAD_DIM fill it, MLP 4x wide)."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        intermediate_size=MLP_WIDTH * hidden // HIDDEN,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie,
    )


def copy_accuracy(logits: torch.Tensor, ids: torch.Tensor, copied: torch.Tensor) -> float:
    """Share of the marked (predictable, repeated) tokens whose greedy prediction is right."""
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float()
    w = copied[:, 1:]
    return (hits * w).sum().item() / w.sum().item()


def batch(rng: random.Random, rows: int, length: int, vocab: int, fixed_offset: bool):
    ids = torch.randint(FIRST_ID, FIRST_ID + vocab, (rows, length))
    copied = torch.zeros(rows, length)
    for r in range(rows):
        n = length // 2 if fixed_offset else rng.randint(4, length // 2)
        start = 0 if fixed_offset else rng.randint(0, length - 2 * n)
        ids[r, start + n : start + 2 * n] = ids[r, start : start + n]
        copied[r, start + n + 1 : start + 2 * n] = 1  # the second span's first token is not predictable
    return ids, copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=2000, help="random ids drawn from this many (<= 2044)")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help=f"model width; heads of {HEAD_DIM} fill it")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--zoo", help="a zoo entry whose shape to train instead (random weights), e.g. deltanet-tiny")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--prev-head", action="store_true")
    ap.add_argument("--induction-init", action="store_true")
    ap.add_argument("--fixed-offset", action="store_true")
    args = ap.parse_args()
    if args.zoo and (args.prev_head or args.induction_init or args.tie or args.hidden != HIDDEN or args.layers != 4):
        raise SystemExit(
            "--zoo takes the entry's shape as it is: leave out --prev-head, --induction-init, --tie, --hidden and --layers"
        )
    if args.hidden % HEAD_DIM:
        raise SystemExit(f"--hidden must be a multiple of the head size {HEAD_DIM}, got {args.hidden}")
    if not 2 <= args.vocab <= VOCAB_SIZE - FIRST_ID:
        raise SystemExit(f"--vocab must be in [2, {VOCAB_SIZE - FIRST_ID}], got {args.vocab}")

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.zoo:
        from harness.zoo.folders import prepare_fla
        from harness.zoo.models import get

        spec = get(args.zoo)
        if spec.needs_fla:
            prepare_fla()
        config = spec.config()
    else:
        config = llama_config(args.hidden, args.layers, args.tie)
    model = AutoModelForCausalLM.from_config(config)
    if args.prev_head:
        build_previous_token_head(model)
    if args.induction_init:
        write_induction_circuit(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng, t0 = random.Random(0), time.perf_counter()
    print("| step | copy loss | copy accuracy | wall |\n|---|---|---|---|")
    for step in range(args.steps + 1):
        ids, copied = batch(rng, args.rows, args.length, args.vocab, args.fixed_offset)
        logits = model(input_ids=ids).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(args.rows, -1)
        if step % 50 == 0:
            w = copied[:, 1:]
            print(
                f"| {step} | {(ce * w).sum().item() / w.sum().item():.3f} | {copy_accuracy(logits, ids, copied):.3f} "
                f"| {time.perf_counter() - t0:.0f} s |",
                flush=True,
            )
        if step == args.steps:
            break
        optimizer.zero_grad()
        ce.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


if __name__ == "__main__":
    main()
