"""Named settings for the heads, their loss and their training: one dict per preset, every field.

`best` is the recipe that wins on these cached vectors (pipelines/ABLATION.md); `study` is the
user's study as its public code has it; `jepa` is the JEPA heads as first designed, which the
live strategies start from. Kept free of imports so that `--help` can print them cheaply.
"""

# What the batch-and-pairs presets share: in-batch negatives, pair epochs, no dev slice.
_CLASSIC = dict(negatives="batch", sampling="pairs", mine_k=32, corpus_negatives=0, rank=0, schedule="cosine",
                dev_fraction=0.0, select="last", refit=False, interpolate=1.0, adapt="none")

# Every preset sets every preset-controlled field of TrainConfig. output_dim 0 is the encoder's width.
PRESETS: dict[str, dict] = {
    # The JEPA heads as first designed: linear PCA-initialised projection 768→512 (step 0 keeps most
    # of vanilla), residual predictor (starts as the identity), cosine retrieval, InfoNCE over the
    # batch + SIGReg, pair epochs. It keeps vanilla within noise and no more (README); the live
    # strategies start from it, since `full` cannot take `best`'s corpus negatives and dev slice.
    "jepa": dict(
        strategy="frozen-predictor", output_dim=512, projection="linear", projection_hidden=1536, predictor="residual",
        predictor_hidden=1024,
        dropout=0.1, init="pca", similarity="cos", query_tower="projection",
        contrastive="infonce", isotropy="sigreg", predictive="cosine", temperature=0.05, margin=1.0,
        lambda_predictive=0.5, lambda_contrastive=0.1, lambda_isotropy=1.0, lambda_reg=0.0, use_stopgrad=True,
        directions=256, epochs=2, batch_size=256, lr=5e-4, weight_decay=0.01, warmup=0.05, grad_clip=1.0, **_CLASSIC,
    ),
}
# The study's heads and loss, kept for a faithful comparison: MLP projection 768→1536→512
# (1.97M params) and MLP predictor 512→1024→512 (1.05M), PyTorch's random init, raw outputs
# compared by L2, triplet (margin 1.0; without triples the negative is mined in the batch: the
# nearest non-positive document, where the study also mined among queries) +
# covariance isotropy, MSE predictive term, batch 16, heads at 5e-4.
# Where we necessarily differ: its frozen encoder ran in train mode (dropout on, so each
# text's vector changed every step); the cache holds the deterministic eval-mode vector.
# Bugs not copied: its head learning rate silently fell to ~2e-6 and its scheduler stepped
# once per epoch, so its heads barely trained; here the schedule steps every batch.
PRESETS["study"] = dict(
    PRESETS["jepa"], projection="mlp", predictor="mlp", init="random", similarity="l2", contrastive="triplet",
    isotropy="covariance", predictive="mse", batch_size=16,
)
# The recipe that wins on these cached vectors (pipelines/ABLATION.md; `python pipelines/ablation.py`):
# a residual linear adapter x + Wx shared by queries and documents that starts exactly at vanilla,
# InfoNCE over the whole cached corpus plus SIGReg (λ 3: it costs nothing in-domain and keeps the
# zero-shot collections where vanilla has them), query epochs at a constant rate, at most 4 of them,
# the epoch chosen on a held-out 20% of the training queries, then a refit on all of them. No
# predictor by default: as a training-only JEPA term it changed nothing, as the query tower it
# over-fitted. `--strategy frozen-predictor` adds the jepa preset's residual predictor (identity
# start) and predictive term on top, queries still through the projection. With the heads come
# per-document corrections of the training corpus (NUDGE-N in the heads' space, its step and query
# weighting chosen on the same dev slice, refit on all queries): eval applies them to this store only.
PRESETS["best"] = dict(
    PRESETS["jepa"], strategy="frozen-isotropy", output_dim=0, projection="adapter", init="identity",
    query_tower="projection", lambda_contrastive=1.0, lambda_isotropy=3.0, temperature=0.05, epochs=4, batch_size=64,
    lr=2e-4, weight_decay=0.01, warmup=0.0, grad_clip=1.0, negatives="corpus", sampling="queries", schedule="constant",
    dev_fraction=0.2, select="dev", refit=True, adapt="nudge-n",
)
DEFAULT_PRESET = "best"  # train-heads and the cached strategies of a pipeline
LIVE_PRESET = "jepa"  # train-live and a pipeline's `full` strategy: in-batch negatives, no dev slice


def by_preset(field: str) -> str:
    """`(best: 0, jepa: 512, study: 512)` for --help, the default preset first; one value when all agree.

    Parentheses, not brackets: --help is rendered by rich, which would take `[...]` for markup.
    """
    names = [DEFAULT_PRESET, *(n for n in PRESETS if n != DEFAULT_PRESET)]
    values = {name: PRESETS[name][field] for name in names}
    if len(set(map(repr, values.values()))) == 1:
        return f"(every preset: {next(iter(values.values()))})"
    return "(" + ", ".join(f"{name}: {value}" for name, value in values.items()) + ")"
