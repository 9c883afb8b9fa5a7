"""Prompting (Zhao et al. §6): how a prompt is built and how an answer is read out of what
the model writes, below evaluation, which uses it. Today: templates, plain and Jinja
(`templates`); few-shot prompts and demonstrations (`fewshot`); chain of thought and
self-consistency's majority vote (`reasoning`); answer extraction (`answers`); prompts to
completions through a model (`complete`); and the sandbox that generated code runs in
(`sandbox`), for tools and program-aided reasoning."""
