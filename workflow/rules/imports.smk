# Published checkpoints (inits with source import) to torchvision-format encoders.


rule import_init:
    input:
        checkpoint=import_checkpoint,
    output:
        encoder="results/init/{imported}/encoder.pt",
        sidecar="results/init/{imported}/encoder.json",
    log:
        "logs/import_init/{imported}.log",
    benchmark:
        "benchmarks/import_init/{imported}.tsv"
    conda:
        "../../envs/medssl.yaml"
    params:
        code=code_version("import_init"),
        settings=import_settings,
    shell:
        "python -m medssl.import_init --checkpoint {input.checkpoint:q}"
        " --format {params.settings[format]} --backbone {params.settings[backbone]}"
        " --stem {params.settings[stem]} --in-channels {params.settings[in_channels]}"
        " {params.settings[img_size_option]}"
        " --out {output.encoder} > {log} 2>&1"
