"""Decode speed of the `python` backend on a GPU (issue #7): plain `generate()` vs our static decoder.

CodeGen architectures at their real sizes (350M, 2B, 6B; random fp16 weights, nothing from a hub),
prompt 256, greedy, batch 1 and 8. For each: ms per decode step of plain Hugging Face `generate()`
(the difference between a 1-token and an N-token call, over N, so the prefill cancels out), of our
`StaticBatchDecoder` with CUDA graphs (the same decoder the Triton model runs; Triton's own overhead is
not in it) and without them, tokens/s, and the HBM floor: the parameter bytes over the bandwidth given
by --hbm-bandwidth (default 3.35e12 B/s, the H100 SXM datasheet figure), the least time any step can
take at batch 1 since every step reads every weight.

First it checks that greedy outputs equal `generate()` token for token on the GPU: the 350M
architecture in float32 (TF32 off), prompts of mixed lengths batched together, rows joining a running
batch. The same check in float16 is reported, not required: there the two paths' different kernels round
differently and near-ties may flip.

    python benchmarks/gpu_backend.py [--models 350m,2b,6b] [--batches 1,8] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from pilotfleet_serve.generation import Row, RowSpec, generate
from pilotfleet_serve.reference import hf_greedy
from pilotfleet_serve.static_decode import StaticBatchDecoder
from transformers import AutoModelForCausalLM, CodeGenConfig, PreTrainedModel

log = logging.getLogger("benchmarks.gpu_backend")

# name: (n_layer, n_embd, n_head, rotary_dim), the published CodeGen-{350M,2B,6B}-mono configs.
ARCHITECTURES = {
    "350m": (20, 1024, 16, 32),
    "2b": (32, 2560, 32, 64),
    "6b": (33, 4096, 16, 64),
}
VOCAB = 51200
CONTEXT = 2048


@dataclass
class Result:
    """One table row."""

    model: str
    params_b: float
    batch: int
    hf_ms: float
    eager_ms: float
    graph_ms: float
    floor_ms: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of our decoder (every row makes one token a step)."""
        return self.batch * 1000.0 / self.graph_ms


