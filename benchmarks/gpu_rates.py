"""Training and scoring rates of the cross-encoder on one device, and its model FLOP utilisation (MFU).

    python benchmarks/gpu_rates.py --device cuda --pairs 20000 --out rates.json   # benchmarks/gpu.sh runs this
    python benchmarks/gpu_rates.py --device cpu --pairs 256                        # the same on this CPU

Pairs are (user text, ad text) of adrank's sample market, written the way the default templates write them
(profile, three clicked titles; title. description). Training repeats train.py's step (random batches padded
to their longest pair, bf16 autocast on CUDA, BCE, clipping, AdamW); scoring runs predict_logits (length-sorted
batches; bf16 autocast on CUDA) and the same batching with autocast off (fp32). Rates include tokenisation, as
the flows do. FLOPs per pair count the matrix work of the non-embedding parameters: 2 x parameters x tokens
forward, 6 x backward included (attention's own matrix products, small at these lengths, are left out). MFU
divides the achieved FLOP rate by the card's dense peak from PEAK_TFLOPS (datasheet figures), and, on any
device, by a measured matrix-multiply rate as well.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import SampleDataConfig, packaged_model_path  # noqa: E402
from tasks.model import (  # noqa: E402
    collate,
    length_sorted_batches,
    load_cross_encoder,
    predict_logits,
    seed_everything,
    tokenize_pairs,
)
from tasks.sample_data import generate_sample_logs  # noqa: E402

# dense TFLOP/s by the vendors' datasheets: (bf16 tensor cores, plain fp32). First match of the device name
# wins, so longer names come before their prefixes (L40S before L4, A100 before A10).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
]
HISTORY_TITLES = 3  # data.history_length's default


def peak_tflops(device_name: str) -> dict[str, float] | None:
    """The card's dense peaks {'bf16': ..., 'fp32': ...} from PEAK_TFLOPS, or None for a card not listed."""
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return {"bf16": bf16, "fp32": fp32}
    return None


