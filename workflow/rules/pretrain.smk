# Self-supervised pre-training on the unlabelled pool; one encoder per method.


rule pretrain:
    input:
        h5=pretrain_h5,
    output:
        encoder="results/init/{method}/encoder.pt",
        sidecar="results/init/{method}/encoder.json",
    log:
        "logs/pretrain/{method}.log",
    benchmark:
        "benchmarks/pretrain/{method}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["pretrain"]
    resources:
        gpu=1,
    params:
        code=code_version("pretrain"),
        settings=pretrain_settings,
        checkpoints="results/pretrain/{method}",
        seed=config["pretrain"]["seed"],
        device=config["compute"]["device"],
    shell:
        "python -m medssl.pretrain --method {wildcards.method} --data {input.h5}"
        " --settings {params.settings:q} --seed {params.seed} --out {output.encoder}"
        " --checkpoint-dir {params.checkpoints} --threads {threads} --device {params.device}"
        " > {log} 2>&1"
