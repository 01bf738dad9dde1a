"""`mapnet bench`: what a mapping costs, measured on this machine.

Every figure is measured in a fresh subprocess, so peak RSS (VmHWM) belongs to that measurement
alone and nothing is warm from the previous one; processes that are compared run interleaved in
rounds of alternating order. One module a bench, each with its section of the report:

    construction   time and memory to build a mapping
    step           one training step (batch, cross-entropy, Adam) of the plain target, of the
                   mapped target (dense / structured projection) and of intrinsic-dimension
                   training θ₀ + W z (Li et al. 2018), at one or several thread counts side by
                   side; breakdown: where a mapped step's time goes
    memory         peak memory of a few Adam steps, plain vs mapped, and of `wrap()` from a
                   factory and from an instance, tracked through torch's allocations and as
                   peak RSS (peak_memory)
    inference      eval-mode forward under torch.no_grad(), plain vs mapped, the mapped model
                   reusing its generated weights
    comm           bytes all-reduced per step and step time over 2 gloo processes, plain vs
                   mapped CNN2
    finetune       one fine-tuning step of every method (head, BitFit, full, peft LoRA, VeRA,
                   IA3, mapnet L = 1, L = 250, row) on ResNet-50 and a MiniLM-shaped BERT:
                   time and peak RSS, with the fine-tuning targets
    gpt2           GPT-2 small (124M): build time, step time, peak RSS and checkpoint bytes of
                   full fine-tuning, peft LoRA and mapnet L = 1 / row at ~4,096 trainable
                   numbers; --loss-curve: the loss per step of mapnet row and LoRA
    defaults       the runs behind the defaults in docs/method.md, and their page
    targets        the v0.2 targets, judged from the measurements
    report         docs/results/bench.md from results/bench/*.json

beneath them: harness (fresh processes, the machine, results files), subjects (the models and
variants measured) and text (how figures read).
"""
