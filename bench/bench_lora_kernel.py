"""One LoRA layer's update on vLLM-CPU, per call: lora_rows.c against torch's ops, by layer and batch rows.

The inference worker's ``fused_add_lora_linear`` (inference_worker/vllm_cpu_lora/fused.py)
on a real ``PunicaWrapperCPU``, SmolLM2-135M's four LoRA layers (qkv, o,
gate_up, down; hidden 576, MLP 1536), one adapter of rank 8 in vLLM's
rank-16 slots, bfloat16 activations. Each batch size runs both paths
one after the other in one process: ``kernel`` (lora_rows.c, the plugin's
default) and ``torch`` (casts, two float32 matmuls, an add: where the kernel
cannot be built), with torch's threads at the machine's cores as vLLM-CPU
sets them; the kernel shares batches of ``SPLIT_ROWS`` rows or more out
between as many threads. A
decode step of SmolLM2 calls the layer 120 times (30 decoder layers x 4):
the last column is that, per step, for the rows of one step.

A second table times a whole decode step's 120 calls as a ``--compile-lora``
graph makes them, one op call per layer, 120 distinct layers (each its own
adapter weights): through ``trainq::lora_linear`` (the Python op: punica
wrapper, fused layer, ctypes) and through ``trainq_rows::lora_linear``
(lora_op.cpp: the kernel called from C++ once the step is published), both
with the weights hot in cache and after a pass over 256 MB between steps
(the base model's bytes, which evict them in a real step).

    python bench/bench_lora_kernel.py                 # rows 1, 8, 64, 512, 3200 (a demo step's prompts)
    python bench/bench_lora_kernel.py --rows 1 8 16 32 64 128 --step-rows 1 8
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import machine_line, median, print_table

from inference_worker.vllm_cpu_lora import compilation, fused, rows_kernel, rows_op
from tests.support import punica

SWEEP_BYTES = 256 * 2**20  # about SmolLM2-135M's bf16 weights, read once a step

HIDDEN, MLP, RANK = 576, 1536, 8
LAYERS = {  # name: (input width, output slices), SmolLM2-135M
    "qkv": (HIDDEN, (HIDDEN, 192, 192)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (MLP, MLP)),
    "down": (MLP, (HIDDEN,)),
}
CALLS_PER_STEP = 30  # decoder layers, each calling every layer of LAYERS once


def adapter(width: int, slices: tuple[int, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """vLLM's stacked layout: rank-8 weights in slot 0 of rank-16 slots."""
    a = tuple(torch.zeros(punica.MAX_LORAS, 1, punica.MAX_RANK, width, dtype=torch.bfloat16) for _ in slices)
    b = tuple(torch.zeros(punica.MAX_LORAS, 1, out, punica.MAX_RANK, dtype=torch.bfloat16) for out in slices)
    for a_slice, b_slice in zip(a, b):
        a_slice[0, 0, :RANK].copy_(torch.randn(RANK, width) / 8)
        b_slice[0, 0, :, :RANK].copy_(torch.randn(b_slice.shape[2], RANK) / 8)
    return a, b


