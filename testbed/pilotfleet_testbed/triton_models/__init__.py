"""Our FT-shaped test models for Triton's Python backend, and how their model repository is written.

Two models speak FasterTransformer's tensor interface (docs/architecture.md) with a deterministic rule
that tests can predict (`echo_rule`): generated token i is ``prompt[i % len(prompt)]``.

- ``ft-echo``: unary.
- ``ft-echo-stream``: decoupled; one response per generated token carrying the whole sequence so far,
  the last one flagged final; every request runs on its own thread; notices cancellation.
- ``ft-echo-stream-slow``: ``ft-echo-stream`` that takes 20 ms per token, for cancellation and
  timeout tests.

Config parameters: ``token_delay_ms`` (per generated token, both models) and ``max_seq_len``
(prompt + request_output_len limit, as in FT's config).
"""
