"""Does a vector steer, and what does it cost the model: held-out preference margins (margin),
scored free generation (generation), A/B and multiple-choice letter scores (ab, mcq, score), MMLU
(mmlu), the steering curves and generation entry points (evaluate, generate, vllm), vector scale
(scale) and the report (report)."""
