# Self-supervised pre-training on the unlabelled pool; one encoder per method and
# pre-training seed (`pretrain.seeds`), and one per continual (domain-adaptive)
# init, which starts from the encoder of the init named in its `from` ({method}
# is then the init's name).


rule pretrain:
    input:
        h5=pretrain_h5,
        start=pretrain_start,
    output:
        encoder="results/init/{method}/pseed{pseed}/encoder.pt",
        sidecar="results/init/{method}/pseed{pseed}/encoder.json",
    log:
        "logs/pretrain/{method}/pseed{pseed}.log",
    benchmark:
        "benchmarks/pretrain/{method}/pseed{pseed}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["pretrain"]
    resources:
        # pretrain.gpus > 1: DDP over that many GPUs of one node (torchrun, --nproc).
        gpu=config["pretrain"]["gpus"],
    params:
        code=pretrain_code_version,
        method=pretrain_method,
        settings=pretrain_settings,
        start=init_encoder_argument,
        checkpoints="results/pretrain/{method}/pseed{pseed}",
        device=config["compute"]["device"],
    shell:
        "python -m medssl.pretrain --method {params.method} --data {input.h5} {params.start}"
        " --settings {params.settings:q} --seed {wildcards.pseed} --out {output.encoder}"
        " --checkpoint-dir {params.checkpoints} --threads {threads} --device {params.device}"
        " --nproc {resources.gpu}"
        " > {log} 2>&1"
