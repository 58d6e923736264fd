# Fine-tuning per (initialisation, task, training fraction) and block of seeds:
# one seed per job by default (`compute.seeds_per_job`).


rule finetune:
    input:
        h5=task_dataset_h5,
        partition="results/splits/{task}.csv",
        subsets=run_subsets,
        encoder=init_encoder_files,
        masks=task_masks,
    output:
        "results/finetune/{init}/{task}/frac{fraction}/{run}/metrics.json",
    log:
        "logs/finetune/{init}/{task}/frac{fraction}/{run}.log",
    benchmark:
        "benchmarks/finetune/{init}/{task}/frac{fraction}/{run}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["finetune"]
    resources:
        gpu=1,
    params:
        code=code_version("finetune"),
        seeds=run_seeds,
        task=task_settings,
        settings=finetune_settings,
        encoder=encoder_argument,
        masks=masks_argument,
        backbone=config["pretrain"]["backbone"],
        device=config["compute"]["device"],
    shell:
        "python -m medssl.finetune --data {input.h5} --partition {input.partition}"
        " --subsets {input.subsets} --fraction {wildcards.fraction} --seed {params.seeds}"
        " --task {params.task:q} --settings {params.settings:q} --init {wildcards.init}"
        " {params.encoder} {params.masks} --backbone {params.backbone} --threads {threads}"
        " --device {params.device} --out {output} > {log} 2>&1"
