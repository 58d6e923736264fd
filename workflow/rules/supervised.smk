# Supervised initialisations (inits with source supervised): a model trained
# with the labels of one task on its whole training split, starting from
# another init's encoder (study B's ImageNet then ChestX-ray14) or from random
# weights; its backbone becomes results/init/<init>/encoder.pt.


rule supervised_init:
    input:
        h5=supervised_h5,
        partition=supervised_partition,
        subsets=supervised_subsets,
        encoder=supervised_start,
        masks=supervised_masks,
    output:
        encoder="results/init/{supervised}/encoder.pt",
        sidecar="results/init/{supervised}/encoder.json",
        metrics="results/init/{supervised}/metrics.json",
    log:
        "logs/supervised_init/{supervised}.log",
    benchmark:
        "benchmarks/supervised_init/{supervised}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["finetune"]
    resources:
        gpu=1,
    params:
        code=code_version("finetune"),
        seed=supervised_seed,
        task=supervised_task_settings,
        settings=supervised_finetune_settings,
        encoder=supervised_encoder_argument,
        masks=masks_argument,
        backbone=config["pretrain"]["backbone"],
        device=config["compute"]["device"],
    shell:
        "python -m medssl.finetune --data {input.h5} --partition {input.partition}"
        " --subsets {input.subsets} --fraction 1.0 --seed {params.seed}"
        " --task {params.task:q} --settings {params.settings:q} --init {wildcards.supervised}"
        " {params.encoder} {params.masks} --backbone {params.backbone} --threads {threads}"
        " --device {params.device} --export-encoder {output.encoder}"
        " --out {output.metrics} > {log} 2>&1"