def build(name: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A CodeGen of the named size with random weights, made directly on the device."""
    n_layer, n_embd, n_head, rotary_dim = ARCHITECTURES[name]
    config = CodeGenConfig(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_ctx=CONTEXT,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rotary_dim,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids (never zeros: see the device notes on timing real data)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB - 1, (batch, length), generator=generator).tolist()


def sync_time() -> float:
    """A host clock reading after the device finished its queued work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def hf_step_ms(model: PreTrainedModel, batch: list[list[int]], steps: int) -> float:
    """Plain `generate()`: (time for 1 + steps tokens - time for 1 token) / steps, median of two."""
    hf_greedy(model, batch, 2)  # warm-up: kernels, cuBLAS handles
    samples = []
    for _ in range(2):
        start = sync_time()
        hf_greedy(model, batch, 1)
        one = sync_time() - start
        start = sync_time()
        hf_greedy(model, batch, 1 + steps)
        many = sync_time() - start
        samples.append((many - one) * 1000.0 / steps)
    return statistics.median(samples)


def decoder_step_ms(model: PreTrainedModel, batch: list[list[int]], steps: int, graphs: bool) -> float:
    """Our decoder: admit the rows, warm up (graph capture), then time `steps` steps end to end."""
    warm = 8
    decoder = StaticBatchDecoder(model, max_rows=max(8, len(batch)), max_len=CONTEXT, cuda_graphs=graphs)
    rows = [Row(RowSpec(tuple(p), warm + steps + 2), model.device) for p in batch]
    with torch.inference_mode():
        decoder.admit(rows)
        for _ in range(warm):
            decoder.step()
        start = sync_time()
        for _ in range(steps):
            decoder.step()
        elapsed = sync_time() - start
    if any(row.done for row in rows):
        raise RuntimeError("a row ended inside the timed steps")
    return elapsed * 1000.0 / steps


def check_greedy(dtype: torch.dtype, device: torch.device, new_tokens: int) -> tuple[int, int]:
    """Tokens equal between our decoder (rows batched, some joining late) and per-row `generate()`."""
    model = build("350m", dtype, device)
    batch = [p[:n] for p, n in zip(prompts(4, 256, seed=1), (256, 100, 37, 180), strict=True)]
    expected = [hf_greedy(model, [p], new_tokens)[0] for p in batch]
    together = generate(
        model, [RowSpec(tuple(p), new_tokens) for p in batch], decoder=StaticBatchDecoder(model, max_rows=4)
    )
    # Rows joining a running batch: two first, the others after a few steps.
    decoder = StaticBatchDecoder(model, max_rows=4)
    late = [Row(RowSpec(tuple(p), new_tokens), device) for p in batch]
    with torch.inference_mode():
        decoder.admit(late[:2])
        for _ in range(5):
            decoder.step()
        decoder.admit(late[2:])
        while decoder.rows:
            decoder.step()
    equal = total = 0
    for want, rows in ((expected, together), (expected, late)):
        for tokens, row in zip(want, rows, strict=True):
            equal += sum(a == b for a, b in zip(tokens, row.tokens, strict=True))
            total += len(tokens)
    del model
    torch.cuda.empty_cache()
    return equal, total


def run(args: argparse.Namespace) -> tuple[dict[str, object], list[Result]]:
    """Measure: what the run was (JSON-able) and the table's rows."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fp32 = check_greedy(torch.float32, device, args.check_tokens)
    log.info("greedy check float32: %d/%d tokens equal", *fp32)
    fp16 = check_greedy(torch.float16, device, args.check_tokens)
    log.info("greedy check float16: %d/%d tokens equal", *fp16)
    results: list[Result] = []
    for name in args.models.split(","):
        model = build(name, torch.float16, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        params = sum(p.numel() for p in model.parameters()) / 1e9
        for size in (int(b) for b in args.batches.split(",")):
            batch = prompts(size, args.prompt, seed=size)
            result = Result(
                model=name,
                params_b=params,
                batch=size,
                hf_ms=hf_step_ms(model, batch, args.hf_steps),
                eager_ms=decoder_step_ms(model, batch, args.eager_steps, graphs=False),
                graph_ms=decoder_step_ms(model, batch, args.steps, graphs=True),
                floor_ms=weight_bytes / args.hbm_bandwidth * 1000.0,
            )
            log.info("%s", result)
            results.append(result)
        del model
        torch.cuda.empty_cache()
    report: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hbm_bandwidth": args.hbm_bandwidth,
        "prompt": args.prompt,
        "greedy_check": {"float32": fp32, "float16": fp16},
    }
    return report, results


def table(report: dict[str, object], results: list[Result]) -> str:
    """The Markdown table of a run."""
    lines = [
        f"{report['gpu']}, torch {report['torch']}, transformers {report['transformers']}, "
        f"{report['date']}; prompt {report['prompt']}, greedy, fp16; HBM floor at "
        f"{report['hbm_bandwidth']:.3g} B/s; greedy check (equal/total tokens): {report['greedy_check']}",
        "",
        "| model | batch | generate() ms/step | ours, no graphs | ours ms/step | speed-up | ours tokens/s "
        "| HBM floor ms | ours / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| CodeGen-{r.model.upper()} ({r.params_b:.2f} B params) | {r.batch} | {r.hf_ms:.2f} "
            f"| {r.eager_ms:.2f} | {r.graph_ms:.2f} | {r.hf_ms / r.graph_ms:.1f}x | {r.tokens_per_s:.0f} "
            f"| {r.floor_ms:.2f} | {r.graph_ms / r.floor_ms:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table (and write the JSON report when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="350m,2b,6b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128, help="timed steps of our decoder")
    parser.add_argument("--eager-steps", type=int, default=24, help="timed steps without graphs")
    parser.add_argument("--hf-steps", type=int, default=32, help="tokens of the long generate() call")
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--hbm-bandwidth", type=float, default=3.35e12, help="bytes/s for the floor")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: this benchmark measures the GPU path")
        return 1
    report, results = run(args)
    if args.json:
        rows = [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results]
        args.json.write_text(json.dumps({**report, "results": rows}, indent=2))
    print(table(report, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
