# DICOM in, one HDF5 file per dataset, and the splits of every task.


rule synthesize:
    output:
        dicom=directory("results/dicom/{dataset}"),
        labels="results/dicom/{dataset}.labels.csv",
        masks=directory("results/dicom/{dataset}.masks"),
    log:
        "logs/synthesize/{dataset}.log",
    benchmark:
        "benchmarks/synthesize/{dataset}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["synthesize"]
    params:
        code=code_version("synth"),
        settings=synthetic_settings,
    shell:
        "python -m medssl.synth --out-dir {output.dicom} --labels {output.labels}"
        " --masks-dir {output.masks} --settings {params.settings:q} > {log} 2>&1"


rule convert:
    input:
        source=convert_source,
        manifest=convert_manifest,
    output:
        h5="results/data/{dataset}.h5",
        rejects="results/data/{dataset}.rejects.csv",
        labels="results/data/{dataset}.labels.csv",
    log:
        "logs/convert/{dataset}.log",
    benchmark:
        "benchmarks/convert/{dataset}.tsv"
    conda:
        "../../envs/medssl.yaml"
    threads: THREADS["convert"]
    params:
        code=code_version("convert"),
        settings=convert_settings,
        source=convert_source_options,
        manifest=manifest_argument,
    shell:
        "python -m medssl.convert {params.source} --root {input.source:q} {params.manifest}"
        " --out {output.h5} --rejects {output.rejects} --labels-out {output.labels}"
        " --settings {params.settings:q} --threads {threads} > {log} 2>&1"


rule masks:
    input:
        h5=task_dataset_h5,
        source=mask_source,
        dicom=mask_dicom_folder,
    output:
        "results/masks/{task}.h5",
    log:
        "logs/masks/{task}.log",
    benchmark:
        "benchmarks/masks/{task}.tsv"
    conda:
        "../../envs/medssl.yaml"
    params:
        code=code_version("masks"),
        fmt=mask_format,
        structure=mask_structure,
        preset=mask_preset_option,
    shell:
        "python -m medssl.masks --data {input.h5} --format {params.fmt} {params.preset}"
        " --source {input.source:q} --structure {params.structure:q}"
        " --dicom-dir {input.dicom:q} --out {output} > {log} 2>&1"


rule split:
    input:
        h5=task_dataset_h5,
        labels=task_labels,
        official=official_splits,
    output:
        "results/splits/{task}.csv",
    log:
        "logs/split/{task}.log",
    benchmark:
        "benchmarks/split/{task}.tsv"
    conda:
        "../../envs/medssl.yaml"
    params:
        code=code_version("split"),
        task=task_settings,
        official=official_splits_argument,
    shell:
        "python -m medssl.split --data {input.h5} --labels {input.labels:q}"
        " --task {params.task:q} {params.official} --out {output} > {log} 2>&1"


rule subsample:
    input:
        partition="results/splits/{task}.csv",
    output:
        "results/splits/{task}/seed{seed}.csv",
    log:
        "logs/subsample/{task}/seed{seed}.log",
    benchmark:
        "benchmarks/subsample/{task}/seed{seed}.tsv"
    conda:
        "../../envs/medssl.yaml"
    params:
        code=code_version("subsample"),
    shell:
        "python -m medssl.subsample --partition {input.partition} --seed {wildcards.seed}"
        " --out {output} > {log} 2>&1"
