# One fine-tuning run per (initialisation, task, training fraction, seed).


rule finetune:
    input:
        h5=task_dataset_h5,
        partition="results/splits/{task}.csv",
        subsets="results/splits/{task}/seed{seed}.csv",
        encoder=init_encoder,
        masks=task_masks,
        code=code("finetune"),
    output:
        "results/finetune/{init}/{task}/frac{fraction}/seed{seed}/metrics.json",
    log:
        "logs/finetune/{init}/{task}/frac{fraction}/seed{seed}.log",
    benchmark:
        "benchmarks/finetune/{init}/{task}/frac{fraction}/seed{seed}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["finetune"]
    resources:
        gpu=1,
    params:
        task=task_settings,
        settings=finetune_settings,
        encoder=encoder_argument,
        masks=masks_argument,
        backbone=config["pretrain"]["backbone"],
        device=config["compute"]["device"],
    shell:
        "python -m medssl.finetune --data {input.h5} --partition {input.partition}"
        " --subsets {input.subsets} --fraction {wildcards.fraction} --seed {wildcards.seed}"
        " --task {params.task:q} --settings {params.settings:q} --init {wildcards.init}"
        " {params.encoder} {params.masks} --backbone {params.backbone} --threads {threads}"
        " --device {params.device} --out {output} > {log} 2>&1"