def time_calls(call, calls: int) -> float:  # type: ignore[no-untyped-def]
    """Microseconds a call, the median of 5 runs of ``calls`` calls."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return median(runs)


def measure(rows: int, name: str) -> tuple[float, float]:
    """(kernel, torch) microseconds a call of layer ``name`` on ``rows`` rows."""
    width, slices = LAYERS[name]
    a, b = adapter(width, slices)
    x = torch.randn(rows, width, dtype=torch.bfloat16)
    y = torch.randn(rows, sum(slices), dtype=torch.bfloat16)
    calls = max(20, 4000 // rows)
    built = rows_kernel.load

    def timed() -> float:
        wrapper = punica.punica_wrapper((1,) * rows)  # a new one: its layers pick up the kernel, or not
        fused.fused_add_lora_linear(wrapper, y, x, a, b, 1.0, slices)  # builds the fused weights
        return time_calls(lambda: fused.fused_add_lora_linear(wrapper, y, x, a, b, 1.0, slices), calls)

    kernel = timed()
    try:
        rows_kernel.load = lambda: None  # as without a compiler: torch's ops
        torch_ops = timed()
    finally:
        rows_kernel.load = built
    return kernel, torch_ops


def step_ops(rows: int) -> dict[str, tuple[float, float]]:
    """Per op: (hot, swept) milliseconds of a decode step's 120 calls on ``rows`` rows, the median of 30 steps."""
    from types import SimpleNamespace

    from vllm.lora.punica_wrapper import punica_cpu

    punica_cpu.PunicaWrapperCPU.add_lora_linear = fused.fused_add_lora_linear  # as register() installs it
    wrapper = punica.punica_wrapper((1,) * rows)
    calls = []
    for _ in range(CALLS_PER_STEP):
        for width, slices in LAYERS.values():
            a, b = adapter(width, slices)
            layer = SimpleNamespace(punica_wrapper=wrapper, lora_a_stacked=a, lora_b_stacked=b, output_slices=slices)
            x = torch.randn(rows, width, dtype=torch.bfloat16)
            calls.append((torch.randn(rows, sum(slices), dtype=torch.bfloat16), x, compilation.register_layer(layer)))
    sweep = torch.zeros(SWEEP_BYTES // 4)
    results = {}
    for name in ("python op", "c++ op"):
        if name == "python op":
            op = torch.ops.trainq.lora_linear.default
        elif rows_op.load_op():  # from here on the Python op also publishes what the C++ op reads
            compilation._use_rows_op(True)
            op = torch.ops.trainq_rows.lora_linear.default
        else:
            continue
        def step() -> float:
            started = time.perf_counter()
            for y, x, number in calls:
                op(y, x, number)
            return (time.perf_counter() - started) * 1000

        step()  # builds the fused layers, publishes the step
        hot = median([step() for _ in range(30)])
        swept = []
        for _ in range(30):
            sweep.add_(1.0)
            swept.append(step())
        results[name] = (hot, median(swept))
    compilation._op = compilation._PYTHON_OP  # the next rows' Python op as the graph had it
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512, 3200], help="batch rows (tokens) to time")
    parser.add_argument("--step-rows", type=int, nargs="+", default=[1, 8], help="rows of the decode steps to time")
    args = parser.parse_args()
    if rows_kernel.load() is None:
        raise SystemExit("lora_rows.c did not build (is a C compiler installed?): nothing to compare")
    punica.punica_wrapper((1,))  # skips (exits) here without vLLM
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    print(machine_line())
    print(f"fused_add_lora_linear, SmolLM2-135M's LoRA layers, rank {RANK}, bf16, torch threads "
          f"{torch.get_num_threads()}; the kernel splits batches of {rows_kernel.SPLIT_ROWS} rows or more "
          f"between {len(rows_kernel._CPUS)} threads\n")
    table = []
    for rows in args.rows:
        per_step = {"kernel": 0.0, "torch": 0.0}
        for name in LAYERS:
            kernel, torch_ops = measure(rows, name)
            per_step["kernel"] += kernel * CALLS_PER_STEP / 1000
            per_step["torch"] += torch_ops * CALLS_PER_STEP / 1000
            table.append([rows, name, f"{kernel:.1f}", f"{torch_ops:.1f}", f"{torch_ops / kernel:.2f}x", ""])
        table.append([rows, "a step (120 calls)", "", "", f"{per_step['torch'] / per_step['kernel']:.2f}x",
                      f"{per_step['kernel']:.2f} vs {per_step['torch']:.2f}"])
    print_table(["rows", "layer", "kernel us/call", "torch us/call", "speed-up", "ms/step kernel vs torch"], table)

    print(f"\na decode step's {CALLS_PER_STEP * len(LAYERS)} calls of the compiled graph's op, each layer its own "
          f"adapter; swept: after a pass over {SWEEP_BYTES >> 20} MB (median of 30 steps)\n")
    table = []
    for rows in args.step_rows:
        results = step_ops(rows)
        python_hot, python_swept = results["python op"]
        for name, (hot, swept) in results.items():
            table.append([rows, name, f"{hot:.2f}", f"{swept:.2f}", f"{python_hot / hot:.2f}x", f"{python_swept / swept:.2f}x"])
    print_table(["rows", "op", "ms/step hot", "ms/step swept", "speed-up hot", "speed-up swept"], table)


if __name__ == "__main__":
    main()
