"""Training building blocks; the loop that uses them is the job in `jobs/train.py`.

    config.py       TrainConfig (the recipe, flags generated from it), use_bf16, bf16_autocast
    examples.py     refusals, recovery examples, benign anchors and mixed data as tokenized examples; batches; collate
    anchors.py      base_answers: the base model's own greedy answers (cached), the anchors' targets
    recovery.py     safety-recovery examples: harmful prompt + a compliant answer's first k tokens + the refusal
    loss.py         the objective: response-token CE, the anchor term (CE or KL), decision-token weights
    forward.py      running a Llama-like decoder from layer k (what the speed paths need)
    speed.py        PrefixCache and SpeedPaths: the speed paths, entered with `with`
    step.py         prepare_model (what trains), train_step (one optimizer step)
    checkpoint.py   checkpoints (safetensors + JSON) and the resume recipe check
    dev_checks.py   dev prompts, refusal rates, the early-stopping score (shared by calibrate and redteam)
    lora_init.py    contrast / LDA initialisation of LoRA A
    regularizer.py  the overlap regularizer
    malloc.py       the CPU allocator setting

Modules here import `modeling`, `patches`, `judges`, `data` and the bottom layer, never `evals`, `geometry` or
`jobs`. Nothing heavy at module level.
"""
