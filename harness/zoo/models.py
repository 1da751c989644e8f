"""The zoo registry: tiny but real causal LMs, one per supported family (and a hybrid).

All share the shape that makes key-channel pruning readable: hidden 128, 4 layers, 4 heads
with a key (head) dimension of 32, so pruning at ratios 0.25 / 0.5 / 0.75 keeps 24 / 16 / 8
key channels per head; SwiGLU MLP of width 512; vocabulary 2048 (the shared zoo tokenizer);
untied embeddings. The fla configs keep fla's defaults for everything else (short convolutions,
L2 q/k norm, the fuse_* flags: `harness.kernels.fla_cpu` routes those kernels on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.errors import HarnessError
from harness.family_names import HYBRID_FAMILIES, LINEAR_FAMILIES
from harness.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

HIDDEN = 128
LAYERS = 4
HEADS = 4
HEAD_DIM = 32  # the key dimension that pruning shrinks
MLP_WIDTH = 512
MAX_POSITIONS = 2048
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    intermediate_size=MLP_WIDTH,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
    max_position_embeddings=MAX_POSITIONS,
)


def _deltanet_config():
    from fla.models import DeltaNetConfig

    return DeltaNetConfig(num_heads=HEADS, expand_k=HEAD_DIM * HEADS / HIDDEN, expand_v=1.0, **COMMON)


def _gated_deltanet_config():
    from fla.models import GatedDeltaNetConfig

    # head_dim is the key dimension; values are expand_v (fla default 2) times wider
    return GatedDeltaNetConfig(num_heads=HEADS, head_dim=HEAD_DIM, expand_v=2.0, **COMMON)


def _kda_config():
    from fla.models import KDAConfig

    # Kimi Delta Attention: head_dim is the key dimension (one decay per key channel); values as
    # wide (expand_v 1), so pruning keeps head_v_dim = 32 with expand_v = 32 / kept
    return KDAConfig(num_heads=HEADS, head_dim=HEAD_DIM, expand_v=1.0, **COMMON)


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        **COMMON,
    )


def _llama_tied_config():
    config = _llama_config()
    config.tie_word_embeddings = True  # the written induction circuit copies through the shared embedding
    return config


def _qwen35_hybrid_config():
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    # Qwen3.5's layout at zoo size: three Gated DeltaNet layers then one gated softmax-attention
    # layer (full_attention_interval 4), GQA with 2 KV heads, q/k RMSNorm, partial RoPE (0.25)
    return Qwen3_5TextConfig(
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=HEADS,
        linear_num_value_heads=HEADS,
        linear_key_head_dim=HEAD_DIM,
        linear_value_head_dim=HEAD_DIM,
        linear_conv_kernel_dim=4,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-6,
        **COMMON,
    )


def _deltanet_mqar_config():
    config = _deltanet_config()
    config.num_hidden_layers = 2  # as Zoology's MQAR models
    return config


@dataclass(frozen=True)
class TrainRecipe:
    """How a zoo model is trained (see harness.zoo.train.TrainConfig for the meaning)."""

    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    threads: int = 1  # torch CPU threads of a build (part of what makes a rerun bit-identical)


@dataclass(frozen=True)
class RetrievalRecipe(TrainRecipe):
    """A retrieval model's recipe (harness.zoo.retrieval): `batch_size` rows of `seq_len` tokens per
    step at the longest length; the step lengths cycle through `length_quarters` quarters of seq_len
    (shorter steps get more rows, so every step sees about the same tokens)."""

    lm_fraction: float = 0.4  # rows of plain corpus text; the rest are retrieval documents
    answer_weight: float = (
        1.0  # the answer tokens' mean loss, against the text tokens' mean (harness.zoo.retrieval.weighted_loss)
    )
    length_quarters: tuple[int, ...] = (1, 2, 4)
    init_from: str = ""  # a text zoo model whose shipped weights training starts from ("": random init)
    circuit: bool = False  # write the induction circuit into the random initial weights (harness.zoo.circuits)
    tasks: tuple[tuple[str, float], ...] = ()  # retrieval documents and their shares (): harness.zoo.retrieval's
    first_weight: float = 2.0  # a qa answer's first token (the lookup), against 2 for the other answer tokens
    flush_denormals: bool = False  # train with denormal floats flushed to zero (harness.zoo.train.denormals_flushed)


# the retrieval models' shared data and optimizer settings (docs/results.md): 4 rows of 1,024 tokens a
# step at 256 / 512 / 1,024 tokens in turn, 20% corpus rows, qa documents 80% and span copies 20%, a
# qa answer's first token weighing 5
LOOKUP_TRAINING = dict(
    batch_size=4,
    seq_len=1024,
    lr=1e-3,
    warmup_steps=30,
    weight_decay=0.0,
    lm_fraction=0.2,
    answer_weight=1.0,
    length_quarters=(1, 2, 4),
    tasks=(("qa", 0.8), ("copy", 0.2)),
    first_weight=5.0,
    threads=2,  # the 2-core machine's both cores: about 10k tokens/s, twice one thread's
)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # harness family: "deltanet", "gated_deltanet", "llama"
    make_config: Callable[[], object] = field(repr=False)
    recipe: TrainRecipe
    description: str = ""
    task: str = "text"  # "text": the corpus LM trainer; "mqar": harness.zoo.mqar (its own recipe);
    # "retrieval": corpus text mixed with synthetic retrieval (harness.zoo.retrieval)

    @property
    def needs_fla(self) -> bool:
        # transformers' Gated DeltaNet layers call fla's kernels when fla is installed
        return self.family in LINEAR_FAMILIES + HYBRID_FAMILIES

    def config(self):
        return self.make_config()


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "deltanet-tiny",
            "deltanet",
            _deltanet_config,
            TrainRecipe(steps=700),
            "fla DeltaNet, 4 layers x 4 heads, d_k = d_v = 32",
        ),
        ZooEntry(
            "gated-deltanet-tiny",
            "gated_deltanet",
            _gated_deltanet_config,
            TrainRecipe(steps=550),
            "fla Gated DeltaNet, 4 layers x 4 heads, d_k = 32, d_v = 64",
        ),
        ZooEntry(
            "kda-tiny",
            "kda",
            _kda_config,
            TrainRecipe(steps=450),
            "fla Kimi Delta Attention (a decay per key channel), 4 layers x 4 heads, d_k = d_v = 32",
        ),
        ZooEntry(
            "llama-tiny",
            "llama",
            _llama_config,
            TrainRecipe(steps=1000),
            "transformers Llama (softmax attention, RoPE), 4 layers x 4 heads, head_dim 32",
        ),
        ZooEntry(
            "qwen35-hybrid-tiny",
            "qwen3_5",
            _qwen35_hybrid_config,
            TrainRecipe(steps=600),
            "transformers Qwen3.5 hybrid: 3 Gated DeltaNet layers (4 heads, d_k = d_v = 32) + 1 attention "
            "layer (4 query / 2 KV heads, head_dim 32)",
        ),
        ZooEntry(
            "deltanet-mqar-tiny",
            "deltanet",
            _deltanet_mqar_config,
            TrainRecipe(steps=450, batch_size=64, lr=1e-2, warmup_steps=20, weight_decay=0.0),
            "fla DeltaNet, 2 layers x 4 heads, d_k = 32, trained on MQAR (the mqar suite's capacity probe)",
            task="mqar",
        ),
        ZooEntry(
            "llama-retrieval-tiny",
            "llama",
            _llama_tied_config,
            RetrievalRecipe(steps=2100, circuit=True, **LOOKUP_TRAINING),
            "llama-tiny's shape with tied embeddings, an induction circuit written into its initial weights, trained on "
            "corpus text + synthetic in-context lookups (every key asked), 256-1024 tokens (docs/results.md)",
            task="retrieval",
        ),
        ZooEntry(
            "deltanet-retrieval-tiny",
            "deltanet",
            _deltanet_config,
            # recall over the mqar suite's token sets is what a 4-head DeltaNet learns within the budget
            # (at lr 1e-2 and blocks of at most 16 pairs); qa documents and corpus rows beside it
            RetrievalRecipe(
                steps=900,
                init_from="deltanet-tiny",
                **{**LOOKUP_TRAINING, "lr": 1e-2, "tasks": (("mqar", 0.8), ("qa", 0.2))},
            ),
            "deltanet-tiny's shape, its text weights further trained on corpus text, associative recall over the "
            "mqar suite's token sets and synthetic lookups, 256-1024 tokens; recalls pairs (MQAR 12.3%), finds no "
            "RULER needle; builds in about 10 minutes on 2 cores (docs/results.md)",
            task="retrieval",
        ),
        ZooEntry(
            "qwen35-hybrid-retrieval-tiny",
            "qwen3_5",
            _qwen35_hybrid_config,
            # denormals flushed: the same weights, bit for bit, 1.4x faster (the conv backward meets denormals)
            RetrievalRecipe(steps=1500, init_from="qwen35-hybrid-tiny", flush_denormals=True, **LOOKUP_TRAINING),
            "qwen35-hybrid-tiny's shape, its text weights further trained on corpus text + synthetic in-context lookups "
            "(every key asked), 256-1024 tokens; retrieves single needles (RULER niah_single 62.5% at 512 tokens); "
            "builds in about 18 minutes on 2 cores (docs/results.md)",
            task="retrieval",
        ),
    )
}


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise HarnessError(f"unknown zoo model {name!r}; zoo models: {', '.join(ZOO)}") from None
