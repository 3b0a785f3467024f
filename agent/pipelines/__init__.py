"""Pipelines: the library behind ``tirforge collect / evolve / eval / loop / train grpo``.

The floor between the faces in ``apps`` (which parse, call and render) and the agent, training
and trajectory libraries they drive: ``collect`` (resumable batched collection), ``evolve``
(rewrite problems, label them by TIR consensus), ``evaluate`` (the Qwen2.5-Math evaluation
protocol), ``loop_config`` / ``loop`` / ``loop_train`` / ``loop_report`` (the self-improvement
loop), ``rollout`` (GRPO rollouts through the agent graph). Nothing here imports ``apps``.
"""
