"""The steps of a run, one module per kind, behind one interface (base.py: StepContext, StepRunner, run_step).

    eval_step.py       EvalStep: the baseline and later evaluations; score_on_test
    prompt_step.py     PromptStep: a DSPy prompt optimizer (p)
    bootstrap_step.py  BootstrapStep: the traces a weight step trains on
    weight_step.py     WeightStep: LoRA fine-tuning (w), with a soft prompt (s)
    init_step.py       InitStep: another run's best program copied in (init); warm_start
    registry.py        which class runs each kind a schedule plans

and what they use: evaluate.py (scoring with a record per example), prompts.py (DSPy's prompt
optimizers), traces.py (recording traces), weights.py (training adapters), parallel.py (a thread
pool with progress). This package imports none of its modules itself: each is imported where used.
"""
