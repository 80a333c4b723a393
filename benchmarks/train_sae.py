"""Training throughput: a TopK SAE trained from our activation store vs SAELens'
`LanguageModelSAETrainingRunner` (which runs the model for every training batch).

Same model (smollm2-135m, raw numerics, the already-booted TransformerBridge handed to SAELens
as `override_model`), same hook, same tokens (WikiText-2 test packed into 128-token contexts),
same SAE (SAELens TopKTrainingSAE, d_sae = 8 × 576, k = 32, lr 3e-4, no input scaling), same
number of steps and batch size, one run each, same machine. Model loading is excluded for both.

    .venv/bin/python benchmarks/train_sae.py --tokens 32768 --batch 256 --layer 15

Reports tokens/s for: our capture, our training from the store, ours end to end (capture +
train), SAELens end to end, and "capture once, train R" (R dictionaries from one store vs R
SAELens runs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def isolated_home() -> Path:
    """A fresh WORKBENCH_HOME (so the capture is not a cache hit) sharing the converted models."""
    home = Path(tempfile.mkdtemp(prefix="wb-bench-"))
    models = Path.home() / ".cache" / "workbench" / "models"
    (home / "models").symlink_to(models, target_is_directory=True)
    os.environ["WORKBENCH_HOME"] = str(home)
    return home


def ours(model, args, site: str, data: str) -> dict:
    from workbench import api

    t0, c0 = time.perf_counter(), time.process_time()
    store = api.capture(
        model=model.workbench.key,
        sites=[site],
        data=data,
        n_tokens=args.tokens,
        ctx_len=128,
        dtype="float16",
        progress=False,
    )
    t_capture, c_capture = time.perf_counter() - t0, time.process_time() - c0
    steps = args.tokens // args.batch
    t1, c1 = time.perf_counter(), time.process_time()
    res = api.run(
        "train-sae",
        store=str(store.root),
        site=site,
        arch="topk",
        d_sae=8 * 576,
        k=32,
        batch_size=args.batch,
        steps=steps,
        normalize=False,
        skip_special=False,  # SAELens runner: BOS kept (prepend_bos) like any token
        lr=3e-4,
        eval_tokens=2048,
    )
    t_train, c_train = time.perf_counter() - t1, time.process_time() - c1
    n = steps * args.batch
    return {
        "tokens": n,
        "capture_s": t_capture,
        "train_s": t_train,
        "capture_cpu_s": c_capture,
        "train_cpu_s": c_train,
        "capture_tok_s": store.n_rows / t_capture,
        "train_tok_s": n / t_train,
        "end_to_end_tok_s": n / (t_capture + t_train),
        "final": res.final,
    }


def sequences(model, data: str, n_tokens: int):
    """The same 128-token BOS-first rows our capture packs, as a tokenized HF dataset."""
    from datasets import Dataset

    from workbench.data import pack

    rows = []
    for seq in pack(data, model.tokenizer, 128, bos="prepend"):
        rows.append(seq.tokens)
        if len(rows) * 128 >= n_tokens:
            break
    return Dataset.from_dict({"input_ids": rows})


def saelens(model, args, site: str, data: str) -> dict:
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    steps = args.tokens // args.batch
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=8 * 576, k=32, aux_loss_coefficient=1 / 32),
        model_name="smollm2-135m",
        hook_name=site,
        dataset_path="local-wikitext",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=128,
        prepend_bos=True,
        training_tokens=steps * args.batch,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        lr=3e-4,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        save_final_checkpoint=False,
        verbose=False,
    )
    dataset = sequences(model, data, args.tokens * 2)
    t0, c0 = time.perf_counter(), time.process_time()
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    runner.run()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n = steps * args.batch
    return {"tokens": n, "seconds": dt, "cpu_s": dc, "end_to_end_tok_s": n / dt}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="R for the capture-once-train-R estimate")
    parser.add_argument("--skip-saelens", action="store_true")
    args = parser.parse_args()
    isolated_home()
    import torch

    from workbench.data import default_source
    from workbench.models import load_model

    data = str(
        Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test" / "wiki.test.raw"
    )
    data = data if Path(data).exists() else default_source()
    site = f"blocks.{args.layer}.hook_resid_post"
    from workbench.context import POOL

    model = load_model("smollm2-135m")
    POOL.put(model)  # api.capture reuses this bridge instead of booting a second one
    out = {
        "threads": torch.get_num_threads(),
        "site": site,
        "batch": args.batch,
        "ours": ours(model, args, site, data),
    }
    if not args.skip_saelens:
        try:
            out["saelens"] = saelens(model, args, site, data)
        except Exception as err:  # noqa: BLE001 - report precisely why SAELens' path could not run
            out["saelens"] = {"error": f"{type(err).__name__}: {err}"}
    o, s = out["ours"], out.get("saelens", {})
    if "seconds" in s:
        r = args.repeats
        out["speedup_end_to_end"] = o["end_to_end_tok_s"] / s["end_to_end_tok_s"]
        out["speedup_training_only"] = o["train_tok_s"] / s["end_to_end_tok_s"]
        out[f"speedup_capture_once_train_{r}"] = r * s["seconds"] / (o["capture_s"] + r * o["train_s"])
        # CPU seconds of this process: less sensitive to other jobs on a shared machine
        out["cpu_speedup_end_to_end"] = s["cpu_s"] / (o["capture_cpu_s"] + o["train_cpu_s"])
        out["cpu_speedup_training_only"] = s["cpu_s"] / o["train_cpu_s"]
        out[f"cpu_speedup_capture_once_train_{r}"] = (
            r * s["cpu_s"] / (o["capture_cpu_s"] + r * o["train_cpu_s"])
        )
    print(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