def market_pairs(n: int, seed: int = 7) -> tuple[list[str], list[str]]:
    """n (user text, ad text) pairs drawn from the sample market: random users and ads, three random titles
    as each user's history."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        generate_sample_logs(SampleDataConfig(seed=seed), Path(folder))
        ads = pq.read_table(Path(folder) / "ads").to_pylist()
        users = pq.read_table(Path(folder) / "users").to_pylist()
    titles = [ad["title"] for ad in ads]
    ad_texts = [f"{ad['title']}. {ad.get('description') or ''}" for ad in ads]
    user_texts = []
    for user in users:
        profile = ", ".join(f"{k}: {v}" for k, v in user.items() if k != "user_id" and v is not None)
        history = ", ".join(rng.choice(titles, HISTORY_TITLES, replace=False))
        user_texts.append(f"{profile}. Recently clicked: {history}")
    picked_users = rng.integers(len(user_texts), size=n)
    picked_ads = rng.integers(len(ad_texts), size=n)
    return [user_texts[i] for i in picked_users], [ad_texts[i] for i in picked_ads]


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters of the matrix work: all but the (token, position, type) embedding tables."""
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_rate(
    model: torch.nn.Module, tokenizer, encodings: list[dict], device: torch.device, batch_size: int, steps: int
) -> float:
    """Training pairs per second over `steps` optimizer steps, after one untimed warm-up step (train.py's step)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (len(encodings),), generator=generator).float()

    def step() -> int:
        index = torch.randint(len(encodings), (batch_size,), generator=generator).tolist()
        batch = collate(tokenizer, [encodings[i] for i in index], device)
        with autocast:
            logits = model(**batch).logits.squeeze(-1)  # (batch,)
        loss = loss_fn(logits.float(), labels[index].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(index)

    step()
    synchronize(device)
    started = time.perf_counter()
    pairs = sum(step() for _ in range(steps))
    synchronize(device)
    return pairs / (time.perf_counter() - started)


def fp32_logits(model, tokenizer, user_texts, ad_texts, max_length: int, batch_size: int) -> np.ndarray:
    """predict_logits' batching (tokenise, length-sort, pad per batch) with autocast off: the fp32 reference."""
    device = next(model.parameters()).device
    encodings = tokenize_pairs(tokenizer, user_texts, ad_texts, max_length)
    out = np.empty(len(encodings), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for index in length_sorted_batches(encodings, batch_size):
            batch = collate(tokenizer, [encodings[i] for i in index], device)
            out[index] = model(**batch).logits.squeeze(-1).float().cpu().numpy()
    return out


def scoring_rate(score, user_texts: list[str], ad_texts: list[str], device: torch.device) -> tuple[float, np.ndarray]:
    """Pairs per second of score(user_texts, ad_texts) (tokenisation included), after a warm-up on 64 pairs."""
    score(user_texts[:64], ad_texts[:64])
    synchronize(device)
    started = time.perf_counter()
    logits = score(user_texts, ad_texts)
    synchronize(device)
    return len(user_texts) / (time.perf_counter() - started), logits


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Best TFLOP/s of a square matrix product: the ceiling this device reaches on plain matrix work."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


def measure(
    model_path: str,
    device_name: str = "cuda",
    pairs: int = 20000,
    train_batch: int = 64,
    train_steps: int = 100,
    score_batch: int = 512,
    max_length: int = 128,
) -> dict[str, Any]:
    """Every rate and utilisation figure of one device, as a JSON-ready dict."""
    device = torch.device(device_name)
    seed_everything(0)
    user_texts, ad_texts = market_pairs(pairs)
    model, tokenizer = load_cross_encoder(model_path, device)
    encodings = tokenize_pairs(tokenizer, user_texts, ad_texts, max_length)
    tokens = float(np.mean([len(e["input_ids"]) for e in encodings]))
    parameters = non_embedding_parameters(model)
    forward_flops, train_flops = 2 * parameters * tokens, 6 * parameters * tokens

    started = time.perf_counter()
    tokenize_pairs(tokenizer, user_texts, ad_texts, max_length)
    tokenize_rate = pairs / (time.perf_counter() - started)

    train_rate = training_rate(model, tokenizer, encodings, device, train_batch, train_steps)
    fp32_rate, fp32 = scoring_rate(
        lambda u, a: fp32_logits(model, tokenizer, u, a, max_length, score_batch), user_texts, ad_texts, device
    )
    bf16_rate = max_abs_diff = None
    if device.type == "cuda":  # predict_logits' own path: bf16 autocast
        bf16_rate, bf16 = scoring_rate(
            lambda u, a: predict_logits(model, tokenizer, u, a, max_length, score_batch), user_texts, ad_texts, device
        )
        max_abs_diff = float(np.max(np.abs(bf16 - fp32)))

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name)
        gemm = {"bf16": gemm_tflops(device, torch.bfloat16, 8192), "fp32": gemm_tflops(device, torch.float32, 8192)}
    else:
        name, peak = platform.processor() or platform.machine(), None
        gemm = {"fp32": gemm_tflops(device, torch.float32, 1024)}

    def utilisation(pairs_per_s: float | None, flops_per_pair: float, precision: str) -> dict[str, float | None]:
        if pairs_per_s is None:
            return {"tflops": None, "mfu_vs_peak": None, "mfu_vs_gemm": None}
        achieved = pairs_per_s * flops_per_pair / 1e12
        return {
            "tflops": achieved,
            "mfu_vs_peak": achieved / peak[precision] if peak else None,
            "mfu_vs_gemm": achieved / gemm[precision] if precision in gemm else None,
        }

    train_precision = "bf16" if device.type == "cuda" else "fp32"  # train.py autocasts on CUDA only
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "model": model_path,
        "non_embedding_parameters": parameters,
        "pairs": pairs,
        "mean_tokens_per_pair": tokens,
        "max_length": max_length,
        "train_batch": train_batch,
        "train_steps": train_steps,
        "score_batch": score_batch,
        "flops_per_pair": {"forward": forward_flops, "train": train_flops},
        "peak_tflops": peak,
        "gemm_tflops": gemm,
        "tokenize_pairs_per_s": tokenize_rate,
        "training": {"pairs_per_s": train_rate, "precision": train_precision}
        | utilisation(train_rate, train_flops, train_precision),
        "scoring_fp32": {"pairs_per_s": fp32_rate} | utilisation(fp32_rate, forward_flops, "fp32"),
        "scoring_bf16": {"pairs_per_s": bf16_rate} | utilisation(bf16_rate, forward_flops, "bf16"),
        "bf16_max_abs_logit_diff": max_abs_diff,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--model", default=None, help="base model folder (default: the packaged MiniLM-L6)")
    parser.add_argument("--pairs", type=int, default=20000, help="pairs scored (and drawn from for training)")
    parser.add_argument("--train-batch", type=int, default=64, help="training pairs per step")
    parser.add_argument("--train-steps", type=int, default=100, help="timed training steps")
    parser.add_argument("--score-batch", type=int, default=512, help="pairs per inference batch")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per pair (model.max_seq_length)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(
        args.model or packaged_model_path(),
        args.device,
        args.pairs,
        args.train_batch,
        args.train_steps,
        args.score_batch,
        args.max_length,
    )
    result["command"] = "python benchmarks/gpu_rates.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
